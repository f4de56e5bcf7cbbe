"""
The command line of unipref: every setting is a flag here, and the pipeline runs top to bottom.

    python train.py                                  # tokenizer -> sft -> eval -> pref -> joint -> probe -> report
    python train.py --preset quick --steps 50        # a tiny CPU run
    python train.py --stage sft --resume             # continue an interrupted SFT run
    python train.py --stage pref --method mdpo       # one preference run from out/sft.pt
    python train.py --stage joint                    # do understanding and generation fight?
    python train.py --stage probe                    # does understanding inform generation?
    python train.py --stage report                   # rebuild out/report.md from the stages' outputs
    python train.py --sft_seeds 3                    # the whole study from 3 SFT models: out/sft0, sft1, sft2
    python train.py --stage tax                      # the alignment-tax sweep (not part of 'all')

Stages (each in its own module): `tokenizer` fits the VQ codebook and `sft` trains understanding
and generation jointly (sft.py); `eval` scores the SFT checkpoint (eval.py); `pref` trains DPO,
mDPO, DAMA and the papers' controls from the SFT model and compares them on the hallucination
benchmark (pref.py); `joint` adds preference optimisation for generation and joint
understanding + generation training, with gradient diagnostics (joint.py); `probe` asks whether
facts taught through understanding reach generation (probes.py); `report` writes out/report.md,
out/report.json, curves.png and headline.png (report.py). Everything lands in --out_dir. `tax` sweeps the
preference settings and the remedies for the alignment tax (tax.py). With --sft_seeds N > 1, each
SFT seed k runs the stages in out_dir/sft<k> and out_dir/report.md reports them all, with each
finding's "holds in k of N" (seeds.py).
"""
import argparse
import copy
import json
import os
import sys
import time

import torch

import dist
import eval as evaluation
import joint
import model
import pref
import probes
import report
import seeds
import sft
import tax
import tokens
import world
from checkpoint import (Refused, auto_dtype, command_line, global_rng_state, log, pick, pick_device,
                        seed_everything, set_global_rng_state, writable)

# the pipeline, in order; each stage reads what the stages before it wrote to --out_dir
STAGES = {
    "tokenizer": sft.train_tokenizer,
    "sft": sft.train_sft,
    "eval": lambda args: evaluation.run(os.path.join(args.out_dir, "sft.pt"), args),
    "pref": pref.compare,
    "joint": joint.study,
    "probe": probes.study,
}

# the preset-sized settings (a flag left at None takes its preset's value); 'stages' is what
# `--stage all` runs (the report follows)
QUICK = dict(stages=",".join(STAGES), n_layer=3, n_head=8, n_embd=128, steps=3000, batch_size=48, lr=1e-3, primer=500,
             und_first=1000, method="all", pref_seeds=1, pairs=1000, pref_ckpt_every=50)
PRESETS = {
    # a first look, minutes on a laptop CPU: SFT on smaller batches, then SFT against DPO, mDPO and DAMA
    "tiny": dict(QUICK, stages="tokenizer,sft,eval,pref", batch_size=24, method="dpo,mdpo,dama", pref_ckpt_every=100),
    # every stage and every row from one SFT model, one preference seed (a 2-core CPU: minutes)
    "quick": QUICK,
    # the sizes the findings were first measured at: 4 blocks, 3500 SFT steps, 3 preference seeds per study
    "full": dict(QUICK, n_layer=4, steps=3500, pref_seeds=3),
    # one GPU: a wider, deeper model and longer SFT (a preference run takes seconds there: no checkpoint
    # of 130 MB in the middle of one)
    "gpu": dict(QUICK, n_layer=6, n_head=6, n_embd=384, steps=4000, batch_size=128, pref_seeds=3, pref_ckpt_every=1000),
}


def from_preset(key):
    """'from the preset: tiny X, quick Y, ...' for a flag's help."""
    values = {}
    for name, p in PRESETS.items():
        values.setdefault(p[key], []).append(name)
    return "from the preset: " + ", ".join(f"{'/'.join(names)} {v}" for v, names in values.items())


