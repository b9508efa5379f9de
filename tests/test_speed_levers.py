"""Stage 2's speed levers and the distillation term (issue: quality per CPU-second), on tiny models.

Each lever is a setting whose default is today's behaviour: the tests check that the default
computes exactly what it did (bit-identical losses), and that each lever does what it says
(adapters only on the top layers and no gradient below them; a seeded subset of negatives scored,
the label always among them; the teacher's scores as a soft target; int8 scoring that leaves the
trained model alone and keeps its rankings)."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from delrec.data.store import RunData
from delrec.evaluation.metrics import candidate_ranks
from delrec.llm.losses import ranking_loss
from delrec.llm.quantize import int8_copy
from delrec.llm.scorer import LLMScorer
from delrec.llm.verbalizer import Verbalizer
from delrec.serving.scorers import finetuned_scorer
from delrec.training.config import FinetuneConfig
from delrec.training.finetune import FinetuneStage, finetune
from delrec.training.loop import Progress
from delrec.training.targets import CandidateTargets, teacher_scorer
from llm_helpers import tiny_llama_backbone
from test_distill import taught_run  # noqa: F401  (module-scoped fixture: titled run + GRU4Rec)
from test_learning import FAST_LEARN, steerable_llama

BASE = dict(teacher="gru4rec", method="wo-sp", steps=4, batch_size=2, valid_samples=4, eval_every=4,
            checkpoint_every=10**6, adapter="lora", optimizer="adamw", dtype="float32", device="cpu")


def _prompts(run, data: RunData, bb, rows):
    scorer = LLMScorer.for_run(data, bb, progress=False)
    return scorer, scorer.prompts(data, rows, labels=True)


def test_default_training_loss_is_todays_cross_entropy_bit_for_bit(taught_run):  # noqa: F811
    """keep=None, no teacher (and a teacher at weight 0): the loss is the plain cross-entropy over
    every candidate's verbalizer score, computed as before the levers existed."""
    run, data = taught_run
    bb = steerable_llama()
    rows = data.indices("train")[:3]
    scorer, prompts = _prompts(run, data, bb, rows)
    v = scorer.verbalizer
    scores = v.sequence_logprobs(prompts, [v.continuations(p) for p in prompts], None)
    labels = [p.candidates.index(p.label) for p in prompts]
    before = torch.stack([-F.log_softmax(s.float(), dim=0)[y] for s, y in zip(scores, labels)]).mean()
    assert torch.equal(v.loss(prompts, None), before)
    teacher = [torch.randn(len(p.candidates)) for p in prompts]
    parts = v.training_loss(prompts, None, teacher=teacher, distill_weight=0.0)
    assert torch.equal(parts.total, before) and parts.kl is not None and 0 <= parts.teacher_agreement <= 1


def test_distillation_term_is_hintons_kl():
    scores = [torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-0.5, -0.4, -2.0])]
    teacher = [torch.tensor([3.0, 1.0, 0.0]), torch.tensor([0.0, 2.0, 1.0])]
    t, w = 2.0, 0.5
    parts = ranking_loss(scores, [0, 2], teacher, distill_weight=w, temperature=t)
    ce = torch.stack([-F.log_softmax(scores[0], 0)[0], -F.log_softmax(scores[1], 0)[2]]).mean()
    kl = torch.stack([F.kl_div(F.log_softmax(s / t, 0), F.log_softmax(q / t, 0), log_target=True, reduction="sum")
                      for s, q in zip(scores, teacher)]).mean()
    assert torch.allclose(parts.total, ce + w * t * t * kl)
    assert torch.allclose(parts.kl, kl) and parts.teacher_agreement == 1.0  # both top-1s agree with the teacher's
    only_teacher = ranking_loss(scores, [0, 2], teacher, distill_weight=1.0, temperature=t, label_weight=0.0)
    assert torch.allclose(only_teacher.total, t * t * kl)


