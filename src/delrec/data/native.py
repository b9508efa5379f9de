"""The publishers' native files (parsed by delrec.data.formats) as a RawDataset: Amazon 2018,
Steam, KuaiRec. Items without a usable title are dropped with their interactions and counted,
and a fetched data set is parsed once and kept beside its files (`load_fetched`)."""

from __future__ import annotations

import datetime as dt
import json
import logging
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from delrec.core.io import atomic_dir, write_parquet
from delrec.core.locks import entry_lock
from delrec.data.acquisition.download import check
from delrec.data.acquisition.sources import REMOTE
from delrec.data.formats import (
    AMAZON_RATING_COLUMNS,
    EPOCH,
    KUAIREC_CAPTIONS,
    KUAIREC_MATRIX,
    LONG_TITLE,
    PARSER_VERSION,
    DataFormatError,
    _Columns,
    _note_skip,
    _nth_data_line,
    _open_binary,
    _read_csv,
    _skips,
    _zip_member,
    amazon_titles,
    iter_records,
    kuairec_titles,
    steam_titles,
)
from delrec.data.parsing import Locator, check_floats, to_unix_seconds
from delrec.data.raw import RawDataset, assemble

log = logging.getLogger(__name__)


class _RowLocator(Locator):
    """Row of the interactions as finally kept -> line of the file: `kept` maps kept rows to rows
    as read, `line_of` rows as read to lines (computed only when an error is reported)."""

    def __init__(self, path: Path, line_of: Callable[[int], int]):
        super().__init__(path)
        self._line_of = line_of
        self.kept: np.ndarray | None = None

    def where(self, row: int) -> str:
        if self.kept is not None:
            row = int(self.kept[row])
        return f"line {self._line_of(row)}"


# --------------------------------------------------------------------------------------------
# Assembly: keep the titled items, count what was dropped


# What each reader does with an exact repeat, said in protocol.json (source.read.duplicates). The
# readers keep every row; `prepare` drops a repeat of a (user, item, timestamp) and counts it
# (stats.json raw.duplicates_dropped) and keeps, and counts, the same item at another time
# (raw.repeat_interactions).
_KEPT_AGAIN = ("; the same {item} again at another time is another interaction, kept (counted in stats.json as "
               "raw.repeat_interactions)")


DUPLICATES = {
    "amazon-2018": "a rating repeated with the same user, product and timestamp (a day) is one interaction: prepare "
                   "keeps the first and counts the rest in stats.json (raw.duplicates_dropped)"
                   + _KEPT_AGAIN.format(item="product"),
    "steam": "a review repeated with the same user, game and date is one interaction: prepare keeps the first and "
             "counts the rest in stats.json (raw.duplicates_dropped)" + _KEPT_AGAIN.format(item="game"),
    "kuairec": "rows repeating a (user, video, timestamp) once the timestamp is cut to whole seconds are one "
               "interaction: prepare keeps the first and counts the rest in stats.json (raw.duplicates_dropped)"
               + _KEPT_AGAIN.format(item="video"),
}


