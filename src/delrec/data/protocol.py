"""The evaluation protocol: from raw interactions to samples, a split and fixed candidate sets.

Two protocols share one code path (see DESIGN.md, "The evaluation protocol"):

* ``paper``: implicit feedback, iterative 5-core, one sample per position t >= 1 (history = the
  up-to-``max_history`` items before t, most recent last), all samples ordered by target time and
  split 80/10/10, candidates = target + 14 uniform negatives, fixed on disk.
* ``loo``: the same samples, but each user's last sample is test and the one before is valid
  (leave-one-out by time, RecBole's setting); teachers are scored by full ranking.

Leakage rules this module enforces:

* ties in time keep the source file's order (sorting ties by item id would leak);
* in ``paper`` the split boundaries are moved to the end of a group of equal timestamps, so every
  train target is strictly earlier than every valid target, and every valid than every test;
* negatives exclude the items the user interacted with up to and including the target, using no
  information from after the sample's own time.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from delrec.data.titles import disambiguate_titles

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
PROTOCOLS = ("paper", "loo")
@dataclass(frozen=True)
class ProtocolConfig:
    name: str = "paper"
    min_count: int = 5  # k of the iterative k-core filter, on users and items
    max_history: int = 10  # items shown before each target (the paper uses 10)
    split_ratio: tuple[float, float, float] = (0.8, 0.1, 0.1)
    num_candidates: int = 15  # target + (num_candidates - 1) negatives
    seed: int = 2024

    def __post_init__(self) -> None:
        if self.name not in PROTOCOLS:
            raise ValueError(f"unknown protocol {self.name!r}; choose one of {PROTOCOLS}")
        if self.max_history < 1 or self.num_candidates < 2 or self.min_count < 1:
            raise ValueError(f"invalid protocol settings: {self}")
        if abs(sum(self.split_ratio) - 1.0) > 1e-9 or min(self.split_ratio) <= 0:
            raise ValueError(f"split_ratio must be three positive numbers summing to 1, got {self.split_ratio}")

    @classmethod
    def for_protocol(cls, name: str, **overrides) -> ProtocolConfig:
        """Defaults per protocol: `loo` follows RecBole's SASRec setting (history 50)."""
        defaults = {"paper": {}, "loo": {"max_history": 50}}
        if name not in defaults:
            raise ValueError(f"unknown protocol {name!r}; choose one of {PROTOCOLS}")
        return cls(name=name, **{**defaults[name], **{k: v for k, v in overrides.items() if v is not None}})


