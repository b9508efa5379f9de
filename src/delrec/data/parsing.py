"""Reading delimited text and columns fast (pyarrow), with errors that name the file and the
1-based line (or row) of the first problem: scanned line by line only when something is wrong."""

from __future__ import annotations

import csv
import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from delrec.data.formats import (
    DataFormatError,
)

# --------------------------------------------------------------------------------------------
# Locating problems: row index -> "line N" (or "row N" for Parquet)

_INT64_BOUND = 2.0**63  # floats in [-2**63, 2**63) convert to int64 exactly


class Locator:
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


def read_bytes(path: Path) -> bytes:
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    raw = path.read_bytes()
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    return raw


def read_text_table(
    path: Path, raw: bytes, *, sep: str, header: bool, n_fields: int, columns: dict[str, int], encoding: str = "utf-8"
) -> tuple[dict[str, pa.ChunkedArray], Locator]:
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
    loc = Locator(path, lambda: _text_row_lines(raw, header))
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


def first_line(path: Path, raw: bytes, encoding: str = "utf-8") -> str:
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


def check_floats(col: pa.ChunkedArray, what: str, loc: Locator, shown: pa.ChunkedArray | None = None) -> np.ndarray:
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


def as_strings(col: pa.ChunkedArray, what: str, loc: Locator) -> pa.ChunkedArray:
    """Ids and titles as strings; integer-valued numbers (Parquet ids) without a trailing '.0'.
    A floating-point column may hold no NaN, infinity or value beyond the int64 range (the row is
    named): none of them is an id, and pyarrow's cast would fail naming no row."""
    t = col.type
    if pa.types.is_dictionary(t):
        col, t = col.cast(t.value_type), t.value_type
    if pa.types.is_floating(t):
        vals = check_floats(col, what, loc)
        finite = vals[~np.isnan(vals)]  # NaN here: the nulls (an empty id, refused by the caller)
        if np.all(finite == np.round(finite)):
            col = col.cast(pa.int64())  # nulls stay null
    if not pa.types.is_string(col.type):
        col = col.cast(pa.string())
    return col.fill_null("")


def require_nonempty(col: pa.ChunkedArray, what: str, loc: Locator) -> None:
    bad = _first_true(pc.equal(pc.utf8_trim_whitespace(col), ""))
    if bad is not None:
        raise loc.error(bad, f"empty {what}")


def to_unix_seconds(col: pa.ChunkedArray, loc: Locator, allow_datetime: bool) -> np.ndarray:
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
    col = as_strings(col, "timestamp", loc)
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


def _integral_floats(floats: pa.ChunkedArray, loc: Locator, shown: pa.ChunkedArray | None = None) -> np.ndarray:
    """Floating-point timestamps as int64: each must be finite, whole and within the int64 range
    (a cast of 1e30 would silently give -2**63 and put the interaction first)."""
    shown = floats if shown is None else shown
    vals = check_floats(floats, "timestamp", loc, shown)
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


def _parse_iso(col: pa.ChunkedArray, loc: Locator) -> pd.Series:
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


def read_columnar(path: Path, columns: dict[str, str]) -> tuple[dict[str, pa.ChunkedArray], Locator]:
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
        return {k: table[c] for k, c in columns.items()}, Locator(path)
    if suffix not in (".csv", ".tsv"):
        raise DataFormatError(f"{path}: unsupported file type {path.suffix!r} (use .csv, .tsv or .parquet)")
    raw = read_bytes(path)
    delim = "\t" if suffix == ".tsv" else ","
    header = next(csv.reader([first_line(path, raw)], delimiter=delim))
    _check_columns(path, header, columns)
    loc = Locator(path, lambda: _csv_row_lines(raw))
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


