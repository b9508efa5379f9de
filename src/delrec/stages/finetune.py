"""Stage 2 of DELRec (LSR, paper Section IV-C): fine-tune the LLM with AdaLoRA on the ground truth.

The soft prompt from stage 1 is inserted into the recommendation (LSR) prompt and frozen; adapters
(peft) on the attention query and value projections (or every linear layer of the blocks,
`target_modules: all-linear`) are trained on the next item of train samples. `adapter`:
`adalora`, the paper's (with Lion: lr 1e-4, weight decay 1e-6, configs/paper.yaml), or `lora`,
plain LoRA as LlamaRec and LLaRA use it (with AdamW at 1e-4 to 1e-3: the CPU presets' choice,
measured in docs/training.md). AdaLoRA's rank budget is updated every step, after the optimizer
step and before the gradients are cleared, as peft requires, on its author's schedule (`tinit`,
`tfinal`: fractions of the steps without pruning at the start and at the target rank at the end);
its orthogonal regulariser is added to the loss. Early stopping on NDCG@5 over a fixed valid subset,
evaluated before training (a reference only), every `eval_every` steps and at the end; each
evaluation logs the valid candidate metrics with the examples seen and the training seconds.

RUN/finetune/<name>/
  adapter/            the best adapter (peft `save_pretrained`)
  soft_prompt.safetensors   the soft prompt used (trained further under `w ULSR`)
  item_projector.safetensors   LLaRA's projector of the teacher's item embeddings (`llara`), saved with the best adapter
  config.json, train_log.jsonl, metrics.json, checkpoint.pt (while training)
  .best/              while training: the best adapter so far (with its soft prompt / projector);
                      switched into place by renames when the stage finishes, so a reader never
                      sees a new adapter beside an old config.json (or half of one)
  snapshots/examples-NNNNNN/   with `snapshot_every`: the adapter every so many steps and at the
                      end, a folder finetuned_scorer loads like this one (the budget-quality curve)

Variants (paper Tables III-IV): `delrec` (the stage-1 soft prompt, frozen), `ulsr` (the same,
trained too), `usp` (an untrained soft prompt), `wo-dpsm` (no stage 1: the slot is left empty),
`mcp` (a hand-written description of the teacher in the slot), `wo-sp` (no slot and no mention;
LLMSEQPROMPT in Table II). Baselines of Table II trained the same way (docs/baselines.md):
`teacher-list` (the teacher's top `teacher_list_size` items written into the prompt),
`llamarec` (lettered candidates, scored and trained on their index letters) and `llara` (an item
vector after each title, from the teacher's item embedding through a projector trained with the
adapters; each micro-batch gets the hybrid prompt or its text-only form by LLaRA's `curriculum`).
"""

from __future__ import annotations

import json
import logging
import random
import shutil
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from delrec import distributed, methods
from delrec.data.protocol import RunData
from delrec.evaluate import evaluate
from delrec.io import atomic_dir, write_json
from delrec.llm.backbone import Backbone
from delrec.llm.item_projector import WEIGHTS_NAME as PROJECTOR_NAME
from delrec.llm.item_projector import ItemProjector
from delrec.llm.scorer import LLMScorer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Templates
from delrec.llm.verbalizer import OBJECTIVES
from delrec.locks import holds_run_lock
from delrec.retrieval import TeacherOrder
from delrec.settings import closest, runtime
from delrec.stages.examples import TeacherTop
from delrec.stages.optim import ADAPTER_INITS, LR_SCHEDULES, OPTIMIZERS, adapter_groups, init_adapters, lr_schedule, make_optimizer
from delrec.stages.scaffold import Clock, StageFolder

log = logging.getLogger(__name__)

