"""Verbalizer scoring throughput on a GPU, to the issue's measurement standard, with randomly
initialised backbones of real shapes.

    python benchmarks/gpu_throughput.py                                  # CUDA, bf16, Flan-T5-XL and SmolLM2-135M shapes
    python benchmarks/gpu_throughput.py --models smollm2-135m            # what benchmarks/run_gpu.sh runs (about 3 min, H100)
    python benchmarks/gpu_throughput.py --device cpu --tiny              # smoke test on CPU: tiny shapes, seconds

No tokenizer has to travel to the GPU machine, so each backbone is built from its config with
random weights (the speed of a forward pass does not depend on the weights' values) and a
synthetic word-level tokenizer over "w0" .. "w{V-4}" (plus <pad>, </s>, <unk>) gives every text
exactly the wanted number of tokens:

* Flan-T5-XL shape: d_model 2048, d_ff 5120 (gated-gelu), 24 + 24 layers, 32 heads, vocab 32128;
* SmolLM2-135M shape: the config.json of the converted model when present here, else
  hidden 576, intermediate 1536, 30 layers, 9 heads (3 KV), vocab 49152, tied embeddings.

Workload per request: `--prompt-tokens` (320) text tokens around `--soft-tokens` (80)
soft-prompt vectors, and `--candidates` (15) titles of `--title-tokens` (12) tokens (11 words +
EOS).

Measured, per backbone:
* `Verbalizer.score`, full-title and first-token (ours), at every batch size of `--batch-sizes`
  (8 16 32 64): one row each, `--requests` (2000) requests timed after one untimed warm-up batch;
* a plain Hugging Face loop (full-title; per request one forward pass over a batch of its 15
  (prompt + candidate) sequences, logits kept for the candidate positions only), one row of
  `--plain-requests` (default: `--requests`) requests: the speed-up's denominator;
* per row: requests/s, peak GPU memory (torch.cuda.max_memory_allocated, reset before each row),
  the floating-point operations per request (counted once per row on the warm-up batch by a
  dispatch mode, torch's formulas for matrix products and attention, as benchmarks/stages.py
  counts them: the work the kernels execute, padding included), the TFLOP/s that makes and its
  fraction of `--peak-tflops` (default 989: the H100/H200 SXM dense bf16 tensor-core peak of
  NVIDIA's datasheets, 1,979 being with 2:4 sparsity; both chips have the same compute) and of a
  bf16 matrix product measured in the same run (8192^3 on CUDA);
* `fastest`: per backbone and scorer, the batch size with the most requests/s.

Scores against the reference: the first `--check-requests` (64) requests are also scored by the
plain loop in float32 (a float32 copy of the same weights). Each row's max |score - float32
reference| over them must be within the tolerance: 1e-4 when the benchmark runs in float32, else
max(1e-4, `--bf16-factor` (4) x the plain loop's own bf16 error on the same requests and the same
kind of score) — the rounding a plain bf16 forward pass makes is the yardstick, so ours may differ
from the exact scores by a few times what bf16 itself costs, not more. First-token rows are
compared with the reference's first-token log-probabilities, whose bf16 error is larger than that
of a mean over the title's tokens. The share of requests whose top candidate agrees with
the reference is reported beside it. `all_equal_within_tolerance` is false if any row fails, and
the exit status is then 1.

Writes $OUT/gpu_throughput-<gpu>.json when $OUT is set (<gpu> the device's name in lower case,
e.g. nvidia-h200), else benchmarks/results/gpu_throughput-<gpu>.json; the JSON names the GPU at
its top ("gpu"), and is rewritten after every row (`complete` false until the last: a run stopped
by a time limit keeps the rows it measured). `--out` overrides; with `--tiny` the default is /tmp/gpu_throughput_tiny.json,
never the results folder. Without CUDA, and unless `--device cpu`, prints "no GPU available" and
exits 0. Earlier results (benchmarks/results/gpu_throughput.json, 32 requests at batch 8 only)
were measured with the first version of this script.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
sys.path.insert(0, str(ROOT / "src"))  # runs from a checkout without `pip install -e .` (the GPU machine)

from _env import environment  # noqa: E402

SPECIAL = ["<pad>", "</s>", "<unk>"]  # T5's ids: pad 0 (decoder start), eos 1, unk 2
MODELS = ("flan-t5-xl", "smollm2-135m")  # the verbalizer benchmark's defaults
LARGE = ("flan-t5-xl", "llama-7b")  # the paper's backbone and a 7B decoder-only shape (memory benchmarks)
TOLERANCE = 1e-4


def make_tokenizer(vocab_size: int):
    """Word-level tokenizer: ids 0-2 special, then "w0" .. "w{vocab_size - 4}"; whitespace split."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(SPECIAL)}
    for i in range(vocab_size - len(SPECIAL)):
        vocab[f"w{i}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")


