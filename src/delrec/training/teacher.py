"""Train a teacher on the train split, early-stop on valid, and write what DELRec reads:

RUN/teachers/<model>/
  config.json        settings + data shape
  model.safetensors  the best weights (by valid score)
  metrics.json       valid and test metrics (15 candidates, and full ranking)
  topk.parquet       for every sample: the teacher's top-h items over the catalogue (items seen
                     before the target excluded) and its scores on the 15 fixed candidates
  train_log.jsonl    one line per epoch
  checkpoint.pt      resume state while training (removed when done)
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from delrec.core import distributed
from delrec.core.layout import RunLayout
from delrec.core.locks import holds_run_lock
from delrec.data.attributes import read_item_attributes
from delrec.data.store import RunData
from delrec.evaluation.metrics import candidate_ranks, evaluate, full_ranks, metrics_from_ranks
from delrec.llm.item_init import pca_title_embeddings, title_embeddings
from delrec.teachers import MODELS, SequentialRecommender, TeacherConfig, build_model
from delrec.teachers.kda import ItemSide
from delrec.teachers.lists import DEFAULT_TOP_H
from delrec.teachers.trained import TeacherScorer, pick_device, save_teacher, write_topk
from delrec.training.folder import StageFolder
from delrec.training.loop import Progress, Stage, train
from delrec.training.optim import make_optimizer


class TeacherLoss(nn.Module):
    """The teacher with its training loss as forward: the unit DistributedDataParallel synchronises."""

    def __init__(self, model: SequentialRecommender):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, users: torch.Tensor, target: torch.Tensor, **extra) -> torch.Tensor:
        return self.model.loss(history, users, target, **extra)  # extra: KDA's time gaps


def _valid_score(scorer: TeacherScorer, data: RunData) -> float:
    """Model selection metric: NDCG@10 on valid, measured the way the protocol reports it."""
    rows = data.indices("valid")
    ranks = full_ranks(scorer, data, rows) if data.config.name == "loo" else candidate_ranks(scorer, data, rows)
    return metrics_from_ranks(ranks)["NDCG@10"]


def _rng_state() -> dict:
    """Every RNG's state as tensors and plain values, so the checkpoint loads with weights_only."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "python": random.getstate()}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


@dataclass
class TrainResult:
    model: SequentialRecommender
    metrics: dict
    out_dir: Path


@holds_run_lock
def train_teacher(
    run_dir: str | Path,
    config: TeacherConfig,
    device: str | None = None,
    top_h: int = DEFAULT_TOP_H,
    progress: bool = True,
    restart: bool = False,
) -> TrainResult:
    stage = TeacherStage(Path(run_dir), config, pick_device(device), top_h)
    metrics = train(stage, restart, progress)
    return TrainResult(stage.model, metrics, stage.folder.out)


