"""The configuration of a `delrec run` experiment (configs/*.yaml), checked when it is read.

Sections hold the fields of the stages' own settings classes; delrec.core.settings checks every key
and value before any step runs and says which settings are runtime only.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from delrec import methods
from delrec.core.layout import RunLayout
from delrec.core.settings import apply_override, check, load_yaml, runtime
from delrec.data.protocol import ProtocolConfig
from delrec.evaluation.two_stage import DEFAULT_RETRIEVE
from delrec.llm.backbone import DEFAULT_MODEL
from delrec.llm.quantize import WEIGHTS
from delrec.llm.templates import Templates
from delrec.teachers import MODELS as TEACHER_MODELS
from delrec.teachers import default_config
from delrec.teachers.base import TeacherConfig
from delrec.teachers.lists import DEFAULT_TOP_H
from delrec.training.config import DistillConfig, FinetuneConfig

TRACKERS = ("none", "tensorboard", "wandb", "mlflow")


@dataclass
class PipelineConfig:
    """The experiment (`runtime` fields only say how it runs: see delrec.core.settings). The sections
    (`protocol`, `teacher`, `distill`, `finetune`) hold fields of ProtocolConfig, TeacherConfig,
    DistillConfig and FinetuneConfig; every key and value is checked on construction."""

    run_dir: str = "runs/ml100k-cpu"
    dataset: str = "ml-100k"  # ml-100k, ml-1m or a folder `delrec data prepare` reads
    protocol: dict = field(default_factory=lambda: {"name": "paper"})  # ProtocolConfig fields
    teachers: list[str] = field(default_factory=lambda: ["sasrec"])
    teacher: dict = field(default_factory=dict)  # TeacherConfig overrides for every teacher
    top_h: int = DEFAULT_TOP_H  # length of the teacher lists stored for RPS
    llm: str = DEFAULT_MODEL
    # the prompts' wording for every step (Templates fields): domain words such as
    # {item: game, items: games, verb: played, verb_base: play}, or whole templates
    templates: dict = field(default_factory=dict)
    dtype: str = "auto"
    device: str = runtime("auto")
    threads: int | None = runtime(None)  # torch CPU threads (default: torch's choice)
    distill: dict = field(default_factory=dict)  # DistillConfig fields
    finetune: dict = field(default_factory=dict)  # FinetuneConfig fields
    methods: list[str] = field(default_factory=lambda: ["delrec", "wo-sp", "usp"])  # names in delrec.methods
    # the teachers whose methods are trained and evaluated (default: every teacher); the others are
    # rows of their own only (e.g. GRU4Rec and Caser beside DELRec(SASRec) in Table II)
    method_teachers: list[str] | None = None
    # each method's own settings (delrec.methods: Method.options_cls), e.g. {llara: {curriculum: none}}
    method_options: dict = field(default_factory=dict)
    zero_shot: bool = True
    test_samples: int | None = 500  # None: the whole test split
    eval_seed: int = 0
    eval_batch_size: int = runtime(8)  # scores do not depend on it (llm/verbalizer.py)
    # also evaluate over the whole catalogue (delrec.evaluation.two_stage): every LLM model ranks
    # the top `retrieve` (default 20) unseen items of `retriever` (default the first teacher);
    # references and teachers rank the catalogue themselves. {} (the default): not done
    full_ranking: dict = field(default_factory=dict)
    # also score every LLM model with each sample's candidates listed in these seeded orders
    # (delrec.evaluation.orders), e.g. [1, 2]; [] (the default): not done
    candidate_orders: list[int] = field(default_factory=list)
    # the weights LLM models are scored with on the test samples: `float` (as trained) or `int8`
    # (llm/quantize.py: adapters merged, int8 linear layers; CPU only, faster, rankings within rounding)
    eval_weights: str = "float"
    report: bool = runtime(True)
    # live tracking of every stage's logged scalars (delrec.core.tracking): none, tensorboard (RUN/tb/),
    # wandb or mlflow; the JSON logs in the run folder stay the report's source
    tracking: str = runtime("none")
    # repeats (delrec.experiments): each seed runs the whole experiment into RUN/seed-N/ (teacher,
    # stage 1 and stage 2 seeds; also the split and candidates with seed_data); a sweep runs one
    # experiment per point into RUN/sweep/<point>/, `axes` one setting at a time, `grid` every combination
    seeds: list[int] | None = None
    seed_data: bool = False
    sweep: dict = field(default_factory=dict)  # {"distill.soft_tokens": [10, 20, 40], ...}
    sweep_mode: str = "axes"
    # other runs (folders of earlier `delrec run`s, e.g. with other budgets or soft-prompt sizes)
    # whose results the report lists beside this one's, with the settings that differ
    attempts: list[str] = runtime(default_factory=list)

    def __post_init__(self):
        for name in self.methods:
            try:
                methods.get(name)
            except ValueError as e:
                raise ValueError(f"methods: {e}") from None
        if not self.teachers:
            raise ValueError("the config names no teacher")
        try:
            self.method_options = {name: methods.get(name).check_options(dict(options))
                                   for name, options in self.method_options.items()}
        except (TypeError, ValueError) as e:
            raise ValueError(f"method_options: {e}") from None
        self.sweep = _dotted(self.sweep)
        if self.eval_weights not in WEIGHTS:
            raise ValueError(f"eval_weights: {self.eval_weights!r} is not one of {', '.join(WEIGHTS)}")
        if self.tracking not in TRACKERS:
            raise ValueError(f"tracking: {self.tracking!r} is not one of {', '.join(TRACKERS)}")
        self._check_robustness()
        if self.method_teachers is not None:
            unknown = [t for t in self.method_teachers if t not in self.teachers]
            if unknown:
                raise ValueError(f"method_teachers: {unknown} are not among the teachers {self.teachers}")
        listless = [t for t in self.llm_teachers if not getattr(TEACHER_MODELS.get(t), "writes_lists", True)]
        if listless and self.methods:
            raise ValueError(f"{listless} cannot teach the LLM methods: a target-aware model stores no top-h lists over the "
                             "catalogue (teachers/kda.py); list it in `teachers` and the others in `method_teachers`")
        # every section's keys and types, then each class's own checks, before any step runs
        # (kept as plain JSON values: they are written back to RUN/config.yaml)
        for section, cls in SECTIONS.items():
            setattr(self, section, _plain(check(cls, getattr(self, section), section)))
        for section, build in (("protocol", lambda: ProtocolConfig.for_protocol(**self.protocol)),
                               ("teacher", lambda: [default_config(t, **self.teacher) for t in self.teachers]),
                               ("distill", lambda: DistillConfig(**{"llm": self.llm, "dtype": self.dtype, **self.distill})),
                               ("finetune", lambda: FinetuneConfig(**{"llm": self.llm, "dtype": self.dtype, **self.finetune}))):
            try:
                build()
            except (TypeError, ValueError) as e:
                raise ValueError(f"{section}: {e}") from None
        distill_top_h = self.distill.get("top_h", DistillConfig.top_h)
        if distill_top_h > self.top_h:
            raise ValueError(f"distill.top_h ({distill_top_h}) is more than the top_h lists the teachers store ({self.top_h})")
        for name in self.methods:
            list_size = getattr(methods.get(name).options_from(self.method_options.get(name)), "list_size", None)
            if methods.get(name).needs_teacher_lists and list_size is not None and list_size > self.top_h:
                raise ValueError(f"method_options.{name}.list_size ({list_size}) is more than the top_h lists the teachers "
                                 f"store ({self.top_h})")

    def _check_robustness(self) -> None:
        unknown = set(self.full_ranking) - {"retrieve", "retriever"}
        if unknown:
            raise ValueError(f"full_ranking: unknown keys {sorted(unknown)} (known: retrieve, retriever)")
        retrieve = self.full_ranking.get("retrieve", DEFAULT_RETRIEVE)
        if not isinstance(retrieve, int) or isinstance(retrieve, bool) or retrieve < 2:
            raise ValueError(f"full_ranking.retrieve: retrieve at least 2 items to rank, got {retrieve!r}")
        if self.full_ranking.get("retriever", self.teachers[0]) not in self.teachers:
            raise ValueError(f"full_ranking.retriever: {self.full_ranking['retriever']!r} is not among the teachers {self.teachers}")
        if len(set(self.candidate_orders)) != len(self.candidate_orders):
            raise ValueError(f"candidate_orders: {self.candidate_orders} repeats a seed")

    @property
    def retrieval(self) -> tuple[str, int] | None:
        """(retriever, K) of the full-catalogue evaluation, or None when the config does not ask for it."""
        if not self.full_ranking:
            return None
        return self.full_ranking.get("retriever", self.teachers[0]), self.full_ranking.get("retrieve", DEFAULT_RETRIEVE)

    def is_llm_model(self, name: str) -> bool:
        """Whether `name` (of `models()`) ranks a candidate set with the LLM: not a reference or a teacher."""
        return name not in ("random", "popularity") and name not in self.teachers

    @classmethod
    def from_file(cls, path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
        """Settings from a YAML file, then `key=value` / `section.key=value` overrides, checked
        (keys, types, allowed values) before anything runs; errors name the file and the key."""
        path = Path(path)
        values = upgrade_keys(load_yaml(path))
        for item in overrides or []:
            apply_override(values, item)
            upgrade_keys(values)  # an override in the old words replaces the file's value
        return cls._from_values(values, str(path))

    @classmethod
    def _from_values(cls, values: dict, where: str) -> PipelineConfig:
        values = check(cls, upgrade_keys(dict(values)), where)
        try:
            return cls(**values)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None

    @property
    def llm_teachers(self) -> list[str]:
        """The teachers whose methods are trained and evaluated."""
        return list(self.teachers if self.method_teachers is None else self.method_teachers)

    def models(self) -> list[tuple[str, str | None]]:
        """(model name, the file whose change invalidates its evaluation) in report order."""
        run, out = Path(self.run_dir), []
        out += [("random", None), ("popularity", None)]
        out += [(t, str(RunLayout(run).teacher(t) / "metrics.json")) for t in self.teachers]
        if self.zero_shot:
            out.append(("zero-shot", None))
        for t in self.llm_teachers:
            for v in self.methods:
                method = methods.get(v)
                if not method.stage2 and method.stage1 == "none":  # the bare LLM (LLMSEQSIM): nothing upstream
                    out.append((f"{t}-{v}", None))
                elif not method.stage2:  # the frozen LLM with stage 1's soft prompt
                    out.append((f"{t}-{v}", str(RunLayout(run).stage1(method.stage1_folder(t)) / "metrics.json")))
                else:
                    out.append((f"{t}-{v}", str(RunLayout(run).stage2(f"{t}-{v}") / "metrics.json")))
        return out

    @classmethod
    def from_run(cls, run: str | Path) -> PipelineConfig:
        """The configuration a `delrec run` recorded in its folder (RUN/config.yaml)."""
        run = Path(run)
        if not RunLayout(run).config.exists():
            raise FileNotFoundError(f"{run} holds no config.yaml: not the folder of a `delrec run`")
        return cls._from_values({**load_yaml(RunLayout(run).config), "run_dir": str(run)}, str(RunLayout(run).config))


# a config's sections and the settings class that checks each (and gives its defaults)
SECTIONS = {"protocol": ProtocolConfig, "teacher": TeacherConfig, "distill": DistillConfig, "finetune": FinetuneConfig,
            "templates": Templates}

# keys of earlier configs, still read: a method of delrec.methods was called a variant
RENAMED = {"variants": "methods", "variant_teachers": "method_teachers"}


def upgrade_keys(values: dict) -> dict:
    """`values` in today's words (in place): the keys of RENAMED, and a method's options given as
    `finetune:` settings (as LLaRA's and teacher-list's were) moved under `method_options: {<method>: ...}`."""
    for old, new in RENAMED.items():
        if old in values:
            values[new] = values.pop(old)
    finetune = values.get("finetune")
    if isinstance(finetune, dict):
        if "teacher_list_size" in finetune:  # teacher-list's list size, now its option `list_size`
            values.setdefault("method_options", {}).setdefault("teacher-list", {}).setdefault(
                "list_size", finetune.pop("teacher_list_size"))
        for method in methods.METHODS.values():
            own = {f.name for f in dataclasses.fields(method.options_cls)} if method.options_cls else set()
            moved = {k: finetune.pop(k) for k in own & set(finetune)}
            if moved:
                values.setdefault("method_options", {}).setdefault(method.name, {}).update(moved)
    return values


def _dotted(sweep: dict, prefix: str = "") -> dict:
    """A sweep's keys as dotted paths: `{distill: {soft_tokens: [..]}}` (as `sweep.distill.soft_tokens=[..]`
    on the command line gives it) is `{"distill.soft_tokens": [..]}`."""
    out = {}
    for key, value in sweep.items():
        if isinstance(value, dict):
            out |= _dotted(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def _plain(values: dict) -> dict:
    return json.loads(json.dumps(values))
