"""Seconds per stage-2 training example and per scored sample: today's settings against each
speed lever and the preset's choice, in one run on one CPU (ratios, not absolute seconds, are what
compares across these shared machines).

    python benchmarks/speed.py                          # runs/ml100k-cpu, the ml100k-cpu preset, 2 threads
    python benchmarks/speed.py --config configs/ml100k-cpu-long.yaml --score-samples 96
    OMP_NUM_THREADS=1 python benchmarks/speed.py --tiny --threads 1   # smoke test on a tiny model (tests)

What it runs is the stages' own code: `FinetuneStage.step` (delrec.training.finetune) on the prepared
run (`--run`, only read: a temporary run folder links its data and teachers), with the real
SmolLM2-135M weights, the `usp` method (the LSR prompt with a soft prompt of the preset's size,
drawn untrained, so no stage 1 is needed; the step costs what DELRec's does), the preset's batch
and optimizer, one warm-up step and `--steps` timed steps per variant, each on a fresh backbone:

* `today`: the preset with the speed and distillation settings at their defaults (adapters on every
  layer, every candidate scored in the loss, no distillation term): what stage 2 cost before them;
* one row per lever alone (LEVERS: adapters on the top layers only, fewer negatives in the loss,
  the distillation term);
* `preset`: the preset's own finetune section, whatever it chose.

Scoring: the `today` model after its steps, on `--score-samples` fixed test samples: `score-today`
as scoring ran before (the peft model unmerged, every prompt computed whole), `score-merged` as it
runs now (adapter merged, the text before the slot and the soft prompt computed once per call) and
`score-int8` (`eval_weights: int8`, llm/quantize.py); rankings compared with today's on the same
samples (HR@1 / NDCG@5 of each, the paired tests of delrec.evaluation.significance, and the share of samples
whose target rank is the same). float32 always; bfloat16 too where the CPU computes it natively
(else skipped, and said).

Reported per row: seconds per example (train) or per sample (score), peak RSS during it (VmRSS
sampled every 5 ms), and the speed-up over `today` / float in the same run. JSON in
benchmarks/results/speed-cpu.json (`--out`; `--tiny` writes /tmp/speed_tiny.json unless told),
with keys `speedup_train` (the preset's) and `speedup_score` (merged + shared prefix, float) and
`speedup_score_int8` at the top.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402
from stages import PeakMemory  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")
# what each lever changes in the preset's finetune section (`today` resets all of them)
LEVERS = {
    "top8": {"adapter_layers": 8},
    "top15": {"adapter_layers": 15},
    "neg4": {"train_negatives": 4},
    "distill": {"distill_weight": 1.0},
    "top8+neg4": {"adapter_layers": 8, "train_negatives": 4},
    "top8+neg4+distill": {"adapter_layers": 8, "train_negatives": 4, "distill_weight": 1.0},
    "neg4+distill-0.5": {"train_negatives": 4, "distill_weight": 0.5},  # ml100k-cpu-long's stage 2
}
TODAY = {"adapter_layers": None, "train_negatives": None, "distill_weight": 0.0}


def finetune_settings(config_path: Path, tiny: bool, teacher: str | None = None) -> tuple[dict, dict]:
    """(today's settings, the preset's) from a run config's finetune section, for the `usp` method."""
    import yaml

    values = yaml.safe_load(config_path.read_text())
    preset = {k: v for k, v in values.get("finetune", {}).items()
              if k not in ("steps", "eval_every", "snapshot_every", "patience", "valid_samples")}
    preset.update(method="usp", soft_tokens=values.get("distill", {}).get("soft_tokens", 32), valid_samples=4,
                  teacher=teacher or (values.get("method_teachers") or values.get("teachers") or ["sasrec"])[0],
                  steps=1000, eval_every=10**6, checkpoint_every=10**6)
    if tiny:
        preset.update(soft_tokens=4, batch_size=2)
    today = {**preset, **TODAY}
    return today, preset


