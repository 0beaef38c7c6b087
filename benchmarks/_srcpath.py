"""Which `cst` the benchmarks import: this checkout's source tree when it holds a built extension
(`python setup.py build_ext --inplace`), otherwise whatever is installed. Putting the tree first
unconditionally breaks a clone with a regular install, whose tree has no compiled `_core`."""
import glob
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def prefer_built_source_tree():
    """Puts the repository root first on sys.path if cst/_core*.so (or .pyd) was built in place."""
    if glob.glob(os.path.join(ROOT, "cst", "_core*.so")) + glob.glob(os.path.join(ROOT, "cst", "_core*.pyd")):
        if ROOT not in sys.path:
            sys.path.insert(0, ROOT)
