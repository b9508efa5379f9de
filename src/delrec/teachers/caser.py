"""Caser (Tang & Wang, 2018): horizontal and vertical convolutions over the embedding matrix of
the last `window` items, plus a user embedding."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from delrec.teachers.base import Dropout, SequentialRecommender, TeacherConfig


class Caser(SequentialRecommender):
    display_name = "Caser"
    model_card = ("{teacher} is a convolutional sequential recommender: it looks at the last few {items} the user {verb} "
                  "together, as an image of their embeddings, and favours {items} that followed such groups and the user's taste")

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig):
        super().__init__(num_items, num_users, max_len, config)
        self.window = min(config.window, max_len)
        d, L = config.dim, self.window
        self.vertical = nn.Conv2d(1, config.num_v_filters, (L, 1))
        self.horizontal = nn.ModuleList(nn.Conv2d(1, config.num_h_filters, (h, d)) for h in range(1, L + 1))
        self.fc = nn.Linear(config.num_v_filters * d + config.num_h_filters * L, d)
        self.dropout = Dropout(config.dropout)
        # Users first seen after training keep their initial embedding; a zero init makes them
        # fall back on the sequence part alone.
        self.user_embedding = nn.Embedding(num_users, d) if config.use_user_embedding else None
        if self.user_embedding is not None:
            nn.init.zeros_(self.user_embedding.weight)
        self.out_embedding = nn.Embedding(num_items + 1, 2 * d if self.user_embedding is not None else d)
        self.out_bias = nn.Parameter(torch.zeros(num_items + 1))
        nn.init.normal_(self.item_embedding.weight, std=1.0 / d)
        nn.init.normal_(self.out_embedding.weight, std=1.0 / self.out_embedding.embedding_dim)

    def output_embeddings(self) -> torch.Tensor:
        return self.out_embedding.weight

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        x = self.item_embedding(history[:, -self.window :]).unsqueeze(1)  # [B, 1, L, d]
        v = self.vertical(x).flatten(1)
        h = []
        for conv in self.horizontal:
            c = F.relu(conv(x).squeeze(3))  # [B, filters, L - height + 1]
            h.append(F.max_pool1d(c, c.shape[2]).squeeze(2))
        z = F.relu(self.fc(self.dropout(torch.cat([v, *h], dim=1))))
        if self.user_embedding is not None:
            # users=None: someone the model never saw (e.g. `delrec recommend`): no user part
            user = self.user_embedding(users) if users is not None else z.new_zeros(z.shape[0], self.config.dim)
            z = torch.cat([z, user], dim=1)
        return z

    def score_all(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        scores = super().score_all(history, users) + self.out_bias
        scores[:, 0] = float("-inf")
        return scores

    def score_candidates(self, history: torch.Tensor, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        return super().score_candidates(history, users, candidates) + self.out_bias[candidates]
