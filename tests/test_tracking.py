"""Live tracking (delrec.core.tracking): the scalars a stage logs reach TensorBoard's event files,
read back with TensorBoard's own reader; `none` writes nothing; a missing library names its extra."""

import math
import re
import sys

import pytest

from delrec.core import tracking
from delrec.training.folder import StageFolder

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")


def _events(run) -> event_accumulator.EventAccumulator:
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc) -> dict[str, list[tuple[int, float]]]:
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_stage_log_lines_reach_tensorboard(tmp_path):
    hparams = {"run_dir": str(tmp_path), "llm": "tiny", "distill": {"steps": 2, "lr": 0.005}, "variants": ["delrec"]}
    with tracking.for_run("tensorboard", tmp_path, hparams) as tracker:
        assert tracking.current() is tracker and isinstance(tracker, tracking.TensorBoardTracker)
        teacher = StageFolder(tmp_path / "teachers" / "sasrec", counter="epoch")
        teacher.log({"epoch": 1, "loss": 2.5, "valid_NDCG@10": 0.25, "lr": 0.0009765625})
        stage1 = StageFolder(tmp_path / "distill" / "sasrec")
        stage1.log({"step": 0, "examples_seen": 0, "eval": {"rps_valid_NDCG@5": 0.5, "ta_valid_HR@1": 0.125}})
        stage1.log({"step": 1, "loss_ta": 1.5, "weight_ta": 0.75, "lr": 0.0078125})
        stage1.log({"step": 2, "loss_ta": 1.25, "weight_ta": 0.5, "lr": 0.00390625})
    assert tracking.current() is not tracker  # the no-op tracker again
    assert _scalars(_events(tmp_path)) == {
        "teachers/sasrec/loss": [(1, 2.5)], "teachers/sasrec/valid_NDCG@10": [(1, 0.25)], "teachers/sasrec/lr": [(1, 0.0009765625)],
        "distill/sasrec/examples_seen": [(0, 0.0)], "distill/sasrec/eval/rps_valid_NDCG@5": [(0, 0.5)],
        "distill/sasrec/eval/ta_valid_HR@1": [(0, 0.125)], "distill/sasrec/loss_ta": [(1, 1.5), (2, 1.25)],
        "distill/sasrec/weight_ta": [(1, 0.75), (2, 0.5)], "distill/sasrec/lr": [(1, 0.0078125), (2, 0.00390625)]}
    # (binary fractions: TensorBoard stores float32)
    # the config is retrievable: as YAML text, and flattened for the HParams plugin
    acc = _events(tmp_path)
    text = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "llm: tiny" in text and "lr: 0.005" in text
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["distill.lr"].number_value == 0.005 and start.hparams["variants"].string_value == '["delrec"]'
    # the JSON log is unchanged by tracking
    assert (tmp_path / "distill" / "sasrec" / "train_log.jsonl").read_text().count("\n") == 3


def test_only_finite_numbers_are_logged_and_dicts_flattened_once():
    entry = {"loss": 1, "partial": True, "note": "x", "ranks": [1, 2], "none": None, "nan": math.nan, "inf": -math.inf,
             "eval": {"valid_HR@1": 0.5, "bad": math.nan, "deep": {"x": 1.0}, "flag": False}}
    assert tracking.scalars_of(entry) == {"loss": 1.0, "eval/valid_HR@1": 0.5}
    written = []

    class Recorder(tracking.Tracker):
        def _write(self, tag_prefix, scalars, step):
            written.append((tag_prefix, scalars, step))

    Recorder().log("finetune/sasrec-delrec", entry, 3)
    Recorder().log("finetune/sasrec-delrec", {"partial": True}, 4)  # nothing finite: no call at all
    assert written == [("finetune/sasrec-delrec", {"finetune/sasrec-delrec/loss": 1.0,
                                                   "finetune/sasrec-delrec/eval/valid_HR@1": 0.5}, 3)]
    assert tracking.flatten({"a": 1, "distill": {"lr": 0.1, "w": {"ta": 1}}, "t": {}}) == \
        {"a": 1, "distill.lr": 0.1, "distill.w.ta": 1, "t": {}}


def test_none_tracks_nothing(tmp_path):
    with tracking.for_run("none", tmp_path, {}) as tracker:
        StageFolder(tmp_path / "finetune" / "x").log({"step": 1, "loss": 1.0})
        assert type(tracker) is tracking.Tracker
    assert not (tmp_path / "tb").exists()


def test_closed_on_an_exception(tmp_path):
    with pytest.raises(KeyboardInterrupt), tracking.for_run("tensorboard", tmp_path, {}):
        StageFolder(tmp_path / "finetune" / "x").log({"step": 1, "loss": 1.0})
        raise KeyboardInterrupt
    assert type(tracking.current()) is tracking.Tracker
    assert _scalars(_events(tmp_path)) == {"finetune/x/loss": [(1, 1.0)]}  # flushed


def test_other_processes_do_not_track(tmp_path, monkeypatch):
    from delrec.core import distributed

    class Worker:
        is_main = False

    monkeypatch.setattr(distributed, "current", lambda: Worker())
    with tracking.for_run("tensorboard", tmp_path, {}) as tracker:
        assert type(tracker) is tracking.Tracker
    assert not (tmp_path / "tb").exists()