def _finish(name: str, fmt: str, *, users: pa.ChunkedArray, items: pa.ChunkedArray, timestamps: np.ndarray,
            loc: _RowLocator, titles: dict[str, str], items_path: Path, source: dict, read: dict) -> RawDataset:
    """The RawDataset of the interactions whose item has a title; `read` gains the counts of
    what the files held and what was dropped (the loader's part of the statistics)."""
    n = len(users)
    if n == 0:
        raise DataFormatError(f"{loc.path}: no interactions")
    read["duplicates"] = DUPLICATES[fmt]
    read.update(interactions_read=n, users_read=pc.count_distinct(users).as_py(),
                items_read=pc.count_distinct(items).as_py(), titled_items_in_catalogue=len(titles))
    keep = pc.is_in(items, value_set=pa.array(list(titles), pa.string())).to_numpy(zero_copy_only=False)
    kept = np.flatnonzero(keep)
    untitled = pc.unique(items.filter(pa.array(~keep)))
    read.update(items_without_title=len(untitled), interactions_of_items_without_title=int(n - len(kept)))
    if len(untitled):
        log.info("%s: %d of %d items have no usable title in %s; their %d interactions are dropped (e.g. %s)", name,
                 len(untitled), read["items_read"], items_path.name, n - len(kept), untitled[:3].to_pylist())
    if len(kept) == 0:
        raise DataFormatError(f"{items_path}: none of the {read['items_read']} items of {loc.path} has a title there "
                              "(are these the files of one data set?)")
    if len(kept) < n:
        users, items, timestamps = users.take(pa.array(kept)), items.take(pa.array(kept)), timestamps[kept]
        loc.kept = kept
    present = pc.unique(items)  # in order of first appearance
    item_titles = [titles[i] for i in present.to_pylist()]
    read.update(long_titles=sum(len(t) > LONG_TITLE for t in item_titles),
                longest_title=max(len(t) for t in item_titles))
    return assemble(
        name,
        users=users,
        items=items,
        timestamps=timestamps,
        inter_loc=loc,
        item_ids=pa.chunked_array([present]),
        titles=item_titles,
        item_loc=Locator(items_path),
        source={"format": fmt, **source, "read": read},
    )


def read_amazon(ratings: str | Path, metadata: str | Path, name: str | None = None, progress: bool = False) -> RawDataset:
    """Amazon ratings-only CSV (`item,user,rating,timestamp`, the 2018 column order) and the
    metadata's JSON lines (gzip or not; Python-literal lines as in 2014 are read too). Every row
    is kept, repeated ratings too: `prepare` drops exact repeats (DUPLICATES says how)."""
    ratings, metadata = Path(ratings), Path(metadata)
    opener = lambda: _open_binary(ratings)  # noqa: E731
    with opener() as f:
        head = f.read(64)
    if head.startswith((b"user_id,parent_asin", b"rating,title")):
        raise DataFormatError(f"{ratings}: line 1: this is the 2023 Amazon release (a header with user_id, parent_asin); "
                              "delrec reads the 2018 ratings-only files (item,user,rating,timestamp, no header)")
    cols = _read_csv(ratings, opener, names=AMAZON_RATING_COLUMNS, want={"item": "item", "user": "user", "timestamp": "timestamp"},
                     types={c: pa.string() for c in AMAZON_RATING_COLUMNS})
    loc = _RowLocator(ratings, _nth_data_line(opener, header=False))
    timestamps = to_unix_seconds(cols["timestamp"], loc, allow_datetime=False)
    titles, read = amazon_titles(metadata, progress)
    return _finish(name or ratings.stem, "amazon-2018", users=cols["user"], items=cols["item"], timestamps=timestamps,
                   loc=loc, titles=titles, items_path=metadata,
                   source={"interactions": str(ratings), "items": str(metadata)}, read=read)


def read_steam(reviews: str | Path, games: str | Path, name: str | None = None, progress: bool = False) -> RawDataset:
    """`steam_reviews.json.gz` (each review: `username`, `product_id`, `date` YYYY-MM-DD, whose
    midnight UTC is the timestamp; same-day reviews keep the file's order) and `steam_games.json.gz`.
    Every review is kept, repeated ones too: `prepare` drops exact repeats (DUPLICATES says how)."""
    reviews, games = Path(reviews), Path(games)
    cols = _Columns()
    counts, first = Counter(), {}
    days: dict[str, int] = {}
    for lineno, rec in iter_records(reviews, progress, reviews.name):
        user, item, date = rec.get("username"), rec.get("product_id"), rec.get("date")
        if not isinstance(user, str) or not user.strip():
            _note_skip(counts, first, "no username", f"line {lineno}")
            continue
        if item is None or not str(item).strip():
            _note_skip(counts, first, "no product_id", f"line {lineno}")
            continue
        ts = days.get(date) if isinstance(date, str) else None
        if ts is None:
            try:
                ts = (dt.date.fromisoformat(date) - EPOCH).days * 86400
            except (TypeError, ValueError):
                _note_skip(counts, first, "no valid date", f"line {lineno}")
                continue
            days[date] = ts
        cols.add(user, str(item).strip(), ts, lineno)
    users, items, timestamps, lines = cols.columns()
    loc = _RowLocator(reviews, lambda row: int(lines[row]))
    titles, read = steam_titles(games, progress)
    read["reviews_skipped"] = _skips(counts, first)
    return _finish(name or "steam", "steam", users=users, items=items, timestamps=timestamps, loc=loc, titles=titles,
                   items_path=games, source={"interactions": str(reviews), "items": str(games)}, read=read)


