"""cst._core.dequantize against gguf-py's reference decoder, type by type, on random blocks."""
import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q, GGML_QUANT_SIZES  # noqa: E402

from cst import _core  # noqa: E402

TYPES = [Q.F16, Q.BF16, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q4_K, Q.Q5_K, Q.Q6_K]


def _random_blocks(rng, qtype, n_blocks, finite_scales):
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, block_bytes), dtype=np.uint8)
    if finite_scales:
        # Overwrite the f16 scale fields with finite halves so the comparison sees real numbers.
        halves = rng.normal(0, 0.05, size=(n_blocks, 2)).astype(np.float16).view(np.uint8)
        if qtype in (Q.Q4_0, Q.Q5_0, Q.Q8_0):
            raw[:, 0:2] = halves[:, 0:2]
        elif qtype in (Q.Q4_1, Q.Q5_1, Q.Q4_K, Q.Q5_K):
            raw[:, 0:4] = halves
        elif qtype == Q.Q6_K:
            raw[:, 208:210] = halves[:, 0:2]
        elif qtype == Q.F16:
            raw[:] = rng.normal(0, 1, size=n_blocks).astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
        elif qtype == Q.BF16:
            f = rng.normal(0, 1, size=n_blocks).astype(np.float32)
            raw[:] = (f.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8).reshape(n_blocks, 2)
    return raw


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("finite", [True, False], ids=["finite", "anybits"])
def test_dequantize_matches_gguf_reference(qtype, finite, rng):
    block_elems, _ = GGML_QUANT_SIZES[qtype]
    n_blocks = 257 if block_elems > 1 else 4099
    raw = _random_blocks(rng, qtype, n_blocks, finite)
    with np.errstate(all="ignore"):  # the reference multiplies NaN/inf scales on the any-bits runs
        want = gguf.quants.dequantize(raw, qtype).reshape(-1).astype(np.float32)
    got = np.empty(n_blocks * block_elems, dtype=np.float32)
    _core.dequantize(got, raw, int(qtype))
    # Bit-exact: same products in the same order; NaN where the reference has NaN.
    np.testing.assert_array_equal(got, want)
    if finite:
        assert np.isfinite(got).all()


def test_f16_every_bit_pattern():
    raw = np.arange(65536, dtype=np.uint16).view(np.uint8)
    got = np.empty(65536, dtype=np.float32)
    _core.dequantize(got, raw, int(Q.F16))
    want = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
    np.testing.assert_array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.isnan(got[np.isnan(want)]).all()


def test_f32_copy_and_shapes(rng):
    x = rng.normal(size=(3, 5)).astype(np.float32)
    out = np.empty((5, 3), dtype=np.float32)  # any shape with the right size
    _core.dequantize(out, x.view(np.uint8), 0)
    np.testing.assert_array_equal(out.reshape(-1), x.reshape(-1))


def test_unaligned_raw(rng):
    raw = _random_blocks(rng, Q.Q4_1, 16, True)
    buf = np.zeros(raw.size + 1, dtype=np.uint8)
    buf[1:] = raw.reshape(-1)
    got = np.empty(16 * 32, dtype=np.float32)
    _core.dequantize(got, buf[1:], int(Q.Q4_1))
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, Q.Q4_1).reshape(-1))


def test_thread_count_does_not_change_results(rng):
    raw = _random_blocks(rng, Q.Q6_K, 64, True)
    a = np.empty(64 * 256, dtype=np.float32)
    b = np.empty_like(a)
    before = _core.get_num_threads()
    try:
        _core.set_num_threads(1)
        _core.dequantize(a, raw, int(Q.Q6_K))
        _core.set_num_threads(2)
        _core.dequantize(b, raw, int(Q.Q6_K))
    finally:
        _core.set_num_threads(before)
    np.testing.assert_array_equal(a, b)


def test_block_info():
    for t in TYPES:
        name, be, bb = _core.quant_block_info(int(t))
        assert name == t.name and (be, bb) == GGML_QUANT_SIZES[t]


def test_validation():
    out = np.empty(32, dtype=np.float32)
    with pytest.raises(ValueError, match="type_id 99"):
        _core.dequantize(out, np.zeros(34, np.uint8), 99)
    with pytest.raises(ValueError, match="type_id 10"):  # Q2_K exists in ggml but is not decoded here
        _core.dequantize(out, np.zeros(84, np.uint8), 10)
    with pytest.raises(ValueError, match="whole number of Q8_0 blocks"):
        _core.dequantize(out, np.zeros(35, np.uint8), 8)
    with pytest.raises(ValueError, match="'out' has 32 elements"):
        _core.dequantize(out, np.zeros(68, np.uint8), 8)
    with pytest.raises(TypeError, match="'out'"):
        _core.dequantize(np.empty(32, np.float64), np.zeros(34, np.uint8), 8)
    with pytest.raises(TypeError, match="'raw'"):
        _core.dequantize(out, np.zeros(34, np.int8), 8)
    with pytest.raises(TypeError, match="'raw'"):
        _core.dequantize(out, b"\0" * 34, 8)
    with pytest.raises(ValueError, match="contiguous"):
        _core.dequantize(np.empty(64, np.float32)[::2], np.zeros(34, np.uint8), 8)
    ro = np.empty(32, np.float32)
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        _core.dequantize(ro, np.zeros(34, np.uint8), 8)
    with pytest.raises(ValueError, match="contiguous"):
        _core.dequantize(out, np.zeros(68, np.uint8)[::2], 8)
