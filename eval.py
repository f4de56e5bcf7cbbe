"""
Evaluate a checkpoint exactly against the world's ground truth; no model judges another.

    python eval.py --ckpt out/sft.pt            # writes out/eval_sft.{json,md,png}

Understanding, on held-out 'test' scenes (ordinary), 'bias' scenes (a cue without its
companion) and 'combo' scenes (held-out colour+shape combinations): answer accuracy per question
type, caption exact match, per-object precision / recall, and hallucination of captions
(CHAIR_i, CHAIR_s, Cover; defined in caption_scores and in the README). Generation, GenEval-style with the scene
parser as the detector: six tasks and their unweighted mean, greedy and at temperature 1.0.
The hallucination benchmark of the preference stage (`hallucination`, `compare_table`) is
run by `python train.py --stage pref`.
"""
import argparse
import glob
import json
import os
import random
import time
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

import data
import pictures
import report
import world
from checkpoint import auto_dtype, command_line, file_digest, load_model, pick_device, writable, write_atomic
from losses import sequence_logps
from model import amp_context


def _batches(items, key, size):
    """Group items by `key` (a prompt length) so every batch is rectangular: no padding needed."""
    groups = defaultdict(list)
    for i, it in enumerate(items):
        groups[key(it)].append(i)
    for idx in groups.values():
        for k in range(0, len(idx), size):
            yield idx[k:k + size]


def scene_codes(tok, scenes):
    """The tokenizer codes of each scene's render, a list of lists ([] for a scene that is None)."""
    codes = [[] for _ in scenes]
    seen = [i for i, s in enumerate(scenes) if s is not None]
    if seen:
        for i, c in zip(seen, tok.encode(np.stack([world.render(scenes[i]) for i in seen])).tolist()):
            codes[i] = c
    return codes


@torch.no_grad()
def answer(model, tok, vocab, exs, device, dtype="float32", temperature=0.0, max_new=32,
           generator=None, batch=256, codes=None):
    """Understanding: one answer (a list of words) per example; decoding restricted to text.
    The image is the render of each example's scene (none if the scene is None: a text-only
    question), or `codes`, one list of tokenizer codes per example (e.g. a generated image)."""
    if codes is None:
        codes = scene_codes(tok, [e.scene for e in exs])
    prompts = [data.und_prompt(vocab, c, e.question) for e, c in zip(exs, codes)]
    allowed = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    allowed[vocab.text_ids] = True
    out = [None] * len(exs)
    for idx in _batches(prompts, len, batch):
        x = torch.tensor([prompts[i] for i in idx], device=device)
        with amp_context(device, dtype):
            y = model.generate(x, max_new, allowed, temperature, stop=vocab.end, generator=generator)
        for i, row in zip(idx, y.tolist()):
            row = row[:row.index(vocab.end)] if vocab.end in row else row
            out[i] = vocab.decode(row)
    return out


@torch.no_grad()
def draw(model, tok, vocab, prompts, device, dtype="float32", temperature=0.0, cfg_scale=0.0,
         generator=None, batch=256, use_cache=True, return_codes=False):
    """Generation: one (H, W, 3) uint8 image per prompt (list of words); decoding restricted
    to image codes, classifier-free guidance against the prompt-less request.
    return_codes: also return the sampled tokenizer codes, a list of lists."""
    seqs = [data.gen_prompt(vocab, p) for p in prompts]
    allowed = torch.zeros(vocab.size, dtype=torch.bool, device=device)
    allowed[vocab.image_ids] = True
    n = tok.grid ** 2
    imgs = np.zeros((len(prompts), tok.canvas, tok.canvas, 3), np.uint8)
    all_codes = [None] * len(prompts)
    for idx in _batches(seqs, len, batch):
        x = torch.tensor([seqs[i] for i in idx], device=device)
        uncond = torch.tensor([data.gen_prompt(vocab, [])] * len(idx), device=device) if cfg_scale else None
        with amp_context(device, dtype):
            codes = model.generate(x, n, allowed, temperature, uncond_idx=uncond, cfg_scale=cfg_scale,
                                   use_cache=use_cache, generator=generator)
        imgs[idx] = tok.decode(codes - vocab.n_text).cpu().numpy()
        for i, row in zip(idx, (codes - vocab.n_text).tolist()):
            all_codes[i] = row
    return (imgs, all_codes) if return_codes else imgs


