"""Loaders: every format to one canonical RawDataset; bad input named by file and line.

All data here is tiny and invented (tests/fixtures or written into tmp_path); the real ML-100K is
only read when it is already in the cache."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from delrec.data.acquisition import fetch
from delrec.data.loaders import (
    DataFormatError,
    load_dataset,
    load_generic,
    load_grouplens_1m,
    load_grouplens_100k,
    load_recbole_atomic,
)
from delrec.data.raw import RawDataset
from delrec.data.titles import normalize_title

FIXTURES = Path(__file__).parent / "fixtures"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"


def write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def atomic(tmp_path: Path, inter_rows: str, item_rows: str, name: str = "d") -> tuple[Path, Path]:
    return (
        write(tmp_path / f"{name}.inter", INTER_HEADER + inter_rows),
        write(tmp_path / f"{name}.item", ITEM_HEADER + item_rows),
    )


def assert_canonical(ds: RawDataset) -> None:
    assert list(ds.interactions.columns) == ["user", "item", "timestamp"]
    assert list(ds.items.columns) == ["item", "title"]
    assert ds.interactions["timestamp"].dtype == np.int64
    assert all(isinstance(v, str) for v in ds.interactions["user"].head(50))
    assert all(isinstance(v, str) for v in ds.interactions["item"].head(50))
    assert ds.items["item"].is_unique
    assert ds.interactions["item"].isin(ds.items["item"]).all()
    assert isinstance(ds.interactions.index, pd.RangeIndex)
    json.dumps(ds.source)  # provenance must be writable as JSON


# --------------------------------------------------------------------------------------------
# Titles


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Usual Suspects, The (1995)", "The Usual Suspects (1995)"),
        (
            "City of Lost Children, The (Cité des enfants perdus, La) (1995)",
            "The City of Lost Children (Cité des enfants perdus, La) (1995)",
        ),
        ("Appartement, L' (1996)", "L'Appartement (1996)"),
        ("Enfer, L'", "L'Enfer"),
        ("Bug's Life, A (1998)", "A Bug's Life (1998)"),
        ("American Werewolf in London, An (1981)", "An American Werewolf in London (1981)"),
        ("Misérables, Les (1995)", "Les Misérables (1995)"),
        ("Postino, Il (The Postman) (1994)", "Il Postino (The Postman) (1994)"),
        ("Boot, Das (1981)", "Das Boot (1981)"),
        ("Mariachi, El (1992)", "El Mariachi (1992)"),
        ("Good, The Bad and The Ugly, The (1966)", "The Good, The Bad and The Ugly (1966)"),
        ("Nightmare on Elm Street 3: Dream Warriors, A (1987)", "A Nightmare on Elm Street 3: Dream Warriors (1987)"),
        # unchanged: no trailing article in the main title
        ("Face/Off (1997)", "Face/Off (1997)"),
        ("M*A*S*H (1970)", "M*A*S*H (1970)"),
        ("Seven (Se7en) (1995)", "Seven (Se7en) (1995)"),
        ("Toy Story", "Toy Story"),
        ("Cry, the Beloved Country (1995)", "Cry, the Beloved Country (1995)"),
        ("I Love You, I Love You Not (1996)", "I Love You, I Love You Not (1996)"),
        ("Honey, I Shrunk the Kids (1989)", "Honey, I Shrunk the Kids (1989)"),
        ("Maybe, Maybe Not (Bewegte Mann, Der) (1994)", "Maybe, Maybe Not (Bewegte Mann, Der) (1994)"),
        ("Black Sabbath (Tre Volti Della Paura, I) (1963)", "Black Sabbath (Tre Volti Della Paura, I) (1963)"),
        ("(500) Days of Summer (2009)", "(500) Days of Summer (2009)"),
        ('"Great Performances" Cats (1998)', '"Great Performances" Cats (1998)'),
        # whitespace is collapsed and stripped
        ("  White Balloon,  The   (Badkonake Sefid ) (1995) ", "The White Balloon (Badkonake Sefid ) (1995)"),
        ("", ""),
    ],
)
def test_normalize_title(raw, expected):
    assert normalize_title(raw) == expected
    assert normalize_title(expected) == expected  # idempotent


# --------------------------------------------------------------------------------------------
# Formats


def test_recbole_atomic_fixture_keeps_source_order_and_adds_years():
    folder = FIXTURES / "tiny-atomic"
    ds = load_recbole_atomic(folder / "tiny.inter", folder / "tiny.item")
    assert_canonical(ds)
    assert ds.name == "tiny" and ds.source["format"] == "recbole-atomic"
    raw = pd.read_csv(folder / "tiny.inter", sep="\t", dtype=str)
    assert ds.interactions["user"].tolist() == raw.iloc[:, 0].tolist()  # file order, not sorted
    assert ds.interactions["item"].tolist() == raw.iloc[:, 1].tolist()
    assert ds.interactions["timestamp"].tolist() == raw.iloc[:, 3].astype(int).tolist()
    titles = dict(zip(ds.items["item"], ds.items["title"]))
    assert titles["1"] == "The Usual Suspects (1995)"
    assert titles["5"] == "The City of Lost Children (Cité des enfants perdus, La) (1995)"
    assert titles["6"] == "L'Appartement (1996)"
    assert titles["3"] == "Face/Off (1997)"
    assert len(ds.interactions) == 84 and ds.interactions["user"].nunique() == 12 and len(ds.items) == 10


def test_recbole_atomic_year_column_variants(tmp_path):
    inter, item = atomic(
        tmp_path,
        "1\t10\t5\t100\n1\t11\t5\t101\n1\t12\t5\t102\n",
        "10\tunknown\tunknown\tx\n"  # ML-100K's placeholder item: no year to add
        "11\tLand Before Time III (1995)\tV\tx\n"  # ML-100K: year column holds junk, title has it
        "12\tStar Maker, The\t1995.0\tx\n",  # RecBole float years
    )
    ds = load_recbole_atomic(inter, item)
    assert ds.items["title"].tolist() == ["unknown", "Land Before Time III (1995)", "The Star Maker (1995)"]


def test_recbole_atomic_ml1m_variant_crlf_and_titles_as_ids(tmp_path):
    inter = write(
        tmp_path / "m.inter",
        INTER_HEADER + "1m_1\tUsual Suspects, The (1995)\t5\t978300760\n"
        '1m_2\t"Great Performances" Cats (1998)\t3\t978302109\n'
        "1m_1\tToy Story (1995)\t4\t978300760\n",
        newline="\r\n",
    )
    item = write(
        tmp_path / "m.item",
        "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token\n"
        "Toy Story (1995)\tToy Story\t1995\tAnimation\n"
        "Usual Suspects, The (1995)\tUsual Suspects, The\t1995\tCrime\n"
        '"Great Performances" Cats (1998)\t"Great Performances" Cats\t1998\tMusical\n',
        newline="\r\n",
    )
    ds = load_recbole_atomic(inter, item, name="ml-1m-mini")
    assert_canonical(ds)
    assert ds.interactions.values.tolist() == [
        ["1m_1", "Usual Suspects, The (1995)", 978300760],
        ["1m_2", '"Great Performances" Cats (1998)', 978302109],
        ["1m_1", "Toy Story (1995)", 978300760],
    ]
    # ids stay as written (no '\r' left over); titles are normalised with the year put back
    assert ds.items["item"].tolist() == ["Toy Story (1995)", "Usual Suspects, The (1995)", '"Great Performances" Cats (1998)']
    assert ds.items["title"].tolist() == ["Toy Story (1995)", "The Usual Suspects (1995)", '"Great Performances" Cats (1998)']


def test_recbole_atomic_field_order_and_title_field(tmp_path):
    inter = write(tmp_path / "x.inter", "timestamp:float\titem_id:token\tuser_id:token\n5\ta\tu\n")
    item = write(tmp_path / "x.item", "title:token_seq\titem_id:token\nA Film\ta\n")
    ds = load_recbole_atomic(inter, item)
    assert ds.interactions.values.tolist() == [["u", "a", 5]]
    assert ds.items.values.tolist() == [["a", "A Film"]]


def test_grouplens_100k(tmp_path):
    write(tmp_path / "ml-100k" / "u.data", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t302\t1\t881250949\n")
    flags = "|".join(["0"] * 19)
    write(
        tmp_path / "ml-100k" / "u.item",
        f"242|Misérables, Les (1995)|01-Jan-1995||http://x|{flags}\n302|L.A. Confidential (1997)|01-Jan-1997||http://y|{flags}\n",
        encoding="latin-1",
    )
    ds = load_grouplens_100k(tmp_path / "ml-100k")
    assert_canonical(ds)
    assert ds.name == "ml-100k" and ds.source["format"] == "grouplens-100k"
    assert ds.interactions.values.tolist() == [["196", "242", 881250949], ["186", "302", 891717742], ["196", "302", 881250949]]
    assert ds.items["title"].tolist() == ["Les Misérables (1995)", "L.A. Confidential (1997)"]
    assert load_dataset(tmp_path / "ml-100k").interactions.equals(ds.interactions)


def test_grouplens_1m(tmp_path):
    write(tmp_path / "ml-1m" / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    write(
        tmp_path / "ml-1m" / "movies.dat",
        "661::James and the Giant Peach (1996)::Animation|Children's|Musical\n"
        "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
        "2::Cérémonie, La (1995)::Drama\n",
        encoding="latin-1",
    )
    ds = load_grouplens_1m(tmp_path / "ml-1m")
    assert_canonical(ds)
    assert ds.interactions["item"].tolist() == ["1193", "661", "1193"]
    assert ds.items["title"].tolist()[2] == "La Cérémonie (1995)"
    assert load_dataset(str(tmp_path / "ml-1m")).source["format"] == "grouplens-1m"


def test_generic_csv_integer_and_iso_timestamps(tmp_path):
    write(tmp_path / "a" / "interactions.csv", "user,item,timestamp,extra\nu1,007,100,x\nu2,i2,50,y\nu1,i2,100,z\n")
    write(tmp_path / "a" / "items.csv", 'item,title\n007,"Bond, James, The (1962)"\ni2,Plain\n')
    ds = load_dataset(tmp_path / "a")
    assert_canonical(ds)
    assert ds.interactions.values.tolist() == [["u1", "007", 100], ["u2", "i2", 50], ["u1", "i2", 100]]  # "007" stays a string
    assert ds.items["title"].tolist() == ["The Bond, James (1962)", "Plain"]

    write(
        tmp_path / "b" / "events.csv",
        "uid,pid,when\nu1,p1,2020-01-01T00:00:00Z\nu1,p2,2020-01-01 00:00:10\nu2,p1,2020-01-01T02:00:00+02:00\n",
    )
    write(tmp_path / "b" / "products.csv", "pid,name\np1,One\np2,Two\n")
    ds = load_generic(tmp_path / "b" / "events.csv", tmp_path / "b" / "products.csv", user_col="uid", item_col="pid", time_col="when", title_col="name")
    assert ds.interactions["timestamp"].tolist() == [1577836800, 1577836810, 1577836800]  # naive = UTC; offsets honoured


def test_generic_parquet(tmp_path):
    folder = tmp_path / "steamish"
    folder.mkdir()
    pd.DataFrame(
        {
            "user": [3, 1, 3],
            "item": [10, 20, 20],
            "timestamp": pd.to_datetime(["2021-05-01 12:00:00", "2021-05-01 12:00:01", "2021-05-01 11:59:59"]),
        }
    ).to_parquet(folder / "interactions.parquet")
    pd.DataFrame({"item": [10, 20], "title": ["Portal 2", "Half-Life"]}).to_parquet(folder / "items.parquet")
    ds = load_dataset(folder)
    assert_canonical(ds)
    assert ds.name == "steamish" and ds.source["format"] == "generic"
    assert ds.interactions["user"].tolist() == ["3", "1", "3"] and ds.interactions["item"].tolist() == ["10", "20", "20"]
    assert ds.interactions["timestamp"].tolist() == [1619870400, 1619870401, 1619870399]


def test_load_dataset_by_name_reads_the_cache_offline(tmp_path, monkeypatch):
    """A registered name goes through fetch_dataset; a complete cache needs no network."""
    folder = tmp_path / "datasets" / "ml-100k"
    atomic(folder, "1\t10\t5\t100\n", "10\tUsual Suspects, The\t1995\tCrime\n", name="ml-100k")
    (folder / "source.json").write_text(json.dumps({"sha256": fetch.DATASETS["ml-100k"].sha256}))

    def no_pip(*args, **kwargs):
        raise AssertionError("no download expected")

    monkeypatch.setattr(subprocess, "run", no_pip)
    ds = load_dataset("ml-100k", cache_dir=tmp_path)
    assert ds.name == "ml-100k" and ds.items["title"].tolist() == ["The Usual Suspects (1995)"]
    assert ds.source["fetched"]["sha256"] == fetch.DATASETS["ml-100k"].sha256


def test_load_dataset_rejects_unknown_specs(tmp_path):
    with pytest.raises(ValueError, match="ml-100k.*u.data.*ratings.dat.*inter.*interactions"):
        load_dataset("no-such-thing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="cannot load"):
        load_dataset(tmp_path / "empty")
    atomic(tmp_path / "two", "1\t10\t5\t100\n", "10\tX\t1995\tx\n", name="a")
    atomic(tmp_path / "two", "1\t10\t5\t100\n", "10\tX\t1995\tx\n", name="b")
    with pytest.raises(ValueError, match="exactly one .inter"):
        load_dataset(tmp_path / "two")


# --------------------------------------------------------------------------------------------
# Malformed input: the message names the file and the 1-based line


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(DataFormatError) as err:
        fn(*args, **kwargs)
    return str(err.value)


GOOD_ITEMS = "10\tA\t1995\tx\n11\tB\t1996\tx\n"


@pytest.mark.parametrize(
    "rows, line, what",
    [
        ("1\t10\t5\t100\n1\t11\t5\n", 3, "expected 4 fields separated by TAB, found 3"),
        ("1\t10\t5\t100\n1\t11\t5\t100\t9\n", 3, "found 5"),
        ("1\t10\t5\t100\n1\t11\t5\tyesterday\n", 3, "'yesterday' is not an integer"),
        ("1\t10\t5\t100\n1\t11\t5\t100.5\n", 3, "not an integer"),
        ("1\t10\t5\t100\n\t11\t5\t100\n", 3, "empty user id"),
        ("1\t10\t5\t100\n1\t \t5\t100\n", 3, "empty item id"),
        ("1\t10\t5\t100\n1\t99\t5\t100\n", 3, "item '99' is not in the items file"),
        # blank lines are skipped but still counted
        ("1\t10\t5\t100\n\n\n1\t11\t5\tnope\n", 5, "not an integer"),
    ],
)
def test_malformed_interactions(tmp_path, rows, line, what):
    inter, item = atomic(tmp_path, rows, GOOD_ITEMS, name="bad")
    msg = _error(load_recbole_atomic, inter, item)
    assert str(inter) in msg and f"line {line}:" in msg and what in msg


@pytest.mark.parametrize(
    "rows, line, what",
    [
        ("10\tA\t1995\tx\n11\t \t1996\tx\n", 3, "empty title for item '11'"),
        ("10\tA\t1995\tx\n10\tB\t1996\tx\n", 3, "duplicate item id '10' (first defined at line 2)"),
        ("10\tA\t1995\tx\n11\tB\t1996\n", 3, "found 3"),
        ("\tA\t1995\tx\n11\tB\t1996\tx\n", 2, "empty item id"),
    ],
)
def test_malformed_items(tmp_path, rows, line, what):
    inter, item = atomic(tmp_path, "1\t10\t5\t100\n", rows, name="bad")
    msg = _error(load_recbole_atomic, inter, item)
    assert str(item) in msg and f"line {line}:" in msg and what in msg


def test_malformed_large_file_reports_the_right_line(tmp_path):
    rows = "".join(f"u{i % 97}\t10\t5\t{1000 + i}\n" for i in range(50_000))
    rows += "u1\t10\t5\t12x\n"
    inter, item = atomic(tmp_path, rows, GOOD_ITEMS, name="big")
    assert "line 50002:" in _error(load_recbole_atomic, inter, item)


def test_empty_and_header_only_files(tmp_path):
    inter = write(tmp_path / "e.inter", "")
    item = write(tmp_path / "e.item", ITEM_HEADER + GOOD_ITEMS)
    assert "e.inter: file is empty" in _error(load_recbole_atomic, inter, item)
    write(tmp_path / "e.inter", INTER_HEADER)
    assert "no data rows after the header" in _error(load_recbole_atomic, inter, item)
    write(tmp_path / "e.inter", INTER_HEADER + "1\t10\t5\t100\n")
    write(tmp_path / "e.item", ITEM_HEADER)
    assert "e.item: no data rows" in _error(load_recbole_atomic, inter, item)


def test_atomic_header_problems(tmp_path):
    inter = write(tmp_path / "h.inter", "user_id:token\titem_id:token\n1\t10\n")
    item = write(tmp_path / "h.item", ITEM_HEADER + GOOD_ITEMS)
    msg = _error(load_recbole_atomic, inter, item)
    assert "h.inter: line 1:" in msg and "timestamp" in msg
    write(tmp_path / "h.inter", "user\titem\ttimestamp\n1\t10\t5\n")
    assert "not a RecBole atomic header" in _error(load_recbole_atomic, inter, item)


def test_grouplens_errors_name_file_and_line(tmp_path):
    folder = tmp_path / "gl"
    write(folder / "ratings.dat", "1::10::5::100\n1::10::5::100::7\n")
    write(folder / "movies.dat", "10::A (1995)::Drama\n")
    msg = _error(load_grouplens_1m, folder)
    assert "ratings.dat: line 2: expected 4 fields separated by '::', found 5" in msg
    write(folder / "u.data", "1\t10\t5\t100\n")
    write(folder / "u.item", "10|A (1995)|x\n11||x\n", encoding="latin-1")
    msg = _error(load_grouplens_100k, folder)
    assert "u.item: line 2: empty title" in msg


def test_utf8_errors_name_the_line(tmp_path):
    inter, _ = atomic(tmp_path, "1\t10\t5\t100\n", GOOD_ITEMS, name="enc")
    item = tmp_path / "enc.item"
    item.write_bytes(ITEM_HEADER.encode() + b"10\tA\t1995\tx\n11\tMis\xe9rables\t1995\tx\n")
    msg = _error(load_recbole_atomic, inter, item)
    assert "enc.item: line 3: not valid utf-8" in msg


def test_generic_csv_errors(tmp_path):
    items = write(tmp_path / "items.csv", "item,title\na,A\nb,B\n")
    # a quoted title spanning two lines must not shift the reported line
    items_multiline = write(tmp_path / "items2.csv", 'item,title\na,"Two\nlines"\nb,\n')
    inter = write(tmp_path / "interactions.csv", "user,item,timestamp\nu,a,1\nu,b,2020-13-45\n")
    msg = _error(load_generic, inter, items)
    assert "interactions.csv: line 3:" in msg and "'2020-13-45' is neither an integer nor an ISO 8601 date-time" in msg
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu,a,1\nu,b,2\n")
    msg = _error(load_generic, inter, items_multiline)
    assert "items2.csv: line 4: empty title for item 'b'" in msg
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu,a,1\nu,b,2,9\n")
    assert "interactions.csv: line 3: expected 3 fields, found 4" in _error(load_generic, inter, items)
    write(tmp_path / "interactions.csv", "user,item,time\nu,a,1\n")
    msg = _error(load_generic, inter, items)
    assert "missing column(s) 'timestamp'" in msg and "user, item, time" in msg
    write(tmp_path / "interactions.csv", "user,item,timestamp\nu,a,1\n,b,2\n")
    assert "interactions.csv: line 3: empty user id" in _error(load_generic, inter, items)


def test_generic_parquet_errors_name_the_row(tmp_path):
    pd.DataFrame({"user": ["u", None], "item": ["a", "a"], "timestamp": [1, 2]}).to_parquet(tmp_path / "i.parquet")
    pd.DataFrame({"item": ["a"], "title": ["A"]}).to_parquet(tmp_path / "t.parquet")
    msg = _error(load_generic, tmp_path / "i.parquet", tmp_path / "t.parquet")
    assert "i.parquet: row 2: empty user id" in msg
    pd.DataFrame({"user": ["u", "v"], "item": ["a", "a"], "timestamp": [1.0, 2.5]}).to_parquet(tmp_path / "i.parquet")
    assert "i.parquet: row 2: timestamp 2.5 is not an integer" in _error(load_generic, tmp_path / "i.parquet", tmp_path / "t.parquet")


# --------------------------------------------------------------------------------------------
# The real thing, only when it is already in the cache (never downloaded by the tests)


@pytest.mark.skipif(not fetch.is_fetched("ml-100k"), reason="ml-100k not in the cache ($DELREC_CACHE or ~/.cache/delrec)")
def test_real_ml100k():
    ds = load_dataset("ml-100k")
    assert_canonical(ds)
    assert len(ds.interactions) == 100_000
    assert ds.interactions["user"].nunique() == 943
    assert len(ds.items) == 1682 and ds.interactions["item"].nunique() == 1682
    titles = dict(zip(ds.items["item"], ds.items["title"]))
    assert titles["12"] == "The Usual Suspects (1995)" and titles["1"] == "Toy Story (1995)"


def test_generic_refuses_mixed_timestamp_kinds(tmp_path):
    items = write(tmp_path / "items.csv", "item,title\na,A\n")
    inter = write(tmp_path / "interactions.csv", "user,item,timestamp\nu,a,2020-01-01\nu,a,2020-01-02\nu,a,1577836800\n")
    msg = _error(load_generic, inter, items)
    assert "line 4:" in msg and "mixes integers and date-times" in msg
