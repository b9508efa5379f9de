"""RUN/report.md, its figures and curves.json: what a `delrec run` measured, from the files its steps left.

Everything is read from the run folder (evaluation JSONs with per-sample ranks, stage metrics and
logs, data statistics, the resolved config); only the three case studies score a few samples
again. So `delrec run` rewrites the report at any time without retraining anything.

Sections: the goal (DELRec against its teacher, paired tests), a Table II-style block with the
paper's numbers beside ours (DELRec and the LLM-based baselines of delrec.methods under the paper's
row names), the ablations (Tables III-IV), stage-1 accuracy, training curves,
the cold-start slice, case studies, budgets, steps, data, protocol and environment.
"""

from __future__ import annotations

import json
import math
import platform
from pathlib import Path

import numpy as np

from delrec import methods
from delrec.io import atomic_path, read_json, write_json
from delrec.locks import holds_run_lock

METRICS = ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10")
# The paper's ML-100K numbers (Tables II, III, IV; DELRec with Flan-T5-XL), by our model names.
PAPER_ML100K = {
    "caser": (0.3250, 0.6640, 0.7713, 0.5034, 0.5564),
    "gru4rec": (0.3162, 0.6495, 0.7568, 0.4824, 0.5430),
    "sasrec": (0.3341, 0.6704, 0.8062, 0.5183, 0.5727),
    "zero-shot": (0.0938, 0.2441, 0.3437, 0.1711, 0.2121),  # Flan-T5-XL
    "caser-delrec": (0.3664, 0.6804, 0.8215, 0.5108, 0.5843),
    "gru4rec-delrec": (0.3635, 0.6722, 0.8137, 0.5062, 0.5807),
    "sasrec-delrec": (0.3701, 0.6919, 0.8386, 0.5237, 0.5950),
    "sasrec-wo-sp": (0.3020, 0.6211, 0.8057, 0.4450, 0.5646),
    "sasrec-mcp": (0.3106, 0.6357, 0.8141, 0.4603, 0.5712),
    "sasrec-usp": (0.2752, 0.5724, 0.7913, 0.4296, 0.5259),
    "sasrec-wo-dpsm": (0.3020, 0.6211, 0.8057, 0.4450, 0.5646),
    "sasrec-wo-lsr": (0.2814, 0.5843, 0.7845, 0.4223, 0.5314),
    "sasrec-wo-ta": (0.3425, 0.6617, 0.8231, 0.4867, 0.5797),
    "sasrec-wo-rps": (0.3379, 0.6585, 0.8187, 0.4805, 0.5715),
    "sasrec-ulsr": (0.3486, 0.6678, 0.8276, 0.4930, 0.5823),
    "sasrec-udpsm": (0.3513, 0.6726, 0.8324, 0.5013, 0.5906),
}
# The paper's ML-100K numbers of the LLM-based baselines (Table II, each with Flan-T5-XL), by the
# paper's row names (delrec.methods: a method's `paper_rows`).
PAPER_TABLE2_ML100K = {
    "LlamaRec": (0.2870, 0.5873, 0.7183, 0.4253, 0.5387),
    "RecRanker": (0.3246, 0.6492, 0.7570, 0.4694, 0.5464),
    "LLMSEQPROMPT": (0.2702, 0.5681, 0.6921, 0.4152, 0.5332),
    "LLMSEQSIM": (0.3397, 0.6532, 0.7690, 0.4728, 0.5521),
    "LLM-TRSR": (0.3169, 0.6356, 0.7533, 0.4637, 0.5476),
    "LLaRA": (0.3523, 0.6753, 0.8089, 0.5016, 0.5632),
}
# Table II rows no method of delrec stands for yet (named in the report, so their absence is visible)
PAPER_TABLE2_NOT_RUN = {"LLM2BERT4Rec": (0.3365, 0.6507, 0.7615, 0.4743, 0.5518), "KDALRD": (0.3618, 0.6734, 0.8185, 0.5089, 0.5824)}
SIGNIFICANT = 0.05
COLD_START = 3  # the paper's Section V-F: users with fewer than 3 earlier interactions


def _label(name: str, teachers) -> str:
    teacher, _, variant = name.partition("-")
    if teacher in teachers and variant in methods.METHODS:
        return methods.get(variant).report_label(teacher)
    return {"zero-shot": "zero-shot LLM"}.get(name, name)


def _method(name: str, teachers) -> methods.Method | None:
    """The registered method of a model `<teacher>-<method>` of this run (None for the others)."""
    teacher, _, variant = name.partition("-")
    return methods.METHODS.get(variant) if teacher in teachers else None


def _row(label: str, metrics: dict, paper=None, extra: str = "") -> str:
    ours = " | ".join(f"{metrics[k]:.4f}" for k in METRICS)
    theirs = f" | {paper[0]:.4f} | {paper[3]:.4f}" if paper else " | | "
    return f"| {label}{extra} | {ours}{theirs} |"


