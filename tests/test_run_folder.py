"""Trusting the run folder: safe checkpoints, one writer per run and per cache entry,
crash-consistent files and resume, a full disk."""

import errno
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from delrec.cli import main
from delrec.core.io import atomic_dir, write_json
from delrec.core.locks import RunFolderBusy, entry_lock, run_lock
from delrec.training.folder import StageFolder, UnsafeCheckpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def _prepared(tmp_path, name="run"):
    from conftest import sequential_rule_dataset

    interactions, items = sequential_rule_dataset(num_users=60)
    folder = tmp_path / "src"
    folder.mkdir(exist_ok=True)
    interactions.to_csv(folder / "interactions.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    run = tmp_path / name
    assert main(["data", "prepare", str(folder), "--out", str(run)]) == 0
    return run


class Planted:
    """An object whose unpickling runs code: what a malicious checkpoint.pt would hold."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _holder(script: str) -> subprocess.Popen:
    """Another process running `script` (it prints `ready` once it holds what it holds)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "ready"
    return proc


# -- safe to load -------------------------------------------------------------------------------


def test_a_checkpoint_that_would_run_code_is_refused_unread(tmp_path, capsys):
    run = _prepared(tmp_path)
    marker = tmp_path / "pwned"
    folder = run / "teachers" / "gru4rec"
    folder.mkdir(parents=True)
    torch.save({"config": {}, "payload": Planted(str(marker))}, folder / "checkpoint.pt")
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "holds objects other than tensors and plain containers" in err and "--restart" in err and "Traceback" not in err
    assert not marker.exists()  # nothing ran
    with pytest.raises(UnsafeCheckpoint):
        StageFolder(folder).resume(object, {}, restart=False)
    assert not marker.exists()
    # --restart throws it away, unread, and trains
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet", "--restart"]) == 0
    assert not marker.exists() and (folder / "model.safetensors").exists()


def test_every_stage_checkpoint_loads_with_weights_only(tmp_path, monkeypatch):
    """The teacher's (numpy and Python RNG states too) loads under weights_only=True: a run killed
    after its first epoch resumes."""
    import delrec.training.teacher as train_module
    from delrec.teachers import default_config

    run = _prepared(tmp_path)
    real = train_module.StageFolder.checkpoint
    calls = []

    def checkpoint_then_die(self, payload, rng_state=torch.get_rng_state):
        real(self, payload, rng_state)
        calls.append(1)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module.StageFolder, "checkpoint", checkpoint_then_die)
    with pytest.raises(KeyboardInterrupt):
        train_module.train_teacher(run, default_config("gru4rec", max_epochs=2), progress=False)
    ckpt = torch.load(run / "teachers" / "gru4rec" / "checkpoint.pt", weights_only=True)
    assert isinstance(ckpt["rng"][0]["numpy"]["keys"], torch.Tensor)
    monkeypatch.setattr(train_module.StageFolder, "checkpoint", real)
    train_module.train_teacher(run, default_config("gru4rec", max_epochs=2), progress=False)
    assert (run / "teachers" / "gru4rec" / "metrics.json").exists()


# -- one writer per run folder and per cache entry ----------------------------------------------


def test_a_second_writer_fails_at_once_naming_the_holder(tmp_path, capsys):
    run = _prepared(tmp_path)
    holder = _holder(f"""
        import sys, time
        from delrec.core.locks import run_lock
        sys.argv = ["delrec", "run", "--config", "mine.yaml"]
        with run_lock({str(run)!r}):
            print("ready", flush=True)
            time.sleep(60)
    """)
    try:
        t0 = time.perf_counter()
        assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 2
        assert time.perf_counter() - t0 < 10  # at once, not after waiting
        err = capsys.readouterr().err
        assert f"is in use by pid {holder.pid}" in err and "`delrec run --config mine.yaml`" in err
        assert not (run / "teachers" / "gru4rec" / "metrics.json").exists()
        assert main(["data", "prepare", str(tmp_path / "src"), "--out", str(run)]) == 2
        with pytest.raises(RunFolderBusy):
            with run_lock(run):
                pass
    finally:
        holder.kill()  # SIGKILL: the kernel drops the lock with the process
        holder.wait()
    with run_lock(run):  # free again, and re-entrant within a process
        with run_lock(run):
            pass
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 0


