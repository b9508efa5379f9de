"""A trained teacher's top lists as later steps read them: stage 1's RPS examples (TeacherLists),
the `teacher-list` prompt (TeacherTop) and the pipeline's staleness check (stored_top_h)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from delrec.core.layout import RunLayout
from delrec.data.store import CandidateView, RunData
from delrec.teachers.trained import load_teacher

# the teacher lists stored per sample (topk.parquet) and read by stage 1's RPS prompts: the paper's h
DEFAULT_TOP_H = 10


def stored_top_h(path: str | Path) -> int:
    """The width of the top-h lists in a teacher's topk.parquet (its fixed list size)."""
    return pq.read_schema(path).field("topk").type.list_size


class TeacherLists:
    """The teacher's top-h item lists, one per sample (RUN/teachers/<name>/topk.parquet)."""

    def __init__(self, topk: np.ndarray, name: str):
        self.topk = topk
        self.name = name

    @classmethod
    def load(cls, run_dir: str | Path, teacher: str, data: RunData, top_h: int | None = None) -> TeacherLists:
        """`top_h`: the width the caller will use; more than the stored lists hold is an error.
        Data without samples (RunData.catalogue_only: an exported model) has no lists to load."""
        if len(data.sample_id) == 0:
            return cls(np.zeros((0, top_h or DEFAULT_TOP_H), dtype=np.int64), teacher)
        path = RunLayout(Path(run_dir)).teacher(teacher) / "topk.parquet"
        if not path.exists() and path.with_name("metrics.json").exists():
            raise FileNotFoundError(f"{teacher} stores no top-h lists ({path}): a target-aware model (teachers/kda.py) cannot "
                                    "be a DELRec teacher; choose another teacher")
        if not path.exists():
            raise FileNotFoundError(f"no top-h lists at {path}; run `delrec teacher train --model {teacher}` first")
        stored = stored_top_h(path)
        if top_h is not None and top_h > stored:
            raise ValueError(f"{path} holds the teacher's top-{stored} lists, but top_h={top_h} was asked for; "
                             f"train the teacher again with --top-h {top_h} (or top_h: {top_h} in the run config)")
        table = pq.read_table(path)
        ids = table.column("sample_id").to_numpy()
        if not np.array_equal(ids, data.sample_id):
            raise ValueError(f"{path} does not match the run's samples (was the data prepared again?)")
        topk = np.stack(table.column("topk").to_numpy(zero_copy_only=False)).astype(np.int64)
        return cls(topk, teacher)


class TeacherTop:
    """The teacher's top-`size` recommendations (best first) for whatever rows a scorer is given:
    what the `teacher-list` prompt writes in (delrec.methods).

    For the run's own samples these are the stored lists (topk.parquet): each computed from that
    sample's history (and, for teachers with a user part, the user's embedding) by the teacher
    trained on the train split, with the items the user had seen before the target excluded. So a
    valid or test sample's list holds nothing from its own time or later. (A train sample's list
    comes from a teacher that was trained on it: the same holds for every model trained on that
    split, and for RecRanker's conventional models.) Other rows, such as delrec.serving.recommender's
    requests, are not the run's samples: their list is computed here by the teacher from the
    history alone, with the history's items excluded."""

    def __init__(self, run_dir: str | Path, teacher: str, data: RunData, size: int):
        if size < 1:
            raise ValueError(f"the teacher's list needs at least one item, got size {size}")
        self.run_dir, self.teacher, self.size, self.data = Path(run_dir), teacher, size, data
        self.stored = TeacherLists.load(run_dir, teacher, data, top_h=size)
        self._model = None

    def lists(self, data, rows: np.ndarray) -> np.ndarray:
        """[len(rows), size] item indices of the teacher's top list of each row of `data`."""
        rows = np.asarray(rows)
        if isinstance(data, CandidateView) and self._is_the_run(data.base):  # the run's samples, other candidates
            return self.stored.topk[data.base_rows[rows], : self.size]
        if self._is_the_run(data):
            return self.stored.topk[rows, : self.size]
        return self._from_history(data.history[rows])

    def _is_the_run(self, data) -> bool:
        if getattr(data, "unknown_users", False):  # requests: rows are not samples of the run
            return False
        ids = getattr(data, "sample_id", None)
        return ids is self.data.sample_id or (ids is not None and np.array_equal(ids, self.data.sample_id))

    def _from_history(self, history: np.ndarray) -> np.ndarray:
        if self._model is None:
            self._model = load_teacher(RunLayout(self.run_dir).teacher(self.teacher), "cpu", self.data)
        model = self._model
        with torch.no_grad():
            scores = model.score_all(torch.as_tensor(history[:, -model.max_len :]), None).float()  # None: no user part
        scores[:, 0] = float("-inf")
        rows = np.repeat(np.arange(len(history)), history.shape[1])
        scores[torch.as_tensor(rows), torch.as_tensor(history.reshape(-1))] = float("-inf")  # never what the user has
        return scores.topk(self.size, dim=1).indices.numpy()
