"""
Preference optimisation for GENERATION, and joint preference training of understanding and
generation: do the two tasks help each other or fight? (stage `joint` of train.py)

    python train.py --stage joint                    # the trade-off table, from out/sft.pt
    python train.py --stage joint --rows gen_dpo,joint_naive --pref_seeds 1   # two rows (slugs of ROWS)

Generation pairs (genpairs.py): on-policy (the best and the worst of K samples of the SFT model,
scored by the scene parser), real vs generated (the true render against the worst sample), and
world pairs (the true render against the same scene with one object changed: no model needed).
A row whose pairs cannot be built is left empty, with the reason. After the rows: Rewarded Soups
(the und-only and gen-only models' weights interpolated) and the oracle of the two models.

Generation losses go through the same code as understanding (pref.pref_step_loss): sequence
log-probs summed over the image codes (and <eoi>) given the prompt. DPO as is; mDPO with its
conditional term moved from the image to the prompt (the same chosen image under a prompt with
one attribute changed, data.corrupt_prompt; OUR variant, not the paper's) and its anchor; DAMA
with the parser's score gap as the data-aware score.

Joint training sums an understanding DPO loss and a generation DPO loss, with the strategies of
the study: naive sum, length-normalised weight w_U = N / (N + T), gradient-norm balancing,
PCGrad, and a per-task beta. Both tasks' gradients are computed separately on every step, so the
diagnostics (their cosine overall and per layer, the within-task control, the norm ratio rho)
cost nothing extra; single-task runs measure the other task's gradient every --diag_every steps.
"""
import copy
import json
import os
import random
import time

import numpy as np
import torch

import data
import eval as evaluation
import genpairs
import pref
import stepmetrics
import report
import sft
import world
from checkpoint import file_digest, load_model, log, pick, seed_everything, write_atomic

# row of the trade-off table: slug (--rows) -> (label in study.md and study.json, strategy, generation
# method, generation pairs)
ROWS = {
    "und_dpo": ("und DPO", "und", "dpo", "on"),
    "gen_dpo": ("gen DPO", "gen", "dpo", "on"),
    "gen_dpo_real": ("gen DPO (real vs generated)", "gen", "dpo", "real"),
    "gen_mdpo": ("gen mDPO (ours: corrupted prompt)", "gen", "mdpo", "on"),
    "gen_mdpo_nocond": ("gen mDPO without the conditional term", "gen", "mdpo_nocond", "on"),
    "gen_dama": ("gen DAMA (parser score gap)", "gen", "dama", "on"),
    "und_dpo_world": ("und DPO (world pairs)", "und", "dpo", "world"),   # (its generation gradient: on world pairs)
    "gen_dpo_world": ("gen DPO (world pairs)", "gen", "dpo", "world"),
    "joint_naive": ("joint naive sum", "naive", "dpo", "on"),
    "joint_wu": ("joint w_U = N/(N+T)", "wu", "dpo", "on"),
    "joint_gradnorm": ("joint grad-norm balanced", "gradnorm", "dpo", "on"),
    "joint_pcgrad": ("joint PCGrad", "pcgrad", "dpo", "on"),
    "joint_beta": ("joint per-task beta", "beta", "dpo", "on"),
    "joint_naive_world": ("joint naive sum (world pairs)", "naive", "dpo", "world"),
}
LABELS = {slug: row[0] for slug, row in ROWS.items()}
# the study's post-hoc rows, built from two trained rows of the same seed without training (they come
# with those two rows): Rewarded Soups (Rame et al. 2023), slug -> (label, lambda): the weights of the
# understanding-only and the generation-only models interpolated, lambda x und + (1 - lambda) x gen;
# and the oracle of two separate models
SOUP_OF = ("und_dpo", "gen_dpo")
SOUPS = {f"soup_{lam:g}": (f"soup lambda={lam:g} (und DPO x gen DPO)", lam) for lam in (0.3, 0.5, 0.7)}
ORACLE = {"oracle": "oracle: und DPO model reads, gen DPO model draws"}


# -----------------------------------------------------------------------------
# gradients: cosine, norm ratio, and the combination strategies

