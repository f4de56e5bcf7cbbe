"""
Stage 3: preference optimisation for understanding. DPO, mDPO, DAMA and the papers' controls, each trained
from the same SFT model on the same pairs, then compared on the hallucination benchmark (eval.hallucination).

    python train.py --stage pref                     # every method x --pref_seeds, from out/sft.pt
    python train.py --stage pref --method mdpo       # one method (--method takes the slugs of ROW_LABELS)

The pairs carry everything the losses need, computed once: the codes of the real and of the
corrupted image, the frozen reference's log-probs, and DAMA's clause scores.
"""
import copy
import json
import os
import random
import time

import numpy as np
import torch

import data
import dist
import eval as evaluation
import pictures
import report
import sft
import world
from checkpoint import (Refused, differences, file_digest, load_model, log, pick, read_checkpoint, save_atomic,
                        seed_everything, settings, write_atomic)
from losses import chosen_nll_loss, dama_loss, dpo_loss, mdpo_loss
from model import amp_context, chunked_logps, lengths, to_device
from stepmetrics import Metrics, dama_state, reward_metrics

# method -> (loss, images kept in the pairs, extra loss options); the last three are the papers' controls
METHODS = {
    "dpo": ("dpo", True, {}),
    "mdpo": ("mdpo", True, {}),
    "dama": ("dama", True, {}),
    "dpo_noimage": ("dpo", False, {}),       # mDPO's "unconditional preference" control
    "mdpo_nocond": ("mdpo", True, {"use_conditional": False}),
    "mdpo_noanchor": ("mdpo", True, {"use_anchor": False}),
}
# the comparison's rows for the two remedies of the alignment tax: slug -> (label, method, flags set for that row)
REMEDY_ROWS = {
    "dpo_nll": ("dpo + NLL (sft_weight 1)", "dpo", {"sft_weight": 1.0}),   # RPO's alpha = 1
    "dpo_sftmix": ("dpo + SFT mix (sft_mix 0.5)", "dpo", {"sft_mix": 0.5}),
}
# every row of the comparison: slug (--method, checkpoint names) -> label (compare.md, compare.json)
ROW_LABELS = {**{m: m for m in METHODS}, **{slug: row[0] for slug, row in REMEDY_ROWS.items()}}

# -----------------------------------------------------------------------------
# stage 3: preference optimisation for understanding (DPO, mDPO, DAMA and the controls)

def build_pairs(model, tok, vocab, args, rng):
    """Preference pairs on held-in training scenes, with everything the losses need precomputed:
    the codes of the real and of the corrupted image, the frozen reference's log-probs (computed
    ONCE here, then cached) and DAMA's clause scores. Returns a data.PairSet."""
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    n_on = int(round(args.pairs * args.onpolicy))
    pairs = []
    # on-policy: sample 4 captions per scene from the SFT model at T=1, judge them exactly, and pair a
    # faithful one (no hallucinated mention) with a hallucinating one, as RLAIF-V-style data is made
    scenes = [world.sample_scene(rng, "train", cooc=args.cooc) for _ in range(2 * n_on)]
    exs = [data.Example("caption", s, ["describe"], []) for s in scenes for _ in range(4)]
    preds = evaluation.answer(model, tok, vocab, exs, args.device, args.dtype, temperature=1.0, generator=g)
    for i, s in enumerate(scenes):
        cands = preds[4 * i: 4 * i + 4]
        # faithful = well formed (every clause parses) and no hallucinated mention
        good = [p for p in cands if world.parse_caption(p) and len(world.parse_caption(p)) == len(world.clauses(p))
                and world.hallucinated_mentions(s, p) == 0]
        bad = [p for p in cands if world.hallucinated_mentions(s, p) > 0]
        if args.length_matched and good:   # only hallucinating samples as long as the faithful one
            bad = [p for p in bad if len(p) == len(good[0])]
        if good and bad and len(pairs) < n_on:
            pairs.append(data.Pair(s, ["describe"], good[0], bad[0], "on-policy"))
    n_policy = len(pairs)   # scenes where the model was always right or always wrong give no pair
    while len(pairs) < args.pairs:
        task = "exists" if rng.random() < args.exists_frac else "caption"
        pairs.append(data.constructed_pair(rng, world.sample_scene(rng, "train", cooc=args.cooc), task,
                                           args.length_matched))
    imgs = np.stack([world.render(p.scene) for p in pairs])
    crops = np.stack([data.corrupt_image(rng, im)[0] for im in imgs])   # ONE crop per pair, for policy and reference
    P = data.PairSet(pairs, codes=tok.encode(imgs).tolist(), crop_codes=tok.encode(crops).tolist(),
                     n_onpolicy=n_policy)
    for images in (True, False):   # reference log-probs with the images, and without (the no-image control)
        P.ref_logps[images] = reference_logps(model, vocab, P, range(len(pairs)), images, args)
    P.scores = clause_scores(model, vocab, P, args)
    return P


