"""Stage 1 (distillation into the soft prompt) on tiny random models and a tiny run."""

import json
from itertools import product

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import make_run
from delrec.evaluation.metrics import evaluate
from delrec.llm.scorer import LLMScorer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import MASK, Prompt, Templates
from delrec.teachers import default_config
from delrec.teachers.lists import TeacherLists
from delrec.training import distill as distill_mod
from delrec.training.config import DistillConfig
from delrec.training.distill import distill
from delrec.training.examples import ExampleBuilder
from delrec.training.folder import StageFolder
from delrec.training.teacher import train_teacher
from delrec.training.weighting import LossWeighting
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone

WORDS = ["Toy", "Story", "Heat", "Fargo", "Alien", "Casablanca", "Titanic", "Matrix", "Jaws", "Vertigo", "Psycho", "Rocky"]


def titled_dataset(num_users=60, num_items=60, length=14, seed=0):
    """The sequential rule data set, with titles the test tokenizer knows ("Heat Fargo")."""
    rng = np.random.default_rng(seed)
    titles = [f"{a} {b}" for a, b in product(WORDS, WORDS) if a != b][:num_items]
    rows = []
    for u in range(num_users):
        start = int(rng.integers(num_items))
        rows += [(f"u{u}", f"i{(start + t) % num_items}", 1000 + t * 100 + u) for t in range(length)]
    interactions = pd.DataFrame(rows, columns=["user", "item", "timestamp"])
    items = pd.DataFrame({"item": [f"i{i}" for i in range(num_items)], "title": titles})
    return interactions, items


@pytest.fixture(scope="module")
def taught_run(tmp_path_factory):
    run, data = make_run(tmp_path_factory.mktemp("run"), titled_dataset)
    train_teacher(run, default_config("gru4rec", max_epochs=3, lr=0.1), device="cpu", progress=False)
    return run, data


FAST = dict(soft_tokens=4, steps=6, batch_size=2, warmup_steps=2, valid_samples=4, eval_every=3, checkpoint_every=2)


def _weights(bb):
    return {k: v.clone() for k, v in bb.model.state_dict().items()}


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_only_the_soft_prompt_changes(taught_run, make_backbone, tmp_path):
    run, _ = taught_run
    bb = make_backbone()
    before = _weights(bb)
    result = distill(run, DistillConfig(teacher="gru4rec", **FAST), name=f"only-{bb.name}", backbone=bb, progress=False)
    after = bb.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # every backbone weight bit-identical
    start = SoftPrompt.for_backbone(make_backbone(), FAST["soft_tokens"], seed=0).embedding
    assert not torch.equal(result.soft_prompt.embedding.detach(), start.detach())  # the soft prompt did move
    assert torch.equal(SoftPrompt.load(result.out_dir).embedding, result.soft_prompt.embedding.detach().float())
    out = result.out_dir
    assert (out / "soft_prompt.safetensors").exists() and (out / "metrics.json").exists()
    assert not (out / "checkpoint.pt").exists()
    m = json.loads((out / "metrics.json").read_text())
    assert set(m["untrained"]) == {"ta_valid_accuracy", "rps_valid_accuracy"} and m["steps"] == 6


