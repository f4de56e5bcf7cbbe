"""
Train the unified model, end to end. With no arguments it runs the whole pipeline:

    python train.py                                  # tokenizer -> sft -> eval -> pref -> joint -> probe
    python train.py --preset quick --steps 50        # a tiny CPU run
    python train.py --stage sft --resume             # continue an interrupted SFT run
    python train.py --stage pref --method mdpo       # one preference run from out/sft.pt
    python train.py --stage joint                    # do understanding and generation fight?
    python train.py --stage probe                    # does understanding inform generation?

Stages: `tokenizer` fits the VQ codebook; `sft` trains understanding and generation jointly;
`eval` runs eval.py on the SFT checkpoint; `pref` builds preference pairs and trains DPO,
mDPO, DAMA and the papers' controls from the SFT model, then compares them on the
hallucination benchmark; `joint` adds preference optimisation for generation and joint
understanding + generation training, with gradient diagnostics (joint.py); `probe` asks whether
facts taught through understanding reach generation, directly, via chain-of-thought and after
self-training (probes.py). Everything lands in
--out_dir (checkpoints, log.txt, results).
"""
import argparse
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
from losses import dama_loss, dpo_loss, mdpo_loss, preference_metrics
from model import GPT, GPTConfig, PatchTokenizer, amp_context, sequence_logps

PRESETS = {  # sized for a 2-core CPU (minutes) and for one GPU (minutes)
    "quick": dict(n_layer=4, n_head=8, n_embd=128, steps=3500, batch_size=48, lr=1e-3),
    "gpu": dict(n_layer=6, n_head=6, n_embd=384, steps=4000, batch_size=128, lr=1e-3),
}

# SFT's first --primer steps ask only these. Count and yes/no questions need the question's words
# to find image tokens by content (the colour question builds that); with captions from the start
# they sat at their prior (count "one", exists chance) for all 3500 steps in session 7's runs.
# Shape questions are left out: they stuck at "nothing" whenever the start had no captions, and
# with the primer they are the slowest to learn (README, "What we measured", sessions 7 and 8).
# (A colour question about a scene where no shape is unique becomes a shape question, data.und_example:
# ~10% of colour questions, so ~3% of the primer's questions are about shape.)
PRIMER_TASKS = ("colour", "count", "exists")

# method -> (loss, images kept in the pairs, extra loss options); the last three are the papers' controls
METHODS = {
    "dpo": ("dpo", True, {}),
    "mdpo": ("mdpo", True, {}),
    "dama": ("dama", True, {}),
    "dpo_noimage": ("dpo", False, {}),       # mDPO's "unconditional preference" control
    "mdpo_nocond": ("mdpo", True, {"use_conditional": False}),
    "mdpo_noanchor": ("mdpo", True, {"use_anchor": False}),
}

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
# run
parser.add_argument("--stage", default="all", choices=["all", "tokenizer", "sft", "eval", "pref", "joint", "probe"],
                    help="which stage to run; 'all' runs every stage in order")
parser.add_argument("--preset", default="auto", choices=["auto", "quick", "gpu"],
                    help="model and schedule sizes; 'auto' = gpu on CUDA, quick otherwise")
parser.add_argument("--out_dir", default="out", help="where checkpoints, logs and results go")
parser.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
parser.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto (in that order)")
parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                    help="autocast dtype; auto = bfloat16 on CUDA that supports it, else float32")
parser.add_argument("--resume", action="store_true", help="continue SFT from out_dir/sft.pt")
# world
parser.add_argument("--cooc", type=float, default=data.COOC,
                    help="probability that an anchor object's companion joins a training scene")
parser.add_argument("--caption_noise", type=float, default=1.0,
                    help="fraction of bias-breaking training captions that mention the absent companion")
# tokenizer
parser.add_argument("--patch", type=int, default=8, choices=[4, 8],
                    help="tokenizer patch side, pixels: 8 = one token per cell (9 per image), "
                         "4 = a cell is 2x2 tokens (36 per image; much slower to learn, see README)")
parser.add_argument("--n_codes", type=int, default=None, help="VQ codebook size (default 512 for patch 8, 1024 for 4)")
parser.add_argument("--tok_images", type=int, default=20000, help="training renders the codebook is fitted on")
# model (None = from the preset)
parser.add_argument("--n_layer", type=int, default=None, help="transformer blocks")
parser.add_argument("--n_head", type=int, default=None, help="attention heads")
parser.add_argument("--n_embd", type=int, default=None, help="embedding width")
# sft
parser.add_argument("--steps", type=int, default=None, help="SFT optimizer steps")
parser.add_argument("--batch_size", type=int, default=None, help="sequences per step")
parser.add_argument("--und_frac", type=float, default=0.75,
                    help="fraction of each SFT batch that is understanding (the rest is generation)")
