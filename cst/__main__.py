"""`python -m cst ...`: the same command line as the `cst` console script (cst.cli)."""
import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
