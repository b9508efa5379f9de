"""Live experiment tracking: every stage's log lines, as scalars, to TensorBoard, W&B or MLflow.

`tracking: tensorboard | wandb | mlflow | none` in a run config (default none). `delrec run` opens
one tracker for the whole run (`for_run`), on the main process only; every line a stage writes to
its train_log.jsonl (delrec.training.folder.StageFolder.log) is forwarded to `current()`:

    with tracking.for_run("tensorboard", run_dir, asdict(config)):   # RUN/tb/, the config as hparams
        ...  # teachers, stage 1, stage 2: folder.log(entry) -> current().log("distill/sasrec", entry, step)

A scalar's tag is `<stage>/<folder>/<key>` (`finetune/sasrec-delrec/loss`; a nested dict one level
down: `distill/sasrec/eval/rps_valid_NDCG@5`), its step the entry's own counter (`step`, or `epoch`
for teachers), so the stages of one run never collide. Only finite numbers are logged. The JSON
logs in the run folder stay the source of truth: the report reads those, never a tracker.
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import numbers
import os
import re
from contextlib import contextmanager
from pathlib import Path

from delrec.core import distributed

log = logging.getLogger(__name__)

# the pip extra that installs each tracker's library (pyproject.toml)
EXTRAS = {"tensorboard": "tracking", "wandb": "wandb", "mlflow": "mlflow"}


class TrackerUnavailable(RuntimeError):
    """The tracker's library is not installed (a RuntimeError: the CLI prints it as one line)."""


def scalars_of(entry: dict) -> dict[str, float]:
    """The finite numbers of a log entry; a nested dict (an evaluation's metrics) one level down as
    `key/subkey`. Booleans (`partial`), strings, lists and None are not curves: skipped."""

    def number(value) -> float | None:
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            return None
        value = float(value)
        return value if math.isfinite(value) else None

    out = {}
    for key, value in entry.items():
        items = [(f"{key}/{k}", v) for k, v in value.items()] if isinstance(value, dict) else [(key, value)]
        for name, v in items:
            if (x := number(v)) is not None:
                out[name] = x
    return out


def flatten(config: dict, parent: str = "") -> dict:
    """A nested config as `section.key` -> value (the override syntax of `delrec run`)."""
    out = {}
    for key, value in config.items():
        name = f"{parent}.{key}" if parent else str(key)
        if isinstance(value, dict) and value:
            out.update(flatten(value, name))
        else:
            out[name] = value
    return out


class Tracker:
    """What `current()` is when nothing tracks: every call does nothing."""

    def log(self, tag_prefix: str, scalars: dict, step: int) -> None:
        values = scalars_of(scalars)
        if values:
            self._write(tag_prefix, {f"{tag_prefix}/{k}": v for k, v in values.items()}, int(step))

    def _write(self, tag_prefix: str, scalars: dict[str, float], step: int) -> None:
        """`scalars`: full tags (`<tag_prefix>/<key>`) -> finite values."""

    def close(self, failed: bool = False) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files under RUN/tb/ (`tensorboard --logdir RUN/tb`); the config as a text summary
    (`config`, YAML) and as the HParams plugin's flattened hyper-parameters."""

    def __init__(self, run_dir: Path, hparams: dict):
        SummaryWriter = _require("tensorboard", "torch.utils.tensorboard").SummaryWriter
        import yaml
        from torch.utils.tensorboard.summary import hparams as hparams_summaries

        self.writer = SummaryWriter(log_dir=str(run_dir / "tb"), flush_secs=15)
        self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(hparams, sort_keys=False) + "```")
        # into the writer's own file: add_hparams would open a second writer (and event file) for them
        flat = {k: v if isinstance(v, (int, float, str, bool)) else json.dumps(v) for k, v in flatten(hparams).items()
                if v is not None}
        for summary in hparams_summaries(flat, {}):
            self.writer._get_file_writer().add_summary(summary)

    def _write(self, tag_prefix, scalars, step):
        for tag, value in scalars.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self, failed=False):
        self.writer.close()  # flushes