def test_train_negatives_keep_the_label_and_a_seeded_subset(taught_run):  # noqa: F811
    run, data = taught_run
    rows = data.indices("train")[:6]
    order = np.tile(np.arange(data.candidates.shape[1]), (len(rows), 1))[:, ::-1]  # another display order
    keep = CandidateTargets(data, None, 3, seed=0).keep(rows, order)
    again = CandidateTargets(data, None, 3, seed=0).keep(rows, order)
    other_seed = CandidateTargets(data, None, 3, seed=1).keep(rows, order)
    assert keep == again and keep != other_seed
    for row, k in zip(rows, keep):
        shown = data.candidates[row][order[0]]
        assert len(k) == 4 and k == sorted(set(k)) and data.target[row] in shown[k]
    assert CandidateTargets(data, None, None, seed=0).keep(rows, order) is None  # all scored: today's
    assert CandidateTargets(data, None, data.candidates.shape[1] - 1, seed=0).keep(rows, order) is None
    with pytest.raises(ValueError, match="only 14 negatives"):
        CandidateTargets(data, None, 15, seed=0)


def test_teacher_scores_follow_the_display_order(taught_run):  # noqa: F811
    run, data = taught_run
    teacher = teacher_scorer(run, "gru4rec", data, required=True)
    rows = data.indices("train")[:3]
    order = np.stack([np.random.default_rng(i).permutation(data.candidates.shape[1]) for i in range(len(rows))])
    shown = CandidateTargets(data, teacher, None, seed=0).teacher_scores(rows, order)
    stored = np.asarray(teacher.score_candidates(data, rows))
    for s, st, o in zip(shown, stored, order):
        assert np.allclose(s.numpy(), st[o])
    assert teacher_scorer(run, "no-such-teacher", data, required=False) is None
    with pytest.raises(FileNotFoundError, match="no trained teacher"):
        teacher_scorer(run, "no-such-teacher", data, required=True)


def test_adapters_on_the_top_layers_only_and_no_gradient_below(taught_run):  # noqa: F811
    run, data = taught_run
    bb = tiny_llama_backbone()
    stage = FinetuneStage(run, FinetuneConfig(**BASE, adapter_layers=1), "top1", bb)
    names = [n for n, p in stage.peft_model.named_parameters() if p.requires_grad]
    assert names and all(".layers.1." in n for n in names), names  # the tiny llama has layers 0 and 1
    seen = []
    layer0 = stage.peft_model.base_model.model.model.layers[0]
    layer0.register_forward_hook(lambda m, i, out: seen.append((out[0] if isinstance(out, tuple) else out).requires_grad))
    stage.step(Progress())
    assert seen and not any(seen)  # the lowest layer ran without autograd: backward stops above it
    assert all(p.grad is None for p in stage.peft_model.parameters() if p.requires_grad)  # cleared after the step
    with pytest.raises(ValueError, match="has 2 layers"):
        FinetuneStage(run, FinetuneConfig(**BASE, adapter_layers=3), "top3", tiny_llama_backbone())


def test_settings_are_checked():
    with pytest.raises(ValueError, match="objective `candidates`"):
        FinetuneConfig(distill_weight=1.0, objective="label")
    with pytest.raises(ValueError, match="train_negatives"):
        FinetuneConfig(train_negatives=0)
    with pytest.raises(ValueError, match="adapter_layers"):
        FinetuneConfig(adapter_layers=0)
    with pytest.raises(ValueError, match="eval_weights"):
        FinetuneConfig(eval_weights="int4")
    with pytest.raises(ValueError, match="nothing to learn"):
        FinetuneConfig(label_weight=0.0)


def test_levers_train_log_and_resume_identity(taught_run):  # noqa: F811
    """Every lever at once runs through the stage: the log has the distillation term and the
    teacher's agreement (train and valid), and the levers are part of the stage's identity."""
    run, data = taught_run
    cfg = FinetuneConfig(**BASE, adapter_layers=1, train_negatives=4, distill_weight=1.0, eval_weights="int8")
    result = finetune(run, cfg, name="levers", backbone=tiny_llama_backbone(), progress=False)
    lines = [json.loads(x) for x in (result.out_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [x for x in lines if "loss_kl" in x]
    evals = [x for x in lines if "eval" in x]
    assert len(steps) == 4 and all(x["loss_kl"] >= 0 and 0 <= x["teacher_agreement"] <= 1 for x in steps)
    assert all(0 <= e["eval"]["valid_teacher_agreement"] <= 1 for e in evals)
    recorded = json.loads((result.out_dir / "config.json").read_text())
    assert (recorded["adapter_layers"], recorded["train_negatives"], recorded["distill_weight"]) == (1, 4, 1.0)


def test_int8_scoring_keeps_the_model_and_its_rankings(taught_run):  # noqa: F811
    run, data = taught_run
    result = finetune(run, FinetuneConfig(**{**BASE, **FAST_LEARN, "steps": 6}), name="int8",
                      backbone=steerable_llama(), progress=False)
    float_scorer = finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False)
    int8_scorer = finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False, weights="int8")
    rows = data.indices("test")[:16]
    assert not any("lora_" in n for n, _ in int8_scorer.backbone.model.named_modules())  # adapters merged
    assert any("quantized" in type(m).__module__ for m in int8_scorer.backbone.model.modules())
    a, b = float_scorer.score_candidates(data, rows), int8_scorer.score_candidates(data, rows)
    assert np.abs(a - b).max() < 0.05 * np.abs(a).mean()  # rounding (a few %), not another model
    ranks_a, ranks_b = candidate_ranks(float_scorer, data, rows), candidate_ranks(int8_scorer, data, rows)
    # the tiny model's candidates lie within tenths of a nat, so rounding swaps neighbours, no more
    assert np.mean(np.abs(ranks_a - ranks_b) <= 1) >= 0.75, (ranks_a, ranks_b)
    model = float_scorer.backbone.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    int8_copy(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())  # the original is left alone
    with pytest.raises(ValueError, match="unknown weights"):
        finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False, weights="int4")


