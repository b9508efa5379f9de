"""The HTTP service (delrec.serving.app), tested over real HTTP on a free port of this machine: every
endpoint, every kind of bad request, concurrent requests batched together with the answers of
unbatched calls, a failing request that takes nothing else down, and `delrec serve`'s clean
shutdown on SIGTERM and Ctrl-C."""

import http.client
import json
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import numpy as np
import pytest

from delrec import Recommender
from delrec.cli import main
from delrec.serving.app import create_app
from delrec.serving.limits import ServiceLimits
from delrec.serving.server import bind, make_server


@pytest.fixture(scope="module")
def run(csv_llm_run):
    return csv_llm_run


@contextmanager
def serving(recommender, **options):
    """The service on a free port of 127.0.0.1, in a thread of this process."""
    sock = bind("127.0.0.1", 0)
    limits, options = ServiceLimits.split(options)
    server = make_server(create_app(recommender, limits, **options), sock, limits)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.02)
    try:
        yield sock.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)
        assert not thread.is_alive(), "the service did not stop"


def call(port: int, method: str, path: str, body=None, raw: bytes | None = None, headers=None):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        text = response.read()
        return response.status, (json.loads(text) if text and response.getheader("content-type", "").startswith("application/json") else text)
    finally:
        conn.close()


def as_json(ranking) -> list[tuple[str, float]]:
    return [(item.item, item.score) for item in ranking.items]


@pytest.fixture(scope="module")
def teacher_service(run):
    folder, _ = run
    rec = Recommender.from_run(folder, model="gru4rec")
    with serving(rec, max_batch=8, max_wait_ms=20) as port:
        yield rec, port


def test_endpoints_answer_as_the_python_api(teacher_service):
    rec, port = teacher_service
    status, health = call(port, "GET", "/healthz")
    assert status == 200 and health["status"] == "ok" and health["model"] == "gru4rec" and health["items"] == 40

    status, items = call(port, "GET", "/items?query=usual%20suspects")
    assert status == 200 and items == [{"item": "i0", "title": "The Usual Suspects (1995)", "score": None}]
    status, items = call(port, "GET", "/items?query=Movie%203&limit=3")
    assert status == 200 and [i["title"] for i in items][:1] == ["Movie 3 (1993)"] and len(items) <= 3

    request = {"history": ["i1", "Movie 2 (1992)", "i3"], "candidates": ["i7", "i4", "i9", "i20"], "k": 3}
    status, body = call(port, "POST", "/recommend", request)
    want = rec.rank(**request)
    assert status == 200 and body["model"] == "gru4rec" and body["candidates_from"] == "given"
    assert [(i["item"], pytest.approx(i["score"], rel=1e-5)) for i in body["items"]] == as_json(want)
    assert body["items"][0]["item"] == "i4"  # the data's rule (i -> i + 1), learned by the teacher

    status, body = call(port, "POST", "/recommend", {"history": [f"i{i}" for i in range(12)], "k": 5})  # no candidates
    assert status == 200 and body["history_truncated"] == 2 and len(body["history_used"]) == 10
    assert body["candidates_from"] == "the gru4rec teacher's top 15" and body["items"][0]["item"] == "i12"

    batch = [{"history": ["i1"], "k": 2}, {"history": ["i5", "i6"], "candidates": ["i7", "i8"], "k": 2}]
    status, body = call(port, "POST", "/recommend/batch", {"requests": batch})
    assert status == 200 and len(body["results"]) == 2
    for got, want in zip(body["results"], rec.rank_many(batch)):
        assert [(i["item"], pytest.approx(i["score"], rel=1e-5)) for i in got["items"]] == as_json(want)

    assert call(port, "GET", "/docs")[0] == 200
    status, spec = call(port, "GET", "/openapi.json")
    assert status == 200 and {"/recommend", "/recommend/batch", "/items", "/healthz", "/metrics"} <= set(spec["paths"])

    assert call(port, "GET", "/no/such/path")[0] == 404
    status, metrics = call(port, "GET", "/metrics")
    assert "/no/such/path" not in metrics["requests"] and metrics["requests"]["other"] >= 1
    assert status == 200 and metrics["requests"]["/recommend"] >= 2 and metrics["requests"]["/recommend/batch"] >= 1
    assert metrics["latency_ms"]["p50"] > 0 and metrics["batches"] >= 3 and metrics["max_batch"] == 8


