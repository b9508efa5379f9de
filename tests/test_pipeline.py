"""`delrec run`: the whole pipeline on a small synthetic data set and a tiny random Llama, skipped
steps on rerun, resume after an interruption, and a report with every section."""

import json
import re
import shutil

import numpy as np
import pytest

from conftest import write_pipeline_inputs
from delrec.cli import main
from delrec.config import PipelineConfig
from delrec.core.settings import apply_override as _apply_override
from delrec.data.store import RunData
from delrec.evaluation.metrics import candidate_ranks
from delrec.evaluation.significance import compare, mcnemar_exact, per_sample, permutation_test
from delrec.pipeline import Pipeline
from delrec.serving.scorers import make_scorer
from llm_helpers import tiny_llama_backbone

QUICK = [
    "teacher.max_epochs=2", "threads=1",
    "distill={soft_tokens: 4, steps: 3, batch_size: 2, valid_samples: 4, valid_lsr_samples: 4, eval_every: 1000}",
    "finetune={steps: 3, batch_size: 2, valid_samples: 4, eval_every: 2, adapter: adalora, optimizer: lion, lr_schedule: constant, init_r: 4, target_r: 2, warmup_steps: 1}",
    "variants=[delrec, wo-sp, usp, wo-lsr, udpsm]", "test_samples=12", "eval_batch_size=4",
]
SECTIONS = ["## The goal", "## Results (Table II style)", "## Ablations", "## Stage 1", "## Training curves",
            "## Cold start", "## Case studies", "## Budgets", "## Steps", "## Data and protocol", "## Environment"]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """A dataset folder (interactions.csv + items.csv) and a tiny model folder."""
    root = tmp_path_factory.mktemp("pipeline-inputs")
    return root, write_pipeline_inputs(root, tiny_llama_backbone(), num_users=60, num_items=40, length=20)


def _args(config, run, *extra):
    return ["run", "--config", str(config), "--quiet", f"run_dir={run}", *QUICK, *extra]


def _status(run) -> dict:
    return {s["step"]: s["status"] for s in json.loads((run / "pipeline.json").read_text())["steps"]}