def pair_batch(vocab, P, idx, images, corrupted):
    """The chosen, rejected (and corrupted-condition chosen: the cropped image, or for generation
    the changed prompt) sequences of pairs `idx`, collated into ONE batch (3B or 2B rows) for
    one concatenated forward pass."""
    seqs = [[], [], []]
    for i in idx:
        if P.task == "gen":   # generation (joint.py): prompt -> image codes; mDPO's condition is the prompt
            p = P.pairs[i]
            seqs[0].append(data.gen_sequence(vocab, p.chosen, p.prompt))
            seqs[1].append(data.gen_sequence(vocab, p.rejected, p.prompt))
            seqs[2].append(data.gen_sequence(vocab, p.chosen, p.corrupted))
            continue
        p, c, k = P.pairs[i], P.codes[i], P.crop_codes[i]
        if not images:   # the unconditional control: every image removed from the preference data
            c = k = []
        seqs[0].append(data.und_sequence(vocab, c, p.question, p.chosen))
        seqs[1].append(data.und_sequence(vocab, c, p.question, p.rejected))
        seqs[2].append(data.und_sequence(vocab, k, p.question, p.chosen))
    ids, labels = data.collate(seqs[0] + seqs[1] + (seqs[2] if corrupted else []), vocab.pad)
    return torch.from_numpy(ids), torch.from_numpy(labels)


def pair_logps(model, vocab, P, idx, images, corrupted, args):
    """(chosen, rejected, corrupted chosen or None) summed log-probs of pairs `idx`, each (B,);
    the tokens of the batch (for tok/s); the scored tokens of each chosen response, (B,)."""
    ids, labels = pair_batch(vocab, P, idx, images, corrupted)
    with amp_context(args.device, args.dtype):
        logps = chunked_logps(model, to_device(ids, args.device), to_device(labels, args.device))   # (2B or 3B,)
    parts = logps.split(len(idx))
    chosen_tokens = to_device((labels[:len(idx), 1:] != -100).sum(1), logps.device)   # (B,)
    # (counted on the host's copy of the labels: no wait for the device)
    return parts[0], parts[1], parts[2] if corrupted else None, int(lengths(labels).sum()), chosen_tokens


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
    for i, (p, c) in enumerate(zip(P.pairs, P.codes)):
        prompt = data.und_prompt(vocab, c, p.question)
        for side, words in enumerate((p.chosen, p.rejected)):
            before = []
            for cl in world.clauses(words):
                context, target = prompt + vocab.encode(before), vocab.encode(cl)
                seqs.append((context + target, [-100] * len(context) + target))
                owner.append((i, side))
                before += cl + [","]
    per_token = evaluation.mean_token_logps(ref, vocab, seqs, args.device, args.dtype)   # (clauses,)
    pair_of = torch.tensor([i for i, _ in owner])
    side_of = torch.tensor([s for _, s in owner])
    # softmax over the clauses of each pair (both responses together), then sum per response
    shifted = per_token - torch.zeros(len(P.pairs)).scatter_reduce(0, pair_of, per_token, "amax", include_self=False)[pair_of]
    e = shifted.exp()
    prob = e / torch.zeros(len(P.pairs)).index_add(0, pair_of, e)[pair_of]
    return torch.zeros(len(P.pairs), 2).index_put((pair_of, side_of), prob, accumulate=True)


