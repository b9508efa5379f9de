"""The LLM-based baselines of the paper's Table II (delrec.methods, docs/baselines.md) on tiny models:
the text paradigm (`teacher-list`, RecRanker / LLM-TRSR style), LlamaRec (`llamarec`) and
LLMSEQSIM (`llmseqsim`). LLMSEQPROMPT is `wo-sp`, tested with the ablations."""

import json
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F

from delrec import methods
from delrec.core.settings import same_identity
from delrec.evaluation.metrics import candidate_ranks, metrics_from_ranks
from delrec.llm.letters import LetterVerbalizer
from delrec.llm.similarity import TitleSimilarityScorer
from delrec.llm.templates import LETTERS, Templates, lettered_prompt
from delrec.serving.recommender import Recommender
from delrec.serving.scorers import finetuned_scorer, make_scorer
from delrec.teachers.lists import TeacherTop
from delrec.training import finetune as finetune_mod
from delrec.training.config import FinetuneConfig
from delrec.training.finetune import finetune
from llm_helpers import DEFAULT_WORDS, tiny_llama_backbone, tiny_t5_backbone
from test_distill import WORDS, taught_run  # noqa: F401  (module-scoped fixture: titled run + GRU4Rec top-h lists)
from test_learning import STAGE2_LEARN, hr_at_1, steerable_llama, steerable_t5

TEACHER = "gru4rec"
LETTER_WORDS = [*DEFAULT_WORDS, *LETTERS, "with", "its", "letter"]  # the test tokenizer, with one token per letter
SMALL = dict(teacher=TEACHER, steps=4, batch_size=2, valid_samples=4, eval_every=4, checkpoint_every=10**6, adapter="adalora", optimizer="lion", lr_schedule="constant", init_r=4,
             target_r=2, warmup_steps=1, lr=0.05, dtype="float32", device="cpu")


def letter_llama():
    return tiny_llama_backbone(LETTER_WORDS)


def letter_t5():
    return tiny_t5_backbone(LETTER_WORDS)


def _templates():
    return Templates.for_teacher(TEACHER)


def _scorer(run, data, bb, variant, size=10):
    options = {"list_size": size} if variant == "teacher-list" else None
    return methods.get(variant).scorer(run, data, bb, TEACHER, _templates(), None, options=options, progress=False)


def _titles(data):
    return [""] + data.items["title"].tolist()


# -- what goes into the prompts ------------------------------------------------------------------

def test_the_teacher_list_prompt_writes_the_stored_top_list_of_each_sample(taught_run):  # noqa: F811
    run, data = taught_run
    rows = np.concatenate([data.indices("train")[:3], data.indices("test")[:3]])
    stored = pq.read_table(run / "teachers" / TEACHER / "topk.parquet")  # read here, not through TeacherLists
    assert np.array_equal(stored.column("sample_id").to_numpy(), data.sample_id)
    topk = np.stack(stored.column("topk").to_numpy(zero_copy_only=False))
    titles = _titles(data)
    scorer = _scorer(run, data, tiny_llama_backbone(), "teacher-list", size=4)
    for r, p in zip(rows, scorer.prompts(data, rows, labels=True)):
        listed = ", ".join(f'"{titles[i]}"' for i in topk[r][:4])
        assert f"GRU4Rec recommends these movies, best first: {listed}.\n" in p.text
        assert f'Candidates: {", ".join(chr(34) + titles[i] + chr(34) for i in data.candidates[r])}.' in p.text
        assert p.label == titles[data.target[r]] and not p.has_slot
        # the list holds nothing the user had seen before the sample's target (computed at its time)
        seen = data.seen_items(np.array([r]))[1]
        assert not set(topk[r][:4]) & set(seen.tolist())
    with pytest.raises(ValueError, match="top-10 lists, but top_h=11"):
        TeacherTop(run, TEACHER, data, 11)


