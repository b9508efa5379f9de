import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from conftest import kill_teacher_training_at_epoch, make_run, random_dataset
from delrec.data.protocol import ProtocolConfig, prepare
from delrec.data.store import write
from delrec.evaluation.metrics import evaluate
from delrec.teachers import build_model, default_config
from delrec.teachers.trained import TeacherScorer, load_teacher, teacher_topk
from delrec.training import teacher as train_mod
from delrec.training.teacher import train_teacher

# Small epochs budgets keep the suite fast; the rule is easy enough to learn within them.
FAST = {"sasrec": dict(max_epochs=15), "gru4rec": dict(max_epochs=15, lr=0.1), "caser": dict(max_epochs=15),
        "bert4rec": dict(max_epochs=15, lr=5e-3)}


@pytest.mark.parametrize("model", ["sasrec", "gru4rec", "caser", "bert4rec"])
def test_teacher_learns_the_sequential_rule(rule_run, model):
    run, data = rule_run
    result = train_teacher(run, default_config(model, **FAST[model], patience=100), device="cpu", progress=False)
    test = result.metrics["test"]
    assert test["candidates"]["HR@1"] >= 0.95, test
    assert test["full_ranking"]["HR@1"] >= 0.9, test
    # what was written matches what the evaluator finds from the saved model
    reloaded = TeacherScorer(load_teacher(run / "teachers" / model, "cpu"), torch.device("cpu"))
    again = evaluate(reloaded, data, "test", full_ranking=True)
    assert again["candidates"] == test["candidates"] and again["full_ranking"] == test["full_ranking"]
    saved = json.loads((run / "teachers" / model / "metrics.json").read_text())
    assert saved["test"]["candidates"] == test["candidates"]
    assert not (run / "teachers" / model / "checkpoint.pt").exists()


def test_topk_lists(rule_run):
    run, data = rule_run
    train_teacher(run, default_config("sasrec", max_epochs=12), device="cpu", top_h=7, progress=False)
    table = pq.read_table(run / "teachers" / "sasrec" / "topk.parquet")
    assert table.column("sample_id").to_numpy().tolist() == data.sample_id.tolist()
    topk = np.stack(table.column("topk").to_numpy(zero_copy_only=False))
    scores = np.stack(table.column("topk_scores").to_numpy(zero_copy_only=False))
    assert topk.shape == (len(data.sample_id), 7)
    assert (np.diff(scores, axis=1) <= 0).all()  # best first
    r, seen = data.seen_items(np.arange(len(topk)))
    assert not any(item in topk[row] for row, item in zip(r, seen))
    # for this rule, the teacher's top-1 on test samples is the true next item
    test = data.indices("test")
    assert (topk[test, 0] == data.target[test]).mean() > 0.9
    cand_scores = np.stack(table.column("candidate_scores").to_numpy(zero_copy_only=False))
    assert cand_scores.shape == data.candidates.shape


