"""The controlled settings study of stage 2 and stage 1: which settings learn steadily.

    python benchmarks/settings_study.py --list                                  # the probes
    python benchmarks/settings_study.py --probe lora-qv-adamw-1e-3              # one probe (resumable)
    python benchmarks/settings_study.py --probe lora-qv-adamw-3e-4 > a.log 2>&1 &   # two side by side on
    python benchmarks/settings_study.py --probe lora-qv-lion-2e-4  > b.log 2>&1 &   # 2 cores, one thread each
    python benchmarks/settings_study.py --summary                               # table + figure of every probe

Supersedes benchmarks/stage2_settings.py (the earlier one-off probes, kept with their results):
each probe here runs the stages' own code (`delrec.training.finetune.finetune`, `delrec.training.distill
.distill`) with a named set of overrides from PROBES, so what it measures is what a run trains.

Held fixed across probes: one prepared run (`--source`, default runs/ml100k-cpu, only read: each
probe has its own run folder RUN/<probe> under `--run`, default runs/study, which links the
source's `data` and `teachers` and holds RUN/<probe>/finetune/<probe> or .../distill/<probe>, so
that two probes side by side never wait for each other's run lock); the seed, so the same train order and the same
valid rows (finetune and distill draw both from it); the valid subset (`--valid`, default 256
samples; per task in stage 1); the budget in train examples (`--examples`, default 800, per task in
stage 1: steps = examples / (batch_size * grad_accum)); an evaluation every `--eval-examples`
(default 200); no early stop; one torch thread (`--threads`). Stage-2 probes train the `w/o SP`
prompt (`wo-sp`: no stage 1 needed); stage-1 probes (`s1-`) train 32 soft tokens on RPS (top 10)
and TA with the frozen LLM.

Varied: the stage-2 adapter (LoRA on q/v or on every linear layer, AdaLoRA with its author's
schedule or the old presets' pruning from step 0), the optimiser (AdamW; Lion 3-10x below it with
10x its weight decay, as Lion's authors advise) and its rate, the effective batch (4, or 16 by
gradient accumulation), warm-up and cosine decay against a constant rate; in stage 1 the soft
prompt's optimiser and rate, its size, and a start from sampled vocabulary embeddings against a
random one.

Recorded, one JSON per probe in benchmarks/results/settings-study/<probe>.json (`--out`): the
resolved settings, the environment, the online loss of every step (the loss of each batch before
its update: no example repeats, so it is held out), the valid curve (examples_seen, valid_HR@1,
valid_NDCG@5, seconds; RPS's in stage 1), its END and BEST points and the seconds. `--summary`
prints a Markdown table per stage and draws docs/figures/settings-study.png (`--figure`).

Choose defaults by the END value (the valid NDCG@5 at the end of the budget), not by the best point
on the way: a curve that peaks early and falls back is what the presets must not do, and an
early-stopped best on a few hundred samples is partly noise (one standard error about 0.03 at 256).
The summary names the probe with the best end value and marks whether each end is within 0.02
NDCG@5 of its best point.

A probe whose results JSON exists is skipped unless `--force` (which also restarts its stage); an
interrupted probe resumes from the stage's own checkpoint. Seconds are at one thread beside another
job: compare them within the study only.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "settings-study"
FIGURE = ROOT / "docs" / "figures" / "settings-study.png"
FIGURE_SECONDS = ROOT / "docs" / "figures" / "study-seconds.png"
SEED = 0
NEAR = 0.02  # an end within this much NDCG@5 of the best point counts as "ends where it peaks"

# stage 2: plain LoRA as LlamaRec and LLaRA train it (r 8, alpha 16 on q/v, AdamW, 5 warm-up steps,
# cosine decay to a tenth); weight decay FinetuneConfig's 1e-6 (Lion: 10x it)
LORA = {"adapter": "lora", "target_modules": "qv", "lora_r": 8, "lora_alpha": 16.0, "optimizer": "adamw", "lr": 1e-3,
        "weight_decay": 1e-6, "warmup_steps": 5, "lr_schedule": "cosine", "lr_min_ratio": 0.1}
# stage 1: what every `s1-` probe shares (lr_schedule as stage 2's LoRA probes)
S1 = {"soft_tokens": 32, "top_h": 10, "tasks": ("ta", "rps"), "batch_size": 4, "warmup_steps": 5, "lr_schedule": "cosine",
      "lr_min_ratio": 0.1}
PROBES = {
    # the old presets: AdaLoRA pruning every step from step 0, Lion at 2e-2 of E's RMS singular value
    "adalora-lion-2e-2-step0": {"adapter": "adalora", "tinit": 0.0, "tfinal": 0.0, "delta_t": 1, "optimizer": "lion", "lr": 2e-2,
                                "relative_lr": True, "vector_lr_scale": 0.25, "lr_schedule": "constant",
                                "adapter_init": "orthogonal", "warmup_steps": 5},
    # AdaLoRA on its author's schedule, one AdamW rate for every adapter tensor
    "adalora-adamw-1e-3-sched": {"adapter": "adalora", "tinit": 0.1, "tfinal": 0.3, "delta_t": 10, "optimizer": "adamw",
                                 "lr": 1e-3, "relative_lr": False, "vector_lr_scale": 1.0, "weight_decay": 1e-6,
                                 "warmup_steps": 5, "lr_schedule": "cosine", "lr_min_ratio": 0.1},
    # the same without the orthogonality regulariser: benchmarks/adapter_step_size.py found it holds
    # P and Q in place while E is near zero (docs/training.md)
    "adalora-adamw-1e-3-sched-orth0": {"adapter": "adalora", "tinit": 0.1, "tfinal": 0.3, "delta_t": 10, "optimizer": "adamw",
                                       "lr": 1e-3, "relative_lr": False, "vector_lr_scale": 1.0, "weight_decay": 1e-6,
                                       "orth_reg_weight": 0.0, "warmup_steps": 5, "lr_schedule": "cosine", "lr_min_ratio": 0.1},
    "lora-qv-adamw-1e-3": LORA,
    "lora-qv-adamw-3e-4": {**LORA, "lr": 3e-4},
    "lora-qv-adamw-2e-3": {**LORA, "lr": 2e-3},
    "lora-all-adamw-5e-4": {**LORA, "target_modules": "all-linear", "lr": 5e-4},
    "lora-qv-lion-2e-4": {**LORA, "optimizer": "lion", "lr": 2e-4, "weight_decay": 1e-5},
    "lora-qv-lion-1e-4": {**LORA, "optimizer": "lion", "lr": 1e-4, "weight_decay": 1e-5},
    "lora-qv-adamw-1e-3-bs16": {**LORA, "batch_size": 4, "grad_accum": 4},
    "lora-qv-adamw-1e-3-constant": {**LORA, "lr_schedule": "constant"},
    # the study in seconds (quality per CPU-second): today's stage 2 against each speed lever, the
    # distillation term at two weights and the combination, each run for as many examples as its
    # measured speed buys in today's seconds for 800 (`--examples`, `--max-seconds`; docs/training.md)
    # (these two ran first and evaluated with int8 weights, which moved the valid metrics of trained
    # adapters; the study compares them by their float re-score, `--rescore-float`)
    "s2-today": {**LORA, "eval_weights": "int8"},
    "s2-top8-neg4-distill-1": {**LORA, "eval_weights": "int8", "adapter_layers": 8, "train_negatives": 4,
                               "distill_weight": 1.0},
    "s2-top8": {**LORA, "adapter_layers": 8},
    "s2-neg4": {**LORA, "train_negatives": 4},
    "s2-distill-0.5": {**LORA, "distill_weight": 0.5},
    "s2-distill-1": {**LORA, "distill_weight": 1.0},
    # next: the term won at weights 0.5 and 1, 4 negatives gained a little, the top-8 adapters
    # lost; do 4 negatives keep the term's gain at their speed, and does a sharper target (T 1) win more?
    "s2-neg4-distill-0.5": {**LORA, "train_negatives": 4, "distill_weight": 0.5},
    "s2-distill-0.5-t1": {**LORA, "distill_weight": 0.5, "distill_temperature": 1.0},
    "s2-distill-2": {**LORA, "distill_weight": 2.0},
    # stage 1: the soft prompt's optimiser, rate, start and size
    "s1-lion-5e-3-random": {**S1, "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5, "soft_init": "random"},
    "s1-lion-5e-3-vocab": {**S1, "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5, "soft_init": "vocab"},
    "s1-adamw-1e-2-vocab": {**S1, "optimizer": "adamw", "lr": 1e-2, "weight_decay": 1e-6, "soft_init": "vocab"},
    "s1-adamw-3e-2-vocab": {**S1, "optimizer": "adamw", "lr": 3e-2, "weight_decay": 1e-6, "soft_init": "vocab"},
    "s1-lion-5e-3-vocab-100tok": {**S1, "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5, "soft_init": "vocab",
                                  "soft_tokens": 100},
    # stage 1 at a budget: a deep prompt on the top 8 layers (backward through those only) and RPS
    # with the teacher's scores of its list as a soft target beside the top-1
    "s1-deep8-lion-5e-3-vocab": {**S1, "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5, "soft_init": "vocab",
                                 "soft_depth": 8},
    "s1-lion-5e-3-vocab-rps-soft": {**S1, "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5, "soft_init": "vocab",
                                    "rps_distill_weight": 1.0},
    # RPS alone (the `w/o TA` task set): can the soft prompt learn to pick the teacher's top-1 at all?
    "s1-lion-5e-3-vocab-rps": {**S1, "tasks": ("rps",), "optimizer": "lion", "lr": 5e-3, "weight_decay": 1e-5,
                               "soft_init": "vocab"},
}


def stage(name: str) -> int:
    return 1 if name.startswith("s1-") else 2


def resolve(name: str, examples: int, valid: int, eval_examples: int, llm: str = "smollm2-135m", dtype: str = "auto",
            max_seconds: float | None = None, start_eval: bool = True):
    """The probe's FinetuneConfig or DistillConfig with the study's fixed settings (constructing it
    validates it): `examples` train examples (per task in stage 1), an evaluation every about
    `eval_examples`, `valid` valid samples, the seed, no early stop."""
    from dataclasses import replace

    from delrec.training.config import DistillConfig, FinetuneConfig

    fixed = {"llm": llm, "dtype": dtype, "seed": SEED, "valid_samples": valid, "max_seconds": max_seconds}
    if stage(name) == 1:
        config = DistillConfig(**{**PROBES[name], **fixed})
    else:
        # the untrained start is the same model for every stage-2 probe (LoRA's B starts at zero), so
        # one float probe measuring it serves all: `--no-start-eval` spares the others its scoring
        config = FinetuneConfig(**{**PROBES[name], **fixed, "method": "wo-sp", "patience": 10**9,
                                   "eval_at_start": start_eval})
    per_step = config.batch_size * config.grad_accum
    if examples % per_step:
        raise ValueError(f"{name}: --examples {examples} is not a whole number of steps of {per_step} examples")
    return replace(config, steps=examples // per_step, eval_every=max(1, round(eval_examples / per_step)))


def study_run(run: Path, source: Path) -> Path:
    """A probe's run folder: `data` and `teachers` are links to the prepared `source` run (only
    read), so the probes' stage folders never land in it."""
    for part in ("data", "teachers"):
        link, target = run / part, (source / part).resolve()
        if not target.exists():
            if part == "data":
                raise FileNotFoundError(f"{target}: prepare the source run first (`delrec data prepare`)")
            continue
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.exists() or link.is_symlink():
            raise FileExistsError(f"{link} exists and is not a link to {target}; choose another --run")
        run.mkdir(parents=True, exist_ok=True)
        link.symlink_to(target)
    return run


