"""Order robustness: an LLM ranker reads its candidates as a list, and the order of that list can
change its answer (LLMRank, Hou et al. 2024; "lost in the middle"). Each model is scored again
with every sample's candidates listed in other seeded orders, on the same samples and candidates;
the spread of each metric across orders, and the share of samples whose top-1 changes, is what a
user should expect from the order alone. A model that ignores the order (a teacher, or an LLM
method that lists candidates in its teacher's order) is unchanged.
"""

from __future__ import annotations

import numpy as np

from delrec.data.store import CandidateView, RunData
from delrec.evaluation.metrics import METRIC_NAMES, candidate_outcomes, metrics_from_ranks


def seeded_permutations(sample_ids: np.ndarray, width: int, seed: int) -> np.ndarray:
    """[len(sample_ids), width]: one seeded permutation per sample id, the same for a sample
    whatever other samples are drawn with it."""
    if not len(sample_ids):
        return np.zeros((0, width), dtype=np.int64)
    return np.stack([np.random.default_rng([seed, int(s)]).permutation(width) for s in sample_ids])


def reordered(data: RunData, rows: np.ndarray, seed: int) -> CandidateView:
    """`rows` with each sample's stored candidates in a seeded order (`seeded_permutations`)."""
    rows = np.asarray(rows)
    perms = seeded_permutations(data.sample_id[rows], data.candidates.shape[1], seed)
    return CandidateView(data, rows, np.take_along_axis(data.candidates[rows], perms, axis=1))


def order_outcomes(scorer, data: RunData, rows: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(ranks, top-1 items) of `rows` with the candidates listed in the order of `seed`."""
    view = reordered(data, rows, seed)
    return candidate_outcomes(scorer, view, np.arange(len(rows)))


def order_summary(stored: tuple[np.ndarray, np.ndarray], others: dict[int, tuple[np.ndarray, np.ndarray]]) -> dict:
    """Metrics in each order (`stored` first, then each seed's), each metric's spread (max - min)
    across them, and the share of samples whose top-1 differs from the stored order's."""
    per_order = {"stored": metrics_from_ranks(stored[0])} | {f"seed {s}": metrics_from_ranks(r) for s, (r, _) in others.items()}
    spread = {m: max(v[m] for v in per_order.values()) - min(v[m] for v in per_order.values()) for m in METRIC_NAMES}
    changed = {f"seed {s}": float(np.mean(top1 != stored[1])) for s, (_, top1) in others.items()}
    return {"metrics": per_order, "spread": spread, "top1_changed": changed}
