"""A block of trainable soft-prompt vectors, spliced into the input embeddings at the template's
slot (for T5, into the encoder input). One soft prompt is shared by DELRec's TA and RPS tasks.

A deep soft prompt (`depth` k > 0, decoder-only models) also has its own vectors for each of the top
k transformer layers: at the input of each such layer the slot's hidden states are set to them
(the deep prompts of P-tuning v2 and VPT-Deep: every layer's keys and values at the slot become
trainable, which input-only prompts need a billion parameters to match). With k below the
model's depth the input vectors stay as they started and only the top k layers' are trained, so
backward stops at the lowest of them; `init_deep` starts them at the hidden states the input
prompt itself produces there, so training starts from the input-only prompt's behaviour exactly.
The verbalizer applies them (`Verbalizer._deep_slots`).

Saved as safetensors with its metadata (backbone, size, dimension), in the spirit of peft's
`save_pretrained` / `from_pretrained`; loading into another backbone fails with a clear error.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from delrec.core.io import atomic_path
from delrec.core.settings import in_run

WEIGHTS_NAME = "soft_prompt.safetensors"
FORMAT = "delrec.soft_prompt.v1"
INITS = ("random", "vocab")
VOCAB_SAMPLE_FROM = 5000  # Lester et al. (2021) sampled from the 5,000 commonest tokens


class SoftPrompt(nn.Module):
    def __init__(self, num_tokens: int, dim: int, init_std: float = 0.02, backbone: str = "", seed: int | None = None,
                 deep_layers: tuple[int, ...] = ()):
        super().__init__()
        if num_tokens < 1 or dim < 1:
            raise ValueError(f"a soft prompt needs num_tokens >= 1 and dim >= 1, got {num_tokens} x {dim}")
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        # at the scale of the model's word embeddings, so the first forward passes look like text
        self.embedding = nn.Parameter(torch.randn(num_tokens, dim, generator=generator) * init_std)
        self.backbone = backbone
        # deep prompt: the slot's hidden states at the input of each of these layers (ascending)
        self.deep_layers = tuple(int(i) for i in deep_layers)
        self.deep = nn.Parameter(torch.zeros(len(self.deep_layers), num_tokens, dim)) if self.deep_layers else None
        self.trains_input = True  # False for a deep prompt on the top layers only (init_deep)

    @property
    def is_deep(self) -> bool:
        return self.deep is not None

    def trainable(self) -> list[nn.Parameter]:
        """What stage 1 trains: the input vectors, and a deep prompt's layer vectors; with a deep
        prompt on the top layers only, the input vectors stay as they started (see the module doc)."""
        if not self.is_deep:
            return [self.embedding]
        return [self.embedding, self.deep] if self.trains_input else [self.deep]

    @torch.no_grad()
    def init_deep(self, backbone, before_ids: list[int], depth: int) -> SoftPrompt:
        """Give this prompt vectors for the top `depth` layers of `backbone` (depth = all layers:
        layers 1 and up, the input vectors being layer 0's), each set to the hidden states that the
        input prompt, after the template's text `before_ids`, produces at that layer's input."""
        layers = len(backbone.decoder_layers())
        if not 1 <= depth <= layers:
            raise ValueError(f"soft_depth must be between 1 and the model's {layers} layers, got {depth}")
        first = max(1, layers - depth)
        ids = torch.tensor(before_ids, dtype=torch.long, device=backbone.device)
        embeds = torch.cat([backbone.input_embeddings(ids), self.embedding.to(backbone.dtype)])[None]
        out = backbone.model(inputs_embeds=embeds, output_hidden_states=True, use_cache=False, logits_to_keep=1)
        slot = slice(len(before_ids), len(before_ids) + self.num_tokens)
        self.deep_layers, self.trains_input = tuple(range(first, layers)), depth == layers
        self.deep = nn.Parameter(torch.stack([out.hidden_states[i][0, slot].float() for i in self.deep_layers]).cpu()
                                 .to(self.embedding.device))
        return self

    @classmethod
    def for_backbone(cls, backbone, num_tokens: int, seed: int | None = None, init: str = "random") -> SoftPrompt:
        """`init` (INITS): `random`, Gaussian at the scale of the word embeddings; `vocab`, copies
        of the embeddings of tokens drawn (seeded, without repetition) from the first
        VOCAB_SAMPLE_FROM ids, which in byte-pair vocabularies are the earliest merges and so the
        commonest pieces of text. Lester et al. (2021) found the vocabulary start trains prompts
        of small models far better than a random one."""
        if init not in INITS:
            raise ValueError(f"unknown soft prompt init {init!r}; choose one of {INITS}")
        prompt = cls(num_tokens, backbone.hidden_size, backbone.embedding_std(), backbone.name, seed)
        if init == "vocab":
            generator = torch.Generator().manual_seed(seed if seed is not None else 0)
            pool = min(VOCAB_SAMPLE_FROM, backbone.vocab_size)
            ids = torch.randperm(pool, generator=generator)[:num_tokens]
            if num_tokens > pool:  # a tiny vocabulary: draw with repetition for the rest
                ids = torch.cat([ids, torch.randint(pool, (num_tokens - pool,), generator=generator)])
            with torch.no_grad():  # as the model's forward embeds them (Gemma scales its embeddings)
                prompt.embedding.copy_(backbone.input_embeddings(ids).detach().float().cpu())
        return prompt.to(backbone.device)

    @property
    def num_tokens(self) -> int:
        return self.embedding.shape[0]

    @property
    def dim(self) -> int:
        return self.embedding.shape[1]

    def forward(self) -> torch.Tensor:
        return self.embedding

    def save(self, path: str | os.PathLike) -> Path:
        """Write `path` (a .safetensors file, or a folder that gets soft_prompt.safetensors)."""
        path = Path(path)
        if path.suffix != ".safetensors":
            path = path / WEIGHTS_NAME
        metadata = {"format": FORMAT, "backbone": self.backbone, "num_tokens": str(self.num_tokens), "dim": str(self.dim)}
        tensors = {"embedding": self.embedding.detach().float().cpu().contiguous()}
        if self.is_deep:
            metadata["deep_layers"] = ",".join(map(str, self.deep_layers))
            tensors["deep"] = self.deep.detach().float().cpu().contiguous()
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata=metadata)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, backbone=None) -> SoftPrompt:
        """Load a saved soft prompt; with `backbone`, check that it was trained for it."""
        path = Path(path)
        if path.is_dir():
            path = path / WEIGHTS_NAME
        if not path.exists():
            raise FileNotFoundError(f"no soft prompt at {path}")
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"{path} is not a delrec soft prompt (format {meta.get('format')!r})")
            weight = f.get_tensor("embedding")
            deep = f.get_tensor("deep") if meta.get("deep_layers") else None
        layers = tuple(int(i) for i in meta["deep_layers"].split(",")) if deep is not None else ()
        prompt = cls(weight.shape[0], weight.shape[1], backbone=meta.get("backbone", ""), deep_layers=layers)
        with torch.no_grad():
            prompt.embedding.copy_(weight)
            if deep is not None:
                prompt.deep.copy_(deep)
        if backbone is not None:
            if backbone.hidden_size != prompt.dim:
                raise ValueError(
                    f"{path} was trained for {prompt.backbone!r} (dimension {prompt.dim}); it cannot be used with "
                    f"{backbone.name!r} (dimension {backbone.hidden_size})"
                )
            # (a `w UDPSM` prompt names its stage-1 LLM's folder: compared by its place in the run)
            if prompt.backbone and backbone.name and in_run(prompt.backbone) != in_run(backbone.name):
                raise ValueError(
                    f"{path} was trained for backbone {prompt.backbone!r}, not {backbone.name!r}; "
                    "a soft prompt only means something to the model it was trained with"
                )
            if prompt.is_deep and prompt.deep_layers[-1] >= len(backbone.decoder_layers()):
                raise ValueError(f"{path} is a deep prompt up to layer {prompt.deep_layers[-1]}, but {backbone.name!r} "
                                 f"has {len(backbone.decoder_layers())} layers")
            prompt = prompt.to(backbone.device)
        return prompt
