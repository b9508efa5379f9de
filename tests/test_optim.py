"""Stage-2 adapter initialisation and parameter groups (src/delrec/training/optim.py)."""

import pytest
import torch
from peft import AdaLoraConfig, get_peft_model

from delrec.training.finetune import orthogonal_regulariser
from delrec.training.optim import adapter_groups, init_adapters, lr_schedule, make_optimizer
from llm_helpers import tiny_llama_backbone


def _adalora(init_r=4):
    bb = tiny_llama_backbone().freeze()
    model = get_peft_model(bb.model, AdaLoraConfig(init_r=init_r, target_r=2, total_step=10, target_modules=["q_proj", "v_proj"],
                                                   task_type="CAUSAL_LM"))
    return bb, model


def test_orthogonal_init_starts_at_the_base_model_with_orthonormal_vectors():
    bb, model = _adalora()
    x = torch.randint(3, 20, (1, 9))
    with model.disable_adapter():
        base = model(input_ids=x).logits
    assert init_adapters(model, "orthogonal", seed=0) == 4  # q and v in 2 layers
    assert torch.equal(model(input_ids=x).logits, base)  # E = 0: exactly the base model
    for name, p in model.named_parameters():
        if "lora_A" in name:
            torch.testing.assert_close(p @ p.T, torch.eye(p.shape[0]), atol=1e-5, rtol=0)
        if "lora_B" in name:
            torch.testing.assert_close(p.T @ p, torch.eye(p.shape[1]), atol=1e-5, rtol=0)
        if "lora_E" in name:
            assert not p.any()
    assert orthogonal_regulariser(model).item() < 1e-4  # where AdaLoRA's regulariser wants P and Q
    # peft's own start, for comparison: far from orthonormal, so the regulariser starts large
    _, peft_start = _adalora()
    assert init_adapters(peft_start, "peft") == 0
    assert orthogonal_regulariser(peft_start).item() > 1.0
    with pytest.raises(ValueError, match="adapter initialisation"):
        init_adapters(model, "xavier")


def test_groups_give_singular_values_a_rate_relative_to_the_weight():
    _, model = _adalora()
    init_adapters(model, "orthogonal")
    groups = adapter_groups(model, lr=0.01, vector_lr_scale=0.1, relative=True)
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert {id(p) for g in groups for p in g["params"]} == trainable  # every trainable tensor, once
    assert sum(len(g["params"]) for g in groups) == len(trainable)
    modules = [m for m in model.modules() if hasattr(m, "lora_E") and hasattr(m, "base_layer")]
    for module, (values, vectors) in zip(modules, zip(groups[0::2], groups[1::2])):
        w = module.base_layer.weight
        rms_singular = torch.linalg.svdvals(w).square().mean().sqrt().item()
        assert values["params"][0] is module.lora_E["default"]
        assert values["lr"] == pytest.approx(0.01 * rms_singular, rel=1e-4)
        assert vectors["lr"] == pytest.approx(0.001)
    absolute = adapter_groups(model, lr=0.01, vector_lr_scale=0.1)
    assert sorted({round(g["lr"], 10) for g in absolute}) == [0.001, 0.01]
    extra = torch.nn.Parameter(torch.zeros(3))
    assert adapter_groups(model, 0.01, 0.1, extra=[extra])[-1] == {"params": [extra], "lr": 0.01}


@pytest.mark.parametrize("name", ["lion", "adamw"])
def test_optimizers_keep_group_rates(name):
    _, model = _adalora()
    opt = make_optimizer(name, adapter_groups(model, 0.01, 0.1, relative=True), 0.01, 1e-6)
    assert len({round(g["lr"], 8) for g in opt.param_groups}) > 2
    with pytest.raises(ValueError, match="unknown optimizer"):
        make_optimizer("sgd", [torch.nn.Parameter(torch.zeros(1))], 0.1, 0.0)


@pytest.mark.parametrize("name", ["constant", "linear", "cosine"])
def test_lr_schedule_warms_up_then_decays_to_the_floor(name):
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=1.0)
    scheduler = lr_schedule(optimizer, name, warmup_steps=4, total_steps=20, min_ratio=0.1)
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    if name == "constant":
        assert rates[4:] == pytest.approx([1.0] * 16)
    else:
        assert all(a >= b for a, b in zip(rates[3:], rates[4:]))  # never rises after warmup
        assert rates[-1] == pytest.approx(0.1)
        middle = rates[3 + 8]  # half way through the decay
        assert middle == pytest.approx(0.55)


def test_lr_schedule_refuses_unknown_names_and_floors():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="lr_schedule"):
        lr_schedule(optimizer, "step", 1, 10)
    with pytest.raises(ValueError, match="lr_min_ratio"):
        lr_schedule(optimizer, "linear", 1, 10, min_ratio=1.5)
