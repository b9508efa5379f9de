"""Do two `delrec run` folders hold the same results? For checking that a refactor changes nothing.

    python benchmarks/compare_runs.py RUN_A RUN_B

Compares, for every model both runs evaluated (RUN/eval/pipeline/*.json), the per-sample ranks;
and for every tensor file both runs wrote (teachers, soft prompts, adapters: *.safetensors), the
tensors (values, not bytes: safetensors writes its metadata in an arbitrary order). Prints a table
and exits 1 when anything differs.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()

    import torch
    from safetensors.torch import load_file

    rows, differ = [], False
    evals = sorted({q.name for q in (args.a / "eval" / "pipeline").glob("*.json")}
                   & {q.name for q in (args.b / "eval" / "pipeline").glob("*.json")})
    for name in evals:
        ea, eb = (json.loads((run / "eval" / "pipeline" / name).read_text()) for run in (args.a, args.b))
        same = ea["ranks"] == eb["ranks"] and ea["settings"]["rows"] == eb["settings"]["rows"]
        differ |= not same
        rows.append((f"eval {name[:-5]}", "same ranks" if same else "DIFFERENT ranks",
                     f"NDCG@5 {ea['candidates']['NDCG@5']:.4f} / {eb['candidates']['NDCG@5']:.4f}"))
    files = sorted({q.relative_to(args.a) for q in args.a.rglob("*.safetensors")}
                   & {q.relative_to(args.b) for q in args.b.rglob("*.safetensors")})
    for rel in files:
        ta, tb = load_file(str(args.a / rel)), load_file(str(args.b / rel))
        same = ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
        differ |= not same
        rows.append((str(rel), "same tensors" if same else "DIFFERENT tensors", f"{len(ta)} tensors"))
    if not rows:
        print("nothing to compare: no evaluation or tensor file in both folders")
        return 1
    width = max(len(r[0]) for r in rows)
    for r in rows:
        print(f"{r[0]:{width}s}  {r[1]:18s}  {r[2]}")
    print("\nDIFFERENT" if differ else f"\nsame: {len(evals)} evaluations, {len(files)} tensor files")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
