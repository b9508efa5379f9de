"""KDA and KDALRD (delrec.teachers.kda, delrec.data.attributes): the item attributes become
relations as in the authors' KGReader, the time gaps line up with the history, the models learn
on tiny data, resume exactly, read no later split, and cannot be asked for top-h lists."""

import json

import numpy as np
import pytest
import torch

from conftest import kill_teacher_training_at_epoch, sequential_rule_dataset
from delrec.data.attributes import read_item_attributes, year_bucket
from delrec.data.protocol import ProtocolConfig, prepare
from delrec.data.store import RunData, write
from delrec.evaluation.metrics import evaluate
from delrec.teachers import default_config
from delrec.teachers.lists import TeacherLists
from delrec.teachers.trained import TeacherScorer, load_teacher
from delrec.training.teacher import train_teacher

GENRES = ["Action", "Comedy", "Drama", "Children's"]


def _run_with_attributes(root, scramble_test: bool = False):
    """The sequential-rule data prepared with a RecBole atomic item file beside it (a year and genres per item)."""
    interactions, items = sequential_rule_dataset(num_users=60, num_items=30, length=16)
    root.mkdir(parents=True, exist_ok=True)
    lines = ["item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq"]
    lines += [f"{item}\t{title}\t{1985 + i % 12}\t{GENRES[i % 4]} {GENRES[(i + 1) % 4]}"
              for i, (item, title) in enumerate(zip(items["item"], items["title"]))]
    (root / "items.item").write_text("\n".join(lines) + "\n")
    prepared = prepare(interactions, items, ProtocolConfig())
    if scramble_test:  # every test target moved to another test sample
        import pyarrow as pa

        test = np.array([s == "test" for s in prepared.samples.column("split").to_pylist()])
        targets = prepared.samples.column("target").to_numpy().copy()
        targets[test] = np.roll(targets[test], 1)
        prepared.samples = prepared.samples.set_column(prepared.samples.schema.get_field_index("target"), "target",
                                                       pa.array(targets))
    write(prepared, root / "data", source={"dataset": "tiny", "format": "recbole-atomic", "items": str(root / "items.item")})
    return root, RunData.load(root / "data")



FAST = dict(dim=16, num_heads=2, num_layers=2, max_epochs=12, lr=1e-2, batch_size=64, patience=100, num_negatives=4)


def test_attributes_are_relations_as_the_authors_read_them(tmp_path):
    run, data = _run_with_attributes(tmp_path)
    attrs = read_item_attributes(run / "data", data.items)
    assert attrs.relations == ["release_year"] + [f"class={g}" for g in sorted(GENRES)]
    assert attrs.values.shape == (data.num_items + 1, 5) and (attrs.values[0] == 0).all()
    # value entities come after the items, each genre one entity, each year bucket one entity
    assert attrs.values[attrs.values > 0].min() > data.num_items and attrs.num_entities == attrs.values.max() + 1
    title_row = {item: i + 1 for i, item in enumerate(data.items["item"])}
    i0, i1 = title_row["i0"], title_row["i1"]  # i0: Action Comedy, i1: Comedy Drama
    comedy = 1 + sorted(GENRES).index("Comedy")
    assert attrs.values[i0, comedy] == attrs.values[i1, comedy] > 0
    assert attrs.values[i0, 1 + sorted(GENRES).index("Drama")] == 0
    assert len(attrs.triples()) == int((attrs.values > 0).sum())
    assert [year_bucket(y) for y in (0, 1935, 1945, 1983, 1987, 1990, 1991, 1998)] == [0, 1, 2, 6, 7, 8, 9, 16]


def test_history_gaps_are_the_seconds_from_each_history_item_to_the_request(tmp_path):
    _, data = _run_with_attributes(tmp_path)
    rows = np.arange(len(data.sample_id))
    gaps = data.history_gaps(rows)
    assert gaps.shape == data.history.shape and ((gaps > 0) == (data.history > 0)).all()
    # the rule data's clock: a user's t-th interaction at 1e6 + 1000 t + user, so the item k back is 1000 k s before
    H = data.history.shape[1]
    assert np.array_equal(gaps, np.where(data.history > 0, (H - np.arange(H))[None, :] * 1000.0, 0.0))