def test_end_to_end_then_skipped_on_rerun(inputs, tmp_path, capsys):
    root, config = inputs
    run = tmp_path / "run"
    assert main(_args(config, run)) == 0
    steps = json.loads((run / "pipeline.json").read_text())["steps"]
    names = [s["step"] for s in steps]
    assert names[:3] == ["data", "teacher:sasrec", "distill:sasrec"]
    assert {"finetune:sasrec-delrec", "finetune:sasrec-wo-sp", "finetune:sasrec-usp", "finetune:sasrec-udpsm"} <= set(names)
    # `w USP`: an untrained soft prompt as large as the distilled one
    assert json.loads((run / "finetune" / "sasrec-usp" / "config.json").read_text())["soft_tokens"] == 4
    # `w UDPSM`: stage 1 updated the LLM too, and stage 2 started from that LLM
    assert json.loads((run / "finetune" / "sasrec-udpsm" / "config.json").read_text())["llm"] == str(run / "distill" / "sasrec-udpsm" / "llm")
    assert {"eval:zero-shot", "eval:sasrec-delrec", "eval:sasrec-wo-lsr", "eval:random", "eval:popularity"} <= set(names)
    assert all(s["status"] == "ran" and s["seconds"] >= 0 and s["peak_rss_mb"] > 0 for s in steps)
    # every evaluated model scored the same samples; per-sample ranks give the stored metrics
    evals = [json.loads(p.read_text()) for p in (run / "eval" / "pipeline").glob("*.json")]
    assert len({tuple(e["settings"]["rows"]) for e in evals}) == 1 and all(e["num_samples"] == 12 for e in evals)
    for e in evals:
        assert e["candidates"]["HR@1"] == pytest.approx(np.mean(np.asarray(e["ranks"]) == 0))
    report = (run / "report.md").read_text()
    for section in SECTIONS:
        assert section in report, section
    for fig in ("fig-teachers.png", "fig-stage1.png", "fig-stage2.png", "fig-results.png"):
        assert (run / fig).stat().st_size > 1000 and f"]({fig})" in report
    assert "w/o SP (SASRec)" in report and "zero-shot LLM" in report
    # learning curves: each stage recorded the valid rows it evaluated, and the report drew the
    # reference lines on them; the budgets say what fraction of an epoch each stage saw
    s1 = json.loads((run / "distill" / "sasrec" / "metrics.json").read_text())
    assert {t: len(r) for t, r in s1["valid_rows"].items()} == {"ta": 4, "rps": 4, "lsr": 4}
    assert [e["step"] for e in s1["valid_history"]] == [0, 3] and "valid_lsr_NDCG@5" in s1["valid_history"][-1]["eval"]
    s2 = json.loads((run / "finetune" / "sasrec-delrec" / "metrics.json").read_text())
    assert len(s2["valid_rows"]) == 4 and [e["step"] for e in s2["valid_history"]] == [0, 2, 3]
    assert s2["valid_rows"] == s1["valid_rows"]["lsr"]  # both stages' recommendation curves on the same rows
    assert re.search(r"recommendation task over the \d+ valid samples the stage evaluated", report)
    assert "popularity and the teacher over the same 4 valid samples" in report
    assert re.search(r"- distill/sasrec: 3 steps, 6 train examples per task = [\d.]+ epoch \(TA \d+, RPS \d+ distinct\), "
                     r"\d+ s of training \(\d+ s with the evaluations\)", report)
    assert re.search(r"- finetune/sasrec-delrec: 3 steps, 6 train examples = [\d.]+ epoch \(6 distinct\)", report)
    assert "the recommendation prompt with the soft prompt (`w/o LSR`, 4 valid samples): HR@1" in report
    # the report is written from the run folder alone: `delrec report RUN` gives it again, byte for byte
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0
    assert (run / "report.md").read_text() == report
    assert "| data | ran |" in report

    # the same command again: nothing is recomputed but the report
    before = {p: p.stat().st_mtime_ns for p in (run / "eval" / "pipeline").glob("*.json")}
    assert main(_args(config, run)) == 0
    status = _status(run)
    assert all(v == "ran" for v in status.values())  # pipeline.json keeps each step's last real run
    log = (run / "pipeline.log").read_text()
    assert log.count("step finetune:sasrec-delrec: done earlier") == 1
    assert {p: p.stat().st_mtime_ns for p in before} == before
    assert "| total |" in capsys.readouterr().out
    assert "| data | skipped |" in (run / "report.md").read_text()

    # a run made before a setting existed (its config.json lacks the key) is not redone when the
    # setting keeps its default, which is the old behaviour
    for folder, added in [*((f, "soft_depth") for f in (run / "distill").iterdir()),
                          *((f, "train_negatives") for f in (run / "finetune").iterdir())]:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.pop(added)
        (folder / "config.json").write_text(json.dumps(cfg))
    assert main(_args(config, run)) == 0
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "running" not in log.replace("step report: running", "")
    # runtime settings (how a step runs, not what it computes) rerun nothing
    assert main(_args(config, run, "finetune.gradient_checkpointing=true", "distill.verbalizer_batch=3",
                      "finetune.checkpoint_every=1", "eval_batch_size=5", "device=cpu")) == 0
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "running" not in log.replace("step report: running", "")
    assert main(_args(config, run, "finetune.lr_schedule=linear")) == 0  # not the default: reruns
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "step finetune:sasrec-delrec: running" in log and "step distill:sasrec: done earlier" in log

    # a changed stage-2 setting reruns stage 2 and the evaluations that depend on it, nothing else;
    # the first run, kept as an attempt, is listed in the report with the setting that differs
    shutil.copytree(run, tmp_path / "first")
    assert main(_args(config, run, "finetune.steps=4", "finetune.lr_schedule=linear", f"attempts=[{tmp_path / 'first'}]")) == 0
    row = next(line for line in (run / "report.md").read_text().splitlines() if line.startswith("| first | finetune.steps=3 | DELRec(SASRec) | 12 |"))
    assert re.search(r"\| \d\.\d{3} -> \d\.\d{3} \|$", row), row  # the attempt's stage-1 RPS accuracy
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "step distill:sasrec: done earlier" in log and "step teacher:sasrec: done earlier" in log
    assert "step finetune:sasrec-delrec: running" in log and "step eval:sasrec-delrec: running" in log
    assert "step eval:sasrec: done earlier" in log and "step eval:sasrec-wo-lsr: done earlier" in log