class Help(argparse.RawDescriptionHelpFormatter):
    """--help keeps the docstring's layout and shows every default that is not None (a None default
    comes from the preset or from other flags, and its help says which)."""
    def _get_help_string(self, action):
        text = action.help or ""
        if all(action.default is not v for v in (None, False, argparse.SUPPRESS)) and "%(default)" not in text:
            text += " (default: %(default)s)"
        return text


parser = argparse.ArgumentParser(description=__doc__, formatter_class=Help)
g_run = parser.add_argument_group("run", "what runs, where, and where its outputs go")
g_run.add_argument("--stage", default="all",
                   help="which stage(s) to run: 'all' runs every stage in order, then writes the report; or one of "
                        + ", ".join(STAGES) + ", or several, comma-separated ('sft,eval,pref'); 'tax' runs the "
                        "alignment-tax sweep; 'tokens' the token-count study (--token_fs, tokens.py); 'report' "
                        "rebuilds out_dir/report.md from the stages' outputs")
g_run.add_argument("--preset", default="auto", choices=["auto", *PRESETS],
                   help="sizes and stages: 'tiny' a first look (tokenizer, SFT, eval, SFT vs DPO/mDPO/DAMA), "
                        "'quick' every study from one SFT model with one preference seed, 'full' every study at the "
                        "sizes the findings were first measured at (4 blocks, 3500 SFT steps, 3 preference seeds), "
                        "'gpu' a wider model for one GPU; 'auto' = gpu on CUDA, quick otherwise")
g_run.add_argument("--out_dir", default="out", help="where checkpoints, logs and results go")
g_run.add_argument("--seed", type=int, default=0, help="seed for python, numpy and torch")
g_run.add_argument("--sft_seeds", type=int, default=1,
                   help="SFT models (seeds --seed ... --seed + N - 1) to run every stage from; N > 1 puts each in "
                        "out_dir/sft<k> and reports all of them, mean +- std over every SFT x preference seed")
g_run.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto (in that order)")
g_run.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on CUDA that supports it, else float32")
g_run.add_argument("--resume", action="store_true",
                   help="continue an interrupted run: stage sft from out_dir/sft.pt; with --stage all, stages that "
                        "finished with the same settings and code are kept and the interrupted one continues or restarts")
g_world = parser.add_argument_group("world", "the synthetic world's bias")
g_world.add_argument("--cooc", type=float, default=world.COOC,
                     help="probability that a cue object's companion joins a training scene")
g_world.add_argument("--caption_noise", type=float, default=1.0,
                     help="fraction of bias-breaking training captions that mention the absent companion")
g_tok = parser.add_argument_group("tokenizer", "how an image becomes tokens")
g_tok.add_argument("--tokenizer", default="patch", choices=["patch", "vq"],
                   help="the image tokenizer: 'patch' = k-means over the cells' pixels, a token names what is in "
                        "its patch (--patch); 'vq' = a VQ-VAE learned from the pixels, g x g tokens an image (--vq_f)")
g_tok.add_argument("--vq_f", type=int, default=3, choices=[2, 3, 4, 8],
                   help="VQ-VAE downsampling factor: 3 = 8x8 = 64 tokens an image that do not line up with the 3x3 "
                        "cells, 2 = 144, 4 = 36, 8 = 9 (one a cell)")
g_tok.add_argument("--vq_steps", type=int, default=2000, help="VQ-VAE training steps")
g_tok.add_argument("--vq_batch", type=int, default=64, help="fresh training renders per VQ-VAE step")
g_tok.add_argument("--vq_lr", type=float, default=2e-3, help="VQ-VAE learning rate (AdamW, no weight decay)")
g_tok.add_argument("--token_fs", default="patch,4,3",
                   help="stage tokens: the tokenizers to compare, comma-separated: 'patch' (9 tokens an image) or "
                        "a VQ-VAE factor (4 = 36, 3 = 64, 2 = 144), each with --sft_seeds SFT models")
g_tok.add_argument("--patch", type=int, default=8, choices=[4, 8],
                   help="tokenizer patch side, pixels: 8 = one token per cell (9 per image), "
                        "4 = a cell is 2x2 tokens (36 per image)")
