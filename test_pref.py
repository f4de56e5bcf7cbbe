"""
Tests of the understanding preference data and the pref stage (CPU, tiny sizes).
Run: python -m unittest test_pref   (or: pytest test_pref.py)
"""
import os
import random
import tempfile
import types
import unittest
from dataclasses import asdict

import numpy as np
import torch

import data
import pref
import world
from checkpoint import save_atomic
from losses import preference_metrics
from test_model import renders, tiny_model
from model import PatchTokenizer


def tiny_setup(n_pairs=24, seed=0):
    """A fitted tokenizer, a tiny random model and preference data built with it."""
    _, imgs = renders("train", 300)
    tok = PatchTokenizer(512, 8, world.CANVAS)
    tok.fit(imgs)
    vocab = data.Vocab(512)
    model = tiny_model(vocab, seed)
    args = types.SimpleNamespace(device="cpu", dtype="float32", seed=seed, pairs=n_pairs, onpolicy=0.5,
                                 exists_frac=0.3, cooc=0.9, beta=0.1, grad_clip=1.0,
                                 length_matched=False)
    P = pref.build_pairs(model, tok, vocab, args, random.Random(seed))
    P.score_gap_mean = float((P.scores[:, 0] - P.scores[:, 1]).mean())
    return tok, vocab, model, args, P


def save_sft(d, model, tok):
    """The tiny model as an SFT checkpoint in directory d; returns its path."""
    path = os.path.join(d, "sft.pt")
    save_atomic({"model": model.state_dict(), "model_config": asdict(model.cfg), "n_codes": 512,
                 "patch": 8, "tokenizer": tok.state_dict()}, path)
    return path