def end_and_best(curve: list[dict], key: str = "valid_NDCG@5") -> dict:
    """The curve's last point, its best trained point (the untrained one at 0 examples is a
    reference only, as in finetune) and whether the end is within NEAR of the best."""
    trained = [p for p in curve if p["examples_seen"] > 0] or curve
    end, best = curve[-1], max(trained, key=lambda p: p[key])
    return {"end": end, "best": best, "end_near_best": bool(end[key] >= best[key] - NEAR)}


def _read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_probe(name: str, a) -> dict:
    import torch

    from _env import environment
    from delrec.data.store import RunData

    torch.set_num_threads(a.threads)
    config = resolve(name, a.examples, a.valid, a.eval_examples, a.llm, a.dtype, a.max_seconds, a.start_eval)
    run = study_run(Path(a.run) / name, Path(a.source))  # a run folder per probe: one writer each (delrec.core.locks)
    per_step = config.batch_size * config.grad_accum
    if stage(name) == 1:
        from delrec.training.distill import distill

        metrics = distill(run, config, name=name, progress=not a.quiet, restart=a.force).metrics
        task = "rps" if "rps" in config.tasks else "ta"
        log = _read_log(run / "distill" / name / "train_log.jsonl")
        steps = [{"step": e["step"], "examples_seen": e["step"] * per_step, "loss": e[f"loss_{task}"],
                  **{k: e[k] for k in e if k.startswith("loss_")}} for e in log if "eval" not in e]
        curve = [{"examples_seen": e["examples_seen"], "valid_HR@1": e["eval"][f"{task}_valid_HR@1"],
                  "valid_NDCG@5": e["eval"][f"{task}_valid_NDCG@5"], "seconds": e["seconds"],
                  **{k: v for k, v in e["eval"].items() if not k.endswith("_accuracy")}} for e in metrics["valid_history"]]
        chance, samples = math.log(config.top_h if task == "rps" else 15), metrics["valid_samples"][task]
    else:
        from delrec.training.finetune import finetune

        metrics = finetune(run, config, name=name, progress=not a.quiet, restart=a.force).metrics
        task = "candidates"
        log = _read_log(run / "finetune" / name / "train_log.jsonl")
        steps = [{"step": e["step"], "examples_seen": e["step"] * per_step, "loss": e["loss_rec"],
                  **{k: e[k] for k in ("loss_kl", "teacher_agreement") if k in e}} for e in log if "eval" not in e]
        agreement = {e["step"]: e["eval"].get("valid_teacher_agreement") for e in log if "eval" in e}
        curve = [{**{k: e[k] for k in ("examples_seen", "valid_HR@1", "valid_NDCG@5", "seconds")},
                  "valid_teacher_agreement": agreement.get(e["step"])} for e in metrics["valid_history"]]
        chance = math.log(RunData.load(run / "data").candidates.shape[1])
        samples = metrics["valid_samples"]
    return {"probe": name, "stage": stage(name), "task": task, "overrides": PROBES[name], "settings": config.to_dict(),
            "study": {"examples": a.examples, "max_seconds": a.max_seconds, "valid": a.valid, "valid_samples": samples, "eval_examples": a.eval_examples,
                      "start_eval": a.start_eval,
                      "threads": a.threads, "source": str(Path(a.source).resolve()), "run": str(Path(a.run).resolve())},
            "environment": environment(), "chance_loss": chance, "online_loss": steps, "curve": curve,
            **end_and_best(curve), "seconds": metrics["seconds"], "wall_seconds": metrics["wall_seconds"]}