def read_kuairec(matrix: str | Path, captions: str | Path | None = None, name: str | None = None,
                 progress: bool = False) -> RawDataset:
    """KuaiRec's big matrix (`user_id,video_id,...,timestamp,...`; from KuaiRec.zip, or the unzipped
    big_matrix.csv) with titles from kuairec_caption_category.csv (`captions`; default: the one in
    the zip). Each row is one interaction, whatever its watch ratio (the matrix's 12.5M, as in the
    paper's Table V); rows without a timestamp are dropped and counted; the timestamp's fraction of a
    second is dropped (ties keep the file's order). The matrix repeats some (user, video, timestamp)
    rows: kept here, dropped as exact repeats by `prepare` (DUPLICATES says how). Titles:
    formats.kuairec_titles, whose policy (caption, else cover text, else the video goes) is counted
    in the result's source["read"]."""
    matrix = Path(matrix)
    if not matrix.is_file():
        raise FileNotFoundError(f"{matrix} does not exist")
    zf = None
    if zipfile.is_zipfile(matrix):
        try:
            zf = zipfile.ZipFile(matrix)
        except zipfile.BadZipFile as err:
            raise DataFormatError(f"{matrix}: not a valid zip file: {err}") from None
    try:
        if zf is not None:
            member = _zip_member(matrix, zf, KUAIREC_MATRIX)
            if member is None:
                raise DataFormatError(f"{matrix}: holds no {KUAIREC_MATRIX} (is this KuaiRec.zip?)")
            shown = Path(f"{matrix}!{member}")
            opener = lambda: zf.open(member)  # noqa: E731
            if captions is None:
                cap_member = _zip_member(matrix, zf, KUAIREC_CAPTIONS)
                if cap_member is None:
                    raise DataFormatError(f"{matrix}: holds no {KUAIREC_CAPTIONS}; give the caption file of the same "
                                          "Zenodo record")
                captions_shown = Path(f"{matrix}!{cap_member}")
                titles, read = kuairec_titles(captions_shown, lambda: zf.open(cap_member))
        else:
            shown, opener = matrix, (lambda: open(matrix, "rb"))
            if captions is None:
                captions = matrix.parent / KUAIREC_CAPTIONS
        if captions is not None:
            captions_shown = Path(captions)
            if not captions_shown.is_file():
                raise FileNotFoundError(f"{captions_shown} does not exist (KuaiRec's captions, the titles)")
            titles, read = kuairec_titles(captions_shown, lambda: open(captions_shown, "rb"))
        try:
            cols = _read_csv(shown, opener, names=None, want={"user": "user_id", "item": "video_id", "timestamp": "timestamp"},
                             types={"user_id": pa.string(), "video_id": pa.string(), "timestamp": pa.float64()})
        except (zipfile.BadZipFile, EOFError, OSError) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise DataFormatError(f"{shown}: cannot read it to the end ({err}): a corrupt download?") from None
        loc = _RowLocator(shown, _nth_data_line(opener, header=True))
        ts = cols["timestamp"]
        missing = ts.is_null()
        n_missing = pc.sum(missing).as_py() or 0
        read["rows"] = len(ts)
        read["rows_without_timestamp"] = n_missing
        users, items = cols["user"], cols["item"]
        if n_missing:
            keep = np.flatnonzero(~missing.to_numpy(zero_copy_only=False))
            users, items, ts = users.take(pa.array(keep)), items.take(pa.array(keep)), ts.take(pa.array(keep))
            base = loc._line_of
            loc = _RowLocator(shown, lambda row: base(int(keep[row])))
            log.info("%s: %d rows without a timestamp dropped", shown, n_missing)
        seconds = np.floor(check_floats(ts, "timestamp", loc)).astype(np.int64)
        return _finish(name or "kuairec", "kuairec", users=users, items=items, timestamps=seconds, loc=loc, titles=titles,
                       items_path=captions_shown, source={"interactions": str(shown), "items": str(captions_shown)}, read=read)
    finally:
        if zf is not None:
            zf.close()