def pref_step_loss(policy, vocab, P, idx, method, args, state, sft_weight=0.0):
    """One preference loss on pairs `idx`; returns (loss, metrics dict). `state` holds DAMA's gap EMA.
    sft_weight = alpha > 0 adds RPO's NLL term on the chosen response: loss + alpha * mean_i nll_i
    (losses.chosen_nll_loss). It is composed here, not inside each loss, so that it works the same
    for every method and the losses stay the papers' own; it is logged as nll/chosen. The metrics
    are detached 0-dim tensors left on the device (`Metrics` reads them), and `tokens`, an int."""
    kind, images, opts = METHODS[method]
    corrupted = kind == "mdpo"        # (also without the conditional term, for the imageless metrics)
    pc, pr, pk, ntok, chosen_tokens = pair_logps(policy, vocab, P, idx, images, corrupted, args)
    ref = to_device(P.ref(images)[idx], pc.device)                                # (B, 3), cached
    rc, rr, rk = ref.unbind(1)
    m = {}
    if kind == "dpo":
        losses, cr, rj = dpo_loss(pc, pr, rc, rr, beta=args.beta)
        loss = losses.mean()
    elif kind == "mdpo":
        losses, cr, rj, kr = mdpo_loss(pc, pr, rc, rr, pk, rk, beta=args.beta, **opts)
        loss = losses.mean()
        m["rewards/imageless_chosen"] = kr.mean()
        m["rewards/imageless_margins"] = (cr - kr).mean()
        m["rewards/imageless_accuracies"] = (cr > kr).float().mean()
    else:
        s = to_device(P.scores[idx], pc.device)
        # (dama_loss waits for the device once, int((w > 0).sum()), left in losses.py, which users copy
        # as it is; a tensor gap_mean (dama_state) spares it a second wait, h.mean().item())
        losses, cr, rj, beta_used, keep, state["gap_mean"] = dama_loss(
            pc, pr, rc, rr, s[:, 0], s[:, 1], state["gap_mean"], beta=args.beta,
            score_gap_mean=P.score_gap_mean, generator=state["generator"])
        loss = (losses * keep).sum() / keep.sum()
        m["beta_used"], m["kept"] = beta_used.mean(), keep.sum().long()   # (an integer tensor: an int when read)
    # (chosen_nll_loss checks (chosen_lengths < 1).any() on the device: one wait a step, left in losses.py)
    nll = chosen_nll_loss(pc, chosen_tokens).mean()   # logged always; trained only with sft_weight > 0
    if sft_weight > 0:
        loss = loss + sft_weight * nll
    m["nll/chosen"] = nll.detach()
    m.update(reward_metrics(cr, rj))
    # the plain DPO loss at the base beta, whatever the method: ln 2 at policy == reference
    m["dpo_loss"] = dpo_loss(pc.detach(), pr.detach(), rc, rr, beta=args.beta)[0].mean()
    m["logps/chosen"], m["logps/rejected"] = pc.detach().mean(), pr.detach().mean()
    m["tokens"] = ntok
    return loss, m


