"""What every training stage (a teacher, stage 1, stage 2) does around its inner step, written once.

    folder = StageFolder(out, stale=("soft_prompt.safetensors",))   # results of an earlier run go
    ckpt = folder.resume(DistillConfig, config_dict, restart, device)   # None: a fresh start
    clock = Clock(*(ckpt and (ckpt["elapsed"], ckpt["wall"])) or (), max_seconds=config.max_seconds)
    while ...:
        ...                                  # the stage's own step
        folder.log({...})
        with clock.paused():                 # evaluations are not training time
            ...
        if clock.budget_spent(): ...
        folder.checkpoint(lambda rng: {...}) # every process's RNG state gathered, the main one writes
    folder.finish(write_outputs, config_dict, metrics)   # metrics.json last: marks the stage complete

A checkpoint written with other settings (runtime ones aside, delrec.core.settings) is refused with the
settings that differ; a resume drops the log lines written after the checkpoint.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import time
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch

from delrec.core import distributed, tracking
from delrec.core.io import atomic_path, write_json
from delrec.core.settings import runtime_names, same_identity

log = logging.getLogger(__name__)


class StageFolder:
    """RUN/<stage>/<name>/: its checkpoint.pt, train_log.jsonl, config.json and metrics.json.
    `counter`: the log's and checkpoint's position key ("step", or "epoch" for teachers)."""

    def __init__(self, out: str | Path, stale: Sequence[str] = (), counter: str = "step"):
        self.dist = distributed.current()
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.checkpoint_path, self.log_path = self.out / "checkpoint.pt", self.out / "train_log.jsonl"
        self.counter = counter
        self.tag_prefix = f"{self.out.parent.name}/{self.out.name}"  # "distill/sasrec": the stages' tags never collide
        if self.dist.is_main:
            for name in ("metrics.json", *stale):  # a new run invalidates the results of an earlier one
                path = self.out / name
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink(missing_ok=True)

    def resume(self, config_cls, config: dict, restart: bool, map_location=None,
               position: Callable[[dict], int] | None = None) -> dict | None:
        """The checkpoint to continue from, or None for a fresh start (the old log then goes).
        `config`: the settings as the stage records them; `position(ckpt)`: where it stopped
        (default ckpt[counter]); log lines after it are dropped."""
        if not self.checkpoint_path.exists() or restart:
            if self.dist.is_main:
                self.log_path.unlink(missing_ok=True)
            return None
        ckpt = load_checkpoint(self.checkpoint_path, map_location)
        if not same_identity(config_cls, ckpt["config"], config):
            skip = runtime_names(config_cls)
            diff = {k: (ckpt["config"].get(k), v) for k, v in json.loads(json.dumps(config)).items()
                    if k not in skip and ckpt["config"].get(k, v) != v}
            raise ValueError(f"{self.checkpoint_path} was written with other settings {diff} (checkpoint, requested); "
                             "pass --restart to start again")
        if self.dist.is_main:
            self.truncate_log((position or (lambda c: c[self.counter]))(ckpt))
        return ckpt

    def log(self, entry: dict) -> None:
        """One line of train_log.jsonl (main process only), written with one write() so that a
        kill leaves at most a torn last line, which the next resume drops. Then the live tracker
        (delrec.core.tracking, a no-op unless the run tracks) gets its scalars at the entry's counter."""
        if self.dist.is_main:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
            if self.counter in entry:
                tracking.current().log(self.tag_prefix, {k: v for k, v in entry.items() if k != self.counter}, entry[self.counter])

    def truncate_log(self, position: int) -> None:
        """Drop log lines after `position` (a crash may have left some after the checkpoint), and
        a torn line (a kill or a full disk in the middle of a write) with a warning."""
        if not self.log_path.exists():
            return
        keep = []
        for number, line in enumerate(self.log_path.read_text(errors="replace").splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                log.warning("%s line %d is torn (%r...): dropped", self.log_path, number, line[:40])
                continue
            if entry.get(self.counter, position + 1) <= position:
                keep.append(line)
        with atomic_path(self.log_path) as tmp:
            tmp.write_text("".join(line + "\n" for line in keep))

    def checkpoint(self, payload: Callable[[list], dict], rng_state: Callable[[], object] = torch.get_rng_state) -> None:
        """Gather every process's RNG state (a collective: all processes call this), then the
        main process writes `payload(rng_states)` atomically."""
        rng = self.dist.gather(rng_state())
        if self.dist.is_main:
            with atomic_path(self.checkpoint_path) as tmp:
                torch.save(payload(rng), tmp)

    def finish(self, write_outputs: Callable[[], None] | None, config: dict | None, metrics: dict) -> None:
        """The stage's own outputs, config.json, then metrics.json last (it marks the stage as
        complete); the checkpoint goes; no process continues before the files are on disk."""
        if self.dist.is_main:
            if write_outputs is not None:
                write_outputs()
            if config is not None:
                write_json(self.out / "config.json", config)
            write_json(self.out / "metrics.json", metrics)
            self.checkpoint_path.unlink(missing_ok=True)
        self.dist.barrier()


class UnsafeCheckpoint(ValueError):
    """A checkpoint that holds more than tensors and plain containers: refused unread."""


def load_checkpoint(path: Path, map_location=None) -> dict:
    """A stage's checkpoint.pt, loaded with `weights_only=True`: tensors, numbers, strings and
    plain containers only, so a planted object (a `__reduce__` that runs code) is refused rather
    than executed. Every stage stores its RNG states in that form (training/teacher.py)."""

    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UnsafeCheckpoint(f"{path} holds objects other than tensors and plain containers, so it was not loaded "
                               f"(loading it could run code): {first[:300]}. If you did not write it, delete it; "
                               "pass --restart to start this stage again") from None
    except (EOFError, RuntimeError) as err:
        raise ValueError(f"{path} is not a readable checkpoint ({type(err).__name__}: {str(err)[:200]}); "
                         "pass --restart to start this stage again") from None


class Clock:
    """Training seconds (`elapsed`: what the time budget counts, evaluations excluded) and wall
    seconds (`wall`: with them), both continued from a checkpoint's values."""

    def __init__(self, elapsed: float = 0.0, wall: float | None = None, max_seconds: float | None = None):
        now = time.perf_counter()
        self._start, self._wall_start = now - elapsed, now - (elapsed if wall is None else wall)
        self.max_seconds = max_seconds

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start

    @property
    def wall(self) -> float:
        return time.perf_counter() - self._wall_start

    @contextmanager
    def paused(self):
        """Time spent inside (an evaluation) counts as wall time only."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self._start += time.perf_counter() - t0

    def budget_spent(self) -> bool:
        """Whether the time budget is spent: the main process decides for all (a collective)."""
        return self.max_seconds is not None and distributed.current().main_decides(self.elapsed > self.max_seconds)