def test_unknown_kind_refused_and_missing_library_names_its_extra(tmp_path, monkeypatch):
    from delrec.config import PipelineConfig

    with pytest.raises(ValueError, match="tracking: 'neptune' is not one of none, tensorboard, wandb, mlflow"):
        PipelineConfig(tracking="neptune")
    for kind, module, extra in (("tensorboard", "torch.utils.tensorboard", "delrec[tracking]"),
                                ("wandb", "wandb", "delrec[wandb]"), ("mlflow", "mlflow", "delrec[mlflow]")):
        monkeypatch.setitem(sys.modules, module, None)  # as if not installed: `import` raises ImportError
        with pytest.raises(tracking.TrackerUnavailable, match=rf"pip install '{re.escape(extra)}'"):
            with tracking.for_run(kind, tmp_path, {}):
                pytest.fail("no step may run without the tracker")
    assert not (tmp_path / "tb").exists()


def _fake_library(monkeypatch, name: str, calls: list, *functions: str):
    import types

    module = types.ModuleType(name)
    for function in functions:
        setattr(module, function, lambda *args, _f=function, **kwargs: calls.append((_f, args, kwargs)))
    monkeypatch.setitem(sys.modules, name, module)


def test_wandb_and_mlflow_get_each_stage_on_its_own_axis(tmp_path, monkeypatch):
    """(Stand-ins for the libraries: what the trackers call.) W&B's own step may only grow while
    each stage counts from 0: every stage has its own step metric; MLflow refuses `@` in a key."""
    calls = []
    _fake_library(monkeypatch, "wandb", calls, "init", "define_metric", "log", "finish")
    monkeypatch.setenv("WANDB_PROJECT", "mine")
    with tracking.for_run("wandb", tmp_path / "run-a", {"llm": "tiny", "distill": {"lr": 0.5}}):
        StageFolder(tmp_path / "run-a" / "teachers" / "sasrec", counter="epoch").log({"epoch": 3, "loss": 1.0})
        StageFolder(tmp_path / "run-a" / "distill" / "sasrec").log({"step": 1, "loss_ta": 2.0})
    assert calls == [
        ("init", (), {"project": "mine", "dir": str(tmp_path / "run-a"), "config": {"llm": "tiny", "distill": {"lr": 0.5}},
                      "name": "run-a"}),
        ("define_metric", ("teachers/sasrec/step",), {}),
        ("define_metric", ("teachers/sasrec/*",), {"step_metric": "teachers/sasrec/step"}),
        ("log", ({"teachers/sasrec/loss": 1.0, "teachers/sasrec/step": 3},), {}),
        ("define_metric", ("distill/sasrec/step",), {}),
        ("define_metric", ("distill/sasrec/*",), {"step_metric": "distill/sasrec/step"}),
        ("log", ({"distill/sasrec/loss_ta": 2.0, "distill/sasrec/step": 1},), {}),
        ("finish", (), {"exit_code": 0})]

    calls.clear()
    _fake_library(monkeypatch, "mlflow", calls, "start_run", "log_params", "log_dict", "log_metrics", "end_run")
    config = {f"k{i}": i for i in range(150)} | {"long": "x" * 900}
    with pytest.raises(RuntimeError, match="boom"), tracking.for_run("mlflow", tmp_path / "run-b", config):
        StageFolder(tmp_path / "run-b" / "finetune" / "sasrec-delrec").log({"step": 2, "eval": {"valid_NDCG@5": 0.5}})
        raise RuntimeError("boom")
    names = [c[0] for c in calls]
    assert names == ["start_run", "log_params", "log_params", "log_dict", "log_metrics", "end_run"]
    assert calls[0][2] == {"run_name": "run-b"} and len(calls[1][1][0]) == 100 and len(calls[2][1][0]["long"]) == 500
    assert calls[4][1:] == (({"finetune/sasrec-delrec/eval/valid_NDCG_5": 0.5},), {"step": 2})
    assert calls[5][2] == {"status": "FAILED"}


def test_pipeline_run_tracks_every_stage(tmp_path):
    """`delrec run ... tracking=tensorboard`: a teacher's and both stages' tags in RUN/tb."""
    from conftest import write_pipeline_inputs
    from delrec.cli import main
    from llm_helpers import tiny_llama_backbone

    config = write_pipeline_inputs(tmp_path, tiny_llama_backbone(), "tiny.yaml", num_users=40, num_items=30, length=16)
    run = tmp_path / "run"
    assert main(["run", "--config", str(config), "--quiet", f"run_dir={run}", "tracking=tensorboard", "teacher.max_epochs=2",
                 "threads=1", "variants=[delrec]", "zero_shot=false", "test_samples=4", "eval_batch_size=4", "report=false",
                 "distill={soft_tokens: 2, steps: 2, batch_size: 2, valid_samples: 2, eval_every: 1000}",
                 "finetune={steps: 2, batch_size: 2, valid_samples: 2, eval_every: 2, adapter: adalora, optimizer: lion, lr_schedule: constant, init_r: 2, target_r: 1, warmup_steps: 1}"]) == 0
    scalars = _scalars(_events(run))
    assert [step for step, _ in scalars["teachers/sasrec/loss"]] == [1, 2] and "teachers/sasrec/lr" in scalars
    assert [step for step, _ in scalars["distill/sasrec/loss_rps"]] == [1, 2] and "distill/sasrec/weight_rps" in scalars
    assert [step for step, _ in scalars["finetune/sasrec-delrec/loss"]] == [1, 2] and "finetune/sasrec-delrec/lr" in scalars
    assert [step for step, _ in scalars["finetune/sasrec-delrec/eval/valid_NDCG@5"]] == [0, 2]
