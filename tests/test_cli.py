"""The `delrec` command end to end on a small generic CSV data set, as a user would bring one."""

import json

import pytest

from conftest import sequential_rule_dataset
from delrec.cli import main


@pytest.fixture
def csv_dataset(tmp_path):
    interactions, items = sequential_rule_dataset(num_users=60)
    folder = tmp_path / "mydata"
    folder.mkdir()
    interactions.to_csv(folder / "interactions.csv", index=False)
    items.to_csv(folder / "items.csv", index=False)
    return folder


def test_prepare_train_evaluate(tmp_path, csv_dataset, capsys):
    run = tmp_path / "run"
    assert main(["data", "prepare", str(csv_dataset), "--out", str(run)]) == 0
    assert "60 users, 60 items" in capsys.readouterr().out
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "2", "--quiet",
                 "--set", "lr=0.1", "--top-h", "5"]) == 0
    out = capsys.readouterr().out
    assert "gru4rec: best epoch" in out and "| gru4rec |" in out
    saved = json.loads((run / "teachers" / "gru4rec" / "config.json").read_text())
    assert saved["teacher"]["lr"] == 0.1 and saved["teacher"]["max_epochs"] == 2
    assert main(["evaluate", "--run", str(run)]) == 0
    out = capsys.readouterr().out
    for name in ("random", "popularity", "gru4rec"):
        assert f"| {name} |" in out
    summary = json.loads((run / "eval" / "summary.test.json").read_text())
    assert [r["model"] for r in summary] == ["random", "popularity", "gru4rec"]
    # the evaluator reproduces the numbers written at training time
    trained = json.loads((run / "teachers" / "gru4rec" / "metrics.json").read_text())
    assert summary[2]["candidates"] == trained["test"]["candidates"]


def test_clear_errors(tmp_path, csv_dataset, capsys):
    assert main(["evaluate", "--run", str(tmp_path / "missing")]) == 2
    assert "delrec data prepare" in capsys.readouterr().err

    run = tmp_path / "run"
    main(["data", "prepare", str(csv_dataset), "--out", str(run)])
    assert main(["evaluate", "--run", str(run), "--models", "sasrec"]) == 2
    assert "delrec teacher train" in capsys.readouterr().err

    bad = csv_dataset / "interactions.csv"
    lines = bad.read_text().splitlines()
    lines[7] = "u1,i3,not-a-time"
    bad.write_text("\n".join(lines) + "\n")
    assert main(["data", "prepare", str(csv_dataset), "--out", str(tmp_path / "run2")]) == 2
    err = capsys.readouterr().err
    assert "interactions.csv" in err and "line 8" in err
    assert not (tmp_path / "run2" / "data" / "protocol.json").exists()
