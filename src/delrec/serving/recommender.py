"""Use a trained model: rank items for a user's history, from Python.

    from delrec import Recommender

    rec = Recommender.from_run("runs/ml100k-cpu", model="sasrec-delrec")   # loaded once
    result = rec.rank(["Toy Story (1995)", "Usual Suspects, The (1995)"], k=5)
    for item in result.items:
        print(item.title, item.score)
    results = rec.rank_many([{"history": [...]}, {"history": [...], "candidates": [...]}])

`rank_many` scores requests together (one forward pass per batch), which is what the HTTP service
(delrec.serving.app) does with requests that arrive together; `prepare` checks one request without
scoring it, and `rank_prepared` scores checked requests, so a service can refuse a bad request
before it joins a batch.

`model` is any model of the run folder the evaluator knows (delrec.serving.scorers): `random`,
`popularity`, a teacher, `zero-shot`, or `<teacher>-<method>`. History and candidates are given as
item ids (the ids of the data's items file) or titles, as written in the data ("Usual Suspects,
The (1995)") or normalised ("The Usual Suspects (1995)"), compared by `delrec.data.titles.title_key`
(NFKC, case-folded, control and bidi characters ignored). Items that share a title are shown, and
matched, with their id appended ("Chasing Amy (1997) (#246)"); the shared title alone is refused
with the items it could mean (docs/protocol.md, "Titles"). Without candidates,
the teacher's top list over the items the user has not seen is ranked (as `delrec recommend`
does). Every problem with a request is a `RequestError` that names the field.
"""

from __future__ import annotations

import difflib
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from delrec.config import PipelineConfig
from delrec.core.layout import RunLayout
from delrec.core.names import ModelName
from delrec.data.store import RunData
from delrec.data.titles import base_title, clean_title, disambiguate_titles, normalize_title, title_key
from delrec.llm.backbone import Backbone
from delrec.serving.bundle import bundle_data, fetch_bundle, load_bundle
from delrec.serving.scorers import make_scorer
from delrec.teachers.trained import load_teacher


class RequestError(ValueError):
    """A request the recommender cannot answer; `field` names the part that is wrong."""

    def __init__(self, field_name: str, message: str):
        super().__init__(f"{field_name}: {message}")
        self.field, self.message = field_name, message


@dataclass(frozen=True)
class RankedItem:
    item: str  # the item's id in the data
    title: str
    score: float


@dataclass(frozen=True)
class PreparedRequest:
    """A checked request: item indices (0 is padding), ready to score."""

    history: tuple[int, ...]  # at most max_history items, most recent last
    candidates: tuple[int, ...] | None  # None: the teacher's top list, found when scored
    k: int
    history_truncated: int  # earliest items left out


@dataclass(frozen=True)
class Ranking:
    items: list[RankedItem]  # best first, at most k
    candidates_from: str  # "given", or which teacher's top list
    history_used: list[str] = field(default_factory=list)  # titles, most recent last
    history_truncated: int = 0  # earliest items left out: the model reads at most max_history
    all_finite: bool = True  # every candidate's score is finite (a NaN would make the order meaningless)


