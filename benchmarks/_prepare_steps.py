"""One process of benchmarks/prepare.py --synthetic: the steps of `delrec data prepare` (or the
teacher's full-catalogue scoring), each timed, with its own peak RSS.

    python benchmarks/_prepare_steps.py prepare FOLDER OUT RESULT.json
    python benchmarks/_prepare_steps.py teacher OUT RESULT.json --items N --rows R

The peak of each step is the process's VmHWM after the kernel's high-water mark was reset at the
step's start (/proc/self/clear_refs, "5"), so a step's figure is its own, not its predecessors'.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path


def _status_mb(field: str) -> float:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"{field}:\s+(\d+)", text).group(1)) / 1024.0


class Steps:
    def __init__(self):
        self.rows: list[dict] = []

    def run(self, name: str, fn, **extra):
        try:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS to the current RSS
        except OSError:
            pass  # not Linux or not allowed: the peak is then the process's so far
        t0 = time.perf_counter()
        out = fn()
        self.rows.append({"step": name, "seconds": round(time.perf_counter() - t0, 2),
                          "peak_rss_mb": round(_status_mb("VmHWM"), 1), "rss_after_mb": round(_status_mb("VmRSS"), 1),
                          **extra})
        print(f"  {name}: {self.rows[-1]['seconds']:.1f} s, peak {self.rows[-1]['peak_rss_mb']:.0f} MB", flush=True)
        return out


def prepare_steps(folder: str, out: str) -> dict:
    """What cmd_data_prepare does, step by step: read the native files, apply the protocol, write."""
    from delrec.data.loaders import load_dataset
    from delrec.data.protocol import ProtocolConfig, prepare
    from delrec.data.store import write

    steps = Steps()
    raw = steps.run("read the native files (ratings CSV + metadata JSON lines)", lambda: load_dataset(folder, progress=False))
    prepared = steps.run("protocol (duplicates, 5-core, samples, negatives)",
                         lambda: prepare(raw.interactions, raw.items, ProtocolConfig()))
    steps.run("write RUN/data", lambda: write(prepared, Path(out) / "data", source={"dataset": folder, **raw.source}))
    return {"steps": steps.rows, "stats": prepared.stats, "read": raw.source.get("read")}


def teacher_steps(out: str, items: int, rows: int) -> dict:
    """The teacher's top-h lists and full ranks over a catalogue of `items` items (a SASRec of
    the paper's settings, untrained: the cost of scoring does not depend on the weights), for
    `rows` test samples of the prepared folder."""
    import torch

    from delrec.data.store import RunData
    from delrec.evaluation.metrics import full_catalogue_rows, full_ranks
    from delrec.teachers import build_model, default_config
    from delrec.teachers.trained import TeacherScorer, teacher_topk

    steps = Steps()
    data = steps.run("load RUN/data", lambda: RunData.load(Path(out) / "data"))
    if data.num_items > items:
        raise ValueError(f"the prepared data has {data.num_items} items, more than --items {items}")
    torch.manual_seed(0)
    config = default_config("sasrec")
    model = steps.run(f"build SASRec over {items:,} items", lambda: build_model(config, items, data.num_users,
                                                                                  data.config.max_history))
    scorer = TeacherScorer(model, torch.device("cpu"))
    test = data.indices("test")[:rows]
    block = full_catalogue_rows(items, 1024)
    steps.run("teacher top-10 over the catalogue", lambda: teacher_topk(scorer, data, test, 10), rows=len(test),
              rows_per_block=block)
    steps.run("full ranks over the catalogue (loo evaluation)", lambda: full_ranks(scorer, data, test), rows=len(test),
              rows_per_block=full_catalogue_rows(items, 512))
    # what a run on this data pays: a teacher trained on it scores the 5-core's own catalogue
    model = scorer = None  # free the 1.29M-item model first
    own = TeacherScorer(build_model(config, data.num_items, data.num_users, data.config.max_history), torch.device("cpu"))
    steps.run(f"teacher top-10 over the 5-core's {data.num_items:,} items", lambda: teacher_topk(own, data, test, 10),
              rows=len(test), rows_per_block=full_catalogue_rows(data.num_items, 1024))
    per_row = {r["step"]: r["seconds"] / len(test) for r in steps.rows if r.get("rows")}
    return {"steps": steps.rows, "samples": int(len(data.sample_id)), "catalogue": items, "dim": config.dim,
            "seconds_per_row": per_row, "threads": torch.get_num_threads()}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("what", choices=("prepare", "teacher"))
    p.add_argument("paths", nargs="+")
    p.add_argument("--items", type=int, default=1_286_050)
    p.add_argument("--rows", type=int, default=4096)
    a = p.parse_args()
    if a.what == "prepare":
        folder, out, result = a.paths
        res = prepare_steps(folder, out)
    else:
        out, result = a.paths
        res = teacher_steps(out, a.items, a.rows)
    Path(result).write_text(json.dumps(res, indent=2, default=str))


if __name__ == "__main__":
    sys.exit(main())
