"""
Stages 1 and 2: the image tokenizer, then joint SFT of understanding and generation.

    python train.py --stage tokenizer        # fit the codebook (seconds)
    python train.py --stage sft              # train from out/tokenizer.pt; --resume continues
"""
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict

import numpy as np
import torch
from tqdm import tqdm

import data
import dist
import eval as evaluation
import report
import world
from checkpoint import (Refused, differences, global_rng_state, load_tokenizer, log, read_checkpoint, save_atomic,
                        set_global_rng_state, tokenizer_fields, write_atomic)
from model import GPT, GPTConfig, PatchTokenizer, amp_context, chunked_logps, lengths, to_device
from vq import VQVAE


# SFT's first --primer steps ask only these. Count and yes/no questions need the question's words
# to find image tokens by content (the colour question builds that); with captions from the start
# they sat at their prior (count "one", exists chance) for all 3500 steps. Shape questions are
# left out: they stuck at "nothing" whenever the start had no captions, and with the primer they
# are the slowest to learn (FINDINGS.md, "SFT recipe").
# (A colour question about a scene where no shape is unique becomes a shape question, data.und_example:
# ~10% of colour questions, so ~3% of the primer's questions are about shape.)
PRIMER_TASKS = ("colour", "count", "exists")

# the settings an SFT checkpoint must share with the run that resumes it
SAME_ON_RESUME = ("seed", "cooc", "caption_noise", "tokenizer", "vq_f", "patch", "n_codes", "tok_images", "n_layer", "n_head", "n_embd",
                  "batch_size", "und_frac", "und_loss", "turns", "primer", "und_first", "lr", "warmup", "decay",
                  "weight_decay", "grad_clip", "cfg_drop")

# what a checkpoint written before a flag existed was trained with
BEFORE_THE_FLAG = {"tokenizer": "patch", "vq_f": 3}


# -----------------------------------------------------------------------------
# stage 1: the image tokenizer

def train_tokenizer(args):
    """--tokenizer patch: k-means over the cells' pixels (seconds); vq: a VQ-VAE (vq.py). Either way
    the bar is the same: the exact parser must recover the exact scene from decode(encode(x))."""
    rng = random.Random(args.seed)
    if args.tokenizer == "vq":
        tok, stats = train_vq(args, rng)
    else:
        scenes = [world.sample_scene(rng, "train", cooc=args.cooc)
                  for _ in tqdm(range(args.tok_images), desc="render", leave=False)]
        imgs = np.stack([world.render(s) for s in scenes])               # (N, 24, 24, 3)
        tok = PatchTokenizer(args.n_codes, args.patch, world.CANVAS).to(args.device)
        g = torch.Generator(device=args.device).manual_seed(args.seed)
        stats = {"distinct_patches": tok.fit(imgs, generator=g)}
    # the bar: the judge must recover the exact scene from decode(encode(x)) on held-out scenes
    test = [world.sample_scene(rng, "test") for _ in range(1000)]
    codes = tok.encode(np.stack([world.render(s) for s in test]))
    recon = tok.decode(codes).cpu().numpy()
    exact = np.mean([world.scene_key(world.parse(r)) == world.scene_key(s) for r, s in zip(recon, test)])
    used = len(torch.unique(codes))
    stats.update(roundtrip_exact=float(exact), codes_used=used)
    save_atomic({**tokenizer_fields(tok), "stats": stats}, os.path.join(args.out_dir, "tokenizer.pt"))
    what = (f"VQ-VAE, {tok.grid ** 2} tokens an image" if args.tokenizer == "vq"
            else f"{stats['distinct_patches']} distinct patches")
    log(args, f"tokenizer | {what}, {args.n_codes} codes | round-trip exact scenes {exact:.4f} (1000 test scenes) "
              f"| codes used on them {used}")
    return tok


