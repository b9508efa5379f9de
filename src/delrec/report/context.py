"""What the report's sections share, read once from the run folder (ReportContext)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from delrec import methods
from delrec.config import PipelineConfig
from delrec.core.io import read_json
from delrec.core.layout import RunLayout
from delrec.core.names import ModelName
from delrec.data.store import RunData
from delrec.report.paper_numbers import PAPER_ML100K
from delrec.teachers import display_name


@dataclass(frozen=True)
class ReportContext:
    """What the sections share, read once from the run folder."""

    run: Path
    config: PipelineConfig
    teachers: tuple[str, ...]
    evals: dict  # model name -> its RUN/eval/pipeline/<name>.json, in the config's model order
    full: dict  # model name -> its full-catalogue evaluation (RUN/eval/pipeline/full-catalogue/), where made
    orders: dict  # model name -> its evaluation in other candidate orders (RUN/eval/pipeline/orders/), where made
    data: RunData
    stats: dict  # data/stats.json
    protocol: dict  # data/protocol.json
    paper: dict  # the paper's numbers by model name: PAPER_ML100K on ml-100k, none on other data sets
    rows: np.ndarray  # the test rows every model scored
    steps: list[dict]  # pipeline.json's steps but the report's own

    @classmethod
    def load(cls, run: Path, config=None) -> ReportContext:
        c = config or PipelineConfig.from_run(run)
        layout = RunLayout(run)
        summary = layout.pipeline_summary
        steps = [e for e in read_json(summary)["steps"] if e["step"] != "report"] if summary.exists() else []
        paths = {name: layout.pipeline_eval(name) for name, _ in c.models()}
        evals = {name: read_json(path) for name, path in paths.items() if path.exists()}
        other = {kind: {name: read_json(layout.pipeline_eval(name, kind)) for name in evals
                        if layout.pipeline_eval(name, kind).exists()} for kind in RunLayout.EVAL_KINDS}
        rows = np.asarray(next(iter(evals.values()))["settings"]["rows"]) if evals else np.zeros(0, dtype=int)
        return cls(run, c, tuple(c.teachers), evals, other["full-catalogue"], other["orders"], RunData.load(layout.data),
                   read_json(layout.data / "stats.json"), read_json(layout.data / "protocol.json"),
                   PAPER_ML100K if c.dataset == "ml-100k" else {}, rows, steps)

    @property
    def layout(self) -> RunLayout:
        return RunLayout(self.run)

    def model(self, name: str) -> ModelName:
        """`name` split as this run's: bare unless its first part is one of the run's teachers."""
        return ModelName.parse(name, self.teachers)

    def method(self, name: str) -> methods.Method | None:
        """The registered method of a model `<teacher>-<method>` of this run (None for the others)."""
        return methods.METHODS.get(self.model(name).method)

    def label(self, name: str) -> str:
        """The model's name in the report's tables: DELRec(SASRec), w/o SP (SASRec), zero-shot LLM, SASRec."""
        model = self.model(name)
        if model.method in methods.METHODS:
            return methods.get(model.method).report_label(display_name(model.teacher))
        if name in self.teachers:
            return display_name(name)
        return {"zero-shot": "zero-shot LLM"}.get(name, name)

    def table2_name(self, name: str) -> str:
        """Its name among Table II's rows: the paper's row names for a baseline method (LlamaRec
        (SASRec)), a teacher's own name for a teacher row (LLM2BERT4Rec, KDALRD), else its label."""
        method = self.method(name)
        if method is None:
            return self.label(name)
        return method.table2_label(display_name(self.model(name).teacher))


# -- the sections, in the report's order ---------------------------------------------------------