g_tok.add_argument("--n_codes", type=int, default=None,
                   help="codebook size (default: 512 for patch 8, 1024 for patch 4, 256 for vq)")
g_tok.add_argument("--tok_images", type=int, default=20000, help="training renders the codebook is fitted on")
g_model = parser.add_argument_group("model")
g_model.add_argument("--n_layer", type=int, default=None, help=f"transformer blocks ({from_preset('n_layer')})")
g_model.add_argument("--n_head", type=int, default=None, help=f"attention heads ({from_preset('n_head')})")
g_model.add_argument("--n_embd", type=int, default=None, help=f"embedding width ({from_preset('n_embd')})")
g_sft = parser.add_argument_group("SFT", "supervised fine-tuning of understanding and generation (stage sft)")
g_sft.add_argument("--steps", type=int, default=None, help=f"SFT optimizer steps ({from_preset('steps')})")
g_sft.add_argument("--batch_size", type=int, default=None, help=f"sequences per SFT step ({from_preset('batch_size')})")
g_sft.add_argument("--und_frac", type=float, default=0.75,
                   help="fraction of each SFT batch that is understanding (the rest is generation)")
g_sft.add_argument("--und_loss", default="tokens", choices=["tokens", "tasks", "groups"],
                   help="how SFT weighs understanding examples: by answer tokens, each task equally, "
                        "or captions and short questions equally (see sft_loss)")
g_sft.add_argument("--turns", type=int, default=4,
                   help="questions asked about each image in an SFT understanding sequence (captions: always 1)")
g_sft.add_argument("--primer", type=int, default=None,
                   help="SFT steps at the start that ask only colour, count and yes/no questions, no captions "
                        f"({from_preset('primer')})")
g_sft.add_argument("--und_first", type=int, default=None,
                   help="SFT steps at the start (primer included) that train only understanding; generation "
                        f"joins after ({from_preset('und_first')})")
g_sft.add_argument("--lr", type=float, default=None, help=f"peak SFT learning rate, AdamW ({from_preset('lr')})")
g_sft.add_argument("--warmup", type=int, default=100, help="linear warm-up steps")
g_sft.add_argument("--decay", type=float, default=0.2,
                   help="last fraction of the SFT steps over which the lr decays to 10%% (1 = cosine over the whole run)")
g_sft.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay on matrices")
g_sft.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clip (0 = off)")
g_sft.add_argument("--cfg_drop", type=float, default=0.1,
                   help="fraction of generation examples trained without their prompt (for CFG)")
g_sft.add_argument("--workers", type=int, default=None, choices=[0, 1],
                   help="processes that build SFT batches while the device trains (default: 1 on CUDA with "
                        "--tokenizer patch, else 0: on a CPU the worker would take a core from the training, and "
                        "a VQ-VAE encodes faster on the GPU than in a worker); the batches are the same either way")
g_sft.add_argument("--log_every", type=int, default=50, help="steps between log lines")
g_sft.add_argument("--ckpt_every", type=int, default=500, help="steps between checkpoints")
g_sft.add_argument("--curve_every", type=int, default=0,
                   help="steps between points of the SFT learning curve (answer accuracy, GenEval at T=0, bias "
                        "CHAIR_i; out_dir/sft_curve.json); 0 = none")
g_sft.add_argument("--curve_n", type=int, default=50, help="held-out examples per task of a learning-curve point")
g_eval = parser.add_argument_group("evaluation")
g_eval.add_argument("--eval_n", type=int, default=200, help="examples per task and split in eval")
g_eval.add_argument("--eval_seed", type=int, default=1234, help="seed of the evaluation examples (fixed across runs)")
g_eval.add_argument("--cfg_scale", type=float, default=2.0, help="classifier-free guidance scale for images")
g_pref = parser.add_argument_group("preference (stage pref)", "DPO, mDPO, DAMA and the controls on understanding")
g_pref.add_argument("--method", default=None,
                    help="rows of stage pref, comma-separated from " + ", ".join(pref.ROW_LABELS) + " (the last two: "
                         "dpo with a remedy for the alignment tax), or all (" + from_preset("method") + ")")
g_pref.add_argument("--pref_seeds", type=int, default=None,
                    help=f"seeds of each study from one SFT model: pref, joint, probe ({from_preset('pref_seeds')})")
