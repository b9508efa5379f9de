"""The method registry (src/delrec/methods.py): one entry per method, read by every stage."""

import pytest

from delrec import methods
from delrec.methods import Method
from delrec.pipeline import Pipeline, PipelineConfig


def test_entries_are_checked():
    with pytest.raises(ValueError, match="a distilled soft prompt needs a stage 1"):
        Method("x", "X", "", stage1="none", soft_prompt="distilled")
    with pytest.raises(ValueError, match="the `lsr` prompt is the one with a soft prompt"):
        Method("x", "X", "", stage1="none", soft_prompt="none", prompt="lsr")
    with pytest.raises(ValueError, match="own stage1_settings"):
        Method("x", "X", "", stage1="own")
    with pytest.raises(ValueError, match="prompt must be one of"):
        Method("x", "X", "", prompt="chat")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Method("delrec", "DELRec", ""))
    with pytest.raises(ValueError, match=r"unknown method 'wo_sp' \(did you mean 'wo-sp'\?\)"):
        methods.get("wo_sp")


def test_the_paper_ablations():
    assert set(methods.METHODS) == {"delrec", "wo-ta", "wo-rps", "wo-lsr", "ulsr", "udpsm", "usp", "wo-dpsm", "mcp", "wo-sp"}
    assert methods.get("wo-lsr").stage2 is False and "wo-lsr" not in methods.stage2_methods()
    assert methods.get("wo-ta").stage1_folder("sasrec") == "sasrec-wo-ta"
    assert methods.get("ulsr").stage1_folder("caser") == "caser" and methods.get("wo-sp").stage1_folder("caser") is None
    assert methods.get("delrec").report_label("sasrec") == "DELRec(sasrec)"
    assert methods.get("wo-sp").report_label("sasrec") == "w/o SP (sasrec)"


def test_a_new_method_is_one_entry(tmp_path, monkeypatch):
    """A variant registered here (a stage 1 of its own with a longer soft prompt) is planned by
    the pipeline with no other change: its own stage 1, its stage 2 from that soft prompt."""
    monkeypatch.setattr(methods, "METHODS", dict(methods.METHODS))
    methods.register(Method("long-sp", "long SP", "a 64-token soft prompt", stage1="own",
                            stage1_settings={"soft_tokens": 64}))
    config = PipelineConfig(run_dir=str(tmp_path), variants=["delrec", "long-sp", "wo-lsr"])
    pipeline = Pipeline(config)
    assert pipeline._distill_config("sasrec", "long-sp").soft_tokens == 64
    assert pipeline._finetune_jobs() == [("sasrec", "delrec", "sasrec"), ("sasrec", "long-sp", "sasrec-long-sp")]
    names = [name for name, _ in pipeline.models()]
    assert names[-3:] == ["sasrec-delrec", "sasrec-long-sp", "sasrec-wo-lsr"]
