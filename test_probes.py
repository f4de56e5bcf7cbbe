"""Tests of the reasoning and knowledge probes (probes.py): labels computed in code, and splits
that cannot leak (generation never trains on a probe prompt; held-out probes are never taught)."""
import random
import unittest
from argparse import Namespace

import torch

import data
import probes
import sft
import world
from model import PatchTokenizer

PROBE_VOCAB = set(world.SYMBOLS) | set(world.NAMES) | set(world.PROBE_WORDS.split())


def solve(p, fav):
    """An independent resolver of a probe's prompt words: the plain prompt it asks for."""
    w = p.prompt
    if p.family == "arithmetic":
        a, b = world.NUMBERS.index(w[0]), world.NUMBERS.index(w[2])
        return [world.NUMBERS[a + b if w[1] == "plus" else a - b]] + w[3:]
    if p.family == "knowledge":
        return ["a", fav[w[4]][0], fav[w[0]][1]]
    rules = dict((r[0], r[2]) for r in (c.split() for c in " ".join(w[:-3]).split(",")) if r)
    thing = w[-1]
    while thing in rules:
        thing = rules[thing]
    return ["a", w[-2], thing]


class TestProbes(unittest.TestCase):

    def setUp(self):
        self.fav = probes.favourites(0)

    def test_favourites_are_distinct_and_never_held_out(self):
        for seed in range(5):
            fav = probes.favourites(seed)
            self.assertEqual(len(set(fav.values())), len(world.NAMES))
            self.assertFalse(set(fav.values()) & world.HELD_OUT)
        self.assertNotEqual(probes.favourites(0), probes.favourites(1))

    def test_labels_are_computed_right(self):
        rng = random.Random(0)
        for fam in probes.FAMILIES:
            for split in ("train", "test"):
                for _ in range(200):
                    p = probes.sample_probe(rng, fam, split, self.fav)
                    self.assertEqual(p.resolved, solve(p, self.fav), p.prompt)
                    if fam.startswith("symbols"):   # the rules always include a distractor shape
                        self.assertEqual(sum(x in world.SHAPES for x in p.prompt), 2)
                        self.assertEqual(p.prompt.count("means"), 2 if fam == "symbols 1 hop" else 3)
        self.assertTrue(all(2 <= r <= 5 and 1 <= a <= 5 and 1 <= b <= 5 for a, _, b, r in probes.EXPRESSIONS))

    def test_parser_judges_the_resolved_prompt(self):
        rng = random.Random(1)
        for fam in probes.FAMILIES:
            p = probes.sample_probe(rng, fam, "test", self.fav)
            words = p.resolved
            if p.task == "counting":
                n = world.NUMBERS.index(words[0])
                shape = next(s for s, pl in world.PLURAL.items() if pl == words[2])
                good = tuple(world.Obj(words[1], shape, c) for c in world.CANONICAL[n])
                bad = good[:-1]                                   # one object short
            else:
                good = (world.Obj(words[1], words[2], 4),)
                other = next(s for s in world.SHAPES if s != words[2])
                bad = (world.Obj(words[1], other, 4),)
            self.assertTrue(p.correct(world.render(good)), fam)
            self.assertFalse(p.correct(world.render(bad)), fam)

    def test_held_out_probes_are_never_taught_or_self_trained(self):
        """The split is by the probe's key (rules in any order, distractor ignored): no CoT rewrite
        taught and no self-training prompt shares a key with a held-out probe."""
        rng = random.Random(2)
        test = [probes.sample_probe(rng, f, "test", self.fav) for f in probes.FAMILIES for _ in range(500)]
        test_keys = {p.key for p in test}
        self.assertTrue(all(sum(k[0] == f for k in test_keys) >= 5 for f in probes.FAMILIES))
        # arithmetic and knowledge are finite: every training prompt, enumerated, is outside the test keys
        for a, op, b, r in probes.EXPRESSIONS:
            for colour, shape in world.TRAIN_KINDS:
                key = ("arithmetic", world.NUMBERS[a], op, world.NUMBERS[b], colour, world.PLURAL[shape])
                self.assertEqual(probes.in_probe_test(key), key in test_keys)
        train_keys = set()
        for _ in range(5000):
            q, ans, scene = probes.fact_example(rng, self.fav)
            if len(q) > 6:                                     # a CoT rewrite 'what is <prompt> ?'
                fam = ("arithmetic" if q[3] in ("plus", "minus") else "knowledge" if q[3] == "'s"
                       else "symbols 1 hop" if q.count("means") == 2 else "symbols 2 hops")
                train_keys.add(key_of(fam, q[2:-1]))
        self.assertEqual({k[0] for k in train_keys}, set(probes.FAMILIES))
        self.assertFalse(train_keys & test_keys)
        selfp = probes.self_training_prompts(rng, 2000, self.fav)
        self.assertEqual({p.family for p in selfp}, set(probes.FAMILIES))
        self.assertFalse({key_of(p.family, p.prompt) for p in selfp} & test_keys)
        self.assertTrue(all(p.name is None for p in selfp))   # one person named twice is always held out
        self.assertEqual({p.name for p in test if p.name}, set(world.NAMES))

    def test_generation_never_trains_on_a_probe_prompt(self):
        """Token-level: in SFT and in the probes' fact fine-tuning, no generation sequence (one holding
        <gen>) contains a probe word, while understanding sequences do; self-training's generation
        sequences hold training probe prompts only."""
        tok = PatchTokenizer(64, 8, world.CANVAS)
        tok.codebook.copy_(torch.rand(64, 192))
        vocab = data.Vocab(tok.n_codes)
        args = Namespace(batch_size=24, und_frac=0.75, caption_noise=1.0, cooc=world.COOC, cfg_drop=0.1, turns=4, device="cpu")
        rng = random.Random(3)
        facts = lambda r, n: probes.encode_facts(tok, vocab, [probes.fact_example(r, self.fav) for _ in range(n)])
        seen_und = 0
        for step in range(30):
            ids, _, _ = sft.sft_batch(rng, tok, vocab, args, extra=facts(rng, 24) if step % 2 else ())
            for row in ids.tolist():
                has = bool(PROBE_VOCAB & set(vocab.decode(row)))
                self.assertFalse(has and vocab.gen in row, vocab.decode(row))
                seen_und += has
        self.assertGreater(seen_und, 300)
        test_prompts = {tuple(probes.sample_probe(rng, f, "test", self.fav).prompt)
                        for f in probes.FAMILIES for _ in range(300)}
        kept = [(p.prompt, [0] * 9) for p in probes.self_training_prompts(rng, 200, self.fav)]
        for extra, expected in ((probes.self_training_extra(tok, vocab, self.fav, kept), 20),
                                (probes.self_training_extra(tok, vocab, self.fav, None), 0)):   # the control
            n_gen = 0
            for ids, labels, is_gen in extra(rng, 40):
                if vocab.gen in ids:
                    n_gen += 1
                    prompt = vocab.decode(ids[1:ids.index(vocab.boi)])
                    self.assertNotIn(tuple(prompt), test_prompts)
                    self.assertIn((prompt, [0] * 9), kept)
            self.assertEqual(n_gen, expected)


def key_of(family, prompt):
    """A probe's key recomputed from its prompt words (as the split sees it)."""
    if family.startswith("symbols"):
        rules = dict((r[0], r[2]) for r in (c.split() for c in " ".join(prompt[:-3]).split(",")) if r)
        chain, thing = [], prompt[-1]
        while thing in rules:
            chain += [thing, "means", rules[thing]]
            thing = rules[thing]
        return (family, *chain, prompt[-2])
    return (family, *prompt)


if __name__ == "__main__":
    unittest.main()
