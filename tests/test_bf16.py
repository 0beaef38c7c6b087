"""bf16 storage and the bf16 GEMMs (bf16 inputs, fp32 accumulation) against float64 on the bf16-rounded
inputs, against torch's bf16 matmul (what torch.autocast("cpu", bfloat16) runs) and against cst's fp32
products; on every SIMD path and every way this machine runs ("amx": tiles, "dot": vdpbf16ps, where the
CPU has them; "convert": the fp32 GEMM on bf16-rounded inputs). "amx" and "dot" apply on the AVX-512
path only; the others fall back to "convert"."""
import numpy as np
import pytest
import torch

from cst import _core
from cst.bf16 import from_bf16, to_bf16
from conftest import rel_err, with_threads


def _ways():
    before = _core.bf16_gemm_way()
    ways = ["convert"]
    for way in ("dot", "amx"):
        try:
            _core.bf16_gemm_way(way)
            ways.append(way)
        except ValueError:  # the CPU (or the OS, for AMX) cannot run it
            pass
    _core.bf16_gemm_way(before)
    return ways


WAYS = _ways()


@pytest.fixture(params=WAYS)
def way(request):
    before = _core.bf16_gemm_way()
    _core.bf16_gemm_way(request.param)
    yield request.param
    _core.bf16_gemm_way(before)


def _torch_bits(x):
    return torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)


def test_to_bf16_matches_torch_bitwise(simd, rng):
    with np.errstate(over="ignore"):  # magnitudes past fp32's range become inf, kept as test values
        x = (rng.standard_normal(70001) * 10.0 ** rng.integers(-42, 39, 70001)).astype(np.float32)
    x[:8] = [np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, -1e-45, 0.0, -0.0]
    x[8:12] = np.float32(1.0) + np.float32(2.0 ** -8) * np.array([1, 3, 1.5, 0.5], np.float32)  # ties, near ties
    h = to_bf16(x)
    np.testing.assert_array_equal(h, _torch_bits(x))
    np.testing.assert_array_equal(from_bf16(h), torch.from_numpy(h.view(np.int16)).view(torch.bfloat16).float().numpy())
    nan = to_bf16(np.array([np.nan, -np.nan], np.float32))
    assert np.isnan(from_bf16(nan)).all()
    # every path gives the scalar rounding's bits, NaN payloads included, and keeps denormals both alone
    # and in runs (the AVX512_BF16 instruction alone would flush them), at every offset of a 32-value block
    bits = np.concatenate([rng.integers(0, 2 ** 32, 4000, dtype=np.uint32),
                           rng.integers(1, 2 ** 23, 300, dtype=np.uint32),               # denormals
                           rng.integers(0x7f800001, 0x7fffffff, 300, dtype=np.uint32),   # NaN payloads
                           np.full(64, 0x00000001, np.uint32)]).view(np.float32)
    for off in (0, 1, 17, 31):
        y = bits[off:]
        here = to_bf16(y)
        _core.set_simd_path("scalar")
        try:
            scalar = to_bf16(y)
        finally:
            _core.set_simd_path(simd)
        np.testing.assert_array_equal(here, scalar)
    with pytest.raises(TypeError, match="uint16"):
        from_bf16(np.zeros(3, np.float32))


# Tails of every tile (AMX: 32 rows, 32 columns, 32 k; vdpbf16ps: 8 x 48, odd k), model shapes, one row;
# AMX blocks of 512 k pairs and 128 rows with their tails (C = 1536; the input gradient's k = OC = 1101, odd).
SHAPES = [(1024, 576, 576), (64, 576, 192), (33, 17, 5), (100, 31, 63), (7, 1, 3), (1, 40, 50), (130, 513, 97),
          (47, 1536, 200), (130, 40, 1101)]


def _r(a):
    return from_bf16(to_bf16(a)).astype(np.float64)


@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_bf16_products_match_float64(simd, way, rng, N, C, OC):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w16 = to_bf16(rng.standard_normal((OC, C)))
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    w64 = from_bf16(w16).astype(np.float64)
    out0 = rng.standard_normal((N, OC)).astype(np.float32)
    out = out0.copy()
    _core.matmul_bf16_forward(out, x, w16)
    assert rel_err(out, _r(x) @ w64.T) < 1e-5
    out = out0.copy()
    _core.matmul_bf16_forward(out, x, w16, accumulate=True)
    assert rel_err(out - out0, _r(x) @ w64.T) < 1e-5
    dx0 = rng.standard_normal((N, C)).astype(np.float32)
    dw0 = rng.standard_normal((OC, C)).astype(np.float32)
    dx, dw = dx0.copy(), dw0.copy()
    _core.matmul_bf16_backward(dx, dw, dy, x, w16)
    assert rel_err(dx - dx0, _r(dy) @ w64) < 1e-5
    assert rel_err(dw - dw0, _r(dy).T @ _r(x)) < 1e-5
    only = dx0.copy()
    _core.matmul_bf16_backward(only, None, dy, x, w16)
    np.testing.assert_array_equal(only, dx)
    written, dw_w = np.full_like(dx0, np.nan), dw0.copy()
    _core.matmul_bf16_backward(written, dw_w, dy, x, w16, accumulate=False)  # dx written, dw added into
    np.testing.assert_array_equal(dw_w, dw)
    zeroed = np.zeros_like(dx0)
    _core.matmul_bf16_backward(zeroed, None, dy, x, w16)
    np.testing.assert_array_equal(written, zeroed)


