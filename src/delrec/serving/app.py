"""The HTTP service: a trained model of a run folder ranking items for users over HTTP.

    delrec serve --run runs/ml100k-cpu --model sasrec-delrec          # http://127.0.0.1:8000/docs
    curl -s localhost:8000/recommend -H 'content-type: application/json' \\
         -d '{"history": ["Toy Story (1995)", "Heat (1995)"], "k": 5}'

Endpoints: `POST /recommend` (one request), `POST /recommend/batch` (several), `GET /items?query=`
(title search), `GET /healthz`, `GET /metrics` (requests, errors, latency quantiles, batch sizes),
and the OpenAPI docs at `/docs`.

Requests that arrive together are scored together: a single model thread takes every request
waiting in the queue (up to `max_batch`) and ranks them in one `Recommender.rank_prepared` call, so
throughput grows with load instead of requests queueing one by one. While the model is busy, the
next batch gathers by itself; a batch waits (at most `max_wait_ms`) only for requests whose body has
arrived and that are still being checked, so a lone client never waits, and neither does anyone
for a client still sending its body. Each request is checked before it joins a batch
(delrec.serving.recommender's checks: a 400 that names the field), so a bad request never fails the good
ones it would have been batched with; should scoring a batch fail anyway, its requests are scored
one by one and only the failing one gets a 500 (as does one whose scores are not finite).

Under load and faults (docs/serving.md):
* at most `max_queue` requests wait for the model; one more gets a 503 with `Retry-After` at once;
* a request not answered within `timeout_s` of its arrival gets a 504, and is not scored if it
  has not been yet; a request whose client went away is not scored either;
* request headers must arrive within `header_timeout_s` and each part of a body within
  `body_timeout_s` (else the connection is closed, or a 408); at most `max_connections` are open;
* checking requests and searching titles run on a worker thread, never on the event loop; item
  references are at most 512 characters, and messages repeat at most a short prefix of them;
* POST bodies must say `Content-Type: application/json` (415), the `Host` header must be one of
  `allowed_hosts` (400: a web page cannot reach the service through DNS rebinding), and with a
  `token` every endpoint but /healthz needs `Authorization: Bearer <token>` (401);
* no response names a path of the machine.
Bodies over `max_body_bytes` get a 413 before they are read. The service never reads a path from
a request, and binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import hmac
import ipaddress
import json
import logging
import math
import re
import signal
import socket
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from delrec.serving.recommender import PreparedRequest, Ranking, Recommender, RequestError

log = logging.getLogger("delrec.serving.app")

ENDPOINTS = ("/recommend", "/recommend/batch", "/items", "/healthz", "/metrics", "/docs", "/openapi.json")
MAX_BATCH_REQUESTS = 256  # requests in one POST /recommend/batch
MAX_HISTORY_ITEMS = 10_000  # items in one request's history (it is cut to the model's window after)
MAX_ITEM_REF_CHARS = 512  # an id or title longer than this is no item of any catalogue: refused unread
LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def _item_ref(value):
    """An item id or title: a string, or an integer id (JSON numbers that are not integers, and
    booleans, are refused rather than turned into ids)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"an item id or title (a string or an integer), got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_ITEM_REF_CHARS:
        raise ValueError(f"an item id or title is at most {MAX_ITEM_REF_CHARS} characters, got {len(text)}")
    return text


ItemRef = Annotated[str, BeforeValidator(_item_ref)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemRef] = Field(max_length=MAX_HISTORY_ITEMS, description=(
        "items the user interacted with, most recent last: item ids or titles (as in the data or normalised)"))
    candidates: list[ItemRef] | None = Field(None, description=(
        "items to rank; default: the teacher's top list over the items the user has not seen"))
    # strict: `true` and "5" are refused (a 422), not read as 1 and 5
    k: int = Field(10, strict=True, description="how many ranked items to return (a JSON integer)")


class BatchRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    requests: list[RecommendRequest] = Field(min_length=1, max_length=MAX_BATCH_REQUESTS)


class Item(BaseModel):
    item: str  # the item's id in the data
    title: str
    score: float | None = None


