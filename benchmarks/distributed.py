"""Stage-1 throughput with one process and with two (`accelerate launch`, gloo; DDP and FSDP2), in the same run.

    python benchmarks/distributed.py                       # runs/ml100k-quick, SmolLM2-135M, 6 steps
    python benchmarks/distributed.py --run runs/ml100k-cpu --steps 8

Both rows run the real `delrec distill` command on the same run folder (data and SASRec teacher
must exist: `delrec run --config configs/ml100k-quick.yaml` makes one), the same global batch
(`--batch-size` examples per task per step, TA and RPS), the same soft prompt size and the same
number of cores in total: one process with `--threads` torch threads (default: every core),
against `--threads` processes with one thread each, once under DDP (`--multi_gpu`) and once under
FSDP2 (`--use_fsdp --fsdp_version 2`). On 2 cores no speed-up is expected: the ratio shows what
the distributed path (DDP all-reduce per task, or FSDP's all-gather of every layer's weights in
each forward and backward; sharded valid accuracy, smaller per-process batches) costs or saves.

Reported per row: training examples per second (TA + RPS examples, from the step times in
train_log.jsonl, first step excluded as warm-up), seconds per step, peak RSS per process
(ru_maxrss of each process, written by the worker at exit: a lifetime peak, so under FSDP it
includes loading the whole backbone before it is sharded) and the whole command's wall time.
Writes benchmarks/results/distributed-cpu.json ($OUT/distributed-cpu.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from delrec.core.io import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402

WORKER = ROOT / "benchmarks" / "_rss_worker.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_distill(args, processes: int, threads: int, engine: str, name: str, rss_dir: Path) -> dict:
    cli = ["distill", "--run", str(args.run), "--teacher", args.teacher, "--llm", args.llm, "--name", name,
           "--steps", str(args.steps), "--batch-size", str(args.batch_size), "--soft-tokens", str(args.soft_tokens),
           "--restart", "--quiet", "--set", f"valid_samples={args.valid_samples}", "--set", "eval_every=100000",
           "--set", f"checkpoint_every={args.steps}", "--set", "warmup_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "DELREC_BENCH_THREADS": str(threads),
           "DELREC_BENCH_RSS_DIR": str(rss_dir)}
    if processes == 1:
        cmd = [sys.executable, str(WORKER), *cli]
    else:
        launcher = ["--use_fsdp", "--fsdp_version", "2"] if engine == "fsdp" else ["--multi_gpu"]
        cmd = [sys.executable, "-m", "accelerate.commands.launch", *launcher, "--num_processes", str(processes),
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(_free_port()), str(WORKER), *cli]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
    folder = Path(args.run) / "distill" / name
    steps = [json.loads(line) for line in (folder / "train_log.jsonl").read_text().splitlines()]
    train = [e for e in steps if "loss_ta" in e or "loss_rps" in e]  # (the others are evaluations)
    times = [e["seconds"] for e in train]
    per_step = (times[-1] - times[0]) / (len(times) - 1)
    tasks = sum(1 for k in ("loss_ta", "loss_rps") if k in train[-1])
    rss = [json.loads(p.read_text()) for p in sorted(rss_dir.glob("rss-*.json"))]
    shutil.rmtree(folder)  # a benchmark's soft prompt is not a result
    return {"processes": processes, "engine": engine, "threads_per_process": threads, "steps": len(times),
            "seconds_per_step": round(per_step, 3), "examples_per_s": round(args.batch_size * tasks / per_step, 3),
            "peak_rss_mb_per_process": [round(r["maxrss_mb"]) for r in rss], "wall_s": round(wall, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", default=str(ROOT / "runs" / "ml100k-quick"))
    p.add_argument("--teacher", default="sasrec")
    p.add_argument("--llm", default="smollm2-135m")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch-size", type=int, default=4, help="global examples per task per step")
    p.add_argument("--soft-tokens", type=int, default=32)
    p.add_argument("--valid-samples", type=int, default=4)
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="cores to use in total")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not (Path(args.run) / "teachers" / args.teacher / "topk.parquet").exists():
        raise SystemExit(f"{args.run} has no {args.teacher} teacher; make one with "
                         "`delrec run --config configs/ml100k-quick.yaml` or pass --run")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for processes, threads, engine in ((1, args.threads, "single process"), (args.threads, 1, "ddp"),
                                           (args.threads, 1, "fsdp")):
            rss_dir = Path(tmp) / f"p{processes}-{engine.split()[0]}"
            rss_dir.mkdir()
            print(f"stage 1 with {processes} process(es) x {threads} thread(s), {engine} ...", flush=True)
            rows.append(run_distill(args, processes, threads, engine, f"bench-p{processes}", rss_dir))
    ref = rows[0]["examples_per_s"]
    for r in rows:
        r["speed_vs_one_process"] = round(r["examples_per_s"] / ref, 3)
    print(f"\nstage 1 ({args.llm}, global batch {args.batch_size} per task, soft prompt {args.soft_tokens}, "
          f"{args.steps} steps, first excluded)")
    print("| processes x threads | engine | examples/s | s/step | vs 1 process | peak RSS per process (MB) | wall (s) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['processes']} x {r['threads_per_process']} | {r['engine']} | {r['examples_per_s']:.2f} | "
              f"{r['seconds_per_step']:.2f} | "
              f"{r['speed_vs_one_process']:.2f} | {', '.join(map(str, r['peak_rss_mb_per_process']))} | {r['wall_s']:.0f} |")
    payload = {"benchmark": "distributed stage 1", "environment": environment(),
               "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows}
    out = args.out or (Path(os.environ["OUT"]) / "distributed-cpu.json" if os.environ.get("OUT")
                       else ROOT / "benchmarks" / "results" / "distributed-cpu.json")
    write_json(out, payload)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