def rescore_float(name: str, a) -> dict:
    """A finished stage-2 probe's kept adapter (its best valid point, which is its end where
    best_step == steps) scored again on the probe's valid rows with float weights, as `delrec
    evaluate` scores it: the study's common measure where a probe's own evaluations used int8
    weights (`eval_weights: int8`, which moved the valid metrics of trained adapters by about 0.09
    NDCG@5 here: docs/training.md). Written into the probe's JSON as `rescored_float`, with the
    rows and the target's pessimistic rank on each, which `--paired` reads."""
    import torch

    from delrec.core.io import read_json
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import candidate_ranks, metrics_from_ranks
    from delrec.serving.scorers import finetuned_scorer

    torch.set_num_threads(a.threads)
    folder = Path(a.run) / name / "finetune" / name
    metrics = read_json(folder / "metrics.json")
    data = RunData.load(Path(a.run) / name / "data")
    scorer = finetuned_scorer(folder, data, progress=not a.quiet, run_dir=Path(a.run) / name)
    rows = np.asarray(metrics["valid_rows"])
    ranks = candidate_ranks(scorer, data, rows)
    m = metrics_from_ranks(ranks)
    seen_at_best = next(e["examples_seen"] for e in metrics["valid_history"] if e["step"] == metrics["best_step"])
    return {"examples_seen": seen_at_best, "is_end": metrics["best_step"] == metrics["steps"],
            "valid_HR@1": m["HR@1"], "valid_NDCG@5": m["NDCG@5"], "valid_samples": len(rows),
            "rows": rows.tolist(), "ranks": ranks.tolist()}


