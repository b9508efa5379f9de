"""Stage 2's choice of adapter (`adapter: adalora | lora`, target modules, AdaLoRA's schedule) and
the snapshots the budget-quality curve scores, on tiny random models."""

import numpy as np
import pytest
import torch

from delrec.evaluation.metrics import evaluate
from delrec.llm.soft_prompt import SoftPrompt
from delrec.serving.scorers import finetuned_scorer
from delrec.training.config import FinetuneConfig
from delrec.training.finetune import adapter_config, finetune
from llm_helpers import tiny_llama_backbone
from test_distill import taught_run  # noqa: F401  (module-scoped fixture)

LORA = dict(teacher="gru4rec", method="wo-sp", adapter="lora", optimizer="adamw", lr=1e-2, steps=6, batch_size=2,
            valid_samples=4, eval_every=2, checkpoint_every=2, warmup_steps=1, lr_schedule="cosine",
            dtype="float32", device="cpu")


def test_lora_trains_only_its_adapters_and_loads_back(taught_run):  # noqa: F811
    run, data = taught_run
    bb = tiny_llama_backbone()
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    result = finetune(run, FinetuneConfig(**LORA, snapshot_every=2), name="lora", backbone=bb, progress=False)
    names = [n for n, p in bb.model.named_parameters() if p.requires_grad]
    assert names and all("lora_A" in n or "lora_B" in n for n in names)  # plain LoRA: no E, no rank allocator
    assert any("q_proj" in n for n in names) and any("v_proj" in n for n in names)
    assert not any("k_proj" in n or "mlp" in n for n in names)  # the default targets: q and v only
    lora_B = [p for n, p in bb.model.named_parameters() if "lora_B" in n]
    assert any(p.abs().sum() > 0 for p in lora_B)  # B starts at zero: non-zero means it trained
    for name, value in bb.model.base_model.model.state_dict().items():
        if "lora_" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    # a snapshot every 2 steps (here where the evaluations are), loadable as a stage-2 folder of its own
    snaps = sorted(p.name for p in (result.out_dir / "snapshots").iterdir())
    assert snaps == ["examples-000004", "examples-000008", "examples-000012"]
    rows = np.asarray(result.metrics["valid_rows"])
    hist = {h["examples_seen"]: h for h in result.metrics["valid_history"]}
    for snap in snaps:
        scorer = finetuned_scorer(result.out_dir / "snapshots" / snap, data, backbone=tiny_llama_backbone(), progress=False,
                                  run_dir=run)
        m = evaluate(scorer, data, "valid", rows=rows)["candidates"]
        assert m["NDCG@5"] == pytest.approx(hist[int(snap.split("-")[1])]["valid_NDCG@5"], abs=1e-6)


def test_all_linear_targets_every_block_layer(taught_run):  # noqa: F811
    run, _ = taught_run
    bb = tiny_llama_backbone()
    finetune(run, FinetuneConfig(**{**LORA, "steps": 1, "eval_every": 1}, target_modules="all-linear"), name="lora-all",
             backbone=bb, progress=False)
    names = {n.split(".")[-4] for n, p in bb.model.named_parameters() if p.requires_grad and "lora_A" in n}
    assert {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"} <= names
    assert not any("lm_head" in n for n, p in bb.model.named_parameters() if p.requires_grad)


def test_adalora_schedule_is_fractions_of_the_steps():
    bb = tiny_llama_backbone()
    cfg = adapter_config(FinetuneConfig(adapter="adalora", steps=200, tinit=0.1, tfinal=0.3, delta_t=10), bb)
    assert (cfg.total_step, cfg.tinit, cfg.tfinal, cfg.deltaT) == (200, 20, 60, 10)
    tiny = adapter_config(FinetuneConfig(adapter="adalora", steps=2, tinit=0.5, tfinal=0.4), bb)
    assert tiny.tinit + tiny.tfinal < tiny.total_step  # peft's requirement, kept on tiny budgets
    for bad in (dict(tinit=0.7, tfinal=0.4), dict(tinit=-0.1), dict(adapter="lorax"), dict(target_modules="all"),
                dict(lora_r=0)):
        with pytest.raises(ValueError):
            FinetuneConfig(**bad)


def test_vocab_soft_prompt_starts_from_word_embeddings():
    bb = tiny_llama_backbone()
    soft = SoftPrompt.for_backbone(bb, 6, seed=3, init="vocab")
    table = bb.model.get_input_embeddings().weight.detach()
    # each vector is one row of the word-embedding table, no two the same
    matches = [int(torch.nonzero((table == v).all(dim=1))[0]) for v in soft.embedding.detach()]
    assert len(set(matches)) == 6
    assert torch.equal(SoftPrompt.for_backbone(bb, 6, seed=3, init="vocab").embedding, soft.embedding)  # seeded
    with pytest.raises(ValueError, match="soft prompt init"):
        SoftPrompt.for_backbone(bb, 6, init="zeros")
