"""Settings are checked when they are read, before any step runs (src/delrec/core/settings.py)."""

import time
from dataclasses import dataclass, field

import pytest

from delrec.cli import main
from delrec.config import PipelineConfig
from delrec.core.settings import check, identity, in_run, parse_overrides, resolve_in_run, runtime, same_identity
from delrec.pipeline import Pipeline
from delrec.training.config import DistillConfig, FinetuneConfig


@dataclass
class Example:
    steps: int = 3
    lr: float = 1e-3
    name: str = "a"
    limit: int | None = None
    tasks: tuple[str, ...] = ("ta", "rps")
    flag: bool = False
    extra: dict = field(default_factory=dict)
    device: str = runtime("auto")


def test_check_coerces_what_is_meant_and_names_what_is_wrong():
    assert check(Example, {"steps": 1e3, "lr": 1, "tasks": ["rps"], "limit": None}, "x") == \
        {"steps": 1000, "lr": 1.0, "tasks": ("rps",), "limit": None}
    with pytest.raises(ValueError, match=r"cfg.yaml: finetune: unknown setting 'stepz' \(did you mean 'steps'\?\)"):
        check(Example, {"stepz": 3}, "cfg.yaml: finetune")
    with pytest.raises(ValueError, match="steps: expected an integer, got 'ten'"):
        check(Example, {"steps": "ten"}, "x")
    with pytest.raises(ValueError, match="steps: expected an integer, got 2.5"):
        check(Example, {"steps": 2.5}, "x")
    with pytest.raises(ValueError, match="flag: expected true or false, got 1"):
        check(Example, {"flag": 1}, "x")
    with pytest.raises(ValueError, match="lr: expected a number, got True"):
        check(Example, {"lr": True}, "x")
    with pytest.raises(ValueError, match="limit: expected an integer or null"):
        check(Example, {"limit": "all"}, "x")
    with pytest.raises(ValueError, match="expected a mapping"):
        check(Example, [1, 2], "x")


def test_runtime_settings_do_not_identify_results():
    a, b = Example(device="cuda"), Example(device="cpu")
    assert identity(a) == identity(b) and "device" not in identity(a)
    assert same_identity(Example, {"steps": 3, "device": "cuda"}, {"steps": 3, "device": "cpu"})
    assert not same_identity(Example, {"steps": 3}, {"steps": 4})
    # a setting added later counts as equal when the wanted value is its default
    assert same_identity(Example, {"steps": 3}, {"steps": 3, "flag": False})
    assert not same_identity(Example, {"steps": 3}, {"steps": 3, "flag": True})
    for cls in (DistillConfig, FinetuneConfig):
        assert same_identity(cls, identity(cls(device="cpu", verbalizer_batch=2, checkpoint_every=1)),
                             identity(cls(device="cuda", verbalizer_batch=16, gradient_checkpointing=True)))


def test_overrides_are_yaml_everywhere():
    assert parse_overrides(["finetune.lr=1e-4", "tasks=[rps]", "flag=true", "limit=null", "name=x"]) == \
        {"finetune": {"lr": 1e-4}, "tasks": ["rps"], "flag": True, "limit": None, "name": "x"}
    with pytest.raises(ValueError, match="key=value"):
        parse_overrides(["steps"])


def _config(tmp_path, text: str):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return path


def test_pipeline_config_is_checked_before_any_step(tmp_path, monkeypatch):
    ran = []
    monkeypatch.setattr(Pipeline, "data", lambda self: ran.append("data"))
    base = f"run_dir: {tmp_path / 'run'}\n"
    cases = {
        "finetune:\n  stepz: 3\n": r"c.yaml: finetune: unknown setting 'stepz' \(did you mean 'steps'\?\)",
        "finetune:\n  steps: ten\n": "c.yaml: finetune: steps: expected an integer, got 'ten'",
        "distill:\n  lr_schedule: step\n": "c.yaml: distill: unknown lr_schedule 'step'",
        "teacher:\n  dropuot: 0.1\n": "did you mean 'dropout'",
        "teachers: [sasrek]\n": "unknown teacher 'sasrek'",
        "protocol: {name: paper, max_histroy: 5}\n": "did you mean 'max_history'",
        "test_sample: 10\n": r"unknown setting 'test_sample' \(did you mean 'test_samples'\?\)",
        "distill:\n  top_h: 20\n": r"distill.top_h \(20\) is more than the top_h lists the teachers store \(10\)",
        "finetune:\n  steps: [3\n": r"c.yaml: not valid YAML at line \d+, column \d+: .*flow sequence at line 3\)",
        "- 1\n- 2\n": "a config is a mapping",
    }
    for text, message in cases.items():
        path = _config(tmp_path, base + text if not text.startswith("-") else text)
        with pytest.raises(ValueError, match=message):
            PipelineConfig.from_file(path)
        t0 = time.perf_counter()
        assert main(["run", "--config", str(path), "--quiet"]) == 2
        assert time.perf_counter() - t0 < 10
    with pytest.raises(ValueError, match="finetune: unknown setting 'stepz'"):
        PipelineConfig.from_file(_config(tmp_path, base), ["finetune.stepz=3"])
    assert ran == []


