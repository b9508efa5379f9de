"""Two-stage ranking over the whole catalogue, as LlamaRec uses its LLM (Yue et al. 2023): a
conventional model retrieves its top items among those the user has not seen, and the LLM ranks
them; items not retrieved rank below every retrieved one (LlamaRec counts such a target as a miss).

On the fixed 15 candidates of the `paper` protocol the candidates are given, and the retrieval
stage is their order: `TeacherOrder` lists them in the retriever's (the teacher's) order, best
first, as LlamaRec lists its retrieved items. `RetrieveThenRank` is the two-stage use over the
whole catalogue (its rules: delrec.evaluation.two_stage), which `delrec evaluate --full-ranking`,
the `loo` protocol (whose models are compared by full ranking) and `delrec run`'s `full_ranking:`
evaluation of every LLM model use.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from delrec.core.layout import RunLayout
from delrec.evaluation.two_stage import DEFAULT_RETRIEVE, score_retrieved, two_stage_ranks
from delrec.teachers.trained import TeacherScorer, load_teacher, pick_device

LLAMAREC_RETRIEVE = DEFAULT_RETRIEVE  # LlamaRec's retrieval size


class TeacherOrder:
    """Each sample's candidates in the order of a trained teacher's scores, best first (ties
    keep their stored order): LlamaRec's retrieval stage on a fixed candidate set. The teacher is
    the run's (trained on the train split only), scoring from the sample's history and, for the
    run's own samples, its user (what the teacher's own evaluation uses); it loads on first use.
    An LLMScorer given one (its `candidate_order`) lists the candidates so, in training and at
    evaluation alike."""

    def __init__(self, run_dir: str | Path, teacher: str, data, device: str = "cpu"):
        self.run_dir, self.teacher, self.data, self.device = Path(run_dir), teacher, data, device
        self._scorer = None

    def order(self, data, rows: np.ndarray) -> np.ndarray:
        """[len(rows), num_candidates]: stored candidate positions, the teacher's best first."""
        if self._scorer is None:

            model = load_teacher(RunLayout(self.run_dir).teacher(self.teacher), self.device, self.data)
            self._scorer = TeacherScorer(model, pick_device(self.device), self.teacher)
        scores = np.asarray(self._scorer.score_candidates(data, np.asarray(rows)), dtype=np.float64)
        return np.argsort(-scores, axis=1, kind="stable")


class RetrieveThenRank:
    """A candidate-set ranker (`ranker`, e.g. LlamaRec's lettered LLM) made a full ranker by a
    retriever (a teacher's scorer, loaded on first use by `retriever`)."""

    def __init__(self, ranker, retriever: Callable[[], object], retrieve: int = LLAMAREC_RETRIEVE):
        if retrieve < 2:
            raise ValueError(f"retrieve at least 2 items to rank, got {retrieve}")
        self.ranker, self._make_retriever, self._retriever, self.retrieve = ranker, retriever, None, retrieve
        self.name = ranker.name

    def __getattr__(self, name):  # batch_size, verbalizer, ... of the ranker
        if name.startswith("_") or name in ("ranker", "retrieve", "name"):
            raise AttributeError(name)
        return getattr(self.ranker, name)

    def score_candidates(self, data, rows: np.ndarray):
        return self.ranker.score_candidates(data, rows)

    def _retriever_scorer(self):
        if self._retriever is None:
            self._retriever = self._make_retriever()
        return self._retriever

    @torch.no_grad()
    def score_all(self, data, rows: np.ndarray) -> torch.Tensor:
        """[len(rows), num_items + 1]: the LLM's scores of the retrieved items (listed to it as in
        evaluation.two_stage), -inf elsewhere."""
        rows = np.asarray(rows)
        top, scores = score_retrieved(self.ranker, self._retriever_scorer(), data, rows, min(self.retrieve, data.num_items - 1))
        out = torch.full((len(rows), data.num_items + 1), float("-inf"))
        out.scatter_(1, torch.as_tensor(top), torch.as_tensor(scores).float())
        return out

    def two_stage_ranks(self, data, rows: np.ndarray) -> np.ndarray:
        """The target's rank over the catalogue by evaluation.two_stage (ties broken by the
        retriever's order); what `full_ranks` uses for this scorer."""
        return two_stage_ranks(self.ranker, self._retriever_scorer(), data, rows, self.retrieve)[0]
