import numpy as np
import pytest

from cst import _core
from conftest import rel_err

SHAPES = [(1, 1, 1), (1, 7, 3), (5, 16, 9), (33, 64, 17), (64, 96, 130), (3, 577, 40), (130, 40, 257)]


@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_matmul_forward_matches_float64(simd, rng, N, C, OC):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    out = np.full((N, OC), np.nan, np.float32)
    _core.matmul_forward(out, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert rel_err(out, ref) < 1e-5
    prev = out.copy()
    _core.matmul_forward(out, x, w, accumulate=True)
    assert rel_err(out, prev + ref) < 1e-5


@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_matmul_backward_matches_float64(simd, rng, N, C, OC):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    dx0 = rng.standard_normal((N, C)).astype(np.float32)
    dw0 = rng.standard_normal((OC, C)).astype(np.float32)
    dx, dw = dx0.copy(), dw0.copy()
    _core.matmul_backward(dx, dw, dy, x, w)
    d64 = dy.astype(np.float64)
    assert rel_err(dx - dx0, d64 @ w.astype(np.float64)) < 1e-5
    assert rel_err(dw - dw0, d64.T @ x.astype(np.float64)) < 1e-5
    only_dx = dx0.copy()
    _core.matmul_backward(only_dx, None, dy, x, w)
    np.testing.assert_array_equal(only_dx, dx)


def test_matmul_rejects_bad_input():
    x = np.zeros((4, 8), np.float32)
    w = np.zeros((3, 8), np.float32)
    out = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="'inp'.*float32"):
        _core.matmul_forward(out, x.astype(np.float64), w)
    with pytest.raises(ValueError, match="'weight'"):
        _core.matmul_forward(out, x, np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="'out'"):
        _core.matmul_forward(np.zeros((4, 4), np.float32), x, w)
    with pytest.raises(ValueError, match="C-contiguous"):
        _core.matmul_forward(out, np.zeros((8, 4), np.float32).T, w)
    with pytest.raises(ValueError, match="dimensions"):
        _core.matmul_forward(out, x[None], w)
    with pytest.raises(TypeError, match="ndarray"):
        _core.matmul_forward(out, [[1.0]], w)
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.matmul_forward(ro, x, w)


def test_simd_path_control():
    paths = _core.simd_supported()
    assert paths[0] == "scalar"
    before = _core.simd_path()
    try:
        for p in paths:
            _core.set_simd_path(p)
            assert _core.simd_path() == p
    finally:
        _core.set_simd_path(before)
    with pytest.raises(ValueError, match="unknown path"):
        _core.set_simd_path("sse9")
