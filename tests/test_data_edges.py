"""Data edge cases: numbers that are no ids or times, list offsets past int32, items sharing a
title, titles in other Unicode forms, and float settings that are no numbers."""

import datetime
import unicodedata

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from delrec.cli import main
from delrec.core.settings import check, parse_overrides
from delrec.data.loaders import DataFormatError, load_dataset, load_generic, load_recbole_atomic
from delrec.data.protocol import ProtocolConfig, _list_offsets, prepare
from delrec.data.store import RunData, write
from delrec.data.titles import base_title, clean_title, disambiguate_titles, title_key
from delrec.llm.templates import Templates
from delrec.serving.recommender import Recommender, RequestError

# --------------------------------------------------------------------------------------------
# Numeric columns: NaN, infinities, the int64 range; the file and row or line named


def _parquet(path, **columns):
    pq.write_table(pa.table(columns), path)


def _generic_parquet(tmp_path, item_ids, timestamps=(1, 2), catalogue=(1.0, 2.0)):
    _parquet(
        tmp_path / "interactions.parquet",
        user=pa.array(["u1", "u2"]),
        item=pa.array(item_ids, pa.float64(), from_pandas=False),
        timestamp=pa.array(timestamps),
    )
    _parquet(tmp_path / "items.parquet", item=pa.array(catalogue, pa.float64(), from_pandas=False), title=pa.array(["A", "B"]))
    return tmp_path / "interactions.parquet", tmp_path / "items.parquet"


@pytest.mark.parametrize(
    "bad, problem",
    [
        (float("nan"), r"item id nan is NaN \(not a number\)"),
        (float("inf"), r"item id inf is infinite"),
        (float("-inf"), r"item id -inf is infinite"),
        (1e20, r"item id 1e\+20 is outside the 64-bit integer range"),
    ],
)
def test_float_item_ids_that_are_no_ids_are_refused_naming_the_row(tmp_path, bad, problem):
    inter, items = _generic_parquet(tmp_path, [1.0, bad])
    with pytest.raises(DataFormatError, match=rf"interactions\.parquet: row 2: {problem}"):
        load_generic(inter, items)
    inter, items = _generic_parquet(tmp_path, [1.0, 1.0], catalogue=(bad, 1.0))  # the items file's id column
    with pytest.raises(DataFormatError, match=rf"items\.parquet: row 1: {problem}"):
        load_generic(inter, items)


def test_integral_float_ids_still_read_as_integers_and_a_null_is_an_empty_id(tmp_path):
    ds = load_generic(*_generic_parquet(tmp_path, [1.0, 2.0]))
    assert ds.interactions["item"].tolist() == ["1", "2"] and ds.items["item"].tolist() == ["1", "2"]
    inter, items = _generic_parquet(tmp_path, [1.0, None])
    with pytest.raises(DataFormatError, match=r"interactions\.parquet: row 2: empty item id"):
        load_generic(inter, items)
    _parquet(
        tmp_path / "interactions.parquet",
        user=pa.array([1.0, float("nan")], from_pandas=False),
        item=pa.array([1.0, 2.0]),
        timestamp=pa.array([1, 2]),
    )
    with pytest.raises(DataFormatError, match=r"interactions\.parquet: row 2: user id nan is NaN"):
        load_generic(tmp_path / "interactions.parquet", items)


def _atomic(tmp_path, timestamp: str):
    (tmp_path / "x.inter").write_text(f"user_id:token\titem_id:token\ttimestamp:float\nu1\t1\t5\n\nu1\t1\t{timestamp}\n")
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\n1\tA\n")
    return tmp_path / "x.inter", tmp_path / "x.item"


