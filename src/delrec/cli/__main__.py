"""`python -m delrec.cli ...`: the `delrec` command, as `accelerate launch -m delrec.cli` starts it."""

import sys

from delrec.cli import main

if __name__ == "__main__":
    sys.exit(main())
