"""RUN/report.md, its figures and curves.json: what a `delrec run` measured, from the files its steps left.

Everything is read from the run folder (evaluation JSONs with per-sample ranks, stage metrics and
logs, data statistics, the resolved config); only the three case studies and the learning
curves' reference lines score a few samples again. So `delrec run` rewrites the report at any
time without retraining anything.

`write_report` loads what the sections share once (ReportContext) and writes one section after
another, each a `_*_section(ctx)` function returning its Markdown lines: the goal (DELRec against
its teacher, paired tests), a Table II-style block with the paper's numbers beside ours (DELRec
and the LLM-based baselines of delrec.methods under the paper's row names), the paper's claim and
each model's cost, the ablations (Tables III-IV), other attempts, stage-1 accuracy, training
curves (delrec.report.figures), the cold-start slice, case studies, budgets, settings, steps, data
and protocol, and the environment. The paper's numbers are in delrec.report.paper_numbers.
"""

from __future__ import annotations

import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import yaml

from delrec import __version__, methods
from delrec.config import PipelineConfig, upgrade_keys
from delrec.core.io import atomic_path, read_json, write_json
from delrec.core.layout import RunLayout
from delrec.core.locks import holds_run_lock
from delrec.core.names import ModelName
from delrec.data.protocol import RunData
from delrec.evaluation.significance import compare, per_sample
from delrec.report.figures import write_figures
from delrec.report.inputs import examples_per_step, run_scorer, stage_file
from delrec.report.paper_numbers import METRICS, PAPER_ML100K, PAPER_TABLE2_ML100K, PAPER_TABLE2_NOT_RUN, TABLE2_LLM_BASELINES

if TYPE_CHECKING:
    from delrec.data.protocol import RunData

__all__ = ["METRICS", "PAPER_ML100K", "PAPER_TABLE2_ML100K", "PAPER_TABLE2_NOT_RUN", "ReportContext", "claim_verdict",
           "format_paper_statistics", "format_steps", "write_report"]

SIGNIFICANT = 0.05
COLD_START = 3  # the paper's Section V-F: users with fewer than 3 earlier interactions
HEADER = ["| model | " + " | ".join(METRICS) + " | paper HR@1 | paper NDCG@5 |", "|---|" + "---|" * (len(METRICS) + 2)]


@holds_run_lock
def write_report(run: str | Path, config=None) -> Path:
    """RUN/report.md and its figures, from the files in the run folder alone (its config.yaml,
    pipeline.json, data, stage folders and evaluations): `delrec report RUN` writes it again.
    `config`: the run's PipelineConfig when the caller has it (default: read from the folder)."""
    ctx = ReportContext.load(Path(run), config)
    sections = (_title_section, _goal_section, _results_section, _claim_section, _costs_section, _ablations_section,
                _attempts_section, _stage1_section, _curves_section, _cold_start_section, _case_studies_section,
                _budgets_section, _settings_section, _steps_section, _data_section, _environment_section)
    lines = [line for section in sections for line in section(ctx)]
    path = ctx.layout.report
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


