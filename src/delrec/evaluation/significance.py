"""Paired significance tests of two models scored on the same test samples.

* HR@k (a hit or a miss per sample): McNemar's exact test, two-sided; only the samples where
  the two models disagree count.
* NDCG@k (a number per sample): a paired sign-flip permutation test of the mean difference,
  two-sided, seeded (the paper used a t-test; this one assumes no normality).
* A paired bootstrap 95% interval of the mean difference.
"""

from __future__ import annotations

import math

import numpy as np


def per_sample(ranks: np.ndarray, metric: str) -> np.ndarray:
    """A metric's value for each sample from its 0-based rank (HR@k or NDCG@k)."""
    name, k = metric.split("@")
    ranks, k = np.asarray(ranks), int(k)
    if name == "HR":
        return (ranks < k).astype(np.float64)
    if name == "NDCG":
        return np.where(ranks < k, 1.0 / np.log2(ranks + 2.0), 0.0)
    raise ValueError(f"unknown metric {metric!r}")


def mcnemar_exact(a: np.ndarray, b: np.ndarray) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes a, b."""
    a, b = np.asarray(a).astype(bool), np.asarray(b).astype(bool)
    if a.shape != b.shape:
        raise ValueError("paired outcomes must have the same length")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def permutation_test(x: np.ndarray, y: np.ndarray, rounds: int = 10_000, seed: int = 0) -> float:
    """Two-sided p-value of mean(x - y) = 0 by flipping the sign of each paired difference."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    if d.size == 0:
        raise ValueError("no paired samples")
    observed = abs(d.mean())
    signs = np.random.default_rng(seed).choice([-1.0, 1.0], size=(rounds, d.size))
    null = np.abs((signs * d).mean(axis=1))
    return float((1 + (null >= observed - 1e-12).sum()) / (rounds + 1))


def bootstrap_interval(x: np.ndarray, y: np.ndarray, rounds: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """Paired bootstrap 95% interval of mean(x - y)."""
    d = np.asarray(x, dtype=np.float64) - np.asarray(y, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, d.size, size=(rounds, d.size))
    means = d[idx].mean(axis=1)
    return float(np.quantile(means, 0.025)), float(np.quantile(means, 0.975))


def compare(ranks_a: np.ndarray, ranks_b: np.ndarray, metrics=("HR@1", "NDCG@5")) -> dict:
    """Model a against model b on each metric: both means, the difference, its 95% interval,
    the relative change and the p-value."""
    out = {}
    for m in metrics:
        a, b = per_sample(ranks_a, m), per_sample(ranks_b, m)
        p = mcnemar_exact(a, b) if m.startswith("HR") else permutation_test(a, b)
        lo, hi = bootstrap_interval(a, b)
        out[m] = {"a": float(a.mean()), "b": float(b.mean()), "diff": float(a.mean() - b.mean()),
                  "ci95": [lo, hi], "relative": float(a.mean() / b.mean() - 1) if b.mean() > 0 else None,
                  "p_value": p, "test": "McNemar exact" if m.startswith("HR") else "paired sign-flip permutation"}
    return out
