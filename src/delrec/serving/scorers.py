"""One factory from a model's name in a run folder to a scorer of its fixed candidates, used by
`delrec evaluate`, `delrec recommend`, the pipeline's evaluation and the report's case studies;
and `finetuned_scorer`, which loads a stage-2 folder as the scorer it was trained as.

Names: `random`, `popularity`, a teacher (RUN/teachers/<name>), `zero-shot` (the LLM alone,
optionally with a soft prompt), `<teacher>-<method>` for a method of delrec.methods (its stage-2
folder RUN/finetune/<teacher>-<method>; for a method without stage 2, its `frozen_scorer`: the
frozen LLM with its stage-1 soft prompt, such as `wo-lsr`, or the LLM's title embeddings,
`llmseqsim`), or the path of any stage-2 folder.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

from delrec import methods
from delrec.core.io import read_json
from delrec.core.layout import RunLayout
from delrec.core.names import ModelName
from delrec.core.settings import resolve_in_run
from delrec.evaluation.metrics import PopularityScorer, RandomScorer
from delrec.llm.backbone import Backbone
from delrec.llm.quantize import WEIGHTS, int8_copy
from delrec.llm.scorer import LLMScorer
from delrec.llm.soft_prompt import SoftPrompt
from delrec.llm.templates import Templates
from delrec.teachers import MODELS as TEACHERS
from delrec.teachers.trained import TeacherScorer, load_teacher, pick_device
from delrec.training.config import FinetuneConfig

log = logging.getLogger(__name__)


def make_scorer(run: str | Path, data, name: str, *, llm: str | None = None, dtype: str = "auto", device: str = "auto",
                batch_size: int = 8, progress: bool = True, templates=None, soft_prompt: str | None = None,
                title_scoring: str = "full-title", backbone=None, label: str | None = None, template_overrides: dict | None = None,
                weights: str = "float"):
    """A scorer for `name` (see the module docstring). `llm`: the backbone of `zero-shot` and
    of stage-1-only methods (stage-2 folders name their own); `templates`: the prompt wording
    (default: the English movie templates naming the teacher); `title_scoring`: the verbalizer's
    (verbalizer.TITLE_SCORINGS);
    `backbone`: an already loaded one (fresh, without adapters); `label`: the scorer's name;
    `template_overrides`: a run's `templates:` section, for the models that have no stage-2
    folder recording their own (a stage-2 folder's config.json holds the wording it trained on);
    `weights`: an LLM's, `float` as loaded or `int8` (llm/quantize.py; teachers and LLMSEQSIM ignore it)."""
    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
    run = Path(run)
    kw = {"batch_size": batch_size, "progress": progress, "title_scoring": title_scoring}
    if name == "random":
        return RandomScorer(seed=data.config.seed)
    if name == "popularity":
        return PopularityScorer(data)
    as_path = "/" in name or "\\" in name  # the path of a stage-2 folder, not a name in the run
    if not as_path and (name in TEACHERS or (RunLayout(run).teacher(name)).is_dir()):  # load_teacher says how to train a missing one
        return TeacherScorer(load_teacher(RunLayout(run).teacher(name), device, data), pick_device(device), name)
    if name == "zero-shot":
        templates = templates or Templates(**(template_overrides or {}))
        return _frozen_llm(data, _with_weights(_backbone(backbone, llm, dtype, device), weights), templates, soft_prompt,
                           label or f"zero-shot:{llm}" + (" +soft prompt" if soft_prompt else ""), **kw)
    folder = Path(name) if as_path else RunLayout(run).stage2(name)
    parsed = ModelName.parse(Path(name).name)
    if parsed.method in methods.METHODS and not methods.get(parsed.method).stage2:
        templates = templates or Templates.for_teacher(parsed.teacher, **(template_overrides or {}))
        return methods.get(parsed.method).frozen_scorer(run, data, name, parsed.teacher,
                                                        lambda: _backbone(backbone, llm, dtype, device), templates,
                                                        soft_prompt, label, **kw)
    if (folder / "config.json").exists():
        cfg = read_json(folder / "config.json")
        llm = resolve_in_run(cfg["llm"], run)  # `w UDPSM`: stage 1's LLM, wherever the run folder is now
        scorer = finetuned_scorer(folder, data, backbone=backbone or _backbone(None, llm, dtype, device),
                                  templates=templates, run_dir=run, weights=weights, **kw)
        scorer.name = label or scorer.name
        return methods.get(FinetuneConfig.method_of(cfg)).for_full_ranking(
            scorer, lambda: make_scorer(run, data, cfg["teacher"], device=device))
    teachers = sorted(p.name for p in RunLayout(run).teachers.iterdir()) if RunLayout(run).teachers.is_dir() else []
    stage2 = sorted(p.name for p in RunLayout(run).stage2_runs.iterdir()) if RunLayout(run).stage2_runs.is_dir() else []
    raise FileNotFoundError(f"no model {name!r} in {run}: known are random, popularity, zero-shot, the teachers "
                            f"{teachers} and the stage-2 results {stage2}")


def finetuned_scorer(folder: str | Path, data, backbone: Backbone | None = None, templates: Templates | None = None,
                     title_scoring: str = "full-title", batch_size: int = 8, dtype: str = "auto", device: str = "auto",
                     progress: bool = True, run_dir: str | Path | None = None, weights: str = "float") -> LLMScorer:
    """A stage-2 result as a scorer: its backbone with the best adapter, its soft prompt (and what
    its method trained beside, such as LLaRA's item projector) and its prompt, exactly as trained.
    `backbone` (fresh, without adapters) saves a reload; `run_dir`: the run whose teacher lists a
    `teacher-list` model reads (default: the folder's own run, RUN/finetune/<name>); `weights`:
    `int8` scores with the adapter merged into int8 linear layers (llm/quantize.py)."""
    from peft import PeftModel  # peft takes seconds to import: only where an adapter is loaded

    if weights not in WEIGHTS:
        raise ValueError(f"unknown weights {weights!r}; choose one of {WEIGHTS}")
    folder = Path(folder)
    if not (folder / "adapter" / "adapter_config.json").exists():
        raise FileNotFoundError(f"no stage-2 adapter in {folder}; run `delrec finetune` first")
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} has an adapter but no config.json: the stage is being written or was "
                                "interrupted; run it again (or wait for it to finish)")
    cfg = read_json(folder / "config.json")
    bb = backbone or Backbone.load(resolve_in_run(cfg["llm"], run_dir or folder.parent.parent), device=device, dtype=dtype)
    bb.freeze()
    with warnings.catch_warnings():
        # peft checks AdaLoRA's rank_pattern keys (".lora_E" names) against module names and warns
        # that they match nothing, yet applies them: the pruned ranks load (tests/test_finetune.py)
        warnings.filterwarnings("ignore", message="The following rank_pattern keys did not match")
        adapted = PeftModel.from_pretrained(bb.model, folder / "adapter").eval()
    # the adapters folded into the weights they adapt: one matmul per layer instead of three when
    # scoring (scores equal to the unmerged model's up to float rounding; tests/test_speed_levers.py)
    bb.model = adapted.merge_and_unload()
    _with_weights(bb, weights)
    soft_path = folder / "soft_prompt.safetensors"
    soft = SoftPrompt.load(soft_path, bb) if soft_path.exists() else None
    trained_as = methods.get(FinetuneConfig.method_of(cfg))
    templates = templates or Templates.for_teacher(cfg["teacher"], **cfg.get("templates", {}))
    order = cfg.get("candidate_order", "stored")  # as it was trained (FinetuneConfig.to_dict records any other)
    if order != trained_as.candidate_order:
        log.warning("%s was trained with its candidates in the %s order, not %s's today; scored as it was trained",
                    folder, order, trained_as.name)
    return trained_as.scorer(run_dir or folder.parent.parent, data, bb, cfg["teacher"], templates, soft,
                             extra=trained_as.load_stage2_extra(folder, bb),
                             options=FinetuneConfig.upgrade_recorded(cfg).get("options"),
                             candidate_order=order, title_scoring=title_scoring, batch_size=batch_size, name=f"delrec:{folder.name}",
                             progress=progress)


def _with_weights(bb: Backbone, weights: str) -> Backbone:
    """`bb` scoring with `weights`: as loaded (`float`), or its model (adapters merged) with int8 linear layers."""
    if weights == "int8":
        bb.model = int8_copy(bb.model)
    return bb


def _backbone(backbone, llm: str | None, dtype: str, device: str):
    if backbone is not None:
        return backbone
    if llm is None:
        raise ValueError("an LLM scorer needs the backbone's name (llm)")
    return Backbone.load(llm, device=device, dtype=dtype).freeze()


def _frozen_llm(data, bb, templates, soft_prompt, name, **kw):
    soft = None
    if soft_prompt:
        if not Path(soft_prompt).exists():
            raise FileNotFoundError(f"no soft prompt at {soft_prompt}; run `delrec distill` first")
        soft = SoftPrompt.load(soft_prompt, bb)
    return LLMScorer.for_run(data, bb, templates=templates, soft_prompt=soft, name=name, **kw)
