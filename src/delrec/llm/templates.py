"""The three prompts of DELRec (paper Section IV-A, Figures 4-6), as OpenPrompt-style templates.

Every prompt has an instruction naming the teacher, a soft-prompt slot (`{soft_prompt}`), the
user's history as titles (most recent last), the candidate set as titles, and the prediction
cue. Rendering returns a `Prompt`: the text before and after the slot, the candidates in display
order, and the label. The backbone splices the soft-prompt vectors in between.

* TA (Temporal Analysis): in-context examples built from the user's own sequence ("after A, B
  the user watched C"), then the sequence with its most recent item masked and the item that
  followed it; the label is the masked item.
* RPS (Recommendation Pattern Simulating): the teacher's top-h list, shuffled; the label is the
  teacher's top-1.
* LSR (the recommendation prompt of stage 2 and evaluation): history and candidates; the label
  is the ground truth.

Two baselines of the paper's Table II have prompts of their own (docs/baselines.md):
* teacher list (RecRanker / LLM-TRSR style): the plain recommendation prompt with the teacher's
  top-h recommendations written in as text;
* lettered (LlamaRec): the candidates listed under index letters "(A) title", "(B) title", ...,
  and the answer is a letter.
* hybrid (LLaRA): the plain recommendation prompt with one item vector right after each title of
  the history and of the candidates (`Prompt.item_slots`); the verbalizer puts there the teacher's
  embedding of that item mapped into the LLM's input space (delrec/methods/llara.py).

Domain words (movie, game, item) and every template text can be overridden from a JSON or YAML
file (`Templates.from_file`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from delrec.core.settings import check
from delrec.data.titles import disambiguate_titles
from delrec.teachers import MODELS, display_name

SLOT = "{soft_prompt}"
MASK = "[MASK]"

TA_TEMPLATE = (
    "{teacher} is a sequential recommender that predicts a user's next {item} mostly from the most recent "
    "{item} the user {verb}. Temporal pattern of {teacher}: {soft_prompt}\n"
    "{examples}"
    "Now a user {verb} these {items} in order: {history}, and next {verb} \"{next_item}\".\n"
    "Candidates: {candidates}.\n"
    "Which candidate is {mask}? Answer: "
)
TA_EXAMPLE = "After {history}, the user {verb} \"{next_item}\".\n"

RPS_TEMPLATE = (
    "{teacher} is a sequential recommender. Recommendation pattern of {teacher}: {soft_prompt}\n"
    "A user {verb} these {items} in order: {history}.\n"
    "{teacher} recommends these {items}: {candidates}.\n"
    "Which of them does {teacher} rank first? Answer: "
)

LSR_TEMPLATE = (
    "Use the recommendation pattern of {teacher} as a reference: {soft_prompt}\n"
    "A user {verb} these {items} in order, the most recent last: {history}.\n"
    "Candidates: {candidates}.\n"
    "Which candidate will the user {verb_base} next? Answer: "
)
# `w/o SP` ablation: no soft prompt and no instruction to refer to one
LSR_PLAIN_TEMPLATE = (
    "A user {verb} these {items} in order, the most recent last: {history}.\n"
    "Candidates: {candidates}.\n"
    "Which candidate will the user {verb_base} next? Answer: "
)
# the text-paradigm baseline (RecRanker / LLM-TRSR style): the teacher's recommendations as text
TEACHER_LIST_TEMPLATE = (
    "A user {verb} these {items} in order, the most recent last: {history}.\n"
    "{teacher} recommends these {items}, best first: {teacher_list}.\n"
    "Candidates: {candidates}.\n"
    "Which candidate will the user {verb_base} next? Answer: "
)
# LlamaRec: the candidates under index letters, one a line; the answer is the letter
LETTERED_TEMPLATE = (
    "A user {verb} these {items} in order, the most recent last: {history}.\n"
    "Candidates:\n{candidates}\n"
    "Which candidate will the user {verb_base} next? Answer with its letter. Answer: "
)
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"  # index letters of the lettered prompt: at most 26 candidates
# `w MCP` ablation: a hand-written description of the teacher in place of the soft prompt
MODEL_CARD = (
    "{teacher} is a self-attentive sequential recommender: it weighs every earlier {item} by its relevance "
    "to the most recent ones and favours {items} that often follow them"
)


MIN_TITLE_CHARS = 8
ELLIPSIS = "\u2026"


@dataclass(frozen=True)
class Prompt:
    """A prompt's text with the places where vectors go in between its tokens: the soft-prompt
    slot (one block of vectors, between `before` and `after`) and, in LLaRA's hybrid prompt, one
    item vector per `item_slots` entry. A prompt without either is plain text."""

    before: str  # text before the soft-prompt slot (the whole prompt when there is no slot)
    after: str  # text after the slot, ending with the answer cue
    candidates: tuple[str, ...]  # titles in display order
    label: str | None  # the answer's title; None at inference
    has_slot: bool
    # (offset in `text`, item index), in text order: the item's vector goes at that character offset
    item_slots: tuple[tuple[int, int], ...] = ()

    @property
    def text(self) -> str:
        """The prompt as plain text (slot and item vectors removed): for logs and case studies."""
        return self.before + self.after


@dataclass(frozen=True)
class Templates:
    teacher: str = "SASRec"
    item: str = "movie"
    items: str = "movies"
    verb: str = "watched"
    verb_base: str = "watch"
    ta: str = TA_TEMPLATE
    ta_example: str = TA_EXAMPLE
    rps: str = RPS_TEMPLATE
    lsr: str = LSR_TEMPLATE
    lsr_plain: str = LSR_PLAIN_TEMPLATE
    model_card: str = MODEL_CARD
    teacher_list: str = TEACHER_LIST_TEMPLATE
    lettered: str = LETTERED_TEMPLATE
    # Titles longer than this are cut for prompts (Amazon's run to hundreds of characters); None:
    # shown whole. The full title stays in RUN/data/items.parquet, for search and answers.
    max_title_chars: int | None = None

    def __post_init__(self) -> None:
        if self.max_title_chars is not None and self.max_title_chars < MIN_TITLE_CHARS:
            raise ValueError(f"max_title_chars must be at least {MIN_TITLE_CHARS} (or null: titles whole), "
                             f"got {self.max_title_chars}")

    @classmethod
    def from_file(cls, path: str | Path, **overrides) -> Templates:
        return cls(**{**read_overrides(path), **overrides})

    @classmethod
    def for_teacher(cls, teacher: str, **overrides) -> Templates:
        """The templates every step uses for `teacher` (sasrec, gru4rec, caser or another name):
        the teacher class's display name and model card, then `overrides` (domain words such as
        item/items/verb/verb_base, or whole templates; a run config's `templates:` section)."""

        model = MODELS.get(teacher)
        base = {"teacher": display_name(teacher), **({"model_card": model.model_card} if model else {})}
        return cls(**{**base, **check(cls, dict(overrides), "templates")})

    def words(self) -> dict:
        return {"teacher": self.teacher, "item": self.item, "items": self.items, "verb": self.verb,
                "verb_base": self.verb_base, "mask": MASK}