def caption_scores(exs, preds):
    """Exact match, per-object precision / recall on (colour, shape, cell), and hallucination:
    CHAIR_i = hallucinated object mentions / all mentions (pooled); CHAIR_s = captions with a
    hallucinated object / captions mentioning any object; Cover = ground-truth objects
    mentioned / all ground-truth objects (pooled). An object is a colour+shape kind."""
    tp = n_pred = n_gold = mentions = halluc = resp = resp_h = covered = gold_kinds = exact = 0
    for e, p in zip(exs, preds):
        gold = {(o.colour, o.shape, o.cell) for o in e.scene}
        kinds = {o.kind for o in e.scene}
        said = world.parse_caption(p)
        exact += p == e.answer
        tp, n_pred, n_gold = tp + len(gold & set(said)), n_pred + len(said), n_gold + len(gold)
        bad = sum((c, s) not in kinds for c, s, _ in said)
        mentions, halluc = mentions + len(said), halluc + bad
        resp, resp_h = resp + bool(said), resp_h + (bad > 0)
        covered += len(kinds & {(c, s) for c, s, _ in said})
        gold_kinds += len(kinds)
    return {"exact": exact / len(exs), "obj_precision": tp / max(n_pred, 1), "obj_recall": tp / n_gold,
            "CHAIR_i": halluc / max(mentions, 1), "CHAIR_s": resp_h / max(resp, 1),
            "Cover": covered / gold_kinds, "length": float(np.mean([len(p) for p in preds]))}


def eval_understanding(model, tok, vocab, split, n, device, dtype, seed, tasks=data.UND_TASKS):
    rng = random.Random(seed)
    res, samples = {}, []
    for task in tasks:
        exs = [data.und_example(rng, world.sample_scene(rng, split), task) for _ in range(n)]
        preds = answer(model, tok, vocab, exs, device, dtype)
        if task == "caption":
            res.update({f"caption_{k}": v for k, v in caption_scores(exs, preds).items()})
            samples = list(zip(exs[:8], preds[:8]))
        else:
            res[task] = float(np.mean([p == e.answer for e, p in zip(exs, preds)]))
    res["answer_acc"] = float(np.mean([res[t] for t in tasks if t != "caption"]))
    return res, samples


def eval_generation(model, tok, vocab, split, n, device, dtype, seed, temperature, cfg_scale):
    rng = random.Random(seed)
    g = torch.Generator(device=device).manual_seed(seed)
    res, samples = {}, []
    for task in data.GEN_TASKS:
        exs = [data.gen_example(rng, split, task) for _ in range(n)]
        imgs = draw(model, tok, vocab, [e.question for e in exs], device, dtype, temperature, cfg_scale, g)
        res[task] = float(np.mean([world.geneval_correct(e, world.parse(im)) for e, im in zip(exs, imgs)]))
        samples += list(zip(exs[:2], imgs[:2]))
    res["overall"] = float(np.mean([res[t] for t in data.GENEVAL_TASKS]))   # GenEval: unweighted
    return res, samples


def run(ckpt, args):
    """Evaluate `ckpt`; write eval_<name>.json / .md / .png beside it (or in args.out_dir)."""
    model, tok, vocab, ck = load_model(ckpt, args.device)
    name = os.path.splitext(os.path.basename(ckpt))[0]
    t0, n = time.perf_counter(), args.eval_n
    res = {"checkpoint": ckpt, "digest": file_digest(ckpt), "step": ck.get("step"), "n_per_task": n, "cfg_scale": args.cfg_scale,
           "understanding": {}, "generation": {}}
    for split in ("test", "bias", "combo"):
        res["understanding"][split], samples = eval_understanding(
            model, tok, vocab, split, n, args.device, args.dtype, args.eval_seed)
        if split == "bias":
            captions = samples[:4]
        if split == "test":
            test_captions = samples[:4]
    for split, temp in (("test", 0.0), ("test", 1.0), ("combo", 0.0)):
        res["generation"][f"{split} T={temp:g}"], s = eval_generation(
            model, tok, vocab, split, n, args.device, args.dtype, args.eval_seed, temp, args.cfg_scale)
        if split == "test" and temp == 0.0:
            drawings = s
    res["seconds"] = time.perf_counter() - t0
    out = os.path.join(args.out_dir, f"eval_{name}")
    write_atomic(out + ".json", json.dumps(res, indent=1))
    write_atomic(out + ".md", report.sft_markdown(res))
    pictures.eval_picture(out + ".png", [("Captions of held-out scenes (test split)", test_captions),
                                         ("Captions of bias-breaking scenes (bias split)", captions)], drawings)
    print(report.sft_markdown(res))
    print(f"eval | {ckpt} in {res['seconds']:.0f} s -> {out}.json / .md / .png")
    return res