def make_run(source: Path) -> Path:
    """A temporary run folder whose data and teachers are links to `source`'s (only read)."""
    run = Path(tempfile.mkdtemp(prefix="delrec-speed-"))
    for part in ("data", "teachers"):
        if not (source / part).exists():
            raise FileNotFoundError(f"{source / part}: prepare the run first (`delrec run --config configs/ml100k-cpu.yaml`, "
                                    "or its data and teacher steps)")
        (run / part).symlink_to((source / part).resolve())
    return run


def load_backbone(a, dtype: str):
    if a.tiny:
        sys.path.insert(0, str(ROOT / "tests"))
        from llm_helpers import tiny_llama_backbone

        return tiny_llama_backbone()
    from delrec.llm.backbone import Backbone

    return Backbone.load(a.llm, dtype=dtype)


def time_train(a, run: Path, name: str, settings: dict, dtype: str):
    """Seconds per training example of `settings` (and the stage, for scoring afterwards)."""
    from delrec.training.config import FinetuneConfig
    from delrec.training.finetune import FinetuneStage
    from delrec.training.loop import Progress

    config = FinetuneConfig(**{**settings, "llm": a.llm, "dtype": dtype})
    stage = FinetuneStage(run, config, f"speed-{name}-{dtype}", load_backbone(a, dtype))
    progress = Progress()
    stage.step(progress)  # warm-up: allocator, tokenizer caches
    progress.step += 1
    with PeakMemory(stage.device) as peak:
        start = time.perf_counter()
        losses = []
        for _ in range(a.steps):
            line = stage.step(progress)
            progress.step += 1
            losses.append(line["loss_rec"])
        seconds = time.perf_counter() - start
    examples = a.steps * config.batch_size * config.grad_accum
    row = {"row": name, "kind": "train", "dtype": dtype, "settings": {k: settings.get(k) for k in TODAY},
           "seconds_per_example": seconds / examples, "peak_rss_mb": round(peak.mb), "steps": a.steps,
           "examples": examples, "mean_loss_rec": sum(losses) / len(losses)}
    return row, stage


def time_score(a, stage, variant: str, dtype: str, rows):
    """Seconds per scored sample of the stage's model, and its ranks: `today` as scoring ran
    before (the peft model unmerged, every prompt computed whole), `merged` as it runs now (the
    adapter merged, the template's text before the slot and the soft prompt shared), `int8` (merged,
    int8 linear layers, shared prefix)."""
    import copy

    from delrec.evaluation.metrics import candidate_ranks
    from delrec.llm.quantize import int8_copy

    bb, verbalizer = stage.bb, stage.scorer.verbalizer
    model = bb.model
    stage.peft_model.eval()
    if variant == "merged":
        bb.model = copy.deepcopy(model).merge_and_unload()
    elif variant == "int8":
        bb.model = int8_copy(model)
    verbalizer.share_prefix = variant != "today"
    try:
        candidate_ranks(stage.scorer, stage.data, rows[:2], local=True)  # warm-up
        with PeakMemory(stage.device) as peak:
            start = time.perf_counter()
            ranks = candidate_ranks(stage.scorer, stage.data, rows, local=True)
            seconds = time.perf_counter() - start
    finally:
        bb.model, verbalizer.share_prefix = model, True
    return {"row": f"score-{variant}", "kind": "score", "dtype": dtype, "weights": "int8" if variant == "int8" else "float",
            "seconds_per_sample": seconds / len(rows), "peak_rss_mb": round(peak.mb), "samples": len(rows)}, ranks


