"""Tiny, seeded, offline language models for tests: a word-level tokenizer and random T5 / Llama
backbones small enough to run a forward pass in milliseconds.

    from llm_helpers import make_test_tokenizer, tiny_t5_backbone, tiny_llama_backbone
"""

from __future__ import annotations

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

from delrec.llm.backbone import Backbone

# T5's convention: pad 0 (also the decoder start), eos 1, unk 2. Decoder-only models reuse them.
SPECIAL_TOKENS = ["<pad>", "</s>", "<unk>"]
SPACE = "\u2581"

DEFAULT_WORDS = (
    "The the a of and is in to what which next movie film user watched has will watch recommend "
    "candidates history yes no answer : , . ( ) [ ] 1 2 3 4 5 6 7 8 9 0 "
    "Usual Suspects 1995 Toy Story Heat Fargo Alien Casablanca Titanic Matrix Jaws Vertigo Psycho Rocky"
).split()


def make_test_tokenizer(words=DEFAULT_WORDS) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over `words`, with pad/eos/unk, that round-trips text exactly.

    Spaces are kept SentencePiece-style: every word exists bare ("Heat") and with its leading space
    ("\u2581Heat"), punctuation is split off, and a lone "\u2581" covers a space before punctuation.
    Ids: 0 <pad>, 1 </s>, 2 <unk>, 3 "\u2581", then for each distinct word its bare and spaced forms.
    Words not in the list map to <unk>.
    """
    vocab: dict[str, int] = {}
    for token in [*SPECIAL_TOKENS, SPACE]:
        vocab.setdefault(token, len(vocab))
    for word in words:
        vocab.setdefault(word, len(vocab))
        vocab.setdefault(SPACE + word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="never"), pre_tokenizers.Punctuation()]
    )
    tok.decoder = decoders.Metaspace(replacement=SPACE, prepend_scheme="never")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def tiny_t5_backbone(words=DEFAULT_WORDS, seed: int = 0) -> Backbone:
    """An encoder-decoder Backbone: random T5 (d_model 32, 2+2 layers) over `make_test_tokenizer(words)`."""
    tokenizer = make_test_tokenizer(words)
    config = T5Config(
        vocab_size=len(tokenizer),
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=2,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
        dropout_rate=0.0,
    )
    torch.manual_seed(seed)
    return Backbone.from_model(T5ForConditionalGeneration(config), tokenizer, name="tiny-t5")


def tiny_llama_backbone(words=DEFAULT_WORDS, seed: int = 0, pad: bool = False) -> Backbone:
    """A decoder-only Backbone: random Llama (hidden 32, 2 layers, GQA 2:1) over the test tokenizer.

    With `pad=False` (default) the tokenizer has no pad token, like most decoder-only models, so
    the Backbone sets pad to eos.
    """
    tokenizer = make_test_tokenizer(words)
    if not pad:
        tokenizer.pad_token = None
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    return Backbone.from_model(LlamaForCausalLM(config), tokenizer, name="tiny-llama")
