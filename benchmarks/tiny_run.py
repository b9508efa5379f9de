"""A tiny `delrec run` with every registered method, for checking that a refactor changes nothing.

    python benchmarks/tiny_run.py RUN          # before the change
    python benchmarks/tiny_run.py RUN2         # after it
    python benchmarks/compare_runs.py RUN RUN2 # identical ranks and tensors?

The inputs are the test suite's (tests/conftest.py): a sequential-rule data set of 60 users and 40
items and a random two-layer Llama (hidden 32, one token per index letter) saved as a model folder, so the run is
deterministic, needs no download, and takes about a minute on one CPU thread. Every method of
delrec.methods is a variant, with budgets of a few steps (as tests/test_pipeline.py's QUICK).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", type=Path, help="the run folder to write (its inputs go in RUN-inputs/)")
    args = p.parse_args()
    sys.path.insert(0, str(ROOT / "tests"))
    from conftest import write_pipeline_inputs
    from delrec import methods
    from delrec.cli import main as delrec
    from delrec.llm.templates import LETTERS
    from llm_helpers import DEFAULT_WORDS, tiny_llama_backbone

    inputs = args.run.with_name(args.run.name + "-inputs")
    if not (inputs / "tiny.yaml").exists():
        inputs.mkdir(parents=True, exist_ok=True)
        # one token per index letter, for LlamaRec's verbalizer (as tests/test_baselines.py's letter_llama)
        backbone = tiny_llama_backbone([*DEFAULT_WORDS, *LETTERS, "with", "its", "letter"])
        write_pipeline_inputs(inputs, backbone, "tiny.yaml", num_users=60, num_items=40, length=20)
    every = ", ".join(methods.METHODS)
    return delrec([
        "run", "--config", str(inputs / "tiny.yaml"), "--quiet", f"run_dir={args.run}", "teacher.max_epochs=2",
        "threads=1",
        "distill={soft_tokens: 4, steps: 3, batch_size: 2, valid_samples: 4, valid_lsr_samples: 4, eval_every: 1000}",
        # stage 2 named in full (the paper's AdaLoRA + Lion, not the library's defaults), so a change of
        # defaults leaves this run as it was
        "finetune={steps: 3, batch_size: 2, valid_samples: 4, eval_every: 2, adapter: adalora, init_r: 4, target_r: 2, "
        "optimizer: lion, lr: 0.02, warmup_steps: 1, lr_schedule: constant}",
        f"methods=[{every}]", "test_samples=12", "eval_batch_size=4",
    ])


if __name__ == "__main__":
    sys.exit(main())
