"""Kill the pipeline with SIGKILL in the middle of a stage, resume it, and get the same results.

    python -m unittest test_resume
"""
import glob
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import unittest

import torch

import report
import train
from checkpoint import Refused

HERE = os.path.dirname(os.path.abspath(__file__))
TINY = ["--tok_images", "300", "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8",
        "--steps", "40", "--ckpt_every", "5", "--log_every", "5", "--eval_n", "4", "--device", "cpu",
        "--pairs", "12", "--pref_steps", "16", "--pref_ckpt_every", "2", "--pref_batch", "4", "--pref_seeds", "1", "--gen_pairs", "6",
        "--diag_every", "1", "--joint_steps", "2", "--joint_eval_n", "4", "--probe_steps", "2", "--probe_n", "4",
        "--self_prompts", "8", "--self_steps", "2", "--primer", "5", "--und_first", "10", "--warmup", "5",
        "--sft_mix", "0.5", "--sft_weight", "0.5"]   # the remedies' state (the SFT batches' stream) resumes too
# what legitimately differs between two runs: times, paths, the --resume flag and the file digests it changes
VOLATILE = {"seconds", "config", "checkpoint", "digest", "sft_digest", "kv_cache"}


def pipeline(out, extra=(), kill_after=None):
    """Run `python train.py` on the tiny settings; with kill_after, SIGKILL it once that text is in its
    log, or once that file exists (a name ending in .part: a preference run's mid-run checkpoint)."""
    proc = subprocess.Popen([sys.executable, os.path.join(HERE, "train.py"), *TINY, "--out_dir", out, *extra],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_after is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err
        return
    log, t0 = os.path.join(out, "log.txt"), time.time()
    while proc.poll() is None and time.time() - t0 < 600:
        if (os.path.exists(os.path.join(out, kill_after)) if kill_after.endswith(".part")
                else os.path.exists(log) and kill_after in read(log)):
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, f"the run ended ({proc.returncode}) before '{kill_after}'"


def read(path):
    with open(path) as f:
        return f.read()


def results(out):
    def strip(x):
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        return [strip(v) for v in x] if isinstance(x, list) else x
    return {f: strip(json.loads(read(os.path.join(out, f))))
            for f in ("eval_sft.json", "compare.json", "study.json", "probes.json")}


def weights(out):
    return {os.path.basename(p): torch.load(p, weights_only=True)["model"]
            for p in sorted(glob.glob(os.path.join(out, "*.pt")))
            if not os.path.basename(p).startswith(("tokenizer", "pairs_"))}


def pairs(out):
    """Each seed's pair file (pref.preference_data): the pairs and the reference's log-probs."""
    return {os.path.basename(p): torch.load(p, weights_only=True) for p in sorted(glob.glob(os.path.join(out, "pairs_*.pt")))}


class TestKillAndResume(unittest.TestCase):

    def test_the_run_record_knows_every_stage_in_order(self):
        """report.STAGE_OUTPUTS decides what --resume keeps; it must list train.STAGES, in their order."""
        self.assertEqual(list(report.STAGE_OUTPUTS), list(train.STAGES))

    def test_killed_in_sft_or_in_a_preference_stage_then_resumed_gives_the_same_outputs(self):
        with tempfile.TemporaryDirectory() as d:
            ref = os.path.join(d, "ref")
            pipeline(ref)
            want_results, want_weights, want_pairs = results(ref), weights(ref), pairs(ref)
            self.assertEqual(sorted(want_pairs), ["pairs_s0.pt"])
            # mid-SFT; in the preference stage after its pairs; in its mDPO run, once that has a checkpoint
            for k, marker in enumerate(("sft | step 20", "pairs s0 |", "pref_mdpo_s0.pt.part")):
                out = os.path.join(d, f"killed{k}")
                pipeline(out, kill_after=marker)
                self.assertFalse(os.path.exists(os.path.join(out, "report.md")), marker)
                pipeline(out, ["--resume"])
                self.assertIn("resume | stage tokenizer finished before with these settings: kept",
                              read(os.path.join(out, "log.txt")))
                self.assertEqual(results(out), want_results, marker)
                got = weights(out)
                self.assertEqual(sorted(got), sorted(want_weights), marker)
                for name, state in want_weights.items():
                    for k, v in state.items():
                        self.assertTrue(torch.equal(v, got[name][k]), (marker, name, k))
                got = pairs(out)
                self.assertEqual(sorted(got), sorted(want_pairs), marker)
                for name, P in want_pairs.items():
                    self.assertEqual(P["pairs"], got[name]["pairs"], marker)
                    for k in ("ref_0", "ref_1", "scores"):
                        self.assertTrue(torch.equal(P[k], got[name][k]), (marker, name, k))
                self.assertFalse(glob.glob(os.path.join(out, "*.tmp")), marker)
            log = read(os.path.join(out, "log.txt"))
            self.assertIn("resume | pref dpo s0 finished before with these settings: kept", log)
            self.assertRegex(log, r"pref mdpo s0 \| resumed at step \d+")       # the mDPO run continued
            # a finished pipeline resumed with other settings is refused, and nothing is changed
            before = read(os.path.join(out, "run.json"))
            with self.assertRaisesRegex(Refused, r"stage tokenizer ran with other settings \(--beta 0.1 -> 0.2\)"):
                train.main(TINY + ["--out_dir", out, "--resume", "--beta", "0.2"])
            self.assertEqual(read(os.path.join(out, "run.json")), before)

class TestBatchWorker(unittest.TestCase):

    def test_a_worker_process_builds_the_same_batches(self):
        """--workers 1 (a DataLoader process builds SFT batches while the device trains) trains the same
        model, and leaves the data stream where --workers 0 does, so --resume continues either exactly."""
        got = []
        with tempfile.TemporaryDirectory() as d:
            for w in ("0", "1"):
                out = os.path.join(d, w)
                train.main(["--stage", "tokenizer,sft", *TINY[:TINY.index("--pairs")], "--steps", "12",
                            "--workers", w, "--out_dir", out])
                got.append(torch.load(os.path.join(out, "sft.pt"), weights_only=True))
        for name, p in got[0]["model"].items():
            self.assertTrue(torch.equal(p, got[1]["model"][name]), name)
        self.assertEqual(got[0]["rng"]["data"], got[1]["rng"]["data"])


if __name__ == "__main__":
    unittest.main()
