"""LlamaRec's two-stage use over the whole catalogue (delrec.teachers.retrieval) under the `loo` protocol:
the teacher retrieves its top 20 unseen items, the fine-tuned lettered LLM ranks them, and every
item it did not retrieve ranks below them."""

import numpy as np
import pytest
import torch

from conftest import make_run
from delrec.cli import main
from delrec.evaluation.metrics import full_ranks
from delrec.serving.recommender import Recommender
from delrec.serving.scorers import make_scorer
from delrec.teachers import default_config
from delrec.teachers.retrieval import LLAMAREC_RETRIEVE, RetrieveThenRank
from delrec.training.config import FinetuneConfig
from delrec.training.finetune import finetune
from delrec.training.teacher import train_teacher
from test_baselines import SMALL, letter_llama
from test_distill import titled_dataset


@pytest.fixture(scope="module")
def loo_llamarec(tmp_path_factory):
    run, data = make_run(tmp_path_factory.mktemp("loo"), titled_dataset, protocol="loo")
    train_teacher(run, default_config("gru4rec", max_epochs=2, lr=0.1), device="cpu", progress=False)
    bb = letter_llama()
    bb.model.save_pretrained(run / "llm")
    bb.tokenizer.save_pretrained(run / "llm")
    finetune(run, FinetuneConfig(method="llamarec", llm=str(run / "llm"), **SMALL), backbone=bb, progress=False)
    return run, data


def test_llamarec_ranks_the_teachers_top_20_over_the_whole_catalogue(loo_llamarec):
    run, data = loo_llamarec
    assert data.config.name == "loo"
    scorer = make_scorer(run, data, "gru4rec-llamarec", dtype="float32", device="cpu", progress=False)
    assert isinstance(scorer, RetrieveThenRank)
    rows = data.indices("test")[:5]
    scores = scorer.score_all(data, rows)
    teacher = make_scorer(run, data, "gru4rec", device="cpu").score_all(data, rows).clone()
    teacher[:, 0] = float("-inf")
    seen_row, seen_item = data.seen_items(rows)
    teacher[torch.as_tensor(seen_row), torch.as_tensor(seen_item)] = float("-inf")
    rec = Recommender.from_run(run, model="gru4rec-llamarec", dtype="float32", num_candidates=LLAMAREC_RETRIEVE)
    for b, r in enumerate(rows):
        retrieved = teacher[b].topk(LLAMAREC_RETRIEVE).indices
        finite = torch.isfinite(scores[b]).nonzero().flatten()
        assert sorted(finite.tolist()) == sorted(retrieved.tolist())  # exactly the teacher's top 20 unseen items
        # each scored as the LLM scores that list for that history alone (the Python API's path)
        history = [rec.ids[i] for i in data.history[r] if i > 0]
        alone = rec.rank(history, [rec.ids[i] for i in retrieved.tolist()], k=LLAMAREC_RETRIEVE)
        for item in alone.items:
            assert scores[b, rec.resolve([item.item], "item")[0]].item() == pytest.approx(item.score, rel=1e-5, abs=1e-6)
    # full ranking: a target the teacher did not retrieve ranks below every retrieved item
    ranks = full_ranks(scorer, data, rows)
    for b, r in enumerate(rows):
        if not torch.isfinite(scores[b, data.target[r]]):
            assert ranks[b] >= LLAMAREC_RETRIEVE
        else:
            assert ranks[b] == int((scores[b] >= scores[b, data.target[r]]).sum()) - 1


def test_the_15_candidates_are_scored_by_the_llm_as_before(loo_llamarec):
    run, data = loo_llamarec
    scorer = make_scorer(run, data, "gru4rec-llamarec", dtype="float32", device="cpu", progress=False)
    rows = data.indices("test")[:3]
    np.testing.assert_array_equal(np.asarray(scorer.score_candidates(data, rows)), np.asarray(scorer.ranker.score_candidates(data, rows)))
    assert scorer.batch_size == scorer.ranker.batch_size  # the evaluator chunks rows by the ranker's batch


def test_delrec_evaluate_full_ranking_of_llamarec(loo_llamarec, capsys):
    run, data = loo_llamarec
    assert main(["evaluate", "--run", str(run), "--models", "gru4rec", "gru4rec-llamarec", "--limit", "4", "--dtype", "float32"]) == 0
    full = capsys.readouterr().out.split("full ranking")[1]
    assert "| gru4rec |" in full and "llamarec" in full  # both models ranked the whole catalogue
