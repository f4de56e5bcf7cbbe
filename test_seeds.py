"""
Tests of the findings over several SFT models (seeds.py) and of the alignment-tax sweep (tax.py).
Run: python -m unittest test_seeds   (or: pytest test_seeds.py)
"""
import json
import os
import tempfile
import unittest
from unittest import mock

import pref
import seeds
import tax
import train
from checkpoint import Refused

TINY = ["--tok_images", "300", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8",
        "--steps", "12", "--log_every", "5", "--eval_n", "4", "--device", "cpu", "--pairs", "8", "--pref_steps", "2",
        "--pref_batch", "4", "--pref_seeds", "1", "--primer", "3", "--und_first", "6", "--warmup", "2"]


def row(chair, cover, acc):
    return {"test": {"answer_acc": acc}, "bias": {"CHAIR_i": chair, "Cover": cover}}


def comparison(sft=(0.20, 1.0, 0.99), **methods):
    """compare.json rows of one SFT model: every method at the given (CHAIR_i, Cover, answer_acc), two seeds."""
    base = dict(dpo=(0.02, 0.3, 0.93), mdpo=(0.0, 0.99, 0.98), dama=(0.01, 0.2, 0.92), dpo_noimage=(0.1, 0.8, 0.95),
                mdpo_nocond=(0.0, 0.99, 0.97), mdpo_noanchor=(0.01, 0.5, 0.9))
    base.update(zip([label for label, _, _ in pref.REMEDY_ROWS.values()], [(0.0, 0.97, 0.95), (0.0, 0.9, 0.985)]))
    base.update(methods)
    return {"sft": [row(*sft)], **{m: [row(*v), row(*v)] for m, v in base.items()}}


class TestClaims(unittest.TestCase):

    def test_each_finding_is_checked_on_each_sft_model(self):
        # model 2: mDPO loses Cover, and its tax is 0.05
        checked = dict(seeds.check_claims([{"compare": comparison()},
                                           {"compare": comparison(mdpo=(0.0, 0.6, 0.94))}]))
        self.assertEqual([h for h, _ in checked["DPO lowers bias CHAIR_i by at least half"]], [True, True])
        self.assertEqual(checked["DPO lowers bias CHAIR_i by at least half"][0][1], "0.200 -> 0.020")
        self.assertEqual([h for h, _ in checked["mDPO lowers bias CHAIR_i by at least half and keeps Cover >= 0.95"]],
                         [True, False])
        self.assertEqual([h for h, _ in checked["the tax: mDPO's test answer accuracy stays within 0.02 of SFT's"]],
                         [True, False])
        # the findings of stages that did not run are left out
        self.assertFalse([c for c in checked if "generation" in c])
        table = seeds.claims_table(list(checked.items()))
        self.assertIn("| mDPO pays less tax than DPO and DAMA | 2 of 2 |", table)
        self.assertIn("| 1 of 2 | CHAIR_i 0.000, Cover 0.990; **not**: CHAIR_i 0.000, Cover 0.600 |", table)

    def test_the_mean_over_preference_seeds_decides(self):
        r = comparison()
        r["dpo"] = [row(0.0, 0.3, 0.9), row(0.3, 0.3, 0.9)]      # mean 0.15 > 0.20 / 2
        checked = dict(seeds.check_claims([{"compare": r}]))
        self.assertEqual(checked["DPO lowers bias CHAIR_i by at least half"], [(False, "0.200 -> 0.150")])


class TestTax(unittest.TestCase):

    def test_the_bar(self):
        sft = row(0.2, 1.0, 0.99)
        self.assertTrue(tax.meets_bar(row(0.1, 0.9, 0.97), sft, 0.02))    # half, and exactly 0.02 lost
        self.assertFalse(tax.meets_bar(row(0.1, 0.9, 0.96), sft, 0.02))   # the tax is too high
        self.assertFalse(tax.meets_bar(row(0.11, 0.9, 0.99), sft, 0.02))  # not halved

    def test_the_sweep_runs_every_setting_and_method(self):
        with tempfile.TemporaryDirectory() as d:
            train.main(TINY + ["--out_dir", d, "--stage", "tokenizer,sft"])
            grid = [("plain", "plain", {}), ("sft_weight_1", "sft_weight 1", {"sft_weight": 1.0})]
            with mock.patch.object(tax, "GRID", grid), mock.patch.object(tax, "METHODS", ("dpo", "mdpo")):
                train.main(TINY + ["--out_dir", d, "--stage", "tax"])
                with open(os.path.join(d, "tax.json")) as f:
                    runs = json.load(f)["runs"]
                self.assertEqual([(r["setting"], r["method"]) for r in runs],
                                 [("plain", "dpo"), ("plain", "mdpo"), ("sft_weight 1", "dpo"), ("sft_weight 1", "mdpo")])
                self.assertEqual([r["settings"]["sft_weight"] for r in runs], [0.0, 0.0, 1.0, 1.0])
                with open(os.path.join(d, "tax.md")) as f:
                    md = f.read()
                self.assertIn("| mdpo | sft_weight 1 |", md)
                self.assertIn("meets the bar |", md)
                self.assertFalse([f for f in os.listdir(d) if f.startswith("pref_")])   # no checkpoint is left behind
                # resumed: every run is kept, none is trained again
                with open(os.path.join(d, "log.txt")) as f:
                    n_before = f.read().count("tax | ")
                train.main(TINY + ["--out_dir", d, "--stage", "tax", "--resume"])
                with open(os.path.join(d, "log.txt")) as f:
                    self.assertEqual(f.read().count("tax | "), n_before)


