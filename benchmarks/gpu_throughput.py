"""Verbalizer throughput on a GPU with randomly initialised backbones of real shapes.

    python benchmarks/gpu_throughput.py                       # CUDA, bf16, Flan-T5-XL and SmolLM2-135M shapes
    python benchmarks/gpu_throughput.py --device cpu --tiny --dtype float32 --out /tmp/gpu_tiny.json   # smoke test

No weights and no tokenizer can travel to the GPU machine, so each backbone is built from its
config with random weights (the speed of a forward pass does not depend on the weights' values)
and a synthetic word-level tokenizer over "w0" .. "w{V-4}" (plus <pad>, </s>, <unk>) gives every
text exactly the wanted number of tokens:

* Flan-T5-XL shape: d_model 2048, d_ff 5120 (gated-gelu), 24 + 24 layers, 32 heads, vocab 32128;
* SmolLM2-135M shape: the config.json of the converted model when present here, else
  hidden 576, intermediate 1536, 30 layers, 9 heads (3 KV), vocab 49152, tied embeddings.

Workload per request (the issue's): `--prompt-tokens` (320) text tokens around `--soft-tokens`
(80) soft-prompt vectors, and `--candidates` (15) titles of `--title-tokens` (12) tokens
(11 words + EOS); requests are scored `--batch-size` (8) at a time.

Measured per backbone: requests/s and peak GPU memory (torch.cuda.max_memory_allocated, reset
before each measurement) of
* `Verbalizer.score`, full-title and first-token (ours);
* a plain Hugging Face loop, full-title: per request one forward pass over a batch of the 15
  (prompt + candidate) sequences, logits kept for the candidate positions only;
and the max |score difference| between ours and the plain loop (float32: must be <= 1e-4; bf16:
for information). One warm-up batch, not among the timed requests, precedes each measurement.

Writes $OUT/gpu_throughput.json when $OUT is set, else benchmarks/results/gpu_throughput.json
(`--out` overrides; with `--tiny` the default is /tmp/gpu_throughput_tiny.json, never the results
folder). Without CUDA, and unless `--device cpu`, prints "no GPU available" and exits 0.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

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


def plain_hf_scores(bb, prompts, soft) -> list:
    """The plain Hugging Face reference: per request, one forward pass over a batch of its
    candidates, each the whole (prompt + title) sequence; mean log-probability of the title's
    tokens (EOS included), as the verbalizer's full-title score."""
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
            logp = F.log_softmax(logits.float(), -1).gather(2, y[..., None])[..., 0]
            out.append(logp.mean(1).cpu())
    return out


