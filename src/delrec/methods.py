"""The methods `delrec` trains and evaluates: DELRec, its ablations (paper Section V-D) and the
LLM-based baselines of the paper's Table II that fit one harness, one entry each. The pipeline,
stage 2, the scorer factory, the CLI and the report read this table, so a new variant is one
`register(Method(...))` plus the code that is really new.

Each method says
* what stage 1 gives it: the teacher's shared distillation (`shared`), a distillation of its own
  with other settings (`own`, with `stage1_settings`), or nothing (`none`);
* where its soft prompt comes from: stage 1 (`distilled`), a random one of the same size
  (`untrained`), or none (`none`);
* its recommendation prompt (`prompt`): the LSR prompt with the soft prompt in its slot (`lsr`), with
  the slot left empty (`empty-slot`), with a hand-written description of the teacher in it
  (`model-card`), the plain prompt without slot or instruction (`plain`), the plain prompt with the
  teacher's top-h list written in as text (`teacher-list`), the candidates listed under index
  letters (A), (B), ... (`lettered`, LlamaRec), the plain prompt with one item vector after each title, the teacher's item embedding mapped into the LLM by a projector trained in stage 2 (`hybrid`, LLaRA;
  llm/item_projector.py), or no prompt at all (`none`: the similarity ranker);
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
"""

from __future__ import annotations

from dataclasses import dataclass, field

from delrec.settings import closest

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
    soft_prompt: str = "distilled"
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
        for value, allowed, what in ((self.stage1, STAGE1, "stage1"), (self.soft_prompt, SOFT_PROMPTS, "soft_prompt"),
                                     (self.prompt, PROMPTS, "prompt"), (self.ranker, RANKERS, "ranker"),
                                     (self.candidate_order, CANDIDATE_ORDERS, "candidate_order")):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {what} must be one of {allowed}, got {value!r}")
        if (self.soft_prompt == "distilled") != (self.stage1 != "none"):
            raise ValueError(f"method {self.name!r}: a distilled soft prompt needs a stage 1, and only it does")
        if (self.soft_prompt == "none") != (self.prompt != "lsr"):
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

    def stage1_folder(self, teacher: str) -> str | None:
        """The RUN/distill/ folder its soft prompt comes from (None: no stage 1)."""
        return {"shared": teacher, "own": f"{teacher}-{self.name}", "none": None}[self.stage1]

    def report_label(self, teacher: str) -> str:
        return f"DELRec({teacher})" if self.name == "delrec" else f"{self.label} ({teacher})"

    def table2_label(self, teacher: str) -> str:
        """Its label among the paper's Table II rows: the paper's names for it, and its ablation
        name too when it is also an ablation ("LLMSEQPROMPT = w/o SP (sasrec)")."""
        if not self.paper_rows:
            return self.report_label(teacher)
        names = " / ".join(self.paper_rows)
        return f"{names} = {self.label} ({teacher})" if self.ablation else f"{names} ({teacher})"


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


# DELRec and its ablations (paper Table III and Section V-D), in the paper's order
register(Method("delrec", "DELRec", "stage 1 distils the teacher into a soft prompt; stage 2 fine-tunes the LLM with it"))
register(Method("wo-ta", "w/o TA", "stage 1 without the Temporal Analysis task", stage1="own",
                stage1_settings={"tasks": ("rps",)}))
register(Method("wo-rps", "w/o RPS", "stage 1 without the Recommendation Pattern Simulating task", stage1="own",
                stage1_settings={"tasks": ("ta",)}))
register(Method("wo-lsr", "w/o LSR", "no stage 2: the frozen LLM with the distilled soft prompt", stage2=False))
register(Method("ulsr", "w ULSR", "stage 2 also updates the soft prompt", train_soft_prompt=True))
register(Method("udpsm", "w UDPSM", "stage 1 also updates the LLM; stage 2 starts from that LLM", stage1="own",
                stage1_settings={"update_llm": True}, stage2_from_stage1_llm=True))
register(Method("usp", "w USP", "an untrained soft prompt of the same size in place of the distilled one",
                stage1="none", soft_prompt="untrained"))
register(Method("wo-dpsm", "w/o DPSM", "no stage 1: the soft-prompt slot left empty", stage1="none", soft_prompt="none",
                prompt="empty-slot"))
register(Method("mcp", "w MCP", "a hand-written description of the teacher in place of the soft prompt", stage1="none",
                soft_prompt="none", prompt="model-card"))
register(Method("wo-sp", "w/o SP", "the plain recommendation prompt fine-tuned, without soft prompt or instruction "
                "(LLMSEQPROMPT in the paper's Table II)", stage1="none", soft_prompt="none", prompt="plain",
                paper_rows=("LLMSEQPROMPT",)))

# The other LLM-based baselines of the paper's Table II that run on the same harness: the same
# run folder, fixed candidates, backbone and (where they train) stage 2. docs/baselines.md says
# what each original does and where ours differs.
register(Method("teacher-list", "teacher list in prompt, RecRanker / LLM-TRSR style",
                "the teacher's top-h recommendations written into the plain prompt as text, fine-tuned as in stage 2 "
                "(the first paradigm: RecRanker, Luo et al. 2023/2024; LLM-TRSR, Zheng et al. WWW 2024)",
                stage1="none", soft_prompt="none", prompt="teacher-list", ablation=False, paper_rows=("RecRanker", "LLM-TRSR")))
register(Method("llamarec", "LlamaRec",
                "the candidates listed in the teacher's order (its retrieval stage) under index letters (A), (B), ...; "
                "each scored by the LM head's log-probability "
                "of its letter at the answer position, one forward pass per prompt; fine-tuned as in stage 2 "
                "(LlamaRec, Yue et al. 2023)", stage1="none", soft_prompt="none", prompt="lettered", ranker="letters",
                candidate_order="teacher", ablation=False, paper_rows=("LlamaRec",)))
register(Method("llara", "LLaRA",
                "the teacher's item embeddings, frozen, mapped by a trained two-layer MLP into the LLM's input space, one "
                "item vector after each title of the history and the candidates (the hybrid prompt), with a curriculum "
                "from text-only to hybrid prompts; the projector trained with the adapters in stage 2 (LLaRA, Liao et al. "
                "SIGIR 2024)", stage1="none", soft_prompt="none", prompt="hybrid", ablation=False, paper_rows=("LLaRA",)))
register(Method("llmseqsim", "LLMSEQSIM",
                "no training: candidates ranked by the cosine similarity of their title embedding (the backbone's mean-pooled "
                "last hidden states) to the mean embedding of the history's titles (LLMSEQSIM, Harte et al. RecSys 2023)",
                stage1="none", soft_prompt="none", prompt="none", ranker="similarity", stage2=False, ablation=False,
                paper_rows=("LLMSEQSIM",)))
