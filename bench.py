"""
Where the time goes: each hot unit of the pipeline, timed on this device, in one table.

    python bench.py                                  # the preset train.py would pick here (~30 s)
    python bench.py --tiny --device cpu              # every unit on a toy model, a few seconds (CI)
    python bench.py --units sft,decode --seconds 5 --json out/bench.json

train.py's flags (--preset, --device, --dtype, --n_layer, --batch_size, --pref_batch, --vq_f, ...) size the
units as they size a training run; bench's own are listed by --help. The units (--units takes the slugs):
  peak    one (n, n) @ (n, n) matmul in the training dtype (bf16 if --dtype is bfloat16, else fp32), n = 8192
          on CUDA, 1024 on a CPU. 2 n^3 FLOPs over the fastest one is the PEAK, the denominator of every
          utilisation: what this chip, its libraries and this dtype deliver on the friendliest shape.
  batch   sft.sft_batch: sample, render, tokenise, collate and copy --batch_size examples to the device.
          The host's work: if its tokens/s is below the sft step's, the device waits for the host.
  sft     forward + backward + gradient clip + AdamW step on one batch made beforehand, as sft.train_sft.
  pref    a DPO step on --pref_batch pairs of captions and exists answers, chosen and rejected through one
          forward, against fixed reference log-probs.
  decode  one image token of greedy classifier-free-guided generation for eval.py's batch of prompts: the
          guided and the unguided branch each feed one token through their KV cache. ms per token.
  vq      a VQ-VAE tokenizer training step on --vq_batch fresh renders, the rendering included.
  load    checkpoint.read_checkpoint of a file like out/sft.pt (model, AdamW state, config); repeated reads
          come from the page cache, a first read from disk is slower.

Utilisation = achieved FLOP/s / peak, the FLOPs counted as model.WORK counts them: 6 x parameters x
tokens for a trained forward (the backward costs twice the forward; PaLM, appendix B), 2 x for an
inference forward. A small model stays far below 100%: its matrices are n_embd wide (128, 384) against
the peak's 8192, and layer norms, softmaxes, kernel launches and the optimizer take time no FLOP is
counted for. Decoding is the extreme: a step computes ONE token a row, each weight read from memory
for 2 FLOPs a row, so it is bound by memory and launches, not arithmetic; a bigger batch helps it more
than a faster chip. '-': the count does not cover the unit.

Timing: 2 calls to warm up (allocator, cuBLAS heuristics, lazy initialisation), then calls until
--seconds have passed (at least 3); the median is the typical call, the min the best. On CUDA each call
ends with torch.cuda.synchronize(): kernels run asynchronously, and without it the clock would stop
when the work was queued, not when it was done.
"""
import argparse
import copy
import inspect
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from dataclasses import asdict

import numpy as np
import torch

import data
import eval as evaluation
import losses
import model
import sft
import train
import world
from checkpoint import Refused, command_line, read_checkpoint, save_atomic, seed_everything, tokenizer_fields
from vq import VQVAE

UNITS = {"peak": "matmul peak", "batch": "sft batch (host)", "sft": "sft step (device)", "pref": "pref step",
         "decode": "decode token (guided)", "vq": "vq-vae step", "load": "checkpoint load"}
DECODE_BATCH = inspect.signature(evaluation.draw).parameters["batch"].default   # prompts eval.py draws at once
# --tiny: train.py's flags for a toy model (the user's own flags come after them, and win)
TINY = ["--preset", "quick", "--n_layer", "1", "--n_embd", "32", "--batch_size", "4", "--pref_batch", "4",
        "--vq_batch", "4", "--tok_images", "200", "--vq_steps", "2"]

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                 allow_abbrev=False)   # (an abbreviation could swallow a flag meant for train.py)
parser.add_argument("--units", default="all", help=f"comma-separated units to time: {', '.join(UNITS)} (default: all)")
parser.add_argument("--seconds", type=float, default=None, help="timed seconds a unit (default: 3; --tiny: 0.05)")
parser.add_argument("--peak_n", type=int, default=None,
                    help="side of the peak's matrices (default: 8192 on CUDA, else 1024; --tiny: 128)")
