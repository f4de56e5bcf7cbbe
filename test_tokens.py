"""
Tests of the token-count study (tokens.py; stage `tokens` of train.py), CPU, tiny sizes.
Run: python -m unittest test_tokens   (or: pytest test_tokens.py)
"""
import os
import random
import shlex
import shutil
import tempfile
import unittest

import numpy as np

import data
import joint
import pairgrads
import report
import tokens
import train
import world
from checkpoint import Refused


class TestFit(unittest.TestCase):

    def test_the_exponent_of_an_exact_power_law(self):
        # rho = 2 n^-0.5 for seed 0, 3 n^-0.7 for seed 1: pooled and per-seed exponents, the extrapolation
        recs = [{"tokens": n, "sft_seed": s, "rho": c * n ** -a} for s, c, a in ((0, 2.0, 0.5), (1, 3.0, 0.7))
                for n in (9, 36, 64)]
        f = tokens.fit(recs)
        self.assertAlmostEqual(f["per_seed"][0], 0.5)
        self.assertAlmostEqual(f["per_seed"][1], 0.7)
        self.assertTrue(0.5 < f["a"] < 0.7)
        only0 = tokens.fit(recs[:3])
        self.assertAlmostEqual(only0["at"][576], 2.0 * 576 ** -0.5)
        self.assertIsNone(tokens.fit([r for r in recs if r["tokens"] == 9]))   # one token count: no fit

    def test_the_vq_vae_worlds_are_fitted_apart_from_the_patch_world(self):
        # the VQ-VAE worlds follow rho = 2 n^-0.5 exactly; the patch world at 9 tokens lies far above it
        # and rho = 5 c^-1 in the tokens a pair changes, c, at every world
        recs = [{"tokens": n, "tokenizer": f"VQ-VAE f{f}", "sft_seed": 0, "rho": 2.0 * n ** -0.5,
                 "rho_step1": 3.0 * n ** -0.25, "changed": 2.5 * n ** 0.5} for n, f in ((16, 6), (36, 4), (64, 3))]
        recs.append({"tokens": 9, "tokenizer": "patch", "sft_seed": 0, "rho": 10.0, "rho_step1": 10.0, "changed": 0.5})
        f = tokens.fits(recs)
        self.assertAlmostEqual(f["rho, VQ-VAE worlds"]["a"], 0.5)
        self.assertAlmostEqual(f["rho_step1, VQ-VAE worlds"]["a"], 0.25)
        self.assertGreater(f["rho"]["a"], 0.6)        # the patch world pulls the pooled fit
        self.assertAlmostEqual(f["rho by tokens a pair changes"]["a"], 1.0)
        self.assertAlmostEqual(f["rho by tokens a pair changes"]["at"][576], 5.0 / 576)

    def test_a_dose_changes_exactly_that_many_objects_of_the_same_scene(self):
        rng = random.Random(0)
        scene = data.gen_example(random.Random(3), "train", "full").scene
        while len(scene) < 3:
            scene = data.gen_example(rng, "train", "full").scene
        for k in (1, 2, 3):
            for _ in range(20):
                alt = pairgrads.altered_k(rng, scene, k)
                self.assertEqual(sum(a != b for a, b in zip(scene, alt)), k)
                self.assertEqual(len(alt), len(scene))
                self.assertTrue(all(o.kind not in data.HELD_OUT for o in alt))
                self.assertEqual(len({o.cell for o in alt}), len(alt))       # no two objects on one cell
        self.assertIsNone(pairgrads.altered_k(rng, scene[:1], 2))                 # one object cannot take two changes

    def test_the_doses_share_their_prompts_and_each_fits_the_prompt_worse(self):
        made = pairgrads.dose_scenes(12, 0)
        self.assertEqual(len(made), 12)
        self.assertEqual([e.question for e, _ in made], [e.question for e, _ in pairgrads.dose_scenes(12, 0)])
        for e, alts in made:
            self.assertGreaterEqual(len(e.scene), max(pairgrads.DOSES))
            self.assertEqual(sorted(alts), list(pairgrads.DOSES))
            for k, (alt, score) in alts.items():
                self.assertEqual(sum(a != b for a, b in zip(e.scene, alt)), k)
                self.assertLess(score, 1.0)
                self.assertAlmostEqual(score, world.prompt_score(e, world.parse(world.render(alt))))

    def test_token_counts_of_the_factors(self):
        self.assertEqual([tokens.tokens_per_image(f) for f in tokens.factors("patch,8,6,4,3,2")], [9, 9, 16, 36, 64, 144])
        for bad in ("5", "", "3,x", "1", "vq"):
            with self.assertRaisesRegex(Refused, "--token_fs"):
                tokens.factors(bad)