@dataclass(frozen=True)
class ReportContext:
    """What the sections share, read once from the run folder."""

    run: Path
    config: PipelineConfig
    teachers: tuple[str, ...]
    evals: dict  # model name -> its RUN/eval/pipeline/<name>.json, in the config's model order
    data: RunData
    stats: dict  # data/stats.json
    protocol: dict  # data/protocol.json
    paper: dict  # the paper's numbers by model name: PAPER_ML100K on ml-100k, none on other data sets
    rows: np.ndarray  # the test rows every model scored
    steps: list[dict]  # pipeline.json's steps but the report's own

    @classmethod
    def load(cls, run: Path, config=None) -> ReportContext:
        c = config or PipelineConfig.from_run(run)
        layout = RunLayout(run)
        summary = layout.pipeline_summary
        steps = [e for e in read_json(summary)["steps"] if e["step"] != "report"] if summary.exists() else []
        paths = {name: layout.pipeline_eval(name) for name, _ in c.models()}
        evals = {name: read_json(path) for name, path in paths.items() if path.exists()}
        rows = np.asarray(next(iter(evals.values()))["settings"]["rows"]) if evals else np.zeros(0, dtype=int)
        return cls(run, c, tuple(c.teachers), evals, RunData.load(layout.data), read_json(layout.data / "stats.json"),
                   read_json(layout.data / "protocol.json"), PAPER_ML100K if c.dataset == "ml-100k" else {}, rows, steps)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run)

    def model(self, name: str) -> ModelName:
        """`name` split as this run's: bare unless its first part is one of the run's teachers."""
        return ModelName.parse(name, self.teachers)

    def method(self, name: str) -> methods.Method | None:
        """The registered method of a model `<teacher>-<method>` of this run (None for the others)."""
        return methods.METHODS.get(self.model(name).method)

    def label(self, name: str) -> str:
        """The model's name in the report's tables: DELRec(sasrec), w/o SP (sasrec), zero-shot LLM, sasrec."""
        model = self.model(name)
        if model.method in methods.METHODS:
            return methods.get(model.method).report_label(model.teacher)
        return {"zero-shot": "zero-shot LLM"}.get(name, name)

    def table2_name(self, name: str) -> str:
        """Its name among Table II's rows: the paper's row names for a baseline method, else its label."""
        method = self.method(name)
        return method.table2_label(self.model(name).teacher) if method is not None else self.label(name)


# -- the sections, in the report's order ---------------------------------------------------------


def _title_section(ctx: ReportContext) -> list[str]:
    """What was run and on which test samples, so every number below reads against the same ones."""
    c, teachers, n, test = ctx.config, ctx.teachers, len(ctx.rows), ctx.stats["samples"]["test"]
    return [f"# DELRec on {c.dataset}: {', '.join(teachers)} teacher{'s' if len(teachers) > 1 else ''}, {c.llm} backbone", "",
            f"Everything below was measured by `delrec run` in `{ctx.run}` and is rewritten from the files there. "
            f"Test samples: **{n}**" + (f", a seeded subset (seed {c.eval_seed}) of the {test} test samples" if n < test
                                        else " (the whole test split)") +
            f"; every model scores the same samples and the same {ctx.protocol['protocol']['num_candidates']} candidates "
            "fixed on disk; ties count against the model.", ""]


def _goal_section(ctx: ReportContext) -> list[str]:
    """The question the run answers first: does DELRec beat the teacher it learned from (paired
    tests on the same samples), and the trivial references?"""
    L = ["## The goal: does DELRec beat its teacher?", ""]
    for t in ctx.teachers:
        if t in ctx.evals and f"{t}-delrec" in ctx.evals:
            L += _goal_lines(ctx, t)
    return L


def _goal_lines(ctx: ReportContext, t: str) -> list[str]:
    evals, name = ctx.evals, f"{t}-delrec"
    cmp = compare(evals[name]["ranks"], evals[t]["ranks"])
    verdict = "beats" if all(v["diff"] > 0 for v in cmp.values()) else "does **not** beat"
    L = [f"DELRec({t}) {verdict} its {t} teacher on HR@1 and NDCG@5:", "", *_paired_table("teacher", list(cmp.items()))]
    if t == "sasrec" and ctx.paper:
        L += ["", f"The paper reports +{ctx.paper['sasrec-delrec'][0] / ctx.paper['sasrec'][0] - 1:.1%} HR@1 for DELRec(SASRec) "
              "over SASRec with Flan-T5-XL."]
    L.append("")
    # the references below the teacher: has the LLM learned anything a trivial ranker lacks?
    others = [r for r in ("zero-shot", "popularity", "random") if r in evals]
    if others:
        L += [f"DELRec({t}) against the other references on the same samples (paired tests):", ""]
        L += _paired_table("reference", [(f"{m} vs {ctx.label(r)}", v) for r in others
                                         for m, v in compare(evals[name]["ranks"], evals[r]["ranks"]).items()])
        L.append("")
    return L


