"""The ranking losses of both stages over the verbalizer's candidate scores: cross-entropy on the
label, plus the distillation term towards the teacher's scores of the same candidates."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class LossParts:
    """A training loss and what the logs show of it (floats, no graph)."""

    total: torch.Tensor  # what backward runs through
    ce: torch.Tensor  # the cross-entropy on the ground truth (detached)
    kl: torch.Tensor | None = None  # the distillation term before its weight (detached)
    teacher_agreement: float | None = None  # share of prompts whose top-1 is the teacher's top-1


def ranking_loss(scores: Sequence[torch.Tensor], labels: Sequence[int], teacher: Sequence[torch.Tensor] | None = None,
                 distill_weight: float = 0.0, temperature: float = 1.0, label_weight: float = 1.0) -> LossParts:
    """label_weight * the cross-entropy of each prompt's label over its candidates' verbalizer
    scores, plus, with a teacher, Hinton et al.'s distillation term: distill_weight * T^2 *
    KL(softmax(teacher / T) || softmax(scores / T)), averaged over prompts (T^2 keeps its
    gradient's scale independent of T). Every example then teaches a whole ranking of its
    candidates, not only which one is right."""
    ce = torch.stack([-F.log_softmax(s.float(), dim=0)[y] for s, y in zip(scores, labels)]).mean()
    if teacher is None:
        return LossParts(ce if label_weight == 1 else label_weight * ce, ce.detach())
    t = temperature
    kls, agree = [], 0
    for s, target in zip(scores, teacher):
        target = target.to(device=s.device, dtype=torch.float32)
        log_q = F.log_softmax(s.float() / t, dim=0)
        log_p = F.log_softmax(target / t, dim=0)
        kls.append((log_p.exp() * (log_p - log_q)).sum())
        agree += int(s.detach().argmax() == target.argmax())
    kl = torch.stack(kls).mean()
    total = ce if label_weight == 1 else label_weight * ce
    if distill_weight:
        total = total + distill_weight * t * t * kl
    return LossParts(total, ce.detach(), kl.detach(), agree / len(scores))
