"""How far a `delrec run` got, what its steps cost, and how long the rest should take, from the run
folder alone: what benchmarks/run_gpu.sh writes after each time-limited GPU session, so the next
estimate is a measurement.

    python3 benchmarks/gpu_progress.py runs/ml100k-gpu                   # prints a table, writes nothing
    python3 benchmarks/gpu_progress.py runs/ml100k-gpu --out progress.json

Per training stage (RUN/distill/<name>/, RUN/finetune/<name>/; planned from RUN/config.yaml, or
`--config` when the run has not written it yet): done (metrics.json), started (a train log) or
not started; optimizer steps done of those planned; training seconds per step and examples per
second (train_log.jsonl's `seconds`: training time, evaluations excluded) and, for a finished
stage, its wall seconds with evaluations. Per evaluation (RUN/eval/pipeline/<model>.json): seconds
per test sample. Finished steps of every kind, from RUN/pipeline.log: their wall seconds.

Projected: the rest of each started stage at its own rate, each stage not started at the median
rate (examples/s) measured for its stage so far (stage 1 counts examples per task), evaluations
not run at the median seconds per sample of the LLM evaluations measured; null where nothing of
that kind has been measured yet. Training seconds only, plus a wall factor for evaluations
inside the stages where a finished stage shows one.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def _log_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return out


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def planned_stages(config) -> list[dict]:
    """Every training stage the config runs after the teachers: folder, stage, planned steps and
    examples per step (stage 1: per task)."""
    from delrec import methods
    from delrec.pipeline import Pipeline
    from delrec.training.config import DistillConfig, FinetuneConfig

    d, f = config.distill, config.finetune
    out = []
    chosen = [methods.get(v) for v in config.methods]
    for t in config.llm_teachers:
        stage1 = [(t, None)] if any(m.stage1 == "shared" for m in chosen) else []
        stage1 += [(m.stage1_folder(t), m) for m in chosen if m.stage1 == "own"]
        for folder, m in stage1:
            tasks = (m.stage1_settings if m else {}).get("tasks", d.get("tasks", DistillConfig.tasks))
            out.append({"stage": "stage 1", "folder": f"distill/{folder}", "tasks": len(tasks),
                        "planned_steps": d.get("steps", DistillConfig.steps),
                        "examples_per_step": d.get("batch_size", DistillConfig.batch_size) * d.get("grad_accum", DistillConfig.grad_accum),
                        "trains_llm": bool(m and m.stage1_settings.get("update_llm"))})
    for t, v, _ in Pipeline(config, progress=False)._finetune_jobs():
        out.append({"stage": "stage 2", "folder": f"finetune/{t}-{v}", "tasks": 1,
                    "planned_steps": f.get("steps", FinetuneConfig.steps),
                    "examples_per_step": f.get("batch_size", FinetuneConfig.batch_size) * f.get("grad_accum", FinetuneConfig.grad_accum),
                    "trains_llm": False})
    return out


def stage_progress(run: Path, stage: dict) -> dict:
    folder = run / stage["folder"]
    lines = _log_lines(folder / "train_log.jsonl")
    train = [e for e in lines if "eval" not in e and e.get("step", 0) > 0]
    metrics = _read_json(folder / "metrics.json")
    steps = int(metrics["steps"]) if metrics and "steps" in metrics else (train[-1]["step"] if train else 0)
    seconds = (metrics or {}).get("seconds") if metrics else (train[-1]["seconds"] if train else None)
    status = "done" if metrics else "started" if lines or (folder / "checkpoint.pt").exists() else "not started"
    row = {**stage, "status": status, "steps_done": steps, "train_seconds": seconds}
    if steps and seconds:
        row["seconds_per_step"] = seconds / steps
        row["examples_per_s"] = steps * stage["examples_per_step"] * stage["tasks"] / seconds
    if metrics and metrics.get("wall_seconds") and seconds:
        row["wall_seconds"] = metrics["wall_seconds"]
        row["wall_factor"] = metrics["wall_seconds"] / seconds
    return row


def pipeline_steps(run: Path) -> dict:
    """Wall seconds of every step RUN/pipeline.log says finished (the last time it ran)."""
    out = {}
    log = run / "pipeline.log"
    if log.is_file():
        for m in re.finditer(r"step (\S+): finished in (\d+) s", log.read_text()):
            out[m.group(1)] = int(m.group(2))
    return out


def progress(run: str | Path, config_path: str | None = None) -> dict:
    from delrec.config import PipelineConfig

    run = Path(run)
    config = PipelineConfig.from_run(run) if (run / "config.yaml").exists() else PipelineConfig.from_file(config_path)
    config.run_dir = str(run)
    stages = [stage_progress(run, s) for s in planned_stages(config)]

    # evaluations: the measured ones, and the LLM ones' seconds per sample
    test_samples = config.test_samples
    evals, llm_rates = [], []
    for name, _ in config.models():
        result = _read_json(run / "eval" / "pipeline" / f"{name}.json")
        row = {"model": name, "status": "done" if result else "not run"}
        if result and result.get("num_samples"):
            row.update(seconds=result.get("seconds"), samples=result["num_samples"],
                       seconds_per_sample=(result.get("seconds") or 0.0) / result["num_samples"])
            if name not in ("random", "popularity", *config.teachers):
                llm_rates.append(row["seconds_per_sample"])
            test_samples = test_samples or result["num_samples"]
        evals.append(row)

    rates = {k: [s["examples_per_s"] for s in stages if s["stage"] == k and "examples_per_s" in s and not s["trains_llm"]]
             for k in ("stage 1", "stage 2")}
    walls = [s["wall_factor"] for s in stages if "wall_factor" in s]
    wall_factor = statistics.median(walls) if walls else None
    remaining, unknown = 0.0, []
    for s in stages:
        left = s["planned_steps"] - s["steps_done"] if s["status"] != "done" else 0
        if not left:
            continue
        rate = s.get("examples_per_s") or (statistics.median(rates[s["stage"]]) if rates[s["stage"]] else None)
        if rate is None:
            unknown.append(s["folder"])
            continue
        s["projected_seconds_left"] = left * s["examples_per_step"] * s["tasks"] / rate * (wall_factor or 1.0)
        remaining += s["projected_seconds_left"]
    eval_rate = statistics.median(llm_rates) if llm_rates else None
    for row in evals:
        if row["status"] == "done" or row["model"] in ("random", "popularity", *config.teachers):
            continue
        if eval_rate is None or not test_samples:
            unknown.append(f"eval:{row['model']}")
            continue
        row["projected_seconds"] = eval_rate * test_samples
        remaining += row["projected_seconds"]
    return {"run": str(run), "stages": stages, "evaluations": evals, "pipeline_steps_seconds": pipeline_steps(run),
            "rates": {"stage 1 examples/s (median)": statistics.median(rates["stage 1"]) if rates["stage 1"] else None,
                      "stage 2 examples/s (median)": statistics.median(rates["stage 2"]) if rates["stage 2"] else None,
                      "LLM evaluation s/sample (median)": eval_rate, "wall / training seconds (median)": wall_factor},
            "projected_seconds_left": remaining, "not_projected": unknown,
            "note": "projected from this run's own measured rates; stages training the LLM (w UDPSM) are not used as rates"}


def table(result: dict) -> str:
    out = ["| step | status | steps | s/step | examples/s | projected s left |", "|---|---|---|---|---|---|"]
    for s in result["stages"]:
        out.append(f"| {s['folder']} | {s['status']} | {s['steps_done']}/{s['planned_steps']} | "
                   f"{s.get('seconds_per_step', float('nan')):.3f} | {s.get('examples_per_s', float('nan')):.1f} | "
                   f"{s.get('projected_seconds_left', 0.0):.0f} |")
    done = sum(e["status"] == "done" for e in result["evaluations"])
    out.append(f"\nevaluations done: {done}/{len(result['evaluations'])}; rates: {json.dumps(result['rates'])}")
    hours = result["projected_seconds_left"] / 3600
    out.append(f"projected time left: {hours:.1f} h" + (f" (not projected: {', '.join(result['not_projected'])})"
                                                          if result["not_projected"] else ""))
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run")
    p.add_argument("--config", help="the config, when RUN/config.yaml does not exist yet")
    p.add_argument("--out")
    args = p.parse_args(argv)
    run = Path(args.run)
    if not (run / "config.yaml").exists() and not args.config:
        print(f"error: {run / 'config.yaml'} does not exist; pass --config", file=sys.stderr)
        return 2
    result = progress(run, args.config)
    print(table(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"-> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
