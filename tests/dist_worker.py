"""One process of a multi-process launch in tests/test_distributed.py: runs `delrec` with the given
arguments, as `accelerate launch ... -m delrec.cli ARGS` would.

    dist_worker.py [--crash-after-checkpoints N] ARGS...

--crash-after-checkpoints N: the main process dies (os._exit) right after writing its Nth stage
checkpoint, as a killed run would; the launcher then tears the other process down.
"""

import os
import sys

import torch

torch.set_num_threads(1)  # two processes on two cores


def _crash_after(n: int) -> None:
    from delrec.training.folder import StageFolder

    count = {"n": 0}
    original = StageFolder.checkpoint

    def wrapped(*args, **kwargs):
        original(*args, **kwargs)
        count["n"] += 1
        if count["n"] >= n and int(os.environ.get("RANK", "0")) == 0:
            os._exit(17)

    StageFolder.checkpoint = wrapped


def main() -> int:
    argv = sys.argv[1:]
    if argv[:1] == ["--crash-after-checkpoints"]:
        _crash_after(int(argv[1]))
        argv = argv[2:]
    from delrec.cli import main as delrec_main

    return delrec_main(argv)


if __name__ == "__main__":
    sys.exit(main())
