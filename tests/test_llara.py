"""LLaRA (`llara`, docs/baselines.md) on tiny models: the hybrid prompt's item vectors, the
curriculum from text-only to hybrid prompts, what stage 2 trains, saving, resuming, learning, and
serving through Recommender."""

import json
import time

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from delrec import methods
from delrec.llm.backbone import Backbone
from delrec.llm.templates import Templates
from delrec.llm.verbalizer import Verbalizer
from delrec.methods import llara as llara_mod
from delrec.methods.llara import ItemProjector, ProjectorExtra, hybrid_batch, item_projector_for
from delrec.serving.recommender import Recommender, _Requests
from delrec.serving.scorers import finetuned_scorer, make_scorer
from delrec.teachers.trained import load_teacher
from delrec.training import finetune as finetune_mod
from delrec.training.config import FinetuneConfig
from delrec.training.finetune import finetune, stage2_inputs
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone
from test_distill import taught_run  # noqa: F401  (module-scoped fixture: titled run + trained GRU4Rec)
from test_learning import STAGE2_LEARN, hr_at_1, steerable_llama

TEACHER = "gru4rec"
SMALL = dict(method="llara", teacher=TEACHER, steps=6, batch_size=2, valid_samples=4, eval_every=6, checkpoint_every=10**6,
             adapter="adalora", optimizer="lion", lr_schedule="constant", init_r=4, target_r=2, warmup_steps=1, lr=0.05, dtype="float32", device="cpu")


def _scorer(run, data, bb, projector, variant="llara"):
    return methods.get(variant).scorer(run, data, bb, TEACHER, Templates.for_teacher(TEACHER), None,
                                       extra=ProjectorExtra(projector), progress=False)


def _untrained(run, data, bb, **settings):
    cfg = FinetuneConfig(**{**SMALL, **settings})
    return _scorer(run, data, bb, item_projector_for(stage2_inputs(run, cfg), bb, data))


def _titles(data):
    return [""] + data.items["title"].tolist()


def _log(out_dir):
    return [json.loads(line) for line in (out_dir / "train_log.jsonl").read_text().splitlines()]


# -- the hybrid prompt -----------------------------------------------------------------------------

@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_item_vectors_follow_each_title_and_are_the_projected_teacher_embeddings(taught_run, make_backbone):  # noqa: F811
    run, data = taught_run
    bb = make_backbone()
    scorer = _untrained(run, data, bb)
    projector = scorer.style.item_vectors
    teacher_table = load_teacher(run / "teachers" / TEACHER, "cpu", data).item_embedding.weight.detach()
    titles = _titles(data)
    for r in data.indices("test")[:3]:
        history = [int(i) for i in data.history[r] if i > 0]
        candidates = [int(i) for i in data.candidates[r]]
        p = scorer.prompts(data, [r])[0]
        assert [item for _, item in p.item_slots] == history + candidates  # in text order: history, then candidates
        # the text cut at the vectors: each piece before a vector ends with that item's quoted title
        edges = [0, *(offset for offset, _ in p.item_slots), len(p.text)]
        pieces = [p.text[a:b] for a, b in zip(edges, edges[1:])]
        for piece, item in zip(pieces, history + candidates):
            assert piece.endswith(f'"{titles[item]}"'), (piece, titles[item])
        # where each vector lands among the prompt's input vectors, counted from the pieces' tokens
        pieces[-1] = pieces[-1].rstrip()
        ids = [bb.encode_text(x) if x else [] for x in pieces]
        if bb.is_encoder_decoder:
            ids[-1] = ids[-1] + [bb.eos_token_id]
        embeds = scorer.verbalizer._prompt_embeds(p, None)
        assert embeds.shape[0] == sum(map(len, ids)) + len(p.item_slots)
        at = 0
        for k, piece_ids in enumerate(ids):
            expected = bb.input_embeddings(torch.tensor(piece_ids, dtype=torch.long))
            torch.testing.assert_close(embeds[at : at + len(piece_ids)], expected, atol=0, rtol=0)
            at += len(piece_ids)
            if k < len(p.item_slots):  # the k-th item's vector: the projector (by hand) of its teacher embedding
                x = teacher_table[p.item_slots[k][1]]
                l1, l2 = projector.mlp[0], projector.mlp[2]
                by_hand = F.linear(F.gelu(F.linear(x, l1.weight, l1.bias)), l2.weight, l2.bias)
                torch.testing.assert_close(embeds[at], by_hand, atol=1e-6, rtol=1e-6)
                at += 1
        # the text-only form (where the curriculum starts) is the plain prompt of `wo-sp`, without vectors
        text_only = scorer.prompts(data, [r], text_only=True)[0]
        plain = methods.get("wo-sp").scorer(run, data, bb, TEACHER, Templates.for_teacher(TEACHER), None, progress=False)
        assert text_only == plain.prompts(data, [r])[0] and not text_only.item_slots and text_only.text == p.text
        assert torch.equal(scorer.verbalizer._prompt_embeds(text_only, None), plain.verbalizer._prompt_embeds(text_only, None))


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_the_hybrid_prompt_scores_as_the_brute_force_reference(taught_run, make_backbone):  # noqa: F811
    """The verbalizer over prompts with item vectors, one pass per prompt (CPU) or padded batches
    (GPUs), scores as each candidate's own full pass."""
    run, data = taught_run
    bb = make_backbone()
    scorer = _untrained(run, data, bb)
    prompts = scorer.prompts(data, data.indices("test")[:3])
    slow = scorer.verbalizer.score_brute_force(prompts)
    batched = Verbalizer(bb, passes="batch", item_vectors=scorer.style.item_vectors)
    for verbalizer in (scorer.verbalizer, batched):
        for fast, reference in zip(verbalizer.score(prompts), slow):
            torch.testing.assert_close(fast, reference, atol=1e-5, rtol=1e-5)


