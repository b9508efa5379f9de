"""The report's account of training: what each model cost, the stages' valid curves (curves.json),
stage 1's accuracies, the budgets, and earlier attempts with other settings."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import yaml

from delrec import methods
from delrec.config import upgrade_keys
from delrec.core.io import read_json, write_json
from delrec.core.layout import RunLayout
from delrec.core.names import ModelName
from delrec.report.context import ReportContext
from delrec.report.figures import write_figures
from delrec.report.inputs import examples_per_step, stage_file


def costs_section(ctx: ReportContext) -> list[str]:
    """What each model cost to train and to evaluate, so a gain reads against its price (written
    with the claim, i.e. when some DELRec was evaluated)."""
    if not any(f"{t}-delrec" in ctx.evals for t in ctx.teachers):
        return []
    L = ["### What each model cost", "", "Training as recorded by its steps (seconds of training steps, evaluation excluded), "
         "and the time to score the test samples.", "",
         "| model | trained on | training seconds | evaluation seconds |", "|---|---|---|---|"]
    for name in ctx.evals:
        if name in ("random", "popularity"):
            continue
        what, train, evaluation = _training_cost(ctx, name)
        L.append(f"| {ctx.table2_name(name)} | {what} | {train} | {evaluation} |")
    L.append("")
    return L


def _training_cost(ctx: ReportContext, name: str) -> tuple[str, str, str]:
    """(what it trained, its training seconds, its evaluation seconds) from the step folders."""
    run, evals = ctx.run, ctx.evals
    evaluation = f"{evals[name]['seconds']:.0f}" if name in evals and "seconds" in evals[name] else ""
    if name in ctx.teachers:
        m = stage_file(RunLayout(run).teacher(name), "metrics.json")
        return (f"{m.get('epochs_run', '?')} epochs over the train split", f"{m['train_seconds']:.0f}" if "train_seconds" in m else "",
                evaluation)
    method = ctx.method(name)
    if method is None:
        return ("nothing", "0", evaluation)
    teacher, parts, seconds = ctx.model(name).teacher, [], 0.0
    stage1 = method.stage1_folder(teacher)
    if stage1 and (RunLayout(run).stage1(stage1) / "metrics.json").exists():
        m = read_json(RunLayout(run).stage1(stage1) / "metrics.json")
        shared = " (shared with the other methods that use it)" if method.stage1 == "shared" else ""
        parts.append(f"stage 1: {m.get('examples_seen_per_task', '?')} examples per task{shared}")
        seconds += m.get("seconds", 0.0)
    if method.stage2 and (RunLayout(run).stage2(name) / "metrics.json").exists():
        m = read_json(RunLayout(run).stage2(name) / "metrics.json")
        parts.append(f"stage 2: {m.get('train_examples_seen', '?')} examples")
        seconds += m.get("seconds", 0.0)
    return ("; ".join(parts) or "nothing (no training)", f"{seconds:.0f}", evaluation)


def attempts_section(ctx: ReportContext) -> list[str]:
    """Earlier runs named in `attempts`, their LLM models' results beside this run's with the
    settings that differ: what other budgets or sizes gave."""
    if not ctx.config.attempts:
        return []
    return ["## Other attempts", "", "Earlier runs with other settings (`attempts` in the config), read from their folders:", "",
            *_attempts(ctx), ""]


def _attempts(ctx: ReportContext) -> list[str]:
    """Other runs' results beside this one's, with the settings that differ from this run's."""

    mine = _flatten(upgrade_keys(yaml.safe_load(ctx.layout.config.read_text())))
    ignore = {"run_dir", "attempts", "report", "methods", "zero_shot"}
    lines = ["| run | settings that differ from this run | model | test samples | HR@1 | NDCG@5 | "
             "stage-1 RPS valid accuracy (untrained -> trained) |", "|---|---|---|---|---|---|---|"]
    for folder in map(Path, ctx.config.attempts):
        if not RunLayout(folder).config.exists():
            lines.append(f"| {folder} | (no `delrec run` there) | | | | |")
            continue
        theirs = _flatten(upgrade_keys(yaml.safe_load(RunLayout(folder).config.read_text())))
        diff = ", ".join(f"{k}={theirs.get(k)}" for k in sorted(set(mine) | set(theirs))
                         if k.split(".")[0] not in ignore and mine.get(k) != theirs.get(k)) or "none"
        for path in sorted(RunLayout(folder).pipeline_evals.glob("*.json")):
            if not ctx.model(path.stem).bare:  # the LLM models of this run's teachers
                lines.append(_attempt_row(ctx, folder, diff, path))
    return lines


