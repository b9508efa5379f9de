"""The LLM as a recommender: a method's recommendation prompts over a run's samples, scored by its
verbalizer, behind the same Scorer interface (and so the same evaluator) as the teachers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from delrec.core import distributed
from delrec.data.store import RunData
from delrec.llm.backbone import Backbone
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Prompt, Templates, lsr_prompt, prompt_titles
from delrec.llm.verbalizer import Verbalizer


class PromptStyle:
    """How a method writes a sample's recommendation prompt, and which verbalizer reads it. This
    one writes the LSR prompt (llm/templates.lsr_prompt), whose slot holds the soft prompt
    (`slot="soft-prompt"`), a hand-written description of the teacher (`"model-card"`, `w MCP`) or
    nothing (`"empty"`, `w/o DPSM`); without a slot (None) it is the plain prompt (`w/o SP`, the
    zero-shot LLM). A method with a prompt of its own subclasses it (delrec.methods: the teacher's
    list, LlamaRec's letters, LLaRA's item vectors). `order` (delrec.teachers.retrieval.TeacherOrder):
    the candidates listed in another order than the stored one; scores come back in the stored
    order all the same."""

    SLOTS = (None, "soft-prompt", "model-card", "empty")
    name = "lsr"
    has_text_only_form = False  # a form without item vectors (LLaRA's curriculum starts from it)
    item_vectors = None  # a module giving each item's input vector (LLaRA's projector), or None

    def __init__(self, slot: str | None = None, order=None):
        if slot not in self.SLOTS:
            raise ValueError(f"unknown prompt slot {slot!r}; choose one of {self.SLOTS}")
        self.slot, self.order = slot, order
        if slot is None:
            self.name = "plain"

    @property
    def uses_soft_prompt(self) -> bool:
        return self.slot == "soft-prompt"

    def row_lists(self, data: RunData, rows: np.ndarray) -> Sequence | None:
        """What each row's prompt shows besides its history and candidates (the teacher's list), or None."""
        return None

    def write(self, t: Templates, titles: Sequence[str], history: Sequence[int], candidates: Sequence[int],
              label: int | None, row_list: Sequence[int] | None, text_only: bool) -> Prompt:
        """One sample's prompt: `history` and `candidates` are item indices into `titles`."""
        answer = titles[label] if label is not None else None
        return lsr_prompt(t, [titles[i] for i in history], [titles[i] for i in candidates], label=answer,
                          soft_prompt=self.slot == "soft-prompt", model_card=self.slot == "model-card",
                          empty_slot=self.slot == "empty")

    def verbalizer(self, backbone: Backbone, title_scoring: str, batch_size: int) -> Verbalizer:
        """The verbalizer that scores this prompt's candidates (`title_scoring`: verbalizer.TITLE_SCORINGS)."""
        return Verbalizer(backbone, title_scoring, batch_size, item_vectors=self.item_vectors)


class LLMScorer:
    """Scores each sample's fixed candidates (in their on-disk, shuffled order) with a method's
    recommendation prompt (`style`, a PromptStyle; default: the LSR prompt with a soft prompt, the
    plain prompt without one, which is the zero-shot LLM), read by the style's verbalizer."""

    def __init__(
        self,
        backbone: Backbone,
        titles: Sequence[str],
        templates: Templates | None = None,
        soft_prompt: SoftPrompt | None = None,
        style: PromptStyle | None = None,
        title_scoring: str = "full-title",
        batch_size: int = 8,
        name: str | None = None,
        progress: bool = True,
    ):
        self.backbone = backbone
        self.titles = list(titles)  # indexed by item_idx; [0] is padding
        self.templates = templates or Templates()
        self.soft_prompt = soft_prompt
        self.style = style or PromptStyle("soft-prompt" if soft_prompt is not None else None)
        if self.style.uses_soft_prompt != (soft_prompt is not None):
            raise ValueError("a soft prompt goes with the LSR prompt's slot (`soft-prompt`), and only with it")
        self.verbalizer = self.style.verbalizer(backbone, title_scoring, batch_size)
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
               row_list: Sequence[int] | None = None, text_only: bool = False) -> Prompt:
        """The prompt of one sample (item indices); `row_list`: what the style shows for it besides
        (the teacher's list; `prompts` looks it up); `text_only`: the style's form without item
        vectors (where LLaRA's curriculum starts)."""
        if text_only and not self.style.has_text_only_form:
            raise ValueError(f"the {self.style.name!r} prompt has no text-only form")
        return self.style.write(self.templates, self.titles, [int(i) for i in history if i > 0],
                                [int(i) for i in candidates], label, row_list, text_only)

    def display_order(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        """[len(rows), num_candidates]: for each row, the stored candidate positions in the order
        the prompt lists them (the identity unless the style's `order` reorders them)."""
        rows = np.asarray(rows)
        if self.style.order is None:
            return np.broadcast_to(np.arange(data.candidates.shape[1]), (len(rows), data.candidates.shape[1]))
        return self.style.order.order(data, rows)

    def prompts(self, data: RunData, rows: np.ndarray, labels: bool = False, text_only: bool = False,
                order: np.ndarray | None = None) -> list[Prompt]:
        """The prompts of `rows` of `data` (with their ground truth as the label when `labels`;
        `text_only`: see `prompt`), the candidates in `display_order` (`order`, when the caller
        has it already)."""
        rows = np.asarray(rows)
        lists = self.style.row_lists(data, rows)
        lists = [None] * len(rows) if lists is None else lists
        order = self.display_order(data, rows) if order is None else order
        shown = np.take_along_axis(data.candidates[rows], order, axis=1)
        return [self.prompt(data.history[r], cands, label=data.target[r] if labels else None, row_list=extra,
                            text_only=text_only)
                for r, cands, extra in zip(rows, shown, lists)]

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