def model_config(name: str, tiny: bool):
    """(model class, config, where the config came from)."""
    from transformers import LlamaConfig, LlamaForCausalLM, T5Config, T5ForConditionalGeneration

    if name == "flan-t5-xl":
        shape = dict(d_model=2048, d_ff=5120, d_kv=64, num_layers=24, num_decoder_layers=24, num_heads=32, vocab_size=32128)
        if tiny:
            shape = dict(d_model=64, d_ff=128, d_kv=16, num_layers=2, num_decoder_layers=2, num_heads=4, vocab_size=2000)
        config = T5Config(**shape, feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.0,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return T5ForConditionalGeneration, config, "hard-coded (Flan-T5-XL)"
    if name == "llama-7b":  # LLaMA-1/2-7B shape (multi-head attention, no GQA)
        shape = dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                     num_key_value_heads=32, vocab_size=32000)
        if tiny:
            shape = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=2000)
        return LlamaForCausalLM, LlamaConfig(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None), "hard-coded (7B Llama)"
    if name == "smollm2-135m":
        source = "hard-coded (SmolLM2-135M)"
        shape = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                     num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True, rms_norm_eps=1e-5,
                     max_position_embeddings=8192, rope_theta=100000.0)
        try:
            from delrec.llm.model_fetch import model_dir

            path = model_dir("smollm2-135m") / "config.json"
            if path.is_file():
                shape = {k: v for k, v in json.loads(path.read_text()).items() if k in shape or k in ("head_dim", "rope_parameters")}
                if "rope_parameters" in shape:
                    shape.pop("rope_theta", None)
                source = str(path)
        except Exception:  # noqa: BLE001 - the hard-coded shape is the fallback
            pass
        if tiny:
            shape.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=2000, head_dim=16)
        config = LlamaConfig(**shape, pad_token_id=0, eos_token_id=1, bos_token_id=None)
        return LlamaForCausalLM, config, source
    raise ValueError(f"unknown model {name!r}; choose from {MODELS + LARGE[1:]}")


def build_backbone(name: str, tiny: bool, device, dtype):
    import torch

    from delrec.llm.backbone import Backbone

    cls, config, source = model_config(name, tiny)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(config)
    model.to(dtype)
    model.requires_grad_(False)
    bb = Backbone.from_model(model, make_tokenizer(config.vocab_size), name=f"random-{name}{'-tiny' if tiny else ''}")
    return bb, config, source


