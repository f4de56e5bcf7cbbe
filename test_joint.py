"""
Tests of preference optimisation for generation and of joint training (CPU, tiny sizes).
Run: python -m unittest test_joint   (or: pytest test_joint.py)
"""
import os
import random
import tempfile
import types
import unittest
from dataclasses import asdict

import numpy as np
import torch

import checkpoint
import data
import genpairs
import joint
import pref
import world
from test_pref import tiny_model, tiny_setup
from vq import VQVAE


def empty_image():
    return world.render(())


class TestGenerationPairs(unittest.TestCase):

    def test_prompt_score_is_the_fraction_of_checks(self):
        rng = random.Random(0)
        for task in data.GEN_TASKS:
            for _ in range(30):
                e = data.gen_example(rng, "train", task)
                self.assertEqual(world.prompt_score(e, world.parse(world.render(e.scene))), 1.0, e)
                self.assertLess(world.prompt_score(e, ()), 1.0, e)
        # partly right: 'a red circle and a blue square' drawn with a red circle and a GREEN square
        e = data.Example("attribution", (), "a red circle and a blue square".split(), [])
        drawn = (world.Obj("red", "circle", 3), world.Obj("green", "square", 5))
        self.assertEqual(world.prompt_checks(e, drawn), [True, True, True, False])
        self.assertEqual(world.prompt_score(e, drawn), 0.75)
        self.assertFalse(world.geneval_correct(e, drawn))

    def test_ranking_follows_the_parser_score(self):
        rng = random.Random(1)
        for _ in range(50):
            e = data.gen_example(rng, "train", "attribution")
            a, b = e.scene
            half = (world.Obj(a.colour, a.shape, a.cell),)                       # one of two objects: 0.5
            imgs = [empty_image(), world.render(half), world.render(e.scene), world.render(half)]
            best, worst, scores = genpairs.rank_samples(e, imgs)
            self.assertEqual((best, worst), (2, 0))
            self.assertEqual(scores, [0.0, 0.5, 1.0, 0.5])

    def test_built_pairs_prefer_the_higher_score(self):
        tok, vocab, model, args, _ = tiny_setup(n_pairs=4)
        args = types.SimpleNamespace(**vars(args), gen_k=4, gen_pairs=12, gen_temperature=1.0, cfg_scale=2.0)
        pairs = genpairs.build_gen_pairs(model, tok, vocab, args, random.Random(0))
        self.assertEqual(len(pairs["real"]), 12)
        self.assertGreater(len(pairs["on"]), 0)
        for p in pairs["on"]:
            img = lambda codes: tok.decode(torch.tensor([codes])).numpy()[0]
            sc, sr = (world.prompt_score(p.example, world.parse(img(c))) for c in (p.chosen, p.rejected))
            self.assertEqual((sc, sr), p.scores)
            self.assertGreater(sc, sr)
            # the corrupted prompt fits the chosen image WORSE than the real prompt does
            bad = data.Example(p.example.task, p.example.scene, p.corrupted, [])
            self.assertLess(world.prompt_score(bad, world.parse(img(p.chosen))), sc)
        for p in pairs["real"]:
            truth = tok.encode(world.render(p.example.scene)[None])[0].tolist()
            self.assertEqual(p.chosen, truth)
            self.assertLess(p.scores[1], 1.0)

    def test_world_pairs_are_the_same_scenes_whatever_the_tokenizer(self):
        tok, vocab, model, args, _ = tiny_setup(n_pairs=4)
        args = types.SimpleNamespace(**vars(args), gen_pairs=40, out_dir=tempfile.mkdtemp())
        pairs = genpairs.build_world_pairs(tok, args, random.Random(7))
        self.assertEqual(len(pairs), 40)
        for p in pairs:
            self.assertEqual(p.chosen, tok.encode(world.render(p.example.scene)[None])[0].tolist())
            # the patch tokenizer is lossless: the rejected image is the scene with ONE object changed
            altered = world.parse(tok.decode(torch.tensor([p.rejected])).numpy()[0])
            self.assertEqual(world.prompt_score(p.example, altered), p.scores[1])
            self.assertEqual(p.scores[0], 1.0)
            self.assertLess(p.scores[1], 1.0)
            before, after = set(world.scene_key(p.example.scene)), set(world.scene_key(altered))
            self.assertEqual((len(before - after), len(after - before)), (1, 1))
            self.assertFalse({(c, s) for _, c, s in after} & world.HELD_OUT)
            self.assertFalse(world.in_test_bucket(altered))
            self.assertEqual(p.source, "world")
        # another tokenizer (a VQ-VAE, 36 tokens an image): the same prompts, changes and scores
        vq = VQVAE(16, 4, world.CANVAS).eval()
        again = genpairs.build_world_pairs(vq, args, random.Random(7))
        self.assertEqual([(p.example, p.corrupted, p.scores) for p in again],
                         [(p.example, p.corrupted, p.scores) for p in pairs])
        self.assertEqual({len(p.chosen) for p in again}, {36})

    def test_soups_interpolate_the_two_models_weights(self):
        a, b = (tiny_model(data.Vocab(512), seed) for seed in (0, 1))
        for lam in (0.0, 0.3, 1.0):
            mixed = joint.soup([a, b], lam)
            for k, v in a.state_dict().items():
                self.assertTrue(torch.allclose(mixed[k], lam * v + (1 - lam) * b.state_dict()[k]), k)
        self.assertTrue(all(torch.equal(v, a.state_dict()[k]) for k, v in joint.soup([a, b], 1.0).items()))

    def test_corrupted_prompt_changes_one_attribute(self):
        rng = random.Random(3)
        singular = {p: s for s, p in world.PLURAL.items()}
        violated = 0
        for i in range(700):
            e = data.gen_example(rng, "train", data.GEN_TASKS[i % len(data.GEN_TASKS)])
            c = data.corrupt_prompt(rng, e.question)
            self.assertEqual(len(c), len(e.question))
            self.assertEqual(sum(a != b for a, b in zip(c, e.question)), 1)
            vocab_words = set(data.WORDS) | set(world.PLURAL.values())
            self.assertTrue(set(c) <= vocab_words)
            combos = {(a, singular.get(b, b)) for a, b in zip(c, c[1:]) if a in world.COLOURS}
            self.assertFalse(combos & world.HELD_OUT)
            if e.task == "position":
                self.assertIn(" ".join(c[2:-2]), world.RELATIONS)
            violated += world.prompt_score(data.Example(e.task, e.scene, c, []), world.parse(world.render(e.scene))) < 1
        self.assertEqual(violated, 700)   # the true image never fits the changed prompt
        five = "top left red circle , top center red square , top right red triangle , middle left red " \
               "diamond , middle center red cross".split()   # every shape named: no shape can change
        for _ in range(50):
            c = data.corrupt_prompt(rng, five)
            self.assertEqual(sum(a != b for a, b in zip(c, five)), 1)
            self.assertEqual([w for w in c if w in world.SHAPES], [w for w in five if w in world.SHAPES])


