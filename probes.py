"""
Does understanding inform generation? UniSandbox-style probes, run by `python train.py --stage probe`.

UniSandbox (arXiv 2511.20561) found that unified models which can answer "what is 2 + 1?" still
cannot draw "as many cups as 2 + 1"; that writing the reasoning out first (chain-of-thought)
closes most of the gap; and that self-training on judged chain-of-thought outputs internalises
it. The same probes, in our world, with every label computed in code:

  arithmetic      'two plus one red circles'                            -> three red circles
  symbols 1 hop   'zap means triangle , fep means circle , a blue zap'  -> a blue triangle
  symbols 2 hops  'zap means dax , dax means triangle , fep means circle , a blue zap'
  knowledge       'kiki 's shape in bouba 's colour'  (favourites of invented names, per seed)
  inverse         'whose is this ?' asked about the model's own drawing of 'kiki 's shape in kiki 's colour'

The arithmetic, the reading of rules and the names' favourites are taught through UNDERSTANDING
only (text questions and answers, plus 'whose is this ?' on true renders); generation is only
ever trained on plain prompts ('three red circles'), never on a probe prompt (test_probes.py
proves it). Each seed fine-tunes the SFT model on those facts (mixed with ordinary SFT batches,
so nothing is forgotten) and draws a new set of favourites. Then, on held-out probe prompts:

  direct  prompt -> image;
  CoT     the model first writes the resolved description as text (its understanding mode,
          'what is <prompt> ?'), then its generation mode draws its own text;
  self    CoT on TRAINING probe prompts, images the parser accepts kept, the direct prompt ->
          image mapping fine-tuned on them; then direct again on the held-out prompts.
"""
import copy
import hashlib
import json
import os
import random
import time

import numpy as np
import torch
from tqdm import tqdm

import data
import eval as evaluation
import report
import sft
import world
from checkpoint import file_digest, load_model, log, write_atomic
from model import amp_context

FAMILIES = ("arithmetic", "symbols 1 hop", "symbols 2 hops", "knowledge")
ROWS = FAMILIES + ("knowledge inverse",)
# a op b = r, with every operand and result a number word and r a count a scene can hold (2..5)
EXPRESSIONS = [(a, op, b, a + b if op == "plus" else a - b) for op in ("plus", "minus")
               for a in range(1, 6) for b in range(1, 6) if 2 <= (a + b if op == "plus" else a - b) <= 5]
INVERSE_Q = ["whose", "is", "this", "?"]
ATTR = {"colour": 0, "shape": 1}                 # a favourite is a (colour, shape) kind


class Probe:
    """A reasoning prompt and the plain prompt it means (computed in code), with its GenEval task.
    key: what the probe asks, order and distractor left out: it decides the split, so a held-out
    probe cannot come back into training with its rules in another order. name: the person a
    knowledge probe names twice (those probes are always held out and asked the inverse question)."""

    def __init__(self, family, prompt, resolved, task, key, name=None):
        self.family, self.prompt, self.resolved, self.task, self.name = family, prompt, resolved, task, name
        self.key = (family,) + tuple(key)

    @property
    def cot_question(self):
        """The understanding question whose answer is the resolved description: the chain of thought."""
        return ["what", "is"] + self.prompt + ["?"]

    def correct(self, img):
        """Does a drawn image satisfy the resolved prompt? The parser judges, with GenEval's rules,
        and a one-object answer must be drawn ALONE: otherwise drawing both shapes a symbol prompt
        names (the answer and the distractor) would pass without resolving anything."""
        parsed = world.parse(img)
        ok = world.geneval_correct(data.Example(self.task, None, self.resolved, []), parsed)
        return ok and (self.task != "colours" or len(parsed) == 1)


def in_probe_test(key):
    """Held-out probes: a stable hash of the probe's key puts 1 in 5 in the test split."""
    return int(hashlib.md5(repr(key).encode()).hexdigest(), 16) % 5 == 0


def favourites(seed):
    """The invented names' favourite (colour, shape) for one seed: distinct, never a held-out combination."""
    kinds = random.Random(seed).sample(world.TRAIN_KINDS, len(world.NAMES))
    return dict(zip(world.NAMES, kinds))


