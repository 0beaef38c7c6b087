"""Process-wide settings of the native core: OpenMP threads and the SIMD path; and whether progress
bars have anyone to show them to."""
import os
import sys

from . import _core


def _available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def set_num_threads(n: int) -> None:
    """Set the number of OpenMP threads the kernels use (results do not depend on it)."""
    if isinstance(n, bool) or not isinstance(n, int):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    _core.set_num_threads(n)


def get_num_threads() -> int:
    return _core.get_num_threads()


def simd_path() -> str:
    """The SIMD path the kernels use now: 'avx512', 'avx2' or 'scalar' (CST_SIMD forces one)."""
    return _core.simd_path()


def interactive() -> bool:
    """True when progress bars have somewhere to go: stderr is a terminal, or a Jupyter kernel runs us.
    Logs and pipes (CI, `cst ... 2> log`) get no bars."""
    try:
        if sys.stderr is not None and sys.stderr.isatty():
            return True
    except (AttributeError, ValueError):  # replaced or closed stderr
        pass
    ipython = sys.modules.get("IPython")  # a Jupyter kernel's shell (importing ipykernel is not running one)
    shell = ipython.get_ipython() if ipython is not None and hasattr(ipython, "get_ipython") else None
    return type(shell).__name__ == "ZMQInteractiveShell"


# Default: the cores this process may run on, unless OMP_NUM_THREADS says otherwise.
if not os.environ.get("OMP_NUM_THREADS"):
    set_num_threads(_available_cores())