class TestGradientTools(unittest.TestCase):

    def test_cosine_of_a_loss_with_itself_and_of_toy_losses(self):
        w = [torch.randn(3, requires_grad=True), torch.randn(2, requires_grad=True), torch.randn(2, requires_grad=True)]
        a, b = torch.tensor([1.0, 2.0, 0.0, -1.0, 3.0]), torch.tensor([0.5, -1.0, 4.0, 2.0, 0.0])
        flat = lambda: torch.cat(w[:2])                                  # w[2] is unused: its gradient is 0
        grad = lambda loss: joint.flatten(torch.autograd.grad(loss, w, allow_unused=True), w)
        g1 = grad((flat() * a).sum() + (flat() ** 2).sum())
        self.assertEqual(tuple(g1.shape), (7,))
        self.assertAlmostEqual(float(joint.cosine(g1, g1)), 1.0, places=6)
        # two independent linear losses: the gradients are a and b, so the cosine is a.b / |a||b|
        ga, gb = grad((flat() * a).sum()), grad((flat() * b).sum())
        torch.testing.assert_close(ga, torch.cat([a, torch.zeros(2)]))
        self.assertAlmostEqual(float(joint.cosine(ga, gb)), float(a @ b / (a.norm() * b.norm())), places=6)
        self.assertAlmostEqual(float(joint.cosine(ga, -ga)), -1.0, places=6)

    def test_the_same_batch_twice_gives_cosine_one(self):
        tok, vocab, model, args, P = tiny_setup(n_pairs=8)
        policy = model.train()
        params = list(policy.parameters())
        for method in ("dpo", "dama"):
            g = [joint.task_grads(policy, params, vocab, P, list(range(8)), method, args,
                                  {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)})[0] for _ in range(2)]
            self.assertAlmostEqual(float(joint.cosine(*g)), 1.0, places=5)
            other = joint.task_grads(policy, params, vocab, P, list(range(4)), method, args,
                                     {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)})[0]
            self.assertLess(float(joint.cosine(g[0], other)), 0.9999)   # another batch: another direction

    def test_layer_groups_are_positions_in_the_flat_gradient(self):
        model = tiny_model(data.Vocab(512), 0)
        params = list(model.parameters())
        groups = joint.layer_groups(model)
        n = sum(p.numel() for p in params)
        self.assertTrue(torch.equal(torch.cat(list(groups.values())).sort().values, torch.arange(n)))   # each once
        flat = joint.flatten([p.detach() for p in params], params)
        named = list(model.named_parameters())
        for key, held in (("block0", lambda name: name.startswith("blocks.0.")),
                          ("ln_f", lambda name: name.startswith("ln_f.")),
                          ("embed", lambda name: not name.startswith(("blocks.", "ln_f.")))):
            want = torch.cat([p.detach().flatten() for name, p in named if held(name)])
            self.assertTrue(torch.equal(flat[groups[key]], want), key)

    def test_pcgrad_projects_only_on_conflict(self):
        u, g = torch.tensor([1.0, 0.0]), torch.tensor([1.0, 1.0])          # agree: the plain sum
        torch.testing.assert_close(joint.pcgrad(u, g), torch.tensor([2.0, 1.0]))
        u, g = torch.randn(50), torch.randn(50)
        u = u if u @ g >= 0 else -u                                        # agree: the sum, to the bit
        self.assertTrue(torch.equal(joint.pcgrad(u, g), u + g))
        u, g = torch.tensor([1.0, 0.0]), torch.tensor([-1.0, 1.0])         # conflict: dot = -1
        # u' = u - (u.g / |g|^2) g = (0.5, 0.5); g' = g - (g.u / |u|^2) u = (0, 1)
        torch.testing.assert_close(joint.pcgrad(u, g), torch.tensor([0.5, 1.5]))
        up = u - (u @ g) / (g @ g) * g
        self.assertAlmostEqual(float(up @ g), 0.0, places=6)               # projected onto the normal plane

    def test_combinations(self):
        u, g = torch.tensor([3.0, 4.0]), torch.tensor([0.0, 0.5])          # norms 5 and 0.5
        torch.testing.assert_close(joint.combine("naive", u, g, 0.3), torch.tensor([3.0, 4.5]))
        torch.testing.assert_close(joint.combine("wu", u, g, 0.3), torch.tensor([0.9, 1.55]))
        both = joint.combine("gradnorm", u, g, 0.3)           # each task pulls with norm (5 + 0.5) / 2
        torch.testing.assert_close(both, 2.75 * torch.tensor([0.6, 0.8]) + 2.75 * torch.tensor([0.0, 1.0]))
        self.assertIs(joint.combine("und", u, None, 0.3), u)
        with self.assertRaises(ValueError):
            joint.combine("average", u, g, 0.3)


