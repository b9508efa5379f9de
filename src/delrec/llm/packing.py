"""Tensor helpers of the verbalizer's packed scoring: padding prompts into a batch, a shared
prompt prefix computed once, and the mean log-probability of each candidate's tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class Batch:
    embeds: torch.Tensor  # [B, T, d]
    mask: torch.Tensor  # [B, T]
    lengths: torch.Tensor  # [B] real prompt tokens
    slots: list[int | None] = field(default_factory=list)  # [B] where each row's soft prompt starts (None: no slot)


MIN_SHARED_PREFIX = 8  # tokens: a shorter shared prefix is not worth its extra pass


@dataclass
class Prefix:
    """The shared start of the prompts being scored: its length and its keys/values per layer."""

    length: int
    cache: object  # transformers.DynamicCache, cropped back to `length` after each prompt


def pad(seqs: list[torch.Tensor], left: bool) -> Batch:
    T = max(s.shape[0] for s in seqs)
    d = seqs[0].shape[1]
    embeds = seqs[0].new_zeros(len(seqs), T, d)
    mask = torch.zeros(len(seqs), T, dtype=torch.long, device=seqs[0].device)
    for i, s in enumerate(seqs):
        sl = slice(T - s.shape[0], T) if left else slice(0, s.shape[0])
        embeds[i, sl] = s
        mask[i, sl] = 1
    return Batch(embeds, mask, torch.tensor([s.shape[0] for s in seqs], device=seqs[0].device))


def mean_per_continuation(picked: torch.Tensor, tokens: list[int], owner: list[int], counts: list[int]) -> list[torch.Tensor]:
    """Per prompt, the mean log-probability of each continuation's scored tokens: `picked` holds
    the logits that predict `tokens`, one row each, and owner[i] is the continuation (numbered
    across all prompts) that token i belongs to; counts: continuations per prompt."""
    picked = picked.float()
    dev = picked.device
    token_logp = picked.gather(1, torch.tensor(tokens, device=dev)[:, None])[:, 0] - picked.logsumexp(-1)
    owner_t = torch.tensor(owner, device=dev)
    total = torch.zeros(sum(counts), device=dev, dtype=token_logp.dtype).index_add(0, owner_t, token_logp)
    count = torch.zeros(sum(counts), device=dev).index_add(0, owner_t, torch.ones_like(token_logp))
    return list((total / count).split(counts))
