"""The model's side of the service: one thread scoring the queued requests together (MicroBatcher),
the refusals it answers with, and the counters of GET /metrics."""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from delrec.serving.limits import ServiceLimits
from delrec.serving.recommender import PreparedRequest, Ranking, Recommender

log = logging.getLogger(__name__)


class ServiceStopping(RuntimeError):
    pass


class ScoringFailed(RuntimeError):
    """The model failed on one request (logged with its traceback where it happened)."""


class Overloaded(RuntimeError):
    """The queue is full: the request is refused at once (a 503), with a time to retry after."""

    def __init__(self, message: str, retry_after_s: int):
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def answer(self) -> tuple[int, dict, list]:
        """The 503 (status, body, headers) every refusal of a full queue gets."""
        return 503, {"field": None, "error": str(self)}, [(b"retry-after", str(self.retry_after_s).encode())]


_ABSOLUTE_PATH = re.compile(r"(?<![\w.~])/(?:[^\s'\"/:,;()]+/)+([^\s'\"/:,;()]*)")


def redact_paths(text: str) -> str:
    """`text` with every absolute path cut to its last part (`.../model.safetensors`): an error
    message from deep in torch or the file system must not tell a client how the machine is laid out."""
    return _ABSOLUTE_PATH.sub(lambda m: f".../{m.group(1)}", text)


@dataclass
class _Pending:
    request: PreparedRequest
    future: asyncio.Future
    queued: bool = True  # still waiting in the queue (not yet taken into a batch, not cancelled)


class MicroBatcher:
    """One model thread scoring the requests queued since its last batch, together; at most
    `max_queue` requests wait (default four batches' worth), more are refused (`Overloaded`)."""

    def __init__(self, recommender: Recommender, limits: ServiceLimits, metrics: Metrics | None = None):
        self.recommender, self.max_batch, self.max_wait, self.max_queue = recommender, limits.max_batch, limits.max_wait_ms / 1000, limits.queue
        self.metrics = metrics or Metrics()
        self.arriving = 0  # requests whose body is in but that are not yet queued (being checked), counted by the app
        self.waiting = 0  # requests in the queue that still want an answer
        self.batch_seconds = 0.0  # moving average of a batch's scoring time, for Retry-After
        self._queue: asyncio.Queue[_Pending] | None = None
        self._task: asyncio.Task | None = None
        # one thread: torch already uses every core within a batch, and batches must not interleave
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delrec-model")

    async def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run(), name="delrec-batcher")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        while self._queue is not None and not self._queue.empty():
            pending = self._queue.get_nowait()
            if not pending.future.done():
                pending.future.set_exception(ServiceStopping("the service is shutting down"))
        self._executor.shutdown(wait=True)

    def retry_after_s(self) -> int:
        """Seconds until the queue has likely drained: its batches times a batch's recent time."""
        return max(1, math.ceil((self.waiting / self.max_batch + 1) * self.batch_seconds))

    def full(self) -> bool:
        return self.waiting >= self.max_queue

    def overloaded(self, n: int = 1) -> Overloaded:
        """The refusal of `n` requests that do not fit (counted as shed)."""
        self.metrics.count("shed", n)
        return Overloaded(f"the service is at capacity ({self.waiting} requests waiting for the model, at most "
                          f"{self.max_queue}); retry later", self.retry_after_s())

    def check_room(self, n: int) -> None:
        """Raise `Overloaded` unless `n` more requests fit in the queue."""
        if self.waiting + n > self.max_queue:
            raise self.overloaded(n)

    async def rank(self, requests: list[PreparedRequest]) -> list[Ranking]:
        """Rankings of `requests`, scored in the next batches. Cancelling the caller (a deadline,
        a client that went away) takes its requests out: they are not scored if not yet taken."""
        if self._queue is None or self._task is None or self._task.done():
            raise ServiceStopping("the service is not running")
        self.check_room(len(requests))
        loop = asyncio.get_running_loop()
        pending = [_Pending(r, loop.create_future()) for r in requests]
        for p in pending:
            p.future.add_done_callback(lambda _, p=p: self._dequeue(p))
            self._queue.put_nowait(p)
        self.waiting += len(pending)
        try:
            return list(await asyncio.gather(*(p.future for p in pending)))
        except asyncio.CancelledError:
            for p in pending:
                p.future.cancel()
            raise

    def _dequeue(self, p: _Pending) -> None:
        if p.queued:
            p.queued = False
            self.waiting -= 1

    async def _next_batch(self) -> list[_Pending]:
        batch = [await self._queue.get()]
        deadline = time.monotonic() + self.max_wait
        while len(batch) < self.max_batch:
            if not self._queue.empty():
                batch.append(self._queue.get_nowait())
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.arriving == 0:  # nothing on its way: waiting would only add latency
                break
            try:
                batch.append(await asyncio.wait_for(self._queue.get(), remaining))
            except TimeoutError:
                break
        for p in batch:
            self._dequeue(p)
        live = [p for p in batch if not p.future.done()]
        if len(live) < len(batch):  # a client that went away, or a request past its deadline: not scored
            self.metrics.count("not_scored", len(batch) - len(live))
        return live

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.metrics.batch(len(batch))
            start = time.perf_counter()
            results = await loop.run_in_executor(self._executor, self._score, [p.request for p in batch])
            seconds = time.perf_counter() - start
            self.batch_seconds = seconds if not self.batch_seconds else 0.8 * self.batch_seconds + 0.2 * seconds
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _score(self, requests: list[PreparedRequest]) -> list[Ranking | BaseException]:
        try:
            rankings = self.recommender.rank_prepared(requests)
        except Exception as e:  # noqa: BLE001 - find the request that fails; the others still get answers
            if len(requests) == 1:
                log.exception("scoring a request failed")
                return [ScoringFailed(f"the model failed on this request: {type(e).__name__}: {redact_paths(str(e))}")]
            return [self._score([r])[0] for r in requests]
        return [r if r.all_finite else self._not_finite() for r in rankings]

    @staticmethod
    def _not_finite() -> ScoringFailed:
        log.error("the model gave a non-finite score (NaN or infinite) to a candidate of a request")
        return ScoringFailed("the model gave a non-finite score (NaN or infinite) to a candidate of this request")


