"""Metrics and the evaluator shared by every model compared (teachers, reference scorers, LLMs).

Ranks are pessimistic: a candidate whose score ties the target's counts as ranked above it, so a
model that gives every candidate the same score gets rank C-1, never rank 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Protocol

import numpy as np
import torch

from delrec.core import distributed
from delrec.data.store import RunData

HR_KS = (1, 5, 10)
NDCG_KS = (5, 10)
METRIC_NAMES = tuple(f"HR@{k}" for k in HR_KS) + tuple(f"NDCG@{k}" for k in NDCG_KS)


def pessimistic_ranks(scores: np.ndarray | torch.Tensor, target_col: np.ndarray | torch.Tensor) -> np.ndarray:
    """0-based rank of the target in each row: how many other columns score >= the target.

    Columns scored -inf (masked) never count, unless the target itself is -inf."""
    scores = torch.as_tensor(scores)
    target_col = torch.as_tensor(target_col, dtype=torch.long)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; the model diverged or produced invalid output")
    target_score = scores.gather(1, target_col[:, None])
    at_or_above = (scores >= target_score).sum(dim=1) - 1  # minus the target itself
    return at_or_above.cpu().numpy().astype(np.int64)


def metrics_from_ranks(ranks: np.ndarray) -> dict[str, float]:
    """Mean HR@k and NDCG@k over samples (one relevant item, so IDCG = 1)."""
    ranks = np.asarray(ranks)
    if ranks.size == 0:
        raise ValueError("no samples to compute metrics on")
    out = {f"HR@{k}": float(np.mean(ranks < k)) for k in HR_KS}
    gains = 1.0 / np.log2(ranks + 2.0)
    out.update({f"NDCG@{k}": float(np.mean(np.where(ranks < k, gains, 0.0))) for k in NDCG_KS})
    return out


class Scorer(Protocol):
    """What the evaluator needs from a model. `rows` index into the RunData's samples."""

    name: str

    def score_candidates(self, data: RunData, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """[len(rows), num_candidates] scores for data.candidates[rows]."""

    def score_all(self, data: RunData, rows: np.ndarray) -> np.ndarray | torch.Tensor:
        """[len(rows), num_items + 1] scores over the catalogue (column 0 is padding)."""


def candidate_ranks(scorer: Scorer, data: RunData, rows: np.ndarray, batch_size: int = 1024, local: bool = False) -> np.ndarray:
    """Pessimistic rank of the target among each row's fixed candidates. Under a multi-process
    launch the rows are sharded over the processes and every process gets all ranks back, unless
    `local` (work that runs on one process only, such as the report, must not wait for the others)."""
    return candidate_outcomes(scorer, data, rows, batch_size, local)[0]


def candidate_outcomes(scorer: Scorer, data: RunData, rows: np.ndarray, batch_size: int = 1024,
                       local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(ranks as `candidate_ranks`, each row's top-1 item): the top-1 is the best-scored candidate,
    among tied best the smallest item index, so it does not depend on the order candidates are listed in."""
    # rows go to the scorer in multiples of its own batch (an LLM scorer's verbalizer batch), and
    # shards are made of such batches: every batch is the same however rows are chunked or sharded
    inner = getattr(scorer, "batch_size", None) or batch_size
    step = max(1, batch_size // inner) * inner

    def outcomes(rows: np.ndarray) -> np.ndarray:
        out = []
        for start in range(0, len(rows), step):
            batch = rows[start : start + step]
            cands = data.candidates[batch]
            target_col = (cands == data.target[batch][:, None]).argmax(axis=1)
            scores = torch.as_tensor(scorer.score_candidates(data, batch))
            ranks = pessimistic_ranks(scores, target_col)
            best = scores == scores.max(dim=1, keepdim=True).values
            top1 = np.where(best.numpy(), cands, np.iinfo(np.int64).max).min(axis=1)
            out.append(np.stack([ranks, top1], axis=1))
        return np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)

    rows = np.asarray(rows)
    both = outcomes(rows) if local else distributed.current().map_sharded(outcomes, rows, inner)
    return both[:, 0], both[:, 1]


# Bytes of one block of full-catalogue scores (rows x items, float32). At 1.29M items (Amazon
# Home & Kitchen) 512 rows would be 2.6 GB, and the masks and copies beside it as much again.
FULL_SCORES_BLOCK_BYTES = 256 << 20


def full_catalogue_rows(num_items: int, batch_size: int, block_bytes: int | None = None) -> int:
    """Rows per block when every row is scored against `num_items` items: at most `batch_size`,
    and few enough that a block's float32 scores stay within `block_bytes` (default
    FULL_SCORES_BLOCK_BYTES; at least one row)."""
    return max(1, min(batch_size, (block_bytes or FULL_SCORES_BLOCK_BYTES) // (4 * (num_items + 1))))


def full_ranks(scorer: Scorer, data: RunData, rows: np.ndarray, batch_size: int = 512) -> np.ndarray:
    """Rank of the target over the whole catalogue, excluding padding and the items the user
    already interacted with before the target (as RecBole's full-sort evaluation does). A
    two-stage scorer (teachers.retrieval.RetrieveThenRank) ranks by its own rule (evaluation.two_stage)."""
    if hasattr(scorer, "two_stage_ranks"):
        return scorer.two_stage_ranks(data, np.asarray(rows))
    # blocked by the scorer's catalogue, which may be wider than the data's (a teacher built over every item)
    batch_size = full_catalogue_rows(getattr(scorer, "num_items", data.num_items), batch_size)
    return distributed.current().map_sharded(lambda r: _full_ranks(scorer, data, r, batch_size), np.asarray(rows), batch_size)


def _full_ranks(scorer: Scorer, data: RunData, rows: np.ndarray, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        scores = torch.as_tensor(scorer.score_all(data, batch), dtype=torch.float32)
        mask = torch.zeros_like(scores, dtype=torch.bool)
        mask[:, 0] = True
        r, items = data.seen_items(batch)
        mask[torch.as_tensor(r), torch.as_tensor(items)] = True
        target = torch.as_tensor(data.target[batch])
        mask[torch.arange(len(batch)), target] = False  # a repeated item stays rankable as the target
        out.append(pessimistic_ranks(scores.masked_fill(mask, -math.inf), target))
    return np.concatenate(out) if out else np.zeros(0, dtype=np.int64)


def evaluate(
    scorer: Scorer,
    data: RunData,
    split: str = "test",
    full_ranking: bool = False,
    rows: np.ndarray | None = None,
) -> dict:
    """Metrics of `scorer` on a split: the 15-candidate protocol, and optionally full ranking."""
    if rows is None:
        rows = data.indices(split)
    result = {
        "model": scorer.name,
        "split": split,
        "protocol": data.config.name,
        "num_samples": int(len(rows)),
        "candidates": metrics_from_ranks(candidate_ranks(scorer, data, rows)),
    }
    if full_ranking:
        result["full_ranking"] = metrics_from_ranks(full_ranks(scorer, data, rows))
    return result


def subset_rows(data: RunData, split: str, limit: int | None = None, seed: int = 0) -> np.ndarray:
    """The split's rows, or a fixed seeded subset of `limit` of them (sorted): every model scored
    on a subset sees the same samples."""
    rows = data.indices(split)
    if limit and limit < len(rows):
        rows = np.sort(np.random.default_rng(seed).choice(rows, size=limit, replace=False))
    return rows


class RandomScorer:
    """Uniform random scores: HR@1 about 1/15 on the candidate protocol."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = seed

    def _scores(self, rows: np.ndarray, width: int) -> np.ndarray:
        # one generator per sample, so a sample's scores don't depend on how batches are cut
        return np.stack([np.random.default_rng([self.seed, int(r)]).random(width) for r in rows]) if len(rows) else np.zeros((0, width))

    def score_candidates(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        return self._scores(rows, data.candidates.shape[1])

    def score_all(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        return self._scores(rows, data.num_items + 1)


class PopularityScorer:
    """Scores an item by how often it was a target in the train split (no later information)."""

    name = "popularity"

    def __init__(self, data: RunData):
        train = data.indices("train")
        self.counts = np.bincount(data.target[train], minlength=data.num_items + 1).astype(np.float64)

    def score_candidates(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        return self.counts[data.candidates[rows]]

    def score_all(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        return np.broadcast_to(self.counts, (len(rows), len(self.counts)))


def format_table(results: Sequence[dict], section: str = "candidates") -> str:
    """A Markdown table, one row per result."""
    header = "| model | samples | " + " | ".join(METRIC_NAMES) + " |"
    lines = [header, "|" + "---|" * (len(METRIC_NAMES) + 2)]
    for res in results:
        if section not in res:
            continue
        m = res[section]
        lines.append(f"| {res['model']} | {res['num_samples']} | " + " | ".join(f"{m[k]:.4f}" for k in METRIC_NAMES) + " |")
    return "\n".join(lines)
