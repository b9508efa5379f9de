"""Measured GPU memory of one training step, stage 1 and stage 2, with and without gradient
checkpointing, beside what benchmarks/memory_plan.py computes for the same setting.

    python benchmarks/gpu_memory.py                      # CUDA: Flan-T5-XL and 7B Llama shapes, bf16
    python benchmarks/gpu_memory.py --device cpu --tiny --out /tmp/gpu_memory_tiny.json   # smoke test

Backbones are the real shapes with random weights and the synthetic tokenizer of
gpu_throughput.py (no weights can travel to the GPU machine; memory and speed do not depend on the
weights' values). Workload (memory_plan's defaults, the paper's setting): per-process batch 8,
`--prompt-tokens` 320 text + `--soft-tokens` 100 soft tokens, 15 candidates of `--title-tokens` 12
tokens, objective `candidates` (all 15 titles scored, as distill.py and finetune.py train).
Steps as benchmarks/stages.py times them (the same step functions): stage 1 = a TA and an RPS
batch, each with its own backward w.r.t. the soft prompt, Lion; stage 2 = peft AdaLoRA on q/v
(init_r 12), one batch, orthogonal regulariser, Lion, update_and_allocate. Each row: one warm-up
step (optimizer states created), then `--steps` timed steps; peak = torch.cuda.max_memory_allocated
over the timed steps (weights, optimizer states, activations, temporaries; not the CUDA context
nor the allocator's cached-but-free blocks, which memory_plan also leaves out).

`--replan FILE`: no measurement; refresh FILE's computed column from the current memory_plan.py
(its plan was corrected after the first measurement, see there).

Writes $OUT/gpu-memory.json when $OUT is set, else benchmarks/results/gpu-memory.json (`--out`
overrides; with `--tiny` the default is /tmp/gpu_memory_tiny.json). Without CUDA, and unless
`--device cpu`, prints "no GPU available" and exits 0.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402
from gpu_throughput import LARGE, build_backbone, make_requests  # noqa: E402
from memory_plan import plan  # noqa: E402
from stages import CANDIDATES, PeakMemory, add_adalora, measure, stage1_step, stage2_step  # noqa: E402


def computed_gb(name: str, stage: str, ckpt: bool, args) -> float | None:
    """memory_plan's total for one GPU (None for the tiny shapes, which it does not plan)."""
    if args.tiny:
        return None
    rows = plan(Namespace(models=[name], batch_size=args.batch_size, prompt_tokens=args.prompt_tokens,
                          soft_tokens=args.soft_tokens, title_tokens=args.title_tokens, init_r=12, gpus=[1]))
    return next(r["total_gb"] for r in rows if r["stage"].startswith(stage) and r["gradient_checkpointing"] == ckpt)


