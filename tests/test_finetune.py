"""Stage 2 (AdaLoRA fine-tuning on the ground truth) on tiny random models."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from delrec.cli import main
from delrec.evaluation.metrics import evaluate
from delrec.llm.soft_prompt import SoftPrompt
from delrec.serving.scorers import finetuned_scorer
from delrec.training import finetune as finetune_mod
from delrec.training.config import DistillConfig, FinetuneConfig
from delrec.training.distill import distill
from delrec.training.finetune import finetune
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone
from test_distill import FAST, check_curve, eval_lines, taught_run  # noqa: F401  (module-scoped fixture)
from test_learning import steerable_llama, steerable_t5

STAGE2 = dict(teacher="gru4rec", steps=8, batch_size=2, valid_samples=4, eval_every=4, checkpoint_every=2,
              adapter="adalora", optimizer="lion", lr_schedule="constant", init_r=4, target_r=2, warmup_steps=2)


@pytest.fixture(scope="module")
def distilled(taught_run):  # noqa: F811 (the imported module fixture, by name)
    run, data = taught_run
    for make in (tiny_llama_backbone, tiny_t5_backbone):
        bb = make()
        distill(run, DistillConfig(teacher="gru4rec", **FAST), name=f"gru4rec-{bb.name}", backbone=bb, progress=False)
    return run, data


def _soft(run, bb):
    return str(run / "distill" / f"gru4rec-{bb.name}" / "soft_prompt.safetensors")


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_only_adapter_weights_change(distilled, make_backbone):
    run, _ = distilled
    bb = make_backbone()
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    soft_before = SoftPrompt.load(_soft(run, bb)).embedding.clone()
    result = finetune(run, FinetuneConfig(**STAGE2, soft_prompt=_soft(run, bb)), name=f"only-{bb.name}", backbone=bb, progress=False)
    # every base weight is bit-identical; the adapters moved
    peft_model = bb.model
    for name, value in peft_model.base_model.model.state_dict().items():
        clean = name.replace(".base_layer", "")
        if "lora_" in name or "ranknum" in name:
            continue
        assert torch.equal(value, base[clean]), name
    lora = [p for n, p in peft_model.named_parameters() if "lora_" in n]
    # E (the singular values) starts at zero under every adapter start: non-zero means it trained
    assert lora and any(p.abs().sum() > 0 for n, p in peft_model.named_parameters() if "lora_E" in n)
    # the stage-1 soft prompt was used frozen: bit-identical
    assert torch.equal(SoftPrompt.load(result.out_dir).embedding, soft_before)
    assert (result.out_dir / "adapter" / "adapter_config.json").exists()
    assert not (result.out_dir / "checkpoint.pt").exists()
    # learning-curve lines: before training, every eval_every steps (the last is the end)
    evals = eval_lines(result.out_dir)
    assert [e["step"] for e in evals] == [0, 4, 8] and [e["examples_seen"] for e in evals] == [0, 8, 16]
    check_curve(evals)
    for e in evals:
        # the run has a teacher: how often the LLM's top-1 is the teacher's is logged beside the metrics
        assert set(e["eval"]) == {f"valid_{k}" for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10", "teacher_agreement")}
        assert 0 <= e["eval"]["valid_teacher_agreement"] <= 1
        assert 0 <= e["eval"]["valid_HR@1"] <= e["eval"]["valid_NDCG@5"] <= 1
    m = result.metrics
    assert m["valid_history"] == [{"step": e["step"], "examples_seen": e["examples_seen"], "seconds": e["seconds"],
                                   "valid_HR@1": e["eval"]["valid_HR@1"], "valid_NDCG@5": e["eval"]["valid_NDCG@5"]}
                                  for e in evals]
    # the step-0 evaluation is a reference only: the best (and saved) adapter is a trained one
    assert m["best_step"] in (4, 8) and m["best_valid_NDCG@5"] == max(e["eval"]["valid_NDCG@5"] for e in evals[1:])
    assert m["seconds"] >= evals[-1]["seconds"] and m["wall_seconds"] >= m["seconds"]


@pytest.mark.parametrize("make_backbone,objective", [(steerable_llama, "candidates"), (steerable_t5, "candidates"),
                                                      (steerable_llama, "label")])
def test_loss_falls_on_a_toy_task(distilled, make_backbone, objective):
    """The recommendation loss itself falls (not only AdaLoRA's regulariser, which the logged `loss`
    includes), with either objective; tests/test_learning.py checks what it learns."""
    run, _ = distilled
    bb = make_backbone()
    cfg = FinetuneConfig(**{**STAGE2, "method": "wo-sp", "steps": 20, "eval_every": 100, "lr": 1e-1}, max_train_examples=4,
                         objective=objective)
    result = finetune(run, cfg, name=f"toy-{bb.name}-{objective}", backbone=bb, progress=False)
    losses = [json.loads(line)["loss_rec"] for line in (result.out_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in line]
    assert len(losses) == 20 and np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.2, losses


def test_methods_of_stage_2(distilled):
    run, _ = distilled
    bb = tiny_llama_backbone()
    ulsr = finetune(run, FinetuneConfig(**STAGE2, method="ulsr", soft_prompt=_soft(run, bb)), name="ulsr", backbone=bb, progress=False)
    assert not torch.equal(SoftPrompt.load(ulsr.out_dir).embedding, SoftPrompt.load(_soft(run, bb)).embedding)
    for variant in ("wo-sp", "mcp", "wo-dpsm"):
        res = finetune(run, FinetuneConfig(**STAGE2, method=variant), name=variant, backbone=tiny_llama_backbone(), progress=False)
        assert not (res.out_dir / "soft_prompt.safetensors").exists()
    usp = finetune(run, FinetuneConfig(**STAGE2, method="usp", soft_tokens=3), name="usp", backbone=tiny_llama_backbone(), progress=False)
    assert SoftPrompt.load(usp.out_dir).num_tokens == 3
    with pytest.raises(FileNotFoundError, match="delrec distill"):
        finetune(run, FinetuneConfig(**{**STAGE2, "teacher": "caser"}), name="x", backbone=tiny_llama_backbone(), progress=False)
    with pytest.raises(ValueError, match="unknown stage-2 method .magic."):
        FinetuneConfig(method="magic")


def test_resume_after_a_crash_equals_an_uninterrupted_run(distilled, monkeypatch):
    run, _ = distilled
    cfg = FinetuneConfig(**STAGE2, soft_prompt=_soft(run, tiny_llama_backbone()))
    ref = finetune(run, cfg, name="ref", backbone=tiny_llama_backbone(), progress=False)
    calls = {"n": 0}
    real_save = torch.save

    def crash_after_second_checkpoint(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if isinstance(obj, dict) and "allocator" in obj:
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(finetune_mod.torch, "save", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        finetune(run, cfg, name="crash", backbone=tiny_llama_backbone(), progress=False)
    monkeypatch.setattr(finetune_mod.torch, "save", real_save)
    resumed = finetune(run, cfg, name="crash", backbone=tiny_llama_backbone(), progress=False)
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "wall_seconds")} for line in p.read_text().splitlines()]
    assert strip(resumed.out_dir / "train_log.jsonl") == strip(ref.out_dir / "train_log.jsonl")
    assert resumed.metrics["best_valid_NDCG@5"] == ref.metrics["best_valid_NDCG@5"]
    no_time = lambda m: [{k: v for k, v in e.items() if k != "seconds"} for e in m["valid_history"]]
    assert no_time(resumed.metrics) == no_time(ref.metrics) and resumed.metrics["valid_history"][0]["step"] == 0


def test_finetune_and_evaluate_commands(distilled, tmp_path, capsys):
    run, _ = distilled
    bb = tiny_llama_backbone()
    model_dir = tmp_path / "tiny-llama"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    assert main(["finetune", "--run", str(run), "--llm", str(model_dir), "--teacher", "gru4rec", "--variant", "usp",
                 "--steps", "4", "--batch-size", "2", "--dtype", "float32", "--name", "cli", "--quiet",
                 "--set", "valid_samples=3", "--set", "eval_every=2", "--set", "soft_tokens=2", "--set", "init_r=2", "--set", "target_r=1",
                 "--set", "adapter=adalora", "--set", "optimizer=lion", "--set", "lr_schedule=constant", "--set", "warmup_steps=10"]) == 0
    assert "best valid NDCG@5" in capsys.readouterr().out
    assert main(["evaluate", "--run", str(run), "--finetuned", str(run / "finetune" / "cli"), "--limit", "5", "--dtype", "float32"]) == 0
    assert "| delrec:cli | 5 |" in capsys.readouterr().out


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_saved_adapter_reproduces_the_best_valid_score(distilled, make_backbone):
    """The pruned AdaLoRA adapter saved at the best step, loaded back (rank pattern included), scores
    the valid subset exactly as it did in training."""
    run, data = distilled
    bb = make_backbone()
    # pruning from the first step (tinit 0, deltaT 1), so the adapter saved at the best step is pruned
    cfg = FinetuneConfig(**{**STAGE2, "lr": 0.05}, tinit=0, tfinal=0, delta_t=1, soft_prompt=_soft(run, bb))
    result = finetune(run, cfg, name=f"reload-{bb.name}", backbone=bb, progress=False)
    adapter = load_file(str(result.out_dir / "adapter" / "adapter_model.safetensors"))
    assert any(v.shape[0] < cfg.init_r for k, v in adapter.items() if "lora_E" in k)  # ranks were pruned
    rng = np.random.default_rng(cfg.seed)
    rng.permutation(data.indices("train"))  # finetune draws the train order first, then the valid subset
    valid_rows = np.sort(rng.permutation(data.indices("valid"))[: cfg.valid_samples])
    assert result.metrics["valid_rows"] == valid_rows.tolist()  # recorded for the report's reference lines
    scorer = finetuned_scorer(result.out_dir, data, backbone=make_backbone(), progress=False)
    ndcg = evaluate(scorer, data, "valid", rows=valid_rows)["candidates"]["NDCG@5"]
    assert ndcg == pytest.approx(result.metrics["best_valid_NDCG@5"], abs=1e-12)


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_gradient_checkpointing_is_used_and_changes_no_result(distilled, make_backbone, monkeypatch):
    """Both stages with `gradient_checkpointing`: layers are recomputed in backward (the checkpoint
    function runs), the stage-1 backbone stays bit-identical (no dropout switched on), and the
    soft prompt and adapter match a run without it."""
    import transformers.modeling_utils as mu

    run, _ = distilled
    calls = {"n": 0}
    real = mu.checkpoint

    def counting(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(mu, "checkpoint", counting)
    out = {}
    for gc in (False, True):
        bb = make_backbone()
        before = {k: v.clone() for k, v in bb.model.state_dict().items()}
        name = f"gc{int(gc)}-{bb.name}"
        calls["n"] = 0
        s1 = distill(run, DistillConfig(teacher="gru4rec", **{**FAST, "steps": 3}, gradient_checkpointing=gc),
                     name=name, backbone=bb, progress=False)
        assert (calls["n"] > 0) == gc
        assert all(torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
        calls["n"] = 0
        s2 = finetune(run, FinetuneConfig(**{**STAGE2, "steps": 3}, soft_prompt=str(s1.out_dir / "soft_prompt.safetensors"),
                                          gradient_checkpointing=gc), name=name, backbone=make_backbone(), progress=False)
        assert (calls["n"] > 0) == gc
        out[gc] = (s1.soft_prompt.embedding.detach(), load_file(str(s2.out_dir / "adapter" / "adapter_model.safetensors")))
    torch.testing.assert_close(out[True][0], out[False][0], atol=1e-6, rtol=0)
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, atol=1e-6, rtol=1e-5)
