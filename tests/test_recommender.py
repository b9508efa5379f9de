"""The Python API (delrec.serving.recommender): rank items for a history with any model of a run folder."""

import numpy as np
import pytest

from delrec import Recommender, RequestError
from delrec.cli import main
from delrec.data.store import RunData
from delrec.serving.scorers import make_scorer


@pytest.fixture(scope="module")
def run(csv_llm_run):
    return csv_llm_run


def test_ids_titles_and_original_titles_resolve(run):
    folder, _ = run
    rec = Recommender.from_run(folder, model="popularity")
    ids = rec.resolve(["i3", "Movie 3 (1993)", "movie 3 (1993)", "Usual Suspects, The (1995)", "The Usual Suspects (1995)"], "history")
    assert ids[0] == ids[1] == ids[2] and ids[3] == ids[4] and rec.titles[ids[3]] == "The Usual Suspects (1995)"
    with pytest.raises(RequestError, match=r"history\[1\]: unknown item 'Movie 3 \(1993' .*closest titles: 'Movie 3 \(1993\)'"):
        rec.resolve(["i1", "Movie 3 (1993"], "history")


def test_bad_requests_name_the_field(run):
    folder, _ = run
    rec = Recommender.from_run(folder, model="gru4rec")
    cases = [
        (dict(history=[]), r"^history: the history is empty"),
        (dict(history="Movie 3 (1993)"), r"^history: the history is empty"),  # a string, not a list
        (dict(history=["i1"], candidates=["i2"]), r"^candidates: give at least two"),
        (dict(history=["i1"], candidates=["i2", "i3", "Movie 2 (1992)"]), r"^candidates\[2\]: 'Movie 2 \(1992\)' is also candidates\[0\]"),
        (dict(history=["i1", "i5"], candidates=["i2", "i5"]), r"^candidates\[1\]: 'Movie 5 \(1995\)' is already in the history"),
        (dict(history=["i1"], candidates=["i2", "i3"], k=3), r"^k: must be an integer from 1 to the 2 candidates"),
        (dict(history=["i1"], k=0), r"^k: must be an integer from 1 to 15"),
    ]
    for request, message in cases:
        with pytest.raises(RequestError, match=message):
            rec.rank(**request)


def test_teacher_candidates_and_truncated_history(run):
    folder, _ = run
    rec = Recommender.from_run(folder, model="gru4rec")
    history = [f"i{i}" for i in range(12)]  # longer than the model's window of 10
    result = rec.rank(history, k=5)
    assert result.history_truncated == 2 and len(result.history_used) == 10
    assert result.candidates_from == "the gru4rec teacher's top 15" and len(result.items) == 5
    assert not {item.item for item in result.items} & set(history[2:])
    assert [i.score for i in result.items] == sorted((i.score for i in result.items), reverse=True)
    # the rule the data follows (i -> i + 1) is what the teacher learned to rank first
    assert result.items[0].item == "i12"


@pytest.mark.parametrize("model", ["gru4rec", "popularity", "zero-shot"])
def test_scores_equal_the_evaluator_and_batches_change_nothing(run, model):
    folder, llm = run
    data = RunData.load(folder / "data")
    rec = Recommender.from_run(folder, model=model, llm=llm, dtype="float32")
    rows = data.indices("test")[:4]
    evaluator = make_scorer(folder, data, model, llm=llm, dtype="float32", progress=False)
    expected = np.asarray(evaluator.score_candidates(data, rows), dtype=np.float32)
    requests = [{"history": [rec.ids[i] for i in data.history[r] if i > 0], "candidates": [rec.ids[i] for i in data.candidates[r]],
                 "k": data.candidates.shape[1]} for r in rows]
    together = rec.rank_many(requests)
    alone = [rec.rank(**q) for q in requests]
    for r, many, one, want in zip(rows, together, alone, expected):
        for result in (many, one):  # batched (the teacher's GRU may round differently) and alone
            by_item = {item.item: item.score for item in result.items}
            got = np.array([by_item[rec.ids[i]] for i in data.candidates[r]], dtype=np.float32)
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_recommend_command_checks_its_input(run, capsys):
    folder, llm = run
    base = ["recommend", "--run", str(folder), "--llm", llm, "--dtype", "float32", "--teacher", "gru4rec"]
    assert main([*base, "--history", "Usual Suspects, The (1995)", "--num-candidates", "0"]) == 2
    assert "--num-candidates: at least 2" in capsys.readouterr().err
    assert main([*base, "--history", "i1", "--candidates", "i2", "i2"]) == 2
    assert "candidates[1]: 'Movie 2 (1992)' is also candidates[0]" in capsys.readouterr().err
    assert main([*base, "--history", *[f"i{i}" for i in range(12)], "--num-candidates", "4"]) == 0
    out = capsys.readouterr().out
    assert "the 2 earliest titles left out" in out and len([line for line in out.splitlines() if line[:4].strip().endswith(".")]) == 4


def test_closest_titles_match_difflib_over_the_whole_catalogue(run):
    """The trigram pre-selection finds what difflib finds comparing every title."""
    import difflib

    folder, _ = run
    rec = Recommender.from_run(folder, model="popularity")
    for query in ["Movie 3 (1993", "movi 12 (2002)", "The Usual Suspect", "Usual Suspects, The", "Movie (1999)", "zzz"]:
        assert rec.closest_titles(query, 3) == difflib.get_close_matches(query, rec.titles[1:], n=3, cutoff=0.5), query
    assert rec.search("Movie 1 (1991")[0] == ("i1", "Movie 1 (1991)")  # no title contains it: the closest one
