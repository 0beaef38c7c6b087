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
    # accumulate=False writes dx (what was there is ignored, NaN included) and still adds into dw
    written, dw_w = np.full_like(dx0, np.nan), dw0.copy()
    _core.matmul_backward(written, dw_w, dy, x, w, accumulate=False)
    assert rel_err(written, d64 @ w.astype(np.float64)) < 1e-5
    np.testing.assert_array_equal(dw_w, dw)
    zeroed = np.zeros_like(dx0)
    _core.matmul_backward(zeroed, None, dy, x, w)
    np.testing.assert_array_equal(written, zeroed)  # bit for bit what zeroing and adding gives
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


# LoRA's thin products (rank R <= 64 columns: cst_gemm_thin_*): h = x A^T, dh = dy B, dB += dy^T h, at
# the model's C = 576 and N = 1024 and at odd sizes that leave tails in every tile (6 x 4 / 3 x 4 dot
# products, 48 x 8 / 24 x 4 outer products), with R on both sides of the 64-column switch.
THIN_SHAPES = [(1024, 576, 8), (1024, 576, 16), (1024, 576, 32), (1024, 576, 64), (33, 17, 1), (35, 576, 5),
               (100, 31, 63), (47, 1536, 13), (61, 40, 65), (300, 9, 27)]


@pytest.mark.parametrize("N,C,R", THIN_SHAPES)
def test_thin_lora_products_match_float64(simd, rng, N, C, R):
    x = rng.standard_normal((N, C)).astype(np.float32)
    a = rng.standard_normal((R, C)).astype(np.float32)   # lora_A (R, in): h = x A^T
    b = rng.standard_normal((C, R)).astype(np.float32)   # lora_B (out, R) with out = C
    dy = rng.standard_normal((N, C)).astype(np.float32)
    h0 = rng.standard_normal((N, R)).astype(np.float32)
    h = h0.copy()
    _core.matmul_forward(h, x, a)
    x64 = x.astype(np.float64)
    assert rel_err(h, x64 @ a.astype(np.float64).T) < 1e-5
    h2 = h0.copy()
    _core.matmul_forward(h2, x, a, accumulate=True)
    assert rel_err(h2 - h0, x64 @ a.astype(np.float64).T) < 1e-5
    dh, db = h0.copy(), b.copy()
    _core.matmul_backward(dh, db, dy, h, b)       # dh += dy B;  dB += dy^T h
    d64 = dy.astype(np.float64)
    assert rel_err(dh - h0, d64 @ b.astype(np.float64)) < 1e-5
    assert rel_err(db - b, d64.T @ h.astype(np.float64)) < 1e-5


# lora_bd_backward: the B side of a fused projection's adapters, B block diagonal. q|k|v at the model's
# sizes with all three modules, with q and v only (k's rows have no block), gate|up, and odd sizes.
BD_CASES = [(1024, [(0, 576), (576, 768), (768, 960)], 16), (1024, [(0, 576), (768, 960)], 16),
            (300, [(0, 1536), (1536, 3072)], 8), (61, [(0, 37), (37, 50), (50, 101)], 5), (33, [(3, 40)], 65)]


@pytest.mark.parametrize("N,spans,R", BD_CASES)
def test_lora_bd_backward_matches_the_dense_block_diagonal_product(simd, rng, N, spans, R):
    rows, S = max(r1 for _, r1 in spans), len(spans) * R
    blocks = np.array([(r0, r1, j * R, (j + 1) * R) for j, (r0, r1) in enumerate(spans)], np.int32)
    B = np.zeros((rows, S), np.float32)
    for r0, r1, c0, c1 in blocks:
        B[r0:r1, c0:c1] = rng.standard_normal((r1 - r0, c1 - c0))
    dout = rng.standard_normal((N, rows)).astype(np.float32)
    H = rng.standard_normal((N, S)).astype(np.float32)
    dH0, dB0 = rng.standard_normal((N, S)).astype(np.float32), rng.standard_normal((rows, S)).astype(np.float32)
    dH, dB = dH0.copy(), dB0.copy()
    _core.lora_bd_backward(dH, dB, dout, H, B, blocks)
    d64 = dout.astype(np.float64)
    assert rel_err(dH - dH0, d64 @ B.astype(np.float64)) < 1e-5
    inside = np.zeros((rows, S), bool)
    for r0, r1, c0, c1 in blocks:
        inside[r0:r1, c0:c1] = True
    ref = d64.T @ H.astype(np.float64)
    assert rel_err((dB - dB0)[inside], ref[inside]) < 1e-5
    np.testing.assert_array_equal(dB[~inside], dB0[~inside])  # outside the blocks: never written
    # the same numbers whatever the thread count
    from conftest import with_threads
    again_h, again_b = dH0.copy(), dB0.copy()
    with_threads(1, lambda: _core.lora_bd_backward(again_h, again_b, dout, H, B, blocks))
    np.testing.assert_array_equal(again_h, dH)
    np.testing.assert_array_equal(again_b, dB)


