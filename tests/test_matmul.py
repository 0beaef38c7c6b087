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
          (1045, 9, 35),
          (1100, 100, 77)]  # the weight gradient through the packed GEMM with K cut into three k blocks


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
THREAD_SHAPES = [(64, 300, 130), (1040, 40, 70), (40, 300, 600), (4, 300, 700), (300, 520, 20), (1030, 96, 45)]


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


@pytest.mark.parametrize("C,OC", [(576, 960), (77, 33), (1536, 577)])
def test_gemv_rows_do_not_depend_on_how_many_rows_come_together(simd, rng, C, OC):
    """The few-row path streams one weight row at a time for a single input row and uses tiles for more;
    each output is one chain over k in both, so a row's result is the same alone or among others."""
    x = rng.standard_normal((7, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    for n in (2, 3, 7):
        many = np.empty((n, OC), np.float32)
        _core.matmul_forward(many, x[:n], w)
        for i in range(n):
            one = np.empty((1, OC), np.float32)
            _core.matmul_forward(one, x[i:i + 1].copy(), w)
            np.testing.assert_array_equal(one[0], many[i])


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


# matmul_backward_block: matmul_backward on column blocks of wider operands (LoRA's backward reads one
# module's rows of a fused q|k|v or gate|up gradient this way): blocks at q/k/v's offsets, at gate/up's, at
# odd offsets and widths, a rank past the thin products' 64 columns, and a few rows (the GEMV-sized path).
BLOCK_CASES = [(1024, 960, 576, 16, 48, 0), (1024, 960, 192, 16, 48, 32), (300, 3072, 1536, 8, 16, 8),
               (61, 101, 13, 5, 15, 10), (33, 40, 37, 65, 130, 65), (7, 50, 9, 3, 9, 6)]


@pytest.mark.parametrize("N,R,O,C,S,in_col", BLOCK_CASES)
def test_matmul_backward_block_is_matmul_backward_on_the_blocks(simd, rng, N, R, O, C, S, in_col):
    out_col = R - O  # the block at the far end of dout's columns
    dout = rng.standard_normal((N, R)).astype(np.float32)
    inp = rng.standard_normal((N, S)).astype(np.float32)
    w = rng.standard_normal((O, C)).astype(np.float32)
    dinp0, dw0 = rng.standard_normal((N, S)).astype(np.float32), rng.standard_normal((O, C)).astype(np.float32)
    dinp, dw = dinp0.copy(), dw0.copy()
    _core.matmul_backward_block(dinp, dw, dout, inp, w, out_col, in_col)
    dy, x = dout[:, out_col:out_col + O], inp[:, in_col:in_col + C]
    d64 = dy.astype(np.float64)
    blk = slice(in_col, in_col + C)
    assert rel_err(dinp[:, blk] - dinp0[:, blk], d64 @ w.astype(np.float64)) < 1e-5
    assert rel_err(dw - dw0, d64.T @ x.astype(np.float64)) < 1e-5
    rest = np.ones(S, bool)
    rest[blk] = False
    np.testing.assert_array_equal(dinp[:, rest], dinp0[:, rest])  # outside the block: never written
    # bit for bit matmul_backward on contiguous copies of the blocks, adding and writing
    ref_dx, ref_dw = np.ascontiguousarray(dinp0[:, blk]), dw0.copy()
    _core.matmul_backward(ref_dx, ref_dw, np.ascontiguousarray(dy), np.ascontiguousarray(x), w)
    np.testing.assert_array_equal(dinp[:, blk], ref_dx)
    np.testing.assert_array_equal(dw, ref_dw)
    written = np.full_like(dinp0, np.nan)
    _core.matmul_backward_block(written, None, dout, inp, w, out_col, in_col, accumulate=False)
    ref_w = np.empty_like(ref_dx)
    _core.matmul_backward(ref_w, None, np.ascontiguousarray(dy), np.ascontiguousarray(x), w, accumulate=False)
    np.testing.assert_array_equal(written[:, blk], ref_w)
    assert np.isnan(written[:, rest]).all()
    # the same numbers whatever the thread count
    from conftest import with_threads
    again_x, again_w = dinp0.copy(), dw0.copy()
    with_threads(1, lambda: _core.matmul_backward_block(again_x, again_w, dout, inp, w, out_col, in_col))
    np.testing.assert_array_equal(again_x, dinp)
    np.testing.assert_array_equal(again_w, dw)


def test_matmul_backward_block_rejects_blocks_past_the_operands():
    N, R, S, O, C = 8, 10, 6, 4, 3
    dinp, dw = np.zeros((N, S), np.float32), np.zeros((O, C), np.float32)
    dout, inp, w = np.zeros((N, R), np.float32), np.zeros((N, S), np.float32), np.zeros((O, C), np.float32)
    for out_col, in_col, why in [(7, 0, "out_col 7 \\+ weight's 4 rows exceed dout's 10 columns"),
                                 (0, 4, "in_col 4 \\+ weight's 3 columns exceed inp's 6 columns")]:
        with pytest.raises(ValueError, match=why):
            _core.matmul_backward_block(dinp, dw, dout, inp, w, out_col, in_col)
    with pytest.raises(ValueError, match="out_col"):
        _core.matmul_backward_block(dinp, dw, dout, inp, w, -1, 0)
    with pytest.raises(ValueError, match="dweight"):
        _core.matmul_backward_block(dinp, np.zeros((O, C + 1), np.float32), dout, inp, w, 0, 0)


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
