"""One writer per run folder and per cache entry: an advisory `fcntl.flock` on a lock file.

    with run_lock(run_dir):            # RUN/.lock, exclusive; a second writer fails at once
        ...
    with entry_lock(cache_entry):      # CACHE/.NAME.lock; a second fetcher waits, then finds it done
        ...

Every command that writes into a run folder (`delrec run`, `data prepare`, `teacher train`,
`distill`, `finetune`, `evaluate`, `report`) and the library functions behind them take the run
lock. It is re-entrant within a process (the pipeline holds it and its stages take it again) and
taken by the main process only under a multi-process launch (the other processes never write).
The holder writes its pid, host and command into the lock file, so the refusal names them. The
kernel drops a flock when its process dies, however it dies (SIGKILL included): a lock is never
left behind by a crash, and there is nothing to clean up by hand.

The lock is advisory: a process that does not take it (an older delrec, a shell `rm`) is not
stopped by it.
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import shutil
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

RUN_LOCK_NAME = ".lock"

_held: dict[str, list] = {}  # lock file (resolved) -> [fd, depth]: this process's holds
_guard = threading.Lock()


class RunFolderBusy(RuntimeError):
    """Another process holds the run folder's lock."""


def _command() -> str:
    args = [Path(sys.argv[0]).name, *sys.argv[1:]] if sys.argv and sys.argv[0] else ["python"]
    line = " ".join(args)
    return line if len(line) <= 200 else line[:197] + "..."


def _is_worker() -> bool:
    """A non-main process of a multi-process launch (torchrun / accelerate): it never writes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0


def holder(lock_file: str | os.PathLike) -> dict:
    """What the lock file says about its last holder (pid, host, command, since); {} if unknown."""
    try:
        return json.loads(Path(lock_file).read_text() or "{}")
    except (OSError, ValueError):
        return {}


def _describe(info: dict) -> str:
    if not info:
        return "another process"
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info["since"])) if "since" in info else "?"
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} (`{info.get('command', '?')}`, since {since})"


@contextmanager
def _flock(lock_file: Path, busy_message=None, on_wait=None) -> Iterator[None]:
    """Hold `lock_file` exclusively. Held by another process: raise RunFolderBusy with
    `busy_message(holder)`, or (busy_message None) call `on_wait(holder)` and wait for it."""
    key = str(lock_file.resolve())
    with _guard:
        if key in _held:  # this process holds it already: re-enter
            _held[key][1] += 1
            fd = None
        else:
            lock_file.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    if busy_message is not None:
                        raise RunFolderBusy(busy_message(holder(lock_file))) from None
                    if on_wait is not None:
                        on_wait(holder(lock_file))
                    fcntl.flock(fd, fcntl.LOCK_EX)  # (the guard is held: this process's other threads wait too)
            except BaseException:
                os.close(fd)
                raise
            info = {"pid": os.getpid(), "host": socket.gethostname(), "command": _command(), "since": time.time()}
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
            _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _guard:
            _held[key][1] -= 1
            if _held[key][1] == 0:
                fd = _held.pop(key)[0]
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


@contextmanager
def run_lock(run_dir: str | os.PathLike) -> Iterator[None]:
    """Hold RUN/.lock for writing, or fail at once naming the process that holds it."""
    if _is_worker():
        yield
        return
    run_dir = Path(run_dir)

    def busy(info: dict) -> str:
        return (f"{run_dir} is in use by {_describe(info)}: two writers in one run folder would delete and "
                f"overwrite each other's files. Wait for it to finish (or stop it), or use another run folder")

    with _flock(run_dir / RUN_LOCK_NAME, busy_message=busy):
        yield


@contextmanager
def entry_lock(entry: str | os.PathLike, log=None) -> Iterator[None]:
    """Hold the lock of one cache entry (CACHE/.NAME.lock beside CACHE/NAME) while it is built:
    a second process fetching the same entry waits for the first, then finds it complete."""
    entry = Path(entry)
    lock_file = entry.parent / f".{entry.name}.lock"

    def waiting(info: dict) -> None:
        if log is not None:
            log.info("waiting for %s, which is fetching %s", _describe(info), entry)

    with _flock(lock_file, on_wait=waiting):
        yield


def holds_run_lock(func):
    """Decorator: `func(run_dir, ...)` runs holding run_lock(run_dir)."""

    @functools.wraps(func)
    def wrapper(run_dir, *args, **kwargs):
        with run_lock(run_dir):
            return func(run_dir, *args, **kwargs)

    return wrapper


def remove_if_empty(folder: Path) -> None:
    """Remove `folder` if it holds nothing but the run lock file and empty folders: a command that
    failed leaves no run folder of its own behind."""
    entries = list(folder.rglob("*"))
    if all(p.is_dir() or (p.name == RUN_LOCK_NAME and p.parent == folder) for p in entries):
        shutil.rmtree(folder, ignore_errors=True)
