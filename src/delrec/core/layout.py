"""The run folder's layout: the one place that knows where each step of a run keeps its files.

Every step reads and writes a run folder (RUN/), and the folder is the contract between them:

  RUN/config.yaml                   the experiment's settings (`delrec run`)
  RUN/data/                         the prepared data: samples, split, fixed candidates (delrec.data.protocol)
  RUN/teachers/<teacher>/           a trained teacher: weights, metrics, topk.parquet
  RUN/distill/<stage 1 name>/       stage 1: the soft prompt (and, under `w UDPSM`, the updated LLM in llm/)
  RUN/finetune/<model name>/        stage 2: the adapter (adapter/), metrics, snapshots/
  RUN/eval/pipeline/<model>.json    `delrec run`'s test evaluation of each model (and, when the
                                    config asks, full-catalogue/<model>.json and orders/<model>.json)
  RUN/eval/<tag>.<split>.json       `delrec evaluate`'s
  RUN/pipeline.json                 the steps `delrec run` ran, with their seconds and memory
  RUN/report.md, curves.json, figures/   the report
  RUN/shared/<seed part>/           a sweep's data and teachers, shared by its points (delrec.experiments)

A step asks `RunLayout(run)` for its paths instead of joining these names itself (a test checks
that no other module does), so the layout can change in one place.
"""

from __future__ import annotations

from pathlib import Path

SNAPSHOTS = "snapshots"  # RUN/finetune/<name>/snapshots/examples-NNNNNN/: the adapter every `snapshot_every` steps


class RunLayout:
    """The paths of one run folder."""

    # the steps' folder names (also read where a path is recognised as a teacher's or a stage's)
    TEACHERS, STAGE1, STAGE2, EVAL = "teachers", "distill", "finetune", "eval"

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def __repr__(self) -> str:
        return f"RunLayout({str(self.root)!r})"

    # the experiment and its data
    @property
    def config(self) -> Path:
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        return self.root / "data"

    # the training steps, each a folder of its own
    @property
    def teachers(self) -> Path:
        return self.root / self.TEACHERS

    def teacher(self, name: str) -> Path:
        return self.teachers / name

    @property
    def stage1_runs(self) -> Path:
        return self.root / self.STAGE1

    def stage1(self, name: str) -> Path:
        return self.stage1_runs / name

    def soft_prompt(self, stage1: str) -> Path:
        return self.stage1(stage1) / "soft_prompt.safetensors"

    def stage1_llm(self, stage1: str) -> Path:
        """`w UDPSM`'s LLM, updated in stage 1 (a model folder)."""
        return self.stage1(stage1) / "llm"

    @property
    def stage2_runs(self) -> Path:
        return self.root / self.STAGE2

    def stage2(self, name: str) -> Path:
        return self.stage2_runs / name

    @staticmethod
    def snapshot_name(examples: int) -> str:
        return f"examples-{examples:06d}"

    # evaluations and the report
    @property
    def pipeline_evals(self) -> Path:
        return self.root / self.EVAL / "pipeline"

    # the kinds of test evaluation besides the 15 candidates (`delrec run`'s `full_ranking:` and
    # `candidate_orders:`), each a folder of one JSON per model beside the models' own files
    EVAL_KINDS = ("full-catalogue", "orders")

    def pipeline_eval(self, model: str, kind: str | None = None) -> Path:
        """The test evaluation of `model`: on the fixed candidates, or of another `kind` (EVAL_KINDS)."""
        if kind is None:
            return self.pipeline_evals / f"{model}.json"
        if kind not in self.EVAL_KINDS:
            raise ValueError(f"unknown evaluation kind {kind!r}; choose one of {self.EVAL_KINDS}")
        return self.pipeline_evals / kind / f"{model}.json"

    def cli_eval(self, tag: str, split: str) -> Path:
        return self.root / self.EVAL / f"{tag}.{split}.json"

    @property
    def pipeline_summary(self) -> Path:
        return self.root / "pipeline.json"

    @property
    def report(self) -> Path:
        return self.root / "report.md"

    @property
    def curves(self) -> Path:
        return self.root / "curves.json"

    @property
    def figures(self) -> Path:
        return self.root / "figures"

    @property
    def results(self) -> tuple[Path, ...]:
        """The folders of what the steps made from the data (stale once the data changes)."""
        return self.teachers, self.stage1_runs, self.stage2_runs, self.root / self.EVAL

    def shared(self, part: str) -> RunLayout:
        """A sweep's folder of what its points share (its data and teachers), laid out as a run."""
        return RunLayout(self.root / "shared" / part)