class TeacherStage(Stage):
    """A teacher's training as the shared loop runs it (delrec.training.loop): one epoch over the
    train split in a seeded order per step, the valid NDCG@10 after each (counted in the time
    budget), the best weights kept in memory, early stopping after `patience` epochs."""

    counter, eval_in_budget, config_cls = "epoch", True, TeacherConfig

    def __init__(self, run_dir: Path, config: TeacherConfig, device: torch.device, top_h: int):
        self.dist = distributed.current()
        self.config, self.top_h, self.device = config, top_h, device
        self.model_class = MODELS.get(config.model)
        self.data = RunData.load(RunLayout(run_dir).data)
        self.folder = StageFolder(RunLayout(run_dir).teacher(config.model), stale=("model.safetensors", "topk.parquet"),
                                  counter="epoch")
        self.config_dict, self.total, self.patience = config.to_dict(), config.max_epochs, config.patience
        self.max_seconds, self.desc = config.max_seconds, f"train {config.model}"

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = build_model(config, self.data.num_items, self.data.num_users, self.data.config.max_history,
                                 **self._model_inputs(run_dir)).to(device)
        if getattr(self.model, "init_from_llm", False):  # LLM2BERT4Rec: item embeddings from the LLM's titles
            with torch.no_grad():
                self.model.item_embedding.weight[1 : self.data.num_items + 1] = pca_title_embeddings(
                    self.data, config.llm, config.dim).to(device)
        self.loss_module = self.dist.prepare(TeacherLoss(self.model), shard=False)  # small: replicated even under FSDP
        if self.dist.enabled:
            # the same initial weights everywhere (DDP broadcasts them), different dropout masks
            torch.manual_seed(config.seed * 1_000_003 + self.dist.rank + 1)
        self.optimizer = make_optimizer(config.optimizer, self.model.parameters(), config.lr, config.weight_decay)
        self.scorer = TeacherScorer(self.model, device)
        self.train_rows = self.data.indices("train")
        if len(self.train_rows) == 0:
            raise ValueError(f"{run_dir}: the train split is empty")
        self.history, self.users, self.target = (torch.as_tensor(a[self.train_rows], device=device)
                                                 for a in (self.data.history, self.data.user_idx, self.data.target))
        self.gaps = torch.as_tensor(self.data.history_gaps(self.train_rows), device=device) if self.model.uses_time_gaps else None
        self.generator = torch.Generator().manual_seed(config.seed)  # the order of training samples
        self.best_weights = copy.deepcopy(self.model.state_dict())

    def _model_inputs(self, run_dir: Path) -> dict:
        """What a model reads besides the sequences: KDA's item attributes (and KDALRD's LLM text embeddings)."""
        if not getattr(self.model_class, "reads_item_side", False):
            return {}
        attributes = read_item_attributes(RunLayout(run_dir).data, self.data.items)
        text = None
        if self.model_class.reads_llm:
            embeddings = title_embeddings(self.data, self.config.llm).numpy()
            text = np.concatenate([np.zeros_like(embeddings[:1]), embeddings])  # row 0: padding
        return {"side": ItemSide(attributes, text, num_interactions=len(self.data.user_items))}

    def step(self, progress: Progress) -> dict:
        """One epoch over the train split in a seeded order (cut short when the time budget runs out)."""
        dist, model = self.dist, self.model
        model.train()
        perm = torch.randperm(len(self.train_rows), generator=self.generator).to(self.device)
        total_loss, seen, partial = 0.0, 0, False
        for n, i in enumerate(range(0, len(perm), self.config.batch_size)):
            if n % 16 == 15 and self.clock.budget_spent():  # an epoch can take minutes
                partial = True
                break
            batch = perm[i : i + self.config.batch_size]  # the global batch; this process takes its share
            if len(batch) < dist.world:
                continue  # a last batch too small to give every process an example
            idx = dist.local_share(batch)
            extra = {"gaps": self.gaps[idx]} if self.gaps is not None else {}
            loss = self.loss_module(self.history[idx], self.users[idx], self.target[idx], **extra)
            self.optimizer.zero_grad(set_to_none=True)
            (loss * dist.loss_scale(len(idx), len(batch))).backward()  # DDP averages over processes
            self.optimizer.step()
            total_loss += loss.item() * len(idx)
            seen += len(batch)
        total_loss = dist.mean(total_loss) * dist.world  # summed over the processes' shares
        line = {"loss": total_loss / max(1, seen)}
        if partial:
            line["partial"] = True  # stopped inside the epoch by the time budget (loss: over the batches run)
        return line

    def evaluate(self) -> dict:
        self.model.eval()
        return {"valid_NDCG@10": _valid_score(self.scorer, self.data)}

    def score(self, scores: dict) -> float:
        return scores["valid_NDCG@10"]

    def keep_best(self, progress: Progress) -> None:
        self.best_weights = copy.deepcopy(self.model.state_dict())

    def log_step(self, progress: Progress, line: dict, scores: dict | None) -> None:
        # one line per epoch, with its valid score
        self.folder.log({"epoch": progress.step, "loss": line["loss"], **scores, "seconds": progress.elapsed,
                         "lr": self.optimizer.param_groups[0]["lr"], **({"partial": True} if "partial" in line else {})})

    def postfix(self, line: dict, progress: Progress) -> dict:
        return {"loss": f"{line['loss']:.3f}", "best": progress.best_step}

    def checkpoint(self, rng) -> dict:
        return {"config": self.config_dict, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "best_weights": self.best_weights, "rng": rng, "generator": self.generator.get_state()}

    def restore(self, ckpt: dict) -> None:
        self.model.load_state_dict(ckpt["model"])
        self.optimizer.load_state_dict(ckpt["optimizer"])
        self.best_weights = ckpt["best_weights"]
        _set_rng_state(self.dist.own(ckpt["rng"]))
        self.generator.set_state(ckpt["generator"])

    def rng_state(self):
        return _rng_state()  # every RNG: numpy and Python draw in the teachers' data order too

    def summary(self, progress: Progress) -> dict:
        self.model.load_state_dict(self.best_weights)
        self.model.eval()
        return {
            "model": self.config.model,
            "protocol": self.data.config.name,
            "best_epoch": progress.best_step if progress.best >= 0 else -1,
            "epochs_run": progress.step,
            "train_seconds": round(progress.elapsed, 2),
            "device": str(self.device),
            "top_h": self.top_h,  # width of topk.parquet: part of the fingerprint later stages check
            # teachers also get full-ranking metrics (not a target-aware model: a pass per item of the
            # catalogue and sample; the pipeline ranks its test samples over the catalogue, eval-full)
            "valid": evaluate(self.scorer, self.data, "valid", full_ranking=self.model.writes_lists),
            "test": evaluate(self.scorer, self.data, "test", full_ranking=self.model.writes_lists),
        }

    def write_outputs(self) -> None:
        if self.model.writes_lists:
            write_topk(self.scorer, self.data, self.folder.out / "topk.parquet", self.top_h)
        save_teacher(self.model, self.folder.out, self.data)

    def config_json(self) -> None:
        return None  # save_teacher writes config.json: the settings with the data's shape