@pytest.mark.parametrize("model", ["kda", "kdalrd"])
def test_kda_learns_the_sequential_rule_and_reloads_the_same(tmp_path, llm, model):
    run, data = _run_with_attributes(tmp_path)
    result = train_teacher(run, default_config(model, **FAST, llm=llm), device="cpu", progress=False)
    test = result.metrics["test"]
    assert test["candidates"]["HR@1"] >= 0.9, test
    assert "full_ranking" not in test  # (target-aware: the pipeline ranks its test samples over the catalogue)
    out = run / "teachers" / model
    assert not (out / "topk.parquet").exists() and not (out / "checkpoint.pt").exists()
    reloaded = TeacherScorer(load_teacher(out, "cpu", data=data), torch.device("cpu"))
    assert evaluate(reloaded, data, "test")["candidates"] == test["candidates"]
    full = evaluate(reloaded, data, "test", full_ranking=True)["full_ranking"]
    assert full["HR@10"] >= 0.9, full
    with pytest.raises(FileNotFoundError, match="cannot be a DELRec teacher"):
        TeacherLists.load(run, model, data)
    if model == "kdalrd":
        saved = json.loads((out / "config.json").read_text())
        assert saved["teacher"]["llm"] == llm and saved["shapes"]["text_dim"] > 0


def test_kdalrd_resumes_exactly_after_a_kill(tmp_path, llm, monkeypatch):
    cfg = default_config("kdalrd", **{**FAST, "max_epochs": 3}, llm=llm)
    ref_run, _ = _run_with_attributes(tmp_path / "ref")
    reference = train_teacher(ref_run, cfg, device="cpu", progress=False).metrics
    crash_run, _ = _run_with_attributes(tmp_path / "crash")
    kill_teacher_training_at_epoch(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(crash_run, cfg, device="cpu", progress=False)
    monkeypatch.undo()
    assert train_teacher(crash_run, cfg, device="cpu", progress=False).metrics["test"] == reference["test"]
    logs = [[json.loads(x)["loss"] for x in (r / "teachers" / "kdalrd" / "train_log.jsonl").read_text().splitlines()]
            for r in (ref_run, crash_run)]
    assert logs[0] == logs[1]


def test_kdalrd_reads_no_later_split(tmp_path, llm):
    cfg = default_config("kdalrd", **{**FAST, "max_epochs": 2}, llm=llm)
    logs = []
    for name, scramble in (("a", False), ("b", True)):
        run, _ = _run_with_attributes(tmp_path / name, scramble_test=scramble)
        train_teacher(run, cfg, device="cpu", progress=False)
        logs.append([{k: v for k, v in json.loads(x).items() if k != "seconds"}
                     for x in (run / "teachers" / "kdalrd" / "train_log.jsonl").read_text().splitlines()])
    assert logs[0] == logs[1]


def test_a_target_aware_teacher_cannot_teach_the_llm_methods(tmp_path):
    from delrec.config import PipelineConfig

    with pytest.raises(ValueError, match="cannot teach the LLM methods"):
        PipelineConfig(run_dir=str(tmp_path), teachers=["sasrec", "kdalrd"], methods=["delrec"])
    config = PipelineConfig(run_dir=str(tmp_path), teachers=["sasrec", "kdalrd"], method_teachers=["sasrec"],
                            methods=["delrec"], llm="my-llm")
    assert config.llm_teachers == ["sasrec"]


def test_data_without_an_attribute_file_gives_kda_only_the_virtual_relation(tmp_path):
    interactions, items = sequential_rule_dataset(num_users=20, num_items=30, length=10)
    write(prepare(interactions, items, ProtocolConfig()), tmp_path / "data")
    data = RunData.load(tmp_path / "data")
    attrs = read_item_attributes(tmp_path / "data", data.items)
    assert attrs.relations == [] and attrs.values.shape == (data.num_items + 1, 0)
    model = train_teacher(tmp_path, default_config("kda", **{**FAST, "max_epochs": 1}), device="cpu", progress=False).model
    assert model.num_relations == 1


def test_a_samples_scores_do_not_depend_on_the_samples_scored_with_it(tmp_path):
    run, data = _run_with_attributes(tmp_path)
    model = train_teacher(run, default_config("kda", **{**FAST, "max_epochs": 1}), device="cpu", progress=False).model
    scorer, rows = TeacherScorer(model, torch.device("cpu")), data.indices("test")[:6]
    together = scorer.score_candidates(data, rows)
    alone = torch.cat([scorer.score_candidates(data, rows[i : i + 1]) for i in range(len(rows))])
    assert torch.allclose(together, alone, atol=1e-5)
    full = scorer.score_all(data, rows[:2])
    assert full.shape == (2, data.num_items + 1)  # the catalogue in chunks: the same scores of the candidates
    assert torch.allclose(full.gather(1, torch.as_tensor(data.candidates[rows[:2]])), together[:2], atol=1e-5)
