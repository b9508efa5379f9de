"""What the report (delrec.report.writer) and its figures (delrec.report.figures) read from a run folder
besides the evaluations: the stages' logs and files, and the run's models through the one scorer
factory for the few samples they score again. Files a step has not written (yet) read as empty,
so a report can be written at any point of a run.
"""

from __future__ import annotations

import json
from pathlib import Path

from delrec.core.io import read_json
from delrec.serving.scorers import make_scorer


def read_log(path: Path) -> list[dict]:
    """A stage's train_log.jsonl, one dict per line ([] when absent)."""
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def stage_file(folder: Path, name: str) -> dict:
    """A stage folder's JSON file `name` ({} when absent)."""
    return read_json(folder / name) if (folder / name).exists() else {}


def examples_per_step(folder: Path, log: list[dict]) -> float:
    """Train examples (per task in stage 1) per optimizer step, for log lines without `examples_seen`."""
    cfg = stage_file(folder, "config.json")
    if cfg:
        return cfg.get("batch_size", 1) * cfg.get("grad_accum", 1)
    return next((e["examples_seen"] / e["step"] for e in log if e.get("examples_seen") and e["step"]), 1)


def run_scorer(config, data, name: str):
    """A model of the run through the one scorer factory, with the run's settings."""
    return make_scorer(config.run_dir, data, name, llm=config.llm, dtype=config.dtype, device=config.device,
                       batch_size=config.eval_batch_size, progress=False, template_overrides=config.templates,
                       weights=config.eval_weights)