class TestPairs(unittest.TestCase):

    def test_constructed_pairs_are_faithful_against_hallucinating(self):
        rng = random.Random(0)
        companions = 0
        for i in range(400):
            s = world.sample_scene(rng, "train")
            p = data.constructed_pair(rng, s, "exists" if i % 4 == 0 else "caption")
            if p.question == ["describe"]:
                self.assertEqual(world.hallucinated_mentions(s, p.chosen), 0)
                self.assertEqual(world.parse_caption(p.chosen), [(o.colour, o.shape, o.cell) for o in s])
                self.assertEqual(world.hallucinated_mentions(s, p.rejected), p.n_edits)   # every edit is an error
                self.assertIn(p.n_edits, (1, 2, 3))
                kinds = {o.kind for o in s}
                companions += any((c, sh) in world.COMPANION.values() and (c, sh) not in kinds
                                  for c, sh, _ in world.parse_caption(p.rejected))
            else:
                colour, shape = p.question[3], p.question[4]
                truth = "yes" if (colour, shape) in {o.kind for o in s} else "no"
                self.assertEqual(p.chosen, [truth])
                self.assertNotEqual(p.rejected, p.chosen)
        self.assertGreater(companions, 50)   # the errors lean on the co-occurrence bias

    def test_length_matched_pairs(self):
        rng = random.Random(2)
        for _ in range(300):
            s = world.sample_scene(rng, "train")
            p = data.constructed_pair(rng, s, "caption", keep_length=True)
            self.assertEqual(len(p.rejected), len(p.chosen))
            self.assertGreater(world.hallucinated_mentions(s, p.rejected), 0)
            self.assertEqual(world.hallucinated_mentions(s, p.rejected), p.n_edits)

    def test_crop_keeps_1_to_20_percent(self):
        rng = random.Random(0)
        img = world.render(world.sample_scene(rng, "train"))
        areas = []
        for _ in range(300):
            out, area = data.corrupt_image(rng, img)
            self.assertEqual(out.shape, img.shape)
            self.assertEqual(out.dtype, np.uint8)
            areas.append(area)
        self.assertGreaterEqual(min(areas), 0.01)
        self.assertLessEqual(max(areas), 0.2)
        self.assertGreater(max(areas) - min(areas), 0.1)      # really drawn across the range

    def test_built_pairs_and_cached_reference(self):
        tok, vocab, model, args, P = tiny_setup()
        self.assertEqual(len(P.pairs), 24)
        for p in P.pairs:
            if p.question == ["describe"]:
                self.assertEqual(world.hallucinated_mentions(p.scene, p.chosen), 0)
                self.assertGreater(world.hallucinated_mentions(p.scene, p.rejected), 0)
        # one corrupted image per pair, shared by policy and reference: the batch uses the stored codes
        ids, _ = pref.pair_batch(vocab, P, [0, 1], True, True)
        crop_row = ids[4].tolist()
        self.assertEqual(crop_row[2:11],
                         data.image_tokens(vocab, P.crop_codes[0]))
        self.assertNotEqual(P.crop_codes[0], P.codes[0])
        # the cached reference log-probs equal a fresh computation, with and without images
        for images in (True, False):
            fresh = torch.stack(pref.pair_logps(model, vocab, P, [3, 5, 7], images, True, args)[:3], 1)
            torch.testing.assert_close(P.ref(images)[[3, 5, 7]], fresh, rtol=1e-5, atol=1e-4)
        # DAMA's clause scores are probabilities over the clauses of both responses
        torch.testing.assert_close(P.scores.sum(1), torch.ones(len(P.pairs)))
        self.assertTrue(bool((P.scores >= 0).all()))

    def test_one_step_of_every_method(self):
        tok, vocab, model, args, P = tiny_setup(n_pairs=8)
        for method in pref.METHODS:
            policy = tiny_model(vocab, seed=1 if method == "dama" else 0).train()   # dama: margins != 0
            opt = torch.optim.SGD(policy.parameters(), lr=0.1)
            state = {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)}
            loss, m = pref.pref_step_loss(policy, vocab, P, list(range(8)), method, args, state)
            opt.zero_grad()
            loss.backward()
            self.assertTrue(torch.isfinite(loss), method)
            grads = [p.grad for p in policy.parameters() if p.grad is not None]
            self.assertTrue(grads and any(float(g.abs().sum()) > 0 for g in grads), method)
            self.assertIn("rewards/accuracies", m)
            self.assertIn("logps/chosen", m)
            if pref.METHODS[method][0] == "mdpo":
                self.assertIn("rewards/imageless_margins", m)
            if method == "dama":
                self.assertEqual(int(m["kept"]), int(8 * 0.8))
                self.assertNotEqual(state["gap_mean"], 0.0)
                # R-bar as a float64 tensor (pref.dama_state: no wait for the device) gives the same numbers
                tensor_state = pref.dama_state("cpu", 0)
                _, m2 = pref.pref_step_loss(policy, vocab, P, list(range(8)), method, args, tensor_state)
                self.assertEqual(float(tensor_state["gap_mean"]), state["gap_mean"])
                self.assertEqual({k: float(v) for k, v in m2.items()}, {k: float(v) for k, v in m.items()})
            # policy == reference at step 0: every margin is 0, so DPO's loss is ln 2
            if method == "dpo":
                self.assertAlmostEqual(loss.item(), float(np.log(2)), places=4)


    def test_sft_weight_adds_rpo_nll_on_the_chosen_response(self):
        tok, vocab, model, args, P = tiny_setup(n_pairs=8)
        idx = list(range(8))
        for method in ("dpo", "mdpo"):
            state = {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)}
            plain, m0 = pref.pref_step_loss(model, vocab, P, idx, method, args, dict(state))
            with_nll, m1 = pref.pref_step_loss(model, vocab, P, idx, method, args, dict(state), sft_weight=0.7)
            # the term, computed again: each chosen response's summed log-prob over its scored tokens
            ids, labels = pref.pair_batch(vocab, P, idx, True, False)
            chosen_logps = pref.chunked_logps(model, ids, labels)[:8]
            n_tok = (labels[:8, 1:] != -100).sum(1)
            self.assertTrue((n_tok > 1).all())
            want = (-chosen_logps / n_tok).mean().item()
            self.assertAlmostEqual(float(m0["nll/chosen"]), want, places=4)
            self.assertAlmostEqual(with_nll.item() - plain.item(), 0.7 * want, places=4, msg=method)

    def test_metrics_stay_tensors_and_are_read_as_losses_computes_them(self):
        g = torch.Generator().manual_seed(0)
        chosen, rejected = torch.randn(16, generator=g), torch.randn(16, generator=g)
        rejected[:3] = chosen[:3]                                # ties count as wrong
        ours = pref.reward_metrics(chosen, rejected)
        self.assertTrue(all(isinstance(v, torch.Tensor) and v.ndim == 0 for v in ours.values()))
        curve = pref.Metrics([{"step": 1, "loss": 0.5}])      # a resumed run's curve, already floats
        curve.append({"step": 2, **ours, "kept": torch.tensor(12), "wide": torch.tensor(0.1, dtype=torch.float64),
                      "tokens": 345})
        read = curve.read()
        self.assertEqual(read[0], {"step": 1, "loss": 0.5})
        # the same Python floats, to the bit, as losses.preference_metrics's .item()s
        self.assertEqual({k: read[1][k] for k in ours}, preference_metrics(chosen, rejected))
        self.assertEqual(list(read[1]), ["step", *ours, "kept", "wide", "tokens"])       # keys in order
        self.assertEqual((read[1]["kept"], read[1]["wide"], read[1]["tokens"]), (12, 0.1, 345))
        self.assertIsInstance(read[1]["kept"], int)
        self.assertIs(curve.read(), read)                        # nothing pending: nothing read again
        self.assertEqual(len(read), 2)

    def test_sft_mix_adds_the_loss_of_an_sft_batch_to_every_step(self):
        tok, vocab, model, args, P = tiny_setup(n_pairs=8)
        with tempfile.TemporaryDirectory() as d:
            sft_path = save_sft(d, model, tok)
            run = {}
            for gamma in (0.0, 2.0):
                a = types.SimpleNamespace(**vars(args), out_dir=d, pref_lr=1e-3, pref_steps=2, pref_batch=4,
                                          pref_ckpt_every=50, log_every=1, resume=False, sft_weight=0.0,
                                          sft_mix=gamma, batch_size=4, und_frac=0.75, caption_noise=1.0,
                                          cfg_drop=0.1, turns=2, und_loss="tokens")
                path, curve = pref.train_pref(a, "dpo", P, sft_path)
                run[gamma] = curve, torch.load(path, weights_only=True)["model"]
            (plain, w0), (mixed, w1) = run[0.0], run[2.0]
            self.assertNotIn("sft_mix/loss", plain[0])
            self.assertGreater(mixed[0]["sft_mix/loss"], 0)
            # step 1: the same weights and pairs, so the two losses differ by exactly gamma x the SFT loss
            self.assertAlmostEqual(mixed[0]["loss"] - plain[0]["loss"], 2.0 * mixed[0]["sft_mix/loss"], places=4)
            self.assertEqual(mixed[0]["dpo_loss"], plain[0]["dpo_loss"])
            self.assertFalse(all(torch.equal(w0[k], w1[k]) for k in w0))

    def test_pairs_are_built_once_and_kept_for_the_same_sft_model_and_settings(self):
        tok, vocab, model, args, _ = tiny_setup(n_pairs=8)
        with tempfile.TemporaryDirectory() as d:
            sft_path = save_sft(d, model, tok)
            a = types.SimpleNamespace(**vars(args), out_dir=d)
            built = pref.preference_data(a, sft_path)
            kept = pref.preference_data(a, sft_path)
            log = open(os.path.join(d, "log.txt")).read().splitlines()
            self.assertRegex(log[-1], r"^pairs s0 \| 8 pairs from .*pairs_s0.pt$")
            self.assertEqual(kept.pairs, built.pairs)                 # data.Pair and world.Obj again, equal
            self.assertIsInstance(kept.pairs[0].scene[0], world.Obj)
            for images in (True, False):
                self.assertTrue(torch.equal(kept.ref(images), built.ref(images)), images)
            self.assertTrue(torch.equal(kept.scores, built.scores))
            self.assertEqual((kept.codes, kept.crop_codes, kept.n_onpolicy, kept.score_gap_mean),
                             (built.codes, built.crop_codes, built.n_onpolicy, built.score_gap_mean))
            # the file holds plain containers and tensors only: it loads with weights_only=True
            on_disk = torch.load(os.path.join(d, "pairs_s0.pt"), weights_only=True)
            self.assertEqual(on_disk["pairs"], [asdict(p) for p in built.pairs])
            # other pair settings: built again (and the file then holds the new ones)
            b = types.SimpleNamespace(**{**vars(a), "exists_frac": 0.9})
            pref.preference_data(b, sft_path)
            self.assertRegex(open(os.path.join(d, "log.txt")).read().splitlines()[-1], r"on-policy")


if __name__ == "__main__":
    unittest.main()