def sample_probe(rng, family, split, fav):
    """One probe of a family from the 'train' split (taught as CoT text, used for self-training)
    or the 'test' split (evaluated only). Knowledge prompts naming one person twice are always test."""
    for _ in range(10_000):
        if family == "arithmetic":
            a, op, b, r = rng.choice(EXPRESSIONS)
            colour, shape = rng.choice(world.TRAIN_KINDS)
            prompt = [world.NUMBERS[a], op, world.NUMBERS[b], colour, world.PLURAL[shape]]
            p = Probe(family, prompt, [world.NUMBERS[r], colour, world.PLURAL[shape]], "counting", prompt)
        elif family.startswith("symbols"):
            sym, mid, other = rng.sample(world.SYMBOLS, 3)
            shape, distractor = rng.sample(world.SHAPES, 2)
            colour = rng.choice([c for c in world.COLOURS if (c, shape) not in world.HELD_OUT])
            chain = [[sym, "means", shape]] if family == "symbols 1 hop" else [[sym, "means", mid], [mid, "means", shape]]
            rules = chain + [[other, "means", distractor]]
            rng.shuffle(rules)
            p = Probe(family, sum((r + [","] for r in rules), []) + ["a", colour, sym], ["a", colour, shape], "colours",
                      sum(chain, []) + [colour])
        elif family == "knowledge":
            a, b = rng.choice(world.NAMES), rng.choice(world.NAMES)
            colour, shape = fav[b][0], fav[a][1]
            if (colour, shape) in world.HELD_OUT:
                continue
            prompt = [a, "'s", "shape", "in", b, "'s", "colour"]
            p = Probe(family, prompt, ["a", colour, shape], "colours", prompt, a if a == b else None)
        else:
            raise ValueError(f"unknown probe family {family!r}")
        test = p.name is not None or in_probe_test(p.key)
        if test == (split == "test"):
            return p
    raise RuntimeError(f"could not sample a {split!r} probe of {family!r}")


def favourite_scene(rng, kind):
    """A true render of a favourite: the object alone, where a drawing of 'a <colour> <shape>' puts it."""
    return (world.Obj(*kind, world.CANONICAL[1][0], rng.choice(world.JITTER), rng.choice(world.JITTER)),)


def arithmetic_fact(a, op, b, r):
    """'what is two plus one ?' -> ['three']."""
    return ["what", "is", world.NUMBERS[a], op, world.NUMBERS[b], "?"], [world.NUMBERS[r]]


def name_fact(fav, name, attr):
    """'what is kiki 's shape ?' -> ['diamond'] (attr: 'colour' or 'shape')."""
    return ["what", "is", name, "'s", attr, "?"], [fav[name][ATTR[attr]]]


def fact_example(rng, fav):
    """One understanding example that teaches the probes' facts: (question, answer, scene or None).
    Atomic facts (arithmetic, the names' favourites, 'whose is this ?' on a true render) and
    chain-of-thought rewrites of TRAINING probe prompts ('what is <prompt> ?' -> the plain prompt)."""
    kind = rng.randrange(7)
    if kind == 0:
        return (*arithmetic_fact(*rng.choice(EXPRESSIONS)), None)
    name = rng.choice(world.NAMES)
    if kind == 1:
        return (*name_fact(fav, name, rng.choice(list(ATTR))), None)
    if kind == 2:
        return INVERSE_Q, [name], favourite_scene(rng, fav[name])
    p = sample_probe(rng, FAMILIES[kind - 3], "train", fav)
    return p.cot_question, p.resolved, None


def encode_facts(tok, vocab, facts):
    """[(question, answer, scene or None)] -> [(ids, labels, is_gen=False)] understanding sequences."""
    codes = evaluation.scene_codes(tok, [scene for _, _, scene in facts])
    return [(*data.und_sequence(vocab, c, q, a), False) for (q, a, _), c in zip(facts, codes)]