def read_overrides(path: str | Path) -> dict:
    """Template fields from a JSON or YAML file (`--templates FILE`), checked against Templates."""

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"template file {path} does not exist")
    text = path.read_text()
    if path.suffix in (".yaml", ".yml"):

        values = yaml.safe_load(text) or {}
    else:
        values = json.loads(text)
    return check(Templates, values, str(path))


def cut_title(title: str, max_chars: int | None) -> str:
    """`title` in at most `max_chars` characters: cut at the last word boundary in the second half
    of the allowance (else mid-word) and ended with an ellipsis; a title that fits is unchanged."""
    if max_chars is None or len(title) <= max_chars:
        return title
    head = title[: max_chars - len(ELLIPSIS)]
    space = head.rfind(" ")
    if space >= max_chars // 2:
        head = head[:space]
    return head.rstrip(" ,;:-/&") + ELLIPSIS


def prompt_titles(items, max_chars: int | None) -> list[str]:
    """The titles prompts show, indexed by item_idx ([0] is padding), from a run's `items` table
    (columns item, title). With `max_chars`, long titles are cut (cut_title) and the cut titles are
    told apart again (delrec.data.titles.disambiguate_titles): two products whose first 80
    characters agree would otherwise be one candidate to the LLM."""
    titles = items["title"].astype(str).tolist()
    if max_chars is None:
        return [""] + titles
    cut = [cut_title(t, max_chars) for t in titles]
    return [""] + disambiguate_titles(cut, items["item"].astype(str).tolist())


def quote_titles(titles: Sequence[str]) -> str:
    return ", ".join(f'"{t}"' for t in titles)


def _render(template: str, values: dict, candidates: Sequence[str], label: str | None, soft: str | None) -> Prompt:
    """Fill a template; `soft` = None keeps the slot for soft-prompt vectors, a string fills it
    with text (the MCP ablation), and a template without the slot has none."""
    has_slot = SLOT in template
    if has_slot and soft is None:
        before, after = template.split(SLOT, 1)
        return Prompt(before.format(**values), after.format(**values), tuple(candidates), label, True)
    text = template.replace(SLOT, soft or "").format(**values)
    return Prompt(text, "", tuple(candidates), label, False)


