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
next batch gathers by itself; a batch waits (at most `max_wait_ms`) only for requests that have
already arrived and are still being read and checked, so a lone client never waits. Each request is checked before it joins a batch (delrec.recommender's checks: a 400
that names the field), so a bad request never fails the good ones it would have been batched
with; should scoring a batch fail anyway, its requests are scored one by one and only the failing
one gets a 500. Bodies over `max_body_bytes` get a 413 before they are read. The service never
reads a path from a request, and binds to 127.0.0.1 unless told otherwise.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Annotated

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from delrec.recommender import PreparedRequest, Ranking, Recommender, RequestError

log = logging.getLogger("delrec.serve")

ENDPOINTS = ("/recommend", "/recommend/batch", "/items", "/healthz", "/metrics", "/docs", "/openapi.json")
MAX_BATCH_REQUESTS = 256  # requests in one POST /recommend/batch
MAX_HISTORY_ITEMS = 10_000  # items in one request's history (it is cut to the model's window after)


def _item_ref(value):
    """An item id or title: a string, or an integer id (JSON numbers that are not integers, and
    booleans, are refused rather than turned into ids)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"an item id or title (a string or an integer), got {type(value).__name__}")
    return str(value)


ItemRef = Annotated[str, BeforeValidator(_item_ref)]


class RecommendRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    history: list[ItemRef] = Field(max_length=MAX_HISTORY_ITEMS, description=(
        "items the user interacted with, most recent last: item ids or titles (as in the data or normalised)"))
    candidates: list[ItemRef] | None = Field(None, description=(
        "items to rank; default: the teacher's top list over the items the user has not seen"))
    k: int = Field(10, description="how many ranked items to return")


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


@dataclass
class _Pending:
    request: PreparedRequest
    future: asyncio.Future


class MicroBatcher:
    """One model thread scoring the requests queued since its last batch, together."""

    def __init__(self, recommender: Recommender, max_batch: int = 16, max_wait_ms: float = 2.0, metrics: Metrics | None = None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {max_wait_ms}")
        self.recommender, self.max_batch, self.max_wait = recommender, max_batch, max_wait_ms / 1000
        self.metrics = metrics or Metrics()
        self.arriving = 0  # requests received but not yet queued (being read and checked), counted by the app
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

    async def rank(self, requests: list[PreparedRequest]) -> list[Ranking]:
        if self._queue is None or self._task is None or self._task.done():
            raise ServiceStopping("the service is not running")
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in requests]
        for request, future in zip(requests, futures):
            self._queue.put_nowait(_Pending(request, future))
        return [await futures[0]] if len(futures) == 1 else list(await asyncio.gather(*futures))

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
        return [p for p in batch if not p.future.done()]  # a client that went away is not scored

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._next_batch()
            if not batch:
                continue
            self.metrics.batch(len(batch))
            results = await loop.run_in_executor(self._executor, self._score, [p.request for p in batch])
            for pending, result in zip(batch, results):
                if pending.future.done():
                    continue
                if isinstance(result, BaseException):
                    pending.future.set_exception(result)
                else:
                    pending.future.set_result(result)

    def _score(self, requests: list[PreparedRequest]) -> list[Ranking | BaseException]:
        try:
            return self.recommender.rank_prepared(requests)
        except Exception as e:  # noqa: BLE001 - find the request that fails; the others still get answers
            if len(requests) == 1:
                log.exception("scoring a request failed")
                return [ScoringFailed(f"the model failed on this request: {type(e).__name__}: {e}")]
            return [self._score([r])[0] for r in requests]


class Metrics:
    """Counters and the latencies of the most recent requests, for GET /metrics."""

    def __init__(self, window: int = 10_000):
        self.started = time.time()
        self.requests: collections.Counter[str] = collections.Counter()  # by endpoint
        self.responses: collections.Counter[int] = collections.Counter()  # by status code
        self.latency_ms: collections.deque[float] = collections.deque(maxlen=window)
        self.batch_sizes: collections.Counter[int] = collections.Counter()
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
            }


def _quantile(sorted_values: list[float], q: float) -> float | None:
    if not sorted_values:
        return None
    return round(sorted_values[min(len(sorted_values) - 1, math.ceil(q * len(sorted_values)) - 1)], 3)


class _Gate:
    """The service's outer ASGI layer (plain ASGI: Starlette's decorator middleware costs a
    noticeable share of a fast model's request):
    * a 413 for a body over `max_bytes`, by its Content-Length before it is read, or as soon as it
      passes the limit when it comes in chunks (read here, then handed on whole);
    * counts every request's endpoint, status and latency in `metrics`;
    * counts the /recommend requests on their way to the batcher (`batcher.arriving`), until the
      endpoint marks them queued (`scope["delrec"]["queued"]`) or they are answered without it;
    * answers the ranking endpoints itself (`fast`), with the same code their routes call."""

    def __init__(self, app, max_bytes: int, metrics: Metrics, batcher: MicroBatcher, fast: dict | None = None):
        self.app, self.max_bytes, self.metrics, self.batcher = app, max_bytes, metrics, batcher
        self.fast = fast or {}  # (method, path) -> async (body, scope) -> (status, answer): answered here

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.perf_counter(), 500
        arriving = scope["path"].startswith("/recommend")
        scope["delrec"] = {"queued": False}
        self.batcher.arriving += arriving

        async def counting_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self._limited(scope, receive, counting_send)
        finally:
            if arriving and not scope["delrec"]["queued"]:  # refused before it reached the queue
                self.batcher.arriving -= 1
            path = scope["path"]  # any other path counts as one: a scan of random paths must not grow the counters
            self.metrics.request(path if path in ENDPOINTS else "other", status, time.perf_counter() - start)

    async def _limited(self, scope, receive, send):
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_bytes
            except ValueError:
                return await _send_json(send, 400, {"field": "content-length", "error": "not an integer"})
            if too_large:
                return await _send_json(send, 413, self._error())
        message = await receive()
        if message["type"] != "http.request":  # the client went away
            return
        if message.get("more_body", False):  # in chunks: gather them, counting
            body = bytearray(message.get("body", b""))
            while message.get("more_body", False):
                if len(body) > self.max_bytes:
                    return await _send_json(send, 413, self._error())
                message = await receive()
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
            message = {"type": "http.request", "body": bytes(body), "more_body": False}
        if len(message.get("body", b"")) > self.max_bytes:  # chunks that came in one piece (no Content-Length)
            return await _send_json(send, 413, self._error())
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is not None:
            status, answer = await handler(message.get("body", b""), scope)
            return await _send_json(send, status, answer)
        handed = False

        async def replay():
            nonlocal handed
            if handed:
                return await receive()
            handed = True
            return message

        await self.app(scope, replay, send)

    def _error(self) -> dict:
        return {"field": "body", "error": f"the request body is over the service's limit of {self.max_bytes} bytes"}


def _validation_error(errors: list[dict]) -> dict:
    """pydantic's errors as one answer naming the first wrong field (`history[0]`, `k`, `body`)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "malformed request"}
    if first.get("type") == "json_invalid":
        return {"field": "body", "error": f"not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", "errors": 1}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"] or ["body"]
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    message = str(first.get("msg", "malformed request")).removeprefix("Value error, ")
    return {"field": where, "error": message, "errors": len(errors)}