def _results_section(ctx: ReportContext) -> list[str]:
    """Table II: every reference, teacher, DELRec and LLM-based baseline on the test samples, the
    paper's HR@1 and NDCG@5 beside them (ablations are in their own section)."""
    L = ["## Results (Table II style)", "", *HEADER]
    for name, res in ctx.evals.items():
        L += _result_rows(ctx, name, res["candidates"])
    if ctx.paper:
        L += ["", "Paper: DELRec and the LLM-based baselines with Flan-T5-XL, and the zero-shot row of Flan-T5-XL "
              "(Table II); the paper's own data pipeline and candidate sampling, shown for orientation, not as a "
              "like-for-like comparison. Our baselines run on this run's backbone, candidates and stage 2 "
              "(docs/baselines.md)."]
    L.append("")
    return L


def _result_rows(ctx: ReportContext, name: str, metrics: dict) -> list[str]:
    method, paper = ctx.method(name), ctx.paper
    if method is None:  # references, teachers, the zero-shot LLM
        return [_row(ctx.label(name), metrics, paper.get(name))]
    if not method.is_delrec and not method.paper_rows:  # an ablation only
        return []
    theirs = [PAPER_TABLE2_ML100K[r] for r in method.paper_rows if r in PAPER_TABLE2_ML100K] if paper else []
    L = [_row(method.table2_label(ctx.model(name).teacher), metrics,
              paper.get(name) if method.is_delrec else theirs[0] if len(theirs) == 1 else None)]
    if len(theirs) > 1:  # one of ours stands for several of the paper's rows: each of theirs below it
        L += [f"| {r} (paper) |" + " |" * len(METRICS) + f" {v[0]:.4f} | {v[3]:.4f} |" for r, v in zip(method.paper_rows, theirs)]
    return L


def _claim_section(ctx: ReportContext) -> list[str]:
    """The paper's claim, per teacher: DELRec against each Table II baseline this run evaluated on
    the same samples (paired tests), whether the claim holds here, and which rows were not run."""
    L = []
    for t in ctx.teachers:
        name = f"{t}-delrec"
        others = [b for b in _baselines(ctx) if b != name]
        if name in ctx.evals and others:
            L += _claim_lines(ctx, t, others)
    return L


def _baselines(ctx: ReportContext) -> list[str]:
    """The models DELRec is compared with in the paper's Table II that this run evaluated: the
    teachers, the zero-shot LLM and every method standing for a Table II row."""
    out = [t for t in ctx.teachers if t in ctx.evals] + [n for n in ("zero-shot",) if n in ctx.evals]
    out += [n for n in ctx.evals if (m := ctx.method(n)) is not None and m.paper_rows]
    return out


def _claim_lines(ctx: ReportContext, t: str, others: list[str]) -> list[str]:
    name = f"{t}-delrec"
    L = [f"## The paper's claim: DELRec({t}) above every baseline of Table II?", "",
         "Paired tests on the same test samples (HR@1: exact McNemar; NDCG@5: sign-flip permutation); "
         f"significant: p < {SIGNIFICANT}.", "",
         "| baseline | HR@1 DELRec − baseline | p | NDCG@5 DELRec − baseline | p | verdict |", "|---|---|---|---|---|---|"]
    groups = {"above": [], "partly": [], "below": [], "unclear": []}
    for b in others:
        v = compare(ctx.evals[name]["ranks"], ctx.evals[b]["ranks"])
        h, n = v["HR@1"], v["NDCG@5"]
        verdict, group, on = claim_verdict(v)
        groups[group].append(ctx.table2_name(b) + (f" (on {on[0]} only)" if group == "below" and len(on) == 1 else ""))
        L.append(f"| {ctx.table2_name(b)} | {h['diff']:+.4f} | {h['p_value']:.3g} | {n['diff']:+.4f} | {n['p_value']:.3g} | {verdict} |")
    L += ["", _claim_sentence(t, groups)]
    missing = [r for r in TABLE2_LLM_BASELINES
               if not any(r in (m.paper_rows if (m := ctx.method(b)) else ()) for b in others)]
    missing += list(PAPER_TABLE2_NOT_RUN)
    return L + ["", f"Not in this comparison (not run here, or no method of delrec stands for them yet): {', '.join(missing)}.", ""]


