"""Time `delrec data prepare` (load + protocol + write) on ML-100K, ML-1M and a synthetic log of
Amazon Home & Kitchen's shape, and the teacher's full-catalogue scoring at 1.29M items.

    python benchmarks/prepare.py [--datasets ml-100k ml-1m home-kitchen-synthetic] [--protocols paper loo]
                                 [--scale 1.0] [--keep DIR]

* ML-100K and ML-1M: each preparation runs as the real command in its own process, so the time
  includes start-up and the peak RSS is its own.
* `home-kitchen-synthetic`: benchmarks/_synthetic.py writes the 2018 Amazon files (ratings CSV +
  metadata JSON lines, the publisher's formats) of Table I's Home & Kitchen shape, 9,767,606 users,
  1,286,050 items, 21,928,568 interactions before filtering, times `--scale` (power-law activity,
  day-resolution timestamps). benchmarks/_prepare_steps.py then runs the steps of `delrec data
  prepare` in one process (read the native files, protocol, write), each with its time and its own
  peak RSS, and in a second process a SASRec over the whole 1.29M-item catalogue (untrained: the
  cost does not depend on the weights) computes the teacher's top-10 and full ranks for 4,096 test
  samples (`--rows`), from which the time for every sample is extrapolated. `--keep DIR` keeps
  (and reuses) the generated files. Paper protocol only (loo differs in the split alone).

Writes benchmarks/results/prepare.json and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402

SYNTHETIC = "home-kitchen-synthetic"
# Table I's Home & Kitchen before filtering: the 2018 ratings file of Home_and_Kitchen
HOME_KITCHEN = {"users": 9_767_606, "items": 1_286_050, "interactions": 21_928_568}

CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from delrec.cli import main
rc = main(sys.argv[1:])
print("RESULT", rc, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m", SYNTHETIC])
    p.add_argument("--protocols", nargs="+", default=["paper", "loo"])
    p.add_argument("--scale", type=float, default=1.0, help="the synthetic log's shape times this")
    p.add_argument("--rows", type=int, default=4096, help="test samples the teacher scores over the catalogue")
    p.add_argument("--keep", help="folder for the synthetic files (kept, and reused when there)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    args = p.parse_args()

    rows, scale = [], None
    with tempfile.TemporaryDirectory() as work:
        for dataset in args.datasets:
            if dataset == SYNTHETIC:
                scale = synthetic_rows(args, Path(work))
                continue
            subprocess.run([sys.executable, "-m", "delrec.cli", "data", "fetch", dataset], check=True, capture_output=True)
            for protocol in args.protocols:
                cmd = [sys.executable, "-c", CHILD, "data", "prepare", dataset, "--out", f"{work}/{dataset}-{protocol}", "--protocol", protocol]
                load_before = os.getloadavg()[0]
                wall = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - wall
                result = [line for line in proc.stdout.splitlines() if line.startswith("RESULT")]
                if proc.returncode or not result or result[0].split()[1] != "0":
                    raise RuntimeError(f"prepare {dataset} {protocol} failed:\n{proc.stdout}\n{proc.stderr}")
                _, _, seconds, rss = result[0].split()
                stats = json.loads(Path(f"{work}/{dataset}-{protocol}/data/stats.json").read_text())
                rows.append({
                    "dataset": dataset, "protocol": protocol,
                    "seconds_in_process": round(float(seconds), 2), "seconds_wall": round(wall, 2),
                    "peak_rss_mb": round(float(rss), 1), "interactions": stats["filtered"]["interactions"],
                    "samples": stats["samples"]["total"], "load_avg_before": load_before,
                })
                print(f"{dataset} {protocol}: {wall:.1f} s wall, {float(rss):.0f} MB", flush=True)
    env = environment()
    from delrec.core.io import write_json

    write_json(args.out, {"environment": env, "rows": rows, **({"home_kitchen_synthetic": scale} if scale else {})})
    print("\n| dataset | protocol | interactions | samples | wall s (whole command) | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['protocol']} | {r['interactions']:,} | {r['samples']:,} | {r['seconds_wall']:.1f} | {r['peak_rss_mb']:.0f} |")
    if scale:
        print(f"\nsynthetic Home & Kitchen: {scale['shape']['interactions']:,} interactions -> "
              f"{scale['filtered']['interactions']:,} after the 5-core ({scale['samples']:,} samples); "
              f"prepare {scale['prepare_seconds']:.0f} s, peak {scale['prepare_peak_rss_mb']:.0f} MB\n")
        print("| step | seconds | peak RSS MB |")
        print("|---|---|---|")
        for r in scale["prepare_steps"] + scale["teacher_steps"]:
            print(f"| {r['step']}{' (' + format(r['rows'], ',') + ' rows)' if r.get('rows') else ''} | {r['seconds']:.1f} | "
                  f"{r['peak_rss_mb']:.0f} |")
        for step, seconds in scale["teacher_all_samples_seconds"].items():
            print(f"{step}, every one of the {scale['samples']:,} samples (extrapolated): {seconds / 60:.0f} min")
    print(f"-> {args.out}")


def synthetic_rows(args, work: Path) -> dict:
    """Generate (or reuse) the synthetic Home & Kitchen files, run the prepare steps and the
    teacher's catalogue scoring each in its own process; their rows."""
    from _synthetic import write_amazon

    shape = {k: max(1, round(v * args.scale)) for k, v in HOME_KITCHEN.items()}
    folder = Path(args.keep) if args.keep else work / "home-kitchen"
    marker = folder / "shape.json"
    if not (marker.exists() and json.loads(marker.read_text()).get("shape") == shape):
        t0 = time.perf_counter()
        written = write_amazon(folder, "Home_and_Kitchen", **shape)
        marker.write_text(json.dumps({"shape": shape, "written": written}))
        print(f"synthetic Home & Kitchen written in {time.perf_counter() - t0:.0f} s: {folder}", flush=True)
    out, result = work / "hk-run", work / "hk-prepare.json"
    steps = [sys.executable, str(ROOT / "benchmarks" / "_prepare_steps.py")]
    print("prepare (steps):", flush=True)
    wall = time.perf_counter()
    subprocess.run([*steps, "prepare", str(folder), str(out), str(result)], check=True)
    wall = time.perf_counter() - wall
    prep = json.loads(result.read_text())
    print("teacher over the catalogue:", flush=True)
    subprocess.run([*steps, "teacher", str(out), str(work / "hk-teacher.json"), "--items", str(shape["items"]),
                    "--rows", str(args.rows)], check=True)
    teacher = json.loads((work / "hk-teacher.json").read_text())
    return {
        "shape": shape, "files_mb": {p.name: round(p.stat().st_size / 2**20, 1) for p in folder.iterdir() if p != marker},
        "read": prep["read"], "filtered": prep["stats"]["filtered"], "samples": prep["stats"]["samples"]["total"],
        "prepare_seconds": round(sum(r["seconds"] for r in prep["steps"]), 1), "prepare_wall_seconds": round(wall, 1),
        "prepare_peak_rss_mb": max(r["peak_rss_mb"] for r in prep["steps"]), "prepare_steps": prep["steps"],
        "teacher_steps": teacher["steps"], "teacher": {k: teacher[k] for k in ("catalogue", "dim", "threads")},
        "teacher_all_samples_seconds": {k: round(v * teacher["samples"], 1) for k, v in teacher["seconds_per_row"].items()},
    }


if __name__ == "__main__":
    main()
