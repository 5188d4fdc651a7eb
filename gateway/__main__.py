"""`python -m gateway`: the same as the `gateway` console script."""

import sys

from .cli import main

# Guarded: the parser workers are started with "spawn", which imports the main module
# again in each worker (as __mp_main__); that must not run a command.
if __name__ == "__main__":
    sys.exit(main())