def test_verbalizer_keep_scores_only_the_kept_titles(taught_run):  # noqa: F811
    """Scoring a subset in the loss gives each kept title the score it gets among all 15 (the
    packed continuations do not see one another)."""
    run, data = taught_run
    bb = steerable_llama()
    rows = data.indices("train")[:2]
    scorer, prompts = _prompts(run, data, bb, rows)
    v: Verbalizer = scorer.verbalizer
    with torch.no_grad():
        full = v.sequence_logprobs(prompts, [v.continuations(p) for p in prompts], None)
        keep = [[0, 3, 7], [1, 2, 14]]
        part = v.sequence_logprobs(prompts, [[v.continuations(p)[j] for j in k] for p, k in zip(prompts, keep)], None)
    for f, s, k in zip(full, part, keep):
        assert torch.allclose(f[k], s, atol=1e-5)


def test_rps_soft_target_is_the_teachers_scores_in_the_listed_order(taught_run):  # noqa: F811
    """Stage 1's RPS with rps_distill_weight: each prompt's soft target is the teacher's score of
    every listed item, in the shuffled order the prompt lists them; the stage trains with it."""
    from delrec.training.config import DistillConfig
    from delrec.training.distill import DistillStage, distill

    run, data = taught_run
    cfg = DistillConfig(teacher="gru4rec", tasks=("rps",), soft_tokens=4, steps=3, batch_size=2, valid_samples=2,
                        eval_every=3, checkpoint_every=10**6, rps_distill_weight=1.0, device="cpu", dtype="float32")
    stage = DistillStage(run, cfg, "rps-soft", tiny_llama_backbone())
    rows = stage.order["rps"][:3]
    prompts = stage.builder.build("rps", rows)
    targets = stage._rps_targets(rows, prompts)
    teacher = teacher_scorer(run, "gru4rec", data, required=True)
    for row, prompt, target in zip(rows, prompts, targets):
        top = stage.builder.teacher.topk[row][: cfg.top_h]
        scores = np.asarray(teacher.score_items(data, np.array([row]), top[None]))[0]
        listed = [stage.builder.titles.index(t) for t in prompt.candidates]
        assert np.allclose(target.numpy(), [scores[list(top).index(i)] for i in listed])
        assert prompt.label == stage.builder.titles[top[0]] and int(target.argmax()) == prompt.candidates.index(prompt.label)
    result = distill(run, cfg, name="rps-soft-run", backbone=tiny_llama_backbone(), progress=False)
    assert result.metrics["steps"] == 3
    with pytest.raises(ValueError, match="rps_distill_weight needs the RPS task"):
        DistillConfig(tasks=("ta",), rps_distill_weight=1.0)


def test_merged_adapter_scores_as_the_unmerged_one(taught_run):  # noqa: F811
    """finetuned_scorer folds the adapter into the weights (a pure speed-up): the scores equal the
    unmerged peft model's up to float rounding, and every rank is the same."""
    from peft import PeftModel

    run, data = taught_run
    result = finetune(run, FinetuneConfig(**{**BASE, **FAST_LEARN, "steps": 6}), name="merged",
                      backbone=steerable_llama(), progress=False)
    merged = finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False)
    assert not isinstance(merged.backbone.model, PeftModel)
    unmerged = finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False)
    unmerged.backbone.model = PeftModel.from_pretrained(steerable_llama().model, result.out_dir / "adapter").eval()
    rows = data.indices("test")[:16]
    a, b = merged.score_candidates(data, rows), unmerged.score_candidates(data, rows)
    assert np.allclose(a, b, atol=1e-5)
    assert np.array_equal(candidate_ranks(merged, data, rows), candidate_ranks(unmerged, data, rows))


