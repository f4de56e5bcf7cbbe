"""
Generation preference pairs (stage `joint`, joint.py; stage `tokens`, tokens.py): for a prompt,
a chosen and a rejected image, as image codes of the run's tokenizer. Three kinds:

- on-policy: K images are sampled from the SFT model for a training prompt (classifier-free
  guidance, temperature --gen_temperature) and scored by the scene parser: the fraction of the
  prompt's checks an image passes (world.prompt_checks: objects, colours, count, relation).
  Chosen = the best sample, rejected = the worst, when their scores differ.
- real vs generated (the diagnostic study's off-policy pairs): chosen = the tokenized ground-truth
  render, rejected = the worst sample.
- world: no model at all. Chosen = the true render of the prompt's scene, rejected = the render of
  the same scene with one object changed (data.alter_scene): the same pairs in every world, so
  they carry the comparison across tokenizers, and a model that draws nothing has them too.

Each pair also holds a corrupted prompt (one attribute changed, data.corrupt_prompt) that the
chosen image fits worse: the condition of generation mDPO (our variant, joint.py).
"""
import random
import time
from dataclasses import dataclass

import numpy as np
import torch

import data
import eval as evaluation
import pref
import world
from checkpoint import load_model, log

KIND_NAMES = {"on": "on-policy", "real": "real-vs-generated", "world": "world"}


@dataclass
class GenPair:
    example: data.Example     # the prompt (example.question) and a scene that satisfies it
    chosen: list              # image codes
    rejected: list
    corrupted: list           # the prompt with one attribute changed (the mDPO-style condition)
    scores: tuple             # parser scores (chosen, rejected), each in [0, 1]
    source: str               # 'on-policy' (both sampled), 'real' (chosen = the ground-truth render) or
                              # 'world' (both rendered: the prompt's scene against it with one object changed)

    @property
    def prompt(self):
        return self.example.question


def rank_samples(ex, imgs):
    """Parser scores of K images drawn for one prompt -> (index of the best, of the worst, scores).
    Ties go to the earliest sample."""
    scores = [world.prompt_score(ex, world.parse(im)) for im in imgs]
    return int(np.argmax(scores)), int(np.argmin(scores)), scores


def corrupted_for(rng, ex, parsed, score, tries=20):
    """A corrupted prompt (data.corrupt_prompt) that the chosen image fits WORSE than the real prompt
    (score = its score under the real one), or None if `tries` draws fail. An imperfect chosen image
    may fit a changed prompt better: 'a red circle and a blue square' drawn with a GREEN square fits
    'a red circle and a green square' fully, and would teach the conditional term the wrong way."""
    for _ in range(tries):
        words = data.corrupt_prompt(rng, ex.question)
        if world.prompt_score(data.Example(ex.task, ex.scene, words, []), parsed) < score:
            return words
    return None


def build_gen_pairs(model, tok, vocab, args, rng, kinds=("on", "real"), max_rounds=20):
    """Sample --gen_k images per training prompt until --gen_pairs pairs of each kind exist (prompts
    where every sample scores the same give no on-policy pair). Returns {kind: [...]} for the wanted
    kinds. A kind that a whole round of prompts did not add to is no longer sought: a model that
    draws nothing parseable gives no on-policy pair, and its kind comes back short, or empty."""
    g = torch.Generator(device=args.device).manual_seed(args.seed)
    K, want = args.gen_k, args.gen_pairs
    out, tasks, seeking = {k: [] for k in kinds}, list(data.GEN_TASKS), set(kinds)
    for _ in range(max_rounds):
        seeking = {k for k in seeking if len(out[k]) < want}
        if not seeking:
            break
        before = {k: len(out[k]) for k in seeking}
        exs = [data.gen_example(rng, "train", rng.choice(tasks)) for _ in range(want)]
        imgs, codes = evaluation.draw(model, tok, vocab, [e.question for e in exs for _ in range(K)], args.device,
                                      args.dtype, args.gen_temperature, args.cfg_scale, g, return_codes=True)
        truth = tok.encode(np.stack([world.render(e.scene) for e in exs])).tolist()
        wrong, asked = {}, {}
        for i, e in enumerate(exs):
            best, worst, s = rank_samples(e, imgs[K * i:K * i + K])
            c = codes[K * i:K * i + K]
            if "on" in seeking and s[best] > s[worst] and len(out["on"]) < want:
                corrupted = corrupted_for(rng, e, world.parse(imgs[K * i + best]), s[best])
                if corrupted:
                    out["on"].append(GenPair(e, c[best], c[worst], corrupted, (s[best], s[worst]), "on-policy"))
            if "real" in seeking and s[worst] < 1 and len(out["real"]) < want:
                corrupted = corrupted_for(rng, e, e.scene, 1.0)
                if corrupted:
                    out["real"].append(GenPair(e, truth[i], c[worst], corrupted, (1.0, s[worst]), "real"))
            wrong[e.task] = wrong.get(e.task, 0) + (s[worst] < 1)
            asked[e.task] = asked.get(e.task, 0) + 1
        seeking -= {k for k in seeking if len(out[k]) == before[k]}
        # a task where the model erred on < 1% of the prompts gives (almost) no pairs: stop asking
        # for it after this round (the other tasks keep their proportions)
        tasks = [t for t in tasks if t not in asked or wrong[t] >= 0.01 * asked[t]] or tasks
    return out


