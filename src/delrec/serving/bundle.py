"""A trained model as one self-contained folder that can be shared, in the Hugging Face conventions:
`delrec export RUN --model NAME OUT/` writes it, `Recommender.from_pretrained(OUT)` (or a Hub
repository id) loads it and ranks exactly as `Recommender.from_run(RUN, NAME)` did.

    OUT/config.json         what the bundle is: the model, its teacher and method, the backbone
                            (a Hub name, or the folder backbone/ when the run's LLM was a local
                            folder), the run's settings, its measured test metrics and the
                            SHA-256 of every other file
    OUT/README.md           the model card: settings and test metrics with their sample counts
    OUT/data/               the item table (items.parquet), protocol.json, stats.json: no samples
    OUT/teachers/<t>/       the teacher: model.safetensors, config.json, metrics.json
    OUT/finetune/<model>/   stage 2: adapter/ (safetensors), soft_prompt.safetensors, what the
                            method trained beside (LLaRA's projector), config.json, metrics.json
    OUT/backbone/           only for a local backbone folder: its safetensors, config, tokenizer

The folder is laid out as a run folder, so the one scorer factory (delrec.serving.scorers) loads
it as it loads a run. No pickle anywhere: weights are safetensors, tables Parquet, the rest JSON,
YAML or text; a file of a pickle-based format is refused, at export and at load. A file that is
missing, altered or not listed is refused at load with its name.
"""

from __future__ import annotations

import importlib.metadata
import shutil
from dataclasses import asdict
from pathlib import Path

from delrec.config import PipelineConfig
from delrec.core.io import atomic_dir, file_sha256, read_json, write_json
from delrec.core.layout import RunLayout
from delrec.core.names import ModelName
from delrec.core.settings import resolve_in_run
from delrec.data.store import RunData

BUNDLE_FORMAT = 1
# file kinds a bundle may hold (none of them can run code when read)
SAFE_SUFFIXES = (".json", ".safetensors", ".parquet", ".md", ".yaml", ".txt", ".model", ".jinja")
STAGE2_FILES = ("config.json", "metrics.json", "soft_prompt.safetensors")


class BundleError(ValueError):
    """A bundle that cannot be trusted or read: missing, altered, unlisted or unsafe files."""


def export_model(run: str | Path, model: str, out: str | Path) -> Path:
    """Write the bundle of `model` (a teacher or a stage-2 model of the run) into `out`, which must
    not exist yet; written in a temporary folder beside it and renamed, so `out` is whole or absent."""
    run, out = Path(run), Path(out)
    if out.exists():
        raise FileExistsError(f"{out} exists; export into a new folder")
    layout, parsed = RunLayout(run), ModelName.parse(model)
    stage2 = layout.stage2(model)
    teacher = model if layout.teacher(model).is_dir() else parsed.teacher
    if not (stage2 / "adapter" / "adapter_config.json").exists() and not (layout.teacher(model) / "model.safetensors").exists():
        raise FileNotFoundError(f"no teacher or stage-2 model {model!r} in {run}: export takes a trained teacher "
                                "or a stage-2 result (RUN/finetune/<name>/)")
    if not (layout.teacher(teacher) / "model.safetensors").exists():
        raise FileNotFoundError(f"{model}'s teacher {teacher!r} is not trained in {run}")
    # the run's own files keep their place in the run's layout
    files = [layout.data / n for n in ("items.parquet", "protocol.json", "stats.json")]
    files += [layout.teacher(teacher) / n for n in ("model.safetensors", "config.json", "metrics.json")]
    backbone, backbone_files = None, []
    if teacher != model:  # a stage-2 model: its folder, and the LLM it runs on
        files += _stage2_files(stage2)
        backbone, backbone_files = _backbone_entry(read_json(stage2 / "config.json")["llm"], run)
    copies = [(p, str(p.relative_to(run))) for p in files] + backbone_files
    with atomic_dir(out) as tmp:
        for src, rel in copies:
            if src.exists():
                _copy_safe(src, tmp / rel)
        manifest = _manifest(run, model, teacher, backbone)
        (tmp / "README.md").write_text(model_card(manifest))
        manifest["files"] = {str(p.relative_to(tmp)): file_sha256(p) for p in sorted(tmp.rglob("*")) if p.is_file()}
        write_json(tmp / "config.json", manifest)
    return out