def _attempt_row(ctx: ReportContext, folder: Path, diff: str, path: Path) -> str:
    res, name = read_json(path), path.stem
    same = np.array_equal(np.asarray(res["settings"]["rows"]), ctx.rows)
    n = f"{res['num_samples']}" + ("" if same else " (other samples)")
    m = res["candidates"]
    return (f"| {folder.name} | {diff} | {ctx.label(name)} | {n} | {m['HR@1']:.4f} | {m['NDCG@5']:.4f} | "
            f"{_rps_accuracy(folder, ctx.model(name))} |")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rps_accuracy(folder: Path, model: ModelName) -> str:
    """Stage 1's RPS valid accuracy behind a stage-2 model of another run (blank when it had none)."""
    stage1 = methods.get(model.method).stage1_folder(model.teacher) if model.method in methods.METHODS else None
    path = RunLayout(folder).stage1(str(stage1)) / "metrics.json"
    if stage1 is None or not path.exists():
        return ""
    m = read_json(path)
    before, after = m.get("untrained", {}).get("rps_valid_accuracy"), m.get("trained", {}).get("rps_valid_accuracy")
    return "" if before is None or after is None else f"{before:.3f} -> {after:.3f}"


def stage1_section(ctx: ReportContext) -> list[str]:
    """Stage 1, per distillation: how often the LLM picks what the task's label is before and
    after training the soft prompt, i.e. whether it learned the teacher's patterns at all."""
    L = ["## Stage 1: does the LLM pick what the teacher picks?", "",
         "Valid accuracy (HR@1): how often the LLM's top candidate is the label (TA: the masked most recent item among "
         "15 candidates; RPS: the teacher's top-1 among its shuffled top-h list), and NDCG@5 over the same candidates, "
         "with the untrained (random) and the trained soft prompt; ties count against the LLM.", ""]
    for path in sorted(ctx.layout.stage1_runs.glob("*/metrics.json")):
        m, folder = read_json(path), path.parent.name
        hist = m.get("valid_history") or []
        first, last = (hist[0]["eval"], hist[-1]["eval"]) if hist else ({}, {})
        for key, before in m["untrained"].items():
            task = key.split("_")[0]
            ndcg = f"{task}_valid_NDCG@5"
            extra = f"; NDCG@5 {first[ndcg]:.3f} -> {last[ndcg]:.3f}" if ndcg in first and ndcg in last else ""
            L.append(f"- {folder}, {task.upper()} ({m['valid_samples'][task]} valid samples): untrained "
                     f"{before:.3f}, trained {m['trained'][key]:.3f}{extra}")
        if "valid_lsr_HR@1" in first and "valid_lsr_HR@1" in last:
            L.append(f"- {folder}, the recommendation prompt with the soft prompt (`w/o LSR`, "
                     f"{m.get('valid_lsr_samples')} valid samples): HR@1 {first['valid_lsr_HR@1']:.3f} -> "
                     f"{last['valid_lsr_HR@1']:.3f}, NDCG@5 {first['valid_lsr_NDCG@5']:.3f} -> {last['valid_lsr_NDCG@5']:.3f}")
    L.append("")
    return L


def curves_section(ctx: ReportContext) -> list[str]:
    """The figures (delrec.report.figures) and RUN/curves.json, with how large a difference
    between stage-2 curves has to be to be more than noise."""
    labels = {name: ctx.label(name) for name in ctx.evals}
    L = ["## Training curves and results", "",
         *write_figures(ctx.run, ctx.teachers, ctx.evals, ctx.paper, labels, ctx.config, ctx.data)]
    curves = _curves(ctx.run)
    write_json(ctx.layout.curves, curves)
    return L + [*_noise_lines(curves["valid_noise"]["stage2"]), "",
                "Every valid point of both stages (and these standard errors) is in `curves.json`, written beside this report.", ""]