@pytest.mark.parametrize(
    "timestamp, problem",
    [
        ("1e30", "is outside the 64-bit integer range"),  # was silently -2**63: the first interaction of all
        ("-1e19", "is outside the 64-bit integer range"),
        ("99999999999999999999", "is outside the 64-bit integer range"),  # too long for int64, read as a float
        ("9223372036854775808", "is outside the 64-bit integer range"),  # 2**63
        ("nan", r"is NaN \(not a number\)"),
        ("inf", "is infinite"),
        ("-inf", "is infinite"),
        ("5.5", "is not an integer"),
    ],
)
def test_timestamps_beyond_int64_or_not_numbers_are_refused_naming_the_line(tmp_path, timestamp, problem):
    with pytest.raises(DataFormatError, match=rf"x\.inter: line 4: timestamp '{timestamp}' {problem}"):
        load_recbole_atomic(*_atomic(tmp_path, timestamp))


def test_the_largest_timestamps_int64_holds_are_kept_exactly(tmp_path):
    assert load_recbole_atomic(*_atomic(tmp_path, "9223372036854775807")).interactions["timestamp"].tolist() == [5, 2**63 - 1]
    assert load_recbole_atomic(*_atomic(tmp_path, "1e18")).interactions["timestamp"].tolist() == [5, 10**18]


def test_parquet_and_csv_timestamps_beyond_int64_are_refused(tmp_path):
    _, items = _generic_parquet(tmp_path, [1.0, 1.0])
    for values in (pa.array([1.0, 1e30]), pa.array([1.0, float("nan")], from_pandas=False), pa.array([1, 2**64 - 1], pa.uint64())):
        _parquet(tmp_path / "interactions.parquet", user=pa.array(["u1", "u2"]), item=pa.array(["1", "1"]), timestamp=values)
        with pytest.raises(DataFormatError, match=r"interactions\.parquet: row 2: timestamp \S+ is (outside|NaN)"):
            load_generic(tmp_path / "interactions.parquet", items)
    (tmp_path / "interactions.csv").write_text('user,item,timestamp\nu1,1,5\n"u\n2",1,1e30\n')  # a quoted field spans lines
    (tmp_path / "items.csv").write_text("item,title\n1,A\n")
    with pytest.raises(DataFormatError, match=r"interactions\.csv: line 3: timestamp '1e30' is outside the 64-bit integer range"):
        load_generic(tmp_path / "interactions.csv", tmp_path / "items.csv")


def test_date_times_past_pandas_nanosecond_range_are_read(tmp_path):
    """Year 9999 is a valid date-time; read through nanoseconds it overflowed with a bare error."""
    _, items = _generic_parquet(tmp_path, [1.0, 1.0])
    far = [datetime.datetime(1960, 1, 1, 0, 0, 0, 500000), datetime.datetime(9999, 1, 1)]
    _parquet(
        tmp_path / "interactions.parquet",
        user=pa.array(["u1", "u2"]),
        item=pa.array(["1", "1"]),
        timestamp=pa.array(far, pa.timestamp("us")),
    )
    assert load_generic(tmp_path / "interactions.parquet", items).interactions["timestamp"].tolist() == [-315619200, 253370764800]
    (tmp_path / "interactions.csv").write_text("user,item,timestamp\nu1,1,9999-12-31T23:59:59\nu1,1,1969-12-31T23:59:59.5+01:00\n")
    (tmp_path / "items.csv").write_text("item,title\n1,A\n")
    assert load_generic(tmp_path / "interactions.csv", tmp_path / "items.csv").interactions["timestamp"].tolist() == [
        253402300799,
        -3601,
    ]  # floored, as before


def test_a_bad_number_leaves_no_prepared_folder_behind(tmp_path, capsys):
    folder = tmp_path / "src"
    folder.mkdir()
    _atomic(folder, "1e30")
    assert main(["data", "prepare", str(folder), "--out", str(tmp_path / "run")]) == 2
    assert "x.inter: line 4: timestamp '1e30' is outside the 64-bit integer range" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # not even the folder the command made for itself


# --------------------------------------------------------------------------------------------
# History offsets: int64


def test_list_offsets_are_int64_and_do_not_wrap_past_2_31():
    offsets = _list_offsets(np.array([2**30, 2**30, 2**30, 5], dtype=np.int32))
    assert offsets.dtype == np.int64 and offsets.tolist() == [0, 2**30, 2**31, 3 * 2**30, 3 * 2**30 + 5]