@pytest.mark.parametrize("model", ["sasrec", "bert4rec"])  # (BERT4Rec draws its masks from the restored RNG)
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, monkeypatch, model):
    cfg = default_config(model, max_epochs=4, patience=100)
    ref_run, _ = make_run(tmp_path / "ref", random_dataset)
    reference = train_teacher(ref_run, cfg, device="cpu", progress=False).metrics

    crash_run, _ = make_run(tmp_path / "crash", random_dataset)
    kill_teacher_training_at_epoch(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train_teacher(crash_run, cfg, device="cpu", progress=False)
    assert (crash_run / "teachers" / model / "checkpoint.pt").exists()
    assert not (crash_run / "teachers" / model / "metrics.json").exists()
    monkeypatch.undo()

    resumed = train_teacher(crash_run, cfg, device="cpu", progress=False).metrics
    assert resumed["test"] == reference["test"]
    assert resumed["best_epoch"] == reference["best_epoch"]
    log = [json.loads(line) for line in (crash_run / "teachers" / model / "train_log.jsonl").read_text().splitlines()]
    ref_log = [json.loads(line) for line in (ref_run / "teachers" / model / "train_log.jsonl").read_text().splitlines()]
    assert [e["loss"] for e in log] == [e["loss"] for e in ref_log]


def _raise_interrupt(*args):
    raise KeyboardInterrupt("simulated kill")


def test_checkpoint_with_other_settings_is_refused(tmp_path, monkeypatch):
    run, _ = make_run(tmp_path, random_dataset)
    real_valid_score = train_mod._valid_score
    calls = iter([real_valid_score, None])  # the second epoch is killed, after one checkpoint
    monkeypatch.setattr(train_mod, "_valid_score", lambda *a: (next(calls) or _raise_interrupt)(*a))
    with pytest.raises(KeyboardInterrupt):
        train_teacher(run, default_config("sasrec", max_epochs=3), device="cpu", progress=False)
    monkeypatch.undo()
    with pytest.raises(ValueError, match="restart"):
        train_teacher(run, default_config("sasrec", max_epochs=3, lr=0.5), device="cpu", progress=False)


@pytest.mark.parametrize("model", ["gru4rec", "bert4rec"])
def test_test_split_never_influences_training(tmp_path, model):
    """Scramble every test sample's target and candidates: training must not notice."""
    from conftest import sequential_rule_dataset

    interactions, items = sequential_rule_dataset()
    prepared = prepare(interactions, items, ProtocolConfig())
    write(prepared, tmp_path / "a" / "data")
    split = prepared.samples.column("split").to_pylist()
    test_rows = np.array([s == "test" for s in split])
    targets = prepared.samples.column("target").to_numpy().copy()
    targets[test_rows] = np.roll(targets[test_rows], 1)
    import pyarrow as pa

    prepared.samples = prepared.samples.set_column(
        prepared.samples.schema.get_field_index("target"), "target", pa.array(targets)
    )
    write(prepared, tmp_path / "b" / "data")

    cfg = default_config(model, max_epochs=3, patience=100)
    logs = []
    for run in ("a", "b"):
        train_teacher(tmp_path / run, cfg, device="cpu", progress=False)
        logs.append((tmp_path / run / "teachers" / model / "train_log.jsonl").read_text())
    strip = lambda text: [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in text.splitlines()]
    assert strip(logs[0]) == strip(logs[1])


def test_padding_does_not_change_scores():
    """Scores depend on the real items only, however much left padding the batch carries."""
    from delrec.teachers import build_model

    torch.manual_seed(0)
    for name in ("sasrec", "gru4rec", "caser"):
        model = build_model(default_config(name), num_items=40, num_users=5, max_len=10).eval()
        short = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 7, 9]])
        other_pad = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 7, 9]])
        users = torch.tensor([1])
        a = model.score_all(short, users)
        b = model.score_all(other_pad, users)
        assert torch.equal(a, b)
        assert torch.isfinite(a[:, 1:]).all(), name
        # a batch mixing lengths gives each row the same scores as alone
        mixed = torch.tensor([[0, 0, 0, 0, 0, 0, 0, 3, 7, 9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]])
        both = model.score_all(mixed, torch.tensor([1, 2]))
        assert torch.allclose(both[0], a[0], atol=1e-5), name


def test_full_catalogue_scoring_is_blocked_to_a_memory_bound_and_gives_the_same_lists(tmp_path, monkeypatch):
    """Home & Kitchen's 1.29M items: 1,024 rows of full scores would be 5.3 GB. The teacher's
    top-h lists and full ranks are scored in blocks bounded in bytes, with the same result."""
    from delrec.evaluation import metrics as evaluate_mod
    from delrec.evaluation.metrics import full_catalogue_rows, full_ranks

    assert full_catalogue_rows(1_286_050, 1024) == 52  # 256 MB of float32 scores
    assert full_catalogue_rows(60, 1024) == 1024 and full_catalogue_rows(10**9, 1024) == 1
    run, data = make_run(tmp_path, random_dataset)
    torch.manual_seed(0)
    model = build_model(default_config("sasrec", dim=16), data.num_items, data.num_users, data.config.max_history)
    scorer = TeacherScorer(model, torch.device("cpu"))
    rows = np.arange(len(data.sample_id))
    whole = teacher_topk(scorer, data, rows, 7)
    ranks = full_ranks(scorer, data, rows)
    calls = []
    real = scorer.score_all
    monkeypatch.setattr(scorer, "score_all", lambda d, r: calls.append(len(r)) or real(d, r))
    monkeypatch.setattr(evaluate_mod, "FULL_SCORES_BLOCK_BYTES", 4 * (data.num_items + 1) * 5)  # 5 rows a block
    blocked = teacher_topk(scorer, data, rows, 7)
    assert max(calls) == 5 and sum(calls) == len(rows)
    assert np.array_equal(blocked[0], whole[0]) and np.allclose(blocked[1], whole[1])
    calls.clear()
    assert np.array_equal(full_ranks(scorer, data, rows), ranks)
    assert max(calls) == 5 and sum(calls) == len(rows)
    # a scorer over a wider catalogue than the data keeps (benchmarks/prepare.py's 1.29M items over a
    # 5-core's fewer) is blocked by its own width, not the data's
    wide = TeacherScorer(build_model(default_config("sasrec", dim=16), 10 * data.num_items, data.num_users,
                                     data.config.max_history), torch.device("cpu"))
    widths = []
    real_wide = wide.score_all
    monkeypatch.setattr(wide, "score_all", lambda d, r: widths.append(real_wide(d, r).shape) or real_wide(d, r))
    monkeypatch.setattr(evaluate_mod, "FULL_SCORES_BLOCK_BYTES", 4 * (10 * data.num_items + 1) * 5)
    full_ranks(wide, data, rows)
    assert widths[0][1] == 10 * data.num_items + 1 and max(n for n, _ in widths) == 5  # not 50 at the data's width
