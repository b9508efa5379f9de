"""Stage 1 of DELRec (DPSM, paper Section IV-B): distil the teacher into a soft prompt.

The LLM is frozen; only the soft prompt is trained, on Temporal Analysis and Recommendation
Pattern Simulating examples from the train split, their losses mixed by an adaptive weighting
(see `weighting.py`). Lion optimizer (lr 5e-3, weight decay 1e-5; or AdamW), linear warm-up
and an optional decay, gradient clipping, gradient accumulation. The soft prompt starts random or
from sampled vocabulary embeddings (`soft_init`). Everything is written to RUN/distill/<name>/:

  soft_prompt.safetensors   the result
  config.json               the settings and the budget actually used
  train_log.jsonl           one line per step (losses, weights, lr) and per evaluation (step 0,
                            every `eval_every`, the end): per task HR@1 and NDCG@5 over its
                            candidates, optionally the LSR prompt's metrics (`valid_lsr_samples`)
  metrics.json              valid accuracy of TA and RPS, untrained vs trained soft prompt; every
                            evaluation (`valid_history`) and the valid rows used (`valid_rows`)
  checkpoint.pt             resume state (removed when done)
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from delrec.core import distributed
from delrec.core.io import atomic_dir
from delrec.core.layout import RunLayout
from delrec.core.locks import holds_run_lock
from delrec.data.store import RunData
from delrec.evaluation.metrics import evaluate, metrics_from_ranks, pessimistic_ranks
from delrec.llm.backbone import Backbone
from delrec.llm.scorer import LLMScorer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Prompt, Templates, lsr_prompt
from delrec.llm.verbalizer import Verbalizer
from delrec.teachers.lists import TeacherLists
from delrec.training.config import DistillConfig, seeded_backbone
from delrec.training.examples import ExampleBuilder
from delrec.training.folder import StageFolder
from delrec.training.loop import Progress, Stage, train
from delrec.training.optim import lr_schedule, make_optimizer
from delrec.training.rows import local_batch, valid_subset
from delrec.training.targets import teacher_scorer
from delrec.training.weighting import LossWeighting


@dataclass
class DistillResult:
    soft_prompt: SoftPrompt
    metrics: dict
    out_dir: Path


def prompt_ranks(verbalizer: Verbalizer, prompts: list[Prompt], soft_prompt: SoftPrompt | None) -> np.ndarray:
    """Pessimistic 0-based rank of each prompt's label among its candidates (a tied candidate
    counts as ranked above the label, as in `delrec.evaluation.metrics`); sharded over the processes of a
    multi-process launch."""

    def ranks(idx: np.ndarray) -> np.ndarray:
        chosen = [prompts[i] for i in idx]
        return np.array([pessimistic_ranks(s[None].float(), [p.candidates.index(p.label)])[0]
                         for p, s in zip(chosen, verbalizer.score(chosen, soft_prompt))], dtype=np.int64)

    return distributed.current().map_sharded(ranks, np.arange(len(prompts)), verbalizer.batch_size)


def accuracy(verbalizer: Verbalizer, prompts: list[Prompt], soft_prompt: SoftPrompt | None) -> float:
    """How often the LLM's top-scored candidate is the label (ties count as misses)."""
    return float(np.mean(prompt_ranks(verbalizer, prompts, soft_prompt) == 0)) if prompts else 0.0


class Stage1Loss(distributed.StageModule):
    """What stage 1 trains (the soft prompt; under `w UDPSM` the LLM too) and the loss it flows
    through, as one module: the unit that DDP synchronises or FSDP shards."""

    def __init__(self, verbalizer: Verbalizer, soft_prompt: SoftPrompt, objective: str, distill_weight: float = 0.0,
                 temperature: float = 1.0):
        super().__init__()
        self.soft_prompt = soft_prompt
        self.llm = verbalizer.backbone.model
        self.verbalizer, self.objective = verbalizer, objective
        self.distill_weight, self.temperature = distill_weight, temperature

    def loss(self, prompts: list[Prompt], teacher: list[torch.Tensor] | None = None) -> torch.Tensor:
        """The task's loss; with `teacher` (RPS: the teacher's scores of the listed items, in the
        prompt's order) plus the weighted distillation term (llm.losses.ranking_loss)."""
        return self.verbalizer.training_loss(prompts, self.soft_prompt, self.objective, teacher=teacher,
                                             distill_weight=self.distill_weight if teacher is not None else 0.0,
                                             temperature=self.temperature).total


@holds_run_lock
def distill(run_dir: str | Path, config: DistillConfig, name: str | None = None, backbone: Backbone | None = None,
            progress: bool = True, restart: bool = False) -> DistillResult:
    stage = DistillStage(Path(run_dir), config, name, backbone)
    metrics = train(stage, restart, progress)
    return DistillResult(stage.soft, metrics, stage.folder.out)


