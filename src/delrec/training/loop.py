"""The one training loop of a teacher, stage 1 and stage 2.

    class MyStage(Stage):            # the stage's model, data and optimizer, built in __init__
        def step(self, progress): ...        # one update; returns its log line
        def evaluate(self): ...              # valid scores
    metrics = train(MyStage(...), restart=False, show_progress=True)

`train` owns the order of things, the same for every stage:

    resume from the checkpoint, or start fresh (and score the untrained model, where the stage
        wants a reference point: `eval_at_start`)
    while steps remain and the time budget is not spent:
        the stage's update (`step`), its log line, the progress bar
        evaluate when due (every `eval_every` steps and at the end), keep the best by `score`,
            stop after `patience` evaluations without a better one
        snapshots (`after_step`), a checkpoint when due (every `checkpoint_every` steps, at the
            end of the time budget and on an early stop)
    finish: the stage's outputs, config.json, then metrics.json (delrec.training.folder)

A stage never writes this control flow itself; it fills in the hooks of `Stage` (the model of
nanoGPT's loop for reading, of transformers' TrainerCallback for the hooks). A "step" is an
optimizer step for the LLM stages and an epoch for a teacher (`counter`).
"""

from __future__ import annotations

import logging
import math
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from delrec.core import distributed
from delrec.training.folder import Clock, StageFolder

log = logging.getLogger(__name__)


@dataclass
class Progress:
    """What the loop keeps track of, saved in every checkpoint (`loop`). `elapsed`: training
    seconds (what the time budget counts); `wall`: with the evaluations."""

    step: int = 0
    elapsed: float = 0.0
    wall: float = 0.0
    best: float = -1.0  # the best `score` so far (scores are metrics in [0, 1])
    best_step: int = 0  # where it was reached (0: never)
    bad_evals: int = 0  # evaluations since the best
    evaluated_at: int = -1  # the step of the last evaluation
    stopped_early: bool = False
    history: list = field(default_factory=list)  # the stage's record of each evaluation


class Stage:
    """The hooks of one training stage. Attributes the loop reads:

    folder, config_cls, config_dict   the stage folder and the settings a checkpoint must match
    total                  steps (a teacher: epochs) to run
    max_seconds            the time budget of training seconds, or None
    desc, counter          the progress bar's label; the log's position key ("step" or "epoch")
    eval_every             evaluate every so many steps (and always at the last one)
    eval_at_start          on a fresh start, score the untrained model first (a reference point
                           that does not compete for the best)
    eval_in_budget         whether evaluations count as training time (a teacher's do)
    patience               evaluations without a better score before stopping; None: never stop
    checkpoint_every       checkpoint every so many steps
    The loop sets `clock` (delrec.training.folder.Clock) before the first step.
    """

    folder: StageFolder
    config_cls: type
    config_dict: dict
    total: int
    max_seconds: float | None = None
    desc: str = "train"
    counter: str = "step"
    eval_every: int = 1
    eval_at_start: bool = False
    eval_in_budget: bool = False
    patience: int | None = None
    checkpoint_every: int = 1
    device: torch.device | str | None = None
    clock: Clock

    # -- the stage's own work
    def step(self, progress: Progress) -> dict:
        """One update (`progress.step` done so far); the fields of its log line."""
        raise NotImplementedError

    def evaluate(self) -> dict:
        """The valid scores of the model as it is now."""
        raise NotImplementedError

    def score(self, scores: dict) -> float | None:
        """The number the best is kept by (higher is better), or None to keep no best."""
        return None

    def keep_best(self, progress: Progress) -> None:
        """Save the model as it is now as the best (called when `score` improved)."""

    def after_step(self, progress: Progress, last: bool) -> None:
        """After the evaluation and before the checkpoint (snapshots)."""

    def fresh_start(self) -> None:
        """Called when there is no checkpoint to resume, before the first evaluation."""

    # -- logging
    def log_step(self, progress: Progress, line: dict, scores: dict | None) -> None:
        """The step's log line, then the evaluation's (a teacher writes both on one line)."""
        self.folder.log({self.counter: progress.step, **line, "seconds": round(progress.elapsed, 2)})
        if scores is not None:
            self.record(progress, scores)

    def record(self, progress: Progress, scores: dict) -> None:
        """One evaluation: its log line (and the stage's `progress.history`)."""
        self.folder.log({self.counter: progress.step, "seconds": round(progress.elapsed, 2),
                         "wall_seconds": round(progress.wall, 2), "eval": scores})

    def postfix(self, line: dict, progress: Progress) -> dict:
        """What the progress bar shows after a step."""
        return {k: f"{v:.3f}" for k, v in line.items() if k.startswith("loss")}

    # -- checkpoints
    def checkpoint(self, rng) -> dict:
        """What a checkpoint holds besides the loop's Progress (`rng`: every process's RNG state)."""
        raise NotImplementedError

    def restore(self, ckpt: dict) -> None:
        """Load a checkpoint's state (the loop restores its own Progress)."""
        raise NotImplementedError

    def rng_state(self):
        """This process's RNG state as a checkpoint keeps it."""
        return torch.get_rng_state()

    # -- the end
    def summary(self, progress: Progress) -> dict:
        """metrics.json."""
        raise NotImplementedError

    def write_outputs(self) -> None:
        """The stage's results, written before config.json and metrics.json."""

    def config_json(self) -> dict | None:
        """What the loop writes as config.json at the end (None: `write_outputs` writes its own)."""
        return self.config_dict