parser.add_argument("--und_loss", default="tokens", choices=["tokens", "tasks", "groups"],
                    help="how SFT weighs understanding examples: by answer tokens, each task equally, "
                         "or captions and short questions equally (see sft_loss)")
parser.add_argument("--turns", type=int, default=4,
                    help="questions asked about each image in an SFT understanding sequence (captions: always 1)")
parser.add_argument("--primer", type=int, default=500,
                    help="SFT steps at the start that ask only colour, count and yes/no questions (no captions)")
parser.add_argument("--und_first", type=int, default=1000,
                    help="SFT steps at the start (primer included) that train only understanding; generation joins after")
parser.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
parser.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
parser.add_argument("--decay", type=float, default=0.2,
                    help="last fraction of the SFT steps over which the lr decays to 10%% (1 = cosine over the whole run)")
parser.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
parser.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
parser.add_argument("--cfg_drop", type=float, default=0.1,
                    help="fraction of generation examples trained without their prompt (for CFG)")
parser.add_argument("--log_every", type=int, default=50, help="steps between log lines")
parser.add_argument("--ckpt_every", type=int, default=500, help="steps between checkpoints")
# eval
parser.add_argument("--eval_n", type=int, default=200, help="examples per task and split in eval")
parser.add_argument("--eval_seed", type=int, default=1234, help="seed of the evaluation examples (fixed across runs)")
parser.add_argument("--cfg_scale", type=float, default=2.0, help="classifier-free guidance scale for images")
# preference optimisation (stage pref; the comparison runs every method)
parser.add_argument("--method", default="all", choices=["all"] + list(METHODS),
                    help="preference method of stage pref; 'all' runs the comparison (every method x --pref_seeds)")
parser.add_argument("--pref_seeds", type=int, default=3, help="seeds of the comparison")
parser.add_argument("--pairs", type=int, default=1000, help="preference pairs per seed")
parser.add_argument("--onpolicy", type=float, default=0.5,
                    help="fraction of pairs sampled from the SFT model and judged (the rest are constructed)")
parser.add_argument("--exists_frac", type=float, default=0.2,
                    help="fraction of constructed pairs that answer 'is there a ...?' (the rest are captions)")
parser.add_argument("--length_matched", action="store_true",
                    help="rejected captions as long as chosen ones (errors replace objects instead of adding them)")
parser.add_argument("--beta", type=float, default=0.1, help="DPO / mDPO / DAMA beta")
parser.add_argument("--pref_steps", type=int, default=200, help="preference optimizer steps")
parser.add_argument("--pref_batch", type=int, default=16, help="pairs per preference step")
parser.add_argument("--pref_lr", type=float, default=1e-4, help="preference learning rate (AdamW, constant after warm-up)")
# preference optimisation for generation and joint training (stage joint, joint.py; also uses the pref settings)
parser.add_argument("--rows", default="all", help="rows of the joint study, comma-separated names from joint.ROWS, or all")
parser.add_argument("--gen_pairs", type=int, default=1000, help="generation preference pairs per seed (of each kind)")
parser.add_argument("--gen_k", type=int, default=4, help="images sampled per prompt to build a generation pair")
parser.add_argument("--gen_temperature", type=float, default=1.0,
                    help="sampling temperature of generation pairs and of the study's generation scores")
parser.add_argument("--gen_beta", type=float, default=None,
                    help="generation beta of the per-task-beta strategy (default: beta * T / N, equal beta x tokens)")
parser.add_argument("--joint_steps", type=int, default=120,
                    help="optimizer steps of each joint-study run (--pref_batch understanding + --pref_batch generation pairs)")
parser.add_argument("--joint_eval_n", type=int, default=100, help="held-out examples per task in the joint study's evaluation")
# does understanding inform generation? reasoning and knowledge probes (stage probe, probes.py; seeds: --pref_seeds)
parser.add_argument("--probe_steps", type=int, default=600,
                    help="steps teaching the probes' facts through understanding (half of each batch: ordinary SFT data)")
parser.add_argument("--probe_lr", type=float, default=3e-4, help="learning rate of the probes' fine-tuning and self-training")
parser.add_argument("--probe_n", type=int, default=100, help="held-out probe prompts per family")
parser.add_argument("--self_prompts", type=int, default=1000, help="training probe prompts drawn via CoT for self-training")
parser.add_argument("--self_steps", type=int, default=200, help="self-training steps on the accepted CoT drawings")
parser.add_argument("--diag_every", type=int, default=10,
                    help="steps between gradient diagnostics (every step's gradients are used; this adds the controls)")