@pytest.mark.parametrize("N,C,OC", [(1024, 576, 576), (256, 1536, 576), (96, 576, 1536)])
def test_bf16_products_against_torch_autocast_and_fp32(way, rng, N, C, OC):
    # torch rounds its bf16 matmul's output to bf16 (relative error up to 2^-9 per element), so the
    # stated tolerance is 4e-3 in relative norm; against cst's fp32 product the inputs' bf16 rounding
    # (2^-9 per input, random signs) gives about 3e-3: the tolerance is 1e-2.
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    w16 = to_bf16(w)
    out = np.empty((N, OC), np.float32)
    _core.matmul_bf16_forward(out, x, w16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = torch.nn.functional.linear(torch.from_numpy(x), torch.from_numpy(w))
    assert ref.dtype == torch.bfloat16
    assert rel_err(out, ref.float().numpy()) < 4e-3
    f32 = np.empty_like(out)
    _core.matmul_forward(f32, x, w)
    assert rel_err(out, f32) < 1e-2
    dx = np.zeros((N, C), np.float32)
    _core.matmul_bf16_backward(dx, None, dy, x, w16)
    tdx = torch.from_numpy(dy).bfloat16() @ torch.from_numpy(w).bfloat16()
    assert rel_err(dx, tdx.float().numpy()) < 4e-3


# (130, 513, 97): 7 column panels of 16, so with 2 threads the first owns an odd count (3) of them.
@pytest.mark.parametrize("N,C,OC", [(300, 520, 70), (64, 300, 130), (1040, 40, 70), (130, 513, 97), (200, 70, 1101)])
def test_bf16_products_bitwise_independent_of_thread_count(simd, way, rng, N, C, OC):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w16 = to_bf16(rng.standard_normal((OC, C)))
    dy = rng.standard_normal((N, OC)).astype(np.float32)

    def run():
        out = np.empty((N, OC), np.float32)
        _core.matmul_bf16_forward(out, x, w16)
        dx, dw = np.zeros((N, C), np.float32), np.zeros((OC, C), np.float32)
        _core.matmul_bf16_backward(dx, dw, dy, x, w16)
        return out, dx, dw

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        assert np.array_equal(a, b)


def test_bf16_products_reject_bad_input():
    x = np.zeros((4, 8), np.float32)
    w16 = np.zeros((3, 8), np.uint16)
    out = np.zeros((4, 3), np.float32)
    with pytest.raises(TypeError, match="'weight'.*uint16"):
        _core.matmul_bf16_forward(out, x, np.zeros((3, 8), np.float32))
    with pytest.raises(TypeError, match="'inp'"):
        _core.matmul_bf16_forward(out, x.astype(np.float64), w16)
    with pytest.raises(ValueError, match="'weight'"):
        _core.matmul_bf16_forward(out, x, np.zeros((3, 7), np.uint16))
    with pytest.raises(ValueError, match="'dout'"):
        _core.matmul_bf16_backward(None, None, np.zeros((4, 5), np.float32), x, w16)
    with pytest.raises(ValueError, match="unknown way"):
        _core.bf16_gemm_way("fast")


@pytest.mark.parametrize("N,C,OC", [(33, 40, 17), (64, 576, 96), (7, 100, 3)])
def test_bf16_products_round_their_inputs_as_to_bf16_does(simd, way, rng, N, C, OC):
    """Each way rounds fp32 inputs to bf16 inside (the dot way while laying out k pairs, 16 columns of two
    rows at a time), so a product of raw inputs equals, bit for bit, the product of the inputs already
    rounded by to_bf16. The inputs hold ties (half-way between two bf16 values), values that round up into
    the next binade and denormals (the dot way's vectors with one take the scalar rounding); odd N gives the
    k pairs an unpaired last row."""
    def awkward(shape):
        a = rng.standard_normal(shape).astype(np.float32)
        flat = a.view(np.uint32).reshape(-1)
        n = flat.size
        ties = rng.integers(0, n, n // 8)
        flat[ties] = (flat[ties] & 0xFFFF0000) | 0x8000  # half-way between two bf16 values
        flat[rng.integers(0, n, n // 16)] = 0x3F7FFFFF  # rounds up to 1.0
        flat[rng.integers(0, n, max(1, n // 97))] = rng.integers(1, 2 ** 23, max(1, n // 97), dtype=np.uint32)
        return a

    x, dy = awkward((N, C)), awkward((N, OC))
    w16 = to_bf16(rng.standard_normal((OC, C)))
    xr, dyr = from_bf16(to_bf16(x)), from_bf16(to_bf16(dy))

    def products(x, dy):
        out = np.empty((N, OC), np.float32)
        _core.matmul_bf16_forward(out, x, w16)
        dx, dw = np.zeros((N, C), np.float32), np.zeros((OC, C), np.float32)
        _core.matmul_bf16_backward(dx, dw, dy, x, w16)
        return out, dx, dw

    raw = products(x, dy)
    for a, b in zip(raw, products(xr, dyr)):
        np.testing.assert_array_equal(a, b)
    # and the rounded values are the ones multiplied (the dot way flushes bf16 denormals to zero)
    x64, dy64, w64 = (np.where(np.abs(v) < 2.0 ** -126, 0.0, v.astype(np.float64)) for v in (xr, dyr, from_bf16(w16)))
    for got, ref in zip(raw, (x64 @ w64.T, dy64 @ w64, dy64.T @ x64)):
        assert rel_err(got, ref) < 1e-5