def _dataset(num_users=30, num_items=30, length=10, titles=None):
    rng = np.random.default_rng(0)
    rows = []
    for u in range(num_users):
        start = int(rng.integers(num_items))
        rows += [(f"u{u}", f"i{(start + t) % num_items}", 1000 + t * 100 + u) for t in range(length)]
    inter = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    titles = titles or [f"Film {i} ({1990 + i})" for i in range(num_items)]
    return inter, pd.DataFrame({"item": [f"i{i}" for i in range(num_items)], "title": titles})


def test_history_is_written_with_int64_offsets_and_int32_folders_still_load(tmp_path):
    inter, items = _dataset()
    write(prepare(inter, items, ProtocolConfig()), tmp_path / "new")
    schema = pq.read_schema(tmp_path / "new" / "samples.parquet")
    assert schema.field("history").type == pa.large_list(pa.int32())
    new = RunData.load(tmp_path / "new")
    # a folder prepared before: the same samples with list<int32> (int32 offsets)
    write(prepare(inter, items, ProtocolConfig()), tmp_path / "old")
    samples = pq.read_table(tmp_path / "old" / "samples.parquet")
    i = samples.schema.get_field_index("history")
    samples = samples.set_column(i, "history", samples.column("history").cast(pa.list_(pa.int32())))
    pq.write_table(samples, tmp_path / "old" / "samples.parquet")
    assert pq.read_schema(tmp_path / "old" / "samples.parquet").field("history").type == pa.list_(pa.int32())
    old = RunData.load(tmp_path / "old")
    for name in ("history", "history_len", "target", "candidates", "split"):
        np.testing.assert_array_equal(getattr(old, name), getattr(new, name))
    assert new.history.shape == (len(new.target), 10) and (new.history_len > 0).all()


# --------------------------------------------------------------------------------------------
# Items sharing a title


SHARED = ["Chasing Amy (1997)", "Chasing Amy (1997)", "chasing  AMY (1997)"]  # i0, i1, i2: one title by title_key


def _shared_run(tmp_path):
    titles = [*SHARED] + [f"Film {i} ({1990 + i})" for i in range(3, 30)]
    inter, items = _dataset(titles=titles)
    prepared = prepare(inter, items, ProtocolConfig())
    write(prepared, tmp_path / "data")
    return prepared, RunData.load(tmp_path / "data")


def test_disambiguate_titles_is_stable_and_idempotent():
    titles, ids = ["X", "Y", "X", "x"], ["7", "8", "9", "10"]
    out = disambiguate_titles(titles, ids)
    assert out == ["X (#7)", "Y", "X (#9)", "x (#10)"]
    assert disambiguate_titles(out, ids) == out  # unique titles are kept
    order = [3, 1, 0, 2]  # a row's title depends on the catalogue, not on the rows' order
    assert disambiguate_titles([titles[i] for i in order], [ids[i] for i in order]) == [out[i] for i in order]
    # a renamed title that meets another item's title is renamed again, until all are unique
    cascade = disambiguate_titles(["X", "X", "X (#5)"], ["5", "6", "7"])
    assert len({title_key(t) for t in cascade}) == 3 and cascade[1] == "X (#6)"
    assert [base_title(t, i) for t, i in zip(out, ids)] == titles


def test_prepare_appends_the_id_to_shared_titles_and_counts_them(tmp_path):
    prepared, data = _shared_run(tmp_path)
    titles = dict(zip(data.items["item"], data.items["title"]))
    assert [titles[f"i{i}"] for i in range(3)] == ["Chasing Amy (1997) (#i0)", "Chasing Amy (1997) (#i1)", "chasing  AMY (1997) (#i2)"]
    assert titles["i3"] == "Film 3 (1993)"  # the others as they were
    assert prepared.stats["duplicate_titles"] == 3 and prepared.stats["titles_disambiguated"] == 3
    assert data.stats["titles_disambiguated"] == 3  # in stats.json
    inter, items = _dataset()  # no shared title: the stats have no such key, as before
    assert "titles_disambiguated" not in prepare(inter, items, ProtocolConfig()).stats