def check_titles(history: Sequence[str], candidates: Sequence[str], label: str | None) -> None:
    if len(history) == 0:
        raise ValueError("the history is empty: a prompt needs at least one earlier item")
    if label is not None and label not in candidates:
        raise ValueError(f"the label {label!r} is not among the candidates")


def lsr_prompt(t: Templates, history: Sequence[str], candidates: Sequence[str], label: str | None = None,
               soft_prompt: bool = True, model_card: bool = False, empty_slot: bool = False) -> Prompt:
    """The recommendation prompt. `soft_prompt=False` is the `w/o SP` ablation (no slot, no
    mention of one); `model_card=True` the `w MCP` ablation (the slot gets a text description of
    the teacher); `empty_slot=True` the `w/o DPSM` ablation (the instruction stays, the slot is
    empty because there was no stage 1)."""
    check_titles(history, candidates, label)
    values = {**t.words(), "history": quote_titles(history), "candidates": quote_titles(candidates)}
    if model_card:
        return _render(t.lsr, values, candidates, label, soft=t.model_card.format(**t.words()))
    if empty_slot:
        return _render(t.lsr, values, candidates, label, soft="")
    return _render(t.lsr if soft_prompt else t.lsr_plain, values, candidates, label, soft=None)


def teacher_list_prompt(t: Templates, history: Sequence[str], candidates: Sequence[str], teacher_top: Sequence[str],
                        label: str | None = None) -> Prompt:
    """The plain recommendation prompt with the teacher's top-h recommendations (best first) written
    in as text: the text paradigm of RecRanker and LLM-TRSR (docs/baselines.md)."""
    check_titles(history, candidates, label)
    if len(teacher_top) == 0:
        raise ValueError("the teacher's top list is empty")
    values = {**t.words(), "history": quote_titles(history), "teacher_list": quote_titles(teacher_top),
              "candidates": quote_titles(candidates)}
    return _render(t.teacher_list, values, candidates, label, soft="")


def lettered_prompt(t: Templates, history: Sequence[str], candidates: Sequence[str], label: str | None = None) -> Prompt:
    """LlamaRec's prompt: the candidates in display order under the index letters (A), (B), ...,
    one a line; the answer is the label's letter (scored by llm.letters.LetterVerbalizer)."""
    check_titles(history, candidates, label)
    if len(candidates) > len(LETTERS):
        raise ValueError(f"the lettered prompt indexes at most {len(LETTERS)} candidates (A-Z), got {len(candidates)}")
    listed = "\n".join(f"({letter}) {title}" for letter, title in zip(LETTERS, candidates))
    values = {**t.words(), "history": quote_titles(history), "candidates": listed}
    return _render(t.lettered, values, candidates, label, soft="")


def ta_prompt(t: Templates, sequence: Sequence[str], candidates: Sequence[str], num_examples: int = 4) -> Prompt:
    """Temporal Analysis on a sequence x_1..x_n (the history followed by the item that came next).

    The most recent history item x_{n-1} is masked and is the label; x_n is shown as what came
    next. The in-context examples are the positions just before it: "after x_1..x_{p-1}, the
    user watched x_p" for the `num_examples` largest p < n-1 with a non-empty prefix."""
    n = len(sequence)
    if n < 3:
        raise ValueError(f"Temporal Analysis needs a sequence of at least 3 items, got {n}")
    label = sequence[n - 2]
    check_titles(sequence, candidates, label)
    words = t.words()
    positions = range(max(1, n - 2 - num_examples), n - 2)
    examples = "".join(
        t.ta_example.format(**words, history=quote_titles(sequence[:p]), next_item=sequence[p]) for p in positions
    )
    masked = [*sequence[: n - 2], MASK]
    values = {**words, "examples": examples, "history": quote_titles(masked).replace(f'"{MASK}"', MASK),
              "next_item": sequence[n - 1], "candidates": quote_titles(candidates)}
    return _render(t.ta, values, candidates, label, soft=None)


def rps_prompt(t: Templates, history: Sequence[str], teacher_top: Sequence[str], rng: np.random.Generator) -> Prompt:
    """Recommendation Pattern Simulating: the teacher's top-h (best first) is shown shuffled and
    the label is its top-1, so the soft prompt must carry what the teacher prefers."""
    if len(teacher_top) == 0:
        raise ValueError("the teacher's top list is empty")
    shown = [teacher_top[i] for i in rng.permutation(len(teacher_top))]
    check_titles(history, shown, teacher_top[0])
    values = {**t.words(), "history": quote_titles(history), "candidates": quote_titles(shown)}
    return _render(t.rps, values, shown, teacher_top[0], soft=None)