BAD_REQUESTS = [  # (body, status, field, words of the message)
    ({"history": []}, 400, "history", "the history is empty"),
    ({"history": ["Toy Stori (1995)"]}, 400, "history[0]", "unknown item"),
    ({"history": ["Movie 3 (1993"]}, 400, "history[0]", "closest titles: 'Movie 3 (1993)'"),
    ({"history": [3]}, 400, "history[0]", "unknown item '3'"),  # an integer is an id, and these ids are i0 ... i39
    ({"history": [1.5]}, 422, "history[0]", "an item id or title"),
    ({"history": [True]}, 422, "history[0]", "an item id or title"),
    ({"history": "i1"}, 422, "history", "valid array"),
    ({}, 422, "history", "Field required"),
    ({"history": ["i1"], "candidates": ["i2"]}, 400, "candidates", "at least two"),
    ({"history": ["i1"], "candidates": ["i2", "i3", "Movie 2 (1992)"]}, 400, "candidates[2]", "is also candidates[0]"),
    ({"history": ["i1"], "candidates": ["i2", "nope"]}, 400, "candidates[1]", "unknown item"),
    ({"history": ["i1", "i5"], "candidates": ["i2", "i5"]}, 400, "candidates[1]", "already in the history"),
    ({"history": ["i1"], "candidates": [f"i{i}" for i in range(2, 40)]}, 400, "candidates", "at most 20"),
    ({"history": ["i1"], "candidates": ["i2", "i3"], "k": 3}, 400, "k", "from 1 to the 2 candidates"),
    ({"history": ["i1"], "k": 0}, 400, "k", "from 1 to 15"),
    ({"history": ["i1"], "k": "ten"}, 422, "k", "valid integer"),
    ({"history": ["i1"], "user": "u1"}, 422, "user", "Extra inputs"),
]


@pytest.mark.parametrize("body,status,field,words", BAD_REQUESTS, ids=[f"{b[2]}-{i}" for i, b in enumerate(BAD_REQUESTS)])
def test_bad_requests_get_4xx_naming_the_field(run, body, status, field, words):
    folder, _ = run
    rec = Recommender.from_run(folder, model="gru4rec", max_candidates=20)
    with serving(rec) as port:
        got, answer = call(port, "POST", "/recommend", body)
        assert (got, answer["field"]) == (status, field) and words in answer["error"], answer
        # in a batch, the field names the request too
        got, answer = call(port, "POST", "/recommend/batch", {"requests": [{"history": ["i1"]}, body]})
        assert got == status and answer["field"] == f"requests[1].{field}" and words in answer["error"], answer
        assert call(port, "GET", "/healthz")[0] == 200


def test_malformed_and_oversized_bodies(teacher_service, run):
    rec, port = teacher_service
    status, answer = call(port, "POST", "/recommend", raw=b'{"history": ["i1"')
    assert status == 422 and answer["field"] == "body" and "not valid JSON (EOF while parsing" in answer["error"], answer
    assert call(port, "POST", "/recommend/batch", {"requests": []})[0] == 422
    assert call(port, "GET", "/items?query=")[0] == 422
    folder, _ = run
    with serving(Recommender.from_run(folder, model="gru4rec"), max_body_bytes=200) as small:
        big = json.dumps({"history": ["i1"] * 100}).encode()
        status, answer = call(small, "POST", "/recommend", raw=big)
        assert status == 413 and answer["field"] == "body" and "200 bytes" in answer["error"]
        # a body sent in chunks, without a Content-Length, is cut off while it is read
        conn = http.client.HTTPConnection("127.0.0.1", small, timeout=30)
        conn.request("POST", "/recommend", body=iter([big[:150], big[150:]]), headers={"content-type": "application/json"},
                     encode_chunked=True)
        response = conn.getresponse()
        assert response.status == 413 and "200 bytes" in json.loads(response.read())["error"]
        conn.close()
        assert call(small, "POST", "/recommend", {"history": ["i1"], "k": 2})[0] == 200


