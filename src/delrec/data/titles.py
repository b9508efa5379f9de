"""Item titles: how they are read from the data, matched and told apart. Every rule about a title
lives here.

* **Reading** a title as the data gives it: `normalize_title` undoes MovieLens' trailing article
  ("Usual Suspects, The (1995)" -> "The Usual Suspects (1995)") for every reader;
  `clean_source_title` makes a publisher's scraped title readable (HTML entities and tags, page
  script, placeholders such as "UNKNOWN"), and `caption_title` a short video's caption (KuaiRec).
* **Matching** (`Recommender.resolve`, title search): a title a person types should find the
  item whatever Unicode form it comes in. `title_key` compares NFKC-normalised, case-folded text
  with control and format characters removed (bidi overrides and isolates, zero-width spaces, a
  byte order mark) and whitespace collapsed. The stored titles are never rewritten this way: the
  LLM reads them as the readers left them.
* **Telling items apart** (`disambiguate_titles`, at `prepare`): items that share a title (by
  `title_key`) get their id appended, so a prompt, a search result or a ranking never shows two
  items under one name, and the verbalizer, which scores candidate titles, can tell them apart.
"""

from __future__ import annotations

import html
import re
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


# MovieLens writes "Usual Suspects, The (1995)". These are the articles it moves to the end of the
# main title (all occur in ML-100K / ML-1M except Los, Las, Lo, Un, Une, Det, Die in main titles,
# which are kept for other catalogues). "I" (Italian) and "O" (Portuguese) are left out on purpose:
# in MovieLens they only occur inside the parenthesised original title, and ", I" / ", O" at the end
# of an English title is far more likely a pronoun or an exclamation than an article.
_ARTICLES = ("The", "A", "An", "La", "Le", "Les", "L'", "Il", "El", "Lo", "Los", "Las", "Das", "Der", "Die", "Det", "Un", "Une")


_TRAILING_ARTICLE = re.compile(r"^(?P<head>.*\S),\s*(?P<article>" + "|".join(map(re.escape, _ARTICLES)) + r")$")


# The main title ends where the first parenthesised group begins: "Seven (Se7en) (1995)".
_MAIN_TITLE = re.compile(r"^(?P<main>[^(]*?\S)(?P<rest>\s+\(.*)?$")


def normalize_title(title: str) -> str:
    """Undo MovieLens' trailing-article convention and tidy whitespace.

    "Usual Suspects, The (1995)" -> "The Usual Suspects (1995)"; "Appartement, L' (1996)" ->
    "L'Appartement (1996)". Only the main title (before the first parenthesised group) is
    rewritten: "Blue Angel, The (Blaue Engel, Der) (1930)" -> "The Blue Angel (Blaue Engel, Der) (1930)".
    """
    title = " ".join(title.split())
    m = _MAIN_TITLE.match(title)
    if m is None:  # empty, or starts with "(": nothing to rewrite
        return title
    art = _TRAILING_ARTICLE.match(m["main"])
    if art is None:
        return title
    joiner = "" if art["article"].endswith("'") else " "
    return f"{art['article']}{joiner}{art['head']}{m['rest'] or ''}"


def title_with_year(title: str, year: str) -> str:
    """RecBole keeps the year in its own column; put it back as "(1995)" unless already there.
    Years may be written "1995" or "1995.0"; anything else ("unknown", ML-100K's stray "V") is ignored."""
    m = re.fullmatch(r"\s*(\d{4})(?:\.0*)?\s*", year)
    if m and f"({m[1]})" not in title:
        return f"{title} ({m[1]})"
    return title


_TAG = re.compile(r"</?[A-Za-z][^<>]{0,500}>")


# The 2018 metadata has titles that are the product page's script, e.g. "var aPageStart = (new
# Date()).getTime();": the dataset's own sample code drops titles containing "getTime"
_SCRIPT = re.compile(r"getTime\(|\bvar\s+\w+\s*=|\bfunction\s*\(|\{\s*\w+\s*:")


PLACEHOLDERS = {"UNKNOWN", "unknown", "nan", "NaN", "None", "null"}  # KuaiRec writes UNKNOWN for a missing text


def clean_source_title(value) -> str:
    """A publisher's title as a prompt shows it; "" when there is no usable title.

    HTML entities are unescaped (repeatedly: "&amp;amp;" is common in scraped catalogues), tags
    removed, any run of whitespace (newlines, tabs, no-break spaces) made one space. Page-script
    debris and placeholders ("UNKNOWN") count as no title. The length is kept: cut for prompts, if
    at all, by the prompt template, never here. A title without a letter or a digit is none."""
    text = _cleaned(value)
    return text if _has_word(text) else ""


def _cleaned(value) -> str:
    """`clean_source_title` before its letter-or-digit check."""
    if not isinstance(value, str):
        return ""
    text = value
    for _ in range(3):
        unescaped = html.unescape(text)
        if unescaped == text:
            break
        text = unescaped
    if "<" in text:
        text = _TAG.sub(" ", text)
    text = " ".join(text.split())
    if not text or text in PLACEHOLDERS or _SCRIPT.search(text):
        return ""
    return text


def _has_word(text: str) -> bool:
    """A letter or a digit of any script (CJK characters are letters): "...", "#", "?!" or a row
    of emoji names nothing the LLM could read."""
    return any(ch.isalnum() for ch in text)


# "@name" up to the next space: Kuaishou's mentions of other accounts ("@小厨娘 @美食达人")
_MENTION = re.compile(r"@\S+")


NO_WORD, ONLY_MENTIONS, MISSING = "no letter or digit", "only @mentions", "missing"


def caption_title(value) -> tuple[str, str | None]:
    """A short video's caption as a title: (title, None), or ("", why it is none): MISSING (empty,
    UNKNOWN), NO_WORD (only "#", "..." or emoji) or ONLY_MENTIONS (nothing but "@account"s, which
    name who is tagged, not what the video shows). Cleaned as `clean_source_title`."""
    text = _cleaned(value)
    if not text:
        return "", MISSING
    if not _has_word(text):
        return "", NO_WORD
    if not _has_word(_MENTION.sub(" ", text)):
        return "", ONLY_MENTIONS
    return text, None


