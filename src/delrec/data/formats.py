"""Parsers of the publishers' native files (delrec.data.acquisition.sources); delrec.data.loaders builds the
`RawDataset` of each data set from what they return.

* Amazon Review Data (2018): the ratings-only CSV (`item,user,rating,timestamp`, no header; every
  rating is one implicit interaction) and the metadata, gzip JSON lines with `asin` and `title`.
  The 2014 release writes its metadata as Python-literal lines (`{'asin': ...}`): those are read
  with `ast.literal_eval`, which builds only literals and never runs code; `eval` is never used.
* Steam (Kang & McAuley 2018): `steam_reviews.json.gz` (user = `username`, item = `product_id`,
  time = `date`, a day) and `steam_games.json.gz` (`id`, `title`, else `app_name`), both
  Python-literal lines.
* KuaiRec 2.0: `big_matrix.csv` (read straight out of KuaiRec.zip, or unzipped) and
  `kuairec_caption_category.csv`; the caption is the title, the cover text where the caption is
  no title (missing, without a letter or digit, or only @mentions: `caption_title`).

Large files are streamed: CSVs through pyarrow's block reader, JSON lines one line at a time.
Titles are cleaned for prompts (HTML entities unescaped, tags removed, whitespace collapsed, the
metadata's page-script debris dropped) but never shortened; a title needs a letter or a digit.
Records that lack an id or a usable title are counted, with the first line of each kind;
malformed files fail with the file and line.
"""

from __future__ import annotations

import ast
import csv
import datetime as dt
import gzip
import io
import json
import re
import zipfile
from array import array
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
from tqdm import tqdm

from delrec.data.titles import MISSING, NO_WORD, ONLY_MENTIONS, caption_title, clean_source_title


class DataFormatError(ValueError):
    """Input data is malformed; the message names the file and, where it applies, the line."""


PARSER_VERSION = 2  # bump when a reader's output changes: cached `parsed/` folders are then read again
# 2: KuaiRec captions read with bare CRs inside fields; titles need a letter or digit; caption policy
MAX_LINE_BYTES = 64 << 20  # a JSON line longer than this is not a record of these files
LONG_TITLE = 100  # characters; counted in the statistics (a prompt template may cut such titles)

# --------------------------------------------------------------------------------------------
# Streams


