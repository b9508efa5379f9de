"""Atomic file output: every artefact is written to a temporary sibling and renamed into place,
so an interrupted or failed run never leaves a half-written file behind."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _writer_alive(tmp_name: str) -> bool:
    """Whether the process that made a temporary sibling (its pid is in the name:
    .NAME.<pid>.<random>.tmp) is still running. Names without a pid are from before this rule
    and count as stale."""
    parts = tmp_name[:-len(".tmp")].rsplit(".", 2)
    if len(parts) < 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return True  # this process's own: another write of the same file in flight (a thread)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's live process
    return True


def _remove_stale(path: Path) -> None:
    """Temporary siblings of `path` left by a process that was killed (SIGKILL, power loss)
    before it could rename or remove them: the next write of the same file removes them, but
    never one whose writer is still running (another process writing the same file)."""
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        if _writer_alive(stale.name):
            continue
        if stale.is_dir():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def _fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk, so that a rename is not
    seen after a power loss before the data it points at (a zero-length file on some file
    systems). Directories cannot be opened for fsync on every platform: skipped there."""
    try:
        fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    for sub in sorted(root.rglob("*"), reverse=True):
        _fsync(sub)
    _fsync(root)


def _temp_prefix(path: Path) -> str:
    return f".{path.name}.{os.getpid()}."


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success it is flushed to disk and renamed onto
    `path` (and the directory flushed), so a kill or a power loss leaves the old file or the
    new one, never a part. The file gets the mode a plain `open` would give (mkstemp's is 0600
    whatever the umask). On failure (a full disk: OSError ENOSPC) the temporary file goes and
    the old `path` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        _fsync(tmp_path)
        os.replace(tmp_path, path)
        _fsync(path.parent)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory next to `path`; on success it replaces `path` as a whole
    (the old one is renamed aside first, then removed, so a kill leaves one of them whole)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
    tmp.chmod(0o777 & ~_umask())
    try:
        yield tmp
        _fsync_tree(tmp)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent))
            os.replace(path, old / "old")  # out of the way in one rename; removed below
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
        _fsync(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def file_sha256(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's bytes (hex), read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def write_parquet(path: str | os.PathLike, table: pa.Table | pd.DataFrame) -> None:
    """Deterministic Parquet: same table, same bytes (no timestamps or pandas index metadata)."""
    if isinstance(table, pd.DataFrame):
        table = pa.Table.from_pandas(table, preserve_index=False)
    table = table.replace_schema_metadata(None)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp, compression="zstd")


def read_parquet(path: str | os.PathLike) -> pa.Table:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist (was the run prepared? see `delrec data prepare`)")
    return pq.read_table(path)