def train(stage: Stage, restart: bool = False, show_progress: bool = True) -> dict:
    """Run `stage` to its end (see the module docstring); returns its metrics.json."""
    progress, clock = _resume_or_start(stage, restart)
    dist = distributed.current()
    bar = tqdm(total=stage.total, initial=progress.step, desc=stage.desc, disable=not (show_progress and dist.is_main))
    stage.clock = clock  # for a stage that checks the budget inside its step (a teacher's epoch)
    # a resume after the budget or an early stop trains no more
    while progress.step < stage.total and not progress.stopped_early and not clock.budget_spent():
        line = stage.step(progress)
        progress.step += 1
        progress.elapsed, progress.wall = clock.elapsed, clock.wall
        time_up = clock.budget_spent()
        last = progress.step == stage.total or time_up
        scores = None
        if progress.step % stage.eval_every == 0 or last:
            scores = _evaluate(stage, progress, clock)
        stage.log_step(progress, line, scores)
        bar.update(1)
        bar.set_postfix(stage.postfix(line, progress))
        stop = progress.stopped_early
        stage.after_step(progress, last or stop)
        if progress.step % stage.checkpoint_every == 0 or time_up or stop:
            progress.elapsed, progress.wall = clock.elapsed, clock.wall
            stage.folder.checkpoint(lambda rng: {**stage.checkpoint(rng), "loop": asdict(progress)},
                                    rng_state=stage.rng_state)
        if time_up:
            log.info("%s: time budget of %.0f s reached at %s %d", stage.desc, stage.max_seconds, stage.counter,
                     progress.step)
        if time_up or stop:
            break
    bar.close()
    metrics = stage.summary(progress)
    stage.folder.finish(stage.write_outputs, stage.config_json(), metrics)
    return metrics


def _resume_or_start(stage: Stage, restart: bool) -> tuple[Progress, Clock]:
    ckpt = stage.folder.resume(stage.config_cls, stage.config_dict, restart, stage.device,
                               position=lambda c: c.get("loop", {}).get("step", math.inf))
    if ckpt is not None:
        if "loop" not in ckpt:
            raise ValueError(f"{stage.folder.checkpoint_path} was written by an earlier delrec, whose checkpoints "
                             "this one does not read; pass --restart to start this stage again")
        stage.restore(ckpt)
        progress = Progress(**ckpt["loop"])
        log.info("%s: resuming from %s %d", stage.desc, stage.counter, progress.step)
        return progress, Clock(progress.elapsed, progress.wall, stage.max_seconds)
    progress, clock = Progress(), Clock(max_seconds=stage.max_seconds)
    stage.fresh_start()
    if stage.eval_at_start:
        with clock.paused():
            scores = stage.evaluate()
        progress.wall, progress.evaluated_at = clock.wall, 0
        stage.record(progress, scores)
    return progress, clock


def _evaluate(stage: Stage, progress: Progress, clock: Clock) -> dict:
    """Score the model now and keep it when it is the best so far; the early stop is decided here."""
    with nullcontext() if stage.eval_in_budget else clock.paused():  # evaluation time is not training time
        scores = stage.evaluate()
    progress.elapsed, progress.wall, progress.evaluated_at = clock.elapsed, clock.wall, progress.step
    score = stage.score(scores)
    if score is not None:
        if score > progress.best:
            progress.best, progress.best_step, progress.bad_evals = score, progress.step, 0
            stage.keep_best(progress)
        else:
            progress.bad_evals += 1
        progress.stopped_early = stage.patience is not None and progress.bad_evals >= stage.patience
    return scores