g_pref.add_argument("--pairs", type=int, default=None, help=f"preference pairs per seed ({from_preset('pairs')})")
g_pref.add_argument("--onpolicy", type=float, default=0.5,
                    help="fraction of pairs sampled from the SFT model and judged (the rest are constructed)")
g_pref.add_argument("--exists_frac", type=float, default=0.2,
                    help="fraction of constructed pairs that answer 'is there a ...?' (the rest are captions)")
g_pref.add_argument("--length_matched", action="store_true",
                    help="rejected captions as long as chosen ones (errors replace objects instead of adding them)")
g_pref.add_argument("--beta", type=float, default=0.1, help="DPO / mDPO / DAMA beta")
g_pref.add_argument("--pref_steps", type=int, default=200, help="preference optimizer steps")
g_pref.add_argument("--pref_batch", type=int, default=16, help="pairs per preference step")
g_pref.add_argument("--pref_ckpt_every", type=int, default=None,
                    help="steps between checkpoints of a preference run, what --resume continues "
                         f"({from_preset('pref_ckpt_every')})")
g_pref.add_argument("--pref_lr", type=float, default=1e-5,
                    help="preference learning rate of stage pref (AdamW, constant after a 10-step warm-up; the mDPO "
                         "authors' value)")
g_pref.add_argument("--sft_weight", type=float, default=0.0,
                    help="alpha of RPO's NLL term on the chosen response, added to every loss of stage pref "
                         "(losses.chosen_nll_loss; TRL's rpo_alpha); logged as nll/chosen")
g_pref.add_argument("--sft_mix", type=float, default=0.0,
                    help="weight of the SFT loss of one ordinary SFT batch (--pref_batch sequences) added to every "
                         "step of stage pref; logged as sft_mix/loss")
g_pref.add_argument("--tax_seeds", type=int, default=1, help="stage tax: seeds per setting")
g_pref.add_argument("--tax_bar", type=float, default=0.02,
                    help="stage tax: the largest answer-accuracy drop from SFT that still meets the bar")
g_joint = parser.add_argument_group("joint study (stage joint)", "preference optimisation of generation, and joint "
                                    "training with gradient diagnostics; the preference settings apply too")
g_joint.add_argument("--rows", default="all",
                     help="rows of the joint study, comma-separated from " + ", ".join(joint.LABELS) + ", or all "
                          "(the soups and the oracle come with und_dpo and gen_dpo)")
g_joint.add_argument("--gen_pairs", type=int, default=1000, help="generation preference pairs per seed (of each kind)")
g_joint.add_argument("--gen_k", type=int, default=4, help="images sampled per prompt to build a generation pair")
g_joint.add_argument("--gen_temperature", type=float, default=1.0,
                     help="sampling temperature of generation pairs and of the study's generation scores")
g_joint.add_argument("--gen_beta", type=float, default=None,
                     help="generation beta of the per-task-beta strategy (default: beta * T / N, equal beta x tokens)")
g_joint.add_argument("--joint_lr", type=float, default=1e-4,
                     help="learning rate of the joint study's runs (plain losses: no --sft_weight / --sft_mix)")
g_joint.add_argument("--joint_steps", type=int, default=120,
                     help="optimizer steps of each joint-study run (--pref_batch understanding + --pref_batch generation pairs)")
g_joint.add_argument("--joint_eval_n", type=int, default=100, help="held-out examples per task in the joint study's evaluation")
g_joint.add_argument("--diag_every", type=int, default=10,
                     help="steps between gradient diagnostics (every step's gradients are used; this adds the controls)")
g_probe = parser.add_argument_group("probes (stage probe)", "does understanding inform generation? (seeds: --pref_seeds)")
g_probe.add_argument("--probe_steps", type=int, default=600,
                     help="steps teaching the probes' facts through understanding (half of each batch: ordinary SFT data)")
g_probe.add_argument("--probe_lr", type=float, default=3e-4, help="learning rate of the probes' fine-tuning and self-training")
g_probe.add_argument("--probe_n", type=int, default=100, help="held-out probe prompts per family")
g_probe.add_argument("--self_prompts", type=int, default=1000, help="training probe prompts drawn via CoT for self-training")
g_probe.add_argument("--self_steps", type=int, default=200, help="self-training steps on the accepted CoT drawings")


