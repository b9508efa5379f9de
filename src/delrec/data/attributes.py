"""Item attributes as knowledge-graph relations, for the models that read them (KDA / KDALRD:
teachers/kda.py), in the form of their authors' KGReader (ysh-1998/LRD, src/helpers/KGReader.py):
each attribute is a relation, each of its values an entity, and an item with that value gives the
triple (item, relation, value).

Read from the data set's own item file, which the prepared data folder names (protocol.json's
`source`), so preparing data is unchanged and runs without such a model never read it. RecBole
atomic item files (the offline ML-100K) give their `:token` fields as one-valued attributes
(`release_year` in the authors' year buckets) and their `:token_seq` fields of a small vocabulary
as one binary relation per value (ML-100K's `class`: a relation per genre, as the authors' ML-100K
files have `i_Action`, `i_Comedy`, ...). Other sources give no attribute: the models then keep
only their relation between any two items of a history.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from delrec.core.io import read_json
from delrec.data.formats import DataFormatError

log = logging.getLogger(__name__)

MAX_SEQ_VOCABULARY = 64  # a token_seq field with more distinct values (tags, words) is not a set of relations
IGNORED_FIELDS = {"item_id", "movie_title", "title"}
# the authors' ML-100K/1M year buckets (data/MovieLens.ipynb): before 1940, the 40s, ..., 1980-84,
# 1985-89, then one per year
YEAR_EDGES = [1900, 1940, 1950, 1960, 1970, 1980, 1985]


@dataclass
class ItemAttributes:
    """`values[i, r]`: the entity id of item i's value of attribute relation r (0: none). Entity
    ids after the items': items are 1..num_items, values num_items + 1 ... num_entities - 1."""

    relations: list[str] = field(default_factory=list)
    values: np.ndarray = field(default_factory=lambda: np.zeros((1, 0), dtype=np.int64))  # [num_items + 1, R_attr]
    num_entities: int = 1

    @classmethod
    def none(cls, num_items: int) -> ItemAttributes:
        return cls([], np.zeros((num_items + 1, 0), dtype=np.int64), num_items + 1)

    def triples(self) -> np.ndarray:
        """[n, 3] (item, relation, value entity), relations numbered from 1 (0: the items' virtual relation)."""
        items, rel = np.nonzero(self.values)
        return np.stack([items, rel + 1, self.values[items, rel]], axis=1).astype(np.int64)


def year_bucket(year: int) -> int:
    """The authors' bucket of a release year (1-based; 0 for none)."""
    if year <= 0 or year < YEAR_EDGES[0]:
        return 0
    edges = YEAR_EDGES + list(range(1990, max(year, 1990) + 2))
    return int(np.searchsorted(edges, year, side="right"))


def _categorical(column: pd.Series, name: str) -> tuple[list[str], list[np.ndarray]]:
    if "year" in name:
        codes = pd.to_numeric(column, errors="coerce").fillna(0).astype(int).map(year_bucket).to_numpy()
        return [name], [codes]
    codes = pd.Series(pd.Categorical(column.where(column.str.strip() != "")).codes + 1).to_numpy()
    return [name], [codes]


def _token_sets(column: pd.Series, name: str) -> tuple[list[str], list[np.ndarray]]:
    tokens = column.fillna("").str.split()
    vocabulary = sorted({t for ts in tokens for t in ts})
    if len(vocabulary) > MAX_SEQ_VOCABULARY:
        log.info("item attribute %s: %d distinct values, more than %d: not read as relations", name, len(vocabulary),
                 MAX_SEQ_VOCABULARY)
        return [], []
    return ([f"{name}={v}" for v in vocabulary],
            [tokens.map(lambda ts, v=v: int(v in ts)).to_numpy() for v in vocabulary])


def _read_recbole_items(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"the data set's item file {path} (named in the run's protocol.json) is gone: item attributes "
                                "are read from it; fetch the data set again (`delrec data fetch`)")
    table = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, quoting=3)
    if not all(":" in c for c in table.columns):
        raise DataFormatError(f"{path}: line 1: not a RecBole atomic header")
    return table


def read_item_attributes(data_dir: str | Path, items: pd.DataFrame) -> ItemAttributes:
    """The attributes of the prepared data folder's items (`items`: its items.parquet, `item`
    holding the data set's item ids, row i - 1 being item index i)."""
    source = read_json(Path(data_dir) / "protocol.json").get("source", {})
    num_items = len(items)
    if source.get("format") != "recbole-atomic" or not source.get("items"):
        log.info("item attributes: none read from a %s source", source.get("format", "unknown"))
        return ItemAttributes.none(num_items)
    table = _read_recbole_items(Path(source["items"]))
    ids = table[next(c for c in table.columns if c.split(":")[0] == "item_id")]
    table = table.set_index(ids).reindex(items["item"].astype(str).to_numpy())
    names, columns = [], []
    for col in table.columns:
        name, kind = col.split(":", 1)
        if name in IGNORED_FIELDS:
            continue
        read = _categorical if kind == "token" else _token_sets if kind == "token_seq" else None
        if read:
            n, c = read(table[col].fillna(""), name)
            names += n
            columns += c
    values = np.zeros((num_items + 1, len(names)), dtype=np.int64)
    base = num_items + 1  # entity ids of the values start after the items'
    for r, codes in enumerate(columns):
        codes = np.asarray(codes, dtype=np.int64)
        values[1:, r] = np.where(codes > 0, codes + base - 1, 0)
        base += int(codes.max(initial=0))
    return ItemAttributes(names, values, base)
