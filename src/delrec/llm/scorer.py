"""The LLM as a recommender: a method's recommendation prompts over a run's samples, scored by its
verbalizer, behind the same Scorer interface (and so the same evaluator) as the teachers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from delrec import distributed
from delrec.data.protocol import RunData
from delrec.llm.backbone import Backbone
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Prompt, Templates, hybrid_prompt, lettered_prompt, lsr_prompt, prompt_titles, teacher_list_prompt
from delrec.llm.verbalizer import LetterVerbalizer, Verbalizer
from delrec.methods import PROMPTS


class LLMScorer:
    """Scores each sample's fixed candidates (in their on-disk, shuffled order) with a method's
    recommendation prompt (`prompt`, one of delrec.methods.PROMPTS; default: the LSR prompt with a
    soft prompt, the plain prompt without one, which is the zero-shot LLM). `model-card` and
    `empty-slot` are the `w MCP` and `w/o DPSM` prompts; `teacher-list` writes the teacher's top
    list in (`teacher_top` gives it per sample: stages.examples.TeacherTop); `lettered` lists the
    candidates under index letters and scores them with LlamaRec's letter verbalizer; `hybrid`
    (LLaRA) puts an item vector after each title, made by `item_projector` from the item's
    teacher embedding (llm/item_projector.py). `candidate_order` (LlamaRec's retrieval stage,
    delrec.retrieval.TeacherOrder) lists each sample's candidates in another order than the
    stored one; scores are returned in the stored order all the same."""

    def __init__(
        self,
        backbone: Backbone,
        titles: Sequence[str],
        templates: Templates | None = None,
        soft_prompt: SoftPrompt | None = None,
        prompt: str | None = None,
        method: str = "full-title",
        batch_size: int = 8,
        name: str | None = None,
        progress: bool = True,
        teacher_top=None,
        item_projector=None,
        candidate_order=None,
    ):
        self.backbone = backbone
        self.titles = list(titles)  # indexed by item_idx; [0] is padding
        self.templates = templates or Templates()
        self.soft_prompt = soft_prompt
        self.prompt_kind = prompt or ("lsr" if soft_prompt is not None else "plain")
        if self.prompt_kind not in PROMPTS or self.prompt_kind == "none":
            raise ValueError(f"unknown recommendation prompt {self.prompt_kind!r}; choose one of {PROMPTS[:-1]}")
        if (self.prompt_kind == "lsr") != (soft_prompt is not None):
            raise ValueError("a soft prompt goes with the `lsr` prompt (its slot), and only with it")
        if (self.prompt_kind == "teacher-list") != (teacher_top is not None):
            raise ValueError("the `teacher-list` prompt needs the teacher's top lists (teacher_top), and only it uses them")
        self.teacher_top = teacher_top
        if (self.prompt_kind == "hybrid") != (item_projector is not None):
            raise ValueError("the `hybrid` prompt (LLaRA) needs its item projector (item_projector), and only it uses one")
        if item_projector is not None and item_projector.num_items != len(self.titles) - 1:
            raise ValueError(f"the item projector holds the teacher's embeddings of {item_projector.num_items} items, but "
                             f"this run has {len(self.titles) - 1}: it was trained on other data")
        self.item_projector = item_projector
        self.candidate_order = candidate_order
        if self.prompt_kind == "lettered":
            if method != "full-title":
                raise ValueError(f"the lettered prompt (LlamaRec) is scored by its index letters; the title verbalizer "
                                 f"{method!r} does not apply")
            self.verbalizer = LetterVerbalizer(backbone, batch_size)
        else:
            self.verbalizer = Verbalizer(backbone, method, batch_size, item_vectors=item_projector)
        self.name = name or f"llm:{backbone.name}"
        self.progress = progress

    @property
    def batch_size(self) -> int:
        """Prompts per verbalizer call (the evaluator shards and chunks rows in multiples of it)."""
        return self.verbalizer.batch_size

    @classmethod
    def for_run(cls, data: RunData, backbone: Backbone, **kwargs) -> LLMScorer:
        templates = kwargs.get("templates") or Templates()
        return cls(backbone, prompt_titles(data.items, templates.max_title_chars), **kwargs)

    def prompt(self, history: Sequence[int], candidates: Sequence[int], label: int | None = None,
               teacher_top: Sequence[int] | None = None, text_only: bool = False) -> Prompt:
        """The prompt of one sample (item indices); `teacher_top`: the teacher's list for it, which
        the `teacher-list` prompt needs (`prompts` looks it up); `text_only`: the `hybrid` prompt
        without its item vectors (where LLaRA's curriculum starts)."""
        titles, t, kind = self.titles, self.templates, self.prompt_kind
        if text_only and kind != "hybrid":
            raise ValueError(f"only the `hybrid` prompt has a text-only form, not {kind!r}")
        items = [i for i in history if i > 0]
        shown = [titles[i] for i in items]
        cands = [titles[i] for i in candidates]
        answer = titles[label] if label is not None else None
        if kind == "hybrid":
            return hybrid_prompt(t, shown, cands, items, [int(i) for i in candidates], label=answer, item_vectors=not text_only)
        if kind == "teacher-list":
            if teacher_top is None:
                raise ValueError("the `teacher-list` prompt needs the teacher's top list of the sample")
            return teacher_list_prompt(t, shown, cands, [titles[i] for i in teacher_top], label=answer)
        if kind == "lettered":
            return lettered_prompt(t, shown, cands, label=answer)
        return lsr_prompt(t, shown, cands, label=answer, soft_prompt=kind == "lsr", model_card=kind == "model-card",
                          empty_slot=kind == "empty-slot")

    def display_order(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        """[len(rows), num_candidates]: for each row, the stored candidate positions in the order
        the prompt lists them (the identity unless a `candidate_order` reorders them)."""
        rows = np.asarray(rows)
        if self.candidate_order is None:
            return np.broadcast_to(np.arange(data.candidates.shape[1]), (len(rows), data.candidates.shape[1]))
        return self.candidate_order.order(data, rows)

    def prompts(self, data: RunData, rows: np.ndarray, labels: bool = False, text_only: bool = False,
                order: np.ndarray | None = None) -> list[Prompt]:
        """The prompts of `rows` of `data` (with their ground truth as the label when `labels`;
        `text_only`: see `prompt`), the candidates in `display_order` (`order`, when the caller
        has it already)."""
        rows = np.asarray(rows)
        tops = self.teacher_top.lists(data, rows) if self.teacher_top is not None else [None] * len(rows)
        order = self.display_order(data, rows) if order is None else order
        shown = np.take_along_axis(data.candidates[rows], order, axis=1)
        return [self.prompt(data.history[r], cands, label=data.target[r] if labels else None, teacher_top=top,
                            text_only=text_only)
                for r, cands, top in zip(rows, shown, tops)]

    def score_candidates(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows)
        order = self.display_order(data, rows)
        prompts = self.prompts(data, rows, order=order)
        shown_scores = np.zeros(data.candidates[rows].shape, dtype=np.float32)
        step = self.verbalizer.batch_size
        bar = tqdm(total=len(prompts), desc=f"score {self.name}", unit="req", disable=not (self.progress and distributed.current().is_main))
        for i in range(0, len(prompts), step):
            scores = self.verbalizer.score(prompts[i : i + step], self.soft_prompt)
            shown_scores[i : i + step] = torch.stack(scores).numpy()
            bar.update(len(scores))
        bar.close()
        out = np.empty_like(shown_scores)
        np.put_along_axis(out, order, shown_scores, axis=1)  # back to the stored order
        return out

    def score_all(self, data: RunData, rows: np.ndarray):
        # LlamaRec's own use is two-stage: a retriever's top 20 of the catalogue ranked by the LLM.
        # Full ranking under the `loo` protocol would go here (the teacher's top list as the
        # candidates, the rest of the catalogue below them); not done yet.
        raise NotImplementedError("an LLM ranks candidate sets; full-catalogue ranking is not supported")