ADAPTERS = ("adalora", "lora")
# the attention query and value projections by model type (`target_modules: qv`, the default);
# `all-linear` is peft's shorthand for every linear layer of the blocks (not the LM head)
TARGET_MODULES = {"t5": ["q", "v"], "mt5": ["q", "v"], "default": ["q_proj", "v_proj"]}
TARGET_SHORTHANDS = ("qv", "all-linear")
# LLaRA's curriculum (`llara`): whether a training micro-batch gets the hybrid prompt or its
# text-only form. `linear`: the hybrid prompt with probability (i + 1) / N at micro-batch i of the
# N = steps * grad_accum the run plans, as LLaRA's TrainCollater draws (cur_step / max_step);
# `none`: the hybrid prompt from the start. Evaluation always uses the hybrid prompt.
CURRICULA = ("linear", "none")
BEST = ".best"  # RUN/finetune/<name>/.best/: the best adapter while the stage trains
SNAPSHOTS = "snapshots"  # RUN/finetune/<name>/snapshots/examples-NNNNNN/: the adapter every `snapshot_every` steps


@dataclass
class FinetuneConfig:
    teacher: str = "sasrec"
    llm: str = "smollm2-135m"
    variant: str = "delrec"
    soft_prompt: str | None = None  # default: RUN/distill/<teacher>/soft_prompt.safetensors
    soft_tokens: int = 100  # for `usp`
    teacher_list_size: int = 10  # for `teacher-list`: the teacher's top items its prompt lists (at most the stored top_h)
    curriculum: str = "linear"  # for `llara`: from text-only to hybrid prompts, see CURRICULA
    # for `llara`: its projector's lr relative to lr. Its weights have entries of about 1/sqrt(d), as
    # AdaLoRA's P and Q (vector_lr_scale), and Lion moves every entry by about its lr per step
    projector_lr_scale: float = 0.25
    objective: str = "candidates"  # the training loss, see verbalizer.OBJECTIVES
    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    optimizer: str = "lion"  # see stages/optim.py
    lr: float = 2e-2  # the paper's 1e-4 (configs/paper.yaml) moves nothing in a CPU budget (docs/training.md)
    weight_decay: float = 1e-6
    warmup_steps: int = 10
    templates: dict = field(default_factory=dict)  # Templates fields: domain words (item, verb, ...) or whole templates
    lr_schedule: str = "constant"  # after warmup: constant, or a linear / cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    max_grad_norm: float = 1.0
    adapter_init: str = "orthogonal"  # P and Q orthonormal, E zero (stages/optim.py); `peft`: peft's own
    relative_lr: bool = True  # E's lr times the adapted weight's RMS singular value (stages/optim.py)
    vector_lr_scale: float = 0.25  # lr of P and Q (unit vectors) relative to lr, which moves E (stages/optim.py)
    adapter: str = "adalora"  # ADAPTERS: AdaLoRA (the paper's) or plain LoRA
    target_modules: tuple[str, ...] | str | None = None  # None or "qv": query and value projections; "all-linear"; or names
    lora_r: int = 8  # `lora`: the rank, its scale lora_alpha / lora_r, and dropout on its input
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    init_r: int = 12  # `adalora`: the rank it starts at and the average rank it prunes to
    target_r: int = 8
    # AdaLoRA's schedule (its author's shape): no pruning over the first `tinit` of the steps, the
    # rank budget falling to target_r until the last `tfinal` of the steps, which keep it there;
    # the budget is re-allocated every `delta_t` steps. Fractions of `steps`, so a budget change
    # keeps the shape. (0, 0, 1) prunes from the first step to the last, which destabilised the
    # short CPU runs (docs/training.md).
    tinit: float = 0.1
    tfinal: float = 0.3
    delta_t: int = 10
    orth_reg_weight: float = 0.5
    max_train_examples: int | None = None
    max_seconds: float | None = None
    valid_samples: int = 64
    eval_every: int = 25
    patience: int = 3  # evaluations without a better valid NDCG@5
    # how the stage runs, not what it computes (delrec.settings): changing them reruns nothing
    checkpoint_every: int = runtime(10)
    verbalizer_batch: int = runtime(8)
    gradient_checkpointing: bool = runtime(False)  # recompute activations in backward: less memory, more time
    # > 0: keep the adapter every so many steps and at the last as snapshots/examples-NNNNNN/
    # (loadable by finetuned_scorer, costs no evaluation): benchmarks/budget_curve.py scores them
    snapshot_every: int = runtime(0)
    seed: int = 0
    dtype: str = "auto"
    device: str = runtime("auto")

    def __post_init__(self):
        if self.variant not in methods.stage2_methods():
            raise ValueError(f"unknown stage-2 variant {self.variant!r}{closest(self.variant, methods.stage2_methods())}; "
                             f"choose one of {methods.stage2_methods()} (delrec.methods)")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown training objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; choose one of {ADAPTER_INITS}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}{closest(self.adapter, ADAPTERS)}; choose one of {ADAPTERS}")
        if not 0 < self.target_r < self.init_r:
            # peft's rank allocator fails inside torch.kthvalue otherwise
            raise ValueError(f"AdaLoRA needs 0 < target_r < init_r, got target_r {self.target_r}, init_r {self.init_r}")
        if not (0 <= self.tinit < 1 and 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1):
            raise ValueError(f"tinit and tfinal are fractions of the steps with tinit + tfinal < 1, got {self.tinit}, {self.tfinal}")
        if self.delta_t < 1 or self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"need delta_t >= 1, lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got {self.delta_t}, "
                             f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            if self.target_modules not in TARGET_SHORTHANDS:
                raise ValueError(f"target_modules {self.target_modules!r}: a list of module names or one of {TARGET_SHORTHANDS}")
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        if self.teacher_list_size < 1:
            raise ValueError(f"teacher_list_size must be at least 1, got {self.teacher_list_size}")
        if self.projector_lr_scale <= 0:
            raise ValueError(f"projector_lr_scale must be positive, got {self.projector_lr_scale}")
        if self.curriculum not in CURRICULA:
            raise ValueError(f"unknown curriculum {self.curriculum!r}{closest(self.curriculum, CURRICULA)}; choose one of {CURRICULA}")


