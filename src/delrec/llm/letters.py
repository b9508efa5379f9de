"""LlamaRec's verbalizer: lettered candidates scored by their index letters."""

from __future__ import annotations

from delrec.llm.backbone import Backbone
from delrec.llm.templates import LETTERS, Prompt
from delrec.llm.verbalizer import Verbalizer


class LetterVerbalizer(Verbalizer):
    """LlamaRec's verbalizer: candidate j of a lettered prompt (templates.lettered_prompt) is scored
    by the log-probability of the j-th index letter as the answer's first token, so a prompt's
    candidates are all scored by one forward pass (log-probabilities rank as the letter logits do:
    they differ by the prompt's log-normaliser). The `candidates` objective is then LlamaRec's
    cross-entropy over the candidates' letters, `label` the plain LM loss of the label's letter.

    Each letter must be one token of the backbone's vocabulary: after "Answer:" a decoder-only
    model reads " A" (one token in SmolLM2; docs/baselines.md), a T5 decoder starts
    the answer with "A" (SentencePiece's "\u2581A"); the other spelling is the fallback. A backbone
    that gives neither form one distinct token per letter is refused when it must rank that many
    candidates, naming the letter."""

    def __init__(self, backbone: Backbone, batch_size: int = 8, passes: str = "auto"):
        super().__init__(backbone, "first-token", batch_size, passes)
        forms = ("{}", " {}") if backbone.is_encoder_decoder else (" {}", "{}")
        best: tuple[str, list[int], str] | None = None
        for form in forms:
            ids, problem = [], ""
            for letter in LETTERS:
                tokens = backbone.encode_text(form.format(letter))
                if len(tokens) != 1 or tokens[0] == backbone.tokenizer.unk_token_id or tokens[0] in ids:
                    problem = f"{form.format(letter)!r} encodes to {tokens}"
                    break
                ids.append(tokens[0])
            if best is None or len(ids) > len(best[1]):
                best = (form, ids, problem)
        self.letter_form, self.letter_ids, self._letter_problem = best  # ids of A, B, ... as far as they are single tokens

    def continuations(self, prompt: Prompt) -> list[list[int]]:
        n = len(prompt.candidates)
        if n > len(self.letter_ids):
            raise ValueError(f"{self.backbone.name}: LlamaRec's verbalizer needs one distinct token per index letter, but "
                             f"the tokenizer gives them for {len(self.letter_ids)} letters only ({self._letter_problem}), "
                             f"and this prompt has {n} candidates")
        return [[i] for i in self.letter_ids[:n]]