def k_core(interactions: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than k interactions until nothing changes."""
    users, _ = pd.factorize(interactions["user"])
    items, _ = pd.factorize(interactions["item"])
    return interactions.iloc[k_core_rows(users, items, k)]


def k_core_rows(users: np.ndarray, items: np.ndarray, k: int) -> np.ndarray:
    """Positions of the rows the iterative k-core keeps, given integer codes 0..n-1 of each
    row's user and item. Counts by bincount over the rows still kept, which shrink at every pass
    (Amazon Home & Kitchen: 21.9M rows of which a quarter survive)."""
    rows = np.arange(len(users), dtype=np.int64)
    n_users, n_items = int(users.max(initial=-1)) + 1, int(items.max(initial=-1)) + 1
    u, i = users, items
    while True:
        ok = (np.bincount(u, minlength=n_users)[u] >= k) & (np.bincount(i, minlength=n_items)[i] >= k)
        if ok.all():
            return rows
        rows, u, i = rows[ok], u[ok], i[ok]


@dataclass
class Prepared:
    """Everything `prepare` produces, in memory; `write` puts it in a run folder."""

    config: ProtocolConfig
    items: pd.DataFrame  # item_idx (1..N; 0 is padding), item, title
    interactions: pd.DataFrame  # user, user_idx, item_idx, timestamp; sorted by user then time
    samples: pa.Table
    candidates: pa.Table
    stats: dict = field(default_factory=dict)


def _list_offsets(lengths: np.ndarray) -> np.ndarray:
    """Offsets of a list column: int64, so a column past 2**31 values (ML-1M's loo histories of
    50 reach a billion at about 20M samples) does not wrap as int32 offsets silently would."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, dtype=np.int64, out=offsets[1:])
    return offsets


def _list_array(values: np.ndarray, lengths: np.ndarray) -> pa.LargeListArray:
    """A `large_list<int32>` column (int64 offsets). Folders prepared before this have
    `list<int32>` (int32 offsets); `RunData.load` reads both."""
    return pa.LargeListArray.from_arrays(pa.array(_list_offsets(lengths)), pa.array(values.astype(np.int32)))


def _split_paper(times: np.ndarray, ratio: tuple[float, float, float]) -> np.ndarray:
    """Split samples (already sorted by time) 80/10/10, moving each boundary past equal timestamps."""
    n = len(times)
    cuts = []
    for frac in np.cumsum(ratio)[:2]:
        cut = int(n * frac)
        if 0 < cut < n:
            # all samples with the boundary timestamp stay on the earlier side
            cut = int(np.searchsorted(times, times[cut - 1], side="right"))
        cuts.append(cut)
    cuts[1] = max(cuts[1], cuts[0])
    split = np.full(n, 2, dtype=np.int8)
    split[: cuts[1]] = 1
    split[: cuts[0]] = 0
    return split


def _split_loo(user_idx: np.ndarray, position: np.ndarray, user_len: np.ndarray) -> np.ndarray:
    """Each user's last sample is test, the one before valid, the rest train."""
    last = user_len[user_idx] - 1  # position of the user's last interaction
    split = np.zeros(len(user_idx), dtype=np.int8)
    split[position == last - 1] = 1
    split[position == last] = 2
    return split


def _sample_negatives(
    rng: np.random.Generator,
    user_idx: np.ndarray,
    position: np.ndarray,
    inter_user: np.ndarray,
    inter_item: np.ndarray,
    inter_pos: np.ndarray,
    num_items: int,
    num_negatives: int,
) -> np.ndarray:
    """Uniform negatives per sample, without replacement, excluding the items the user had
    interacted with up to and including the sample's target (vectorised rejection sampling)."""
    stride = np.int64(num_items + 1)
    keys = inter_user.astype(np.int64) * stride + inter_item
    # interactions are sorted by user then time, so the first occurrence is the earliest
    uniq_keys, first = np.unique(keys, return_index=True)
    first_pos = inter_pos[first]

    def seen(rows: np.ndarray, cand: np.ndarray) -> np.ndarray:
        k = user_idx[rows].astype(np.int64)[:, None] * stride + cand
        at = np.minimum(np.searchsorted(uniq_keys, k), len(uniq_keys) - 1)
        return (uniq_keys[at] == k) & (first_pos[at] <= position[rows][:, None])

    def duplicated_in_row(block: np.ndarray) -> np.ndarray:
        order = np.argsort(block, axis=1, kind="stable")
        sorted_vals = np.take_along_axis(block, order, axis=1)
        dup_sorted = np.zeros_like(block, dtype=bool)
        dup_sorted[:, 1:] = sorted_vals[:, 1:] == sorted_vals[:, :-1]
        dup = np.zeros_like(dup_sorted)
        np.put_along_axis(dup, order, dup_sorted, axis=1)
        return dup

    n = len(user_idx)
    negs = rng.integers(1, num_items + 1, size=(n, num_negatives), dtype=np.int64)
    rows = np.arange(n)
    for _ in range(1000):
        block = negs[rows]
        bad = seen(rows, block) | duplicated_in_row(block)
        bad_rows = bad.any(axis=1)
        if not bad_rows.any():
            return negs.astype(np.int32)
        rows, bad = rows[bad_rows], bad[bad_rows]
        block = negs[rows]
        block[bad] = rng.integers(1, num_items + 1, size=int(bad.sum()), dtype=np.int64)
        negs[rows] = block
    raise RuntimeError(
        f"could not draw {num_negatives} distinct unseen negatives for {len(rows)} samples; "
        f"the catalogue ({num_items} items) is too small for the users' histories"
    )


class NotEnoughData(ValueError):
    """The filters or the split leave too little for a run: no interactions, fewer items than the
    candidates of a sample, or a split without samples. The message gives the counts before and
    after each filter and the settings that would change them; `prepare` has written nothing."""


def prepare(interactions: pd.DataFrame, items: pd.DataFrame, config: ProtocolConfig, read: dict | None = None) -> Prepared:
    """Apply the protocol to canonical interactions (user, item, timestamp; source order) and
    items (item, title): duplicates and the k-core, dense ids, one sample per position with its
    history, the split, the fixed candidates, the titles and the statistics. `read`: what a
    publisher's reader counted before its title filter (RawDataset.source["read"]), named in a
    refusal's counts. Raises NotEnoughData, writing nothing, when the result could not be
    trained and evaluated."""
    kept = _filtered_log(interactions, config, read)
    s = _samples(kept, config)
    _check_splits(kept, s, config)
    _check_negatives(kept, config)
    rng = np.random.default_rng(config.seed)
    negs = _sample_negatives(rng, s.user, s.position, kept.user_idx, kept.item_idx, kept.position, kept.num_items,
                             config.num_candidates - 1)
    # shuffled so that the target's slot carries no information
    cands = rng.permuted(np.concatenate([s.target[:, None], negs], axis=1), axis=1).astype(np.int32)
    sample_id = np.arange(len(s.target), dtype=np.int64)
    samples = pa.table(
        {
            "sample_id": pa.array(sample_id),
            "user_idx": pa.array(s.user.astype(np.int32)),
            "position": pa.array(s.position.astype(np.int32)),
            "history": _list_array(s.history_values, s.history_len),
            "target": pa.array(s.target.astype(np.int32)),
            "timestamp": pa.array(s.time),
            "split": pa.array(np.array(SPLITS)[s.split]).dictionary_encode(),
        }
    )
    candidates = pa.table(
        {
            "sample_id": pa.array(sample_id),
            "candidates": pa.FixedSizeListArray.from_arrays(pa.array(cands.reshape(-1)), config.num_candidates),
        }
    )
    items_out, renamed = _item_table(items, kept.item_names)
    inter_out = pd.DataFrame(
        {
            "user": np.asarray(kept.user_names, dtype=object)[kept.user_idx],
            "user_idx": kept.user_idx,
            "item_idx": kept.item_idx,
            "timestamp": kept.timestamp,
        }
    )
    return Prepared(config, items_out, inter_out, samples, candidates, _stats(config, kept, s, renamed))


@dataclass
class _KeptLog:
    """The interactions after duplicates and the k-core, with dense ids, sorted by (user, time,
    source order); `position`: each interaction's index in its user's sequence."""

    user_idx: np.ndarray
    item_idx: np.ndarray  # 1-based: 0 is padding
    timestamp: np.ndarray
    position: np.ndarray
    user_len: np.ndarray
    user_names: np.ndarray
    item_names: np.ndarray
    raw_stats: dict
    duplicates: int
    repeats: int  # interactions whose (user, item) pair came before at another time: kept
    funnel: list[str]  # the counts before and after each filter, for a refusal's message

    @property
    def num_users(self) -> int:
        return len(self.user_names)

    @property
    def num_items(self) -> int:
        return len(self.item_names)


def _filtered_log(interactions: pd.DataFrame, config: ProtocolConfig, read: dict | None = None) -> _KeptLog:
    for col in ("user", "item", "timestamp"):
        if col not in interactions.columns:
            raise ValueError(f"interactions lack the column {col!r} (have {list(interactions.columns)})")
    if len(interactions) == 0:
        raise ValueError("no interactions to prepare")
    # Everything up to the k-core works on integer codes of the ids (factorize: in order of first
    # appearance), never on the id strings: at Home & Kitchen's 21.9M rows a pass over strings
    # costs seconds and gigabytes, one over codes a fraction of either.
    raw_users, raw_user_names = pd.factorize(interactions["user"], sort=False)
    raw_items, raw_item_names = pd.factorize(interactions["item"], sort=False)
    raw_time = interactions["timestamp"].to_numpy(np.int64)
    raw_stats = {"users": len(raw_user_names), "items": len(raw_item_names), "interactions": int(len(interactions))}
    # an exact repeat of a (user, item, timestamp) row is a logging artefact, not a second
    # interaction: kept, it would inflate the k-core counts and make targets already in the history
    repeated = pd.DataFrame({"u": raw_users, "i": raw_items, "t": raw_time}).duplicated(keep="first").to_numpy()
    duplicates = int(repeated.sum())
    source_rows = np.arange(len(interactions), dtype=np.int64)  # ties in time keep the source order
    if duplicates:
        log.warning("dropped %d exact duplicate (user, item, timestamp) interactions", duplicates)
        source_rows = np.flatnonzero(~repeated)
    deduplicated = source_rows
    # the same item again at another time (a video watched twice, a product bought again) is a
    # second interaction, kept; counted, since its target is then already in the history
    pairs = raw_users[source_rows].astype(np.int64) * len(raw_item_names) + raw_items[source_rows]
    repeats = int(len(pairs) - pd.Series(pairs).nunique())
    source_rows = source_rows[k_core_rows(raw_users[source_rows], raw_items[source_rows], config.min_count)]

    def counts(rows: np.ndarray) -> str:  # distinct codes by bincount: O(rows), no sort
        n_u = np.count_nonzero(np.bincount(raw_users[rows], minlength=1))
        n_i = np.count_nonzero(np.bincount(raw_items[rows], minlength=1))
        return f"{len(rows):,} interactions, {n_u:,} users, {n_i:,} items"

    everything = np.arange(len(interactions))
    if read and all(f"{k}_read" in read for k in ("users", "items", "interactions")):
        funnel = [f"as read: {read['interactions_read']:,} interactions, {read['users_read']:,} users, "
                  f"{read['items_read']:,} items",
                  f"after dropping the items without a title ({read.get('items_without_title', 0):,}): " + counts(everything)]
    else:
        funnel = ["given: " + counts(everything)]
    funnel += [f"after dropping the exact duplicates ({duplicates:,}): " + counts(deduplicated),
               f"after the {config.min_count}-core (--min-count {config.min_count}): " + counts(source_rows)]
    k = config.min_count
    if len(source_rows) == 0:
        raise NotEnoughData(_refusal(f"no interactions survive the {k}-core filter (every user and item needs at "
                                     f"least {k} interactions)", funnel, config))
    n_items = int(np.count_nonzero(np.bincount(raw_items[source_rows], minlength=1)))
    if n_items < config.num_candidates:
        raise NotEnoughData(_refusal(f"the {k}-core filter leaves {n_items} items, fewer than the "
                                     f"{config.num_candidates} candidates of each sample (the target and "
                                     f"{config.num_candidates - 1} negatives)", funnel, config))

    # Dense ids in order of first appearance in the source file: deterministic, and no id order
    # can leak into the ranking because ties are never broken by id.
    user_codes, user_kept = pd.factorize(raw_users[source_rows], sort=False)
    item_codes, item_kept = pd.factorize(raw_items[source_rows], sort=False)
    user_idx = user_codes.astype(np.int32)
    item_idx = (item_codes + 1).astype(np.int32)  # 0 is padding
    timestamp = raw_time[source_rows]
    order = np.lexsort((source_rows, timestamp, user_idx))
    user_idx, item_idx, timestamp = user_idx[order], item_idx[order], timestamp[order]
    user_len = np.bincount(user_idx, minlength=len(user_kept))
    user_start = np.zeros(len(user_kept), dtype=np.int64)
    np.cumsum(user_len[:-1], out=user_start[1:])
    return _KeptLog(user_idx, item_idx, timestamp, np.arange(len(user_idx)) - user_start[user_idx], user_len,
                    raw_user_names[user_kept], raw_item_names[item_kept], raw_stats, duplicates, repeats, funnel)


def _refusal(problem: str, funnel: list[str], config: ProtocolConfig) -> str:
    """A NotEnoughData message: the problem, the counts after each filter, what would change them."""
    return (f"{problem}; nothing was written.\n" + "".join(f"  {line}\n" for line in funnel)
            + f"Lower --min-count (now {config.min_count}; `protocol: {{min_count: K}}` in a run config) to keep "
            f"more users and items, or --num-candidates (now {config.num_candidates}; `protocol: {{num_candidates: N}}`), "
            "or give more data")


def _check_negatives(kept: _KeptLog, config: ProtocolConfig) -> None:
    """The negatives of a sample are items its user has not seen up to the target: the user's last
    sample, who has seen the most, needs num_candidates - 1 items left unseen."""
    pairs = np.unique(kept.user_idx.astype(np.int64) * (kept.num_items + 1) + kept.item_idx)
    seen = int(np.bincount(pairs // (kept.num_items + 1)).max())
    if kept.num_items - seen >= config.num_candidates - 1:
        return
    raise NotEnoughData(_refusal(
        f"a user has seen {seen} of the {kept.num_items} items the {config.min_count}-core keeps, which leaves "
        f"{kept.num_items - seen} unseen for the {config.num_candidates - 1} negatives of its last sample",
        kept.funnel, config))


def _check_splits(kept: _KeptLog, s: _Samples, config: ProtocolConfig) -> None:
    """Every split needs samples: a run trains on one, stops early on another and reports the third."""
    per_split = [int((s.split == i).sum()) for i in range(len(SPLITS))]
    if min(per_split) > 0:
        return
    why = ("a sample is an interaction after a user's first; the chronological split moves each boundary past equal "
           "timestamps" if config.name == "paper" else "a user's last two interactions are its valid and test samples")
    raise NotEnoughData(_refusal(
        f"the samples split into {' / '.join(f'{n} {name}' for n, name in zip(per_split, SPLITS))}: every split needs "
        f"samples ({why})", [*kept.funnel, f"{len(s.target):,} samples"], config))


@dataclass
class _Samples:
    """One sample per position t >= 1 of every user's sequence, in chronological order (by target
    time, ties by user and position, which follow the source order)."""

    user: np.ndarray
    position: np.ndarray
    target: np.ndarray
    time: np.ndarray
    history_values: np.ndarray  # the histories' items, concatenated
    history_len: np.ndarray
    split: np.ndarray  # codes into SPLITS


def _samples(kept: _KeptLog, config: ProtocolConfig) -> _Samples:
    g = np.flatnonzero(kept.position >= 1)
    s_user, s_pos, s_target, s_time = kept.user_idx[g], kept.position[g], kept.item_idx[g], kept.timestamp[g]
    chrono = np.lexsort((s_pos, s_user, s_time))
    g, s_user, s_pos, s_target, s_time = (a[chrono] for a in (g, s_user, s_pos, s_target, s_time))
    hist_len = np.minimum(s_pos, config.max_history)
    hist_start = g - hist_len
    total = int(hist_len.sum())
    seg_start = np.repeat(np.cumsum(hist_len) - hist_len, hist_len)
    hist_values = kept.item_idx[np.repeat(hist_start, hist_len) + (np.arange(total) - seg_start)]
    split = _split_paper(s_time, config.split_ratio) if config.name == "paper" else _split_loo(s_user, s_pos, kept.user_len)
    return _Samples(s_user, s_pos, s_target, s_time, hist_values, hist_len, split)


def _item_table(items: pd.DataFrame, item_names) -> tuple[pd.DataFrame, int]:
    """items.parquet (item_idx, item, title) for the kept items, and how many titles were made unique."""
    titles = items.drop_duplicates("item").set_index("item")["title"]
    missing = pd.Index(item_names).difference(titles.index)
    if len(missing):
        raise ValueError(f"{len(missing)} interacted items have no title, e.g. {list(missing[:5])}")
    # Items sharing a title (ML-100K: 9 titles of 18 items) would be one and the same to the LLM,
    # which reads and scores titles: two such candidates could not be told apart. Each gets its id
    # appended; a folder prepared before this keeps the titles it has (and its prompts).
    kept_titles = [str(t) for t in titles.reindex(item_names)]
    unique_titles = disambiguate_titles(kept_titles, [str(i) for i in item_names])
    renamed = sum(a != b for a, b in zip(kept_titles, unique_titles))
    if renamed:
        log.info("%d items share a title with another item: their ids are appended to their titles "
                 "(e.g. %r)", renamed, next(b for a, b in zip(kept_titles, unique_titles) if a != b))
    table = pd.DataFrame(
        {
            "item_idx": np.arange(1, len(item_names) + 1, dtype=np.int32),
            "item": np.asarray(item_names, dtype=object),
            "title": np.asarray(unique_titles, dtype=object),
        }
    )
    return table, renamed


def _stats(config: ProtocolConfig, kept: _KeptLog, s: _Samples, renamed: int) -> dict:
    per_split = {name: int((s.split == i).sum()) for i, name in enumerate(SPLITS)}
    time_range = {
        name: [int(s.time[s.split == i].min()), int(s.time[s.split == i].max())] if per_split[name] else None
        for i, name in enumerate(SPLITS)
    }
    n_kept = int(len(kept.item_idx))
    stats = {
        "protocol": config.name,
        "raw": {**kept.raw_stats, "sparsity": _sparsity(**kept.raw_stats), "duplicates_dropped": kept.duplicates},
        "filtered": {
            "users": kept.num_users,
            "items": kept.num_items,
            "interactions": n_kept,
            "sparsity": _sparsity(kept.num_users, kept.num_items, n_kept),
            "avg_sequence_length": float(kept.user_len.mean()),
        },
        "samples": {"total": int(len(s.target)), **per_split},
        "target_time_range": time_range,
        # items whose title (compared by delrec.data.titles.title_key) another item shares
        "duplicate_titles": renamed,
    }
    if renamed:  # only then: a folder of data without such titles keeps the stats it had
        stats["titles_disambiguated"] = renamed
    if kept.repeats:  # likewise: MovieLens has one rating per user and item
        stats["raw"]["repeat_interactions"] = kept.repeats
    return stats


def without_title(read: dict | None) -> dict | None:
    """The items a publisher's reader dropped for want of a title, and their interactions, with
    their shares of what the files held (None for a source that keeps no such counts)."""
    keys = ("items_read", "interactions_read", "items_without_title", "interactions_of_items_without_title")
    if not read or not all(k in read for k in keys):
        return None
    items, inter = int(read["items_without_title"]), int(read["interactions_of_items_without_title"])
    return {"items": items, "items_share": round(items / max(int(read["items_read"]), 1), 6),
            "interactions": inter, "interactions_share": round(inter / max(int(read["interactions_read"]), 1), 6)}


def _sparsity(users: int, items: int, interactions: int) -> float:
    return round(1.0 - interactions / (users * items), 6)