def resolve(args):
    """Fill 'auto' and preset-sized settings in place, and validate them."""
    if args.device == "auto":
        args.device = pick_device()
    kind = args.device.split(":")[0]
    if kind not in ("cuda", "mps", "cpu"):
        parser.error(f"--device {args.device}: expected cuda, mps, cpu or auto")
    if kind == "cuda" and not torch.cuda.is_available() or kind == "mps" and not torch.backends.mps.is_available():
        raise Refused(f"error: --device {args.device}, but this machine has no {kind.upper()} device that torch can "
                      f"use; run with --device cpu (or auto)")
    args.device = dist.init(args.device)     # under torchrun: this rank's GPU (LOCAL_RANK), in its process group
    args.world_size = dist.WORLD
    if args.preset == "auto":
        args.preset = "gpu" if args.device.startswith("cuda") else "quick"
    for k, v in PRESETS[args.preset].items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    pick("method", args.method, pref.ROW_LABELS)   # slugs: a table's label, or an unknown name, is refused here
    pick("rows", args.rows, joint.LABELS)
    if args.n_codes is None and args.stage != "tokens":   # (the token-count study's worlds are all VQ-VAE ones)
        args.n_codes = 256 if args.tokenizer == "vq" else 512 if args.patch == 8 else 1024
    if args.workers is None:
        args.workers = 1 if args.device.startswith("cuda") and args.tokenizer == "patch" else 0
    if args.dtype == "auto":
        args.dtype = auto_dtype(args.device)
    for k in ("primer", "und_first", "curve_every"):
        if getattr(args, k) < 0:
            parser.error(f"--{k} must be >= 0, got {getattr(args, k)}")
    for k in ("steps", "turns", "batch_size", "n_codes", "tok_images", "vq_steps", "vq_batch", "vq_lr", "n_layer", "n_head", "n_embd", "eval_n",
              "pairs", "pref_steps", "pref_batch", "pref_ckpt_every", "pref_seeds", "beta", "pref_lr", "joint_lr", "tax_seeds", "gen_pairs", "gen_k",
              "joint_steps", "joint_eval_n", "diag_every", "probe_steps", "probe_lr", "probe_n", "self_prompts",
              "self_steps", "curve_n"):
        if getattr(args, k) is not None and getattr(args, k) <= 0:   # (None: --n_codes of stage tokens, its worlds')
            parser.error(f"--{k} must be positive, got {getattr(args, k)}")
    if args.stage not in ("all", "tax", "report", "tokens"):
        unknown = [st for st in args.stage.split(",") if st not in STAGES]
        if unknown:
            parser.error(f"--stage {args.stage}: unknown stage {unknown[0]!r}; choose all, tax, tokens, report, or from "
                         + ", ".join(STAGES))
    if args.sft_seeds < 1 or args.sft_weight < 0 or args.sft_mix < 0 or args.tax_bar < 0:
        parser.error(f"--sft_seeds must be >= 1 and --sft_weight, --sft_mix, --tax_bar >= 0, got "
                     f"{args.sft_seeds}, {args.sft_weight}, {args.sft_mix}, {args.tax_bar}")
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


def run_stage(args, name, argv, keep=None, same_code=True):
    """One stage in args.out_dir; returns False if --resume kept it (it finished before, the same way;
    keep: whether a finished stage may be kept, by default with --resume of --stage all; same_code:
    only if it ran at this commit). Under torchrun every rank runs a data-parallel stage (rank 0 decides
    whether it is kept); the other stages run on rank 0 alone, and run_stage is not called on the other ranks."""
    everyone = name in dist.STAGES
    if args.resume and args.stage == "all" if keep is None else keep:
        done = dist.is_main() and report.finished_stage(args, name, same_code)
        if dist.gather(done)[0] if everyone else done:
            log(args, f"resume | stage {name} finished before with these settings: kept")
            return False
    if dist.is_main():
        report.begin_stage(args, name)
    a = copy.copy(args)
    # a resumed pipeline continues SFT from its last checkpoint, or starts it if it never began
    a.resume = args.resume and (args.stage not in ("all", "tokens")
                                or os.path.exists(os.path.join(args.out_dir, "sft.pt")))
    peak, before = sft.matmul_peak_flops(args.device, args.dtype, seconds=0.5), dict(model.WORK)   # this hour's peak: it drifts
    t = time.perf_counter()
    STAGES[name](a)
    work = {k: v - before[k] for k, v in model.WORK.items()}   # (rank 0's share under torchrun)
    if dist.is_main():
        report.record_stage(args, name, time.perf_counter() - t, argv, {**work, "peak_flops": peak})
    return True