class Metrics:
    """Counters and the latencies of the most recent requests, for GET /metrics."""

    def __init__(self, window: int = 10_000):
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()  # by endpoint
        self.responses: collections.Counter[int] = collections.Counter()  # by status code
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
        # requests refused or dropped: shed (503, queue full), not_scored (taken out of the queue
        # unscored: client gone or past its deadline), client_gone, timed_out (504), slow_body (408)
        self.faults: collections.Counter[str] = collections.Counter()
        self._lock = threading.Lock()

    def request(self, endpoint: str, status: int, seconds: float) -> None:
        with self._lock:
            self.requests[endpoint] += 1
            self.responses[status] += 1
            if endpoint.startswith("/recommend"):
                self.latency_ms.append(seconds * 1000)

    def batch(self, size: int) -> None:
        with self._lock:
            self.batch_sizes[size] += 1

    def count(self, fault: str, n: int = 1) -> None:
        with self._lock:
            self.faults[fault] += n

    def snapshot(self) -> dict:
        with self._lock:
            latencies = sorted(self.latency_ms)
            batches = sum(self.batch_sizes.values())
            scored = sum(size * n for size, n in self.batch_sizes.items())
            return {
                "uptime_s": round(time.time() - self.started, 3),
                "requests": dict(self.requests),
                "responses": {str(code): n for code, n in sorted(self.responses.items())},
                "errors": sum(n for code, n in self.responses.items() if code >= 400),
                "latency_ms": {f"p{q}": _quantile(latencies, q / 100) for q in (50, 90, 95, 99)}
                | {"count": len(latencies), "window": self.latency_ms.maxlen},
                "batches": batches,
                "mean_batch_size": scored / batches if batches else None,
                "batch_sizes": {str(size): n for size, n in sorted(self.batch_sizes.items())},
                "faults": {k: self.faults.get(k, 0) for k in ("shed", "timed_out", "client_gone", "not_scored", "slow_body")},
            }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)], 3)
