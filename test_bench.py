"""
Tests of bench.py: every unit runs and reports sane numbers, and bad input is refused in one line.
No test compares a time with a threshold: times depend on the machine and on what else it runs.

    python -m unittest test_bench        (or: pytest test_bench.py)
"""
import contextlib
import io
import json
import math
import os
import subprocess
import sys
import tempfile
import unittest

import torch

import bench

HERE = os.path.dirname(os.path.abspath(__file__))
CPU = ["--tiny", "--device", "cpu"]


class TestBench(unittest.TestCase):

    def test_every_unit_reports_positive_times_and_sane_utilisation(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "bench.json")
            with contextlib.redirect_stdout(io.StringIO()) as out:
                bench.main(CPU + ["--json", path])
            with open(path) as f:
                res = json.load(f)
        self.assertEqual(list(res["units"]), list(bench.UNITS))           # every unit, in the table's order
        self.assertGreater(res["peak_flops"], 0)
        self.assertGreater(res["params"], 0)
        for slug, r in res["units"].items():
            for k in ("ms_median", "ms_min"):
                self.assertTrue(math.isfinite(r[k]) and r[k] > 0, (slug, k, r[k]))
            self.assertLessEqual(r["ms_min"], r["ms_median"], slug)
            self.assertGreaterEqual(r["calls"], 3, slug)
            if r["utilisation"] is not None:
                self.assertTrue(math.isfinite(r["utilisation"]) and r["utilisation"] >= 0, (slug, r["utilisation"]))
            self.assertIn(r["unit"], out.getvalue())                       # a row was printed for it
        # the model's units count their FLOPs and tokens (a broken model.WORK count would show '-')
        for slug in ("sft", "pref", "decode"):
            self.assertGreater(res["units"][slug]["utilisation"], 0, slug)
            self.assertGreater(res["units"][slug]["tokens_per_s"], 0, slug)
        self.assertGreater(res["checkpoint_mb"], 0)
        self.assertGreater(bench.peak_flops("cpu", torch.float32, n=64, seconds=0.01), 0)   # what train may call

    def test_units_selects_a_subset(self):
        with contextlib.redirect_stdout(io.StringIO()):
            res = bench.main(CPU + ["--units", "load,sft"])
        self.assertEqual(set(res["units"]), {"sft", "load"})

    def test_bad_input_is_refused_with_status_2(self):
        for argv in (["--units", "sft,nope"], ["--seconds", "0"], ["--peak_n", "-1"], ["--no_such_flag"]):
            err = io.StringIO()
            with self.subTest(argv=argv), contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                bench.main(CPU + argv)
            self.assertEqual(cm.exception.code, 2, argv)
            self.assertIn("error:", err.getvalue())
            self.assertIn(argv[0], err.getvalue())                         # it names what was wrong

    @unittest.skipIf(torch.cuda.is_available(), "this machine has CUDA")
    def test_cuda_without_cuda_is_one_line_and_status_2(self):
        p = subprocess.run([sys.executable, os.path.join(HERE, "bench.py"), "--tiny", "--device", "cuda"],
                           capture_output=True, text=True, timeout=120)
        self.assertEqual(p.returncode, 2, p.stderr)
        self.assertEqual(len(p.stderr.strip().splitlines()), 1, p.stderr)
        self.assertIn("CUDA", p.stderr)
        self.assertEqual(p.stdout, "")


if __name__ == "__main__":
    unittest.main()
