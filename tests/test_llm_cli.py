"""`delrec evaluate --llm` and `delrec recommend` with a tiny model saved to a local folder."""

import json
import re

import pytest

from conftest import make_run
from delrec.cli import main
from llm_helpers import tiny_llama_backbone


@pytest.fixture
def tiny_model_dir(tmp_path):
    bb = tiny_llama_backbone()
    out = tmp_path / "tiny-llama"
    bb.model.save_pretrained(out)
    bb.tokenizer.save_pretrained(out)
    return str(out)


def test_zero_shot_evaluation_on_a_seeded_subset(tmp_path, tiny_model_dir, capsys):
    run, data = make_run(tmp_path / "run")
    args = ["evaluate", "--run", str(run), "--llm", tiny_model_dir, "--limit", "12", "--batch-size", "5", "--dtype", "float32"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "seeded subset of 12 samples" in out and f"| llm:{tiny_model_dir} | 12 |" in out
    files = list((run / "eval").glob("llm-*.limit12.test.json"))
    assert len(files) == 1
    res = json.loads(files[0].read_text())
    assert res["num_samples"] == 12 and res["subset"] == {"limit": 12, "seed": 0, "of": len(data.indices("test"))}
    # the same subset and the same scores when run again
    assert main(args) == 0
    assert json.loads(files[0].read_text()) == res


def test_recommend(tmp_path, tiny_model_dir, capsys):
    run, data = make_run(tmp_path / "run")
    titles = data.items["title"].tolist()
    assert main(["recommend", "--run", str(run), "--llm", tiny_model_dir, "--dtype", "float32",
                 "--history", titles[0], titles[1].lower(), "--candidates", *titles[2:7]]) == 0
    out = capsys.readouterr().out
    ranked = [line for line in out.splitlines() if re.match(r"\s*\d+\.\s", line)]
    assert len(ranked) == 5 and all(any(t in line for t in titles[2:7]) for line in ranked)

    # candidates from the teacher's top list, which never repeats the history
    assert main(["teacher", "train", "--model", "sasrec", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    assert main(["recommend", "--run", str(run), "--llm", tiny_model_dir, "--dtype", "float32",
                 "--history", titles[0], titles[1], "--num-candidates", "6"]) == 0
    out = capsys.readouterr().out
    assert "sasrec teacher's top 6" in out
    listed = out.split("ranked by", 1)[1]
    assert titles[0] not in listed and titles[1] not in listed


def test_recommend_errors(tmp_path, tiny_model_dir, capsys):
    run, data = make_run(tmp_path / "run")
    assert main(["recommend", "--run", str(run), "--llm", tiny_model_dir, "--history"]) == 2
    assert "history is empty" in capsys.readouterr().err
    assert main(["recommend", "--run", str(run), "--llm", tiny_model_dir, "--history", "Movie 3 (1993", "--candidates", "Movie 4 (1994)"]) == 2
    err = capsys.readouterr().err
    assert "unknown item 'Movie 3 (1993'" in err and "'Movie 3 (1993)'" in err  # the closest known titles
    assert main(["recommend", "--run", str(run), "--llm", tiny_model_dir, "--history", "Movie 3 (1993)"]) == 2
    assert "delrec teacher train" in capsys.readouterr().err  # no teacher for candidates


def test_distill_command(tmp_path, tiny_model_dir, capsys):
    run, _ = make_run(tmp_path / "run")
    assert main(["teacher", "train", "--model", "gru4rec", "--run", str(run), "--epochs", "1", "--quiet"]) == 0
    capsys.readouterr()
    args = ["distill", "--run", str(run), "--llm", tiny_model_dir, "--teacher", "gru4rec", "--steps", "2", "--soft-tokens", "3",
            "--batch-size", "2", "--dtype", "float32", "--set", "valid_samples=2", "--set", "weighting='uncertainty'", "--quiet"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "rps_valid_accuracy" in out and "ta_valid_accuracy" in out
    saved = json.loads((run / "distill" / "gru4rec" / "config.json").read_text())
    assert saved["weighting"] == "uncertainty" and saved["steps"] == 2
    assert main([*args[:-1], "--without", "ta", "--name", "wo-ta", "--quiet"]) == 0
    assert json.loads((run / "distill" / "wo-ta" / "config.json").read_text())["tasks"] == ["rps"]
    # stage 1 needs the teacher's lists
    assert main(["distill", "--run", str(run), "--llm", tiny_model_dir, "--teacher", "caser", "--steps", "1"]) == 2
    assert "delrec teacher train --model caser" in capsys.readouterr().err