# --------------------------------------------------------------------------------------------
# A fetched cache entry -> RawDataset, parsed once


READERS = {
    "amazon-2018": lambda files, name, progress: read_amazon(files[0], files[1], name=name, progress=progress),
    "steam": lambda files, name, progress: read_steam(files[0], files[1], name=name, progress=progress),
    "kuairec": lambda files, name, progress: read_kuairec(files[0], files[1], name=name, progress=progress),
}


PARSED = "parsed"


def load_fetched(name: str, folder: Path, meta: dict, progress: bool = True) -> RawDataset:
    """The RawDataset of a fetched entry (delrec.data.acquisition.fetch): from `folder/parsed/` when it was made
    from the same files (by sha256) by this parser version; else read from the native files, whose
    sha256 must still be the one recorded at the fetch, and kept in `parsed/` for the next time."""
    src = REMOTE[name]
    key = {"parser": PARSER_VERSION, "files": {f: rec["sha256"] for f, rec in meta["files"].items()}}
    cached = _read_parsed(folder / PARSED, key)
    if cached is not None:
        inter, items, source = cached
        return RawDataset(name=name, interactions=inter, items=items, source={**source, "fetched": meta})
    for f in src.files:  # what is parsed is what was fetched (the parse reads every byte anyway)
        check(folder / f.name, str(folder / f.name), sha256=meta["files"][f.name]["sha256"],
              sha256_source="the sha256 source.json recorded at the fetch")
    log.info("reading %s from its native files in %s (once: the result is kept in %s/)", name, folder, PARSED)
    ds = READERS[src.format]([folder / f.name for f in src.files], name, progress)
    try:
        with entry_lock(folder / PARSED, log), atomic_dir(folder / PARSED) as tmp:
            write_parquet(tmp / "interactions.parquet", ds.interactions)
            write_parquet(tmp / "items.parquet", ds.items)
            (tmp / "parsed.json").write_text(json.dumps({**key, "source": ds.source}, indent=2) + "\n")
    except OSError as err:  # a read-only shared cache: parse again next time
        log.warning("cannot keep the parsed %s in %s (%s); it will be read from the native files again", name, folder, err)
    ds.source["fetched"] = meta
    return ds


def _read_parsed(parsed: Path, key: dict) -> tuple[pd.DataFrame, pd.DataFrame, dict] | None:
    try:
        meta = json.loads((parsed / "parsed.json").read_text())
        if {k: meta.get(k) for k in key} != key:
            return None
        inter = pq.read_table(parsed / "interactions.parquet").to_pandas()
        items = pq.read_table(parsed / "items.parquet").to_pandas()
    except (OSError, ValueError, pa.ArrowException):
        return None
    if list(inter.columns) != ["user", "item", "timestamp"] or list(items.columns) != ["item", "title"]:
        return None
    return inter, items, meta["source"]
