"""The report's PNG figures, saved beside RUN/report.md: teacher training, the learning curves of
stages 1 and 2 against reference rankers, and the test metrics beside the paper's.

Each `*_figure` function draws one figure from the run folder, saves it and returns the Markdown
that shows it, or None when the run has nothing for it yet; `write_figures` draws them all. Only
the reference lines of the learning curves score anything (a few valid rows, again).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from delrec.core.io import atomic_path
from delrec.core.layout import RunLayout
from delrec.evaluation.metrics import PopularityScorer, candidate_ranks, metrics_from_ranks
from delrec.report.inputs import examples_per_step, read_log, run_scorer, stage_file
from delrec.training.rows import valid_subset


def write_figures(run: Path, teachers, evals: dict, paper: dict, labels: dict[str, str], config=None, data=None) -> list[str]:
    """Every figure of the run, in the report's order, as Markdown (image and caption). `labels`:
    each evaluated model's name in the report; without `config` and `data` the learning curves
    show the random ranker as their only reference."""
    drawn = (teachers_figure(run, teachers), stage1_figure(run, config, data), stage2_figure(run, config, data),
             results_figure(run, evals, paper, labels))
    return [markdown for markdown in drawn if markdown is not None]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, whatever display the machine has (or lacks)
    import matplotlib.pyplot as plt

    return plt


def _smooth(y, k=5):
    y = np.asarray(y, dtype=float)
    return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y


def _save(fig, run: Path, name: str, caption: str) -> str:
    with atomic_path(run / name) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)
    return f"![{caption}]({name})\n\n*{caption}*\n"


def teachers_figure(run: Path, teachers) -> str | None:
    """Each teacher's train loss and valid NDCG@10 per epoch: did it converge before it taught?"""
    logs = {t: read_log(RunLayout(run).teacher(t) / "train_log.jsonl") for t in teachers}
    if not any(logs.values()):
        return None
    fig, (a, b) = _pyplot().subplots(1, 2, figsize=(9, 3.2))
    for t, log in logs.items():
        rows = [e for e in log if "epoch" in e]
        a.plot([e["epoch"] for e in rows], [e["loss"] for e in rows], marker=".", label=t)
        b.plot([e["epoch"] for e in rows], [e["valid_NDCG@10"] for e in rows], marker=".", label=t)
    a.set(xlabel="epoch", ylabel="train loss", title="teachers"), b.set(xlabel="epoch", ylabel="valid NDCG@10")
    a.legend()
    return _save(fig, run, "fig-teachers.png", "Teacher training: loss and valid NDCG@10 per epoch.")


def _stage1_lines(folder: Path, evals: list[dict]) -> list[tuple[str, str, str]]:
    """(label, HR@1 key, NDCG@5 key) of each task a stage-1 run evaluated, and of the LSR prompt."""
    keys = set().union(*(e["eval"] for e in evals)) if evals else set()
    out = [(f"{folder.name} {t.upper()}", f"{t}_valid_HR@1" if f"{t}_valid_HR@1" in keys else f"{t}_valid_accuracy",
            f"{t}_valid_NDCG@5") for t in ("ta", "rps") if f"{t}_valid_accuracy" in keys]
    return out + ([(f"{folder.name} LSR (w/o LSR)", "valid_lsr_HR@1", "valid_lsr_NDCG@5")] if "valid_lsr_HR@1" in keys else [])


def _stage1_losses(log: list[dict]) -> list[tuple[str, str]]:
    return [(t.upper(), f"loss_{t}") for t in ("ta", "rps") if any(f"loss_{t}" in e for e in log)]


def stage1_figure(run: Path, config=None, data=None) -> str | None:
    """Stage 1's learning curves per task over its own candidates, and the LSR prompt's over the
    recommendation candidates: does the soft prompt learn what the teacher knows?"""

    runs = sorted(p.parent for p in RunLayout(run).stage1_runs.glob("*/train_log.jsonl"))
    if not runs:
        return None
    hs = sorted({stage_file(f, "config.json").get("top_h", 10) for f in runs})
    extra = {f"random (RPS, {h} candidates)": metrics_from_ranks(np.arange(h)) for h in hs}
    fig, n = _learning_curves("stage 1 (soft prompt)", runs, _stage1_lines, _stage1_losses, extra, config, data)
    where = f"over the {n} valid samples the stage evaluated" if n else "(valid rows not recorded: random only)"
    return _save(fig, run, "fig-stage1.png",
                 "Stage 1 learning curves: valid HR@1 and NDCG@5 of each task over its own candidates (TA: 15; RPS: the "
                 "teacher's shuffled top-h, label its top-1; LSR: the recommendation prompt with the current soft prompt and "
                 "the frozen LLM, i.e. `w/o LSR`) against the train examples of each task seen. Horizontal lines: the "
                 "expected random ranker (15 candidates, and h for RPS), and popularity and the teacher on the "
                 f"recommendation task {where}. Right: training losses (moving average of 5).")


