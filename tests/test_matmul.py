import numpy as np
import pytest

from cst import _core
from conftest import rel_err

# Covers the tile edges of every path (AVX-512 8x48, AVX2 6x16, scalar 4x16), the k block (256), the
# column block (512-576 + a tail), the tiny-N GEMV path (N <= 32), the first GEMM sizes (33+), the
# in-place-B path (N <= 2 MR), LoRA-like thin dimensions, and rows past the row block (~1024).
SHAPES = [(1, 1, 1), (1, 7, 3), (2, 5, 40), (3, 577, 40), (5, 16, 9), (16, 33, 70), (17, 31, 33),
          (28, 64, 47), (29, 300, 65), (33, 64, 17), (64, 96, 130), (130, 40, 257), (15, 256, 32),
          (100, 513, 31), (45, 20, 545), (40, 70, 50), (1, 600, 1100), (70, 8, 600), (64, 576, 8),
          (1045, 9, 35)]


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
    only_dw = dw0.copy()
    _core.matmul_backward(None, only_dw, dy, x, w)
    np.testing.assert_array_equal(only_dw, dw)


def test_matmul_backward_none_outputs_is_noop(rng):
    x = rng.standard_normal((4, 8)).astype(np.float32)
    w = rng.standard_normal((3, 8)).astype(np.float32)
    dy = rng.standard_normal((4, 3)).astype(np.float32)
    before = [a.copy() for a in (dy, x, w)]
    assert _core.matmul_backward(None, None, dy, x, w) is None
    for a, b in zip((dy, x, w), before):  # the inputs are read, never written
        np.testing.assert_array_equal(a, b)
    # Nothing to compute is no excuse to skip validation: a bad shape is still rejected.
    with pytest.raises(ValueError, match="dout"):
        _core.matmul_backward(None, None, dy[:, :2].copy(), x, w)


def test_matmul_edge_values(simd):
    # Zero-padded tails must not leak into outputs: NaN/inf only where the inputs put them.
    N, C, OC = 19, 37, 45
    x = np.ones((N, C), np.float32)
    w = np.ones((OC, C), np.float32)
    x[3, 5] = np.nan
    w[7, 2] = np.inf
    out = np.zeros((N, OC), np.float32)
    _core.matmul_forward(out, x, w)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    np.testing.assert_array_equal(np.isnan(out), np.isnan(ref))
    np.testing.assert_array_equal(out[np.isfinite(ref)], ref[np.isfinite(ref)])
    for n in (1, 3, 16, 19):  # GEMV path
        o = np.zeros((n, OC), np.float32)
        _core.matmul_forward(o, x[:n], w)
        np.testing.assert_array_equal(np.isnan(o), np.isnan(ref[:n]))


def _all_products(x, w, dy, accumulate_into):
    out = accumulate_into[0].copy()
    _core.matmul_forward(out, x, w, accumulate=True)
    out2 = np.empty_like(out)
    _core.matmul_forward(out2, x, w)
    dx, dw = accumulate_into[1].copy(), accumulate_into[2].copy()
    _core.matmul_backward(dx, dw, dy, x, w)
    return out, out2, dx, dw


# Shapes big enough to be split between threads, along rows, along columns, and the GEMV path.
THREAD_SHAPES = [(64, 300, 130), (1040, 40, 70), (40, 300, 600), (4, 300, 700), (300, 520, 20)]


@pytest.mark.parametrize("N,C,OC", THREAD_SHAPES)
def test_matmul_bitwise_independent_of_thread_count(simd, rng, N, C, OC):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    init = (rng.standard_normal((N, OC)).astype(np.float32), rng.standard_normal((N, C)).astype(np.float32),
            rng.standard_normal((OC, C)).astype(np.float32))
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        one = _all_products(x, w, dy, init)
        _core.set_num_threads(2)
        two = _all_products(x, w, dy, init)
    finally:
        _core.set_num_threads(before)
    for a, b in zip(one, two):
        assert np.array_equal(a, b)
    ref = x.astype(np.float64) @ w.astype(np.float64).T
    assert rel_err(one[1], ref) < 1e-5


def test_matmul_training_shape_slice(simd, rng):
    # A slice of a real SmolLM2 shape (C = 576, several k blocks in the backward over N).
    N, C, OC = 600, 576, 96
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    out = np.empty((N, OC), np.float32)
    _core.matmul_forward(out, x, w)
    dx = np.zeros((N, C), np.float32)
    dw = np.zeros((OC, C), np.float32)
    _core.matmul_backward(dx, dw, dy, x, w)
    x64, w64, d64 = x.astype(np.float64), w.astype(np.float64), dy.astype(np.float64)
    assert rel_err(out, x64 @ w64.T) < 1e-5
    assert rel_err(dx, d64 @ w64) < 1e-5
    assert rel_err(dw, d64.T @ x64) < 1e-5


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
    dy = np.zeros((4, 3), np.float32)
    with pytest.raises(ValueError, match="'dout'"):
        _core.matmul_backward(None, None, np.zeros((4, 5), np.float32), x, w)
    with pytest.raises(TypeError, match="'dinp'.*float32"):
        _core.matmul_backward(np.zeros((4, 8), np.float64), None, dy, x, w)
    with pytest.raises(ValueError, match="'dweight'"):
        _core.matmul_backward(None, np.zeros((8, 3), np.float32), dy, x, w)
    with pytest.raises(ValueError, match="writeable"):
        _core.matmul_backward(None, _readonly((3, 8)), dy, x, w)
    with pytest.raises(TypeError):
        _core.matmul_backward(None, None, dy, x)


def _readonly(shape):
    a = np.zeros(shape, np.float32)
    a.flags.writeable = False
    return a


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
