"""LLaRA (Liao et al., SIGIR 2024) on the shared harness: the hybrid prompt, its item projector
and its curriculum, all of it here (docs/baselines.md).

* The item projector: a teacher's item embeddings, frozen, mapped by a trainable two-layer MLP
  into the LLM's input-embedding space, so that an item stands in a prompt as one vector beside
  its title. The MLP is LLaRA's `MlpProjector` (model/mlp_projector.py in
  github.com/ljy0ustc/LLaRA): Linear(teacher dim, LLM dim), GELU, Linear(LLM dim, LLM dim). The
  embeddings are the teacher's input item table (LLaRA reads `item_embeddings(seq)` of SASRec,
  Caser and GRU4Rec alike), kept as a buffer: never trained, and saved with the projector, so a
  stage-2 result does not change when the teacher is trained again. Saved as safetensors with its
  metadata (backbone, teacher, sizes), like the soft prompt; loading it into another backbone, or
  scoring a run with another catalogue, fails with a clear error.
* The hybrid prompt: the plain recommendation prompt with one item vector right after each title
  of the history and of the candidates (`Prompt.item_slots`; the verbalizer puts the vectors in).
* The curriculum (`curriculum` in stage 2): whether a training micro-batch gets the hybrid prompt
  or its text-only form. `linear`: the hybrid prompt with probability (i + 1) / N at micro-batch
  i of the N = steps * grad_accum the run plans, as LLaRA's TrainCollater draws (cur_step /
  max_step); `none`: the hybrid prompt from the start. Evaluation always uses the hybrid prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from delrec.core.io import atomic_path
from delrec.core.layout import RunLayout
from delrec.core.settings import closest
from delrec.llm.scorer import PromptStyle
from delrec.llm.templates import SLOT, Prompt, Templates, check_titles, lsr_prompt
from delrec.methods.registry import Method, Stage2Extra, Stage2Inputs
from delrec.teachers.trained import load_teacher

CURRICULA = ("linear", "none")


@dataclass
class LLaRAOptions:
    """LLaRA's own settings (a run config's `method_options: {llara: {...}}`)."""

    curriculum: str = "linear"  # CURRICULA: from text-only to hybrid prompts, or hybrid from the start
    # the projector's lr relative to lr. Its weights have entries of about 1/sqrt(d), as AdaLoRA's
    # P and Q (vector_lr_scale), and Lion moves every entry by about its lr per step
    projector_lr_scale: float = 0.25

    def __post_init__(self):
        if self.curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.curriculum!r}{closest(self.curriculum, CURRICULA)}; "
                             f"choose one of {CURRICULA}")
        if self.projector_lr_scale <= 0:
            raise ValueError(f"projector_lr_scale must be positive, got {self.projector_lr_scale}")
WEIGHTS_NAME = "item_projector.safetensors"
FORMAT = "delrec.item_projector.v1"


class ItemProjector(nn.Module):
    """LLaRA's projector of a teacher's item embeddings into the LLM's input space (see the module docstring)."""

    def __init__(self, item_embeddings: torch.Tensor, dim: int, backbone: str = "", teacher: str = "", seed: int | None = None):
        """`item_embeddings`: [num_items + 1, teacher dim], row 0 padding; `dim`: the LLM's hidden size."""
        super().__init__()
        if item_embeddings.dim() != 2 or item_embeddings.shape[0] < 2:
            raise ValueError(f"item embeddings must be [num_items + 1, dim] with at least one item, got {tuple(item_embeddings.shape)}")
        self.register_buffer("item_embeddings", item_embeddings.detach().float().clone())
        with torch.random.fork_rng(devices=[]):  # a seeded start that leaves the caller's random stream alone
            if seed is not None:
                torch.manual_seed(seed)
            # nn.Linear's default initialisation, as LLaRA's projector
            self.mlp = nn.Sequential(nn.Linear(item_embeddings.shape[1], dim), nn.GELU(), nn.Linear(dim, dim))
        self.backbone, self.teacher = backbone, teacher

    @classmethod
    def from_teacher(cls, model, backbone, teacher: str = "", seed: int | None = None) -> ItemProjector:
        """An untrained projector for `model` (a trained teacher, teachers.SequentialRecommender)
        into `backbone`'s input space, on the backbone's device."""
        projector = cls(model.item_embedding.weight, backbone.hidden_size, backbone.name, teacher, seed)
        return projector.to(backbone.device)

    @property
    def num_items(self) -> int:
        return self.item_embeddings.shape[0] - 1

    @property
    def dim(self) -> int:
        return self.mlp[2].out_features

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """[n] item indices -> [n, dim] vectors in the LLM's input space."""
        return self.mlp(self.item_embeddings[items])

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (a .safetensors file, or a folder that gets item_projector.safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / WEIGHTS_NAME
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}
        metadata = {"format": FORMAT, "backbone": self.backbone, "teacher": self.teacher, "num_items": str(self.num_items),
                    "teacher_dim": str(self.item_embeddings.shape[1]), "dim": str(self.dim)}
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backbone=None) -> ItemProjector:
        """Load a saved projector; with `backbone`, check that it was trained for it."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.exists():
            raise FileNotFoundError(f"no item projector at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a delrec item projector (format {meta.get('format')!r})")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        projector = cls(tensors["item_embeddings"], tensors["mlp.2.weight"].shape[0], meta.get("backbone", ""),
                        meta.get("teacher", ""))
        projector.load_state_dict(tensors)
        if backbone is not None:
            if backbone.hidden_size != projector.dim:
                raise ValueError(f"{path} projects into dimension {projector.dim} (backbone {projector.backbone!r}); "
                                 f"{backbone.name!r} has dimension {backbone.hidden_size}")
            if projector.backbone and backbone.name and projector.backbone != backbone.name:
                raise ValueError(f"{path} was trained for backbone {projector.backbone!r}, not {backbone.name!r}; "
                                 "an item projector only means something to the model it was trained with")
            projector = projector.to(backbone.device)
        return projector


# where `hybrid_prompt` marks an item vector while it renders (private-use characters, never in a title)
HISTORY_MARK, CANDIDATE_MARK = "\ue000", "\ue001"


def hybrid_prompt(t: Templates, history: Sequence[str], candidates: Sequence[str], history_items: Sequence[int],
                  candidate_items: Sequence[int], label: str | None = None, item_vectors: bool = True) -> Prompt:
    """LLaRA's hybrid prompt: the plain recommendation prompt (`lsr_plain`, as `w/o SP` and
    LLMSEQPROMPT read it) with one item vector right after each title of the history and of the
    candidates: `item_slots` holds, in text order, the offset just after each closing quote and
    the item index (`history_items`, `candidate_items`: the items of the titles, in the same
    order). `item_vectors=False` gives the text-only form that LLaRA's curriculum starts from:
    the same text without the vectors."""
    check_titles(history, candidates, label)
    if len(history_items) != len(history) or len(candidate_items) != len(candidates):
        raise ValueError(f"the hybrid prompt needs one item per title: {len(history)} history titles and "
                         f"{len(history_items)} items, {len(candidates)} candidate titles and {len(candidate_items)} items")
    if not item_vectors:
        return lsr_prompt(t, history, candidates, label, soft_prompt=False)
    if any(HISTORY_MARK in x or CANDIDATE_MARK in x for x in (*history, *candidates)):
        raise ValueError("a title holds one of the private-use characters U+E000 / U+E001 the hybrid prompt marks items with")
    values = {**t.words(), "history": ", ".join(f'"{x}"{HISTORY_MARK}' for x in history),
              "candidates": ", ".join(f'"{x}"{CANDIDATE_MARK}' for x in candidates)}
    marked = t.lsr_plain.replace(SLOT, "").format(**values)
    items = {HISTORY_MARK: iter(history_items), CANDIDATE_MARK: iter(candidate_items)}
    pieces, slots, start, length = [], [], 0, 0
    for at in (i for i, ch in enumerate(marked) if ch in items):
        pieces.append(marked[start:at])
        length += at - start
        item = next(items[marked[at]], None)
        if item is None:
            raise ValueError("the `lsr_plain` template must show {history} and {candidates} once each for the hybrid prompt")
        slots.append((length, int(item)))
        start = at + 1
    if len(slots) != len(history) + len(candidates):
        raise ValueError("the `lsr_plain` template must show {history} and {candidates} once each for the hybrid prompt")
    text = "".join(pieces) + marked[start:]
    return Prompt(text, "", tuple(candidates), label, False, tuple(slots))


class HybridStyle(PromptStyle):
    """The hybrid prompt, its item vectors made by `projector`; `text_only` gives its text form."""

    has_text_only_form = True

    def __init__(self, projector: ItemProjector, order=None):
        super().__init__(None, order)
        self.name, self.item_vectors = "hybrid", projector

    def write(self, t: Templates, titles: Sequence[str], history: Sequence[int], candidates: Sequence[int],
              label: int | None, row_list: Sequence[int] | None, text_only: bool) -> Prompt:
        return hybrid_prompt(t, [titles[i] for i in history], [titles[i] for i in candidates], history, candidates,
                             label=titles[label] if label is not None else None, item_vectors=not text_only)


def hybrid_batch(inputs: Stage2Inputs, micro_batch: int) -> bool:
    """Whether training micro-batch `micro_batch` (counted over the run: step * grad_accum + micro)
    gets the hybrid prompt under its LLaRAOptions' `curriculum` (CURRICULA). Drawn from (seed,
    micro_batch) alone, so a resumed run and every process of a launch draw the same."""
    if inputs.options.curriculum == "none":
        return True
    draw = np.random.default_rng((inputs.seed, 0x11A7A, micro_batch)).random()  # 0x11A7A: a stream of its own
    return draw < (micro_batch + 1) / inputs.micro_batches


def item_projector_for(inputs: Stage2Inputs, bb, data) -> ItemProjector:
    """The untrained item projector stage 2 starts with: its teacher's item embeddings into `bb`'s input space."""
    teacher_dir = RunLayout(inputs.run_dir).teacher(inputs.teacher)
    if not (teacher_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"LLaRA maps the {inputs.teacher} teacher's item embeddings into the LLM, but "
                                f"{teacher_dir} holds no trained teacher; run `delrec teacher train --run {inputs.run_dir} "
                                f"--model {inputs.teacher}` first")
    with torch.random.fork_rng(devices=[]):  # building the teacher draws initial weights: not from the run's stream
        teacher = load_teacher(teacher_dir, "cpu", data)
    return ItemProjector.from_teacher(teacher, bb, inputs.teacher, seed=inputs.seed)


class ProjectorExtra(Stage2Extra):
    """The item projector, trained with the adapters (at `projector_lr_scale` of their rate), and
    the curriculum that decides each micro-batch's prompt."""

    def __init__(self, projector: ItemProjector, inputs: Stage2Inputs | None = None):
        self.module, self.inputs = projector, inputs  # inputs: None when a trained projector is loaded for scoring

    def param_groups(self, lr: float) -> list[dict]:
        return [{"params": list(self.module.parameters()), "lr": lr * self.inputs.options.projector_lr_scale}]

    def prompt_options(self, micro_batch: int) -> dict:
        return {"text_only": not hybrid_batch(self.inputs, micro_batch)}

    def loss_term(self, prompts):
        if any(p.item_slots for p in prompts):
            return None
        # a text-only batch of the curriculum: the projector takes no part, but DDP wants a gradient
        # for every parameter it wraps; zeros, which `before_optimizer_step` drops when no batch of
        # the step was hybrid (so the optimizer skips the projector, as LLaRA freezes it)
        return 0.0 * sum(p.sum() for p in self.module.parameters())

    def before_optimizer_step(self, options: list[dict]) -> None:
        if all(o["text_only"] for o in options):
            for p in self.module.parameters():  # a text-only step: the projector took no part, the optimizer skips it
                p.grad = None

    def log_fields(self, options: list[dict]) -> dict:
        # the share of this step's micro-batches with the hybrid prompt (LLaRA's curriculum)
        return {"hybrid_share": sum(not o["text_only"] for o in options) / len(options)}

    def state_dict(self) -> dict:
        return {k: v.detach().clone() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict | None) -> None:
        self.module.load_state_dict(state)

    def save(self, dest: Path) -> None:
        self.module.save(dest / WEIGHTS_NAME)


