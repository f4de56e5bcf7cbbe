"""
The token-count study (stage `tokens` of train.py): as an image takes more tokens, does the
generation DPO gradient outgrow the understanding one, and does the generation DPO loss stay at
ln 2? The diagnostic study of DPO for unified models (arXiv 2603.17044; Janus-Pro, 576 tokens an
image) measured rho = |g_U| / |g_G| = 0.073-0.093 and attributed it to the token counts; it could
not vary them. Here ONLY the tokenizer changes.

    python train.py --stage tokens --sft_seeds 3                 # 9, 36, 64 tokens an image, 3 SFT models each
    python train.py --stage tokens --sft_seeds 3 --resume        # continue it; finished stages are kept
    python train.py --stage tokens --token_fs patch,4,3,2        # and 144 tokens (~30 min a model on 2 CPU cores)

For each tokenizer of --token_fs (patch, 4, 3 -> 9, 36, 64 tokens an image: the k-means patch
tokenizer, one token a cell, then VQ-VAEs of downsampling factor 4 and 3) and each SFT seed k: the tokenizer, SFT, eval and the joint study's rows in out_dir/tokens/t<n>/sft<k>,
then the tables in out_dir/tokens.md and tokens.json (rewritten after every model, so a study
carried over several sittings shows what it has).

Held fixed at every token count: the model, the SFT recipe and steps, beta, the learning rates,
and the pairs: the understanding pairs come from the world and the SFT model as in stage pref,
and the generation pairs are WORLD pairs (genpairs.build_world_pairs: the true render of a training
prompt's scene against the render of the same scene with one object changed), the same scenes
and changes at every token count for a seed. They need no model that draws, so they carry the
causal comparison. The on-policy rows (the SFT model's best and worst samples) are added where the
SFT model draws (GenEval at T=0 >= DRAWS). What differs unavoidably: the image's sequence length,
so a summed log-prob over more tokens; how much of the image one changed object touches; the
tokenizer's own round trip; and how well each SFT model learns its world (reported beside it).
At 9 tokens the tokenizer is the patch one (512 k-means codes, lossless): the VQ-VAE at factor 8
(one 8x8-pixel token a cell) collapsed to one code in use (FINDINGS.md), so the 9-token row
differs from the others in the tokenizer's kind and codebook too.
Beside rho, each model's tokens a world pair changes (codes that differ between its chosen and
rejected images) and, pair by pair at the SFT model, how a pair's gradient grows with them: rho
follows those, not the tokens an image (FINDINGS.md, "The many-token world"). The dose test
makes that causal inside one world: the same prompts and chosen images, the rejected image with
1, 2 or 3 objects changed, one tokenizer, one image length; rho at the SFT model for each dose
(both measurements in pairgrads.py).
One preference seed per SFT model: the spread is over SFT models.
"""
import copy
import json
import os
import random
import shlex

import numpy as np

import genpairs
import joint
import pairgrads
import report
import world
from checkpoint import Refused, file_digest, load_tokenizer, log, read_checkpoint, seed_everything, writable, write_atomic

# the joint study's rows each model runs (slugs of joint.ROWS; study.json names them by their labels)
WORLD_ROWS = ("und_dpo_world", "gen_dpo_world", "joint_naive_world")
POLICY_ROWS = ("und_dpo", "gen_dpo", "joint_naive")
DRAWS = 0.5            # the SFT model's GenEval at T=0 from which the on-policy rows are added
PAPER = {"tokens": 576, "rho": (0.073, 0.093), "gen_dpo_loss": 0.691}   # Janus-Pro 7B / 1B, as the study reports


def factors(text):
    """'patch,4,3' -> ['patch', 4, 3]: 'patch' = the k-means patch tokenizer (9 tokens an image), a
    number = a VQ-VAE factor that divides the canvas."""
    try:
        fs = [x if x == "patch" else int(x) for x in text.split(",")]
    except ValueError:
        fs = []
    if not fs or any(f != "patch" and (f < 2 or world.CANVAS % f) for f in fs):
        raise Refused(f"error: --token_fs {text!r}: give 'patch' or VQ-VAE factors that divide the {world.CANVAS}-pixel "
                      "canvas, comma-separated (patch = 9 tokens an image, 4 = 36, 3 = 64, 2 = 144)")
    return fs