def test_prompts_tell_candidates_with_a_shared_title_apart(tmp_path):
    from delrec.training.examples import ExampleBuilder

    _, data = _shared_run(tmp_path)
    builder = ExampleBuilder(data, Templates())
    idx = dict(zip(data.items["item"], data.items["item_idx"]))
    both = [r for r in range(len(data.target)) if {idx["i0"], idx["i1"]} <= set(data.candidates[r]) and data.history_len[r] >= 2]
    assert both, "no sample has both items among its candidates"
    for r in both[:5]:
        prompt = builder.ta(r)
        assert len(set(prompt.candidates)) == len(prompt.candidates)
        assert "Chasing Amy (1997) (#i0)" in prompt.candidates and "Chasing Amy (1997) (#i1)" in prompt.candidates


def _recommender(tmp_path, data):
    return Recommender(tmp_path, data, scorer=None, model="popularity", teacher=None)


def test_resolve_and_search_tell_shared_titles_apart(tmp_path):
    _, data = _shared_run(tmp_path)
    rec = _recommender(tmp_path, data)
    idx = {item: i for i, item in enumerate(rec.ids)}
    assert rec.resolve(["Chasing Amy (1997) (#i1)", "chasing amy (1997) (#I0)", "i2"], "history") == [idx["i1"], idx["i0"], idx["i2"]]
    with pytest.raises(
        RequestError,
        match=r"history\[0\]: 'Chasing Amy \(1997\)' is the title of 3 items: "
        r"'Chasing Amy \(1997\) \(#i0\)' \(id 'i0'\), .*give the id",
    ):
        rec.resolve(["Chasing Amy (1997)"], "history")  # never silently the first of them
    found = rec.search("chasing amy")
    assert sorted(i for i, _ in found[:3]) == ["i0", "i1", "i2"] and all("(#i" in t for _, t in found[:3])
    assert [i for i, _ in rec.search("Chasing Amy (1997)")][:3] == ["i0", "i1", "i2"]  # all three count as exact


def test_a_folder_prepared_before_keeps_its_titles_and_the_recommender_tells_them_apart(tmp_path):
    _, data = _shared_run(tmp_path)
    items = data.items.copy()
    items["title"] = [base_title(t, i) for t, i in zip(items["title"], items["item"])]  # as `prepare` wrote them before
    pq.write_table(pa.Table.from_pandas(items, preserve_index=False), tmp_path / "data" / "items.parquet")
    old = RunData.load(tmp_path / "data")
    by_id = dict(zip(old.items["item"], old.items["title"]))
    assert [by_id[f"i{i}"] for i in range(3)] == SHARED  # the prompts' titles, as before
    rec = _recommender(tmp_path, old)
    assert rec.titles[rec.resolve(["i0"], "history")[0]] == "Chasing Amy (1997) (#i0)"
    with pytest.raises(RequestError, match="is the title of 3 items"):
        rec.resolve(["chasing amy (1997)"], "candidates")
    assert rec.resolve(["Chasing Amy (1997) (#i2)"], "history") == rec.resolve(["i2"], "history")


def test_ml100k_titles_shared_by_18_items_are_told_apart():
    """The real catalogue, where the cache holds it (no download in the test suite)."""
    from delrec.data.acquisition.fetch import default_cache_dir, is_fetched

    cache = default_cache_dir()
    if not is_fetched("ml-100k", cache):
        pytest.skip("ML-100K is not in the cache")
    raw = load_dataset("ml-100k", cache_dir=cache)
    prepared = prepare(raw.interactions, raw.items, ProtocolConfig())
    assert prepared.stats["duplicate_titles"] == 18 == prepared.stats["titles_disambiguated"]
    titles = prepared.items["title"]
    assert titles.map(title_key).is_unique and "Chasing Amy (1997) (#246)" in set(titles)


