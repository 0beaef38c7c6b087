"""Process-wide settings of the native core: OpenMP threads and the SIMD path."""
import os

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


# Default: the cores this process may run on, unless OMP_NUM_THREADS says otherwise.
if not os.environ.get("OMP_NUM_THREADS"):
    set_num_threads(_available_cores())
