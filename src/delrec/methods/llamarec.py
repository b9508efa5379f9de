"""LlamaRec (Yue et al. 2023): the candidates in the teacher's order (its retrieval stage) under
index letters (A), (B), ..., each scored by the LM head's log-probability of its letter at the
answer position, one forward pass per prompt; fine-tuned as in stage 2. Over the whole catalogue
the teacher retrieves and the LLM ranks what it retrieved (docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from delrec.llm.backbone import Backbone
from delrec.llm.letters import LetterVerbalizer
from delrec.llm.scorer import PromptStyle
from delrec.llm.templates import Prompt, Templates, lettered_prompt
from delrec.llm.verbalizer import Verbalizer
from delrec.methods.registry import Method, Stage2Extra
from delrec.teachers.retrieval import RetrieveThenRank


class LetteredStyle(PromptStyle):
    """LlamaRec's prompt, read by its letter verbalizer."""

    def __init__(self, order=None):
        super().__init__(None, order)
        self.name = "lettered"

    def write(self, t: Templates, titles: Sequence[str], history: Sequence[int], candidates: Sequence[int],
              label: int | None, row_list: Sequence[int] | None, text_only: bool) -> Prompt:
        return lettered_prompt(t, [titles[i] for i in history], [titles[i] for i in candidates],
                               label=titles[label] if label is not None else None)

    def verbalizer(self, backbone: Backbone, title_scoring: str, batch_size: int) -> Verbalizer:
        if title_scoring != "full-title":
            raise ValueError(f"the lettered prompt (LlamaRec) is scored by its index letters; the title verbalizer "
                             f"{title_scoring!r} does not apply")
        return LetterVerbalizer(backbone, batch_size)


class LlamaRec(Method):
    def prompt_style(self, run_dir: Path, data, teacher: str, extra: Stage2Extra, options,
                     candidate_order: str) -> PromptStyle:
        return LetteredStyle(self._order(run_dir, teacher, data, candidate_order))

    def for_full_ranking(self, scorer, teacher_scorer: Callable):
        return RetrieveThenRank(scorer, teacher_scorer)  # its teacher retrieves for full ranking


METHOD = LlamaRec(
    "llamarec", "LlamaRec",
    "the candidates listed in the teacher's order (its retrieval stage) under index letters (A), (B), ...; "
    "each scored by the LM head's log-probability "
    "of its letter at the answer position, one forward pass per prompt; fine-tuned as in stage 2 "
    "(LlamaRec, Yue et al. 2023)", stage1="none", soft_prompt_source="none", prompt="lettered", ranker="letters",
    candidate_order="teacher", ablation=False, paper_rows=("LlamaRec",))
