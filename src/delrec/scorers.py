"""One factory from a model's name in a run folder to a scorer of its fixed candidates, used by
`delrec evaluate`, `delrec recommend`, the pipeline's evaluation and the report's case studies.

Names: `random`, `popularity`, a teacher (RUN/teachers/<name>), `zero-shot` (the LLM alone,
optionally with a soft prompt), `<teacher>-<method>` for a method of delrec.methods (its stage-2
folder RUN/finetune/<teacher>-<method>; for a method without stage 2, the frozen LLM with its
stage-1 soft prompt, such as `wo-lsr`, or the LLM's title embeddings, `llmseqsim`), or the path of
any stage-2 folder.
"""

from __future__ import annotations

from pathlib import Path

from delrec import methods


def make_scorer(run: str | Path, data, name: str, *, llm: str | None = None, dtype: str = "auto", device: str = "auto",
                batch_size: int = 8, progress: bool = True, templates=None, soft_prompt: str | None = None,
                method: str = "full-title", backbone=None, label: str | None = None, template_overrides: dict | None = None):
    """A scorer for `name` (see the module docstring). `llm`: the backbone of `zero-shot` and
    of stage-1-only methods (stage-2 folders name their own); `templates`: the prompt wording
    (default: the English movie templates naming the teacher); `method`: the verbalizer's;
    `backbone`: an already loaded one (fresh, without adapters); `label`: the scorer's name;
    `template_overrides`: a run's `templates:` section, for the models that have no stage-2
    folder recording their own (a stage-2 folder's config.json holds the wording it trained on)."""
    from delrec.evaluate import PopularityScorer, RandomScorer
    from delrec.llm.templates import Templates

    run = Path(run)
    kw = {"batch_size": batch_size, "progress": progress, "method": method}
    if name == "random":
        return RandomScorer(seed=data.config.seed)
    if name == "popularity":
        return PopularityScorer(data)
    from delrec.teachers import MODELS as TEACHERS

    as_path = "/" in name or "\\" in name  # the path of a stage-2 folder, not a name in the run
    if not as_path and (name in TEACHERS or (run / "teachers" / name).is_dir()):  # load_teacher says how to train a missing one
        from delrec.teachers.train import TeacherScorer, load_teacher, pick_device

        return TeacherScorer(load_teacher(run / "teachers" / name, device, data), pick_device(device), name)
    if name == "zero-shot":
        templates = templates or Templates(**(template_overrides or {}))
        return _frozen_llm(data, _backbone(backbone, llm, dtype, device), templates, soft_prompt,
                           label or f"zero-shot:{llm}" + (" +soft prompt" if soft_prompt else ""), **kw)
    folder = Path(name) if as_path else run / "finetune" / name
    teacher, _, variant = Path(name).name.partition("-")
    if variant in methods.METHODS and methods.get(variant).ranker == "similarity":
        from delrec.llm.similarity import TitleSimilarityScorer

        return TitleSimilarityScorer.for_run(data, _backbone(backbone, llm, dtype, device), batch_size=batch_size,
                                             progress=progress, name=label or f"llmseqsim:{name}")
    if variant in methods.METHODS and not methods.get(variant).stage2:
        stage1 = run / "distill" / methods.get(variant).stage1_folder(teacher) / "soft_prompt.safetensors"
        templates = templates or Templates.for_teacher(teacher, **(template_overrides or {}))
        return _frozen_llm(data, _backbone(backbone, llm, dtype, device), templates,
                           soft_prompt or stage1, label or f"delrec:{name}", **kw)
    if (folder / "config.json").exists():
        from delrec.io import read_json
        from delrec.stages.finetune import finetuned_scorer

        cfg = read_json(folder / "config.json")
        scorer = finetuned_scorer(folder, data, backbone=backbone or _backbone(None, cfg["llm"], dtype, device),
                                  templates=templates, run_dir=run, **kw)
        scorer.name = label or scorer.name
        if methods.get(cfg.get("variant", "delrec")).ranker == "letters":  # LlamaRec: its teacher retrieves for full ranking
            from delrec.retrieval import RetrieveThenRank

            return RetrieveThenRank(scorer, lambda: make_scorer(run, data, cfg["teacher"], device=device))
        return scorer
    teachers = sorted(p.name for p in (run / "teachers").iterdir()) if (run / "teachers").is_dir() else []
    stage2 = sorted(p.name for p in (run / "finetune").iterdir()) if (run / "finetune").is_dir() else []
    raise FileNotFoundError(f"no model {name!r} in {run}: known are random, popularity, zero-shot, the teachers "
                            f"{teachers} and the stage-2 results {stage2}")


def _backbone(backbone, llm: str | None, dtype: str, device: str):
    from delrec.llm.backbone import Backbone

    if backbone is not None:
        return backbone
    if llm is None:
        raise ValueError("an LLM scorer needs the backbone's name (llm)")
    return Backbone.load(llm, device=device, dtype=dtype).freeze()


def _frozen_llm(data, bb, templates, soft_prompt, name, **kw):
    from delrec.llm.scorer import LLMScorer
    from delrec.llm.soft_prompt import SoftPrompt

    soft = None
    if soft_prompt:
        if not Path(soft_prompt).exists():
            raise FileNotFoundError(f"no soft prompt at {soft_prompt}; run `delrec distill` first")
        soft = SoftPrompt.load(soft_prompt, bb)
    return LLMScorer.for_run(data, bb, templates=templates, soft_prompt=soft, name=name, **kw)
