"""SASRec (Kang & McAuley, 2018): causal self-attention over the item sequence."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from delrec.teachers.base import Dropout, SequentialRecommender, TeacherConfig, init_weights


class _Block(nn.Module):
    """Pre-norm transformer block (the original SASRec normalises before attention too)."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), Dropout(dropout), nn.Linear(dim, dim))
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor, last_only: bool = False) -> torch.Tensor:
        """`last_only` computes the output of the most recent position alone: the last block's
        other positions are never scored, so skipping them saves about a third of the work."""
        B, L, D = x.shape
        hd = D // self.heads
        qkv = self.qkv(self.norm1(x)).view(B, L, 3, self.heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        if last_only:
            x, q, mask = x[:, -1:], q[:, :, -1:], mask[:, :, -1:]
        att = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        x = x + self.dropout(self.proj(att.transpose(1, 2).reshape(B, x.shape[1], D)))
        return x + self.dropout(self.ff(self.norm2(x)))


class SASRec(SequentialRecommender):
    display_name = "SASRec"
    model_card = ("{teacher} is a self-attentive sequential recommender: it weighs every earlier {item} by its relevance "
                  "to the most recent ones and favours {items} that often follow them")

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig):
        super().__init__(num_items, num_users, max_len, config)
        if config.dim % config.num_heads:
            raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
        self.position_embedding = nn.Embedding(max_len, config.dim)
        self.input_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(_Block(config.dim, config.num_heads, config.dropout) for _ in range(config.num_blocks))
        self.final_norm = nn.LayerNorm(config.dim)
        self.apply(init_weights)

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        B, L = history.shape
        x = self.item_embedding(history) * (self.config.dim**0.5)
        x = x + self.position_embedding.weight[self.max_len - L :]  # right-aligned positions
        x = self.input_dropout(x)
        valid = history > 0
        causal = torch.ones(L, L, dtype=torch.bool, device=history.device).tril()
        # a query may see earlier real items, and always itself (so padded rows never go all -inf)
        mask = (causal & valid[:, None, :]) | torch.eye(L, dtype=torch.bool, device=history.device)
        mask = mask[:, None]  # broadcast over heads
        for i, block in enumerate(self.blocks):
            x = block(x, mask, last_only=i == len(self.blocks) - 1)
        return self.final_norm(x[:, -1])  # the most recent position summarises the history

