"""The service's outer ASGI layer: body limits, Host and token checks, the fast path of the ranking
endpoints, and the Host names a service answers to by default."""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import socket
import time

from delrec.serving.batcher import Metrics, MicroBatcher
from delrec.serving.schemas import ENDPOINTS

log = logging.getLogger(__name__)


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


class Gate:
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
                 body_timeout_s: float, allowed_hosts: frozenset[str] | None = None, token: str | None = None):
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
            host = host_name(headers.get(b"host", b"").decode("latin-1"))
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
            return await send_json(send, *refused)
        handler = self.fast.get((scope["method"], scope["path"]))
        if handler is not None and self.batcher.full():
            # refused before its body is read or parsed: under a flood of retries each 503 must cost
            # the event loop as little as possible (a malformed body gets its 4xx once there is room)
            return await send_json(send, *self.batcher.overloaded().answer())
        message = await self._receive(receive)
        if message is None:
            return await self._slow_body(send)
        if message["type"] != "http.request":  # the client went away
            return
        if message.get("more_body", False):  # in chunks: gather them, counting
            body = bytearray(message.get("body", b""))
            while message.get("more_body", False):
                if len(body) > self.max_bytes:
                    return await send_json(send, 413, self._error())
                message = await self._receive(receive)
                if message is None:
                    return await self._slow_body(send)
                if message["type"] != "http.request":
                    return
                body += message.get("body", b"")
            message = {"type": "http.request", "body": bytes(body), "more_body": False}
        if len(message.get("body", b"")) > self.max_bytes:  # chunks that came in one piece (no Content-Length)
            return await send_json(send, 413, self._error())
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
        await send_json(send, *task.result())

    async def _slow_body(self, send):
        self.metrics.count("slow_body")
        await send_json(send, 408, {"field": "body", "error": f"the body did not come within {self.body_timeout_s:g} s"},
                         [(b"connection", b"close")])

    def _error(self) -> dict:
        return {"field": "body", "error": f"the request body is over the service's limit of {self.max_bytes} bytes"}


def host_name(host: str) -> str:
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
    names = set(LOOPBACK_HOSTS) | {host_name(host)}
    if host in ("0.0.0.0", "::", ""):
        names |= {socket.gethostname().lower(), socket.getfqdn().lower()}
    return frozenset(n for n in names if n)


async def send_json(send, status: int, body: dict, headers: list | None = None) -> None:
    try:  # allow_nan=False: NaN is not JSON; a score that got past the model's check fails here, as a 500
        data = json.dumps(body, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    except ValueError:
        log.error("an answer with a non-finite number was not sent")
        status, data = 500, b'{"field":null,"error":"the answer held a non-finite number"}'
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode()), *(headers or ())]})
    await send({"type": "http.response.body", "body": data})
