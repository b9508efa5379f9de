"""The settings of the LLM stages, each declared once with its default and its check: the fields
every stage has (StageConfig), stage 1's (DistillConfig) and stage 2's (FinetuneConfig).

Each stage's config adds its own fields and its own defaults for some shared ones (stage 1 trains a
soft prompt with Lion at 5e-3; stage 2 LoRA adapters with AdamW at 1e-3, a short warm-up and a
cosine decay). Fields made with `runtime()` say how a stage runs, not what it computes
(delrec.core.settings): changing them reruns nothing.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field, fields

import torch

from delrec import methods
from delrec.core.settings import closest, runtime
from delrec.llm.backbone import DEFAULT_MODEL, Backbone
from delrec.llm.quantize import WEIGHTS
from delrec.llm.soft_prompt import INITS as SOFT_INITS
from delrec.llm.verbalizer import OBJECTIVES
from delrec.teachers.lists import DEFAULT_TOP_H
from delrec.training.optim import ADAPTER_INITS, LR_SCHEDULES, OPTIMIZERS


@dataclass
class StageConfig:
    teacher: str = "sasrec"
    llm: str = DEFAULT_MODEL
    soft_tokens: int = 100  # the soft prompt's length (stage 1 trains it; stage 2's `usp` draws one)
    objective: str = "candidates"  # the training loss, see verbalizer.OBJECTIVES
    steps: int = 100
    batch_size: int = 4  # examples per micro-batch (stage 1: per task)
    grad_accum: int = 1
    optimizer: str = "lion"  # the paper's; or adamw (training/optim.py)
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: int = 10
    templates: dict = field(default_factory=dict)  # Templates fields: domain words (item, verb, ...) or whole templates
    lr_schedule: str = "constant"  # after warmup: constant, or a linear / cosine decay to lr_min_ratio * lr
    lr_min_ratio: float = 0.1
    max_grad_norm: float = 1.0
    max_train_examples: int | None = None  # sampled from the train split with the seed (stage 1: per task)
    max_seconds: float | None = None  # the time budget of training seconds (evaluations excluded)
    valid_samples: int = 64
    eval_every: int = 50
    checkpoint_every: int = runtime(10)
    verbalizer_batch: int = runtime(8)
    gradient_checkpointing: bool = runtime(False)  # recompute activations in backward: less memory, more time
    seed: int = 0
    dtype: str = "auto"
    device: str = runtime("auto")

    def __post_init__(self):
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown training objective {self.objective!r}; choose one of {OBJECTIVES}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose one of {OPTIMIZERS}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {LR_SCHEDULES}")


def seeded_backbone(config: StageConfig, backbone: Backbone | None = None) -> Backbone:
    """What an LLM stage starts with: torch's and Python's RNGs seeded with the stage's seed, its
    LLM (`backbone`, or `config.llm` loaded), frozen, with gradient checkpointing if asked for."""
    torch.manual_seed(config.seed)
    random.seed(config.seed)
    bb = backbone or Backbone.load(config.llm, device=config.device, dtype=config.dtype)
    bb.freeze()
    if config.gradient_checkpointing:
        bb.enable_gradient_checkpointing()
    return bb


ADAPTERS = ("adalora", "lora")


TARGET_SHORTHANDS = ("qv", "all-linear")


@dataclass
class FinetuneConfig(StageConfig):
    # the shared fields (StageConfig) with stage 2's defaults: the presets' LoRA + AdamW at
    # StageConfig's lr 1e-3, a short warm-up and a cosine decay (docs/training.md); the paper's
    # AdaLoRA + Lion at 1e-4 is configs/paper.yaml
    optimizer: str = "adamw"
    weight_decay: float = 1e-6
    warmup_steps: int = 5
    lr_schedule: str = "cosine"
    eval_every: int = 25
    # stage 2's own
    method: str = "delrec"  # the registry entry trained (delrec.methods); `variant` in folders of earlier delrec
    soft_prompt: str | None = None  # default: RUN/distill/<teacher>/soft_prompt.safetensors
    # the method's own settings, checked against its options class (Method.options_cls: LLaRA's
    # curriculum and projector rate), recorded with its defaults filled in
    options: dict = field(default_factory=dict)
    adapter_init: str = "orthogonal"  # P and Q orthonormal, E zero (training/optim.py); `peft`: peft's own
    relative_lr: bool = True  # E's lr times the adapted weight's RMS singular value (training/optim.py)
    vector_lr_scale: float = 0.25  # lr of P and Q (unit vectors) relative to lr, which moves E (training/optim.py)
    adapter: str = "lora"  # ADAPTERS: plain LoRA, or AdaLoRA (the paper's)
    target_modules: tuple[str, ...] | str | None = None  # None or "qv": query and value projections; "all-linear"; or names
    lora_r: int = 8  # `lora`: the rank, its scale lora_alpha / lora_r, and dropout on its input
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    init_r: int = 12  # `adalora`: the rank it starts at and the average rank it prunes to
    target_r: int = 8
    # AdaLoRA's schedule (its author's shape): no pruning over the first `tinit` of the steps, the
    # rank budget falling to target_r until the last `tfinal` of the steps, which keep it there;
    # the budget is re-allocated every `delta_t` steps. Fractions of `steps`, so a budget change
    # keeps the shape. (0, 0, 1) prunes from the first step to the last, which destabilised the
    # short CPU runs (docs/training.md).
    tinit: float = 0.1
    tfinal: float = 0.3
    delta_t: int = 10
    orth_reg_weight: float = 0.5
    # quality per CPU-second (docs/training.md): adapters on the top `adapter_layers` transformer
    # layers only (None: every layer); with the soft prompt frozen nothing below them needs a
    # gradient, so backward stops at the lowest adapted layer
    adapter_layers: int | None = None
    # negatives scored per training example besides the label (None: all the prompt's others; the
    # prompt still lists every candidate, and evaluation scores them all): a seeded draw per sample
    train_negatives: int | None = None
    # the teacher's scores of the prompt's candidates as a soft target beside the ground truth:
    # distill_weight * T^2 * KL(softmax(teacher / T) || softmax(verbalizer / T)); 0 keeps the plain loss
    distill_weight: float = 0.0
    distill_temperature: float = 2.0
    label_weight: float = 1.0  # the ground truth's cross-entropy weight (0: learn from the teacher alone)
    # the weights the valid evaluations score with: `float` (as trained) or `int8` (a merged copy
    # with int8 linear layers, llm/quantize.py: faster on the CPU, rankings within rounding)
    eval_weights: str = "float"
    # score the untrained model on the valid rows first (a reference point of the curve only: it
    # never competes for the best); off saves one valid evaluation
    eval_at_start: bool = runtime(True)
    patience: int = 3  # evaluations without a better valid NDCG@5
    # > 0: keep the adapter every so many steps and at the last as snapshots/examples-NNNNNN/
    # (loadable by finetuned_scorer, costs no evaluation): benchmarks/budget_curve.py scores them
    snapshot_every: int = runtime(0)

    def __post_init__(self):
        super().__post_init__()
        if self.method not in methods.stage2_methods():
            raise ValueError(f"unknown stage-2 method {self.method!r}{closest(self.method, methods.stage2_methods())}; "
                             f"choose one of {methods.stage2_methods()} (delrec.methods)")
        if self.adapter_init not in ADAPTER_INITS:
            raise ValueError(f"unknown adapter_init {self.adapter_init!r}; choose one of {ADAPTER_INITS}")
        if self.adapter not in ADAPTERS:
            raise ValueError(f"unknown adapter {self.adapter!r}{closest(self.adapter, ADAPTERS)}; choose one of {ADAPTERS}")
        if not 0 < self.target_r < self.init_r:
            # peft's rank allocator fails inside torch.kthvalue otherwise
            raise ValueError(f"AdaLoRA needs 0 < target_r < init_r, got target_r {self.target_r}, init_r {self.init_r}")
        if not (0 <= self.tinit < 1 and 0 <= self.tfinal < 1 and self.tinit + self.tfinal < 1):
            raise ValueError(f"tinit and tfinal are fractions of the steps with tinit + tfinal < 1, got {self.tinit}, {self.tfinal}")
        if self.delta_t < 1 or self.lora_r < 1 or self.lora_alpha <= 0 or not 0 <= self.lora_dropout < 1:
            raise ValueError(f"need delta_t >= 1, lora_r >= 1, lora_alpha > 0 and 0 <= lora_dropout < 1, got {self.delta_t}, "
                             f"{self.lora_r}, {self.lora_alpha}, {self.lora_dropout}")
        if isinstance(self.target_modules, str):
            if self.target_modules not in TARGET_SHORTHANDS:
                raise ValueError(f"target_modules {self.target_modules!r}: a list of module names or one of {TARGET_SHORTHANDS}")
        elif self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        if self.adapter_layers is not None and self.adapter_layers < 1:
            raise ValueError(f"adapter_layers must be at least 1 (or null for every layer), got {self.adapter_layers}")
        if self.train_negatives is not None and self.train_negatives < 1:
            raise ValueError(f"train_negatives must be at least 1 (or null for all), got {self.train_negatives}")
        if self.distill_weight < 0 or self.distill_temperature <= 0 or self.label_weight < 0:
            raise ValueError(f"need distill_weight >= 0, distill_temperature > 0 and label_weight >= 0, got "
                             f"{self.distill_weight}, {self.distill_temperature}, {self.label_weight}")
        if not self.label_weight and not self.distill_weight:
            raise ValueError("label_weight and distill_weight are both 0: the loss has nothing to learn from")
        if self.distill_weight and self.objective != "candidates":
            raise ValueError("the distillation term (distill_weight > 0) needs objective `candidates` (every candidate scored)")
        if self.eval_weights not in WEIGHTS:
            raise ValueError(f"unknown eval_weights {self.eval_weights!r}; choose one of {WEIGHTS}")
        self.options = methods.get(self.method).check_options(self.options)

    @staticmethod
    def upgrade_recorded(recorded: dict) -> dict:
        """A stage-2 folder's recorded settings in today's form (delrec.core.settings.same_identity):
        earlier delrec called the method `variant`, and kept LLaRA's options and teacher-list's
        list size as fields of their own."""
        recorded = dict(recorded)
        if "variant" in recorded and "method" not in recorded:
            recorded["method"] = recorded.pop("variant")
        if "teacher_list_size" in recorded:  # teacher-list's list size, now its option `list_size`
            size = recorded.pop("teacher_list_size")
            if FinetuneConfig.method_of(recorded) == "teacher-list" and "list_size" not in recorded.get("options", {}):
                recorded["options"] = {**recorded.get("options", {}), "list_size": size}
        if "options" not in recorded:
            former = {f.name for m in methods.METHODS.values() if m.options_cls for f in fields(m.options_cls)}
            flat = {k: recorded.pop(k) for k in former & set(recorded)}
            method = methods.METHODS.get(recorded.get("method", "delrec"))
            if method is not None and method.options_cls is not None:
                own = {f.name for f in fields(method.options_cls)}
                recorded["options"] = method.check_options({k: v for k, v in flat.items() if k in own})
        return recorded

    @staticmethod
    def method_of(recorded: dict) -> str:
        """The method a stage-2 folder's config.json names (older folders call it `variant`)."""
        return recorded.get("method", recorded.get("variant", "delrec"))

    # settings of one adapter only: a run of the other does not read them
    ADALORA_ONLY = ("init_r", "target_r", "tinit", "tfinal", "delta_t", "orth_reg_weight", "adapter_init", "relative_lr",
                    "vector_lr_scale")
    LORA_ONLY = ("lora_r", "lora_alpha", "lora_dropout")

    @staticmethod
    def unread(settings: dict) -> set[str]:
        """The settings a stage-2 run with `settings` (a to_dict) does not read, which its identity
        leaves out (delrec.core.settings.same_identity): the soft prompt's length unless the method
        draws an untrained one (`usp`), the other adapter's settings, the distillation temperature
        without the term."""
        method = methods.METHODS.get(FinetuneConfig.method_of(settings))
        out = set(FinetuneConfig.ADALORA_ONLY if settings.get("adapter", "lora") == "lora" else FinetuneConfig.LORA_ONLY)
        if method is not None and method.soft_prompt_source != "untrained":
            out.add("soft_tokens")
        if not settings.get("distill_weight"):
            out.add("distill_temperature")
        return out

    def to_dict(self) -> dict:
        """The settings as a stage-2 folder's config.json records them (and a checkpoint must match),
        with what the method records beside them (Method.recorded_settings: LlamaRec's candidate order)."""
        d = asdict(self)
        if d["target_modules"] is not None and not isinstance(d["target_modules"], str):
            d["target_modules"] = list(d["target_modules"])
        if self.method in methods.METHODS:
            d.update(methods.get(self.method).recorded_settings())
        return d