def train_pref(args, method, P, sft_path, name=None):
    """Preference-optimise a copy of the SFT model; the SFT model itself is the frozen reference
    (its log-probs are already cached in P). Writes out_dir/pref_<name>_s<seed>.pt (name: the row's slug,
    by default the method's); returns its path and the per-step metrics (the curves: logps/chosen, rewards/margins, ...).
    Every --pref_ckpt_every steps the whole training state goes to <that path>.part (model, optimizer,
    batch order and its RNG, DAMA's running gap and selection generator), which --resume continues.

    The two remedies for the alignment tax: --sft_weight alpha adds RPO's NLL term on the chosen
    response (pref_step_loss); --sft_mix gamma adds gamma x the SFT loss of one ordinary SFT batch
    (--pref_batch fresh understanding and generation sequences, as in stage sft) to every step, as
    InstructGPT mixes pretraining batches into PPO (arXiv:2203.02155, Eq. 2, "PPO-ptx")."""
    policy, tok, vocab, ck = load_model(sft_path, args.device)
    policy.train()
    seed_everything(args.seed)
    opt = sft.adamw(policy.parameters(), args.pref_lr, args.device)
    rng = random.Random(args.seed)
    state = dama_state(args.device, args.seed)
    mix_rng, mix_args = random.Random(args.seed + 7919), copy.copy(args)      # --sft_mix: its own data stream
    mix_args.batch_size = args.pref_batch
    order, t_log, curve, start = [], time.perf_counter(), Metrics(), 0
    name = name or method
    path = pref_path(args, name)
    part, made_with = path + ".part", {"settings": settings(args), "sft_digest": file_digest(sft_path)}
    if args.resume and os.path.exists(part):
        pk = read_checkpoint(part, args.device, ("model", "optimizer", "step", "rng", "order", "gap_mean", "curve",
                                                 "settings", "sft_digest"), "preference checkpoint")
        diff = differences(pk["settings"], made_with["settings"])
        if diff or pk["sft_digest"] != made_with["sft_digest"]:
            raise Refused(f"error: {part} was made with other settings or another SFT model ({diff or 'sft.pt'}); "
                          f"delete it or run without --resume")
        policy.load_state_dict(pk["model"])
        opt.load_state_dict(pk["optimizer"])
        start, order, curve = pk["step"], list(pk["order"]), Metrics(pk["curve"])
        state["gap_mean"].fill_(pk["gap_mean"])
        rng.setstate(pk["rng"]["data"])
        mix_rng.setstate(pk["rng"]["mix"])
        torch.set_rng_state(pk["rng"]["torch"].cpu())
        state["generator"].set_state(pk["rng"]["dama"].cpu())
        log(args, f"pref {name} s{args.seed} | resumed at step {start}")
    last_log = start
    for step in range(start + 1, args.pref_steps + 1):
        if len(order) < args.pref_batch:                 # epochs over the pairs, reshuffled
            order += rng.sample(range(len(P.pairs)), len(P.pairs))
        idx, order = order[:args.pref_batch], order[args.pref_batch:]
        for g in opt.param_groups:
            g["lr"] = args.pref_lr * min(1.0, step / 10)
        loss, m = pref_step_loss(policy, vocab, P, idx, method, args, state, args.sft_weight)
        if args.sft_mix > 0:
            ids, labels, task = sft.sft_batch(mix_rng, tok, vocab, mix_args)
            with amp_context(args.device, args.dtype):
                mixed = sft.sft_loss(policy, ids, labels, task, args.und_loss)[0]
            loss = loss + args.sft_mix * mixed
            m["sft_mix/loss"] = mixed.detach()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(policy.parameters(), args.grad_clip)
        opt.step()
        curve.append({"step": step, "loss": loss.detach(), **m})
        if step % args.log_every == 0 or step == args.pref_steps:
            # read once per log interval: a .item() a step would make the host wait for the GPU
            hist = [h for h in curve.read() if h["step"] > last_log]
            mean = {k: float(np.mean([h[k] for h in hist])) for k in hist[0] if k not in ("step", "tokens")}
            dt = time.perf_counter() - t_log
            log(args, f"pref {name} s{args.seed} | step {step} | " + " | ".join(f"{k} {v:.4f}" for k, v in mean.items())
                + f" | {1000 * dt / len(hist):.0f} ms/step | {sum(h['tokens'] for h in hist) / dt:.0f} tok/s")
            last_log, t_log = step, time.perf_counter()
        if step % args.pref_ckpt_every == 0 and step < args.pref_steps:
            save_atomic({"model": policy.state_dict(), "optimizer": opt.state_dict(), "step": step, "order": order,
                         "gap_mean": float(state["gap_mean"]), "curve": curve.read(), **made_with,
                         "rng": {"data": rng.getstate(), "mix": mix_rng.getstate(), "torch": torch.get_rng_state(),
                                 "dama": state["generator"].get_state()}}, part)
    save_atomic({**ck, "model": policy.state_dict(), "optimizer": None, "step": args.pref_steps,
                 "config": vars(args), "method": method, "row": name, "curve": curve.read(), **made_with}, path)
    if os.path.exists(part):
        os.remove(part)
    return path, curve.read()