def test_cli_set_is_checked(tmp_path, capsys):
    assert main(["finetune", "--run", str(tmp_path), "--set", "stepz=3"]) == 2
    assert "--set: unknown setting 'stepz' (did you mean 'steps'?)" in capsys.readouterr().err
    assert main(["distill", "--run", str(tmp_path), "--set", "lr=fast"]) == 2
    assert "--set: lr: expected a number, got 'fast'" in capsys.readouterr().err


def test_method_teachers_limit_the_llm_methods_to_those_teachers():
    """Table II: GRU4Rec and Caser are rows of their own beside DELRec(SASRec) and the baselines,
    without stage 1 or stage 2 runs of their own."""
    config = PipelineConfig(teachers=["sasrec", "gru4rec", "caser"], method_teachers=["sasrec"], methods=["delrec", "wo-sp", "llmseqsim"])
    names = [name for name, _ in config.models()]
    assert names == ["random", "popularity", "sasrec", "gru4rec", "caser", "zero-shot", "sasrec-delrec", "sasrec-wo-sp", "sasrec-llmseqsim"]
    assert [(t, v) for t, v, _ in Pipeline(config, progress=False)._finetune_jobs()] == [("sasrec", "delrec"), ("sasrec", "wo-sp")]
    assert PipelineConfig(teachers=["sasrec", "gru4rec"], methods=["delrec"]).llm_teachers == ["sasrec", "gru4rec"]  # default: all
    with pytest.raises(ValueError, match=r"method_teachers: \['caser'\] are not among the teachers \['sasrec'\]"):
        PipelineConfig(teachers=["sasrec"], method_teachers=["caser"])


def test_the_words_of_earlier_configs_are_still_read(tmp_path):
    """A method was called a variant: `variants:` / `variant_teachers:` in a run config and
    `variant` in a stage-2 folder's config.json still mean `methods:`, `method_teachers:` and
    `method`, so earlier configs run and earlier stage-2 results are not redone."""
    old = tmp_path / "old.yaml"
    old.write_text("teachers: [sasrec, gru4rec]\nvariants: [delrec, wo-sp]\nvariant_teachers: [sasrec]\n")
    config = PipelineConfig.from_file(old)
    assert config.methods == ["delrec", "wo-sp"] and config.method_teachers == ["sasrec"]
    assert PipelineConfig.from_file(old, ["variants=[usp]"]).methods == ["usp"]  # an override in the old words wins
    assert PipelineConfig.from_file(old, ["methods=[mcp]"]).methods == ["mcp"]
    recorded = {**FinetuneConfig(method="wo-sp").to_dict()}
    recorded["variant"] = recorded.pop("method")
    assert same_identity(FinetuneConfig, recorded, FinetuneConfig(method="wo-sp").to_dict())
    assert not same_identity(FinetuneConfig, recorded, FinetuneConfig(method="usp").to_dict())
    assert FinetuneConfig.method_of(recorded) == "wo-sp"