async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


def create_app(recommender: Recommender, *, max_batch: int = 16, max_wait_ms: float = 2.0, max_body_bytes: int = 1 << 20):
    """The FastAPI application serving `recommender` (see the module docstring)."""
    from contextlib import asynccontextmanager

    metrics = Metrics()
    batcher = MicroBatcher(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, metrics=metrics)

    def answer(ranking: Ranking) -> dict:
        """A RecommendResponse as plain JSON data, sent as it is (validating our own output again
        would cost more than a teacher's forward pass)."""
        return {"model": recommender.model, "items": [{"item": i.item, "title": i.title, "score": i.score} for i in ranking.items],
                "candidates_from": ranking.candidates_from, "history_used": ranking.history_used,
                "history_truncated": ranking.history_truncated}

    @asynccontextmanager
    async def lifespan(app):
        await batcher.start()
        log.info("serving %s of %s", recommender.model, recommender.run)
        yield
        await batcher.stop()

    app = FastAPI(title="delrec", summary=f"{recommender.model} of {recommender.run}", lifespan=lifespan,
                  description=__doc__.split("\n\n", 2)[2] if __doc__ else None)
    app.state.metrics, app.state.batcher, app.state.recommender = metrics, batcher, recommender

    async def rank_requests(raw: bytes, scope: dict, many: bool) -> tuple[int, dict]:
        """POST /recommend (`many=False`) and POST /recommend/batch: (status, answer) for a body.
        The gate calls it straight for every such request (FastAPI's routing, body and exception
        layers would cost the event loop more than a teacher's whole forward pass); the routes
        below describe the endpoints in the OpenAPI docs and call it too."""
        try:
            body = (BatchRequest if many else RecommendRequest).model_validate_json(raw)
        except ValidationError as e:
            return 422, _validation_error(e.errors())
        try:
            if many:
                prepared = []
                for n, r in enumerate(body.requests):
                    try:
                        prepared.append(recommender.prepare(r.history, r.candidates, r.k))
                    except RequestError as e:
                        raise RequestError(f"requests[{n}].{e.field}", e.message) from None
            else:
                prepared = [recommender.prepare(body.history, body.candidates, body.k)]
        except RequestError as e:
            return 400, {"field": e.field, "error": e.message}
        scope["delrec"]["queued"] = True
        batcher.arriving -= 1
        try:
            rankings = await batcher.rank(prepared)
        except ScoringFailed as e:
            return 500, {"field": None, "error": str(e)}
        except ServiceStopping as e:
            return 503, {"field": None, "error": str(e)}
        return 200, {"results": [answer(r) for r in rankings]} if many else answer(rankings[0])

    @app.exception_handler(RequestValidationError)
    async def malformed(request: Request, e: RequestValidationError):
        return JSONResponse(_validation_error(e.errors()), status_code=422)

    @app.exception_handler(Exception)
    async def failed(request: Request, e: Exception):
        return JSONResponse({"field": None, "error": f"the service failed on this request: {type(e).__name__}"}, status_code=500)

    def documented(model) -> dict:  # the body's schema in the OpenAPI docs, as a body parameter would give it
        return {"requestBody": {"required": True, "content": {"application/json": {"schema": model.model_json_schema()}}}}

    @app.post("/recommend", response_model=RecommendResponse, summary="rank items for one user's history",
              openapi_extra=documented(RecommendRequest))
    async def recommend(request: Request) -> JSONResponse:
        status, answer = await rank_requests(await request.body(), request.scope, many=False)
        return JSONResponse(answer, status_code=status)

    @app.post("/recommend/batch", response_model=BatchResponse, summary="rank items for several histories",
              openapi_extra=documented(BatchRequest))
    async def recommend_batch(request: Request) -> JSONResponse:
        status, answer = await rank_requests(await request.body(), request.scope, many=True)
        return JSONResponse(answer, status_code=status)

    @app.get("/items", response_model=list[Item], summary="find items by title")
    async def items(query: str = Query(min_length=1, max_length=200), limit: int = Query(10, ge=1, le=100)) -> list[Item]:
        return [Item(item=i, title=t) for i, t in recommender.search(query, limit)]

    @app.get("/healthz", summary="whether the service answers, and what it serves")
    async def healthz() -> dict:
        return {"status": "ok", "model": recommender.model, "run": str(recommender.run), "items": len(recommender.ids) - 1,
                "max_history": recommender.max_history, "num_candidates": recommender.num_candidates}

    @app.get("/metrics", summary="requests, errors, latency quantiles and batch sizes since start")
    async def get_metrics() -> dict:
        return metrics.snapshot() | {"max_batch": max_batch, "max_wait_ms": max_wait_ms}

    fast = {("POST", "/recommend"): lambda raw, scope: rank_requests(raw, scope, many=False),
            ("POST", "/recommend/batch"): lambda raw, scope: rank_requests(raw, scope, many=True)}
    return _Gate(app, max_body_bytes, metrics, batcher, fast)


def bind(host: str, port: int):
    """A listening socket (port 0: a free one), so the address is known before the server starts."""
    import socket

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


def make_server(app, sock, log_level: str = "warning"):
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10)
    return uvicorn.Server(config)


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000, *, max_batch: int = 16, max_wait_ms: float = 2.0,
          max_body_bytes: int = 1 << 20, log_level: str = "warning") -> None:
    """Serve until SIGINT or SIGTERM; prints the address once it listens."""
    app = create_app(recommender, max_batch=max_batch, max_wait_ms=max_wait_ms, max_body_bytes=max_body_bytes)
    sock = bind(host, port)
    where = sock.getsockname()
    print(f"delrec serve: {recommender.model} of {recommender.run} on http://{host}:{where[1]} (docs at /docs)", flush=True)
    import signal

    server = make_server(app, sock, log_level)
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