def rescored(name: str, a, again: bool) -> dict:
    """The probe's results with `rescored_float` (scored now where `again`, or where it has no
    per-row ranks yet), written back to its JSON when scored."""
    from delrec.core.io import write_json

    path = Path(a.out) / f"{name}.json"
    result = json.loads(path.read_text())
    if again or "ranks" not in result.get("rescored_float", {}):
        result["rescored_float"] = rescore_float(name, a)
        write_json(path, result)
    return result


def paired(reference: dict, other: dict) -> dict:
    """`other` against `reference` on the same valid rows, from their float per-row ranks: HR@1
    by McNemar's exact test, NDCG@5 by the paired sign-flip permutation test (significance.py)."""
    from delrec.evaluation.significance import compare

    a, b = other["rescored_float"], reference["rescored_float"]
    if a["rows"] != b["rows"]:
        raise ValueError(f"{other['probe']} and {reference['probe']} were scored on different valid rows")
    return {"reference": reference["probe"], **compare(np.asarray(a["ranks"]), np.asarray(b["ranks"]))}


def describe(r: dict) -> str:
    """The setting of a probe in a few words."""
    s = r["settings"]
    batch = f"batch {s['batch_size']}" + (f"x{s['grad_accum']}" if s["grad_accum"] > 1 else "")
    sched = f"warm-up {s['warmup_steps']}, {s['lr_schedule']}" + (f" to {s['lr_min_ratio']:g}" if s["lr_schedule"] != "constant" else "")
    opt = f"{s['optimizer']} {s['lr']:g} (wd {s['weight_decay']:g})"
    if r["stage"] == 1:
        return f"{s['soft_tokens']} tokens ({s['soft_init']}), {opt}, {sched}, {batch} per task"
    if s["adapter"] == "lora":
        adapter = f"LoRA {s['target_modules'] or 'qv'} r {s['lora_r']} alpha {s['lora_alpha']:g}"
    else:
        adapter = (f"AdaLoRA tinit {s['tinit']:g} tfinal {s['tfinal']:g} deltaT {s['delta_t']}"
                   + (f", relative lr, P/Q x{s['vector_lr_scale']:g}" if s["relative_lr"] else ""))
    return ", ".join([f"{adapter}, {opt}, {sched}, {batch}", *levers(s)])


