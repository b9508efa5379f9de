"""The method registry (src/delrec/methods.py): one entry per method, read by every stage."""

import pytest

from delrec import methods
from delrec.config import PipelineConfig
from delrec.methods import Method
from delrec.pipeline import Pipeline


def test_entries_are_checked():
    with pytest.raises(ValueError, match="a distilled soft prompt needs a stage 1"):
        Method("x", "X", "", stage1="none", soft_prompt_source="distilled")
    with pytest.raises(ValueError, match="the `lsr` prompt is the one with a soft prompt"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="lsr")
    with pytest.raises(ValueError, match="own stage1_settings"):
        Method("x", "X", "", stage1="own")
    with pytest.raises(ValueError, match="prompt must be one of"):
        Method("x", "X", "", prompt="chat")
    with pytest.raises(ValueError, match="already registered"):
        methods.register(Method("delrec", "DELRec", ""))
    with pytest.raises(ValueError, match=r"unknown method 'wo_sp' \(did you mean 'wo-sp'\?\)"):
        methods.get("wo_sp")


def test_the_paper_ablations():
    ablations = {m.name for m in methods.METHODS.values() if m.ablation}
    assert ablations == {"delrec", "wo-ta", "wo-rps", "wo-lsr", "ulsr", "udpsm", "usp", "wo-dpsm", "mcp", "wo-sp"}
    assert methods.get("wo-lsr").stage2 is False and "wo-lsr" not in methods.stage2_methods()
    assert methods.get("wo-ta").stage1_folder("sasrec") == "sasrec-wo-ta"
    assert methods.get("ulsr").stage1_folder("caser") == "caser" and methods.get("wo-sp").stage1_folder("caser") is None
    assert methods.get("delrec").report_label("sasrec") == "DELRec(sasrec)"
    assert methods.get("wo-sp").report_label("sasrec") == "w/o SP (sasrec)"


def test_the_table2_baselines():
    """The LLM-based baselines of Table II: `wo-sp` is LLMSEQPROMPT (one training, two names); the
    others are not ablations, and only LLMSEQSIM has no stage 2."""
    baselines = {m.name: m.paper_rows for m in methods.METHODS.values() if m.paper_rows}
    assert baselines == {"wo-sp": ("LLMSEQPROMPT",), "teacher-list": ("RecRanker", "LLM-TRSR"), "llamarec": ("LlamaRec",),
                         "llara": ("LLaRA",), "llmseqsim": ("LLMSEQSIM",)}
    assert methods.get("wo-sp").table2_label("sasrec") == "LLMSEQPROMPT = w/o SP (sasrec)"
    assert methods.get("llamarec").table2_label("sasrec") == "LlamaRec (sasrec)"
    assert methods.get("llara").table2_label("sasrec") == "LLaRA (sasrec)"
    assert methods.get("delrec").table2_label("sasrec") == "DELRec(sasrec)"
    assert {"teacher-list", "llamarec", "llara"} <= set(methods.stage2_methods()) and "llmseqsim" not in methods.stage2_methods()
    assert methods.get("llamarec").ranker == "letters" and methods.get("llmseqsim").ranker == "similarity"
    assert methods.get("llara").prompt == "hybrid" and methods.get("llara").ranker == "titles"
    assert all(methods.get(m).stage1_folder("sasrec") is None for m in ("teacher-list", "llamarec", "llara", "llmseqsim"))


def test_ranker_and_prompt_go_together():
    with pytest.raises(ValueError, match="ranker must be one of"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", ranker="bm25")
    with pytest.raises(ValueError, match="`letters` ranker reads the `lettered` prompt"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", ranker="letters")
    with pytest.raises(ValueError, match="`letters` ranker reads the `lettered` prompt"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="lettered")
    with pytest.raises(ValueError, match="`similarity` ranker uses no prompt"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", ranker="similarity", stage2=False)
    with pytest.raises(ValueError, match="nothing to train"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="none", ranker="similarity")
    with pytest.raises(ValueError, match="zero-shot LLM"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", stage2=False)
    with pytest.raises(ValueError, match="the `lsr` prompt is the one with a soft prompt"):
        Method("x", "X", "", prompt="teacher-list")


def test_a_candidate_order_is_for_a_prompt_scored_after_stage_2():
    assert methods.get("llamarec").candidate_order == "teacher" and methods.get("delrec").candidate_order == "stored"
    with pytest.raises(ValueError, match="candidate_order must be one of"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", candidate_order="popularity")
    with pytest.raises(ValueError, match="a candidate order is for a prompt scored after stage 2"):
        Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="none", ranker="similarity", stage2=False,
               candidate_order="teacher")
    assert Method("x", "X", "", stage1="none", soft_prompt_source="none", prompt="plain", candidate_order="teacher").stage2


def test_the_pipeline_plans_the_baselines(tmp_path):
    """Stage 2 for the trained baselines (no stage 1), an evaluation of each, LLMSEQSIM with nothing
    upstream; a teacher list longer than the stored top-h lists is refused before any step."""
    config = PipelineConfig(run_dir=str(tmp_path), methods=["wo-sp", "teacher-list", "llamarec", "llmseqsim"])
    pipeline = Pipeline(config)
    assert pipeline._finetune_jobs() == [("sasrec", "wo-sp", None), ("sasrec", "teacher-list", None), ("sasrec", "llamarec", None)]
    models = dict(pipeline.config.models())
    assert models["sasrec-llmseqsim"] is None and models["sasrec-llamarec"].endswith("finetune/sasrec-llamarec/metrics.json")
    with pytest.raises(ValueError, match=r"list_size \(12\) is more than the top_h"):
        PipelineConfig(run_dir=str(tmp_path), methods=["teacher-list"], method_options={"teacher-list": {"list_size": 12}})
    with pytest.raises(ValueError, match="has no options of its own"):  # the list size is teacher-list's alone
        PipelineConfig(run_dir=str(tmp_path), methods=["llamarec"], method_options={"llamarec": {"list_size": 12}})


def test_a_new_method_is_one_entry(tmp_path, monkeypatch):
    """A variant registered here (a stage 1 of its own with a longer soft prompt) is planned by
    the pipeline with no other change: its own stage 1, its stage 2 from that soft prompt."""
    # registered for this test only (the registry is one dict, shared by every module that reads it)
    monkeypatch.setitem(methods.METHODS, "long-sp", Method("long-sp", "long SP", "a 64-token soft prompt", stage1="own",
                                                           stage1_settings={"soft_tokens": 64}))
    config = PipelineConfig(run_dir=str(tmp_path), methods=["delrec", "long-sp", "wo-lsr"])
    pipeline = Pipeline(config)
    assert pipeline._distill_config("sasrec", "long-sp").soft_tokens == 64
    assert pipeline._finetune_jobs() == [("sasrec", "delrec", "sasrec"), ("sasrec", "long-sp", "sasrec-long-sp")]
    names = [name for name, _ in config.models()]
    assert names[-3:] == ["sasrec-delrec", "sasrec-long-sp", "sasrec-wo-lsr"]