def test_report_writes_curves_json(inputs, tmp_path):
    """RUN/curves.json beside the report: every valid point of both stages as their metrics.json
    recorded it, the noise of stage 2's valid metrics at its size, and the same bytes when rewritten."""
    from delrec.report.writer import write_report

    root, config = inputs
    run = tmp_path / "run"
    assert main(_args(config, run, "variants=[delrec]", "zero_shot=false")) == 0
    curves = json.loads((run / "curves.json").read_text())
    s2 = json.loads((run / "finetune" / "sasrec-delrec" / "metrics.json").read_text())
    assert list(curves["stage2"]) == ["sasrec-delrec"] and len(s2["valid_history"]) == 3
    assert curves["stage2"]["sasrec-delrec"] == [
        {"examples_seen": e["examples_seen"], "valid_samples": s2["valid_samples"], "valid_HR@1": e["valid_HR@1"],
         "valid_NDCG@5": e["valid_NDCG@5"], "seconds": e["seconds"]} for e in s2["valid_history"]]
    s1 = json.loads((run / "distill" / "sasrec" / "metrics.json").read_text())
    points = curves["stage1"]["sasrec"]
    assert [p["examples_seen"] for p in points] == [e["examples_seen"] for e in s1["valid_history"]]
    assert all(p["valid_samples"] == {"ta": 4, "rps": 4, "lsr": 4} for p in points)
    assert all({k: p[k] for k in e["eval"]} == e["eval"] for p, e in zip(points, s1["valid_history"]))
    # the noise at 4 valid samples: HR@1 a proportion, NDCG@5 bounded by sqrt(m(1-m)/n) <= 0.5/sqrt(n)
    noise, last = curves["valid_noise"]["stage2"]["sasrec-delrec"], s2["valid_history"][-1]
    p, g = last["valid_HR@1"], last["valid_NDCG@5"]
    assert noise == {"valid_samples": 4, "hr1_std_error": pytest.approx(np.sqrt(p * (1 - p) / 4), abs=1e-4),
                     "ndcg5_std_error": pytest.approx(np.sqrt(g * (1 - g) / 4), abs=1e-4), "std_error_at_most": 0.25}
    report = (run / "report.md").read_text()
    assert "Stage-2 valid metrics are on 4 samples: one standard error" in report and "`curves.json`" in report
    # from the run folder alone: written again, byte for byte
    before = (run / "curves.json").read_bytes(), report
    (run / "curves.json").unlink()
    write_report(run)
    write_report(run)
    assert ((run / "curves.json").read_bytes(), (run / "report.md").read_text()) == before
    assert not list(run.glob(".curves.json.*"))  # written atomically: no temporary left


