"""
Results as people read them: the Markdown tables and the run's report (its pictures: pictures.py).

    python train.py                     # ends by writing out/report.md, report.json, curves.png, headline.png
    python train.py --stage report      # rebuilds them from out/ without training

Every stage writes its own results (eval_sft, compare, study, probes: .md and .json) and the
digest of the SFT checkpoint it started from; the report puts them under one header (commit,
device, preset, dtype, wall time of every stage) and refuses to mix results of different SFT
models.
"""
import json
import os
import platform
import subprocess
import time

import numpy as np
import torch

import data
import pictures
from checkpoint import Refused, differences, file_digest, settings, write_atomic

# the stage outputs the report is made of: (file stem, stage that writes it, heading)
SECTIONS = (("eval_sft", "eval", "SFT"),
            ("compare", "pref", "Preference optimisation for understanding"),
            ("study", "joint", "Preference optimisation for generation: do understanding and generation fight?"),
            ("probes", "probe", "Does understanding inform generation?"))


# -----------------------------------------------------------------------------
# tables

def seed_table(rows, cols, value=lambda r, c: r.get(c), heads=None, first="row"):
    """rows: {name: [one result per seed]} -> a Markdown table, each cell the mean +- sample std of
    value(result, col) over the seeds that measured it (None = not measured, shown as '-')."""
    lines = [f"| {first} | " + " | ".join(heads or cols) + " |", "|" + "---|" * (len(cols) + 1)]
    for name, rs in rows.items():
        lines.append(f"| {name} | " + " | ".join(mean_std(value(r, c) for r in rs) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def mean_std(values):
    """A table cell: the mean +- sample std of the values that are not None ('-' if none, the value if one)."""
    v = np.array([x for x in values if x is not None], dtype=float)
    return "-" if len(v) == 0 else f"{v.mean():.3f} ± {v.std(ddof=1):.3f}" if len(v) > 1 else f"{v.mean():.3f}"


def sft_markdown(res):
    und_cols = ["colour", "shape", "count", "exists", "answer_acc", "caption_exact", "caption_obj_precision",
                "caption_obj_recall", "caption_CHAIR_i", "caption_CHAIR_s", "caption_Cover"]
    lines = ["| scenes | " + " | ".join(c.replace("caption_", "cap ") for c in und_cols) + " |",
             "|---" * (len(und_cols) + 1) + "|"]
    for split, r in res["understanding"].items():
        lines.append(f"| {split} | " + " | ".join(f"{r[c]:.3f}" for c in und_cols) + " |")
    gen_cols = list(data.GENEVAL_TASKS) + ["overall", "full"]
    lines += ["", "| generation | " + " | ".join(gen_cols) + " |", "|---" * (len(gen_cols) + 1) + "|"]
    for name, r in res["generation"].items():
        lines.append(f"| {name} | " + " | ".join(f"{r[c]:.3f}" for c in gen_cols) + " |")
    return "\n".join(lines) + "\n"


# -----------------------------------------------------------------------------
# the run's report

def commit():
    """The git commit of the code this process runs, marked when tracked files differed from it; read
    once, at the first call (train.py makes it at start-up): a commit made while a long run goes on
    is not the code that run is running. 'unknown' outside git."""
    global _COMMIT
    if _COMMIT is None:
        _COMMIT = _read_commit()
    return _COMMIT


_COMMIT = None


def _read_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return sha + (" (with uncommitted changes)" if dirty else "")


def _device(device):
    if device.startswith("cuda"):
        return f"{torch.cuda.get_device_name(torch.device(device))}, torch {torch.__version__}"
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return (f"{device}: {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, "
            f"torch {torch.__version__}")


# the outputs each stage leaves in out_dir: present, and from today's SFT model, or the stage runs again
STAGE_OUTPUTS = {"tokenizer": ("tokenizer.pt",), "sft": ("sft.pt",), "eval": ("eval_sft.json", "eval_sft.md"),
                 "pref": ("compare.json", "compare.md"), "joint": ("study.json", "study.md"),
                 "probe": ("probes.json", "probes.md")}


def _load_run(out_dir):
    path = os.path.join(out_dir, "run.json")
    return read_json(path) if os.path.exists(path) else {"stages": {}}


def _save_run(out_dir, run):
    write_atomic(os.path.join(out_dir, "run.json"), json.dumps(run, indent=1))


def begin_stage(args, stage):
    """A stage starts: until it finishes, neither it nor any stage after it counts as done."""
    run = _load_run(args.out_dir)
    order = list(STAGE_OUTPUTS)
    void = [k for k in order[order.index(stage):] + ["all"] if k in run["stages"]]
    if void:                     # (written only when it changes: a refused stage leaves out/ as it was)
        for k in void:
            del run["stages"][k]
        _save_run(args.out_dir, run)


def record_stage(args, stage, seconds, argv=None, work=None):
    """Note in out_dir/run.json that `stage` finished in `seconds`, with its settings, code and machine,
    and `work`: the tokens it trained and inferred, their FLOPs and the matmul peak measured at its start."""
    run = _load_run(args.out_dir)
    sft = os.path.join(args.out_dir, "sft.pt")
    n = getattr(args, "world_size", 1)
    device = _device(args.device) + (f"; {n} processes under torchrun (sft data-parallel, the pref runs dealt "
                                      f"round them; tokens and utilisation are rank 0's)" if n > 1 else "")
    start = f"torchrun --nproc_per_node={n} train.py" if n > 1 else "python train.py"
    run["stages"][stage] = {"seconds": seconds, "commit": commit(), "device": device,
                            "preset": args.preset, "dtype": args.dtype, "seed": args.seed, "finished": _now(),
                            "command": " ".join([start, *(argv if argv is not None else ["--stage", stage])]),
                            "settings": settings(args),
                            "sft_digest": file_digest(sft) if stage != "tokenizer" and os.path.exists(sft) else None,
                            **(work or {})}
    _save_run(args.out_dir, run)


def finished_stage(args, stage, same_code=True):
    """For --resume: True if `stage` finished with these settings and this code and its outputs are
    still there (made from today's SFT model); False if it has to run. A stage that finished with
    other settings or other code is refused: resuming would mix two runs in one report. same_code=False
    (the token-count study, whose models each carry their commit into its table): another commit is kept."""
    rec = _load_run(args.out_dir)["stages"].get(stage)
    if rec is None:
        return False
    where = os.path.join(args.out_dir, "run.json")
    # (where the outputs live is not how they were made: a run moved to another directory resumes)
    diff = differences(*({k: v for k, v in s.items() if k != "out_dir"} for s in (rec.get("settings", {}), settings(args))))
    if diff:
        raise Refused(f"error: {where}: stage {stage} ran with other settings ({diff}); run without --resume "
                      f"or with another --out_dir")
    if same_code and rec["commit"] != commit():
        raise Refused(f"error: {where}: stage {stage} ran with the code at commit {rec['commit']}, this is "
                      f"{commit()}; run without --resume or with another --out_dir")
    if not all(os.path.exists(os.path.join(args.out_dir, f)) for f in STAGE_OUTPUTS[stage]):
        return False
    sft = os.path.join(args.out_dir, "sft.pt")
    return rec["sft_digest"] is None or (os.path.exists(sft) and rec["sft_digest"] == file_digest(sft))


def total_seconds(out_dir):
    """The whole run's wall time when it was resumed: the sum of its stages' own times."""
    return sum(v["seconds"] for k, v in _load_run(out_dir)["stages"].items() if k != "all")


WORK_KEYS = ("trained_tokens", "inferred_tokens", "flops")


def total_work(out_dir):
    """The whole run's work: its stages' tokens and FLOPs summed; as its peak, the one that makes
    the run's utilisation the time-weighted mean of its stages' (each measured against its own peak)."""
    stages = [v for k, v in _load_run(out_dir)["stages"].items() if k != "all" and "flops" in v]
    if not stages:
        return {}
    work = {k: sum(v[k] for v in stages) for k in WORK_KEYS}
    work["peak_flops"] = sum(v["seconds"] * v["peak_flops"] for v in stages) / sum(v["seconds"] for v in stages)
    return work


def utilisation(rec):
    """Useful FLOPs / (wall time x the matmul peak measured in the run's dtype) of a stage's record, or None."""
    return rec["flops"] / (rec["seconds"] * rec["peak_flops"]) if rec.get("peak_flops") and rec["seconds"] else None


def work_row(name, rec):
    """One row of the report's table of where the time goes."""
    if "flops" not in rec:
        return f"| {name} | {duration(rec['seconds'])} | | | | |"
    return (f"| {name} | {duration(rec['seconds'])} | {rec['trained_tokens'] / 1e6:.2f}M | "
            f"{rec['inferred_tokens'] / 1e6:.2f}M | {rec['flops'] / 1e12:.1f} | {100 * utilisation(rec):.0f}% "
            f"of {rec['peak_flops'] / 1e9:.0f} GFLOP/s |")


def _now():
    return time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())


def read_json(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise Refused(f"error: cannot read {path}: {e}")


def _need(out_dir, name, stage):
    if not os.path.exists(path := os.path.join(out_dir, name)):
        raise Refused(f"error: {path} is missing; run `python train.py --stage {stage}` (or the whole `python train.py`) first")
    return path


def write(out_dir):
    """out_dir/report.md, report.json, curves.png and headline.png from the stages' outputs in out_dir."""
    run = read_json(_need(out_dir, "run.json", "all"))
    sft = file_digest(_need(out_dir, "sft.pt", "sft"))
    # the stages of this run's preset (--preset tiny: no joint study, no probes) and any that ran since
    planned = run["stages"].get("all", {}).get("settings", {}).get("stages", ",".join(s[1] for s in SECTIONS))
    results, md = {}, {}
    for stem, stage, _ in SECTIONS:
        if stage not in planned.split(",") and not os.path.exists(os.path.join(out_dir, stem + ".json")):
            continue
        results[stem] = read_json(_need(out_dir, stem + ".json", stage))
        with open(_need(out_dir, stem + ".md", stage)) as f:
            md[stem] = f.read().strip()
        made_from = results[stem].get("digest" if stem == "eval_sft" else "sft_digest")
        if made_from != sft:
            raise Refused(f"error: {os.path.join(out_dir, stem + '.json')} was made from another SFT model "
                             f"(digest {made_from}; {os.path.join(out_dir, 'sft.pt')} is {sft}): "
                             f"rerun `python train.py --stage {stage}`")
    pictures.curves(os.path.join(out_dir, "curves.png"), results["compare"]["curves"],
                    results.get("study", {}).get("curves", {}))
    rows, n = results["compare"]["rows"], max(map(len, results["compare"]["rows"].values()))
    pictures.headline(os.path.join(out_dir, "headline.png"), {row: [[r] for r in rs] for row, rs in rows.items()},
                      f"whiskers: lowest to highest of the {n} preference seeds" if n > 1 else
                      "one preference seed, so no whiskers")
    stages = run["stages"]
    if not stages:
        raise Refused(f"error: {os.path.join(out_dir, 'run.json')} records no finished stage; run `python train.py` first")
    first = stages.get("all") or next(iter(stages.values()))
    commits = sorted({s["commit"] for s in stages.values()})
    head = {"command": first["command"], "commit": ", ".join(commits), "device": first["device"],
            "preset": first["preset"], "dtype": first["dtype"], "finished": first["finished"],
            "sft_digest": sft, "stage_seconds": {k: v["seconds"] for k, v in stages.items()}}
    lines = ["# unipref: report", "",
             f"`{head['command']}` at commit {head['commit']}, finished {head['finished']}. "
             f"Device: {head['device']}. Preset `{head['preset']}`, dtype {head['dtype']}. "
             f"Every table below comes from one SFT model (`sft.pt`, SHA-256 {sft}..., checked), "
             f"trained with seed {first.get('seed')}.", "",
             "Where the time goes: tokens through the model in training (forward and backward, ~6 x parameters "
             "FLOPs each) and in inference (sampling, scoring, evaluation: ~2 x parameters each), counted with "
             "padding; utilisation = those FLOPs / (wall time x the matmul peak measured at the stage's start, in the run's dtype).",
             "", "| stage | wall time | tokens trained | tokens inferred | TFLOP | utilisation |",
             "|---|---|---|---|---|---|"]
    lines += [work_row(k, v) for k, v in stages.items() if k != "all"]
    lines += [work_row("whole run", stages["all"]) if "all" in stages else "| whole run | not run as one | | | | |"]
    if len(commits) > 1:
        lines += ["", "The stages were run at different commits: "
                  + "; ".join(f"{k} {v['commit']}" for k, v in stages.items()) + "."]
    for stem, stage, title in SECTIONS:
        lines += ["", f"## {title} (`{stem}.md`)", "", md[stem]] if stem in md else [
            "", f"## {title}", "", f"Not part of preset `{head['preset']}`: `python train.py --stage {stage}` runs it "
            f"from this SFT model, `python train.py --preset quick` runs every stage."]
        if stem == "eval_sft":
            lines += ["", "![held-out images with the model's captions, then prompts with the model's drawings]"
                          "(eval_sft.png)"]
        if stem == "compare":
            lines += ["", "![bias CHAIR_i and bias Cover per method, the spread over preference seeds as whiskers]"
                          "(headline.png)",
                      "", "![bias-breaking scenes: SFT and mDPO captions, wrong clauses marked](compare.png)",
                      "", "Training curves (seed 0" + ("; the last panel: the joint study's generation DPO row)"
                                                          if "study" in md else ")") + ":", "",
                      "![logps/chosen, logps/rejected, rewards/margins; generation DPO loss against ln 2](curves.png)"]
    text = "\n".join(lines) + "\n"
    write_atomic(os.path.join(out_dir, "report.md"), text)
    write_atomic(os.path.join(out_dir, "report.json"), json.dumps({"header": head, **results}, indent=1))
    print(text)
    print(f"report | {os.path.join(out_dir, 'report.md')}, report.json, curves.png, headline.png")
    return head


def duration(s):
    return f"{s:.0f} s" if s < 120 else f"{int(s // 60)} min {s % 60:.0f} s"