def test_a_methods_own_options_are_checked_against_its_class(tmp_path):
    """LLaRA's settings are its options (methods/llara.py: LLaRAOptions), given per method in a
    run config; the flat `finetune:` keys of earlier configs and stage-2 folders still mean them."""
    config = PipelineConfig(methods=["delrec", "llara"], method_options={"llara": {"curriculum": "none"}})
    assert config.method_options == {"llara": {"curriculum": "none", "projector_lr_scale": 0.25}}
    with pytest.raises(ValueError, match="method_options: method 'delrec' has no options of its own"):
        PipelineConfig(method_options={"delrec": {"curriculum": "none"}})
    with pytest.raises(ValueError, match=r"unknown setting 'curiculum' \(did you mean 'curriculum'\?\)"):
        PipelineConfig(method_options={"llara": {"curiculum": "none"}})
    old = tmp_path / "old.yaml"
    old.write_text("methods: [llara]\nfinetune: {curriculum: none, steps: 3}\n")
    upgraded = PipelineConfig.from_file(old)
    assert upgraded.finetune == {"steps": 3} and upgraded.method_options["llara"]["curriculum"] == "none"
    recorded = FinetuneConfig(method="llara", options={"curriculum": "none"}).to_dict()
    recorded.update(recorded.pop("options"))  # as an earlier stage-2 folder recorded them
    assert same_identity(FinetuneConfig, recorded, FinetuneConfig(method="llara", options={"curriculum": "none"}).to_dict())
    assert not same_identity(FinetuneConfig, recorded, FinetuneConfig(method="llara").to_dict())


def test_stage1_outputs_are_named_by_their_place_in_the_run(tmp_path):
    # a path to a stage-1 output of any run folder, and nothing else, is named from RUN/ on
    assert in_run("runs/a/distill/sasrec/soft_prompt.safetensors") == "RUN/distill/sasrec/soft_prompt.safetensors"
    assert in_run("/abs/runs/b/distill/sasrec-udpsm/llm") == "RUN/distill/sasrec-udpsm/llm"
    for other in ("smollm2-135m", "google/flan-t5-xl", "models/distill/x/config.json", None, 3):
        assert in_run(other) == other
    recorded = {"llm": "runs/a/distill/sasrec-udpsm/llm", "soft_prompt": "runs/a/distill/sasrec-udpsm/soft_prompt.safetensors"}
    moved = {"llm": "runs/b/distill/sasrec-udpsm/llm", "soft_prompt": "runs/b/distill/sasrec-udpsm/soft_prompt.safetensors"}
    assert same_identity(FinetuneConfig, recorded, moved)
    assert not same_identity(FinetuneConfig, recorded, {**moved, "soft_prompt": "runs/b/distill/gru4rec/soft_prompt.safetensors"})
    # found in the folder the run is in now, where the recorded place is gone
    (tmp_path / "distill" / "x" / "llm").mkdir(parents=True)
    assert resolve_in_run("gone/distill/x/llm", tmp_path) == str(tmp_path / "distill" / "x" / "llm")
    assert resolve_in_run("gone/distill/y/llm", tmp_path) == "gone/distill/y/llm"  # for the loader's own error
    assert resolve_in_run("smollm2-135m", tmp_path) == "smollm2-135m"


def test_a_stage_identity_leaves_out_the_settings_it_does_not_read():
    """Stage 2 of a method without a drawn soft prompt does not read soft_tokens; a LoRA run does
    not read AdaLoRA's settings; stage 1 without RPS does not read top_h."""

    def same(cls, a, b):
        return same_identity(cls, cls(**a).to_dict(), cls(**b).to_dict())

    assert same(FinetuneConfig, dict(method="wo-sp", soft_tokens=4), dict(method="wo-sp", soft_tokens=8))
    assert not same(FinetuneConfig, dict(method="usp", soft_tokens=4), dict(method="usp", soft_tokens=8))
    assert same(FinetuneConfig, dict(adapter="lora", init_r=12), dict(adapter="lora", init_r=6, target_r=4))
    assert not same(FinetuneConfig, dict(adapter="adalora", init_r=12), dict(adapter="adalora", init_r=10))
    assert not same(FinetuneConfig, dict(adapter="lora", lora_r=8), dict(adapter="lora", lora_r=4))
    assert same(FinetuneConfig, dict(distill_temperature=2.0), dict(distill_temperature=4.0))  # no term: unread
    assert not same(FinetuneConfig, dict(distill_weight=0.5, distill_temperature=2.0), dict(distill_weight=0.5, distill_temperature=4.0))
    assert same(DistillConfig, dict(tasks=("ta",), top_h=5), dict(tasks=("ta",), top_h=10))
    assert not same(DistillConfig, dict(top_h=5), dict(top_h=10))
