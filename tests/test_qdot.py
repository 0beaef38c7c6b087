"""Products against raw GGUF Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks (csrc/kernels/qdot.c): the int8
quantisation of the inputs against NumPy, and every product against a float64 NumPy reference of the same
arithmetic (dequantised weights times the dequantised int8 inputs; for the k-quants the weights are
gguf-py's dequantisation), on every SIMD path, odd sizes included."""
import numpy as np
import pytest

from cst import _core
from conftest import with_threads

Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K = 8, 2, 3, 6, 7, 12, 13, 14
BLOCK_BYTES = {Q8_0: 34, Q4_0: 18, Q4_1: 20, Q5_0: 22, Q5_1: 24, Q4_K: 144, Q5_K: 176, Q6_K: 210}
BLOCK_ELEMS = {Q8_0: 32, Q4_0: 32, Q4_1: 32, Q5_0: 32, Q5_1: 32, Q4_K: 256, Q5_K: 256, Q6_K: 256}
KQUANTS = (Q4_K, Q5_K, Q6_K)


def random_blocks(rng, rows, k, type_id):
    """rows x k weights as raw GGUF blocks with random (finite) f16 scales and random quants (the k-quants'
    6-bit and int8 sub-block scales are random bytes too)."""
    nb = rows * k // BLOCK_ELEMS[type_id]
    raw = rng.integers(0, 256, size=(nb, BLOCK_BYTES[type_id]), dtype=np.uint8)
    dpos = 208 if type_id == Q6_K else 0  # Q6_K keeps its f16 scale at the end of the block
    scale = 0.02 / (32 if type_id in KQUANTS else 1)  # times sub-block scales of up to 63 / 127
    raw[:, dpos:dpos + 2] = (rng.uniform(-scale, scale, nb).astype(np.float16)).view(np.uint8).reshape(nb, 2)
    if type_id in (Q4_1, Q5_1, Q4_K, Q5_K):
        raw[:, 2:4] = (rng.uniform(-0.1, 0.1, nb).astype(np.float16)).view(np.uint8).reshape(nb, 2)
    return raw.reshape(-1)


def dequantized(raw, rows, k, type_id):
    out = np.empty(rows * k, np.float32)
    _core.dequantize(out, raw, type_id)
    return out.reshape(rows, k).astype(np.float64)