class WandbTracker(Tracker):
    """A W&B run named after the run folder (project: $WANDB_PROJECT, default delrec; files under
    RUN/wandb/). W&B's own step must only grow, and each stage counts from 0 again: every stage
    gets its own x-axis, `<prefix>/step`, instead."""

    def __init__(self, run_dir: Path, hparams: dict):
        self.wandb = _require("wandb", "wandb")
        self.run = self.wandb.init(project=os.environ.get("WANDB_PROJECT", "delrec"), dir=str(run_dir), config=hparams,
                                   name=run_dir.name)
        self.axes: set[str] = set()

    def log(self, tag_prefix, scalars, step):
        if tag_prefix not in self.axes:  # declared once per stage, before its first point
            self.axes.add(tag_prefix)
            self.wandb.define_metric(f"{tag_prefix}/step")
            self.wandb.define_metric(f"{tag_prefix}/*", step_metric=f"{tag_prefix}/step")
        super().log(tag_prefix, scalars, step)

    def _write(self, tag_prefix, scalars, step):
        self.wandb.log({**scalars, f"{tag_prefix}/step": step})

    def close(self, failed=False):
        self.wandb.finish(exit_code=1 if failed else 0)


# what MLflow accepts (its key validation), and its value limit of older servers
_MLFLOW_KEY = re.compile(r"[^/\w.\- :]")
_MLFLOW_VALUE_CHARS, _MLFLOW_BATCH = 500, 100


class MlflowTracker(Tracker):
    """An MLflow run named after the run folder, where $MLFLOW_TRACKING_URI and
    $MLFLOW_EXPERIMENT_NAME say (MLflow's defaults otherwise). Params: the flattened config,
    values cut to MLflow's limit; the whole config also as the artifact config.json. A key's
    characters MLflow refuses (`@` in `valid_NDCG@5`) become `_`."""

    def __init__(self, run_dir: Path, hparams: dict):
        self.mlflow = _require("mlflow", "mlflow")
        self.mlflow.start_run(run_name=run_dir.name)
        params = {_MLFLOW_KEY.sub("_", k)[:250]: str(v)[:_MLFLOW_VALUE_CHARS] for k, v in flatten(hparams).items()}
        items = list(params.items())
        for i in range(0, len(items), _MLFLOW_BATCH):
            self.mlflow.log_params(dict(items[i : i + _MLFLOW_BATCH]))
        self.mlflow.log_dict(hparams, "config.json")

    def _write(self, tag_prefix, scalars, step):
        self.mlflow.log_metrics({_MLFLOW_KEY.sub("_", k): v for k, v in scalars.items()}, step=step)

    def close(self, failed=False):
        self.mlflow.end_run(status="FAILED" if failed else "FINISHED")


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
_NOOP = Tracker()
_current: Tracker = _NOOP


def _require(kind: str, module: str):
    """The tracker's library, or an error that says which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise TrackerUnavailable(f"tracking: {kind} needs its library ({err}): pip install 'delrec[{EXTRAS[kind]}]'") from None


def current() -> Tracker:
    """The tracker of the run in progress: a no-op one outside `for_run` and off the main process."""
    return _current


def open_tracker(kind: str, run_dir: str | Path, hparams: dict) -> Tracker:
    if kind == "none":
        return _NOOP
    if kind not in TRACKERS:
        raise ValueError(f"tracking: {kind!r} is not one of none, {', '.join(TRACKERS)}")
    return TRACKERS[kind](Path(run_dir), hparams)


@contextmanager
def for_run(kind: str, run_dir: str | Path, hparams: dict):
    """`kind`'s tracker as `current()` while the block runs, on the main process (the others get
    the no-op one), closed (flushed) at the end, an exception included."""
    global _current
    if kind in EXTRAS:
        # checked on every process: a main process failing alone would leave the others waiting at a barrier
        _require(kind, "torch.utils.tensorboard" if kind == "tensorboard" else kind)
    tracker = open_tracker(kind, run_dir, hparams) if distributed.current().is_main else _NOOP
    previous, _current = _current, tracker
    failed = True
    try:
        yield tracker
        failed = False
    finally:
        _current = previous
        try:
            tracker.close(failed=failed)
        except Exception as err:  # a tracker that cannot flush must not hide the run's own outcome
            log.warning("closing the %s tracker failed: %s", kind, err)