@dataclass
class FinetuneResult:
    metrics: dict
    out_dir: Path


def orthogonal_regulariser(model: torch.nn.Module) -> torch.Tensor:
    """AdaLoRA's orthogonality penalty on P and Q (peft adds it only when the model computes its
    own loss; our loss comes from the verbalizer, so it is added here)."""
    terms = []
    for name, p in model.named_parameters():
        if p.requires_grad and ("lora_A" in name or "lora_B" in name):
            cov = p @ p.T if "lora_A" in name else p.T @ p
            terms.append(torch.linalg.matrix_norm(cov.float() - torch.eye(cov.shape[0], device=cov.device), "fro"))
    return torch.stack(terms).mean() if terms else torch.zeros(())


class Stage2Loss(distributed.StageModule):
    """The adapted LLM (and, under `w ULSR`, the soft prompt; under `llara`, the item projector)
    with the loss it flows through, as one module: the unit that DDP synchronises or FSDP shards.
    Returns the loss to minimise (recommendation loss + weighted orthogonal regulariser) and the
    recommendation loss alone."""

    def __init__(self, peft_model: nn.Module, scorer: LLMScorer, soft_prompt: SoftPrompt | None, config: FinetuneConfig):
        super().__init__()
        self.llm, self.soft_prompt, self.item_projector = peft_model, soft_prompt, scorer.item_projector
        self.verbalizer, self.objective = scorer.verbalizer, config.objective
        self.orth_reg_weight = config.orth_reg_weight if config.adapter == "adalora" else 0.0  # AdaLoRA's alone

    def loss(self, prompts) -> tuple[torch.Tensor, torch.Tensor]:
        rec = self.verbalizer.loss(prompts, self.soft_prompt, self.objective)
        total = rec + self.orth_reg_weight * orthogonal_regulariser(self.llm) if self.orth_reg_weight else rec
        if self.item_projector is not None and not any(p.item_slots for p in prompts):
            # a text-only batch of LLaRA's curriculum: the projector takes no part, but DDP wants a
            # gradient for every parameter it wraps; zeros, which `finetune` drops when no batch of
            # the step was hybrid (so the optimizer skips the projector, as LLaRA freezes it)
            total = total + 0.0 * sum(p.sum() for p in self.item_projector.parameters())
        return total, rec.detach()

    def kept_whole(self) -> set[nn.Parameter]:
        # the soft prompt, frozen or not, is saved beside the adapter
        return super().kept_whole() | (set(self.soft_prompt.parameters()) if self.soft_prompt is not None else set())