def test_lora_bd_backward_rejects_bad_blocks(rng):
    N, rows, S = 8, 10, 4
    args = [np.zeros((N, S), np.float32), np.zeros((rows, S), np.float32), np.zeros((N, rows), np.float32),
            np.zeros((N, S), np.float32), np.zeros((rows, S), np.float32)]
    for bad, why in [([(0, 11, 0, 2)], "r1 <= 10"), ([(5, 5, 0, 2)], "r0 < r1"), ([(0, 5, 2, 5)], "c1 <= 4"),
                     ([(0, 5, 0, 2), (5, 10, 1, 3)], "share rank columns"), ([(0, 5, 0)], "4 columns")]:
        with pytest.raises(ValueError, match="lora_bd_backward"):
            _core.lora_bd_backward(*args, np.array(bad, np.int32))
    with pytest.raises(TypeError):
        _core.lora_bd_backward(*args, np.array([(0, 5, 0, 2)], np.int64))


def test_thin_products_unaligned_and_special_values(simd, rng):
    # A weight that is not 64-byte aligned (a view one float into a buffer) and NaN/inf confined to their rows.
    N, C, R = 200, 37, 12
    buf = rng.standard_normal(R * C + 1).astype(np.float32)
    a = buf[1:].reshape(R, C)
    x = rng.standard_normal((N, C)).astype(np.float32)
    x[7, 3], x[150, 36] = np.nan, np.inf
    h = np.zeros((N, R), np.float32)
    _core.matmul_forward(h, x, a)
    ref = x.astype(np.float64) @ a.astype(np.float64).T
    np.testing.assert_array_equal(np.isfinite(h), np.isfinite(ref))
    ok = np.isfinite(ref)
    assert rel_err(h[ok], ref[ok]) < 1e-5


@pytest.mark.parametrize("N,C,R", [(1024, 576, 16), (300, 70, 64), (97, 600, 9)])
def test_thin_products_bitwise_independent_of_thread_count(simd, rng, N, C, R):
    x = rng.standard_normal((N, C)).astype(np.float32)
    a = rng.standard_normal((R, C)).astype(np.float32)
    b = rng.standard_normal((C, R)).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)

    def products():
        h = np.zeros((N, R), np.float32)
        _core.matmul_forward(h, x, a)
        dh, db = np.ones((N, R), np.float32), np.ones((C, R), np.float32)
        _core.matmul_backward(dh, db, dy, h, b)
        return h, dh, db

    from conftest import with_threads
    one, two = with_threads(1, products), with_threads(2, products)
    for p, q in zip(one, two):
        assert np.array_equal(p, q)


def test_release_blas_threads_stops_openblas_workers_and_numpy_still_works(rng):
    import os
    from cst.runtime import release_blas_threads
    x = rng.standard_normal((512, 256)).astype(np.float32)
    np.matmul(x, x.T)  # starts OpenBLAS's pool (if OpenBLAS and more than one thread)
    before = len(os.listdir("/proc/self/task"))
    n = release_blas_threads()
    if n == 0:
        pytest.skip("no OpenBLAS with blas_thread_shutdown_ in this process")
    after = len(os.listdir("/proc/self/task"))
    try:
        from threadpoolctl import threadpool_info
        workers = max(p["num_threads"] for p in threadpool_info() if p["internal_api"] == "openblas") - 1
    except ImportError:
        workers = None
    if workers:
        assert after <= before - workers  # the pool's worker threads are gone
    ref = x.astype(np.float64) @ x.astype(np.float64).T
    assert rel_err(np.matmul(x, x.T), ref) < 1e-5  # and OpenBLAS restarts them by itself
    assert release_blas_threads() == n