HEADER = ["| model | " + " | ".join(METRICS) + " | paper HR@1 | paper NDCG@5 |", "|---|" + "---|" * (len(METRICS) + 2)]


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _stage_file(folder: Path, name: str) -> dict:
    return read_json(folder / name) if (folder / name).exists() else {}


def _examples_per_step(folder: Path, log: list[dict]) -> float:
    """Train examples (per task in stage 1) per optimizer step, for log lines without `examples_seen`."""
    cfg = _stage_file(folder, "config.json")
    if cfg:
        return cfg.get("batch_size", 1) * cfg.get("grad_accum", 1)
    return next((e["examples_seen"] / e["step"] for e in log if e.get("examples_seen") and e["step"]), 1)


def _stage_valid_rows(folder: Path, data) -> np.ndarray | None:
    """The valid rows a stage run evaluated: recorded in its metrics.json (stage 1: per task; all
    of them), or, for a stage-2 run made before they were recorded, drawn again as stage 2 draws them."""
    rows = _stage_file(folder, "metrics.json").get("valid_rows")
    if isinstance(rows, dict):
        rows = sorted(set().union(*rows.values())) if rows else None
    cfg = _stage_file(folder, "config.json")
    if rows is None and folder.parent.name == "finetune" and "valid_samples" in cfg:
        from delrec.stages.distill import lsr_valid_rows

        rows = lsr_valid_rows(data, cfg.get("seed", 0), cfg["valid_samples"])
    return None if rows is None else np.asarray(rows, dtype=np.int64)


def _valid_metrics(scorer, data, rows: np.ndarray) -> dict:
    """The evaluator's candidate metrics (pessimistic ranks) on `rows`, in this process only (the
    report runs on the main process of a launch, so nothing is sharded)."""
    from delrec.evaluate import candidate_ranks, metrics_from_ranks

    return metrics_from_ranks(candidate_ranks(scorer, data, rows, local=True))


def _references(config, data, folders: list[Path]) -> tuple[dict, int]:
    """Horizontal reference lines for a stage's learning curves, on the recommendation task (the
    fixed candidates) over the valid rows the stage's runs evaluated (their union): the expected
    random ranker (uniform rank), popularity and each teacher the runs learned from."""
    from delrec.evaluate import PopularityScorer, metrics_from_ranks

    refs = {f"random ({data.candidates.shape[1]} candidates)": metrics_from_ranks(np.arange(data.candidates.shape[1]))}
    found = [r for r in (_stage_valid_rows(f, data) for f in folders) if r is not None and len(r)]
    if config is None or not found:
        return refs, 0
    rows = np.unique(np.concatenate(found))
    used = {(_stage_file(f, "config.json") or _stage_file(f, "metrics.json")).get("teacher") for f in folders}
    teachers = [t for t in config.teachers if t in used] or list(config.teachers)
    makers = [("popularity", lambda: PopularityScorer(data))] + [(t, lambda t=t: _scorer(config, data, t)) for t in teachers]
    for name, make in makers:
        try:
            refs[name] = _valid_metrics(make(), data, rows)
        except (FileNotFoundError, OSError, KeyError):  # a teacher not trained (yet)
            continue
    return refs, len(rows)


def _curves(run: Path) -> dict:
    """RUN/curves.json: every valid evaluation of stages 1 and 2 (their metrics.json), in folder and
    step order, and the standard error of stage 2's valid metrics at its valid size."""
    out = {"stage1": {}, "stage2": {}, "valid_noise": {"stage2": {}}}
    for path in sorted((run / "distill").glob("*/metrics.json")):
        m = read_json(path)
        hist = m.get("valid_history") or []
        per_step = _examples_per_step(path.parent, hist)
        n = {**m.get("valid_samples", {}), **({"lsr": m["valid_lsr_samples"]} if m.get("valid_lsr_samples") else {})}
        out["stage1"][path.parent.name] = [{"examples_seen": e.get("examples_seen", round(e["step"] * per_step)),
                                            "seconds": e.get("seconds"), "valid_samples": n, **e["eval"]} for e in hist]
    for path in sorted((run / "finetune").glob("*/metrics.json")):
        m = read_json(path)
        hist, n = m.get("valid_history") or [], m.get("valid_samples", 0)
        per_step = _examples_per_step(path.parent, hist)
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


