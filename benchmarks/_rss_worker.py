"""Runs `delrec ARGS` in one process of a benchmark launch, then records the process's peak RSS
(ru_maxrss) in $DELREC_BENCH_RSS_DIR/rss-<rank>.json. Torch threads: $DELREC_BENCH_THREADS."""

import json
import os
import resource
import sys
from pathlib import Path

import torch

torch.set_num_threads(int(os.environ.get("DELREC_BENCH_THREADS", "1")))

from delrec.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main(sys.argv[1:])
    out = Path(os.environ["DELREC_BENCH_RSS_DIR"]) / f"rss-{os.environ.get('RANK', '0')}.json"
    out.write_text(json.dumps({"maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
    sys.exit(code)