parser.add_argument("--decode_batch", type=int, default=None,
                    help=f"prompts decoded at once (default: eval.py's {DECODE_BATCH}; --tiny: 4)")
parser.add_argument("--json", default=None, help="also write every number to this JSON file")
parser.add_argument("--tiny", action="store_true", help="a toy model and short timings (CI): a few seconds on a CPU")


def sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, seconds, warmup=2):
    """Call fn `warmup` times, then until `seconds` have passed (at least 3 calls), each call waited for
    on the device. Returns (seconds of each timed call, FLOPs a call as model.WORK counts them)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times, flops, end = [], model.WORK["flops"], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return times, (model.WORK["flops"] - flops) / len(times)


def peak_flops(device, dtype, n=None, seconds=1.0):
    """This device's matmul rate in `dtype` ('bfloat16', 'float32' or a torch dtype), FLOP/s: 2 n^3 over
    the fastest product; n = 8192 on CUDA (smaller products leave a big GPU partly idle), 1024 otherwise."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    return 2 * n ** 3 / min(sft.matmul_times(device, dtype, n, seconds))


def make_tokenizer(args, out_dir):
    """A tokenizer of --tokenizer, fitted on few renders: what a call costs does not depend on how well it fits."""
    rng = random.Random(args.seed)
    if args.tokenizer == "vq":
        a = copy.copy(args)
        a.out_dir, a.vq_steps = out_dir, min(args.vq_steps, 20)   # (train_vq logs its last step there)
        return sft.train_vq(a, rng)[0]
    imgs = np.stack([world.render(world.sample_scene(rng, "train", cooc=args.cooc))
                     for _ in range(min(args.tok_images, 2000))])                   # (N, 24, 24, 3)
    tok = model.PatchTokenizer(args.n_codes, args.patch, world.CANVAS).to(args.device)
    tok.fit(imgs, generator=torch.Generator(device=args.device).manual_seed(args.seed))
    return tok.eval()


