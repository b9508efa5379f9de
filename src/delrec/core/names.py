"""A run's model names, split once: `<teacher>-<method>` or a bare name.

A run names each model it evaluates (RUN/eval/pipeline/<name>.json, RUN/finetune/<name>/): a
teacher (`sasrec`), a reference (`popularity`, `random`, `zero-shot`), or an LLM trained or
prompted through one teacher by a method of delrec.methods (`sasrec-delrec`, `sasrec-wo-sp`,
`gru4rec-teacher-list`). The first "-" separates teacher and method; the method may hold more.

    ModelName.parse("sasrec-wo-sp")                     # ModelName(teacher="sasrec", method="wo-sp")
    ModelName.parse("sasrec")                           # ModelName(teacher="sasrec", method=""): bare
    ModelName.parse("zero-shot")                        # ModelName(teacher="zero", method="shot")!
    ModelName.parse("zero-shot", teachers=["sasrec"])   # ModelName(teacher="zero-shot", method=""): bare
    str(ModelName.parse(name, teachers)) == name        # for every name a run gives

Without `teachers` the split is purely textual, so check the method (`method in
delrec.methods.METHODS`) before trusting it. With the run's `teachers` a name whose first part is
none of them is bare, whole in `teacher` (which then is the model's name, not a teacher): that
is how the report tells `zero-shot` from a method of a teacher `zero`. The module imports nothing
of delrec, so every other module may use it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class ModelName:
    teacher: str  # the part before the first "-"; a bare name whole
    method: str = ""  # the part after it ("" for a bare name): a name in delrec.methods.METHODS, if registered

    @classmethod
    def parse(cls, name: str, teachers: Iterable[str] | None = None) -> ModelName:
        """`name` split at its first "-"; bare when it has none, or when `teachers` is given and
        its first part is not one of them."""
        teacher, _, method = name.partition("-")
        if teachers is not None and teacher not in teachers:
            return cls(name)
        return cls(teacher, method)

    @property
    def bare(self) -> bool:
        """A teacher or reference on its own (no method through a teacher)."""
        return not self.method

    def __str__(self) -> str:
        return f"{self.teacher}-{self.method}" if self.method else self.teacher