def _stage2_files(stage2: Path) -> list[Path]:
    files = [stage2 / n for n in STAGE2_FILES]
    files += [p for p in sorted((stage2 / "adapter").iterdir()) if p.is_file()]
    # what a method trained beside the adapter (LLaRA's projector): the folder's other safetensors
    return files + [p for p in sorted(stage2.glob("*.safetensors")) if p.name not in STAGE2_FILES]


def _backbone_entry(llm: str, run: Path) -> tuple[dict, list[tuple[Path, str]]]:
    """The backbone as config.json names it: a Hub or offline name, or a local model folder
    (`w UDPSM`'s stage-1 LLM, a user's own model) copied into backbone/ (its files, where they go)."""
    folder = Path(resolve_in_run(llm, run))
    if not folder.is_dir():
        return {"name": llm}, []
    files = [(p, f"backbone/{p.relative_to(folder)}") for p in sorted(folder.rglob("*")) if p.is_file()]
    return {"folder": "backbone", "trained_from": llm}, files


def _copy_safe(src: Path, dst: Path) -> None:
    if src.suffix not in SAFE_SUFFIXES:
        raise BundleError(f"{src}: a {src.suffix or 'suffix-less'} file is not among the formats a bundle holds "
                          f"({', '.join(SAFE_SUFFIXES)}); pickle-based weights (.bin, .pt) are never exported")
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _manifest(run: Path, model: str, teacher: str, backbone: dict | None) -> dict:
    layout = RunLayout(run)
    try:
        config = asdict(PipelineConfig.from_run(run))
    except FileNotFoundError:  # a run made step by step
        config = None
    evals = {kind or "candidates": read_json(p) for kind in (None, *RunLayout.EVAL_KINDS)
             if (p := layout.pipeline_eval(model, kind)).exists()}
    metrics = {}
    if "candidates" in evals:
        metrics["candidates"] = {"num_samples": evals["candidates"]["num_samples"], **evals["candidates"]["candidates"]}
    if "full-catalogue" in evals:
        f = evals["full-catalogue"]
        metrics["full_catalogue"] = {"num_samples": f["num_samples"], "retriever": f["retriever"], "retrieve": f["retrieve"],
                                     "two_stage": f["two_stage"], **f["full_ranking"]}
    stage2 = layout.stage2(model) / "config.json"
    return {"model_type": "delrec", "bundle_format": BUNDLE_FORMAT, "delrec_version": importlib.metadata.version("delrec"), "model": model,
            "teacher": teacher, "method": ModelName.parse(model).method if stage2.exists() else None,
            "backbone": backbone, "num_users": read_json(layout.teacher(teacher) / "config.json")["num_users"],
            "dataset": (config or {}).get("dataset"), "run_config": config,
            "stage2": read_json(stage2) if stage2.exists() else None, "test_metrics": metrics}