def pipeline(args, runs, argv):
    """The wanted stages, stage by stage over the SFT models (an interrupted run of N models holds
    every model's early stages). Under torchrun the ranks meet at a barrier after each stage while a
    data-parallel stage is still to come (it reads what rank 0 wrote), and the other ranks are done
    after the last one."""
    wanted = (args.stages if args.stage == "all" else args.stage).split(",")
    jobs = [(name, k) for name in STAGES if name in wanted for k in range(len(runs))]
    t0, kept = time.perf_counter(), set()
    rng = {}                # each run's global generators, as they would be had it run alone
    for k, a in enumerate(runs):
        seed_everything(a.seed)
        rng[k] = global_rng_state()
    last = max([i for i, (name, _) in enumerate(jobs) if name in dist.STAGES], default=-1)
    if last < 0:   # nothing data-parallel: rank 0 runs it all
        dist.close()
    for i, (name, k) in enumerate(jobs):
        if dist.is_main() or name in dist.STAGES:
            set_global_rng_state(rng[k])
            if not run_stage(runs[k], name, argv):
                kept.add(name)
            rng[k] = global_rng_state()
        if i < last:
            dist.barrier()
        if i == last:   # the ranks part (close is a barrier too): rank 0 goes on alone, without a process group
            dist.close()
    if not dist.is_main():
        return
    total = time.perf_counter() - t0
    log(args, f"pipeline | stage {args.stage} finished in {total:.0f} s" + (f" (kept: {', '.join(sorted(kept))})"
                                                                            if kept else ""))
    if args.stage == "all":
        for a in runs:
            report.record_stage(a, "all", report.total_seconds(a.out_dir) if kept or len(runs) > 1 else total,
                                argv, report.total_work(a.out_dir))
            report.write(a.out_dir)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = resolve(parser.parse_args(argv))
    report.commit()                         # the code this run runs: read now, not when a stage ends
    writable(args.out_dir)
    seed_everything(args.seed)
    if dist.is_main():
        print(json.dumps(vars(args), indent=1))
    # one SFT model: everything in out_dir; N > 1: SFT model k (seed --seed + k) and its studies in out_dir/sft<k>
    runs = [args]
    if args.sft_seeds > 1 and args.stage != "tokens":     # (the token-count study has its own directories)
        runs = [copy.copy(args) for _ in range(args.sft_seeds)]
        for k, a in enumerate(runs):
            a.seed, a.out_dir = args.seed + k, seeds.seed_dir(args.out_dir, k)
            writable(a.out_dir)
    if args.stage in ("report", "tax", "tokens"):
        dist.close()                        # rank 0's alone: the other ranks leave at once
    if args.stage == "tokens":
        if dist.WORLD > 1:
            raise Refused("error: --stage tokens runs in one process (its SFT models are trained one by one); "
                          "run it with plain python, not torchrun")
        if dist.is_main():
            print(tokens.study(args, argv, run_stage))
    elif args.stage not in ("report", "tax"):
        pipeline(args, runs, argv)
    if args.stage == "tax" and dist.is_main():
        for a in runs:
            seed_everything(a.seed)
            tax.sweep(a)
    if args.stage == "report" and len(runs) == 1 and dist.is_main():
        report.write(args.out_dir)
    if len(runs) > 1 and args.stage not in ("tax", "tokens") and dist.is_main():
        seeds.write(args.out_dir, args.sft_seeds)
    dist.close()


if __name__ == "__main__":
    command_line(main)

