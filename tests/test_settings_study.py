"""benchmarks/settings_study.py: its probes are valid stage configs on the study's budget, and its
summary reads END and BEST off a curve correctly (no model is run here)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from delrec.training.config import DistillConfig, FinetuneConfig

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "settings_study.py"
spec = importlib.util.spec_from_file_location("settings_study", SCRIPT)
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


@pytest.mark.parametrize("name", list(study.PROBES))
@pytest.mark.parametrize("examples", [800, 1600])
def test_every_probe_is_a_valid_config_on_the_budget(name, examples):
    config = study.resolve(name, examples=examples, valid=256, eval_examples=200)
    assert isinstance(config, DistillConfig if name.startswith("s1-") else FinetuneConfig)
    assert config.steps * config.batch_size * config.grad_accum == examples
    assert config.valid_samples == 256 and config.seed == study.SEED
    assert abs(config.eval_every * config.batch_size * config.grad_accum - 200) <= config.batch_size * config.grad_accum
    if isinstance(config, FinetuneConfig):
        assert config.method == "wo-sp" and config.patience * config.eval_every > config.steps  # no early stop
        for key, value in study.PROBES[name].items():
            assert getattr(config, key) == value


def test_the_issue_probes_are_registered():
    wanted = {"adalora-lion-2e-2-step0", "adalora-adamw-1e-3-sched", "lora-qv-adamw-1e-3", "lora-qv-adamw-3e-4",
              "lora-qv-adamw-2e-3", "lora-all-adamw-5e-4", "lora-qv-lion-2e-4", "lora-qv-lion-1e-4",
              "lora-qv-adamw-1e-3-bs16", "lora-qv-adamw-1e-3-constant", "s1-lion-5e-3-random", "s1-lion-5e-3-vocab",
              "s1-adamw-1e-2-vocab", "s1-adamw-3e-2-vocab", "s1-lion-5e-3-vocab-100tok"}
    assert wanted <= set(study.PROBES)
    with pytest.raises(ValueError, match="whole number of steps"):
        study.resolve("lora-qv-adamw-1e-3-bs16", examples=8, valid=8, eval_examples=4)


def _result(name: str, ndcg: list[float], hr: list[float]) -> dict:
    """A hand-made results file: evaluations at 0, 200, 400, 600 examples, steps of 4 examples."""
    return {"probe": name, "stage": 2, "task": "candidates", "overrides": study.PROBES[name],
            "settings": json.loads(json.dumps(study.resolve(name, 600, 256, 200).__dict__)),
            "study": {"examples": 600, "valid": 256, "valid_samples": 256, "eval_examples": 200},
            "chance_loss": 2.708, "online_loss": [{"step": s, "examples_seen": 4 * s, "loss": 3.0 - s / 50} for s in range(1, 151)],
            "curve": [{"examples_seen": x, "valid_HR@1": h, "valid_NDCG@5": n, "seconds": x / 10.0}
                      for x, n, h in zip((0, 200, 400, 600), ndcg, hr)]}


def test_summary_end_and_best(tmp_path):
    # collapses: best 0.48 at 200, ends at 0.22; steady: untrained 0.50 (a reference only), best 0.41 at 400, ends 0.40
    collapse = _result("adalora-lion-2e-2-step0", [0.20, 0.48, 0.30, 0.22], [0.05, 0.25, 0.10, 0.07])
    steady = _result("lora-qv-adamw-1e-3", [0.50, 0.30, 0.41, 0.40], [0.10, 0.15, 0.21, 0.20])
    for r in (collapse, steady):
        (tmp_path / f"{r['probe']}.json").write_text(json.dumps(r))

    e = study.end_and_best(collapse["curve"])
    assert (e["end"]["valid_NDCG@5"], e["best"]["valid_NDCG@5"], e["best"]["examples_seen"], e["end_near_best"]) == (0.22, 0.48, 200, False)
    e = study.end_and_best(steady["curve"])
    assert (e["end"]["examples_seen"], e["best"]["examples_seen"], e["end_near_best"]) == (600, 400, True)

    assert study.windows(steady["online_loss"], 200) == pytest.approx([2.49, 1.49, 0.49])
    text = study.table(study.load(tmp_path))
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| ") and "---" not in line}
    assert rows["adalora-lion-2e-2-step0"].endswith("| 0.220 (0.070) | 0.480 (200) | no |")
    assert rows["lora-qv-adamw-1e-3"].endswith("| 0.400 (0.200) | 0.410 (400) | yes |")
    assert "2.49 / 1.49 / 0.49" in rows["lora-qv-adamw-1e-3"]
    assert "**lora-qv-adamw-1e-3**" in text  # the best END value, not the best point (0.48)


def test_study_run_links_the_source(tmp_path):
    source = tmp_path / "source"
    (source / "data").mkdir(parents=True)
    (source / "teachers").mkdir()
    run = study.study_run(tmp_path / "study", source)
    assert (run / "data").resolve() == (source / "data").resolve() and (run / "teachers").is_symlink()
    study.study_run(tmp_path / "study", source)  # again: the same links are fine
    (tmp_path / "other" / "data").mkdir(parents=True)
    with pytest.raises(FileExistsError):
        study.study_run(tmp_path / "other", source)


def test_seconds_study_table_compares_ends_at_equal_seconds(tmp_path):
    """The study in seconds: each `s2-` probe's end of budget, its seconds per example, and its levers."""
    today = _result("s2-today", [0.20, 0.30, 0.35, 0.40], [0.05, 0.10, 0.15, 0.18])
    combo = _result("s2-top8-neg4-distill-1", [0.20, 0.40, 0.45, 0.47], [0.05, 0.15, 0.20, 0.24])
    today["seconds"], combo["seconds"] = 2400.0, 2350.0
    combo["curve"][-1]["valid_teacher_agreement"] = 0.5
    # both evaluated in int8 while training; compared by their float re-scores (the combination's
    # kept adapter was its end, today's came from 400 examples)
    today["rescored_float"] = {"examples_seen": 400, "is_end": False, "valid_HR@1": 0.2, "valid_NDCG@5": 0.45}
    combo["rescored_float"] = {"examples_seen": 600, "is_end": True, "valid_HR@1": 0.19, "valid_NDCG@5": 0.41}
    text = study.seconds_table([today, combo])
    rows = {line.split(" | ")[0].strip("| "): line for line in text.splitlines() if line.startswith("| s2-")}
    assert "| none (today) | int8 | 600 | 2400 | 4.00 |" in rows["s2-today"]
    assert rows["s2-today"].endswith("| 0.400 (0.180) | - | 0.450 (0.200) at 400 | - |")
    assert "top 8 layers, 4 negatives in the loss, distill 1 (T 2)" in rows["s2-top8-neg4-distill-1"]
    assert rows["s2-top8-neg4-distill-1"].endswith("| 0.470 (0.240) | 0.500 | 0.410 (0.190) | - |")
    assert "**s2-today**" in text  # by the float end, not the int8 one
    del today["rescored_float"]
    today["settings"]["eval_weights"] = "float"  # a probe evaluated in float is its own float end
    assert study.end_in_float(today) == today["curve"][-1]  # 0.400 now, below the combination's float 0.410
    assert "**s2-top8-neg4-distill-1**" in study.seconds_table([today, combo])
    study.seconds_figure([today, combo], tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0


def test_probes_that_skip_the_start_share_the_float_one():
    """`--no-start-eval`: the untrained start (the same model for every stage-2 probe) is scored by
    one float probe; the figure puts that point before the others' curves, never an int8 one."""
    assert study.resolve("s2-top8", 1344, 256, 1344, start_eval=False).eval_at_start is False
    assert study.resolve("s2-top8", 1344, 256, 1344).eval_at_start is True
    measured = _result("s2-distill-1", [0.21, 0.30, 0.35, 0.40], [0.05, 0.10, 0.15, 0.18])
    skipped = _result("s2-top8", [0.0, 0.31, 0.36, 0.41], [0.0, 0.11, 0.16, 0.19])
    skipped["curve"] = skipped["curve"][1:]
    int8 = _result("s2-today", [0.19, 0.30, 0.35, 0.40], [0.05, 0.10, 0.15, 0.18])
    int8["settings"]["eval_weights"] = "int8"
    assert study.shared_start([int8, skipped]) is None  # only an int8 start: none shared
    start = study.shared_start([int8, skipped, measured])
    assert start["valid_NDCG@5"] == 0.21
    assert [p["examples_seen"] for p in study.drawn_curve(skipped, start)] == [0, 200, 400, 600]
    assert study.drawn_curve(measured, start) == measured["curve"]


def test_paired_compares_the_same_rows_in_float():
    """`--paired REF NAME`: per-row float ranks of two kept adapters on the same valid rows, the
    HR@1 difference by McNemar's exact test and NDCG@5 by the sign-flip permutation test."""
    rows = list(range(40))
    ref = {"probe": "s2-today", "rescored_float": {"rows": rows, "ranks": [5] * 40}}
    better = {"probe": "s2-distill-1", "rescored_float": {"rows": rows, "ranks": [0] * 30 + [5] * 10}}
    t = study.paired(ref, better)
    assert t["reference"] == "s2-today"
    assert t["HR@1"]["diff"] == pytest.approx(0.75) and t["HR@1"]["p_value"] < 1e-6
    assert t["NDCG@5"]["diff"] == pytest.approx(0.75) and t["NDCG@5"]["p_value"] < 1e-3
    same = {"probe": "s2-top8", "rescored_float": {"rows": rows, "ranks": [5] * 40}}
    assert study.paired(ref, same)["HR@1"]["p_value"] == 1.0
    r = _result("s2-distill-1", [0.2, 0.3, 0.4, 0.5], [0.1, 0.2, 0.3, 0.4])
    r["paired"] = [t]
    assert study.paired_cell(r) == "+0.750 (p 0.0001), +0.750 (p 1.9e-09) vs s2-today"
    r["paired"].append(study.paired(better, ref))  # a second reference: both verdicts in the cell
    assert study.paired_cell(r) == ("+0.750 (p 0.0001), +0.750 (p 1.9e-09) vs s2-today; "
                                    "-0.750 (p 0.0001), -0.750 (p 1.9e-09) vs s2-distill-1")
    assert study.paired_cell(_result("s2-top8", [0.2], [0.1])) == "-"
    with pytest.raises(ValueError, match="different valid rows"):
        study.paired(ref, {"probe": "x", "rescored_float": {"rows": rows[::-1], "ranks": [0] * 40}})