# -----------------------------------------------------------------------------
# the hallucination benchmark (preference optimisation for understanding)

def pope(model, tok, vocab, split, n, device, dtype, seed, freq, pairs):
    """POPE: 'is there a <colour> <shape> ?', half present. Negatives: random absent kinds,
    popular (the 3 absent kinds most frequent in training) or adversarial (the 3 absent kinds
    that co-occur most with a present object in training). 'yes' is the positive class."""
    res = {}
    for mode in ("random", "popular", "adversarial"):
        rng = random.Random(seed)
        exs = []
        for i in range(n):
            s = world.sample_scene(rng, split)
            present = sorted({o.kind for o in s})
            absent = [k for k in world.TRAIN_KINDS if k not in present]
            if mode == "popular":
                absent = sorted(absent, key=lambda k: -freq[k])[:3]
            elif mode == "adversarial":
                absent = sorted(absent, key=lambda k: -max(pairs[(a, k)] for a in present))[:3]
            kind, ans = (rng.choice(present), "yes") if i % 2 == 0 else (rng.choice(absent), "no")
            exs.append(data.Example("exists", s, f"is there a {kind[0]} {kind[1]} ?".split(), [ans]))
        said = [p == ["yes"] for p in answer(model, tok, vocab, exs, device, dtype)]
        gold = [e.answer == ["yes"] for e in exs]
        tp = sum(s and g for s, g in zip(said, gold))
        prec, rec = tp / max(sum(said), 1), tp / max(sum(gold), 1)
        res[mode] = {"accuracy": float(np.mean([s == g for s, g in zip(said, gold)])), "precision": prec,
                     "recall": rec, "F1": 2 * prec * rec / max(prec + rec, 1e-9), "yes_ratio": float(np.mean(said))}
    return res


@torch.no_grad()
def mean_token_logps(model, vocab, seqs, device, dtype, batch=256):
    """[(ids, labels), ...] -> (N,) float32 on the CPU: the mean log-prob of each sequence's labelled tokens."""
    out = []
    for k in range(0, len(seqs), batch):
        ids, labels = (torch.from_numpy(a).to(device) for a in data.collate(seqs[k:k + batch], vocab.pad))
        with amp_context(device, dtype):
            lp = sequence_logps(model(ids), labels).float()
        out.append((lp / (labels[:, 1:] != -100).sum(1)).cpu())
    return torch.cat(out)


