"""The verbalizer's fast path against its brute-force reference, on CPU, in the same run.

    python benchmarks/verbalizer_speed.py [--run RUN] [--requests 16] [--soft-tokens 100]

Workload: N LSR requests (the first N samples of the test split), each with a soft prompt of
`--soft-tokens` vectors and the split's 15 candidates, on the default backbone (smollm2-135m).
Without `--run`, ML-100K is prepared (paper protocol) into a temporary folder.

Measured, each in its own process (so its peak RSS is its own), in the speed dtype
(`--dtype`, default auto = bfloat16 on a CPU with native bf16, else float32):

* `full-title`, fast path (`Verbalizer.score`: one packed forward pass per batch of requests);
* `full-title`, brute force (`Verbalizer.score_brute_force`: one full forward pass per candidate);
* `first-token`, fast path. (Its brute-force reference runs exactly the same forward passes as
  the full-title one, so it is not timed again unless `--first-token-brute` is given.)

One warm-up call is excluded from timing: one batch (`--batch-size` requests) for the fast path,
one request (15 forward passes) for brute force, on requests that are not among the N timed.

Equality: the fast and brute-force full-title scores of all N x 15 candidates are computed again
in float32 (`--check-dtype`) in one more process, and their max |difference| must be <= 1e-4;
the difference in the speed dtype is reported for information.

Each process runs on `--threads` torch threads (default 1: on the shared 2-core machine this was
written on, one bf16 forward pass of 450 tokens took 1.5 s on one thread and 8-10 s on two).

Writes benchmarks/results/verbalizer_speed.json and prints a Markdown table. The machine may be
shared: the 1-minute load average is recorded before and after the run and around each process.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402

TOLERANCE = 1e-4
TARGET_RATIO = 8.0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _git_state() -> dict:
    """The commit measured, and whether src/ differs from it (other work may be in progress)."""
    def git(*a):
        return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return {"git_commit": git("rev-parse", "HEAD") or None, "src_modified": bool(git("status", "--porcelain", "--", "src"))}


def _load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# -- worker (child process) ------------------------------------------------------------------


def _setup(args: argparse.Namespace, dtype: str, method: str):
    """Backbone, verbalizer, soft prompt, the N timed prompts and the warm-up prompts."""
    import torch

    from delrec.data.store import RunData
    from delrec.llm.backbone import Backbone

    if args.threads:
        torch.set_num_threads(args.threads)
    from delrec.llm.scorer import LLMScorer
    from delrec.llm.soft_prompt import SoftPrompt

    data = RunData.load(Path(args.run) / "data")
    rows = data.indices("test")
    need = args.requests + args.batch_size
    if len(rows) < need:
        raise SystemExit(f"the test split has {len(rows)} samples; {need} are needed (requests + one warm-up batch)")
    bb = Backbone.load(args.model, device="cpu", dtype=dtype)
    soft = SoftPrompt.for_backbone(bb, args.soft_tokens, seed=args.seed)
    scorer = LLMScorer.for_run(data, bb, soft_prompt=soft, title_scoring=method, batch_size=args.batch_size, progress=False)
    prompts = [scorer.prompt(data.history[r], data.candidates[r]) for r in rows[:need]]
    return bb, scorer.verbalizer, soft, prompts[: args.requests], prompts[args.requests :]


def worker_timed(args: argparse.Namespace) -> None:
    import numpy as np
    import torch

    bb, verbalizer, soft, prompts, warm = _setup(args, args.dtype, args.method)
    fn = verbalizer.score if args.path == "fast" else verbalizer.score_brute_force
    fn(warm if args.path == "fast" else warm[:1], soft)  # warm-up, not timed
    t0 = time.perf_counter()
    scores = fn(prompts, soft)
    seconds = time.perf_counter() - t0
    np.save(args.scores, torch.stack(scores).float().numpy())
    prompt_tokens = [len(verbalizer._encode(p.before)) + len(verbalizer._encode(p.after.rstrip())) for p in prompts]
    print(json.dumps({
        "seconds": seconds, "peak_rss_mb": _peak_rss_mb(), "dtype": str(bb.dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(), "mean_prompt_text_tokens": float(np.mean(prompt_tokens)),
        "candidates": len(prompts[0].candidates),
    }))


def worker_check(args: argparse.Namespace) -> None:
    """Both paths in the check dtype, same process (same soft prompt); no timing claims."""
    import numpy as np
    import torch

    bb, verbalizer, soft, prompts, _ = _setup(args, args.dtype, args.method)
    t0 = time.perf_counter()
    fast = torch.stack(verbalizer.score(prompts, soft)).float()
    t1 = time.perf_counter()
    brute = torch.stack(verbalizer.score_brute_force(prompts, soft)).float()
    t2 = time.perf_counter()
    np.save(args.scores, np.stack([fast.numpy(), brute.numpy()]))
    print(json.dumps({
        "max_abs_diff": float((fast - brute).abs().max()), "seconds_fast": t1 - t0, "seconds_brute": t2 - t1,
        "peak_rss_mb": _peak_rss_mb(), "dtype": str(bb.dtype).removeprefix("torch."),
    }))


# -- driver ----------------------------------------------------------------------------------


def run_child(args: argparse.Namespace, mode: str, method: str, path: str, dtype: str, scores: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--run", str(args.run), "--method", method, "--path", path,
           "--dtype", dtype, "--scores", str(scores), "--requests", str(args.requests),
           "--soft-tokens", str(args.soft_tokens), "--batch-size", str(args.batch_size), "--model", args.model,
           "--seed", str(args.seed), "--threads", str(args.threads)]
    load_before = _load_avg()
    wall = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - wall
    if proc.returncode != 0:
        raise RuntimeError(f"{mode} {method} {path} failed:\n{proc.stderr[-3000:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    res.update(wall_seconds=round(wall, 1), load_avg_before=load_before, load_avg_after=_load_avg())
    return res


def markdown(result: dict) -> str:
    s = result["settings"]
    out = [
        f"| method | path | requests/s | seconds ({s['requests']} requests) | s/request | peak RSS MB |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        out.append(f"| {r['method']} | {r['path']} | {r['requests_per_s']:.3f} | {r['seconds']:.1f} | "
                   f"{r['seconds'] / s['requests']:.2f} | {r['peak_rss_mb']:.0f} |")
    out += [
        "",
        f"Speed ratio, full-title fast / brute force: **{result['ratio']:.1f}x** "
        f"(target >= {TARGET_RATIO:.0f}x: {'met' if result['ratio'] >= TARGET_RATIO else 'NOT met'}).",
    ]
    if result.get("ratio_first_token_vs_brute") is not None:
        out.append(f"first-token fast / its brute force: {result['ratio_first_token_vs_brute']:.1f}x.")
    if result.get("max_abs_diff_float32") is not None:
        ok = result["max_abs_diff_float32"] <= TOLERANCE
        out.append(f"Max |fast - brute| over {s['requests']} x {result['rows'][0]['candidates']} scores in float32: "
                   f"{result['max_abs_diff_float32']:.2e} ({'<=' if ok else '>'} {TOLERANCE:g}); "
                   f"in {s['speed_dtype']}: {result['max_abs_diff_speed_dtype']:.2e} (for information).")
    out.append(f"Load average (1 min) before / after: {result['load_avg_before'][0]} / {result['load_avg_after'][0]} "
               f"on {result['environment']['cpu_count']} CPUs.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", choices=["timed", "check"], help=argparse.SUPPRESS)
    p.add_argument("--path", default="fast", help=argparse.SUPPRESS)
    p.add_argument("--scores", help=argparse.SUPPRESS)
    p.add_argument("--method", default="full-title", help=argparse.SUPPRESS)
    p.add_argument("--run", help="a prepared run folder (RUN/data); default: prepare ML-100K into a temp folder")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--soft-tokens", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=8, help="requests per fast-path forward pass")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--dtype", default="auto", help="dtype of the timed runs (auto: bf16 on a bf16 CPU, else float32)")
    p.add_argument("--check-dtype", default="float32", help="dtype of the equality check")
    p.add_argument("--seed", type=int, default=0, help="soft-prompt seed")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: on a shared 2-core machine two threads were 5x slower; 0: torch's default)")
    p.add_argument("--skip-check", action="store_true", help="skip the float32 equality check")
    p.add_argument("--first-token-brute", action="store_true", help="also time first-token brute force")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "verbalizer_speed.json"))
    args = p.parse_args()
    if args.worker == "timed":
        return worker_timed(args)
    if args.worker == "check":
        return worker_check(args)

    import numpy as np

    from delrec.core.io import write_json
    from delrec.llm.backbone import pick_dtype

    load_before = _load_avg()
    git_state = _git_state()
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as work:
        work = Path(work)
        if args.run is None:
            from delrec.data.loaders import load_dataset
            from delrec.data.protocol import ProtocolConfig, prepare
            from delrec.data.store import write

            raw = load_dataset("ml-100k")
            write(prepare(raw.interactions, raw.items, ProtocolConfig()), work / "run" / "data", source={"dataset": "ml-100k"})
            args.run = str(work / "run")
            run_label = "ML-100K, paper protocol, prepared in a temporary folder"
        else:
            run_label = str(args.run)
        plan = [("full-title", "fast"), ("full-title", "brute"), ("first-token", "fast")]
        if args.first_token_brute:
            plan.append(("first-token", "brute"))
        rows, scores = [], {}
        for method, path in plan:
            f = work / f"{method}-{path}.npy"
            res = run_child(args, "timed", method, path, args.dtype, f)
            scores[method, path] = np.load(f)
            row = {"method": method, "path": path, "requests_per_s": args.requests / res["seconds"], **res}
            rows.append(row)
            print(f"{method:11s} {path:5s}: {row['requests_per_s']:.3f} req/s, {res['seconds']:.1f} s, "
                  f"{res['peak_rss_mb']:.0f} MB, {res['dtype']}, load {res['load_avg_before'][0]} -> {res['load_avg_after'][0]}",
                  flush=True)
        check = None
        if not args.skip_check:
            f = work / "check.npy"
            check = run_child(args, "check", "full-title", "both", args.check_dtype, f)
            print(f"check in {check['dtype']}: max |fast - brute| = {check['max_abs_diff']:.2e}", flush=True)

    by = {(r["method"], r["path"]): r for r in rows}
    ratio = by["full-title", "fast"]["requests_per_s"] / by["full-title", "brute"]["requests_per_s"]
    ft_brute = by.get(("first-token", "brute"))
    speed_dtype = rows[0]["dtype"]
    result = {
        "environment": environment(),
        "settings": {
            "model": args.model, "run": run_label, "split": "test", "requests": args.requests,
            "soft_tokens": args.soft_tokens, "candidates": rows[0]["candidates"], "batch_size": args.batch_size,
            "speed_dtype": speed_dtype, "speed_dtype_requested": args.dtype,
            "speed_dtype_auto_would_be": str(pick_dtype("cpu", "auto")).removeprefix("torch."),
            "check_dtype": args.check_dtype, "device": "cpu", "seed": args.seed,
            "torch_threads": rows[0]["threads"], **git_state,
            "mean_prompt_text_tokens": rows[0]["mean_prompt_text_tokens"],
            "warmup": "fast: one batch of batch_size requests; brute: one request; not among the timed requests",
        },
        "rows": rows,
        "ratio": ratio,
        "ratio_first_token_vs_brute": (by["first-token", "fast"]["requests_per_s"] / ft_brute["requests_per_s"]) if ft_brute else None,
        "ratio_first_token_fast_vs_full_title_brute": by["first-token", "fast"]["requests_per_s"] / by["full-title", "brute"]["requests_per_s"],
        "target_ratio": TARGET_RATIO,
        "meets_target_ratio": ratio >= TARGET_RATIO,
        "max_abs_diff_float32": check["max_abs_diff"] if check else None,
        "equal_within_tolerance": (check["max_abs_diff"] <= TOLERANCE) if check else None,
        "tolerance": TOLERANCE,
        "check": check,
        "max_abs_diff_speed_dtype": float(np.abs(scores["full-title", "fast"] - scores["full-title", "brute"]).max()),
        "load_avg_before": load_before,
        "load_avg_after": _load_avg(),
        "total_wall_seconds": round(time.perf_counter() - t_start, 1),
    }
    write_json(args.out, result)
    print()
    print(markdown(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
