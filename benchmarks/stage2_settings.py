"""Which stage-2 settings learn on ML-100K within a CPU budget: one probe per call.

    python benchmarks/stage2_settings.py --name J --init peft --lr 1e-2                    # the issue's probe
    python benchmarks/stage2_settings.py --name K --init orthogonal --lr 5e-3 --relative   # this project's default
    python benchmarks/stage2_settings.py --summary                                         # the table of every probe

Needs a prepared run folder (`--run`, default runs/ml100k: `delrec data prepare ml-100k --out
runs/ml100k`) and the offline SmolLM2-135M. Each probe fine-tunes AdaLoRA (q/v, init_r 12,
orthogonal regulariser 0.5) on the `w/o SP` prompt (no stage 1 needed) with a given adapter
start, optimiser and rates, on `--steps` batches of `--batch` train samples drawn without
repetition. Every example is new when it is trained on, so the recommendation loss of each batch
*before* its update is a held-out estimate: the online loss curve says whether the model is
learning to rank, at no extra cost. At the end the adapted model is scored on `--valid` fixed
valid samples (HR@1, NDCG@5; the zero-shot model is the same probe with `--steps 0`).

Writes benchmarks/results/stage2-settings/<name>.json (settings, environment, one entry per step,
the valid metrics), and `--summary` prints every probe as a Markdown table: the online loss over
each quarter of the steps and the valid metrics. One thread by default (`--threads`), so two
probes can run side by side on 2 cores; seconds are then not comparable with other benchmarks.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "stage2-settings"


def probe(a) -> dict:
    import numpy as np
    import torch
    from peft import AdaLoraConfig, get_peft_model

    from _env import environment
    from delrec.data.store import RunData
    from delrec.evaluation.metrics import evaluate
    from delrec.llm.backbone import Backbone
    from delrec.llm.scorer import LLMScorer
    from delrec.training.finetune import orthogonal_regulariser
    from delrec.training.optim import adapter_groups, init_adapters, make_optimizer

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    data = RunData.load(Path(a.run) / "data")
    bb = Backbone.load(a.llm).freeze()
    model = get_peft_model(bb.model, AdaLoraConfig(
        init_r=12, target_r=8, total_step=max(a.steps, 1), tinit=0, tfinal=0, deltaT=1, orth_reg_weight=a.orth,
        target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    init_adapters(model, a.init, seed=0)
    bb.model = model
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(a.optimizer, adapter_groups(model, a.lr, a.vector_lr_scale, a.relative), a.lr, 1e-6)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / max(1, a.warmup)))
    scorer = LLMScorer.for_run(data, bb, progress=False)
    rng = np.random.default_rng(0)  # the same train order and valid rows as finetune.py with seed 0
    train = rng.permutation(data.indices("train"))
    valid = np.sort(rng.permutation(data.indices("valid"))[: a.valid])

    steps, t0 = [], time.perf_counter()
    for step in range(a.steps):
        model.train()
        rows = train[step * a.batch : (step + 1) * a.batch]
        prompts = [scorer.prompt(data.history[r], data.candidates[r], label=data.target[r]) for r in rows]
        rec = scorer.verbalizer.loss(prompts, None, "candidates")  # before this batch's update: held out
        (rec + a.orth * orthogonal_regulariser(model)).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        model.base_model.update_and_allocate(step)
        optimizer.zero_grad(set_to_none=True)
        E = torch.cat([p.detach().flatten() for n, p in model.named_parameters() if "lora_E" in n])
        steps.append({"step": step + 1, "loss_rec": rec.item(), "mean_abs_E": E.abs().mean().item(),
                      "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(steps[-1]), flush=True)
    model.eval()
    metrics = evaluate(scorer, data, "valid", rows=valid)["candidates"]
    settings = {k: v for k, v in vars(a).items() if k not in ("summary",)}
    return {"settings": settings, "environment": environment(), "steps": steps,
            "valid": {"samples": len(valid), **metrics}, "seconds": round(time.perf_counter() - t0, 1)}


def summary() -> str:
    rows = ["| probe | start | optimiser | lr (E) | lr (P, Q) | relative | steps x batch | online loss by quarter | "
            "valid HR@1 | valid NDCG@5 |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in sorted(OUT.glob("*.json")):
        r = json.loads(path.read_text())
        s, losses = r["settings"], [e["loss_rec"] for e in r["steps"]]
        q = max(1, len(losses) // 4)
        quarters = " / ".join(f"{sum(losses[i:i + q]) / len(losses[i:i + q]):.2f}" for i in range(0, len(losses), q)) or "-"
        v = r.get("valid") or {}
        rows.append(f"| {s['name']} | {s['init']} | {s['optimizer']} | {s['lr']:g} | {s['lr'] * s['vector_lr_scale']:g} | "
                    f"{'yes' if s['relative'] else 'no'} | {len(losses)} x {s['batch']} | {quarters} | "
                    f"{v.get('HR@1', float('nan')):.3f} | {v.get('NDCG@5', float('nan')):.3f} |")
    return "\n".join(rows)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", help="the probe's name (its results file)")
    p.add_argument("--run", default="runs/ml100k")
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--init", choices=("orthogonal", "peft"), default="orthogonal")
    p.add_argument("--optimizer", choices=("lion", "adamw"), default="lion")
    p.add_argument("--lr", type=float, default=5e-3, help="the rate of E (relative with --relative)")
    p.add_argument("--vector-lr-scale", type=float, default=1.0, help="the rate of P and Q relative to --lr")
    p.add_argument("--relative", action="store_true", help="E's rate times the adapted weight's RMS singular value")
    p.add_argument("--orth", type=float, default=0.5, help="orthogonal regulariser weight")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--valid", type=int, default=48)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--summary", action="store_true", help="print the table of every probe and exit")
    a = p.parse_args()
    if a.summary:
        print(summary())
        return
    if not a.name:
        p.error("--name is required for a probe")
    from delrec.core.io import write_json

    result = probe(a)
    write_json(OUT / f"{a.name}.json", result)
    print(summary())


if __name__ == "__main__":
    main()