def hybrid_batch(config: FinetuneConfig, micro_batch: int) -> bool:
    """Whether training micro-batch `micro_batch` (counted over the run: step * grad_accum + micro)
    gets the hybrid prompt under `config.curriculum` (CURRICULA). Drawn from (seed, micro_batch)
    alone, so a resumed run and every process of a launch draw the same."""
    if config.curriculum == "none":
        return True
    planned = config.steps * config.grad_accum
    draw = np.random.default_rng((config.seed, 0x11A7A, micro_batch)).random()  # 0x11A7A: a stream of its own
    return draw < (micro_batch + 1) / planned


def item_projector_for(run_dir: str | Path, config: FinetuneConfig, bb: Backbone, data: RunData) -> ItemProjector | None:
    """The untrained item projector a `hybrid`-prompt method (LLaRA) starts stage 2 with: its
    teacher's item embeddings into `bb`'s input space (None for other methods)."""
    from delrec.teachers.train import load_teacher

    if methods.get(config.variant).prompt != "hybrid":
        return None
    teacher_dir = Path(run_dir) / "teachers" / config.teacher
    if not (teacher_dir / "model.safetensors").exists():
        raise FileNotFoundError(f"{config.variant} maps the {config.teacher} teacher's item embeddings into the LLM, but "
                                f"{teacher_dir} holds no trained teacher; run `delrec teacher train --run {run_dir} "
                                f"--model {config.teacher}` first")
    with torch.random.fork_rng(devices=[]):  # building the teacher draws initial weights: not from the run's stream
        teacher = load_teacher(teacher_dir, "cpu", data)
    return ItemProjector.from_teacher(teacher, bb, config.teacher, seed=config.seed)


def _soft_prompt(run_dir: Path, config: FinetuneConfig, bb: Backbone) -> SoftPrompt | None:
    method = methods.get(config.variant)
    if method.soft_prompt == "none":
        return None
    if method.soft_prompt == "untrained":
        return SoftPrompt.for_backbone(bb, config.soft_tokens, seed=config.seed)
    folder = method.stage1_folder(config.teacher)
    path = Path(config.soft_prompt) if config.soft_prompt else run_dir / "distill" / folder / "soft_prompt.safetensors"
    if not path.exists():
        raise FileNotFoundError(f"no stage-1 soft prompt at {path}; run `delrec distill --run {run_dir} --teacher "
                                f"{config.teacher}{'' if folder == config.teacher else f' --name {folder}'}` first")
    return SoftPrompt.load(path, bb)


