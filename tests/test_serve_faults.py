"""The HTTP service under load and faults: a bounded queue that sheds with 503 and
Retry-After, a per-request deadline (504), clients that go away are not scored, slow headers and
bodies are timed out and delay nobody, huge item references are refused without being echoed,
JSON-only POSTs, the Host allow-list and the bearer token, strict types, non-finite scores as a
500 for that request alone, and no absolute path in any answer. A real GRU4Rec teacher, slowed
down where a test needs a busy model."""

import http.client
import json
import math
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from delrec import Recommender
from delrec.serving.batcher import redact_paths
from delrec.serving.gate import default_allowed_hosts
from test_serve import call, serving


@pytest.fixture(scope="module")
def run(csv_llm_run):
    return csv_llm_run[0]


@pytest.fixture
def rec(run):
    return Recommender.from_run(run, model="gru4rec")


class SlowModel:
    """`rec.rank_prepared` that takes `seconds` per batch and records what it scored."""

    def __init__(self, rec, seconds: float):
        self.real, self.seconds, self.scored, self.batches = rec.rank_prepared, seconds, [], 0
        rec.rank_prepared = self

    def __call__(self, prepared):
        time.sleep(self.seconds)
        self.batches += 1
        self.scored.extend(prepared)
        return self.real(prepared)


def good_request(n: int) -> dict:
    rng = np.random.default_rng(n)
    picks = [f"i{i}" for i in rng.choice(np.arange(1, 40), size=6, replace=False)]
    return {"history": picks[:2], "candidates": picks[2:], "k": 3}


def raw_send(port: int, data: bytes) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(data)
    return sock


def post_bytes(body: bytes, content_length: int | None = None, host: str = "127.0.0.1") -> bytes:
    length = len(body) if content_length is None else content_length
    return (f"POST /recommend HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode() + body


def test_a_full_queue_sheds_with_503_and_retry_after_at_once(rec):
    """max_batch 1, max_queue 2, 0.3 s per batch: of 12 requests sent together, one is scored and
    two wait; the rest are refused at once with a 503 and Retry-After, and every one accepted gets
    the answer the Python API gives."""
    want = {n: [(i.item, i.score) for i in rec.rank(**good_request(n)).items] for n in range(12)}
    slow = SlowModel(rec, 0.3)

    def timed(n):
        start = time.perf_counter()
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("POST", "/recommend", json.dumps(good_request(n)), {"content-type": "application/json"})
        response = conn.getresponse()
        body = json.loads(response.read())
        conn.close()
        return n, response.status, response.getheader("retry-after"), body, time.perf_counter() - start

    with serving(rec, max_batch=1, max_queue=2, max_wait_ms=0) as port, ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(timed, range(12)))
        metrics = call(port, "GET", "/metrics")[1]
    accepted = [a for a in answers if a[1] == 200]
    shed = [a for a in answers if a[1] == 503]
    assert len(accepted) + len(shed) == 12 and 1 <= len(accepted) <= 6 and len(shed) >= 6, [a[1] for a in answers]
    for n, _, _, body, _ in accepted:
        assert [(i["item"], pytest.approx(i["score"], rel=1e-5)) for i in body["items"]] == want[n]
    for _, _, retry_after, body, seconds in shed:
        assert int(retry_after) >= 1 and "at capacity" in body["error"] and seconds < 0.25, (retry_after, seconds)
    assert len(slow.scored) == len(accepted)
    assert metrics["faults"]["shed"] == len(shed) and metrics["max_queue"] == 2