def measure_model(name: str, args, device, dtype) -> list[dict]:
    import numpy as np
    import torch

    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.verbalizer import Verbalizer
    from delrec.training.optim import lion
    from delrec.training.weighting import LossWeighting

    bb, config, _ = build_backbone(name, args.tiny, device, dtype)
    bb.freeze()
    B, steps = args.batch_size, args.steps
    soft = SoftPrompt.for_backbone(bb, args.soft_tokens, seed=0)
    rng = np.random.default_rng(2)
    prompts = [replace(q, label=q.candidates[rng.integers(CANDIDATES)]) for q in make_requests(
        bb, 2 * (steps + 1) * B, args.prompt_tokens, args.soft_tokens, CANDIDATES, args.title_tokens, soft, seed=1)]
    batches = [prompts[i : i + B] for i in range(0, len(prompts), B)]
    memory, rows = PeakMemory(device), []

    def run(stage, ckpt, step, step_batches, per_step, first=0):
        r = measure(step, step_batches, first, per_step, memory)
        planned = computed_gb(name, stage, ckpt, args)
        rows.append({"model": name, "stage": stage, "gradient_checkpointing": ckpt,
                     "measured_gb": round(r["peak_mem_mb"] * 2**20 / 1e9, 2), "computed_gb": planned,
                     "seconds_per_step": round(r["seconds_per_step"], 3), "examples_per_s": round(r["examples_per_s"], 2)})
        print(f"{name:11s} {stage} ckpt={'yes' if ckpt else 'no ':3s} measured {rows[-1]['measured_gb']:7.2f} GB  "
              f"computed {planned if planned is not None else '-'} GB  {r['seconds_per_step']:.3f} s/step", flush=True)

    def loss_fn(ps):
        return verbalizer.loss(ps, soft, "candidates")

    # stage 1: frozen backbone, only the soft prompt learns
    verbalizer = Verbalizer(bb)
    for ckpt in (False, True):
        if ckpt:
            bb.enable_gradient_checkpointing()
        weighting = LossWeighting("inverse-grad-norm", ("ta", "rps")).to(device)
        step = stage1_step(loss_fn, soft, weighting, lion([soft.embedding], 5e-3, 1e-5))
        run("stage 1", ckpt, step, [batches[i : i + 2] for i in range(0, len(batches), 2)], 2 * B)
    bb.model.gradient_checkpointing_disable()

    # stage 2: AdaLoRA on the query and value projections, soft prompt frozen
    soft.embedding.requires_grad_(False)
    peft_model, trainable = add_adalora(bb, config)
    first = 0
    for ckpt in (False, True):
        if ckpt:
            bb.enable_gradient_checkpointing()
        verbalizer = Verbalizer(bb)
        step = stage2_step(loss_fn, peft_model, trainable, lion(trainable, 1e-4, 1e-6), add_orth=True)
        run("stage 2", ckpt, step, [[b] for b in batches[: steps + 1]], B, first)
        first += steps + 1  # AdaLoRA's step counter keeps rising across rows
    del bb, peft_model, soft, verbalizer, trainable
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def replan(path: Path) -> None:
    from delrec.core.io import read_json, write_json

    result = read_json(path)
    args = Namespace(**result["settings"])
    for r in result["rows"]:
        r["computed_gb"] = computed_gb(r["model"], r["stage"], r["gradient_checkpointing"], args)
    write_json(path, result)
    print_table(result["rows"])
    print(f"-> {path} (computed column refreshed)")


def print_table(rows: list[dict]) -> None:
    print("| model | stage | checkpointing | measured GB | computed GB | s/step |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['measured_gb']:.2f} | "
              f"{r['computed_gb'] if r['computed_gb'] is not None else '-'} | {r['seconds_per_step']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=list(LARGE), choices=LARGE)
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--steps", type=int, default=2, help="timed steps per row, after one warm-up step")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per batch (per process)")
    p.add_argument("--prompt-tokens", type=int, default=320)
    p.add_argument("--soft-tokens", type=int, default=100)
    p.add_argument("--title-tokens", type=int, default=12)
    p.add_argument("--tiny", action="store_true", help="tiny shapes and batch 2, 48 + 8 tokens, titles of 5")
    p.add_argument("--replan", metavar="FILE", help="refresh the computed column of a results file, measure nothing")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.replan:
        return replan(Path(args.replan))

    import torch

    from delrec.core.io import write_json
    from delrec.llm.backbone import pick_dtype

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU available")
        return
    if args.tiny:
        args.batch_size, args.prompt_tokens, args.soft_tokens, args.title_tokens = 2, 48, 8, 5
    if args.out is None:
        args.out = ("/tmp/gpu_memory_tiny.json" if args.tiny else str(Path(os.environ["OUT"]) / "gpu-memory.json")
                    if os.environ.get("OUT") else str(ROOT / "benchmarks" / "results" / "gpu-memory.json"))
    dtype = pick_dtype(device, args.dtype)
    rows = [r for name in args.models for r in measure_model(name, args, device, dtype)]
    result = {"benchmark": "GPU memory of one training step, measured vs computed", "environment": environment(),
              "settings": {k: v for k, v in vars(args).items() if k != "out"} | {
                  "dtype": str(dtype).removeprefix("torch."), "candidates": CANDIDATES, "objective": "candidates",
                  "weights": "random (seed 0), real shapes; synthetic word-level tokenizer",
                  "peak_memory": PeakMemory(device).method, "computed": "benchmarks/memory_plan.py, 1 GPU"},
              "rows": rows}
    write_json(args.out, result)
    print()
    print_table(rows)
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
