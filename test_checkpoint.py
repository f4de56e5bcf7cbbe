"""Checkpoints that cannot run code, and clear one-line errors on bad input.

    python -m unittest test_checkpoint
"""
import os
import re
import subprocess
import sys
import tempfile
import unittest
from dataclasses import asdict

import torch

import checkpoint
import data
import joint
import pref
import train
import world
from model import PatchTokenizer
from test_model import renders, tiny_model

HERE = os.path.dirname(os.path.abspath(__file__))


class OpensAFile:
    """A pickle payload: unpickling it calls open(path, 'w'), creating the file."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def save_tiny(path):
    """A small but genuine checkpoint, as train.py writes one."""
    vocab = data.Vocab(16)
    tok = PatchTokenizer(16, 8, world.CANVAS)
    tok.fit(renders("train", 50)[1])
    model = tiny_model(vocab)
    model.cfg.code_dim = tok.codebook.size(1)
    torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "n_codes": 16, "patch": 8,
                "tokenizer": tok.state_dict(), "step": 1, "config": {"seed": 0}}, path)


class TestSafeCheckpoints(unittest.TestCase):

    def test_a_pickle_that_would_run_code_is_refused_and_nothing_runs(self):
        with tempfile.TemporaryDirectory() as d:
            marker, evil = os.path.join(d, "ran"), os.path.join(d, "sft.pt")
            torch.save({"model": OpensAFile(marker), "model_config": {}, "n_codes": 8, "patch": 8,
                        "tokenizer": {}}, evil)
            self.assertFalse(os.path.exists(marker))
            with self.assertRaisesRegex(checkpoint.Refused, "sft.pt is refused: .*would run code"):
                checkpoint.load_model(evil, "cpu")
            self.assertFalse(os.path.exists(marker), "unpickling ran the payload")
            # the command line: exit status 2, one line on stderr, no traceback, and still nothing ran
            for cmd in (["eval.py", "--ckpt", evil], ["train.py", "--stage", "pref", "--out_dir", d]):
                proc = subprocess.run([sys.executable, os.path.join(HERE, cmd[0])] + cmd[1:], cwd=d,
                                      capture_output=True, text=True, timeout=300)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertNotIn("Traceback", proc.stderr)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertIn("sft.pt is refused", proc.stderr)
                self.assertFalse(os.path.exists(marker), cmd)
            self.assertEqual(sorted(os.listdir(d)), ["sft.pt"])   # no output was written

    def test_a_genuine_checkpoint_loads_with_weights_only(self):
        with tempfile.TemporaryDirectory() as d:
            path = os.path.join(d, "sft.pt")
            save_tiny(path)
            model, tok, vocab, ck = checkpoint.load_model(path, "cpu")
            self.assertEqual(vocab.n_codes, 16)
            self.assertEqual(ck["step"], 1)


class TestBadInput(unittest.TestCase):
    """Each bad input: a Refused (exit status 2 at the command line) naming the file and the problem."""

    def assertRefused(self, path, pattern):
        with self.assertRaises(checkpoint.Refused) as cm:
            checkpoint.load_model(path, "cpu")
        message = str(cm.exception)
        self.assertIn(path, message)
        self.assertRegex(message, pattern)
        self.assertEqual(len(message.splitlines()), 1, message)

    def test_bad_checkpoints(self):
        with tempfile.TemporaryDirectory() as d:
            good = os.path.join(d, "good.pt")
            save_tiny(good)
            with open(good, "rb") as f:
                blob = f.read()
            cases = {"empty.pt": (b"", "is empty"),
                     "truncated.pt": (blob[: len(blob) // 2], "not a readable checkpoint"),
                     "text.pt": (b"not a checkpoint at all\n", "not a readable checkpoint")}
            for name, (content, pattern) in cases.items():
                path = os.path.join(d, name)
                with open(path, "wb") as f:
                    f.write(content)
                self.assertRefused(path, pattern)
            foreign = os.path.join(d, "foreign.pt")
            torch.save([1, 2, 3], foreign)                                  # loads, but is not ours
            self.assertRefused(foreign, "not a unipref checkpoint: it lacks model")
            ck = torch.load(good, weights_only=True)
            other = os.path.join(d, "other_vocab.pt")
            torch.save({**ck, "model_config": {**ck["model_config"], "vocab_size": 3}}, other)
            self.assertRefused(other, "vocabulary of 3 tokens")
            wider = os.path.join(d, "other_preset.pt")                       # weights of another size
            torch.save({**ck, "model_config": {**ck["model_config"], "n_embd": 64}}, wider)
            self.assertRefused(wider, "does not fit this code's GPT")
            self.assertRefused(os.path.join(d, "missing.pt"), "no checkpoint at")
            with open(good, "rb") as f:
                self.assertEqual(f.read(), blob)                             # the good one is untouched

    def test_a_missing_stage_input_and_an_unwritable_out_dir(self):
        with tempfile.TemporaryDirectory() as d:
            with self.assertRaisesRegex(checkpoint.Refused, "no checkpoint at .*sft.pt"):
                train.main(["--stage", "eval", "--out_dir", d, "--device", "cpu"])
            with self.assertRaisesRegex(checkpoint.Refused, "no tokenizer at .*tokenizer.pt"):
                train.main(["--stage", "sft", "--out_dir", d, "--device", "cpu"])
            blocker = os.path.join(d, "a_file")
            with open(blocker, "w") as f:
                f.write("x")
            with self.assertRaisesRegex(checkpoint.Refused, "cannot write to out_dir .*a_file/out"):
                train.main(["--stage", "tokenizer", "--out_dir", os.path.join(blocker, "out"), "--device", "cpu"])
            self.assertEqual(os.listdir(d), ["a_file"])                      # the refusals wrote nothing


class TestSlugs(unittest.TestCase):
    """--rows and --method take short names (slugs); the tables' labels are refused with the slugs to type."""

    def test_pick(self):
        labels = {"gen_dpo": "gen DPO", "joint_naive": "joint naive sum", "dpo": "dpo"}
        self.assertEqual(checkpoint.pick("rows", "all", labels), ["gen_dpo", "joint_naive", "dpo"])
        self.assertEqual(checkpoint.pick("rows", "joint_naive, gen_dpo", labels), ["joint_naive", "gen_dpo"])
        with self.assertRaisesRegex(checkpoint.Refused, "^error: --rows takes short names, not the tables' labels: "
                                                        "use --rows gen_dpo,joint_naive$"):
            checkpoint.pick("rows", "gen DPO,joint naive sum", labels)
        with self.assertRaisesRegex(checkpoint.Refused, "^error: --method: unknown 'dpo\\+NLL'; choose all, or from "
                                                        "gen_dpo, joint_naive, dpo$"):
            checkpoint.pick("method", "dpo,dpo+NLL", labels)

    def test_every_slug_is_a_short_name_and_every_label_distinct(self):
        for labels in (pref.ROW_LABELS, joint.LABELS):
            self.assertTrue(all(re.fullmatch(r"[a-z_]+", s) for s in labels), list(labels))
            self.assertEqual(len(set(labels.values())), len(labels))
        self.assertEqual(pref.ROW_LABELS["dpo_nll"], "dpo + NLL (sft_weight 1)")      # compare.json's key

    def test_a_label_on_the_command_line_is_one_line_and_status_2(self):
        with tempfile.TemporaryDirectory() as d:
            for flag, value, hint in (("--rows", "gen mDPO (ours: corrupted prompt)", "use --rows gen_mdpo"),
                                      ("--method", "dpo + NLL (sft_weight 1)", "use --method dpo_nll")):
                proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), "--stage", "joint", flag, value,
                                       "--out_dir", d, "--device", "cpu"], capture_output=True, text=True, timeout=300)
                self.assertEqual(proc.returncode, 2, proc.stderr)
                self.assertEqual(len(proc.stderr.strip().splitlines()), 1, proc.stderr)
                self.assertIn(hint, proc.stderr)
            self.assertEqual(os.listdir(d), [])                              # refused before anything ran


if __name__ == "__main__":
    unittest.main()