def test_the_teacher_list_of_a_request_comes_from_the_teacher(taught_run):  # noqa: F811
    """Rows that are not the run's samples (delrec.serving.recommender's requests) get the teacher's list
    for their history, computed then, never another sample's stored list."""
    from delrec.serving.recommender import _Requests
    from delrec.teachers.trained import load_teacher

    run, data = taught_run
    history = [int(i) for i in data.history[data.indices("test")[0]] if i > 0]
    view = _Requests(data, [history], [list(data.candidates[0])])
    top = TeacherTop(run, TEACHER, data, 5).lists(view, np.arange(1))[0]
    model = load_teacher(run / "teachers" / TEACHER, "cpu", data)
    with torch.no_grad():
        scores = model.score_all(torch.as_tensor(view.history[:, -model.max_len:]), None)[0]
    scores[[0, *history]] = float("-inf")
    assert top.tolist() == scores.topk(5).indices.tolist()


def test_the_lettered_prompt():
    titles = [f"{a} {b}" for a, b in zip(WORDS, WORDS[1:] + WORDS[:1])][:12] + ["Heat", "Jaws", "Alien"]
    p = lettered_prompt(Templates(), ["Fargo", "Rocky"], titles, label="Jaws")
    lines = p.text.split("\n")
    assert lines[0] == 'A user watched these movies in order, the most recent last: "Fargo", "Rocky".'
    assert lines[1] == "Candidates:" and lines[2:17] == [f"({LETTERS[j]}) {t}" for j, t in enumerate(titles)]
    assert lines[16] == "(O) Alien" and lines[17].endswith("Answer with its letter. Answer: ")
    assert p.candidates == tuple(titles) and p.label == "Jaws" and not p.has_slot
    with pytest.raises(ValueError, match="at most 26 candidates"):
        lettered_prompt(Templates(), ["Fargo"], [f"t{i}" for i in range(27)])


def test_each_index_letter_is_one_token():
    """A decoder-only model reads " A" after "Answer:", T5's decoder starts with "A"; a tokenizer
    without single-token letters is refused, naming the letter."""
    llama, t5 = letter_llama(), letter_t5()
    for bb, form in ((llama, " {}"), (t5, "{}")):
        v = LetterVerbalizer(bb)
        assert v.letter_form == form and len(v.letter_ids) == 26 and len(set(v.letter_ids)) == 26
        assert all(bb.encode_text(form.format(c)) == [i] for c, i in zip(LETTERS, v.letter_ids))
    plain = LetterVerbalizer(tiny_llama_backbone())  # the default test words: no capital letters
    prompt = lettered_prompt(Templates(), ["Fargo"], ["Heat", "Jaws"])
    with pytest.raises(ValueError, match=r"one distinct token per index letter.*' A' encodes to \[2\]"):
        plain.score([prompt])


# -- LlamaRec's scores ---------------------------------------------------------------------------

@pytest.mark.parametrize("make_backbone", [letter_llama, letter_t5])
def test_llamarec_scores_are_the_letter_logits_of_one_forward_pass(taught_run, make_backbone):  # noqa: F811
    run, data = taught_run
    bb = make_backbone()
    scorer = _scorer(run, data, bb, "llamarec")
    rows = data.indices("test")[:3]
    calls = []
    hook = bb.model.register_forward_hook(lambda *_: calls.append(1))
    scores = torch.as_tensor(scorer.score_candidates(data, rows))
    hook.remove()
    assert len(calls) == len(rows)  # one forward pass per prompt, whatever the number of candidates
    letters = torch.tensor([bb.encode_text(scorer.verbalizer.letter_form.format(c))[0] for c in LETTERS[:15]])
    with torch.no_grad():
        for r, stored_scores in zip(rows, scores):
            row_scores = stored_scores[scorer.display_order(data, [r])[0]]  # letter (A), (B), ... order
            ids = bb.encode_text(scorer.prompts(data, [r])[0].text.rstrip())
            if bb.is_encoder_decoder:
                start = bb.model.config.decoder_start_token_id
                logits = bb.model(input_ids=torch.tensor([ids + [bb.eos_token_id]]), decoder_input_ids=torch.tensor([[start]])).logits[0, -1]
            else:
                logits = bb.model(input_ids=torch.tensor([ids])).logits[0, -1]
            torch.testing.assert_close(row_scores, F.log_softmax(logits.float(), dim=-1)[letters], atol=1e-5, rtol=1e-5)
            assert torch.equal(row_scores.argsort(), logits[letters].argsort())  # the letter logits rank the same


