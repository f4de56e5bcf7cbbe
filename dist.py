"""
Data parallelism under torchrun, and nothing else: which process this is, the process group, the
DDP wrapper, and the few collectives the stages need.

    torchrun --standalone --nproc_per_node=N train.py ...

torchrun starts N copies of train.py and tells each its RANK, LOCAL_RANK and WORLD_SIZE through the
environment. Without torchrun there is one process, rank 0 of 1, no process group is made and every
function here returns at once: `python train.py` runs exactly as if this module did not exist.

What runs data-parallel (README, "One GPU, or several"): SFT, the one stage that trains on a stream
of fresh data. Every rank draws its own batches (data_seed), DDP averages the gradients, and the loss
is normalised by the token counts of all ranks' batches (sft.sft_loss, all_sum), so one step is the
step of a single process on the N ranks' batches concatenated. The preference comparison's runs are
independent of each other and small: each rank trains its share of them whole (pref.compare).
Everything else (the tokenizer, evaluation, the joint study, the probes, the report) runs on rank 0.
"""
import datetime
import gc
import inspect
import os

import torch
import torch.distributed as td
from torch.nn.parallel import DistributedDataParallel

from errors import Refused

RANK = int(os.environ.get("RANK", 0))
WORLD = int(os.environ.get("WORLD_SIZE", 1))
LOCAL_RANK = int(os.environ.get("LOCAL_RANK", 0))
LOCAL_WORLD = int(os.environ.get("LOCAL_WORLD_SIZE", WORLD))    # the processes on this machine


# the stages every rank runs (train.py); the others run on rank 0 alone
STAGES = ("sft", "pref")


def active():
    """Several processes, and their group still open (rank 0 closes it when the other ranks leave)."""
    return WORLD > 1 and td.is_initialized()


def is_main():
    """Rank 0: the one process that logs, evaluates and writes checkpoints and reports."""
    return RANK == 0


def init(device):
    """Join the process group (NCCL on CUDA, one GPU per process; gloo on CPU) and return the device
    this process computes on. A no-op without torchrun. Two processes cannot share one GPU under
    NCCL: more processes on this machine than it has GPUs is refused before any group is made."""
    if WORLD == 1:
        return device
    if device.startswith("cuda"):
        have = torch.cuda.device_count()
        if LOCAL_WORLD > have:
            raise Refused("" if LOCAL_RANK else     # one line from the machine's first process, not one each
                          f"error: {LOCAL_WORLD} processes need {LOCAL_WORLD} GPUs; this machine has {have} "
                          f"(torchrun --nproc_per_node={have}, or plain python for one GPU)")
        device = f"cuda:{LOCAL_RANK}"
        torch.cuda.set_device(device)
    if not td.is_initialized():
        # rank 0 evaluates while the others wait at a barrier: minutes on a CPU, so a long timeout.
        # device_id: NCCL knows this process's GPU at once (its barriers need not guess it)
        on_gpu = {"device_id": torch.device(device)} if device.startswith("cuda") else {}
        td.init_process_group("nccl" if device.startswith("cuda") else "gloo",
                              timeout=datetime.timedelta(hours=6), **on_gpu)
    return device


def close():
    """Leave the process group: every rank at once (NCCL's teardown may wait for all of them).
    The first DDP wrapper a process makes sits in a reference cycle (torch 2.13), so it outlives the
    function that made it until the cycle collector runs, and it holds the group: destroyed later, at
    some collection or at interpreter exit, gloo's group can abort the process ("terminate called without an active exception": 3 of 25
    two-process runs of a wrapper left to the collector, torch 2.13). So the garbage wrappers are
    collected first, while the group is whole; a wrapper still referenced at close keeps that hazard.
    Even so the group outlives destroy_process_group once a wrapper was made, and a gloo thread frees
    each finished collective's tensors later, under the GIL: at exit it can find the interpreter gone
    and abort too (1 run in ~100 here). The barrier lets those threads finish while every rank waits
    without the GIL."""
    if active():
        gc.collect()
        td.barrier()
        td.destroy_process_group()


def barrier():
    if active():
        td.barrier()


def data_seed(seed):
    """The seed of this rank's data stream: `seed` itself on rank 0 (so that one process draws what it
    always drew), far from every other run's seed on the others (seed + rank would make rank 1 of
    --seed 0 draw the batches of rank 0 of --seed 1, the second model of --sft_seeds)."""
    return seed + 1_000_003 * RANK


def wrap(model):
    """The model under DDP (its gradients averaged over the ranks in backward), or itself alone. The
    model's buffers (the codebook's pixels, the cells' words) never change, so they are not sent again
    at every forward (torch 2.13 renamed that switch)."""
    if not active():
        return model
    device = next(model.parameters()).device
    no_sync = ("forward_sync_buffers" if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
               else "broadcast_buffers")
    return DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None, **{no_sync: False})


def all_sum(t):
    """The sum of t over the ranks (t itself in one process). Differentiable it is not: for counts and
    logged values only."""
    if active():
        t = t.clone()
        td.all_reduce(t)
    return t


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (any picklable object)."""
    if not active():
        return [obj]
    out = [None] * WORLD
    td.all_gather_object(out, obj)
    return out

