"""Training throughput of stage 1 (soft prompt, frozen LLM) and stage 2 (AdaLoRA), ours vs plain HF.

    python benchmarks/stages.py                                   # CPU, SmolLM2-135M shape, ML-100K CPU preset sizes
    python benchmarks/stages.py --device cuda --model flan-t5-xl  # GPU, the issue's reference setting
    OMP_NUM_THREADS=1 python benchmarks/stages.py --tiny --threads 1   # smoke test (either --model)

The backbone is built by gpu_throughput.build_backbone: the real shape (SmolLM2-135M from the
converted model's config.json when present, Flan-T5-XL hard-coded) with random weights (a step's
speed does not depend on the weights' values) and a synthetic word-level tokenizer, so every
prompt has exactly the wanted number of tokens. Workload per example (gpu_throughput.make_requests
plus a label, one of its candidates drawn at random): `--prompt-tokens` text tokens around
`--soft-tokens` soft-prompt vectors, 15 candidate titles of `--title-tokens` tokens (EOS included).
Defaults: CPU up to 380 + 32 tokens, each prompt shorter by up to 35% (`--spread`; real ML-100K
stage-2 prompts run from about 260 to 410 tokens), titles of 10, batch 4 (the ML-100K CPU
preset); CUDA 320 + 80, titles of 12, batch 8, no spread (the issue's); `--tiny` 48 + 8, titles
of 5, batch 2, on tiny shapes.

Rows, each one warm-up step then `--steps` timed optimizer steps (5 CPU, 20 CUDA, 3 tiny):
* stage 1, as distill.py: per step a TA and an RPS batch (2 x batch examples), for each
  `Verbalizer.loss` and torch.autograd.grad w.r.t. the soft prompt only, inverse-grad-norm
  combination, clipping, Lion. Objective `candidates` (the default: all 15 titles scored) and `label`;
  `padded`: the `candidates` row through the padded-batch path (`Verbalizer(passes="batch")`, all
  prompts of a batch in one forward pass), which was the CPU path before one pass per prompt;
* stage 1, plain HF: the same step, the loss being `model(inputs_embeds, labels=...)` on each
  prompt (soft prompt spliced in) followed by its label title (T5: encoder input + decoder labels;
  decoder-only: logits kept for the label's positions only, `logits_to_keep`);
* stage 2, as finetune.py: peft AdaLoRA (init_r 12, target_r 8, q/v projections, orth_reg_weight
  0.5) with the soft prompt frozen, per step one batch, loss `Verbalizer.loss` + the orthogonal
  regulariser, backward, clipping, Lion, `update_and_allocate(step)`; objectives `candidates` and
  `label`, and the plain HF loss (where peft adds the regulariser itself); then `ours+ckpt`, the
  `candidates` row again with gradient checkpointing (Backbone.enable_gradient_checkpointing).
Reported: examples/s, seconds per step, peak memory (CUDA: torch.cuda.max_memory_allocated, reset
before each measurement; CPU: the process's VmRSS sampled every 5 ms during it, or getrusage's
lifetime peak where /proc is missing), and examples/s relative to the plain HF row of the same
stage. `label_loss_check`: ours (label) and the plain HF loss on the same batch, relative difference
(float32: ~0; bf16: rounding only).

Writes $OUT/stages-<device>.json when $OUT is set, else benchmarks/results/stages-<device>.json
(`--out` overrides; with `--tiny` the default is /tmp/stages_tiny.json, never the results folder).
`--device cuda` without CUDA prints "no GPU available" and exits 0.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import threading
import time
import warnings
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402
from gpu_throughput import MODELS, FlopCount, build_backbone, make_requests  # noqa: E402

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*")  # peft on transformers 5
CANDIDATES = 15
ORTH_REG_WEIGHT = 0.5


class PeakMemory:
    """Peak memory in MB during a `with` block (see the module docstring for the method)."""

    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.type == "cuda"
        self.proc = not self.cuda and os.path.exists("/proc/self/status")
        self.method = ("torch.cuda.max_memory_allocated" if self.cuda else
                       "VmRSS sampled every 5 ms" if self.proc else "getrusage ru_maxrss (process lifetime peak)")

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024.0

    def _sample(self):
        while not self._stop.wait(0.005):
            self.mb = max(self.mb, self._rss_mb())

    def __enter__(self):
        self.mb = 0.0
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
        elif self.proc:
            self.mb, self._stop = self._rss_mb(), threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.mb = self.torch.cuda.max_memory_allocated() / 2**20
        elif self.proc:
            self._stop.set()
            self._thread.join()
            self.mb = max(self.mb, self._rss_mb())
        else:
            self.mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def plain_hf_loss(bb, soft):
    """Mean token NLL of each prompt's label title through the model's own `labels` loss."""
    import torch

    tok, dev, t5 = bb.tokenizer, bb.device, bb.is_encoder_decoder

    def ids(text):
        return tok(text, add_special_tokens=False)["input_ids"]

    def loss(prompts):
        embed = bb.model.get_input_embeddings()  # bb.model may be the peft model
        rows, labels = [], []
        for p in prompts:
            y = ids(p.label if t5 else " " + p.label) + [bb.eos_token_id]
            after = ids(p.after.rstrip()) + ([bb.eos_token_id] if t5 else y)  # T5: </s>; else the answer follows
            rows.append(torch.cat([embed(torch.tensor(ids(p.before), device=dev)), soft().to(bb.dtype),
                                   embed(torch.tensor(after, device=dev))]))
            labels.append(y)
        # synthetic titles: equal label lengths. Prompts of unequal length are padded, T5's on the
        # right, decoder-only ones on the left so that every row ends with its label
        T = max(r.shape[0] for r in rows)
        x = rows[0].new_zeros(len(rows), T, rows[0].shape[1])
        mask = torch.zeros(len(rows), T, dtype=torch.long, device=dev)
        for i, r in enumerate(rows):
            sl = slice(0, r.shape[0]) if t5 else slice(T - r.shape[0], T)
            x[i, sl], mask[i, sl] = r, 1
        y = torch.tensor(labels, device=dev)
        if t5:
            return bb.model(inputs_embeds=x, attention_mask=mask, labels=y, use_cache=False).loss
        # logits for the label's positions only: position T-1 predicts y[0] (HF shifts the labels)
        keep = torch.cat([torch.full((len(y), 1), -100, device=dev), y], dim=1)
        return bb.model(inputs_embeds=x, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0),
                        labels=keep, logits_to_keep=keep.shape[1], use_cache=False).loss

    return loss


def same_loss(bb, soft, batch) -> dict:
    """The candidates loss on one batch through today's path (one pass per prompt on CPU) and the
    padded-batch path it replaced: equal up to rounding."""
    import torch

    from delrec.llm.verbalizer import Verbalizer

    with torch.no_grad():
        return loss_check(Verbalizer(bb).loss(batch, soft), Verbalizer(bb, passes="batch").loss(batch, soft))


def loss_check(ours, plain) -> dict:
    ours, plain = ours.item(), plain.item()
    return {"ours": ours, "plain_hf": plain, "rel_diff": abs(ours - plain) / max(abs(plain), 1e-12)}


def stage1_step(loss_fn, soft, weighting, optimizer):
    """One distill.py step: per task its loss and gradient w.r.t. the soft prompt, then combined."""
    import torch

    def step(batches, _):
        grads, losses = {}, {}
        for task, prompts in zip(("ta", "rps"), batches):
            loss = loss_fn(prompts)
            grads[task] = list(torch.autograd.grad(loss, [soft.embedding]))
            losses[task] = loss.item()
        weighting.combine([soft.embedding], grads, losses)
        torch.nn.utils.clip_grad_norm_([soft.embedding], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return sum(losses.values()) / len(losses)

    return step


def stage2_step(loss_fn, peft_model, trainable, optimizer, add_orth: bool):
    """One finetune.py step; `step` is a global counter for AdaLoRA's budget schedule."""
    import torch

    from delrec.training.finetune import orthogonal_regulariser

    def step(batches, i):
        loss = loss_fn(batches[0])
        if add_orth:
            loss = loss + ORTH_REG_WEIGHT * orthogonal_regulariser(peft_model)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        peft_model.base_model.update_and_allocate(i)
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def add_adalora(bb, config):
    """bb's model wrapped with AdaLoRA as finetune.py sets it up (init_r 12, target_r 8, q/v
    projections), in training mode: (peft model, its trainable tensors)."""
    from peft import AdaLoraConfig, get_peft_model

    from delrec.training.finetune import TARGET_MODULES

    targets = TARGET_MODULES.get(getattr(config, "model_type", ""), TARGET_MODULES["default"])
    peft_model = get_peft_model(bb.model, AdaLoraConfig(
        init_r=12, target_r=8, tinit=0, tfinal=0, deltaT=1, orth_reg_weight=ORTH_REG_WEIGHT, total_step=100_000,
        target_modules=targets, task_type="SEQ_2_SEQ_LM" if bb.is_encoder_decoder else "CAUSAL_LM"))
    bb.model = peft_model
    peft_model.train()
    return peft_model, [q for q in peft_model.parameters() if q.requires_grad]