def measure(fn, prompts, warm, batch_size: int, device) -> dict:
    import torch

    cuda = device.type == "cuda"
    fn(warm)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    scores = []
    for i in range(0, len(prompts), batch_size):
        scores += fn(prompts[i : i + batch_size])
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    res = {"seconds": seconds, "requests_per_s": len(prompts) / seconds}
    if cuda:
        res["peak_gpu_mem_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return res, torch.stack(scores).float()


def markdown(result: dict) -> str:
    s = result["settings"]
    mem = "peak GPU MB" if s["device"] == "cuda" else "peak RSS MB (process)"
    out = [f"| backbone | scorer | requests/s | seconds ({s['requests']} requests) | {mem} |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        m = r.get("peak_gpu_mem_mb", r.get("peak_rss_mb"))
        out.append(f"| {r['model']} | {r['scorer']} | {r['requests_per_s']:.2f} | {r['seconds']:.2f} | {m:.0f} |")
    out.append("")
    for name, m in result["models"].items():
        out.append(f"{name}: ours (full-title) / plain HF loop = **{m['ratio_full_title']:.1f}x**; "
                   f"max |ours - plain HF| = {m['max_abs_diff']:.2e} in {s['dtype']}; weights {m['weights_mb']:.0f} MB.")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS + LARGE[1:])
    p.add_argument("--tiny", action="store_true", help="shrunk shapes and workload, for a CPU smoke test")
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--requests", type=int, default=None, help="timed requests (default 64; 16 with --tiny)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=None, help="default 320; 64 with --tiny")
    p.add_argument("--soft-tokens", type=int, default=None, help="default 80; 16 with --tiny")
    p.add_argument("--candidates", type=int, default=15)
    p.add_argument("--title-tokens", type=int, default=12)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    import torch

    from delrec.llm.backbone import pick_dtype
    from delrec.llm.soft_prompt import SoftPrompt
    from delrec.llm.verbalizer import Verbalizer

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("no GPU available")
        return
    if args.out is None:
        if args.tiny:
            args.out = "/tmp/gpu_throughput_tiny.json"
        elif os.environ.get("OUT"):
            args.out = str(Path(os.environ["OUT"]) / "gpu_throughput.json")
        else:
            args.out = str(ROOT / "benchmarks" / "results" / "gpu_throughput.json")
    n = args.requests or (16 if args.tiny else 64)
    P = args.prompt_tokens or (64 if args.tiny else 320)
    S = args.soft_tokens or (16 if args.tiny else 80)
    dtype = pick_dtype(device, args.dtype)

    rows, models = [], {}
    for name in args.models:
        bb, config, source = build_backbone(name, args.tiny, device, dtype)
        weights_mb = sum(t.numel() * t.element_size() for t in bb.model.state_dict().values()) / 2**20
        soft = SoftPrompt.for_backbone(bb, S, seed=0)
        prompts = make_requests(bb, n + args.batch_size, P, S, args.candidates, args.title_tokens, soft, seed=1)
        timed, warm = prompts[:n], prompts[n:]
        scores = {}
        for scorer, fn in (
            ("ours full-title", lambda ps, v=Verbalizer(bb, "full-title", args.batch_size): v.score(ps, soft)),
            ("ours first-token", lambda ps, v=Verbalizer(bb, "first-token", args.batch_size): v.score(ps, soft)),
            ("plain HF loop full-title", lambda ps: plain_hf_scores(bb, ps, soft)),
        ):
            res, scores[scorer] = measure(fn, timed, warm, args.batch_size, device)
            if device.type != "cuda":
                res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
            rows.append({"model": name, "scorer": scorer, **res})
            print(f"{name:13s} {scorer:25s} {res['requests_per_s']:8.2f} req/s  {res['seconds']:.2f} s"
                  + (f"  {res['peak_gpu_mem_mb']:.0f} MB" if "peak_gpu_mem_mb" in res else ""), flush=True)
        diff = float((scores["ours full-title"] - scores["plain HF loop full-title"]).abs().max())
        by = {r["scorer"]: r for r in rows if r["model"] == name}
        models[name] = {
            "config_source": source, "config": config.to_diff_dict(), "weights_mb": weights_mb,
            "parameters": sum(t.numel() for t in bb.model.parameters()),
            "ratio_full_title": by["ours full-title"]["requests_per_s"] / by["plain HF loop full-title"]["requests_per_s"],
            "ratio_first_token": by["ours first-token"]["requests_per_s"] / by["plain HF loop full-title"]["requests_per_s"],
            "max_abs_diff": diff,
            "equal_within_tolerance": diff <= TOLERANCE if dtype == torch.float32 else None,
        }
        del bb, soft
        if device.type == "cuda":
            torch.cuda.empty_cache()

    result = {
        "environment": environment(),
        "settings": {"device": device.type, "dtype": str(dtype).removeprefix("torch."), "tiny": args.tiny,
                     "requests": n, "batch_size": args.batch_size, "prompt_tokens": P, "soft_tokens": S,
                     "candidates": args.candidates, "title_tokens": args.title_tokens,
                     "weights": "random (seed 0); synthetic word-level tokenizer",
                     "warmup": "one batch of batch_size requests, not among the timed ones, before each scorer"},
        "rows": rows,
        "models": models,
    }
    from delrec.io import write_json

    write_json(args.out, result)
    print()
    print(markdown(result))
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
