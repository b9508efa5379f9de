"""Training and validation examples for DELRec's stage 1 (paper Section IV-B), built from a run.

* Temporal Analysis (TA): the sequence is a sample's history followed by its target; the most
  recent history item is masked and is the label. Its candidates are the sample's fixed 14
  negatives plus the label (in the target's shuffled slot), so no item the user had seen by then
  is offered as a distractor.
* Recommendation Pattern Simulating (RPS): the teacher's top-h list for the sample (written by
  `delrec teacher train`), shown shuffled; the label is the teacher's top-1.

Only samples of the split asked for are used (the train split for training): no information
from a later split reaches a training example.
"""

from __future__ import annotations

import numpy as np

from delrec.data.store import RunData
from delrec.llm.templates import Prompt, Templates, prompt_titles, rps_prompt, ta_prompt
from delrec.teachers.lists import TeacherLists


class ExampleBuilder:
    def __init__(self, data: RunData, templates: Templates, teacher: TeacherLists | None = None,
                 ta_examples: int = 4, top_h: int | None = None, seed: int = 0):
        self.data = data
        self.templates = templates
        self.teacher = teacher
        self.ta_examples = ta_examples
        self.top_h = top_h
        self.seed = seed
        self.titles = prompt_titles(data.items, templates.max_title_chars)  # as the prompts show them

    def eligible(self, split: str, task: str) -> np.ndarray:
        """Rows of `split` that can make a `task` example (TA needs two earlier items)."""
        rows = self.data.indices(split)
        if task == "ta":
            return rows[self.data.history_len[rows] >= 2]
        if task == "rps":
            if self.teacher is None:
                raise ValueError("RPS examples need the teacher's top-h lists")
            return rows
        raise ValueError(f"unknown task {task!r}")

    def ta(self, row: int) -> Prompt:
        d = self.data
        history = d.history[row][d.history[row] > 0]
        masked = history[-1]
        candidates = np.where(d.candidates[row] == d.target[row], masked, d.candidates[row])
        sequence = [self.titles[i] for i in [*history, d.target[row]]]
        return ta_prompt(self.templates, sequence, [self.titles[i] for i in candidates], self.ta_examples)

    def rps(self, row: int) -> Prompt:
        d = self.data
        top = self.teacher.topk[row][: self.top_h]
        history = [self.titles[i] for i in d.history[row] if i > 0]
        rng = np.random.default_rng([self.seed, int(d.sample_id[row])])  # same shuffle every epoch and run
        return rps_prompt(self.templates, history, [self.titles[i] for i in top], rng)

    def build(self, task: str, rows) -> list[Prompt]:
        make = self.ta if task == "ta" else self.rps
        return [make(int(r)) for r in rows]