def measure(step, batches, first: int, examples_per_step: int, memory: PeakMemory) -> dict:
    """One warm-up step on batches[0] (its floating-point operations counted by FlopCount, with
    torch's formulas for matmuls and attention, forward and backward), then the rest timed; step
    indices start at `first`."""
    counter = FlopCount()
    with counter:
        step(batches[0], first)
    flop_per_example = counter.total / examples_per_step
    with memory:
        t0 = time.perf_counter()
        losses = [step(b, first + i) for i, b in enumerate(batches[1:], 1)]
        if memory.cuda:
            memory.torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
    n = len(batches) - 1
    return {"examples_per_s": examples_per_step * n / seconds, "seconds_per_step": seconds / n,
            "peak_mem_mb": memory.mb, "loss_first": losses[0], "loss_last": losses[-1],
            "gflop_per_example": flop_per_example / 1e9,
            "gflops_achieved": flop_per_example * examples_per_step * n / seconds / 1e9}


def matmul_peak(device, dtype, repeats: int = 30) -> dict:
    """The matrix-multiply throughput this machine gives now, at the benchmark's thread count, on
    the shapes of a SmolLM2 MLP over one prompt's tokens (the bulk of a step's work): the ceiling
    a training step's own GFLOP/s can be compared with (measured in the same run: shared, noisy
    machines)."""
    import torch

    out = {}
    for m, k, n in ((512, 576, 1536), (512, 1536, 576), (1024, 1024, 1024)):
        a, b = torch.randn(m, k, device=device, dtype=dtype), torch.randn(k, n, device=device, dtype=dtype)
        for _ in range(3):
            a @ b
        times = []
        for _ in range(repeats):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            a @ b
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        out[f"{m}x{k}x{n}"] = 2 * m * k * n / sorted(times)[len(times) // 2] / 1e9  # median
    return {"shapes_gflops": out, "gflops": max(out.values())}


def markdown(result: dict) -> str:
    s = result["settings"]
    peak = s["matmul_peak"]["gflops"]
    out = [f"| stage | loop | objective | examples/s | s/step | peak MB ({s['peak_memory']}) | vs plain HF | vs padded "
           f"| GFLOP/example | GFLOP/s | of matmul peak ({peak:.0f} GFLOP/s) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        out.append(f"| {r['stage']} | {r['loop']} | {r['objective']} | {r['examples_per_s']:.2f} | "
                   f"{r['seconds_per_step']:.3f} | {r['peak_mem_mb']:.0f} | {r['vs_plain_hf']:.2f}x | {r['vs_padded']:.2f}x "
                   f"| {r['gflop_per_example']:.3g} | {r['gflops_achieved']:.0f} | {r['gflops_achieved'] / peak:.0%} |")
    out += ["", f"{s['model']} ({s['weights']}), {s['dtype']}, {s['device']}, {s['threads']} threads; per example "
            f"{s['prompt_tokens']} prompt (up to {s['spread']:.0%} fewer) + {s['soft_tokens']} soft tokens, {s['candidates']} candidates of "
            f"{s['title_tokens']} tokens; batch {s['batch_size']}, {s['steps']} timed steps after 1 warm-up; "
            "label loss, |ours - plain HF| / plain HF: " + ", ".join(
                f"{k} {v['rel_diff']:.1e} (of {v['plain_hf']:.3g})" for k, v in s["label_loss_check"].items()) + "."]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", choices=MODELS, default=None, help="default smollm2-135m on CPU, flan-t5-xl on CUDA")
    p.add_argument("--dtype", default="auto", help="default: pick_dtype(device, 'auto')")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 2 on CPU)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps (5 CPU, 20 CUDA, 3 tiny)")
    p.add_argument("--batch-size", type=int, default=None, help="examples per batch (4 CPU, 8 CUDA, 2 tiny)")
    p.add_argument("--prompt-tokens", type=int, default=None, help="230 CPU, 320 CUDA, 48 tiny")
    p.add_argument("--soft-tokens", type=int, default=None, help="32 CPU, 80 CUDA, 8 tiny")
    p.add_argument("--title-tokens", type=int, default=None, help="10 CPU, 12 CUDA, 5 tiny (EOS included)")
    p.add_argument("--spread", type=float, default=None,
                   help="prompts shorter by up to this fraction of --prompt-tokens, drawn uniformly (0.35 CPU, 0 CUDA)")
    p.add_argument("--tiny", action="store_true", help="shrunk shapes and workload, for a smoke test")
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import numpy as np
    import torch

    from delrec.core.io import write_json
    from delrec.llm.backbone import pick_dtype
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.verbalizer import Verbalizer
    from delrec.training.finetune import orthogonal_regulariser
    from delrec.training.optim import lion
    from delrec.training.weighting import LossWeighting

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        print("no GPU available")
        return
    preset = (3, 2, 48, 8, 5) if args.tiny else (20, 8, 320, 80, 12) if cuda else (5, 4, 380, 32, 10)
    spread = args.spread if args.spread is not None else 0.0 if cuda else 0.35
    steps, B, P, S, title = (a if a is not None else d for a, d in zip(
        (args.steps, args.batch_size, args.prompt_tokens, args.soft_tokens, args.title_tokens), preset))
    model = args.model or ("flan-t5-xl" if cuda else "smollm2-135m")
    threads = args.threads if args.threads is not None else (None if cuda else 2)
    if threads:
        torch.set_num_threads(threads)
    if args.out is None:
        name = f"stages-{device.type}.json"
        args.out = ("/tmp/stages_tiny.json" if args.tiny else str(Path(os.environ["OUT"]) / name) if os.environ.get("OUT")
                    else str(ROOT / "benchmarks" / "results" / name))
    dtype = pick_dtype(device, args.dtype)

    bb, config, source = build_backbone(model, args.tiny, device, dtype)
    bb.freeze()
    weights_mb = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values()) / 2**20
    parameters = sum(q.numel() for q in bb.model.parameters())
    soft = SoftPrompt.for_backbone(bb, S, seed=0)
    rng = np.random.default_rng(2)
    prompts = [replace(q, label=q.candidates[rng.integers(CANDIDATES)])
               for q in make_requests(bb, 2 * (steps + 1) * B, P, S, CANDIDATES, title, soft, seed=1, spread=spread)]
    batches = [prompts[i : i + B] for i in range(0, len(prompts), B)]
    stage1_batches = [batches[i : i + 2] for i in range(0, len(batches), 2)]  # (TA, RPS) per step
    stage2_batches = [[b] for b in batches[: steps + 1]]
    memory, rows, check = PeakMemory(device), [], {}
    peak = matmul_peak(device, dtype)
    print(f"matrix multiply: {peak['gflops']:.0f} GFLOP/s ({', '.join(f'{k} {v:.0f}' for k, v in peak['shapes_gflops'].items())})")

    def run(stage, loop, objective, step, batches, per_step, first=0):
        rows.append({"stage": stage, "loop": loop, "objective": objective,
                     **measure(step, batches, first, per_step, memory)})
        r = rows[-1]
        print(f"{stage} {loop:8s} {objective:10s} {r['examples_per_s']:8.2f} ex/s  {r['seconds_per_step']:.3f} s/step  "
              f"{r['peak_mem_mb']:.0f} MB  {r['gflops_achieved']:.0f} GFLOP/s", flush=True)

    # stage 1: only the soft prompt learns
    with torch.no_grad():
        check["stage 1"] = loss_check(Verbalizer(bb).loss(batches[0], soft, "label"), plain_hf_loss(bb, soft)(batches[0]))
    check["stage 1, one pass per prompt vs padded batch"] = same_loss(bb, soft, batches[0])
    for loop, objective in (("ours", "candidates"), ("padded", "candidates"), ("ours", "label"), ("plain HF", "label")):
        verbalizer = Verbalizer(bb, passes="batch" if loop == "padded" else "auto")  # fresh token caches for each row
        loss_fn = plain_hf_loss(bb, soft) if loop == "plain HF" else (lambda ps, v=verbalizer, o=objective: v.loss(ps, soft, o))
        weighting = LossWeighting("inverse-grad-norm", ("ta", "rps")).to(device)  # its buffers beside the grads
        step = stage1_step(loss_fn, soft, weighting, lion([soft.embedding], 5e-3, 1e-5))
        run("stage 1", loop, objective, step, stage1_batches, 2 * B)

    # stage 2: AdaLoRA on the query and value projections, soft prompt frozen
    soft.embedding.requires_grad_(False)
    peft_model, trainable = add_adalora(bb, config)
    with torch.no_grad():
        ours_loss = Verbalizer(bb).loss(batches[0], soft, "label") + ORTH_REG_WEIGHT * orthogonal_regulariser(peft_model)
        check["stage 2"] = loss_check(ours_loss, plain_hf_loss(bb, soft)(batches[0]))
    check["stage 2, one pass per prompt vs padded batch"] = same_loss(bb, soft, batches[0])
    first = 0
    for loop, objective in (("ours", "candidates"), ("padded", "candidates"), ("ours", "label"), ("plain HF", "label")):
        verbalizer = Verbalizer(bb, passes="batch" if loop == "padded" else "auto")
        loss_fn = plain_hf_loss(bb, soft) if loop == "plain HF" else (lambda ps, v=verbalizer, o=objective: v.loss(ps, soft, o))
        step = stage2_step(loss_fn, peft_model, trainable, lion(trainable, 1e-4, 1e-6), add_orth=loop == "ours")
        run("stage 2", loop, objective, step, stage2_batches, B, first)
        first += len(stage2_batches)  # AdaLoRA's step counter keeps rising across rows
    # the same stage-2 step with gradient checkpointing (layers recomputed in backward)
    bb.enable_gradient_checkpointing()
    verbalizer = Verbalizer(bb)
    step = stage2_step(lambda ps, v=verbalizer: v.loss(ps, soft, "candidates"), peft_model, trainable,
                       lion(trainable, 1e-4, 1e-6), add_orth=True)
    run("stage 2", "ours+ckpt", "candidates", step, stage2_batches, B, first)

    for r in rows:
        plain = next(x for x in rows if x["stage"] == r["stage"] and x["loop"] == "plain HF")
        padded = next(x for x in rows if x["stage"] == r["stage"] and x["loop"] == "padded")
        r["vs_plain_hf"] = r["examples_per_s"] / plain["examples_per_s"]
        r["vs_padded"] = r["examples_per_s"] / padded["examples_per_s"]
    result = {
        "environment": environment(),
        "settings": {
            "device": device.type, "model": model, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
            "threads": torch.get_num_threads(), "steps": steps, "batch_size": B, "prompt_tokens": P, "soft_tokens": S,
            "candidates": CANDIDATES, "title_tokens": title, "spread": spread,
            "examples_per_step": {"stage 1": 2 * B, "stage 2": B},
            "weights": "random weights (seed 0), real shape; synthetic word-level tokenizer",
            "config_source": source, "config": config.to_diff_dict(), "weights_mb": weights_mb,
            "parameters": parameters,
            "adapter_parameters": sum(q.numel() for q in trainable),
            "peak_memory": memory.method, "label_loss_check": check,
            "matmul_peak": {"start": peak, "end": (end := matmul_peak(device, dtype)), "gflops": max(peak["gflops"], end["gflops"])},
            "warmup": "one optimizer step on its own batch(es) before each row's timed steps",
        },
        "rows": rows,
    }
    write_json(args.out, result)
    print()
    print(markdown(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