class RecommendResponse(BaseModel):
    model: str
    items: list[Item]  # best first
    candidates_from: str
    history_used: list[str]
    history_truncated: int  # earliest history items left out (the model reads at most max_history)


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


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

    def __init__(self, recommender: Recommender, max_batch: int = 16, max_wait_ms: float = 2.0, metrics: Metrics | None = None,
                 max_queue: int | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        max_queue = 4 * max_batch if max_queue is None else max_queue
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.recommender, self.max_batch, self.max_wait, self.max_queue = recommender, max_batch, max_wait_ms / 1000, max_queue
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


class _Gate:
    """The service's outer ASGI layer (plain ASGI: Starlette's decorator middleware costs a
    noticeable share of a fast model's request):
    * a 400 for a `Host` header outside `allowed_hosts` (None: any), a 401 without the `token`
      (every path but /healthz), a 415 for a POST body that is not `application/json`;
    * a 503 with Retry-After for a ranking request while the batcher's queue is full, before its
      body is read;
    * a 413 for a body over `max_bytes`, by its Content-Length before it is read, or as soon as it
      passes the limit when it comes in chunks (read here, then handed on whole); a 408 when a
      part of the body takes over `body_timeout_s` to come;
    * counts every request's endpoint, status and latency in `metrics`;
    * counts the /recommend requests whose body is in on their way to the batcher
      (`batcher.arriving`), until the endpoint marks them queued (`scope["delrec"]["queued"]`) or
      they are answered without it;
    * answers the ranking endpoints itself (`fast`), with the same code their routes call, and
      drops the work of one whose client disconnects before its answer."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, batcher: MicroBatcher, fast: dict | None = None, *,
                 body_timeout_s: float = 10.0, allowed_hosts: frozenset[str] | None = None, token: str | None = None):
        self.app, self.max_bytes, self.metrics, self.batcher = app, max_bytes, metrics, batcher
        self.fast = fast or {}  # (method, path) -> async (body, scope) -> (status, answer, headers): answered here
        self.body_timeout_s, self.allowed_hosts = body_timeout_s, allowed_hosts
        self._authorization = f"Bearer {token}".encode() if token else None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        scope["delrec"] = {"queued": False, "arriving": False, "start": time.monotonic()}

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, counting_send)
        finally:
            if scope["delrec"]["arriving"] and not scope["delrec"]["queued"]:  # answered before it reached the queue
                self.batcher.arriving -= 1
            path = scope["path"]  # any other path counts as one: a scan of random paths must not grow the counters
            self.metrics.request(path if path in ENDPOINTS else "other", status, time.perf_counter() - start)

    def _refused(self, scope, headers: dict) -> tuple[int, dict, list] | None:
        """The answer to a request refused for its headers alone, or None."""
        if self.allowed_hosts is not None:
            host = _host_name(headers.get(b"host", b"").decode("latin-1"))
            if host not in self.allowed_hosts:
                return 400, {"field": "host", "error": f"this service does not answer to the Host {host[:64]!r} "
                                                       "(delrec serve --allowed-hosts)"}, []
        if self._authorization is not None and scope["path"] != "/healthz":
            given = headers.get(b"authorization", b"")
            if not hmac.compare_digest(given, self._authorization):
                return 401, {"field": "authorization", "error": "a valid 'Authorization: Bearer <token>' header is required"}, \
                    [(b"www-authenticate", b"Bearer")]
        if scope["method"] == "POST":
            kind = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
            if kind != b"application/json":
                return 415, {"field": "content-type", "error": "the body must be JSON, sent with 'Content-Type: application/json'"}, []
        length = headers.get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                return 400, {"field": "content-length", "error": "not an integer"}, []
            if too_large:
                return 413, self._error(), []
        return None

    async def _receive(self, receive):
        """The next message of the body, or None when it did not come within body_timeout_s."""
        try:
            return await asyncio.wait_for(receive(), self.body_timeout_s)
        except TimeoutError:
            return None

    async def _limited(self, scope, receive, send):
        refused = self._refused(scope, dict(scope.get("headers") or []))
        if refused is not None:
            return await _send_json(send, *refused)
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is not None and self.batcher.full():
            # refused before its body is read or parsed: under a flood of retries each 503 must cost
            # the event loop as little as possible (a malformed body gets its 4xx once there is room)
            return await _send_json(send, *self.batcher.overloaded().answer())
        message = await self._receive(receive)
        if message is None:
            return await self._slow_body(send)
        if message["type"] != "http.request":  # the client went away
            return
        if message.get("more_body", False):  # in chunks: gather them, counting
            body = bytearray(message.get("body", b""))
            while message.get("more_body", False):
                if len(body) > self.max_bytes:
                    return await _send_json(send, 413, self._error())
                message = await self._receive(receive)
                if message is None:
                    return await self._slow_body(send)
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
            message = {"type": "http.request", "body": bytes(body), "more_body": False}
        if len(message.get("body", b"")) > self.max_bytes:  # chunks that came in one piece (no Content-Length)
            return await _send_json(send, 413, self._error())
        if handler is not None:
            scope["delrec"]["arriving"] = True  # the body is in: a batch may wait for this request now
            self.batcher.arriving += 1
            return await self._answer(handler(message.get("body", b""), scope), receive, send)
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return message

        await self.app(scope, replay, send)

    async def _answer(self, work, receive, send):
        """Send what `work` answers, unless the client disconnects first: then the work is
        cancelled (its requests leave the queue unscored) and nothing is sent."""
        task = asyncio.ensure_future(work)
        try:
            while not task.done():
                gone = asyncio.ensure_future(receive())  # after the whole body, the next message is the disconnect
                try:
                    await asyncio.wait((task, gone), return_when=asyncio.FIRST_COMPLETED)
                finally:
                    if not gone.done():
                        gone.cancel()
                if not task.done() and gone.result()["type"] == "http.disconnect":
                    self.metrics.count("client_gone")
                    task.cancel()
                    try:
                        await task
                    except asyncio.CancelledError:
                        pass
                    return
        except asyncio.CancelledError:
            task.cancel()
            raise
        await _send_json(send, *task.result())

    async def _slow_body(self, send):
        self.metrics.count("slow_body")
        await _send_json(send, 408, {"field": "body", "error": f"the body did not come within {self.body_timeout_s:g} s"},
                         [(b"connection", b"close")])

    def _error(self) -> dict:
        return {"field": "body", "error": f"the request body is over the service's limit of {self.max_bytes} bytes"}


def _host_name(host: str) -> str:
    """The name of a Host header, without its port: `[::1]:8000` -> `::1`, `Example.org.` -> `example.org`."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    if host.count(":") == 1:
        host = host.partition(":")[0]
    return host.rstrip(".")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_allowed_hosts(host: str) -> frozenset[str]:
    """The Host names a service bound to `host` answers to by default: this machine's loopback
    names, the address it listens on, and for a wildcard address (0.0.0.0, ::) the machine's names."""
    names = set(LOOPBACK_HOSTS) | {_host_name(host)}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n)


