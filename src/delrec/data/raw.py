"""The canonical form every reader of interaction data produces (`RawDataset`), and the checks
every format's rows go through on their way into it."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa

from delrec.data.parsing import Locator, as_strings, require_nonempty


@dataclass
class RawDataset:
    """Interactions and item titles as read from disk, before any filtering.

    interactions: columns user (str), item (str), timestamp (int64, unix seconds); rows in the
        source file's order, never re-sorted (the protocol breaks time ties by this order).
    items: columns item (str), title (str, normalised by `normalize_title`); one row per item id.
    source: provenance (format, file paths, fetch record); JSON-serialisable.
    """

    name: str
    interactions: pd.DataFrame
    items: pd.DataFrame
    source: dict = field(default_factory=dict)

    def __repr__(self) -> str:
        return (
            f"RawDataset({self.name!r}: {len(self.interactions)} interactions, "
            f"{self.interactions['user'].nunique()} users, {len(self.items)} items)"
        )


def assemble(
    name: str,
    *,
    users: pa.ChunkedArray,
    items: pa.ChunkedArray,
    timestamps: np.ndarray,
    inter_loc: Locator,
    item_ids: pa.ChunkedArray,
    titles: list[str],
    item_loc: Locator,
    source: dict,
) -> RawDataset:
    users = as_strings(users, "user id", inter_loc)
    items = as_strings(items, "item id", inter_loc)
    item_ids = as_strings(item_ids, "item id", item_loc)
    require_nonempty(users, "user id", inter_loc)
    require_nonempty(items, "item id", inter_loc)
    require_nonempty(item_ids, "item id", item_loc)
    for row, title in enumerate(titles):
        if not title:
            raise item_loc.error(row, f"empty title for item {item_ids[row].as_py()!r}")

    catalogue = pd.DataFrame({"item": item_ids.to_pandas(), "title": titles})
    dup = catalogue["item"].duplicated()
    if dup.any():
        second = int(np.flatnonzero(dup.to_numpy())[0])
        item = catalogue["item"].iloc[second]
        first = int(np.flatnonzero((catalogue["item"] == item).to_numpy())[0])
        raise item_loc.error(second, f"duplicate item id {item!r} (first defined at {item_loc.where(first)})")

    interactions = pd.DataFrame({"user": users.to_pandas(), "item": items.to_pandas(), "timestamp": timestamps})
    unknown = ~interactions["item"].isin(catalogue["item"])
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        n_unknown = interactions.loc[unknown, "item"].nunique()
        raise inter_loc.error(
            row,
            f"item {interactions['item'].iloc[row]!r} is not in the items file {item_loc.path} "
            f"({int(unknown.sum())} interactions refer to {n_unknown} unknown item ids)",
        )
    return RawDataset(name=name, interactions=interactions, items=catalogue, source=source)