def test_resume_after_an_interruption(inputs, tmp_path, monkeypatch, capsys):
    root, config = inputs
    run = tmp_path / "run"
    real = Pipeline.finetune

    def killed(self):
        raise KeyboardInterrupt  # as if the user pressed Ctrl-C after stage 1

    monkeypatch.setattr(Pipeline, "finetune", killed)
    assert main(_args(config, run)) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "interrupted; what was finished and the last checkpoint are kept" in err
    assert (run / "distill" / "sasrec" / "metrics.json").exists() and not (run / "report.md").exists()
    # the steps that ran before the kill keep their times in pipeline.json (written after each step)
    interim = {s["step"]: s for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert interim["distill:sasrec"]["status"] == "ran" and interim["distill:sasrec"]["seconds"] > 0
    assert not any(name.startswith("finetune:") for name in interim)
    monkeypatch.setattr(Pipeline, "finetune", real)
    assert main(_args(config, run)) == 0
    final = {s["step"]: s for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert final["distill:sasrec"]["this_invocation"] == "skipped"
    assert final["distill:sasrec"]["seconds"] == interim["distill:sasrec"]["seconds"]  # the killed run's time
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "step distill:sasrec: done earlier" in log and "step finetune:sasrec-delrec: running" in log
    assert (run / "report.md").exists()


def test_a_moved_run_folder_is_the_same_run(inputs, tmp_path):
    """Stage-2 settings name stage 1's soft prompt and (`w UDPSM`) its LLM by path; a run folder
    moved elsewhere must neither rerun a step nor look for them where the folder was."""
    root, config = inputs
    first, moved = tmp_path / "first", tmp_path / "elsewhere" / "moved"
    extra = ("variants=[delrec, udpsm]", "zero_shot=false")
    assert main(_args(config, first, *extra)) == 0
    moved.parent.mkdir()
    shutil.move(first, moved)  # nothing is left where the run was
    assert main(_args(config, moved, *extra)) == 0
    now = {s["step"]: s["this_invocation"] for s in json.loads((moved / "pipeline.json").read_text())["steps"]}
    assert {step for step, status in now.items() if status != "skipped"} == {"report"}
    data = RunData.load(moved / "data")
    rows = np.asarray(json.loads((moved / "eval" / "pipeline" / "sasrec-udpsm.json").read_text())["settings"]["rows"])
    recorded = json.loads((moved / "eval" / "pipeline" / "sasrec-udpsm.json").read_text())["ranks"]
    scorer = make_scorer(moved, data, "sasrec-udpsm", progress=False)  # stage 1's LLM and soft prompt, found in the moved run
    assert np.asarray(candidate_ranks(scorer, data, rows)).tolist() == recorded


def test_config_errors_and_overrides(inputs, tmp_path):
    root, config = inputs
    values = {"finetune": {"steps": 3}}
    _apply_override(values, "finetune.lr=1e-3")
    _apply_override(values, "variants=[delrec, usp]")
    assert values == {"finetune": {"steps": 3, "lr": 1e-3}, "variants": ["delrec", "usp"]}
    with pytest.raises(ValueError, match="key=value"):
        _apply_override(values, "finetune.steps")
    with pytest.raises(ValueError, match="unknown setting 'nonsense'"):
        PipelineConfig.from_file(config, ["nonsense=1"])
    with pytest.raises(ValueError, match="methods: unknown method .best."):
        PipelineConfig.from_file(config, ["variants=[delrec, best]"])
    with pytest.raises(FileNotFoundError):
        PipelineConfig.from_file(tmp_path / "missing.yaml")
    assert main(["run", "--config", str(tmp_path / "missing.yaml")]) == 2


def test_significance():
    a = np.array([0] * 30 + [3] * 10)  # DELRec: 30 hits
    b = np.array([0] * 15 + [3] * 25)  # teacher: 15 hits, all among DELRec's
    assert per_sample(a, "HR@1").mean() == 0.75
    assert per_sample(np.array([0, 1, 5]), "NDCG@5") == pytest.approx([1.0, 1 / np.log2(3), 0.0])
    # 15 discordant pairs, all one way: p = 2 * 0.5**15
    assert mcnemar_exact(per_sample(a, "HR@1"), per_sample(b, "HR@1")) == pytest.approx(2 * 0.5**15)
    assert mcnemar_exact(per_sample(a, "HR@1"), per_sample(a, "HR@1")) == 1.0
    assert permutation_test(np.ones(50), np.zeros(50)) < 1e-3
    x = np.random.default_rng(0).random(200)
    assert permutation_test(x, x[::-1]) > 0.05
    c = compare(a, b)
    assert c["HR@1"]["diff"] == pytest.approx(0.375) and c["HR@1"]["relative"] == pytest.approx(1.0)
    assert c["HR@1"]["ci95"][0] > 0


def test_domain_words_reach_every_prompt(inputs, tmp_path, monkeypatch):
    """A run config's `templates:` section is the wording of stage 1 (TA and RPS), stage 2, every
    evaluated LLM model and the report's case studies; each stage folder records it."""
    import delrec.llm.scorer as scorer_mod
    import delrec.training.examples as examples_mod

    root, config = inputs
    seen = []

    def spy(module, name):
        real = getattr(module, name)

        def wrapped(templates, *args, **kwargs):
            seen.append((name, templates.item, templates.verb, templates.teacher))
            return real(templates, *args, **kwargs)

        monkeypatch.setattr(module, name, wrapped)

    for module, name in ((examples_mod, "ta_prompt"), (examples_mod, "rps_prompt"), (scorer_mod, "lsr_prompt")):
        spy(module, name)
    words = "templates={item: game, items: games, verb: played, verb_base: play}"
    run = tmp_path / "run"
    assert main(_args(config, run, words, "variants=[delrec, wo-lsr, mcp]")) == 0
    assert {name for name, *_ in seen} == {"ta_prompt", "rps_prompt", "lsr_prompt"}
    assert all(item == "game" and verb == "played" for _, item, verb, _ in seen), set(seen)
    assert {teacher for *_, teacher in seen} == {"SASRec"}
    for folder in ("distill/sasrec", "finetune/sasrec-delrec", "finetune/sasrec-mcp"):
        assert json.loads((run / folder / "config.json").read_text())["templates"]["item"] == "game"
    # other wording is another experiment: the LLM steps run again, the teacher does not
    assert main(_args(config, run, "templates={item: film}", "variants=[delrec, wo-lsr, mcp]")) == 0
    status = {s["step"]: s["this_invocation"] for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert status["teacher:sasrec"] == "skipped" and status["distill:sasrec"] == "ran" and status["eval:zero-shot"] == "ran"


def test_teachers_describe_themselves():
    from delrec.llm.templates import Templates

    assert Templates.for_teacher("gru4rec").teacher == "GRU4Rec" and "recurrent" in Templates.for_teacher("gru4rec").model_card
    assert "convolutional" in Templates.for_teacher("caser").model_card
    assert Templates.for_teacher("sasrec") == Templates()  # the defaults are SASRec's
    assert Templates.for_teacher("mymodel", item="song").teacher == "mymodel"
    with pytest.raises(ValueError, match=r"unknown setting 'itme' \(did you mean 'item'\?\)"):
        Templates.for_teacher("sasrec", itme="song")


def test_a_stage1_setting_reruns_only_the_steps_that_read_it(inputs, tmp_path):
    """A step's identity is what it reads: another soft-prompt length reruns stage 1, the stage-2
    runs that read its output (`delrec`) or draw a prompt of that length (`w USP`), and their
    evaluations; `w/o SP`, which reads neither, is not trained or scored again."""
    root, config = inputs
    run, extra = tmp_path / "run", ("variants=[delrec, wo-sp, usp]", "zero_shot=false")
    assert main(_args(config, run, *extra)) == 0
    assert main(_args(config, run, *extra, "distill.soft_tokens=3")) == 0
    now = {s["step"]: s["this_invocation"] for s in json.loads((run / "pipeline.json").read_text())["steps"]}
    assert now["distill:sasrec"] == "ran" and now["teacher:sasrec"] == "skipped"
    assert now["finetune:sasrec-delrec"] == "ran" and now["finetune:sasrec-usp"] == "ran"
    assert now["finetune:sasrec-wo-sp"] == "skipped" and now["eval:sasrec-wo-sp"] == "skipped"
