"""Stage 2 of DELRec (LSR, paper Section IV-C): fine-tune the LLM with adapters on the ground truth.

The soft prompt from stage 1 is inserted into the recommendation (LSR) prompt and frozen; adapters
(peft) on the attention query and value projections (or every linear layer of the blocks,
`target_modules: all-linear`) are trained on the next item of train samples. `adapter`: `lora`
(the default: plain LoRA as LlamaRec and LLaRA use it, with AdamW at 1e-3, a short warm-up and a
cosine decay, the presets' settings measured in docs/training.md), or `adalora`, the paper's (with
Lion: lr 1e-4, weight decay 1e-6, configs/paper.yaml). AdaLoRA's rank budget is updated every step, after the optimizer
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
`teacher-list` (the teacher's top `list_size` items written into the prompt),
`llamarec` (lettered candidates, scored and trained on their index letters) and `llara` (an item
vector after each title, from the teacher's item embedding through a projector trained with the
adapters; each micro-batch gets the hybrid prompt or its text-only form by LLaRA's `curriculum`).
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from delrec import methods
from delrec.core import distributed
from delrec.core.io import atomic_dir, write_json
from delrec.core.layout import SNAPSHOTS, RunLayout
from delrec.core.locks import holds_run_lock
from delrec.data.store import RunData
from delrec.evaluation.metrics import evaluate
from delrec.llm.backbone import Backbone
from delrec.llm.losses import LossParts
from delrec.llm.quantize import int8_copy
from delrec.llm.scorer import LLMScorer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Templates
from delrec.methods.registry import Stage2Extra, Stage2Inputs
from delrec.training.config import FinetuneConfig, seeded_backbone
from delrec.training.folder import StageFolder
from delrec.training.loop import Progress, Stage, train
from delrec.training.optim import adapter_groups, init_adapters, lr_schedule, make_optimizer
from delrec.training.rows import local_batch, train_and_valid_rows
from delrec.training.targets import CandidateTargets, teacher_scorer

# the attention query and value projections by model type (`target_modules: qv`, the default);
# `all-linear` is peft's shorthand for every linear layer of the blocks (not the LM head)
TARGET_MODULES = {"t5": ["q", "v"], "mt5": ["q", "v"], "default": ["q_proj", "v_proj"]}
BEST = ".best"  # RUN/finetune/<name>/.best/: the best adapter while the stage trains


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
    """The adapted LLM (and, under `w ULSR`, the soft prompt; with a method's Stage2Extra, its
    module: LLaRA's item projector) with the loss it flows through, as one module: the unit that
    DDP synchronises or FSDP shards. Returns the loss to minimise (recommendation loss + weighted
    orthogonal regulariser + the extra's term) and its parts for the log (llm.losses.LossParts:
    the cross-entropy, the distillation term and the teacher's top-1 agreement)."""

    def __init__(self, peft_model: nn.Module, scorer: LLMScorer, soft_prompt: SoftPrompt | None, extra: Stage2Extra,
                 config: FinetuneConfig):
        super().__init__()
        self.llm, self.soft_prompt, self.extra, self._extra = peft_model, soft_prompt, extra.module, extra
        self.verbalizer, self.objective = scorer.verbalizer, config.objective
        self.distill_weight, self.temperature, self.label_weight = (config.distill_weight, config.distill_temperature,
                                                                    config.label_weight)
        self.orth_reg_weight = config.orth_reg_weight if config.adapter == "adalora" else 0.0  # AdaLoRA's alone

    def loss(self, prompts, keep=None, teacher=None) -> tuple[torch.Tensor, LossParts]:
        parts = self.verbalizer.training_loss(prompts, self.soft_prompt, self.objective, keep=keep, teacher=teacher,
                                              distill_weight=self.distill_weight, temperature=self.temperature,
                                              label_weight=self.label_weight)
        total = parts.total
        if self.orth_reg_weight:
            total = total + self.orth_reg_weight * orthogonal_regulariser(self.llm)
        term = self._extra.loss_term(prompts)
        return (total if term is None else total + term), parts

    def kept_whole(self) -> set[nn.Parameter]:
        # the soft prompt, frozen or not, is saved beside the adapter
        return super().kept_whole() | (set(self.soft_prompt.parameters()) if self.soft_prompt is not None else set())


@holds_run_lock
def finetune(run_dir: str | Path, config: FinetuneConfig, name: str | None = None, backbone: Backbone | None = None,
             progress: bool = True, restart: bool = False) -> FinetuneResult:
    stage = FinetuneStage(Path(run_dir), config, name, backbone)
    metrics = train(stage, restart, progress)
    return FinetuneResult(metrics, stage.folder.out)


class FinetuneStage(Stage):
    """Stage 2 as the shared loop runs it (delrec.training.loop): the recommendation loss (+
    AdaLoRA's orthogonal regulariser) on batches of new train samples, AdaLoRA's rank budget after
    each optimizer step; the untrained adapter scored first (a reference point only, so the
    adapter saved is always trained), then every `eval_every` steps and at the end, the best kept
    in .best/ and early stopping after `patience` evaluations without a better valid NDCG@5."""

    eval_at_start, config_cls = True, FinetuneConfig

    def __init__(self, run_dir: Path, config: FinetuneConfig, name: str | None, backbone: Backbone | None):
        from peft import get_peft_model

        dist = self.dist = distributed.current()
        dist.check_batch(config.batch_size, "stage 2")
        self.config, self.config_dict = config, config.to_dict()
        self.eval_at_start = config.eval_at_start
        method = self.method = methods.get(config.method)
        out = RunLayout(run_dir).stage2(name or f"{config.teacher}-{config.method}")
        # what a scorer needs beside the adapter (finetuned_scorer): saved and moved with it
        self.beside = ("soft_prompt.safetensors", *method.stage2_files)
        _keep_an_older_best(out, self.beside)
        # results of an earlier complete run go when this one starts (a reader then finds none
        # rather than a mix); the best of this run is kept in .best/ until finish switches it in
        self.folder = StageFolder(out, stale=("config.json", "adapter", *self.beside))
        self.total, self.eval_every, self.patience = config.steps, config.eval_every, config.patience
        self.checkpoint_every, self.max_seconds, self.desc = config.checkpoint_every, config.max_seconds, f"stage 2 ({config.adapter})"

        data = self.data = RunData.load(RunLayout(run_dir).data)
        bb = self.bb = seeded_backbone(config, backbone)
        self.device = bb.device
        inputs = stage2_inputs(run_dir, config)  # what the method's hooks read
        soft = self.soft = method.stage2_soft_prompt(inputs, bb)
        if soft is not None:
            soft.requires_grad_(method.train_soft_prompt)  # a deep prompt's layer vectors too

        peft_model = self.peft_model = get_peft_model(bb.model, adapter_config(config, bb))
        bb.model = peft_model  # the verbalizer calls bb.model: now with adapters
        init_adapters(peft_model, config.adapter_init, seed=config.seed)
        adapter_params = [p for p in peft_model.parameters() if p.requires_grad]

        extra = self.extra = method.stage2_extra(inputs, bb, data)  # trained with the adapters
        templates = Templates.for_teacher(config.teacher, **config.templates)
        self.scorer = method.scorer(run_dir, data, bb, config.teacher, templates, soft, extra=extra,
                                    options=config.options, batch_size=config.verbalizer_batch,
                                    name=f"delrec:{config.method}", progress=False)
        self.train_rows, self.valid_rows = train_and_valid_rows(data, config.seed, config.valid_samples,
                                                                config.max_train_examples)
        # the teacher: the distillation term's soft targets, and its top-1 agreement with the LLM in the log
        teacher = teacher_scorer(run_dir, config.teacher, data, required=config.distill_weight > 0)
        self.targets = CandidateTargets(data, teacher, config.train_negatives, config.seed)
        self.valid_teacher_top1 = (None if teacher is None else
                                   np.asarray(teacher.score_candidates(data, self.valid_rows)).argmax(axis=1))

        self.trainable = adapter_params + ([p for p in soft.parameters() if p.requires_grad] if soft is not None else [])
        self.loss_module = dist.prepare(Stage2Loss(peft_model, self.scorer, soft, extra, config))
        groups = adapter_groups(peft_model, config.lr, config.vector_lr_scale, config.relative_lr, extra=self.trainable)
        extra_groups = extra.param_groups(config.lr)
        groups += extra_groups
        self.trainable += [p for group in extra_groups for p in group["params"]]
        self.optimizer = make_optimizer(config.optimizer, groups, config.lr, config.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, config.lr_schedule, config.warmup_steps, config.steps,
                                     config.lr_min_ratio)

    def fresh_start(self) -> None:
        if self.dist.is_main:
            for earlier in (SNAPSHOTS, BEST):  # an earlier run's
                shutil.rmtree(self.folder.out / earlier, ignore_errors=True)

    def step(self, progress: Progress) -> dict:
        """The recommendation loss (+ the orthogonal regulariser), then AdaLoRA's rank budget."""
        config = self.config
        self.peft_model.train()
        step_loss = rec_loss = 0.0
        teacher_log: dict[str, float] = {}
        options = []  # each micro-batch's prompt options (LLaRA's curriculum: hybrid or text-only prompts)
        for micro in range(config.grad_accum):
            rows, share = local_batch(self.train_rows, progress.step, micro, config.grad_accum, config.batch_size)
            options.append(self.extra.prompt_options(progress.step * config.grad_accum + micro))
            order = self.scorer.display_order(self.data, rows)
            prompts = self.scorer.prompts(self.data, rows, labels=True, order=order, **options[-1])
            loss, parts = self.loss_module(prompts, self.targets.keep(rows, order), self.targets.teacher_scores(rows, order))
            (loss * share / config.grad_accum).backward()  # under DDP the gradients arrive averaged over the processes
            step_loss += self.dist.mean(loss.item()) / config.grad_accum
            rec_loss += self.dist.mean(parts.ce.item()) / config.grad_accum
            if parts.kl is not None:  # the teacher's: the distillation term (before its weight) and top-1 agreement
                teacher_log["loss_kl"] = teacher_log.get("loss_kl", 0.0) + self.dist.mean(parts.kl.item()) / config.grad_accum
                teacher_log["teacher_agreement"] = (teacher_log.get("teacher_agreement", 0.0)
                                                    + self.dist.mean(parts.teacher_agreement) / config.grad_accum)
        self.dist.reduce_gradients(self.trainable)  # under FSDP: averaged here
        self.extra.before_optimizer_step(options)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        if config.adapter == "adalora":
            self.peft_model.base_model.update_and_allocate(progress.step)  # after the step, before zero_grad
        self.optimizer.zero_grad(set_to_none=True)
        # loss = the cross-entropy on the ground truth (loss_rec) + the weighted distillation term
        # (loss_kl unweighted) + the weighted orthogonal regulariser
        line = {"loss": step_loss, "loss_rec": rec_loss, **teacher_log, "grad_norm": grad_norm,
                "lr": config.lr * self.scheduler.get_last_lr()[0] / self.scheduler.base_lrs[0]}
        return {**line, **self.extra.log_fields(options)}

    def evaluate(self) -> dict:
        self.peft_model.eval()
        scorer = _KeepingScores(self.scorer)
        if self.config.eval_weights == "int8":  # a quantized copy scores; training goes on with the float model
            if self.dist.world > 1:
                raise ValueError("eval_weights: int8 scores on one CPU process only; use float under a multi-process launch")
            trained, self.bb.model = self.bb.model, int8_copy(self.peft_model)
            try:
                m = evaluate(scorer, self.data, "valid", rows=self.valid_rows)
            finally:
                self.bb.model = trained
        else:
            m = self.dist.through(self.loss_module, lambda: evaluate(scorer, self.data, "valid", rows=self.valid_rows))
        out = {f"valid_{k}": v for k, v in m["candidates"].items()}
        if self.valid_teacher_top1 is not None:
            # this process scored its share of the valid rows (perhaps none): sums over every process,
            # and every process takes part in both reductions
            where = {int(r): i for i, r in enumerate(self.valid_rows)}
            agree = sum(int(top1 == self.valid_teacher_top1[where[r]]) for r, top1 in scorer.top1.items())
            total = self.dist.mean(float(len(scorer.top1)))
            out["valid_teacher_agreement"] = self.dist.mean(float(agree)) / total if total else 0.0
        return out

    def score(self, scores: dict) -> float:
        return scores["valid_NDCG@5"]

    def keep_best(self, progress: Progress) -> None:
        if self.dist.is_main:
            self._save_adapter(self.folder.out / BEST)

    def record(self, progress: Progress, scores: dict) -> None:
        seen, seconds = self._seen(progress), round(progress.elapsed, 2)
        progress.history.append({"step": progress.step, "examples_seen": seen, "seconds": seconds,
                                 "valid_HR@1": scores["valid_HR@1"], "valid_NDCG@5": scores["valid_NDCG@5"]})
        self.folder.log({"step": progress.step, "examples_seen": seen, "seconds": seconds,
                         "wall_seconds": round(progress.wall, 2), "eval": scores})

    def postfix(self, line: dict, progress: Progress) -> dict:
        return {"loss": f"{line['loss']:.3f}", "best": f"{progress.best:.4f}"}

    def after_step(self, progress: Progress, last: bool) -> None:
        every = self.config.snapshot_every
        if every and (progress.step % every == 0 or last) and self.dist.is_main:
            snap = self.folder.out / SNAPSHOTS / RunLayout.snapshot_name(self._seen(progress))
            self._save_adapter(snap)
            write_json(snap / "config.json", self.config_dict)

    def checkpoint(self, rng) -> dict:
        peft_model, soft = self.peft_model, self.soft
        allocator = getattr(peft_model.base_model, "rankallocator", None)  # AdaLoRA's importance scores
        return {
            "config": self.config_dict, "adapter": _adapter_tensors(peft_model),
            "soft_prompt": soft.embedding.detach().clone() if soft is not None else None,
            "deep_prompt": soft.deep.detach().clone() if soft is not None and soft.is_deep else None,
            # the optimizer's state holds the extra's moments (LLaRA's projector) with the adapters'
            "extra": self.extra.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "allocator": (allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc) if allocator is not None else None,
            "rank_pattern": getattr(peft_model.peft_config["default"], "rank_pattern", None),
            "torch_rng": rng,
        }

    def restore(self, ckpt: dict) -> None:
        missing = self.peft_model.load_state_dict(ckpt["adapter"], strict=False).unexpected_keys
        if missing:
            raise ValueError(f"{self.folder.checkpoint_path} holds adapter tensors this model lacks: {missing[:3]}")
        if self.soft is not None and ckpt["soft_prompt"] is not None:
            with torch.no_grad():
                self.soft.embedding.copy_(ckpt["soft_prompt"])
                if self.soft.is_deep and ckpt.get("deep_prompt") is not None:
                    self.soft.deep.copy_(ckpt["deep_prompt"])
        if self.extra.module is not None:
            self.extra.load_state_dict(ckpt["extra"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        if self.config.adapter == "adalora":
            allocator = self.peft_model.base_model.rankallocator
            allocator.ipt, allocator.exp_avg_ipt, allocator.exp_avg_unc = ckpt["allocator"]
            self.peft_model.peft_config["default"].rank_pattern = ckpt["rank_pattern"]
        torch.set_rng_state(self.dist.own(ckpt["torch_rng"]))

    def summary(self, progress: Progress) -> dict:
        config, seen = self.config, self._seen(progress)
        return {
            "teacher": config.teacher, "method": config.method, "llm": self.bb.name, "steps": progress.step,
            "seconds": round(progress.elapsed, 2), "best_step": progress.best_step, "best_valid_NDCG@5": progress.best,
            "stopped_early": progress.stopped_early, "valid_samples": len(self.valid_rows),
            "launch": self.dist.describe(),
            "train_examples_seen": seen,
            "distinct_train_examples": int(min(seen, len(self.train_rows))),
            "wall_seconds": round(progress.wall, 2),
            "valid_history": progress.history,
            "valid_rows": self.valid_rows.astype(int).tolist(),  # indices into the run's samples
        }

    def write_outputs(self) -> None:
        _promote_best(self.folder.out, self.beside)

    def _seen(self, progress: Progress) -> int:
        return progress.step * self.config.grad_accum * self.config.batch_size

    def _save_adapter(self, dest: Path) -> None:
        """The adapter as it is now, with what a scorer needs beside it (finetuned_scorer)."""
        with atomic_dir(dest / "adapter") as tmp:
            self.peft_model.save_pretrained(tmp)
        if self.soft is not None:
            self.soft.save(dest / "soft_prompt.safetensors")
        self.extra.save(dest)


class _KeepingScores:
    """A scorer that passes scores through and keeps each row's top-1 candidate column (the
    valid rows' agreement with the teacher, without scoring them twice)."""

    def __init__(self, scorer: LLMScorer):
        self.scorer, self.name, self.batch_size = scorer, scorer.name, scorer.batch_size
        self.top1: dict[int, int] = {}

    def score_candidates(self, data: RunData, rows: np.ndarray):
        scores = self.scorer.score_candidates(data, rows)
        self.top1.update(zip(np.asarray(rows).tolist(), np.asarray(scores).argmax(axis=1).tolist()))
        return scores


def _keep_an_older_best(out: Path, beside: tuple[str, ...]) -> None:
    """An interrupted run of an older delrec kept its best adapter in place: keep it for the resume."""
    if distributed.current().is_main and (out / "checkpoint.pt").exists() and (out / "adapter").is_dir() \
            and not (out / BEST).exists():
        (out / BEST).mkdir()
        for part in ("adapter", *beside):
            if (out / part).exists():
                (out / part).rename(out / BEST / part)


def _promote_best(out: Path, beside: tuple[str, ...]) -> None:
    """Move the best adapter (and its soft prompt / projector) from .best/ into the stage folder,
    each by one rename; config.json and metrics.json follow (StageFolder.finish)."""
    best = out / BEST
    if not (best / "adapter").is_dir():
        raise RuntimeError(f"{best} holds no adapter: the stage finished without a trained evaluation to keep")
    for part in ("adapter", *beside):
        if (best / part).exists():
            if (out / part).is_dir():
                shutil.rmtree(out / part)
            (best / part).replace(out / part)
    shutil.rmtree(best, ignore_errors=True)


def stage2_inputs(run_dir: str | Path, config: FinetuneConfig) -> Stage2Inputs:
    """What the method's stage-2 hooks read of `config` (delrec.methods.registry.Stage2Inputs)."""
    method = methods.get(config.method)
    return Stage2Inputs(run_dir=Path(run_dir), teacher=config.teacher, seed=config.seed,
                        options=method.options_from(config.options), micro_batches=config.steps * config.grad_accum,
                        soft_prompt_file=config.soft_prompt, soft_tokens=config.soft_tokens)


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
    layers = {"layers_to_transform": top_layers(bb, config.adapter_layers)} if config.adapter_layers else {}
    if config.adapter == "lora":
        return LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                          target_modules=targets, task_type=task_type, **layers)
    total = max(1, config.steps)
    tinit = int(round(config.tinit * total))
    tfinal = min(int(round(config.tfinal * total)), max(0, total - tinit - 1))
    return AdaLoraConfig(init_r=config.init_r, target_r=config.target_r, tinit=tinit, tfinal=tfinal, deltaT=config.delta_t,
                         orth_reg_weight=config.orth_reg_weight, total_step=total, target_modules=targets, task_type=task_type,
                         **layers)


def top_layers(bb: Backbone, count: int) -> list[int]:
    """Indices of the top `count` transformer layers of `bb` (of each stack, for an encoder-decoder),
    where `adapter_layers` puts the adapters."""
    config = bb.model.config
    total = getattr(config, "num_hidden_layers", None) or config.num_layers
    if count > total:
        raise ValueError(f"adapter_layers={count}, but {bb.name} has {total} layers")
    return list(range(total - count, total))


def _adapter_tensors(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's full tensors for resuming. (peft's own state dict prunes AdaLoRA to its rank
    pattern, which cannot be loaded back into the unpruned model that training continues with.)"""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if "lora_" in k or "ranknum" in k}