@contextmanager
def _open_binary(path: Path) -> Iterator[IO[bytes]]:
    """The file's bytes, gunzipped when it is gzip (by its magic number, whatever its name)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    with open(path, "rb") as raw:
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        if gzipped:
            with gzip.GzipFile(fileobj=raw) as f:
                yield f
        else:
            yield raw


def _progress(iterable, what: str, enabled: bool):
    return tqdm(iterable, desc=what, unit=" lines", unit_scale=True, disable=None if enabled else True, leave=False)


def _parse_record(text: str, prefer_json: bool):
    """A JSON object, or a Python literal (the 2014 Amazon metadata, the Steam files). The other
    syntax is tried when the preferred one fails; neither can run code."""
    first, second = (json.loads, ast.literal_eval) if prefer_json else (ast.literal_eval, json.loads)
    try:
        return first(text), prefer_json
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    try:
        return second(text), not prefer_json
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as err:
        raise ValueError(f"neither JSON nor a Python literal ({type(err).__name__}: {err})") from None


def iter_records(path: str | Path, progress: bool = False, what: str | None = None) -> Iterator[tuple[int, dict]]:
    """(line number, record) for every non-empty line of a JSON-lines or Python-literal-lines
    file, gzip or not. A line that is neither, or not one {...} record, fails naming the line."""
    path = Path(path)
    prefer_json = True
    with _open_binary(path) as f:
        try:
            for lineno, raw in enumerate(_progress(f, what or path.name, progress), start=1):
                if len(raw) > MAX_LINE_BYTES:
                    raise DataFormatError(f"{path}: line {lineno}: {len(raw)} bytes on one line: not a record of this file")
                raw = raw.strip()
                if not raw:
                    continue
                try:
                    text = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise DataFormatError(f"{path}: line {lineno}: not valid utf-8 text ({err.reason} at byte {err.start})") from None
                try:
                    record, prefer_json = _parse_record(text, prefer_json)
                except ValueError as err:
                    raise DataFormatError(f"{path}: line {lineno}: {err}") from None
                if not isinstance(record, dict):
                    raise DataFormatError(f"{path}: line {lineno}: expected one record {{...}} per line, found a "
                                          f"{type(record).__name__}")
                yield lineno, record
        except (OSError, EOFError, zipfile.BadZipFile) as err:
            if isinstance(err, FileNotFoundError):
                raise
            raise DataFormatError(f"{path}: cannot read it to the end ({err}): a truncated or corrupt download? "
                                  f"Fetch it again (`delrec data fetch ... --force`)") from None


class _Columns:
    """user / item strings, timestamps and source lines collected record by record, in Arrow
    chunks (a Python list of 7.8M strings would hold gigabytes)."""

    CHUNK = 1 << 20

    def __init__(self):
        self.users: list[str] = []
        self.items: list[str] = []
        self.times = array("q")
        self.lines = array("q")
        self._chunks: tuple[list, list] = ([], [])

    def add(self, user: str, item: str, time: int, line: int) -> None:
        self.users.append(user)
        self.items.append(item)
        self.times.append(time)
        self.lines.append(line)
        if len(self.users) >= self.CHUNK:
            self._flush()

    def _flush(self) -> None:
        if self.users:
            self._chunks[0].append(pa.array(self.users, pa.string()))
            self._chunks[1].append(pa.array(self.items, pa.string()))
            self.users, self.items = [], []

    def columns(self) -> tuple[pa.ChunkedArray, pa.ChunkedArray, np.ndarray, np.ndarray]:
        self._flush()
        users = pa.chunked_array(self._chunks[0], pa.string())
        items = pa.chunked_array(self._chunks[1], pa.string())
        return users, items, np.frombuffer(self.times, dtype=np.int64), np.frombuffer(self.lines, dtype=np.int64)


def _nth_data_line(opener: Callable[[], IO[bytes]], header: bool) -> Callable[[int], int]:
    """line_of(row) for a quote-less text file: the file is scanned only when it is called."""

    def line_of(row: int) -> int:
        seen = -1 if header else 0
        with opener() as f:
            for lineno, line in enumerate(f, start=1):
                if line.strip():
                    if seen == row:
                        return lineno
                    seen += 1
        return -1

    return line_of


# --------------------------------------------------------------------------------------------
# CSV files, streamed through pyarrow


def _read_csv(path: Path, opener: Callable[[], IO[bytes]], *, names: list[str] | None, want: dict[str, str],
              types: dict[str, pa.DataType]) -> dict[str, pa.ChunkedArray]:
    """Columns `want` ({canonical: column}) of a CSV file, read block by block; `names`: the
    column names of a file without a header row. Errors name the line."""
    header = names is None
    read_options = pcsv.ReadOptions(column_names=names, block_size=16 << 20)
    convert = pcsv.ConvertOptions(column_types=types, include_columns=list(dict.fromkeys(want.values())),
                                  strings_can_be_null=False)
    with opener() as f:
        try:
            reader = pcsv.open_csv(f, read_options=read_options, convert_options=convert)
        except pa.ArrowInvalid as err:
            if "Empty CSV file" in str(err):
                raise DataFormatError(f"{path}: file is empty") from None
            if header and "include_columns" in str(err):
                cols = _csv_header(opener)
                missing = [c for c in want.values() if c not in cols]
                raise DataFormatError(f"{path}: line 1: missing column(s) {', '.join(missing)} (columns: {', '.join(cols)})") from None
            _scan_csv_fields(path, opener, len(names) if names else len(_csv_header(opener)), header)
            raise DataFormatError(f"{path}: cannot parse: {err}") from None
        batches = []
        try:
            for batch in reader:  # block by block: the next block is parsed while this one is kept
                batches.append(batch)
        except pa.ArrowInvalid as err:
            _scan_csv_fields(path, opener, len(names) if names else len(_csv_header(opener)), header)
            raise DataFormatError(f"{path}: cannot parse: {err}") from None
        schema = reader.schema
    table = pa.Table.from_batches(batches, schema=schema)
    if table.num_rows == 0:
        raise DataFormatError(f"{path}: no data rows" + (" after the header" if header else ""))
    return {k: table[c] for k, c in want.items()}


def _csv_header(opener: Callable[[], IO[bytes]]) -> list[str]:
    with opener() as f:
        first = f.readline().decode("utf-8-sig", errors="replace").strip()
    return next(csv.reader([first]), [])


def _scan_csv_fields(path: Path, opener: Callable[[], IO[bytes]], n_fields: int, header: bool) -> None:
    """Slow path, after the fast parser failed: raise for the first line with the wrong field count."""
    with opener() as f:
        text = io.TextIOWrapper(f, encoding="utf-8", errors="strict", newline="")
        reader = csv.reader(text)
        prev = 0
        try:
            for record in reader:
                if record and not (header and prev == 0) and len(record) != n_fields:
                    raise DataFormatError(f"{path}: line {prev + 1}: expected {n_fields} comma-separated fields, "
                                          f"found {len(record)}")
                prev = reader.line_num
        except UnicodeDecodeError as err:
            raise DataFormatError(f"{path}: after line {prev}: not valid utf-8 text ({err.reason})") from None


def _note_skip(counts: Counter, first: dict, reason: str, where: str) -> None:
    counts[reason] += 1
    first.setdefault(reason, where)


def _skips(counts: Counter, first: dict) -> dict:
    return {reason: {"records": n, "first": first[reason]} for reason, n in sorted(counts.items())}


# --------------------------------------------------------------------------------------------
# Amazon Review Data (2018)

AMAZON_RATING_COLUMNS = ["item", "user", "rating", "timestamp"]  # the 2018 CSVs' order; no header row


def amazon_titles(metadata: Path, progress: bool = False) -> tuple[dict[str, str], dict]:
    """{asin: title} of the metadata file: the first usable title of each asin (the 2018 files
    repeat some products); records without an asin or a usable title are counted."""
    return _first_titles(metadata, progress, "asin", repeated_stat="metadata_repeated_asins",
                         id_of=lambda rec: rec["asin"].strip() if isinstance(rec.get("asin"), str) else "",  # strings only
                         title_of=lambda rec: clean_source_title(rec.get("title")))


def _first_titles(path: Path, progress: bool, id_name: str, id_of: Callable[[dict], str], title_of: Callable[[dict], str],
                  repeated_stat: str) -> tuple[dict[str, str], dict]:
    """{id: title} of a metadata file of records (iter_records): the first usable title of each
    id; records without an id (`id_of` gives "") or a usable title are counted, repeated ids in
    `repeated_stat`."""
    titles: dict[str, str] = {}
    counts, first = Counter(), {}
    records = 0
    for lineno, rec in iter_records(path, progress, path.name):
        records += 1
        item = id_of(rec)
        if not item:
            _note_skip(counts, first, f"no {id_name}", f"line {lineno}")
            continue
        if item in titles:
            counts["repeated"] += 1
            continue
        title = title_of(rec)
        if not title:
            _note_skip(counts, first, "no usable title", f"line {lineno}")
            continue
        titles[item] = title
    repeated = counts.pop("repeated", 0)
    return titles, {"metadata_records": records, "metadata_skipped": _skips(counts, first), repeated_stat: repeated}


# --------------------------------------------------------------------------------------------
# Steam (Kang & McAuley 2018)

EPOCH = dt.date(1970, 1, 1)

def steam_titles(games: Path, progress: bool = False) -> tuple[dict[str, str], dict]:
    """{id: title} of steam_games.json.gz: `title`, else `app_name`; records without an id are counted."""
    return _first_titles(games, progress, "id", repeated_stat="metadata_repeated_ids",
                         id_of=lambda rec: str(rec["id"]).strip() if rec.get("id") is not None else "",
                         title_of=lambda rec: clean_source_title(rec.get("title")) or clean_source_title(rec.get("app_name")))


# --------------------------------------------------------------------------------------------
# KuaiRec 2.0

KUAIREC_MATRIX = "big_matrix.csv"
KUAIREC_CAPTIONS = "kuairec_caption_category.csv"


def _zip_member(archive: Path, zf: zipfile.ZipFile, file_name: str) -> str | None:
    """The member `.../data/<file_name>` (KuaiRec.zip holds "KuaiRec 2.0/data/...")."""
    hits = [n for n in zf.namelist() if n.rsplit("/", 1)[-1] == file_name and not n.startswith("__MACOSX")]
    if len(hits) > 1:
        raise DataFormatError(f"{archive}: {len(hits)} members named {file_name}: {hits}")
    return hits[0] if hits else None


# A carriage return not followed by a line feed. The publisher's caption file has such bare CRs
# inside captions, quoted and unquoted; Python's csv module and pyarrow both end a record there
# (four videos became eight half-rows, each "10 fields expected", and lost their titles).
_BARE_CR = re.compile(rb"\r(?!\n)")
NL = b"\n"


def kuairec_titles(path: Path, opener: Callable[[], IO[bytes]]) -> tuple[dict[str, str], dict]:
    """{video_id: title}: the caption (`caption_title`), else the cover text (`manual_cover_text`)
    by the same rule, else none: the video is left out and counted. Records end at a line feed
    only: a bare CR inside a field is whitespace of that field (read as a space, which titles
    collapse anyway). A record whose field count differs from the header's (an unquoted comma, a
    stray quote) is skipped and counted, once per record, as the publisher's own readers skip it."""
    with opener() as f:
        raw = f.read()
    raw = raw.removeprefix(b"\xef\xbb\xbf")
    if not raw.strip():
        raise DataFormatError(f"{path}: file is empty")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise DataFormatError(f"{path}: line {line}: not valid utf-8 text ({err.reason} at byte {err.start})") from None
    data = _BARE_CR.sub(b" ", raw)
    header = [h.strip() for h in next(csv.reader([data.split(b"\n", 1)[0].decode().rstrip("\r")]), [])]
    missing = [c for c in ("video_id", "caption") if c not in header]
    if missing:
        raise DataFormatError(f"{path}: line 1: missing column(s) {', '.join(missing)} (columns: {', '.join(header)})")
    wanted = ["video_id", "caption"] + (["manual_cover_text"] if "manual_cover_text" in header else [])
    bad: list[str] = []

    def skip(row) -> str:  # called in file order (one thread)
        bad.append(row.text)
        return "skip"

    try:
        table = pcsv.read_csv(
            pa.BufferReader(data),
            read_options=pcsv.ReadOptions(column_names=header, skip_rows=1, use_threads=False),
            parse_options=pcsv.ParseOptions(newlines_in_values=True, invalid_row_handler=skip),
            convert_options=pcsv.ConvertOptions(column_types={c: pa.string() for c in wanted}, include_columns=wanted,
                                                strings_can_be_null=False),
        )
    except pa.ArrowInvalid as err:
        raise DataFormatError(f"{path}: cannot parse: {err}") from None
    counts, first = Counter(), {}
    for text in bad:
        at = data.find(text.encode())  # where the record is, for the message only
        _note_skip(counts, first, f"{len(header)} fields expected",
                   f"line {data.count(NL, 0, at) + 1}" if at >= 0 else f"the record {text[:40]!r}")
    titles: dict[str, str] = {}
    no_caption = Counter()  # per video: why its caption is no title
    by_cover = 0
    repeated = 0
    cols = [table[c].to_pylist() for c in wanted]
    covers = cols[2] if len(cols) > 2 else [None] * table.num_rows
    for row, (vid, caption, cover) in enumerate(zip(cols[0], cols[1], covers)):
        vid = vid.strip()
        if not vid:
            _note_skip(counts, first, "no video_id", f"data row {row + 1}")
            continue
        if vid in titles:
            repeated += 1
            continue
        title, why = caption_title(caption)
        if why is not None:
            no_caption[why] += 1
            title, _ = caption_title(cover)
            by_cover += bool(title)
        if not title:
            _note_skip(counts, first, "no usable caption or cover text", f"video_id {vid}")
            continue
        titles[vid] = title
    return titles, {"metadata_records": table.num_rows + len(bad), "metadata_skipped": _skips(counts, first),
                    "metadata_repeated_ids": repeated,
                    "captions_without_title": {k: no_caption[k] for k in (MISSING, NO_WORD, ONLY_MENTIONS)},
                    "titled_by_cover_text": by_cover}
