"""`python -m moska ...`: the `moska` command, also as a module, so that launchers that run
modules can start it, e.g. `torchrun --nproc-per-node 2 -m moska serve MODEL
--tensor-parallel-size 2` (docs/distributed.md, "Process layout")."""

import sys

from moska.cli import main

if __name__ == "__main__":
    sys.exit(main())
