import math

import numpy as np
import pytest

from delrec.evaluation.metrics import (
    PopularityScorer,
    RandomScorer,
    evaluate,
    full_ranks,
    metrics_from_ranks,
    pessimistic_ranks,
)


def test_rank_counts_strictly_better_candidates():
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.3]])
    assert pessimistic_ranks(scores, np.array([1, 2])).tolist() == [1, 0]


def test_ties_are_pessimistic():
    # the tied competitor counts as ranked above the target, whichever column the target is in
    assert pessimistic_ranks(np.array([[0.5, 0.5, 0.1]]), np.array([0])).tolist() == [1]
    assert pessimistic_ranks(np.array([[0.5, 0.5, 0.1]]), np.array([1])).tolist() == [1]
    # a constant scorer puts the target last, not first
    assert pessimistic_ranks(np.zeros((1, 15)), np.array([3])).tolist() == [14]


def test_masked_items_never_count_above():
    scores = np.array([[-math.inf, 0.2, -math.inf, 0.1]])
    assert pessimistic_ranks(scores, np.array([3])).tolist() == [1]


def test_nan_scores_are_rejected():
    with pytest.raises(ValueError, match="NaN"):
        pessimistic_ranks(np.array([[np.nan, 0.1]]), np.array([1]))


def test_metrics_hand_computed():
    m = metrics_from_ranks(np.array([0, 1, 5, 12]))
    assert m["HR@1"] == pytest.approx(0.25)
    assert m["HR@5"] == pytest.approx(0.5)
    assert m["HR@10"] == pytest.approx(0.75)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3)) / 4)
    assert m["NDCG@10"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(7)) / 4)


def test_metrics_are_means_not_sums():
    m = metrics_from_ranks(np.zeros(1000, dtype=int))
    assert m == {"HR@1": 1.0, "HR@5": 1.0, "HR@10": 1.0, "NDCG@5": 1.0, "NDCG@10": 1.0}


def test_empty_rank_list_is_an_error():
    with pytest.raises(ValueError):
        metrics_from_ranks(np.array([], dtype=int))


def test_reference_scorers(tmp_path):
    from conftest import make_run, random_dataset

    _, data = make_run(tmp_path, random_dataset, num_users=400, num_items=80)
    rnd = evaluate(RandomScorer(seed=0), data, "test")
    # 1/15 expected; the test split holds a few hundred samples
    assert abs(rnd["candidates"]["HR@1"] - 1 / 15) < 0.04
    assert rnd["num_samples"] == len(data.indices("test"))
    pop = evaluate(PopularityScorer(data), data, "test")
    assert set(pop["candidates"]) == {"HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"}


def test_popularity_counts_train_targets_only(rule_run):
    _, data = rule_run
    pop = PopularityScorer(data)
    train = data.indices("train")
    assert pop.counts.sum() == len(train)


class _Oracle:
    """Scores the true target highest, and every item the user has seen even higher."""

    name = "oracle"

    def score_candidates(self, data, rows):
        return (data.candidates[rows] == data.target[rows][:, None]).astype(float)

    def score_all(self, data, rows):
        s = np.zeros((len(rows), data.num_items + 1))
        s[np.arange(len(rows)), data.target[rows]] = 1.0
        r, items = data.seen_items(rows)
        s[r, items] = 2.0  # must be masked by full ranking
        s[np.arange(len(rows)), data.target[rows]] = 1.0
        return s


def test_full_ranking_excludes_seen_items(rule_run):
    _, data = rule_run
    rows = data.indices("test")
    assert (full_ranks(_Oracle(), data, rows) == 0).all()
    res = evaluate(_Oracle(), data, "test", full_ranking=True)
    assert res["candidates"]["HR@1"] == 1.0 and res["full_ranking"]["HR@1"] == 1.0


def test_random_scores_do_not_depend_on_batching(rule_run):
    _, data = rule_run
    rows = data.indices("test")
    scorer = RandomScorer(seed=3)
    whole = scorer.score_candidates(data, rows)
    pieces = np.concatenate([scorer.score_candidates(data, rows[i : i + 7]) for i in range(0, len(rows), 7)])
    assert np.array_equal(whole, pieces)
