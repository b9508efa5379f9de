"""Which samples a stage trains and validates on: drawn once, here, for every stage and the report.

Stage 2 draws its train order and then its valid subset from one generator seeded with the
stage's seed; stage 1's `w/o LSR` evaluation and the report's curves use the same valid subset
(`valid_subset`), so every curve of a run is on the same samples.
"""

from __future__ import annotations

import numpy as np

from delrec.core import distributed
from delrec.data.store import RunData


def train_and_valid_rows(data: RunData, seed: int, valid_samples: int,
                         max_train_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A seeded order of the train rows (the first `max_train_examples` of it, if given) and a
    fixed subset of `valid_samples` valid rows (sorted), in that order from one generator."""
    rng = np.random.default_rng(seed)
    train = rng.permutation(data.indices("train"))
    if max_train_examples:
        train = train[:max_train_examples]
    return train, np.sort(rng.permutation(data.indices("valid"))[:valid_samples])


def valid_subset(data: RunData, seed: int, valid_samples: int) -> np.ndarray:
    """The valid rows stage 2 evaluates with this seed and `valid_samples`."""
    return train_and_valid_rows(data, seed, valid_samples)[1]


def local_batch(order: np.ndarray, step: int, micro: int, grad_accum: int, batch_size: int) -> tuple[np.ndarray, float]:
    """The rows of micro-batch `micro` of step `step` that this process computes, and the scale of
    its loss: the global batch is the next `batch_size` rows of `order` (wrapping around), and
    under a multi-process launch each process takes its share of it (the data-parallel seam: a
    stage's step never asks which process it is)."""
    k = (step * grad_accum + micro) * batch_size
    batch = np.take(order, range(k, k + batch_size), mode="wrap")
    dist = distributed.current()
    rows = dist.local_share(batch)
    return rows, dist.loss_scale(len(rows), len(batch))