def _claim_sentence(t: str, groups: dict[str, list[str]]) -> str:
    above, partly, below, unclear = groups["above"], groups["partly"], groups["below"], groups["unclear"]
    if not below and not unclear and not partly:
        return f"**The claim holds here**: DELRec({t}) is significantly above every baseline this run evaluated, on HR@1 and NDCG@5."
    parts = [f"below {', '.join(below)}" if below else "", f"not significantly different from {', '.join(unclear)}" if unclear else "",
             f"above on one metric only against {', '.join(partly)}" if partly else "",
             f"above {', '.join(above)} on both metrics" if above else ""]
    return f"**The claim does not hold here**: DELRec({t}) is " + "; ".join(p for p in parts if p) + "."


def claim_verdict(comparison: dict) -> tuple[str, str, tuple[str, ...]]:
    """DELRec against one baseline from `compare`'s paired tests on HR@1 and NDCG@5: the verdict
    written in the report, its group (`above`: significantly above on both metrics; `below`:
    significantly below on at least one; `partly`: above on one metric, the other not
    significant; `unclear`: neither significant) and the metrics on which the group's difference
    is significant."""
    metrics = ("HR@1", "NDCG@5")
    better = tuple(m for m in metrics if comparison[m]["diff"] > 0 and comparison[m]["p_value"] < SIGNIFICANT)
    worse = tuple(m for m in metrics if comparison[m]["diff"] < 0 and comparison[m]["p_value"] < SIGNIFICANT)
    if worse:
        return ("DELRec **below**" if len(worse) == 2 else f"DELRec **below** on {worse[0]} only"), "below", worse
    if len(better) == 2:
        return "DELRec above", "above", better
    if better:
        return f"DELRec above on {better[0]} only", "partly", better
    return "no significant difference", "unclear", ()


def _costs_section(ctx: ReportContext) -> list[str]:
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


def _ablations_section(ctx: ReportContext) -> list[str]:
    """Tables III-IV: each ablation of DELRec on the same samples, and its paired difference from
    DELRec with the same teacher (what each component is worth here)."""
    abl = [n for n in ctx.evals if not ctx.model(n).bare and ((m := ctx.method(n)) is None or m.ablation)]
    if not abl:
        return []
    L = ["## Ablations (Tables III-IV)", "", *HEADER]
    L += [_row(ctx.label(name), ctx.evals[name]["candidates"], ctx.paper.get(name)) for name in abl]
    for t in ctx.teachers:
        base = ctx.evals.get(f"{t}-delrec")
        for name in abl:
            if base is not None and ctx.model(name).teacher == t and name != f"{t}-delrec":
                v = compare(base["ranks"], ctx.evals[name]["ranks"])
                L.append(f"- DELRec({t}) vs {ctx.label(name)}: HR@1 {v['HR@1']['diff']:+.4f} (p {v['HR@1']['p_value']:.3g}), "
                         f"NDCG@5 {v['NDCG@5']['diff']:+.4f} (p {v['NDCG@5']['p_value']:.3g})")
    L.append("")
    return L


def _attempts_section(ctx: ReportContext) -> list[str]:
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


def _stage1_section(ctx: ReportContext) -> list[str]:
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


def _curves_section(ctx: ReportContext) -> list[str]:
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


def _cold_start_section(ctx: ReportContext) -> list[str]:
    """Section V-F's slice: every model on the test users with little history, where a
    sequential teacher has least to go on."""
    if not ctx.evals:
        return []
    cold = ctx.data.history_len[ctx.rows] < COLD_START
    L = [f"## Cold start: users with fewer than {COLD_START} earlier interactions", ""]
    if cold.sum() == 0:
        return L + [f"None of the {len(ctx.rows)} test samples is cold-start (the chronological split puts few new users "
                    "in the test period).", ""]
    L += [f"{int(cold.sum())} of the {len(ctx.rows)} test samples.", "", "| model | HR@1 | NDCG@5 |", "|---|---|---|"]
    for name, res in ctx.evals.items():
        r = np.asarray(res["ranks"])[cold]
        L.append(f"| {ctx.label(name)} | {per_sample(r, 'HR@1').mean():.4f} | {per_sample(r, 'NDCG@5').mean():.4f} |")
    L.append("")
    return L


