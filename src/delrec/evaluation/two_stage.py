"""Two-stage evaluation over the whole catalogue, for models that rank a candidate set (every LLM
model): a retriever (the run's teacher) takes its top K among the items the user has not
interacted with before the target, the model ranks those K, and every item not retrieved ranks
below them, so a target outside the K is a miss. This is how an LLM ranker is used over a real
catalogue (LlamaRec retrieves 20) and it answers the doubt about sampled metrics (Krichene &
Rendle 2020): the 15 fixed candidates are the paper's protocol, not the catalogue.

Choices, each the same for every model compared:
- The K items are listed to the model in a seeded shuffled order (per sample, `LISTING_SEED`),
  not best first: the methods were trained with the target at a random position, and a model
  must not get credit for the retriever's order through where an item stands in its prompt
  (a model that reorders by its teacher, like LlamaRec, still does so).
- The model's ties are broken by the retriever's order. So a model with constant scores gets
  exactly the retriever's ranks, and no model gains from a tie it cannot break.
- A target that was not retrieved ranks last among the items it could have been (pessimistic).
- The model scores only the samples whose target was retrieved: any other is a miss whatever it
  answers (with SASRec's recall@20 near 0.3 on ML-100K that is 3x fewer LLM calls).
- The retriever never sees the target: a target the user had already interacted with is not
  retrievable (the retriever's own full ranking, evaluation.metrics.full_ranks, keeps such a
  repeated target rankable, so the two differ on data sets with repeats; ML-100K has none).
- K is lowered, for all samples alike, when a user in the evaluated rows has fewer than K
  unseen items (only on tiny catalogues); the result records the K used.
"""

from __future__ import annotations

import numpy as np
import torch

from delrec.core import distributed
from delrec.data.store import CandidateView, RunData
from delrec.evaluation.metrics import full_catalogue_rows
from delrec.evaluation.orders import seeded_permutations

DEFAULT_RETRIEVE = 20  # LlamaRec's retrieval size
LISTING_SEED = 0


def retrievable(data: RunData, rows: np.ndarray, retrieve: int) -> int:
    """The K used on `rows`: `retrieve`, or fewer when some user has fewer unseen items."""
    if retrieve < 2:
        raise ValueError(f"retrieve at least 2 items to rank, got {retrieve}")
    fewest_unseen = data.num_items - int(data.position[np.asarray(rows)].max(initial=0))
    return max(1, min(retrieve, fewest_unseen))


def retrieve_top(retriever, data: RunData, rows: np.ndarray, k: int) -> np.ndarray:
    """[len(rows), k] item indices: the retriever's top k unseen items of each row, best first."""
    scores = torch.as_tensor(retriever.score_all(data, rows), dtype=torch.float32).clone()
    scores[:, 0] = float("-inf")  # padding
    seen_row, seen_item = data.seen_items(rows)
    scores[torch.as_tensor(seen_row), torch.as_tensor(seen_item)] = float("-inf")
    return scores.topk(k, dim=1).indices.numpy()


def listing_order(sample_ids: np.ndarray, k: int) -> np.ndarray:
    """[len(sample_ids), k]: the order each sample's retrieved items are listed in to the model."""
    return seeded_permutations(sample_ids, k, LISTING_SEED)


def score_retrieved(ranker, retriever, data: RunData, rows: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(the retriever's top k items of each row, best first; the ranker's scores of them in that
    order, float64), the items listed to the ranker in `listing_order`."""
    top = retrieve_top(retriever, data, rows, k)
    return top, _scores_of_retrieved(ranker, data, rows, top)


def _scores_of_retrieved(ranker, data: RunData, rows: np.ndarray, top: np.ndarray) -> np.ndarray:
    """The ranker's scores of each row's retrieved items `top` (best first), listed to it in
    `listing_order` and returned in the retriever's order."""
    listing = listing_order(data.sample_id[rows], top.shape[1])
    listed = np.take_along_axis(top, listing, axis=1)
    scores = np.asarray(ranker.score_candidates(CandidateView(data, rows, listed), np.arange(len(rows))), dtype=np.float64)
    by_retriever = np.empty_like(scores)
    np.put_along_axis(by_retriever, listing, scores, axis=1)
    return by_retriever


def two_stage_ranks(ranker, retriever, data: RunData, rows: np.ndarray, retrieve: int = DEFAULT_RETRIEVE,
                    block: int = 64) -> tuple[np.ndarray, int]:
    """(each row's 0-based rank of the target over the catalogue, the K used): `retriever`
    (anything with `score_all`) retrieves, `ranker` (anything with `score_candidates`) ranks the
    retrieved items; see the module docstring for ties, listing and misses. Only the rows whose
    target was retrieved are scored: any other row is a miss whatever the ranker says, and with
    a retriever's recall@20 near 0.3 that skips most of the ranker's work."""
    rows = np.asarray(rows)
    k = retrievable(data, rows, retrieve)
    inner = getattr(ranker, "batch_size", None) or 8
    step = max(1, min(block, full_catalogue_rows(data.num_items, block)) // inner) * inner

    def ranks(part: np.ndarray) -> np.ndarray:
        if not len(part):
            return np.zeros(0, dtype=np.int64)
        top = np.concatenate([retrieve_top(retriever, data, part[s : s + step], k) for s in range(0, len(part), step)])
        return _ranks(ranker, data, part, top, step)

    return distributed.current().map_sharded(ranks, rows, inner), k


def _ranks(ranker, data: RunData, rows: np.ndarray, top: np.ndarray, step: int) -> np.ndarray:
    hit = top == data.target[rows][:, None]
    # not retrieved: below every retrieved item, last among the items it could have been
    ranks = np.maximum(data.num_items - data.position[rows] - 1, top.shape[1]).astype(np.int64)
    scored = np.flatnonzero(hit.any(axis=1))
    for s in range(0, len(scored), step):
        block = scored[s : s + step]
        by_retriever = _scores_of_retrieved(ranker, data, rows[block], top[block])
        if np.isnan(by_retriever).any():
            raise ValueError("scores contain NaN; the model diverged or produced invalid output")
        order = np.argsort(-by_retriever, axis=1, kind="stable")  # best first; ties keep the retriever's order
        target_col = hit[block].argmax(axis=1)
        ranks[block] = (order == target_col[:, None]).argmax(axis=1)
    return ranks
