"""Int8 weights for scoring on the CPU: a copy of the model whose linear layers (the adapters
merged in first) compute with int8 weights and dynamically quantized int8 activations (PyTorch's
dynamic quantization, fbgemm kernels on x86). It changes scores by rounding, not which model is
scored: benchmarks/speed.py measures the time and compares the rankings with float32's on the
same samples (paired), and docs/training.md has the numbers.

Only for scoring, only on the CPU, and only where torch still ships `torch.ao.quantization`
(deprecated in favour of torchao; a torch without it gets a clear error, not a slow fallback)."""

from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

WEIGHTS = ("float", "int8")  # how a scorer's linear layers compute: as loaded, or int8 (this module)


def int8_copy(model: nn.Module, keep_head: bool = True) -> nn.Module:
    """A copy of `model` for scoring: adapters (peft) merged, every nn.Linear of the transformer
    blocks with int8 weights; `keep_head`: the LM head keeps its float weights (the verbalizer
    reads log-probabilities from it). `model` itself is left as it was."""
    try:
        from torch.ao.quantization import quantize_dynamic
    except ImportError as e:  # pragma: no cover - depends on the torch release
        raise RuntimeError("int8 scoring needs torch.ao.quantization, which this torch no longer ships; "
                           "score with float weights (eval_weights: float)") from e
    if next(model.parameters()).device.type != "cpu":
        raise ValueError("int8 scoring runs on the CPU only (fbgemm kernels); on a GPU score in bf16 instead")
    merged = copy.deepcopy(model)
    if hasattr(merged, "merge_and_unload"):  # a peft model: fold the adapters into the weights
        merged = merged.merge_and_unload()
    merged = merged.float().eval()  # int8 kernels take float32 activations
    head = merged.get_output_embeddings() if keep_head else None
    targets = {name for name, module in merged.named_modules() if isinstance(module, nn.Linear) and module is not head}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", message=".*quantize.*deprecated.*")
        return quantize_dynamic(merged, targets, dtype=torch.qint8)
