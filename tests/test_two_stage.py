"""The evaluations beside the 15 candidates: two-stage over the whole catalogue
(delrec.evaluation.two_stage) and other candidate orders (delrec.evaluation.orders), alone with
stub models whose answer is known, and inside `delrec run` and its report."""

import json

import numpy as np
import pytest

from conftest import make_run, write_pipeline_inputs
from delrec.cli import main
from delrec.config import PipelineConfig
from delrec.data.store import CandidateView
from delrec.evaluation.metrics import RandomScorer, candidate_outcomes, full_ranks, metrics_from_ranks
from delrec.evaluation.orders import order_outcomes, order_summary, reordered
from delrec.evaluation.two_stage import listing_order, retrievable, score_retrieved, two_stage_ranks
from llm_helpers import tiny_llama_backbone


class Constant:
    """Every candidate the same score: a ranker with no opinion."""

    name, batch_size = "constant", 4

    def score_candidates(self, data, rows):
        return np.zeros(data.candidates[rows].shape)


class Oracle:
    """The target first, and the candidate lists it was shown recorded."""

    name, batch_size = "oracle", 4

    def __init__(self):
        self.shown = []

    def score_candidates(self, data, rows):
        cands = data.candidates[rows]
        self.shown.append((np.asarray(data.sample_id[rows]), cands.copy()))
        return (cands == data.target[rows][:, None]).astype(float)


class FirstListed:
    """Prefers whatever is listed first: as order-sensitive as a ranker can be."""

    name, batch_size = "first-listed", 4

    def score_candidates(self, data, rows):
        width = data.candidates.shape[1]
        return np.broadcast_to(-np.arange(width, dtype=float), (len(rows), width)).copy()


class SeenFirst:
    """A retriever that scores the user's own history above everything else."""

    name = "seen-first"

    def score_all(self, data, rows):
        scores = np.random.default_rng(0).random((len(rows), data.num_items + 1))
        r, items = data.seen_items(rows)
        scores[r, items] += 10.0
        return scores


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("two-stage"))  # each user walks the catalogue: no repeated item


def test_a_ranker_without_opinion_gets_the_retrievers_own_metrics(run):
    _, data = run
    rows = data.indices("test")
    retriever = RandomScorer(seed=3)
    ranks, k = two_stage_ranks(Constant(), retriever, data, rows, retrieve=20)
    own = full_ranks(retriever, data, rows)
    assert k == 20
    # ties keep the retriever's order: the same rank wherever the retriever put the target in its 20
    assert np.array_equal(ranks[own < k], own[own < k])
    assert (ranks[own >= k] >= k).all()
    assert metrics_from_ranks(ranks) == metrics_from_ranks(own)  # K = 20 > 10: every metric the same


def test_a_target_outside_the_retrieved_items_is_a_miss(run):
    _, data = run
    rows = data.indices("test")
    retriever = RandomScorer(seed=5)
    ranks, k = two_stage_ranks(Oracle(), retriever, data, rows, retrieve=5)
    retrieved = full_ranks(retriever, data, rows) < k
    assert 0 < retrieved.mean() < 1  # both kinds of sample are here
    assert (ranks[retrieved] == 0).all()  # the oracle puts a retrieved target first
    assert (ranks[~retrieved] >= k).all()  # the oracle cannot rescue one the retriever missed
    assert metrics_from_ranks(ranks)["HR@10"] == pytest.approx(retrieved.mean())  # not a hit at 10 either


def test_only_samples_whose_target_was_retrieved_are_scored(run):
    _, data = run
    rows = data.indices("test")
    retriever, oracle = RandomScorer(seed=5), Oracle()
    ranks, k = two_stage_ranks(oracle, retriever, data, rows, retrieve=5, block=8)
    retrieved = full_ranks(retriever, data, rows) < k
    assert 0 < retrieved.sum() < len(rows)
    shown = np.concatenate([s for s, _ in oracle.shown])
    assert sorted(shown.tolist()) == sorted(data.sample_id[rows[retrieved]].tolist())
    assert (ranks[retrieved] == 0).all() and (ranks[~retrieved] >= k).all()


def test_nothing_from_the_users_history_is_retrieved_and_the_listing_is_shuffled(run):
    _, data = run
    rows = data.indices("test")[:24]
    oracle = Oracle()
    score_retrieved(oracle, SeenFirst(), data, rows, 20)  # what two_stage_ranks lists, for every row
    ids = np.concatenate([s for s, _ in oracle.shown])
    shown = np.concatenate([c for _, c in oracle.shown])
    assert np.array_equal(ids, data.sample_id[rows])
    _, seen = data.seen_items(rows)
    seen_row, _ = data.seen_items(rows)
    for b in range(len(rows)):
        history = set(seen[seen_row == b].tolist())
        assert history and not history & set(shown[b].tolist()), b
        assert 0 not in shown[b]  # never the padding
    # the listing: a seeded permutation per sample, the same whatever the batch
    assert np.array_equal(listing_order(data.sample_id[rows[3:5]], 20), listing_order(data.sample_id[rows], 20)[3:5])
    assert not (listing_order(data.sample_id[rows], 20) == np.arange(20)).all()


