"""How much the HTTP service takes on at once and how long it waits: one settings class, its
defaults and its checks, read by the batcher, the gate, the server and `delrec serve`."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass(frozen=True)
class ServiceLimits:
    max_batch: int = 16  # requests scored together
    max_wait_ms: float = 2.0  # how long a batch waits for requests that are still being checked
    max_queue: int | None = None  # requests waiting for the model (None: four batches' worth); one more gets a 503
    max_body_bytes: int = 1 << 20  # larger request bodies get a 413 before they are read
    timeout_s: float = 60.0  # a request not answered this long after it came gets a 504
    header_timeout_s: float = 10.0  # a connection whose request headers take longer is closed
    body_timeout_s: float = 10.0  # a body part that takes longer to come gets a 408
    max_connections: int = 1024  # open connections at most; more get a 503

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_body_bytes", "max_connections"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be at least 1, got {value}")
        for name in ("timeout_s", "header_timeout_s", "body_timeout_s"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be a positive number of seconds, got {getattr(self, name)}")
        if self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be >= 0, got {self.max_wait_ms}")

    @property
    def queue(self) -> int:
        """The most requests that wait for the model."""
        return 4 * self.max_batch if self.max_queue is None else self.max_queue

    @classmethod
    def split(cls, options: dict) -> tuple[ServiceLimits, dict]:
        """The limits among `options` (keyword arguments), and the rest."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in options.items() if k in names}), {k: v for k, v in options.items() if k not in names}


DEFAULTS = ServiceLimits()