def test_llamarec_lists_the_candidates_in_the_teachers_order(taught_run):  # noqa: F811
    """LlamaRec's retrieval stage on the fixed candidates: (A) is the teacher's best candidate,
    (B) the next, ...; the label's letter follows; scores come back in the stored order."""
    run, data = taught_run
    scorer = _scorer(run, data, letter_llama(), "llamarec")
    rows = np.concatenate([data.indices("train")[:2], data.indices("test")[:4]])
    teacher = np.asarray(make_scorer(run, data, TEACHER, device="cpu").score_candidates(data, rows))
    titles = _titles(data)
    reordered = 0
    for b, r in enumerate(rows):
        by_teacher = data.candidates[r][np.argsort(-teacher[b], kind="stable")]
        prompt = scorer.prompts(data, [r], labels=True)[0]
        assert prompt.candidates == tuple(titles[i] for i in by_teacher)
        assert prompt.label == titles[data.target[r]]
        assert prompt.candidates.index(prompt.label) == int((teacher[b] > teacher[b][data.candidates[r] == data.target[r]]).sum())
        reordered += not np.array_equal(by_teacher, data.candidates[r])
        shown = scorer.verbalizer.score([prompt])[0].numpy()  # in letter order
        stored = np.asarray(scorer.score_candidates(data, [r]))[0]
        for k, item in enumerate(by_teacher):
            assert stored[list(data.candidates[r]).index(item)] == pytest.approx(shown[k], abs=1e-6)
    assert reordered == len(rows)  # the stored order is shuffled: the teacher's is another


# -- stage 2 of the trained baselines --------------------------------------------------------------

@pytest.mark.parametrize("variant,make_backbone", [("teacher-list", tiny_llama_backbone), ("llamarec", letter_llama),
                                                   ("llamarec", letter_t5)])
def test_stage2_trains_the_adapter_only_and_round_trips(taught_run, variant, make_backbone, monkeypatch):  # noqa: F811
    """Only AdaLoRA's parameters get gradients (the backbone's weights get none and stay bit-identical);
    the saved adapter, loaded back by `finetuned_scorer` and by `make_scorer`, scores as the model
    in memory did."""
    run, data = taught_run
    bb = make_backbone()
    base = {k: v.clone() for k, v in bb.model.state_dict().items()}
    grads = {}
    real_clip = torch.nn.utils.clip_grad_norm_

    def record_first_step(params, max_norm):
        if not grads:
            grads.update({n: p.grad is not None and bool(p.grad.abs().sum() > 0) for n, p in bb.model.named_parameters()})
        return real_clip(params, max_norm)

    monkeypatch.setattr(finetune_mod.torch.nn.utils, "clip_grad_norm_", record_first_step)
    result = finetune(run, FinetuneConfig(method=variant, **SMALL), name=f"rt-{variant}-{bb.name}", backbone=bb, progress=False)
    monkeypatch.undo()
    assert result.metrics["best_step"] == SMALL["steps"]  # the saved adapter is the one in memory
    assert any(g for n, g in grads.items() if "lora_E" in n)
    assert all("lora_" in n for n, g in grads.items() if g), [n for n, g in grads.items() if g and "lora_" not in n]
    assert all(not p.requires_grad for n, p in bb.model.named_parameters() if "lora_" not in n)
    for name, value in bb.model.base_model.model.state_dict().items():
        if "lora_" not in name and "ranknum" not in name:
            assert torch.equal(value, base[name.replace(".base_layer", "")]), name
    rows = data.indices("valid")[:4]
    in_memory = torch.as_tensor(_scorer(run, data, bb, variant).score_candidates(data, rows))
    loaded = finetuned_scorer(result.out_dir, data, backbone=make_backbone(), progress=False)
    torch.testing.assert_close(torch.as_tensor(loaded.score_candidates(data, rows)), in_memory, atol=1e-5, rtol=1e-5)
    assert loaded.style.name == {"teacher-list": "teacher-list", "llamarec": "lettered"}[variant]
    by_name = make_scorer(run, data, str(result.out_dir), backbone=make_backbone(), progress=False)
    torch.testing.assert_close(torch.as_tensor(by_name.score_candidates(data, rows)), in_memory, atol=1e-5, rtol=1e-5)
    recorded = json.loads((result.out_dir / "config.json").read_text())
    assert recorded["method"] == variant
    if variant == "llamarec":  # trained and scored in the teacher's order, and the folder says so
        assert recorded["candidate_order"] == "teacher" and loaded.style.order is not None
        # a folder from before the teacher's order (no such key) is scored in the stored order it was
        # trained on, and a run with today's settings does it again
        del recorded["candidate_order"]
        (result.out_dir / "config.json").write_text(json.dumps(recorded))
        old = finetuned_scorer(result.out_dir, data, backbone=make_backbone(), progress=False)
        assert old.style.order is None
        assert np.array_equal(old.display_order(data, rows), np.broadcast_to(np.arange(data.candidates.shape[1]), data.candidates[rows].shape))
        assert not same_identity(FinetuneConfig, recorded, FinetuneConfig(method=variant, **SMALL).to_dict())
    else:
        assert "candidate_order" not in recorded  # other methods' folders are as before