def flatten(grads, params):
    """A gradient given per parameter (None: unused, zero) as ONE flat vector (n,): a dot product or a
    sum over all parameters is then one reduction, not one kernel per parameter tensor (56 to 80 here)."""
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, grads)])


def dot(a, b):
    """a . b of two flat gradients. Not a @ b: on a CPU that is BLAS's long running sum, 5e-6 off
    (relative) over 1M parameters, where torch's sum adds in a tree and is 1e-7 off."""
    return (a * b).sum()


def cosine(a, b):
    """Cosine between two flat gradients (the same parameters); a 0-dim tensor, left on the device."""
    return dot(a, b) / (dot(a, a).sqrt() * dot(b, b).sqrt()).clamp(min=1e-30)


def pcgrad(gu, gg):
    """PCGrad (Yu et al. 2020) for two tasks: ONLY when the gradients conflict (negative dot product),
    each is projected onto the normal plane of the other; the sum is returned."""
    d = dot(gu, gg)
    # the branch is taken on the device (an `if d < 0` would make the host wait for it): where the
    # gradients agree both coefficients are 0 and this is the plain sum gu + gg, to the bit
    cu = torch.where(d < 0, d / dot(gu, gu), 0.0)
    cg = torch.where(d < 0, d / dot(gg, gg), 0.0)
    return (gu - cg * gg) + (gg - cu * gu)


def combine(strategy, gu, gg, w_u):
    """The update direction of one step from the understanding and the generation gradients (flat)."""
    if strategy == "und":
        return gu
    if strategy == "gen":
        return gg
    if strategy in ("naive", "beta"):            # per-task beta changes the generation loss, not the sum
        return gu + gg
    if strategy == "wu":                          # the study's length-normalised weighting
        return w_u * gu + (1 - w_u) * gg
    if strategy == "gradnorm":                    # both tasks pull with the same norm, their mean
        nu, ng = dot(gu, gu).sqrt().clamp(min=1e-12), dot(gg, gg).sqrt().clamp(min=1e-12)
        m = (nu + ng) / 2
        return m * (gu / nu + gg / ng)
    if strategy == "pcgrad":
        return pcgrad(gu, gg)
    raise ValueError(f"unknown strategy {strategy!r}")


def layer_groups(model):
    """Positions in the flat gradient (`flatten`, parameters in model order) per layer: 'embed' (token,
    position and code-pixel embeddings; the output head is tied to them), 'block0'..'blockN', 'ln_f'.
    Every parameter is shared by both tasks."""
    groups, start = {}, 0
    for name, p in model.named_parameters():
        key = "block" + name.split(".")[1] if name.startswith("blocks.") else \
            "ln_f" if name.startswith("ln_f") else "embed"
        groups.setdefault(key, []).append(torch.arange(start, start + p.numel(), device=p.device))
        start += p.numel()
    return {key: torch.cat(ix) for key, ix in groups.items()}


HIST_KEYS = ("loss", "dpo_loss", "rewards/accuracies")   # what a run keeps of each step's metrics


def mean_loss(method):
    """Is the loss a plain mean over a batch's pairs (then the batch's gradient is its halves' mean)? DAMA's is not."""
    return pref.METHODS[method][0] != "dama"


def task_grads(policy, params, vocab, P, idx, method, args, state):
    """Gradient of one task's preference loss on pairs idx (one flat vector) and its metrics (on the device)."""
    loss, m = pref.pref_step_loss(policy, vocab, P, idx, method, args, state)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return flatten(grads, params), {"loss": loss.detach(), **m}