def test_speed_benchmark_runs_on_a_tiny_model(taught_run, tmp_path):  # noqa: F811
    """benchmarks/speed.py end to end (--tiny): every row timed, the speed-ups and the int8
    rankings written under the keys the issue names."""
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed_benchmark", script)
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    run, _ = taught_run
    out = tmp_path / "speed.json"
    adapter = finetune(run, FinetuneConfig(**{**BASE, "steps": 2}), name="speed-adapter", backbone=tiny_llama_backbone(),
                       progress=False).out_dir
    speed.main(["--tiny", "--threads", "1", "--run", str(run), "--teacher", "gru4rec", "--steps", "1",
                "--score-samples", "3", "--dtypes", "float32", "--out", str(out), "--score-adapter", str(adapter)])
    result = json.loads(out.read_text())
    rows = result["dtypes"]["float32"]["rows"]
    assert {r["row"] for r in rows} >= {"today", "top8", "neg4", "distill", "preset", "score-today", "score-merged", "score-int8"}
    assert all(r["peak_rss_mb"] > 0 for r in rows)
    assert result["speedup_train"] > 0 and result["speedup_score"] > 0 and result["weights"] == "random tiny model"
    assert set(result["dtypes"]["float32"]["rankings_int8_vs_float"]) >= {"float", "int8", "paired", "same_target_rank"}
    assert result["dtypes"]["float32"]["rankings_merged_vs_today"]["same_target_rank"] == 1.0  # a pure speed-up
    trained = result["dtypes"]["float32"]["rankings_int8_vs_float_trained"]
    assert {"adapter-float", "adapter-int8"} <= {r["row"] for r in rows} and 0 <= trained["same_top1"] <= 1


# -- deep soft prompts (P-tuning v2 / VPT-Deep style) ---------------------------------------------

def _deep_setup(taught_run, depth):  # noqa: F811
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.templates import Templates, lsr_prompt

    run, data = taught_run
    bb = steerable_llama()
    soft = SoftPrompt.for_backbone(bb, 4, seed=0)
    scorer = LLMScorer.for_run(data, bb, templates=Templates.for_teacher("gru4rec"), soft_prompt=soft, progress=False)
    before = scorer.verbalizer._before_ids(lsr_prompt(scorer.templates, ["-"], ["-"], soft_prompt=True))
    return run, data, bb, soft, scorer, before


def test_deep_prompt_started_from_the_input_prompt_scores_as_it_does(taught_run):  # noqa: F811
    """init_deep sets each layer's vectors to the hidden states the input prompt gives the slot
    there, so the deep prompt scores exactly as the input-only prompt (the hooks put the vectors at
    the slot's positions, in the packed and the brute-force paths); moving a vector changes scores."""
    run, data, bb, soft, scorer, before = _deep_setup(taught_run, 2)
    rows = data.indices("test")[:4]
    plain = scorer.score_candidates(data, rows)
    soft.init_deep(bb, before, depth=2)
    assert soft.deep_layers == (1,) and [id(x) for x in soft.trainable()] == [id(soft.embedding), id(soft.deep)]  # input + layer 1
    deep = scorer.score_candidates(data, rows)
    assert np.allclose(plain, deep, atol=1e-5)
    prompts = scorer.prompts(data, rows[:2])
    brute = scorer.verbalizer.score_brute_force(prompts, soft)
    assert all(torch.allclose(b, torch.as_tensor(d), atol=1e-4) for b, d in zip(brute, deep[:2]))
    with torch.no_grad():
        soft.deep.add_(torch.randn_like(soft.deep))
    moved = scorer.score_candidates(data, rows)
    assert not np.allclose(plain, moved, atol=1e-3)
    assert all(torch.allclose(b, torch.as_tensor(d), atol=1e-4)
               for b, d in zip(scorer.verbalizer.score_brute_force(prompts, soft), moved[:2]))