def make_requests(bb, n: int, prompt_tokens: int, soft_tokens: int, n_cands: int, title_tokens: int, soft, seed: int,
                  spread: float = 0.0):
    """`n` prompts of exactly `prompt_tokens` text tokens (as the verbalizer counts them, special
    tokens included) around the soft prompt, each with `n_cands` distinct titles of
    `title_tokens` tokens (title_tokens - 1 words + EOS). With `spread` > 0 a prompt is shorter
    by a uniform draw of up to spread * prompt_tokens tokens (real prompts differ in length: the
    ML-100K stage-2 prompts run from about 260 to 410 tokens)."""
    import numpy as np

    from delrec.llm.templates import Prompt
    from delrec.llm.verbalizer import Verbalizer

    rng = np.random.default_rng(seed)
    words = bb.vocab_size - len(SPECIAL)

    def text(k: int) -> str:
        return " ".join(f"w{i}" for i in rng.integers(0, words, size=k))

    head = min(10, prompt_tokens // 4)  # "Use the recommendation pattern of SASRec as a reference:"
    probe = Verbalizer(bb)
    extra = probe._prompt_embeds(Prompt(text(head), text(2), ("x",), None, True), soft).shape[0] - soft_tokens - head - 2
    tail = prompt_tokens - head - extra
    prompts = []
    for _ in range(n):
        titles = tuple(dict.fromkeys(text(title_tokens - 1) for _ in range(n_cands)))
        assert len(titles) == n_cands
        shorter = int(rng.integers(0, int(spread * prompt_tokens) + 1)) if spread else 0
        p = Prompt(text(head), text(tail - shorter), titles, None, True)
        prompts.append(p)
    got = max(probe._prompt_embeds(q, soft).shape[0] for q in prompts)
    assert got == prompt_tokens + soft_tokens or (spread and got < prompt_tokens + soft_tokens), (got, prompt_tokens, soft_tokens)
    assert len(probe.answer_ids(prompts[0].candidates[0])) == title_tokens
    return prompts


# the bf16 dense tensor-core peak of an H100 SXM5 and of an H200 (NVIDIA datasheets; the same GH100
# compute, 1,979 TFLOP/s with 2:4 sparsity). An H100 PCIe card has 756.
DEFAULT_PEAK_TFLOPS = 989.0
DEFAULT_PEAK_NAME = "NVIDIA H100 SXM / H200, dense bf16 tensor-core peak (datasheet)"


def plain_hf_logprobs(bb, prompts, soft) -> list:
    """The plain Hugging Face reference: per request, one forward pass over a batch of its
    candidates, each the whole (prompt + title) sequence; per request a [candidates, title
    tokens] tensor of the title tokens' log-probabilities (EOS included)."""
    import torch
    import torch.nn.functional as F

    model, tok, dev = bb.model, bb.tokenizer, bb.device
    embed = model.get_input_embeddings()
    out = []
    with torch.no_grad():
        for p in prompts:
            ids_before = tok(p.before, add_special_tokens=False)["input_ids"]
            ids_after = tok(p.after.rstrip(), add_special_tokens=False)["input_ids"]
            if bb.is_encoder_decoder:
                ids_after = ids_after + [bb.eos_token_id]
            prompt = torch.cat([embed(torch.tensor(ids_before, device=dev)), soft().to(bb.dtype),
                                embed(torch.tensor(ids_after, device=dev))])
            titles = [(t if bb.is_encoder_decoder else " " + t) for t in p.candidates]
            y = torch.tensor([tok(t, add_special_tokens=False)["input_ids"] + [bb.eos_token_id] for t in titles], device=dev)
            C, M = y.shape
            if bb.is_encoder_decoder:
                start = torch.full((C, 1), model.config.decoder_start_token_id, device=dev)
                logits = model(inputs_embeds=prompt[None].expand(C, -1, -1),
                               decoder_input_ids=torch.cat([start, y[:, :-1]], 1), use_cache=False).logits
            else:
                seq = torch.cat([prompt[None].expand(C, -1, -1), embed(y[:, :-1])], 1)
                logits = model(inputs_embeds=seq, use_cache=False, logits_to_keep=M).logits
            out.append(F.log_softmax(logits.float(), -1).gather(2, y[..., None])[..., 0].cpu())
    return out


def plain_hf_scores(bb, prompts, soft) -> list:
    """The reference's full-title scores: the mean log-probability of each title's tokens."""
    return [lp.mean(1) for lp in plain_hf_logprobs(bb, prompts, soft)]


# fused attention kernels torch's flop registry does not list, counted with the formula of the
# kernel they stand for (same leading arguments: query, key, value)
_FLOP_ALIASES = {"_scaled_dot_product_flash_attention_for_cpu": "_scaled_dot_product_flash_attention",
                 "_scaled_dot_product_flash_attention_for_cpu_backward": "_scaled_dot_product_flash_attention_backward"}


class FlopCount:
    """Floating-point operations of the aten ops torch's flop counter knows (matrix products,
    attention, and the fused attention kernels in _FLOP_ALIASES), forward and backward, counted by
    a dispatch mode (also benchmarks/stages.py's). torch.utils.flop_counter.FlopCounterMode would
    do, but its per-module hooks refuse torch.autograd.grad, which stage 1 uses; this is its
    dispatch part alone."""

    def __enter__(self):
        import torch
        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils.flop_counter import flop_registry

        counter = self
        self.total = 0
        registry = dict(flop_registry)
        for alias, name in _FLOP_ALIASES.items():
            op = getattr(torch.ops.aten, alias, None)
            if op is not None:
                registry[op] = flop_registry[getattr(torch.ops.aten, name)]
        # under torch.inference_mode (the verbalizer's scoring) a linear layer reaches the dispatch
        # mode as aten.linear itself, not as the addmm it decomposes into elsewhere
        registry[torch.ops.aten.linear] = lambda x, weight, bias=None, out_val=None, **_: 2 * x.numel() * weight.shape[0]

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                formula = registry.get(func._overloadpacket)
                if formula is not None:
                    counter.total += formula(*args, **kwargs, out_val=out)
                return out

        self.mode = Mode()
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        self.mode.__exit__(*exc)


def matmul_peak(device, dtype, size: int, repeats: int = 10) -> dict:
    """TFLOP/s of one size^3 matrix product in `dtype` on `device`, the mean of `repeats` after
    three warm-ups (KINDS.md's measurement of the lent H200: 788 TFLOP/s at 8192 in bf16)."""
    import torch

    a, b = torch.randn(size, size, device=device, dtype=dtype), torch.randn(size, size, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - t0) / repeats
    del a, b
    return {"shape": f"{size}x{size}x{size}", "dtype": str(dtype).removeprefix("torch."), "tflops": 2 * size**3 / seconds / 1e12}


def measure(fn, prompts, warm, device) -> tuple[dict, list]:
    """Score `warm` once (untimed; its floating-point operations counted), then every prompt of
    `prompts` (`fn` gets them all: it batches them itself), timed; scores per prompt."""
    import torch

    cuda = device.type == "cuda"
    with FlopCount() as count:
        fn(warm)
    flop_per_request = count.total / len(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    scores = fn(prompts)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    res = {"requests": len(prompts), "seconds": seconds, "requests_per_s": len(prompts) / seconds,
           "flop_per_request": flop_per_request, "tflops_achieved": flop_per_request * len(prompts) / seconds / 1e12}
    if cuda:
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # the process's lifetime peak
    return res, scores


def compare(scores: list, reference: list) -> dict:
    """Max |scores - reference| over the requests both have, and how often the top candidate agrees."""
    import torch

    n = len(reference)
    got, ref = torch.stack([s.float() for s in scores[:n]]), torch.stack([r.float() for r in reference])
    return {"max_abs_diff": float((got - ref).abs().max()),
            "top1_agreement": float((got.argmax(1) == ref.argmax(1)).float().mean())}


def gpu_slug(name: str | None) -> str:
    """'NVIDIA H200' -> 'nvidia-h200' (a file-name part); 'cpu' without a GPU."""
    return re.sub(r"[^a-z0-9]+", "-", (name or "cpu").lower()).strip("-") or "gpu"


def markdown(result: dict) -> str:
    s = result["settings"]
    mem = "peak GPU MB" if s["device"] == "cuda" else "peak RSS MB (process)"
    out = [f"| backbone | scorer | batch | requests | requests/s | GFLOP/request | TFLOP/s | of {s['peak_tflops']:.0f} TFLOP/s "
           f"| of measured matmul | {mem} | max abs diff vs fp32 ref | within tol | top-1 agreement |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r.get("peak_gpu_mem_mb", r.get("peak_rss_mb"))
        out.append(f"| {r['model']} | {r['scorer']} | {r['batch_size'] or '-'} | {r['requests']} | {r['requests_per_s']:.2f} | "
                   f"{r['flop_per_request'] / 1e9:.3g} | {r['tflops_achieved']:.2f} | {r['fraction_of_peak']:.2%} | "
                   f"{r['fraction_of_measured_matmul']:.2%} | {m:.0f} | {r['max_abs_diff']:.2e} | "
                   f"{'yes' if r['equal_within_tolerance'] else 'NO'} | {r['top1_agreement']:.3f} |")
    out.append("")
    for name, m in result["models"].items():
        fast = m["fastest"]
        out.append(f"{name}: fastest full-title {fast['ours full-title']['requests_per_s']:.1f} requests/s at batch "
                   f"{fast['ours full-title']['batch_size']}, first-token {fast['ours first-token']['requests_per_s']:.1f} at batch "
                   f"{fast['ours first-token']['batch_size']}; ours (full-title, fastest) / plain HF loop = "
                   f"**{m['ratio_full_title']:.1f}x**; tolerance full-title {m['tolerance']['full-title']:.2e}, first-token "
                   f"{m['tolerance']['first-token']:.2e} (the plain loop's own {s['dtype']} error: "
                   f"{m['reference_error']['full-title']:.2e}, {m['reference_error']['first-token']:.2e}); "
                   f"weights {m['weights_mb']:.0f} MB.")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + LARGE[1:])
    p.add_argument("--tiny", action="store_true", help="tiny shapes and workload, for a CPU smoke test (float32 by default)")
    p.add_argument("--dtype", default=None, help="default bfloat16; float32 with --tiny")
    p.add_argument("--requests", type=int, default=None, help="timed requests per row (default 2000; 24 with --tiny)")
    p.add_argument("--plain-requests", type=int, default=None, help="timed requests of the plain HF row (default: --requests)")
    p.add_argument("--check-requests", type=int, default=None, help="requests compared with the float32 reference (default 64; 8 with --tiny)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="the sweep (default 8 16 32 64; 2 4 with --tiny)")
    p.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                   help=f"the peak the fraction is of (default {DEFAULT_PEAK_TFLOPS:g}: {DEFAULT_PEAK_NAME})")
    p.add_argument("--peak-name", default=None, help="what --peak-tflops is, for the JSON")
    p.add_argument("--bf16-factor", type=float, default=4.0, help="tolerance = this x the plain loop's own low-precision error")
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 320; 64 with --tiny")
    p.add_argument("--soft-tokens", type=int, default=None, help="default 80; 16 with --tiny")
    p.add_argument("--candidates", type=int, default=15)
    p.add_argument("--title-tokens", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)

    import torch

    from delrec.llm.backbone import Backbone, pick_dtype
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.verbalizer import Verbalizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU available")
        return 0
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    if args.out is None:
        name = f"gpu_throughput-{gpu_slug(gpu)}.json"
        if args.tiny:
            args.out = "/tmp/gpu_throughput_tiny.json"
        elif os.environ.get("OUT"):
            args.out = str(Path(os.environ["OUT"]) / name)
        else:
            args.out = str(ROOT / "benchmarks" / "results" / name)
    n = args.requests or (24 if args.tiny else 2000)
    n_plain = args.plain_requests or n
    n_check = min(args.check_requests or (8 if args.tiny else 64), n, n_plain)
    sizes = args.batch_sizes or ([2, 4] if args.tiny else [8, 16, 32, 64])
    P = args.prompt_tokens or (64 if args.tiny else 320)
    S = args.soft_tokens or (16 if args.tiny else 80)
    dtype = pick_dtype(device, args.dtype or ("float32" if args.tiny else "bfloat16"))
    peak_name = args.peak_name or (DEFAULT_PEAK_NAME if args.peak_tflops == DEFAULT_PEAK_TFLOPS else "given by --peak-tflops")
    matmul = matmul_peak(device, dtype, 8192 if device.type == "cuda" else 512)
    print(f"{gpu or 'cpu'}: {dtype} matrix product {matmul['shape']} {matmul['tflops']:.2f} TFLOP/s; "
          f"peak {args.peak_tflops:g} TFLOP/s ({peak_name})", flush=True)

    rows, models = [], {}

    def save(complete: bool) -> dict:
        """The results so far (after every row: a benchmark stopped by a time limit keeps its rows)."""
        from delrec.core.io import write_json

        result = {
            "gpu": gpu,
            "complete": complete,
            "environment": environment(),
            "settings": {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
                         "requests": n, "plain_requests": n_plain, "check_requests": n_check, "batch_sizes": sizes,
                         "prompt_tokens": P, "soft_tokens": S, "candidates": args.candidates, "title_tokens": args.title_tokens,
                         "peak_tflops": args.peak_tflops, "peak_name": peak_name, "measured_matmul": matmul,
                         "bf16_factor": args.bf16_factor,
                         "flops": "counted on each row's warm-up batch by a dispatch mode (torch.utils.flop_counter's formulas: "
                                  "matrix products and attention), executed work, padding included",
                         "weights": "random (seed 0); synthetic word-level tokenizer",
                         "warmup": "one batch of the row's batch size (one request for the plain loop), not among the timed ones"},
            "rows": rows,
            "models": models,
            "all_equal_within_tolerance": all(r["equal_within_tolerance"] for r in rows),
        }
        write_json(args.out, result)
        return result

    for name in args.models:
        bb, config, source = build_backbone(name, args.tiny, device, dtype)
        weights_mb = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values()) / 2**20
        soft = SoftPrompt.for_backbone(bb, S, seed=0)
        warm_n = max(sizes)
        prompts = make_requests(bb, max(n, n_plain) + warm_n, P, S, args.candidates, args.title_tokens, soft, seed=1)
        timed, warm = prompts[: max(n, n_plain)], prompts[-warm_n:]
        # the float32 reference on the first n_check requests, and the plain loop's own error against it
        bb32 = Backbone.from_model(copy.deepcopy(bb.model).float(), bb.tokenizer, name=f"{bb.name}-float32")
        ref_lp = plain_hf_logprobs(bb32, timed[:n_check], soft)
        del bb32
        low_lp = plain_hf_logprobs(bb, timed[:n_check], soft)
        kinds = {"full-title": lambda lp: lp.mean(1), "first-token": lambda lp: lp[:, 0]}
        reference = {k: [f(lp) for lp in ref_lp] for k, f in kinds.items()}
        # what rounding alone costs: the plain loop in the benchmark's dtype against float32, per score kind
        own = {k: compare([f(lp) for lp in low_lp], reference[k])["max_abs_diff"] for k, f in kinds.items()}
        tolerance = {k: TOLERANCE if dtype == torch.float32 else max(TOLERANCE, args.bf16_factor * e) for k, e in own.items()}
        kind = {"ours full-title": "full-title", "ours first-token": "first-token", "plain HF loop full-title": "full-title"}

        def row(scorer, batch_size, fn, requests):
            res, scores = measure(fn, timed[:requests], warm[: batch_size or 1], device)
            res.update(compare(scores, reference[kind[scorer]]))
            res.update({"model": name, "scorer": scorer, "batch_size": batch_size,
                        "fraction_of_peak": res["tflops_achieved"] / args.peak_tflops,
                        "fraction_of_measured_matmul": res["tflops_achieved"] / matmul["tflops"],
                        "tolerance": tolerance[kind[scorer]],
                        "equal_within_tolerance": res["max_abs_diff"] <= tolerance[kind[scorer]]})
            rows.append(res)
            save(complete=False)
            mem = f"{res['peak_gpu_mem_mb']:.0f} MB" if "peak_gpu_mem_mb" in res else f"RSS {res['peak_rss_mb']:.0f} MB"
            print(f"{name:13s} {scorer:25s} batch {batch_size or '-':>3} {res['requests_per_s']:9.2f} req/s  "
                  f"{res['tflops_achieved']:7.2f} TFLOP/s ({res['fraction_of_peak']:.2%} of peak)  {mem}  "
                  f"max|diff| {res['max_abs_diff']:.2e} {'ok' if res['equal_within_tolerance'] else 'OVER TOLERANCE'}", flush=True)
            return res

        for b in sizes:
            for scorer, method in (("ours full-title", "full-title"), ("ours first-token", "first-token")):
                v = Verbalizer(bb, method, b)
                row(scorer, b, lambda ps, v=v: v.score(ps, soft), n)
        plain = row("plain HF loop full-title", None, lambda ps: plain_hf_scores(bb, ps, soft), n_plain)
        mine = [r for r in rows if r["model"] == name]
        fastest = {s: max((r for r in mine if r["scorer"] == s), key=lambda r: r["requests_per_s"])
                   for s in ("ours full-title", "ours first-token")}
        models[name] = {
            "config_source": source, "config": config.to_diff_dict(), "weights_mb": weights_mb,
            "parameters": sum(t.numel() for t in bb.model.parameters()),
            "fastest": {s: {k: r[k] for k in ("batch_size", "requests_per_s", "tflops_achieved", "fraction_of_peak")}
                        for s, r in fastest.items()},
            "ratio_full_title": fastest["ours full-title"]["requests_per_s"] / plain["requests_per_s"],
            "ratio_first_token": fastest["ours first-token"]["requests_per_s"] / plain["requests_per_s"],
            "reference_error": own, "tolerance": tolerance,  # per score kind (full-title, first-token)
            "equal_within_tolerance": all(r["equal_within_tolerance"] for r in mine),
        }
        del bb, soft
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = save(complete=True)
    print()
    print(markdown(result))
    print(f"-> {args.out}")
    if not result["all_equal_within_tolerance"]:
        print("some scores are not within the tolerance of the float32 reference (see max_abs_diff)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