def test_a_trained_teacher_list_model_answers_requests(taught_run, tmp_path):  # noqa: F811
    """`Recommender.from_run(run, model="<teacher>-teacher-list")`: the stage-2 folder found by
    name, the request's teacher list computed from its history."""
    run, data = taught_run
    bb = tiny_llama_backbone()
    model_dir = tmp_path / "tiny-llama"
    bb.model.save_pretrained(model_dir)
    bb.tokenizer.save_pretrained(model_dir)
    finetune(run, FinetuneConfig(method="teacher-list", llm=str(model_dir), **{**SMALL, "steps": 1, "eval_every": 1}),
             backbone=bb, progress=False)
    titles = _titles(data)
    rec = Recommender.from_run(run, model=f"{TEACHER}-teacher-list", dtype="float32", device="cpu")
    result = rec.rank([titles[1], titles[2]], [titles[5], titles[6], titles[7]], k=3)
    assert sorted(i.title for i in result.items) == sorted(titles[5:8])


# -- LLMSEQSIM -----------------------------------------------------------------------------------

def _title_embedding(bb, title):
    """Mean-pooled last hidden states of the title's tokens, by hand."""
    ids = bb.encode_text(title)
    with torch.no_grad():
        if bb.is_encoder_decoder:
            hidden = bb.model.get_encoder()(input_ids=torch.tensor([ids + [bb.eos_token_id]])).last_hidden_state[0, : len(ids)]
        else:
            hidden = bb.model.model(input_ids=torch.tensor([ids])).last_hidden_state[0]
    return hidden.float().mean(dim=0)


@pytest.mark.parametrize("make_backbone", [tiny_llama_backbone, tiny_t5_backbone])
def test_llmseqsim_ranks_by_cosine_to_the_mean_history_embedding(taught_run, make_backbone):  # noqa: F811
    run, data = taught_run
    bb = make_backbone()
    scorer = make_scorer(run, data, f"{TEACHER}-llmseqsim", backbone=bb, progress=False)  # by name, as Recommender does
    assert isinstance(scorer, TitleSimilarityScorer)
    rows = data.indices("test")[:4]
    calls = []
    hook = (bb.model.get_encoder() if bb.is_encoder_decoder else bb.model.model).register_forward_hook(lambda *_: calls.append(1))
    scores = torch.as_tensor(scorer.score_candidates(data, rows))
    titles = _titles(data)
    needed = {titles[i] for r in rows for i in [*data.history[r], *data.candidates[r]] if i > 0}
    assert len(calls) == len(needed)  # each title embedded once
    again = torch.as_tensor(scorer.score_candidates(data, rows))
    assert len(calls) == len(needed) and torch.equal(again, scores)  # the second time from the cache
    hook.remove()
    for r, row_scores in zip(rows, scores):
        history = torch.stack([_title_embedding(bb, titles[i]) for i in data.history[r] if i > 0])
        session = history.mean(dim=0)
        expected = torch.stack([F.cosine_similarity(_title_embedding(bb, titles[i]), session, dim=0) for i in data.candidates[r]])
        torch.testing.assert_close(row_scores, expected, atol=1e-5, rtol=1e-5)
        assert row_scores.argsort(descending=True).tolist() == expected.argsort(descending=True).tolist()
    # the whole catalogue is scored the same way (full ranking, e.g. under the `loo` protocol)
    full = torch.as_tensor(scorer.score_all(data, rows))
    assert full.shape == (len(rows), data.num_items + 1) and torch.isinf(full[:, 0]).all()
    torch.testing.assert_close(full.gather(1, torch.as_tensor(data.candidates[rows])), scores, atol=1e-6, rtol=1e-6)


