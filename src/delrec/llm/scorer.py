"""The LLM as a recommender: LSR prompts over a run's samples, scored by the verbalizer, behind
the same Scorer interface (and so the same evaluator) as the teachers."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from delrec import distributed
from delrec.data.protocol import RunData
from delrec.llm.backbone import Backbone
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Prompt, Templates, lsr_prompt
from delrec.llm.verbalizer import Verbalizer


class LLMScorer:
    """Scores each sample's fixed candidates (in their on-disk, shuffled order) with the LSR
    prompt. Without a soft prompt it is the zero-shot LLM (the `w/o SP` prompt, which does not
    mention one); `model_card=True` and `empty_slot=True` give the `w MCP` and `w/o DPSM` prompts."""

    def __init__(
        self,
        backbone: Backbone,
        titles: Sequence[str],
        templates: Templates | None = None,
        soft_prompt: SoftPrompt | None = None,
        model_card: bool = False,
        empty_slot: bool = False,
        method: str = "full-title",
        batch_size: int = 8,
        name: str | None = None,
        progress: bool = True,
    ):
        self.backbone = backbone
        self.titles = list(titles)  # indexed by item_idx; [0] is padding
        self.templates = templates or Templates()
        self.soft_prompt = soft_prompt
        self.model_card = model_card
        self.empty_slot = empty_slot
        self.verbalizer = Verbalizer(backbone, method, batch_size)
        self.name = name or f"llm:{backbone.name}"
        self.progress = progress

    @property
    def batch_size(self) -> int:
        """Prompts per verbalizer call (the evaluator shards and chunks rows in multiples of it)."""
        return self.verbalizer.batch_size

    @classmethod
    def for_run(cls, data: RunData, backbone: Backbone, **kwargs) -> LLMScorer:
        return cls(backbone, [""] + data.items["title"].tolist(), **kwargs)

    def prompt(self, history: Sequence[int], candidates: Sequence[int], label: int | None = None) -> Prompt:
        titles = self.titles
        return lsr_prompt(
            self.templates,
            [titles[i] for i in history if i > 0],
            [titles[i] for i in candidates],
            label=titles[label] if label is not None else None,
            soft_prompt=self.soft_prompt is not None,
            model_card=self.model_card,
            empty_slot=self.empty_slot,
        )

    def score_candidates(self, data: RunData, rows: np.ndarray) -> np.ndarray:
        prompts = [self.prompt(data.history[r], data.candidates[r]) for r in rows]
        out = np.zeros(data.candidates[rows].shape, dtype=np.float32)
        step = self.verbalizer.batch_size
        bar = tqdm(total=len(prompts), desc=f"score {self.name}", unit="req", disable=not (self.progress and distributed.current().is_main))
        for i in range(0, len(prompts), step):
            scores = self.verbalizer.score(prompts[i : i + step], self.soft_prompt)
            out[i : i + step] = torch.stack(scores).numpy()
            bar.update(len(scores))
        bar.close()
        return out

    def score_all(self, data: RunData, rows: np.ndarray):
        raise NotImplementedError("an LLM ranks candidate sets; full-catalogue ranking is not supported")
