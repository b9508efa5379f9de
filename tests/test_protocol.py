import numpy as np
import pandas as pd
import pytest

from conftest import make_run, random_dataset, sequential_rule_dataset
from delrec.data.protocol import ProtocolConfig, k_core, prepare
from delrec.data.store import RunData, write


def test_k_core_is_iterative():
    # u2 has 1 interaction; dropping u2 leaves item b with 1 -> b goes -> u1 falls below 2
    df = pd.DataFrame(
        {"user": ["u1", "u1", "u2", "u3", "u3", "u4", "u4"],
         "item": ["a", "b", "b", "a", "c", "a", "c"], "timestamp": range(7)}
    )
    out = k_core(df, 2)
    assert out["user"].value_counts().min() >= 2 and out["item"].value_counts().min() >= 2
    # one pass would have kept b; the fixed point must not
    assert set(out["item"]) == {"a", "c"} and set(out["user"]) == {"u3", "u4"}


def test_five_core_holds_after_prepare(tmp_path):
    _, data = make_run(tmp_path, random_dataset)
    inter = pd.read_parquet(tmp_path / "data" / "interactions.parquet")
    assert inter["user_idx"].value_counts().min() >= 5
    assert inter["item_idx"].value_counts().min() >= 5


@pytest.mark.parametrize("dataset", [sequential_rule_dataset, random_dataset])
def test_splits_are_strictly_chronological(tmp_path, dataset):
    _, data = make_run(tmp_path, dataset)
    t = [data.timestamp[data.indices(s)] for s in ("train", "valid", "test")]
    assert all(len(x) for x in t)
    assert t[0].max() < t[1].min()
    assert t[1].max() < t[2].min()
    n = len(data.sample_id)
    assert abs(len(t[0]) / n - 0.8) < 0.1 and abs(len(t[2]) / n - 0.1) < 0.1


def test_candidate_sets(tmp_path):
    _, data = make_run(tmp_path, random_dataset)
    cands = data.candidates
    assert cands.shape[1] == 15
    assert all(len(set(row)) == 15 for row in cands)
    assert ((cands == data.target[:, None]).sum(axis=1) == 1).all()
    assert (cands >= 1).all() and (cands <= data.num_items).all()
    for i in range(len(cands)):
        assert not set(data.history[i][data.history[i] > 0]) & (set(cands[i]) - {data.target[i]})
    # negatives avoid everything the user saw before the target, not only the last 10 items
    r, seen = data.seen_items(np.arange(len(cands)))
    negatives = cands != data.target[:, None]
    assert len(r) > len(cands)  # the check below is not vacuous
    for row, item in zip(r, seen):
        assert item not in cands[row][negatives[row]]
    # the target's slot is shuffled, not always first
    target_col = (cands == data.target[:, None]).argmax(axis=1)
    assert len(np.unique(target_col)) > 5


def test_history_is_the_previous_items_most_recent_last(tmp_path):
    interactions, items = sequential_rule_dataset(num_users=20, length=15)
    run, data = make_run(tmp_path, sequential_rule_dataset, num_users=20, length=15)
    inter = pd.read_parquet(run / "data" / "interactions.parquet")
    seqs = inter.groupby("user_idx")["item_idx"].apply(list)
    for i in range(len(data.sample_id)):
        seq = seqs[data.user_idx[i]]
        p = data.position[i]
        assert data.target[i] == seq[p]
        expected = seq[max(0, p - 10) : p]
        got = data.history[i][data.history[i] > 0].tolist()
        assert got == expected and data.history_len[i] == len(expected)
    # the rule survives the mapping: each next item follows its predecessor's title number
    title = dict(zip(data.items["item_idx"], data.items["title"]))
    num = lambda idx: int(title[idx].split()[1])
    i = int(np.flatnonzero(data.history_len == 10)[0])
    assert num(data.target[i]) == (num(data.history[i][-1]) + 1) % 60