def model_card(manifest: dict) -> str:
    """README.md: the Hub's model card, with the settings and the measured test metrics."""
    m, backbone = manifest, manifest["backbone"] or {}
    base = backbone.get("name")
    front = ["---", "library_name: delrec", "pipeline_tag: text-ranking",
             f"tags: [recommendation, sequential-recommendation, delrec{', ' + m['method'] if m['method'] else ''}]"]
    front += [f"base_model: {base}"] if base and "/" in base else []
    front += [f"datasets: [{m['dataset']}]"] if m["dataset"] else []
    L = [*front, "---", "", f"# {m['model']}" + (f" on {m['dataset']}" if m["dataset"] else ""), "",
         f"A model trained and exported by delrec {m['delrec_version']} (`delrec export`). Teacher: {m['teacher']}; "
         f"method: {m['method'] or 'the teacher alone'}; backbone: {base or backbone.get('trained_from') or 'none'}"
         + (" (its weights in backbone/)" if backbone.get("folder") else "") + ".", "",
         "```python", "from delrec import Recommender", "", 'rec = Recommender.from_pretrained("path/or/hub-id")',
         'print(rec.rank(["Toy Story (1995)"], k=5).items)', "```", "", "## Test metrics (as measured by `delrec run`)", ""]
    metrics = m["test_metrics"]
    if not metrics:
        L.append("Not evaluated by `delrec run` in the run it came from.")
    for kind, label in (("candidates", "the target among the 15 fixed candidates"),
                        ("full_catalogue", "over the whole catalogue")):
        if kind in metrics:
            v = metrics[kind]
            how = f" (two-stage: {v['retriever']} retrieves {v['retrieve']})" if v.get("two_stage") else ""
            L += [f"- {label}{how}, {v['num_samples']} test samples: " +
                  ", ".join(f"{k} {v[k]:.4f}" for k in ("HR@1", "HR@5", "HR@10", "NDCG@5", "NDCG@10"))]
    if m["stage2"]:
        s = m["stage2"]
        keys = [k for k in ("adapter", "lora_r", "optimizer", "lr", "lr_schedule", "steps", "batch_size", "distill_weight",
                            "train_negatives", "soft_tokens", "seed") if k in s]
        L += ["", "## Stage-2 settings", "", *(f"- {k}: {s[k]}" for k in keys)]
    return "\n".join(L + ["", "All settings: `config.json` (`run_config`, `stage2`); every file's SHA-256: `files`.", ""])


def load_bundle(path: str | Path) -> tuple[Path, dict]:
    """(the bundle's folder, its config.json), after checking every file: each listed file present
    with its SHA-256, nothing unlisted, nothing of a pickle-based format."""
    root = Path(path)
    if not (root / "config.json").exists():
        raise BundleError(f"{root} is not a delrec bundle (no config.json); make one with `delrec export`")
    manifest = read_json(root / "config.json")
    if manifest.get("model_type") != "delrec" or "files" not in manifest:
        raise BundleError(f"{root / 'config.json'} is not a delrec bundle's (model_type {manifest.get('model_type')!r})")
    if manifest.get("bundle_format", 0) > BUNDLE_FORMAT:
        raise BundleError(f"{root} is bundle format {manifest['bundle_format']}; this delrec reads up to {BUNDLE_FORMAT}")
    for rel, digest in manifest["files"].items():
        p = root / rel
        if not p.is_file():
            raise BundleError(f"{root}: {rel} is missing (the bundle lists it)")
        if file_sha256(p) != digest:
            raise BundleError(f"{root}: {rel} was altered (its SHA-256 differs from the one config.json lists)")
    on_disk = {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and not _hub_metadata(p.relative_to(root))}
    extra = sorted(on_disk - set(manifest["files"]) - {"config.json"})
    if extra:
        raise BundleError(f"{root}: files the bundle does not list: {', '.join(extra[:5])}")
    return root, manifest


def bundle_data(root: Path, manifest: dict) -> RunData:
    return RunData.catalogue_only(RunLayout(root).data, manifest["num_users"])


def fetch_bundle(repo_id: str, revision: str | None = None) -> Path:
    """A bundle from the Hugging Face Hub (huggingface_hub's cache), for users with internet."""
    try:
        from huggingface_hub import snapshot_download
    except ImportError as e:  # pragma: no cover - transformers depends on it
        raise BundleError("loading from the Hub needs huggingface_hub (pip install huggingface_hub)") from e
    return Path(snapshot_download(repo_id, revision=revision))


def _hub_metadata(rel: Path) -> bool:
    """Files git or the Hub add beside a bundle's own (.gitattributes, .cache/)."""
    return rel.parts[0].startswith(".")
