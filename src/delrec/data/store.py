"""The prepared data on disk (RUN/data/): written once by `write`, read by every later step as
`RunData`, and checked against a new preparation (`holds_same_data`) before results made from it
are reused."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from delrec.core.io import read_json, read_parquet, write_json, write_parquet
from delrec.core.layout import RunLayout
from delrec.data.paper import compare_with_paper
from delrec.data.protocol import SPLITS, Prepared, ProtocolConfig, without_title

FORMAT_VERSION = 1


def write(prepared: Prepared, data_dir: str | Path, source: dict | None = None) -> None:
    """Write a prepared data set into `data_dir` (normally RUN/data); each file atomically,
    protocol.json last, so its presence marks a complete folder."""
    data_dir = Path(data_dir)
    (data_dir / "protocol.json").unlink(missing_ok=True)
    write_parquet(data_dir / "items.parquet", prepared.items)
    write_parquet(data_dir / "interactions.parquet", prepared.interactions)
    write_parquet(data_dir / "samples.parquet", prepared.samples)
    write_parquet(data_dir / "candidates.parquet", prepared.candidates)
    write_json(data_dir / "stats.json", {**prepared.stats, **_source_stats(prepared.stats, source or {})})
    config = asdict(prepared.config)
    config["split_ratio"] = list(config["split_ratio"])
    write_json(data_dir / "protocol.json", {"format_version": FORMAT_VERSION, "protocol": config, "source": source or {}})


def write_run_data(run: str | Path, prepared: Prepared, dataset: str, source: dict, delete_stale: bool = False) -> list[str]:
    """`prepared` written as RUN/data. The results a run holds (teachers, stages, evaluations) were
    made from its current data and would be read with the new data's ids and samples: when the
    data differs, they are refused, or with `delete_stale` deleted (their folder names returned)."""
    layout = RunLayout(run)
    stale = [d for d in layout.results if d.is_dir() and any(d.iterdir())]
    if stale and holds_same_data(layout.data, prepared.config, dataset, prepared):
        stale = []  # the same data: its results stay valid
    if stale and not delete_stale:
        raise ValueError(f"{run} holds results made from its current data ({', '.join(d.name + '/' for d in stale)}); "
                         "preparing other data there would leave them pointing at the wrong items and samples. "
                         "Use another --out, or --force to delete those results")
    for d in stale:
        shutil.rmtree(d)
    write(prepared, layout.data, source={"dataset": dataset, **source})
    return [d.name for d in stale]


def _source_stats(stats: dict, source: dict) -> dict:
    """What stats.json gains from the source (`write` adds it; `holds_same_data` leaves it out):
    the items a publisher's reader dropped for want of a title with their interactions
    (`without_title`), and the paper's numbers of its data sets (`paper`)."""
    out = {}
    untitled = without_title(source.get("read"))
    if untitled is not None:
        out["without_title"] = untitled
    paper = compare_with_paper(str(source.get("dataset", "")), stats["filtered"], source.get("read"))
    if paper is not None:  # a data set of the paper's: its Table I / V numbers beside these
        out["paper"] = paper
    return out


def holds_same_data(data_dir: str | Path, config: ProtocolConfig, dataset: str, prepared: Prepared | None = None) -> bool:
    """The one rule by which a prepared folder counts as holding the data asked for, used by
    `delrec data prepare` (which then keeps the results made from it) and `delrec run` (which then
    skips the step): the same data set name and protocol settings (protocol.json); with `prepared`
    (what preparing again gives, at hand in `data prepare`), also the same statistics, samples,
    candidates and items, which catches a source file changed under the same name."""
    data_dir = Path(data_dir)
    if not (data_dir / "protocol.json").exists():
        return False
    written = read_json(data_dir / "protocol.json")
    if written["protocol"] != json.loads(json.dumps(asdict(config))) or written["source"].get("dataset") != dataset:
        return False
    if prepared is None:
        return True
    from_source = ("without_title", "paper")  # added by `write`, from the source
    if {k: v for k, v in read_json(data_dir / "stats.json").items() if k not in from_source} != json.loads(
            json.dumps(prepared.stats)):
        return False

    def same(name: str, table: pa.Table) -> bool:
        table = table.replace_schema_metadata(None)
        try:  # folders prepared before the history offsets became 64-bit hold list<int32>: same values
            return read_parquet(data_dir / f"{name}.parquet").replace_schema_metadata(None).cast(table.schema).equals(table)
        except (pa.ArrowInvalid, ValueError, KeyError):  # other columns: other data
            return False

    items = pa.Table.from_pandas(prepared.items, preserve_index=False)  # titles too
    return all(same(name, table) for name, table in (("samples", prepared.samples), ("candidates", prepared.candidates),
                                                      ("items", items)))