def _curves(run: Path) -> dict:
    """RUN/curves.json: every valid evaluation of stages 1 and 2 (their metrics.json), in folder and
    step order, and the standard error of stage 2's valid metrics at its valid size."""
    out = {"stage1": {}, "stage2": {}, "valid_noise": {"stage2": {}}}
    for path in sorted(RunLayout(run).stage1_runs.glob("*/metrics.json")):
        m = read_json(path)
        hist = m.get("valid_history") or []
        per_step = examples_per_step(path.parent, hist)
        n = {**m.get("valid_samples", {}), **({"lsr": m["valid_lsr_samples"]} if m.get("valid_lsr_samples") else {})}
        out["stage1"][path.parent.name] = [{"examples_seen": e.get("examples_seen", round(e["step"] * per_step)),
                                            "seconds": e.get("seconds"), "valid_samples": n, **e["eval"]} for e in hist]
    for path in sorted(RunLayout(run).stage2_runs.glob("*/metrics.json")):
        m = read_json(path)
        hist, n = m.get("valid_history") or [], m.get("valid_samples", 0)
        per_step = examples_per_step(path.parent, hist)
        out["stage2"][path.parent.name] = [{"examples_seen": e.get("examples_seen", round(e["step"] * per_step)), "valid_samples": n,
                                            **{k: e[k] for k in ("valid_HR@1", "valid_NDCG@5", "seconds") if k in e}} for e in hist]
        last = hist[-1] if hist else {}
        if n and "valid_HR@1" in last and "valid_NDCG@5" in last:
            # at the last evaluation. HR@1 is a proportion p: sqrt(p(1-p)/n). Per-sample NDCG@5 is not
            # stored, but values in [0, 1] with mean m vary at most m(1-m) <= 1/4: an upper bound
            p, g = last["valid_HR@1"], last["valid_NDCG@5"]
            out["valid_noise"]["stage2"][path.parent.name] = {
                "valid_samples": n, "hr1_std_error": round(math.sqrt(p * (1 - p) / n), 4),
                "ndcg5_std_error": round(math.sqrt(g * (1 - g) / n), 4), "std_error_at_most": round(0.5 / math.sqrt(n), 4)}
    return out


def _noise_lines(noise: dict) -> list[str]:
    """One sentence per stage-2 valid size: how large a curve difference has to be to mean anything."""
    out = []
    for n in sorted({v["valid_samples"] for v in noise.values()}):
        at = [v for v in noise.values() if v["valid_samples"] == n]
        hr, g = max(v["hr1_std_error"] for v in at), max(v["ndcg5_std_error"] for v in at)
        bound = 0.5 / math.sqrt(n)
        out.append(f"Stage-2 valid metrics are on {n} samples: one standard error (at the last evaluation, the largest "
                   f"of {len(at)} run{'s' if len(at) > 1 else ''}) is about {hr:.3f} for HR@1 (sqrt(p(1-p)/n)) and at most "
                   f"{g:.3f} for NDCG@5 (sqrt(m(1-m)/n): per-sample values are not stored), and at most 0.5/sqrt(n) = "
                   f"{bound:.3f} for either whatever its value; curve differences smaller than about twice that "
                   f"({2 * (max(hr, g) or bound):.3f}) are noise.")  # a metric at 0 or 1: the estimate says 0, the bound holds
    return out


def budgets_section(ctx: ReportContext) -> list[str]:
    """What each stage run spent: steps, train examples (as epochs of the train split) and seconds,
    so results of different budgets are not read as if equal."""
    n_train = int(len(ctx.data.indices("train")))
    L = ["## Budgets", "",
         f"Train examples seen (stage 1: of each task) and the fraction of one epoch of the {n_train}-sample train split "
         "that is; seconds of training exclude the evaluations where the run recorded both.", ""]
    paths = sorted(ctx.layout.stage1_runs.glob("*/metrics.json")) + sorted(ctx.layout.stage2_runs.glob("*/metrics.json"))
    return L + [_budget_line(path, n_train) for path in paths] + [""]


def _budget_line(path: Path, n_train: int) -> str:
    m = read_json(path)
    per_task = "examples_seen_per_task" in m  # stage 1
    seen = m["examples_seen_per_task"] if per_task else m["train_examples_seen"]
    distinct = m.get("distinct_train_examples_per_task" if per_task else "distinct_train_examples")
    if isinstance(distinct, dict):
        distinct = ", ".join(f"{t.upper()} {v}" for t, v in distinct.items())
    extra = "" if per_task else f"; best valid NDCG@5 {m['best_valid_NDCG@5']:.4f} at step {m['best_step']} of {m['valid_samples']} valid samples"
    timing = f"{m['seconds']:.0f} s of training ({m['wall_seconds']:.0f} s with the evaluations)" if "wall_seconds" in m \
        else f"{m['seconds']:.0f} s"
    return (f"- {path.parent.parent.name}/{path.parent.name}: {m['steps']} steps, {seen} train examples"
            f"{' per task' if per_task else ''} = {seen / max(n_train, 1):.3g} epoch"
            f"{f' ({distinct} distinct)' if distinct is not None else ''}, {timing}{extra}")
