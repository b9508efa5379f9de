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
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from delrec import distributed
from delrec.data.protocol import RunData
from delrec.evaluate import candidate_ranks, evaluate, full_catalogue_rows, full_ranks, metrics_from_ranks
from delrec.io import atomic_path, read_json, write_json, write_parquet
from delrec.locks import holds_run_lock
from delrec.teachers import SequentialRecommender, TeacherConfig, build_model
from delrec.training.folder import StageFolder
from delrec.training.loop import Progress, Stage, train

log = logging.getLogger(__name__)


def pick_device(device: str | None = None) -> torch.device:
    """`auto`: this process's GPU when there is one (cuda:LOCAL_RANK under a launcher), else the CPU."""
    return distributed.current().device(device or "auto")


class TeacherLoss(nn.Module):
    """The teacher with its training loss as forward: the unit DistributedDataParallel synchronises."""

    def __init__(self, model: SequentialRecommender):
        super().__init__()
        self.model = model

    def forward(self, history: torch.Tensor, users: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.model.loss(history, users, target)


class TeacherScorer:
    """Adapts a trained model to the evaluator's Scorer protocol."""

    def __init__(self, model: SequentialRecommender, device: torch.device, name: str | None = None):
        self.model = model.eval()
        self.device = device
        self.name = name or model.config.model

    @property
    def num_items(self) -> int:
        """Items the model scores (its catalogue; index 0 is padding)."""
        return self.model.output_embeddings().shape[0] - 1

    def _inputs(self, data: RunData, rows: np.ndarray):
        history = torch.as_tensor(data.history[rows][:, -self.model.max_len :], device=self.device)
        if getattr(data, "unknown_users", False):  # requests of users the model has not seen (delrec.recommender)
            return history, None
        users = torch.as_tensor(data.user_idx[rows], device=self.device)
        return history, users

    @torch.no_grad()
    def score_candidates(self, data: RunData, rows: np.ndarray) -> torch.Tensor:
        history, users = self._inputs(data, rows)
        cands = torch.as_tensor(data.candidates[rows], device=self.device)
        return self.model.candidate_scores(history, users, cands).float().cpu()

    @torch.no_grad()
    def score_items(self, data: RunData, rows: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """[len(rows), k] scores of `items` ([len(rows), k] item indices) for each row."""
        history, users = self._inputs(data, rows)
        return self.model.candidate_scores(history, users, torch.as_tensor(items, device=self.device)).float().cpu()

    @torch.no_grad()
    def score_all(self, data: RunData, rows: np.ndarray) -> torch.Tensor:
        return self.model.full_scores(*self._inputs(data, rows)).float().cpu()


def _make_optimizer(model: torch.nn.Module, config: TeacherConfig) -> torch.optim.Optimizer:
    if config.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    if config.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; choose adam or adagrad")


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
    top_h: int = 10,
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
        self.data = RunData.load(run_dir / "data")
        self.folder = StageFolder(run_dir / "teachers" / config.model, stale=("model.safetensors", "topk.parquet"),
                                  counter="epoch")
        self.config_dict, self.total, self.patience = config.to_dict(), config.max_epochs, config.patience
        self.max_seconds, self.desc = config.max_seconds, f"train {config.model}"

        torch.manual_seed(config.seed)
        np.random.seed(config.seed)
        random.seed(config.seed)
        self.model = build_model(config, self.data.num_items, self.data.num_users, self.data.config.max_history).to(device)
        self.loss_module = self.dist.prepare(TeacherLoss(self.model), shard=False)  # small: replicated even under FSDP
        if self.dist.enabled:
            # the same initial weights everywhere (DDP broadcasts them), different dropout masks
            torch.manual_seed(config.seed * 1_000_003 + self.dist.rank + 1)
        self.optimizer = _make_optimizer(self.model, config)
        self.scorer = TeacherScorer(self.model, device)
        self.train_rows = self.data.indices("train")
        if len(self.train_rows) == 0:
            raise ValueError(f"{run_dir}: the train split is empty")
        self.history, self.users, self.target = (torch.as_tensor(a[self.train_rows], device=device)
                                                 for a in (self.data.history, self.data.user_idx, self.data.target))
        self.generator = torch.Generator().manual_seed(config.seed)  # the order of training samples
        self.best_weights = copy.deepcopy(self.model.state_dict())

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
            loss = self.loss_module(self.history[idx], self.users[idx], self.target[idx])
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
            # teachers also get full-ranking metrics
            "valid": evaluate(self.scorer, self.data, "valid", full_ranking=True),
            "test": evaluate(self.scorer, self.data, "test", full_ranking=True),
        }

    def write_outputs(self) -> None:
        write_topk(self.scorer, self.data, self.folder.out / "topk.parquet", self.top_h)
        save_teacher(self.model, self.folder.out, self.data)

    def config_json(self) -> None:
        return None  # save_teacher writes config.json: the settings with the data's shape


def teacher_topk(scorer: TeacherScorer, data: RunData, rows: np.ndarray, top_h: int,
                 batch_size: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """The teacher's top-h items over the catalogue and their scores, for `rows` (seen items
    excluded, as in full ranking); scored in blocks whose scores stay within
    FULL_SCORES_BLOCK_BYTES, so a catalogue of a million items holds a bounded memory."""
    top_items = np.zeros((len(rows), top_h), dtype=np.int32)
    top_scores = np.zeros((len(rows), top_h), dtype=np.float32)
    block = full_catalogue_rows(scorer.num_items, batch_size)
    for start in range(0, len(rows), block):
        part = rows[start : start + block]
        scores = scorer.score_all(data, part)
        r, items = data.seen_items(part)
        scores[torch.as_tensor(r), torch.as_tensor(items)] = float("-inf")
        scores[:, 0] = float("-inf")
        vals, idx = scores.topk(top_h, dim=1)
        top_items[start : start + len(part)], top_scores[start : start + len(part)] = idx.numpy(), vals.numpy()
    return top_items, top_scores


def write_topk(scorer: TeacherScorer, data: RunData, path: Path, top_h: int, batch_size: int = 1024) -> None:
    """The teacher's top-h over the catalogue for every sample (teacher_topk), and its scores on
    the sample's fixed candidates."""
    n = len(data.sample_id)
    top_items, top_scores = teacher_topk(scorer, data, np.arange(n), top_h, batch_size)
    cand_scores = np.zeros(data.candidates.shape, dtype=np.float32)
    for start in range(0, n, batch_size):
        rows = np.arange(start, min(start + batch_size, n))
        cand_scores[rows] = np.asarray(scorer.score_candidates(data, rows))
    write_parquet(
        path,
        pa.table(
            {
                "sample_id": pa.array(data.sample_id),
                "topk": pa.FixedSizeListArray.from_arrays(pa.array(top_items.reshape(-1)), top_h),
                "topk_scores": pa.FixedSizeListArray.from_arrays(pa.array(top_scores.reshape(-1)), top_h),
                "candidate_scores": pa.FixedSizeListArray.from_arrays(
                    pa.array(cand_scores.reshape(-1)), data.candidates.shape[1]
                ),
            }
        ),
    )


def save_teacher(model: SequentialRecommender, out_dir: Path, data: RunData) -> None:
    with atomic_path(out_dir / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    write_json(
        out_dir / "config.json",
        {
            "teacher": model.config.to_dict(),
            "num_items": model.num_items,
            "num_users": model.num_users,
            "max_len": model.max_len,
            "protocol": data.config.name,
        },
    )


def load_teacher(teacher_dir: str | Path, device: str | None = None, data: RunData | None = None) -> SequentialRecommender:
    """A trained teacher; with `data`, checked to have been trained on that data (its item and
    user counts, history length and protocol), so a run folder prepared again with other data
    fails here rather than scoring with a teacher of other items."""
    teacher_dir = Path(teacher_dir)
    weights = teacher_dir / "model.safetensors"
    if not weights.exists():
        raise FileNotFoundError(f"no trained teacher in {teacher_dir} (missing model.safetensors); run `delrec teacher train`")
    meta = read_json(teacher_dir / "config.json")
    if data is not None:
        trained = (meta["num_items"], meta["num_users"], meta["max_len"], meta.get("protocol"))
        wanted = (data.num_items, data.num_users, data.config.max_history, data.config.name)
        if trained != wanted:
            raise ValueError(f"the teacher in {teacher_dir} was trained on other data ({trained[0]} items, {trained[1]} users, "
                             f"history {trained[2]}, protocol {trained[3]}) than this run's ({wanted[0]} items, {wanted[1]} "
                             f"users, history {wanted[2]}, protocol {wanted[3]}); train it again")
    config = TeacherConfig.from_dict(meta["teacher"])
    model = build_model(config, meta["num_items"], meta["num_users"], meta["max_len"])
    model.load_state_dict(load_file(str(weights)))
    return model.to(pick_device(device)).eval()
