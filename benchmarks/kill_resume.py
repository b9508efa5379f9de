"""Crash-consistent resume: SIGKILL `delrec run` at random points, resume, compare with a run that
was never interrupted.

    python benchmarks/kill_resume.py                 # 24 kills (default), tiny models, about 10 min on 2 cores
    python benchmarks/kill_resume.py --kills 40 --seed 3

The pipeline (data, a SASRec teacher, stage 1, stage 2 for DELRec, evaluation of every model,
no report) runs on a small synthetic data set and a tiny random Llama in a child process. The
harness kills it with SIGKILL after a random delay (uniform within --min-delay .. --max-delay
seconds from its start, so kills land in every step: the teacher's epochs, stage 1, stage 2,
the evaluations), starts it again with the same command, and repeats until `--kills` kills are
spent; then it lets the run finish. Every stage checkpoints after each step/epoch, so a kill
costs at most one step.

Compared with an uninterrupted run of the same command in another folder: every result file
(the data's parquet files, the teacher's weights and top-h lists, the soft prompt, the stage-2
adapter, every evaluation's per-sample ranks and metrics, every stage's metrics and logged
losses), with the fields that are times (seconds, wall_seconds, peak RSS, dates) left out.
The harness fails (exit status 1) if any differs, if a resume fails, or if a temporary file
(.*.tmp), a checkpoint or the run's lock is left behind by the finished run.

Writes benchmarks/results/kill-resume.json: each kill (delay, the step that was running, from
pipeline.log), the resumes, and the comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "tests"))
OUT = ROOT / "benchmarks" / "results" / "kill-resume.json"

# every stage checkpoints after each of its steps (epochs for the teacher), so kills make progress
OVERRIDES = [
    "teacher.max_epochs=8", "threads=1", "report=false", "zero_shot=true", "methods=[delrec]",
    "distill={soft_tokens: 4, steps: 10, batch_size: 2, valid_samples: 4, valid_lsr_samples: 0, eval_every: 3, checkpoint_every: 1}",
    "finetune={steps: 10, batch_size: 2, valid_samples: 4, eval_every: 3, warmup_steps: 1, adapter: lora, lora_r: 4, "
    "lora_alpha: 8, checkpoint_every: 1}",
    "test_samples=16", "eval_batch_size=4",
]
TIME_KEYS = {"seconds", "wall_seconds", "peak_rss_mb", "fetched_at", "train_seconds", "scoring_seconds", "since",
             "this_invocation", "status", "total_seconds", "this_invocation_seconds", "elapsed", "wall",
             "seconds_per_sample", "samples_per_second", "created", "date", "launch"}


def make_inputs(root: Path) -> Path:
    """A dataset folder and a tiny random Llama saved as a model folder; returns the config."""
    from conftest import sequential_rule_dataset
    from llm_helpers import tiny_llama_backbone

    root.mkdir(parents=True, exist_ok=True)
    interactions, items = sequential_rule_dataset(num_users=60, num_items=40, length=20)
    (root / "data").mkdir(exist_ok=True)
    interactions.to_csv(root / "data" / "interactions.csv", index=False)
    items.to_csv(root / "data" / "items.csv", index=False)
    bb = tiny_llama_backbone()
    bb.model.save_pretrained(root / "llm")
    bb.tokenizer.save_pretrained(root / "llm")
    config = root / "kill.yaml"
    config.write_text(f"dataset: {root / 'data'}\nllm: {root / 'llm'}\nteachers: [sasrec]\n")
    return config


def command(config: Path, run: Path) -> list[str]:
    return [sys.executable, "-m", "delrec.cli", "run", "--config", str(config), "--quiet", f"run_dir={run}", *OVERRIDES]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0", "TOKENIZERS_PARALLELISM": "false",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}


def running_step(run: Path) -> str:
    """The step the pipeline was in when killed: the last `step X: running` line of pipeline.log."""
    log = run / "pipeline.log"
    if not log.exists():
        return "start-up"
    steps = [line.split("step ", 1)[1].rsplit(": running", 1)[0]
             for line in log.read_text(errors="replace").splitlines() if line.endswith(": running") and "step " in line]
    return steps[-1].strip() if steps else "start-up"


def _strip(obj, run: str = ""):
    """A result without its time fields, with the run folder's path as RUN; fingerprints of
    upstream files (digests that cover their time fields too) left out."""
    if isinstance(obj, dict):
        return {k: _strip(v, run) for k, v in obj.items()
                if k not in TIME_KEYS and not k.endswith("fingerprint") and not (k == "source" and isinstance(v, str))}
    if isinstance(obj, list):
        return [_strip(v, run) for v in obj]
    if isinstance(obj, str) and run:
        return obj.replace(run, "RUN")
    return obj


def fingerprint(run: Path) -> dict[str, str]:
    """A digest of every result file of a finished run, time fields left out."""
    out = {}
    for path in sorted(run.rglob("*")):
        rel = path.relative_to(run).as_posix()
        if not path.is_file() or rel in ("pipeline.log", "pipeline.json", "config.yaml", ".lock"):
            continue
        if path.suffix == ".json":
            body = json.dumps(_strip(json.loads(path.read_text()), str(run)), sort_keys=True).encode()
        elif path.name == "train_log.jsonl":
            body = json.dumps([_strip(json.loads(line), str(run)) for line in path.read_text().splitlines()],
                              sort_keys=True).encode()
        elif path.suffix in (".parquet", ".safetensors"):
            body = _tensor_bytes(path)
        else:
            body = path.read_bytes()
        out[rel] = hashlib.sha256(body).hexdigest()[:16]
    return out


def _tensor_bytes(path: Path) -> bytes:
    """The content of a parquet or safetensors file without its metadata (which may carry names
    or versions, not values)."""
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        table = pq.read_table(path).replace_schema_metadata(None)
        return json.dumps(table.to_pydict(), sort_keys=True, default=str).encode()
    from safetensors.numpy import load_file

    tensors = load_file(path)
    return b"".join(k.encode() + tensors[k].tobytes() for k in sorted(tensors))


def leftovers(run: Path) -> list[str]:
    left = [p.relative_to(run).as_posix() for p in run.rglob("*") if p.name.endswith(".tmp") or p.name == "checkpoint.pt"]
    left += [p.relative_to(run).as_posix() for p in run.rglob(".best")]
    return sorted(left)


def harness(work: Path, kills: int, seed: int = 0, min_delay: float = 2.0, max_delay: float = 14.0,
            max_starts: int | None = None, log=print) -> dict:
    """Run the reference, then the killed run; the comparison as a dict (`identical`, `kills`...)."""
    config = make_inputs(work / "inputs")
    reference, killed = work / "reference", work / "killed"
    t0 = time.perf_counter()
    done = subprocess.run(command(config, reference), env=_env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"the uninterrupted run failed:\n{done.stderr[-3000:]}")
    reference_seconds = time.perf_counter() - t0
    log(f"uninterrupted run: {reference_seconds:.1f} s")

    rng = random.Random(seed)
    cycles, events, starts = [], [], 0
    max_starts = max_starts or 4 * kills + 10
    ref = fingerprint(reference)

    def killed_so_far() -> int:
        return sum(e["killed"] for e in events)

    while killed_so_far() < kills:
        # one cycle: a fresh run folder killed again and again until it finishes, then compared;
        # cycles repeat until `kills` kills are spent (a short run finishes between kills)
        shutil.rmtree(killed, ignore_errors=True)
        cycle_kills = 0
        while True:
            starts += 1
            if starts > max_starts:
                raise RuntimeError(f"the runs did not finish in {max_starts} starts")
            proc = subprocess.Popen(command(config, killed), env=_env(), stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, text=True)
            delay = rng.uniform(min_delay, max_delay) if killed_so_far() < kills else None
            try:
                _, err = proc.communicate(timeout=delay)
            except subprocess.TimeoutExpired:
                step = running_step(killed)
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
                events.append({"cycle": len(cycles), "start": starts, "killed": True, "delay_s": round(delay, 2), "step": step})
                cycle_kills += 1
                log(f"kill {killed_so_far():2d} after {delay:5.2f} s in {step}")
                continue
            events.append({"cycle": len(cycles), "start": starts, "killed": False, "returncode": proc.returncode})
            if proc.returncode != 0:
                raise RuntimeError(f"a resume failed (exit {proc.returncode}) after {starts - 1} starts:\n{err[-3000:]}")
            break
        got = fingerprint(killed)
        differ = sorted(k for k in ref.keys() | got.keys() if ref.get(k) != got.get(k))
        cycles.append({"kills": cycle_kills, "files_compared": len(ref), "differ": differ, "left_behind": leftovers(killed),
                       "identical": not differ and not leftovers(killed)})
        log(f"cycle {len(cycles)}: {cycle_kills} kills, identical: {cycles[-1]['identical']}")

    by_step: dict[str, int] = {}
    for e in events:
        if e["killed"]:
            stage = e["step"].split(":")[0]
            by_step[stage] = by_step.get(stage, 0) + 1
    return {"kills": killed_so_far(), "starts": starts, "cycles": cycles, "kills_by_step": by_step, "events": events,
            "files_compared": len(ref), "differ": sorted({d for c in cycles for d in c["differ"]}),
            "left_behind": sorted({d for c in cycles for d in c["left_behind"]}),
            "identical": all(c["identical"] for c in cycles), "reference_seconds": round(reference_seconds, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kills", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--min-delay", type=float, default=2.0)
    p.add_argument("--max-delay", type=float, default=14.0)
    p.add_argument("--work", default=None, help="a folder for the runs (default: a temporary one)")
    p.add_argument("--out", default=str(OUT))
    a = p.parse_args()
    import tempfile

    from _env import environment
    from delrec.core.io import write_json

    with tempfile.TemporaryDirectory(prefix="delrec-kill-") as tmp:
        result = harness(Path(a.work or tmp), a.kills, a.seed, a.min_delay, a.max_delay)
    result = {"environment": environment(), "settings": {"kills": a.kills, "seed": a.seed, "delay_s": [a.min_delay, a.max_delay],
                                                          "overrides": OVERRIDES}, **result}
    write_json(a.out, result)
    print(f"| kills | starts | cycles | kills by step | files compared | differ | left behind | identical |\n"
          f"|---|---|---|---|---|---|---|---|\n| {result['kills']} | {result['starts']} | {len(result['cycles'])} | "
          f"{result['kills_by_step']} | {result['files_compared']} | "
          f"{len(result['differ'])} | {len(result['left_behind'])} | {result['identical']} |")
    if result["differ"]:
        print("differ:", *result["differ"], sep="\n  ")
    if result["left_behind"]:
        print("left behind:", *result["left_behind"], sep="\n  ")
    print(f"-> {a.out}")
    return 0 if result["identical"] else 1


if __name__ == "__main__":
    sys.exit(main())
