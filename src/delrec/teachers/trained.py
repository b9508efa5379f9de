"""A trained teacher as later steps use it: saved to and loaded from its folder
(RUN/teachers/<model>/), scored as the evaluator's Scorer, and its top-h lists over the catalogue
(topk.parquet: stage 1's RPS examples, the teacher-list prompts, retrieval)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
from safetensors.torch import load_file, save_file

from delrec.core import distributed
from delrec.core.io import atomic_path, read_json, write_json, write_parquet
from delrec.data.store import RunData
from delrec.evaluation.metrics import full_catalogue_rows
from delrec.teachers import SequentialRecommender, TeacherConfig, build_model


def pick_device(device: str | None = None) -> torch.device:
    """`auto`: this process's GPU when there is one (cuda:LOCAL_RANK under a launcher), else the CPU."""
    return distributed.current().device(device or "auto")


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

    def _inputs(self, data: RunData, rows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor | None, dict]:
        """(history, users, keyword inputs): the keywords hold the time gaps of a model that reads them (KDA)."""
        history = torch.as_tensor(data.history[rows][:, -self.model.max_len :], device=self.device)
        extra = {}
        if self.model.uses_time_gaps:
            if not hasattr(data, "history_gaps"):
                raise ValueError(f"{self.name} reads the time of each history item, which these requests do not carry")
            extra["gaps"] = torch.as_tensor(data.history_gaps(rows)[:, -self.model.max_len :], device=self.device)
        if getattr(data, "unknown_users", False):  # requests of users the model has not seen (delrec.serving.recommender)
            return history, None, extra
        return history, torch.as_tensor(data.user_idx[rows], device=self.device), extra

    @torch.no_grad()
    def score_candidates(self, data: RunData, rows: np.ndarray) -> torch.Tensor:
        history, users, extra = self._inputs(data, rows)
        cands = torch.as_tensor(data.candidates[rows], device=self.device)
        return self.model.score_candidates(history, users, cands, **extra).float().cpu()

    @torch.no_grad()
    def score_items(self, data: RunData, rows: np.ndarray, items: np.ndarray) -> torch.Tensor:
        """[len(rows), k] scores of `items` ([len(rows), k] item indices) for each row."""
        history, users, extra = self._inputs(data, rows)
        return self.model.score_candidates(history, users, torch.as_tensor(items, device=self.device), **extra).float().cpu()

    @torch.no_grad()
    def score_all(self, data: RunData, rows: np.ndarray) -> torch.Tensor:
        history, users, extra = self._inputs(data, rows)
        return self.model.score_all(history, users, **extra).float().cpu()


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
            **({"shapes": model.shapes} if hasattr(model, "shapes") else {}),  # KDA: sizes its item side gave it
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
    inputs = {"shapes": meta["shapes"]} if "shapes" in meta else {}
    model = build_model(config, meta["num_items"], meta["num_users"], meta["max_len"], **inputs)
    model.load_state_dict(load_file(str(weights)))
    return model.to(pick_device(device)).eval()
