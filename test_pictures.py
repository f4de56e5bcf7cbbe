"""
Tests of the pictures (pictures.py): round ticks, word wrapping, what the judges' marks say, and that
every picture is written at README width from small fake inputs.
Run: python -m unittest test_pictures   (or: pytest test_pictures.py)
"""
import math
import os
import random
import tempfile
import unittest

import numpy as np
from PIL import Image

import data
import pictures
import world
from world import Obj


def near(img, colour, tol=40):
    """How many pixels of the picture are within `tol` of `colour` (anti-aliased text is rarely exact)."""
    a = np.asarray(img.convert("RGB"), dtype=int)
    return int((np.abs(a - np.array(colour)).sum(-1) < tol).sum())


class TestTicks(unittest.TestCase):

    def assertRound(self, ticks, lo, hi):
        step = ticks[1] - ticks[0]
        mantissa = step / 10 ** math.floor(math.log10(step) + 1e-9)
        self.assertTrue(any(abs(mantissa - m) < 1e-6 for m in (1, 2, 5)), (ticks, mantissa))
        for t in ticks:
            self.assertAlmostEqual(t / step, round(t / step), places=6)
        self.assertLessEqual(ticks[0], lo + 1e-6 * step)
        self.assertGreaterEqual(ticks[-1], hi - 1e-6 * step)
        self.assertTrue(3 <= len(ticks) <= 10, ticks)

    def test_round_ticks_over_ranges(self):
        for lo, hi in ((1, 200), (-18.2, -0.375), (-51.6, -10.4), (0.495, 0.695), (0, 0.121), (0, 1),
                       (1e-7, 3e-7), (-3e-9, 4e-7), (123456, 987654)):
            self.assertRound(pictures.nice_ticks(lo, hi), lo, hi)

    def test_a_curve_starting_a_hair_below_zero_starts_at_zero(self):
        ticks = pictures.nice_ticks(-4.77e-08, 2.16)
        self.assertEqual(ticks, [0, 0.5, 1, 1.5, 2, 2.5])
        self.assertEqual([pictures.tick_label(v, ticks) for v in ticks], ["0", "0.5", "1", "1.5", "2", "2.5"])

    def test_labels_have_no_exponent_and_no_negative_zero(self):
        for lo, hi in ((1e-7, 3e-7), (-3e-9, 4e-7), (-0.004, 0.0), (0.0, 0.0), (-5, 5)):
            ticks = pictures.nice_ticks(lo, hi)
            labels = [pictures.tick_label(v, ticks) for v in ticks]
            self.assertFalse([s for s in labels if "e" in s or s == "-0"], labels)
            self.assertEqual(len(set(labels)), len(labels), labels)       # distinct ticks, distinct labels
        self.assertEqual(pictures.tick_label(0.45, [0.45, 0.5]), "0.45")

    def test_a_flat_line_gets_a_range(self):
        ticks = pictures.nice_ticks(0.693, 0.693)
        self.assertLess(ticks[0], 0.693)
        self.assertGreater(ticks[-1], 0.693)


class TestWrap(unittest.TestCase):

    def test_words_are_never_split_and_lines_fit(self):
        text = ("top left orange triangle , top center orange circle , middle center blue triangle , "
                "bottom left yellow diamond , bottom center red circle , supercalifragilisticexpialidocious")
        for width in (60, 120, 290, 800):
            lines = pictures.wrap(text, width)
            self.assertEqual(" ".join(lines).split(), text.split())
            for line in lines:
                self.assertTrue(pictures.text_width(line) <= width or " " not in line, (width, line))
            self.assertEqual(len(pictures.wrap(text, 10_000)), 1)
        self.assertIn("supercalifragilisticexpialidocious", pictures.wrap(text, 60))   # alone on its line

    def test_paragraphs_start_on_new_lines(self):
        placed, n = pictures.layout([[("a b", pictures.INK)], [("c", pictures.RED)]], 500)
        self.assertEqual(n, 2)
        self.assertEqual([(line, w, c) for _, line, w, c in placed],
                         [(0, "a", pictures.INK), (0, "b", pictures.INK), (1, "c", pictures.RED)])


