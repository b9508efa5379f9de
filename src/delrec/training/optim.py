"""What every training stage trains with: the optimiser (one factory for the teachers and both LLM
stages), the learning-rate schedule, and how AdaLoRA's adapters start.

Optimisers: for the LLM stages `lion` (Chen et al. 2023, the paper's choice; `lion-pytorch`) and
`adamw`; for the teachers `adam` and `adagrad` (the paper's teacher settings); all PyTorch's but Lion.

Adapter initialisation. AdaLoRA writes each update as P diag(E) Q (peft: lora_B, lora_E,
lora_A) and regularises P and Q towards orthonormal columns/rows. peft starts E at zero and P, Q
at N(0, 0.02): their columns have norm about 0.02 * sqrt(d), 0.5 for SmolLM2's 576, so a step on
E moves the weight a quarter as far as it would with unit vectors, the first steps send no
gradient into P and Q (E is zero), and the regulariser starts at its maximum, pulling P and Q
while the recommendation loss cannot. Measured on ML-100K with SmolLM2-135M, that start could
not memorise 16 examples at the paper's learning rates (docs/training.md). `orthogonal` keeps E
at zero (the adapted model starts exactly as the base model) and draws P and Q with orthonormal
columns/rows, the point AdaLoRA's regulariser pulls towards: each E entry is then a singular
value of the update in the plain sense.
"""

from __future__ import annotations

import math

import torch
from torch import nn

OPTIMIZERS = ("lion", "adamw")  # the LLM stages'
TEACHER_OPTIMIZERS = ("adam", "adagrad")
LR_SCHEDULES = ("constant", "linear", "cosine")
ADAPTER_INITS = ("orthogonal", "peft")


def lion(params, lr: float, weight_decay: float = 0.0) -> torch.optim.Optimizer:
    from lion_pytorch import Lion

    return Lion(params, lr=lr, weight_decay=weight_decay)


def make_optimizer(name: str, params, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """`params`: tensors or parameter groups (a group's own lr / weight_decay win)."""
    if name == "lion":
        return lion(params, lr, weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    if name == "adagrad":
        return torch.optim.Adagrad(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose one of {OPTIMIZERS + TEACHER_OPTIMIZERS}")


def lr_schedule(optimizer: torch.optim.Optimizer, name: str, warmup_steps: int, total_steps: int,
                min_ratio: float = 0.1) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup_steps`, then `constant`, or a `linear` / `cosine` decay that
    reaches `min_ratio` times the rate at `total_steps`. A decay lets a short run take large
    steps early and small ones late, where a constant rate kept growing AdaLoRA's orthogonality
    regulariser and undid the valid gains (docs/training.md)."""

    if name not in LR_SCHEDULES:
        raise ValueError(f"unknown lr_schedule {name!r}; choose one of {LR_SCHEDULES}")
    if not 0.0 <= min_ratio <= 1.0:
        raise ValueError(f"lr_min_ratio must be in [0, 1], got {min_ratio}")
    warmup = max(1, warmup_steps)

    def factor(step: int) -> float:  # `step` counts finished steps: the rate of step step + 1
        if step + 1 < warmup:
            return (step + 1) / warmup
        if name == "constant" or total_steps <= warmup:
            return 1.0
        done = min(1.0, (step + 1 - warmup) / (total_steps - warmup))
        shape = 1.0 - done if name == "linear" else 0.5 * (1.0 + math.cos(math.pi * done))
        return min_ratio + (1.0 - min_ratio) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adapter_groups(model: nn.Module, lr: float, vector_lr_scale: float, relative: bool = False, extra=()) -> list[dict]:
    """Parameter groups for stage 2. AdaLoRA's E (singular values) at `lr`, or with `relative` at
    `lr` times the RMS singular value of the weight it adapts (||W||_F / sqrt(min(out, in))), so
    that lr is the fraction of a typical singular value each step may add (SmolLM2-135M's q_proj
    has an RMS singular value of about 7 where v_proj has about 1: one absolute rate either barely
    moves q or overturns v). P and Q (singular vectors, entries about 1/sqrt(d) when orthonormal) at
    `lr * vector_lr_scale`; any other trainable tensor in `extra` (the soft prompt under `w ULSR`)
    at `lr`. Lion moves every entry by about its lr per step whatever the gradient's size, which is
    why the groups need rates of their own."""
    groups, seen = [], set()
    for module in model.modules():
        if not (hasattr(module, "lora_E") and hasattr(module, "base_layer")):
            continue
        scale = 1.0
        if relative:
            w = module.base_layer.weight.detach().float()
            scale = (torch.linalg.matrix_norm(w) / min(w.shape) ** 0.5).item()
        for name in module.lora_E:
            E, A, B = module.lora_E[name], module.lora_A[name], module.lora_B[name]
            groups.append({"params": [E], "lr": lr * scale})
            groups.append({"params": [A, B], "lr": lr * vector_lr_scale})
            seen.update(id(t) for t in (E, A, B))
    rest = []
    for p in [*model.parameters(), *extra]:
        if p.requires_grad and id(p) not in seen:
            rest.append(p)
            seen.add(id(p))
    if rest:
        groups.append({"params": rest, "lr": lr})
    return groups


@torch.no_grad()
def init_adapters(model: nn.Module, how: str, seed: int = 0) -> int:
    """Re-initialise every AdaLoRA adapter of `model` (see the module docstring); returns how many
    were set. `peft` leaves peft's own initialisation."""
    if how not in ADAPTER_INITS:
        raise ValueError(f"unknown adapter initialisation {how!r}; choose one of {ADAPTER_INITS}")
    if how == "peft":
        return 0
    generator = torch.Generator().manual_seed(seed)
    count = 0
    for module in model.modules():
        if not (hasattr(module, "lora_E") and hasattr(module, "lora_A") and hasattr(module, "lora_B")):
            continue
        for name in module.lora_A:
            A, B, E = module.lora_A[name], module.lora_B[name], module.lora_E[name]  # A: [r, in], B: [out, r]
            E.zero_()
            A.copy_(_orthonormal(A.shape[0], A.shape[1], generator).to(A))  # orthonormal rows
            B.copy_(_orthonormal(B.shape[1], B.shape[0], generator).T.to(B))  # orthonormal columns
            count += 1
    return count


def _orthonormal(rows: int, cols: int, generator: torch.Generator) -> torch.Tensor:
    """A [rows, cols] matrix with orthonormal rows (rows <= cols), Haar-distributed."""
    q, r = torch.linalg.qr(torch.randn(cols, rows, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))  # a uniform draw, not QR's sign convention
    return q.T.float()
