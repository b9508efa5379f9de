"""`delrec export` and `Recommender.from_pretrained` (delrec.serving.bundle): a trained model as one
folder that ranks exactly as it did in its run, and refuses to load when a file is missing,
altered, unlisted or of a pickle-based format."""

import json
import shutil

import pytest

from conftest import write_pipeline_inputs
from delrec.cli import main
from delrec.serving.bundle import BundleError, export_model, load_bundle
from delrec.serving.recommender import Recommender
from llm_helpers import tiny_llama_backbone

REQUESTS = [
    {"history": ["i3", "i4", "i5"], "candidates": ["i6", "i7", "i1", "i20", "i33"], "k": 5},
    {"history": ["Movie 10 (2000)", "i11"], "k": 6},  # no candidates: the teacher's top list
    {"history": ["i30"], "candidates": ["i31", "i2", "i9"], "k": 3},
    {"history": [f"i{i}" for i in range(12, 26)], "k": 4},  # longer than the model reads
]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bundle")
    config = write_pipeline_inputs(root, tiny_llama_backbone(), num_users=40, num_items=40, length=16)
    run = root / "run"
    assert main(["run", "--config", str(config), "--quiet", f"run_dir={run}", "teacher.max_epochs=2", "threads=1",
                 "distill={soft_tokens: 4, steps: 2, batch_size: 2, valid_samples: 4, eval_every: 1000}",
                 "finetune={steps: 2, batch_size: 2, valid_samples: 4, eval_every: 1000}", "methods=[delrec, teacher-list]",
                 "zero_shot=false", "test_samples=8", "eval_batch_size=4"]) == 0
    return run


def _rankings(rec):
    return [[(i.item, i.title, i.score) for i in r.items] + [r.candidates_from] for r in rec.rank_many(REQUESTS)]


@pytest.mark.parametrize("model", ["sasrec-delrec", "sasrec-teacher-list", "sasrec"])
def test_an_exported_model_ranks_as_it_did_in_its_run(run, tmp_path, model):
    out = export_model(run, model, tmp_path / "bundle")
    loaded = Recommender.from_pretrained(out, dtype="float32", device="cpu")
    original = Recommender.from_run(run, model=model, dtype="float32", device="cpu")
    assert _rankings(loaded) == _rankings(original)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert not [p for p in files if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]  # no pickle anywhere
    assert not any(p.read_bytes()[:2] == b"\x80\x04" for p in files)  # (nor pickle's header under another name)
    manifest = json.loads((out / "config.json").read_text())
    assert manifest["model"] == model and manifest["teacher"] == "sasrec"
    card = (out / "README.md").read_text()
    metrics = json.loads((run / "eval" / "pipeline" / f"{model}.json").read_text())["candidates"]
    assert f"8 test samples: HR@1 {metrics['HR@1']:.4f}" in card and card.startswith("---\nlibrary_name: delrec")
    if model != "sasrec":  # the local backbone travels with the model; the data's samples do not
        assert (out / "backbone" / "config.json").exists() and (out / "finetune" / model / "adapter").is_dir()
    assert not (out / "data" / "samples.parquet").exists() and not (out / "finetune" / model / "checkpoint.pt").exists()


def test_a_bundle_with_a_missing_altered_or_extra_file_is_refused(run, tmp_path):
    good = export_model(run, "sasrec-delrec", tmp_path / "good")
    cases = {"missing": lambda b: (b / "finetune" / "sasrec-delrec" / "soft_prompt.safetensors").unlink(),
             "altered": lambda b: _flip_a_byte(b / "finetune" / "sasrec-delrec" / "adapter" / "adapter_model.safetensors"),
             "does not list": lambda b: (b / "teachers" / "sasrec" / "extra.pt").write_bytes(b"\x80\x04not weights")}
    for expected, damage in cases.items():
        bad = tmp_path / expected.replace(" ", "-")
        shutil.copytree(good, bad)
        damage(bad)
        with pytest.raises(BundleError, match=expected):
            Recommender.from_pretrained(bad, dtype="float32", device="cpu")
    with pytest.raises(BundleError, match="not a delrec bundle"):
        load_bundle(run)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleError, match="no config.json"):
        load_bundle(tmp_path / "empty")


def test_export_refuses_what_it_cannot_write(run, tmp_path, capsys):
    with pytest.raises(FileExistsError):
        export_model(run, "sasrec", tmp_path)
    with pytest.raises(FileNotFoundError, match="no teacher or stage-2 model 'caser-delrec'"):
        export_model(run, "caser-delrec", tmp_path / "x")
    assert not (tmp_path / "x").exists() and not list(tmp_path.glob(".x.*"))  # nothing half-written
    assert main(["export", str(run), "--model", "sasrec-delrec", str(tmp_path / "cli")]) == 0
    assert "from_pretrained" in capsys.readouterr().out and (tmp_path / "cli" / "config.json").exists()
    assert main(["export", str(run), "--model", "sasrec-delrec", str(tmp_path / "cli")]) == 2  # exists: a clear error


def _flip_a_byte(path):
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