@holds_run_lock
def finetune(run_dir: str | Path, config: FinetuneConfig, name: str | None = None, backbone: Backbone | None = None,
             progress: bool = True, restart: bool = False) -> FinetuneResult:
    from peft import get_peft_model

    dist = distributed.current()
    dist.check_batch(config.batch_size, "stage 2")
    run_dir = Path(run_dir)
    out = run_dir / "finetune" / (name or f"{config.teacher}-{config.variant}")
    if dist.is_main and (out / "checkpoint.pt").exists() and (out / "adapter").is_dir() and not (out / BEST).exists():
        # an interrupted run of an older delrec kept its best adapter in place: keep it for the resume
        (out / BEST).mkdir()
        for part in ("adapter", "soft_prompt.safetensors", PROJECTOR_NAME):
            if (out / part).exists():
                (out / part).rename(out / BEST / part)
    # results of an earlier complete run go when this one starts (a reader then finds none
    # rather than a mix); the best of this run is kept in .best/ until finish switches it in
    folder = StageFolder(out, stale=("config.json", "adapter", "soft_prompt.safetensors", PROJECTOR_NAME))

    data = RunData.load(run_dir / "data")
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    bb = backbone or Backbone.load(config.llm, device=config.device, dtype=config.dtype)
    bb.freeze()
    if config.gradient_checkpointing:
        bb.enable_gradient_checkpointing()
    soft = _soft_prompt(run_dir, config, bb)
    if soft is not None:
        soft.embedding.requires_grad_(methods.get(config.variant).train_soft_prompt)

    peft_model = get_peft_model(bb.model, adapter_config(config, bb))
    bb.model = peft_model  # the verbalizer calls bb.model: now with adapters
    init_adapters(peft_model, config.adapter_init, seed=config.seed)
    adapter_params = [p for p in peft_model.parameters() if p.requires_grad]

    projector = item_projector_for(run_dir, config, bb, data)
    templates = Templates.for_teacher(config.teacher, **config.templates)
    scorer = stage2_scorer(run_dir, data, bb, config.variant, config.teacher, templates, soft, config.teacher_list_size,
                           batch_size=config.verbalizer_batch, name=f"delrec:{config.variant}", progress=False,
                           item_projector=projector)
    rng = np.random.default_rng(config.seed)
    train_rows = rng.permutation(data.indices("train"))
    if config.max_train_examples:
        train_rows = train_rows[: config.max_train_examples]
    valid_rows = np.sort(rng.permutation(data.indices("valid"))[: config.valid_samples])

    trainable = adapter_params + ([soft.embedding] if soft is not None and soft.embedding.requires_grad else [])
    loss_module = dist.prepare(Stage2Loss(peft_model, scorer, soft, config))
    groups = adapter_groups(peft_model, config.lr, config.vector_lr_scale, config.relative_lr, extra=trainable)
    projector_params = list(projector.parameters()) if projector is not None else []  # trained with the adapters
    if projector_params:
        groups.append({"params": projector_params, "lr": config.lr * config.projector_lr_scale})
        trainable += projector_params
    optimizer = make_optimizer(config.optimizer, groups, config.lr, config.weight_decay)
    scheduler = lr_schedule(optimizer, config.lr_schedule, config.warmup_steps, config.steps, config.lr_min_ratio)

    # elapsed: training seconds (the time budget); wall: with the evaluations
    state = {"step": 0, "elapsed": 0.0, "wall": 0.0, "best": -1.0, "best_step": 0, "bad_evals": 0, "history": []}
    ckpt = folder.resume(FinetuneConfig, _config_dict(config), restart, bb.device, position=lambda c: c["state"]["step"])
    if ckpt is not None:
        missing = peft_model.load_state_dict(ckpt["adapter"], strict=False).unexpected_keys
        if missing:
            raise ValueError(f"{folder.checkpoint_path} holds adapter tensors this model lacks: {missing[:3]}")
        if soft is not None and ckpt["soft_prompt"] is not None:
            with torch.no_grad():
                soft.embedding.copy_(ckpt["soft_prompt"])
        if projector is not None:
            projector.load_state_dict(ckpt["item_projector"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        if config.adapter == "adalora":
            allocator = peft_model.base_model.rankallocator
            allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = ckpt["allocator"]
            peft_model.peft_config["default"].rank_pattern = ckpt["rank_pattern"]
        torch.set_rng_state(dist.own(ckpt["torch_rng"]))
        state = ckpt["state"]
        log.info("resuming stage 2 from step %d", state["step"])

    def valid_metrics() -> dict:
        peft_model.eval()
        m = dist.through(loss_module, lambda: evaluate(scorer, data, "valid", rows=valid_rows))["candidates"]
        return {f"valid_{k}": v for k, v in m.items()}

    def record(scores: dict) -> None:
        """One evaluation: a log line and a `valid_history` entry."""
        seen, seconds = state["step"] * config.grad_accum * config.batch_size, round(state["elapsed"], 2)
        state["history"].append({"step": state["step"], "examples_seen": seen, "seconds": seconds,
                                 "valid_HR@1": scores["valid_HR@1"], "valid_NDCG@5": scores["valid_NDCG@5"]})
        folder.log({"step": state["step"], "examples_seen": seen, "seconds": seconds,
                    "wall_seconds": round(state["wall"], 2), "eval": scores})

    def save_adapter(dest: Path) -> None:
        """The adapter as it is now, with what a scorer needs beside it (finetuned_scorer)."""
        with atomic_dir(dest / "adapter") as tmp:
            peft_model.save_pretrained(tmp)
        if soft is not None:
            soft.save(dest / "soft_prompt.safetensors")
        if projector is not None:
            projector.save(dest / PROJECTOR_NAME)

    if ckpt is None and dist.is_main:
        for earlier in (SNAPSHOTS, BEST):  # an earlier run's
            shutil.rmtree(out / earlier, ignore_errors=True)
    clock = Clock(state["elapsed"], state.get("wall"), config.max_seconds)
    if state["step"] == 0:
        # before any training: the untrained adapter (the backbone unchanged), a reference point of
        # the curve only; it does not compete for the best, so the adapter saved is always trained
        with clock.paused():
            scores = valid_metrics()
        state["wall"] = clock.wall
        record(scores)

    bar = tqdm(total=config.steps, initial=state["step"], desc=f"stage 2 ({config.adapter})", disable=not (progress and dist.is_main))
    stopped_early = False
    while state["step"] < config.steps:
        # -- one step: the recommendation loss (+ the orthogonal regulariser), AdaLoRA's rank budget
        peft_model.train()
        step_loss = rec_loss = 0.0
        hybrid = 0  # micro-batches of this step with LLaRA's hybrid prompt
        for micro in range(config.grad_accum):
            k = (state["step"] * config.grad_accum + micro) * config.batch_size
            batch = np.take(train_rows, range(k, k + config.batch_size), mode="wrap")  # the global batch
            rows = dist.local_share(batch)
            with_items = projector is not None and hybrid_batch(config, state["step"] * config.grad_accum + micro)
            hybrid += with_items
            prompts = scorer.prompts(data, rows, labels=True, text_only=projector is not None and not with_items)
            loss, rec = loss_module(prompts)
            # under DDP the gradients arrive averaged over the processes
            (loss * dist.loss_scale(len(rows), len(batch)) / config.grad_accum).backward()
            step_loss += dist.mean(loss.item()) / config.grad_accum
            rec_loss += dist.mean(rec.item()) / config.grad_accum
        dist.reduce_gradients(trainable)  # under FSDP: averaged here
        if projector is not None and not hybrid:
            for p in projector_params:  # a text-only step: the projector took no part, and the optimizer skips it
                p.grad = None
        grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        if config.adapter == "adalora":
            peft_model.base_model.update_and_allocate(state["step"])  # after the step, before zero_grad
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["elapsed"], state["wall"] = clock.elapsed, clock.wall
        # -- log, evaluate (keeping the best adapter), checkpoint
        # loss = the recommendation loss (loss_rec) + the weighted orthogonal regulariser
        line = {"step": state["step"], "loss": step_loss, "loss_rec": rec_loss, "grad_norm": grad_norm,
                "lr": config.lr * scheduler.get_last_lr()[0] / scheduler.base_lrs[0], "seconds": round(state["elapsed"], 2)}
        if projector is not None:
            line["hybrid_share"] = hybrid / config.grad_accum  # of this step's micro-batches (LLaRA's curriculum)
        folder.log(line)
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.3f}", best=f"{state['best']:.4f}")
        time_up = clock.budget_spent()
        if state["step"] % config.eval_every == 0 or state["step"] == config.steps or time_up:
            with clock.paused():  # evaluation time is not training time
                scores = valid_metrics()
            state["wall"] = clock.wall
            record(scores)
            score = scores["valid_NDCG@5"]
            if score > state["best"]:
                state.update(best=score, best_step=state["step"], bad_evals=0)
                if dist.is_main:
                    save_adapter(out / BEST)
            else:
                state["bad_evals"] += 1
            stopped_early = state["bad_evals"] >= config.patience
        last = state["step"] == config.steps or time_up or stopped_early
        if config.snapshot_every and (state["step"] % config.snapshot_every == 0 or last) and dist.is_main:
            snap = out / SNAPSHOTS / f"examples-{state['step'] * config.grad_accum * config.batch_size:06d}"
            save_adapter(snap)
            write_json(snap / "config.json", _config_dict(config))
        if state["step"] % config.checkpoint_every == 0 or time_up or stopped_early:
            state["elapsed"], state["wall"] = clock.elapsed, clock.wall
            folder.checkpoint(lambda rng: _checkpoint(config, peft_model, soft, optimizer, scheduler, rng, state, projector))
        if time_up or stopped_early:
            break
    bar.close()

    metrics = {
        "teacher": config.teacher, "variant": config.variant, "llm": bb.name, "steps": state["step"],
        "seconds": round(state["elapsed"], 2), "best_step": state["best_step"], "best_valid_NDCG@5": state["best"],
        "stopped_early": stopped_early, "valid_samples": len(valid_rows),
        "launch": dist.describe(),
        "train_examples_seen": state["step"] * config.grad_accum * config.batch_size,
        "distinct_train_examples": int(min(state["step"] * config.grad_accum * config.batch_size, len(train_rows))),
        "wall_seconds": round(state["wall"], 2),
        "valid_history": state["history"],
        "valid_rows": valid_rows.astype(int).tolist(),  # indices into the run's samples
    }
    folder.finish(lambda: _promote_best(out), _config_dict(config), metrics)
    return FinetuneResult(metrics, out)


def _promote_best(out: Path) -> None:
    """Move the best adapter (and its soft prompt / projector) from .best/ into the stage folder,
    each by one rename; config.json and metrics.json follow (StageFolder.finish)."""
    best = out / BEST
    if not (best / "adapter").is_dir():
        raise RuntimeError(f"{best} holds no adapter: the stage finished without a trained evaluation to keep")
    for part in ("adapter", "soft_prompt.safetensors", PROJECTOR_NAME):
        if (best / part).exists():
            if (out / part).is_dir():
                shutil.rmtree(out / part)
            (best / part).replace(out / part)
    shutil.rmtree(best, ignore_errors=True)


def adapter_config(config: FinetuneConfig, bb: Backbone):
    """peft's config for `config.adapter` on `bb`: its target modules, and for AdaLoRA the
    schedule's fractions in steps (peft needs tinit + tfinal < total_step)."""
    from peft import AdaLoraConfig, LoraConfig

    if config.target_modules in (None, "qv"):
        model_type = getattr(bb.model.config, "model_type", "")
        targets = list(TARGET_MODULES.get(model_type, TARGET_MODULES["default"]))
    else:
        targets = config.target_modules if isinstance(config.target_modules, str) else list(config.target_modules)
    task_type = "SEQ_2_SEQ_LM" if bb.is_encoder_decoder else "CAUSAL_LM"
    if config.adapter == "lora":
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, task_type=task_type)
    total = max(1, config.steps)
    tinit = int(round(config.tinit * total))
    tfinal = min(int(round(config.tfinal * total)), max(0, total - tinit - 1))
    return AdaLoraConfig(init_r=config.init_r, target_r=config.target_r, tinit=tinit, tfinal=tfinal, deltaT=config.delta_t,
                         orth_reg_weight=config.orth_reg_weight, total_step=total, target_modules=targets, task_type=task_type)


