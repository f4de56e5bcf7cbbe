"""
Findings that survive a new SFT model: the report of a run from several SFT seeds.

    python train.py --sft_seeds 3                    # out/sft0, sft1, sft2, then out/report.md over all three
    python train.py --sft_seeds 3 --stage report     # rebuild it from those directories

The preference seeds of one study all start from ONE SFT model, so their spread misses the
largest source of variation: the SFT model itself (another seed, or the same seed on another
machine). Here each SFT seed k runs the stages in out_dir/sft<k>; the tables pool every SFT x
preference seed (mean +- std over all runs), and each finding the README states is checked on
each SFT model separately (on the mean over its preference seeds): "holds in k of N".
"""
import json
import os

import numpy as np

import eval as evaluation
import joint
import pictures
import pref
import probes
import report
from checkpoint import Refused, file_digest, write_atomic

STEMS = (("compare", "pref", "Preference optimisation for understanding"),
         ("study", "joint", "Preference optimisation for generation: do understanding and generation fight?"),
         ("probes", "probe", "Does understanding inform generation?"))


def seed_dir(out_dir, k):
    return os.path.join(out_dir, f"sft{k}")


# -----------------------------------------------------------------------------
# the findings, each checked on one SFT model: (claim, stage output, test -> (holds, what was measured))

def facts(stem, rows):
    """One SFT model's numbers the findings speak of: the mean over its preference seeds of each row's
    metric, as {metric: {row: value}}."""
    if stem == "compare":   # rows: {method: [{"test": {...}, "bias": {...}} per seed]}
        cols = {"CHAIR_i": ("bias", "CHAIR_i"), "Cover": ("bias", "Cover"), "acc": ("test", "answer_acc")}
        return {k: {name: float(np.mean([r[split][c] for r in rs])) for name, rs in rows.items()}
                for k, (split, c) in cols.items()}
    keys = {k for rs in rows.values() for r in rs for k in r if isinstance(r[k], (int, float))}
    return {k: {name: float(np.mean([r[k] for r in rs])) for name, rs in rows.items()
                if isinstance(rs[0].get(k), (int, float))} for k in keys}


def _arrow(a, b):
    return f"{a:.3f} -> {b:.3f}"


def _trained(f, key):   # the joint-study rows that trained something
    return [v for row, v in f[key].items() if row != "SFT"]


