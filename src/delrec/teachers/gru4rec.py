"""GRU4Rec (Hidasi et al., 2016) in its sequence form: a GRU over the history, its last state
projected into item space."""

from __future__ import annotations

import torch
from torch import nn

from delrec.teachers.base import Dropout, SequentialRecommender, TeacherConfig


class GRU4Rec(SequentialRecommender):
    display_name = "GRU4Rec"
    model_card = ("{teacher} is a recurrent sequential recommender: it reads the {items} the user {verb} one after another "
                  "and favours {items} that followed similar sequences, the most recent {items} weighing most")

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig):
        super().__init__(num_items, num_users, max_len, config)
        self.input_dropout = Dropout(config.dropout)
        self.gru = nn.GRU(config.dim, config.dim, num_layers=config.num_layers, batch_first=True)
        self.output = nn.Linear(config.dim, config.dim)
        nn.init.xavier_normal_(self.item_embedding.weight[1:])

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        # Histories are left-padded, so after the GRU has read all L positions it has seen the
        # padding first. Padding embeddings are zero but the GRU's biases still move the state,
        # so pack the real items instead: shift each row to the left and pass its length.
        lengths = (history > 0).sum(dim=1).clamp(min=1)
        L = history.shape[1]
        shift = (torch.arange(L, device=history.device)[None, :] + (L - lengths)[:, None]) % L
        right_padded = history.gather(1, shift)
        x = self.input_dropout(self.item_embedding(right_padded))
        packed = nn.utils.rnn.pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.gru(packed)
        return self.output(h[-1])