def time_folder_scoring(a, dtype: str, rows) -> tuple[list[dict], dict]:
    """`--score-adapter`: a trained stage-2 folder scored as `delrec evaluate --finetuned` scores it,
    with float and with int8 weights: seconds per sample and the rankings compared."""
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import candidate_ranks, pessimistic_ranks
    from delrec.serving.scorers import finetuned_scorer

    data = RunData.load(Path(a.run) / "data")
    out, ranks, top1 = [], {}, {}
    for weights in ("float", "int8"):
        scorer = finetuned_scorer(a.score_adapter, data, backbone=load_backbone(a, dtype), progress=False,
                                  run_dir=a.run, weights=weights)
        candidate_ranks(scorer, data, rows[:2], local=True)  # warm-up
        with PeakMemory(scorer.backbone.device) as peak:
            start = time.perf_counter()
            scores = scorer.score_candidates(data, rows)
            seconds = time.perf_counter() - start
        target_col = (data.candidates[rows] == data.target[rows][:, None]).argmax(axis=1)
        ranks[weights] = pessimistic_ranks(scores, target_col)
        top1[weights] = scores.argmax(axis=1)
        out.append({"row": f"adapter-{weights}", "kind": "score", "dtype": dtype, "weights": weights,
                    "seconds_per_sample": seconds / len(rows), "peak_rss_mb": round(peak.mb), "samples": len(rows),
                    "adapter": str(a.score_adapter)})
    out[1]["speedup_vs_float"], out[0]["speedup_vs_float"] = out[0]["seconds_per_sample"] / out[1]["seconds_per_sample"], 1.0
    comparison = compare_rankings(ranks["float"], ranks["int8"])
    comparison["same_top1"] = float((top1["float"] == top1["int8"]).mean())
    return out, comparison


def compare_rankings(ranks_float, ranks_int8) -> dict:
    import numpy as np

    from delrec.evaluation.metrics import metrics_from_ranks
    from delrec.evaluation.significance import compare

    return {"float": metrics_from_ranks(ranks_float), "int8": metrics_from_ranks(ranks_int8),
            "paired": compare(ranks_int8, ranks_float),
            "same_target_rank": float(np.mean(ranks_float == ranks_int8)),
            "same_hit@1": float(np.mean((ranks_float == 1) == (ranks_int8 == 1)))}


def run_dtype(a, run: Path, dtype: str, today: dict, preset: dict) -> dict:
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import subset_rows

    rows_out = []
    variants = {"today": today, **{k: {**today, **v} for k, v in LEVERS.items()}, "preset": preset}
    if a.tiny:  # the tiny model has 2 layers
        variants = {k: {**v, "adapter_layers": v.get("adapter_layers") and 1} for k, v in variants.items()}
    if a.only:
        variants = {k: v for k, v in variants.items() if k in a.only or k == "today"}
    stages = {}
    for name, settings in variants.items():
        row, stage = time_train(a, run, name, settings, dtype)
        print(f"  train {name:8s} {row['seconds_per_example']:.3f} s/example, peak {row['peak_rss_mb']} MB", flush=True)
        rows_out.append(row)
        if name == "today":
            stages[name] = stage
        else:
            del stage
    base = rows_out[0]["seconds_per_example"]
    for row in rows_out:
        row["speedup_vs_today"] = base / row["seconds_per_example"]

    data = RunData.load(run / "data")
    samples = subset_rows(data, "test", a.score_samples, seed=0)
    scored = {v: time_score(a, stages["today"], v, dtype, samples) for v in ("today", "merged", "int8")}
    for row, _ in scored.values():
        row["speedup_vs_today"] = scored["today"][0]["seconds_per_sample"] / row["seconds_per_sample"]
        print(f"  {row['row']:14s} {row['seconds_per_sample']:.3f} s/sample, peak {row['peak_rss_mb']} MB", flush=True)
    preset_row = next(r for r in rows_out if r["row"] == "preset") if "preset" in variants else rows_out[0]
    result = {"rows": [*rows_out, *(row for row, _ in scored.values())],
              "rankings_merged_vs_today": compare_rankings(scored["today"][1], scored["merged"][1]),
              "rankings_int8_vs_float": compare_rankings(scored["today"][1], scored["int8"][1]),
              "speedup_train_preset": preset_row["speedup_vs_today"],
              "speedup_score_merged": scored["merged"][0]["speedup_vs_today"],
              "speedup_score_int8": scored["int8"][0]["speedup_vs_today"]}
    if a.score_adapter:
        folder_rows, comparison = time_folder_scoring(a, dtype, samples)
        result["rows"] += folder_rows
        result["rankings_int8_vs_float_trained"] = comparison
        for row in folder_rows:
            print(f"  {row['row']:14s} {row['seconds_per_sample']:.3f} s/sample, peak {row['peak_rss_mb']} MB", flush=True)
    return result


