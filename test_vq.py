"""
Tests of the VQ-VAE tokenizer (vq.py) and of the many-token world it makes (CPU, small sizes).
Run: python -m unittest test_vq   (or: pytest test_vq.py)
"""
import os
import random
import tempfile
import unittest

import numpy as np
import torch

import checkpoint
import joint
import report
import sft
import train
import world
from test_model import renders
from vq import VQVAE, kmeans


def small(f=3, n_codes=16, **kw):
    torch.manual_seed(0)
    return VQVAE(n_codes, f, world.CANVAS, dim=4, hidden=8, **kw)


class TestQuantizer(unittest.TestCase):

    def test_the_nearest_code_and_the_two_terms_by_hand(self):
        vq = small(n_codes=3)
        with torch.no_grad():
            vq.codebook.copy_(torch.tensor([[0., 0, 0, 0], [1, 1, 1, 1], [-2, 0, 0, 0]]))
        z = torch.tensor([[0.9, 1.2, 1.0, 0.7], [-1.5, 0.1, 0, 0]], requires_grad=True)
        idx, zq, codebook_loss, commitment_loss = vq.quantize(z)
        self.assertEqual(idx.tolist(), [1, 2])
        self.assertTrue(torch.equal(zq, vq.codebook[idx]))                   # forward: the codes themselves
        # squared errors: (0.1^2 + 0.2^2 + 0 + 0.3^2) + (0.5^2 + 0.1^2) = 0.14 + 0.26 = 0.40 over 8 entries
        self.assertAlmostEqual(codebook_loss.item(), 0.40 / 8, places=6)
        self.assertAlmostEqual(commitment_loss.item(), 0.25 * 0.40 / 8, places=6)
        # the codebook term moves only the codes (towards z), the commitment term only z (towards the codes)
        g_code, = torch.autograd.grad(codebook_loss, vq.codebook, retain_graph=True)
        self.assertTrue(torch.allclose(g_code[1], 2 * (vq.codebook[1] - z[0]).detach() / 8))
        self.assertTrue(torch.equal(g_code[0], torch.zeros(4)))
        self.assertIsNone(torch.autograd.grad(codebook_loss, z, allow_unused=True, retain_graph=True)[0])
        g_z, = torch.autograd.grad(commitment_loss, z, retain_graph=True)
        self.assertTrue(torch.allclose(g_z, 0.25 * 2 * (z - vq.codebook[idx]).detach() / 8))
        self.assertIsNone(torch.autograd.grad(commitment_loss, vq.codebook, allow_unused=True)[0])

    def test_the_straight_through_gradient_reaches_the_encoder(self):
        vq = small()
        _, imgs = renders("train", 4)
        vq.train()
        loss, m = vq(imgs)
        first = vq.encoder[0].weight
        g_recon, = torch.autograd.grad(m["recon"], first, retain_graph=True)    # through the quantizer
        self.assertGreater(g_recon.abs().sum().item(), 0)
        # ... as if the quantizer were not there: z_q's gradient is handed to z_e unchanged
        z = vq.encode_vectors(imgs)
        idx, zq, _, _ = vq.quantize(z)
        g_zq, = torch.autograd.grad(vq.decode_vectors(zq, 4).sum(), zq, retain_graph=True)
        g_z, = torch.autograd.grad(zq, z, g_zq)
        self.assertTrue(torch.equal(g_z, g_zq))

    def test_kmeans_start_on_the_first_training_batch_only(self):
        vq = small()
        _, imgs = renders("train", 8)
        vq.train()
        self.assertFalse(bool(vq.initialised))
        vq(imgs)
        first = vq.codebook.detach().clone()
        self.assertTrue(bool(vq.initialised))
        self.assertGreater(first.abs().sum().item(), 0)               # no longer the zeros it was built with
        vq(renders("train", 8, seed=1)[1])
        self.assertTrue(torch.equal(vq.codebook.detach(), first))     # no second k-means
        # k-means on separated clusters finds them
        x = torch.cat([torch.randn(50, 2) * 0.01 + c for c in (torch.tensor([5., 0]), torch.tensor([-5., 0]))])
        c = kmeans(x, 2, generator=torch.Generator().manual_seed(0))
        self.assertEqual(sorted(round(v) for v in c[:, 0].tolist()), [-5, 5])

    def test_a_dead_code_is_restarted_on_an_encoder_output(self):
        vq = small(n_codes=4, restart_every=3)
        with torch.no_grad():
            vq.codebook.copy_(torch.tensor([[0., 0, 0, 0], [1, 1, 1, 1], [50, 50, 50, 50], [2, 2, 2, 2]]))
        vq.initialised.fill_(True)
        vq.idle.copy_(torch.tensor([0, 1, 3, 7]))     # codes 2 and 3 unused for restart_every steps or more
        z = torch.randn(10, 4)
        self.assertEqual(vq.restart_dead_codes(z, torch.Generator().manual_seed(0)), 2)
        for k in (2, 3):
            self.assertTrue(any(torch.equal(vq.codebook[k], row) for row in z), k)
        self.assertTrue(torch.equal(vq.codebook[1], torch.ones(4)))   # live codes stay
        self.assertEqual(vq.idle.tolist(), [0, 1, 0, 0])
        # the idle count: +1 a training step, 0 for every code the step used
        vq.train()
        vq(renders("train", 2)[1])
        self.assertEqual(int((vq.idle == 0).sum()), len(torch.unique(vq.encode(renders("train", 2)[1]))))

    def test_shapes_and_bad_input(self):
        for f, g in ((3, 8), (4, 6), (8, 3)):
            vq = small(f=f)
            codes = vq.encode(renders("test", 2)[1])
            self.assertEqual(tuple(codes.shape), (2, g * g))
            self.assertEqual(tuple(vq.decode(codes).shape), (2, 24, 24, 3))
            self.assertEqual(vq.decode(codes).dtype, torch.uint8)
        with self.assertRaisesRegex(ValueError, "expected images of shape"):
            small().encode(np.zeros((2, 32, 32, 3), np.uint8))
        with self.assertRaisesRegex(ValueError, "does not divide"):
            VQVAE(16, 5)


