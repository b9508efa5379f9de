"""LLMSEQSIM (Harte et al., "Leveraging Large Language Models for Sequential Recommendation",
RecSys 2023): rank items by the similarity of their LLM embeddings to the session's, without
any training.

An item's embedding is the mean of the backbone's last-layer hidden states over its title's
tokens: for a decoder-only model the base model's output (after its final norm, without the LM
head; a BOS token, where the tokenizer adds one, is read as context but not pooled), for T5 the
encoder's (the title followed by </s>, as T5 encodes text; the </s> is not pooled). The session
embedding is the mean of the history items' embeddings, and each candidate's score is its cosine
similarity to it. Each title is embedded once per scorer and cached; on CPU each title gets its own
forward pass (no padding, so an embedding does not depend on which titles shared its batch), on
GPUs the titles of a batch share one right-padded pass.

Harte et al. embed product names with OpenAI's and PaLM's embedding APIs; ours come from the run's
backbone, as the paper's Table II replaced every baseline's LLM with its own (docs/baselines.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from delrec.core import distributed
from delrec.data.store import RunData
from delrec.llm.backbone import Backbone


class TitleSimilarityScorer:
    """Scores candidates (or the whole catalogue) by the cosine similarity of their title
    embeddings to the mean embedding of the history's titles (see the module docstring)."""

    def __init__(self, backbone: Backbone, titles: Sequence[str], batch_size: int = 8, name: str | None = None,
                 progress: bool = True):
        self.backbone = backbone
        self.titles = list(titles)  # indexed by item_idx; [0] is padding
        self.batch_size = batch_size  # titles per forward pass (on GPUs)
        self.name = name or f"llmseqsim:{backbone.name}"
        self.progress = progress
        self._cache: dict[str, torch.Tensor] = {}  # title -> float32 embedding on the CPU

    @classmethod
    def for_run(cls, data: RunData, backbone: Backbone, **kwargs) -> TitleSimilarityScorer:
        return cls(backbone, [""] + data.items["title"].tolist(), **kwargs)

    # -- embeddings --------------------------------------------------------------------------

    def item_embeddings(self, items: Sequence[int] | np.ndarray) -> torch.Tensor:
        """[len(items), hidden] embeddings of items (indices into the titles), computing the
        titles not cached yet."""
        titles = [self.titles[int(i)] for i in np.asarray(items).reshape(-1)]
        missing = sorted(set(titles) - set(self._cache))
        if missing:
            self._embed(missing)
        return torch.stack([self._cache[t] for t in titles])

    def _title_ids(self, title: str) -> tuple[list[int], slice]:
        """The model's input for a title and where the title's own tokens are in it."""
        bb = self.backbone
        ids = bb.encode_text(title)
        if not ids:
            raise ValueError(f"the title {title!r} encodes to no tokens")
        bos = bb.tokenizer.bos_token_id
        if bb.is_encoder_decoder:
            return ids + ([bb.eos_token_id] if bb.eos_token_id is not None else []), slice(0, len(ids))
        if bos is not None and getattr(bb.tokenizer, "add_bos_token", False):
            return [bos] + ids, slice(1, len(ids) + 1)
        return ids, slice(0, len(ids))

    @torch.no_grad()
    def _embed(self, titles: list[str]) -> None:
        bb = self.backbone
        encoder = bb.model.get_encoder() if bb.is_encoder_decoder else bb.model.base_model  # no LM head
        one_at_a_time = bb.device.type == "cpu"
        step = 1 if one_at_a_time else self.batch_size
        inputs = [self._title_ids(t) for t in titles]
        order = sorted(range(len(titles)), key=lambda i: len(inputs[i][0]))  # little padding in a batch
        bar = tqdm(total=len(titles), desc=f"embed titles ({self.name})", unit="title",
                   disable=not (self.progress and distributed.current().is_main and len(titles) > step))
        for start in range(0, len(order), step):
            chunk = order[start : start + step]
            width = max(len(inputs[i][0]) for i in chunk)
            ids = torch.full((len(chunk), width), bb.pad_token_id or 0, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):
                n = len(inputs[i][0])
                ids[row, :n], mask[row, :n] = torch.tensor(inputs[i][0]), 1  # right padding: positions start at 0
            hidden = encoder(input_ids=ids.to(bb.device), attention_mask=mask.to(bb.device)).last_hidden_state.float().cpu()
            for row, i in enumerate(chunk):
                self._cache[titles[i]] = hidden[row, inputs[i][1]].mean(dim=0)
            bar.update(len(chunk))
        bar.close()

    # -- scoring -----------------------------------------------------------------------------

    def session_embeddings(self, data, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), hidden]: the mean embedding of each row's history items."""
        history = data.history[np.asarray(rows)]
        present = history > 0
        lengths = present.sum(axis=1)
        if (lengths == 0).any():
            raise ValueError("a sample has an empty history: LLMSEQSIM needs at least one earlier item")
        emb = self.item_embeddings(history[present])  # row by row, padding left out
        total = torch.zeros(len(history), emb.shape[1]).index_add_(0, torch.as_tensor(np.nonzero(present)[0]), emb)
        return total / torch.as_tensor(lengths, dtype=torch.float32)[:, None]

    def score_candidates(self, data, rows: np.ndarray) -> torch.Tensor:
        cands = data.candidates[np.asarray(rows)]
        session = self.session_embeddings(data, rows)
        items = self.item_embeddings(cands).view(*cands.shape, -1)
        return F.cosine_similarity(items, session[:, None, :], dim=-1)

    def score_all(self, data, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), num_items + 1] scores over the catalogue (column 0, padding, scores -inf)."""
        catalogue = self.item_embeddings(np.arange(1, len(self.titles)))
        scores = F.cosine_similarity(catalogue[None], self.session_embeddings(data, rows)[:, None, :], dim=-1)
        return torch.cat([torch.full((len(scores), 1), float("-inf")), scores], dim=1)
