"""KDA (Wang et al., "Toward Dynamic User Intention: Temporal Evolutionary Effects of Item
Relations in Sequential Recommendation", TOIS 2020) and KDALRD, KDA with Latent Relation Discovery
(Yang et al., "Sequential Recommendation with Latent Relations based on Large Language Model",
SIGIR 2024): the paper's Table II row KDALRD. Written from the LRD authors' code
(github.com/ysh-1998/LRD, src/models/sequential/KDA.py and KDAPlus.py), same computation:

* Items, attribute values and users are embedded; relations are the virtual one between any two
  items of a history (index 0), one per item attribute (delrec.data.attributes: ML-100K's release
  year and each genre) and, for KDALRD, `latent_relations` more.
* Target-aware relational aggregation: for a candidate item i and each relation r, attention over
  the history by history_item . ((r + value_r(i)) * i), softmaxed over the history, times a
  temporal kernel per relation (an inverse DFT of learned frequency coefficients at the
  log-scaled time gap between each history item and the request), summed into one vector per
  relation; `num_layers` self-attention layers over the relations (weights shared between the
  layers, as the authors'); average pooling; score (user + pooled) . i + bias_i.
* Loss: the authors' softmax-weighted BPR over `num_negatives` sampled items, plus gamma times the
  same loss of a DistMult knowledge-graph model over (item, attribute, item sharing the value)
  triples (gamma: triples / interactions, their "auto"), plus for KDALRD `lrd_weight` times the
  LRD loss: the relation between each history item and the target read from their LLM text
  embeddings (frozen) by a small network, which must reconstruct the target from the history item
  better than from a random item, with an entropy term.

Differences, by necessity: the text embeddings are the run's own LLM's (mean last hidden state over
the title, as LLMSEQSIM; the authors used OpenAI's text-embedding-ada-002 of title and genres), and
each sample's target time is the request's time the gaps are measured to. A target-aware model
scores each candidate with its own pass, so over a whole catalogue it costs about as much per
item as the others per sample: it stores no top-h lists and cannot be a DELRec teacher.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from delrec.data.attributes import ItemAttributes
from delrec.teachers.base import Dropout, SequentialRecommender, TeacherConfig

PAIRS_PER_CHUNK = 4096  # (sample, candidate) pairs scored at once: about 8 MB per [pairs, R, dim] tensor


@dataclass
class ItemSide:
    """What a KDA model reads besides the sequences: the items' attributes, the LLM's text
    embeddings of the items (KDALRD; [num_items + 1, D], row 0 zero) and the data's interaction
    count (the knowledge-graph loss weight's denominator)."""

    attributes: ItemAttributes
    text: np.ndarray | None
    num_interactions: int

    def shapes(self) -> dict:
        return {"num_entities": int(self.attributes.num_entities), "attribute_relations": len(self.attributes.relations),
                "text_dim": 0 if self.text is None else int(self.text.shape[1])}


def _bpr_softmax(pred: torch.Tensor) -> torch.Tensor:
    """The authors' loss: -log sum_j softmax(neg)_j sigmoid(pos - neg_j) (BPR for one negative)."""
    pos, neg = pred[:, 0], pred[:, 1:]
    weights = neg.softmax(dim=1)  # (softmax shifts by the max itself: the authors' "- max" changes nothing)
    return -((pos[:, None] - neg).sigmoid() * weights).sum(dim=1).clamp_min(1e-12).log().mean()


class _RelationAttention(nn.Module):
    """The authors' multi-head attention (q, k, v projections without bias, no output projection)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {heads}")
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(dim, dim, bias=False) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, R, D = x.shape
        split = lambda t: t.view(N, R, self.heads, D // self.heads).transpose(1, 2)  # noqa: E731
        out = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return out.transpose(1, 2).reshape(N, R, D)


class KDA(SequentialRecommender):
    display_name = "KDA"
    model_card = ("{teacher} is a knowledge-enhanced sequential recommender: it weighs each {item} of a history by how "
                  "it relates to a candidate and how long ago it was")
    uses_time_gaps = True  # scorers and training pass `gaps`: seconds from each history item to the request
    reads_item_side = True  # built with an ItemSide (training/teacher.py)
    writes_lists = False  # no top-h lists over the catalogue (module docstring)
    lrd = False

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig,
                 side: ItemSide | None = None, shapes: dict | None = None):
        super().__init__(num_items, num_users, max_len, config)
        if side is None and shapes is None:
            raise ValueError(f"{self.display_name} is built with its ItemSide (training) or its stored shapes (loading)")
        shapes = side.shapes() if side is not None else shapes
        self.shapes = dict(shapes)  # stored in the teacher's config.json, to build it again when loaded
        dim, latent = config.dim, (config.latent_relations if self.lrd else 0)
        self.num_attributes = shapes["attribute_relations"]
        self.num_relations = 1 + self.num_attributes + latent
        self.item_embedding = nn.Embedding(shapes["num_entities"], dim)  # items, then attribute values (no padding row: as the authors')
        self.user_embedding = nn.Embedding(max(num_users, 1), dim)
        self.relation_embedding = nn.Embedding(self.num_relations, dim)
        n_freq = config.dft_points // 2 + 1
        self.freq_real, self.freq_imag = nn.Embedding(self.num_relations, n_freq), nn.Embedding(self.num_relations, n_freq)
        freq = torch.linspace(0, 1, n_freq) / 2.0
        self.register_buffer("freqs", torch.cat([freq, -freq]), persistent=False)
        self.attention = _RelationAttention(dim, config.num_heads)
        self.w1, self.w2 = nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.dropout = Dropout(config.dropout)
        self.norm = nn.LayerNorm(dim)
        self.item_bias = nn.Embedding(num_items + 1, 1)
        # item i's value entity per relation (0: none; the virtual and the latent relations have none)
        self.register_buffer("item_values", torch.zeros(num_items + 1, self.num_relations, dtype=torch.long))
        self.register_buffer("kg_gamma", torch.zeros(()))
        if self.lrd:
            self.register_buffer("item_text", torch.zeros(num_items + 1, shapes["text_dim"]))
            self.project_text = nn.Linear(shapes["text_dim"], dim)
            self.relation_classifier = nn.Linear(2 * dim, self.num_relations)
        self.apply(_init_weights)
        if side is not None:
            self._set_side(side)

    def _set_side(self, side: ItemSide) -> None:
        values = torch.as_tensor(side.attributes.values, dtype=torch.long)
        self.item_values[:, 1 : 1 + self.num_attributes] = values
        triples = len(side.attributes.triples())
        gamma = self.config.kg_weight if self.config.kg_weight >= 0 else triples / max(1, side.num_interactions)
        self.kg_gamma.fill_(gamma)
        if self.lrd:
            self.item_text.copy_(torch.as_tensor(side.text, dtype=torch.float32))

    # -- scoring -------------------------------------------------------------------------------

    def _decay(self, gaps: torch.Tensor) -> torch.Tensor:
        """[B, H, R] temporal kernels in [0, 1]: the inverse DFT of each relation's frequency
        coefficients (made conjugate-symmetric, so real) at the log2-scaled gap."""
        t = torch.log2(gaps.float() / self.config.time_scale + 1e-6).clamp_min(0.0)
        w = 2.0 * math.pi * self.freqs * t[..., None]  # [B, H, 2F]
        x_real = torch.cat([self.freq_real.weight, self.freq_real.weight], dim=-1)  # [R, 2F]
        x_imag = torch.cat([self.freq_imag.weight, -self.freq_imag.weight], dim=-1)
        decay = (w.cos() @ x_real.T - w.sin() @ x_imag.T) / (2 * w.shape[-1])
        return decay.clamp(0.0, 1.0)

    def _score(self, history, users, gaps, items) -> torch.Tensor:
        """[B, C] scores of `items` ([B, C]) for each history."""
        B, C = items.shape
        valid = history > 0
        his = self.item_embedding(history)  # [B, H, V]
        target = self.item_embedding(items)  # [B, C, V]
        relation_target = (self.relation_embedding.weight + self.item_embedding(self.item_values[items])) * target[:, :, None]
        logits = torch.einsum("bhv,bcrv->bchr", his, relation_target)
        logits = logits.masked_fill(~valid[:, None, :, None], float("-inf"))  # (no batch-wide shift: a sample's
        # scores do not depend on the others scored with it)
        attention = logits.softmax(dim=2).nan_to_num(0.0)  # (a history without items attends to nothing)
        attention = attention * self._decay(gaps).masked_fill(~valid[..., None], 0.0)[:, None]
        x = torch.einsum("bchr,bhv->bcrv", attention, his).reshape(B * C, self.num_relations, -1)
        for _ in range(self.config.num_layers):  # one layer's weights, applied num_layers times (as the authors')
            residual = x
            x = self.w2(self.w1(self.attention(x)).relu())
            x = self.norm(residual + self.dropout(x))
        pooled = x.mean(dim=1).view(B, C, -1)
        user = self.user_embedding(users) if users is not None else torch.zeros_like(target[:, 0])
        return ((user[:, None] + pooled) * target).sum(-1) + self.item_bias(items).squeeze(-1)

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{self.display_name} is target-aware: it has no state independent of the candidate")

    def score_candidates(self, history, users, candidates, *, gaps) -> torch.Tensor:
        step = max(1, PAIRS_PER_CHUNK // max(1, len(history)))
        return torch.cat([self._score(history, users, gaps, candidates[:, i : i + step])
                          for i in range(0, candidates.shape[1], step)], dim=1)

    def score_all(self, history, users, *, gaps) -> torch.Tensor:
        items = torch.arange(self.num_items + 1, device=history.device).expand(len(history), -1)
        scores = self.score_candidates(history, users, items, gaps=gaps)
        scores[:, 0] = float("-inf")
        return scores

    # -- training ------------------------------------------------------------------------------

    def _draw_items(self, shape, device, rejected) -> torch.Tensor:
        """Uniform items in 1..num_items, drawn again (a few rounds) where `rejected(items)` is true."""
        items = torch.randint(1, self.num_items + 1, shape, device=device)
        for _ in range(4):
            hit = rejected(items)
            if not hit.any():
                break
            items = torch.where(hit, torch.randint(1, self.num_items + 1, shape, device=device), items)
        return items

    def _random_items(self, shape, avoid: torch.Tensor) -> torch.Tensor:
        """Items not in each row's `avoid` ([B, k] per row), mostly (`_draw_items`)."""
        return self._draw_items(shape, avoid.device, lambda items: (items[..., None] == avoid[:, None, :]).any(-1))

    def loss(self, history, users, target, *, gaps) -> torch.Tensor:
        seen = torch.cat([history, target[:, None]], dim=1)
        negatives = self._random_items((len(target), self.config.num_negatives), seen)
        loss = _bpr_softmax(self._score(history, users, gaps, torch.cat([target[:, None], negatives], dim=1)))
        if self.num_attributes and float(self.kg_gamma) > 0:
            loss = loss + self.kg_gamma * self._kg_loss(len(target))
        if self.lrd:
            loss = loss + self.config.lrd_weight * self._lrd_loss(history, target, seen)
        return loss

    def _holders(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The attribute triples as (item, relation, value) and, per value entity, the items holding
        it (`items_by_value[start[v] : start[v] + count[v]]`); derived from item_values once."""
        if getattr(self, "_holder_cache", None) is None or self._holder_cache[0].device != self.item_values.device:
            values = self.item_values[:, 1 : 1 + self.num_attributes]
            items, rel = values.nonzero(as_tuple=True)
            val = values[items, rel]
            order = torch.argsort(val, stable=True)
            count = torch.bincount(val, minlength=self.item_embedding.num_embeddings)
            start = torch.cumsum(count, 0) - count
            self._holder_cache = (items, rel + 1, val, (items[order], start, count))
        return self._holder_cache

    def _kg_loss(self, n: int) -> torch.Tensor:
        """DistMult over (item, attribute r, another item with the same value v): head . (r + v) . tail
        against heads or tails (half each) that lack v, the authors' item-attribute triples."""
        items, rels, vals, (items_by_value, start, count) = self._holders()
        device = items.device
        pick = torch.randint(0, len(items), (n,), device=device)
        head, rel, val = items[pick], rels[pick], vals[pick]
        tail = items_by_value[start[val] + (torch.rand(n, device=device) * count[val]).long()]  # an item sharing v
        k = self.config.num_negatives
        # an item holding the value is not a negative
        other = self._draw_items((n, k), device, lambda items: (self.item_values[items] == val[:, None, None]).any(-1))
        swap_head = torch.rand(n, k, device=device) < self.config.neg_head_prob
        heads = torch.cat([head[:, None], torch.where(swap_head, other, head[:, None])], dim=1)
        tails = torch.cat([tail[:, None], torch.where(swap_head, tail[:, None], other)], dim=1)
        relation = self.relation_embedding(rel) + self.item_embedding(val)
        pred = (self.item_embedding(heads) * relation[:, None] * self.item_embedding(tails)).sum(-1)
        return _bpr_softmax(pred)

    def _lrd_loss(self, history, target, seen) -> torch.Tensor:
        """LRD: relation weights between each history item and the target from their text
        embeddings; the target is reconstructed from the history item through them (DistMult with
        linear terms) better than from a random item; plus `relation_entropy_weight` x entropy."""
        valid = (history > 0).float()[..., None]
        text_target = self.project_text(self.item_text[target])
        text_history = self.project_text(self.item_text[history])
        pair = torch.cat([text_history, text_target[:, None].expand_as(text_history)], dim=-1)
        weights = self.relation_classifier(pair)
        weights = weights.softmax(dim=-1)  # [B, H, R]
        relations, used = self.relation_embedding.weight, weights
        if self.config.leave_one_latent:  # the first relation stands for "no relation" (as the authors')
            relations, used = relations[1:], weights[..., 1:]
        t = self.item_embedding(target)[:, None]  # [B, 1, V]

        def triple(h):
            # the authors' sum_v of (h w_r t + h w_r + t w_r) with w_r = weight_r x relation_r, as products
            # with the relation matrix (no [B, H, R, V] tensor)
            return used * ((h * t) @ relations.T + h @ relations.T + t @ relations.T)  # [B, H, R']

        negatives = self._random_items(history.shape, seen)
        margin = (triple(self.item_embedding(history)) - triple(self.item_embedding(negatives))).sigmoid()
        recon = -((margin * valid).sum(dim=1) / valid.sum(dim=1).clamp_min(1.0)).clamp_min(1e-12).log().mean()
        entropy = -(weights * weights.clamp_min(1e-12).log()).mean()
        return recon + self.config.relation_entropy_weight * entropy


class KDALRD(KDA):
    display_name = "KDALRD"
    reads_llm = True  # the text embeddings are the run's LLM's
    lrd = True


def _init_weights(module: nn.Module) -> None:
    """The authors' (ReChorus BaseModel.init_weights): normal(0, 0.01) for linear and embedding weights and biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.01)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.normal_(module.bias, std=0.01)