NLL, MIX = (label for label, _, _ in pref.REMEDY_ROWS.values())   # the remedies' rows, by their labels in compare.json
# (finding, the stage output it is read from, f -> (holds, what was measured)); f = facts(stem, rows)
CLAIMS = [
    ("DPO lowers bias CHAIR_i by at least half", "compare",
     lambda f: (f["CHAIR_i"]["dpo"] <= f["CHAIR_i"]["sft"] / 2, _arrow(f["CHAIR_i"]["sft"], f["CHAIR_i"]["dpo"]))),
    ("... by saying less: DPO's bias Cover falls by more than 0.2", "compare",
     lambda f: (f["Cover"]["sft"] - f["Cover"]["dpo"] > 0.2, _arrow(f["Cover"]["sft"], f["Cover"]["dpo"]))),
    ("mDPO lowers bias CHAIR_i by at least half and keeps Cover >= 0.95", "compare",
     lambda f: (f["CHAIR_i"]["mdpo"] <= f["CHAIR_i"]["sft"] / 2 and f["Cover"]["mdpo"] >= 0.95,
                f"CHAIR_i {f['CHAIR_i']['mdpo']:.3f}, Cover {f['Cover']['mdpo']:.3f}")),
    ("mDPO without its anchor keeps less Cover than mDPO (by more than 0.1)", "compare",
     lambda f: (f["Cover"]["mdpo"] - f["Cover"]["mdpo_noanchor"] > 0.1,
                f"{f['Cover']['mdpo_noanchor']:.3f} vs {f['Cover']['mdpo']:.3f}")),
    ("mDPO without its conditional term does as well (bias CHAIR_i within 0.02 of mDPO's)", "compare",
     lambda f: (abs(f["CHAIR_i"]["mdpo_nocond"] - f["CHAIR_i"]["mdpo"]) <= 0.02,
                f"{f['CHAIR_i']['mdpo_nocond']:.3f} vs {f['CHAIR_i']['mdpo']:.3f}")),
    ("DPO without images hallucinates more than DPO (bias CHAIR_i)", "compare",
     lambda f: (f["CHAIR_i"]["dpo_noimage"] > f["CHAIR_i"]["dpo"],
                f"{f['CHAIR_i']['dpo_noimage']:.3f} vs {f['CHAIR_i']['dpo']:.3f}")),
    ("DAMA cuts bias CHAIR_i by at least 90%", "compare",
     lambda f: (f["CHAIR_i"]["dama"] <= 0.1 * f["CHAIR_i"]["sft"], _arrow(f["CHAIR_i"]["sft"], f["CHAIR_i"]["dama"]))),
    ("the tax: mDPO's test answer accuracy stays within 0.02 of SFT's", "compare",
     lambda f: (f["acc"]["sft"] - f["acc"]["mdpo"] <= 0.02 + 1e-9, _arrow(f["acc"]["sft"], f["acc"]["mdpo"]))),
    ("mDPO pays less tax than DPO and DAMA", "compare",
     lambda f: (f["acc"]["mdpo"] > max(f["acc"]["dpo"], f["acc"]["dama"]),
                f"{f['acc']['mdpo']:.3f} vs {f['acc']['dpo']:.3f}, {f['acc']['dama']:.3f}")),
    ("the NLL term on the chosen response stops DPO from saying less (bias Cover >= 0.95)", "compare",
     lambda f: (f["Cover"][NLL] >= 0.95, f"Cover {f['Cover']['dpo']:.3f} -> {f['Cover'][NLL]:.3f}")),
    ("mixing SFT batches keeps DPO's test answer accuracy within 0.02 of SFT's", "compare",
     lambda f: (f["acc"]["sft"] - f["acc"][MIX] <= 0.02 + 1e-9, f"{f['acc']['sft']:.3f} -> {f['acc'][MIX]:.3f} "
                                                          f"(DPO {f['acc']['dpo']:.3f})")),
    ("the generation DPO loss leaves ln 2 (below 0.65 at the end)", "study",
     lambda f: (f["dpo_loss_gen_end"]["gen DPO"] < 0.65, f"{f['dpo_loss_gen_end']['gen DPO']:.3f}")),
    ("no 11-14x norm gap: rho = |g_U|/|g_G| above 1/11 in every trained row", "study",
     lambda f: (min(_trained(f, "rho")) > 1 / 11, f"{min(_trained(f, 'rho')):.2f}-{max(_trained(f, 'rho')):.2f}")),
    ("the two tasks' gradients are near-orthogonal (|cos| < 0.05 in every row)", "study",
     lambda f: (max(map(abs, _trained(f, "cos"))) < 0.05, f"max |cos| {max(map(abs, _trained(f, 'cos'))):.3f}")),
    ("generation DPO keeps GenEval (T=1) within 0.01 of SFT's", "study",
     lambda f: (f["gen_overall"]["SFT"] - f["gen_overall"]["gen DPO"] <= 0.01,
                _arrow(f["gen_overall"]["SFT"], f["gen_overall"]["gen DPO"]))),
    ("real-vs-generated pairs lower GenEval (T=1) by more than 0.02", "study",
     lambda f: (f["gen_overall"]["SFT"] - f["gen_overall"]["gen DPO (real vs generated)"] > 0.02,
                _arrow(f["gen_overall"]["SFT"], f["gen_overall"]["gen DPO (real vs generated)"]))),
    ("the tasks fight through shared weights: generation DPO raises bias CHAIR_i", "study",
     lambda f: (f["CHAIR_i"]["gen DPO"] > f["CHAIR_i"]["SFT"], _arrow(f["CHAIR_i"]["SFT"], f["CHAIR_i"]["gen DPO"]))),
    ("a gap: arithmetic facts known in text (>= 0.95) are drawn directly below 0.5", "probes",
     lambda f: (f["und facts"]["arithmetic"] >= 0.95 and f["gen direct"]["arithmetic"] < 0.5,
                f"facts {f['und facts']['arithmetic']:.2f}, direct {f['gen direct']['arithmetic']:.2f}")),
    ("drawing via CoT beats drawing directly in every family", "probes",
     lambda f: (all(f["gen CoT"][k] > f["gen direct"][k] for k in f["gen CoT"]),
                ", ".join(f"{f['gen direct'][k]:.2f} -> {f['gen CoT'][k]:.2f}" for k in f["gen CoT"]))),
    ("self-training on judged CoT drawings beats its control in every family", "probes",
     lambda f: (all(f["gen direct after self-training"][k] > f["gen direct after control"][k]
                    for k in f["gen direct after control"]),
                ", ".join(f"{f['gen direct after self-training'][k]:.2f} vs {f['gen direct after control'][k]:.2f}"
                          for k in f["gen direct after control"]))),
]