def _checkpoint(config, peft_model, soft, optimizer, scheduler, rng, state, projector=None) -> dict:
    allocator = getattr(peft_model.base_model, "rankallocator", None)  # AdaLoRA's importance scores
    return {
        "config": _config_dict(config), "adapter": _adapter_tensors(peft_model),
        "soft_prompt": soft.embedding.detach().clone() if soft is not None else None,
        # the optimizer's state holds the projector's moments with the adapters'
        "item_projector": {k: v.detach().clone() for k, v in projector.state_dict().items()} if projector is not None else None,
        "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
        "allocator": (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc) if allocator is not None else None,
        "rank_pattern": getattr(peft_model.peft_config["default"], "rank_pattern", None),
        "torch_rng": rng, "state": state,
    }


def finetuned_scorer(folder: str | Path, data: RunData, backbone: Backbone | None = None, templates: Templates | None = None,
                     method: str = "full-title", batch_size: int = 8, dtype: str = "auto", device: str = "auto",
                     progress: bool = True, run_dir: str | Path | None = None) -> LLMScorer:
    """A stage-2 result as a scorer: its backbone with the best adapter, its soft prompt (or LLaRA's
    item projector) and its prompt variant, exactly as trained. `backbone` (fresh, without adapters) saves a reload;
    `run_dir`: the run whose teacher lists a `teacher-list` model reads (default: the folder's
    own run, RUN/finetune/<name>)."""
    from peft import PeftModel

    folder = Path(folder)
    if not (folder / "adapter" / "adapter_config.json").exists():
        raise FileNotFoundError(f"no stage-2 adapter in {folder}; run `delrec finetune` first")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has an adapter but no config.json: the stage is being written or was "
                                "interrupted; run it again (or wait for it to finish)")
    cfg = json.loads((folder / "config.json").read_text())
    bb = backbone or Backbone.load(cfg["llm"], device=device, dtype=dtype)
    bb.freeze()
    with warnings.catch_warnings():
        # peft checks AdaLoRA's rank_pattern keys (".lora_E" names) against module names and warns
        # that they match nothing, yet applies them: the pruned ranks load (tests/test_finetune.py)
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        bb.model = PeftModel.from_pretrained(bb.model, folder / "adapter").eval()
    soft_path = folder / "soft_prompt.safetensors"
    soft = SoftPrompt.load(soft_path, bb) if soft_path.exists() else None
    projector = ItemProjector.load(folder / PROJECTOR_NAME, bb) if methods.get(cfg["variant"]).prompt == "hybrid" else None
    templates = templates or Templates.for_teacher(cfg["teacher"], **cfg.get("templates", {}))
    order = cfg.get("candidate_order", "stored")  # as it was trained (_config_dict records any other)
    if order != methods.get(cfg["variant"]).candidate_order:
        log.warning("%s was trained with its candidates in the %s order, not %s's today; scored as it was trained",
                    folder, order, cfg["variant"])
    return stage2_scorer(run_dir or folder.parent.parent, data, bb, cfg["variant"], cfg["teacher"], templates, soft,
                         cfg.get("teacher_list_size", FinetuneConfig.teacher_list_size), method=method,
                         batch_size=batch_size, name=f"delrec:{folder.name}", progress=progress, item_projector=projector,
                         candidate_order=order)


