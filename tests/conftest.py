import os

import numpy as np
import pytest

# Two threads by default so that the suite exercises the OpenMP paths on CI's 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import cst  # noqa: E402
from cst import _core  # noqa: E402

SIMD_PATHS = _core.simd_supported()


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Runs a test once per SIMD path this CPU supports, restoring the default afterwards."""
    before = _core.simd_path()
    _core.set_simd_path(request.param)
    yield request.param
    _core.set_simd_path(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
