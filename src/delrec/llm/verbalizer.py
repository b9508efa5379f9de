"""Turn the LM head's output into a score for every candidate item.

`full-title` (default): the length-normalised log-likelihood of the candidate's whole title as
the answer. The shared prompt (with its soft prompt) is encoded once per request: for
decoder-only models the 15 continuations are packed behind it in the same forward pass and share
its keys/values through a 4D attention mask; for T5 the prompt is encoded once, and its
continuations are decoded as one batch of rows on copies of that encoder output when scoring, or,
when training (where backward would keep every copy), packed into one decoder row under a
block-diagonal causal mask that cross-attends to the single encoder output. Logits are computed
only where a candidate token is scored.

`first-token` (the authors' variant): the log-probability of the title's first token. Every
title that shares a first token ties, and ties are pessimistic in evaluation.

On CPU each prompt gets a forward pass of its own (`passes`): no padding is computed, and a
prompt's scores, and so its candidates' ranks, are bit-identical whatever the batch size or the
other prompts (padded bf16 batches on CPU gave different ranks at batch 8 and 1). On GPUs the
prompts of a batch share one padded pass.

`score_brute_force` is the reference: each candidate scored by its own full forward pass.

A prompt may carry vectors at several places: the soft prompt in its slot, and in LLaRA's hybrid
prompt one item vector after each title (`Prompt.item_slots`, filled by the verbalizer's
`item_vectors`, LLaRA's ItemProjector in delrec/methods/llara.py). Prompts without item slots take the path they
always took; the others are cut at every vector and their text pieces embedded in one lookup.

`LetterVerbalizer` (llm/letters.py) is LlamaRec's (Yue et al. 2023): the prompt lists the candidates under index
letters and each candidate's score is the log-probability of its letter at the answer position,
all read from one forward pass per prompt (the `first-token` path with one-token continuations).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from delrec.core import distributed
from delrec.llm.backbone import Backbone
from delrec.llm.losses import LossParts, ranking_loss
from delrec.llm.packing import MIN_SHARED_PREFIX, Batch, Prefix, mean_per_continuation, pad
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Prompt

TITLE_SCORINGS = ("full-title", "first-token")  # how a candidate's title is scored: its whole likelihood, or its first token's
# training objectives: `candidates` is cross-entropy over the verbalizer's scores of the prompt's
# candidates (what the ranking uses, as in OpenPrompt's verbalizer); `label` is the plain
# language-model loss of the label's title (cheaper: no other candidate is scored)
OBJECTIVES = ("candidates", "label")


# how prompts go through the model: `prompt` = one forward pass per prompt (no padding, and a
# prompt's scores do not depend on which prompts share its batch); `batch` = the prompts of a
# batch padded into one pass (what keeps a GPU busy); `auto` = `prompt` on CPU, `batch` elsewhere
PASSES = ("auto", "prompt", "batch")


class Verbalizer:
    def __init__(self, backbone: Backbone, title_scoring: str = "full-title", batch_size: int = 8, passes: str = "auto",
                 item_vectors: nn.Module | None = None):
        """`item_vectors`: maps [n] item indices to [n, hidden] input vectors (delrec.methods.llara.ItemProjector);
        what a prompt's `item_slots` are filled with (LLaRA's hybrid prompt)."""
        if title_scoring not in TITLE_SCORINGS:
            raise ValueError(f"unknown verbalizer {title_scoring!r}; choose one of {TITLE_SCORINGS}")
        if passes not in PASSES:
            raise ValueError(f"unknown pass mode {passes!r}; choose one of {PASSES}")
        self.backbone = backbone
        self.title_scoring = title_scoring
        self.batch_size = batch_size
        self.passes = passes
        self.item_vectors = item_vectors
        # scoring: the prompts' shared start computed once per call (`_shared_prefix`); off gives
        # the plain one-pass-per-prompt path (the reference it is tested against)
        self.share_prefix = True
        self._answer_ids: dict[str, list[int]] = {}
        self._text_ids: dict[str, list[int]] = {}

    # -- tokenisation ------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        ids = self._text_ids.get(text)
        if ids is None:
            ids = self._text_ids[text] = self.backbone.encode_text(text) if text else []
        return ids

    def answer_ids(self, title: str) -> list[int]:
        """Tokens of a title as the answer, ending with EOS so a title that is a prefix of
        another does not win by stopping early."""
        ids = self._answer_ids.get(title)
        if ids is None:
            text = title if self.backbone.is_encoder_decoder else " " + title  # after "Answer:"
            ids = self.backbone.encode_text(text)
            if not ids:
                raise ValueError(f"the title {title!r} encodes to no tokens")
            if self.backbone.eos_token_id is not None:
                ids = ids + [self.backbone.eos_token_id]
            self._answer_ids[title] = ids
        return ids

    def continuations(self, prompt: Prompt) -> list[list[int]]:
        """The token ids each candidate's score is read from, in `prompt.candidates` order: its
        title as the answer."""
        return [self.answer_ids(t) for t in prompt.candidates]

    def _before_ids(self, prompt: Prompt) -> list[int]:
        """The tokens before the soft-prompt slot (the whole prompt without one), BOS first where
        the tokenizer adds one: the slot starts at len() of this."""
        bb = self.backbone
        ids_before = self._encode(prompt.before if prompt.has_slot else prompt.before.rstrip())
        bos = bb.tokenizer.bos_token_id
        if not bb.is_encoder_decoder and bos is not None and getattr(bb.tokenizer, "add_bos_token", False):
            ids_before = [bos] + ids_before
        return ids_before

    def _slot_start(self, prompt: Prompt, soft_prompt: SoftPrompt | None) -> int | None:
        """Where a deep soft prompt's vectors go in this prompt's sequence (None: nowhere)."""
        if soft_prompt is None or not soft_prompt.is_deep or not prompt.has_slot:
            return None
        if prompt.item_slots:
            raise ValueError("a deep soft prompt goes with the plain LSR, TA and RPS prompts, not with item vectors")
        return len(self._before_ids(prompt))

    @contextmanager
    def _deep_slots(self, soft_prompt: SoftPrompt | None, slots: Sequence[int | None]):
        """While a forward pass runs: at the input of each layer of a deep soft prompt, the slot's
        hidden states of every row (starting at `slots[row]`) set to that layer's vectors."""
        rows = [(b, start) for b, start in enumerate(slots) if start is not None]
        if soft_prompt is None or not soft_prompt.is_deep or not rows:
            yield
            return
        layers, n = self.backbone.decoder_layers(), soft_prompt.num_tokens

        def setter(vectors):
            def hook(module, args, kwargs):
                hidden = (args[0] if args else kwargs["hidden_states"]).clone()
                for b, start in rows:
                    hidden[b, start : start + n] = vectors.to(hidden.dtype)
                return ((hidden, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": hidden})
            return hook

        handles = [layers[i].register_forward_pre_hook(setter(vectors), with_kwargs=True)
                   for i, vectors in zip(soft_prompt.deep_layers, soft_prompt.deep)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _prompt_embeds(self, prompt: Prompt, soft_prompt: SoftPrompt | None) -> torch.Tensor:
        if prompt.item_slots:
            return self._embeds_with_items(prompt, soft_prompt)
        bb = self.backbone
        after = prompt.after.rstrip() if prompt.has_slot else prompt.after
        ids_before = self._before_ids(prompt)
        ids_after = self._encode(after)
        if bb.is_encoder_decoder and bb.eos_token_id is not None:
            ids_after = ids_after + [bb.eos_token_id]  # T5 encoder inputs end with </s>
        parts = [bb.input_embeddings(torch.tensor(ids_before, dtype=torch.long, device=bb.device))]
        if prompt.has_slot:
            if soft_prompt is None:
                raise ValueError("the prompt has a soft-prompt slot but no soft prompt was given")
            parts.append(soft_prompt().to(bb.dtype))
        parts.append(bb.input_embeddings(torch.tensor(ids_after, dtype=torch.long, device=bb.device)))
        return torch.cat(parts, dim=0)

    def _embeds_with_items(self, prompt: Prompt, soft_prompt: SoftPrompt | None) -> torch.Tensor:
        """The input vectors of a prompt with vectors at several places: its text cut at the
        soft-prompt slot (if any) and at each item slot, each piece tokenised on its own (as the
        text around the soft-prompt slot is), one projected item vector per item slot. The same
        conventions as `_prompt_embeds`: BOS first where the tokenizer adds one, the last piece
        right-stripped, T5's </s> at the end."""
        bb = self.backbone
        if self.item_vectors is None:
            raise ValueError("the prompt has item slots (LLaRA's hybrid prompt) but the verbalizer has no item projector")
        cuts = [(offset, item) for offset, item in prompt.item_slots]
        if prompt.has_slot:
            if soft_prompt is None:
                raise ValueError("the prompt has a soft-prompt slot but no soft prompt was given")
            cuts.append((len(prompt.before), None))  # None: the soft prompt's block
            cuts.sort(key=lambda c: (c[0], c[1] is not None))
        text = prompt.text
        edges = [0, *(offset for offset, _ in cuts), len(text)]
        pieces = [text[a:b] for a, b in zip(edges, edges[1:])]
        pieces[-1] = pieces[-1].rstrip()
        ids = [self._encode(piece) for piece in pieces]
        bos = bb.tokenizer.bos_token_id
        if not bb.is_encoder_decoder and bos is not None and getattr(bb.tokenizer, "add_bos_token", False):
            ids[0] = [bos] + ids[0]
        if bb.is_encoder_decoder and bb.eos_token_id is not None:
            ids[-1] = ids[-1] + [bb.eos_token_id]
        # one embedding lookup for every text piece and one projector call for every item
        words = bb.input_embeddings(torch.tensor([i for piece in ids for i in piece], dtype=torch.long, device=bb.device))
        words = words.split([len(piece) for piece in ids])
        items = torch.tensor([item for _, item in cuts if item is not None], dtype=torch.long, device=bb.device)
        vectors = iter(self.item_vectors(items).to(bb.dtype))
        parts = [words[0]]
        for (_, item), piece in zip(cuts, words[1:]):
            parts.append(soft_prompt().to(bb.dtype) if item is None else next(vectors)[None])
            parts.append(piece)
        return torch.cat(parts, dim=0)

    def _batch(self, prompts: Sequence[Prompt], soft_prompt: SoftPrompt | None, left_pad: bool, skip: int = 0) -> Batch:
        """The prompts' input vectors, padded; `skip`: leave out each prompt's first tokens (a
        shared prefix whose keys and values are cached, the soft-prompt slot among them)."""
        seqs = [self._prompt_embeds(p, soft_prompt)[skip:] for p in prompts]
        batch = pad(seqs, left_pad)
        T = batch.embeds.shape[1]
        starts = [None if skip else self._slot_start(p, soft_prompt) for p in prompts]
        batch.slots = [None if s is None else s + (T - len(x) if left_pad else 0) for s, x in zip(starts, seqs)]
        return batch

    # -- scoring -----------------------------------------------------------------------------

    def score(self, prompts: Sequence[Prompt], soft_prompt: SoftPrompt | None = None) -> list[torch.Tensor]:
        """One float32 tensor of scores per prompt, aligned with `prompt.candidates`."""
        out: list[torch.Tensor | None] = [None] * len(prompts)
        # batch prompts of similar length together: less padding, same scores
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i].before) + len(prompts[i].after))
        # no autograd bookkeeping at all (a little faster than no_grad); FSDP gathers weights into
        # tensors it updates in place afterwards, which inference mode forbids: no_grad there
        with torch.no_grad() if distributed.current().sharded else torch.inference_mode():
            for i in range(0, len(order), self.batch_size):
                idx = order[i : i + self.batch_size]
                chunk = [prompts[j] for j in idx]
                cands = [self.continuations(p) for p in chunk]
                for j, scores in zip(idx, self.sequence_logprobs(chunk, cands, soft_prompt)):
                    out[j] = scores.float().cpu()
        return out

    def sequence_logprobs(
        self, prompts: Sequence[Prompt], continuations: Sequence[Sequence[Sequence[int]]], soft_prompt: SoftPrompt | None
    ) -> list[torch.Tensor]:
        """Per prompt, the score of each of its continuations (token-id lists): the mean token
        log-probability (`full-title`) or the first token's (`first-token`). Differentiable with
        respect to the soft prompt and the model when called under grad."""
        run = self._seq2seq if self.backbone.is_encoder_decoder else self._causal
        if not self.one_pass_per_prompt:
            return run(prompts, continuations, soft_prompt)
        out, prefixes = [], {}
        for p, cs in zip(prompts, continuations):
            prefix = self._shared_prefix(p, soft_prompt, prefixes)
            out += self._causal([p], [cs], soft_prompt, prefix) if prefix is not None else run([p], [cs], soft_prompt)
        return out

    def _shared_prefix(self, prompt: Prompt, soft_prompt: SoftPrompt | None, prefixes: dict) -> Prefix | None:
        """When scoring (no gradients) a prompt with a soft-prompt slot on a decoder-only model, one
        pass per prompt: the template's text before the slot and the soft prompt, which every prompt
        of that template starts with, run through the model once per call (`prefixes`, by template)
        and their keys and values are shared by the passes of its prompts (`Prefix`). The prefix
        depends on the prompt's template alone, never on the other prompts of the call, so a
        prompt's scores stay bit-identical whatever its batch; against a whole pass they differ by
        float rounding (attention sums the same terms in another order). None where it does not
        apply (`share_prefix` off, under grad, item vectors, no slot, fewer than MIN_SHARED_PREFIX
        tokens)."""
        if (not self.share_prefix or torch.is_grad_enabled() or soft_prompt is None or self.backbone.is_encoder_decoder
                or self.title_scoring != "full-title" or prompt.item_slots or not prompt.has_slot):
            return None
        before = tuple(self._before_ids(prompt))
        length = len(before) + soft_prompt.num_tokens
        if length < MIN_SHARED_PREFIX:
            return None
        if before not in prefixes:
            from transformers import DynamicCache

            embeds = self._prompt_embeds(prompt, soft_prompt)[:length]
            cache = DynamicCache()
            with self._deep_slots(soft_prompt, [self._slot_start(prompt, soft_prompt)]):
                self.backbone.model(inputs_embeds=embeds[None], past_key_values=cache, use_cache=True,
                                    position_ids=torch.arange(length, device=embeds.device)[None], logits_to_keep=1)
            prefixes[before] = Prefix(length, cache)
        return prefixes[before]

    @property
    def one_pass_per_prompt(self) -> bool:
        """Whether each prompt gets its own forward pass (see PASSES). On CPU that is as fast as
        padded batches or faster (no padding to compute) and makes every score independent of the
        batch; under FSDP every process must run the same number of passes per block, so batches
        are kept there."""
        if self.passes != "auto":
            return self.passes == "prompt"
        return self.backbone.device.type == "cpu" and not distributed.current().sharded

    def _causal(self, prompts, continuations, soft_prompt, prefix: Prefix | None = None) -> list[torch.Tensor]:
        """One forward pass per batch: each row is [left padding, prompt, packed continuations].
        With `prefix` (one prompt, see `_shared_prefix`) the prompt's first prefix.length tokens are
        the cached keys and values, and only the rest of it and the continuations are computed.

        The continuations of a prompt are packed one after another behind it; a custom 4D mask
        lets each continuation token see the whole prompt and its own earlier tokens only, and
        its position ids restart at the prompt's length. So the prompt's keys/values are
        computed once and shared by all candidates, with no copies of a KV cache, and logits are
        computed only from the prompt's last position onwards."""
        bb = self.backbone
        model, dev = bb.model, bb.device
        full = self.title_scoring == "full-title"
        packs = [[c[:-1] if full else [] for c in cs] for cs in continuations]
        pack_len = [sum(len(x) for x in p) for p in packs]
        L = max(pack_len)
        P = prefix.length if prefix is not None else 0
        prompt = self._batch(prompts, soft_prompt, left_pad=True, skip=P)
        B, T, _ = prompt.embeds.shape
        if L == 0 and prefix is None:
            with self._deep_slots(soft_prompt, prompt.slots):
                out = model(inputs_embeds=prompt.embeds, attention_mask=prompt.mask,
                            position_ids=(prompt.mask.cumsum(1) - 1).clamp(min=0), use_cache=False, logits_to_keep=1)
            logp = F.log_softmax(out.logits.float(), dim=-1)
            return [logp[b, 0, torch.tensor([c[0] for c in cs], device=dev)] for b, cs in enumerate(continuations)]

        Q = T + L
        pack_ids = torch.zeros(B, L, dtype=torch.long, device=dev)
        positions = torch.zeros(B, Q, dtype=torch.long, device=dev)
        positions[:, :T] = (prompt.mask.cumsum(1) - 1).clamp(min=0) + P
        segment = torch.full((B, Q), -1, dtype=torch.long, device=dev)  # candidate of each pack slot
        # scored tokens: (row, logit position counted from T-1, token, candidate slot)
        rows, where, tokens, owner = [], [], [], []
        slot = 0
        for b, cs in enumerate(continuations):
            offset = 0
            for j, c in enumerate(cs):
                piece = packs[b][j]
                n = len(piece)
                if n:
                    pack_ids[b, offset : offset + n] = torch.tensor(piece, device=dev)
                    positions[b, T + offset : T + offset + n] = P + prompt.lengths[b] + torch.arange(n, device=dev)
                    segment[b, T + offset : T + offset + n] = j
                # token k of c is predicted at the prompt's end (k = 0) or at its (k-1)-th pack slot
                rows += [b] * len(c)
                where += [0] + [1 + offset + k for k in range(len(c) - 1)] if full else [0]
                tokens += list(c) if full else [c[0]]
                owner += [slot] * (len(c) if full else 1)
                offset += n
                slot += 1
        embeds = torch.cat([prompt.embeds, bb.input_embeddings(pack_ids)], dim=1)
        real_prompt = torch.zeros(B, Q, dtype=torch.bool, device=dev)
        real_prompt[:, :T] = prompt.mask.bool()
        idx = torch.arange(Q, device=dev)
        causal = idx[None, :, None] >= idx[None, None, :]
        same_candidate = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        mask = (real_prompt[:, None, :] & causal) | (same_candidate & causal)
        mask |= torch.eye(Q, dtype=torch.bool, device=dev)  # padding attends to itself: no empty rows
        if prefix is None:
            with self._deep_slots(soft_prompt, prompt.slots):
                out = model(inputs_embeds=embeds, attention_mask=self._mask4d(mask), position_ids=positions,
                            use_cache=False, logits_to_keep=L + 1)
        else:  # every token also sees the shared prefix (a prompt's slot lies inside it: nothing to set here)
            mask = torch.cat([torch.ones(B, Q, P, dtype=torch.bool, device=dev), mask], dim=2)
            out = model(inputs_embeds=embeds, attention_mask=self._mask4d(mask), position_ids=positions,
                        past_key_values=prefix.cache, use_cache=True, logits_to_keep=L + 1)
            prefix.cache.crop(P - prefix.cache.get_seq_length())  # back to the prefix alone for the next prompt
        logits = out.logits  # [B, L + 1, V]: from the prompt's last position onwards
        rows_t, where_t = torch.tensor(rows, device=dev), torch.tensor(where, device=dev)
        return mean_per_continuation(logits[rows_t, where_t], tokens, owner, [len(cs) for cs in continuations])

    def _mask4d(self, allowed: torch.Tensor) -> torch.Tensor:
        """[B, Q, K] bool -> the 4D mask the model's attention implementation takes as is."""
        if getattr(self.backbone.model.config, "_attn_implementation", "sdpa") == "sdpa":
            return allowed[:, None]
        dtype = self.backbone.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None]

    def _seq2seq(self, prompts, continuations, soft_prompt) -> list[torch.Tensor]:
        model, dev = self.backbone.model, self.backbone.device
        batch = self._batch(prompts, soft_prompt, left_pad=False)
        encoder_out = model.get_encoder()(inputs_embeds=batch.embeds, attention_mask=batch.mask)
        counts = [len(cs) for cs in continuations]
        start = model.config.decoder_start_token_id
        if self.title_scoring == "first-token":
            owner = torch.repeat_interleave(torch.arange(len(prompts), device=dev), torch.tensor(counts, device=dev))
            flat = [c for cs in continuations for c in cs]
            dec = model(encoder_outputs=(encoder_out.last_hidden_state,), attention_mask=batch.mask,
                        decoder_input_ids=torch.full((len(prompts), 1), start, device=dev), use_cache=False)
            logp = F.log_softmax(dec.logits[:, 0].float(), dim=-1)
            return list(logp[owner, torch.tensor([c[0] for c in flat], device=dev)].split(counts))
        if not torch.is_grad_enabled():
            return self._seq2seq_scoring(encoder_out.last_hidden_state, batch.mask, continuations, start)
        # training: a prompt's continuations packed into one decoder row, each its own segment
        # [start, c[:-1]] under a block-diagonal causal mask. T5's decoder self-attention bias
        # depends only on the distance between positions, which packing keeps within a segment;
        # cross-attention has no position bias. So each candidate is scored exactly as alone,
        # while the encoder output (and, in every decoder layer, the keys and values computed from
        # it, which backward keeps) is not repeated for each candidate: on an H100, Flan-T5-XL's
        # stage-2 step at batch 8 takes 32 GB instead of 60 (docs/distributed.md).
        pad = self.backbone.pad_token_id or 0
        Q = max(sum(len(c) for c in cs) for cs in continuations)
        dec_in = torch.full((len(prompts), Q), pad, dtype=torch.long, device=dev)
        segment = torch.full((len(prompts), Q), -1, dtype=torch.long, device=dev)
        rows, where, tokens, owner = [], [], [], []
        slot = 0
        for b, cs in enumerate(continuations):
            offset = 0
            for j, c in enumerate(cs):
                n = len(c)
                dec_in[b, offset : offset + n] = torch.tensor([start, *c[:-1]], device=dev)
                segment[b, offset : offset + n] = j
                rows += [b] * n
                where += range(offset, offset + n)
                tokens += c
                owner += [slot] * n
                offset += n
                slot += 1
        idx = torch.arange(Q, device=dev)
        causal = idx[None, :, None] >= idx[None, None, :]
        same = (segment[:, :, None] == segment[:, None, :]) & (segment[:, :, None] >= 0)
        allowed = (same & causal) | torch.eye(Q, dtype=torch.bool, device=dev)  # padding sees itself
        dec = model(encoder_outputs=(encoder_out.last_hidden_state,), attention_mask=batch.mask,
                    decoder_input_ids=dec_in, decoder_attention_mask=self._mask4d(allowed), use_cache=False)
        return mean_per_continuation(dec.logits[torch.tensor(rows, device=dev), torch.tensor(where, device=dev)],
                                      tokens, owner, counts)

    def _seq2seq_scoring(self, encoder_states, encoder_mask, continuations, start) -> list[torch.Tensor]:
        """Full-title scores without gradients: every continuation its own decoder row over a copy
        of its prompt's encoder output. Nothing is kept for a backward pass here, so the copies cost
        little memory, and short rows run faster than packed ones (Flan-T5-XL on an H100: 56 against
        44 requests/s)."""
        model, dev = self.backbone.model, self.backbone.device
        counts = [len(cs) for cs in continuations]
        owner = torch.repeat_interleave(torch.arange(len(counts), device=dev), torch.tensor(counts, device=dev))
        flat = [c for cs in continuations for c in cs]
        width = max(len(c) for c in flat)
        targets = torch.full((len(flat), width), -1, dtype=torch.long, device=dev)
        for i, c in enumerate(flat):
            targets[i, : len(c)] = torch.tensor(c, device=dev)
        tmask = (targets >= 0).long()
        dec_in = torch.cat([torch.full((len(flat), 1), start, device=dev), targets[:, :-1]], dim=1)
        dec_in = dec_in.masked_fill(dec_in < 0, self.backbone.pad_token_id or 0)
        dec = model(encoder_outputs=(encoder_states[owner],), attention_mask=encoder_mask[owner],
                    decoder_input_ids=dec_in, decoder_attention_mask=tmask, use_cache=False)
        logp = F.log_softmax(dec.logits.float(), dim=-1).gather(2, targets.clamp(min=0)[..., None])[..., 0] * tmask
        return list((logp.sum(1) / tmask.sum(1)).split(counts))

    def loss(self, prompts: Sequence[Prompt], soft_prompt: SoftPrompt | None, objective: str = "candidates") -> torch.Tensor:
        """The mean training loss of labelled prompts, differentiable (see OBJECTIVES)."""
        return self.training_loss(prompts, soft_prompt, objective).total

    def training_loss(self, prompts: Sequence[Prompt], soft_prompt: SoftPrompt | None, objective: str = "candidates",
                      keep: Sequence[Sequence[int]] | None = None, teacher: Sequence[torch.Tensor] | None = None,
                      distill_weight: float = 0.0, temperature: float = 1.0, label_weight: float = 1.0) -> LossParts:
        """The training loss of labelled prompts and its parts (see OBJECTIVES and llm.losses.ranking_loss).

        `keep`: per prompt, the positions in `prompt.candidates` whose titles are scored (the
        label's among them); the others are listed in the prompt but not scored, which spares their
        tokens in the forward and backward pass (stage 2's `train_negatives`). `teacher`: per prompt,
        the teacher's scores of all its candidates (display order), for the distillation term."""
        if objective not in OBJECTIVES:
            raise ValueError(f"unknown training objective {objective!r}; choose one of {OBJECTIVES}")
        if any(p.label is None for p in prompts):
            raise ValueError("a training prompt has no label")
        labels = [p.candidates.index(p.label) for p in prompts]
        if objective == "label":
            if teacher is not None and distill_weight:
                raise ValueError("the distillation term needs every candidate scored (objective `candidates`)")
            answers = [[self.continuations(p)[y]] for p, y in zip(prompts, labels)]
            nll = -torch.cat(self.sequence_logprobs(prompts, answers, soft_prompt)).mean()
            return LossParts(nll if label_weight == 1 else label_weight * nll, nll.detach())
        keep = [range(len(p.candidates)) for p in prompts] if keep is None else keep
        for p, y, k in zip(prompts, labels, keep):
            if y not in k:
                raise ValueError(f"the label {p.label!r} is not among the candidates kept for the loss")
        continuations = [[self.continuations(p)[j] for j in k] for p, k in zip(prompts, keep)]
        scores = self.sequence_logprobs(prompts, continuations, soft_prompt)
        kept_labels = [list(k).index(y) for y, k in zip(labels, keep)]
        kept_teacher = None if teacher is None else [torch.as_tensor(t)[list(k)] for t, k in zip(teacher, keep)]
        return ranking_loss(scores, kept_labels, kept_teacher, distill_weight, temperature, label_weight)

    # -- reference ---------------------------------------------------------------------------

    def score_brute_force(self, prompts: Sequence[Prompt], soft_prompt: SoftPrompt | None = None) -> list[torch.Tensor]:
        """Each candidate scored by its own full forward pass (prompt + answer): the slow,
        obviously-correct reference the fast path is tested against."""
        bb, out = self.backbone, []
        with torch.no_grad():
            for p in prompts:
                prompt = self._prompt_embeds(p, soft_prompt)
                scores = []
                for ids in self.continuations(p):
                    n = 1 if self.title_scoring == "first-token" else len(ids)
                    y = torch.tensor(ids, device=bb.device)
                    if bb.is_encoder_decoder:
                        start = bb.model.config.decoder_start_token_id
                        dec_in = torch.cat([torch.tensor([start], device=bb.device), y[:-1]])[None]
                        logits = bb.model(inputs_embeds=prompt[None], decoder_input_ids=dec_in).logits[0]
                    else:
                        seq = torch.cat([prompt, bb.input_embeddings(y[:-1])])[None]
                        # logits only where the answer is scored: the reference is plain, not wasteful
                        with self._deep_slots(soft_prompt, [self._slot_start(p, soft_prompt)]):
                            logits = bb.model(inputs_embeds=seq, logits_to_keep=len(ids)).logits[0]
                    logp = F.log_softmax(logits.float(), dim=-1)[torch.arange(len(ids)), y]
                    scores.append(logp[:n].mean())
                out.append(torch.stack(scores).cpu())
        return out
