"""Seeds and sweeps (delrec.experiments): per-seed folders and an aggregate equal to the one
computed by hand, a sweep that shares what does not depend on the swept setting (counted from each
point's pipeline.json), resumes after an interruption, and draws the Figure 8 panels."""

import json
import math

import numpy as np
import pytest

from conftest import write_pipeline_inputs
from delrec.cli import main
from delrec.config import PipelineConfig
from delrec.experiments import Experiment, check_experiment, seed_t_test
from delrec.pipeline import Pipeline
from delrec.teachers.lists import stored_top_h
from llm_helpers import tiny_llama_backbone

QUICK = [
    "teacher.max_epochs=2", "threads=1",
    "distill={soft_tokens: 4, top_h: 3, steps: 2, batch_size: 2, valid_samples: 4, valid_lsr_samples: 0, eval_every: 1000}",
    "finetune={steps: 2, batch_size: 2, valid_samples: 4, eval_every: 1000, adapter: lora, lora_r: 2, lora_alpha: 4, warmup_steps: 1}",
    "variants=[delrec]", "zero_shot=true", "test_samples=12", "eval_batch_size=4", "top_h=3",
]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment-inputs")
    return root, write_pipeline_inputs(root, tiny_llama_backbone(), num_users=50, num_items=30, length=16)


def _read(path):
    return json.loads(path.read_text())


def _config(config, run, *extra) -> PipelineConfig:
    return PipelineConfig.from_file(config, [f"run_dir={run}", *QUICK, *extra])


def test_two_seeds_give_per_seed_folders_and_the_hand_computed_aggregate(inputs, tmp_path, capsys):
    _, config = inputs
    run = tmp_path / "seeds"
    assert main(["run", "--config", str(config), "--quiet", "--seeds", "0,1", f"run_dir={run}", *QUICK]) == 0
    for seed in (0, 1):
        folder = run / f"seed-{seed}"
        # the split is shared (one prepared folder), everything that depends on the seed is the seed's own
        assert (folder / "data").is_symlink() and (folder / "data").resolve() == (run / "data").resolve()
        assert not (folder / "teachers").is_symlink()
        assert _read(folder / "teachers" / "sasrec" / "config.json")["teacher"]["seed"] == seed
        assert _read(folder / "distill" / "sasrec" / "config.json")["seed"] == seed
        assert _read(folder / "finetune" / "sasrec-delrec" / "config.json")["seed"] == seed
    result = _read(run / "experiment.json")
    [point] = result["points"]
    assert point["seeds"] == [0, 1]
    per_seed = {m: [_read(run / f"seed-{s}" / "eval" / "pipeline" / f"{m}.json")["candidates"] for s in (0, 1)]
                for m in ("popularity", "sasrec", "sasrec-delrec", "zero-shot")}
    for model, values in per_seed.items():
        for metric in ("HR@1", "NDCG@5"):
            xs = [v[metric] for v in values]
            got = point["models"][model][metric]
            assert got["mean"] == pytest.approx(np.mean(xs)) and got["std"] == pytest.approx(np.std(xs, ddof=1)), (model, metric)
    # the paired t-test over seeds, by hand: t = mean(d) / (sd(d) / sqrt(n))
    for other in ("sasrec", "popularity"):
        for metric in ("HR@1", "NDCG@5"):
            d = np.array([a[metric] - b[metric] for a, b in zip(per_seed["sasrec-delrec"], per_seed[other])])
            test = point["tests"][f"sasrec-delrec vs {other}"][metric]
            assert test["over_seeds"]["mean_diff"] == pytest.approx(d.mean())
            if d.std(ddof=1) > 0:
                assert test["over_seeds"]["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(2)))
            else:
                assert test["over_seeds"]["t"] is None
            assert set(test["per_seed"]) == {"0", "1"}  # each seed's per-sample paired test kept
    report = (run / "report.md").read_text()
    assert "paired t-test over seeds" in report and "| sasrec-delrec vs popularity |" in report and "± " in report
    # `delrec report` on the experiment folder writes the aggregate again
    (run / "report.md").unlink()
    assert main(["report", str(run)]) == 0 and "paired t-test" in (run / "report.md").read_text()


def test_a_sweep_shares_what_it_can_and_resumes(inputs, tmp_path, monkeypatch):
    _, config = inputs
    run = tmp_path / "sweep"
    sweep = "sweep={distill.soft_tokens: [2, 4], distill.top_h: [2, 3]}"
    experiment = Experiment(_config(config, run, sweep))
    # axes: soft_tokens 2 and 4 at h 3, and h 2 at 4 tokens; (4, 3) is one run for both axes
    assert [p.values for p in experiment.points] == [{"distill.soft_tokens": 2, "distill.top_h": 3},
                                                     {"distill.soft_tokens": 4, "distill.top_h": 3},
                                                     {"distill.soft_tokens": 4, "distill.top_h": 2}]

    real, runs = Pipeline.finetune, []

    def interrupted(self):  # the second point is cut off when its stage 2 starts
        runs.append(self.run)
        if len(runs) == 2:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Pipeline, "finetune", interrupted)
    with pytest.raises(KeyboardInterrupt):
        Experiment(_config(config, run, sweep), progress=False).execute()
    monkeypatch.setattr(Pipeline, "finetune", real)
    result = Experiment(_config(config, run, sweep), progress=False).execute()

    first, second, third = [p.folder for p in experiment.points]
    s = {f: {e["step"]: e["this_invocation"] for e in _read(f / "pipeline.json")["steps"]} for f in (first, second, third)}
    assert set(s[first].values()) == {"skipped"}  # finished in the first invocation
    assert s[second]["distill:sasrec"] == "skipped" and s[second]["finetune:sasrec-delrec"] == "ran"  # resumed where it stopped
    for folder in (second, third):
        # shared: the data, the teacher (trained once, by the first point) and the evaluations upstream of stage 1
        assert s[folder]["data"] == s[folder]["teacher:sasrec"] == "skipped"
        assert s[folder]["eval:random"] == s[folder]["eval:popularity"] == s[folder]["eval:sasrec"] == s[folder]["eval:zero-shot"] \
            == "skipped"
        assert s[folder]["eval:sasrec-delrec"] == "ran"
        assert (folder / "teachers").is_symlink() and (folder / "data").is_symlink()
    # the teachers store the longest list any point reads
    assert stored_top_h(run / "shared" / "all" / "teachers" / "sasrec" / "topk.parquet") == 3
    assert [_read(f / "distill" / "sasrec" / "config.json")["soft_tokens"] for f in (first, second, third)] == [2, 4, 4]
    assert [_read(f / "distill" / "sasrec" / "config.json")["top_h"] for f in (first, second, third)] == [3, 3, 2]
    assert len(result["points"]) == 3 and result["sweep_base"] == {"distill.soft_tokens": 4, "distill.top_h": 3}
    report = (run / "report.md").read_text()
    assert "## The sweep" in report
    for key in ("distill-soft_tokens", "distill-top_h"):
        assert (run / "figures" / f"fig8-{key}.png").stat().st_size > 1000 and f"fig8-{key}.png" in report