def stage2_scorer(run_dir: str | Path, data: RunData, backbone: Backbone, variant: str, teacher: str, templates: Templates,
                  soft_prompt: SoftPrompt | None, teacher_list_size: int, candidate_order: str | None = None,
                  **kwargs) -> LLMScorer:
    """The scorer of a stage-2 method (delrec.methods) on `backbone` as it is: the method's prompt
    and verbalizer, its soft prompt, for `teacher-list` the teacher's top lists of the run, and
    its candidate order (`candidate_order`, default the method's: the teacher's for LlamaRec).
    `kwargs`: LLMScorer's (method, batch_size, name, progress, and for the `hybrid` prompt its
    item_projector: `item_projector_for` gives an untrained one)."""
    method = methods.get(variant)
    teacher_top = TeacherTop(run_dir, teacher, data, teacher_list_size) if method.prompt == "teacher-list" else None
    order = TeacherOrder(run_dir, teacher, data) if (candidate_order or method.candidate_order) == "teacher" else None
    return LLMScorer.for_run(data, backbone, templates=templates, soft_prompt=soft_prompt, prompt=method.prompt,
                             teacher_top=teacher_top, candidate_order=order, **kwargs)


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full tensors for resuming. (peft's own state dict prunes AdaLoRA to its rank
    pattern, which cannot be loaded back into the unpruned model that training continues with.)"""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "ranknum" in k}


def _config_dict(config: FinetuneConfig) -> dict:
    d = asdict(config)
    if d["target_modules"] is not None and not isinstance(d["target_modules"], str):
        d["target_modules"] = list(d["target_modules"])
    order = methods.get(config.variant).candidate_order if config.variant in methods.METHODS else "stored"
    if order != "stored":
        # recorded only when not the stored order, so the folders of every other method stay as they
        # were; a LlamaRec folder without it listed its candidates in the stored order and is redone
        d["candidate_order"] = order
    return d