class TestSeveralSftModels(unittest.TestCase):

    def test_two_sft_models_each_in_its_own_directory_and_one_report(self):
        with tempfile.TemporaryDirectory() as d:
            train.main(TINY + ["--out_dir", d, "--sft_seeds", "2", "--stage", "tokenizer,sft,eval,pref"])
            for k in (0, 1):
                with open(os.path.join(d, f"sft{k}", "run.json")) as f:
                    self.assertEqual(json.load(f)["stages"]["sft"]["seed"], k)
            with open(os.path.join(d, "report.md")) as f:
                md = f.read()
            self.assertIn("2 SFT models (seeds 0, 1)", md)
            self.assertIn("| DPO lowers bias CHAIR_i by at least half |", md)
            self.assertIn("## Preference optimisation for understanding", md)
            self.assertNotIn("## Does understanding inform generation?", md)     # the probe stage did not run
            self.assertIn("(headline.png)", md)
            self.assertTrue(os.path.exists(os.path.join(d, "headline.png")))
            with open(os.path.join(d, "report.json")) as f:
                rep = json.load(f)
            pooled = seeds.pool(rep["inputs"]["per_model"])
            self.assertEqual(len(pooled["compare"]["dpo"]), 2)                   # 2 SFT models x 1 preference seed
            self.assertEqual(len(pooled["compare"]["sft"]), 2)
            self.assertEqual(seeds.render(rep["inputs"]), md)                    # report.json alone rebuilds it
            # --stage report rebuilds it from the two directories, byte for byte
            train.main(TINY + ["--out_dir", d, "--sft_seeds", "2", "--stage", "report"])
            with open(os.path.join(d, "report.md")) as f:
                self.assertEqual(f.read(), md)
            # a result from another SFT model is refused
            other = os.path.join(d, "sft1", "compare.json")
            with open(other) as f:
                res = json.load(f)
            res["sft_digest"] = "0" * 12
            with open(other, "w") as f:
                json.dump(res, f)
            with self.assertRaisesRegex(Refused, "sft1/compare.json was made from another SFT model"):
                seeds.write(d, 2)
            # a stage that did not finish on every model: the report says from which, the findings count those
            os.remove(other)
            md = seeds.write(d, 2)
            self.assertIn("From 1 of the 2 SFT models (sft0): the stage did not finish on the others.", md)
            self.assertRegex(md, r"\| DPO lowers bias CHAIR_i by at least half \| [01] of 1 \|")

    def test_bad_stage_lists_and_weights_are_refused(self):
        for argv, msg in ((["--stage", "sft,evil"], "unknown stage 'evil'"),
                          (["--sft_weight", "-1"], "--sft_weight, --sft_mix, --tax_bar >= 0"),
                          (["--sft_seeds", "0"], "--sft_seeds must be >= 1")):
            with self.assertRaises(SystemExit), mock.patch("sys.stderr") as err:
                train.main(TINY + argv)
            self.assertIn(msg, "".join(c.args[0] for c in err.write.call_args_list), argv)


class TestResultsFile(unittest.TestCase):
    """RESULTS.md is a run's report verbatim; RESULTS.json is that run's report.json. The report is
    rebuilt from the JSON alone, so the two files, and the code that writes reports, stay in step."""

    def test_results_md_holds_the_report_rebuilt_from_results_json(self):
        here = os.path.dirname(os.path.abspath(__file__))
        with open(os.path.join(here, "RESULTS.json")) as f:
            rep = json.load(f)
        with open(os.path.join(here, "RESULTS.md")) as f:
            md = f.read()
        self.assertTrue(seeds.render(rep["inputs"]) in md, "RESULTS.md no longer holds the report rebuilt from "
                        "RESULTS.json: rebuild it with `python train.py --sft_seeds 3 --stage report` on the run")
        self.assertIn(f"at commit {', '.join(rep['inputs']['commits'])}", md.splitlines()[2])
        # each finding's "k of N" in the file is the one recomputed from the runs' numbers
        for c in rep["findings"]:
            self.assertIn(f"| {c['claim']} | {sum(c['holds'])} of {len(c['holds'])} |", md)


if __name__ == "__main__":
    unittest.main()