def test_bad_input_is_refused_clearly(taught_run, tmp_path):  # noqa: F811
    run, data = taught_run
    with pytest.raises(ValueError, match="item projector is trained in stage 2"):
        methods.Method("x", "x", "x", stage1="none", soft_prompt_source="none", prompt="hybrid", stage2=False)
    with pytest.raises(ValueError, match="unknown curriculum 'linera' \\(did you mean 'linear'\\?\\)"):
        FinetuneConfig(method="llara", options={"curriculum": "linera"})
    bb = tiny_llama_backbone()
    with pytest.raises(ValueError, match="needs its item projector"):
        methods.get("llara").scorer(run, data, bb, TEACHER, Templates(), None, progress=False)
    with pytest.raises(FileNotFoundError, match="delrec teacher train --run .* --model sasrec"):
        finetune(run, FinetuneConfig(**{**SMALL, "teacher": "sasrec"}), name="no-teacher", backbone=bb, progress=False)
    other = ItemProjector(torch.randn(data.num_items + 3, 4), bb.hidden_size, bb.name)
    with pytest.raises(ValueError, match=f"embeddings of {data.num_items + 2} items, but this run has {data.num_items}"):
        _scorer(run, data, bb, other)
    path = other.save(tmp_path)
    with pytest.raises(ValueError, match="projects into dimension 32 .* 'tiny-llama'.* dimension 48"):
        ItemProjector.load(path, Backbone.from_model(LlamaForCausalLM(LlamaConfig(
            vocab_size=len(bb.tokenizer), hidden_size=48, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=1)), bb.tokenizer, name="wider"))
    with pytest.raises(ValueError, match="trained for backbone 'tiny-llama', not 'tiny-t5'"):
        ItemProjector.load(path, tiny_t5_backbone())


# -- the curriculum ----------------------------------------------------------------------------------

