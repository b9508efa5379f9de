"""RUN/report.md, its figures and curves.json: what a `delrec run` measured, from the files its steps left.

Everything is read from the run folder (evaluation JSONs with per-sample ranks, stage metrics and
logs, data statistics, the resolved config); only the three case studies and the learning
curves' reference lines score a few samples again. So `delrec run` rewrites the report at any
time without retraining anything.

`write_report` loads what the sections share once (delrec.report.context.ReportContext) and writes
one section after another, each a `*_section(ctx)` function returning its Markdown lines: the goal
(DELRec against its teacher, paired tests; here), a Table II-style block with the paper's numbers
beside ours, the paper's claim, the same over the whole catalogue and in other candidate orders
(delrec.report.robustness), the ablations (Tables III-IV), the cold-start slice and case
studies (delrec.report.results); each model's cost, other attempts, stage-1 accuracy, training
curves and budgets (delrec.report.training, figures in delrec.report.figures); settings, steps,
data and protocol, and the environment (here). The paper's numbers are in
delrec.report.paper_numbers.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import torch

from delrec import __version__
from delrec.core.io import atomic_path
from delrec.core.locks import holds_run_lock
from delrec.evaluation.significance import compare
from delrec.report.context import ReportContext
from delrec.report.results import ablations_section, case_studies_section, claim_section, cold_start_section, paired_table, results_section
from delrec.report.robustness import full_catalogue_section, order_section
from delrec.report.training import attempts_section, budgets_section, costs_section, curves_section, stage1_section

__all__ = ["format_paper_statistics", "format_steps", "write_report"]


@holds_run_lock
def write_report(run: str | Path, config=None) -> Path:
    """RUN/report.md and its figures, from the files in the run folder alone (its config.yaml,
    pipeline.json, data, stage folders and evaluations): `delrec report RUN` writes it again.
    `config`: the run's PipelineConfig when the caller has it (default: read from the folder)."""
    ctx = ReportContext.load(Path(run), config)
    sections = (_title_section, _goal_section, results_section, claim_section, full_catalogue_section, order_section,
                costs_section, ablations_section,
                attempts_section, stage1_section, curves_section, cold_start_section, case_studies_section,
                budgets_section, _settings_section, _steps_section, _data_section, _environment_section)
    lines = [line for section in sections for line in section(ctx)]
    path = ctx.layout.report
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path


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
    L = [f"{ctx.label(name)} {verdict} its {ctx.label(t)} teacher on HR@1 and NDCG@5:", "", *paired_table("teacher", list(cmp.items()))]
    if t == "sasrec" and ctx.paper:
        L += ["", f"The paper reports +{ctx.paper['sasrec-delrec'][0] / ctx.paper['sasrec'][0] - 1:.1%} HR@1 for DELRec(SASRec) "
              "over SASRec with Flan-T5-XL."]
    L.append("")
    # the references below the teacher: has the LLM learned anything a trivial ranker lacks?
    others = [r for r in ("zero-shot", "popularity", "random") if r in evals]
    if others:
        L += [f"{ctx.label(name)} against the other references on the same samples (paired tests):", ""]
        L += paired_table("reference", [(f"{m} vs {ctx.label(r)}", v) for r in others
                                         for m, v in compare(evals[name]["ranks"], evals[r]["ranks"]).items()])
        L.append("")
    return L


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
