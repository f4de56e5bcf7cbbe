"""
The generation DPO gradient at the SFT model, for the token-count study (tokens.py): how hard a
generation pair pulls against the tokens its chosen and rejected images disagree on.

At the SFT model the policy is the reference, every pair's DPO weight is 1/2 and its gradient is
-beta/2 (grad log p(chosen) - grad log p(rejected)): tokens that agree, on equal prefixes, cancel.
Two measurements, each kept as JSON beside the model (for that sft.pt):

- pair_gradients -> pairgrads.json: the first PAIR_GRADS world pairs of the joint stage, one at a
  time: each pair's gradient norm against the tokens it changes, and b of |g| ~ changed^b.
- dose_gradients -> dose.json, the dose test: the same prompts and chosen images, the rejected
  image with 1, 2 or 3 objects changed (DOSES), one tokenizer, one image length; for each dose rho
  = |g_U| / |g_G| on DOSE_BATCHES batches, the understanding batches the same at every dose. Does
  rho fall as a pair changes more of the image, when nothing else changes?
"""
import argparse
import json
import os
import random

import numpy as np

import data
import genpairs
import joint
import report
import world
from checkpoint import Refused, file_digest, load_model, read_checkpoint, write_atomic

PAIR_GRADS = 200       # world pairs whose generation DPO gradient is taken one at a time, per SFT model
DOSES = (1, 2, 3)      # the dose test: objects changed in the rejected image, on the same prompts
DOSE_BATCHES = 16      # batches of --pref_batch pairs each dose's gradient is measured on


def loglog(x, y):
    """log y = c + slope log x by least squares -> (slope, c)."""
    slope, c = np.polyfit(np.log(x), np.log(y), 1)
    return float(slope), float(c)


def changed(p):
    """The image tokens a generation pair changes: positions where its chosen and rejected codes differ."""
    return sum(c != r for c, r in zip(p.chosen, p.rejected))


def kept(path, **want):
    """The JSON at path if it exists and holds every key of `want` with that value, else None."""
    if not os.path.exists(path):
        return None
    out = report.read_json(path)
    return out if all(out.get(k) == v for k, v in want.items()) else None


def at_sft(d):
    """The joint stage's settings of the model in d and its SFT model: (args, policy, tokenizer, vocab)."""
    a = argparse.Namespace(**report.read_json(os.path.join(d, "study.json"))["config"])
    a.out_dir = d
    policy, tok, vocab, _ = load_model(os.path.join(d, "sft.pt"), a.device)
    return a, policy, tok, vocab


def grad_norm(policy, vocab, P, idx, a):
    """|g| of the plain DPO loss on pairs idx of P."""
    return float(joint.task_grads(policy, list(policy.parameters()), vocab, P, idx, "dpo", a, None)[0].norm())


def pair_gradients(d, n=PAIR_GRADS):
    """The first n world pairs of the model in d, one at a time, at the SFT model: the norm of each
    pair's generation DPO gradient against the image tokens the pair changes, and b of the fit
    |g| ~ changed^b. Within one model and one tokenizer: does a pair that changes more tokens pull
    harder? Kept in d/pairgrads.json for this sft.pt."""
    path, digest = os.path.join(d, "pairgrads.json"), file_digest(os.path.join(d, "sft.pt"))
    if (out := kept(path, sft_digest=digest)) is not None:
        return out
    a, policy, tok, vocab = at_sft(d)
    a.gen_pairs = n
    pairs = genpairs.build_world_pairs(tok, a, random.Random(f"{a.seed}/world"))   # the joint stage's first n
    P = genpairs.gen_pair_data(policy, vocab, pairs, a)
    policy.train()
    counts = [changed(p) for p in pairs]
    norms = [grad_norm(policy, vocab, P, [i], a) for i in range(len(pairs))]
    pts = [(c, g) for c, g in zip(counts, norms) if c > 0]
    b = loglog([c for c, _ in pts], [g for _, g in pts])[0] if len({c for c, _ in pts}) >= 2 else None
    out = {"sft_digest": digest, "changed": counts, "norm": norms, "b": b}
    write_atomic(path, json.dumps(out))
    return out


# -----------------------------------------------------------------------------
# the dose test: more of the image changed, at one tokenizer and one image length