def test_a_full_service_refuses_before_reading_the_body(rec):
    """With the queue full, a request is answered 503 from its headers alone: its body (here
    never sent) is neither awaited nor parsed, so a flood of retries costs the service little."""
    SlowModel(rec, 1.0)
    with serving(rec, max_batch=1, max_queue=1, max_wait_ms=0) as port, ThreadPoolExecutor(2) as pool:
        first = pool.submit(call, port, "POST", "/recommend", good_request(0))  # being scored
        time.sleep(0.2)
        second = pool.submit(call, port, "POST", "/recommend", good_request(1))  # waits: the queue is full
        time.sleep(0.2)
        sock = raw_send(port, post_bytes(b"", content_length=500))  # headers only
        start = time.perf_counter()
        head = sock.recv(4096)
        took = time.perf_counter() - start
        sock.close()
        assert head.startswith(b"HTTP/1.1 503") and b"retry-after" in head.lower() and took < 0.5, (head[:200], took)
        assert first.result()[0] == 200 and second.result()[0] == 200


def test_a_batch_larger_than_the_queue_is_refused_naming_the_limit(rec):
    with serving(rec, max_batch=2, max_queue=3) as port:
        status, answer = call(port, "POST", "/recommend/batch", {"requests": [good_request(n) for n in range(4)]})
        assert status == 422 and answer["field"] == "requests" and "at most 3 requests" in answer["error"]
        assert call(port, "POST", "/recommend/batch", {"requests": [good_request(n) for n in range(3)]})[0] == 200


def test_past_its_deadline_a_request_gets_504_and_is_not_scored(rec):
    """timeout 0.4 s, 1 s per batch, one request at a time: the first is being scored when its
    deadline passes (a 504: its result is dropped); the two behind it are never scored."""
    slow = SlowModel(rec, 1.0)
    with serving(rec, max_batch=1, timeout_s=0.4, max_wait_ms=0) as port, ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(call, port, "POST", "/recommend", good_request(n)) for n in range(3)]
        answers = [f.result() for f in futures]
        time.sleep(1.2)  # the model finishes the first; the others must not follow
        metrics = call(port, "GET", "/metrics")[1]
    assert [s for s, _ in answers] == [504] * 3, answers
    assert "deadline of 0.4 s" in answers[0][1]["error"]
    assert slow.batches == 1 and metrics["faults"]["timed_out"] == 3 and metrics["faults"]["not_scored"] == 2


def test_requests_whose_client_went_away_are_not_scored(rec):
    """While the model is busy with one request, five clients send theirs and hang up: none of
    the five is scored, and the service counts them."""
    slow = SlowModel(rec, 0.6)
    with serving(rec, max_batch=1, max_wait_ms=0) as port, ThreadPoolExecutor(1) as pool:
        busy = pool.submit(call, port, "POST", "/recommend", good_request(0))
        time.sleep(0.2)
        for n in range(1, 6):
            sock = raw_send(port, post_bytes(json.dumps(good_request(n)).encode()))
            time.sleep(0.02)
            sock.close()
        assert busy.result()[0] == 200
        time.sleep(0.8)
        metrics = call(port, "GET", "/metrics")[1]
    assert len(slow.scored) == 1, slow.scored
    assert metrics["faults"]["client_gone"] == 5 and metrics["faults"]["not_scored"] == 5


