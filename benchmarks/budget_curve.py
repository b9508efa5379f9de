"""The budget-quality curve: what more stage-2 training buys, measured on the test samples.

    python benchmarks/budget_curve.py --run runs/ml100k-cpu --models sasrec-delrec
    python benchmarks/budget_curve.py --run runs/ml100k-cpu --models sasrec-delrec sasrec-wo-sp --plot-only

Reads the stage-2 folders of a finished `delrec run` whose finetune section had
`snapshot_every` (configs/ml100k-cpu.yaml has it): one run trained once, its adapter kept every so
many steps (RUN/finetune/<model>/snapshots/examples-NNNNNN/), rather than one run per budget.
Each snapshot is scored on the run's own test samples (the seeded subset `delrec run` evaluated,
`--test-samples` and the run's eval_seed, the same candidates on disk), beside popularity and the
teacher as reference lines, with the paired tests of each budget against popularity
(delrec.evaluation.significance: McNemar on HR@1, a permutation test on NDCG@5).

Writes benchmarks/results/budget-curve.json (the environment, the references, one row per model
and budget: model, examples, test_samples, HR@1, NDCG@5, seconds of training to that budget, and
the paired test against popularity), rewritten after every row so an interrupted run resumes
where it stopped (a row already there is not scored again), and docs/figures/budget-curve.png.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "budget-curve.json"
FIGURE = ROOT / "docs" / "figures" / "budget-curve.png"


def snapshots(folder: Path) -> list[tuple[int, Path]]:
    """(examples seen, snapshot folder) of every kept adapter of a stage-2 folder, in order."""
    from delrec.core.layout import SNAPSHOTS

    found = sorted((int(p.name.split("-")[1]), p) for p in (folder / SNAPSHOTS).glob("examples-*") if (p / "config.json").exists())
    if not found:
        raise FileNotFoundError(f"{folder} keeps no snapshots: train it with `finetune.snapshot_every=N`")
    return found


def training_seconds(folder: Path, examples: int) -> float | None:
    """Training seconds (evaluations excluded) when the run had seen `examples` examples: the
    `seconds` of that step's line in train_log.jsonl (each step line carries the training time so
    far), so budgets between two evaluations have their time too."""
    import json

    from delrec.core.io import read_json

    if not (folder / "metrics.json").exists() or not (folder / "train_log.jsonl").exists():
        return None
    m = read_json(folder / "metrics.json")
    per_step = m["train_examples_seen"] // max(m["steps"], 1)
    step = examples // per_step if per_step else None
    with open(folder / "train_log.jsonl", encoding="utf-8") as log:
        for line in log:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if record.get("step") == step and "seconds" in record:
                return record["seconds"]
    return None


def final_ranks(run: Path, model: str, examples: int, rows):
    """The test ranks `delrec run` already computed for `model`, when its saved adapter is the
    snapshot at `examples` (the last step's was the best) and it scored these rows; else None."""
    import numpy as np

    from delrec.core.io import read_json

    metrics, evaluation = run / "finetune" / model / "metrics.json", run / "eval" / "pipeline" / f"{model}.json"
    if not (metrics.exists() and evaluation.exists()):
        return None
    m, e = read_json(metrics), read_json(evaluation)
    if m["best_step"] != m["steps"] or m["train_examples_seen"] != examples or e["settings"]["rows"] != np.asarray(rows).tolist():
        return None
    return np.asarray(e["ranks"])


def measure(a) -> dict:
    import torch

    from _env import environment
    from delrec.config import PipelineConfig
    from delrec.core.io import read_json, write_json
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import candidate_ranks, metrics_from_ranks, subset_rows
    from delrec.evaluation.significance import compare
    from delrec.serving.scorers import finetuned_scorer, make_scorer

    torch.set_num_threads(a.threads)
    run = Path(a.run)
    config = PipelineConfig.from_run(run)
    data = RunData.load(run / "data")
    n = a.test_samples or config.test_samples
    rows = subset_rows(data, "test", n, config.eval_seed)
    result = read_json(a.out) if a.out.exists() else {}
    if result.get("run") != str(run) or result.get("test_samples") != len(rows):
        result = {"run": str(run), "test_samples": len(rows), "rows": []}  # another run's or another size's: start again
    result["environment"] = environment()

    # reference lines: cheap to score again, and then certainly on these rows
    ref_ranks = {}
    for name in ("popularity", *config.teachers):
        ref_ranks[name] = candidate_ranks(make_scorer(run, data, name, progress=False), data, rows)
    result["references"] = {name: {"test_samples": len(rows), **metrics_from_ranks(r)} for name, r in ref_ranks.items()}

    for r in result["rows"]:  # rows written before their training time could be read from the log
        if r.get("seconds") is None:
            r["seconds"] = training_seconds(run / "finetune" / r["model"], r["examples"])
    done = {(r["model"], r["examples"]) for r in result["rows"]}
    for model in a.models:
        folder = run / "finetune" / model
        for examples, snap in snapshots(folder):
            if (model, examples) in done:
                continue
            if a.examples and examples not in a.examples:
                continue
            t0 = time.perf_counter()
            ranks = final_ranks(run, model, examples, rows)
            if ranks is None:
                scorer = finetuned_scorer(snap, data, batch_size=a.batch_size, progress=True, run_dir=run)
                ranks = candidate_ranks(scorer, data, rows)
                del scorer
            m = metrics_from_ranks(ranks)
            test = compare(ranks, ref_ranks["popularity"])
            result["rows"].append({"model": model, "examples": examples, "test_samples": len(rows),
                                   "HR@1": m["HR@1"], "NDCG@5": m["NDCG@5"], "seconds": training_seconds(folder, examples),
                                   "scoring_seconds": round(time.perf_counter() - t0, 1),
                                   "vs_popularity": {k: {"diff": v["diff"], "p_value": v["p_value"]} for k, v in test.items()}})
            result["rows"].sort(key=lambda r: (r["model"], r["examples"]))
            write_json(a.out, result)
            print(f"{model} at {examples} examples: HR@1 {m['HR@1']:.4f}, NDCG@5 {m['NDCG@5']:.4f} "
                  f"(vs popularity p {test['HR@1']['p_value']:.3g} / {test['NDCG@5']['p_value']:.3g})", flush=True)
    write_json(a.out, result)
    return result


def table(result: dict) -> str:
    lines = ["| model | examples | test samples | HR@1 | NDCG@5 | vs popularity (HR@1 / NDCG@5) | training s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        p = r["vs_popularity"]
        lines.append(f"| {r['model']} | {r['examples']} | {r['test_samples']} | {r['HR@1']:.4f} | {r['NDCG@5']:.4f} | "
                     f"{p['HR@1']['diff']:+.3f} (p {p['HR@1']['p_value']:.2g}) / {p['NDCG@5']['diff']:+.3f} "
                     f"(p {p['NDCG@5']['p_value']:.2g}) | {r['seconds'] if r['seconds'] is not None else '-'} |")
    for name, m in result.get("references", {}).items():
        lines.append(f"| {name} (reference) | - | {m['test_samples']} | {m['HR@1']:.4f} | {m['NDCG@5']:.4f} | | |")
    return "\n".join(lines)


def plot(result: dict, path: Path, against: str = "examples") -> None:
    """Test HR@1 and NDCG@5 of each budget against its examples or its training seconds (`against`),
    popularity and the teacher as reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from delrec.core.io import atomic_path

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    x, label = ("seconds", "stage-2 training seconds") if against == "seconds" else ("examples", "stage-2 train examples")
    for ax, metric in zip(axes, ("HR@1", "NDCG@5")):
        for model in sorted({r["model"] for r in result["rows"]}):
            pts = [(r[x], r[metric]) for r in result["rows"] if r["model"] == model and r.get(x)]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=model)
        for (name, m), style in zip(result.get("references", {}).items(), (":", "--", "-.")):
            ax.axhline(m[metric], color="grey", linestyle=style, label=name)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(label)
        ax.set_ylabel(f"test {metric} ({result['test_samples']} samples)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/ml100k-cpu")
    p.add_argument("--models", nargs="+", default=["sasrec-delrec"], help="stage-2 folders of the run (RUN/finetune/<model>)")
    p.add_argument("--test-samples", type=int, default=None, help="default: the run's test_samples")
    p.add_argument("--examples", type=int, nargs="*", help="only the snapshots at these budgets (default: all)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=OUT)
    p.add_argument("--figure", type=Path, default=FIGURE)
    p.add_argument("--plot-only", action="store_true", help="draw the figure and print the table from --out")
    p.add_argument("--against", choices=["examples", "seconds"], default="examples",
                   help="the figure's x axis: train examples or training seconds (evaluations excluded)")
    a = p.parse_args()
    from delrec.core.io import read_json

    result = read_json(a.out) if a.plot_only else measure(a)
    print(table(result))
    plot(result, a.figure, a.against)


if __name__ == "__main__":
    main()
