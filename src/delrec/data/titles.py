"""Item titles as they are matched and told apart.

Two needs, two rules:

* **Matching** (`Recommender.resolve`, title search): a title a person types should find the
  item whatever Unicode form it comes in. `title_key` compares NFKC-normalised, case-folded text
  with control and format characters removed (bidi overrides and isolates, zero-width spaces, a
  byte order mark) and whitespace collapsed. The stored titles are never rewritten this way: the
  LLM reads them as the data gives them (after `delrec.data.loaders.normalize_title`).
* **Telling items apart** (`disambiguate_titles`, at `prepare`): items that share a title (by
  `title_key`) get their id appended, so a prompt, a search result or a ranking never shows two
  items under one name, and the verbalizer, which scores candidate titles, can tell them apart.
"""

from __future__ import annotations

import unicodedata
from collections import Counter

_DROPPED = ("Cc", "Cf")  # control and format (bidi, zero-width) characters


def clean_title(text: str) -> str:
    """`text` NFKC-normalised (full-width letters, ligatures and decomposed accents read as the
    plain ones), control and format characters removed, whitespace collapsed. Case is kept."""
    text = unicodedata.normalize("NFKC", str(text))
    if not (text.isascii() and text.isprintable()):
        text = "".join(" " if ch.isspace() else ch for ch in text if ch.isspace() or unicodedata.category(ch) not in _DROPPED)
    return " ".join(text.split())


def title_key(text: str) -> str:
    """What two titles must share to be the same title: `clean_title`, case-folded."""
    return clean_title(text).casefold()


def disambiguation_suffix(item_id: str) -> str:
    """What `disambiguate_titles` appends: " (#246)". Parenthesised, so `normalize_title` leaves it
    alone, and "Ice Storm, The (1997) (#305)" still reads as "The Ice Storm (1997) (#305)"."""
    return f" (#{item_id})"


def disambiguate_titles(titles: list[str], ids: list[str]) -> list[str]:
    """Titles made unique by `title_key`: each item of a group sharing a title gets its id
    appended ("Chasing Amy (1997)" -> "Chasing Amy (1997) (#246)", "Chasing Amy (1997) (#268)").
    Every member of a group is renamed, so an item's title depends on the catalogue, never on the
    order of its rows; unique titles are returned as they are (so the function is idempotent)."""
    if len(titles) != len(ids):
        raise ValueError(f"{len(titles)} titles for {len(ids)} item ids")
    out = list(titles)
    for _ in range(8):  # a renamed title may meet another item's title "X (#5)": rename again
        keys = [title_key(t) for t in out]
        counts = Counter(keys)
        shared = [i for i, k in enumerate(keys) if counts[k] > 1]
        if not shared:
            return out
        for i in shared:
            out[i] += disambiguation_suffix(ids[i])
    raise ValueError("cannot make the titles unique by appending item ids (are some item ids repeated?)")


def base_title(title: str, item_id: str) -> str:
    """`title` without the suffixes `disambiguate_titles` gave it: the title the data gave."""
    suffix = disambiguation_suffix(item_id)
    while title.endswith(suffix) and len(title) > len(suffix):
        title = title[: -len(suffix)]
    return title