def train_vq(args, rng):
    """The VQ-VAE, trained on fresh training scenes (--vq_batch a step, --vq_steps steps); returns
    (tokenizer in eval mode, stats)."""
    tok = VQVAE(args.n_codes, args.vq_f, world.CANVAS).to(args.device)
    opt = adamw(tok.parameters(), args.vq_lr, args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    restarted, t0 = 0, time.perf_counter()
    for step in tqdm(range(1, args.vq_steps + 1), desc="vq-vae", disable=not dist.is_main()):
        for group in opt.param_groups:   # a cosine from --vq_lr down to 10% of it: the last steps polish the edges
            group["lr"] = args.vq_lr * (0.1 + 0.45 * (1 + math.cos(math.pi * step / args.vq_steps)))
        imgs = np.stack([world.render(world.sample_scene(rng, "train", cooc=args.cooc)) for _ in range(args.vq_batch)])
        loss, m = tok(imgs)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % tok.restart_every == 0 and step <= 0.75 * args.vq_steps:   # the last quarter settles
            restarted += tok.restart_dead_codes(m["z"], g)
        if step % (4 * args.log_every) == 0 or step == args.vq_steps:
            log(args, f"tokenizer | step {step} | recon {m['recon'].item():.5f} | codebook {m['codebook'].item():.5f} "
                      f"| commitment {m['commitment'].item():.5f} | perplexity {m['perplexity'].item():.1f} | "
                      f"codes in use {int(m['used'])} of {args.n_codes} | dead codes restarted {restarted}")
    return tok.eval(), {"steps": args.vq_steps, "seconds": time.perf_counter() - t0, "restarted": restarted,
                        "final_recon": m["recon"].item(), "final_perplexity": m["perplexity"].item()}


# -----------------------------------------------------------------------------
# stage 2: joint SFT (understanding + generation)

def sft_batch(rng, tok, vocab, args, split="train", extra=(), und_only=False, tasks=data.UND_TASKS):
    """sft_batch_host's batch on args.device."""
    return tuple(to_device(t, args.device) for t in sft_batch_host(rng, tok, vocab, args, split, extra, und_only, tasks))


def sft_batch_host(rng, tok, vocab, args, split="train", extra=(), und_only=False, tasks=data.UND_TASKS):
    """Understanding (--und_frac) and generation examples, freshly sampled: (ids, labels, task),
    task (B,) long = the index of the example's (first) understanding task in data.UND_TASKS, -1
    for generation. A short question comes with --turns - 1 more about the same image.
    und_only: the whole batch is understanding (the --und_first phase).
    tasks: the understanding tasks to sample (PRIMER_TASKS during the --primer phase).
    extra: more (ids, labels, is_gen) sequences to train on in the same batch
    (probes.py); their understanding sequences form one more task, len(data.UND_TASKS)."""
    short = [t for t in tasks if t != "caption"]                          # asked again about an image
    n_und = args.batch_size if und_only else round(args.batch_size * args.und_frac)
    exs = [data.sample_example(rng, split, rng.choice(tasks), args.caption_noise, args.cooc)
           for _ in range(n_und)]
    exs += [data.sample_example(rng, split, rng.choice(data.GEN_TASKS)) for _ in range(args.batch_size - n_und)]
    codes = tok.encode(np.stack([world.render(e.scene) for e in exs])).tolist()   # (a CPU tokenizer: no wait)
    seqs = []
    for e, c in zip(exs, codes):
        if e.is_gen:   # classifier-free guidance: sometimes drop the prompt
            seqs.append(data.gen_sequence(vocab, c, [] if rng.random() < args.cfg_drop else e.question))
        else:
            more = [] if e.task == "caption" else [data.und_example(rng, e.scene, rng.choice(short))
                                                   for _ in range(args.turns - 1)]
            seqs.append(data.und_sequence(vocab, c, e.question, e.answer, [(m.question, m.answer) for m in more]))
    ids, labels = data.collate(seqs + [(x, y) for x, y, _ in extra], vocab.pad)
    task = [-1 if e.is_gen else data.UND_TASKS.index(e.task) for e in exs]
    task += [-1 if g else len(data.UND_TASKS) for _, _, g in extra]
    return torch.from_numpy(ids), torch.from_numpy(labels), torch.tensor(task)


class SFTBatches(torch.utils.data.IterableDataset):
    """The SFT stream from `step` to --steps: (ids, labels, task, rng state after the batch) per step,
    each batch as sft_batch_host draws it from `rng` (the --primer and --und_first phases by step).
    With --workers 1 a DataLoader builds it in a second process while the device trains on the
    previous batch: sampling, rendering and tokenising 128 sequences cost ~15-35 ms of Python, more
    than a GPU step. The batches are the same either way (one process draws them in order from the
    same generator); the state that comes with each is what a checkpoint after that step keeps."""

    def __init__(self, rng, tok, vocab, args, step):
        self.state, self.tok, self.vocab, self.args, self.step = rng.getstate(), tok, vocab, args, step

    def __iter__(self):
        rng, a = random.Random(), self.args
        rng.setstate(self.state)
        for step in range(self.step, a.steps):
            batch = sft_batch_host(rng, self.tok, self.vocab, a, und_only=step < a.und_first,
                                   tasks=PRIMER_TASKS if step < a.primer else data.UND_TASKS)
            yield (*batch, rng.getstate())


def sft_stream(rng, tok, vocab, args, step):
    """An iterator over SFTBatches: built in the loop (--workers 0) or by one worker process."""
    batches = SFTBatches(rng, tok, vocab, args, step)
    if not getattr(args, "workers", 0):
        return iter(batches)
    return iter(torch.utils.data.DataLoader(batches, batch_size=None, num_workers=1, prefetch_factor=4,
                                            collate_fn=_as_is))


def _as_is(batch):
    return batch


def sft_loss(model, ids, labels, task, und_loss="tokens", across_ranks=False):
    """Generation's mean token cross-entropy plus understanding's (Show-o sums the two
    modalities' losses, so that neither one's token count decides its weight). task: (B,) as from
    sft_batch. Inside understanding (--und_loss): 'tokens' = one mean over all answer tokens, so a
    caption (~17 targets) weighs ~2x a sequence of four short questions (8); 'tasks' = the mean of each task's token
    mean; 'groups' = the mean of two means, captions and short questions (FINDINGS.md, "SFT
    recipe"). Built on the same per-sequence log-prob sum that the preference losses use.
    across_ranks (data-parallel SFT): each mean is this rank's sum over the token count of ALL the
    ranks' batches, so the ranks' losses add up to the loss of their batches concatenated (and the
    gradient, N x the DDP average, to its gradient); a group counts if any rank has it."""
    logps = chunked_logps(model, ids, labels)                           # (B,) summed log-probs
    ntok = (labels[:, 1:] != -100).sum(1)                               # (B,) labelled tokens
    if und_loss == "tokens":
        groups = [task >= 0]
    elif und_loss == "tasks":   # (the probes' extra understanding sequences are one more task)
        groups = [task == t for t in range(len(data.UND_TASKS) + 1)]
    elif und_loss == "groups":
        groups = [task == 0, task > 0]                                  # captions; short questions
    else:
        raise ValueError(f"unknown und_loss {und_loss!r}: expected tokens, tasks or groups")
    groups.append(task < 0)                                             # generation, last
    sums = torch.stack([-logps[rows].sum() for rows in groups])         # summed cross-entropies
    counts = torch.stack([ntok[rows].sum() for rows in groups])         # and their tokens
    if across_ranks:
        counts = dist.all_sum(counts)
    means = sums / counts.clamp(min=1)
    present = (counts[:-1] > 0).to(means.dtype)                         # the understanding groups seen
    und = (means[:-1] * present).sum() / present.sum().clamp(min=1)     # 0 without any
    gen = means[-1]
    return und + gen, und, gen


def adamw(params, lr, device, weight_decay=0.0):
    """AdamW with betas (0.9, 0.95), as every stage trains. The fused kernel (CUDA, and CPU since
    torch 2.4) does the update of all parameters in one pass: a quarter of the time of the plain
    loop over parameters, which cost 4% of a small step."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=weight_decay,
                             fused=torch.device(device).type in ("cuda", "cpu"))


def matmul_times(device, dtype, n, seconds, per_batch=10):
    """Seconds per (n, n) @ (n, n) product in `dtype` (a name or a torch dtype), one entry per timed
    batch of `per_batch` products on CUDA (timed by the device's own clock, CUDA events: no launch or
    host time) or per product elsewhere; at least 3 entries, and as many as `seconds` allows."""
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    cuda = torch.device(device).type == "cuda"
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))   # random: zeros may run faster
    for _ in range(3):   # warm-up: the library picks its kernel, the clocks rise
        a @ b
    if cuda:
        torch.cuda.synchronize(device)
    times, end = [], time.perf_counter() + seconds
    while len(times) < 3 or time.perf_counter() < end:
        if cuda:
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(per_batch):
                a @ b
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1000 / per_batch)   # (elapsed_time is in ms)
        else:
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
    return times


def matmul_peak_flops(device, dtype="float32", n=None, seconds=1.0):
    """This machine's measured matmul throughput in the training dtype, FLOP/s (the denominator of
    MFU): a bf16 run on a GPU is measured against its tensor cores, not its fp32 units. n x n random
    matrices, n = 8192 on a GPU (smaller ones measure how fast products can be launched, not done),
    1024 on a CPU; the mean rate over `seconds` of products (bench.py reports the fastest one too)."""
    n = n or (8192 if torch.device(device).type == "cuda" else 1024)
    times = matmul_times(device, dtype, n, seconds)
    return 2 * n ** 3 * len(times) / sum(times)


def sft_lr(step, args):
    """Warm-up, stable, decay: linear warm-up over --warmup steps, the peak --lr until the last
    --decay fraction of the steps, then a cosine down to 10% of the peak. Each question type
    escapes its plateau at a step that varies from run to run; with the cosine over the whole
    run (--decay 1) the late ones met a learning rate at a quarter of the peak, and in two
    seeds of three shape questions did not escape in time (FINDINGS.md, "SFT recipe")."""
    frac = min(1.0, (step + 1) / args.warmup)
    tail = max(0.0, (step - (1 - args.decay) * args.steps) / (args.decay * args.steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, tail)))
    return args.lr * frac * (0.1 + 0.9 * cos)


def curve_point(model, tok, vocab, args, step):
    """One point of the SFT learning curve (--curve_every): answer accuracy on --curve_n test scenes
    per question type, GenEval at T=0 on --curve_n test prompts per family, and CHAIR_i of captions
    of --curve_n bias-breaking scenes. The same held-out examples at every point (--eval_seed); the
    global random generators are left as they were, so the training run is the one without a curve."""
    state, n, dev, dt, seed = global_rng_state(), args.curve_n, args.device, args.dtype, args.eval_seed
    model.eval()
    und, _ = evaluation.eval_understanding(model, tok, vocab, "test", n, dev, dt, seed, tasks=data.UND_TASKS[1:])
    gen, _ = evaluation.eval_generation(model, tok, vocab, "test", n, dev, dt, seed, 0.0, args.cfg_scale)
    caps = evaluation.caption_scores(*evaluation.captions(model, tok, vocab, "bias", n, dev, dt, seed))
    model.train()
    set_global_rng_state(state)
    return {"step": step, "answer_acc": und["answer_acc"], **{k: und[k] for k in data.UND_TASKS[1:]},
            "geneval_T0": gen["overall"], **{f"gen_{k}": gen[k] for k in data.GEN_TASKS},
            "bias_CHAIR_i": caps["CHAIR_i"], "bias_Cover": caps["Cover"]}


def train_sft(args):
    tok = load_tokenizer(os.path.join(args.out_dir, "tokenizer.pt"), args.device)
    vocab = data.Vocab(tok.n_codes)
    # batches are tokenised on the host while the device computes (k-means codes always; a VQ-VAE's
    # convolutions there too when a worker process builds the batches: it never touches the GPU)
    host_tok = copy.deepcopy(tok).cpu() if isinstance(tok, PatchTokenizer) or getattr(args, "workers", 0) else tok
    mcfg = GPTConfig(vocab_size=vocab.size, n_codes=tok.n_codes, code_dim=tok.codebook.size(1),
                     cell_words=data.cell_word_ids(vocab, tok.grid),
                     block_size=max(96, tok.grid ** 2 + 60),   # the image's tokens + the longest text (58)
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(mcfg, tok.codebook).to(args.device)
    ddp = dist.wrap(model)              # under torchrun: gradients averaged over the ranks; else the model
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = adamw([{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
                args.lr, args.device)
    rng, step = random.Random(dist.data_seed(args.seed)), 0          # each rank's own data stream
    path = os.path.join(args.out_dir, "sft.pt")
    if args.resume:
        if not os.path.exists(path):
            raise Refused(f"error: --resume given but {path} does not exist")
        ck = read_checkpoint(path, args.device, ("model", "optimizer", "step", "rng", "config"), "SFT checkpoint")
        # --steps may grow and --dtype change on resume; what the run so far was trained with may not
        ranks = ck["config"].get("world_size", 1)
        if ranks != dist.WORLD:   # every rank continues its own data stream
            raise Refused(f"error: {path} was trained by {ranks} data-parallel process(es) and this run has {dist.WORLD}; "
                          f"resume it with the same number (torchrun --nproc_per_node={ranks}, or plain python for 1)")
        was = {k: ck["config"].get(k, BEFORE_THE_FLAG.get(k)) for k in SAME_ON_RESUME}
        diff = differences(was, {k: vars(args)[k] for k in SAME_ON_RESUME})
        if diff:
            raise Refused(f"error: {path} was trained with other settings ({diff}); resume with those, or start "
                          f"again without --resume")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        mine = ck["rng"]["ranks"][dist.RANK] if dist.active() else ck["rng"]
        rng.setstate(mine["data"])
        torch.set_rng_state(mine["torch"].cpu())   # the CPU generator's state is a CPU tensor
        log(args, f"sft | resumed at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_flops(args.device, args.dtype)
    log(args, f"sft | {n_params / 1e6:.2f}M parameters | device {args.device} | dtype {args.dtype} | "
              f"measured {args.dtype} matmul peak {peak / 1e9:.1f} GFLOP/s"
              + (f" | data-parallel over {dist.WORLD} ranks: global batch {dist.WORLD} x {args.batch_size} = "
                 f"{dist.WORLD * args.batch_size} sequences" if dist.active() else ""))

    def checkpoint():   # every rank's data stream is kept, and rank 0 alone writes the file
        states = dist.gather({"data": rng.getstate(), "torch": torch.get_rng_state()})
        if dist.is_main():
            save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                         "model_config": asdict(mcfg), "config": vars(args), "step": step,
                         **tokenizer_fields(tok),
                         "rng": {**states[0], "ranks": states}}, path)
        dist.barrier()   # nobody reads the checkpoint before it is whole

    # the learning curve (--curve_every): its points up to the step this run starts from
    curve_path = os.path.join(args.out_dir, "sft_curve.json")
    curve = [p for p in (report.read_json(curve_path) if step and os.path.exists(curve_path) else [])
             if p["step"] <= step]
    if not step and os.path.exists(curve_path) and dist.is_main():
        os.remove(curve_path)       # a fresh run: another run's curve must not be continued

    model.train()
    t_log, tokens, t_start = time.perf_counter(), 0, time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="sft", disable=not dist.is_main())   # one bar
    stream = sft_stream(rng, host_tok, vocab, args, step)
    while step < args.steps:
        lr = sft_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        *batch, state = next(stream)
        rng.setstate(state)             # where the data stream is after this batch: what a checkpoint keeps
        ids, labels, task = (to_device(t, args.device) for t in batch)
        with amp_context(args.device, args.dtype):
            loss, und, gen = sft_loss(ddp, ids, labels, task, args.und_loss, across_ranks=dist.active())
        opt.zero_grad(set_to_none=True)
        (loss * dist.WORLD).backward()  # DDP averages the ranks' gradients; the loss's is their sum
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += lengths(labels).sum()   # real tokens (padding is neither computed nor counted), on the device
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            # the global batch's losses (the ranks' shares add up to them) and tokens
            loss, und, gen, tokens = dist.all_sum(torch.stack([loss, und, gen, tokens.to(loss.dtype)]).detach())
            tokens = int(tokens)                           # (waits for the device: the clock reads after it)
            dt = time.perf_counter() - t_log
            # training FLOPs ~ 6 * params * tokens (forward + backward, PaLM appendix B), per device
            mfu = 6 * n_params * tokens / dt / (peak * dist.WORLD)
            log(args, f"sft | step {step} | loss {loss.item():.4f} | und {und.item():.4f} | "
                      f"gen {gen.item():.4f} | lr {lr:.2e} | {1000 * dt / args.log_every:.0f} ms/step | "
                      f"{tokens / dt:.0f} tok/s | {100 * mfu:.1f}% of the matmul peak")
            t_log, tokens = time.perf_counter(), 0
        if args.curve_every and (step % args.curve_every == 0 or step == args.steps) and dist.is_main():
            t_eval = time.perf_counter()
            curve.append(curve_point(model, tok, vocab, args, step))
            write_atomic(curve_path, json.dumps(curve, indent=1))
            log(args, f"sft curve | step {step} | " + " | ".join(f"{k} {v:.3f}" for k, v in curve[-1].items()
                                                                 if k != "step"))
            t_log += time.perf_counter() - t_eval      # (the evaluation is not the steps' time)
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    del stream                          # (its worker process ends)
    log(args, f"sft | done: {step} steps in {time.perf_counter() - t_start:.0f} s this run")
    return path