def test_the_curriculum_moves_from_text_only_to_hybrid_prompts():
    """LLaRA's schedule: micro-batch i of N gets the hybrid prompt with probability (i + 1) / N;
    the draws are seeded by (seed, i) alone (a resume and every process draw the same)."""
    run = "unused"  # the curriculum reads the options, the seed and the planned micro-batches only
    cfg = FinetuneConfig(method="llara", steps=200, grad_accum=2, seed=3)
    n = cfg.steps * cfg.grad_accum
    draws = np.array([hybrid_batch(stage2_inputs(run, cfg), i) for i in range(n)])
    for w, window in enumerate(np.split(draws, 4)):
        expected = np.mean([(i + 1) / n for i in range(w * n // 4, (w + 1) * n // 4)])  # 0.125, 0.375, 0.625, 0.875
        assert abs(window.mean() - expected) < 0.1, (w, window.mean(), expected)
    assert draws[-1] and not draws[:20].all()
    assert np.array_equal(draws, [hybrid_batch(stage2_inputs(run, cfg), i) for i in range(n)])  # deterministic
    other_seed = FinetuneConfig(method="llara", steps=200, grad_accum=2, seed=4)
    assert not np.array_equal(draws, [hybrid_batch(stage2_inputs(run, other_seed), i) for i in range(n)])
    assert all(hybrid_batch(stage2_inputs(run, FinetuneConfig(method="llara", options={"curriculum": "none"})), i) for i in range(50))


# -- stage 2 ---------------------------------------------------------------------------------------

def test_stage2_trains_the_projector_and_the_adapters_only_and_round_trips(taught_run, monkeypatch):  # noqa: F811
    """Gradients reach the projector (on steps with a hybrid batch) and the adapters, never the
    teacher's embeddings or the backbone, which stay bit-identical; the curriculum's draws are the
    ones logged; the saved adapter and projector, loaded back by `finetuned_scorer` and by
    `make_scorer`, score as the model in memory did."""
    run, data = taught_run
    bb = tiny_llama_backbone()
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    cfg = FinetuneConfig(**SMALL)
    start = item_projector_for(stage2_inputs(run, cfg), tiny_llama_backbone(), data)  # the seeded start finetune makes
    made, steps = [], []
    real_for, real_clip = llara_mod.item_projector_for, torch.nn.utils.clip_grad_norm_

    def keep(*a, **k):
        made.append(real_for(*a, **k))
        return made[-1]

    def record(params, max_norm):  # the gradients each step's optimizer sees
        llm = {n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in bb.model.named_parameters()}
        steps.append((llm, [p.grad for p in made[0].parameters()]))
        return real_clip(params, max_norm)

    monkeypatch.setattr(llara_mod, "item_projector_for", keep)
    monkeypatch.setattr(finetune_mod.torch.nn.utils, "clip_grad_norm_", record)
    result = finetune(run, cfg, name="rt-llara", backbone=bb, progress=False)
    monkeypatch.undo()
    assert result.metrics["best_step"] == SMALL["steps"]  # the saved adapter and projector are the ones in memory
    shares = [e["hybrid_share"] for e in _log(result.out_dir) if "loss" in e]
    assert shares == [float(hybrid_batch(stage2_inputs(run, cfg), i)) for i in range(cfg.steps)]
    assert 0 < sum(shares) < len(shares), "the test needs text-only and hybrid steps (another seed or length)"
    assert len(steps) == cfg.steps and any(g for n, g in steps[-1][0].items() if "lora_E" in n)
    for (llm, projector), share in zip(steps, shares):
        assert all("lora_" in n for n, g in llm.items() if g), [n for n, g in llm.items() if g and "lora_" not in n]
        if share:  # a step with a hybrid batch: every projector tensor has a gradient
            assert all(g is not None and g.abs().sum() > 0 for g in projector)
        else:  # a text-only step: none, so the optimizer skips the projector (LLaRA freezes it)
            assert all(g is None for g in projector)
    for name, value in bb.model.base_model.model.state_dict().items():
        if "lora_" not in name and "ranknum" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    saved = ItemProjector.load(result.out_dir / "item_projector.safetensors")
    teacher_table = load_teacher(run / "teachers" / TEACHER, "cpu", data).item_embedding.weight.detach()
    assert torch.equal(made[0].item_embeddings, teacher_table) and torch.equal(saved.item_embeddings, teacher_table)
    assert not any(t.requires_grad for t in made[0].buffers())
    assert all(not torch.equal(a, b) for a, b in zip(saved.mlp.parameters(), start.mlp.parameters()))  # it trained
    assert saved.teacher == TEACHER and saved.backbone == bb.name

    rows = data.indices("valid")[:4]
    in_memory = torch.as_tensor(_scorer(run, data, bb, made[0]).score_candidates(data, rows))
    loaded = finetuned_scorer(result.out_dir, data, backbone=tiny_llama_backbone(), progress=False)
    assert loaded.style.name == "hybrid" and loaded.style.item_vectors is not None
    torch.testing.assert_close(torch.as_tensor(loaded.score_candidates(data, rows)), in_memory, atol=1e-5, rtol=1e-5)
    by_name = make_scorer(run, data, str(result.out_dir), backbone=tiny_llama_backbone(), progress=False)
    torch.testing.assert_close(torch.as_tensor(by_name.score_candidates(data, rows)), in_memory, atol=1e-5, rtol=1e-5)


def test_resume_after_a_crash_equals_an_uninterrupted_run(taught_run, monkeypatch):  # noqa: F811
    """The checkpoint holds the projector and its optimizer state: a run killed while writing its
    third checkpoint resumes from the second (step 4, after a hybrid step trained the projector)
    and logs, evaluates and saves exactly what an uninterrupted run does."""
    run, data = taught_run
    cfg = FinetuneConfig(**{**SMALL, "steps": 6, "checkpoint_every": 2})
    assert [hybrid_batch(stage2_inputs(run, cfg), i) for i in range(4)] == [False, False, True, False]  # what the test relies on
    ref = finetune(run, cfg, name="llara-ref", backbone=tiny_llama_backbone(), progress=False)
    writes, real_save = [], torch.save

    def crash_while_writing_the_third(obj, f, *a, **k):
        if isinstance(obj, dict) and "allocator" in obj:
            writes.append(obj)
            if len(writes) == 3:
                raise KeyboardInterrupt("simulated kill")
        real_save(obj, f, *a, **k)

    monkeypatch.setattr(finetune_mod.torch, "save", crash_while_writing_the_third)
    with pytest.raises(KeyboardInterrupt):
        finetune(run, cfg, name="llara-crash", backbone=tiny_llama_backbone(), progress=False)
    monkeypatch.setattr(finetune_mod.torch, "save", real_save)
    ckpt = torch.load(run / "finetune" / "llara-crash" / "checkpoint.pt", weights_only=True)
    assert ckpt["loop"]["step"] == 4
    start = item_projector_for(stage2_inputs(run, cfg), tiny_llama_backbone(), data).state_dict()
    assert ckpt["extra"].keys() == start.keys()
    assert not torch.equal(ckpt["extra"]["mlp.2.weight"], start["mlp.2.weight"])  # trained by then
    projector_group = [g for g in ckpt["optimizer"]["param_groups"] if len(g["params"]) == 4]
    assert len(projector_group) == 1 and all(i in ckpt["optimizer"]["state"] for i in projector_group[0]["params"])
    resumed = finetune(run, cfg, name="llara-crash", backbone=tiny_llama_backbone(), progress=False)
    strip = lambda out: [{k: v for k, v in e.items() if k not in ("seconds", "wall_seconds")} for e in _log(out)]  # noqa: E731
    assert strip(resumed.out_dir) == strip(ref.out_dir)
    for name in ("item_projector.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load_file(str(resumed.out_dir / name)), load_file(str(ref.out_dir / name))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


# -- learning guard (as tests/test_learning.py) -----------------------------------------------------

GUARD_STEPS, N = 40, 4


def test_llara_memorises_its_training_examples(taught_run):  # noqa: F811
    """Stage 2 with LLaRA's curriculum on N train samples, over and over, ranks each one's next
    item first with the hybrid prompt (HR@1 0 -> 1 on exactly those samples, scored by the adapter
    and projector saved to disk), and the recommendation loss falls."""
    run, data = taught_run
    cfg = FinetuneConfig(method="llara", teacher=TEACHER, steps=GUARD_STEPS, max_train_examples=N, batch_size=N,
                         valid_samples=1, eval_every=GUARD_STEPS, checkpoint_every=10**6, dtype="float32", device="cpu",
                         **STAGE2_LEARN)
    rows = np.random.default_rng(cfg.seed).permutation(data.indices("train"))[:N]  # as finetune draws them
    bb = steerable_llama()
    before = hr_at_1(_scorer(run, data, bb, item_projector_for(stage2_inputs(run, cfg), bb, data)), data, rows)
    assert before < 1.0, "already solved before training"
    start = time.perf_counter()
    result = finetune(run, cfg, name="learn-llara", backbone=steerable_llama(), progress=False)
    after = hr_at_1(finetuned_scorer(result.out_dir, data, backbone=steerable_llama(), progress=False), data, rows)
    assert after == 1.0, f"HR@1 {before} -> {after} on its {N} training samples after {GUARD_STEPS} steps"
    losses = [e["loss_rec"] for e in _log(result.out_dir) if "loss_rec" in e]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert time.perf_counter() - start < 60


# -- serving ----------------------------------------------------------------------------------------

def test_a_trained_llara_model_answers_requests(taught_run, tmp_path):  # noqa: F811
    """`Recommender.from_run(run, model="<teacher>-llara")`: the stage-2 folder found by name, the
    request's items placed as vectors after their titles, the scores those of its scorer."""
    run, data = taught_run
    bb = tiny_llama_backbone()
    model_dir = tmp_path / "tiny-llama"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    loaded = Backbone.load(str(model_dir), device="cpu", dtype="float32")  # named by its folder, as the run's backbone is
    finetune(run, FinetuneConfig(**{**SMALL, "llm": str(model_dir), "steps": 1, "eval_every": 1}), backbone=loaded, progress=False)
    titles = _titles(data)
    rec = Recommender.from_run(run, model=f"{TEACHER}-llara", dtype="float32", device="cpu")
    assert rec.scorer.style.name == "hybrid"
    result = rec.rank([titles[1], titles[2]], [titles[5], titles[6], titles[7]], k=3)
    assert sorted(i.title for i in result.items) == sorted(titles[5:8])
    view = _Requests(data, [[1, 2]], [[5, 6, 7]])
    prompt = rec.scorer.prompts(view, np.arange(1))[0]
    assert [item for _, item in prompt.item_slots] == [1, 2, 5, 6, 7]
    expected = rec.scorer.score_candidates(view, np.arange(1))[0]
    assert {i.title: i.score for i in result.items} == {titles[c]: float(s) for c, s in zip([5, 6, 7], expected)}