@dataclass
class RunData:
    """A prepared data folder loaded as dense arrays for models and evaluators."""

    config: ProtocolConfig
    items: pd.DataFrame
    num_items: int
    num_users: int
    sample_id: np.ndarray
    user_idx: np.ndarray
    position: np.ndarray
    history: np.ndarray  # [n, max_history] int64, left-padded with 0, most recent last
    history_len: np.ndarray
    target: np.ndarray
    timestamp: np.ndarray
    split: np.ndarray  # int8 codes into SPLITS
    candidates: np.ndarray  # [n, num_candidates]
    # the user's whole sequence (for masking already-seen items in full ranking)
    user_start: np.ndarray
    user_items: np.ndarray
    stats: dict
    user_times: np.ndarray | None = None  # each of user_items' timestamps (the models that read time gaps)

    @classmethod
    def load(cls, data_dir: str | Path) -> RunData:
        data_dir = Path(data_dir)
        meta_path = data_dir / "protocol.json"
        if not meta_path.exists():
            raise FileNotFoundError(
                f"{data_dir} is not a prepared data folder (no protocol.json); run `delrec data prepare` first"
            )
        meta = read_json(meta_path)
        proto = meta["protocol"]
        proto["split_ratio"] = tuple(proto["split_ratio"])
        config = ProtocolConfig(**proto)
        items = read_parquet(data_dir / "items.parquet").to_pandas()
        samples = read_parquet(data_dir / "samples.parquet")
        cands = read_parquet(data_dir / "candidates.parquet")
        inter = read_parquet(data_dir / "interactions.parquet")

        hist = samples.column("history").combine_chunks()
        offsets = hist.offsets.to_numpy()
        lengths = np.diff(offsets)
        values = hist.values.to_numpy().astype(np.int64)
        n, H = len(lengths), config.max_history
        padded = np.zeros((n, H), dtype=np.int64)
        rows = np.repeat(np.arange(n), lengths)
        cols = H - np.repeat(lengths, lengths) + (np.arange(len(values)) - np.repeat(offsets[:-1], lengths))
        padded[rows, cols] = values

        sample_ids = samples.column("sample_id").to_numpy()
        if not np.array_equal(cands.column("sample_id").to_numpy(), sample_ids):
            raise ValueError(f"{data_dir}: candidates.parquet and samples.parquet disagree on sample ids")
        cand = cands.column("candidates").combine_chunks()
        cand = cand.values.to_numpy().astype(np.int64).reshape(n, config.num_candidates)
        split = pd.Categorical(samples.column("split").to_pandas(), categories=list(SPLITS)).codes.astype(np.int8)

        inter_user = inter.column("user_idx").to_numpy()
        num_users = int(inter_user.max()) + 1
        user_len = np.bincount(inter_user, minlength=num_users)
        user_start = np.zeros(num_users + 1, dtype=np.int64)
        np.cumsum(user_len, out=user_start[1:])
        return cls(
            config=config,
            items=items,
            num_items=len(items),
            num_users=num_users,
            sample_id=sample_ids,
            user_idx=samples.column("user_idx").to_numpy().astype(np.int64),
            position=samples.column("position").to_numpy().astype(np.int64),
            history=padded,
            history_len=lengths.astype(np.int64),
            target=samples.column("target").to_numpy().astype(np.int64),
            timestamp=samples.column("timestamp").to_numpy(),
            split=split,
            candidates=cand,
            user_start=user_start,
            user_items=inter.column("item_idx").to_numpy().astype(np.int64),
            stats=read_json(data_dir / "stats.json"),
            user_times=inter.column("timestamp").to_numpy().astype(np.int64),
        )

    @classmethod
    def catalogue_only(cls, data_dir: str | Path, num_users: int) -> RunData:
        """The protocol and the items of a data folder without any sample: what a trained model
        needs to answer requests (an exported bundle, delrec.serving.bundle, carries only
        protocol.json, items.parquet and stats.json). `num_users`: the users its teacher was built for."""
        data_dir = Path(data_dir)
        for name in ("protocol.json", "items.parquet"):
            if not (data_dir / name).exists():
                raise FileNotFoundError(f"{data_dir} lacks {name}: not the data of a run or a bundle")
        proto = read_json(data_dir / "protocol.json")["protocol"]
        proto["split_ratio"] = tuple(proto["split_ratio"])
        config = ProtocolConfig(**proto)
        items = read_parquet(data_dir / "items.parquet").to_pandas()
        none = np.zeros(0, dtype=np.int64)
        stats = read_json(data_dir / "stats.json") if (data_dir / "stats.json").exists() else {}
        return cls(config=config, items=items, num_items=len(items), num_users=int(num_users), sample_id=none,
                   user_idx=none, position=none, history=np.zeros((0, config.max_history), dtype=np.int64),
                   history_len=none, target=none, timestamp=none, split=np.zeros(0, dtype=np.int8),
                   candidates=np.zeros((0, config.num_candidates), dtype=np.int64),
                   user_start=np.zeros(int(num_users) + 1, dtype=np.int64), user_items=none, stats=stats)

    def indices(self, split: str) -> np.ndarray:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return np.flatnonzero(self.split == SPLITS.index(split))

    def history_gaps(self, rows: np.ndarray) -> np.ndarray:
        """[len(rows), max_history] float seconds from each history item's interaction to the
        sample's own time (the request's time: what a time-aware model such as KDA reads), aligned
        with `history` (0 where it is padding)."""
        if self.user_times is None:
            raise ValueError("this data has no interaction times (a catalogue without samples)")
        H = self.history.shape[1]
        lengths = self.history_len[rows]
        # history column j of a row holds the user's interaction (position - H + j), when j >= H - length
        index = (self.user_start[self.user_idx[rows]] + self.position[rows])[:, None] - H + np.arange(H)[None, :]
        valid = np.arange(H)[None, :] >= (H - lengths)[:, None]
        times = self.user_times[np.where(valid, index, 0)]
        return np.where(valid, self.timestamp[rows][:, None] - times, 0).astype(np.float32)

    def seen_items(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(row_in_batch, item) pairs of the items each sample's user interacted with before its
        target: the items full ranking must not recommend again."""
        counts = self.position[rows]
        starts = self.user_start[self.user_idx[rows]]
        batch_row = np.repeat(np.arange(len(rows)), counts)
        offset = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return batch_row, self.user_items[np.repeat(starts, counts) + offset]


class CandidateView:
    """Rows of a run's samples with other candidates (a retriever's items, another order of the
    stored ones), in the shape the scorers read: row i of the view is row `rows[i]` of `data`,
    its per-sample arrays sliced, everything else (titles, the catalogue, the users' sequences)
    read through. A scorer is called on it with `np.arange(len(rows))`; `base` and `base_rows`
    say which of the run's samples they are (the teacher's stored lists are looked up by them)."""

    _PER_ROW = ("history", "history_len", "target", "user_idx", "sample_id", "position", "split", "timestamp")

    def __init__(self, data, rows: np.ndarray, candidates: np.ndarray):
        rows, candidates = np.asarray(rows), np.asarray(candidates, dtype=np.int64)
        if candidates.ndim != 2 or len(candidates) != len(rows):
            raise ValueError(f"candidates must be one row per sample ({len(rows)}), got shape {candidates.shape}")
        self.base, self.base_rows = data, rows
        for name in self._PER_ROW:
            if hasattr(data, name):
                setattr(self, name, np.asarray(getattr(data, name))[rows])
        self.candidates = candidates

    def __getattr__(self, name):
        if name.startswith("_") or name in ("base", "base_rows"):
            raise AttributeError(name)
        return getattr(self.base, name)

    def seen_items(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.base.seen_items(self.base_rows[np.asarray(rows)])

    def history_gaps(self, rows: np.ndarray) -> np.ndarray:
        return self.base.history_gaps(self.base_rows[np.asarray(rows)])