def _figures(run: Path, teachers, evals: dict, paper: dict, config=None, data=None) -> list[str]:
    """PNG figures beside the report; returns the Markdown that shows them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = []

    def smooth(y, k=5):
        y = np.asarray(y, dtype=float)
        return np.convolve(y, np.ones(k) / k, mode="valid") if len(y) > k else y

    def save(fig, name, caption):
        with atomic_path(run / name) as tmp:
            fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        plt.close(fig)
        shown.append(f"![{caption}]({name})\n\n*{caption}*\n")

    # teachers: loss and valid NDCG@10 per epoch
    logs = {t: _read_log(run / "teachers" / t / "train_log.jsonl") for t in teachers}
    if any(logs.values()):
        fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.2))
        for t, log in logs.items():
            rows = [e for e in log if "epoch" in e]
            a.plot([e["epoch"] for e in rows], [e["loss"] for e in rows], marker=".", label=t)
            b.plot([e["epoch"] for e in rows], [e["valid_NDCG@10"] for e in rows], marker=".", label=t)
        a.set(xlabel="epoch", ylabel="train loss", title="teachers"), b.set(xlabel="epoch", ylabel="valid NDCG@10")
        a.legend()
        save(fig, "fig-teachers.png", "Teacher training: loss and valid NDCG@10 per epoch.")

    def curves(title: str, folders: list[Path], lines, losses, extra_refs: dict) -> tuple:
        """Valid HR@1 and NDCG@5 against train examples seen (one line per `lines(folder, evals)`
        entry), reference lines, and the training losses against the same axis."""
        fig, axes = plt.subplots(1, 3, figsize=(14, 3.4))
        colors: dict = {}  # a line's colour, the same in every panel
        color = lambda label: colors.setdefault(label, f"C{len(colors) % 10}")
        for folder in folders:
            log = _read_log(folder / "train_log.jsonl")
            per_step = _examples_per_step(folder, log)
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
                    y = smooth([p[1] for p in pts])
                    name = f"{folder.name} {label}".strip()
                    axes[2].plot([p[0] for p in pts][len(pts) - len(y):], y, label=name, color=color(name))
        refs, n = _references(config, data, folders) if data is not None else ({}, 0)
        dashes = iter(["--", (0, (5, 1)), (0, (3, 1, 1, 1)), (0, (1, 1))] * 4)
        for name, m in {**refs, **extra_refs}.items():
            color, style = ("0.4", "-.") if name.startswith("random (RPS") else ("0.4", ":") if name.startswith("random") \
                else ("tab:brown", "--") if name == "popularity" else ("black", next(dashes))
            label = name if name.startswith("random") else f"{name} (valid)"
            for ax, key in zip(axes, ("HR@1", "NDCG@5")):
                ax.axhline(m[key], color=color, linestyle=style, linewidth=1, label=label)
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

    # stage 1: per task HR@1 / NDCG@5 over its candidates (and the LSR prompt's), losses per task
    runs1 = sorted(p.parent for p in (run / "distill").glob("*/train_log.jsonl"))
    if runs1:
        def lines1(folder, evals):
            keys = set().union(*(e["eval"] for e in evals)) if evals else set()
            out = [(f"{folder.name} {t.upper()}", f"{t}_valid_HR@1" if f"{t}_valid_HR@1" in keys else f"{t}_valid_accuracy",
                    f"{t}_valid_NDCG@5") for t in ("ta", "rps") if f"{t}_valid_accuracy" in keys]
            return out + ([(f"{folder.name} LSR (w/o LSR)", "valid_lsr_HR@1", "valid_lsr_NDCG@5")] if "valid_lsr_HR@1" in keys else [])

        from delrec.evaluate import metrics_from_ranks

        hs = sorted({_stage_file(f, "config.json").get("top_h", 10) for f in runs1})
        extra = {f"random (RPS, {h} candidates)": metrics_from_ranks(np.arange(h)) for h in hs}
        fig, n = curves("stage 1 (soft prompt)", runs1, lines1,
                        lambda log: [(t.upper(), f"loss_{t}") for t in ("ta", "rps") if any(f"loss_{t}" in e for e in log)], extra)
        where = f"over the {n} valid samples the stage evaluated" if n else "(valid rows not recorded: random only)"
        save(fig, "fig-stage1.png",
             "Stage 1 learning curves: valid HR@1 and NDCG@5 of each task over its own candidates (TA: 15; RPS: the "
             "teacher's shuffled top-h, label its top-1; LSR: the recommendation prompt with the current soft prompt and "
             "the frozen LLM, i.e. `w/o LSR`) against the train examples of each task seen. Horizontal lines: the "
             "expected random ranker (15 candidates, and h for RPS), and popularity and the teacher on the "
             f"recommendation task {where}. Right: training losses (moving average of 5).")

    # stage 2: valid HR@1 / NDCG@5 per variant (early stopping on NDCG@5), recommendation loss
    runs2 = sorted(p.parent for p in (run / "finetune").glob("*/train_log.jsonl"))
    if runs2:
        def losses2(log):
            key = "loss_rec" if any("loss_rec" in e for e in log) else "loss"  # older logs: total only
            return [("", key)]

        fig, n = curves("stage 2 (adapters)", runs2, lambda folder, evals: [(folder.name, "valid_HR@1", "valid_NDCG@5")],
                        losses2, {})
        where = f"over the same {n} valid samples" if n else "(valid rows not recorded: random only)"
        save(fig, "fig-stage2.png",
             "Stage 2 learning curves: valid HR@1 and NDCG@5 (early stopping on NDCG@5; step 0 is the untrained adapter) "
             "of each variant against the train examples seen. Horizontal lines: the expected random ranker, and "
             f"popularity and the teacher {where}. Right: the recommendation loss (moving average of 5).")

    # results: HR@1 and NDCG@5 per model, the paper's as markers
    if evals:
        names = list(evals)
        x = np.arange(len(names))
        fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(names)), 3.4))
        for off, (m, col) in zip((-0.2, 0.2), (("HR@1", 0), ("NDCG@5", 3))):
            ax.bar(x + off, [evals[n]["candidates"][m] for n in names], width=0.4, label=f"{m} (ours)")
            px = [(i + off, paper[n][col]) for i, n in enumerate(names) if n in paper]
            if px:
                ax.scatter(*zip(*px), marker="_", s=300, color="black", zorder=3, label=f"{m} (paper)" if off < 0 else None)
        ax.set_xticks(x, [_label(n, teachers) for n in names], rotation=30, ha="right", fontsize=8)
        ax.set(ylabel="metric", title="test metrics (bars) and the paper's (black marks)")
        ax.legend(fontsize=8)
        save(fig, "fig-results.png", "HR@1 and NDCG@5 of every model on the same test samples; black marks: the paper.")
    return shown


def _case_studies(config, data, evals: dict, teacher: str, rows: np.ndarray) -> list[str]:
    """Three test samples (the first in subset order of each kind: both right, only DELRec
    right, only the teacher right), with history, each model's top-1 and the truth."""
    name = f"{teacher}-delrec"
    if teacher not in evals or name not in evals:
        return []
    hit_t = np.asarray(evals[teacher]["ranks"]) == 0
    hit_d = np.asarray(evals[name]["ranks"]) == 0
    picks = []
    for kind, mask in (("both right", hit_t & hit_d), ("only DELRec right", hit_d & ~hit_t),
                       ("only the teacher right", hit_t & ~hit_d)):
        idx = np.flatnonzero(mask)
        if len(idx):
            picks.append((kind, int(idx[0])))
    if not picks:
        return []
    chosen = np.array([rows[i] for _, i in picks])
    titles = [""] + data.items["title"].tolist()
    top1 = {}
    for model in (teacher, name):
        scores = np.asarray(_scorer(config, data, model).score_candidates(data, chosen), dtype=np.float64)
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


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _rps_accuracy(folder: Path, model: str) -> str:
    """Stage 1's RPS valid accuracy behind a stage-2 model of another run (blank when it had none)."""
    teacher, _, variant = model.partition("-")
    stage1 = methods.get(variant).stage1_folder(teacher) if variant in methods.METHODS else None
    path = folder / "distill" / str(stage1) / "metrics.json"
    if stage1 is None or not path.exists():
        return ""
    m = read_json(path)
    before, after = m.get("untrained", {}).get("rps_valid_accuracy"), m.get("trained", {}).get("rps_valid_accuracy")
    return "" if before is None or after is None else f"{before:.3f} -> {after:.3f}"