def test_concurrent_requests_are_batched_and_equal_unbatched_calls(run):
    """Zero-shot tiny LLM: requests sent together are scored in one batch, and each answer is what
    the Python API gives for that request alone."""
    folder, llm = run
    rec = Recommender.from_run(folder, model="zero-shot", llm=llm, dtype="float32")
    rng = np.random.default_rng(0)
    requests = []
    for n in range(12):
        picks = [f"i{i}" for i in rng.choice(np.arange(1, 40), size=8, replace=False)]
        requests.append({"history": picks[:3], "candidates": picks[3:] if n % 3 else None, "k": 5})
    alone = [as_json(rec.rank(**r)) for r in requests]
    with serving(rec, max_batch=16, max_wait_ms=300) as port, ThreadPoolExecutor(len(requests)) as pool:
        answers = list(pool.map(lambda r: call(port, "POST", "/recommend", r), requests))
        metrics = call(port, "GET", "/metrics")[1]
    for (status, body), want in zip(answers, alone):
        assert status == 200
        got = [(i["item"], i["score"]) for i in body["items"]]
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-4, atol=1e-5)
    assert max(int(size) for size in metrics["batch_sizes"]) > 1, metrics  # batched, not queued one by one
    assert metrics["batches"] < len(requests)


def test_burst_with_malformed_requests_and_a_failing_one(run, monkeypatch):
    """40 concurrent requests, 10% malformed and one that makes the model fail: each malformed
    one gets its 4xx, the failing one a 500, every good one its answer; the service stays up."""
    folder, _ = run
    rec = Recommender.from_run(folder, model="gru4rec")
    real = rec.rank_prepared

    def flaky(prepared):
        if any(p.history == (rec.resolve(["i33"], "h")[0],) for p in prepared):
            raise RuntimeError("model failure")
        return real(prepared)

    monkeypatch.setattr(rec, "rank_prepared", flaky)
    rng = np.random.default_rng(1)
    bursts = []
    for n in range(40):
        picks = [f"i{i}" for i in rng.choice(np.arange(1, 33), size=6, replace=False)]
        good = {"history": picks[:2], "candidates": picks[2:], "k": 4}
        if n % 10 == 3:
            bursts.append(({"history": picks[:2], "candidates": [picks[2], picks[2]]}, 400))
        elif n == 17:
            bursts.append(({"history": ["i33"], "k": 3}, 500))
        else:
            bursts.append((good, 200))
    with serving(rec, max_batch=8, max_wait_ms=50) as port, ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: call(port, "POST", "/recommend", b[0]), bursts))
        assert call(port, "GET", "/healthz")[0] == 200
        metrics = call(port, "GET", "/metrics")[1]
    for (body, want_status), (status, answer) in zip(bursts, answers):
        assert status == want_status, answer
        if status == 500:
            assert answer["error"] == "the model failed on this request: RuntimeError: model failure"
        if status == 200:
            assert [(i["item"], pytest.approx(i["score"], rel=1e-4)) for i in answer["items"]] == as_json(real([rec.prepare(**body)])[0])
    assert metrics["requests"]["/recommend"] == 40 and metrics["responses"] == {"200": 35 + 1, "400": 4, "500": 1}  # + /healthz


def _start_cli(folder, *extra):
    process = subprocess.Popen([sys.executable, "-m", "delrec.cli", "serve", "--run", str(folder), "--model", "gru4rec", "--port", "0", *extra],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = process.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:(\d+)", line)
    assert found, line + process.stderr.read()
    return process, int(found.group(1))


@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_delrec_serve_command_stops_cleanly(run, stop):
    folder, _ = run
    process, port = _start_cli(folder)
    try:
        assert call(port, "GET", "/healthz")[1]["model"] == "gru4rec"
        assert call(port, "POST", "/recommend", {"history": ["i1"], "k": 1})[1]["items"][0]["item"] == "i2"
        process.send_signal(stop)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 0, err
    assert "delrec serve: stopped" in out and "Traceback" not in err


def test_delrec_serve_command_refuses_bad_settings(run, capsys):
    folder, _ = run
    assert main(["serve", "--run", str(folder), "--model", "gru4rec", "--max-batch", "0"]) == 2
    assert "--max-batch: must be at least 1" in capsys.readouterr().err
    assert main(["serve", "--run", str(folder), "--model", "nonesuch"]) == 2
    assert "no model 'nonesuch'" in capsys.readouterr().err
    with serving(Recommender.from_run(folder, model="gru4rec")) as port:  # the port is taken
        assert main(["serve", "--run", str(folder), "--model", "gru4rec", "--port", str(port)]) == 2
        assert f"cannot listen on 127.0.0.1:{port}" in capsys.readouterr().err