def world_pair_scenes(n, rng):
    """The scenes of n world pairs: (example, altered scene, parser score of it, corrupted prompt)."""
    made = []
    while len(made) < n:
        e = data.gen_example(rng, "train", rng.choice(data.GEN_TASKS))
        for _ in range(20):
            altered = data.alter_scene(rng, e.scene)
            score = world.prompt_score(e, world.parse(world.render(altered))) if altered else 1.0
            if score < 1:
                break
        else:
            continue
        corrupted = corrupted_for(rng, e, e.scene, 1.0)
        if corrupted:
            made.append((e, altered, score, corrupted))
    return made


def build_world_pairs(tok, args, rng):
    """--gen_pairs pairs that need no model, built from the world alone: chosen = the tokenized render
    of a training prompt's scene; rejected = the tokenized render of that scene with ONE object
    changed (data.alter_scene) so that it fits the prompt worse (the parser's score < 1). The same
    scenes and the same changes whatever the tokenizer: the pairs of the token-count study."""
    made = world_pair_scenes(args.gen_pairs, rng)
    codes = tok.encode(np.stack([world.render(sc) for e, alt, _, _ in made for sc in (e.scene, alt)])).tolist()
    same = sum(codes[2 * i] == codes[2 * i + 1] for i in range(len(made)))
    if same:   # (a tokenizer that hands back less than the scene: such a pair has no gradient)
        log(args, f"gen pairs s{args.seed} | world | {same} of {len(made)} pairs have the same codes on both sides")
    return [GenPair(e, codes[2 * i], codes[2 * i + 1], corrupted, (1.0, score), "world")
            for i, (e, _, score, corrupted) in enumerate(made)]


def gen_pair_data(ref, vocab, pairs, args):
    """GenPairs -> the data.PairSet the preference losses take, like pref.build_pairs' (task 'gen'):
    the frozen reference's log-probs cached once (chosen, rejected, chosen under the corrupted
    prompt) and the parser scores, whose mean gap is DAMA's dbar."""
    P = data.PairSet(pairs, task="gen", scores=torch.tensor([p.scores for p in pairs], dtype=torch.float32))
    P.ref_logps[True] = pref.reference_logps(ref, vocab, P, range(len(pairs)), True, args)
    P.score_gap_mean = float((P.scores[:, 0] - P.scores[:, 1]).mean())
    return P


def gen_preference_data(args, sft_path, kinds=("on", "real", "world")):
    """Generation pair data of --seed: {kind: P} for the wanted kinds that have pairs, and
    {kind: why} for those that have none."""
    ref, tok, vocab, _ = load_model(sft_path, args.device)
    t0 = time.perf_counter()
    rng = random.Random(args.seed)
    # both sampled kinds or neither: the pairs of a kind do not depend on which rows are wanted
    sampled = ("on", "real") if {"on", "real"} & set(kinds) else ()
    built = {k: v for k, v in build_gen_pairs(ref, tok, vocab, args, rng, sampled).items() if k in kinds} if sampled else {}
    if "world" in kinds:   # (after the sampled kinds, whose random stream it leaves as it was)
        built["world"] = build_world_pairs(tok, args, random.Random(f"{args.seed}/world"))
    out, missing = {}, {}
    for kind, pairs in built.items():
        if len(pairs) < args.pref_batch:    # (a row trains on batches of --pref_batch pairs)
            missing[kind] = (f"{len(pairs)} {KIND_NAMES[kind]} generation pairs at temperature {args.gen_temperature:g}, "
                             f"fewer than a batch: the SFT model's "
                             + ("drawings of a prompt all scored the same" if kind == "on" else "drawings were never wrong"))
            log(args, f"gen pairs s{args.seed} | {kind} | none: {missing[kind]}")
            continue
        out[kind] = P = gen_pair_data(ref, vocab, pairs, args)
        tasks = {t: sum(p.example.task == t for p in pairs) for t in data.GEN_TASKS}
        log(args, f"gen pairs s{args.seed} | {kind} | {len(pairs)} pairs | score gap mean "
                        f"{P.score_gap_mean:.3f} | by task {tasks}")
    log(args, f"gen pairs s{args.seed} | built in {time.perf_counter() - t0:.0f} s")
    return out, missing