def image_reliance(model, tok, vocab, split, n, device, dtype, seed):
    """Mean per-token log-likelihood of the true caption with the real image minus with a corrupted
    one (mDPO's crop). Near 0 = the model answers from the text alone."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, split) for _ in range(n)]
    imgs = np.stack([world.render(s) for s in scenes])
    crops = np.stack([data.corrupt_image(rng, im)[0] for im in imgs])
    lp = [mean_token_logps(model, vocab, [data.und_sequence(vocab, c, ["describe"], world.caption_words(s))
                                          for c, s in zip(tok.encode(x).tolist(), scenes)], device, dtype)
          for x in (imgs, crops)]
    return (lp[0] - lp[1]).mean().item()


def captions(model, tok, vocab, split, n, device, dtype, seed):
    """Greedy captions of n held-out scenes of `split`: (examples, predicted words)."""
    rng = random.Random(seed)
    exs = [data.und_example(rng, world.sample_scene(rng, split), "caption") for _ in range(n)]
    return exs, answer(model, tok, vocab, exs, device, dtype)


def hallucination(model, tok, vocab, n, device, dtype, seed, stats):
    """Captions on ordinary ('test') and bias-breaking ('bias') held-out scenes: CHAIR_s, CHAIR_i,
    Cover, Hal, Cog and length; POPE three ways; answer accuracy (the alignment tax); image reliance."""
    freq, pairs = stats
    res = {}
    for split in ("test", "bias"):
        exs, preds = captions(model, tok, vocab, split, n, device, dtype, seed)
        r = caption_scores(exs, preds)
        r["Hal"] = float(np.mean([world.hallucinated_mentions(e.scene, p) > 0 for e, p in zip(exs, preds)]))
        prone = [world.prone_kinds(e.scene, freq, pairs) for e in exs]
        mentions = [[(c, s) for c, s, _ in world.parse_caption(p)] for p in preds]
        r["Cog"] = sum(k in pr for m, pr in zip(mentions, prone) for k in m) / max(sum(map(len, mentions)), 1)
        r["POPE"] = pope(model, tok, vocab, split, n, device, dtype, seed, freq, pairs)
        und = eval_understanding(model, tok, vocab, split, n, device, dtype, seed, tasks=data.UND_TASKS[1:])[0]
        r.update({"answer_acc": und["answer_acc"], **{"answer_" + t: und[t] for t in data.UND_TASKS[1:]}})
        r["image_reliance"] = image_reliance(model, tok, vocab, split, n, device, dtype, seed)
        res[split] = r
        res[split + "_samples"] = [(e.scene, p) for e, p in zip(exs[:6], preds[:6])]
    return res


COMPARE_COLS = [("bias", "CHAIR_s"), ("bias", "CHAIR_i"), ("bias", "Cover"), ("bias", "Cog"), ("bias", "length"),
                ("bias", "POPE adversarial F1"), ("test", "CHAIR_i"), ("test", "Cover"), ("test", "answer_acc"),
                ("bias", "image_reliance")]


def compare_value(r, split, col):
    if col.startswith("POPE"):
        _, mode, metric = col.split()
        return r[split]["POPE"][mode][metric]
    return r[split][col]


def compare_table(rows):
    """rows: {name: [hallucination() result per seed]} -> the comparison's Markdown table."""
    return report.seed_table(rows, COMPARE_COLS, lambda r, c: compare_value(r, *c),
                      [f"{s} {c}" for s, c in COMPARE_COLS], first="method")


def headline(rows):
    """The comparison in one sentence, from its own numbers: what DPO and mDPO did to hallucination
    (bias CHAIR_i) and to how much of the scene a caption covers (bias Cover), against SFT. A method
    'says less' if its Cover fell by more than 0.05, 'keeps Cover' within 0.02 (means over seeds)."""
    mean = {name: {c: sum(r["bias"][c] for r in rs) / len(rs) for c in ("CHAIR_i", "Cover")} for name, rs in rows.items()}
    sft = mean["sft"]
    parts = [f"SFT hallucinates {sft['CHAIR_i']:.3f} of the objects it names (bias CHAIR_i; Cover {sft['Cover']:.3f})"]
    for name, label in (("dpo", "DPO"), ("mdpo", "mDPO"), ("dama", "DAMA")):
        if name in mean:
            m, drop = mean[name], sft["Cover"] - mean[name]["Cover"]
            how = "by saying less" if drop > 0.05 else "and keeps Cover" if abs(drop) <= 0.02 else "and loses some Cover"
            verb = "lowers it" if m["CHAIR_i"] < sft["CHAIR_i"] else "does not lower it"
            parts.append(f"{label} {verb} to {m['CHAIR_i']:.3f} {how} (Cover {m['Cover']:.3f})")
    return "; ".join(parts) + "."


def rebuild_comparison(out_dir, args):
    """The comparison table again, from the checkpoints in out_dir (sft.pt, pref_<slug>_s<seed>.pt: rows by slug)."""
    rows, stats = {}, None
    paths = [os.path.join(out_dir, "sft.pt")] + sorted(glob.glob(os.path.join(out_dir, "pref_*_s*.pt")))
    for path in paths:
        model, tok, vocab, ck = load_model(path, args.device)
        stats = stats or world.training_statistics(cooc=ck["config"].get("cooc"))   # the run's own bias
        r = hallucination(model, tok, vocab, args.eval_n, args.device, args.dtype, args.eval_seed, stats)
        rows.setdefault(ck.get("row", ck.get("method", "sft")), []).append(r)
    table = compare_table(rows)
    write_atomic(os.path.join(out_dir, "compare_rebuilt.md"), table)
    print(table)
    return rows


