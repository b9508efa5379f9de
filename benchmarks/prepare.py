"""Time `delrec data prepare` (load + protocol + write) on ML-100K and ML-1M.

    python benchmarks/prepare.py [--datasets ml-100k ml-1m] [--protocols paper loo]

Each preparation runs as the real command in its own process, so the time includes start-up and
the peak RSS is its own. Writes benchmarks/results/prepare.json and prints a Markdown table.
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

CHILD = """
import resource, sys, time
t0 = time.perf_counter()
from delrec.cli import main
rc = main(sys.argv[1:])
print("RESULT", rc, time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0)
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["ml-100k", "ml-1m"])
    p.add_argument("--protocols", nargs="+", default=["paper", "loo"])
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "prepare.json"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for dataset in args.datasets:
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
    from delrec.io import write_json

    write_json(args.out, {"environment": env, "rows": rows})
    print("\n| dataset | protocol | interactions | samples | wall s (whole command) | peak RSS MB |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['dataset']} | {r['protocol']} | {r['interactions']:,} | {r['samples']:,} | {r['seconds_wall']:.1f} | {r['peak_rss_mb']:.0f} |")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
