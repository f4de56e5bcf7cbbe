"""
Tests of the synthetic world: determinism, leak-free splits, the co-occurrence bias, the exact
parser and the GenEval-style judge. Run: python -m unittest test_data   (or: pytest test_data.py)
"""
import random
import unittest

import numpy as np

import data
import world


class TestWorld(unittest.TestCase):

    def test_deterministic_for_a_seed(self):
        a = [data.sample_example(random.Random(7), "train", t, 0.3) for t in data.UND_TASKS + data.GEN_TASKS]
        b = [data.sample_example(random.Random(7), "train", t, 0.3) for t in data.UND_TASKS + data.GEN_TASKS]
        self.assertEqual(a, b)
        for x, y in zip(a, b):
            np.testing.assert_array_equal(world.render(x.scene), world.render(y.scene))
        c = [data.sample_example(random.Random(8), "train", t) for t in data.UND_TASKS + data.GEN_TASKS]
        self.assertNotEqual(a, c)

    def test_splits_cannot_leak(self):
        rng = random.Random(0)
        train = [data.sample_example(rng, "train", rng.choice(data.UND_TASKS + data.GEN_TASKS), 0.5)
                 for _ in range(3000)]
        train_keys = {world.scene_key(e.scene) for e in train}
        for e in train:
            self.assertFalse(world.in_test_bucket(e.scene), e)
            self.assertFalse({o.kind for o in e.scene} & world.HELD_OUT, e)
            words = " ".join(e.question + e.answer)     # no held-out combination in any text either
            for c, s in world.HELD_OUT:
                self.assertNotIn(f"{c} {s}", words)
        for split in ("test", "bias"):
            keys = {world.scene_key(world.sample_scene(rng, split)) for _ in range(500)}
            self.assertFalse(keys & train_keys, split)
        for _ in range(200):
            self.assertTrue(world.breaks_bias(world.sample_scene(rng, "bias")))
            self.assertTrue({o.kind for o in world.sample_scene(rng, "combo")} & world.HELD_OUT)
        with self.assertRaises(ValueError):
            world.sample_scene(rng, "validation")

    def test_cooccurrence_bias_and_caption_noise(self):
        rng = random.Random(1)
        scenes = [world.sample_scene(rng, "train") for _ in range(4000)]
        with_cue = [s for s in scenes if any(a in {o.kind for o in s} for a in world.COMPANION)]
        joined = [s for s in with_cue if not world.breaks_bias(s)]
        self.assertGreater(len(joined) / len(with_cue), world.COOC - 0.05)
        breaking = [s for s in scenes if world.breaks_bias(s)][:100]
        self.assertTrue(breaking)
        for s in breaking:
            kinds = {o.kind for o in s}
            noisy = {(c, sh) for c, sh, _ in world.parse_caption(world.caption_words(s, rng, noise=1.0))}
            clean = {(c, sh) for c, sh, _ in world.parse_caption(world.caption_words(s, rng, noise=0.0))}
            self.assertEqual(clean, kinds)
            if len(s) < 9:
                self.assertTrue(noisy - kinds <= set(world.COMPANION.values()) and noisy - kinds)

    def test_prone_kinds_are_the_companions(self):
        """Cog's hallucination-prone objects, from training statistics: a cue's companion (and a
        companion's cue), nothing for any other object, nothing when there is no bias."""
        pairs_of = {**world.COMPANION, **{c: a for a, c in world.COMPANION.items()}}
        for cooc in (world.COOC, 0.9):
            freq, pairs = world.training_statistics(n=3000, cooc=cooc)
            for k in world.TRAIN_KINDS:
                scene = (world.Obj(*k, 4, 0, 0),)
                self.assertEqual(world.prone_kinds(scene, freq, pairs), {pairs_of[k]} if k in pairs_of else set(), k)
            cue, comp = next(iter(world.COMPANION.items()))
            self.assertEqual(world.prone_kinds((world.Obj(*cue, 0, 0, 0), world.Obj(*comp, 8, 0, 0)), freq, pairs),
                             set())                                              # present: not a hallucination
        freq, pairs = world.training_statistics(n=3000, cooc=0.0)
        self.assertFalse(any(world.prone_kinds((world.Obj(*k, 4, 0, 0),), freq, pairs) for k in world.TRAIN_KINDS))

    def test_parser_is_exact_on_renders(self):
        rng = random.Random(2)
        for split in ("train", "test", "bias", "combo"):
            for _ in range(300):
                s = world.sample_scene(rng, split)
                self.assertEqual(world.parse(world.render(s)), s)     # colours, shapes, cells, jitter
        for n in range(1, 6):
            s = world.sample_scene(rng, "train", n=n, same=True)
            self.assertEqual(world.parse(world.render(s)), s)
        self.assertEqual(world.parse(np.zeros((world.CANVAS, world.CANVAS, 3), np.uint8)), ())
        blob = np.zeros((world.CANVAS, world.CANVAS, 3), np.uint8)
        blob[9:16, 9:12] = world.COLOURS["red"]                        # a 7x3 bar is no shape
        self.assertEqual([o.shape for o in world.parse(blob)], ["blob"])
        with self.assertRaises(ValueError):
            world.parse(np.zeros((16, 16, 3), np.uint8))

    def test_judge_accepts_truth_and_rejects_wrong_images(self):
        rng = random.Random(3)
        empty = ()
        for task in data.GEN_TASKS:
            for _ in range(50):
                e = data.gen_example(rng, "test", task)
                self.assertTrue(world.geneval_correct(e, world.parse(world.render(e.scene))), e)
                self.assertFalse(world.geneval_correct(e, empty), e)
        # counting is exact: one object too many is wrong
        e = data.gen_example(rng, "test", "counting")
        if len(e.scene) < 9:
            free = sorted(set(range(9)) - {o.cell for o in e.scene})[0]
            extra = e.scene + (world.Obj(e.scene[0].colour, e.scene[0].shape, free),)
            self.assertFalse(world.geneval_correct(e, extra))

    def test_vocab_and_sequences(self):
        v = data.Vocab(64)
        rng = random.Random(4)
        for task in data.UND_TASKS:
            e = data.sample_example(rng, "train", task, 0.5)
            ids, labels = data.und_sequence(v, [3] * 36, e.question, e.answer)
            self.assertEqual(len(ids), len(labels))
            target = [t for t in labels if t != -100]
            self.assertEqual(target, v.encode(e.answer) + [v.end])     # labels only on the answer
            self.assertEqual(ids[-len(target):], target)
        # several questions about one image: each answer and its <end> labelled, nothing else
        turns = [(["how", "many", "circles", "?"], ["two"]), (["is", "there", "a", "red", "circle", "?"], ["yes"])]
        ids, labels = data.und_sequence(v, [3] * 9, ["describe"], ["top", "left", "red", "circle"], turns)
        self.assertEqual(ids[:2] + ids[11:], [v.und, v.boi, v.eoi] + v.encode(["describe"]) + [v.ans]
                         + v.encode(["top", "left", "red", "circle"]) + [v.end]
                         + v.encode(turns[0][0]) + [v.ans, v.encode(["two"])[0], v.end]
                         + v.encode(turns[1][0]) + [v.ans, v.encode(["yes"])[0], v.end])
        self.assertEqual([t for t in labels if t != -100], v.encode(["top", "left", "red", "circle"]) + [v.end]
                         + v.encode(["two"]) + [v.end] + v.encode(["yes"]) + [v.end])
        self.assertTrue(all(labels[i] == ids[i] for i in range(len(ids)) if labels[i] != -100))
        ids, labels = data.gen_sequence(v, list(range(36)), ["a", "red", "circle"])
        self.assertEqual([t for t in labels if t != -100], [v.n_text + i for i in range(36)] + [v.eoi])
        self.assertTrue(all(v.n_text <= t < v.size for t in labels[-37:-1]))
        with self.assertRaises(ValueError):
            v.encode(["a", "dragon"])
        with self.assertRaises(ValueError):
            data.gen_sequence(v, [64] * 36, ["a", "circle"])          # code outside the codebook
        s = world.sample_scene(rng, "test")
        self.assertEqual(world.parse_caption(world.caption_words(s)), [(o.colour, o.shape, o.cell) for o in s])


if __name__ == "__main__":
    unittest.main()
