"""
The alignment tax: what preference training costs understanding, and what buys it back.

    python train.py --stage tax                      # from out/sft.pt: every setting x DPO, mDPO, DAMA, one seed
    python train.py --stage tax --tax_seeds 3        # the same with 3 seeds

Every run starts from the same SFT model and trains on the same pairs (built once per seed:
the pairs, the reference's log-probs and DAMA's scores do not depend on what is swept). The
sweep changes one setting at a time from the plain losses (no remedy; the run's other flags as
given; lr 1e-4, 200 steps, beta 0.1): the learning rate, the number of steps and beta, then the two remedies, RPO's NLL term
on the chosen response (--sft_weight) and SFT batches mixed into every step (--sft_mix).
Each run is scored with the hallucination benchmark (eval.hallucination). A setting "meets the
bar" for a method when its answer accuracy on ordinary test scenes stays within --tax_bar of the
SFT model's while its bias-breaking CHAIR_i falls by at least half. Writes out_dir/tax.{md,json}.
"""
import copy
import json
import os
import time

import eval as evaluation
import pref
import report
import world
from checkpoint import file_digest, log, settings, write_atomic

# where the sweep starts: the plain losses at the settings the comparison used before the tax was
# measured (its default lr is now 1e-5, the row "lr 1e-5"); the other flags are the run's
PLAIN = {"pref_lr": 1e-4, "pref_steps": 200, "beta": 0.1, "sft_weight": 0.0, "sft_mix": 0.0}
# (slug: the run's checkpoint name; label: tax.md and tax.json; flags changed from the plain losses)
GRID = [("plain", "plain", {}),
        ("lr_3e-5", "lr 3e-5", {"pref_lr": 3e-5}), ("lr_1e-5", "lr 1e-5", {"pref_lr": 1e-5}),
        ("steps_50", "steps 50", {"pref_steps": 50}), ("steps_100", "steps 100", {"pref_steps": 100}),
        ("steps_400", "steps 400", {"pref_steps": 400}),
        ("beta_0.03", "beta 0.03", {"beta": 0.03}), ("beta_0.3", "beta 0.3", {"beta": 0.3}),
        ("beta_1", "beta 1", {"beta": 1.0}),
        ("sft_weight_0.2", "sft_weight 0.2", {"sft_weight": 0.2}), ("sft_weight_1", "sft_weight 1", {"sft_weight": 1.0}),
        ("sft_weight_3", "sft_weight 3", {"sft_weight": 3.0}),
        ("sft_mix_0.5", "sft_mix 0.5", {"sft_mix": 0.5}), ("sft_mix_1", "sft_mix 1", {"sft_mix": 1.0})]
METHODS = ("dpo", "mdpo", "dama")
# what one run of the sweep depends on, besides the SFT model (its digest) and the setting: --resume
# keeps a recorded run when these agree, whatever the flags of other stages or the number of seeds
RUN_FLAGS = ("seed", "device", "dtype", "cooc", "caption_noise", "pairs", "onpolicy", "exists_frac", "length_matched",
             "beta", "pref_steps", "pref_batch", "pref_lr", "sft_weight", "sft_mix", "grad_clip", "batch_size",
             "und_frac", "und_loss", "turns", "cfg_drop", "eval_n", "eval_seed")
COLS = [("bias", "CHAIR_i"), ("bias", "CHAIR_s"), ("bias", "Cover"), ("bias", "length"),
        ("bias", "POPE adversarial F1"), ("test", "answer_acc"), ("test", "answer_colour"),
        ("test", "answer_shape"), ("test", "answer_count"), ("test", "answer_exists")]


def meets_bar(r, sft, bar):
    """True if run r keeps test answer accuracy within `bar` of the SFT model's and halves bias CHAIR_i."""
    return (sft["test"]["answer_acc"] - r["test"]["answer_acc"] <= bar + 1e-9     # (0.99 - 0.97 > 0.02 in floats)
            and r["bias"]["CHAIR_i"] <= 0.5 * sft["bias"]["CHAIR_i"])