def pick_device():
    """cuda, then mps, then cpu."""
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def resolve(args):
    """Fill 'auto' and preset-sized settings in place, and validate them."""
    if args.device == "auto":
        args.device = pick_device()
    if args.preset == "auto":
        args.preset = "gpu" if args.device.startswith("cuda") else "quick"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.n_codes is None:
        args.n_codes = 512 if args.patch == 8 else 1024
    if args.dtype == "auto":
        cuda_bf16 = args.device.startswith("cuda") and torch.cuda.is_bf16_supported()
        args.dtype = "bfloat16" if cuda_bf16 else "float32"
    for k in ("primer", "und_first"):
        if getattr(args, k) < 0:
            parser.error(f"--{k} must be >= 0, got {getattr(args, k)}")
    for k in ("steps", "turns", "batch_size", "n_codes", "tok_images", "n_layer", "n_head", "n_embd", "eval_n",
              "pairs", "pref_steps", "pref_batch", "pref_seeds", "beta", "pref_lr", "gen_pairs", "gen_k",
              "joint_steps", "joint_eval_n", "diag_every", "probe_steps", "probe_lr", "probe_n", "self_prompts",
              "self_steps"):
        if getattr(args, k) <= 0:
            parser.error(f"--{k} must be positive, got {getattr(args, k)}")
    if args.n_embd % args.n_head:
        parser.error(f"--n_embd {args.n_embd} is not divisible by --n_head {args.n_head}")
    if args.gen_temperature < 0 or (args.gen_beta is not None and args.gen_beta <= 0):
        parser.error(f"--gen_temperature must be >= 0 and --gen_beta > 0, got {args.gen_temperature}, {args.gen_beta}")
    if args.pref_batch < 2:
        parser.error(f"--pref_batch must be at least 2 (the diagnostics split a batch in halves), got {args.pref_batch}")
    if not 0.0 < args.decay <= 1.0:
        parser.error(f"--decay must lie in (0, 1], got {args.decay}")
    for k in ("cooc", "caption_noise", "cfg_drop", "und_frac", "onpolicy", "exists_frac"):
        if not 0.0 <= getattr(args, k) <= 1.0:
            parser.error(f"--{k} must lie in [0, 1], got {getattr(args, k)}")
    return args


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def save_atomic(obj, path):
    """Write to a temporary file, then rename: a crash never leaves a half-written checkpoint."""
    tmp = path + ".tmp"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def log(args, line):
    tqdm.write(line)
    with open(os.path.join(args.out_dir, "log.txt"), "a") as f:
        f.write(line + "\n")


def load_tokenizer(path, device):
    if not os.path.exists(path):
        raise SystemExit(f"error: no tokenizer at {path}; run `python train.py --stage tokenizer` first")
    ck = torch.load(path, map_location=device)
    tok = PatchTokenizer(ck["n_codes"], ck["patch"], data.CANVAS).to(device)
    tok.load_state_dict(ck["tokenizer"])
    return tok


def load_model(path, device):
    """A checkpoint -> (model in eval mode, tokenizer, vocab, checkpoint dict)."""
    if not os.path.exists(path):
        raise SystemExit(f"error: no checkpoint at {path}")
    ck = torch.load(path, map_location=device, weights_only=False)
    vocab = data.Vocab(ck["n_codes"])
    if ck["model_config"]["vocab_size"] != vocab.size:
        raise SystemExit(f"error: {path} has a vocabulary of {ck['model_config']['vocab_size']} tokens, this "
                         f"code's has {vocab.size}; it was trained by another version: retrain it")
    model = GPT(GPTConfig(**ck["model_config"])).to(device)
    model.load_state_dict(ck["model"])
    tok = PatchTokenizer(ck["n_codes"], ck["patch"], data.CANVAS).to(device)
    tok.load_state_dict(ck["tokenizer"])
    return model.eval(), tok, vocab, ck


# -----------------------------------------------------------------------------
# stage 1: the image tokenizer

