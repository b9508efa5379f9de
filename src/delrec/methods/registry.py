"""The registry of methods: what each method is (the fields of `Method`) and what it does (its
hooks). The pipeline, stage 2, the scorer factory, the CLI and the report read the registry and
call the hooks; none of them asks which method it has. DELRec and its ablations are declared in
delrec/methods/delrec.py; each other Table II baseline is one file of delrec/methods/ with the
hooks it overrides, registered in delrec/methods/__init__.py (docs/extending.md).

Each method says
* what stage 1 gives it: the teacher's shared distillation (`shared`), a distillation of its own
  with other settings (`own`, with `stage1_settings`), or nothing (`none`);
* where its soft prompt comes from (`soft_prompt_source`): stage 1 (`distilled`), a random one of the same size
  (`untrained`), or none (`none`);
* its recommendation prompt (`prompt`): the LSR prompt with the soft prompt in its slot (`lsr`), with
  the slot left empty (`empty-slot`), with a hand-written description of the teacher in it
  (`model-card`), the plain prompt without slot or instruction (`plain`), the plain prompt with the
  teacher's top-h list written in as text (`teacher-list`), the candidates listed under index
  letters (A), (B), ... (`lettered`, LlamaRec), the plain prompt with one item vector after each title, the teacher's item embedding mapped into the LLM by a projector trained in stage 2 (`hybrid`, LLaRA;
  delrec/methods/llara.py), or no prompt at all (`none`: the similarity ranker);
* the order its prompt lists the candidates in (`candidate_order`): their stored, shuffled order
  (`stored`), or the teacher's, best first (`teacher`: LlamaRec's retrieval stage,
  retrieval.TeacherOrder);
* how candidates are ranked (`ranker`): by the LM's likelihood of each title as the answer
  (`titles`, llm/verbalizer.py), by the LM head's score of each candidate's index letter at the
  answer position (`letters`, LlamaRec), or by the cosine similarity of title embeddings to the
  history's (`similarity`, LLMSEQSIM; llm/similarity.py);
* what stage 2 trains: adapters, AdaLoRA or LoRA (`stage2`; with them the `hybrid` prompt's item projector),
  and the soft prompt too (`train_soft_prompt`);
  `stage2=False` evaluates stage 1's soft prompt with the frozen LLM, or ranks by similarity;
* `stage2_from_stage1_llm`: stage 2 starts from the LLM stage 1 updated (`w UDPSM`);
* where it appears in the paper: `ablation` (a row of Tables III-IV) and `paper_rows` (the rows of
  Table II it stands for, e.g. ("LlamaRec",)); the report labels it by them (`table2_label`).

The hooks (methods of `Method`, overridden by a method's own class) receive what they read and
no more: stage 2's hooks a Stage2Inputs (the run, its teacher, the seed, the method's own options,
the planned micro-batches, the soft prompt to insert), never the whole stage config; a method's
own settings live in its options class (`options_cls`: LLaRA's curriculum, teacher-list's list
size). They give the soft prompt stage 2 starts from (`stage2_soft_prompt`), the prompt style its scorer writes (`prompt_style`; `scorer`
builds the scorer), what stage 2 trains beside the adapters and how its micro-batches differ
(`stage2_extra`, a Stage2Extra; `load_stage2_extra` for scoring a trained folder), what its
stage-2 folder records beside the settings (`recorded_settings`), how it scores without a stage 2
(`frozen_scorer`) and how it ranks the whole catalogue (`for_full_ranking`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from torch import nn

from delrec.core.layout import RunLayout
from delrec.core.settings import check, closest
from delrec.llm.scorer import LLMScorer, PromptStyle
from delrec.llm.soft_prompt import SoftPrompt
from delrec.teachers.retrieval import TeacherOrder


@dataclass(frozen=True)
class Stage2Inputs:
    """What a method's stage-2 hooks read (built from the FinetuneConfig by stage 2): the run and
    the teacher, the seed, the method's own options (an `options_cls` instance, or None), the
    training micro-batches planned (a curriculum's span), and the soft prompt to insert: a file
    given instead of stage 1's (None: stage 1's), or the length of an untrained one."""

    run_dir: Path
    teacher: str
    seed: int
    options: object | None
    micro_batches: int
    soft_prompt_file: str | None
    soft_tokens: int


STAGE1 = ("shared", "own", "none")
SOFT_PROMPTS = ("distilled", "untrained", "none")
PROMPTS = ("lsr", "empty-slot", "model-card", "plain", "teacher-list", "lettered", "hybrid", "none")
RANKERS = ("titles", "letters", "similarity")
CANDIDATE_ORDERS = ("stored", "teacher")


@dataclass(frozen=True)
class Method:
    name: str  # in configs, the CLI and run folders (RUN/finetune/<teacher>-<name>)
    label: str  # in reports: "DELRec" is written DELRec(<teacher>), the others "<label> (<teacher>)"
    description: str
    stage1: str = "shared"
    soft_prompt_source: str = "distilled"
    prompt: str = "lsr"
    stage2: bool = True
    train_soft_prompt: bool = False
    stage1_settings: dict = field(default_factory=dict)  # DistillConfig fields of an `own` stage 1
    stage2_from_stage1_llm: bool = False
    ranker: str = "titles"
    candidate_order: str = "stored"
    ablation: bool = True  # a row of the paper's ablation tables (III-IV); False for the other Table II baselines
    paper_rows: tuple[str, ...] = ()  # the rows of the paper's Table II this method stands for

    def __post_init__(self):
        object.__setattr__(self, "paper_rows", tuple(self.paper_rows))  # a list from a caller stays hashable
        for value, allowed, what in ((self.stage1, STAGE1, "stage1"), (self.soft_prompt_source, SOFT_PROMPTS, "soft_prompt_source"),
                                     (self.prompt, PROMPTS, "prompt"), (self.ranker, RANKERS, "ranker"),
                                     (self.candidate_order, CANDIDATE_ORDERS, "candidate_order")):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {what} must be one of {allowed}, got {value!r}")
        if (self.soft_prompt_source == "distilled") != (self.stage1 != "none"):
            raise ValueError(f"method {self.name!r}: a distilled soft prompt needs a stage 1, and only it does")
        if (self.soft_prompt_source == "none") != (self.prompt != "lsr"):
            raise ValueError(f"method {self.name!r}: the `lsr` prompt is the one with a soft prompt in its slot")
        if (self.stage1 == "own") != bool(self.stage1_settings):
            raise ValueError(f"method {self.name!r}: an `own` stage 1 is one with its own stage1_settings")
        if (self.train_soft_prompt or self.stage2_from_stage1_llm) and not self.stage2:
            raise ValueError(f"method {self.name!r}: trains in stage 2 but has no stage 2")
        if (self.ranker == "letters") != (self.prompt == "lettered"):
            raise ValueError(f"method {self.name!r}: the `letters` ranker reads the `lettered` prompt, and only it does")
        if (self.ranker == "similarity") != (self.prompt == "none"):
            raise ValueError(f"method {self.name!r}: the `similarity` ranker uses no prompt, and only it does")
        if self.ranker == "similarity" and self.stage2:
            raise ValueError(f"method {self.name!r}: the `similarity` ranker has nothing to train in stage 2")
        if self.candidate_order != "stored" and (not self.stage2 or self.prompt == "none"):
            raise ValueError(f"method {self.name!r}: a candidate order is for a prompt scored after stage 2")
        if self.prompt == "hybrid" and not self.stage2:
            raise ValueError(f"method {self.name!r}: the `hybrid` prompt's item projector is trained in stage 2, so it needs one")
        if not self.stage2 and self.ranker != "similarity" and self.stage1 == "none":
            raise ValueError(f"method {self.name!r}: without stage 1 and stage 2 it is the zero-shot LLM (`zero-shot`)")

    # whether its prompts read the teacher's top lists (a run's top_h must cover its list size)
    needs_teacher_lists: ClassVar[bool] = False
    # the files its Stage2Extra saves beside the adapter (stage 2 moves them with it)
    stage2_files: ClassVar[tuple[str, ...]] = ()
    # its own settings, a dataclass (None: it has none), as peft's register_peft_method pairs a
    # method with its config class: `method_options: {<name>: {...}}` in a run config,
    # FinetuneConfig.options in stage 2
    options_cls: ClassVar[type | None] = None

    def stage1_folder(self, teacher: str) -> str | None:
        """The RUN/distill/ folder its soft prompt comes from (None: no stage 1)."""
        return {"shared": teacher, "own": f"{teacher}-{self.name}", "none": None}[self.stage1]

    @property
    def is_delrec(self) -> bool:
        """Whether this is the method the paper proposes (the report's subject; its Table II row)."""
        return self.name == "delrec"

    def report_label(self, teacher: str) -> str:
        return f"DELRec({teacher})" if self.is_delrec else f"{self.label} ({teacher})"

    def table2_label(self, teacher: str) -> str:
        """Its label among the paper's Table II rows: the paper's names for it, and its ablation
        name too when it is also an ablation ("LLMSEQPROMPT = w/o SP (sasrec)")."""
        if not self.paper_rows:
            return self.report_label(teacher)
        names = " / ".join(self.paper_rows)
        return f"{names} = {self.label} ({teacher})" if self.ablation else f"{names} ({teacher})"


    def check_options(self, options: dict) -> dict:
        """`options` checked against `options_cls` (keys, types and its own checks), its defaults
        filled in, as plain JSON values (what config.json records)."""
        if self.options_cls is None:
            if options:
                raise ValueError(f"method {self.name!r} has no options of its own, got {sorted(options)}")
            return {}
        values = check(self.options_cls, options, f"options of {self.name}")
        return json.loads(json.dumps(dataclasses.asdict(self.options_cls(**values))))

    def options_from(self, values: dict | None):
        """Its options (checked values, as config.json records them) as an `options_cls`, or None."""
        return self.options_cls(**(values or {})) if self.options_cls is not None else None

    # -- hooks -------------------------------------------------------------------------------------
    def stage2_soft_prompt(self, inputs: Stage2Inputs, bb) -> SoftPrompt | None:
        """The soft prompt stage 2 inserts: stage 1's (or the file given), an untrained one, or none."""
        if self.soft_prompt_source == "none":
            return None
        if self.soft_prompt_source == "untrained":
            return SoftPrompt.for_backbone(bb, inputs.soft_tokens, seed=inputs.seed)
        folder = self.stage1_folder(inputs.teacher)
        path = Path(inputs.soft_prompt_file) if inputs.soft_prompt_file else RunLayout(inputs.run_dir).soft_prompt(folder)
        if not path.exists():
            raise FileNotFoundError(f"no stage-1 soft prompt at {path}; run `delrec distill --run {inputs.run_dir} --teacher "
                                    f"{inputs.teacher}{'' if folder == inputs.teacher else f' --name {folder}'}` first")
        return SoftPrompt.load(path, bb)

    def prompt_style(self, run_dir: Path, data, teacher: str, extra: Stage2Extra, options, candidate_order: str) -> PromptStyle:
        """How its scorer writes prompts: here the LSR prompt with the slot its `prompt` names
        (`options`: its options_cls instance or None; `candidate_order`: `stored`, or `teacher` for
        the teacher's order, best first)."""
        slot = {"lsr": "soft-prompt", "model-card": "model-card", "empty-slot": "empty", "plain": None}[self.prompt]
        return PromptStyle(slot, order=self._order(run_dir, teacher, data, candidate_order))

    def scorer(self, run_dir: str | Path, data, backbone, teacher: str, templates, soft_prompt: SoftPrompt | None,
               extra: Stage2Extra | None = None, options: dict | None = None, candidate_order: str | None = None,
               **kwargs) -> LLMScorer:
        """Its scorer on `backbone` as it is (in training, and loaded from a stage-2 folder):
        its prompt style over the run's titles (`options`: its own settings, as config.json records
        them). `kwargs`: LLMScorer's (title_scoring, batch_size, name, progress)."""
        style = self.prompt_style(Path(run_dir), data, teacher, extra or Stage2Extra(), self.options_from(options),
                                  candidate_order or self.candidate_order)
        return LLMScorer.for_run(data, backbone, templates=templates, soft_prompt=soft_prompt, style=style, **kwargs)

    def stage2_extra(self, inputs: Stage2Inputs, bb, data) -> Stage2Extra:
        """What stage 2 trains beside the adapters (untrained, at the start of stage 2)."""
        return Stage2Extra()

    def load_stage2_extra(self, folder: Path, bb) -> Stage2Extra:
        """The trained extra of a stage-2 folder, for scoring it."""
        return Stage2Extra()

    def recorded_settings(self) -> dict:
        """What its stage-2 config.json records beside the FinetuneConfig fields: the candidate
        order, only when not the stored one (so the folders of every other method stay as they were)."""
        return {"candidate_order": self.candidate_order} if self.candidate_order != "stored" else {}

    def frozen_scorer(self, run: Path, data, name: str, teacher: str, backbone: Callable, templates,
                      soft_prompt: str | None, label: str | None, **kwargs):
        """Its scorer without a stage 2 (`stage2=False`): the frozen LLM with stage 1's soft prompt
        (`w/o LSR`; `soft_prompt`: another one). `backbone()` loads the LLM."""
        path = soft_prompt or RunLayout(run).soft_prompt(self.stage1_folder(teacher))
        if not Path(path).exists():
            raise FileNotFoundError(f"no soft prompt at {path}; run `delrec distill` first")
        bb = backbone()
        return LLMScorer.for_run(data, bb, templates=templates, soft_prompt=SoftPrompt.load(path, bb),
                                 name=label or f"delrec:{name}", **kwargs)

    def for_full_ranking(self, scorer, teacher_scorer: Callable):
        """The scorer that ranks the whole catalogue (`loo`, `--full-ranking`); `teacher_scorer()`
        gives the run's teacher. An LLM ranks candidate sets only, so here: the scorer itself."""
        return scorer

    @staticmethod
    def _order(run_dir: Path, teacher: str, data, candidate_order: str) -> TeacherOrder | None:
        return TeacherOrder(run_dir, teacher, data) if candidate_order == "teacher" else None


class Stage2Extra:
    """What a method trains in stage 2 beside the adapters, and how its micro-batches differ
    (LLaRA: its item projector and curriculum, delrec/methods/llara.py). This one adds nothing;
    stage 2 calls every hook all the same."""

    module: nn.Module | None = None  # trained with the adapters, saved beside them, part of the DDP unit

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer groups of `module`'s parameters (`lr`: the adapters' rate)."""
        return []

    def prompt_options(self, micro_batch: int) -> dict:
        """LLMScorer.prompts keywords for training micro-batch `micro_batch` (counted over the run)."""
        return {}

    def loss_term(self, prompts) -> object | None:
        """A term added to the loss of `prompts` (None: nothing)."""
        return None

    def before_optimizer_step(self, options: list[dict]) -> None:
        """After the step's backward passes (`options`: each micro-batch's prompt_options)."""

    def log_fields(self, options: list[dict]) -> dict:
        """Fields of the step's log line."""
        return {}

    def state_dict(self) -> dict | None:
        return None

    def load_state_dict(self, state: dict | None) -> None:
        pass

    def save(self, dest: Path) -> None:
        """Beside the adapter in `dest` (the stage folder, .best/ or a snapshot): its method's `stage2_files`."""


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"a method named {method.name!r} is already registered")
    METHODS[method.name] = method
    return method


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}{closest(name, METHODS)}; choose one of {tuple(METHODS)}")
    return METHODS[name]


def stage2_methods() -> tuple[str, ...]:
    """Names of the methods with a stage 2 (the choices of `delrec finetune --variant`)."""
    return tuple(m.name for m in METHODS.values() if m.stage2)