class DistillStage(Stage):
    """Stage 1 as the shared loop runs it (delrec.training.loop): per step, each task's loss and
    gradient kept apart, then weighted and combined (LossWeighting); evaluated before training
    (`w USP`, the untrained soft prompt, is the reference), every `eval_every` steps and at the
    end; the last soft prompt is the result (no best is kept: the accuracies are reported)."""

    desc, eval_at_start, config_cls = "stage 1 (distill)", True, DistillConfig

    def __init__(self, run_dir: Path, config: DistillConfig, name: str | None, backbone: Backbone | None):
        dist = self.dist = distributed.current()
        dist.check_batch(config.batch_size, "stage 1")
        self.config, self.config_dict = config, config.to_dict()
        self.folder = StageFolder(RunLayout(run_dir).stage1(name or config.teacher), stale=("soft_prompt.safetensors",))
        self.total, self.eval_every, self.checkpoint_every = config.steps, config.eval_every, config.checkpoint_every
        self.max_seconds = config.max_seconds

        data = self.data = RunData.load(RunLayout(run_dir).data)
        teacher = TeacherLists.load(run_dir, config.teacher, data, config.top_h) if "rps" in config.tasks else None
        templates = Templates.for_teacher(config.teacher, **config.templates)
        builder = self.builder = ExampleBuilder(data, templates, teacher, config.ta_examples, config.top_h, config.seed)

        bb = self.bb = seeded_backbone(config, backbone)
        self.device = bb.device
        self.llm_params = []
        if config.update_llm:
            for p in bb.model.parameters():
                p.requires_grad_(True)
            self.llm_params = [p for p in bb.model.parameters()]
        self.soft = SoftPrompt.for_backbone(bb, config.soft_tokens, seed=config.seed, init=config.soft_init)
        self.verbalizer = Verbalizer(bb, "full-title", config.verbalizer_batch)
        if config.soft_depth:  # started where the input prompt puts the slot's hidden states after the LSR text
            lsr = lsr_prompt(templates, ["-"], ["-"], soft_prompt=True)
            self.soft.init_deep(bb, self.verbalizer._before_ids(lsr), config.soft_depth)
            self.soft.embedding.requires_grad_(any(p is self.soft.embedding for p in self.soft.trainable()))
        self.weighting = LossWeighting(config.weighting, config.tasks, config.fixed_weights).to(bb.device)

        # the training examples: a seeded order over the eligible train rows (optionally a subset)
        rng = np.random.default_rng(config.seed)
        self.order = {}
        for task in config.tasks:
            rows = builder.eligible("train", task)
            if len(rows) == 0:
                raise ValueError(f"no train samples can make a {task.upper()} example")
            rows = rng.permutation(rows)
            self.order[task] = rows[: config.max_train_examples] if config.max_train_examples else rows
        self.valid_rows = {t: rng.permutation(builder.eligible("valid", t))[: config.valid_samples] for t in config.tasks}
        self.valid = {t: builder.build(t, rows) for t, rows in self.valid_rows.items()}
        # `w/o LSR`: the recommendation prompt with the current soft prompt and the frozen LLM
        self.lsr_scorer = LLMScorer(bb, builder.titles, templates, soft_prompt=self.soft, batch_size=config.verbalizer_batch,
                                    name="delrec:wo-lsr", progress=False) if config.valid_lsr_samples > 0 else None
        if self.lsr_scorer is not None:
            self.valid_rows["lsr"] = valid_subset(data, config.seed, config.valid_lsr_samples)

        self.trainable = [*self.soft.trainable(), *self.llm_params]
        # RPS's soft target: the teacher's own scores of the items its list shows
        self.rps_teacher = (teacher_scorer(run_dir, config.teacher, data, required=True)
                            if config.rps_distill_weight else None)
        self.loss_module = dist.prepare(Stage1Loss(self.verbalizer, self.soft, config.objective, config.rps_distill_weight,
                                                   config.rps_distill_temperature))
        groups = [{"params": self.soft.trainable(), "lr": config.lr}]
        if self.llm_params:
            groups.append({"params": self.llm_params, "lr": config.llm_lr})
        if config.weighting == "uncertainty":
            groups.append({"params": [self.weighting.log_vars], "lr": config.lr, "weight_decay": 0.0})
        self.optimizer = make_optimizer(config.optimizer, groups, config.lr, config.weight_decay)
        self.scheduler = lr_schedule(self.optimizer, config.lr_schedule, config.warmup_steps, config.steps,
                                     config.lr_min_ratio)

    def step(self, progress: Progress) -> dict:
        """Per task its loss and gradient, kept apart, then weighted and combined."""
        config, dist = self.config, self.dist
        grads = {t: [torch.zeros_like(p) for p in self.trainable] for t in config.tasks}
        losses = {}
        for micro in range(config.grad_accum):
            for task in config.tasks:
                rows, share = local_batch(self.order[task], progress.step, micro, config.grad_accum, config.batch_size)
                prompts = self.builder.build(task, rows)
                loss = self.loss_module(prompts, self._rps_targets(rows, prompts) if task == "rps" else None) * share
                loss.backward()  # under DDP the gradients arrive averaged over the processes
                dist.reduce_gradients(self.trainable)  # under FSDP they are averaged here
                for acc, p in zip(grads[task], self.trainable):
                    if p.grad is not None:
                        acc += p.grad / config.grad_accum
                        p.grad = None  # each task's gradient is kept apart for the weighting
                losses[task] = losses.get(task, 0.0) + dist.mean(loss.item()) / config.grad_accum
        self.weighting.combine(self.trainable, grads, losses)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, config.max_grad_norm).item()
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {**{f"loss_{t}": v for t, v in losses.items()}, **{f"weight_{t}": w for t, w in self.weighting.current().items()},
                "grad_norm": grad_norm, "lr": self.scheduler.get_last_lr()[0]}

    def _rps_targets(self, rows: np.ndarray, prompts: list[Prompt]) -> list[torch.Tensor] | None:
        """Per RPS prompt, the teacher's scores of the items it lists, in the (shuffled) order listed."""
        if self.rps_teacher is None:
            return None
        top = self.builder.teacher.topk[rows][:, : self.config.top_h]
        scores = np.asarray(self.rps_teacher.score_items(self.data, rows, top))
        titles = self.builder.titles
        return [torch.as_tensor([dict(zip((titles[i] for i in items), row))[t] for t in p.candidates])
                for items, row, p in zip(top, scores, prompts)]

    def evaluate(self) -> dict:
        """Per task: HR@1 (the old `*_valid_accuracy`, kept) and NDCG@5 over the task's candidates;
        with `valid_lsr_samples`, the recommendation metrics of the `w/o LSR` model."""

        def run() -> dict:
            out = {}
            for t in self.config.tasks:
                m = metrics_from_ranks(prompt_ranks(self.verbalizer, self.valid[t], self.soft))
                out.update({f"{t}_valid_accuracy": m["HR@1"], f"{t}_valid_HR@1": m["HR@1"], f"{t}_valid_NDCG@5": m["NDCG@5"]})
            if self.lsr_scorer is not None:
                m = evaluate(self.lsr_scorer, self.data, "valid", rows=self.valid_rows["lsr"])["candidates"]
                out.update({f"valid_lsr_{k}": v for k, v in m.items()})
            return out

        return self.dist.through(self.loss_module, run)

    def record(self, progress: Progress, scores: dict) -> None:
        entry = {"step": progress.step, "examples_seen": progress.step * self.config.grad_accum * self.config.batch_size,
                 "seconds": round(progress.elapsed, 2), "wall_seconds": round(progress.wall, 2), "eval": scores}
        progress.history.append(entry)
        self.folder.log(entry)

    def checkpoint(self, rng) -> dict:
        return {"config": self.config_dict, "soft_prompt": self.soft.embedding.detach().clone(),
                "deep_prompt": self.soft.deep.detach().clone() if self.soft.is_deep else None,
                "llm": self.bb.model.state_dict() if self.llm_params else None,
                "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                "weighting": self.weighting.state_dict(), "torch_rng": rng}

    def restore(self, ckpt: dict) -> None:
        with torch.no_grad():
            self.soft.embedding.copy_(ckpt["soft_prompt"])
            if self.soft.is_deep:
                self.soft.deep.copy_(ckpt["deep_prompt"])
            if self.llm_params:
                self.bb.model.load_state_dict(ckpt["llm"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.scheduler.load_state_dict(ckpt["scheduler"])
        self.weighting.load_state_dict(ckpt["weighting"])
        torch.set_rng_state(self.dist.own(ckpt["torch_rng"]))

    def summary(self, progress: Progress) -> dict:
        config, seen = self.config, progress.step * self.config.grad_accum * self.config.batch_size
        first, last = progress.history[0], progress.history[-1]
        if config.update_llm:
            # `w UDPSM`: the updated LLM is a backbone of its own (weights + tokenizer), and the soft
            # prompt belongs to it: stage 2 loads both with --llm RUN/distill/NAME/llm
            self.soft.backbone = str(self.folder.out / "llm")
        return {
            "teacher": config.teacher, "llm": self.bb.name, "steps": progress.step, "seconds": round(progress.elapsed, 2),
            "wall_seconds": round(progress.wall, 2),
            "examples_seen_per_task": seen,
            "distinct_train_examples_per_task": {t: min(seen, len(self.order[t])) for t in config.tasks},
            "valid_samples": {t: len(v) for t, v in self.valid.items()},
            "valid_lsr_samples": len(self.valid_rows.get("lsr", ())),
            "valid_rows": {t: np.asarray(r).astype(int).tolist() for t, r in self.valid_rows.items()},  # into the run's samples
            "launch": self.dist.describe(),
            # the untrained soft prompt (`w USP`) is the reference for the trained one
            "untrained": _accuracies(first["eval"]), "valid_history": progress.history,
            "trained": _accuracies(last["eval"]), "trained_at_step": last["step"],
        }

    def write_outputs(self) -> None:
        out = self.folder.out
        if self.llm_params:
            with atomic_dir(out / "llm") as tmp:
                self.bb.model.save_pretrained(tmp)
                self.bb.tokenizer.save_pretrained(tmp)
        self.soft.save(out / "soft_prompt.safetensors")


def _accuracies(scores: dict) -> dict:
    return {k: v for k, v in scores.items() if k.endswith("_valid_accuracy")}