def _attempts(run: Path, folders: list, rows: np.ndarray, teachers) -> list[str]:
    """Other runs' results beside this one's, with the settings that differ from this run's."""
    import yaml

    mine = _flatten(yaml.safe_load((run / "config.yaml").read_text()))
    ignore = {"run_dir", "attempts", "report", "variants", "zero_shot"}
    lines = ["| run | settings that differ from this run | model | test samples | HR@1 | NDCG@5 | "
             "stage-1 RPS valid accuracy (untrained -> trained) |", "|---|---|---|---|---|---|---|"]
    for folder in map(Path, folders):
        if not (folder / "config.yaml").exists():
            lines.append(f"| {folder} | (no `delrec run` there) | | | | |")
            continue
        theirs = _flatten(yaml.safe_load((folder / "config.yaml").read_text()))
        diff = ", ".join(f"{k}={theirs.get(k)}" for k in sorted(set(mine) | set(theirs))
                         if k.split(".")[0] not in ignore and mine.get(k) != theirs.get(k)) or "none"
        for path in sorted((folder / "eval" / "pipeline").glob("*.json")):
            res = read_json(path)
            name = path.stem
            if name.partition("-")[0] not in teachers or not name.partition("-")[2]:
                continue
            same = np.array_equal(np.asarray(res["settings"]["rows"]), rows)
            n = f"{res['num_samples']}" + ("" if same else " (other samples)")
            m = res["candidates"]
            lines.append(f"| {folder.name} | {diff} | {_label(name, teachers)} | {n} | {m['HR@1']:.4f} | {m['NDCG@5']:.4f} | "
                         f"{_rps_accuracy(folder, name)} |")
    return lines


