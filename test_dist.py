"""
Tests of data-parallel training under torchrun: two CPU processes talking through gloo.
Run: python -m unittest test_dist   (or: pytest test_dist.py)

Each test starts `torchrun --standalone --nproc_per_node=2` (python -m torch.distributed.run) in a
subprocess: on this file itself (its __main__ is the worker that compares the ranks step by step),
or on train.py.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest
from unittest import mock

import torch

import dist
import train
from checkpoint import Refused

HERE = os.path.dirname(os.path.abspath(__file__))
# a tiny model and world: seconds per run
TINY = ["--tok_images", "300", "--n_layer", "2", "--n_embd", "64", "--n_head", "4", "--batch_size", "8",
        "--und_first", "1", "--primer", "1", "--log_every", "2", "--ckpt_every", "2", "--device", "cpu"]
STEPS = 3


def torchrun(*argv, n=2):
    """Run `torchrun --standalone --nproc_per_node=n argv...` in this directory; the finished process."""
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
                           *argv], cwd=HERE, capture_output=True, text=True, timeout=600)


def flat(tensors):
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def worker(out_dir):
    """Under torchrun: a few data-parallel SFT steps, as train_sft takes them. After every step each
    rank's parameters are gathered; at the first, rank 0 also computes the one-process gradient of the
    two ranks' batches concatenated. Rank 0 writes what it measured to out_dir/steps.json."""
    import copy
    import random

    import data
    import dist
    import sft
    import train
    import world
    from model import GPT, GPTConfig, PatchTokenizer
    from test_model import renders

    args = train.resolve(train.parser.parse_args(TINY + ["--out_dir", out_dir]))   # joins the process group
    assert dist.WORLD == 2 and torch.distributed.is_initialized()
    tok = PatchTokenizer(args.n_codes, args.patch, world.CANVAS)
    tok.fit(renders("train", 200)[1], generator=torch.Generator().manual_seed(0))
    vocab = data.Vocab(tok.n_codes)
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocab_size=vocab.size, n_codes=tok.n_codes, code_dim=tok.codebook.size(1),
                          cell_words=data.cell_word_ids(vocab, tok.grid), n_layer=2, n_head=4, n_embd=64),
                tok.codebook)
    before = copy.deepcopy(model)
    ddp = dist.wrap(model)
    opt = sft.adamw(model.parameters(), 1e-3, "cpu")
    data_rng = random.Random(dist.data_seed(args.seed))
    measured = {"param_spread": []}
    for step in range(STEPS):
        ids, labels, task = sft.sft_batch(data_rng, tok, vocab, args)
        loss = sft.sft_loss(ddp, ids, labels, task, args.und_loss, across_ranks=True)[0]
        opt.zero_grad(set_to_none=True)
        (loss * dist.WORLD).backward()
        if step == 0:
            batches = dist.gather((ids, labels, task))
            grads = dist.gather(flat(p.grad for p in model.parameters()))
            losses = dist.gather(loss.detach())
            if dist.is_main():   # the same step in one process, on the batches concatenated
                T = max(x.size(1) for x, _, _ in batches)
                pad = torch.nn.functional.pad
                cat_ids = torch.cat([pad(x, (0, T - x.size(1)), value=vocab.pad) for x, _, _ in batches])
                cat_labels = torch.cat([pad(y, (0, T - y.size(1)), value=-100) for _, y, _ in batches])
                cat_task = torch.cat([t for _, _, t in batches])
                whole = sft.sft_loss(before, cat_ids, cat_labels, cat_task, args.und_loss)[0]
                whole.backward()
                ref = flat(p.grad for p in before.parameters())
                measured.update(
                    grad_rel_err=float((grads[0] - ref).norm() / ref.norm()), grad_norm=float(ref.norm()),
                    ranks_grad_diff=float((grads[0] - grads[1]).abs().max()),
                    loss_err=abs(float(sum(losses)) - whole.item()), loss=whole.item(),
                    batches_differ=not torch.equal(batches[0][0][:, :5], batches[1][0][:, :5]))
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        params = dist.gather(flat(model.parameters()))
        measured["param_spread"].append(float((params[0] - params[1]).abs().max()))
    if dist.is_main():
        with open(os.path.join(out_dir, "steps.json"), "w") as f:
            json.dump(measured, f)
    # the caller closes the group once this function's DDP wrapper is garbage (dist.close)