def _case_studies_section(ctx: ReportContext) -> list[str]:
    """Figure 9: three test samples of the first teacher and its DELRec (the first in subset order
    of each kind: both right, only DELRec right, only the teacher right), scored again."""
    cases = _case_studies(ctx, ctx.teachers[0]) if ctx.evals else []
    if not cases:
        return []
    return ["## Case studies (Figure 9 style)", "", "The first test sample (in subset order) of each kind; not chosen by hand.", "", *cases]


def _case_picks(evals: dict, teacher: str, name: str) -> list[tuple[str, int]]:
    """(kind, index into the test subset) of the first sample of each kind that has one."""
    hit_t = np.asarray(evals[teacher]["ranks"]) == 0
    hit_d = np.asarray(evals[name]["ranks"]) == 0
    picks = []
    for kind, mask in (("both right", hit_t & hit_d), ("only DELRec right", hit_d & ~hit_t),
                       ("only the teacher right", hit_t & ~hit_d)):
        idx = np.flatnonzero(mask)
        if len(idx):
            picks.append((kind, int(idx[0])))
    return picks


def _case_studies(ctx: ReportContext, teacher: str) -> list[str]:
    """The picked samples with history, each model's top-1 and the truth."""
    name, data = f"{teacher}-delrec", ctx.data
    if teacher not in ctx.evals or name not in ctx.evals:
        return []
    picks = _case_picks(ctx.evals, teacher, name)
    if not picks:
        return []
    chosen = np.array([ctx.rows[i] for _, i in picks])
    titles = [""] + data.items["title"].tolist()
    top1 = {}
    for model in (teacher, name):
        scores = np.asarray(run_scorer(ctx.config, data, model).score_candidates(data, chosen), dtype=np.float64)
        top1[model] = data.candidates[chosen, scores.argmax(axis=1)]
    out = []
    for j, (kind, _) in enumerate(picks):
        r = chosen[j]
        history = [titles[k] for k in data.history[r] if k > 0]
        out += [f"**Case {j + 1} ({kind}), test sample {int(data.sample_id[r])}.**", "",
                f"- history (most recent last): {'; '.join(history)}",
                f"- {teacher} top-1: {titles[top1[teacher][j]]}",
                f"- DELRec({teacher}) top-1: {titles[top1[name][j]]}",
                f"- truth: {titles[data.target[r]]}", ""]
    return out


def _budgets_section(ctx: ReportContext) -> list[str]:
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


def _settings_section(ctx: ReportContext) -> list[str]:
    """The resolved config as the run wrote it: every setting behind the numbers above."""
    config = ctx.layout.config
    return ["Settings (the resolved config, `config.yaml` in the run folder):", "", "```yaml",
            config.read_text().strip() if config.exists() else "", "```", ""]


def _steps_section(ctx: ReportContext) -> list[str]:
    """Wall time and peak memory of each pipeline step (pipeline.json)."""
    return ["## Steps: wall time and peak memory", "", format_steps(ctx.steps), "",
            "A step skipped by this invocation shows the time and peak resident memory of its last real run "
            "(`pipeline.json`); the report step itself is not in the total.", ""]


def format_steps(steps: list[dict]) -> str:
    """Steps as a Markdown table; a skipped step shows the time and memory of its last real run."""
    lines = ["| step | this invocation | seconds | peak memory (MiB) |", "|---|---|---|---|"]
    total = 0.0
    for s in steps:
        secs = "" if s["seconds"] is None else f"{s['seconds']:.1f}"
        mem = "" if s["peak_rss_mb"] is None else str(s["peak_rss_mb"])
        total += s["seconds"] or 0.0
        lines.append(f"| {s['step']} | {s.get('this_invocation', s['status'])} | {secs} | {mem} |")
    lines.append(f"| total | | {total:.1f} | |")
    return "\n".join(lines)


