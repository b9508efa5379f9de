"""The `delrec` command: `main` runs a subcommand (its options in delrec.cli.parser, what it does
in delrec.cli.commands) and turns expected failures into one clear line."""

from __future__ import annotations

import errno
import logging
import os
import sys
from pathlib import Path

from delrec.cli.commands import cmd_data_prepare, cmd_evaluate
from delrec.cli.parser import build_parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    level = logging.DEBUG if args.verbose else logging.INFO
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
        # under `accelerate launch` the main process speaks for all: the others only warn
        level, sys.stdout = logging.WARNING, open(os.devnull, "w")
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    try:
        # commands that write into a run folder hold its lock (delrec.core.locks); `run`, `teacher
        # train`, `distill`, `finetune` and `report` take it inside the library functions
        writes_into = {cmd_data_prepare: "out", cmd_evaluate: "run"}.get(args.func)
        if writes_into and (writes_into == "out" or Path(args.run).is_dir()):  # a missing run: the command says so
            from delrec.core.locks import remove_if_empty, run_lock

            folder = Path(getattr(args, writes_into))
            created = not folder.exists()
            folder.mkdir(parents=True, exist_ok=True)
            try:
                with run_lock(folder):
                    args.func(args)
            except BaseException:
                if created:  # a failed command leaves no run folder of its own behind (only its lock file is in it)
                    remove_if_empty(folder)
                raise
        else:
            args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError, RuntimeError) as err:
        # expected failures (bad input, missing files) end with one clear line, not a traceback
        if args.verbose:
            raise
        print(f"delrec: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT) or args.verbose:
            raise
        # every file is written aside and renamed (delrec.core.io): what was there before is intact
        print(f"delrec: error: no space left on the device ({err.filename or err.strerror}); the files written "
              "before are intact (the last checkpoint included): free some space and run the same command again "
              "to resume", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.verbose:
            raise
        print("delrec: interrupted; what was finished and the last checkpoint are kept: run the same command "
              "again to resume", file=sys.stderr)
        return 130
    from delrec.core import distributed

    distributed.shutdown()
    return 0