# --------------------------------------------------------------------------------------------
# Unicode forms when titles are matched


def test_clean_title_and_title_key():
    assert clean_title("\u202eToy\u200b Story\u2069 (1995)\ufeff") == "Toy Story (1995)"  # bidi, zero-width, BOM
    assert clean_title("Toy\tStory\n(1995)\x07") == "Toy Story (1995)"  # control characters: whitespace or nothing
    assert clean_title("\uff34\uff4f\uff59 Story") == "Toy Story"  # full-width letters
    assert title_key("Les Mise\u0301rables") == title_key("LES MISÉRABLES")  # decomposed accent, case
    assert title_key("\ufb01lm") == "film"  # ligature


def test_titles_match_in_any_unicode_form_and_stay_stored_as_given(tmp_path):
    titles = ["Les Misérables (1995)", "Toy Story (1995)", "The Usual Suspects (1995)"] + [f"Film {i}" for i in range(3, 30)]
    inter, items = _dataset(titles=titles)
    write(prepare(inter, items, ProtocolConfig()), tmp_path / "data")
    data = RunData.load(tmp_path / "data")
    assert set(titles) == set(data.items["title"])  # matching rewrites nothing on disk
    rec = _recommender(tmp_path, data)
    want = rec.resolve(["i0", "i1", "i2"], "history")
    queries = [
        unicodedata.normalize("NFD", "les misérables (1995)"),
        "\u2066Toy Story (1995)\u2069",
        "\uff34oy \u200bStory (1995)",
        "Usual Suspects, The (1995)\u200e",
    ]
    assert rec.resolve(queries, "history") == [want[0], want[1], want[1], want[2]]
    assert rec.search("\u202emisérables")[0] == ("i0", "Les Misérables (1995)")
    assert rec.search(unicodedata.normalize("NFD", "Misérables"))[0][0] == "i0"
    assert rec.search("\u200b\u200e") == []  # nothing but format characters: no query
    with pytest.raises(RequestError, match=r"unknown item .*closest titles: 'Toy Story \(1995\)'"):
        rec.resolve(["Toy Stor\u202e (1995)"], "history")


# --------------------------------------------------------------------------------------------
# Float settings: NaN and infinities refused


@pytest.mark.parametrize(
    "raw, value",
    [(".nan", float("nan")), (".NaN", float("nan")), (".inf", float("inf")), ("-.inf", float("-inf")), ("1e999", float("inf"))],
)
def test_non_finite_float_settings_are_refused_naming_the_setting(tmp_path, raw, value):
    from delrec.config import PipelineConfig
    from delrec.training.config import DistillConfig

    with pytest.raises(ValueError, match=r"--set: lr: expected a finite number, got -?(nan|inf)"):
        check(DistillConfig, parse_overrides([f"lr={raw}"]), "--set")
    path = tmp_path / "c.yaml"
    path.write_text(f"run_dir: {tmp_path / 'run'}\ndistill:\n  lr: {raw}\n")
    with pytest.raises(ValueError, match=r"c\.yaml: distill: lr: expected a finite number"):
        PipelineConfig.from_file(path)
    # a float that may be null says the same, not "expected a number or null"
    with pytest.raises(ValueError, match=r"x: finetune: max_seconds: expected a finite number"):
        PipelineConfig._from_values({"run_dir": str(tmp_path / "run"), "finetune": {"max_seconds": value}}, "x")
    assert check(DistillConfig, {"lr": 1e-300}, "x") == {"lr": 1e-300}  # tiny but finite


def test_the_strings_nan_and_inf_are_no_numbers():
    from delrec.training.config import DistillConfig

    for raw in ("nan", "inf", "NaN"):
        with pytest.raises(ValueError, match=rf"lr: expected a number, got '{raw}'"):
            check(DistillConfig, parse_overrides([f"lr={raw}"]), "--set")