def test_equal_timestamps_keep_source_order(tmp_path):
    # u0 rates a, b, c ... all at the same second: their order is the file's, never the ids'
    rows = [("u0", f"i{k}", 100) for k in (5, 3, 9, 1, 7, 2)]
    # six other users, each missing a different block of 5 of the 30 items: every item has 5
    rows += [(f"u{j + 1}", f"i{(5 * j + m) % 30}", m) for j in range(6) for m in range(25)]
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{k}" for k in range(30)], "title": [f"T{k}" for k in range(30)]})
    prepared = prepare(interactions, items, ProtocolConfig(num_candidates=3, min_count=5))
    inter = prepared.interactions
    u0 = inter[inter["user"] == "u0"]["item_idx"].tolist()
    item_of = dict(zip(prepared.items["item_idx"], prepared.items["item"]))
    assert [item_of[i] for i in u0] == ["i5", "i3", "i9", "i1", "i7", "i2"]


def test_same_seed_gives_identical_files(tmp_path):
    interactions, items = random_dataset()
    for out in ("a", "b"):
        write(prepare(interactions, items, ProtocolConfig(seed=7)), tmp_path / out)
    for name in ("samples.parquet", "candidates.parquet", "items.parquet", "interactions.parquet", "stats.json", "protocol.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    write(prepare(interactions, items, ProtocolConfig(seed=8)), tmp_path / "c")
    assert (tmp_path / "a" / "candidates.parquet").read_bytes() != (tmp_path / "c" / "candidates.parquet").read_bytes()


def test_leave_one_out_protocol(tmp_path):
    _, data = make_run(tmp_path, random_dataset, protocol="loo")
    assert data.config.max_history == 50
    for split, offset in (("test", 0), ("valid", 1)):
        rows = data.indices(split)
        assert len(np.unique(data.user_idx[rows])) == len(rows) == data.num_users
        last = np.bincount(data.user_idx, minlength=data.num_users)  # samples per user = length - 1
        assert (data.position[rows] == last[data.user_idx[rows]] - offset).all()


def test_stats(tmp_path):
    _, data = make_run(tmp_path, sequential_rule_dataset)
    s = data.stats
    assert s["filtered"]["users"] == 120 and s["filtered"]["items"] == 60
    assert s["filtered"]["interactions"] == 120 * 25
    assert s["samples"]["total"] == 120 * 24 == sum(s["samples"][k] for k in ("train", "valid", "test"))
    assert 0 < s["filtered"]["sparsity"] < 1


def test_bad_inputs(tmp_path):
    interactions, items = random_dataset()
    with pytest.raises(ValueError, match="timestamp"):
        prepare(interactions.drop(columns="timestamp"), items, ProtocolConfig())
    with pytest.raises(ValueError, match="no interactions survive"):
        prepare(interactions, items, ProtocolConfig(min_count=1000))
    with pytest.raises(ValueError, match="no title"):
        prepare(interactions, items.iloc[:3], ProtocolConfig())
    with pytest.raises(ValueError, match="protocol"):
        ProtocolConfig(name="random-split")
    with pytest.raises(FileNotFoundError, match="delrec data prepare"):
        RunData.load(tmp_path / "nowhere")


def test_interrupted_write_leaves_no_complete_marker(tmp_path, monkeypatch):
    interactions, items = random_dataset()
    prepared = prepare(interactions, items, ProtocolConfig())
    import delrec.data.store as store

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(store, "write_json", boom)
    with pytest.raises(KeyboardInterrupt):
        write(prepared, tmp_path / "data")
    assert not (tmp_path / "data" / "protocol.json").exists()
    assert not list((tmp_path / "data").glob("*.tmp"))


def test_k_core_on_codes_keeps_what_the_fixed_point_over_strings_keeps():
    from delrec.data.protocol import k_core_rows

    rng = np.random.default_rng(3)
    df = pd.DataFrame({"user": [f"u{u}" for u in rng.zipf(1.6, 4000) % 700],
                       "item": [f"i{i}" for i in rng.zipf(1.4, 4000) % 300], "timestamp": range(4000)})
    expect = df
    while True:  # the definition, pass by pass, on the strings
        keep = (expect["user"].map(expect["user"].value_counts()) >= 5) & (expect["item"].map(expect["item"].value_counts()) >= 5)
        if keep.all():
            break
        expect = expect[keep]
    assert 0 < len(expect) < len(df)
    users, _ = pd.factorize(df["user"])
    items, _ = pd.factorize(df["item"])
    assert np.array_equal(k_core_rows(users, items, 5), expect.index.to_numpy())
    assert k_core(df, 5).equals(expect)
    assert len(k_core_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), 5)) == 0