def _baselines(evals: dict, teachers) -> list[str]:
    """The models DELRec is compared with in the paper's Table II that this run evaluated: the
    teachers, the zero-shot LLM and every method standing for a Table II row."""
    out = [t for t in teachers if t in evals] + [n for n in ("zero-shot",) if n in evals]
    out += [n for n in evals if (m := _method(n, teachers)) is not None and m.paper_rows]
    return out


def _training_cost(run: Path, name: str, teachers, evals: dict) -> tuple[str, str, str]:
    """(what it trained, its training seconds, its evaluation seconds) from the step folders."""
    evaluation = f"{evals[name]['seconds']:.0f}" if name in evals and "seconds" in evals[name] else ""
    if name in teachers:
        m = _stage_file(run / "teachers" / name, "metrics.json")
        return (f"{m.get('epochs_run', '?')} epochs over the train split", f"{m['train_seconds']:.0f}" if "train_seconds" in m else "",
                evaluation)
    method = _method(name, teachers)
    if method is None:
        return ("nothing", "0", evaluation)
    teacher, parts, seconds = name.partition("-")[0], [], 0.0
    stage1 = method.stage1_folder(teacher)
    if stage1 and (run / "distill" / stage1 / "metrics.json").exists():
        m = read_json(run / "distill" / stage1 / "metrics.json")
        shared = " (shared with the other methods that use it)" if method.stage1 == "shared" else ""
        parts.append(f"stage 1: {m.get('examples_seen_per_task', '?')} examples per task{shared}")
        seconds += m.get("seconds", 0.0)
    if method.stage2 and (run / "finetune" / name / "metrics.json").exists():
        m = read_json(run / "finetune" / name / "metrics.json")
        parts.append(f"stage 2: {m.get('train_examples_seen', '?')} examples")
        seconds += m.get("seconds", 0.0)
    return ("; ".join(parts) or "nothing (no training)", f"{seconds:.0f}", evaluation)


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


def _claim_section(run: Path, evals: dict, teachers, paper: dict) -> list[str]:
    """DELRec against each Table II baseline on the same samples (paired tests), whether the paper's
    claim holds here, and what each model cost to train."""
    from delrec.significance import compare

    L = []
    for t in teachers:
        name = f"{t}-delrec"
        others = [b for b in _baselines(evals, teachers) if b != name]
        if name not in evals or not others:
            continue
        L += [f"## The paper's claim: DELRec({t}) above every baseline of Table II?", "",
              "Paired tests on the same test samples (HR@1: exact McNemar; NDCG@5: sign-flip permutation); "
              f"significant: p < {SIGNIFICANT}.", "",
              "| baseline | HR@1 DELRec − baseline | p | NDCG@5 DELRec − baseline | p | verdict |", "|---|---|---|---|---|---|"]
        groups = {"above": [], "partly": [], "below": [], "unclear": []}
        for b in others:
            v = compare(evals[name]["ranks"], evals[b]["ranks"])
            h, n = v["HR@1"], v["NDCG@5"]
            verdict, group, on = claim_verdict(v)
            groups[group].append(_table2_name(b, teachers) + (f" (on {on[0]} only)" if group == "below" and len(on) == 1 else ""))
            L.append(f"| {_table2_name(b, teachers)} | {h['diff']:+.4f} | {h['p_value']:.3g} | {n['diff']:+.4f} | {n['p_value']:.3g} | {verdict} |")
        L.append("")
        above, partly, below, unclear = groups["above"], groups["partly"], groups["below"], groups["unclear"]
        if not below and not unclear and not partly:
            L.append(f"**The claim holds here**: DELRec({t}) is significantly above every baseline this run evaluated, on HR@1 and NDCG@5.")
        else:
            parts = [f"below {', '.join(below)}" if below else "", f"not significantly different from {', '.join(unclear)}" if unclear else "",
                     f"above on one metric only against {', '.join(partly)}" if partly else "",
                     f"above {', '.join(above)} on both metrics" if above else ""]
            L.append(f"**The claim does not hold here**: DELRec({t}) is " + "; ".join(p for p in parts if p) + ".")
        missing = [r for r in ("LLaRA", "RecRanker", "LLM-TRSR", "LlamaRec", "LLMSEQPROMPT", "LLMSEQSIM")
                   if not any(r in (_method(b, teachers).paper_rows if _method(b, teachers) else ()) for b in others)]
        missing += list(PAPER_TABLE2_NOT_RUN)
        L += ["", f"Not in this comparison (not run here, or no method of delrec stands for them yet): {', '.join(missing)}.", ""]
    if any(f"{t}-delrec" in evals for t in teachers):
        L += ["### What each model cost", "", "Training as recorded by its steps (seconds of training steps, evaluation excluded), "
              "and the time to score the test samples.", "",
              "| model | trained on | training seconds | evaluation seconds |", "|---|---|---|---|"]
        for name in evals:
            if name in ("random", "popularity"):
                continue
            what, train, evaluation = _training_cost(run, name, teachers, evals)
            L.append(f"| {_table2_name(name, teachers)} | {what} | {train} | {evaluation} |")
        L.append("")
    return L


