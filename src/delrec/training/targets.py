"""What stage 2's loss reads beside the prompts: which of a prompt's candidates each training
example scores (`train_negatives`), and the teacher's scores of them (the distillation term).

Both are per sample and reproducible: the negatives kept are a draw seeded by the stage's seed and
the sample's id, so a resumed or repeated run scores the same titles; the teacher's scores come
from the run's trained teacher (trained on the train split only), in the order the prompt lists
the candidates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from delrec.core.layout import RunLayout
from delrec.data.store import RunData
from delrec.teachers.trained import TeacherScorer, load_teacher


def teacher_scorer(run_dir: Path, teacher: str, data: RunData, required: bool) -> TeacherScorer | None:
    """The run's trained `teacher` as a scorer of candidates (on the CPU: it is small), or None
    when it is not there and not `required` (its agreement with the LLM is then not logged)."""
    folder = RunLayout(Path(run_dir)).teacher(teacher)
    if not required and not (folder / "model.safetensors").exists():
        return None
    return TeacherScorer(load_teacher(folder, "cpu", data), torch.device("cpu"))


class CandidateTargets:
    def __init__(self, data: RunData, teacher: TeacherScorer | None, negatives: int | None, seed: int):
        width = data.candidates.shape[1]
        if negatives is not None and negatives > width - 1:
            raise ValueError(f"train_negatives={negatives}, but a prompt has only {width - 1} negatives")
        self.data, self.teacher, self.seed = data, teacher, seed
        self.negatives = None if negatives is None or negatives == width - 1 else negatives

    def keep(self, rows: np.ndarray, order: np.ndarray) -> list[list[int]] | None:
        """Per row, the display positions scored in the loss: the label's and `negatives` others
        drawn without replacement, in display order (None: all of them)."""
        if self.negatives is None:
            return None
        d = self.data
        shown = np.take_along_axis(d.candidates[rows], order, axis=1)
        out = []
        for row, items in zip(rows, shown):
            label = int(np.flatnonzero(items == d.target[row])[0])
            others = np.delete(np.arange(len(items)), label)
            rng = np.random.default_rng([self.seed, int(d.sample_id[row])])
            out.append(sorted([label, *rng.choice(others, size=self.negatives, replace=False).tolist()]))
        return out

    def teacher_scores(self, rows: np.ndarray, order: np.ndarray) -> list[torch.Tensor] | None:
        """Per row, the teacher's scores of its candidates in display order (None without a teacher)."""
        if self.teacher is None:
            return None
        stored = torch.as_tensor(self.teacher.score_candidates(self.data, rows))
        return list(torch.take_along_dim(stored, torch.as_tensor(np.ascontiguousarray(order)), dim=1))