def _validation_error(errors: list[dict]) -> dict:
    """pydantic's errors as one answer naming the first wrong field (`history[0]`, `k`, `body`)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "malformed request"}
    if first.get("type") == "json_invalid":
        return {"field": "body", "error": f"not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", "errors": 1}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"] or ["body"]
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    message = str(first.get("msg", "malformed request")).removeprefix("Value error, ")
    return {"field": where, "error": message, "errors": len(errors)}


async def _send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    try:  # allow_nan=False: NaN is not JSON; a score that got past the model's check fails here, as a 500
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        log.error("an answer with a non-finite number was not sent")
        status, data = 500, b'{"field":null,"error":"the answer held a non-finite number"}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or ())]})
    await send({"type": "http.response.body", "body": data})


def create_app(recommender: Recommender, *, max_batch: int = 16, max_wait_ms: float = 2.0, max_body_bytes: int = 1 << 20,
               max_queue: int | None = None, timeout_s: float = 60.0, body_timeout_s: float = 10.0,
               allowed_hosts: frozenset[str] | set[str] | None = frozenset(LOOPBACK_HOSTS), token: str | None = None):
    """The ASGI application serving `recommender` (see the module docstring). `allowed_hosts`:
    the Host names answered (None: any); `token`: the bearer token every endpoint but /healthz needs."""

    if timeout_s <= 0 or body_timeout_s <= 0:
        raise ValueError(f"timeout_s and body_timeout_s must be positive, got {timeout_s} and {body_timeout_s}")
    metrics = Metrics()
    batcher = MicroBatcher(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics, max_queue=max_queue)
    # checking requests (title lookups, closest titles) and title search: off the event loop, on one
    # thread (the recommender's lookups are read-only once warm; one thread keeps them in order)
    checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delrec-check")
    ranking = _RankEndpoint(recommender, batcher, checker, metrics, timeout_s)

    @asynccontextmanager
    async def lifespan(app):
        await asyncio.get_running_loop().run_in_executor(checker, recommender.warm)
        await batcher.start()
        log.info("serving %s of %s", recommender.model, recommender.run)
        yield
        await batcher.stop()
        checker.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="delrec", summary=f"{recommender.model} of {recommender.run.name}", lifespan=lifespan,
                  description=__doc__.split("\n\n", 2)[2] if __doc__ else None)
    app.state.metrics, app.state.batcher, app.state.recommender = metrics, batcher, recommender
    _add_routes(app, ranking, limits={"max_batch": max_batch, "max_wait_ms": max_wait_ms, "timeout_s": timeout_s})
    fast = {("POST", "/recommend"): lambda raw, scope: ranking(raw, scope, many=False),
            ("POST", "/recommend/batch"): lambda raw, scope: ranking(raw, scope, many=True)}
    return _Gate(app, max_body_bytes, metrics, batcher, fast, body_timeout_s=body_timeout_s,
                 allowed_hosts=None if allowed_hosts is None else frozenset(_host_name(h) for h in allowed_hosts), token=token)


class _RankEndpoint:
    """POST /recommend (`many=False`) and POST /recommend/batch: (status, answer, headers) for a
    body. The gate calls it straight for every such request (FastAPI's routing, body and exception
    layers would cost the event loop more than a teacher's whole forward pass); the routes
    (`_add_routes`) describe the endpoints in the OpenAPI docs and call it too."""

    def __init__(self, recommender: Recommender, batcher: MicroBatcher, checker: ThreadPoolExecutor, metrics: Metrics,
                 timeout_s: float):
        self.recommender, self.batcher, self.checker, self.metrics = recommender, batcher, checker, metrics
        self.timeout_s = timeout_s

    def answer(self, ranking: Ranking) -> dict:
        """A RecommendResponse as plain JSON data, sent as it is (validating our own output again
        would cost more than a teacher's forward pass)."""
        return {"model": self.recommender.model,
                "items": [{"item": i.item, "title": i.title, "score": i.score} for i in ranking.items],
                "candidates_from": ranking.candidates_from, "history_used": ranking.history_used,
                "history_truncated": ranking.history_truncated}

    def prepare(self, body, many: bool) -> list[PreparedRequest]:
        if not many:
            return [self.recommender.prepare(body.history, body.candidates, body.k)]
        prepared = []
        for n, r in enumerate(body.requests):
            try:
                prepared.append(self.recommender.prepare(r.history, r.candidates, r.k))
            except RequestError as e:
                raise RequestError(f"requests[{n}].{e.field}", e.message) from None
        return prepared

    async def __call__(self, raw: bytes, scope: dict, many: bool) -> tuple[int, dict, list]:
        batcher = self.batcher
        deadline = scope["delrec"]["start"] + self.timeout_s
        try:
            body = (BatchRequest if many else RecommendRequest).model_validate_json(raw)
            n = len(body.requests) if many else 1
            if n > batcher.max_queue:
                return 422, {"field": "requests", "error": f"at most {batcher.max_queue} requests in one batch "
                                                           "(the service's --max-queue)"}, []
            batcher.check_room(n)  # before the work of checking: a full service refuses at once
            prepared = await asyncio.get_running_loop().run_in_executor(self.checker, self.prepare, body, many)
        except ValidationError as e:
            return 422, _validation_error(e.errors()), []
        except RequestError as e:
            return 400, {"field": e.field, "error": e.message}, []
        except Overloaded as e:
            return e.answer()
        scope["delrec"]["queued"] = True
        batcher.arriving -= 1
        try:
            rankings = await asyncio.wait_for(batcher.rank(prepared), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            self.metrics.count("timed_out")
            return 504, {"field": None, "error": f"not answered within the service's deadline of {self.timeout_s:g} s "
                                                 "(delrec serve --timeout-s)"}, []
        except Overloaded as e:
            return e.answer()
        except ScoringFailed as e:
            return 500, {"field": None, "error": str(e)}, []
        except ServiceStopping as e:
            return 503, {"field": None, "error": str(e)}, []
        return 200, {"results": [self.answer(r) for r in rankings]} if many else self.answer(rankings[0]), []


def _add_routes(app: FastAPI, ranking: _RankEndpoint, limits: dict) -> None:
    """The endpoints as FastAPI describes them (OpenAPI docs), and its error handlers."""
    recommender, batcher, metrics, checker = ranking.recommender, ranking.batcher, ranking.metrics, ranking.checker
    run_name = recommender.run.name  # never the absolute path: no response tells how the machine is laid out

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError):
        return JSONResponse(_validation_error(e.errors()), status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse({"field": None, "error": f"the service failed on this request: {type(e).__name__}"}, status_code=500)

    def documented(model) -> dict:  # the body's schema in the OpenAPI docs, as a body parameter would give it
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    async def routed(request: Request, many: bool) -> JSONResponse:
        status, answer, headers = await ranking(await request.body(), request.scope, many)
        return JSONResponse(answer, status_code=status, headers={k.decode(): v.decode() for k, v in headers})

    @app.post("/recommend", response_model=RecommendResponse, summary="rank items for one user's history",
              openapi_extra=documented(RecommendRequest))
    async def recommend(request: Request) -> JSONResponse:
        return await routed(request, many=False)

    @app.post("/recommend/batch", response_model=BatchResponse, summary="rank items for several histories",
              openapi_extra=documented(BatchRequest))
    async def recommend_batch(request: Request) -> JSONResponse:
        return await routed(request, many=True)

    @app.get("/items", response_model=list[Item], summary="find items by title")
    async def items(query: str = Query(min_length=1, max_length=200), limit: int = Query(10, ge=1, le=100)) -> list[Item]:
        found = await asyncio.get_running_loop().run_in_executor(checker, recommender.search, query, limit)
        return [Item(item=i, title=t) for i, t in found]

    @app.get("/healthz", summary="whether the service answers, and what it serves")
    async def healthz() -> dict:
        return {"status": "ok", "model": recommender.model, "run": run_name, "items": len(recommender.ids) - 1,
                "max_history": recommender.max_history, "num_candidates": recommender.num_candidates,
                "queue": {"waiting": batcher.waiting, "max_queue": batcher.max_queue}}

    @app.get("/metrics", summary="requests, errors, latency quantiles, batch sizes and refused requests since start")
    async def get_metrics() -> dict:
        return metrics.snapshot() | {**limits, "max_queue": batcher.max_queue, "waiting": batcher.waiting}


def bind(host: str, port: int):
    """A listening socket (port 0: a free one), so the address is known before the server starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # IPPROTO_TCP named, not left 0: asyncio sets TCP_NODELAY only on sockets that say they are TCP, and
    # without it every response waits ~40 ms for the client's delayed ACK (Nagle's algorithm)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as e:
        sock.close()
        raise RuntimeError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.listen(2048)
    return sock


def _header_timed_protocol(header_timeout_s: float):
    """uvicorn's httptools protocol with a deadline for a request's headers: `header_timeout_s`
    from the connection's start or the request's first byte. uvicorn has none of its own (only a
    keep-alive timeout between requests), so a client that opens connections and sends headers a
    byte at a time (slowloris) would hold them for ever."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class HeaderTimedProtocol(HttpToolsProtocol):
        _header_timer = None

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

    return HeaderTimedProtocol


def make_server(app, sock, log_level: str = "warning", *, header_timeout_s: float = 10.0, max_connections: int = 1024):
    """The uvicorn server of `app`: headers due within `header_timeout_s`, at most
    `max_connections` open connections (more get uvicorn's 503)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10,
                            http=_header_timed_protocol(header_timeout_s), limit_concurrency=max_connections)
    return uvicorn.Server(config)


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 16, max_wait_ms: float = 2.0,
          max_body_bytes: int = 1 << 20, log_level: str = "warning", max_queue: int | None = None, timeout_s: float = 60.0,
          header_timeout_s: float = 10.0, body_timeout_s: float = 10.0, max_connections: int = 1024,
          allowed_hosts: set[str] | None | str = "default", token: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM; prints the address once it listens. `allowed_hosts`:
    "default" (this machine's names and `host`), None (any), or a set of names."""

    if allowed_hosts == "default":
        allowed_hosts = default_allowed_hosts(host)
    app = create_app(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes, max_queue=max_queue,
                     timeout_s=timeout_s, body_timeout_s=body_timeout_s, allowed_hosts=allowed_hosts, token=token)
    sock = bind(host, port)
    where = sock.getsockname()
    if not is_loopback(host) and not token:
        print(f"WARNING: delrec serve listens on {host}, reachable from other machines, and has no token: anyone who can "
              f"reach port {where[1]} can use the model. Set DELREC_SERVE_TOKEN (clients then send 'Authorization: Bearer "
              "<token>'), or serve on 127.0.0.1 behind a proxy.", file=sys.stderr, flush=True)
        log.warning("serving on the non-loopback address %s without a token", host)
    print(f"delrec serve: {recommender.model} of {recommender.run} on http://{host}:{where[1]} (docs at /docs)", flush=True)

    server = make_server(app, sock, log_level, header_timeout_s=header_timeout_s, max_connections=max_connections)
    main_thread = threading.current_thread() is threading.main_thread()
    # uvicorn shuts down gracefully on SIGINT/SIGTERM, then raises the signal again for the handler
    # that was there before it: a no-op here, so that Ctrl-C and SIGTERM end the service with code 0
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        server.run(sockets=[sock])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sock.close()
    print("delrec serve: stopped", flush=True)