def levers(s: dict) -> list[str]:
    """The speed and distillation settings of a stage-2 probe that differ from today's."""
    out = [f"top {s['adapter_layers']} layers" if s.get("adapter_layers") else "",
           f"{s['train_negatives']} negatives in the loss" if s.get("train_negatives") else "",
           f"distill {s['distill_weight']:g} (T {s['distill_temperature']:g})" if s.get("distill_weight") else ""]
    return [x for x in out if x]


SECONDS_PREFIX = "s2-"  # the probes of the study in seconds


def seconds_table(results: list[dict]) -> str:
    """The study in seconds: per probe its training seconds, seconds per example, and the valid
    metrics and teacher agreement at the end of its budget; the best END named."""
    rows = [r for r in results if r["probe"].startswith(SECONDS_PREFIX)]
    if not rows:
        return ""
    lines = [f"Stage 2 at equal training seconds ({rows[0]['study']['valid_samples']} valid samples, "
             f"{rows[0]['study'].get('threads', 1)} thread per job)", "",
             "| probe | levers | valid weights | examples | training s | s / example | valid NDCG@5 by evaluation | "
             "END NDCG@5 (HR@1) | END teacher agreement | END in float: NDCG@5 (HR@1) | paired, float: NDCG@5 (p), HR@1 (p) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        end = r["curve"][-1]
        curve = " / ".join(f"{p['valid_NDCG@5']:.3f} ({p['seconds']:.0f} s)" for p in r["curve"])
        agree = end.get("valid_teacher_agreement")
        weights = r["settings"].get("eval_weights", "float")
        f = end_in_float(r)
        flo = "-" if f is None else f"{f['valid_NDCG@5']:.3f} ({f['valid_HR@1']:.3f})" + ("" if f.get("is_end", True) else
                                                                                           f" at {f['examples_seen']}")
        lines.append(f"| {r['probe']} | {', '.join(levers(r['settings'])) or 'none (today)'} | {weights} | "
                     f"{end['examples_seen']} | {r['seconds']:.0f} | {r['seconds'] / max(1, end['examples_seen']):.2f} | {curve} | "
                     f"{end['valid_NDCG@5']:.3f} ({end['valid_HR@1']:.3f}) | {'-' if agree is None else f'{agree:.3f}'} | {flo} | "
                     f"{paired_cell(r)} |")
    ranked = [r for r in rows if end_in_float(r) is not None]
    if ranked:
        top = max(ranked, key=lambda r: end_in_float(r)["valid_NDCG@5"])
        lines += ["", f"Best END value in float at equal seconds: **{top['probe']}**, valid NDCG@5 "
                  f"{end_in_float(top)['valid_NDCG@5']:.3f}."]
    return "\n".join(lines)


def paired_cell(r: dict) -> str:
    """`--paired`'s verdicts for the table: against each reference, the differences and their p-values."""
    return "; ".join(f"{t['NDCG@5']['diff']:+.3f} (p {t['NDCG@5']['p_value']:.2g}), {t['HR@1']['diff']:+.3f} "
                     f"(p {t['HR@1']['p_value']:.2g}) vs {t['reference']}" for t in r.get("paired", [])) or "-"


def end_in_float(r: dict) -> dict | None:
    """A probe's end point scored with float weights: its last evaluation where it evaluated in
    float, else its float re-score (`--rescore-float`), else None."""
    if r["settings"].get("eval_weights", "float") == "float":
        return r["curve"][-1]
    return r.get("rescored_float")


def shared_start(rows: list[dict]) -> dict | None:
    """The untrained start scored in float by a probe that measured it (`--no-start-eval` spares
    the others: with LoRA's B at zero every stage-2 probe starts from the same model)."""
    return next((r["curve"][0] for r in rows if r["settings"].get("eval_weights", "float") == "float"
                 and r["curve"] and r["curve"][0]["examples_seen"] == 0), None)


def drawn_curve(r: dict, start: dict | None) -> list[dict]:
    """A probe's valid curve for the figure: the shared float start put before a probe that skipped it."""
    if r["curve"] and r["curve"][0]["examples_seen"] > 0 and start is not None:
        return [start, *r["curve"]]
    return r["curve"]


def seconds_figure(results: list[dict], path: Path) -> None:
    """Valid NDCG@5 of the study in seconds against training seconds and against examples."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from delrec.core.io import atomic_path

    rows = [r for r in results if r["probe"].startswith(SECONDS_PREFIX)]
    start = shared_start(rows)
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 3.8))
    for r in rows:
        weights = r["settings"].get("eval_weights", "float")
        curve = drawn_curve(r, start)
        # int8 readings sit far below the same adapters in float: drawn faint, the float end is the star
        style = {} if weights == "float" else {"linestyle": ":", "alpha": 0.5}
        label = r["probe"] if weights == "float" else f"{r['probe']} (int8 readings)"
        line = a.plot([p["seconds"] for p in curve], [p["valid_NDCG@5"] for p in curve], marker="o", markersize=3,
                      label=label, **style)[0]
        b.plot([p["examples_seen"] for p in curve], [p["valid_NDCG@5"] for p in curve], marker="o", markersize=3,
               label=label, color=line.get_color(), **style)
        f = end_in_float(r)
        if weights != "float" and f is not None:  # the float re-score of the kept adapter
            at = next(p for p in r["curve"] if p["examples_seen"] == f["examples_seen"])
            a.plot([at["seconds"]], [f["valid_NDCG@5"]], marker="*", markersize=12, color=line.get_color(),
                   linestyle="none", label=f"{r['probe']}, its end in float")
            b.plot([f["examples_seen"]], [f["valid_NDCG@5"]], marker="*", markersize=12, color=line.get_color(),
                   linestyle="none")
    valid = rows[0]["study"]["valid_samples"] if rows else 0
    a.set(xlabel="training seconds (evaluations excluded)", ylabel="valid NDCG@5", title=f"stage 2 at equal seconds ({valid} valid)")
    b.set(xlabel="train examples seen", ylabel="valid NDCG@5", title="the same curves against examples")
    a.legend(fontsize=7), b.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def windows(steps: list[dict], width: int) -> list[float]:
    """The online loss averaged over each window of `width` examples."""
    sums: dict[int, list[float]] = {}
    for e in steps:
        sums.setdefault((e["examples_seen"] - 1) // width, []).append(e["loss"])
    return [sum(v) / len(v) for _, v in sorted(sums.items())]


def load(out: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(Path(out).glob("*.json"))]


def table(results: list[dict]) -> str:
    """One Markdown table per stage, and the probe with the best end value."""
    text = []
    for st, what in ((2, "valid"), (1, "RPS valid")):
        rows = [r for r in results if r["stage"] == st]
        if not rows:
            continue
        text += [f"Stage {st} ({what} metrics on {rows[0]['study']['valid_samples']} samples)", "",
                 f"| probe | setting | examples | online loss per {rows[0]['study']['eval_examples']} examples | "
                 f"{what} NDCG@5 by evaluation | {what} HR@1 by evaluation | END NDCG@5 (HR@1) | BEST NDCG@5 (at) | "
                 f"end within {NEAR} of best |", "|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            e = {**end_and_best(r["curve"]), "examples": r["curve"][-1]["examples_seen"]}
            loss = " / ".join(f"{x:.2f}" for x in windows(r["online_loss"], r["study"]["eval_examples"])) or "-"
            ndcg = " / ".join(f"{p['valid_NDCG@5']:.3f}" for p in r["curve"])
            hr = " / ".join(f"{p['valid_HR@1']:.3f}" for p in r["curve"])
            text.append(f"| {r['probe']} | {describe(r)} | {e['examples']} | {loss} | {ndcg} | {hr} | "
                        f"{e['end']['valid_NDCG@5']:.3f} ({e['end']['valid_HR@1']:.3f}) | "
                        f"{e['best']['valid_NDCG@5']:.3f} ({e['best']['examples_seen']}) | {'yes' if e['end_near_best'] else 'no'} |")
        top = max(rows, key=lambda r: end_and_best(r["curve"])["end"]["valid_NDCG@5"])
        end = end_and_best(top["curve"])["end"]
        text += ["", f"Best END value (stage {st}, choose defaults by this): **{top['probe']}**, {what} NDCG@5 "
                 f"{end['valid_NDCG@5']:.3f} (HR@1 {end['valid_HR@1']:.3f}) at {end['examples_seen']} examples.", ""]
    return "\n".join(text).rstrip()


def figure(results: list[dict], path: Path) -> None:
    """Valid NDCG@5 against examples (one line per probe) and the online loss's moving average over
    half an evaluation window, with chance dashed; a row per stage."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from delrec.core.io import atomic_path

    stages = [st for st in (2, 1) if any(r["stage"] == st for r in results)]
    fig, axes = plt.subplots(len(stages), 2, figsize=(12, 3.6 * len(stages)), squeeze=False)
    for (a, b), st in zip(axes, stages):
        rows = [r for r in results if r["stage"] == st]
        what = "valid" if st == 2 else "RPS valid"
        for r in rows:
            a.plot([p["examples_seen"] for p in r["curve"]], [p["valid_NDCG@5"] for p in r["curve"]], marker="o", markersize=3,
                   label=r["probe"])
            x, y = [e["examples_seen"] for e in r["online_loss"]], np.array([e["loss"] for e in r["online_loss"]])
            per_step = x[0] if x else 1
            k = max(1, min(len(y), r["study"]["eval_examples"] // 2 // per_step))
            if len(y):
                b.plot(x[k - 1:], np.convolve(y, np.ones(k) / k, mode="valid"), label=r["probe"])
        chance = rows[0]["chance_loss"]
        b.axhline(chance, color="black", linestyle="--", linewidth=1, label=f"chance ln {round(math.exp(chance))} = {chance:.3f}")
        a.set(xlabel="train examples seen" + (" per task" if st == 1 else ""), ylabel=f"{what} NDCG@5",
              title=f"stage {st} ({rows[0]['study']['valid_samples']} valid samples)")
        b.set(xlabel="train examples seen" + (" per task" if st == 1 else ""), ylabel="online loss (moving average)")
        a.legend(fontsize=7), b.legend(fontsize=7)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--probe", nargs="+", metavar="NAME", help="probes to run, in order (see --list)")
    p.add_argument("--list", action="store_true", help="print the registry of probes and exit")
    p.add_argument("--summary", action="store_true", help="print the table of every probe with results, draw the figure")
    p.add_argument("--force", action="store_true", help="rerun a probe whose results exist (its stage restarts)")
    p.add_argument("--source", default="runs/ml100k-cpu", help="the prepared run whose data and teachers are read")
    p.add_argument("--run", default="runs/study", help="the study's folder (a run folder per probe in it)")
    p.add_argument("--out", default=str(OUT), help="the results folder")
    p.add_argument("--figure", default=str(FIGURE), help="where --summary draws the figure")
    p.add_argument("--seconds-figure", default=str(FIGURE_SECONDS), help="where --summary draws the study in seconds")
    p.add_argument("--examples", type=int, default=800, help="train examples per probe (per task in stage 1)")
    p.add_argument("--max-seconds", type=float, default=None,
                   help="a budget of training seconds (evaluations excluded): the study in seconds")
    p.add_argument("--valid", type=int, default=256, help="valid samples (per task in stage 1)")
    p.add_argument("--eval-examples", type=int, default=200, help="an evaluation every this many train examples")
    p.add_argument("--no-start-eval", dest="start_eval", action="store_false",
                   help="stage 2: skip scoring the untrained start (the same model for every probe; one probe measures it)")
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--threads", type=int, default=1, help="torch threads (one per job when two run side by side)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--rescore-float", nargs="+", metavar="NAME",
                   help="score finished stage-2 probes' kept adapters again with float weights (see rescore_float)")
    p.add_argument("--paired", nargs="+", metavar="NAME",
                   help="REF NAME...: each NAME against REF on the same valid rows (paired tests; scores in float "
                        "the probes not yet re-scored)")
    a = p.parse_args()
    if a.list:
        for name, overrides in PROBES.items():
            print(f"{name:30s} stage {stage(name)}  {json.dumps(overrides)}")
        return
    if not (a.probe or a.summary or a.rescore_float or a.paired):
        p.error("give --probe NAME [NAME ...], --rescore-float NAME [NAME ...], --paired REF NAME [...], --list or --summary")
    if a.paired is not None and len(a.paired) < 2:
        p.error("--paired needs the reference probe and at least one other")
    unknown = [n for n in a.probe or () if n not in PROBES]
    if unknown:
        p.error(f"unknown probe(s) {unknown}; --list shows the registry")
    os.environ["OMP_NUM_THREADS"] = str(a.threads)  # before torch is imported
    from delrec.core.io import write_json

    for name in a.probe or ():
        path = Path(a.out) / f"{name}.json"
        if path.exists() and not a.force:
            print(f"{name}: {path} exists, skipped (--force reruns it)")
            continue
        write_json(path, run_probe(name, a))
        print(f"{name}: wrote {path}")
    for name in a.rescore_float or ():
        result = rescored(name, a, again=True)
        print(f"{name}: float re-score NDCG@5 {result['rescored_float']['valid_NDCG@5']:.3f}")
    if a.paired:
        reference = rescored(a.paired[0], a, again=False)
        for name in a.paired[1:]:
            result = rescored(name, a, again=False)
            t = paired(reference, result)
            # one test per reference: pairing again against the same one replaces it
            result["paired"] = [u for u in result.get("paired", []) if u["reference"] != t["reference"]] + [t]
            write_json(Path(a.out) / f"{name}.json", result)
            print(f"{name} vs {reference['probe']}: " + ", ".join(
                f"{m} {t[m]['a']:.3f} vs {t[m]['b']:.3f} (p {t[m]['p_value']:.3g})" for m in ("HR@1", "NDCG@5")))
    if a.summary:
        results = load(Path(a.out))
        if not results:
            print(f"no results in {a.out}")
            return
        settings = [r for r in results if not r["probe"].startswith(SECONDS_PREFIX)]  # the study in examples
        print(table(settings))
        figure(settings, Path(a.figure))
        print(f"\nfigure: {a.figure}")
        if any(r["probe"].startswith(SECONDS_PREFIX) for r in results):
            print("\n" + seconds_table(results))
            seconds_figure(results, Path(a.seconds_figure))
            print(f"\nfigure: {a.seconds_figure}")


if __name__ == "__main__":
    main()
