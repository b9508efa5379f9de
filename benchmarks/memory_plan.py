"""Expected GPU memory per process for the paper setting: stage 1 and stage 2, DDP and FSDP, with and
without gradient checkpointing. Computed, not measured (measure with benchmarks/stages.py on a GPU).

    python benchmarks/memory_plan.py                 # Flan-T5-XL and a 7B Llama-shaped decoder
    python benchmarks/memory_plan.py --batch-size 4 --gpus 1 2 4 8

Exact parts (parameter counts from the real model classes built on the meta device, peft's
AdaLoRA on q/v with init_r 12 counted the same way):
* frozen backbone weights in bf16 (2 bytes/parameter); under FSDP (delrec's FSDP2 sharding, see
  docs/distributed.md) each process keeps 1/N of them, plus the root unit (embeddings, head,
  final norms) gathered for the whole step and two gathered blocks (the one running and the one
  prefetched);
* trainable tensors in fp32 (4 bytes) with their gradient and Lion's one momentum buffer; AdaLoRA
  keeps three more fp32 tensors per adapter weight (importance, its average, its uncertainty).
  delrec keeps them whole on every process under FSDP too.
Estimated part, activations kept for the backward pass in bf16, per layer and sequence of s tokens
with hidden size h and a heads: s*h*34 + 5*a*s^2 bytes (Korthikanti et al., 2022, "Reducing
activation recomputation in large transformer models", Eq. 1 without tensor parallelism; it counts
dropout masks, which a frozen stage 1 does not have, so it errs high). With checkpointing each
layer keeps only its input (2*s*h bytes) and one layer is recomputed at a time. Two corrections
from measuring on an H100 (benchmarks/gpu_memory.py, docs/distributed.md): decoder-only models
run SDPA's fused kernels, which keep no s^2 attention maps, so the 5*a*s^2 term is dropped for them
(T5's position bias keeps it); and in stage 2 peft casts the input of every adapted projection to
the adapters' fp32 and autograd keeps two fp32 copies of it (seen with saved-tensor hooks), 8 bytes
per token and hidden unit per adapted projection and layer. Workload as the
paper's prompts: `--prompt-tokens` text + `--soft-tokens` soft tokens, 15 candidates of
`--title-tokens` tokens. T5 (our verbalizer): the encoder runs once per prompt, and the decoder
once per prompt over its 15 titles packed into one row (15 * title tokens) with cross-attention
over the prompt; decoder-only: candidates packed behind the prompt (one sequence of prompt + 15 *
(title - 1) tokens). Log-probabilities over the vocabulary
for every scored token are added in fp32. CUDA context and allocator slack are not included
(add about 1-2 GB).

Writes benchmarks/results/memory-plan.json ($OUT/memory-plan.json when $OUT is set).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from delrec.core.io import write_json

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _env import environment  # noqa: E402

GB = 1e9
CANDIDATES = 15


def build(name: str):
    """(model on the meta device, shape summary) for the two large backbones of the plan, with the
    configs that gpu_memory.py measures (gpu_throughput.model_config)."""
    import torch

    from gpu_throughput import model_config

    cls, cfg, _ = model_config(name, tiny=False)
    with torch.device("meta"):
        model = cls(cfg)
    if cfg.model_type == "t5":
        shape = dict(h=cfg.d_model, heads=cfg.num_heads, enc_layers=cfg.num_layers, dec_layers=cfg.num_decoder_layers)
    else:
        shape = dict(h=cfg.hidden_size, heads=cfg.num_attention_heads, enc_layers=0, dec_layers=cfg.num_hidden_layers)
    return model, {**shape, "vocab": cfg.vocab_size}


def adalora_params(model, init_r: int) -> int:
    """Trainable parameters peft's AdaLoRA adds on the q and v projections."""
    import torch
    from peft import AdaLoraConfig, get_peft_model

    targets = ["q", "v"] if model.config.model_type == "t5" else ["q_proj", "v_proj"]
    task = "SEQ_2_SEQ_LM" if model.config.model_type == "t5" else "CAUSAL_LM"
    with torch.device("meta"):
        peft_model = get_peft_model(model, AdaLoraConfig(init_r=init_r, target_r=8, target_modules=targets,
                                                         total_step=100, task_type=task))
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad)


