"""LLMSEQSIM (Harte et al. RecSys 2023): no training; candidates ranked by the cosine similarity
of their title embedding (the backbone's mean-pooled last hidden states) to the mean embedding of
the history's titles (llm/similarity.py, docs/baselines.md)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from delrec.llm.similarity import TitleSimilarityScorer
from delrec.methods.registry import Method


class LLMSeqSim(Method):
    def frozen_scorer(self, run: Path, data, name: str, teacher: str, backbone: Callable, templates,
                      soft_prompt: str | None, label: str | None, **kwargs):
        return TitleSimilarityScorer.for_run(data, backbone(), batch_size=kwargs.get("batch_size", 8),
                                             progress=kwargs.get("progress", True), name=label or f"llmseqsim:{name}")


METHOD = LLMSeqSim(
    "llmseqsim", "LLMSEQSIM",
    "no training: candidates ranked by the cosine similarity of their title embedding (the backbone's mean-pooled "
    "last hidden states) to the mean embedding of the history's titles (LLMSEQSIM, Harte et al. RecSys 2023)",
    stage1="none", soft_prompt_source="none", prompt="none", ranker="similarity", stage2=False, ablation=False,
    paper_rows=("LLMSEQSIM",))