@dataclass
class DistillConfig(StageConfig):
    # the shared fields (StageConfig) with stage 1's defaults: Lion at the paper's rate for the soft prompt
    lr: float = 5e-3
    weight_decay: float = 1e-5
    eval_every: int = 50
    # stage 1's own
    top_h: int = DEFAULT_TOP_H
    ta_examples: int = 4  # in-context examples (4 for MovieLens and Beauty, 6 for Steam, Home & Kitchen)
    tasks: tuple[str, ...] = ("ta", "rps")  # ("rps",) is `w/o TA`, ("ta",) is `w/o RPS`
    soft_init: str = "random"  # the soft prompt's start (SoftPrompt.INITS): random, or sampled vocabulary embeddings
    weighting: str = "inverse-grad-norm"
    fixed_weights: dict = field(default_factory=lambda: {"ta": 1.0, "rps": 1.0})
    update_llm: bool = False  # `w UDPSM`: the LLM is trained in stage 1 too
    llm_lr: float = 1e-5
    valid_lsr_samples: int = 0  # > 0: each evaluation also scores this many valid samples with the LSR prompt (`w/o LSR`)
    # RPS with the teacher's scores of its top-h as a soft target beside the top-1 label:
    # rps_distill_weight * T^2 * KL(softmax(teacher / T) || softmax(LLM / T)) (0: the paper's top-1 only)
    rps_distill_weight: float = 0.0
    rps_distill_temperature: float = 2.0
    # 0: the paper's soft prompt, in the input only; k > 0: a deep prompt with its own vectors at the
    # input of each of the top k layers (llm/soft_prompt.py); below every layer, only those train
    soft_depth: int = 0

    def __post_init__(self):
        super().__post_init__()
        self.tasks = tuple(self.tasks)
        if not self.tasks or set(self.tasks) - {"ta", "rps"}:
            raise ValueError(f"tasks must be a non-empty subset of ('ta', 'rps'), got {self.tasks}")
        if self.soft_depth < 0:
            raise ValueError(f"soft_depth must be 0 (input-only soft prompt) or a number of top layers, got {self.soft_depth}")
        if self.soft_depth and self.update_llm:
            raise ValueError("a deep soft prompt (soft_depth) and `w UDPSM` (update_llm) do not go together")
        if self.rps_distill_weight < 0 or self.rps_distill_temperature <= 0:
            raise ValueError(f"need rps_distill_weight >= 0 and rps_distill_temperature > 0, got {self.rps_distill_weight}, "
                             f"{self.rps_distill_temperature}")
        if self.rps_distill_weight and ("rps" not in self.tasks or self.objective != "candidates"):
            raise ValueError("rps_distill_weight needs the RPS task and objective `candidates` (every listed item scored)")
        if self.soft_init not in SOFT_INITS:
            raise ValueError(f"unknown soft_init {self.soft_init!r}; choose one of {SOFT_INITS}")

    @staticmethod
    def unread(settings: dict) -> set[str]:
        """The settings a stage-1 run with `settings` (a to_dict) does not read, which its identity
        leaves out (delrec.core.settings.same_identity): a task's own settings without the task,
        the fixed weights under another weighting, the LLM's rate unless `w UDPSM` trains it, the
        RPS target's temperature without its weight."""
        tasks = set(settings.get("tasks", ("ta", "rps")))
        out = set()
        if "ta" not in tasks:
            out.add("ta_examples")
        if "rps" not in tasks:
            out |= {"top_h", "rps_distill_weight", "rps_distill_temperature"}
        if not settings.get("rps_distill_weight"):
            out.add("rps_distill_temperature")
        if settings.get("weighting", "inverse-grad-norm") != "fixed":
            out.add("fixed_weights")
        if not settings.get("update_llm"):
            out.add("llm_lr")
        return out

    def to_dict(self) -> dict:
        """The settings as config.json records them (and a checkpoint must match)."""
        d = asdict(self)
        d["tasks"] = list(d["tasks"])
        return d
