"""Load benchmark of the HTTP service (`delrec serve`) against the same model called directly.

    python benchmarks/serve.py --run runs/ml100k-cpu --models sasrec sasrec-delrec

For each model:

* **python-api**: the model loaded in this process (delrec.Recommender) and called one request at
  a time for `--seconds`: the reference latency and requests/s, with no HTTP; measured before the
  service starts and again after it stops (`python-api (after)`), and compared with their mean. Both run on the same
  torch threads (`--threads`; default 1 for a conventional model, every core for an LLM).
* **service, N clients** (N in `--clients`, default 1 4 16 64): the real service started as a
  subprocess (`delrec serve --port 0`) and driven by N concurrent keep-alive connections, each
  sending its next request as soon as the previous answer arrives, for `--seconds` (LLM models:
  `--llm-seconds`). Only requests answered within the window count; those still in flight at
  its end are awaited (so the next row starts idle) and checked for errors, not counted.
* **burst**: 16 clients for `--burst-seconds` with one request in ten malformed (a duplicate
  candidate, an unknown title, a broken JSON body, k out of range, in turn): every malformed one
  must get a 4xx, every good one the answer the Python API gives for it (the same items, scores
  within 1e-3), and /healthz must answer afterwards.

The requests are the test split's samples (history and the 15 fixed candidates, as ids, k=10),
so the service does what evaluation does. Rows: model, mode, clients, seconds, requests,
requests_per_s, p50_ms, p95_ms, p99_ms, errors, mean_batch_size (from the service's /metrics),
peak_rss_mb (the service process's, or this process's for python-api). The clients run in this
process's event loop, sharing the machine's cores with the service, as a co-located caller would.

Writes benchmarks/results/serve-<device>.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _env import environment  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"


def quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    return float(np.quantile(np.asarray(values), q))


def test_requests(run: Path, count: int, seed: int = 0) -> list[dict]:
    from delrec.data.protocol import RunData

    data = RunData.load(run / "data")
    ids = [""] + data.items["item"].astype(str).tolist()
    rows = data.indices("test")
    rows = np.random.default_rng(seed).choice(rows, size=min(count, len(rows)), replace=False)
    return [{"history": [ids[i] for i in data.history[r] if i > 0], "candidates": [ids[i] for i in data.candidates[r]], "k": 10}
            for r in rows]


def malformed(request: dict, n: int) -> bytes:
    """A bad version of `request` (one of four kinds, in turn), as the body sent."""
    kind = n % 4
    if kind == 0:
        return json.dumps(request | {"candidates": request["candidates"][:-1] + request["candidates"][:1]}).encode()
    if kind == 1:
        return json.dumps(request | {"history": request["history"][:-1] + ["No Such Movie (1899)"]}).encode()
    if kind == 2:
        return json.dumps(request).encode()[:-7]  # broken JSON
    return json.dumps(request | {"k": 0}).encode()


class Client:
    """One keep-alive HTTP/1.1 connection, written by hand so that the load generator costs little
    CPU beside the service (a full HTTP client library would take a share of the same cores)."""

    def __init__(self, port: int):
        self.port, self.reader, self.writer = port, None, None

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        for attempt in (0, 1):
            if self.writer is None:
                self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
            try:
                self.writer.write(b"POST %s HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-type: application/json\r\n"
                                  b"content-length: %d\r\n\r\n%s" % (path.encode(), len(body), body))
                await self.writer.drain()
                status = int((await self.reader.readline()).split()[1])
                length, close = 0, False
                while (line := await self.reader.readline()) not in (b"\r\n", b""):
                    key, _, value = line.partition(b":")
                    key = key.strip().lower()
                    if key == b"content-length":
                        length = int(value)
                    close |= key == b"connection" and value.strip().lower() == b"close"
                answer = await self.reader.readexactly(length)
                if close:
                    await self.close()
                return status, answer
            except (ConnectionError, IndexError, asyncio.IncompleteReadError):
                await self.close()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    async def close(self):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


async def drive(port: int, clients: int, seconds: float, bodies: list[tuple[bytes, dict | None]], check=None) -> dict:
    """`clients` connections sending bodies in turn for `seconds`; returns counts and latencies."""
    start = time.perf_counter()
    stop = start + seconds
    latencies, errors, counted, late = [], [], 0, 0
    next_body = 0

    async def one_client(c: int):
        nonlocal next_body, counted, late
        client = Client(port)
        try:
            while time.perf_counter() < stop:
                body, request = bodies[next_body % len(bodies)]
                next_body += 1
                sent = time.perf_counter()
                try:
                    status, answer = await client.post("/recommend", body)
                except Exception as e:  # noqa: BLE001 - a dropped connection is an error of the row
                    errors.append(f"{type(e).__name__}: {e}")
                    continue
                done = time.perf_counter()
                problem = check(request, status, answer) if check else (None if status == 200 else f"HTTP {status}: {answer[:200]!r}")
                if problem:
                    errors.append(problem)
                if done <= stop:
                    latencies.append(done - sent)
                    counted += 1
                else:
                    late += 1
        finally:
            await client.close()

    await asyncio.gather(*(one_client(c) for c in range(clients)))
    return {"seconds": seconds, "requests": counted, "requests_per_s": counted / seconds, "answered_after_window": late,
            "p50_ms": _ms(quantile(latencies, 0.5)), "p95_ms": _ms(quantile(latencies, 0.95)), "p99_ms": _ms(quantile(latencies, 0.99)),
            "errors": len(errors), "first_errors": errors[:5]}


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 2)


def get_json(port: int, path: str) -> dict:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return json.loads(response.read()) | {"_status": response.status}
    finally:
        conn.close()


def peak_rss_mb(pid: int) -> float | None:
    try:
        text = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmHWM:\s+(\d+) kB", text)
    return int(found.group(1)) / 1024 if found else None


def direct_row(rec, requests: list[dict], seconds: float) -> dict:
    """The model called through the Python API, one request at a time."""
    rec.rank(**requests[0])  # warm-up
    latencies = []
    start = time.perf_counter()
    n = 0
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        rec.rank(**requests[n % len(requests)])
        latencies.append(time.perf_counter() - t)
        n += 1
    elapsed = time.perf_counter() - start
    return {"mode": "python-api", "clients": 1, "seconds": round(elapsed, 2), "requests": n, "requests_per_s": n / elapsed,
            "p50_ms": _ms(quantile(latencies, 0.5)), "p95_ms": _ms(quantile(latencies, 0.95)), "p99_ms": _ms(quantile(latencies, 0.99)),
            "errors": 0, "mean_batch_size": 1.0, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}


def is_llm(model: str) -> bool:
    return "-" in model or model == "zero-shot"


def threads(model: str, args) -> int:
    """The service's torch threads: `--threads`, else one for a conventional model (its forward pass
    is shorter than the HTTP work around it, which needs a core of its own) and every core for an LLM."""
    return args.threads or (os.cpu_count() if is_llm(model) else 1)


def start_service(run: Path, model: str, args) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "delrec.cli", "serve", "--run", str(run), "--model", model, "--port", "0",
               "--max-batch", str(args.max_batch), "--batch-wait-ms", str(args.batch_wait_ms), "--batch-size", str(args.batch_size),
               "--dtype", args.dtype, "--threads", str(threads(model, args))]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    if not found:
        process.kill()
        raise RuntimeError(f"the service did not start: {line}{process.stderr.read()}")
    return process, int(found.group(1))


def batch_sizes(port: int) -> dict:
    return {int(k): v for k, v in get_json(port, "/metrics")["batch_sizes"].items()}


def mean_batch(before: dict, after: dict) -> float | None:
    diff = {k: after.get(k, 0) - before.get(k, 0) for k in after}
    batches = sum(diff.values())
    return round(sum(k * v for k, v in diff.items()) / batches, 2) if batches else None


def bench_model(run: Path, model: str, requests: list[dict], args) -> list[dict]:
    import torch

    from delrec import Recommender

    seconds = args.llm_seconds if is_llm(model) else args.seconds
    torch.set_num_threads(threads(model, args))  # the direct calls run as the service does
    rec = Recommender.from_run(run, model=model, dtype=args.dtype, batch_size=args.batch_size)
    rows = [{"model": model, "threads": threads(model, args)} | direct_row(rec, requests, seconds)]
    print(_table_row(rows[-1]), flush=True)
    expected = {json.dumps(r, sort_keys=True): rec.rank(**r) for r in requests[: args.burst_pool]} if args.burst_seconds else {}

    process, port = start_service(run, model, args)
    try:
        body = [(json.dumps(r).encode(), r) for r in requests]
        asyncio.run(drive(port, 1, min(5.0, seconds), body[:4]))  # warm-up, not counted
        for clients in args.clients:
            before = batch_sizes(port)
            row = asyncio.run(drive(port, clients, seconds, body))
            rows.append({"model": model, "threads": threads(model, args), "mode": "service", "clients": clients} | row
                        | {"mean_batch_size": mean_batch(before, batch_sizes(port)), "peak_rss_mb": peak_rss_mb(process.pid)})
            print(_table_row(rows[-1]), flush=True)
        if args.burst_seconds:
            rows.append({"model": model, "threads": threads(model, args)} | burst_row(port, requests[: args.burst_pool], expected, args.burst_seconds, process.pid))
            print(_table_row(rows[-1]), flush=True)
    finally:
        process.terminate()
        try:
            out, err = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            out, err = process.communicate()
    if process.returncode != 0 or "Traceback" in err:
        rows[-1]["shutdown"] = f"exit code {process.returncode}: {err[-500:]}"
    # the direct calls again, now that the service is gone: the machine may have changed pace meanwhile
    rows.append({"model": model, "threads": threads(model, args)} | direct_row(rec, requests, seconds) | {"mode": "python-api (after)"})
    print(_table_row(rows[-1]), flush=True)
    return rows


def burst_row(port: int, requests: list[dict], expected: dict, seconds: float, pid: int) -> dict:
    bodies = []
    for n, r in enumerate(requests):
        if n % 10 == 9:
            bodies.append((malformed(r, n // 10), None))
        else:
            bodies.append((json.dumps(r).encode(), r))
    bad = {"sent": 0}

    def check(request, status, answer):
        if request is None:
            bad["sent"] += 1
            return None if 400 <= status < 500 else f"a malformed request got HTTP {status}"
        if status != 200:
            return f"a good request got HTTP {status}: {answer[:200]!r}"
        want = expected[json.dumps(request, sort_keys=True)]
        got = json.loads(answer)["items"]
        want_scores = {i.item: i.score for i in want.items}
        if {i["item"] for i in got} != set(want_scores) or any(abs(i["score"] - want_scores[i["item"]]) > 1e-3 for i in got):
            return "a good request got another answer than the Python API's"
        return None

    before = batch_sizes(port)
    row = asyncio.run(drive(port, 16, seconds, bodies, check))
    health = get_json(port, "/healthz")["_status"]
    return {"mode": "burst (10% malformed)", "clients": 16} | row | {"malformed_sent": bad["sent"], "healthz_after": health,
                                                                    "mean_batch_size": mean_batch(before, batch_sizes(port)),
                                                                    "peak_rss_mb": peak_rss_mb(pid)}


COLUMNS = ("model", "threads", "mode", "clients", "requests", "requests_per_s", "p50_ms", "p95_ms", "p99_ms", "errors", "mean_batch_size", "peak_rss_mb")


def _table_row(row: dict) -> str:
    def fmt(v):
        return f"{v:.2f}" if isinstance(v, float) else str(v)

    return "| " + " | ".join(fmt(row.get(c)) for c in COLUMNS) + " |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", default="runs/ml100k-cpu")
    parser.add_argument("--models", nargs="+", default=["sasrec", "sasrec-delrec"])
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--seconds", type=float, default=20.0, help="window of each row (teachers, popularity)")
    parser.add_argument("--llm-seconds", type=float, default=60.0, help="window of each row of an LLM model")
    parser.add_argument("--burst-seconds", type=float, default=20.0, help="0: no burst row")
    parser.add_argument("--burst-pool", type=int, default=40, help="distinct requests of the burst (checked against the Python API)")
    parser.add_argument("--requests", type=int, default=512, help="distinct test samples sent in turn")
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--batch-wait-ms", type=float, default=2.0)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per LLM forward pass")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, help="torch threads of the model (default: 1 for a teacher, every core for an LLM)")
    parser.add_argument("--out", help="default: benchmarks/results/serve-<cpu|gpu>.json")
    args = parser.parse_args()

    run = Path(args.run)
    requests = test_requests(run, args.requests)
    env = environment()
    print("| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS), flush=True)
    rows = []
    for model in args.models:
        rows += bench_model(run, model, requests, args)
    summary = {}
    for model in args.models:
        mine = {(r["mode"], r["clients"]): r for r in rows if r["model"] == model}
        one, sixteen = mine.get(("service", 1)), mine.get(("service", 16))
        direct = [r["p50_ms"] for key, r in mine.items() if key[0].startswith("python-api")]
        summary[model] = {
            "throughput_16_vs_1_client": sixteen["requests_per_s"] / one["requests_per_s"] if one and sixteen else None,
            # against the mean of the direct calls measured before and after the service's rows
            "latency_1_client_vs_python_api": one["p50_ms"] / float(np.mean(direct)) if one and direct else None,
            "errors": sum(r["errors"] for r in mine.values()),
        }
    print(json.dumps(summary, indent=2))
    out = Path(args.out) if args.out else RESULTS / f"serve-{'gpu' if env.get('gpu') else 'cpu'}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"environment": env, "settings": settings, "rows": rows, "summary": summary}, indent=2) + "\n")
    os.replace(tmp, out)
    print(f"-> {out}")


if __name__ == "__main__":
    main()
