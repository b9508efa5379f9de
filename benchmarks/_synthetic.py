"""Synthetic Amazon Review Data (2018) files of a given shape, in the publisher's exact formats.

    write_amazon(folder, "Home_and_Kitchen", users=9_767_606, items=1_286_050, interactions=21_928_568)

writes `<folder>/Home_and_Kitchen.csv` (ratings only: `item,user,rating,timestamp`, no header,
grouped by item as the publisher's files are) and `<folder>/meta_Home_and_Kitchen.json.gz` (one
JSON object a line: asin, title, brand, category, description, price, main_cat), which
`delrec data prepare <folder>` reads like the real ones. Content is random; the shape is not:

* exactly `users` users, `items` items and `interactions` rows, every user and item with at least
  one interaction;
* power-law activity on both sides (Pareto weights: a few users and items with thousands of
  interactions, most with one), which is what makes the 5-core filter iterate;
* day-resolution timestamps (the 2018 files' `unixReviewTime` is a midnight), so ties in time
  are common, as in the real data;
* about 1 % of the products without a title and a few titles with HTML entities, so the loader's
  title filter and clean-up run at scale.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv

ALPHABET = np.frombuffer(b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ", dtype=np.uint8)
FIRST_DAY, LAST_DAY = 10957, 17805  # 2000-01-01 .. 2018-10-01, in days since 1970
CHUNK = 2_000_000  # rows written per block


def _codes(prefix: bytes, n: int, width: int) -> pa.Array:
    """n distinct ids `prefix` + `width` base-36 digits (ASIN-like "B00…", reviewer-like "A…")."""
    ids = np.arange(n, dtype=np.int64)
    digits = (ids[:, None] // (36 ** np.arange(width - 1, -1, -1, dtype=np.int64))) % 36
    raw = np.empty((n, len(prefix) + width), dtype=np.uint8)
    raw[:, : len(prefix)] = np.frombuffer(prefix, dtype=np.uint8)
    raw[:, len(prefix) :] = ALPHABET[digits]
    size = raw.shape[1]
    offsets = np.arange(0, (n + 1) * size, size, dtype=np.int32 if n * size < 2**31 else np.int64)
    kind = pa.string() if offsets.dtype == np.int32 else pa.large_string()
    return pa.Array.from_buffers(kind, n, [None, pa.py_buffer(offsets), pa.py_buffer(raw.tobytes())])


def _degrees(rng: np.random.Generator, n: int, total: int, shape: float) -> np.ndarray:
    """n degrees >= 1 summing to `total`: one each, the rest spread by Pareto(shape) weights."""
    weights = rng.pareto(shape, n) + 1.0
    return 1 + rng.multinomial(total - n, weights / weights.sum())


def write_amazon(folder: str | Path, category: str, *, users: int, items: int, interactions: int, seed: int = 0,
                 user_shape: float = 1.2, item_shape: float = 0.9) -> dict:
    """Write the two files; returns their paths and the shape written."""
    if not (0 < users <= interactions and 0 < items <= interactions):
        raise ValueError("every user and item needs an interaction: users, items <= interactions")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    user_deg = _degrees(rng, users, interactions, user_shape)
    item_deg = _degrees(rng, items, interactions, item_shape)
    # rows grouped by item (the publisher's order); each row's user drawn by the users' degrees
    item_col = np.repeat(np.arange(items, dtype=np.int64), item_deg)
    user_col = rng.permutation(np.repeat(np.arange(users, dtype=np.int64), user_deg))
    user_ids, item_ids = _codes(b"A", users, 13), _codes(b"B0", items, 8)

    ratings = folder / f"{category}.csv"
    options = pcsv.WriteOptions(include_header=False, quoting_style="none")
    with pcsv.CSVWriter(ratings, pa.schema([("item", pa.string()), ("user", pa.string()), ("rating", pa.string()),
                                            ("timestamp", pa.int64())]), write_options=options) as writer:
        stars = pa.array(["1.0", "2.0", "3.0", "4.0", "5.0"])
        for start in range(0, interactions, CHUNK):
            stop = min(start + CHUNK, interactions)
            n = stop - start
            days = rng.integers(FIRST_DAY, LAST_DAY, n, dtype=np.int64)
            writer.write_table(pa.table({
                "item": item_ids.take(pa.array(item_col[start:stop])),
                "user": user_ids.take(pa.array(user_col[start:stop])),
                "rating": stars.take(pa.array(rng.choice(5, n, p=[0.06, 0.05, 0.08, 0.17, 0.64]))),
                "timestamp": pa.array(days * 86400),
            }))

    meta = folder / f"meta_{category}.json.gz"
    words = ["Stainless", "Steel", "Kitchen", "Towel", "Set", "Cotton", "Pan", "Non-Stick", "Lamp", "Chair", "Storage",
             "Bamboo", "Glass", "Mug", "Knife", "Blender", "Rug", "Pillow", "Shelf", "Organizer", "Ceramic", "Vase"]
    brands = ["Acme", "HomeCo", "KitchenPro", "Nest & Co", "Urban Loft"]
    titled = rng.random(items) >= 0.01
    lengths = rng.integers(3, 12, items)
    picks = rng.integers(0, len(words), (items, 12))
    entity = rng.random(items) < 0.02
    with gzip.open(meta, "wt", encoding="utf-8", compresslevel=1) as f:
        for i, asin in enumerate(item_ids.to_pylist()):
            title = " ".join(words[w] for w in picks[i, : lengths[i]]) + f" {i}"
            if entity[i]:
                title = title.replace(" ", " &amp; ", 1)
            rec = {"category": ["Home & Kitchen", words[picks[i, 0]]], "description": [f"A {title.lower()} for the home."],
                   "title": title if titled[i] else "", "brand": brands[i % len(brands)], "main_cat": "Amazon Home",
                   "price": f"${5 + i % 95}.99", "asin": asin}
            f.write(json.dumps(rec) + "\n")
    return {"ratings": str(ratings), "metadata": str(meta), "users": users, "items": items,
            "interactions": interactions, "items_without_title": int((~titled).sum())}