# -- learning guards (as tests/test_learning.py) ------------------------------------------------

GUARD_STEPS, N = 40, 4


@pytest.mark.parametrize("variant,make_backbone", [("llamarec", steerable_llama), ("llamarec", steerable_t5),
                                                   ("teacher-list", steerable_llama)])
def test_stage2_of_a_baseline_memorises_its_training_examples(taught_run, variant, make_backbone):  # noqa: F811
    """Stage 2 on N train samples, over and over, ranks each one's next item first (HR@1 0 -> 1 on
    exactly those samples, scored by the adapter saved to disk), and the recommendation loss falls."""
    run, data = taught_run
    backbone = lambda: make_backbone(LETTER_WORDS)  # noqa: E731
    cfg = FinetuneConfig(method=variant, teacher=TEACHER, steps=GUARD_STEPS, max_train_examples=N, batch_size=N,
                         valid_samples=1, eval_every=GUARD_STEPS, checkpoint_every=10**6, dtype="float32", device="cpu",
                         **STAGE2_LEARN)
    rows = np.random.default_rng(cfg.seed).permutation(data.indices("train"))[:N]  # as finetune draws them
    before = hr_at_1(_scorer(run, data, backbone(), variant), data, rows)
    assert before < 1.0, "already solved before training"
    start = time.perf_counter()
    result = finetune(run, cfg, name=f"learn-{variant}-{make_backbone.__name__}", backbone=backbone(), progress=False)
    after = hr_at_1(finetuned_scorer(result.out_dir, data, backbone=backbone(), progress=False), data, rows)
    assert after == 1.0, f"{variant}: HR@1 {before} -> {after} on its {N} training samples after {GUARD_STEPS} steps"
    losses = [e["loss_rec"] for e in map(json.loads, (result.out_dir / "train_log.jsonl").read_text().splitlines()) if "loss_rec" in e]
    assert np.mean(losses[-4:]) < np.mean(losses[:4]) - 0.5, losses
    assert time.perf_counter() - start < 60


def test_the_baselines_are_evaluated_like_every_model(taught_run):  # noqa: F811
    """The evaluator's ranks from a baseline's scorer: pessimistic ranks over the fixed candidates."""
    run, data = taught_run
    scorer = make_scorer(run, data, f"{TEACHER}-llmseqsim", backbone=tiny_llama_backbone(), progress=False)
    ranks = candidate_ranks(scorer, data, data.indices("test")[:8])
    assert ranks.shape == (8,) and (ranks >= 0).all() and (ranks < data.candidates.shape[1]).all()
    assert 0 <= metrics_from_ranks(ranks)["HR@1"] <= 1