class TestMarks(unittest.TestCase):

    def test_clause_verdicts(self):
        scene = (Obj("red", "circle", 0), Obj("blue", "square", 4))
        words = ("top left red circle , top right blue square , bottom left green cross , "
                 "middle right red nothing").split()
        self.assertEqual([v for _, v in pictures.clause_verdicts(scene, words)],
                         ["right", "wrong cell", "hallucinated", "unparseable"])
        self.assertEqual(pictures.missing_kinds(scene, "top left red circle".split()), [("blue", "square")])
        paras = pictures.caption_text(scene, words, "mDPO")
        self.assertIn(("middle right red nothing", pictures.PURPLE), paras[0])              # in the caption
        self.assertIn([("unparseable: middle right red nothing", pictures.PURPLE)], paras)  # and said below it
        self.assertIn([("hallucinated: green cross", pictures.RED)], paras)
        self.assertIn([("wrong cell: blue square (it is at middle center)", pictures.ORANGE)], paras)

    def test_one_phrase_per_check_and_faults_exactly_when_wrong(self):
        rng = random.Random(0)
        for task in data.GEN_TASKS:
            for _ in range(30):
                ex = data.gen_example(rng, "test", task)
                for scene in (ex.scene, world.sample_scene(rng, "test"), ex.scene[:1], ()):
                    parsed = world.parse(world.render(scene))
                    self.assertEqual(len(pictures.check_phrases(ex, parsed)), len(world.prompt_checks(ex, parsed)))
                    self.assertEqual(pictures.drawing_faults(ex, parsed) == [], world.geneval_correct(ex, parsed))

    def test_what_the_judge_says(self):
        below = data.Example("position", (), "a circle below a diamond".split(), [])
        two_diamonds = (Obj("purple", "diamond", 1), Obj("purple", "diamond", 7))
        self.assertEqual(pictures.drawing_faults(below, two_diamonds), ["no circle"])   # not the relation too
        five = data.Example("counting", (), "five yellow triangles".split(), [])
        three = tuple(Obj("yellow", "triangle", c) for c in (0, 2, 4))
        self.assertEqual(pictures.drawing_faults(five, three), ["drew 3 yellow triangles, prompt says five"])
        full = data.Example("full", (), "top left red circle , middle center blue square".split(), [])
        drawn = (Obj("red", "square", 0), Obj("green", "cross", 8))
        self.assertEqual(pictures.drawing_faults(full, drawn),
                         ["at top left: drew red square, prompt says red circle", "missing: middle center blue square",
                          "extra: top left red square, bottom right green cross"])


class TestPictures(unittest.TestCase):

    def setUp(self):
        self.dir = tempfile.TemporaryDirectory()
        self.addCleanup(self.dir.cleanup)

    def path(self, name):
        return os.path.join(self.dir.name, name)

    def assertPicture(self, path, max_height):
        with Image.open(path) as im:
            self.assertEqual(im.width, pictures.WIDTH)
            self.assertTrue(100 < im.height <= max_height, im.size)
            return im.convert("RGB")

    def test_eval_picture(self):
        rng = random.Random(1)
        exs = [data.und_example(rng, world.sample_scene(rng, split), "caption") for split in ("test", "bias")]
        caps = [(exs[0], exs[0].answer), (exs[1], exs[1].answer + ", bottom right green cross".split())]
        drawings = [(ex, world.render(ex.scene if k % 2 else world.sample_scene(rng, "test")))
                    for k, ex in enumerate(data.gen_example(rng, "test", t) for t in data.GEN_TASKS for _ in range(2))]
        pictures.eval_picture(self.path("eval.png"), [("test", caps[:1]), ("bias", caps[1:])], drawings)
        im = self.assertPicture(self.path("eval.png"), 1600)
        self.assertGreater(near(im, pictures.RED), 0)       # the hallucinated clause, the wrong drawings
        self.assertGreater(near(im, pictures.GREEN), 0)     # the right drawings

    def test_compare_picture_marks_an_unparseable_clause(self):
        rng = random.Random(2)
        scenes = [world.sample_scene(rng, "bias") for _ in range(6)]
        sft = [(s, world.caption_words(s)) for s in scenes]
        pictures.compare_picture(self.path("plain.png"), sft, sft)
        bad = [(s, w + ", middle right red nothing".split()) for s, w in sft[:1]] + sft[1:]
        pictures.compare_picture(self.path("bad.png"), sft, bad)
        plain, marked = self.assertPicture(self.path("plain.png"), 700), self.assertPicture(self.path("bad.png"), 700)
        self.assertGreater(near(marked, pictures.PURPLE, 30), near(plain, pictures.PURPLE, 30) + 20)

    def test_curves(self):
        steps = range(1, 51)
        run = [{"step": s, "logps/chosen": -s / 10, "logps/rejected": -s / 5, "rewards/margins": s / 100 - 4.77e-8}
               for s in steps]
        joint = {"gen DPO": [{"gen": [{"step": s, "dpo_loss": math.log(2) - s / 1000} for s in steps]}]}
        pictures.curves(self.path("curves.png"), {"dpo": [run], "mdpo": [run], "dama": [run]}, joint)
        self.assertPicture(self.path("curves.png"), 700)
        pictures.curves(self.path("three.png"), {"dpo": [run]}, {})     # no joint study: three panels
        self.assertPicture(self.path("three.png"), 700)

    def test_headline_is_deterministic_and_says_what_the_whiskers_are(self):
        def row(chair, cover):
            return {"test": {}, "bias": {"CHAIR_i": chair, "Cover": cover}}
        units = {"sft": [[row(0.12, 0.99)], [row(0.09, 0.99)]],
                 "dpo": [[row(0.03, 0.6), row(0.02, 0.7)], [row(0.01, 0.6)]],
                 "dpo + NLL (sft_weight 1)": [[row(0.0, 0.98)], [row(0.0, 0.97)]]}
        for name in ("a.png", "b.png"):
            pictures.headline(self.path(name), units, "whiskers: lowest to highest of the 2 SFT models' own means")
        self.assertPicture(self.path("a.png"), 500)
        with open(self.path("a.png"), "rb") as a, open(self.path("b.png"), "rb") as b:
            self.assertEqual(a.read(), b.read())


if __name__ == "__main__":
    unittest.main()