def test_grid_mode_runs_every_combination(inputs, tmp_path):
    _, config = inputs
    experiment = Experiment(_config(config, tmp_path / "grid", "sweep={distill.soft_tokens: [2, 4], distill.top_h: [2, 3]}",
                                    "sweep_mode=grid", "seeds=[0, 1]"))
    assert len(experiment.points) == 8
    assert {p.folder.relative_to(tmp_path / "grid").as_posix() for p in experiment.points if p.seed == 1} == {
        f"sweep/distill.soft_tokens={s},distill.top_h={h}/seed-1" for s in (2, 4) for h in (2, 3)}


@pytest.mark.parametrize("extra, problem", [
    (["sweep={run_dir: [a, b]}"], "run_dir cannot be swept"),
    (["sweep={distill.seed: [1, 2]}"], "distill.seed cannot be swept"),
    (["sweep={distill.soft_tokens: []}"], "non-empty list"),
    (["sweep={distill.soft_tokens: [2, 2]}"], "repeats a value"),
    (["seeds=[1, 1]"], "repeats a seed"),
    (["sweep_mode=spiral", "sweep={distill.soft_tokens: [2]}"], "not axes or grid"),
    (["sweep={distill.soft_tokens: [two]}"], "soft_tokens"),  # each point's settings are checked before anything runs
])
def test_experiments_that_cannot_run_are_refused_before_anything_runs(inputs, tmp_path, extra, problem):
    _, config = inputs
    with pytest.raises(ValueError, match=problem):
        check_experiment(c := _config(config, tmp_path / "bad", *extra))
        Experiment(c)
    assert not (tmp_path / "bad").exists()


