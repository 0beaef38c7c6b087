"""Process-wide settings of the native core: OpenMP threads and the SIMD path; and whether progress
bars have anyone to show them to."""
import os
import sys

from .. import _core


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
_blas = {"modules": -1, "calls": []}


def _openblas_shutdowns():
    """blas_thread_shutdown_ of every OpenBLAS loaded in this process (NumPy's, SciPy's, ...), found in
    /proc/self/maps; looked up again whenever more modules have been imported. Linux only."""
    import ctypes
    import sys
    if _blas["modules"] == len(sys.modules):
        return _blas["calls"]
    calls, seen = [], set()
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1] if "/" in line else ""
                if "openblas" in os.path.basename(path).lower() and path not in seen:
                    seen.add(path)
                    fn = getattr(ctypes.CDLL(path), "blas_thread_shutdown_", None)
                    if fn is not None:
                        calls.append(fn)
    except OSError:
        pass
    _blas["modules"], _blas["calls"] = len(sys.modules), calls
    return calls


def release_blas_threads() -> int:
    """Stops the worker threads of every OpenBLAS in the process (NumPy's matmul leaves them spinning for
    a while after each call, on the cores cst's OpenMP threads need: measured to halve cst's GEMMs). The
    next BLAS call starts them again (OpenBLAS does so itself). Model calls this before its forward and
    backward passes unless CST_KEEP_BLAS_THREADS=1. Returns the number of libraries told."""
    calls = _openblas_shutdowns()
    for fn in calls:
        fn()
    return len(calls)


def _release_blas_threads_if_allowed():
    if os.environ.get("CST_KEEP_BLAS_THREADS") != "1":
        release_blas_threads()


# Default: the cores this process may run on, unless OMP_NUM_THREADS says otherwise.
if not os.environ.get("OMP_NUM_THREADS"):
    set_num_threads(_available_cores())