def test_slow_headers_are_cut_off_and_slow_bodies_get_408(rec):
    with serving(rec, header_timeout_s=0.5, body_timeout_s=0.5) as port:
        # headers a byte short of their end: the connection is closed at the header deadline
        half = raw_send(port, b"POST /recommend HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        start = time.perf_counter()
        assert half.recv(1024) == b"" and 0.3 < time.perf_counter() - start < 5
        half.close()
        # a connection that sends nothing at all
        idle = socket.create_connection(("127.0.0.1", port), timeout=30)
        assert idle.recv(1024) == b""
        idle.close()
        # half a body: a 408, and the connection closed
        body = json.dumps(good_request(0)).encode()
        slow = raw_send(port, post_bytes(body[:10], content_length=len(body)))
        reply = b""
        while chunk := slow.recv(4096):
            reply += chunk
        slow.close()
        assert reply.startswith(b"HTTP/1.1 408") and b"did not come within 0.5 s" in reply, reply
        assert call(port, "GET", "/metrics")[1]["faults"]["slow_body"] == 1


def test_stalled_uploads_delay_no_batch(rec):
    """16 connections stuck halfway through their body, a batch wait of 300 ms: a lone request is
    still answered at once (before, each batch waited for the stalled ones, the full 300 ms)."""
    body = json.dumps(good_request(0)).encode()
    with serving(rec, max_wait_ms=300, body_timeout_s=30) as port:
        call(port, "POST", "/recommend", good_request(1))  # warm
        stalled = [raw_send(port, post_bytes(body[:10], content_length=len(body))) for _ in range(16)]
        try:
            time.sleep(0.2)
            seconds = []
            for n in range(5):
                start = time.perf_counter()
                assert call(port, "POST", "/recommend", good_request(n))[0] == 200
                seconds.append(time.perf_counter() - start)
        finally:
            for sock in stalled:
                sock.close()
    assert sorted(seconds)[2] < 0.15, seconds


def test_huge_item_references_are_refused_without_an_echo(rec):
    with serving(rec) as port:
        status, answer = call(port, "POST", "/recommend", {"history": ["x" * 1_000_000]})
        assert status == 422 and answer["field"] == "history[0]" and "at most 512 characters, got 1000000" in answer["error"]
        assert len(json.dumps(answer)) < 300
        status, answer = call(port, "POST", "/recommend", {"history": ["No Such Film " * 39]})  # 507 characters: looked up
        assert status == 400 and "unknown item" in answer["error"] and len(answer["error"]) < 400, answer


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded", None])
def test_post_bodies_must_be_declared_json(rec, content_type):
    with serving(rec) as port:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.putrequest("POST", "/recommend")
        if content_type:
            conn.putheader("content-type", content_type)
        data = json.dumps(good_request(0)).encode()
        conn.putheader("content-length", str(len(data)))
        conn.endheaders(data)
        response = conn.getresponse()
        answer = json.loads(response.read())
        conn.close()
        assert response.status == 415 and answer["field"] == "content-type", answer
        assert call(port, "POST", "/recommend", good_request(0), headers={"content-type": "application/json; charset=utf-8"})[0] == 200


def test_host_allow_list(rec):
    with serving(rec) as port:  # default: this machine's loopback names only
        status, answer = call(port, "GET", "/healthz", headers={"host": "evil.example"})
        assert status == 400 and answer["field"] == "host" and "evil.example" in answer["error"]
        assert call(port, "POST", "/recommend", good_request(0), headers={"host": f"localhost:{port}"})[0] == 200
        assert call(port, "GET", "/healthz", headers={"host": f"[::1]:{port}"})[0] == 200
    with serving(rec, allowed_hosts=None) as port:  # any
        assert call(port, "GET", "/healthz", headers={"host": "evil.example"})[0] == 200
    with serving(rec, allowed_hosts={"recs.example.org"}) as port:
        assert call(port, "GET", "/healthz", headers={"host": "Recs.Example.org:443"})[0] == 200
        assert call(port, "GET", "/healthz")[0] == 400
    assert {"localhost", "127.0.0.1", "::1", "10.1.2.3"} == default_allowed_hosts("10.1.2.3")
    assert socket.gethostname().lower() in default_allowed_hosts("0.0.0.0")


def test_bearer_token(rec):
    with serving(rec, token="s3cret-token") as port:
        status, answer = call(port, "POST", "/recommend", good_request(0))
        assert status == 401 and answer["field"] == "authorization"
        assert call(port, "GET", "/items?query=Movie", headers={"authorization": "Bearer wrong"})[0] == 401
        assert call(port, "POST", "/recommend", good_request(0), headers={"authorization": "Bearer s3cret-token"})[0] == 200
        assert call(port, "GET", "/healthz")[0] == 200  # health checks need no token


@pytest.mark.parametrize("k", [True, "5", 5.0, None])
def test_k_is_a_strict_integer(rec, k):
    with serving(rec) as port:
        status, answer = call(port, "POST", "/recommend", {"history": ["i1"], "k": k})
        assert status == 422 and answer["field"] == "k", answer


def test_integer_ids_are_ids(run):
    """An integer in a request is read as the item id it spells: the ids of a MovieLens-like run
    (1, 2, ...) can be sent as JSON numbers (docs/serving.md)."""
    rec = Recommender.from_run(run, model="gru4rec")
    by_number = {str(n): n for n in range(3)}
    rec._by_id.update({k: rec._by_id[f"i{v}"] for k, v in by_number.items()})  # ids that are numbers
    with serving(rec) as port:
        status, body = call(port, "POST", "/recommend", {"history": [1, 2], "candidates": ["i5", "i6"], "k": 1})
        assert status == 200 and body["history_used"] == [rec.titles[rec._by_id["i1"]], rec.titles[rec._by_id["i2"]]]


def test_non_finite_scores_fail_only_their_request(rec):
    real = rec._score
    bad = rec.resolve(["i33"], "h")[0]

    def score(histories, candidates):
        rows = real(histories, candidates)
        return [np.where(np.arange(len(r)) == 1, np.nan, r) if h[-1] == bad else r for h, r in zip(histories, rows)]

    rec._score = score
    requests = [good_request(n) for n in range(5)] + [{"history": ["i33"], "candidates": ["i1", "i2", "i3"], "k": 3}]
    with serving(rec, max_batch=8, max_wait_ms=100) as port:
        status, answer = call(port, "POST", "/recommend", requests[-1])
        assert status == 500 and "non-finite score" in answer["error"]
        with ThreadPoolExecutor(len(requests)) as pool:
            answers = list(pool.map(lambda r: call(port, "POST", "/recommend", r), requests))
    assert [s for s, _ in answers] == [200] * 5 + [500]
    assert all(math.isfinite(i["score"]) for _, a in answers[:5] for i in a["items"])


def test_no_absolute_path_in_any_answer(run, rec):
    folder = str(run.resolve())
    real = rec.rank_prepared

    def failing(prepared):
        if len(prepared[0].history) == 3:
            raise FileNotFoundError(f"[Errno 2] No such file or directory: '{folder}/teachers/gru4rec/model.safetensors'")
        return real(prepared)

    rec.rank_prepared = failing
    with serving(rec) as port:
        answers = [call(port, "GET", path) for path in ("/healthz", "/metrics", "/openapi.json", "/docs")]
        answers.append(call(port, "POST", "/recommend", {"history": ["i1", "i2", "i3"], "candidates": ["i5", "i6"], "k": 1}))
    for _, body in answers:
        text = body if isinstance(body, bytes) else json.dumps(body)
        assert folder not in str(text) and str(run.parent) not in str(text), text[:300]
    assert answers[0][1]["run"] == run.name
    assert answers[-1][0] == 500 and answers[-1][1]["error"].endswith("'.../model.safetensors'")


def test_redact_paths():
    assert redact_paths("open '/home/u/runs/x/model.pt' failed") == "open '.../model.pt' failed"
    assert redact_paths("no file /tmp/a/b, nor /c/d/") == "no file .../b, nor .../"
    assert redact_paths("ratio 1/2 and ./rel/path stay") == "ratio 1/2 and ./rel/path stay"


def test_non_loopback_host_without_token_warns_loudly(run):
    process = subprocess.Popen([sys.executable, "-m", "delrec.cli", "serve", "--run", str(run), "--model", "gru4rec",
                                "--host", "0.0.0.0", "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stdout.readline()
        assert "on http://0.0.0.0:" in line
    finally:
        process.terminate()
        _, err = process.communicate(timeout=60)
    assert "WARNING: delrec serve listens on 0.0.0.0" in err and "DELREC_SERVE_TOKEN" in err


def test_in_flight_requests_are_answered_on_shutdown(rec):
    """A request being scored when the service is told to stop still gets its answer."""
    SlowModel(rec, 0.5)
    result = {}
    with serving(rec, max_batch=1) as port:
        thread = threading.Thread(target=lambda: result.update(answer=call(port, "POST", "/recommend", good_request(0))))
        thread.start()
        time.sleep(0.2)
    thread.join(30)
    assert result["answer"][0] == 200