def test_a_second_fetcher_waits_for_the_first(tmp_path):
    entry = tmp_path / "cache" / "datasets" / "ml-100k"
    holder = _holder(f"""
        import time
        from delrec.core.locks import entry_lock
        with entry_lock({str(entry)!r}):
            print("ready", flush=True)
            time.sleep(1.5)
    """)
    t0 = time.perf_counter()
    with entry_lock(entry):
        waited = time.perf_counter() - t0
    holder.wait()
    assert waited > 0.5


def test_temporary_files_of_a_live_writer_are_kept(tmp_path):
    """The stale temporary siblings of a file are removed by its next write, but not those of
    another process still writing it."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".x.json.{sleeper.pid}.abc123.tmp"
        dead_pid = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead = tmp_path / f".x.json.{int(dead_pid.stdout)}.zzz999.tmp"
        old_style = tmp_path / ".x.json.k1ll3d.tmp"
        for path in (live, dead, old_style):
            path.write_text("half")
        write_json(tmp_path / "x.json", {"a": 1})
        assert live.exists() and not dead.exists() and not old_style.exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# -- crash-consistent resume ---------------------------------------------------------------------


def test_a_torn_last_log_line_is_dropped_with_a_warning(tmp_path, caplog):
    folder = StageFolder(tmp_path / "stage")
    for step in (1, 2, 3):
        folder.log({"step": step, "loss": 1.0 / step})
    with open(folder.log_path, "a") as f:
        f.write('{"step": 4, "lo')  # killed in the middle of a write
    with caplog.at_level(logging.WARNING, logger="delrec.training.folder"):
        folder.truncate_log(2)
    assert [json.loads(line)["step"] for line in folder.log_path.read_text().splitlines()] == [1, 2]
    assert "line 4 is torn" in caplog.text


def test_killed_runs_resume_to_identical_results(tmp_path):
    """A few SIGKILLs of `delrec run` at random points (benchmarks/kill_resume.py runs 24)."""
    from kill_resume import harness

    result = harness(tmp_path, kills=3, seed=1, min_delay=4.0, max_delay=9.0, log=lambda *a: None)
    assert result["kills"] == 3 and result["files_compared"] > 20
    assert result["differ"] == [] and result["left_behind"] == [] and result["identical"]


# -- a full disk ---------------------------------------------------------------------------------


def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_a_full_disk_leaves_the_previous_files_intact(tmp_path, monkeypatch, capsys):
    target = tmp_path / "metrics.json"
    write_json(target, {"old": True})
    monkeypatch.setattr(Path, "write_text", _no_space)
    with pytest.raises(OSError, match="No space left"):
        write_json(target, {"new": True})
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"old": True} and not list(tmp_path.glob(".*.tmp"))

    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "w.bin").write_bytes(b"old")
    with pytest.raises(OSError, match="No space left"):
        with atomic_dir(tmp_path / "adapter") as tmp:
            (tmp / "w.bin").write_bytes(b"ne")
            _no_space()
    assert (tmp_path / "adapter" / "w.bin").read_bytes() == b"old" and not list(tmp_path.glob(".*.tmp"))

    # a stage's checkpoint on a full disk: the previous checkpoint stays, the command says what happened
    run = _prepared(tmp_path)
    import delrec.training.folder as scaffold

    real_save = torch.save
    saves = []

    def save_then_fill(obj, f, *a, **k):
        saves.append(1)
        if len(saves) > 1:
            _no_space()
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(scaffold.torch, "save", save_then_fill)
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "3", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no space left on the device" in err and "run the same command again" in err and "Traceback" not in err
    folder = run / "teachers" / "gru4rec"
    assert torch.load(folder / "checkpoint.pt", weights_only=True)["loop"]["step"] == 1  # the first epoch, whole
    assert not list(folder.glob(".*.tmp"))
    monkeypatch.setattr(scaffold.torch, "save", real_save)
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "3", "--quiet"]) == 0
