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
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError

from delrec.serving.batcher import Metrics, MicroBatcher, Overloaded, ScoringFailed, ServiceStopping
from delrec.serving.gate import LOOPBACK_HOSTS, Gate, host_name
from delrec.serving.limits import DEFAULTS, ServiceLimits
from delrec.serving.recommender import PreparedRequest, Ranking, Recommender, RequestError
from delrec.serving.schemas import BatchRequest, BatchResponse, Item, RecommendRequest, RecommendResponse

log = logging.getLogger(__name__)


def _validation_error(errors: list[dict]) -> dict:
    """pydantic's errors as one answer naming the first wrong field (`history[0]`, `k`, `body`)."""
    first = errors[0] if errors else {"loc": ("body",), "msg": "malformed request"}
    if first.get("type") == "json_invalid":
        return {"field": "body", "error": f"not valid JSON ({first.get('ctx', {}).get('error', 'malformed')})", "errors": 1}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"] or ["body"]
    where = "".join(f"[{p}]" if p.isdigit() else f".{p}" for p in loc).lstrip(".")
    message = str(first.get("msg", "malformed request")).removeprefix("Value error, ")
    return {"field": where, "error": message, "errors": len(errors)}


def create_app(recommender: Recommender, limits: ServiceLimits = DEFAULTS, *,
               allowed_hosts: frozenset[str] | set[str] | None = frozenset(LOOPBACK_HOSTS), token: str | None = None):
    """The ASGI application serving `recommender` (see the module docstring) within `limits`.
    `allowed_hosts`: the Host names answered (None: any); `token`: the bearer token every endpoint
    but /healthz needs."""
    metrics = Metrics()
    batcher = MicroBatcher(recommender, limits, metrics)
    # checking requests (title lookups, closest titles) and title search: off the event loop, on one
    # thread (the recommender's lookups are read-only once warm; one thread keeps them in order)
    checker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="delrec-check")
    ranking = _RankEndpoint(recommender, batcher, checker, metrics, limits.timeout_s)

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
    _add_routes(app, ranking, limits={"max_batch": limits.max_batch, "max_wait_ms": limits.max_wait_ms, "timeout_s": limits.timeout_s})
    fast = {("POST", "/recommend"): lambda raw, scope: ranking(raw, scope, many=False),
            ("POST", "/recommend/batch"): lambda raw, scope: ranking(raw, scope, many=True)}
    return Gate(app, limits.max_body_bytes, metrics, batcher, fast, body_timeout_s=limits.body_timeout_s,
                 allowed_hosts=None if allowed_hosts is None else frozenset(host_name(h) for h in allowed_hosts), token=token)


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
