"""Adaptive weights for the two stage-1 losses (the paper's Eq. 6: "weights of learning
objectives of the two components, dynamically adjusted during training").

* `inverse-grad-norm` (default, the authors' choice): each task's weight is proportional to the
  inverse norm of its gradient on the trainable parameters, so neither task dominates the update;
  weights are smoothed with an exponential moving average and sum to the number of tasks.
* `uncertainty` (Kendall et al., 2018): L = sum_i exp(-s_i) L_i + s_i with learnable s_i.
* `fixed`: constant weights.

Every weighting combines per-task gradients (computed separately, then mixed), so its
behaviour does not depend on the scale of each loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn

WEIGHTINGS = ("inverse-grad-norm", "uncertainty", "fixed")


class LossWeighting(nn.Module):
    def __init__(self, method: str, tasks: tuple[str, ...], fixed: dict[str, float] | None = None, momentum: float = 0.9):
        super().__init__()
        if method not in WEIGHTINGS:
            raise ValueError(f"unknown loss weighting {method!r}; choose one of {WEIGHTINGS}")
        self.method, self.tasks, self.momentum = method, tasks, momentum
        fixed = fixed or {}
        self.register_buffer("weights", torch.tensor([float(fixed.get(t, 1.0)) for t in tasks]))
        # learnable log-variances for `uncertainty`
        self.log_vars = nn.Parameter(torch.zeros(len(tasks)), requires_grad=method == "uncertainty")
        self.register_buffer("initialised", torch.tensor(False))

    def current(self) -> dict[str, float]:
        if self.method == "uncertainty":
            w = torch.exp(-self.log_vars.detach())
        else:
            w = self.weights
        return {t: float(w[i]) for i, t in enumerate(self.tasks)}

    def combine(self, params: list[nn.Parameter], grads: dict[str, list[torch.Tensor]], losses: dict[str, float]) -> None:
        """Write the weighted sum of the per-task gradients into `p.grad` for every parameter."""
        tasks = [t for t in self.tasks if t in grads]
        if self.method == "inverse-grad-norm" and len(tasks) > 1:
            norms = torch.stack([torch.sqrt(sum((g.float() ** 2).sum() for g in grads[t])) for t in tasks])
            inv = 1.0 / norms.clamp(min=1e-12)
            target = inv / inv.sum() * len(tasks)
            idx = [self.tasks.index(t) for t in tasks]
            if not bool(self.initialised):
                self.weights[idx] = target
                self.initialised.fill_(True)
            else:
                self.weights[idx] = self.momentum * self.weights[idx] + (1 - self.momentum) * target
        weights = self.current()
        for j, p in enumerate(params):
            total = None
            for t in tasks:
                g = grads[t][j]
                if g is None:
                    continue
                total = weights[t] * g if total is None else total + weights[t] * g
            p.grad = total
        if self.method == "uncertainty":
            # d/ds_i [exp(-s_i) L_i + s_i] = 1 - exp(-s_i) L_i
            s = self.log_vars.detach()
            self.log_vars.grad = torch.tensor(
                [1.0 - math.exp(-float(s[i])) * losses.get(t, 0.0) if t in losses else 0.0 for i, t in enumerate(self.tasks)],
                device=s.device,
            )