def reference_quantize(x):
    """The int8 blocks of cst_q8_quantize, in NumPy (float32 scale arithmetic, round half away)."""
    n, k = x.shape
    xb = x.reshape(n, k // 32, 32).astype(np.float32)
    d = (np.abs(xb).max(axis=2) / np.float32(127.0)).astype(np.float32)
    with np.errstate(divide="ignore"):
        inv = np.where(d > 0, np.float32(1.0) / d, np.float32(0.0)).astype(np.float32)
    v = (xb * inv[:, :, None]).astype(np.float32).astype(np.float64)
    q = np.clip(np.sign(v) * np.floor(np.abs(v) + 0.5), -127, 127).astype(np.int8)
    s = (d * q.astype(np.int32).sum(axis=2).astype(np.float32)).astype(np.float32)
    return q.reshape(n, k), d, s


def quantize(x):
    n, k = x.shape
    q = np.empty((n, k), np.uint8)
    d, s = np.empty((n, k // 32), np.float32), np.empty((n, k // 32), np.float32)
    _core.q8_quantize(q, d, s, x)
    return q, d, s


def test_q8_quantize_matches_numpy(rng):
    x = rng.normal(size=(5, 96)).astype(np.float32) * rng.uniform(0.01, 10, size=(5, 1)).astype(np.float32)
    x[1, 32:64] = 0.0  # an all-zero block: scale 0, quants 0
    x[2, 5] = 1e-30
    q, d, s = quantize(x)
    rq, rd, rs = reference_quantize(x)
    np.testing.assert_array_equal(q.view(np.int8), rq)
    np.testing.assert_array_equal(d, rd)
    np.testing.assert_array_equal(s, rs)
    assert d[1, 1] == 0 and not q[1, 32:64].any()
    # dequantised blocks are within half a step of the input
    err = np.abs(q.view(np.int8).reshape(5, 3, 32) * d[:, :, None] - x.reshape(5, 3, 32))
    assert (err <= 0.5001 * d[:, :, None] + 1e-37).all()


def check_qmatvec(rng, type_id, n, k, o, weights):
    raw = random_blocks(rng, o, k, type_id)
    x = rng.normal(size=(n, k)).astype(np.float32)
    q, d, s = quantize(x)
    xd = q.view(np.int8).reshape(n, k // 32, 32).astype(np.float64) * d[:, :, None]
    w = weights(raw, o, k, type_id)
    want = xd.reshape(n, k) @ w.T
    out = np.full((n, o), np.nan, np.float32)
    _core.qmatvec(out, raw, q, d, s, type_id)
    # float32 scaling of exact integer sums: within a few float32 roundings of sum |x| |w|
    scale = np.abs(xd.reshape(n, k)) @ np.abs(w).T
    assert (np.abs(out - want) <= 2e-6 * scale + 1e-30).all(), np.abs(out - want).max()
    return raw, q, d, s, out


@pytest.mark.parametrize("type_id", [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1], ids=["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"])
@pytest.mark.parametrize("n,k,o", [(1, 32, 1), (1, 576, 37), (3, 96, 17), (2, 1536, 5), (7, 160, 9), (1, 1056, 3)])
def test_qmatvec_matches_float64_reference(simd, rng, type_id, n, k, o):
    """k = 576 and 1056 leave a group of 2 and 1 blocks after the AVX-512 kernel's groups of 16."""
    raw, q, d, s, out = check_qmatvec(rng, type_id, n, k, o, gguf_dequantized)
    acc = np.ones((n, o), np.float32)
    _core.qmatvec(acc, raw, q, d, s, type_id, accumulate=True)
    np.testing.assert_allclose(acc, out + 1.0, rtol=1e-6, atol=1e-6)


def gguf_dequantized(raw, rows, k, type_id):
    import gguf
    return gguf.quants.dequantize(raw.reshape(-1, BLOCK_BYTES[type_id]), gguf.GGMLQuantizationType(type_id)) \
        .reshape(rows, k).astype(np.float64)


@pytest.mark.parametrize("type_id", KQUANTS, ids=["Q4_K", "Q5_K", "Q6_K"])
@pytest.mark.parametrize("n,k,o", [(1, 256, 1), (1, 512, 37), (3, 768, 17), (2, 1536, 5), (5, 256, 9)])
def test_kquant_qmatvec_matches_float64_reference(simd, rng, type_id, n, k, o):
    raw, q, d, s, out = check_qmatvec(rng, type_id, n, k, o, gguf_dequantized)
    acc = np.ones((n, o), np.float32)
    _core.qmatvec(acc, raw, q, d, s, type_id, accumulate=True)
    np.testing.assert_allclose(acc, out + 1.0, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("type_id", KQUANTS + (Q5_0, Q5_1), ids=["Q4_K", "Q5_K", "Q6_K", "Q5_0", "Q5_1"])
def test_kquant_extreme_quants(simd, type_id):
    """Every quant at its largest (15 / 31 / 63) and smallest (0) against inputs of +-127: the int16 pair
    sums of vpmaddubsw stay below saturation, and the 6-bit scales and mins take their largest value 63."""
    k = 512
    nb = 2 * BLOCK_ELEMS[Q4_K] // BLOCK_ELEMS[type_id]
    raw = np.zeros((nb, BLOCK_BYTES[type_id]), np.uint8)
    one = np.full(1, 1.0, np.float16).view(np.uint8)
    if type_id in (Q5_0, Q5_1):
        raw[:, 0:2] = one
        if type_id == Q5_1:
            raw[:, 2:4] = one
        raw[:nb // 2, 2 if type_id == Q5_0 else 4:] = 0xFF  # fifth bits and nibbles all set, then all clear
    elif type_id in (Q4_K, Q5_K):
        raw[:, 0:2], raw[:, 2:4] = one, one
        raw[0, 4:16], raw[1, 4:16] = 0xFF, 0x00  # scales and mins 63, then 0
        raw[0, 16:], raw[1, 16:] = 0xFF, 0x00
    else:
        raw[:, 208:210] = one
        raw[0, 192:208] = np.frombuffer(np.full(16, -128, np.int8).tobytes(), np.uint8)
        raw[1, 192:208] = 127
        raw[0, :192], raw[1, :192] = 0xFF, 0x00  # quants 63 and 0 (weights 31 and -32 times the scales)
    for sign in (1.0, -1.0):
        x = np.full((1, k), sign, np.float32)
        q, d, s = quantize(x)
        out = np.zeros((1, 1), np.float32)
        _core.qmatvec(out, raw.reshape(-1), q, d, s, type_id)
        want = gguf_dequantized(raw.reshape(-1), 1, k, type_id) @ (q.view(np.int8)[0] * float(d[0, 0]))
        assert out[0, 0] == pytest.approx(want[0], rel=1e-6)


def test_qmatvec_extreme_quants(simd):
    """-128 weights (Q8_0) and saturating magnitudes: the u8 x s8 sign trick and int16 pair sums."""
    k = 64
    raw = np.zeros((2, 34), np.uint8)
    raw[:, 0:2] = np.full(2, 1.0, np.float16).view(np.uint8).reshape(2, 2)
    raw[:, 2:] = np.frombuffer(np.full(32, -128, np.int8).tobytes(), np.uint8)
    x = np.full((1, k), -1.0, np.float32)
    q, d, s = quantize(x)
    out = np.zeros((1, 1), np.float32)
    _core.qmatvec(out, raw.reshape(-1), q, d, s, Q8_0)
    assert out[0, 0] == pytest.approx(64 * 128 * 127 * float(d[0, 0]), rel=1e-6)


@pytest.mark.parametrize("type_id", [Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K])
def test_qmatvec_independent_of_threads_and_rows(simd, rng, type_id):
    """The same bits for any thread count, and for a row alone or among others (AVX-512 takes input rows
    four at a time for the 32-weight types: rows 0-3 go that way here, row 4 alone)."""
    k = 768
    raw = random_blocks(rng, 301, k, type_id)
    x = rng.normal(size=(5, k)).astype(np.float32)
    q, d, s = quantize(x)
    outs = []
    for t in (1, 2, 3):
        out = np.empty((5, 301), np.float32)
        with_threads(t, lambda: _core.qmatvec(out, raw, q, d, s, type_id))
        outs.append(out)
    np.testing.assert_array_equal(outs[0], outs[1])
    np.testing.assert_array_equal(outs[0], outs[2])
    for r in (2, 4):
        one = np.empty((1, 301), np.float32)
        _core.qmatvec(one, raw, q[r:r + 1], d[r:r + 1], s[r:r + 1], type_id)
        np.testing.assert_array_equal(one[0], outs[0][r])  # a row's result does not depend on the others


def test_qmatvec_rejects_bad_input(rng):
    raw = random_blocks(rng, 3, 64, Q4_1)
    q, d, s = quantize(rng.normal(size=(1, 64)).astype(np.float32))
    out = np.empty((1, 3), np.float32)
    with pytest.raises(ValueError, match="type_id 11"):  # Q3_K: not decoded at all
        _core.qmatvec(out, raw, q, d, s, 11)
    with pytest.raises(ValueError, match="not a multiple of Q4_K's 256"):
        _core.qmatvec(out, np.zeros(144 * 3, np.uint8), q, d, s, Q4_K)
    with pytest.raises(ValueError, match="'w' has"):
        _core.qmatvec(out, raw[:-1], q, d, s, Q4_1)
    with pytest.raises(ValueError, match="multiple of 32"):
        _core.q8_quantize(np.empty((1, 40), np.uint8), np.empty((1, 1), np.float32), np.empty((1, 1), np.float32),
                          np.ones((1, 40), np.float32))


def test_avx512_without_vnni_gives_the_same_bits(rng, tmp_path):
    """The AVX512BW kernel (vpmaddubsw + vpmaddwd, for AVX-512 CPUs without VNNI) against the VNNI one:
    the same exact integers and float order, so the same bits. CST_NO_VNNI=1 selects it in a fresh process."""
    import os
    import subprocess
    import sys
    if "avx512" not in _core.simd_supported():
        pytest.skip("no AVX-512 on this CPU")
    types = (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q4_K, Q5_K, Q6_K)
    arrays = {}
    for t in types:
        k = 512 if t in KQUANTS else 160
        arrays[f"raw{t}"] = random_blocks(rng, 33, k, t)
        # rows 0-3 four at a time, row 4 alone
        arrays[f"q{t}"], arrays[f"d{t}"], arrays[f"s{t}"] = quantize(rng.normal(size=(5, k)).astype(np.float32))
    np.savez(tmp_path / "in.npz", **arrays)
    code = ("import numpy as np, sys; from cst import _core; _core.set_simd_path('avx512'); "
            "z = np.load(sys.argv[1]); outs = {}\n"
            f"for t in {types}:\n"
            "    outs[str(t)] = np.empty((5, 33), np.float32)\n"
            "    _core.qmatvec(outs[str(t)], z[f'raw{t}'], z[f'q{t}'], z[f'd{t}'], z[f's{t}'], t)\n"
            "np.savez(sys.argv[2], **outs)")
    outs = []
    for flag in ("0", "1"):
        env = dict(os.environ, CST_NO_VNNI=flag, PYTHONPATH=os.pathsep.join(sys.path))
        subprocess.run([sys.executable, "-c", code, str(tmp_path / "in.npz"), str(tmp_path / f"o{flag}.npz")],
                       check=True, env=env, timeout=120)
        outs.append(np.load(tmp_path / f"o{flag}.npz"))
    for t in types:
        np.testing.assert_array_equal(outs[0][str(t)], outs[1][str(t)], err_msg=str(t))
