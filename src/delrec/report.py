"""RUN/report.md: what a `delrec run` measured, written from the files the steps left behind.

Everything in the report is read from the run folder (evaluation JSONs with per-sample ranks,
stage metrics and logs, data statistics, the resolved config), so `delrec run` can rewrite it at
any time without recomputing a model.
"""

from __future__ import annotations

import platform
from pathlib import Path

import numpy as np

from delrec.io import atomic_path, read_json

PAPER_NOTE = ("Paper: Table II of the DELRec paper (ML-100K, Flan-T5-XL for DELRec, Flan-T5-Large zero-shot); "
              "its own protocol and backbone, shown for orientation, not as a like-for-like comparison.")


def _load_evals(run: Path, models: list[str]) -> dict[str, dict]:
    out = {}
    for name in models:
        path = run / "eval" / "pipeline" / f"{name}.json"
        if path.exists():
            out[name] = read_json(path)
    return out


def _fmt(x) -> str:
    return "" if x is None else f"{x:.4f}"


def _main_table(evals: dict, teachers: list[str], paper: dict) -> list[str]:
    from delrec.evaluate import METRIC_NAMES

    lines = ["| model | " + " | ".join(METRIC_NAMES) + " | paper HR@1 | paper NDCG@5 |",
             "|---|" + "---|" * (len(METRIC_NAMES) + 2)]
    for name, res in evals.items():
        if name.split("-", 1)[-1] not in ("delrec",) and name not in ("random", "popularity", "zero-shot", *teachers):
            continue
        key = f"delrec:{name.split('-')[0]}" if name.endswith("-delrec") else name
        p = paper.get(key)
        label = f"DELRec({name.split('-')[0]})" if name.endswith("-delrec") else name
        m = res["candidates"]
        lines.append(f"| {label} | " + " | ".join(_fmt(m[k]) for k in METRIC_NAMES) +
                     f" | {_fmt(p[0]) if p else ''} | {_fmt(p[1]) if p else ''} |")
    return lines


def _ablation_table(evals: dict, teachers: list[str]) -> list[str]:
    lines = ["| teacher | variant | HR@1 | HR@5 | NDCG@5 | NDCG@10 |", "|---|---|---|---|---|---|"]
    for name, res in evals.items():
        teacher, _, variant = name.partition("-")
        if teacher not in teachers or not variant:
            continue
        m = res["candidates"]
        lines.append(f"| {teacher} | {variant} | {_fmt(m['HR@1'])} | {_fmt(m['HR@5'])} | {_fmt(m['NDCG@5'])} | {_fmt(m['NDCG@10'])} |")
    return lines


def write_report(pipeline) -> Path:
    from delrec.pipeline import PAPER_ML100K, format_steps

    import torch

    c, run = pipeline.config, pipeline.run
    models = [name for name, _ in pipeline.models()]
    evals = _load_evals(run, models)
    stats = read_json(run / "data" / "stats.json")
    protocol = read_json(run / "data" / "protocol.json")
    n = next(iter(evals.values()))["num_samples"] if evals else 0
    lines = [f"# DELRec on {c.dataset}", ""]
    lines += [f"Test samples: {n} (a seeded subset, seed {c.eval_seed}, of {stats['samples']['test']}; every model "
              f"scores the same samples and the same {protocol['protocol']['num_candidates']} fixed candidates; "
              "ties count against the model).", ""]
    lines += ["## Results", "", *_main_table(evals, c.teachers, PAPER_ML100K if c.dataset == "ml-100k" else {}), "",
              PAPER_NOTE if c.dataset == "ml-100k" else "", ""]
    lines += ["## Ablations", "", *_ablation_table(evals, c.teachers), ""]
    lines += ["## Stage 1: does the LLM pick what the teacher picks?", ""]
    for t in c.teachers:
        path = run / "distill" / t / "metrics.json"
        if path.exists():
            m = read_json(path)
            for key, before in m["untrained"].items():
                lines.append(f"- {t}, {key.replace('_', ' ')} ({m['valid_samples'][key.split('_')[0]]} valid samples): "
                             f"untrained soft prompt {before:.3f}, trained {m['trained'][key]:.3f}")
    lines += ["", "## Budgets", ""]
    for folder in sorted((run / "distill").glob("*/metrics.json")) + sorted((run / "finetune").glob("*/metrics.json")):
        m = read_json(folder)
        seen = m.get("examples_seen_per_task", m.get("train_examples_seen"))
        lines.append(f"- {folder.parent.parent.name}/{folder.parent.name}: {m['steps']} steps, {seen} examples"
                     f"{' per task' if 'examples_seen_per_task' in m else ''}, {m['seconds']:.0f} s")
    lines += ["", "## Steps", "", format_steps(pipeline.steps), ""]
    lines += ["## Data and protocol", "", f"- protocol: `{protocol['protocol']}`",
              f"- filtered: {stats['filtered']}", f"- samples: {stats['samples']}", ""]
    lines += ["## Environment", "", f"- {platform.platform()}, Python {platform.python_version()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads", ""]
    path = run / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(lines))
    return path