def test_a_swept_data_setting_shares_neither_data_nor_teachers(inputs, tmp_path):
    _, config = inputs
    experiment = Experiment(_config(config, tmp_path / "data-sweep", "sweep={protocol.num_candidates: [10, 15]}"))
    assert not experiment.share_data and not experiment.share_teachers
    assert all(experiment._shared(p) == {} for p in experiment.points)
    teachers = Experiment(_config(config, tmp_path / "h-sweep", "sweep={distill.top_h: [2, 3]}", "seeds=[0, 1]"))
    assert {p.seed: teachers._shared(p)["teachers"].relative_to(tmp_path / "h-sweep").as_posix() for p in teachers.points} == {
        0: "shared/seed-0/teachers", 1: "shared/seed-1/teachers"}  # one set of teachers per seed


def test_sweep_keys_given_as_a_nested_mapping_are_dotted(inputs, tmp_path):
    _, config = inputs
    c = _config(config, tmp_path / "nested", "sweep.distill.soft_tokens=[2, 4]")
    assert c.sweep == {"distill.soft_tokens": [2, 4]}


def test_seed_t_test():
    a, b = [0.30, 0.34, 0.31], [0.25, 0.27, 0.28]
    d = np.subtract(a, b)
    out = seed_t_test(a, b)
    assert out["t"] == pytest.approx(d.mean() / (d.std(ddof=1) / math.sqrt(3))) and out["df"] == 2
    assert 0 < out["p_value"] < 0.05
    assert seed_t_test([0.3], [0.2])["p_value"] is None  # one seed: no test
    assert seed_t_test([0.3, 0.4], [0.2, 0.3])["t"] is None  # differences that do not vary


def test_the_aggregate_of_three_seeds_is_the_hand_computed_one(tmp_path):
    """Evaluations written by hand for 3 seeds (ranks chosen so that the metrics differ per seed):
    the mean, the n-1 standard deviation and the paired t statistic over seeds are those computed
    here, and each seed keeps its per-sample McNemar test."""
    from types import SimpleNamespace

    from scipy import stats

    from delrec.evaluation.significance import mcnemar_exact, per_sample
    from delrec.experiments import aggregate

    ranks = {0: {"sasrec-delrec": [0, 0, 1, 2, 0, 5], "sasrec": [0, 1, 1, 2, 3, 5]},
             1: {"sasrec-delrec": [0, 1, 0, 0, 4, 2], "sasrec": [1, 1, 0, 0, 4, 2]},
             2: {"sasrec-delrec": [0, 0, 0, 0, 1, 1], "sasrec": [0, 2, 3, 3, 1, 1]}}
    runs = []
    for seed, models in ranks.items():
        for model, r in models.items():
            path = tmp_path / f"seed-{seed}" / "eval" / "pipeline" / f"{model}.json"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps({"model": model, "num_samples": 6, "ranks": r,
                                        "candidates": {"HR@1": float(np.mean(np.array(r) < 1)),
                                                       "NDCG@5": float(np.mean(per_sample(np.array(r), "NDCG@5")))}}))
        runs.append({"point": "base", "values": {}, "seed": seed, "folder": str(tmp_path / f"seed-{seed}"), "steps": []})
    experiment = SimpleNamespace(run=tmp_path, config=PipelineConfig(run_dir=str(tmp_path), seeds=[0, 1, 2]))
    [point] = aggregate(experiment, runs, seconds=1.0)["points"]
    ours = [np.mean(np.array(ranks[s]["sasrec-delrec"]) < 1) for s in ranks]  # 3/6, 3/6, 4/6
    theirs = [np.mean(np.array(ranks[s]["sasrec"]) < 1) for s in ranks]  # 1/6, 2/6, 1/6
    got = point["models"]["sasrec-delrec"]["HR@1"]
    assert got["mean"] == pytest.approx(np.mean(ours)) and got["std"] == pytest.approx(np.std(ours, ddof=1)) and got["n"] == 3
    d = np.subtract(ours, theirs)
    test = point["tests"]["sasrec-delrec vs sasrec"]["HR@1"]
    t = d.mean() / (d.std(ddof=1) / math.sqrt(3))
    assert test["over_seeds"]["t"] == pytest.approx(t) and test["over_seeds"]["df"] == 2
    assert test["over_seeds"]["p_value"] == pytest.approx(2 * stats.t.sf(abs(t), df=2))  # two-sided
    for s in ranks:
        want = mcnemar_exact(np.array(ranks[s]["sasrec-delrec"]) < 1, np.array(ranks[s]["sasrec"]) < 1)
        assert test["per_seed"][str(s)]["p_value"] == pytest.approx(want)
