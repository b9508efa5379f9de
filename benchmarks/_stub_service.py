"""`delrec serve`'s real HTTP layer around a stub model that takes a fixed time per batch, for the
overload and slow-client rows of benchmarks/serve.py (and usable by hand):

    python benchmarks/_stub_service.py --batch-ms 50 --port 0     # prints the address like delrec serve

The stub answers like a Recommender: a catalogue of ids `0` ... `N-1` titled `Item n`; requests
must give their candidates; a candidate's score is `stub_score(last history id, candidate id)`, a
pure function, so a client can check every answer it gets. Scoring a batch sleeps `--batch-ms`
whatever its size (as a GPU model roughly does), on the service's one model thread.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from delrec.serving.recommender import PreparedRequest, RankedItem, Ranking, RequestError


def stub_score(last: int, candidate: int) -> float:
    return float((last * 7919 + candidate * 104729) % 1000) / 10


class StubRecommender:
    """What delrec.serving.app needs of a Recommender, with a model that only sleeps."""

    def __init__(self, items: int = 10_000, batch_seconds: float = 0.05, max_candidates: int = 50):
        self.model, self.run, self.teacher_name = "stub", Path("stub-run"), None
        self.ids = [""] + [str(n) for n in range(items)]  # index 0: padding, as in a Recommender
        self.max_history, self.num_candidates, self.max_candidates = 50, 15, max_candidates
        self.batch_seconds, self.batches, self.scored = batch_seconds, 0, 0

    def warm(self) -> None:
        pass

    def _index(self, ref: str, what: str, n: int) -> int:
        if not ref.isdigit() or int(ref) >= len(self.ids) - 1:
            raise RequestError(f"{what}[{n}]", f"unknown item {ref[:80]!r}")
        return int(ref) + 1

    def prepare(self, history, candidates=None, k=10) -> PreparedRequest:
        if not history:
            raise RequestError("history", "the history is empty")
        if not candidates or len(candidates) < 2:
            raise RequestError("candidates", "give at least two items to rank")
        if len(candidates) > self.max_candidates:
            raise RequestError("candidates", f"at most {self.max_candidates} items to rank")
        items = [self._index(r, "history", n) for n, r in enumerate(history)][-self.max_history:]
        cands = [self._index(r, "candidates", n) for n, r in enumerate(candidates)]
        if not 1 <= k <= len(cands):
            raise RequestError("k", f"must be an integer from 1 to the {len(cands)} candidates, got {k!r}")
        return PreparedRequest(tuple(items), tuple(cands), k, max(0, len(history) - self.max_history))

    def rank_prepared(self, prepared) -> list[Ranking]:
        time.sleep(self.batch_seconds)
        self.batches += 1
        self.scored += len(prepared)
        out = []
        for p in prepared:
            last = int(self.ids[p.history[-1]])
            scored = sorted(((stub_score(last, int(self.ids[c])), c) for c in p.candidates), key=lambda s: -s[0])[: p.k]
            out.append(Ranking([RankedItem(self.ids[c], f"Item {self.ids[c]}", s) for s, c in scored], "given",
                               [f"Item {self.ids[i]}" for i in p.history], p.history_truncated))
        return out

    def search(self, query: str, limit: int = 10) -> list[tuple[str, str]]:
        return [(query, f"Item {query}")] if query.isdigit() and int(query) < len(self.ids) - 1 else []


def main() -> None:
    from delrec.serving.limits import ServiceLimits
    from delrec.serving.server import serve

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch-ms", type=float, default=50.0, help="what scoring one batch takes")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--max-batch", type=int)
    p.add_argument("--batch-wait-ms", type=float)
    p.add_argument("--max-queue", type=int)
    p.add_argument("--timeout-s", type=float)
    p.add_argument("--header-timeout-s", type=float)
    p.add_argument("--body-timeout-s", type=float)
    a = p.parse_args()
    given = dict(max_batch=a.max_batch, max_wait_ms=a.batch_wait_ms, max_queue=a.max_queue, timeout_s=a.timeout_s,
                 header_timeout_s=a.header_timeout_s, body_timeout_s=a.body_timeout_s)
    limits = ServiceLimits(**{k: v for k, v in given.items() if v is not None})  # the rest: the service's defaults
    serve(StubRecommender(batch_seconds=a.batch_ms / 1000), "127.0.0.1", a.port, limits)


if __name__ == "__main__":
    main()