def test_a_small_catalogue_lowers_k_for_every_sample(run):
    _, data = run
    rows = data.indices("test")
    assert retrievable(data, rows, 10_000) == data.num_items - data.position[rows].max()
    with pytest.raises(ValueError, match="at least 2"):
        retrievable(data, rows, 1)


def test_an_order_blind_scorer_is_unmoved_and_an_order_bound_one_is_caught(run):
    _, data = run
    rows = data.indices("test")[:40]

    class ByItem:  # a score per item: the order it is listed in cannot matter
        name, batch_size = "by-item", 8

        def score_candidates(self, data, rows):
            return np.sin(data.candidates[rows] * 1.7)

    stored = candidate_outcomes(ByItem(), data, rows)
    others = {s: order_outcomes(ByItem(), data, rows, s) for s in (1, 2)}
    summary = order_summary(stored, others)
    assert all(v == 0 for v in summary["spread"].values()) and all(v == 0 for v in summary["top1_changed"].values())
    # the same candidates, in another order per sample
    view = reordered(data, rows, 1)
    assert isinstance(view, CandidateView)
    assert np.array_equal(np.sort(view.candidates, axis=1), np.sort(data.candidates[rows], axis=1))
    assert (view.candidates != data.candidates[rows]).any(axis=1).mean() > 0.9
    # a ranker that takes whatever comes first moves with the order
    stored = candidate_outcomes(FirstListed(), data, rows)
    summary = order_summary(stored, {s: order_outcomes(FirstListed(), data, rows, s) for s in (1, 2)})
    assert min(summary["top1_changed"].values()) > 0.5  # about 14 in 15


def test_config_checks_the_new_evaluations(tmp_path):
    base = {"run_dir": str(tmp_path / "r"), "teachers": ["sasrec"]}
    assert PipelineConfig(**base).retrieval is None
    assert PipelineConfig(**base, full_ranking={"retrieve": 30}).retrieval == ("sasrec", 30)
    for bad, message in [({"full_ranking": {"retrieve": 1}}, "at least 2"), ({"full_ranking": {"k": 20}}, "unknown keys"),
                         ({"full_ranking": {"retriever": "caser"}}, "not among the teachers"),
                         ({"candidate_orders": [1, 1]}, "repeats")]:
        with pytest.raises(ValueError, match=message):
            PipelineConfig(**base, **bad)


def test_delrec_run_evaluates_over_the_catalogue_and_in_other_orders(tmp_path):
    config = write_pipeline_inputs(tmp_path, tiny_llama_backbone(), num_users=40, num_items=40, length=16)
    run = tmp_path / "run"
    args = ["run", "--config", str(config), "--quiet", f"run_dir={run}", "teacher.max_epochs=2", "threads=1",
            "distill={soft_tokens: 4, steps: 2, batch_size: 2, valid_samples: 4, eval_every: 1000}",
            "finetune={steps: 2, batch_size: 2, valid_samples: 4, eval_every: 1000}", "methods=[delrec]",
            "test_samples=8", "eval_batch_size=4", "full_ranking={retrieve: 10}", "candidate_orders=[1]",
            "teachers=[sasrec, kdalrd]", "method_teachers=[sasrec]"]  # KDALRD: a target-aware row (teachers/kda.py)
    assert main(args) == 0
    layout = run / "eval" / "pipeline"
    full = {p.stem: json.loads(p.read_text()) for p in (layout / "full-catalogue").glob("*.json")}
    assert set(full) == {"random", "popularity", "sasrec", "kdalrd", "zero-shot", "sasrec-delrec"}
    assert full["sasrec-delrec"]["two_stage"] and not full["sasrec"]["two_stage"] and not full["kdalrd"]["two_stage"]
    # every two-stage model is capped by the same retrieval: the retriever's recall
    recall = full["sasrec"]["within_retrieve"]
    for name in ("zero-shot", "sasrec-delrec"):
        assert full[name]["within_retrieve"] == pytest.approx(recall)
        assert full[name]["full_ranking"]["HR@10"] <= recall + 1e-9
    orders = {p.stem: json.loads(p.read_text()) for p in (layout / "orders").glob("*.json")}
    assert set(orders) == {"zero-shot", "sasrec-delrec"}
    stored = json.loads((layout / "sasrec-delrec.json").read_text())
    assert orders["sasrec-delrec"]["metrics"]["stored"] == stored["candidates"]
    report = (run / "report.md").read_text()
    assert "## Over the whole catalogue: SASRec retrieves 10" in report and f"Retriever recall@10 (SASRec): **{recall:.4f}**" in report
    assert "## Order robustness" in report and "DELRec(SASRec) against each baseline over the whole catalogue" in report
    assert "| KDALRD |" in report and not (run / "teachers" / "kdalrd" / "topk.parquet").exists()
    assert "| KDALRD | " in report  # its Table II name in DELRec's paired tests
    # a rerun recomputes none of it
    assert main(args) == 0
    log = (run / "pipeline.log").read_text().split("pipeline ")[-1]
    assert "step eval-full:sasrec-delrec: done earlier" in log and "step eval-orders:zero-shot: done earlier" in log
    assert "step teacher:kdalrd: done earlier" in log