def check_claims(per_model):
    """per_model: [{stem: rows}] one dict per SFT model -> [(claim, [(holds, measured) per model that
    ran the finding's stage])]; a finding whose stage ran on no model is left out."""
    out = []
    for claim, stem, test in CLAIMS:
        ran = [m[stem] for m in per_model if stem in m]
        if not ran:
            continue
        try:
            out.append((claim, [test(facts(stem, rows)) for rows in ran]))
        except KeyError:     # the stage, or a row the finding needs (--method, --rows), did not run
            continue
    return out


# -----------------------------------------------------------------------------
# the report over all SFT models

def sft_table(evals, digests, seeds):
    cols = ["answer_acc", "shape", "count", "GenEval T=0", "GenEval T=1", "position T=0", "bias CHAIR_i",
            "bias Cover"]
    vals = [[e["understanding"]["test"]["answer_acc"], e["understanding"]["test"]["shape"],
             e["understanding"]["test"]["count"], e["generation"]["test T=0"]["overall"],
             e["generation"]["test T=1"]["overall"], e["generation"]["test T=0"]["position"],
             e["understanding"]["bias"]["caption_CHAIR_i"], e["understanding"]["bias"]["caption_Cover"]]
            for e in evals]
    lines = ["| SFT model | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    lines += [f"| seed {s} (`{d}`) | " + " | ".join(f"{v:.3f}" for v in row) + " |"
              for s, d, row in zip(seeds, digests, vals)]
    v = np.array(vals)
    lines.append("| mean ± std | " + " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in
                                                zip(v.mean(0), v.std(0, ddof=1) if len(v) > 1 else 0 * v[0])) + " |")
    return "\n".join(lines) + "\n"


def claims_table(checked):
    lines = ["| finding | holds in | measured, per SFT model |", "|---|---|---|"]
    for claim, res in checked:
        lines.append(f"| {claim} | {sum(h for h, _ in res)} of {len(res)} | "
                     + "; ".join(("" if h else "**not**: ") + v for h, v in res) + " |")
    return "\n".join(lines) + "\n"


def gather(out_dir, n):
    """The inputs of the report over the SFT models in out_dir/sft0 .. sft<n-1>, each checked to come
    from its directory's SFT model: a dict of plain values (report.json keeps it, so render() can
    rebuild the report from report.json alone)."""
    dirs = [seed_dir(out_dir, k) for k in range(n)]
    runs, evals, digests, per_model = [], [], [], []
    for d in dirs:
        sft = os.path.join(d, "sft.pt")
        for need in ("run.json", "sft.pt", "eval_sft.json"):
            if not os.path.exists(os.path.join(d, need)):
                raise Refused(f"error: {os.path.join(d, need)} is missing; run `python train.py --sft_seeds {n}` first")
        digest = file_digest(sft)
        runs.append(report.read_json(os.path.join(d, "run.json")))
        evals.append(report.read_json(os.path.join(d, "eval_sft.json")))
        digests.append(digest)
        model = {}
        for stem, stage, _ in STEMS:
            path = os.path.join(d, stem + ".json")
            if os.path.exists(path):
                res = report.read_json(path)
                if res.get("sft_digest") != digest:
                    raise Refused(f"error: {path} was made from another SFT model than {sft}: rerun "
                                  f"`python train.py --sft_seeds {n} --stage {stage}`")
                model[stem] = res["rows"]
        per_model.append(model)
    if len(set(digests)) < n:
        raise Refused(f"error: two of {', '.join(dirs)} hold the same SFT model; their seeds must differ")
    first = next(iter(runs[0]["stages"].values()))
    return {"dirs": [os.path.basename(d) for d in dirs],
            "seeds": [r["stages"].get("sft", {}).get("seed") for r in runs], "digests": digests,
            "stages": [k for k in runs[0]["stages"] if k != "all"],
            "commits": sorted({s["commit"] for r in runs for s in r["stages"].values()}),
            "device": first["device"], "preset": first["preset"], "dtype": first["dtype"],
            "seconds": [sum(v["seconds"] for k, v in r["stages"].items() if k != "all") for r in runs],
            "evals": evals, "per_model": per_model}


