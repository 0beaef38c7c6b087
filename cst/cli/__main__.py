"""`python -m cst.cli`: the `cst` command (cst.cli.main)."""
import sys

from . import main

sys.exit(main())