def train_tokenizer(args):
    rng = random.Random(args.seed)
    scenes = [data.sample_scene(rng, "train", cooc=args.cooc)
              for _ in tqdm(range(args.tok_images), desc="render", leave=False)]
    imgs = np.stack([data.render(s) for s in scenes])                   # (N, 32, 32, 3)
    tok = PatchTokenizer(args.n_codes, args.patch, data.CANVAS).to(args.device)
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    n_unique = tok.fit(imgs, generator=g)
    # the bar: the judge must recover the exact scene from decode(encode(x)) on held-out scenes
    test = [data.sample_scene(rng, "test") for _ in range(1000)]
    codes = tok.encode(np.stack([data.render(s) for s in test]))
    recon = tok.decode(codes).cpu().numpy()
    exact = np.mean([data.scene_key(data.parse(r)) == data.scene_key(s) for r, s in zip(recon, test)])
    used = len(torch.unique(codes))
    save_atomic({"tokenizer": tok.state_dict(), "n_codes": args.n_codes, "patch": args.patch,
                 "stats": dict(distinct_patches=n_unique, roundtrip_exact=float(exact), codes_used=used)},
                os.path.join(args.out_dir, "tokenizer.pt"))
    log(args, f"tokenizer | {n_unique} distinct patches, {args.n_codes} codes | "
              f"round-trip exact scenes {exact:.4f} (1000 test scenes) | codes used on them {used}")
    return tok


# -----------------------------------------------------------------------------
# stage 2: joint SFT (understanding + generation)

def sft_batch(rng, tok, vocab, args, split="train", extra=(), und_only=False, tasks=data.UND_TASKS):
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
    codes = tok.encode(np.stack([data.render(e.scene) for e in exs])).tolist()
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
    return (torch.from_numpy(ids).to(args.device), torch.from_numpy(labels).to(args.device),
            torch.tensor(task, device=args.device))


def lengths(labels):
    """(B,) real length of each right-padded sequence: up to and including its last labelled token."""
    last = labels.size(1) - 1 - (labels != -100).flip(1).int().argmax(1)
    return last + 1


def chunked_logps(model, ids, labels):
    """sequence_logps(model(ids), labels), computed on two groups of similar length, each cut to its
    own longest sequence. A batch mixes short answers (~22 tokens) with captions (~46): padded to
    the longest, half of the work would be padding. The numbers are the same (right padding: no
    real token attends to a pad); the batch is split where it saves the most."""
    n = lengths(labels)                                                  # (B,)
    order = n.argsort()
    L = n[order].tolist()
    B = len(L)
    cost = [k * L[k - 1] + (B - k) * L[-1] for k in range(1, B)]         # tokens computed if cut after k
    k = 1 + min(range(B - 1), key=cost.__getitem__) if B > 1 else B
    parts, table = [], model.embedding_table()                          # the table once for both
    for idx in (order[:k], order[k:]):
        if len(idx):
            T = int(n[idx].max())
            parts.append(sequence_logps(model(ids[idx, :T], table=table), labels[idx, :T]))
    return torch.cat(parts)[order.argsort()]                             # (B,) in the batch's order


def sft_loss(model, ids, labels, task, und_loss="tokens"):
    """Generation's mean token cross-entropy plus understanding's (Show-o sums the two
    modalities' losses, so that neither one's token count decides its weight). task: (B,) as from
    sft_batch. Inside understanding (--und_loss): 'tokens' = one mean over all answer tokens, so a
    caption (~17 targets) weighs ~2x a sequence of four short questions (8); 'tasks' = the mean of each task's token
    mean; 'groups' = the mean of two means, captions and short questions (README, "What we
    measured"). Built on the same per-sequence log-prob sum that the preference losses use."""
    logps = chunked_logps(model, ids, labels)                           # (B,) summed log-probs
    ntok = (labels[:, 1:] != -100).sum(1)                               # (B,) labelled tokens

    def mean_ce(rows):
        return -logps[rows].sum() / ntok[rows].sum().clamp(min=1)

    if und_loss == "tokens":
        groups = [task >= 0]
    elif und_loss == "tasks":
        groups = [task == t for t in task[task >= 0].unique().tolist()]
    elif und_loss == "groups":
        groups = [task == 0, task > 0]                                  # captions; short questions
    else:
        raise ValueError(f"unknown und_loss {und_loss!r}: expected tokens, tasks or groups")
    groups = [rows for rows in groups if rows.any()]
    und = torch.stack([mean_ce(rows) for rows in groups]).mean() if groups else logps.new_zeros(())
    gen = mean_ce(task < 0)
    return und + gen, und, gen


def matmul_peak_flops(device, n=1024, seconds=1.0):
    """This machine's measured fp32 matmul throughput, FLOP/s (the denominator of MFU)."""
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    a @ b
    t0, reps = time.perf_counter(), 0
    while time.perf_counter() - t0 < seconds:
        a @ b
        reps += 1
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return 2 * n ** 3 * reps / (time.perf_counter() - t0)


