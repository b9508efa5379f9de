"""One interface for every conventional sequential recommender (the DELRec *teacher*).

Like RecBole, each model answers three calls: `loss` (training), `score_candidates` (the
15-candidate protocol) and `score_all` (the whole catalogue), named as the evaluator's scorers
name them. Unlike RecBole, a model gets its settings from its own dataclass, never from a global
config.

Batches: `history` is [B, L] item indices, left-padded with 0, most recent item last; `users`
is [B] user indices (only Caser uses them; None means a user the model has not seen).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class TeacherConfig:
    """Architecture and optimisation settings. Defaults are the paper's SASRec; each model's
    `default_config` overrides what differs (Section V-A3)."""

    model: str = "sasrec"
    dim: int = 100
    dropout: float = 0.5
    optimizer: str = "adam"  # adam | adagrad
    lr: float = 1e-3
    weight_decay: float = 0.0
    batch_size: int = 128
    max_epochs: int = 100
    patience: int = 3  # epochs without a better valid score before stopping
    max_seconds: float | None = None  # wall-clock budget for training
    seed: int = 2024
    # SASRec
    num_blocks: int = 2
    num_heads: int = 1
    # GRU4Rec
    num_layers: int = 1
    # Caser
    window: int = 5
    num_h_filters: int = 16
    num_v_filters: int = 4
    use_user_embedding: bool = True
    # BERT4Rec: the share of items masked in each training sequence (the target always is)
    mask_prob: float = 0.2
    # LLM2BERT4Rec: the LLM whose title embeddings, reduced by PCA, start the item embeddings
    # (a `delrec run` sets the run's `llm`; default: delrec.llm.backbone.DEFAULT_MODEL)
    llm: str | None = None
    # KDA / KDALRD (teachers/kda.py; the LRD authors' names in brackets): sampled negatives per
    # example [num_neg], the time gap's unit in seconds [t_scalar], the DFT points of the temporal
    # kernels [n_dft], the knowledge-graph loss weight (-1: triples / interactions) [gamma], the
    # chance a KG negative replaces the head [neg_head_p], and LRD's latent relations
    # [latent_relation_num], loss weight [lamda], entropy weight [alpha] and whether the first
    # relation means "none" [leave_one_latent]
    num_negatives: int = 1
    time_scale: float = 60.0
    dft_points: int = 64
    kg_weight: float = -1.0
    neg_head_prob: float = 0.5
    latent_relations: int = 8
    lrd_weight: float = 10.0
    relation_entropy_weight: float = 0.1
    leave_one_latent: bool = True

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TeacherConfig:
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown teacher settings: {sorted(unknown)}")
        return cls(**d)


class Dropout(nn.Module):
    """Inverted dropout drawn with `rand_like`: on CPU about 3x faster than nn.Dropout, whose
    bernoulli_ kernel took 44% of a SASRec training step here (benchmarks/teachers.py)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        return x * (torch.rand_like(x) >= self.p) * (1.0 / (1.0 - self.p))


class SequentialRecommender(nn.Module):
    """Base class: subclasses implement `encode` (a [B, dim] state per history).

    `display_name` is how prompts name the teacher; `model_card` describes it in words (the `w MCP`
    ablation puts it where the soft prompt would go), with the template's domain words
    ({teacher}, {item}, {items}, {verb})."""

    display_name = ""
    uses_time_gaps = False  # scored and trained with `gaps=` (seconds from each history item to the request): KDA
    reads_item_side = False  # built with the items' attributes and text (teachers.kda.ItemSide): KDA
    reads_llm = False  # its `llm` setting names the run's LLM, whose embeddings it reads (LLM2BERT4Rec, KDALRD)
    writes_lists = True  # stores its top-h lists over the catalogue (topk.parquet): what a DELRec teacher needs
    model_card = "{teacher} is a sequential recommender: it ranks {items} by what the user {verb} before, most recent last"

    def __init__(self, num_items: int, num_users: int, max_len: int, config: TeacherConfig):
        super().__init__()
        self.num_items = num_items
        self.num_users = num_users
        self.max_len = max_len
        self.config = config
        self.item_embedding = nn.Embedding(num_items + 1, config.dim, padding_idx=0)

    def encode(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def output_embeddings(self) -> torch.Tensor:
        """[num_items + 1, dim] item vectors scored against the state (shared with the input)."""
        return self.item_embedding.weight

    def score_all(self, history: torch.Tensor, users: torch.Tensor) -> torch.Tensor:
        scores = self.encode(history, users) @ self.output_embeddings().T
        scores[:, 0] = float("-inf")  # padding is never an item
        return scores

    def score_candidates(self, history: torch.Tensor, users: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        state = self.encode(history, users)
        return torch.einsum("bd,bcd->bc", state, self.output_embeddings()[candidates])

    def loss(self, history: torch.Tensor, users: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """Cross-entropy over the whole catalogue (beats BCE with one sampled negative)."""
        return F.cross_entropy(self.score_all(history, users), target)


def init_weights(module: nn.Module) -> None:
    """Transformer teachers' initialisation: normal(0, 0.02) weights, zero biases and padding row."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)
        if isinstance(module, nn.Embedding) and module.padding_idx is not None:
            module.weight.data[module.padding_idx].zero_()