def pref_path(args, name):
    return os.path.join(args.out_dir, f"pref_{name}_s{args.seed}.pt")


def finished_pref(args, name, sft_path):
    """For --resume: (path, curve) of the preference run `name` that already finished with these
    settings from this SFT model, else None."""
    path = pref_path(args, name)
    if not (args.resume and os.path.exists(path)):
        return None
    ck = read_checkpoint(path, args.device, ("model",), "preference checkpoint")
    same = ck.get("settings") == settings(args) and ck.get("sft_digest") == file_digest(sft_path)
    return (path, ck["curve"]) if same and "curve" in ck else None


# the settings the pairs of a seed depend on (with the SFT model and the code)
PAIR_FLAGS = ("seed", "pairs", "onpolicy", "exists_frac", "length_matched", "cooc", "device", "dtype")


def preference_data(args, sft_path):
    """The pairs of --seed (every method of that seed trains on the same pairs). Built once and kept
    in out_dir/pairs_s<seed>.pt: the joint study and the tax sweep train on the same pairs, and take
    them from there when the SFT model, the code and PAIR_FLAGS are the same."""
    path = os.path.join(args.out_dir, f"pairs_s{args.seed}.pt")
    flags = {k: v for k, v in settings(args).items() if k in PAIR_FLAGS}   # (the device's kind: cuda:1 samples as cuda:0)
    made_with = {"flags": flags, "sft_digest": file_digest(sft_path),
                 "commit": report.commit()}
    if os.path.exists(path):
        kept = read_checkpoint(path, "cpu", ("pairs", "made_with"), "pairs file")
        if kept["made_with"] == made_with:
            P = data.PairSet.from_dict(kept)
            log(args, f"pairs s{args.seed} | {len(P.pairs)} pairs from {path}")
            return P
    ref, tok, vocab, _ = load_model(sft_path, args.device)
    t0 = time.perf_counter()
    P = build_pairs(ref, tok, vocab, args, random.Random(args.seed))
    P.score_gap_mean = float((P.scores[:, 0] - P.scores[:, 1]).mean())   # DAMA's dbar, measured
    save_atomic({**P.to_dict(), "made_with": made_with}, path)
    log(args, f"pairs s{args.seed} | {len(P.pairs)} pairs ({P.n_onpolicy} on-policy) | "
              f"score_gap_mean {P.score_gap_mean:.4f} | {time.perf_counter() - t0:.0f} s")
    return P


def shared_preference_data(args, sft_path):
    """preference_data, with rank 0 building the pairs under torchrun and the others reading its file."""
    P = preference_data(args, sft_path) if dist.is_main() else None
    dist.barrier()
    return P if P is not None else preference_data(args, sft_path)


def bench(path, args, stats):
    """The hallucination benchmark (eval.hallucination) of the checkpoint at `path`."""
    model, tok, vocab, _ = load_model(path, args.device)
    return evaluation.hallucination(model, tok, vocab, args.eval_n, args.device, args.dtype, args.eval_seed, stats)