def table(sft, runs, bar):
    """runs: {(setting, method): [hallucination() per seed]} -> the sweep's Markdown table."""
    rows = {"sft | -": [sft], **{f"{m} | {name}": rs for (name, m), rs in sorted(runs.items(), key=_order)}}
    text = report.seed_table(rows, COLS, lambda r, c: evaluation.compare_value(r, *c),
                                        [f"{s} {c.replace('answer_', 'ans ')}" for s, c in COLS], first="method | setting")
    lines = text.rstrip("\n").split("\n")
    lines[0] += " tax | meets the bar |"
    lines[1] += "---|---|---|"                 # (the first head names two columns)
    for k, rs in enumerate(rows.values(), start=2):
        tax = sum(sft["test"]["answer_acc"] - r["test"]["answer_acc"] for r in rs) / len(rs)
        ok = sum(meets_bar(r, sft, bar) for r in rs)
        lines[k] += f" {tax:.3f} | {ok} of {len(rs)} |" if k > 2 else " - | - |"
    return "\n".join(lines) + "\n"


def _order(item):
    (name, method), _ = item
    return METHODS.index(method), [label for _, label, _ in GRID].index(name)


def _run_flags(s):
    return {k: s.get(k) for k in RUN_FLAGS}


def sweep(args):
    """Stage tax: every GRID setting x METHODS x --tax_seeds from out_dir/sft.pt; out_dir/tax.{md,json}.
    With --resume, runs already in tax.json with the same settings and SFT model are kept."""
    sft = os.path.join(args.out_dir, "sft.pt")
    digest, stats = file_digest(sft), world.training_statistics(cooc=args.cooc)
    path = os.path.join(args.out_dir, "tax.json")
    done = {}
    if args.resume and os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if old.get("sft_digest") == digest:
            done = {(r["setting"], r["method"], r["seed"]): r for r in old["runs"]}
    t0 = time.perf_counter()
    base = pref.bench(sft, args, stats)
    records, runs = [], {}
    for k in range(args.tax_seeds):
        a = copy.copy(args)
        a.seed, a.resume = args.seed + k, False
        P = None
        for slug, name, flags in GRID:
            for method in METHODS:
                b = copy.copy(a)
                for key, v in {**PLAIN, **flags}.items():
                    setattr(b, key, v)
                rec = done.get((name, method, b.seed))
                if rec is None or _run_flags(rec["settings"]) != _run_flags(settings(b)):
                    P = P or pref.preference_data(a, sft)
                    t = time.perf_counter()
                    ckpt, _ = pref.train_pref(b, method, P, sft, name=f"tax_{method}_{slug}")
                    r = pref.bench(ckpt, args, stats)
                    os.remove(ckpt)          # the numbers are kept, not the 42 checkpoints
                    rec = {"setting": name, "method": method, "seed": b.seed, "settings": settings(b),
                           "result": {s: r[s] for s in ("test", "bias")}}
                    log(args, f"tax | {method} | {name} | s{b.seed} | bias CHAIR_i {r['bias']['CHAIR_i']:.3f} | "
                              f"Cover {r['bias']['Cover']:.3f} | answer_acc {r['test']['answer_acc']:.3f} | "
                              f"{time.perf_counter() - t:.0f} s")
                records.append(rec)
                runs.setdefault((name, method), []).append(rec["result"])
                write_atomic(path, json.dumps({"sft_digest": digest, "sft": {s: base[s] for s in ("test", "bias")},
                                               "bar": args.tax_bar, "runs": records}, indent=1))
    seconds = time.perf_counter() - t0
    head = (f"`python train.py --stage tax` | {args.tax_seeds} seed(s) per setting, from one SFT model | "
            f"plain losses: {args.pairs} pairs, {PLAIN['pref_steps']} steps of {args.pref_batch} pairs, beta "
            f"{PLAIN['beta']}, lr {PLAIN['pref_lr']:g}; each row changes one of these, or adds a remedy | {args.eval_n} held-out scenes "
            f"per split | tax = SFT test answer_acc - the run's | the bar: tax <= {args.tax_bar} and bias CHAIR_i "
            f"<= half the SFT model's | {args.device} | {seconds:.0f} s\n\n")
    text = head + table(base, runs, args.tax_bar)
    write_atomic(os.path.join(args.out_dir, "tax.md"), text)
    print(text)
    return runs