def sft_lr(step, args):
    """Warm-up, stable, decay: linear warm-up over --warmup steps, the peak --lr until the last
    --decay fraction of the steps, then a cosine down to 10% of the peak. Each question type
    escapes its plateau at a step that varies from run to run; with the cosine over the whole
    run (--decay 1) the late ones met a learning rate at a quarter of the peak, and in two
    seeds of three shape questions did not escape in time (README, "What we measured", session 9)."""
    frac = min(1.0, (step + 1) / args.warmup)
    tail = max(0.0, (step - (1 - args.decay) * args.steps) / (args.decay * args.steps))
    cos = 0.5 * (1 + math.cos(math.pi * min(1.0, tail)))
    return args.lr * frac * (0.1 + 0.9 * cos)


def train_sft(args):
    tok = load_tokenizer(os.path.join(args.out_dir, "tokenizer.pt"), args.device)
    vocab = data.Vocab(tok.n_codes)
    mcfg = GPTConfig(vocab_size=vocab.size, n_codes=tok.n_codes, code_dim=tok.codebook.size(1),
                     cell_words=data.cell_word_ids(vocab, tok.grid),
                     n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd)
    model = GPT(mcfg, tok.codebook).to(args.device)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    # the fused kernel (CUDA, and CPU since torch 2.4) halves the optimizer's share of a small step
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            fused=torch.device(args.device).type in ("cuda", "cpu"))
    rng, step = random.Random(args.seed), 0
    path = os.path.join(args.out_dir, "sft.pt")
    if args.resume:
        if not os.path.exists(path):
            raise SystemExit(f"error: --resume given but {path} does not exist")
        ck = torch.load(path, map_location=args.device, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step = ck["step"]
        rng.setstate(ck["rng"]["data"])
        torch.set_rng_state(ck["rng"]["torch"])
        log(args, f"sft | resumed at step {step}")
    n_params = sum(p.numel() for p in model.parameters())
    peak = matmul_peak_flops(args.device)
    log(args, f"sft | {n_params / 1e6:.2f}M parameters | device {args.device} | dtype {args.dtype} | "
              f"measured fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")

    def checkpoint():
        save_atomic({"model": model.state_dict(), "optimizer": opt.state_dict(),
                     "model_config": asdict(mcfg), "config": vars(args), "step": step,
                     "tokenizer": tok.state_dict(), "n_codes": tok.n_codes, "patch": tok.patch,
                     "rng": {"data": rng.getstate(), "torch": torch.get_rng_state()}}, path)

    model.train()
    t_log, tokens, t_start = time.perf_counter(), 0, time.perf_counter()
    bar = tqdm(total=args.steps, initial=step, desc="sft")
    while step < args.steps:
        lr = sft_lr(step, args)
        for g in opt.param_groups:
            g["lr"] = lr
        ids, labels, task = sft_batch(rng, tok, vocab, args, und_only=step < args.und_first,
                                      tasks=PRIMER_TASKS if step < args.primer else data.UND_TASKS)
        with amp_context(args.device, args.dtype):
            loss, und, gen = sft_loss(model, ids, labels, task, args.und_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += int(lengths(labels).sum())   # real tokens: padding is neither computed nor counted
        bar.update(1)
        if step % args.log_every == 0 or step == args.steps:
            dt = time.perf_counter() - t_log
            # training FLOPs ~ 6 * params * tokens (forward + backward, PaLM appendix B)
            mfu = 6 * n_params * tokens / dt / peak
            log(args, f"sft | step {step} | loss {loss.item():.4f} | und {und.item():.4f} | "
                      f"gen {gen.item():.4f} | lr {lr:.2e} | {1000 * dt / args.log_every:.0f} ms/step | "
                      f"{tokens / dt:.0f} tok/s | {100 * mfu:.1f}% of fp32 peak")
            t_log, tokens = time.perf_counter(), 0
        if step % args.ckpt_every == 0 or step == args.steps:
            checkpoint()
    bar.close()
    log(args, f"sft | done: {step} steps in {time.perf_counter() - t_start:.0f} s this run")
    return path


# -----------------------------------------------------------------------------
# stage 3: preference optimisation for understanding (DPO, mDPO, DAMA and the controls)

def build_pairs(model, tok, vocab, args, rng):
    """Preference pairs on held-in training scenes, with everything the losses need precomputed:
    the codes of the real and of the corrupted image, the frozen reference's log-probs (computed
    ONCE here, then cached) and DAMA's clause scores. Returns a dict of lists and tensors."""
    import eval as evaluation
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    n_on = int(round(args.pairs * args.onpolicy))
    pairs = []
    # on-policy: sample 4 captions per scene from the SFT model at T=1, judge them exactly, and pair a
    # faithful one (no hallucinated mention) with a hallucinating one, as RLAIF-V-style data is made
    scenes = [data.sample_scene(rng, "train", cooc=args.cooc) for _ in range(2 * n_on)]
    exs = [data.Example("caption", s, ["describe"], []) for s in scenes for _ in range(4)]
    preds = evaluation.answer(model, tok, vocab, exs, args.device, args.dtype, temperature=1.0, generator=g)
    for i, s in enumerate(scenes):
        cands = preds[4 * i: 4 * i + 4]
        # faithful = well formed (every clause parses) and no hallucinated mention
        good = [p for p in cands if data.parse_caption(p) and len(data.parse_caption(p)) == len(data.clauses(p))
                and data.hallucinated_mentions(s, p) == 0]
        bad = [p for p in cands if data.hallucinated_mentions(s, p) > 0]
        if args.length_matched and good:   # only hallucinating samples as long as the faithful one
            bad = [p for p in bad if len(p) == len(good[0])]
        if good and bad and len(pairs) < n_on:
            pairs.append(data.Pair(s, ["describe"], good[0], bad[0], "on-policy"))
    n_policy = len(pairs)   # scenes where the model was always right or always wrong give no pair
    while len(pairs) < args.pairs:
        task = "exists" if rng.random() < args.exists_frac else "caption"
        pairs.append(data.constructed_pair(rng, data.sample_scene(rng, "train", cooc=args.cooc), task,
                                           args.length_matched))
    imgs = np.stack([data.render(p.scene) for p in pairs])
    crops = np.stack([data.corrupt_image(rng, im)[0] for im in imgs])   # ONE crop per pair, for policy and reference
    P = {"pairs": pairs, "codes": tok.encode(imgs).tolist(), "crop_codes": tok.encode(crops).tolist(),
         "n_onpolicy": n_policy}
    for images in (True, False):   # reference log-probs with the images, and without (the no-image control)
        P[f"ref_{int(images)}"] = reference_logps(model, vocab, P, range(len(pairs)), images, args)
    P["scores"] = clause_scores(model, vocab, P, args)
    return P


def pair_batch(vocab, P, idx, images, corrupted):
    """The chosen, rejected (and corrupted-condition chosen: the cropped image, or for generation
    the changed prompt) sequences of pairs `idx`, collated into ONE batch (3B or 2B rows) for
    one concatenated forward pass."""
    seqs = [[], [], []]
    for i in idx:
        if P.get("task") == "gen":   # generation (joint.py): prompt -> image codes; mDPO's condition is the prompt
            p = P["pairs"][i]
            seqs[0].append(data.gen_sequence(vocab, p.chosen, p.prompt))
            seqs[1].append(data.gen_sequence(vocab, p.rejected, p.prompt))
            seqs[2].append(data.gen_sequence(vocab, p.chosen, p.corrupted))
            continue
        p, c, k = P["pairs"][i], P["codes"][i], P["crop_codes"][i]
        if not images:   # the unconditional control: every image removed from the preference data
            c = k = []
        seqs[0].append(data.und_sequence(vocab, c, p.question, p.chosen))
        seqs[1].append(data.und_sequence(vocab, c, p.question, p.rejected))
        seqs[2].append(data.und_sequence(vocab, k, p.question, p.chosen))
    ids, labels = data.collate(seqs[0] + seqs[1] + (seqs[2] if corrupted else []), vocab.pad)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def pair_logps(model, vocab, P, idx, images, corrupted, args):
    """(chosen, rejected, corrupted chosen or None) summed log-probs of pairs `idx`, each (B,)."""
    ids, labels = pair_batch(vocab, P, idx, images, corrupted)
    with amp_context(args.device, args.dtype):
        logps = chunked_logps(model, ids.to(args.device), labels.to(args.device))   # (2B or 3B,)
    parts = logps.split(len(idx))
    return parts[0], parts[1], parts[2] if corrupted else None, int(lengths(labels).sum())


@torch.no_grad()
def reference_logps(ref, vocab, P, idx, images, args, batch=256):
    """(N, 3) float32: the frozen reference's log-probs of chosen, rejected, corrupted chosen."""
    idx, out = list(idx), []
    for k in range(0, len(idx), batch):
        out.append(torch.stack(pair_logps(ref, vocab, P, idx[k:k + batch], images, True, args)[:3], 1).float())
    return torch.cat(out).cpu()


@torch.no_grad()
def clause_scores(ref, vocab, P, args):
    """DAMA's data-aware scores, our stand-in for CLIP: every clause (one object) of both responses
    is scored by the frozen reference's log-likelihood of that clause given the image and the
    clauses before it (in context: scored alone, every clause would be judged as the FIRST
    object of a caption), per token; a softmax over the clauses of BOTH responses turns these
    into probabilities; a response's score is the sum over its clauses. Returns (N, 2) float32."""
    seqs, owner = [], []
    for i, (p, c) in enumerate(zip(P["pairs"], P["codes"])):
        prompt = data.und_prompt(vocab, c, p.question)
        for side, words in enumerate((p.chosen, p.rejected)):
            before = []
            for cl in data.clauses(words):
                context, target = prompt + vocab.encode(before), vocab.encode(cl)
                seqs.append((context + target, [-100] * len(context) + target))
                owner.append((i, side))
                before += cl + [","]
    import eval as evaluation
    per_token = evaluation.mean_token_logps(ref, vocab, seqs, args.device, args.dtype)   # (clauses,)
    pair_of = torch.tensor([i for i, _ in owner])
    side_of = torch.tensor([s for _, s in owner])
    # softmax over the clauses of each pair (both responses together), then sum per response
    shifted = per_token - torch.zeros(len(P["pairs"])).scatter_reduce(0, pair_of, per_token, "amax", include_self=False)[pair_of]
    e = shifted.exp()
    prob = e / torch.zeros(len(P["pairs"])).index_add(0, pair_of, e)[pair_of]
    return torch.zeros(len(P["pairs"]), 2).index_put((pair_of, side_of), prob, accumulate=True)


def pref_step_loss(policy, vocab, P, idx, method, args, state):
    """One preference loss on pairs `idx`; returns (loss, metrics dict). `state` holds DAMA's gap EMA."""
    kind, images, opts = METHODS[method]
    corrupted = kind == "mdpo"        # (also without the conditional term, for the imageless metrics)
    pc, pr, pk, ntok = pair_logps(policy, vocab, P, idx, images, corrupted, args)
    ref = P[f"ref_{int(images)}"][idx].to(pc.device)                              # (B, 3), cached
    rc, rr, rk = ref.unbind(1)
    m = {}
    if kind == "dpo":
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=args.beta)
        loss = losses.mean()
    elif kind == "mdpo":
        losses, cr, rj, kr = mdpo_loss(pc, pr, rc, rr, pk, rk, beta=args.beta, **opts)
        loss = losses.mean()
        m["rewards/imageless_chosen"] = kr.mean().item()
        m["rewards/imageless_margins"] = (cr - kr).mean().item()
        m["rewards/imageless_accuracies"] = (cr > kr).float().mean().item()
    else:
        s = P["scores"][idx].to(pc.device)
        losses, cr, rj, beta_used, keep, state["gap_mean"] = dama_loss(
            pc, pr, rc, rr, s[:, 0], s[:, 1], state["gap_mean"], beta=args.beta,
            score_gap_mean=P["score_gap_mean"], generator=state["generator"])
        loss = (losses * keep).sum() / keep.sum()
        m["beta_used"], m["kept"] = beta_used.mean().item(), int(keep.sum().item())
    m.update(preference_metrics(cr, rj))
    # the plain DPO loss at the base beta, whatever the method: ln 2 at policy == reference
    m["dpo_loss"] = dpo_loss(pc.detach(), pr.detach(), rc, rr, beta=args.beta)[0].mean().item()
    m["logps/chosen"], m["logps/rejected"] = pc.mean().item(), pr.mean().item()
    m["tokens"] = ntok
    return loss, m


def train_pref(args, method, P, sft_path):
    """Preference-optimise a copy of the SFT model; the SFT model itself is the frozen reference
    (its log-probs are already cached in P). Writes out_dir/pref_<method>_s<seed>.pt."""
    policy, tok, vocab, ck = load_model(sft_path, args.device)
    policy.train()
    seed_everything(args.seed)
    opt = torch.optim.AdamW(policy.parameters(), lr=args.pref_lr, betas=(0.9, 0.95), weight_decay=0.0)
    rng = random.Random(args.seed)
    state = {"gap_mean": 0.0, "generator": torch.Generator(device=args.device).manual_seed(args.seed)}
    order, t_log, hist = [], time.perf_counter(), []
    for step in range(1, args.pref_steps + 1):
        if len(order) < args.pref_batch:                 # epochs over the pairs, reshuffled
            order += rng.sample(range(len(P["pairs"])), len(P["pairs"]))
        idx, order = order[:args.pref_batch], order[args.pref_batch:]
        for g in opt.param_groups:
            g["lr"] = args.pref_lr * min(1.0, step / 10)
        loss, m = pref_step_loss(policy, vocab, P, idx, method, args, state)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        opt.step()
        hist.append({"loss": loss.item(), **m})
        if step % args.log_every == 0 or step == args.pref_steps:
            mean = {k: float(np.mean([h[k] for h in hist])) for k in hist[0] if k != "tokens"}
            dt = time.perf_counter() - t_log
            log(args, f"pref {method} s{args.seed} | step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mean.items())
                + f" | {1000 * dt / len(hist):.0f} ms/step | {sum(h['tokens'] for h in hist) / dt:.0f} tok/s")
            hist, t_log = [], time.perf_counter()
    path = os.path.join(args.out_dir, f"pref_{method}_s{args.seed}.pt")
    save_atomic({**ck, "model": policy.state_dict(), "optimizer": None, "step": args.pref_steps,
                 "config": vars(args), "method": method}, path)
    return path


def preference_data(args, sft_path):
    """The pairs of --seed (every method of that seed trains on the same pairs)."""
    ref, tok, vocab, _ = load_model(sft_path, args.device)
    t0 = time.perf_counter()
    P = build_pairs(ref, tok, vocab, args, random.Random(args.seed))
    P["score_gap_mean"] = float((P["scores"][:, 0] - P["scores"][:, 1]).mean())   # DAMA's dbar, measured
    log(args, f"pairs s{args.seed} | {len(P['pairs'])} pairs ({P['n_onpolicy']} on-policy) | "
              f"score_gap_mean {P['score_gap_mean']:.4f} | {time.perf_counter() - t0:.0f} s")
    return P


def compare(args):
    """Stage pref: train every method (or --method) on the same pairs for each seed, evaluate each
    with the hallucination benchmark, and write out_dir/compare.{md,json,png}."""
    import copy
    import eval as evaluation
    sft = os.path.join(args.out_dir, "sft.pt")
    methods = list(METHODS) if args.method == "all" else [args.method]
    seeds = [args.seed + i for i in range(args.pref_seeds)]
    stats = data.training_statistics(cooc=args.cooc)
    t0 = time.perf_counter()

    def bench(path):
        model, tok, vocab, _ = load_model(path, args.device)
        return evaluation.hallucination(model, tok, vocab, args.eval_n, args.device, args.dtype, args.eval_seed, stats)

    rows = {"sft": [bench(sft)]}
    for seed in seeds:
        a = copy.copy(args)
        a.seed = seed
        P = preference_data(a, sft)
        for m in methods:
            t = time.perf_counter()
            rows.setdefault(m, []).append(bench(train_pref(a, m, P, sft)))
            log(args, f"pref {m} s{seed} | trained and evaluated in {time.perf_counter() - t:.0f} s")
    table = evaluation.compare_table(rows)
    head = (f"`python train.py --stage pref` | {len(seeds)} seed(s) of preference training from one SFT model | "
            f"{args.pairs} pairs, {args.pref_steps} steps of {args.pref_batch} pairs, beta {args.beta}, "
            f"lr {args.pref_lr} | {args.eval_n} held-out scenes per split | {args.device} | "
            f"{time.perf_counter() - t0:.0f} s\n\n")
    with open(os.path.join(args.out_dir, "compare.md"), "w") as f:
        f.write(head + table)
    with open(os.path.join(args.out_dir, "compare.json"), "w") as f:
        json.dump({k: [{s: r[s] for s in ("test", "bias")} for r in v] for k, v in rows.items()}, f, indent=1)
    if "mdpo" in rows:
        evaluation.compare_picture(os.path.join(args.out_dir, "compare.png"),
                                   rows["sft"][0]["bias_samples"], rows["mdpo"][0]["bias_samples"])
    print(head + table)
    return rows


def main(argv=None):
    args = resolve(parser.parse_args(argv))
    os.makedirs(args.out_dir, exist_ok=True)
    seed_everything(args.seed)
    print(json.dumps(vars(args), indent=1))
    t0 = time.perf_counter()
    if args.stage in ("all", "tokenizer"):
        train_tokenizer(args)
    if args.stage in ("all", "sft"):
        train_sft(args)
    if args.stage in ("all", "eval"):
        import eval as evaluation
        evaluation.run(os.path.join(args.out_dir, "sft.pt"), args)
    if args.stage in ("all", "pref"):
        compare(args)
    if args.stage in ("all", "joint"):
        import joint
        joint.study(args)
    if args.stage in ("all", "probe"):
        import probes
        probes.study(args)
    log(args, f"pipeline | stage {args.stage} finished in {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