def diagnostics(step, grads, halves, groups, wide):
    """A measured step's gradient diagnostics, as 0-dim tensors on the device: the cosine of the two
    tasks' gradients, overall and per layer, between half batches, and within each task (the control:
    two halves of one batch), and the norm ratio rho. (Each dot product is one float32 reduction over
    the flat vectors: a cosine is good to ~1e-7.)"""
    gu, gg, (u0, u1), (g0, g1) = grads["und"], grads["gen"], halves["und"], halves["gen"]
    d = {"step": step, "cos": cosine(gu, gg), "rho": dot(gu, gu).sqrt() / dot(gg, gg).sqrt(),
         "cos_within_und": cosine(u0, u1), "cos_within_gen": cosine(g0, g1),
         # the mean of two cosines in a Python float's precision, as np.mean of two floats
         "cos_half": (cosine(u0, g0).to(wide) + cosine(u1, g1).to(wide)) / 2}
    d.update({f"cos_{name}": cosine(gu[ix], gg[ix]) for name, ix in groups.items()})   # (ix: positions, no mask)
    return d


# -----------------------------------------------------------------------------
# training one row of the table

def train_row(args, row, PU, PG, sft_path):
    """Preference-train a copy of the SFT model for one row of the table (its slug, a key of ROWS);
    returns (model, diagnostics, curves)."""
    label, strategy, gen_method, gen_kind = ROWS[row]
    policy, tok, vocab, _ = load_model(sft_path, args.device)
    ref = load_model(sft_path, args.device)[0]
    policy.train()
    seed_everything(args.seed)
    params = list(policy.parameters())
    sizes = [p.numel() for p in params]
    groups = layer_groups(policy)
    wide = stepmetrics.python_float(args.device)
    opt = sft.adamw(params, args.joint_lr, args.device)
    PG = PG[gen_kind]
    # w_U = N / (N + T): N labelled tokens of an image (codes + <eoi>), T of an understanding answer
    N = len(PG.pairs[0].chosen) + 1
    T = float(np.mean([len(p.chosen) + 1 for p in PU.pairs]))
    a_gen = copy.copy(args)
    if strategy == "beta":
        a_gen.beta = args.gen_beta if args.gen_beta else args.beta * T / N   # equal beta * tokens per task
    tasks = {"und": (PU, "dpo", args), "gen": (PG, gen_method, a_gen)}
    state = {t: stepmetrics.dama_state(args.device, args.seed) for t in tasks}
    rngs = {t: random.Random(f"{args.seed}/{t}") for t in tasks}   # one batch order per task, whatever the row
    orders = {t: [] for t in tasks}
    kl_seqs = evaluation.kl_sequences(tok, vocab, 64, args.eval_seed)
    # metrics stay on the device until a log line reads them (stepmetrics.Metrics): no wait for the GPU a step
    hist = {"und": stepmetrics.Metrics(), "gen": stepmetrics.Metrics()}
    diag, t_log = stepmetrics.Metrics(), time.perf_counter()
    for step in range(1, args.joint_steps + 1):
        for gr in opt.param_groups:
            gr["lr"] = args.joint_lr * min(1.0, step / 10)
        measure = step == 1 or step % args.diag_every == 0
        grads, halves = {}, {}
        for t, (P, method, a) in tasks.items():
            active = strategy in (t, "naive", "wu", "gradnorm", "pcgrad", "beta")
            if not (active or measure):
                continue
            if len(orders[t]) < args.pref_batch:          # epochs over the pairs, reshuffled
                orders[t] += rngs[t].sample(range(len(P.pairs)), len(P.pairs))
            idx, orders[t] = orders[t][:args.pref_batch], orders[t][args.pref_batch:]
            # a measurement never touches the training state (DAMA's gap EMA and its selection generator)
            gap0 = state[t]["gap_mean"]

            def probe():
                return {"gap_mean": gap0, "generator": torch.Generator(device=args.device).manual_seed(step)}

            h = len(idx) // 2
            if measure:   # the within-task control: the same loss on two halves of the batch
                halves[t], parts = zip(*[task_grads(policy, params, vocab, P, p, method, a, probe()) for p in (idx[:h], idx[h:])])
            if measure and mean_loss(method) and 2 * h == len(idx):   # the halves' mean, computed already
                grads[t] = (halves[t][0] + halves[t][1]) / 2
                # (their mean in float64, as it was of Python floats: the same numbers)
                m = {k: (parts[0][k].to(wide) + parts[1][k].to(wide)) / 2 for k in HIST_KEYS}
            else:
                grads[t], m = task_grads(policy, params, vocab, P, idx, method, a, state[t] if active else probe())
            hist[t].append({"step": step, **{k: m[k] for k in HIST_KEYS}})   # (an inactive task: measured steps only)
        if measure:
            diag.append(diagnostics(step, grads, halves, groups, wide))
        g = combine(strategy, grads.get("und"), grads.get("gen"), N / (N + T))
        for p, x in zip(params, g.split(sizes)):   # each parameter's gradient: a view into the flat vector
            p.grad = x.view_as(p)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, args.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if step % args.log_every == 0 or step == args.joint_steps:
            # read once per log interval: a .item() a step would make the host wait for the GPU
            recent = {t: [m for m in hist[t].read() if m["step"] > step - args.log_every] for t in hist}
            last = diag.read()[-1]
            ms = 1000 * (time.perf_counter() - t_log) / args.log_every    # (the steps, not the KL below)
            policy.eval()
            kl = {t: evaluation.kl_per_token(policy, ref, vocab, kl_seqs[t], args.device, args.dtype) for t in kl_seqs}
            policy.train()
            parts = [f"{t} loss {np.mean([m['loss'] for m in r]):.4f} dpo {np.mean([m['dpo_loss'] for m in r]):.4f} "
                     f"acc {np.mean([m['rewards/accuracies'] for m in r]):.2f}" for t, r in recent.items() if r]
            log(args, f"joint {label} s{args.seed} | step {step} | " + " | ".join(parts)
                      + f" | cos {last['cos']:+.3f} | rho {last['rho']:.2f} | KL/token und {kl['und']:.4f} "
                        f"gen {kl['gen']:.4f} | {ms:.0f} ms/step")
            t_log = time.perf_counter()
    policy.eval()
    hist, diag = {t: hist[t].read() for t in hist}, diag.read()
    seqs = evaluation.kl_sequences(tok, vocab, 200, args.eval_seed + 1)
    summary = {f"kl_{t}": evaluation.kl_per_token(policy, ref, vocab, seqs[t], args.device, args.dtype) for t in seqs}
    summary.update({k: float(np.mean([d[k] for d in diag])) for k in diag[0] if k != "step"})
    summary["cos_step1"], summary["rho_step1"] = diag[0]["cos"], diag[0]["rho"]   # policy = reference
    # the last quarter of the run (for a task that is only measured: its measured steps in that quarter)
    for t in hist:
        end = [m for m in hist[t] if m["step"] > args.joint_steps * 3 // 4] or hist[t][-1:]
        if end:
            summary[f"dpo_loss_{t}_end"] = float(np.mean([m["dpo_loss"] for m in end]))
            summary[f"acc_{t}_end"] = float(np.mean([m["rewards/accuracies"] for m in end]))
    summary["w_U"], summary["beta_gen"] = N / (N + T), a_gen.beta
    curve = {t: [{"step": m["step"], "dpo_loss": m["dpo_loss"], "loss": m["loss"]} for m in hist[t]] for t in hist}
    return policy, summary, curve


# -----------------------------------------------------------------------------
# evaluation and the table

def tradeoff_eval(model, tok, vocab, args, stats):
    """Generation (GenEval-style, at --gen_temperature, where the SFT model errs) and understanding
    (answer accuracy, bias-scene captions, POPE adversarial), on held-out scenes."""
    n, dev, dt, seed = args.joint_eval_n, args.device, args.dtype, args.eval_seed
    r = {}
    gen, _ = evaluation.eval_generation(model, tok, vocab, "test", n, dev, dt, seed, args.gen_temperature, args.cfg_scale)
    r.update({f"gen_{k}": v for k, v in gen.items()})
    r["answer_acc"] = evaluation.eval_understanding(model, tok, vocab, "test", n, dev, dt, seed,
                                                    tasks=data.UND_TASKS[1:])[0]["answer_acc"]
    caps = evaluation.caption_scores(*evaluation.captions(model, tok, vocab, "bias", n, dev, dt, seed))
    r["CHAIR_i"], r["Cover"] = caps["CHAIR_i"], caps["Cover"]
    r["POPE_F1"] = evaluation.pope(model, tok, vocab, "bias", n, dev, dt, seed, *stats)["adversarial"]["F1"]
    return r


OUTCOME_COLS = ["gen_overall", "gen_single", "gen_two", "gen_counting", "gen_colours", "gen_position",
                "gen_attribution", "gen_full", "answer_acc", "CHAIR_i", "Cover", "POPE_F1"]
DIAG_COLS = ["cos", "cos_half", "cos_within_und", "cos_within_gen", "rho", "kl_und", "kl_gen",
             "dpo_loss_und_end", "dpo_loss_gen_end", "acc_gen_end"]


def soup(models, lam):
    """Rewarded Soups: the state dict lam x models[0] + (1 - lam) x models[1] (same architecture)."""
    a, b = (m.state_dict() for m in models)
    return {k: lam * a[k] + (1 - lam) * b[k] if a[k].is_floating_point() else a[k] for k in a}


def posthoc_rows(trained, evals, tok, vocab, args, stats, sft):
    """The rows that need no training, from this seed's und-only and gen-only models (when both were
    trained): the soups at each lambda, evaluated on both tasks, and the oracle of the two models
    (the understanding outcomes of one, the generation outcomes of the other)."""
    if not all(r in trained for r in SOUP_OF):
        return {}
    out = {}
    for label, lam in SOUPS.values():
        model = load_model(sft, args.device)[0]
        model.load_state_dict(soup([trained[r] for r in SOUP_OF], lam))
        model.eval()
        out[label] = {"lambda": lam, **tradeoff_eval(model, tok, vocab, args, stats)}
    und, gen = (evals[r] for r in SOUP_OF)
    out[ORACLE["oracle"]] = {k: (gen if k.startswith("gen_") else und)[k] for k in OUTCOME_COLS}
    return out


def study(args):
    """Stage joint: every row of ROWS (or --rows) x --pref_seeds seeds from one SFT model, and the
    post-hoc rows; writes out_dir/study.{md,json}. A row whose generation pairs cannot be built
    (a model that draws nothing parseable has no on-policy pairs) is left empty, with the reason."""
    sft = os.path.join(args.out_dir, "sft.pt")
    rows_wanted = pick("rows", args.rows, LABELS)
    stats = world.training_statistics(cooc=args.cooc)
    t0 = time.perf_counter()
    model, tok, vocab, _ = load_model(sft, args.device)
    speed = evaluation.kv_cache_speedup(model, tok, vocab, args)
    log(args, f"joint | KV cache: {speed['images']} images in {speed['cached_s']:.2f} s cached, "
                    f"{speed['uncached_s']:.2f} s uncached: {speed['speedup']:.1f}x")
    rows, curves, empty, pair_counts = {"SFT": [tradeoff_eval(model, tok, vocab, args, stats)]}, {}, {}, {}
    kinds = tuple(k for k in ("on", "real", "world") if any(ROWS[r][3] == k for r in rows_wanted))
    for seed in [args.seed + i for i in range(args.pref_seeds)]:
        a = copy.copy(args)
        a.seed = seed
        PU = pref.preference_data(a, sft)
        PG, missing = genpairs.gen_preference_data(a, sft, kinds)
        pair_counts[seed] = {k: len(P.pairs) for k, P in PG.items()}
        trained, evals = {}, {}
        for row in rows_wanted:             # (a slug; the tables and study.json name it by its label)
            label, kind = ROWS[row][0], ROWS[row][3]
            if kind in missing:
                empty.setdefault(label, {})[seed] = missing[kind]
                log(args, f"joint {label} s{seed} | left empty: {missing[kind]}")
                continue
            t = time.perf_counter()
            policy, summary, curve = train_row(a, row, PU, PG, sft)
            curves.setdefault(label, []).append(curve)
            evals[row] = tradeoff_eval(policy, tok, vocab, a, stats)
            r = {**summary, **evals[row]}
            rows.setdefault(label, []).append(r)
            if row in SOUP_OF:
                trained[row] = policy
            log(args, f"joint {label} s{seed} | " + " | ".join(f"{k} {r[k]:.3f}" for k in OUTCOME_COLS + DIAG_COLS
                                                                   if k in r)
                      + f" | trained and evaluated in {time.perf_counter() - t:.0f} s")
        for row, r in posthoc_rows(trained, evals, tok, vocab, a, stats, sft).items():
            rows.setdefault(row, []).append(r)
            log(args, f"joint {row} s{seed} | " + " | ".join(f"{k} {r[k]:.3f}" for k in OUTCOME_COLS))
    first = next((rs[0] for k, rs in rows.items() if k in LABELS.values()), {})
    layer_cols = [c for c in first if c.startswith("cos_block") or c in ("cos_embed", "cos_ln_f")]
    head = (f"`python train.py --stage joint` | {args.pref_seeds} seed(s) from one SFT model | "
            f"{args.pairs} understanding + {args.gen_pairs} generation pairs per seed, {args.joint_steps} steps "
            f"of {args.pref_batch} + {args.pref_batch} pairs, beta {args.beta}, lr {args.joint_lr} | generation "
            f"sampled at T={args.gen_temperature:g} with CFG {args.cfg_scale:g} (pairs and eval), {args.joint_eval_n} "
            f"held-out prompts per task | KV cache {speed['speedup']:.1f}x faster | {args.device} | "
            f"{time.perf_counter() - t0:.0f} s\n\n")
    trained = {k: v for k, v in rows.items() if k in LABELS.values()}
    empty_in = {s for e in empty.values() for s in e}
    md = (head + f"Outcomes: generation on test-split prompts at T={args.gen_temperature:g} ('single', 'two' and "
          "'position' prompts name no colour, so those prompts also occur in training; the others fix the scene "
          "and are held out); answer accuracy on test scenes; CHAIR_i, Cover and POPE adversarial F1 on "
          "bias-breaking scenes. Generation pairs: on-policy (the best and the worst of the SFT model's samples), "
          "real vs generated (the true render against the worst sample), world pairs (the true render against "
          "the render of the same scene with one object changed: no model needed). The soups interpolate the "
          "weights of the und DPO and gen DPO models of the same seed (lambda = the und DPO model's weight); "
          "the oracle takes understanding from the first and generation from the second. Generation pairs built: "
          + "; ".join(f"s{s}: " + ", ".join(f"{n} {genpairs.KIND_NAMES[k]}" for k, n in c.items()) for s, c in pair_counts.items())
          + ".\n\n"
          + report.seed_table(rows, OUTCOME_COLS)
          + "".join(f"\nLeft empty in seed {s} ({why}): " + ", ".join(r for r in empty if empty[r].get(s) == why)
                    + (". Its rows above are means over the other seeds" if len(empty_in) < args.pref_seeds else "")
                    + ".\n" for s, why in sorted({(s, w) for e in empty.values() for s, w in e.items()}))
          + "\nDiagnostics, means over the measured steps: cos = cosine of the understanding and generation "
            "gradients over all (shared) parameters at the full batch; cos_half = the same between half batches, "
            "to be read against the within-task controls cos_within_* (two halves of one batch); rho = "
            "|g_U| / |g_G| (the per-task-beta row's g_G already carries its beta); KL per token of policy from "
            "reference, teacher-forced on held-out true captions / true images; dpo_loss_*_end = the plain DPO "
            "loss at the task's beta over the last quarter (ln 2 = 0.693 at the start).\n\n"
          + report.seed_table(trained, DIAG_COLS)
          + "\nCosine per layer:\n\n" + report.seed_table(trained, layer_cols))
    write_atomic(os.path.join(args.out_dir, "study.md"), md)
    write_atomic(os.path.join(args.out_dir, "study.json"), json.dumps(
        {"sft_digest": file_digest(sft), "rows": rows, "curves": curves, "empty_rows": empty, "pairs": pair_counts,
         "kv_cache": speed,
         "seconds": time.perf_counter() - t0, "config": vars(args)}, indent=1))
    print(md)
    return rows