def table(result: dict) -> str:
    lines = ["| dtype | row | seconds | per | peak RSS MB | speed-up |", "|---|---|---|---|---|---|"]
    for dtype, res in result["dtypes"].items():
        if "skipped" in res:
            lines.append(f"| {dtype} | skipped: {res['skipped']} | | | | |")
            continue
        for r in res["rows"]:
            per, sec = ("example", r["seconds_per_example"]) if r["kind"] == "train" else ("sample", r["seconds_per_sample"])
            speed = r.get("speedup_vs_today", r.get("speedup_vs_float", 1.0))
            lines.append(f"| {dtype} | {r['row']} | {sec:.3f} | {per} | {r['peak_rss_mb']} | {speed:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default="runs/ml100k-cpu", help="a prepared run (data and teacher), only read")
    p.add_argument("--config", default="configs/ml100k-cpu.yaml", help="the preset whose finetune section is `preset`")
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--teacher", help="the run's teacher (default: the config's first)")
    p.add_argument("--steps", type=int, default=6, help="timed optimizer steps per variant (after one warm-up)")
    p.add_argument("--score-samples", type=int, default=48, help="test samples scored per weights kind")
    p.add_argument("--score-adapter", type=Path, help="also score this trained stage-2 folder (RUN/finetune/NAME) "
                   "with float and int8 weights on the same samples")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", nargs="*", help="train rows to run besides today (LEVERS names, preset)")
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--tiny", action="store_true", help="a tiny random model: a smoke test, not a measurement")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)

    import torch

    from delrec.core.io import write_json
    from delrec.llm.backbone import cpu_supports_bf16

    torch.set_num_threads(a.threads)
    today, preset = finetune_settings(ROOT / a.config, a.tiny, a.teacher)
    run = make_run(Path(a.run))
    result = {"environment": environment(), "weights": "random tiny model" if a.tiny else f"real {a.llm} weights",
              "settings": {"run": a.run, "config": a.config, "steps": a.steps, "score_samples": a.score_samples,
                           "threads": a.threads, "method": "usp", "today": today, "preset": preset}, "dtypes": {}}
    for dtype in a.dtypes:
        if dtype == "bfloat16" and not cpu_supports_bf16():
            result["dtypes"][dtype] = {"skipped": "this CPU has no native bfloat16 (AVX-512 BF16 / AMX)"}
            continue
        print(f"{dtype}:", flush=True)
        result["dtypes"][dtype] = run_dtype(a, run, dtype, today, preset)
    measured = result["dtypes"]["float32"]
    result["speedup_train"] = measured["speedup_train_preset"]
    result["speedup_score"] = measured["speedup_score_merged"]  # what scoring does now, in float
    result["speedup_score_int8"] = measured["speedup_score_int8"]
    print(table(result))
    print(f"speedup_train (preset vs today, float32) {result['speedup_train']:.2f}x; speedup_score (merged + shared "
          f"prefix vs today, float32) {result['speedup_score']:.2f}x; int8 {result['speedup_score_int8']:.2f}x")
    out = Path(a.out or ("/tmp/speed_tiny.json" if a.tiny else ROOT / "benchmarks" / "results" / "speed-cpu.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json(out, result)  # atomic: a temporary file renamed
    print(f"-> {out}")


if __name__ == "__main__":
    main()
