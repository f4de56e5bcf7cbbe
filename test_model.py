"""
Tests of the image tokenizer, the transformer, decoding and the training pipeline (CPU, tiny
sizes). Run: python -m unittest test_model   (or: pytest test_model.py)
"""
import math
import os
import random
import tempfile
import unittest
from argparse import Namespace

import numpy as np
import torch

import checkpoint
import data
import model
import report
import sft
import train
import world
from losses import sequence_logps
from model import GPT, GPTConfig, PatchTokenizer, amp_context


def renders(split, n, seed=0):
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, split) for _ in range(n)]
    return scenes, np.stack([world.render(s) for s in scenes])


def tiny_model(vocab, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=vocab.size, n_codes=vocab.n_codes, n_layer=2, n_head=2, n_embd=32,
                         cell_words=data.cell_word_ids(vocab, 3)),
               torch.rand(vocab.n_codes, 192)).eval()


class TestTokenizer(unittest.TestCase):

    def test_round_trip_keeps_the_scene(self):
        _, imgs = renders("train", 3000)
        scenes, test = renders("test", 300, seed=1)
        for patch, n_codes in ((8, 512), (4, 1024)):
            tok = PatchTokenizer(n_codes, patch, world.CANVAS)
            self.assertLessEqual(tok.fit(imgs), n_codes)
            np.testing.assert_array_equal(tok.decode(tok.encode(imgs)).numpy(), imgs)   # lossless on fit data
            codes = tok.encode(test)
            self.assertEqual(tuple(codes.shape), (300, (world.CANVAS // patch) ** 2))
            rec = tok.decode(codes).numpy()
            exact = np.mean([world.scene_key(world.parse(r)) == world.scene_key(s) for r, s in zip(rec, scenes)])
            self.assertGreaterEqual(exact, 0.99)

    def test_kmeans_path_with_a_small_codebook(self):
        _, imgs = renders("train", 200)
        tok = PatchTokenizer(32, 8, world.CANVAS)
        n_unique = tok.fit(imgs, iters=3, generator=torch.Generator().manual_seed(0))
        self.assertGreater(n_unique, 32)                                     # so k-means really ran
        codes = tok.encode(imgs)
        self.assertTrue(0 <= int(codes.min()) and int(codes.max()) < 32)
        err = (tok.decode(codes).float() - torch.from_numpy(imgs).float()).abs().mean()
        self.assertLess(float(err), 40.0)                                    # far better than random codes
        with self.assertRaises(ValueError):
            tok.encode(np.zeros((2, 16, 16, 3), np.uint8))


class TestTransformer(unittest.TestCase):

    def setUp(self):
        self.vocab = data.Vocab(64)
        self.model = tiny_model(self.vocab)
        rng = random.Random(0)
        seqs = []
        for task in ("caption", "exists", "full", "two"):
            e = data.sample_example(rng, "train", task)
            codes = [rng.randrange(64) for _ in range(9)]
            seqs.append(data.gen_sequence(self.vocab, codes, e.question) if e.is_gen
                        else data.und_sequence(self.vocab, codes, e.question, e.answer))
        ids, labels = data.collate(seqs, self.vocab.pad)
        self.ids, self.labels = torch.from_numpy(ids), torch.from_numpy(labels)

    def test_forward_shape(self):
        logits = self.model(self.ids)
        self.assertEqual(tuple(logits.shape), (*self.ids.shape, self.vocab.size))
        with self.assertRaises(ValueError):
            self.model(torch.zeros(1, self.model.cfg.block_size + 1, dtype=torch.long))

    def test_loss_only_on_labelled_positions(self):
        logits = self.model(self.ids).detach().requires_grad_(True)
        sequence_logps(logits, self.labels).sum().backward()
        target_next = self.labels[:, 1:] != -100                            # logits t predict token t+1
        self.assertTrue(torch.all(logits.grad[:, :-1][~target_next] == 0))
        self.assertTrue(torch.all(logits.grad[:, -1] == 0))
        self.assertTrue(all(logits.grad[:, :-1][target_next].abs().sum(-1) > 0))
        # the SFT loss ignores the padding: a longer pad tail changes nothing
        task = torch.tensor([0, 4, -1, -1])   # caption, exists, then two generation
        loss = sft.sft_loss(self.model, self.ids, self.labels, task)[0]
        pad = torch.full((4, 5), self.vocab.pad)
        longer = sft.sft_loss(self.model, torch.cat([self.ids, pad], 1),
                                torch.cat([self.labels, torch.full((4, 5), -100)], 1), task)[0]
        torch.testing.assert_close(loss, longer)
        # cut into two groups of similar length: the same log-probs and the same gradients
        x = torch.cat([self.ids, pad], 1)
        y = torch.cat([self.labels, torch.full((4, 5), -100)], 1)
        y[1, -3:], x[1, -3:] = 7, 7                        # one long sequence among short ones
        self.model.zero_grad()
        full = sequence_logps(self.model(x), y)
        full.sum().backward()
        g_full = [p.grad.clone() for p in self.model.parameters()]
        self.model.zero_grad()
        cut = model.chunked_logps(self.model, x, y)
        cut.sum().backward()
        torch.testing.assert_close(cut, full, rtol=1e-5, atol=1e-5)
        for a, b in zip(g_full, (p.grad for p in self.model.parameters())):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
        self.assertEqual(model.lengths(y).tolist(), [int(r.nonzero().max()) + 1 for r in (y != -100)])

    def test_sft_loss_weighting(self):
        task = torch.tensor([0, 4, -1, -1])                 # caption, exists, then two generation
        logps = sequence_logps(self.model(self.ids), self.labels)
        ntok = (self.labels[:, 1:] != -100).sum(1)
        self.assertGreater(int(ntok[0]), 3 * int(ntok[1]))  # a caption has many more targets than a yes/no
        gen = -(logps[2] + logps[3]) / (ntok[2] + ntok[3])
        want = {"tokens": -(logps[0] + logps[1]) / (ntok[0] + ntok[1]),
                "tasks": (-logps[0] / ntok[0] - logps[1] / ntok[1]) / 2,
                "groups": (-logps[0] / ntok[0] - logps[1] / ntok[1]) / 2}
        for mode, und_want in want.items():
            loss, und, g = sft.sft_loss(self.model, self.ids, self.labels, task, mode)
            torch.testing.assert_close(und, und_want)
            torch.testing.assert_close(g, gen)
            torch.testing.assert_close(loss, und + g)
        with self.assertRaises(ValueError):
            sft.sft_loss(self.model, self.ids, self.labels, task, "words")

    def test_cell_embedding_names_each_image_tokens_cell(self):
        v, m = self.vocab, self.model
        table = m.embedding_table().detach()
        for prompt in (["a", "circle"], "top left red circle , bottom right blue square".split()):
            ids = torch.tensor([data.gen_sequence(v, list(range(9)), prompt)[0]])
            emb = m.cell_embedding(ids, table)[0]                        # (T, C)
            start = len(data.gen_prompt(v, prompt))
            self.assertEqual(float(emb[:start].abs().sum()), 0.0)          # text: nothing added
            self.assertEqual(float(emb[start + 9:].abs().sum()), 0.0)      # <eoi>
            for k, (r, c) in enumerate([("top", "left"), ("top", "center"), ("top", "right"),
                                        ("middle", "left"), ("middle", "center"), ("middle", "right"),
                                        ("bottom", "left"), ("bottom", "center"), ("bottom", "right")]):
                torch.testing.assert_close(emb[start + k], table[v.encode([r])[0]] + table[v.encode([c])[0]])
        self.assertEqual(list(data.cell_word_ids(v, 6)[7]), v.encode(["top", "left"]))   # 6x6: 2x2 tokens per cell
        self.assertEqual(list(data.cell_word_ids(v, 6)[35]), v.encode(["bottom", "right"]))

    def test_restricted_decoding(self):
        v = self.vocab
        with torch.no_grad():                  # make the model prefer the forbidden kind of token
            self.model.wte.weight[v.n_text:] *= 50
        text = torch.zeros(v.size, dtype=torch.bool)
        text[v.text_ids] = True
        x = self.ids[:1, :15]
        out = self.model.generate(x.repeat(8, 1), 20, text, temperature=1.0, stop=v.end,
                                  generator=torch.Generator().manual_seed(0))
        self.assertTrue(text[out].all())
        image = ~text
        image[:v.n_text] = False
        prompt = torch.tensor([data.gen_prompt(v, ["a", "circle"])] * 8)
        out = self.model.generate(prompt, 9, image, temperature=1.0, top_k=5,
                                  generator=torch.Generator().manual_seed(0))
        self.assertTrue(image[out].all() and out.shape == (8, 9))

    def test_cached_equals_uncached(self):
        v = self.vocab
        image = torch.zeros(v.size, dtype=torch.bool)
        image[v.image_ids] = True
        prompt = torch.tensor([data.gen_prompt(v, "a red circle and a blue square".split())] * 3)
        uncond = torch.tensor([data.gen_prompt(v, [])] * 3)
        for temperature in (0.0, 1.0):
            outs = [self.model.generate(prompt, 9, image, temperature, top_k=50, uncond_idx=uncond,
                                        cfg_scale=2.0, use_cache=c, generator=torch.Generator().manual_seed(1))
                    for c in (True, False)]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        text = torch.zeros(v.size, dtype=torch.bool)
        text[v.text_ids] = True
        outs = [self.model.generate(self.ids[:2, :15], 25, text, 0.0, stop=v.end, use_cache=c) for c in (True, False)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)

    def test_logits_at_some_positions_only(self):
        at = torch.rand(self.ids.shape, generator=torch.Generator().manual_seed(0)) < 0.3
        with torch.no_grad():
            torch.testing.assert_close(self.model(self.ids, at=at), self.model(self.ids)[at], rtol=1e-5, atol=1e-5)

    def test_kv_cache_is_one_buffer_filled_in_place(self):
        v = self.vocab
        cache = [model.KVCache(12) for _ in self.model.blocks]
        with torch.no_grad():
            self.model(self.ids[:2, :10], cache)
            self.assertEqual([c.len for c in cache], [10] * len(cache))
            buf = cache[0].k
            self.model(self.ids[:2, 10:11], cache)
            self.assertIs(cache[0].k, buf)                   # written in place, not re-allocated
            self.assertEqual(cache[0].len, 11)
            self.model(self.ids[:2, 11:12], cache)
            with self.assertRaisesRegex(ValueError, "full"):
                self.model(self.ids[:2, 12:13], cache)
            with self.assertRaisesRegex(ValueError, "one token at a time"):
                self.model(self.ids[:2, 10:12], cache)
        self.assertEqual(tuple(buf.shape), (2, self.model.cfg.n_head, 12, self.model.cfg.n_embd // self.model.cfg.n_head))

    def test_sampler_draws_the_given_distribution(self):
        probs = torch.tensor([[0.0, 0.5, 0.0, 0.3, 0.2], [1.0, 0.0, 0.0, 0.0, 0.0]]).repeat(20000, 1)
        got = model.sample(probs, torch.Generator().manual_seed(0)).view(-1, 2)
        freq = torch.bincount(got[:, 0], minlength=5).float() / len(got)
        # 20000 draws: the standard error of a frequency is <= 0.0036; zero-probability entries never come
        torch.testing.assert_close(freq, probs[0], rtol=0, atol=0.015)
        self.assertTrue((got[:, 1] == 0).all())
        self.assertEqual(freq[0].item() + freq[2].item(), 0.0)
        unnormalised = model.sample(torch.tensor([[0.0, 2.0, 6.0]]).repeat(4000, 1), torch.Generator().manual_seed(1))
        self.assertAlmostEqual((unnormalised == 2).float().mean().item(), 0.75, delta=0.03)

    def test_bf16_autocast_path(self):
        task = torch.tensor([0, 4, -1, -1])   # caption, exists, then two generation
        self.model.train()
        with amp_context("cpu", "bfloat16"):
            loss, und, gen = sft.sft_loss(self.model, self.ids, self.labels, task)
        loss.backward()
        self.assertTrue(torch.isfinite(loss) and und > 0 and gen > 0)
        self.assertTrue(all(torch.isfinite(p.grad).all() for p in self.model.parameters() if p.grad is not None))
        with amp_context("cpu", "float32"):
            loss32 = sft.sft_loss(self.model, self.ids, self.labels, task)[0]
        self.assertLess(abs(loss.item() - loss32.item()) / loss32.item(), 0.05)


class TestSFTBatch(unittest.TestCase):
    """The phases of SFT's data: the primer (colour, count and yes/no questions only), understanding
    only, then the mix with generation."""

    def test_phases(self):
        tok = PatchTokenizer(64, 8, world.CANVAS)
        tok.codebook.copy_(torch.rand(64, 192))
        vocab = data.Vocab(tok.n_codes)
        args = Namespace(batch_size=40, und_frac=0.75, caption_noise=1.0, cooc=world.COOC, cfg_drop=0.1, turns=4,
                         device="cpu")
        rng = random.Random(0)
        openings = {"describe": "caption", "what colour": "colour", "what shape": "shape", "how many": "count",
                    "is there": "exists"}

        def asked(row):   # the tasks of the questions of an understanding sequence
            text = " ".join(w for w in vocab.decode(row) if not w.startswith("<img"))
            questions = [chunk.split("> ")[-1] for chunk in text.split(" <ans>")[:-1]]   # after <eoi> / <end>
            return {t for q in questions for o, t in openings.items() if q.startswith(o)}

        for und_only, tasks in ((True, sft.PRIMER_TASKS), (True, data.UND_TASKS), (False, data.UND_TASKS)):
            seen, n_gen = set(), 0
            for _ in range(5):
                ids, labels, task = sft.sft_batch(rng, tok, vocab, args, und_only=und_only, tasks=tasks)
                n_gen += int((task < 0).sum())
                for row, t in zip(ids.tolist(), task.tolist()):
                    if t >= 0:
                        got = asked(row)
                        self.assertIn(data.UND_TASKS[t], got)
                        seen |= got
            # a colour question about a scene with no unique shape becomes a shape question (data.und_example)
            self.assertEqual(seen - {"shape"}, set(tasks) - {"shape"})     # each task asked, no other
            self.assertEqual(n_gen, 0 if und_only else 5 * 10)    # 25% of 40 is generation


class TestSFTSchedule(unittest.TestCase):

    def test_warmup_stable_decay(self):
        args = Namespace(lr=1e-3, warmup=100, steps=1000, decay=0.2)
        self.assertAlmostEqual(sft.sft_lr(0, args), 1e-5)                   # warm-up starts at lr / 100
        for step in (99, 500, 800):                                          # the peak until 80% of the run
            self.assertAlmostEqual(sft.sft_lr(step, args), 1e-3)
        self.assertAlmostEqual(sft.sft_lr(900, args), 0.55e-3)              # half-way down the cosine
        self.assertAlmostEqual(sft.sft_lr(1000, args), 1e-4)                # 10% of the peak at the end
        args.decay = 1.0                                                     # the cosine over the whole run
        for step in (100, 400, 1000):
            self.assertAlmostEqual(sft.sft_lr(step, args), 1e-3 * (0.1 + 0.45 * (1 + math.cos(math.pi * step / 1000))))


class TestHelp(unittest.TestCase):
    def test_help_groups_the_flags_and_shows_every_default(self):
        text = train.parser.format_help()
        groups = [ln for ln in text.splitlines() if ln and not ln.startswith(" ") and ln.endswith(":")]
        self.assertGreaterEqual(len(groups) - 1, 6, groups)                  # (less 'options:', the -h group)
        self.assertIn("--beta BETA", text)
        self.assertRegex(text, r"--beta BETA +DPO / mDPO / DAMA beta \(default: 0.1\)")
        self.assertRegex(text, r"--seed SEED .*\(default: 0\)")                     # a default of 0 is shown too
        self.assertRegex(text.replace("\n", " "), r"--steps STEPS +SFT optimizer steps \(from the preset: tiny/quick 3000")
        for action in train.parser._actions:                                # every flag says its default or its source
            if action.default is None and action.help:
                self.assertTrue("preset" in action.help or "default" in action.help, action.option_strings)


class TestPipeline(unittest.TestCase):
    """Every stage end to end for a few steps, then resume, then bad input."""

    def test_smoke_all_stages_and_resume(self):
        with tempfile.TemporaryDirectory() as d:
            tiny = ["--out_dir", d, "--tok_images", "300", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                    "--batch_size", "8", "--log_every", "1", "--eval_n", "4", "--device", "cpu",
                    "--pairs", "12", "--pref_steps", "2", "--pref_batch", "4", "--pref_seeds", "1",
                    "--gen_pairs", "6", "--diag_every", "1", "--joint_steps", "2", "--joint_eval_n", "4",
                    "--probe_steps", "2", "--probe_n", "4", "--self_prompts", "8", "--self_steps", "2"]
            train.main(["--stage", "all", "--steps", "3"] + tiny)
            for f in ("tokenizer.pt", "sft.pt", "log.txt", "eval_sft.json", "eval_sft.md", "eval_sft.png",
                      "compare.md", "compare.json", "compare.png", "pref_mdpo_s0.pt", "study.md", "study.json",
                      "probes.md", "probes.json", "run.json", "report.md", "report.json", "curves.png",
                      "headline.png"):
                self.assertTrue(os.path.exists(os.path.join(d, f)), f)
            self.assertFalse([f for f in os.listdir(d) if f.endswith(".tmp")])
            with open(os.path.join(d, "report.md")) as f:
                text = f.read()
            for section in ("## SFT", "## Preference optimisation for understanding", "curves.png", "headline.png",
                            "## Preference optimisation for generation", "## Does understanding inform generation?",
                            "| whole run |", "Preset `quick`, dtype float32"):
                self.assertIn(section, text)
            # where the time goes: each stage's tokens and FLOPs (6 x parameters a trained token, 2 an inferred one)
            stages = report.read_json(os.path.join(d, "run.json"))["stages"]
            n = sum(p.numel() for p in checkpoint.load_model(os.path.join(d, "sft.pt"), "cpu")[0].parameters())
            for name, rec in stages.items():
                self.assertAlmostEqual(rec["flops"], n * (6 * rec["trained_tokens"] + 2 * rec["inferred_tokens"]),
                                       delta=1e-6 * rec["flops"] + 1, msg=name)
                self.assertGreater(rec["peak_flops"], 0, name)
            self.assertEqual(stages["eval"]["trained_tokens"], 0)
            self.assertGreater(stages["eval"]["inferred_tokens"], 0)
            self.assertEqual(stages["tokenizer"]["flops"], 0)
            for name in ("sft", "pref", "joint", "probe"):
                self.assertGreater(stages[name]["trained_tokens"], 0, name)
            self.assertEqual(stages["all"]["flops"], sum(v["flops"] for k, v in stages.items() if k != "all"))
            self.assertRegex(text, r"\| whole run \| .* \| [0-9.]+M \| [0-9.]+M \| [0-9.]+ \| \d+% of \d+ GFLOP/s \|")
            # the report is rebuilt from out/ alone, identically (but for nothing: no training runs)
            train.main(["--stage", "report", "--out_dir", d, "--device", "cpu"])
            with open(os.path.join(d, "report.md")) as f:
                self.assertEqual(f.read(), text)
            ck = torch.load(os.path.join(d, "sft.pt"), weights_only=True)
            self.assertEqual(ck["step"], 3)
            self.assertTrue({"model", "optimizer", "config", "step", "rng", "tokenizer"} <= set(ck))
            train.main(["--stage", "sft", "--steps", "5", "--resume", "--dtype", "bfloat16"] + tiny)
            # a new SFT model: the stages' results now come from another one, and the report refuses to mix them
            with self.assertRaisesRegex(checkpoint.Refused, "eval_sft.json was made from another SFT model"):
                train.main(["--stage", "report", "--out_dir", d, "--device", "cpu"])
            self.assertEqual(torch.load(os.path.join(d, "sft.pt"), weights_only=True)["step"], 5)
            with open(os.path.join(d, "log.txt")) as f:
                log = f.read()
            self.assertIn("resumed at step 3", log)
            self.assertIn("step 5 | loss", log)

    def test_tiny_preset_runs_its_stages_and_reports_the_rest_as_not_run(self):
        with tempfile.TemporaryDirectory() as d:
            small = ["--out_dir", d, "--tok_images", "300", "--n_layer", "1", "--n_head", "2", "--n_embd", "32",
                     "--batch_size", "8", "--steps", "3", "--primer", "1", "--und_first", "2", "--eval_n", "4",
                     "--device", "cpu", "--pairs", "12", "--pref_steps", "2", "--pref_batch", "4"]
            train.main(["--preset", "tiny"] + small)
            self.assertFalse(os.path.exists(os.path.join(d, "study.json")))      # tiny: no joint study, no probes
            with open(os.path.join(d, "compare.md")) as f:
                compare = f.read()
            for row in ("| sft |", "| dpo |", "| mdpo |", "| dama |"):
                self.assertIn(row, compare)
            self.assertNotIn("| dpo_noimage |", compare)
            self.assertRegex(compare, r"SFT hallucinates [0-9.]+ of the objects it names .*; DPO .*; mDPO .*; DAMA ")
            with open(os.path.join(d, "report.md")) as f:
                text = f.read()
            self.assertIn("Preset `tiny`", text)
            self.assertIn("Not part of preset `tiny`: `python train.py --stage joint`", text)
            self.assertIn("Not part of preset `tiny`: `python train.py --stage probe`", text)
            self.assertEqual(set(report.read_json(os.path.join(d, "run.json"))["stages"]),
                             {"tokenizer", "sft", "eval", "pref", "all"})
            with self.assertRaisesRegex(checkpoint.Refused, "unknown 'nonsense'; choose all, or from dpo, mdpo"):
                train.main(["--stage", "pref", "--method", "dpo,nonsense"] + small)

    def test_bad_input_is_refused(self):
        with tempfile.TemporaryDirectory() as d:
            for argv in (["--steps", "0"], ["--n_embd", "30", "--n_head", "4"], ["--caption_noise", "2"]):
                with self.assertRaises(SystemExit):
                    train.main(argv + ["--out_dir", d])
            with self.assertRaisesRegex(checkpoint.Refused, "no tokenizer at"):
                train.main(["--stage", "sft", "--resume", "--out_dir", d])   # no tokenizer there yet
            with self.assertRaisesRegex(checkpoint.Refused, r"run.json is missing; run `python train.py"):
                train.main(["--stage", "report", "--out_dir", d, "--device", "cpu"])
            with self.assertRaisesRegex(checkpoint.Refused, "no checkpoint at"):
                checkpoint.load_model(os.path.join(d, "missing.pt"), "cpu")
            bad = os.path.join(d, "other_vocab.pt")       # a checkpoint of another vocabulary
            torch.save({"model_config": {"vocab_size": 3}, "n_codes": 8}, bad)
            with self.assertRaisesRegex(checkpoint.Refused, "vocabulary of 3 tokens"):
                checkpoint.load_model(bad, "cpu")


if __name__ == "__main__":
    unittest.main()