def tokens_per_image(f):
    return 9 if f == "patch" else (world.CANVAS // f) ** 2


def run_dir(out_dir, f, k):
    return os.path.join(out_dir, "tokens", f"t{tokens_per_image(f)}", f"sft{k}")


def study(args, argv, run_stage):
    """Every (SFT seed, token count) in order, seed by seed; run_stage(args, name, argv, keep, same_code)
    runs one stage of train.py's pipeline (keep: a stage that finished with these settings is kept,
    even at another commit: each model's commit is in the table)."""
    fs = factors(args.token_fs)
    command = shlex.join(["python", "train.py", *argv])    # this pass's: it names every count and seed of the table
    for k in range(args.sft_seeds):
        for f in fs:
            a = copy.copy(args)
            a.seed, a.out_dir = args.seed + k, run_dir(args.out_dir, f, k)
            if f == "patch":        # one token a cell, k-means codes: the default world
                a.tokenizer, a.patch, a.n_codes = "patch", 8, args.n_codes or 512
            else:                   # the VQ-VAE's default codebook
                a.tokenizer, a.vq_f, a.n_codes = "vq", f, args.n_codes or 256
            a.sft_seeds, a.token_fs, a.pref_seeds = 1, str(f), 1   # this model's own settings, whatever the study's size
            writable(a.out_dir)
            seed_everything(a.seed)
            for name in ("tokenizer", "sft", "eval"):
                run_stage(a, name, argv, keep=args.resume, same_code=False)
            draws = report.read_json(os.path.join(a.out_dir, "eval_sft.json"))["generation"]["test T=0"]["overall"]
            a.rows = ",".join(WORLD_ROWS + (POLICY_ROWS if draws >= DRAWS else ()))
            run_stage(a, "joint", argv, keep=args.resume, same_code=False)
            pairgrads.pair_gradients(a.out_dir)
            pairgrads.dose_gradients(a.out_dir)
            write(args.out_dir, fs, args.sft_seeds, command)
            log(args, f"tokens | {tokens_per_image(f)} tokens an image, SFT seed {a.seed}: done")
    return write(args.out_dir, fs, args.sft_seeds, command)


# -----------------------------------------------------------------------------
# the tables

def changed_tokens(d, seed, n):
    """How many of an image's tokens one world pair changes: the mean count of positions where the
    chosen and the rejected codes differ, over the n world pairs of seed (those its joint stage trained on)."""
    made = genpairs.world_pair_scenes(n, random.Random(f"{seed}/world"))   # (the stream build_world_pairs draws)
    codes = load_tokenizer(os.path.join(d, "tokenizer.pt"), "cpu").encode(
        np.stack([world.render(sc) for e, alt, _, _ in made for sc in (e.scene, alt)]))
    return float((codes[0::2] != codes[1::2]).sum(1).float().mean())


def model_record(d, n, k):
    """One SFT model of the study (its directory d) -> the numbers of its row, or None unless its joint
    stage finished, from the SFT model in d, as did its eval (a rerun may leave an older run's files)."""
    paths = {f: os.path.join(d, f) for f in ("eval_sft.json", "study.json", "run.json", "sft.pt")}
    if not all(os.path.exists(p) for p in paths.values()):
        return None
    ev, st = (report.read_json(paths[f]) for f in ("eval_sft.json", "study.json"))
    run = report.read_json(paths["run.json"])["stages"]
    digest = file_digest(paths["sft.pt"])
    if not {"sft", "joint"} <= set(run) or {run["joint"]["sft_digest"], st["sft_digest"], ev["digest"]} != {digest}:
        return None
    rows = {slug: st["rows"][label] for slug, label in joint.LABELS.items() if label in st["rows"]}
    sft, (und, gen, both) = st["rows"]["SFT"][0], (rows[r][0] for r in WORLD_ROWS)
    tok = read_checkpoint(os.path.join(d, "tokenizer.pt"), "cpu", ("stats",), "tokenizer")["stats"]
    cfg = st["config"]
    r = {"tokens": n, "tokenizer": "patch" if cfg["tokenizer"] == "patch" else f"VQ-VAE f{cfg['vq_f']}",
         "sft_seed": run["sft"]["seed"], "k": k, "commits": sorted({s["commit"] for s in run.values()}),
         "roundtrip": tok["roundtrip_exact"], "changed": changed_tokens(d, run["sft"]["seed"], cfg["gen_pairs"]),
         "answer_acc": ev["understanding"]["test"]["answer_acc"],
         "geneval_T0": ev["generation"]["test T=0"]["overall"],
         "bias_CHAIR_i": ev["understanding"]["bias"]["caption_CHAIR_i"],
         "rho": both["rho"], "rho_step1": both["rho_step1"], "cos": both["cos"],
         "cos_within_und": both["cos_within_und"], "cos_within_gen": both["cos_within_gen"],
         "w_U": both["w_U"], "kl_gen": gen["kl_gen"], "kl_und": und["kl_und"],
         "gen_dpo_loss_end": gen["dpo_loss_gen_end"], "und_dpo_loss_end": und["dpo_loss_und_end"],
         "joint_gen_dpo_loss_end": both["dpo_loss_gen_end"],
         "geneval_change": gen["gen_overall"] - sft["gen_overall"],
         "answer_acc_change": und["answer_acc"] - sft["answer_acc"],
         "seconds": sum(s["seconds"] for s in run.values())}
    pg = pairgrads.kept(os.path.join(d, "pairgrads.json"), sft_digest=digest)
    r["pair_grad_b"] = pg["b"] if pg else None
    dz = pairgrads.kept(os.path.join(d, "dose.json"), sft_digest=digest, doses=list(pairgrads.DOSES),
                        batches=pairgrads.DOSE_BATCHES)
    if dz:
        r.update(dose_changed=dz["changed"], dose_rho=dz["rho_step1"], dose_a=dz["a"])
    if POLICY_ROWS[1] in rows:      # the on-policy rows, where the SFT model draws
        on = rows[POLICY_ROWS[1]][0]
        r.update(onpolicy_gen_dpo_loss_end=on["dpo_loss_gen_end"],
                 onpolicy_geneval_change=on["gen_overall"] - sft["gen_overall"],
                 onpolicy_rho=rows[POLICY_ROWS[2]][0]["rho"] if POLICY_ROWS[2] in rows else None)
    return r


def fit(records, key="rho", x="tokens"):
    """log rho = c - a log x by least squares (x: the tokens an image, or the tokens a pair changes):
    over all models pooled, and for each SFT seed that has two values of x or more. Returns {'a', 'c',
    'per_seed': {seed: a}, 'at': {x: rho predicted}}, or None under two values of x."""
    pts = [(r[x], r[key]) for r in records]
    if len({n for n, _ in pts}) < 2:
        return None
    slope, c = pairgrads.loglog([n for n, _ in pts], [v for _, v in pts])
    per_seed = {}
    for s in sorted({r["sft_seed"] for r in records}):
        mine = [r for r in records if r["sft_seed"] == s]
        if len({r[x] for r in mine}) >= 2:
            per_seed[s] = -pairgrads.loglog([r[x] for r in mine], [r[key] for r in mine])[0]
    at = {n: float(np.exp(c) * n ** slope) for n in (9, 16, 36, 64, 144, PAPER["tokens"])}
    return {"a": float(-slope), "c": float(c), "per_seed": per_seed, "at": at}


# the fits of the report: (name, what is fitted, against what, over which models). The patch
# tokenizer's 9-token world differs from the VQ-VAE worlds in kind, not only in count, so the VQ-VAE
# worlds are fitted alone too; and the tokens a world pair changes grow with the tokens an image.
FITS = (("rho", "rho", "tokens", "all"), ("rho_step1", "rho_step1", "tokens", "all"),
        ("rho, VQ-VAE worlds", "rho", "tokens", "vq"), ("rho_step1, VQ-VAE worlds", "rho_step1", "tokens", "vq"),
        ("rho by tokens a pair changes", "rho", "changed", "all"),
        ("rho_step1 by tokens a pair changes", "rho_step1", "changed", "all"))


def fits(records):
    over = {"all": records, "vq": [r for r in records if r["tokenizer"] != "patch"]}
    return {name: fit(over[which], key, x) for name, key, x, which in FITS}


COLS = [("SFT models", None), ("round trip", "roundtrip"), ("tokens a pair changes", "changed"),
        ("pair gradient b", "pair_grad_b"), ("answer acc", "answer_acc"), ("GenEval T=0", "geneval_T0"),
        ("bias CHAIR_i", "bias_CHAIR_i"), ("rho", "rho"), ("rho, step 1", "rho_step1"), ("cos", "cos"),
        ("cos within und", "cos_within_und"), ("cos within gen", "cos_within_gen"),
        ("gen DPO loss, end", "gen_dpo_loss_end"), ("GenEval change", "geneval_change"),
        ("answer acc change", "answer_acc_change"), ("KL/token gen", "kl_gen")]


def markdown(records, fitted, header):
    by_n = {}           # one row per world: token count and tokenizer
    for r in sorted(records, key=lambda r: (r["tokens"], r["tokenizer"], r["sft_seed"])):
        by_n.setdefault((r["tokens"], r["tokenizer"]), []).append(r)
    lines = ["# The token-count study", "", header, "",
             "Per token count, mean ± std over its SFT models. rho = |g_U| / |g_G| and cos, the understanding and "
             "generation DPO gradients of the naive joint sum on world pairs (means over its measured steps; "
             "'step 1': before any update, policy = reference); cos within = two halves of one batch of a task; "
             "gen DPO loss, end = the generation-only row's plain DPO loss over its last quarter (ln 2 = 0.693 at "
             "the start); GenEval change (T=1) after generation DPO, answer acc change after understanding DPO, "
             "both on world pairs; round trip = held-out scenes the tokenizer hands back exactly; tokens a pair "
             "changes = image tokens whose codes differ between a world pair's chosen and rejected images; pair "
             "gradient b = the exponent of |g| ~ changed^b over the model's first "
             f"{pairgrads.PAIR_GRADS} world pairs, each pair's generation DPO gradient taken alone at the SFT model.", "",
             "| tokens an image | tokenizer | " + " | ".join(h for h, _ in COLS) + " |", "|" + "---|" * (len(COLS) + 2)]
    for (n, kind), rs in by_n.items():
        lines.append(f"| {n} | {kind} | " + " | ".join(str(len(rs)) if key is None else report.mean_std(r[key] for r in rs)
                                              for _, key in COLS) + " |")
    for name, key, x, which in FITS:
        f = fitted[name]
        if f is None:
            continue
        seeds = list(f["per_seed"].values())
        spread = (f"; per SFT seed {', '.join(f'{a:.2f}' for a in seeds)} (mean {np.mean(seeds):.2f} ± "
                  f"{np.std(seeds, ddof=1):.2f})" if len(seeds) > 1 else
                  f"; one SFT seed with several token counts: {seeds[0]:.2f}" if seeds else "")
        xname = {"tokens": "tokens an image", "changed": "tokens a pair changes"}[x]
        lines += ["", f"Fit of {key} ~ ({xname})^-a over {'the VQ-VAE worlds' if which == 'vq' else 'all models'}: "
                      f"a = {f['a']:.2f}{spread}. Extrapolated (beyond the measured range, an extrapolation only) to "
                      f"{PAPER['tokens']} {xname}: {key} = {f['at'][PAPER['tokens']]:.3f}; the study measured "
                      f"{PAPER['rho'][0]}-{PAPER['rho'][1]} at {PAPER['tokens']} tokens an image (Janus-Pro 7B and 1B)."]
    lines += dose_table(by_n)
    lines += ["", "Each SFT model:", "",
              "| tokens | tokenizer | SFT seed | commit | " + " | ".join(h for h, k in COLS if k) + " | on-policy gen DPO "
              "loss, end | on-policy GenEval change | on-policy rho | wall time |", "|" + "---|" * (len(COLS) + 7)]
    for (n, kind), rs in by_n.items():
        for r in rs:
            on = [r.get(k) for k in ("onpolicy_gen_dpo_loss_end", "onpolicy_geneval_change", "onpolicy_rho")]
            lines.append(f"| {n} | {kind} | {r['sft_seed']} | {', '.join(r['commits'])} | "
                         + " | ".join("-" if r[k] is None else f"{r[k]:.3f}" for _, k in COLS if k) + " | "
                         + " | ".join("-" if v is None else f"{v:.3f}" for v in on)
                         + f" | {report.duration(r['seconds'])} |")
    lines += ["", f"On-policy rows run where the SFT model's GenEval at T=0 is >= {DRAWS} ('-': it does not draw). "
                  "Wall time: its stages' times as its run.json records them; a stage continued by --resume counts "
                  "its last pass only."]
    return "\n".join(lines) + "\n"


def dose_table(by_n):
    """The dose test's table: per token count, the means over its SFT models at each dose, the
    within-model exponent a of rho ~ changed^-a across the doses, and in how many models rho falls."""
    rows = {key: [r for r in rs if r.get("dose_rho")] for key, rs in by_n.items()}
    rows = {key: rs for key, rs in rows.items() if rs}
    if not rows:
        return []
    ks = pairgrads.DOSES
    doses = " / ".join(str(k) for k in ks)
    lines = ["", f"The dose test (dose.json of each model): the same prompts and chosen images, the rejected image "
                 f"with {doses} objects changed (counting and full-scene prompts, whose scenes hold {max(ks)} "
                 f"objects or more); at the SFT model (policy = reference), on {pairgrads.DOSE_BATCHES} batches of pairs, "
                 "the understanding ones the same at every dose. a = the exponent of rho ~ (tokens a pair "
                 "changes)^-a across the doses, within one model; 'rho falls' = models whose rho at "
                 f"{max(ks)} objects changed is below that at 1; rho at {PAPER['tokens']} tokens changed = each "
                 "model's own fit carried to a pair that differs in 576 tokens, the range over the models (an "
                 "extrapolation far beyond the measured doses, and to another image length: not a measurement; "
                 f"the study measured {PAPER['rho'][0]}-{PAPER['rho'][1]} on pairs of two samples at "
                 f"{PAPER['tokens']} tokens an image).", "",
             f"| tokens an image | tokenizer | SFT models | tokens a pair changes, {doses} objects | "
             f"rho, step 1, {doses} objects | a | rho falls | rho at {PAPER['tokens']} tokens changed |",
             "|" + "---|" * 8]
    for (n, kind), rs in rows.items():
        changed = " / ".join(f"{np.mean([r['dose_changed'][j] for r in rs]):.1f}" for j in range(len(ks)))
        rho = " / ".join(f"{np.mean([r['dose_rho'][j] for r in rs]):.3f}" for j in range(len(ks)))
        a = [r["dose_a"] for r in rs if r["dose_a"] is not None]
        falls = sum(r["dose_rho"][-1] < r["dose_rho"][0] for r in rs)
        far = [pairgrads.dose_extrapolation(r["dose_changed"], r["dose_rho"], PAPER["tokens"])
               for r in rs if r["dose_a"] is not None]
        lines.append(f"| {n} | {kind} | {len(rs)} | {changed} | {rho} | "
                     f"{report.mean_std(a) if a else '-'} | {falls} of {len(rs)} | "
                     f"{f'{min(far):.3f}-{max(far):.3f}' if far else '-'} |")
    return lines


def write(out_dir, fs, n_seeds, command):
    """out_dir/tokens.md and tokens.json from every finished model of the study; `command`, the one that
    makes them, heads tokens.md."""
    records = [r for k in range(n_seeds) for f in fs
               if (r := model_record(run_dir(out_dir, f, k), tokens_per_image(f), k)) is not None]
    if not records:
        raise Refused(f"error: no finished model of the token-count study under {os.path.join(out_dir, 'tokens')}; "
                      "run `python train.py --stage tokens` first")
    fitted = fits(records)
    first = report.read_json(os.path.join(run_dir(out_dir, fs[0], 0), "run.json"))["stages"]
    rec = first.get("sft") or next(iter(first.values()))
    header = (f"`{command}` | device: {rec['device']} | preset `{rec['preset']}`, dtype {rec['dtype']} | "
              f"{len(records)} SFT models: " + ", ".join(f"{r['tokens']} tokens seed {r['sft_seed']}" for r in records))
    md = markdown(records, fitted, header)
    write_atomic(os.path.join(out_dir, "tokens.md"), md)
    write_atomic(os.path.join(out_dir, "tokens.json"), json.dumps({"models": records, "fits": fitted}, indent=1))
    return md
