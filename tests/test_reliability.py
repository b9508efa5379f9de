"""Defects found by trying `delrec` as a new user would; each test failed before its fix."""

import json
import logging
import os
import stat

import pandas as pd
import pytest

from conftest import random_dataset, sequential_rule_dataset
from delrec.cli import main
from delrec.core.io import write_json
from delrec.data.loaders import DataFormatError, load_dataset
from delrec.data.store import RunData
from delrec.teachers import default_config
from delrec.teachers.trained import load_teacher
from delrec.training.teacher import train_teacher


def _folder(tmp_path, name, dataset=sequential_rule_dataset, ext="csv", **kwargs):
    interactions, items = dataset(**kwargs)
    folder = tmp_path / name
    folder.mkdir()
    sep = "\t" if ext == "tsv" else ","
    interactions.to_csv(folder / f"interactions.{ext}", index=False, sep=sep)
    items.to_csv(folder / f"items.{ext}", index=False, sep=sep)
    return folder


def test_prepare_refuses_to_orphan_results_of_other_data(tmp_path, capsys):
    first, second = _folder(tmp_path, "a", num_users=60), _folder(tmp_path, "b", random_dataset)
    run = tmp_path / "run"
    assert main(["data", "prepare", str(first), "--out", str(run)]) == 0
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    # the same data again changes nothing: allowed
    assert main(["data", "prepare", str(first), "--out", str(run)]) == 0
    capsys.readouterr()
    # other data (or another protocol) over the results: refused, nothing touched
    before = (run / "data" / "samples.parquet").read_bytes()
    assert main(["data", "prepare", str(second), "--out", str(run)]) == 2
    assert "holds results made from its current data (teachers/)" in capsys.readouterr().err
    assert main(["data", "prepare", str(first), "--protocol", "loo", "--out", str(run)]) == 2
    assert (run / "data" / "samples.parquet").read_bytes() == before and (run / "teachers" / "gru4rec").exists()
    assert main(["data", "prepare", str(second), "--out", str(run), "--force"]) == 0
    assert not (run / "teachers").exists()


def test_a_teacher_of_other_data_is_refused(tmp_path):
    run = tmp_path / "run"
    assert main(["data", "prepare", str(_folder(tmp_path, "a", num_users=60)), "--out", str(run)]) == 0
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    other = tmp_path / "other"
    assert main(["data", "prepare", str(_folder(tmp_path, "b", random_dataset)), "--out", str(other)]) == 0
    with pytest.raises(ValueError, match="was trained on other data"):
        load_teacher(run / "teachers" / "gru4rec", "cpu", RunData.load(other / "data"))
    load_teacher(run / "teachers" / "gru4rec", "cpu", RunData.load(run / "data"))


def test_a_killed_write_leaves_nothing_behind_the_next_one(tmp_path):
    folder = _folder(tmp_path, "a", num_users=60)
    run = tmp_path / "run"
    (run / "data").mkdir(parents=True)
    stale = run / "data" / ".samples.parquet.k1ll3d.tmp"  # what SIGKILL during `data prepare` left
    stale.write_bytes(b"half")
    assert main(["data", "prepare", str(folder), "--out", str(run)]) == 0
    assert not list((run / "data").glob(".*.tmp"))


def test_written_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
        (tmp_path / "plain.txt").write_text("a")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "x.json").stat().st_mode) == stat.S_IMODE((tmp_path / "plain.txt").stat().st_mode) == 0o644


def test_teacher_time_budget_is_kept_inside_an_epoch_and_on_resume(tmp_path, monkeypatch):
    import delrec.training.teacher as train_module

    run = tmp_path / "run"
    assert main(["data", "prepare", str(_folder(tmp_path, "a", num_users=120, length=40)), "--out", str(run)]) == 0
    # batch 2: hundreds of batches per epoch, so a budget of 0.3 s ends inside the first epoch
    config = default_config("sasrec", batch_size=2, max_epochs=50, patience=50, max_seconds=0.3)
    real = train_module.write_topk

    def interrupted(*args, **kwargs):  # Ctrl-C after the last epoch's checkpoint, before the results
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "write_topk", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(run, config, device="cpu", progress=False)
    log_path = run / "teachers" / "sasrec" / "train_log.jsonl"
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    assert len(log) == 1 and log[0].get("partial") is True and log[0]["seconds"] < 5
    # the resume finds the budget spent and trains no more
    monkeypatch.setattr(train_module, "write_topk", real)
    result = train_teacher(run, config, device="cpu", progress=False)
    assert result.metrics["epochs_run"] == 1 and len(log_path.read_text().splitlines()) == 1


def test_generic_layouts_and_duplicates(tmp_path, caplog):
    tsv = _folder(tmp_path, "tsv", ext="tsv", num_users=30)
    assert load_dataset(tsv).source["interactions"].endswith("interactions.tsv")
    # both CSV and Parquet: Parquet is read, and the log says so
    both = _folder(tmp_path, "both", num_users=30)
    pd.read_csv(both / "interactions.csv").to_parquet(both / "interactions.parquet")
    with caplog.at_level(logging.INFO, logger="delrec.data.loaders"):
        assert load_dataset(both).source["interactions"].endswith("interactions.parquet")
    assert "interactions.parquet and interactions.csv found; reading interactions.parquet" in caplog.text
    no_items = _folder(tmp_path, "noitems", num_users=30)
    (no_items / "items.csv").unlink()
    with pytest.raises(DataFormatError, match="found interactions.csv but no items file"):
        load_dataset(no_items)
    # exact duplicate rows are dropped and counted
    dup = _folder(tmp_path, "dup", num_users=60)
    inter = pd.read_csv(dup / "interactions.csv")
    pd.concat([inter, inter.iloc[:7]]).to_csv(dup / "interactions.csv", index=False)
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="delrec.data.protocol"):
        assert main(["data", "prepare", str(dup), "--out", str(run)]) == 0
    assert "dropped 7 exact duplicate" in caplog.text
    stats = json.loads((run / "data" / "stats.json").read_text())
    assert stats["raw"]["duplicates_dropped"] == 7 and stats["raw"]["interactions"] == len(inter) + 7
    clean = tmp_path / "clean"
    pd.read_csv(dup / "interactions.csv").drop_duplicates().to_csv(_folder(tmp_path, "c", num_users=60) / "interactions.csv", index=False)
    assert main(["data", "prepare", str(tmp_path / "c"), "--out", str(clean)]) == 0
    assert (clean / "data" / "samples.parquet").read_bytes() == (run / "data" / "samples.parquet").read_bytes()
