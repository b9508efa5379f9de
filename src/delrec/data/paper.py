"""The paper's statistics of each data set, set beside what a run's files give.

Table I gives users ("sequence"), items, interactions and sparsity of MovieLens-100K, Steam,
Beauty and Home & Kitchen; KuaiRec's are in the text of RQ4 (Table V). `delrec data prepare`
copies the comparison into RUN/data/stats.json (`paper`) and the report prints it. Why a source's
files cannot give the paper's numbers is said once, here (docs/datasets.md explains it at length).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class PaperStatistics:
    table: str  # where the paper gives them
    users: int
    items: int
    interactions: int
    sparsity: float  # as printed (a fraction, rounded as the paper rounds it)
    why_different: str  # why a run here shows other numbers after its 5-core


_BEFORE_FILTERS = ("the paper's counts are those of the whole file, before any filter; a run applies the "
                   "protocol's 5-core (and drops items without a title)")

PAPER_STATISTICS: dict[str, PaperStatistics] = {
    "ml-100k": PaperStatistics("Table I", 943, 1682, 100_000, 0.9370, _BEFORE_FILTERS + ": items rated fewer than 5 "
                               "times go, every user has at least 20 ratings"),
    "steam": PaperStatistics("Table I", 11_938, 3_581, 274_726, 0.9936,
                             "the paper's Steam is LLaRA's unpublished sample, available only as pandas pickles, "
                             "which are never read; `steam` is the whole original data (Kang & McAuley), about 28x "
                             "the paper's users after the 5-core"),
    "beauty": PaperStatistics("Table I", 324_038, 32_586, 371_345, 0.9999,
                              _BEFORE_FILTERS + "; All_Beauty is so sparse (99.997%) that its 5-core keeps a small "
                              "fraction"),
    "home-kitchen": PaperStatistics("Table I", 9_767_606, 1_286_050, 21_928_568, 0.9999,
                                    _BEFORE_FILTERS + "; the 5-core keeps about a third of the interactions"),
    "kuairec": PaperStatistics("Table V (RQ4 text)", 7_176, 10_728, 12_530_806, 0.8372,
                               "at 16% density the 5-core removes almost nothing, but about 9% of the videos "
                               "have no usable caption or cover text in the publisher's file and go with their "
                               "interactions (docs/datasets.md); rows without a timestamp and exact repeats go too"),
}


def compare_with_paper(dataset: str, filtered: dict, read: dict | None = None) -> dict | None:
    """The paper's numbers for `dataset` beside the files as read (`read`: the loader's
    `source.read` counts, where it keeps them) and after the title filter and 5-core (`filtered`,
    stats.json's block), with each filtered count as a fraction of the paper's. None for a data
    set the paper does not use (ML-1M, a folder of one's own)."""
    paper = PAPER_STATISTICS.get(dataset)
    if paper is None:
        return None
    counts = ("users", "items", "interactions")
    out = {"table": paper.table, **{k: v for k, v in asdict(paper).items() if k in (*counts, "sparsity")}}
    if read and all(f"{k}_read" in read for k in counts):
        out["as_read"] = {k: int(read[f"{k}_read"]) for k in counts}
    out["filtered_over_paper"] = {k: float(f"{filtered[k] / getattr(paper, k):.4g}") for k in counts}  # 4 significant digits
    out["why_different"] = paper.why_different
    return out