def _stage2_lines(folder: Path, evals: list[dict]) -> list[tuple[str, str, str]]:
    return [(folder.name, "valid_HR@1", "valid_NDCG@5")]


def _stage2_losses(log: list[dict]) -> list[tuple[str, str]]:
    key = "loss_rec" if any("loss_rec" in e for e in log) else "loss"  # older logs: total only
    return [("", key)]


def stage2_figure(run: Path, config=None, data=None) -> str | None:
    """Stage 2's learning curves per method (early stopping on valid NDCG@5) and its
    recommendation loss: where each method stopped, and against which references."""
    runs = sorted(p.parent for p in RunLayout(run).stage2_runs.glob("*/train_log.jsonl"))
    if not runs:
        return None
    fig, n = _learning_curves("stage 2 (adapters)", runs, _stage2_lines, _stage2_losses, {}, config, data)
    where = f"over the same {n} valid samples" if n else "(valid rows not recorded: random only)"
    return _save(fig, run, "fig-stage2.png",
                 "Stage 2 learning curves: valid HR@1 and NDCG@5 (early stopping on NDCG@5; step 0 is the untrained adapter) "
                 "of each method against the train examples seen. Horizontal lines: the expected random ranker, and "
                 f"popularity and the teacher {where}. Right: the recommendation loss (moving average of 5).")


def results_figure(run: Path, evals: dict, paper: dict, labels: dict[str, str]) -> str | None:
    """HR@1 and NDCG@5 of every evaluated model as bars, the paper's numbers as black marks."""
    if not evals:
        return None
    names = list(evals)
    x = np.arange(len(names))
    fig, ax = _pyplot().subplots(figsize=(max(6, 0.8 * len(names)), 3.4))
    for off, (m, col) in zip((-0.2, 0.2), (("HR@1", 0), ("NDCG@5", 3))):
        ax.bar(x + off, [evals[n]["candidates"][m] for n in names], width=0.4, label=f"{m} (ours)")
        px = [(i + off, paper[n][col]) for i, n in enumerate(names) if n in paper]
        if px:
            ax.scatter(*zip(*px), marker="_", s=300, color="black", zorder=3, label=f"{m} (paper)" if off < 0 else None)
    ax.set_xticks(x, [labels[n] for n in names], rotation=30, ha="right", fontsize=8)
    ax.set(ylabel="metric", title="test metrics (bars) and the paper's (black marks)")
    ax.legend(fontsize=8)
    return _save(fig, run, "fig-results.png", "HR@1 and NDCG@5 of every model on the same test samples; black marks: the paper.")


def _learning_curves(title: str, folders: list[Path], lines, losses, extra_refs: dict, config, data) -> tuple:
    """(figure, valid rows of the references): valid HR@1 and NDCG@5 against train examples seen
    (one line per `lines(folder, evals)` entry), reference lines, and the training losses
    (`losses(log)`: (label, key) pairs) against the same axis."""
    fig, axes = _pyplot().subplots(1, 3, figsize=(14, 3.4))
    colors: dict = {}  # a line's colour, the same in every panel
    color = lambda label: colors.setdefault(label, f"C{len(colors) % 10}")
    for folder in folders:
        _plot_stage_run(axes, folder, lines, losses, color)
    refs, n = references(config, data, folders) if data is not None else ({}, 0)
    _plot_references(axes, {**refs, **extra_refs})
    axes[0].set(xlabel="train examples seen", ylabel="valid HR@1", title=title)
    axes[1].set(xlabel="train examples seen", ylabel="valid NDCG@5")
    axes[2].set(xlabel="train examples seen", ylabel="train loss (moving average of 5)")
    fig.tight_layout(rect=(0, 0, 0.85, 1))
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="center left", bbox_to_anchor=(0.85, 0.5), fontsize=7)
    if set(axes[2].get_legend_handles_labels()[1]) - set(labels):  # else the figure's legend names them
        axes[2].legend(fontsize=7)
    return fig, n