class Recommender:
    """A model of a run folder, loaded once, answering ranking requests."""

    def __init__(self, run: str | Path, data, scorer, model: str, teacher: str | None, device: str = "auto",
                 num_candidates: int | None = None, max_candidates: int = 50):
        self.run, self.data, self.scorer, self.model = Path(run), data, scorer, model
        self.teacher_name, self.device = teacher, device
        self.num_candidates = num_candidates or data.candidates.shape[1]  # proposed when none are given
        self.max_candidates = max(max_candidates, self.num_candidates)  # the most a request may give
        self.max_history = data.config.max_history
        items = data.items
        self.ids = [""] + items["item"].astype(str).tolist()
        # the titles shown (rankings, search); unique: a folder prepared before `prepare` gave items
        # that share a title their ids keeps its titles on disk (the model reads those), and they
        # are told apart here the same way
        self.titles = [""] + disambiguate_titles(items["title"].astype(str).tolist(), self.ids[1:])
        self._by_id = {item: i for i, item in enumerate(self.ids) if i > 0}
        self._keys = [""] + [title_key(t) for t in self.titles[1:]]  # matching keys (delrec.data.titles)
        self._by_title = {key: i for i, key in enumerate(self._keys) if i > 0}
        # the titles as the data gave them, without the (#id) that told them apart: which items a
        # title several items share may mean
        self._base_keys = [""] + [title_key(base_title(t, i)) for t, i in zip(self.titles[1:], self.ids[1:])]
        self._shared: dict[str, list[int]] = {}
        for i, key in enumerate(self._base_keys):
            if i > 0 and key != self._keys[i]:
                self._shared.setdefault(key, []).append(i)
        self._teacher = None
        self._trigrams: dict[str, list[int]] | None = None  # for closest_titles, built on first use (or by warm())
        self._index_lock = threading.Lock()

    @classmethod
    def from_run(cls, run: str | Path, model: str = "sasrec-delrec", *, teacher: str | None = None, device: str = "auto",
                 dtype: str = "auto", llm: str | None = None, batch_size: int = 8, num_candidates: int | None = None,
                 max_candidates: int = 50, templates: dict | None = None) -> Recommender:
        """`teacher`: whose top list gives the default candidates (default: the model's own
        teacher, else the first trained one); `llm`: the backbone of `zero-shot` (default: the
        run's); `templates`: the run's prompt wording for models without a stage-2 folder."""

        run = Path(run)
        data = RunData.load(RunLayout(run).data)
        config = _run_config(run)
        if llm is None and config is not None:
            llm = config.llm
        if templates is None and config is not None:
            templates = config.templates
        scorer = make_scorer(run, data, model, llm=llm, dtype=dtype, device=device, batch_size=batch_size, progress=False,
                             template_overrides=templates)
        trained = sorted(p.parent.name for p in RunLayout(run).teachers.glob("*/model.safetensors"))
        own = ModelName.parse(model).teacher
        teacher = teacher or (own if own in trained else trained[0] if trained else None)
        return cls(run, data, scorer, model, teacher, device, num_candidates, max_candidates)

    @classmethod
    def from_pretrained(cls, path_or_repo: str | Path, *, revision: str | None = None, device: str = "auto",
                        dtype: str = "auto", batch_size: int = 8, num_candidates: int | None = None,
                        max_candidates: int = 50) -> Recommender:
        """A model exported by `delrec export` (delrec.serving.bundle): a local folder, or a
        Hugging Face Hub repository id (`revision`: its branch, tag or commit; needs internet).
        Every file is checked against the SHA-256 the bundle lists before anything is loaded;
        it then ranks exactly as `from_run` did on the run it came from."""
        local = Path(path_or_repo)
        root, manifest = load_bundle(local if local.exists() else fetch_bundle(str(path_or_repo), revision))
        data = bundle_data(root, manifest)
        backbone, named = None, manifest["backbone"]
        if named:  # the LLM the stage-2 model runs on: the bundle's own folder, or a Hub or offline name
            backbone = Backbone.load(root / named["folder"] if "folder" in named else named["name"], device=device, dtype=dtype)
            if "folder" in named:  # the very model it was trained with (its files checked): known by that name
                backbone.name = named["trained_from"]
        templates = (manifest.get("run_config") or {}).get("templates")
        scorer = make_scorer(root, data, manifest["model"], dtype=dtype, device=device, batch_size=batch_size, progress=False,
                             template_overrides=templates, backbone=backbone)
        return cls(root, data, scorer, manifest["model"], manifest["teacher"], device, num_candidates, max_candidates)

    # -- requests ----------------------------------------------------------------------------

    def resolve(self, refs: Sequence[str | int], what: str) -> list[int]:
        """Item indices of ids or titles; an unknown one names the closest titles, a title several
        items share names those items. Titles are compared by `title_key` (NFKC, case-folded,
        control and bidi characters ignored), as given or as `normalize_title` writes them."""
        by_id, out = self._by_id, []
        for n, ref in enumerate(refs):
            found = by_id.get(ref) if isinstance(ref, str) else None  # the common case first: an id as it is
            if found is None:
                found = self._lookup(ref, what, n)
            out.append(found)
        return out

    def _lookup(self, ref, what: str, n: int) -> int:
        text = str(ref).strip()
        found = self._by_id.get(text)
        if found is not None:
            return found
        cleaned = clean_title(text)
        keys = dict.fromkeys((cleaned.casefold(), normalize_title(cleaned).casefold()))
        for key in keys:
            found = self._by_title.get(key)
            if found is not None:
                return found
        for key in keys:
            shared = self._shared.get(key)
            if shared and len(shared) == 1:
                return shared[0]
            if shared:
                named = ", ".join(f"{self.titles[i]!r} (id {self.ids[i]!r})" for i in shared[:5])
                raise RequestError(f"{what}[{n}]", f"{_short(ref)} is the title of {len(shared)} items: {named}; "
                                                   "give the id or the title with its (#id)")
        close = self.closest_titles(normalize_title(cleaned), 3)
        hint = f"; closest titles: {', '.join(repr(c) for c in close)}" if close else ""
        raise RequestError(f"{what}[{n}]", f"unknown item {_short(ref)} (neither an item id nor a title){hint}")

    def closest_titles(self, title: str, n: int = 3, cutoff: float = 0.5) -> list[str]:
        """The titles most like `title` (difflib's ratio of at least `cutoff`), best first. Only
        the titles that share the most character trigrams with it are compared: difflib over a
        whole catalogue takes tens of milliseconds (a service's event loop would stall on every
        misspelt title), this about one."""
        index = self._trigrams if self._trigrams is not None else self._trigram_index()
        shared: dict[int, int] = {}
        for gram in _trigrams(title):
            for i in index.get(gram, ()):
                shared[i] = shared.get(i, 0) + 1
        pool = sorted(shared, key=lambda i: -shared[i])[: max(50, 5 * n)]
        return difflib.get_close_matches(title, [self.titles[i] for i in pool], n=n, cutoff=cutoff)

    def _trigram_index(self) -> dict[str, list[int]]:
        with self._index_lock:  # built once, even when two threads ask first at the same time
            if self._trigrams is None:
                index: dict[str, list[int]] = {}
                for i, t in enumerate(self.titles[1:], 1):
                    for gram in _trigrams(t):
                        index.setdefault(gram, []).append(i)
                self._trigrams = index
            return self._trigrams

    def warm(self) -> None:
        """Build what the first request would otherwise wait for (the index of closest titles)."""
        self._trigram_index()

    def search(self, query: str, limit: int = 10) -> list[tuple[str, str]]:
        """(id, title) of the items whose title contains `query` (compared by `title_key`; in the
        original or the normalised form), the exact title first, then the titles that start with
        it, then the shortest; else the closest titles. Items sharing a title are each listed,
        under their title with its (#id)."""

        cleaned = clean_title(query)
        words = cleaned.casefold()
        if not words:
            return []
        alt = normalize_title(cleaned).casefold()
        exact = {words, alt}
        def closeness(i: int) -> tuple | None:  # exact title, then titles starting with it, then containing it
            title = self._keys[i]
            where = min((title.find(w) for w in (words, alt) if w in title), default=-1)
            if where < 0:
                return None
            is_exact = title in exact or self._base_keys[i] in exact
            return (not is_exact, where > 0, len(title), title)

        found = {i: key for i in range(1, len(self.titles)) if (key := closeness(i)) is not None}
        hits = sorted(found, key=found.get)
        if not hits:
            close = self.closest_titles(normalize_title(cleaned), limit)
            hits = [self._by_title[title_key(c)] for c in close]
        return [(self.ids[i], self.titles[i]) for i in hits[:limit]]

    def rank(self, history: Sequence[str | int], candidates: Sequence[str | int] | None = None, k: int = 10) -> Ranking:
        return self.rank_many([{"history": history, "candidates": candidates, "k": k}])[0]

    def rank_many(self, requests: Sequence[dict]) -> list[Ranking]:
        """Several requests ({"history": [...], "candidates": [...] or None, "k": 10}), scored
        together where they have the same number of candidates (one batch per size). A bad
        request raises a RequestError naming it (`requests[2].history[0]: ...`) before any is scored."""
        prepared = []
        for n, r in enumerate(requests):
            try:
                prepared.append(self.prepare(r.get("history"), r.get("candidates"), r.get("k", 10)))
            except RequestError as e:
                raise RequestError(f"requests[{n}].{e.field}" if len(requests) > 1 else e.field, e.message) from None
        return self.rank_prepared(prepared)

    def rank_prepared(self, prepared: Sequence[PreparedRequest]) -> list[Ranking]:
        """Rankings of checked requests; the teacher's top lists of those without candidates are
        found in one pass, and requests with as many candidates are scored in one batch."""
        missing = [i for i, p in enumerate(prepared) if p.candidates is None]
        tops = self._teacher_top([list(prepared[i].history) for i in missing]) if missing else []
        candidates = [list(p.candidates) if p.candidates is not None else None for p in prepared]
        for i, top in zip(missing, tops):
            candidates[i] = top
        scores: list[np.ndarray | None] = [None] * len(prepared)
        for size in sorted({len(c) for c in candidates}):
            idx = [i for i, c in enumerate(candidates) if len(c) == size]
            batch = self._score([list(prepared[i].history) for i in idx], [candidates[i] for i in idx])
            for i, row in zip(idx, batch):
                scores[i] = row
        out = []
        teacher_list = f"the {self.teacher_name} teacher's top {self.num_candidates}"
        for p, cands, row in zip(prepared, candidates, scores):
            order = np.argsort(-np.asarray(row, dtype=np.float64), kind="stable")[: p.k]
            out.append(Ranking([RankedItem(self.ids[cands[j]], self.titles[cands[j]], float(row[j])) for j in order],
                               "given" if p.candidates is not None else teacher_list,
                               [self.titles[i] for i in p.history], p.history_truncated, bool(np.isfinite(row).all())))
        return out

    def prepare(self, history, candidates=None, k=10) -> PreparedRequest:
        """Check one request (see the module docstring) without scoring it."""
        if history is None or isinstance(history, (str, bytes)) or len(history) == 0:
            raise RequestError("history", "the history is empty: give at least one item the user interacted with (a list, most recent last)")
        items = self.resolve(history, "history")
        truncated = max(0, len(items) - self.max_history)
        items = items[truncated:]
        if candidates is None:
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= self.num_candidates:
                raise RequestError("k", f"must be an integer from 1 to {self.num_candidates}, got {k!r}")
            if self.teacher_name is None:
                raise RequestError("candidates", f"none given, and the run {self.run.name!r} has no trained teacher to propose them: "
                                                 "give candidates, or train one (`delrec teacher train`)")
            return PreparedRequest(tuple(items), None, k, truncated)
        else:
            if isinstance(candidates, (str, bytes)) or len(candidates) < 2:
                raise RequestError("candidates", "give at least two items to rank (a list)")
            if len(candidates) > self.max_candidates:
                raise RequestError("candidates", f"at most {self.max_candidates} items to rank, got {len(candidates)}")
            cands = self.resolve(candidates, "candidates")
            seen = {}
            for n, c in enumerate(cands):
                if c in seen:
                    raise RequestError(f"candidates[{n}]", f"{self.titles[c]!r} is also candidates[{seen[c]}]")
                seen[c] = n
            history_set = set(items)
            in_history = [n for n, c in enumerate(cands) if c in history_set]
            if in_history:
                raise RequestError(f"candidates[{in_history[0]}]", f"{self.titles[cands[in_history[0]]]!r} is already in the history")
            if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= len(cands):
                raise RequestError("k", f"must be an integer from 1 to the {len(cands)} candidates, got {k!r}")
            return PreparedRequest(tuple(items), tuple(cands), k, truncated)

    def _teacher_top(self, histories: list[list[int]]) -> list[list[int]]:
        """The teacher's top num_candidates over the items each history has not seen, in one pass."""

        if self._teacher is None:

            self._teacher = load_teacher(RunLayout(self.run).teacher(self.teacher_name), self.device, self.data)
        model = self._teacher
        h = torch.tensor([([0] * model.max_len + h)[-model.max_len :] for h in histories], device=next(model.parameters()).device)
        with torch.no_grad():
            scores = model.score_all(h, None).float().cpu()  # None: users the teacher has not seen
        out = []
        for row, history in zip(scores, histories):
            row[history] = float("-inf")  # never what the user already has
            out.append(row.topk(min(self.num_candidates, self.data.num_items - len(set(history)))).indices.tolist())
        return out

    def _score(self, histories: list[list[int]], candidates: list[list[int]]) -> list[np.ndarray]:
        """Scores of each request's candidates by the model, through the evaluator's scorer on a
        view of the requests shaped like the run's samples."""
        view = _Requests(self.data, histories, candidates)
        scores = self.scorer.score_candidates(view, np.arange(len(histories)))
        scores = scores.numpy() if hasattr(scores, "numpy") else np.asarray(scores)
        return [np.asarray(s, dtype=np.float32) for s in scores]


def _short(ref, limit: int = 80) -> str:
    """`ref` for a message: repr'd, and cut to a prefix when long."""
    text = repr(ref)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(str(ref))} characters)"


def _trigrams(title: str) -> set[str]:
    text = f"  {' '.join(title.lower().split())} "
    return {text[i : i + 3] for i in range(len(text) - 2)}


class _Requests:
    """Requests in the shape of a run's samples (left-padded histories, candidates, an unseen
    user), so every scorer of the evaluator scores them as it scores test samples."""

    def __init__(self, data, histories: list[list[int]], candidates: list[list[int]]):
        width = data.config.max_history
        self.config, self.items, self.num_items = data.config, data.items, data.num_items
        self.history = np.zeros((len(histories), width), dtype=np.int64)
        for r, h in enumerate(histories):
            self.history[r, width - len(h):] = h
        self.history_len = np.array([len(h) for h in histories])
        self.candidates = np.asarray(candidates, dtype=np.int64)
        self.unknown_users = True  # no user the teacher has seen: teachers score without a user part
        self.sample_id = np.arange(len(histories))


def _run_config(run: Path):
    try:
        return PipelineConfig.from_run(run)
    except FileNotFoundError:  # a folder made step by step, without `delrec run`
        return None