def activations(shape: dict, batch: int, prompt: int, title: int, checkpointing: bool, adapters: bool = False) -> float:
    """Bytes of activations kept for backward (see the module docstring); `adapters`: stage 2's
    fp32 copies of the adapted q/v projections' inputs."""
    h, a = shape["h"], shape["heads"]
    fused = not shape["enc_layers"]  # decoder-only: SDPA keeps no attention maps

    def layer(s):  # one layer, one sequence
        return s * h * 34 + (0 if fused else 5 * a * s * s)

    def kept(s, layers):
        return layers * 2 * s * h if checkpointing else layers * layer(s)

    copies = 0 if checkpointing or not adapters else 2 * 4 * h  # bytes per token per adapted projection
    if shape["enc_layers"]:  # T5: encoder once per prompt; the 15 titles packed into one decoder row
        dec = CANDIDATES * title
        enc_total = batch * kept(prompt, shape["enc_layers"])
        cross = 2 * prompt * h * 2 + 5 * a * dec * prompt  # K, V of the prompt and the attention maps, per layer
        dec_one = layer(dec) + cross
        # checkpointed: each layer's input, plus the encoder output the decoder attends to
        dec_total = batch * (shape["dec_layers"] * 2 * dec * h + 2 * prompt * h if checkpointing
                             else shape["dec_layers"] * dec_one)
        recompute = max(batch * layer(prompt), batch * dec_one) if checkpointing else 0
        scored = batch * dec
        # adapted: encoder q, v (prompt tokens); decoder self q, v and cross q (title tokens); cross v
        # (the prompt's encoder output)
        adapted = copies * batch * (shape["enc_layers"] * 2 * prompt + shape["dec_layers"] * (3 * dec + prompt))
        return enc_total + dec_total + recompute + scored * shape["vocab"] * 4 + adapted
    seq = prompt + CANDIDATES * (title - 1)
    recompute = batch * layer(seq) if checkpointing else 0
    scored = batch * (CANDIDATES * (title - 1) + 1)
    adapted = copies * batch * shape["dec_layers"] * 2 * seq
    return batch * kept(seq, shape["dec_layers"]) + recompute + scored * shape["vocab"] * 4 + adapted


def plan(args) -> list[dict]:
    rows = []
    for name in args.models:
        model, shape = build(name)
        total = sum(p.numel() for p in model.parameters())
        blocks = [sum(p.numel() for p in block.parameters())
                  for block in model.modules() if type(block).__name__ in ("T5Block", "LlamaDecoderLayer")]
        layer_params, root_params = max(blocks), total - sum(blocks)
        adapter = adalora_params(model, args.init_r)
        prompt = args.prompt_tokens + args.soft_tokens
        for stage, trainable, extra_states in (("stage 1 (soft prompt)", args.soft_tokens * shape["h"], 0),
                                               ("stage 2 (AdaLoRA)", adapter, 3)):
            adapters = stage.startswith("stage 2")
            states = trainable * 4 * (3 + extra_states)  # weight, grad, Lion momentum (+ AdaLoRA's three)
            for ckpt in (False, True):
                for n in args.gpus:
                    per_process_batch = max(1, args.batch_size // n)
                    act_n = activations(shape, per_process_batch, prompt, args.title_tokens, ckpt, adapters)
                    for strategy in ("DDP", "FSDP") if n > 1 else ("DDP",):
                        if strategy == "DDP":
                            weights, st = total * 2, states
                        else:
                            weights, st = (total - root_params) * 2 / n + (root_params + 2 * layer_params) * 2, states
                        rows.append({"model": name, "stage": stage, "gradient_checkpointing": ckpt, "gpus": n,
                                     "strategy": strategy, "per_process_batch": per_process_batch,
                                     "parameters": total, "trainable": trainable,
                                     "weights_gb": round(weights / GB, 2), "trainable_states_gb": round(st / GB, 3),
                                     "activations_gb": round(act_n / GB, 2),
                                     "total_gb": round((weights + st + act_n) / GB, 1)})
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["flan-t5-xl", "llama-7b"])
    p.add_argument("--batch-size", type=int, default=8, help="global prompts per optimizer step")
    p.add_argument("--prompt-tokens", type=int, default=320)
    p.add_argument("--soft-tokens", type=int, default=100)
    p.add_argument("--title-tokens", type=int, default=12)
    p.add_argument("--init-r", type=int, default=12)
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 8])
    p.add_argument("--out", default=None)
    args = p.parse_args()
    rows = plan(args)
    print(f"expected memory per GPU (GB), global batch {args.batch_size}, prompt {args.prompt_tokens} + "
          f"{args.soft_tokens} soft tokens, {CANDIDATES} candidates of {args.title_tokens} tokens; "
          "weights and states exact, activations estimated")
    print("| model | stage | checkpointing | GPUs | strategy | batch/GPU | weights | trainable states | activations | total |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['stage']} | {'yes' if r['gradient_checkpointing'] else 'no'} | {r['gpus']} | "
              f"{r['strategy']} | {r['per_process_batch']} | {r['weights_gb']:.2f} | {r['trainable_states_gb']:.3f} | "
              f"{r['activations_gb']:.2f} | {r['total_gb']:.1f} |")
    out = args.out or (Path(os.environ["OUT"]) / "memory-plan.json" if os.environ.get("OUT")
                       else ROOT / "benchmarks" / "results" / "memory-plan.json")
    write_json(out, {"benchmark": "memory plan (computed)", "environment": environment(),
                        "settings": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows})
    print(f"-> {out}")


if __name__ == "__main__":
    main()