class TestJointTraining(unittest.TestCase):

    def test_a_batch_gradient_is_the_mean_of_its_halves_for_mean_losses(self):
        """What lets the measured steps take the whole batch's gradient from the control's two halves."""
        tok, vocab, model, args, PU = tiny_setup(n_pairs=8)
        model.train()
        params = list(model.parameters())
        for method in ("dpo", "mdpo", "mdpo_nocond", "dama"):
            def state():
                return {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)}
            full, _ = joint.task_grads(model, params, vocab, PU, list(range(8)), method, args, state())
            halves = [joint.task_grads(model, params, vocab, PU, part, method, args, state())[0]
                      for part in (list(range(4)), list(range(4, 8)))]
            same = torch.allclose(full, (halves[0] + halves[1]) / 2, rtol=1e-4, atol=1e-7)
            self.assertEqual(same, joint.mean_loss(method), method)   # DAMA keeps a subset: not a plain mean

    def test_one_joint_step_per_row(self):
        tok, vocab, model, args, PU = tiny_setup(n_pairs=8)
        rng = random.Random(0)
        pairs = []
        for i in range(8):   # chosen = the true image, rejected = an empty canvas
            e = data.gen_example(rng, "train", data.GEN_TASKS[i % len(data.GEN_TASKS)])
            codes = tok.encode(np.stack([world.render(e.scene), empty_image()])).tolist()
            pairs.append(genpairs.GenPair(e, codes[0], codes[1], data.corrupt_prompt(rng, e.question),
                                       (1.0, world.prompt_score(e, ())), "real"))
        with tempfile.TemporaryDirectory() as d:
            sft = os.path.join(d, "sft.pt")
            torch.save({"model": model.state_dict(), "model_config": asdict(model.cfg), "n_codes": tok.n_codes,
                        "patch": tok.patch, "tokenizer": tok.state_dict()}, sft)
            args = types.SimpleNamespace(**vars(args), out_dir=d, joint_lr=1e-3, pref_batch=4, joint_steps=2,
                                         gen_beta=None, diag_every=1, log_every=1, eval_seed=0)
            P = genpairs.gen_pair_data(model, vocab, pairs, args)
            PG = {"on": P, "real": P, "world": P}
            self.assertEqual(tuple(P.ref(True).shape), (8, 3))
            before = torch.cat([p.flatten() for p in model.parameters()])
            for row, (_, strategy, _, _) in joint.ROWS.items():
                policy, s, curve = joint.train_row(args, row, PU, PG, sft)
                self.assertEqual([m["step"] for m in curve["gen"]], [1, 2], row)   # measured on every step here
                after = torch.cat([p.flatten() for p in policy.parameters()])
                self.assertGreater(float((after - before).abs().max()), 0, row)
                for k in ("cos", "rho", "cos_within_und", "cos_within_gen", "kl_und", "kl_gen", "cos_block0",
                          "dpo_loss_und_end", "dpo_loss_gen_end"):
                    self.assertTrue(np.isfinite(s[k]), (row, k))
                self.assertGreater(s["rho"], 0)
                self.assertTrue(-1 <= s["cos"] <= 1)
                # w_U = N / (N + T); per-task beta: beta * T / N (N = 9 codes + <eoi>, T = answer tokens)
                T = float(np.mean([len(p.chosen) + 1 for p in PU.pairs]))
                self.assertAlmostEqual(s["w_U"], 10 / (10 + T))
                self.assertAlmostEqual(s["beta_gen"], args.beta * T / 10 if strategy == "beta" else args.beta)
            # policy == reference: the generation DPO loss is ln 2
            pol = checkpoint.load_model(sft, "cpu")[0].train()
            state = {"gap_mean": 0.0, "generator": torch.Generator().manual_seed(0)}
            loss, _ = pref.pref_step_loss(pol, vocab, P, list(range(8)), "dpo", args, state)
            self.assertAlmostEqual(loss.item(), float(np.log(2)), places=4)


if __name__ == "__main__":
    unittest.main()
