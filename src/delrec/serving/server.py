"""Running the service: the listening socket, uvicorn with a timeout on request headers, and
`serve`, which runs until SIGINT or SIGTERM."""

from __future__ import annotations

import logging
import signal
import socket
import sys
import threading

from delrec.serving.app import create_app
from delrec.serving.gate import default_allowed_hosts, is_loopback
from delrec.serving.limits import DEFAULTS, ServiceLimits
from delrec.serving.recommender import Recommender

log = logging.getLogger(__name__)


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


def make_server(app, sock, limits: ServiceLimits = DEFAULTS, log_level: str = "warning"):
    """The uvicorn server of `app`: headers due within `limits.header_timeout_s`, at most
    `limits.max_connections` open connections (more get uvicorn's 503)."""
    import uvicorn

    config = uvicorn.Config(app, log_level=log_level, access_log=False, timeout_graceful_shutdown=10,
                            http=_header_timed_protocol(limits.header_timeout_s), limit_concurrency=limits.max_connections)
    return uvicorn.Server(config)


def serve(recommender: Recommender, host: str = "127.0.0.1", port: int = 8000, limits: ServiceLimits = DEFAULTS, *,
          log_level: str = "warning", allowed_hosts: set[str] | None | str = "default", token: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM; prints the address once it listens. `allowed_hosts`:
    "default" (this machine's names and `host`), None (any), or a set of names."""

    if allowed_hosts == "default":
        allowed_hosts = default_allowed_hosts(host)
    app = create_app(recommender, limits, allowed_hosts=allowed_hosts, token=token)
    sock = bind(host, port)
    where = sock.getsockname()
    if not is_loopback(host) and not token:
        print(f"WARNING: delrec serve listens on {host}, reachable from other machines, and has no token: anyone who can "
              f"reach port {where[1]} can use the model. Set DELREC_SERVE_TOKEN (clients then send 'Authorization: Bearer "
              "<token>'), or serve on 127.0.0.1 behind a proxy.", file=sys.stderr, flush=True)
        log.warning("serving on the non-loopback address %s without a token", host)
    print(f"delrec serve: {recommender.model} of {recommender.run} on http://{host}:{where[1]} (docs at /docs)", flush=True)

    server = make_server(app, sock, limits, log_level)
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