class TestDataParallelSFT(unittest.TestCase):

    def test_a_step_is_the_one_process_step_on_the_ranks_batches_concatenated(self):
        with tempfile.TemporaryDirectory() as d:
            run = torchrun(os.path.abspath(__file__), "--worker", d)
            self.assertEqual(run.returncode, 0, run.stderr[-3000:])
            with open(os.path.join(d, "steps.json")) as f:
                m = json.load(f)
        self.assertTrue(m["batches_differ"])                       # each rank draws its own data
        self.assertEqual(m["ranks_grad_diff"], 0.0)                # DDP gave both ranks the same gradient
        self.assertGreater(m["grad_norm"], 0.0)
        self.assertLess(m["grad_rel_err"], 1e-5)                   # ... the gradient of the whole batch
        self.assertLess(m["loss_err"], 1e-4 * m["loss"])            # the ranks' losses add up to its loss
        self.assertEqual(m["param_spread"], [0.0] * STEPS)         # identical parameters after every step

    def test_train_py_under_torchrun_writes_once_and_resumes_exactly(self):
        with tempfile.TemporaryDirectory() as d:
            whole, part = os.path.join(d, "whole"), os.path.join(d, "part")
            for out, steps, more in ((whole, 4, []), (part, 2, []), (part, 4, ["--resume"])):
                run = torchrun("train.py", "--stage", "tokenizer,sft", "--steps", str(steps), "--out_dir", out,
                               *TINY, *more)
                self.assertEqual(run.returncode, 0, run.stderr[-3000:])
            with open(os.path.join(whole, "log.txt")) as f:
                log = f.read()
            self.assertEqual(log.count("sft | done"), 1)            # rank 0 alone logs
            self.assertIn("data-parallel over 2 ranks: global batch 2 x 8 = 16 sequences", log)
            # rank 1 writes its log lines to a file of its own, and nothing else
            self.assertEqual(sorted(os.listdir(whole)), ["log.rank1.txt", "log.txt", "run.json", "sft.pt", "tokenizer.pt"])
            with open(os.path.join(whole, "log.rank1.txt")) as f:
                self.assertNotIn("tokenizer", f.read())              # the tokenizer is rank 0's
            a = torch.load(os.path.join(whole, "sft.pt"), weights_only=True)
            b = torch.load(os.path.join(part, "sft.pt"), weights_only=True)
            self.assertEqual((a["step"], b["step"], a["config"]["world_size"]), (4, 4, 2))
            self.assertEqual(len(a["rng"]["ranks"]), 2)             # both ranks' data streams are kept
            self.assertNotEqual(a["rng"]["ranks"][0]["data"], a["rng"]["ranks"][1]["data"])
            for k, v in a["model"].items():                          # resumed = never interrupted, bit for bit
                self.assertTrue(torch.equal(v, b["model"][k]), k)
            # one process cannot continue the two ranks' streams: a one-line refusal, the file untouched
            plain = subprocess.run([sys.executable, "train.py", "--stage", "sft", "--resume", "--steps", "6",
                                    "--out_dir", whole, *TINY], cwd=HERE, capture_output=True, text=True, timeout=300)
            self.assertEqual(plain.returncode, 2, plain.stderr[-2000:])
            self.assertIn("trained by 2 data-parallel process(es) and this run has 1", plain.stderr)
            self.assertNotIn("Traceback", plain.stderr)
            self.assertEqual(torch.load(os.path.join(whole, "sft.pt"), weights_only=True)["step"], 4)


