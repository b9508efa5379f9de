"""Every preset in configs/ is a valid `delrec run` config, and the GPU preset keeps its promises."""

from __future__ import annotations

from pathlib import Path

import pytest

from delrec import methods
from delrec.config import PipelineConfig
from delrec.training.config import DistillConfig, FinetuneConfig

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
# samples in the train split of ML-100K under the paper protocol (docs/protocol.md: 78,678 train,
# 9,832 valid, 9,834 test); not recomputed here, since the data is not in the repository
ML100K_TRAIN_SAMPLES = 78_678


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_preset_loads(path):
    config = PipelineConfig.from_file(path)
    assert config.methods and config.teachers
    if config.seeds or config.sweep:  # every run of a seeds or sweep preset is a valid config too
        from delrec.experiments import Experiment

        assert Experiment(config).configs


def test_the_rq4_presets_sweep_the_papers_settings():
    from delrec.experiments import Experiment

    quick = Experiment(PipelineConfig.from_file(next(p for p in CONFIGS if p.name == "ml100k-rq4-quick.yaml")))
    assert len(quick.points) == 10 and {p.seed for p in quick.points} == {0, 1}
    full = Experiment(PipelineConfig.from_file(next(p for p in CONFIGS if p.name == "ml100k-rq4.yaml")))
    assert full.config.sweep == {"distill.soft_tokens": [10, 20, 40, 80, 100], "distill.top_h": [3, 5, 10, 15]}
    assert len(full.points) == 27 and all(c.top_h == 15 for c in full.configs.values())  # lists long enough for h 15


def test_the_gpu_preset():
    path = next(p for p in CONFIGS if p.name == "ml100k-gpu.yaml")
    c = PipelineConfig.from_file(path)
    assert (c.llm, c.dtype, c.device, c.dataset) == ("smollm2-135m", "bfloat16", "cuda", "ml-100k")
    assert c.test_samples is None  # the whole test split
    assert c.teachers == ["sasrec", "gru4rec", "caser"] and c.llm_teachers == ["sasrec"]
    assert c.zero_shot
    # DELRec, every ablation and every Table II baseline registered: a new method belongs here too
    missing = set(methods.METHODS) - set(c.methods)
    assert not missing, f"configs/ml100k-gpu.yaml runs every method of delrec.methods; add {sorted(missing)}"
    # one pass over the train split per stage (stage 1: per task)
    d, f = c.distill, c.finetune
    stage1 = d["steps"] * d.get("batch_size", DistillConfig.batch_size) * d.get("grad_accum", DistillConfig.grad_accum)
    stage2 = f["steps"] * f.get("batch_size", FinetuneConfig.batch_size) * f.get("grad_accum", FinetuneConfig.grad_accum)
    assert stage1 >= ML100K_TRAIN_SAMPLES and stage2 >= ML100K_TRAIN_SAMPLES, (stage1, stage2)
    assert set(d.get("tasks", DistillConfig.tasks)) == {"ta", "rps"}
    # the stages checkpoint often enough that a session stopped by its time limit loses little
    assert d.get("checkpoint_every", 10) <= 100 and f.get("checkpoint_every", 10) <= 100