def _data_section(ctx: ReportContext) -> list[str]:
    """The data set and protocol as prepared (stats.json, protocol.json), beside the paper's statistics."""
    stats, f = ctx.stats, ctx.stats["filtered"]
    return ["## Data and protocol", "", f"- dataset: {ctx.config.dataset}; protocol: `{json.dumps(ctx.protocol['protocol'])}`",
            f"- after filtering: {f['users']} users, {f['items']} items, {f['interactions']} interactions (sparsity {f['sparsity']:.2%})",
            f"- samples: train {stats['samples']['train']}, valid {stats['samples']['valid']}, test {stats['samples']['test']}",
            "- see docs/protocol.md for the split, the candidates and the metrics", "",
            *format_paper_statistics(stats)]


def format_paper_statistics(stats: dict) -> list[str]:
    """Markdown lines setting the paper's statistics of this data set (stats.json `paper`, from
    delrec.data.paper) beside the files as read, what the title filter dropped (`without_title`)
    and what is left after the 5-core; none for another data set."""
    paper = stats.get("paper")
    if not paper:
        return []
    f = stats["filtered"]
    L = [f"The paper's statistics ({paper['table']}) beside this run's:", "",
         "| | users | items | interactions | sparsity |", "|---|---|---|---|---|",
         f"| paper | {paper['users']:,} | {paper['items']:,} | {paper['interactions']:,} | {paper['sparsity']:.2%} |"]
    if "as_read" in paper:
        r = paper["as_read"]
        L.append(f"| the source's files as read | {r['users']:,} | {r['items']:,} | {r['interactions']:,} | "
                 f"{1 - r['interactions'] / (r['users'] * r['items']):.2%} |")
    untitled = stats.get("without_title")
    if untitled:  # the reader's title policy (docs/datasets.md): what it cost
        L.append(f"| dropped for want of a title | | {untitled['items']:,} ({untitled['items_share']:.2%}) | "
                 f"{untitled['interactions']:,} ({untitled['interactions_share']:.2%}) | |")
    ratio = paper["filtered_over_paper"]
    L += [f"| after titles and the 5-core | {f['users']:,} | {f['items']:,} | {f['interactions']:,} | {f['sparsity']:.2%} |",
          f"| filtered / paper | {ratio['users']:.3g} | {ratio['items']:.3g} | {ratio['interactions']:.3g} | |", "",
          f"Why they differ: {paper['why_different']} (docs/datasets.md).", ""]
    return L


def _environment_section(ctx: ReportContext) -> list[str]:
    """The software and machine that wrote the report (probed now, not read from the run: the
    one section that depends on where `delrec report` runs)."""


    versions = {}
    for mod in ("torch", "transformers", "peft", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    cpu = platform.processor()
    if Path("/proc/cpuinfo").exists():
        with open("/proc/cpuinfo") as info:
            cpu = next((line.split(":", 1)[1].strip() for line in info if line.startswith("model name")), cpu)
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    return ["## Environment", "", f"- delrec {__version__}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
            f"- {platform.platform()}, Python {platform.python_version()}",
            f"- CPU: {cpu}, {torch.get_num_threads()} torch threads; GPU: {gpu}", ""]


# -- table rows ----------------------------------------------------------------------------------


def _row(label: str, metrics: dict, paper=None, extra: str = "") -> str:
    ours = " | ".join(f"{metrics[k]:.4f}" for k in METRICS)
    theirs = f" | {paper[0]:.4f} | {paper[3]:.4f}" if paper else " | | "
    return f"| {label}{extra} | {ours}{theirs} |"


def _paired_table(other: str, comparisons: list[tuple[str, dict]]) -> list[str]:
    """Rows of `significance.compare` results (DELRec first, `other` second) as a Markdown table."""
    out = [f"| metric | DELRec | {other} | difference (95% CI) | relative | p-value (test) |", "|---|---|---|---|---|---|"]
    for m, v in comparisons:
        rel = f"{v['relative']:+.1%}" if v["relative"] is not None else ""
        out.append(f"| {m} | {v['a']:.4f} | {v['b']:.4f} | {v['diff']:+.4f} ({v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}) "
                   f"| {rel} | {v['p_value']:.3g} ({v['test']}) |")
    return out