def finetune(model, tok, vocab, args, steps, extra_fn, desc):
    """Continue SFT for `steps` with half of each batch ordinary SFT data and half `extra_fn(rng, n)`
    sequences; AdamW at --probe_lr, linear warm-up. The data order is seeded by `desc`, which names
    the phase and the seed. Returns the final loss."""
    rng = random.Random(desc)
    half = copy.copy(args)
    half.batch_size = args.batch_size - args.batch_size // 2
    opt = sft.adamw(model.parameters(), args.probe_lr, args.device)
    model.train()
    for step in tqdm(range(1, steps + 1), desc=desc, leave=False):
        for g in opt.param_groups:
            g["lr"] = args.probe_lr * min(1.0, step / 20)
        ids, labels, task = sft.sft_batch(rng, tok, vocab, half, extra=extra_fn(rng, args.batch_size // 2))
        with amp_context(args.device, args.dtype):
            loss, und, gen = sft.sft_loss(model, ids, labels, task, args.und_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
    model.eval()
    return loss.item()


def text_answers(model, tok, vocab, questions, args, codes=None):
    """Greedy text answers to questions without an image (or about the images given as `codes`)."""
    exs = [data.Example("probe", None, q, []) for q in questions]
    return evaluation.answer(model, tok, vocab, exs, args.device, args.dtype, max_new=8, codes=codes)


def draw(model, tok, vocab, prompts, args, g):
    """(images, codes) drawn for the prompts at --gen_temperature with guidance --cfg_scale."""
    return evaluation.draw(model, tok, vocab, prompts, args.device, args.dtype, args.gen_temperature,
                           args.cfg_scale, g, return_codes=True)


def evaluate(model, tok, vocab, args, fav, probes, seed, modes=("plain", "direct", "CoT")):
    """Per family: understanding of the facts, the CoT text, and drawings judged by the parser:
    'plain' draws the resolved prompt itself (the ceiling: can the model draw the answer at all?),
    'direct' the probe prompt, 'CoT' the model's own text answer to 'what is <prompt> ?'.
    The 'knowledge inverse' row asks 'whose is this ?' about true renders (understanding) and about
    the model's own drawings of one person's favourite: a hit needs a right drawing AND the right name."""
    g = torch.Generator(device=args.device).manual_seed(seed)
    res = {f: {} for f in ROWS}
    facts = {"arithmetic": [arithmetic_fact(*e) for e in EXPRESSIONS],
             "knowledge": [name_fact(fav, n, attr) for n in world.NAMES for attr in ATTR]}
    for f, qa in facts.items():
        preds = text_answers(model, tok, vocab, [q for q, _ in qa], args)
        res[f]["und facts"] = float(np.mean([p == a for p, (_, a) in zip(preds, qa)]))
    rng = random.Random(seed + 30_000)
    truth = [favourite_scene(rng, fav[n]) for n in world.NAMES]
    preds = evaluation.answer(model, tok, vocab, [data.Example("probe", s, INVERSE_Q, []) for s in truth],
                              args.device, args.dtype)
    res["knowledge inverse"]["und facts"] = float(np.mean([p == [n] for p, n in zip(preds, world.NAMES)]))
    for f in FAMILIES:
        ps = probes[f]
        cot = text_answers(model, tok, vocab, [p.cot_question for p in ps], args)
        res[f]["CoT text"] = float(np.mean([c == p.resolved for c, p in zip(cot, ps)]))
        prompts = {"plain": [p.resolved for p in ps], "direct": [p.prompt for p in ps], "CoT": cot}
        for mode in modes:
            imgs, codes = draw(model, tok, vocab, prompts[mode], args, g)
            right = [p.correct(im) for p, im in zip(ps, imgs)]
            res[f][f"gen {mode}"] = float(np.mean(right))
            own = [i for i, p in enumerate(ps) if p.name]
            if f == "knowledge" and own:   # the inverse question about the drawings of one person's favourite
                who = text_answers(model, tok, vocab, [INVERSE_Q] * len(own), args, [codes[i] for i in own])
                res["knowledge inverse"][f"gen {mode}"] = float(np.mean([right[i] and w == [ps[i].name]
                                                                         for w, i in zip(who, own)]))
    return res


def self_training_prompts(rng, n, fav):
    """The prompts self-training draws via CoT: TRAINING probes only, the families in turn."""
    return [sample_probe(rng, FAMILIES[i % len(FAMILIES)], "train", fav) for i in range(n)]


def accepted_cot_drawings(model, tok, vocab, args, fav, seed):
    """CoT on TRAINING probe prompts: the model writes the resolved description, draws it, and the
    parser keeps the drawings that are right for the prompt. Returns ([(prompt, codes)], kept per family)."""
    g = torch.Generator(device=args.device).manual_seed(seed + 10_000)
    ps = self_training_prompts(random.Random(seed + 10_000), args.self_prompts, fav)
    cot = text_answers(model, tok, vocab, [p.cot_question for p in ps], args)
    imgs, codes = draw(model, tok, vocab, cot, args, g)
    right = [p.correct(im) for p, im in zip(ps, imgs)]
    kept = [(p.prompt, c) for p, c, ok in zip(ps, codes, right) if ok]
    return kept, {f: float(np.mean([ok for p, ok in zip(ps, right) if p.family == f])) for f in FAMILIES}


def self_training_extra(tok, vocab, fav, kept):
    """Batches of self-training: half facts (so understanding is kept), half accepted drawings as
    direct prompt -> image sequences. With kept=None, the control: facts only, for the same steps."""
    def extra(rng, n):
        k = n // 2 if kept else n
        facts = encode_facts(tok, vocab, [fact_example(rng, fav) for _ in range(k)])
        return facts + [(*data.gen_sequence(vocab, c, w), True) for w, c in (rng.choice(kept) for _ in range(n - k))]
    return extra


def run_seed(args, seed, sft_path):
    """Teach one seed's facts, evaluate, then self-train (and, as a control, train the same steps on
    the facts alone) and evaluate direct drawing again."""
    model, tok, vocab, _ = load_model(sft_path, args.device)
    fav = favourites(seed)
    a = copy.copy(args)
    a.seed = seed
    t0 = time.perf_counter()
    rng = random.Random(seed + 20_000)
    probes = {f: [sample_probe(rng, f, "test", fav) for _ in range(args.probe_n)] for f in FAMILIES}
    loss = finetune(model, tok, vocab, a, args.probe_steps,
                    lambda r, n: encode_facts(tok, vocab, [fact_example(r, fav) for _ in range(n)]),
                    f"facts s{seed}")
    res = evaluate(model, tok, vocab, a, fav, probes, seed)
    kept, kept_frac = accepted_cot_drawings(model, tok, vocab, a, fav, seed)
    control = copy.deepcopy(model)
    finetune(control, tok, vocab, a, args.self_steps, self_training_extra(tok, vocab, fav, None), f"control s{seed}")
    if kept:
        finetune(model, tok, vocab, a, args.self_steps, self_training_extra(tok, vocab, fav, kept), f"self-training s{seed}")
    for name, m in (("self-training", model if kept else None), ("control", control)):
        after = evaluate(m, tok, vocab, a, fav, probes, seed, modes=("direct",)) if m is not None else {}
        for f in ROWS:
            res[f][f"gen direct after {name}"] = after.get(f, {}).get("gen direct")
            res[f][f"und facts after {name}"] = after.get(f, {}).get("und facts")
    for f in FAMILIES:
        res[f]["self-training kept"] = kept_frac[f]
        res[f]["distinct prompts"] = len({tuple(p.prompt) for p in probes[f]})
    log(args, f"probe s{seed} | facts loss {loss:.3f} | "
              + " | ".join(f"{f}: " + ", ".join(f"{k} {v:.2f}" for k, v in r.items() if v is not None)
                           for f, r in res.items()) + f" | {time.perf_counter() - t0:.0f} s")
    return res


COLS = ("und facts", "CoT text", "gen plain", "gen direct", "gen CoT", "self-training kept",
        "gen direct after self-training", "gen direct after control", "und facts after self-training")
HEADS = ("understanding: facts", "understanding: CoT text", "draw the answer (ceiling)", "draw direct",
         "draw via CoT", "CoT drawings kept", "direct after self-training", "direct after control",
         "facts after self-training")


def study(args):
    """Stage probe: --pref_seeds seeds, each fine-tuned from out_dir/sft.pt; writes out_dir/probes.{md,json}."""
    sft = os.path.join(args.out_dir, "sft.pt")
    t0 = time.perf_counter()
    per_seed = [run_seed(args, args.seed + i, sft) for i in range(args.pref_seeds)]
    rows = {f: [r[f] for r in per_seed] for f in ROWS}
    head = (f"`python train.py --stage probe` | {args.pref_seeds} seed(s), each fine-tuned from one SFT model "
            f"on its facts for {args.probe_steps} steps, then self-trained (or, the control, trained on the facts "
            f"alone) for {args.self_steps} steps on the accepted CoT drawings of {args.self_prompts} training probe "
            f"prompts | {args.probe_n} held-out probes per family (distinct prompts: "
            + ", ".join(f"{f} {np.mean([r[f]['distinct prompts'] for r in per_seed]):.0f}" for f in FAMILIES)
            + f"), drawn at T={args.gen_temperature:g} with CFG {args.cfg_scale:g} | {args.device} | "
            f"{time.perf_counter() - t0:.0f} s\n\n")
    md = head + report.seed_table(rows, COLS, heads=HEADS, first="family")
    write_atomic(os.path.join(args.out_dir, "probes.md"), md)
    write_atomic(os.path.join(args.out_dir, "probes.json"), json.dumps(
        {"sft_digest": file_digest(sft), "rows": rows, "seconds": time.perf_counter() - t0, "config": vars(args)},
        indent=1))
    print(md)
    return rows
