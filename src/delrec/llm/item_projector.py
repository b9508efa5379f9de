"""LLaRA's item projector (Liao et al., SIGIR 2024): a teacher's item embeddings, frozen, mapped by
a trainable two-layer MLP into the LLM's input-embedding space, so that an item can stand in a
prompt as one vector beside its title (templates.hybrid_prompt, the verbalizer's `item_slots`).

The MLP is LLaRA's `MlpProjector` (model/mlp_projector.py in github.com/ljy0ustc/LLaRA):
Linear(teacher dim, LLM dim), GELU, Linear(LLM dim, LLM dim). The embeddings are the teacher's
input item table (LLaRA reads `item_embeddings(seq)` of SASRec, Caser and GRU4Rec alike), kept as
a buffer: never trained, and saved with the projector, so a stage-2 result does not change when
the teacher is trained again.

Saved as safetensors with its metadata (backbone, teacher, sizes), like the soft prompt; loading
it into another backbone, or scoring a run with another catalogue, fails with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from delrec.io import atomic_path

WEIGHTS_NAME = "item_projector.safetensors"
FORMAT = "delrec.item_projector.v1"


class ItemProjector(nn.Module):
    def __init__(self, item_embeddings: torch.Tensor, dim: int, backbone: str = "", teacher: str = "", seed: int | None = None):
        """`item_embeddings`: [num_items + 1, teacher dim], row 0 padding; `dim`: the LLM's hidden size."""
        super().__init__()
        if item_embeddings.dim() != 2 or item_embeddings.shape[0] < 2:
            raise ValueError(f"item embeddings must be [num_items + 1, dim] with at least one item, got {tuple(item_embeddings.shape)}")
        self.register_buffer("item_embeddings", item_embeddings.detach().float().clone())
        with torch.random.fork_rng(devices=[]):  # a seeded start that leaves the caller's random stream alone
            if seed is not None:
                torch.manual_seed(seed)
            # nn.Linear's default initialisation, as LLaRA's projector
            self.mlp = nn.Sequential(nn.Linear(item_embeddings.shape[1], dim), nn.GELU(), nn.Linear(dim, dim))
        self.backbone, self.teacher = backbone, teacher

    @classmethod
    def from_teacher(cls, model, backbone, teacher: str = "", seed: int | None = None) -> ItemProjector:
        """An untrained projector for `model` (a trained teacher, teachers.SequentialRecommender)
        into `backbone`'s input space, on the backbone's device."""
        projector = cls(model.item_embedding.weight, backbone.hidden_size, backbone.name, teacher, seed)
        return projector.to(backbone.device)

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.mlp[2].out_features

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """[n] item indices -> [n, dim] vectors in the LLM's input space."""
        return self.mlp(self.item_embeddings[items])

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (a .safetensors file, or a folder that gets item_projector.safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / WEIGHTS_NAME
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": FORMAT, "backbone": self.backbone, "teacher": self.teacher, "num_items": str(self.num_items),
                    "teacher_dim": str(self.item_embeddings.shape[1]), "dim": str(self.dim)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backbone=None) -> ItemProjector:
        """Load a saved projector; with `backbone`, check that it was trained for it."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.exists():
            raise FileNotFoundError(f"no item projector at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a delrec item projector (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        projector = cls(tensors["item_embeddings"], tensors["mlp.2.weight"].shape[0], meta.get("backbone", ""),
                        meta.get("teacher", ""))
        projector.load_state_dict(tensors)
        if backbone is not None:
            if backbone.hidden_size != projector.dim:
                raise ValueError(f"{path} projects into dimension {projector.dim} (backbone {projector.backbone!r}); "
                                 f"{backbone.name!r} has dimension {backbone.hidden_size}")
            if projector.backbone and backbone.name and projector.backbone != backbone.name:
                raise ValueError(f"{path} was trained for backbone {projector.backbone!r}, not {backbone.name!r}; "
                                 "an item projector only means something to the model it was trained with")
            projector = projector.to(backbone.device)
        return projector