def _responsive(bb, std=0.1):
    """Random weights at std 0.02 make a tiny model's output nearly blind to its context; at 0.1
    the soft prompt can steer it, which is what a learnable toy task needs."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in bb.model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, std)
    return bb


@pytest.mark.parametrize("make_backbone", [lambda: _responsive(tiny_llama_backbone()), tiny_t5_backbone], ids=["llama", "t5"])
def test_soft_prompt_learns_a_toy_task(taught_run, make_backbone):
    """Four fixed training examples: the stage-1 loss must fall clearly."""
    run, _ = taught_run
    cfg = DistillConfig(teacher="gru4rec", **{**FAST, "steps": 30, "eval_every": 100, "max_train_examples": 4,
                                              "soft_tokens": 8, "lr": 5e-2})
    bb = make_backbone()
    result = distill(run, cfg, name=f"toy-{bb.name}", backbone=bb, progress=False)
    log = [json.loads(line) for line in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
    total = [e["loss_ta"] + e["loss_rps"] for e in log if "loss_ta" in e]
    assert len(total) == 30
    assert np.mean(total[-4:]) < np.mean(total[:4]) - 0.1, total


def eval_lines(folder) -> list[dict]:
    return [e for e in map(json.loads, (folder / "train_log.jsonl").read_text().splitlines()) if "eval" in e]


def check_curve(evals: list[dict]) -> None:
    """Learning-curve lines: step 0 first, examples seen increasing, training seconds not decreasing
    and never above the wall time (which counts the evaluations too)."""
    assert evals[0]["step"] == 0 and evals[0]["examples_seen"] == 0 and evals[0]["seconds"] == 0
    seen = [e["examples_seen"] for e in evals]
    assert all(b > a for a, b in zip(seen, seen[1:])), seen
    for key in ("seconds", "wall_seconds"):
        values = [e[key] for e in evals]
        assert values == sorted(values), (key, values)
    assert all(e["seconds"] <= e["wall_seconds"] + 0.01 for e in evals)


def test_evaluations_log_learning_curves(taught_run):
    run, data = taught_run
    cfg = DistillConfig(teacher="gru4rec", **FAST, valid_lsr_samples=3)
    bb = tiny_llama_backbone()
    result = distill(run, cfg, name="curves", backbone=bb, progress=False)
    evals = eval_lines(result.out_dir)
    assert [e["step"] for e in evals] == [0, 3, 6] and [e["examples_seen"] for e in evals] == [0, 6, 12]
    check_curve(evals)
    for e in evals:
        m = e["eval"]
        for t in ("ta", "rps"):
            assert m[f"{t}_valid_HR@1"] == m[f"{t}_valid_accuracy"]
            assert 0 <= m[f"{t}_valid_HR@1"] <= m[f"{t}_valid_NDCG@5"] <= 1
        assert 0 <= m["valid_lsr_HR@1"] <= m["valid_lsr_NDCG@5"] <= 1
    m = json.loads((result.out_dir / "metrics.json").read_text())
    assert m["valid_history"] == evals and m["valid_lsr_samples"] == 3
    rows = m["valid_rows"]
    assert {t: len(r) for t, r in rows.items()} == {"ta": 4, "rps": 4, "lsr": 3}
    assert set(sum(rows.values(), [])) <= set(data.indices("valid").tolist())
    # the LSR rows are stage 2's valid rows (same seed), and the step-0 LSR metrics are the
    # evaluator's for the untrained soft prompt on them
    rng = np.random.default_rng(cfg.seed)
    rng.permutation(data.indices("train"))
    assert rows["lsr"] == np.sort(rng.permutation(data.indices("valid"))[:3]).tolist()
    fresh = tiny_llama_backbone()
    scorer = LLMScorer.for_run(data, fresh, templates=Templates(teacher="GRU4Rec"), progress=False,
                               soft_prompt=SoftPrompt.for_backbone(fresh, cfg.soft_tokens, seed=cfg.seed))
    ref = evaluate(scorer, data, "valid", rows=np.array(rows["lsr"]))["candidates"]
    assert evals[0]["eval"]["valid_lsr_HR@1"] == ref["HR@1"] and evals[0]["eval"]["valid_lsr_NDCG@5"] == ref["NDCG@5"]


def test_task_ranks_are_pessimistic():
    """A candidate tied with the label counts as ranked above it, as in delrec.evaluation.metrics."""

    class Fixed:
        batch_size = 8

        def score(self, prompts, soft_prompt):
            return [torch.tensor(SCORES[p.label]) for p in prompts]

    SCORES = {"a": [1.0, 1.0, 0.5], "b": [0.0, 2.0, 1.0], "c": [3.0, 3.0, 3.0]}
    prompts = [Prompt("", "", ("a", "b", "c"), label, False) for label in "abc"]
    assert distill_mod.prompt_ranks(Fixed(), prompts, None).tolist() == [1, 0, 2]
    assert distill_mod.accuracy(Fixed(), prompts, None) == pytest.approx(1 / 3)


def test_examples_from_a_hand_made_sequence(taught_run):
    run, data = taught_run
    teacher = TeacherLists.load(run, "gru4rec", data)
    b = ExampleBuilder(data, Templates(teacher="GRU4Rec"), teacher, ta_examples=2, top_h=5, seed=0)
    titles = [""] + data.items["title"].tolist()
    row = int(np.flatnonzero((data.split == 0) & (data.history_len >= 4))[0])
    hist = data.history[row][data.history[row] > 0]
    ta = b.ta(row)
    assert ta.label == titles[hist[-1]]  # the masked most recent item
    assert f'{MASK}, and next watched "{titles[data.target[row]]}"' in ta.after
    assert ta.after.count("After ") == 2
    assert f'After {", ".join(chr(34) + titles[i] + chr(34) for i in hist[:-2])}, the user watched "{titles[hist[-2]]}"' in ta.after
    assert ta.label in ta.candidates and titles[data.target[row]] not in ta.candidates
    assert sorted(ta.candidates) == sorted(titles[i] for i in np.where(data.candidates[row] == data.target[row], hist[-1], data.candidates[row]))
    rps = b.rps(row)
    assert rps.label == titles[teacher.topk[row][0]]
    assert sorted(rps.candidates) == sorted(titles[i] for i in teacher.topk[row][:5])
    assert b.rps(row) == rps  # the shuffle is fixed per sample


def test_training_examples_come_from_the_train_split_only(taught_run, monkeypatch):
    run, data = taught_run
    seen_rows = []
    real_build = ExampleBuilder.build

    def spy(self, task, rows):
        seen_rows.append((task, list(rows)))
        return real_build(self, task, rows)

    monkeypatch.setattr(ExampleBuilder, "build", spy)
    distill(run, DistillConfig(teacher="gru4rec", **{**FAST, "valid_samples": 3}), name="leak", backbone=tiny_llama_backbone(), progress=False)
    train = set(data.indices("train"))
    valid = set(data.indices("valid"))
    batches = [rows for task, rows in seen_rows if len(rows) == FAST["batch_size"]]
    assert batches and all(r in train for rows in batches for r in rows)
    evals = [rows for task, rows in seen_rows if len(rows) == 3]
    assert evals and all(r in valid for rows in evals for r in rows)


def test_resume_after_a_crash_equals_an_uninterrupted_run(taught_run, monkeypatch):
    run, _ = taught_run
    cfg = DistillConfig(teacher="gru4rec", **FAST)
    ref = distill(run, cfg, name="ref", backbone=tiny_llama_backbone(), progress=False)

    real = StageFolder.checkpoint
    calls = {"n": 0}

    def crash_after_second_checkpoint(*a, **k):
        real(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt("simulated kill")

    monkeypatch.setattr(StageFolder, "checkpoint", crash_after_second_checkpoint)
    with pytest.raises(KeyboardInterrupt):
        distill(run, cfg, name="crash", backbone=tiny_llama_backbone(), progress=False)
    monkeypatch.setattr(StageFolder, "checkpoint", real)
    assert (run / "distill" / "crash" / "checkpoint.pt").exists()
    resumed = distill(run, cfg, name="crash", backbone=tiny_llama_backbone(), progress=False)
    assert torch.equal(resumed.soft_prompt.embedding, ref.soft_prompt.embedding)
    strip = lambda p: [{k: v for k, v in json.loads(line).items() if k not in ("seconds", "wall_seconds")} for line in p.read_text().splitlines()]
    assert strip(resumed.out_dir / "train_log.jsonl") == strip(ref.out_dir / "train_log.jsonl")


def test_ablation_flags(taught_run):
    run, _ = taught_run
    no_ta = distill(run, DistillConfig(teacher="gru4rec", tasks=("rps",), **FAST), name="wo-ta", backbone=tiny_llama_backbone(), progress=False)
    log = [json.loads(line) for line in (no_ta.out_dir / "train_log.jsonl").read_text().splitlines()]
    assert all("loss_ta" not in e for e in log) and any("loss_rps" in e for e in log)
    no_rps = distill(run, DistillConfig(teacher="gru4rec", tasks=("ta",), **FAST), name="wo-rps", backbone=tiny_llama_backbone(), progress=False)
    assert set(no_rps.metrics["trained"]) == {"ta_valid_accuracy"}
    # w UDPSM: the LLM is updated too
    bb = tiny_llama_backbone()
    before = _weights(bb)
    distill(run, DistillConfig(teacher="gru4rec", update_llm=True, **FAST), name="udpsm", backbone=bb, progress=False)
    assert any(not torch.equal(before[k], v) for k, v in bb.model.state_dict().items())
    assert (run / "distill" / "udpsm" / "llm" / "config.json").exists()


def test_inverse_grad_norm_balances_the_tasks():
    p = torch.nn.Parameter(torch.zeros(3))
    w = LossWeighting("inverse-grad-norm", ("ta", "rps"), momentum=0.0)
    w.combine([p], {"ta": [torch.tensor([10.0, 0, 0])], "rps": [torch.tensor([0, 1.0, 0])]}, {"ta": 1.0, "rps": 1.0})
    assert w.current()["rps"] == pytest.approx(10 * w.current()["ta"])
    assert sum(w.current().values()) == pytest.approx(2.0)
    assert torch.allclose(p.grad[:2].abs(), torch.full((2,), p.grad[0].abs().item()))  # equal contributions
    fixed = LossWeighting("fixed", ("ta", "rps"), {"ta": 0.3, "rps": 0.7})
    fixed.combine([p], {"ta": [torch.ones(3)], "rps": [torch.ones(3)]}, {})
    assert torch.allclose(p.grad, torch.ones(3))
    with pytest.raises(ValueError):
        LossWeighting("magic", ("ta",))
