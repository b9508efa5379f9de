"""The teacher's top list written into the prompt (Table II's RecRanker / LLM-TRSR paradigm):
the plain prompt with the teacher's top `list_size` recommendations as text, fine-tuned
as in stage 2 (docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np

from delrec.llm.scorer import PromptStyle
from delrec.llm.templates import Prompt, Templates, teacher_list_prompt
from delrec.methods.registry import Method, Stage2Extra
from delrec.teachers.lists import TeacherTop


class TeacherListStyle(PromptStyle):
    """The plain prompt with each sample's teacher list (`teacher_top`: its lists per row)."""

    name = "teacher-list"

    def __init__(self, teacher_top: TeacherTop, order=None):
        super().__init__(None, order)
        self.name, self.teacher_top = "teacher-list", teacher_top

    def row_lists(self, data, rows: np.ndarray) -> Sequence:
        return self.teacher_top.lists(data, rows)

    def write(self, t: Templates, titles: Sequence[str], history: Sequence[int], candidates: Sequence[int],
              label: int | None, row_list: Sequence[int] | None, text_only: bool) -> Prompt:
        if row_list is None:
            raise ValueError("the `teacher-list` prompt needs the teacher's top list of the sample")
        return teacher_list_prompt(t, [titles[i] for i in history], [titles[i] for i in candidates],
                                   [titles[i] for i in row_list], label=titles[label] if label is not None else None)


@dataclass
class TeacherListOptions:
    """teacher-list's own settings (a run config's `method_options: {teacher-list: {...}}`)."""

    list_size: int = 10  # the teacher's top items the prompt lists (at most the top_h the teachers store)

    def __post_init__(self):
        if self.list_size < 1:
            raise ValueError(f"list_size must be at least 1, got {self.list_size}")


class TeacherList(Method):
    needs_teacher_lists: ClassVar[bool] = True
    options_cls: ClassVar[type] = TeacherListOptions

    def prompt_style(self, run_dir: Path, data, teacher: str, extra: Stage2Extra, options: TeacherListOptions,
                     candidate_order: str) -> PromptStyle:
        return TeacherListStyle(TeacherTop(run_dir, teacher, data, options.list_size),
                                self._order(run_dir, teacher, data, candidate_order))


METHOD = TeacherList(
    "teacher-list", "teacher list in prompt, RecRanker / LLM-TRSR style",
    "the teacher's top-h recommendations written into the plain prompt as text, fine-tuned as in stage 2 "
    "(the first paradigm: RecRanker, Luo et al. 2023/2024; LLM-TRSR, Zheng et al. WWW 2024)",
    stage1="none", soft_prompt_source="none", prompt="teacher-list", ablation=False, paper_rows=("RecRanker", "LLM-TRSR"))