def test_delrec_run_trains_evaluates_and_reports_the_baselines(tmp_path):
    """`delrec run` with the baselines as variants: stage 2 for the trained ones (no stage 1), one
    evaluation each on the same samples, and the report's Table II rows under the paper's names."""
    from conftest import write_pipeline_inputs
    from delrec.cli import main

    config = write_pipeline_inputs(tmp_path, letter_llama(), "baselines.yaml", num_users=40, num_items=30, length=12)
    run = tmp_path / "run"
    assert main(["run", "--config", str(config), "--quiet", f"run_dir={run}", "teacher.max_epochs=1", "threads=1", "zero_shot=false",
                 "finetune={steps: 2, batch_size: 2, valid_samples: 2, eval_every: 2, adapter: adalora, optimizer: lion, lr_schedule: constant, init_r: 4, target_r: 2, "
                 "warmup_steps: 1}", "method_options={teacher-list: {list_size: 3}}",
                 "distill={soft_tokens: 4, steps: 1, batch_size: 1, valid_samples: 2, valid_lsr_samples: 0, eval_every: 1000}",
                 "variants=[delrec, wo-sp, teacher-list, llamarec, llmseqsim]", "test_samples=6", "eval_batch_size=3"]) == 0
    steps = [s["step"] for s in json.loads((run / "pipeline.json").read_text())["steps"]]
    assert [s for s in steps if s.startswith("distill:")] == ["distill:sasrec"]  # DELRec's; no baseline has a stage 1
    assert {"finetune:sasrec-teacher-list", "finetune:sasrec-llamarec", "eval:sasrec-llmseqsim"} <= set(steps)
    assert "finetune:sasrec-llmseqsim" not in steps
    evals = {p.stem: json.loads(p.read_text()) for p in (run / "eval" / "pipeline").glob("*.json")}
    assert {"sasrec-wo-sp", "sasrec-teacher-list", "sasrec-llamarec", "sasrec-llmseqsim"} <= set(evals)
    assert len({tuple(e["settings"]["rows"]) for e in evals.values()}) == 1
    assert evals["sasrec-llmseqsim"]["settings"]["llm"] == str(tmp_path / "llm")  # a new backbone reruns it
    report = (run / "report.md").read_text()
    table2 = report.split("## Results (Table II style)")[1].split("## ")[0]
    for label in ("LLMSEQPROMPT = w/o SP (SASRec)", "RecRanker / LLM-TRSR (SASRec)", "LlamaRec (SASRec)", "LLMSEQSIM (SASRec)"):
        assert f"| {label} |" in table2, label
    ablations = report.split("## Ablations")[1].split("## ")[0]
    assert "| w/o SP (SASRec) |" in ablations and "LlamaRec" not in ablations
    # DELRec against each baseline, paired, with a verdict on the paper's claim and each model's cost
    claim = report.split("## The paper's claim: DELRec(SASRec) above every baseline of Table II?")[1].split("\n## ")[0]
    for label in ("SASRec", "LLMSEQPROMPT = w/o SP (SASRec)", "RecRanker / LLM-TRSR (SASRec)", "LlamaRec (SASRec)", "LLMSEQSIM (SASRec)"):
        assert f"\n| {label} | " in claim, label
    assert "**The claim holds here**" in claim or "**The claim does not hold here**" in claim
    assert "Not in this comparison" in claim and "LLaRA" in claim and "KDALRD" in claim
    cost = claim.split("### What each model cost")[1]
    assert "| DELRec(SASRec) | stage 1: 1 examples per task (shared with the other methods that use it); stage 2: 4 examples |" in cost
    assert "| LLMSEQSIM (SASRec) | nothing (no training) | 0 |" in cost and "| LlamaRec (SASRec) | stage 2: 4 examples |" in cost


@pytest.mark.parametrize("hr,ndcg,verdict,group,on", [
    ((+0.1, 0.001), (+0.2, 0.001), "DELRec above", "above", ("HR@1", "NDCG@5")),
    ((+0.03, 0.19), (+0.07, 0.0002), "DELRec above on NDCG@5 only", "partly", ("NDCG@5",)),
    ((-0.05, 0.045), (-0.03, 0.17), "DELRec **below** on HR@1 only", "below", ("HR@1",)),
    ((-0.05, 0.001), (-0.03, 0.01), "DELRec **below**", "below", ("HR@1", "NDCG@5")),
    ((+0.05, 0.001), (-0.03, 0.01), "DELRec **below** on NDCG@5 only", "below", ("NDCG@5",)),  # below on one outweighs above
    ((+0.01, 0.78), (-0.02, 0.30), "no significant difference", "unclear", ()),
])
def test_the_claims_verdict_against_one_baseline(hr, ndcg, verdict, group, on):
    from delrec.report.results import claim_verdict

    comparison = {"HR@1": {"diff": hr[0], "p_value": hr[1]}, "NDCG@5": {"diff": ndcg[0], "p_value": ndcg[1]}}
    assert claim_verdict(comparison) == (verdict, group, on)
