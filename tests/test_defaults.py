"""One default per setting: where the command line names a default, it is the one of the settings
class or function the option feeds (so changing a default in the code changes the CLI with it);
and stage 2's defaults are the presets' tested settings (LoRA + AdamW), which the collapse guard
of tests/test_learning.py runs on."""

import argparse
import dataclasses
import inspect

import pytest

from delrec import cli
from delrec.cli import commands
from delrec.cli import parser as parser_module
from delrec.config import PipelineConfig
from delrec.serving.limits import ServiceLimits
from delrec.serving.recommender import Recommender
from delrec.serving.server import serve
from delrec.teachers.base import TeacherConfig
from delrec.training.config import DistillConfig, FinetuneConfig
from delrec.training.teacher import train_teacher


def _defaults(target) -> dict:
    """name -> default of a dataclass's fields or a function's keyword parameters."""
    if dataclasses.is_dataclass(target):
        return {f.name: f.default if f.default is not dataclasses.MISSING else f.default_factory()
                for f in dataclasses.fields(target) if f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING}
    return {n: p.default for n, p in inspect.signature(target).parameters.items() if p.default is not inspect.Parameter.empty}


def _subparser(*path: str) -> argparse.ArgumentParser:
    parser = parser_module.build_parser()
    for name in path:
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = action.choices[name]
    return parser


# each command, the settings its options feed, and options named otherwise than their setting
COMMANDS = [
    (("teacher", "train"), [TeacherConfig, train_teacher], {"epochs": "max_epochs"}),
    (("distill",), [DistillConfig], {}),
    (("finetune",), [FinetuneConfig], {}),
    (("serve",), [ServiceLimits, Recommender.from_run, serve], {**commands.SERVICE_LIMIT_OPTIONS, "model": "model"}),
]


@pytest.mark.parametrize("path, targets, renamed", COMMANDS, ids=[" ".join(c[0]) for c in COMMANDS])
def test_a_named_cli_default_is_the_settings_default(path, targets, renamed):
    defaults = {}
    for target in reversed(targets):  # the first target wins
        defaults.update(_defaults(target))
    checked, differ = 0, []
    for action in _subparser(*path)._actions:
        if action.default in (None, argparse.SUPPRESS) or isinstance(action, (argparse._StoreTrueAction, argparse._HelpAction)):
            continue
        name = renamed.get(action.dest, action.dest)
        if name in defaults:
            checked += 1
            if action.default != defaults[name]:
                differ.append(f"--{action.dest.replace('_', '-')}: CLI {action.default!r}, settings {defaults[name]!r}")
    assert not differ, differ
    assert checked or path != ("serve",)  # serve names several (host, port, ...)


def test_the_cli_leaves_stage_settings_to_their_classes():
    """`delrec distill` and `delrec finetune` name no stage setting's default themselves (None: the class's)."""
    for path, cls in ((("distill",), DistillConfig), (("finetune",), FinetuneConfig)):
        fields = {f.name for f in dataclasses.fields(cls)}
        named = [a.dest for a in _subparser(*path)._actions if a.dest in fields and a.default is not None]
        assert not named, f"delrec {path[0]} names defaults of {named}: leave them to {cls.__name__}"


def test_finetune_without_settings_trains_lora_with_adamw(monkeypatch, tmp_path):
    """`delrec finetune --run RUN` with no --set: the library's stage-2 defaults, which are the
    presets' LoRA on q/v, AdamW at 1e-3, a short warm-up and a cosine decay."""
    seen = {}

    def fake_finetune(run, config, **kw):
        seen["config"] = config
        raise SystemExit(0)

    monkeypatch.setattr("delrec.training.finetune.finetune", fake_finetune)
    with pytest.raises(SystemExit):
        cli.main(["finetune", "--run", str(tmp_path)])
    config = seen["config"]
    assert config == FinetuneConfig()
    assert (config.adapter, config.optimizer, config.lr, config.lr_schedule) == ("lora", "adamw", 1e-3, "cosine")
    assert config.target_modules in (None, "qv") and config.warmup_steps > 0


def test_the_paper_config_keeps_the_papers_stage2(tmp_path):
    """configs/paper.yaml names the paper's AdaLoRA with Lion at 1e-4 and a constant rate itself."""
    config = PipelineConfig.from_file("configs/paper.yaml", [f"run_dir={tmp_path}"])
    stage2 = FinetuneConfig(**config.finetune)
    assert (stage2.adapter, stage2.optimizer, stage2.lr, stage2.lr_schedule) == ("adalora", "lion", 1e-4, "constant")