def altered_k(rng, scene, k, tries=20):
    """The scene with k DIFFERENT objects changed (data.alter_scene, k times), or None if `tries` draws fail."""
    for _ in range(tries):
        alt = scene
        for _ in range(k):
            alt = data.alter_scene(rng, alt) if alt is not None else None
        if alt is not None and sum(a != b for a, b in zip(scene, alt)) == k:   # (alter_scene keeps the order)
            return alt
    return None


def dose_scenes(n, seed, doses=DOSES):
    """n training prompts whose scene has at least max(doses) objects (the counting and full-scene
    prompts), each with, for every dose k, the scene with k objects changed so that it fits the prompt
    worse (the parser's score < 1): [(example, {k: (altered scene, its score)})]. The same prompts and
    chosen images at every dose, so only the rejected image, and how much of it differs, changes."""
    rng, made = random.Random(f"{seed}/dose"), []
    for _ in range(1000 * n):
        if len(made) == n:
            return made
        e = data.gen_example(rng, "train", rng.choice(data.GEN_TASKS))
        if len(e.scene) < max(doses):
            continue
        alts = {}
        for k in doses:
            alt = altered_k(rng, e.scene, k)
            score = world.prompt_score(e, world.parse(world.render(alt))) if alt else 1.0
            if score >= 1:
                break
            alts[k] = (alt, score)
        else:
            made.append((e, alts))
    raise Refused(f"error: the dose test found {len(made)} of {n} prompts whose scenes take {max(doses)} changes")


def dose_gradients(d):
    """The dose test of the model in d, at the SFT model: for each dose, the generation DPO
    gradient's norm on DOSE_BATCHES batches of its pairs, the understanding one's on as many batches
    of the joint stage's understanding pairs (the same at every dose), and rho at step 1 = their
    ratio, with a of rho ~ changed^-a across the doses. Kept in d/dose.json for this sft.pt."""
    path, digest = os.path.join(d, "dose.json"), file_digest(os.path.join(d, "sft.pt"))
    if (out := kept(path, sft_digest=digest, doses=list(DOSES), batches=DOSE_BATCHES)) is not None:
        return out
    a, policy, tok, vocab = at_sft(d)
    B = a.pref_batch
    made = dose_scenes(DOSE_BATCHES * B, a.seed)
    n = len(made)
    codes = tok.encode(np.stack([world.render(e.scene) for e, _ in made]
                                + [world.render(alts[k][0]) for k in DOSES for _, alts in made])).tolist()
    # (the corrupted prompt is mDPO's condition; plain DPO, measured here, does not read it)
    PG = {k: genpairs.gen_pair_data(policy, vocab, [
        genpairs.GenPair(e, codes[i], codes[n * (1 + j) + i], e.question, (1.0, alts[k][1]), "world")
        for i, (e, alts) in enumerate(made)], a) for j, k in enumerate(DOSES)}
    PU = data.PairSet.from_dict(read_checkpoint(os.path.join(d, f"pairs_s{a.seed}.pt"), "cpu", ("pairs",), "pairs file"))
    policy.train()
    batches = [list(range(b * B, (b + 1) * B)) for b in range(DOSE_BATCHES)]
    g_und = [grad_norm(policy, vocab, PU, [i % len(PU.pairs) for i in idx], a) for idx in batches]
    g_gen = {k: [grad_norm(policy, vocab, PG[k], idx, a) for idx in batches] for k in DOSES}
    counts = [float(np.mean([changed(p) for p in PG[k].pairs])) for k in DOSES]
    rho = [float(np.mean([u / g for u, g in zip(g_und, g_gen[k])])) for k in DOSES]
    fit_a = -loglog(counts, rho)[0] if len(set(counts)) >= 2 and min(counts) > 0 else None
    out = {"sft_digest": digest, "doses": list(DOSES), "batches": DOSE_BATCHES, "pairs": n, "changed": counts,
           "g_und": float(np.mean(g_und)), "g_gen": [float(np.mean(g_gen[k])) for k in DOSES],
           "rho_step1": rho, "a": fit_a}
    write_atomic(path, json.dumps(out))
    return out


def dose_extrapolation(dose_changed, dose_rho, at):
    """rho at step 1 that one model's dose fit (log rho = c - a log changed) gives at `at` tokens changed."""
    slope, c = loglog(dose_changed, dose_rho)
    return float(np.exp(c) * at ** slope)
