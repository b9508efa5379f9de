"""How far one optimiser step moves the adapted weight: LoRA against AdaLoRA at the same rate.

    python benchmarks/adapter_step_size.py            # about 20 s on one thread

The settings study (docs/training.md) found AdaLoRA with AdamW at 1e-3 flat at chance after 800
stage-2 examples, where LoRA at the same rate learned. This measures why, without the LLM: peft's
LoRA and AdaLoRA adapters on linear layers of SmolLM2-135M's q_proj and v_proj shapes (576 -> 576
and 576 -> 192), each fitted by AdamW to the same random rank-4 change D of the weight (inputs
N(0, 1), mean squared error of the layer's output), exactly as stage 2 builds them: LoRA r 8,
alpha 16, B zero; AdaLoRA init_r 12 (peft's lora_alpha 8, scaled by 1 / ranknum), E zero and P, Q
orthonormal (training/optim.py `orthogonal`), its orthogonality regulariser at 0.5, the groups of
training/optim.py:adapter_groups as the probe set them (no relative rate, P and Q at the same rate).
No pruning: the probe's schedule does not prune in its first 10 % of the steps either.

Adam moves every trainable entry by about its rate per step whatever the gradient's size, so the
update's norm grows with the number of entries that move. LoRA's B has out x r of them; AdaLoRA's
E has r, and its P and Q get no gradient while E is zero. Printed: the adapted weight's change
||dW||_F and the fraction of D fitted (1 - ||dW - D||_F / ||D||_F) after 10, 50 and 200 steps.
Writes benchmarks/results/adapter-step-size.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
OUT = ROOT / "benchmarks" / "results" / "adapter-step-size.json"
SHAPES = {"q_proj": (576, 576), "v_proj": (192, 576)}  # SmolLM2-135M: (out, in)
CHECKPOINTS = (10, 50, 200)


class TwoProjections(nn.Module):
    def __init__(self, generator: torch.Generator):
        super().__init__()
        for name, (out, inp) in SHAPES.items():
            layer = nn.Linear(inp, out, bias=False)
            layer.weight.data = torch.randn(out, inp, generator=generator) / inp**0.5
            setattr(self, name, layer)


def delta_weight(module: nn.Module) -> torch.Tensor:
    """The adapter's current change of its layer's weight, computed from its factors."""
    name = next(iter(module.lora_A))
    A, B = module.lora_A[name], module.lora_B[name]
    if hasattr(module, "lora_E"):  # AdaLoRA: P diag(E) Q * scaling / ranknum
        E = module.lora_E[name]
        return (B @ (A * E)) * module.scaling[name] / (module.ranknum[name] + 1e-5)
    return (B.weight @ A.weight) * module.scaling[name]


def fit(adapter: str, lr: float, e_lr_scale: float, steps: int, seed: int, orth_reg: float = 0.5, init: str = "orthogonal") -> dict:
    from peft import AdaLoraConfig, LoraConfig, get_peft_model

    from delrec.training.finetune import orthogonal_regulariser
    from delrec.training.optim import adapter_groups, init_adapters, make_optimizer

    g = torch.Generator().manual_seed(seed)
    base = TwoProjections(g)
    targets = {name: torch.randn(SHAPES[name][0], 4, generator=g) @ torch.randn(4, SHAPES[name][1], generator=g)
               for name in SHAPES}
    with torch.no_grad():
        for name, d in targets.items():  # the change to fit: 20 % of the weight's Frobenius norm
            d *= 0.2 * getattr(base, name).weight.norm() / d.norm()
    if adapter == "lora":
        config = LoraConfig(r=8, lora_alpha=16, target_modules=list(SHAPES))
    else:
        config = AdaLoraConfig(init_r=12, target_r=8, tinit=steps, tfinal=0, total_step=steps * 3,
                               orth_reg_weight=orth_reg, target_modules=list(SHAPES))
    model = get_peft_model(base, config)
    if adapter == "adalora":
        init_adapters(model, init, seed=seed)
        groups = adapter_groups(model, lr, vector_lr_scale=1.0)
        for group in groups[0::2]:  # E's groups come first in each pair
            group["lr"] = lr * e_lr_scale
    else:
        groups = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer("adamw", groups, lr, weight_decay=1e-6 if adapter == "adalora" else 0.0)
    layers = {name: module for name, module in model.named_modules() if name.split(".")[-1] in SHAPES and hasattr(module, "lora_A")}
    layers = {name.split(".")[-1]: m for name, m in layers.items()}
    points = []
    for step in range(1, steps + 1):
        x = torch.randn(64, 576, generator=g)
        loss = sum(nn.functional.mse_loss(layers[n](x) - x @ layers[n].base_layer.weight.T, x @ targets[n].T) for n in SHAPES)
        if adapter == "adalora":
            loss = loss + orth_reg * orthogonal_regulariser(model)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step in CHECKPOINTS:
            with torch.no_grad():
                row = {"step": step}
                for n in SHAPES:
                    dw, d = delta_weight(layers[n]), targets[n]
                    row[f"{n}_dW"] = round(dw.norm().item(), 4)
                    row[f"{n}_fitted"] = round(1 - ((dw - d).norm() / d.norm()).item(), 4)
                points.append(row)
    return {"adapter": adapter, "init": init if adapter == "adalora" else None,
            "orth_reg": orth_reg if adapter == "adalora" else None, "lr": lr, "E_lr": lr * e_lr_scale if adapter == "adalora" else None,
            "target_norm": {n: round(targets[n].norm().item(), 4) for n in SHAPES}, "points": points}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--steps", type=int, default=max(CHECKPOINTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=OUT)
    a = p.parse_args()
    torch.set_num_threads(1)
    from _env import environment
    from delrec.core.io import write_json

    runs = [fit("lora", a.lr, 1.0, a.steps, a.seed)]
    for init, orth_reg, e_lr_scale in (("orthogonal", 0.5, 1.0), ("orthogonal", 0.5, 30.0), ("peft", 0.5, 1.0),
                                       ("orthogonal", 0.1, 1.0), ("orthogonal", 0.01, 1.0), ("orthogonal", 0.0, 1.0),
                                       ("peft", 0.0, 1.0), ("orthogonal", 0.0, 30.0)):
        runs.append(fit("adalora", a.lr, e_lr_scale, a.steps, a.seed, orth_reg=orth_reg, init=init))
    print("| adapter | start | orthogonality weight | AdamW rate (E's) | step | q_proj ||dW|| | q_proj fitted | v_proj ||dW|| | v_proj fitted |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in runs:
        rate = f"{r['lr']:g}" + (f" ({r['E_lr']:g})" if r["E_lr"] else "")
        for pt in r["points"]:
            print(f"| {r['adapter']} | {r['init'] or 'B zero'} | {'-' if r['orth_reg'] is None else r['orth_reg']} | {rate} | "
                  f"{pt['step']} | {pt['q_proj_dW']:.3f} | {pt['q_proj_fitted']:+.3f} | {pt['v_proj_dW']:.3f} | {pt['v_proj_fitted']:+.3f} |")
    print("target ||D||:", runs[0]["target_norm"])
    write_json(a.out, {"environment": environment(), "settings": vars(a) | {"out": str(a.out)}, "runs": runs})


if __name__ == "__main__":
    main()