def _table2_name(name: str, teachers) -> str:
    method = _method(name, teachers)
    return method.table2_label(name.partition("-")[0]) if method is not None else _label(name, teachers)


def _paired_table(other: str, comparisons: list[tuple[str, dict]]) -> list[str]:
    """Rows of `significance.compare` results (DELRec first, `other` second) as a Markdown table."""
    out = [f"| metric | DELRec | {other} | difference (95% CI) | relative | p-value (test) |", "|---|---|---|---|---|---|"]
    for m, v in comparisons:
        rel = f"{v['relative']:+.1%}" if v["relative"] is not None else ""
        out.append(f"| {m} | {v['a']:.4f} | {v['b']:.4f} | {v['diff']:+.4f} ({v['ci95'][0]:+.4f}, {v['ci95'][1]:+.4f}) "
                   f"| {rel} | {v['p_value']:.3g} ({v['test']}) |")
    return out


def _scorer(config, data, name: str):
    """A model of the run through the one scorer factory, with the run's settings."""
    from delrec.scorers import make_scorer

    return make_scorer(config.run_dir, data, name, llm=config.llm, dtype=config.dtype, device=config.device,
                       batch_size=config.eval_batch_size, progress=False, template_overrides=config.templates)


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


def format_paper_statistics(stats: dict) -> list[str]:
    """Markdown lines setting the paper's statistics of this data set (stats.json `paper`, from
    delrec.data.paper) beside the files as read and after the 5-core; none for another data set."""
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
    ratio = paper["filtered_over_paper"]
    L += [f"| after titles and the 5-core | {f['users']:,} | {f['items']:,} | {f['interactions']:,} | {f['sparsity']:.2%} |",
          f"| filtered / paper | {ratio['users']:.3g} | {ratio['items']:.3g} | {ratio['interactions']:.3g} | |", "",
          f"Why they differ: {paper['why_different']} (docs/datasets.md).", ""]
    return L