# -----------------------------------------------------------------------------
# the joint study's measurements: KL from the reference, and what the KV cache saves

@torch.no_grad()
def kl_per_token(policy, ref, vocab, seqs, device, dtype):
    """Mean over labelled positions of KL(policy || reference) of the next-token distributions."""
    ids, labels = (torch.from_numpy(a).to(device) for a in data.collate(seqs, vocab.pad))
    with amp_context(device, dtype):
        lp, lq = (F.log_softmax(m(ids)[:, :-1].float(), -1) for m in (policy, ref))
    kl = (lp.exp() * (lp - lq)).sum(-1)                                 # (B, T-1)
    return kl[labels[:, 1:] != -100].mean().item()


def kl_sequences(tok, vocab, n, seed):
    """Held-out sequences for the KL: true captions of test scenes, and test prompts with their true images."""
    rng = random.Random(seed)
    scenes = [world.sample_scene(rng, "test") for _ in range(n)]
    exs = [data.gen_example(rng, "test", rng.choice(data.GEN_TASKS)) for _ in range(n)]
    codes = tok.encode(np.stack([world.render(s) for s in scenes] + [world.render(e.scene) for e in exs])).tolist()
    und = [data.und_sequence(vocab, c, ["describe"], world.caption_words(s)) for c, s in zip(codes, scenes)]
    gen = [data.gen_sequence(vocab, c, e.question) for c, e in zip(codes[n:], exs)]
    return {"und": und, "gen": gen}


def kv_cache_speedup(model, tok, vocab, args, n=256):
    """Seconds to draw n images with CFG at the study's temperature, with and without the KV cache."""
    prompts = [data.gen_example(random.Random(i), "test", "full").question for i in range(n)]
    t = {}
    if args.device.startswith("cuda"):   # CUDA's first kernels pay for their set-up: not in either time
        draw(model, tok, vocab, prompts[:8], args.device, args.dtype, args.gen_temperature, args.cfg_scale,
             torch.Generator(device=args.device).manual_seed(0))
    for use_cache in (True, False):
        if args.device.startswith("cuda"):   # the clock starts when the device is idle
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        draw(model, tok, vocab, prompts, args.device, args.dtype, args.gen_temperature, args.cfg_scale,
                        torch.Generator(device=args.device).manual_seed(0), use_cache=use_cache)
        t[use_cache] = time.perf_counter() - t0
    return {"cached_s": t[True], "uncached_s": t[False], "speedup": t[False] / t[True], "images": n}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/sft.pt", help="checkpoint written by train.py")
    p.add_argument("--out_dir", default=None, help="where results go (default: beside the checkpoint)")
    p.add_argument("--eval_n", type=int, default=200, help="examples per task and split")
    p.add_argument("--cfg_scale", type=float, default=2.0, help="classifier-free guidance scale for images")
    p.add_argument("--device", default="auto", help="cuda, mps, cpu, or auto")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="autocast dtype; auto = bfloat16 on CUDA that supports it (as train.py), else float32")
    p.add_argument("--eval_seed", type=int, default=1234, help="seed of the evaluation examples")
    p.add_argument("--compare", action="store_true",
                   help="rebuild the preference comparison from every checkpoint in the checkpoint's directory")
    a = p.parse_args(argv)
    if a.device == "auto":
        a.device = pick_device()
    if a.dtype == "auto":
        a.dtype = auto_dtype(a.device)
    if a.eval_n <= 0:
        p.error(f"--eval_n must be positive, got {a.eval_n}")
    a.out_dir = a.out_dir or os.path.dirname(os.path.abspath(a.ckpt))
    load_model(a.ckpt, a.device)        # a bad checkpoint is refused before anything is written
    writable(a.out_dir)
    torch.manual_seed(a.eval_seed)
    if a.compare:
        return rebuild_comparison(os.path.dirname(os.path.abspath(a.ckpt)), a)
    return run(a.ckpt, a)


if __name__ == "__main__":
    command_line(main)
