"""BERT4Rec (Sun et al., CIKM 2019): a bidirectional transformer over the item sequence trained to
fill in masked items (the Cloze task); at inference a [MASK] token after the history is filled in.
LLM2BERT4Rec (Harte et al., RecSys 2023) is the same model whose item embeddings start from an LLM's
embeddings of the titles reduced by PCA to the model's width (training/teacher.py does that
before training, with the run's LLM; Harte et al. used OpenAI's embedding API).

Training here reads the train split's (history, target) samples: each sequence is the history
followed by the target; every real item is masked with probability `mask_prob` and the target
always is, so each step trains both the Cloze task and the next-item question asked at inference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from delrec.teachers.base import Dropout, SequentialRecommender, TeacherConfig, init_weights


class _BidirectionalBlock(nn.Module):
    """Post-norm transformer block (as BERT): self-attention over every real item, both ways."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm1 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.norm2 = nn.LayerNorm(dim)
        self.dropout = Dropout(dropout)
        self.attn_dropout = dropout

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, D = x.shape
        qkv = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2], attn_mask=mask,
                                             dropout_p=self.attn_dropout if self.training else 0.0)
        x = self.norm1(x + self.dropout(self.proj(att.transpose(1, 2).reshape(B, L, D))))
        return self.norm2(x + self.dropout(self.ff(x)))


class BERT4Rec(SequentialRecommender):
    display_name = "BERT4Rec"
    model_card = ("{teacher} is a bidirectional self-attentive sequential recommender trained to fill in hidden {items} "
                  "of a history: it reads the whole history at once and favours {items} that fit it")
    init_from_llm = False  # LLM2BERT4Rec: item embeddings from the LLM's title embeddings (training/teacher.py)

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig):
        super().__init__(num_items, num_users, max_len, config)
        if config.dim % config.num_heads:
            raise ValueError(f"dim {config.dim} is not divisible by num_heads {config.num_heads}")
        if not 0.0 <= config.mask_prob < 1.0:
            raise ValueError(f"mask_prob must be in [0, 1), got {config.mask_prob}")
        self.mask_token = num_items + 1
        self.item_embedding = nn.Embedding(num_items + 2, config.dim, padding_idx=0)  # + [MASK]
        self.position_embedding = nn.Embedding(max_len + 1, config.dim)  # the history and the slot after it
        self.input_norm = nn.LayerNorm(config.dim)
        self.input_dropout = Dropout(config.dropout)
        self.blocks = nn.ModuleList(_BidirectionalBlock(config.dim, config.num_heads, config.dropout)
                                    for _ in range(config.num_blocks))
        self.head = nn.Sequential(nn.Linear(config.dim, config.dim), nn.GELU(), nn.LayerNorm(config.dim))
        self.output_bias = nn.Parameter(torch.zeros(num_items + 1))
        self.apply(init_weights)

    def output_embeddings(self) -> torch.Tensor:
        return self.item_embedding.weight[: self.num_items + 1]  # never the [MASK] token

    def _hidden(self, sequence: torch.Tensor) -> torch.Tensor:
        """[B, L, dim] states of a left-padded sequence (items, [MASK]s, 0 for padding)."""
        L = sequence.shape[1]
        x = self.item_embedding(sequence) + self.position_embedding.weight[self.max_len + 1 - L :]
        x = self.input_dropout(self.input_norm(x))
        valid = sequence > 0
        mask = (valid[:, None, :] | torch.eye(L, dtype=torch.bool, device=sequence.device))[:, None]  # keys: real items
        for block in self.blocks:
            x = block(x, mask)
        return self.head(x)

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        history = history[:, -self.max_len :]
        slot = torch.full((history.shape[0], 1), self.mask_token, dtype=history.dtype, device=history.device)
        return self._hidden(torch.cat([history, slot], dim=1))[:, -1]  # the [MASK] after the history

    def score_all(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        scores = self.encode(history, users) @ self.output_embeddings().T + self.output_bias
        scores[:, 0] = float("-inf")
        return scores

    def score_candidates(self, history: torch.Tensor, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        state = self.encode(history, users)
        return torch.einsum("bd,bcd->bc", state, self.output_embeddings()[candidates]) + self.output_bias[candidates]

    def loss(self, history: torch.Tensor, users: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the catalogue at the masked positions (Cloze; the target always masked)."""
        sequence = torch.cat([history[:, -self.max_len :], target[:, None]], dim=1)
        masked = (torch.rand(sequence.shape, device=sequence.device) < self.config.mask_prob) & (sequence > 0)
        masked[:, -1] = True
        hidden = self._hidden(sequence.masked_fill(masked, self.mask_token))[masked]
        logits = hidden @ self.output_embeddings().T + self.output_bias
        logits[:, 0] = float("-inf")
        return F.cross_entropy(logits, sequence[masked])


class LLM2BERT4Rec(BERT4Rec):
    display_name = "LLM2BERT4Rec"
    init_from_llm = True
    reads_llm = True