@holds_run_lock
def write_report(run: str | Path, config=None) -> Path:
    """RUN/report.md and its figures, from the files in the run folder alone (its config.yaml,
    pipeline.json, data, stage folders and evaluations): `delrec report RUN` writes it again.
    `config`: the run's PipelineConfig when the caller has it (default: read from the folder)."""
    import torch

    from delrec.config import PipelineConfig
    from delrec.data.protocol import RunData
    from delrec.significance import compare, per_sample

    run = Path(run)
    c = config or PipelineConfig.from_run(run)
    summary = run / "pipeline.json"
    steps = [e for e in read_json(summary)["steps"] if e["step"] != "report"] if summary.exists() else []
    teachers = list(c.teachers)
    evals = {}
    for name, _ in c.models():
        path = run / "eval" / "pipeline" / f"{name}.json"
        if path.exists():
            evals[name] = read_json(path)
    data = RunData.load(run / "data")
    stats, protocol = read_json(run / "data" / "stats.json"), read_json(run / "data" / "protocol.json")
    paper = PAPER_ML100K if c.dataset == "ml-100k" else {}
    rows = np.asarray(next(iter(evals.values()))["settings"]["rows"]) if evals else np.zeros(0, dtype=int)
    L = [f"# DELRec on {c.dataset}: {', '.join(teachers)} teacher{'s' if len(teachers) > 1 else ''}, {c.llm} backbone", ""]
    L += [f"Everything below was measured by `delrec run` in `{run}` and is rewritten from the files there. "
          f"Test samples: **{len(rows)}**" + (f", a seeded subset (seed {c.eval_seed}) of the {stats['samples']['test']} "
          "test samples" if len(rows) < stats["samples"]["test"] else " (the whole test split)") +
          f"; every model scores the same samples and the same {protocol['protocol']['num_candidates']} candidates "
          "fixed on disk; ties count against the model.", ""]

    # -- the goal: DELRec against its teacher --
    L += ["## The goal: does DELRec beat its teacher?", ""]
    for t in teachers:
        name = f"{t}-delrec"
        if t in evals and name in evals:
            cmp = compare(evals[name]["ranks"], evals[t]["ranks"])
            verdict = "beats" if all(v["diff"] > 0 for v in cmp.values()) else "does **not** beat"
            L.append(f"DELRec({t}) {verdict} its {t} teacher on HR@1 and NDCG@5:")
            L.append("")
            L += _paired_table("teacher", list(cmp.items()))
            if t in ("sasrec",) and paper:
                L.append("")
                L.append(f"The paper reports +{paper['sasrec-delrec'][0] / paper['sasrec'][0] - 1:.1%} HR@1 for DELRec(SASRec) "
                         "over SASRec with Flan-T5-XL.")
            L.append("")
            # the references below the teacher: has the LLM learned anything a trivial ranker lacks?
            others = [r for r in ("zero-shot", "popularity", "random") if r in evals]
            if others:
                L += [f"DELRec({t}) against the other references on the same samples (paired tests):", ""]
                L += _paired_table("reference", [(f"{m} vs {_label(r, teachers)}", v) for r in others
                                                 for m, v in compare(evals[name]["ranks"], evals[r]["ranks"]).items()])
                L.append("")

    # -- Table II block --
    L += ["## Results (Table II style)", "", *HEADER]
    for name, res in evals.items():
        method, teacher = _method(name, teachers), name.partition("-")[0]
        if method is None:  # references, teachers, the zero-shot LLM
            L.append(_row(_label(name, teachers), res["candidates"], paper.get(name)))
        elif method.name == "delrec" or method.paper_rows:  # DELRec and the LLM-based baselines of Table II
            rows_of_paper = [PAPER_TABLE2_ML100K[r] for r in method.paper_rows if r in PAPER_TABLE2_ML100K] if paper else []
            L.append(_row(method.table2_label(teacher), res["candidates"],
                          paper.get(name) if method.name == "delrec" else rows_of_paper[0] if len(rows_of_paper) == 1 else None))
            if len(rows_of_paper) > 1:  # one of ours stands for several of the paper's rows: each of theirs below it
                L += [f"| {r} (paper) |" + " |" * len(METRICS) + f" {v[0]:.4f} | {v[3]:.4f} |"
                      for r, v in zip(method.paper_rows, rows_of_paper)]
    if paper:
        L += ["", "Paper: DELRec and the LLM-based baselines with Flan-T5-XL, and the zero-shot row of Flan-T5-XL "
              "(Table II); the paper's own data pipeline and candidate sampling, shown for orientation, not as a "
              "like-for-like comparison. Our baselines run on this run's backbone, candidates and stage 2 "
              "(docs/baselines.md)."]
    L.append("")

    L += _claim_section(run, evals, teachers, paper)

    # -- ablations --
    abl = [n for n in evals if n.partition("-")[0] in teachers and n.partition("-")[2]
           and (_method(n, teachers) is None or _method(n, teachers).ablation)]
    if abl:
        L += ["## Ablations (Tables III-IV)", "", *HEADER]
        for name in abl:
            L.append(_row(_label(name, teachers), evals[name]["candidates"], paper.get(name)))
        for t in teachers:
            base = evals.get(f"{t}-delrec")
            for name in abl:
                if base is not None and name.startswith(f"{t}-") and name != f"{t}-delrec":
                    v = compare(base["ranks"], evals[name]["ranks"])
                    L.append(f"- DELRec({t}) vs {_label(name, teachers)}: HR@1 {v['HR@1']['diff']:+.4f} (p {v['HR@1']['p_value']:.3g}), "
                             f"NDCG@5 {v['NDCG@5']['diff']:+.4f} (p {v['NDCG@5']['p_value']:.3g})")
        L.append("")

    if c.attempts:
        L += ["## Other attempts", "", "Earlier runs with other settings (`attempts` in the config), read from their folders:", "",
              *_attempts(run, c.attempts, rows, teachers), ""]

    # -- stage 1 --
    L += ["## Stage 1: does the LLM pick what the teacher picks?", "",
          "Valid accuracy (HR@1): how often the LLM's top candidate is the label (TA: the masked most recent item among "
          "15 candidates; RPS: the teacher's top-1 among its shuffled top-h list), and NDCG@5 over the same candidates, "
          "with the untrained (random) and the trained soft prompt; ties count against the LLM.", ""]
    for folder in sorted((run / "distill").glob("*/metrics.json")):
        m = read_json(folder)
        hist = m.get("valid_history") or []
        first, last = (hist[0]["eval"], hist[-1]["eval"]) if hist else ({}, {})
        for key, before in m["untrained"].items():
            task = key.split("_")[0]
            ndcg = f"{task}_valid_NDCG@5"
            extra = f"; NDCG@5 {first[ndcg]:.3f} -> {last[ndcg]:.3f}" if ndcg in first and ndcg in last else ""
            L.append(f"- {folder.parent.name}, {task.upper()} ({m['valid_samples'][task]} valid samples): untrained "
                     f"{before:.3f}, trained {m['trained'][key]:.3f}{extra}")
        if "valid_lsr_HR@1" in first and "valid_lsr_HR@1" in last:
            L.append(f"- {folder.parent.name}, the recommendation prompt with the soft prompt (`w/o LSR`, "
                     f"{m.get('valid_lsr_samples')} valid samples): HR@1 {first['valid_lsr_HR@1']:.3f} -> "
                     f"{last['valid_lsr_HR@1']:.3f}, NDCG@5 {first['valid_lsr_NDCG@5']:.3f} -> {last['valid_lsr_NDCG@5']:.3f}")
    L.append("")

    # -- figures --
    L += ["## Training curves and results", "", *_figures(run, teachers, evals, paper, c, data)]
    curves = _curves(run)
    write_json(run / "curves.json", curves)
    L += [*_noise_lines(curves["valid_noise"]["stage2"]), "",
          "Every valid point of both stages (and these standard errors) is in `curves.json`, written beside this report.", ""]

    # -- cold start --
    if evals:
        cold = data.history_len[rows] < COLD_START
        L += [f"## Cold start: users with fewer than {COLD_START} earlier interactions", ""]
        if cold.sum() == 0:
            L += [f"None of the {len(rows)} test samples is cold-start (the chronological split puts few new users "
                  "in the test period).", ""]
        else:
            L += [f"{int(cold.sum())} of the {len(rows)} test samples.", "", "| model | HR@1 | NDCG@5 |", "|---|---|---|"]
            for name, res in evals.items():
                r = np.asarray(res["ranks"])[cold]
                L.append(f"| {_label(name, teachers)} | {per_sample(r, 'HR@1').mean():.4f} | {per_sample(r, 'NDCG@5').mean():.4f} |")
            L.append("")

    # -- case studies --
    cases = _case_studies(c, data, evals, teachers[0], rows) if evals else []
    if cases:
        L += ["## Case studies (Figure 9 style)", "", "The first test sample (in subset order) of each kind; not chosen by hand.", "", *cases]

    # -- budgets, steps, data, environment --
    n_train = int(len(data.indices("train")))
    L += ["## Budgets", "",
          f"Train examples seen (stage 1: of each task) and the fraction of one epoch of the {n_train}-sample train split "
          "that is; seconds of training exclude the evaluations where the run recorded both.", ""]
    for path in sorted((run / "distill").glob("*/metrics.json")) + sorted((run / "finetune").glob("*/metrics.json")):
        m = read_json(path)
        per_task = "examples_seen_per_task" in m
        seen = m["examples_seen_per_task"] if per_task else m["train_examples_seen"]
        distinct = m.get("distinct_train_examples_per_task" if per_task else "distinct_train_examples")
        if isinstance(distinct, dict):
            distinct = ", ".join(f"{t.upper()} {v}" for t, v in distinct.items())
        extra = "" if per_task else f"; best valid NDCG@5 {m['best_valid_NDCG@5']:.4f} at step {m['best_step']} of {m['valid_samples']} valid samples"
        timing = f"{m['seconds']:.0f} s of training ({m['wall_seconds']:.0f} s with the evaluations)" if "wall_seconds" in m \
            else f"{m['seconds']:.0f} s"
        L.append(f"- {path.parent.parent.name}/{path.parent.name}: {m['steps']} steps, {seen} train examples"
                 f"{' per task' if per_task else ''} = {seen / max(n_train, 1):.3g} epoch"
                 f"{f' ({distinct} distinct)' if distinct is not None else ''}, {timing}{extra}")
    L += ["", "Settings (the resolved config, `config.yaml` in the run folder):", "", "```yaml",
          (run / "config.yaml").read_text().strip() if (run / "config.yaml").exists() else "", "```", ""]
    L += ["## Steps: wall time and peak memory", "", format_steps(steps), "",
          "A step skipped by this invocation shows the time and peak resident memory of its last real run "
          "(`pipeline.json`); the report step itself is not in the total.", ""]
    L += ["## Data and protocol", "", f"- dataset: {c.dataset}; protocol: `{json.dumps(protocol['protocol'])}`",
          f"- after filtering: {stats['filtered']['users']} users, {stats['filtered']['items']} items, "
          f"{stats['filtered']['interactions']} interactions (sparsity {stats['filtered']['sparsity']:.2%})",
          f"- samples: train {stats['samples']['train']}, valid {stats['samples']['valid']}, test {stats['samples']['test']}",
          "- see docs/protocol.md for the split, the candidates and the metrics", "",
          *format_paper_statistics(stats)]
    versions = {}
    for mod in ("torch", "transformers", "peft", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            pass
    from delrec import __version__

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), platform.processor()) \
        if Path("/proc/cpuinfo").exists() else platform.processor()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    L += ["## Environment", "", f"- delrec {__version__}; " + ", ".join(f"{k} {v}" for k, v in versions.items()),
          f"- {platform.platform()}, Python {platform.python_version()}", f"- CPU: {cpu}, {torch.get_num_threads()} torch threads; GPU: {gpu}", ""]
    path = run / "report.md"
    with atomic_path(path) as tmp:
        tmp.write_text("\n".join(L))
    return path