def test_deep_prompt_on_the_top_layer_trains_only_its_vectors_and_round_trips(taught_run, tmp_path):  # noqa: F811
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.training.config import DistillConfig
    from delrec.training.distill import distill

    run, data = taught_run
    bb = steerable_llama()
    cfg = DistillConfig(teacher="gru4rec", soft_tokens=4, steps=3, batch_size=2, valid_samples=2, eval_every=3,
                        checkpoint_every=10**6, soft_depth=1, lr=1e-2, device="cpu", dtype="float32")
    result = distill(run, cfg, name="deep-top1", backbone=bb, progress=False)
    soft = result.soft_prompt
    assert soft.deep_layers == (1,) and [id(x) for x in soft.trainable()] == [id(soft.deep)]
    start = SoftPrompt.for_backbone(steerable_llama(), 4, seed=0)
    assert torch.equal(soft.embedding.detach(), start.embedding.detach())  # the input vectors stayed
    loaded = SoftPrompt.load(result.out_dir / "soft_prompt.safetensors", steerable_llama())
    assert loaded.deep_layers == (1,) and torch.equal(loaded.deep, soft.deep.detach().float())
    with pytest.raises(ValueError, match="soft_depth must be 0"):
        DistillConfig(soft_depth=-1)
    from llm_helpers import tiny_t5_backbone

    with pytest.raises(ValueError, match="decoder-only"):
        SoftPrompt.for_backbone(tiny_t5_backbone(), 4).init_deep(tiny_t5_backbone(), [1, 2], 1)
    # stage 2 reads it as any soft prompt: frozen, its vectors applied at layer 1
    stage2 = finetune(run, FinetuneConfig(**{**BASE, "method": "delrec", "steps": 2, "soft_tokens": 4},
                                          soft_prompt=str(result.out_dir / "soft_prompt.safetensors")),
                      name="deep-stage2", backbone=steerable_llama(), progress=False)
    assert torch.equal(SoftPrompt.load(stage2.out_dir).deep, loaded.deep)


def test_stage2_without_the_untrained_evaluation(taught_run):  # noqa: F811
    """eval_at_start: false saves the reference evaluation; the trained evaluations and the kept
    adapter are the same as with it (a runtime setting: it changes no result)."""
    run, data = taught_run
    with_start = finetune(run, FinetuneConfig(**{**BASE, "eval_every": 2}), name="with-start",
                          backbone=tiny_llama_backbone(), progress=False)
    without = finetune(run, FinetuneConfig(**{**BASE, "eval_every": 2}, eval_at_start=False), name="without-start",
                       backbone=tiny_llama_backbone(), progress=False)
    steps = [e["step"] for e in without.metrics["valid_history"]]
    assert steps == [2, 4] and [e["step"] for e in with_start.metrics["valid_history"]] == [0, 2, 4]
    assert [e["valid_NDCG@5"] for e in without.metrics["valid_history"]] == \
        [e["valid_NDCG@5"] for e in with_start.metrics["valid_history"][1:]]


@pytest.mark.parametrize("slot", ["soft", "deep", "plain"])
def test_shared_prefix_scores_as_one_pass_per_prompt(taught_run, slot):  # noqa: F811
    """Scoring computes the prompts' shared start (the text before the slot and the soft prompt)
    once (a pure speed-up): the same scores as every prompt computed whole, within float rounding,
    the same ranks; with an input-only soft prompt, a deep one, and no slot (nothing shared)."""
    run, data, bb, soft, scorer, before = _deep_setup(taught_run, 2)
    if slot == "deep":
        soft.init_deep(bb, before, depth=1)
        with torch.no_grad():
            soft.deep.add_(0.5 * torch.randn_like(soft.deep))
    if slot == "plain":
        scorer = LLMScorer.for_run(data, bb, progress=False)
    v = scorer.verbalizer
    prompts = scorer.prompts(data, data.indices("test")[:6])
    used = soft if slot != "plain" else None
    with torch.no_grad():  # (scoring only: under grad every token is computed)
        # the template's text before the slot and the soft prompt; a prompt without a slot shares nothing
        assert (v._shared_prefix(prompts[0], used, {}) is None) == (slot == "plain")
    assert v._shared_prefix(prompts[0], used, {}) is None
    shared = v.score(prompts, used)
    v.share_prefix = False
    whole = v.score(prompts, used)
    for a, b in zip(shared, whole):
        assert torch.allclose(a, b, atol=1e-5) and torch.equal(a.argsort(), b.argsort())