class TestClose(unittest.TestCase):

    def test_a_dropped_ddp_wrapper_is_freed_before_the_group_is_destroyed(self):
        """A DDP wrapper in a reference cycle (as torch 2.13 keeps the first one a process makes) holds
        the process group: left to the cycle collector, gloo's group may be torn down after
        destroy_process_group or at interpreter exit, which aborts the process. close() frees it
        first. A one-process gloo group stands in for the ranks; the cycle is made here, so that the
        test does not depend on whether this process made a wrapper before."""
        import gc
        import weakref
        gc.disable()   # so that only close() can collect the cycle
        try:
            torch.distributed.init_process_group("gloo", store=torch.distributed.HashStore(), rank=0, world_size=1)
            with mock.patch.object(dist, "WORLD", 2):
                ddp = dist.wrap(torch.nn.Linear(4, 4))
                self.assertIsInstance(ddp, torch.nn.parallel.DistributedDataParallel)
                ddp(torch.randn(2, 4)).sum().backward()
                alive, cycle = weakref.ref(ddp), [ddp]
                cycle.append(cycle)
                del ddp, cycle
                self.assertIsNotNone(alive())                 # the cycle: dropping the names does not free it
                dist.close()
            self.assertIsNone(alive())
            self.assertFalse(torch.distributed.is_initialized())
        finally:
            gc.enable()
            if torch.distributed.is_initialized():
                torch.distributed.destroy_process_group()


class TestDataParallelPref(unittest.TestCase):

    def test_the_comparison_dealt_round_two_ranks_is_the_one_process_comparison(self):
        import data
        import world
        from model import PatchTokenizer
        from test_model import renders, tiny_model
        from test_pref import save_sft
        tok = PatchTokenizer(512, 8, world.CANVAS)
        tok.fit(renders("train", 300)[1])
        model = tiny_model(data.Vocab(512))
        flags = ["--stage", "pref", "--method", "dpo", "--pref_seeds", "2", "--pairs", "24", "--pref_steps", "3",
                 "--pref_batch", "4", "--eval_n", "10", "--device", "cpu"]
        with tempfile.TemporaryDirectory() as d:
            results = []
            for name, start in (("one", [sys.executable, "train.py"]), ("two", None)):
                out = os.path.join(d, name)
                os.makedirs(out)
                save_sft(out, model, tok)
                run = (subprocess.run([*start, *flags, "--out_dir", out], cwd=HERE, capture_output=True, text=True,
                                      timeout=600) if start else torchrun("train.py", *flags, "--out_dir", out))
                self.assertEqual(run.returncode, 0, run.stderr[-3000:])
                with open(os.path.join(out, "compare.json")) as f:
                    results.append(json.load(f))
                with open(os.path.join(out, "log.txt")) as f:
                    log = f.read()
            self.assertIn("pref dpo s1 | trained on another rank; evaluated", log)   # seed 1's run: rank 1's
            with open(os.path.join(d, "two", "log.rank1.txt")) as f:
                self.assertIn("pref dpo s1 | step 3 |", f.read())    # ... and its log lines
            self.assertEqual(results[0]["seeds"], [0, 1])
            self.assertEqual(results[0]["rows"], results[1]["rows"])     # the same numbers, run for run
            self.assertEqual(results[0]["curves"], results[1]["curves"])


class TestRefused(unittest.TestCase):

    def test_more_processes_than_gpus_is_refused_in_one_line(self):
        """NCCL cannot put two ranks on one GPU: refused before any process group is made, said once."""
        with mock.patch.multiple(dist, WORLD=2, LOCAL_WORLD=2, LOCAL_RANK=0), \
                mock.patch("torch.cuda.device_count", return_value=1):
            with self.assertRaises(Refused) as e:
                dist.init("cuda")
            self.assertEqual(str(e.exception).splitlines()[0],
                             "error: 2 processes need 2 GPUs; this machine has 1 (torchrun --nproc_per_node=1, "
                             "or plain python for one GPU)")
            with mock.patch.object(dist, "LOCAL_RANK", 1), self.assertRaises(Refused) as e:
                dist.init("cuda")
            self.assertEqual(str(e.exception), "")            # the second process exits 2 without a word

    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_device_cuda_without_cuda_is_refused(self):
        run = subprocess.run([sys.executable, "train.py", "--device", "cuda", "--stage", "sft"], cwd=HERE,
                             capture_output=True, text=True, timeout=120)
        self.assertEqual(run.returncode, 2)
        self.assertEqual(run.stderr.strip(), "error: --device cuda, but this machine has no CUDA device that torch "
                                             "can use; run with --device cpu (or auto)")


if __name__ == "__main__" and "--worker" in sys.argv:
    sys.path.insert(0, HERE)
    worker(sys.argv[sys.argv.index("--worker") + 1])
    dist.close()
elif __name__ == "__main__":
    unittest.main()