class TestStudy(unittest.TestCase):

    def test_two_token_counts_end_to_end_then_resume_keeps_them(self):
        with tempfile.TemporaryDirectory() as d:
            argv = ["--stage", "tokens", "--token_fs", "patch,4", "--steps", "3", "--vq_steps", "20", "--out_dir", d,
                    "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--log_every", "1",
                    "--eval_n", "4", "--device", "cpu", "--pairs", "12", "--pref_batch", "4", "--gen_pairs", "6",
                    "--diag_every", "1", "--joint_steps", "2", "--joint_eval_n", "4"]
            train.main(argv)
            out = report.read_json(os.path.join(d, "tokens.json"))
            self.assertEqual([m["tokens"] for m in out["models"]], [9, 36])
            # the patch tokenizer is lossless: a world pair changes one cell's token, or more, and pulls
            self.assertGreaterEqual(out["models"][0]["changed"], 1)
            pg = report.read_json(os.path.join(d, "tokens", "t9", "sft0", "pairgrads.json"))
            self.assertEqual(len(pg["norm"]), pairgrads.PAIR_GRADS)
            self.assertTrue(min(pg["changed"]) >= 1 and min(pg["norm"]) > 0)
            # the dose test: each changed object changes its own cell's token, at least
            dose = report.read_json(os.path.join(d, "tokens", "t9", "sft0", "dose.json"))
            self.assertEqual((dose["doses"], dose["pairs"]), (list(pairgrads.DOSES), pairgrads.DOSE_BATCHES * 4))
            for k, c, g in zip(dose["doses"], dose["changed"], dose["g_gen"]):
                self.assertTrue(c >= k and g > 0)
            for m in out["models"]:
                self.assertEqual(len(m["dose_rho"]), len(pairgrads.DOSES))
                self.assertTrue(all(np.isfinite(x) and x > 0 for x in m["dose_rho"]))
            for m in out["models"]:
                self.assertTrue(np.isfinite(m["rho"]) and m["rho"] > 0)
                self.assertTrue(-1 <= m["cos"] <= 1)
            self.assertIsNotNone(out["fits"]["rho"])
            with open(os.path.join(d, "tokens.md")) as f:
                text = f.read()
            self.assertIn("| 9 | patch | 1 |", text)
            self.assertIn("| 36 | VQ-VAE f4 | 1 |", text)
            self.assertIn("The dose test", text)
            for table in text.split("\n\n"):      # a delimiter row as wide as its header, or no table renders
                rows = [line.count("|") for line in table.splitlines() if line.startswith("|")]
                self.assertEqual(len(set(rows)), min(len(rows), 1), table)
            # one VQ-VAE world: no fit over the VQ-VAE worlds alone
            self.assertIsNone(out["fits"]["rho, VQ-VAE worlds"])
            # each model in its own directory, with its tokenizer's world
            study = report.read_json(os.path.join(d, "tokens", "t36", "sft0", "study.json"))
            self.assertEqual((study["config"]["vq_f"], study["config"]["n_codes"]), (4, 256))
            self.assertTrue({joint.LABELS[r] for r in tokens.WORLD_ROWS} <= set(study["rows"]))
            nine = report.read_json(os.path.join(d, "tokens", "t9", "sft0", "study.json"))["config"]
            self.assertEqual((nine["tokenizer"], nine["patch"], nine["n_codes"]), ("patch", 8, 512))
            # --resume keeps every finished stage: nothing is trained again
            finished = {n: report.read_json(os.path.join(d, "tokens", n, "sft0", "run.json")) for n in ("t9", "t36")}
            train.main(argv + ["--resume"])
            for n, run in finished.items():
                self.assertEqual(report.read_json(os.path.join(d, "tokens", n, "sft0", "run.json")), run)
            with open(os.path.join(d, "tokens.md")) as f:        # headed by the command that made the table
                self.assertIn(f"`{shlex.join(['python', 'train.py', *argv, '--resume'])}` | device", f.read())
            # a study moved to another directory resumes there: nothing is trained again
            moved = os.path.join(d, "moved")
            shutil.copytree(os.path.join(d, "tokens"), os.path.join(moved, "tokens"))
            train.main([*argv[:argv.index("--out_dir")], "--out_dir", moved, *argv[argv.index("--out_dir") + 2:], "--resume"])
            for n, run in finished.items():
                self.assertEqual(report.read_json(os.path.join(moved, "tokens", n, "sft0", "run.json")), run)
            self.assertEqual(report.read_json(os.path.join(moved, "tokens.json"))["models"][1]["rho"], out["models"][1]["rho"])
            # other settings are refused, not mixed into the study
            with self.assertRaisesRegex(Refused, "ran with other settings"):
                train.main(argv + ["--resume", "--beta", "0.2"])


if __name__ == "__main__":
    unittest.main()