def compare(args):
    """Stage pref: train every method (or --method) on the same pairs for each seed, evaluate each
    with the hallucination benchmark, and write out_dir/compare.{md,json,png}."""
    sft = os.path.join(args.out_dir, "sft.pt")
    # (label, slug, method, flags): a method at the run's settings, or a remedy's row
    wanted = [(ROW_LABELS[s], s, *(REMEDY_ROWS[s][1:] if s in REMEDY_ROWS else (s, {})))
              for s in pick("method", args.method, ROW_LABELS)]
    seeds = [args.seed + i for i in range(args.pref_seeds)]
    stats = world.training_statistics(cooc=args.cooc)
    t0 = time.perf_counter()

    # Under torchrun the runs are dealt round the ranks (run i on rank i mod N), each trained whole on
    # one device: they are independent and small. Rank 0 evaluates them all and writes the tables.
    rows, curves, theirs, i = {"sft": [bench(sft, args, stats)]} if dist.is_main() else {}, {}, [], 0
    for seed in seeds:
        a = copy.copy(args)
        a.seed = seed
        P = shared_preference_data(a, sft)
        for row, name, m, flags in wanted:
            t, b = time.perf_counter(), copy.copy(a)
            for k, v in flags.items():
                setattr(b, k, v)
            mine, i = i % dist.WORLD == dist.RANK, i + 1
            if not mine:
                theirs.append((row, name, seed, pref_path(b, name)))
                continue
            done = finished_pref(b, name, sft)
            if done:
                log(args, f"resume | pref {name} s{seed} finished before with these settings: kept")
            path, curve = done or train_pref(b, m, P, sft, name=name)
            if dist.is_main():
                rows.setdefault(row, []).append(bench(path, args, stats))
                curves.setdefault(row, []).append(curve)
                log(args, f"pref {name} s{seed} | trained and evaluated in {time.perf_counter() - t:.0f} s")
        dist.barrier()                     # every run of this seed is written
        for row, name, seed_, path in theirs if dist.is_main() else ():
            rows.setdefault(row, []).append(bench(path, args, stats))
            curves.setdefault(row, []).append(read_checkpoint(path, "cpu", ("curve",), "preference run")["curve"])
            log(args, f"pref {name} s{seed_} | trained on another rank; evaluated")
        theirs = []
    if not dist.is_main():
        return None
    rows = {row: rows[row] for row in ["sft"] + [w[0] for w in wanted]}   # in the table's order
    table = evaluation.headline(rows) + "\n\n" + evaluation.compare_table(rows)
    seconds = time.perf_counter() - t0
    head = (f"`python train.py --stage pref` | {len(seeds)} seed(s) of preference training from one SFT model | "
            f"{args.pairs} pairs, {args.pref_steps} steps of {args.pref_batch} pairs, beta {args.beta}, "
            f"lr {args.pref_lr}, sft_weight {args.sft_weight}, sft_mix {args.sft_mix}"
            + ("; the rows '+ NLL' and '+ SFT mix' add a remedy for the alignment tax"
               if any(w[1] in REMEDY_ROWS for w in wanted) else "")
            + f" | {args.eval_n} held-out scenes per split | {args.device} | "
            f"{seconds:.0f} s\n\n")
    write_atomic(os.path.join(args.out_dir, "compare.md"), head + table)
    write_atomic(os.path.join(args.out_dir, "compare.json"), json.dumps(
        {"sft_digest": file_digest(sft), "seconds": seconds, "seeds": seeds, "config": vars(args),
         "rows": {k: [{s: r[s] for s in ("test", "bias")} for r in v] for k, v in rows.items()},
         "curves": curves}, indent=1))
    if "mdpo" in rows:
        pictures.compare_picture(os.path.join(args.out_dir, "compare.png"),
                                 rows["sft"][0]["bias_samples"], rows["mdpo"][0]["bias_samples"])
    print(head + table)
    return rows