class LLaRA(Method):
    stage2_files: ClassVar[tuple[str, ...]] = (WEIGHTS_NAME,)
    options_cls: ClassVar[type] = LLaRAOptions

    def prompt_style(self, run_dir: Path, data, teacher: str, extra: Stage2Extra, options, candidate_order: str) -> PromptStyle:
        if extra.module is None:
            raise ValueError("the hybrid prompt (LLaRA) needs its item projector (stage2_extra or load_stage2_extra)")
        if extra.module.num_items != data.num_items:
            raise ValueError(f"the item projector holds the teacher's embeddings of {extra.module.num_items} items, but "
                             f"this run has {data.num_items}: it was trained on other data")
        return HybridStyle(extra.module, self._order(run_dir, teacher, data, candidate_order))

    def stage2_extra(self, inputs: Stage2Inputs, bb, data) -> Stage2Extra:
        return ProjectorExtra(item_projector_for(inputs, bb, data), inputs)

    def load_stage2_extra(self, folder: Path, bb) -> Stage2Extra:
        return ProjectorExtra(ItemProjector.load(folder / WEIGHTS_NAME, bb))


METHOD = LLaRA(
    "llara", "LLaRA",
    "the teacher's item embeddings, frozen, mapped by a trained two-layer MLP into the LLM's input space, one "
    "item vector after each title of the history and the candidates (the hybrid prompt), with a curriculum "
    "from text-only to hybrid prompts; the projector trained with the adapters in stage 2 (LLaRA, Liao et al. "
    "SIGIR 2024)", stage1="none", soft_prompt_source="none", prompt="hybrid", ablation=False, paper_rows=("LLaRA",))
