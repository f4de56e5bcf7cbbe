"""
The one-GPU script (gpu_run.sh) at tiny sizes on the CPU: every step runs and exits 0, and DEST holds
what the script promises.
Run: python -m unittest test_gpu_run   (or: pytest test_gpu_run.py)
"""
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import unittest

HERE = os.path.dirname(os.path.abspath(__file__))


@unittest.skipIf(shutil.which("bash") is None or shutil.which("timeout") is None, "needs bash and coreutils' timeout")
class TestGPURun(unittest.TestCase):

    def test_the_script_runs_every_step_and_brings_back_its_outputs(self):
        with tempfile.TemporaryDirectory() as dest:
            run = subprocess.run(["bash", os.path.join(HERE, "gpu_run.sh"), dest], env={**os.environ, "TINY": "1"},
                                 capture_output=True, text=True, timeout=900)
            self.assertEqual(run.returncode, 0, run.stderr[-2000:])
            with open(os.path.join(dest, "timeline.txt")) as f:
                timeline = f.read().splitlines()
            steps = {line.split(" | ")[0]: line.split(" | ")[1] for line in timeline}
            self.assertEqual(steps, {"bench": "exit 0", "full": "exit 0", "ddp_1": "exit 0", "vq64": "exit 0",
                                     "gpu_run": f"done in {timeline[-1].split('done in ')[1].split(' s')[0]} s"})
            for name in ("env.txt", "bench.txt", "full_report.md", "full_log.txt", "vq64_log.txt"):
                self.assertGreater(os.path.getsize(os.path.join(dest, name)), 0, name)
            with open(os.path.join(dest, "bench.json")) as f:
                self.assertTrue(json.load(f))
            with open(os.path.join(dest, "vq64_log.txt")) as f:
                self.assertIn("VQ-VAE, 64 tokens an image", f.read())
            with tarfile.open(os.path.join(dest, "results.tar.gz")) as t:
                names = t.getnames()
            self.assertIn("./full/report.md", names)
            self.assertIn("./vq64/sft_curve.json", names)
            self.assertFalse([n for n in names if n.endswith(".pt")])     # checkpoints stay behind
            self.assertLessEqual(len(os.listdir(dest)), 8)                  # what one device call brings back


if __name__ == "__main__":
    unittest.main()