def make_model(tok, vocab, args):
    """The SFT model and its AdamW, configured as sft.train_sft configures them."""
    cfg = model.GPTConfig(vocab_size=vocab.size, n_codes=tok.n_codes, code_dim=tok.codebook.size(1),
                          cell_words=data.cell_word_ids(vocab, tok.grid), block_size=max(96, tok.grid ** 2 + 60),
                          n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    gpt = model.GPT(cfg, tok.codebook).to(args.device)
    decay, no_decay = ([p for p in gpt.parameters() if (p.dim() >= 2) == d] for d in (True, False))
    return gpt, sft.adamw([{"params": decay, "weight_decay": args.weight_decay},
                           {"params": no_decay, "weight_decay": 0.0}], args.lr, args.device)


def train_step(params, opt, loss, clip):
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if clip > 0:
        torch.nn.utils.clip_grad_norm_(params, clip)
    opt.step()


def main(argv=None):
    b, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    units = list(UNITS) if b.units == "all" else b.units.split(",")
    if any(u not in UNITS for u in units):
        parser.error(f"--units: unknown unit {next(u for u in units if u not in UNITS)!r}; choose from "
                     f"{', '.join(UNITS)}, or all")
    if not all(v is None or (v > 0 and math.isfinite(v)) for v in (b.seconds, b.peak_n, b.decode_batch)):
        parser.error(f"--seconds, --peak_n, --decode_batch must be positive, got {b.seconds}, {b.peak_n}, "
                     f"{b.decode_batch}")
    if b.json and not os.path.isdir(os.path.dirname(os.path.abspath(b.json))):
        parser.error(f"--json {b.json}: no such directory")
    seconds = b.seconds or (0.05 if b.tiny else 3.0)
    n_decode = b.decode_batch or (4 if b.tiny else DECODE_BATCH)
    a = train.parser.parse_args((TINY if b.tiny else []) + rest)
    if a.device.startswith("cuda") and not torch.cuda.is_available():
        raise Refused(f"error: --device {a.device}, but this torch ({torch.__version__}) sees no CUDA device")
    args = train.resolve(a)
    dev, rng = args.device, random.Random(args.seed)
    seed_everything(args.seed)
    cuda = torch.device(dev).type == "cuda"
    name = (torch.cuda.get_device_name(dev) if cuda else
            f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} threads")
    peak_n = b.peak_n or (128 if b.tiny else 8192 if cuda else 1024)
    res = {"device": dev, "device_name": name, "torch": torch.__version__, "dtype": args.dtype,
           "preset": args.preset, "seconds": seconds, "peak_n": peak_n, "units": {}}

    def row(slug, times, flops=0.0, tokens=None, notes=""):
        """One line of the table: median and min ms a call, tokens/s and utilisation at the median."""
        med = statistics.median(times)
        r = res["units"][slug] = {"unit": UNITS[slug], "ms_median": 1000 * med, "ms_min": 1000 * min(times),
                                  "calls": len(times), "tokens_per_s": tokens / med if tokens else None,
                                  "utilisation": flops / med / res["peak_flops"] if flops else None, "notes": notes}
        tps = f"{r['tokens_per_s']:>11.0f}" if tokens else f"{'-':>11}"
        util = f"{100 * r['utilisation']:>6.1f}%" if flops else f"{'-':>7}"
        print(f"{r['unit']:<22} {r['ms_median']:>10.3f} {r['ms_min']:>10.3f} {tps} {util}  {notes}", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        tok = make_tokenizer(args, tmp)
        host_tok = copy.deepcopy(tok).cpu() if isinstance(tok, model.PatchTokenizer) else tok   # as train_sft
        vocab = data.Vocab(tok.n_codes)
        gpt, opt = make_model(tok, vocab, args)
        res["params"] = gpt.n_params
        print(f"bench | {name} | torch {torch.__version__} | {args.dtype} | preset {args.preset} | "
              f"{gpt.n_params / 1e6:.2f}M parameters | {seconds:g} s a unit", flush=True)
        print(f"{'unit':<22} {'ms/call':>10} {'min ms':>10} {'tokens/s':>11} {'util':>7}  notes", flush=True)

        times = sft.matmul_times(dev, args.dtype, peak_n, seconds)   # the denominator: measured even if not shown
        res["peak_flops"] = 2 * peak_n ** 3 / min(times)
        if "peak" in units:
            row("peak", times, notes=f"{res['peak_flops'] / 1e12:.3f} TFLOP/s {args.dtype}, n = {peak_n}")

        ids, labels, task = sft.sft_batch(rng, host_tok, vocab, args)   # und_only=False: the main phase's mix
        n_tok = int(model.lengths(labels).sum())                        # real tokens: padding is not counted
        if "batch" in units:
            times, _ = timed(lambda: sft.sft_batch(rng, host_tok, vocab, args), dev, seconds)
            row("batch", times, tokens=n_tok, notes=f"{args.batch_size} sequences, ~{n_tok} tokens")

        def sft_step():
            with model.amp_context(dev, args.dtype):
                loss = sft.sft_loss(gpt, ids, labels, task, args.und_loss)[0]
            train_step(gpt.parameters(), opt, loss, args.grad_clip)

        if "sft" in units:
            times, flops = timed(sft_step, dev, seconds)
            row("sft", times, flops, n_tok, f"{args.batch_size} sequences, {n_tok} tokens")

        if "pref" in units:   # rows :B chosen, B: rejected, in one forward as pref.pair_logps does
            B = args.pref_batch
            exs = [data.sample_example(rng, "train", "exists" if rng.random() < args.exists_frac else "caption")
                   for _ in range(2 * B)]
            codes = host_tok.encode(np.stack([world.render(e.scene) for e in exs])).tolist()
            seqs = [data.und_sequence(vocab, c, e.question, e.answer) for e, c in zip(exs, codes)]
            p_ids, p_labels = (model.to_device(torch.from_numpy(x), dev) for x in data.collate(seqs, vocab.pad))
            with torch.no_grad(), model.amp_context(dev, args.dtype):
                ref_chosen, ref_rejected = model.chunked_logps(gpt, p_ids, p_labels).float().split(B)   # (B,) each
            p_opt = sft.adamw(gpt.parameters(), args.pref_lr, dev)

            def pref_step():
                with model.amp_context(dev, args.dtype):
                    chosen, rejected = model.chunked_logps(gpt, p_ids, p_labels).split(B)            # (B,) each
                loss = losses.dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=args.beta)[0].mean()
                train_step(gpt.parameters(), p_opt, loss, args.grad_clip)

            times, flops = timed(pref_step, dev, seconds)
            p_tok = int(model.lengths(p_labels).sum())
            row("pref", times, flops, p_tok, f"{B} pairs, {p_tok} tokens")

        if "decode" in units:   # prompts of one length, as eval._batches groups them: no padding
            n_new, g = tok.grid ** 2, random.Random(args.eval_seed)
            x = torch.tensor([data.gen_prompt(vocab, data.gen_example(g, "test", "attribution").question)
                              for _ in range(n_decode)], device=dev)                         # (B, 9)
            uncond = torch.tensor([data.gen_prompt(vocab, [])] * n_decode, device=dev)      # (B, 2)
            allowed = torch.zeros(vocab.size, dtype=torch.bool, device=dev)
            allowed[vocab.image_ids] = True                                                  # as eval.draw
            gpt.eval()

            def decode():
                with model.amp_context(dev, args.dtype):
                    gpt.generate(x, n_new, allowed, 0.0, uncond_idx=uncond, cfg_scale=args.cfg_scale)

            times, flops = timed(decode, dev, seconds)
            gpt.train()
            row("decode", [t / n_new for t in times], flops / n_new, n_decode,
                f"{n_decode} prompts x {n_new} tokens, 2 branches; per token")

        if "vq" in units:
            vq = VQVAE(256, args.vq_f, world.CANVAS).to(dev)
            vq_opt = sft.adamw(vq.parameters(), args.vq_lr, dev)

            def vq_step():
                imgs = np.stack([world.render(world.sample_scene(rng, "train", cooc=args.cooc))
                                 for _ in range(args.vq_batch)])                            # (B, 24, 24, 3)
                train_step(vq.parameters(), vq_opt, vq(imgs)[0], 0)

            times, _ = timed(vq_step, dev, seconds)
            row("vq", times, notes=f"{args.vq_batch} renders, f = {args.vq_f}: {vq.grid ** 2} tokens an image")

        if "load" in units:
            if not opt.state:   # a stepped AdamW holds two moments a parameter: the file is 3x the model
                sft_step()
            path = os.path.join(tmp, "sft.pt")
            save_atomic({"model": gpt.state_dict(), "optimizer": opt.state_dict(), "model_config": asdict(gpt.cfg),
                         "config": vars(args), "step": 1, **tokenizer_fields(tok),
                         "rng": {"data": rng.getstate(), "torch": torch.get_rng_state()}}, path)
            keys = ("model", "optimizer", "step", "rng", "config")
            times, _ = timed(lambda: read_checkpoint(path, dev, keys, "SFT checkpoint"), dev, seconds)
            res["checkpoint_mb"] = mb = os.path.getsize(path) / 1e6
            row("load", times, notes=f"{mb:.2f} MB, {mb / statistics.median(times):.0f} MB/s")

    if b.json:
        with open(b.json, "w") as f:
            json.dump(res, f, indent=1)
    return res


if __name__ == "__main__":
    command_line(main)
