"""Item embeddings from an LLM, for models that start from them (LLM2BERT4Rec, Harte et al. RecSys
2023): each title's embedding as LLMSEQSIM computes it (llm/similarity.py: the mean of the
backbone's last hidden states over the title's tokens), reduced by PCA to the model's width and
scaled to the spread of the model's own initialisation (normal, std 0.02), so the reduced
embeddings start training at the scale the rest of the network expects."""

from __future__ import annotations

import numpy as np
import torch

from delrec.data.store import RunData
from delrec.llm.backbone import DEFAULT_MODEL, Backbone
from delrec.llm.similarity import TitleSimilarityScorer

INIT_STD = 0.02  # the transformer teachers' init (teachers.base.init_weights)


def title_embeddings(data: RunData, llm: str | None, device: str = "cpu") -> torch.Tensor:
    """[num_items, hidden] float32: each item's title embedding by `llm` (as LLMSEQSIM's); KDALRD reads them as they are."""
    backbone = Backbone.load(llm or DEFAULT_MODEL, device=device, dtype="float32").freeze()
    scorer = TitleSimilarityScorer.for_run(data, backbone, progress=False)
    return scorer.item_embeddings(np.arange(1, data.num_items + 1)).float().cpu()


def pca_title_embeddings(data: RunData, llm: str | None, dim: int, device: str = "cpu") -> torch.Tensor:
    """[num_items, dim] float32: the items' title embeddings by `llm`, PCA-reduced to `dim`."""
    if dim > data.num_items:
        raise ValueError(f"PCA to {dim} dimensions needs at least {dim} items, the catalogue has {data.num_items}")
    embeddings = title_embeddings(data, llm, device).double()
    if dim > embeddings.shape[1]:
        raise ValueError(f"PCA to {dim} dimensions from {llm or DEFAULT_MODEL}'s {embeddings.shape[1]}: the teacher's dim is too large")
    centered = embeddings - embeddings.mean(dim=0)
    _, _, components = torch.linalg.svd(centered, full_matrices=False)
    reduced = centered @ components[:dim].T
    return (reduced * (INIT_STD / reduced.std())).float()