def pool(per_model):
    """{stem: {row: every run of that row over the SFT models}} for the stages that ran on any model."""
    pooled = {}
    for stem, _, _ in STEMS:
        for m in per_model:
            for name, rs in m.get(stem, {}).items():
                pooled.setdefault(stem, {}).setdefault(name, []).extend(rs)
    return pooled


def render(inputs):
    """The report's markdown from gather()'s dict."""
    n, dirs, per_model = len(inputs["dirs"]), inputs["dirs"], inputs["per_model"]
    lines = ["# unipref: report over several SFT models", "",
             f"`python train.py --sft_seeds {n}` (stages run: {', '.join(inputs['stages'])}) at commit "
             f"{', '.join(inputs['commits'])}. Device: {inputs['device']}. Preset `{inputs['preset']}`, dtype "
             f"{inputs['dtype']}. {n} SFT models (seeds {', '.join(map(str, inputs['seeds']))}), each with its own "
             f"studies in {', '.join(d + '/' for d in dirs)}; wall time per SFT model: "
             + ", ".join(report.duration(s) for s in inputs["seconds"])
             + f"; in all {report.duration(sum(inputs['seconds']))}.", "",
             "Every table pools all runs: mean ± std over every SFT model x preference seed (the SFT rows: over the "
             "SFT models). Each finding is checked on each SFT model, on the mean over its preference seeds.", "",
             "## Findings", "", claims_table(check_claims(per_model)).rstrip(),
             "", "## The SFT models", "", sft_table(inputs["evals"], inputs["digests"], inputs["seeds"]).rstrip()]
    pooled = pool(per_model)
    for stem, _, title in STEMS:
        if stem not in pooled:
            continue
        rows = pooled[stem]
        if stem == "compare":
            table = evaluation.compare_table(rows)
        elif stem == "study":
            table = (report.seed_table(rows, joint.OUTCOME_COLS) + "\n"
                     + report.seed_table({k: v for k, v in rows.items() if k != "SFT"}, joint.DIAG_COLS))
        else:
            table = report.seed_table(rows, probes.COLS, heads=probes.HEADS, first="family")
        lines += ["", f"## {title}", ""]
        ran = [d for d, m in zip(dirs, per_model) if stem in m]
        if len(ran) < n:       # an interrupted run: say which models this section comes from
            lines += [f"From {len(ran)} of the {n} SFT models ({', '.join(ran)}): the stage did not finish on the "
                      "others.", ""]
        lines += [table.rstrip()]
        if stem == "compare":
            lines += ["", "![bias CHAIR_i and bias Cover per method, the spread over SFT models as whiskers](headline.png)"]
    return "\n".join(lines) + "\n"


def write(out_dir, n):
    """out_dir/report.md and headline.png over the SFT models in out_dir/sft0 .. sft<n-1>, and
    report.json: the findings, each model's record, and the report's inputs (render(report.json's
    "inputs") rebuilds report.md)."""
    inputs = gather(out_dir, n)
    text = render(inputs)
    ran = [m["compare"] for m in inputs["per_model"] if "compare" in m]
    if ran:             # the headline's spread: each SFT model's rows are one unit
        units = {row: [m[row] for m in ran if row in m] for row in pool(inputs["per_model"])["compare"]}
        pictures.headline(os.path.join(out_dir, "headline.png"), units, f"whiskers: lowest to highest of the "
                          f"{len(ran)} SFT models' own means (each over its preference seeds)")
    write_atomic(os.path.join(out_dir, "report.md"), text)
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps(
        {"sft_models": [{"dir": d, "seed": s, "sft_digest": g, "seconds": t} for d, s, g, t in
                        zip(inputs["dirs"], inputs["seeds"], inputs["digests"], inputs["seconds"])],
         "findings": [{"claim": c, "holds": [h for h, _ in res], "measured": [v for _, v in res]}
                      for c, res in check_claims(inputs["per_model"])],
         "inputs": inputs}, indent=1))
    print(text)
    print(f"report | {os.path.join(out_dir, 'report.md')} over {n} SFT models")
    return text