def _plot_stage_run(axes, folder: Path, lines, losses, color) -> None:
    """One stage run's valid metrics (left, middle) and smoothed losses (right) from its train log."""
    log = read_log(folder / "train_log.jsonl")
    per_step = examples_per_step(folder, log)
    evals = [e for e in log if "eval" in e]
    seen = [e.get("examples_seen", e["step"] * per_step) for e in evals]
    for label, hr_key, ndcg_key in lines(folder, evals):
        for ax, key in zip(axes, (hr_key, ndcg_key)):
            pts = [(x, e["eval"].get(key)) for x, e in zip(seen, evals)]
            pts = [(x, y) for x, y in pts if y is not None]
            if pts:
                ax.plot(*zip(*pts), marker="o", markersize=3, label=label, color=color(label))
    for label, key in losses(log):
        pts = [(e["step"] * per_step, e[key]) for e in log if key in e and "eval" not in e]
        if pts:
            y = _smooth([p[1] for p in pts])
            name = f"{folder.name} {label}".strip()
            axes[2].plot([p[0] for p in pts][len(pts) - len(y):], y, label=name, color=color(name))


def _plot_references(axes, refs: dict) -> None:
    """Horizontal lines of the reference rankers' HR@1 (left) and NDCG@5 (middle): random grey,
    popularity brown, each teacher black with a dash of its own."""
    dashes = iter(["--", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))] * 4)
    for name, m in refs.items():
        color, style = ("0.4", "-.") if name.startswith("random (RPS") else ("0.4", ":") if name.startswith("random") \
            else ("tab:brown", "--") if name == "popularity" else ("black", next(dashes))
        label = name if name.startswith("random") else f"{name} (valid)"
        for ax, key in zip(axes, ("HR@1", "NDCG@5")):
            ax.axhline(m[key], color=color, linestyle=style, linewidth=1, label=label)


def _stage_valid_rows(folder: Path, data) -> np.ndarray | None:
    """The valid rows a stage run evaluated: recorded in its metrics.json (stage 1: per task; all
    of them), or, for a stage-2 run made before they were recorded, drawn again as stage 2 draws them."""
    rows = stage_file(folder, "metrics.json").get("valid_rows")
    if isinstance(rows, dict):
        rows = sorted(set().union(*rows.values())) if rows else None
    cfg = stage_file(folder, "config.json")
    if rows is None and folder.parent.name == RunLayout.STAGE2 and "valid_samples" in cfg:
        rows = valid_subset(data, cfg.get("seed", 0), cfg["valid_samples"])
    return None if rows is None else np.asarray(rows, dtype=np.int64)


def _valid_metrics(scorer, data, rows: np.ndarray) -> dict:
    """The evaluator's candidate metrics (pessimistic ranks) on `rows`, in this process only (the
    report runs on the main process of a launch, so nothing is sharded)."""

    return metrics_from_ranks(candidate_ranks(scorer, data, rows, local=True))


def references(config, data, folders: list[Path]) -> tuple[dict, int]:
    """Horizontal reference lines for a stage's learning curves, on the recommendation task (the
    fixed candidates) over the valid rows the stage's runs evaluated (their union): the expected
    random ranker (uniform rank), popularity and each teacher the runs learned from. Returns the
    metrics by reference and the number of valid rows (0: not recorded, random only)."""

    refs = {f"random ({data.candidates.shape[1]} candidates)": metrics_from_ranks(np.arange(data.candidates.shape[1]))}
    found = [r for r in (_stage_valid_rows(f, data) for f in folders) if r is not None and len(r)]
    if config is None or not found:
        return refs, 0
    rows = np.unique(np.concatenate(found))
    used = {(stage_file(f, "config.json") or stage_file(f, "metrics.json")).get("teacher") for f in folders}
    teachers = [t for t in config.teachers if t in used] or list(config.teachers)
    makers = [("popularity", lambda: PopularityScorer(data))] + [(t, lambda t=t: run_scorer(config, data, t)) for t in teachers]
    for name, make in makers:
        try:
            refs[name] = _valid_metrics(make(), data, rows)
        except (FileNotFoundError, OSError, KeyError):  # a teacher not trained (yet)
            continue
    return refs, len(rows)
