"""The settings every LLM stage has (stage 1, DistillConfig; stage 2, FinetuneConfig), declared once.

Each stage's config adds its own fields and its own defaults for some of these (stage 1 trains a
soft prompt with Lion at 5e-3, stage 2 LoRA adapters with AdamW at 1e-3 and a cosine decay). Fields made with `runtime()` say how a
stage runs, not what it computes (delrec.core.settings): changing them reruns nothing.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from delrec.core.settings import runtime
from delrec.llm.backbone import DEFAULT_MODEL, Backbone
from delrec.llm.verbalizer import OBJECTIVES
from delrec.training.optim import LR_SCHEDULES, OPTIMIZERS


@dataclass
class StageConfig:
    teacher: str = "sasrec"
    llm: str = DEFAULT_MODEL
    soft_tokens: int = 100  # the soft prompt's length (stage 1 trains it; stage 2's `usp` draws one)
    objective: str = "candidates"  # the training loss, see verbalizer.OBJECTIVES
    steps: int = 100
    batch_size: int = 4  # examples per micro-batch (stage 1: per task)
    grad_accum: int = 1
    optimizer: str = "lion"  # the paper's; or adamw (training/optim.py)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    templates: dict = field(default_factory=dict)  # Templates fields: domain words (item, verb, ...) or whole templates
    lr_schedule: str = "constant"  # after warmup: constant, or a linear / cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None  # sampled from the train split with the seed (stage 1: per task)
    max_seconds: float | None = None  # the time budget of training seconds (evaluations excluded)
    valid_samples: int = 64
    eval_every: int = 50
    checkpoint_every: int = runtime(10)
    verbalizer_batch: int = runtime(8)
    gradient_checkpointing: bool = runtime(False)  # recompute activations in backward: less memory, more time
    seed: int = 0
    dtype: str = "auto"
    device: str = runtime("auto")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown training objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")


def seeded_backbone(config: StageConfig, backbone: Backbone | None = None) -> Backbone:
    """What an LLM stage starts with: torch's and Python's RNGs seeded with the stage's seed, its
    LLM (`backbone`, or `config.llm` loaded), frozen, with gradient checkpointing if asked for."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    bb = backbone or Backbone.load(config.llm, device=config.device, dtype=config.dtype)
    bb.freeze()
    if config.gradient_checkpointing:
        bb.enable_gradient_checkpointing()
    return bb