def vq_args(d, steps, **kw):
    args = train.resolve(train.parser.parse_args(["--tokenizer", "vq", "--vq_steps", str(steps), "--out_dir", d,
                                                  "--device", "cpu", "--log_every", "50"]))
    for k, v in kw.items():
        setattr(args, k, v)
    return args


class TestManyTokenWorld(unittest.TestCase):

    def test_the_round_trip_recovers_the_scenes(self):
        with tempfile.TemporaryDirectory() as d:
            torch.manual_seed(0)
            sft.train_tokenizer(vq_args(d, 2000))   # the default (~3 minutes on 2 cores)
            ck = checkpoint.read_checkpoint(os.path.join(d, "tokenizer.pt"), "cpu", ("stats", "vq"))
            self.assertEqual(ck["vq"]["f"], 3)
            tok = checkpoint.load_tokenizer(os.path.join(d, "tokenizer.pt"), "cpu")
            self.assertIsInstance(tok, VQVAE)
        self.assertGreaterEqual(ck["stats"]["roundtrip_exact"], 0.99)   # the bar, on 1000 held-out scenes
        scenes = [world.sample_scene(random.Random(5), "test") for _ in range(200)]
        recon = tok.decode(tok.encode(np.stack([world.render(s) for s in scenes]))).numpy()
        exact = np.mean([world.scene_key(world.parse(r)) == world.scene_key(s) for r, s in zip(recon, scenes)])
        self.assertGreaterEqual(exact, 0.98)
        self.assertEqual(tok.grid ** 2, 64)

    def test_smoke_sft_and_eval_with_64_tokens_an_image(self):
        with tempfile.TemporaryDirectory() as d:
            train.main(["--stage", "tokenizer,sft,eval", "--tokenizer", "vq", "--vq_steps", "20", "--steps", "3",
                        "--out_dir", d, "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8",
                        "--log_every", "1", "--eval_n", "4", "--device", "cpu"])
            model, tok, vocab, ck = checkpoint.load_model(os.path.join(d, "sft.pt"), "cpu")
            self.assertIsInstance(tok, VQVAE)
            self.assertEqual(len(model.cfg.cell_words), 64)
            self.assertGreaterEqual(model.cfg.block_size, 64 + 60)
            self.assertTrue(os.path.exists(os.path.join(d, "eval_sft.json")))
            with open(os.path.join(d, "log.txt")) as f:
                self.assertIn("VQ-VAE, 64 tokens an image", f.read())

    def test_every_stage_in_the_64_token_world(self):
        """A barely trained 64-token model draws nothing parseable: the joint study trains the rows
        whose pairs need no drawing (world pairs, and real-vs-generated ones), leaves the on-policy rows
        empty with the reason, and the run ends with a report that holds every study."""
        with tempfile.TemporaryDirectory() as d:
            train.main(["--stage", "all", "--tokenizer", "vq", "--vq_steps", "20", "--steps", "3", "--out_dir", d,
                        "--n_layer", "1", "--n_head", "2", "--n_embd", "32", "--batch_size", "8", "--log_every", "1",
                        "--eval_n", "4", "--device", "cpu", "--pairs", "12", "--pref_steps", "2", "--pref_batch", "4",
                        "--pref_seeds", "1", "--gen_pairs", "6", "--diag_every", "1", "--joint_steps", "2",
                        "--joint_eval_n", "4", "--probe_steps", "2", "--probe_n", "4", "--self_prompts", "8",
                        "--self_steps", "2"])
            with open(os.path.join(d, "report.md")) as f:
                text = f.read()
            for section in ("## SFT", "## Preference optimisation for understanding",
                            "## Preference optimisation for generation", "## Does understanding inform generation?"):
                self.assertIn(section, text)
            study = report.read_json(os.path.join(d, "study.json"))
            for row in ("und DPO (world pairs)", "gen DPO (world pairs)", "joint naive sum (world pairs)"):
                self.assertGreater(study["rows"][row][0]["rho"], 0, row)
                self.assertEqual(len(study["rows"][row]), 1)
            kind = {label: k for label, _, _, k in joint.ROWS.values()}   # study.json names a row by its label
            for row in kind:   # every row trained, or left empty with the reason
                self.assertNotEqual(row in study["rows"], row in study["empty_rows"], row)
            for row, why in study["empty_rows"].items():   # left empty: said in the table's section, with the reason
                self.assertEqual(kind[row], "on")
                self.assertIn("on-policy generation pairs at temperature 1, fewer than a batch", why["0"])
                self.assertIn(row, text)
                self.assertIn("Left empty in seed 0", text)
            self.assertEqual(study["pairs"]["0"]["world"], 6)
            self.assertEqual(report.read_json(os.path.join(d, "eval_sft.json"))["n_per_task"], 4)

if __name__ == "__main__":
    unittest.main()
