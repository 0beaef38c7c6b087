"""Causal grouped-query attention kernel (csrc/kernels/attention.c) against float64 PyTorch, finite
differences, thread-count determinism and bad input."""
import numpy as np
import pytest
import torch

import cst
from cst import _core
from conftest import rel_err


def make(rng, B, T, NH, NKV, HS, qscale=1.0):
    q = (rng.standard_normal((B, T, NH, HS)) * qscale).astype(np.float32)
    k = rng.standard_normal((B, T, NKV, HS)).astype(np.float32)
    v = rng.standard_normal((B, T, NKV, HS)).astype(np.float32)
    return q, k, v


def ours_forward(q, k, v, lengths=None):
    B, T, NH, HS = q.shape
    out = np.full(q.shape, np.nan, np.float32)
    lse = np.full((B, NH, T), np.nan, np.float32)
    _core.attention_forward(out, lse, q, k, v, lengths)
    return out, lse


def ours_backward(dout, out, lse, q, k, v, lengths=None, init=0.0):
    dq = np.full(q.shape, init, np.float32)
    dk = np.full(k.shape, init, np.float32)
    dv = np.full(v.shape, init, np.float32)
    _core.attention_backward(dq, dk, dv, dout, out, lse, q, k, v, lengths)
    return dq, dk, dv


def torch_attention(q, k, v, lengths):
    """float64 reference: (B,T,NH,HS) tensors; padded query rows are zeroed."""
    B, T, NH, HS = q.shape
    rep = NH // k.shape[2]
    qh = q.transpose(1, 2)
    kh = k.transpose(1, 2).repeat_interleave(rep, dim=1)
    vh = v.transpose(1, 2).repeat_interleave(rep, dim=1)
    s = qh @ kh.transpose(-1, -2) / np.sqrt(HS)
    t = torch.arange(T)
    lens = torch.as_tensor(lengths if lengths is not None else np.full(B, T), dtype=torch.int64)
    allowed = (t[None, :] <= t[:, None])[None] & (t[None, None, :] < lens[:, None, None])  # (B,T,T)
    s = s.masked_fill(~allowed[:, None], float("-inf"))
    p = torch.softmax(s, dim=-1)
    out = (p @ vh).transpose(1, 2)
    valid_q = (t[None, :] < lens[:, None]).to(out.dtype)  # (B,T)
    return out * valid_q[:, :, None, None], torch.logsumexp(s, dim=-1) * valid_q[:, None, :]


CASES = [
    # B, T, NH, NKV, HS, lengths, qscale
    (1, 1, 1, 1, 8, None, 1.0),  # T = 1
    (2, 5, 3, 3, 16, None, 1.0),  # ratio 1 (plain multi-head)
    (2, 9, 3, 1, 8, [9, 4], 1.0),  # ratio 3, padded
    (1, 7, 9, 1, 4, [3], 1.0),  # ratio 9
    (3, 12, 9, 3, 64, [12, 1, 7], 1.0),  # SmolLM2 heads, length-1 sequence
    (2, 70, 2, 1, 12, [70, 66], 1.0),  # more than one key block (KB = 64)
    (2, 8, 4, 2, 8, [8, 5], 30.0),  # large-magnitude q: scores in the hundreds
    (1, 130, 3, 3, 5, [129], 50.0),  # odd head size, large q, two full blocks
    (2, 70, 6, 2, 64, [70, 66], 1.0),  # the AVX-512 kernels' head size, two key blocks, tail rows
    (2, 37, 2, 1, 128, [35, 37], 30.0),  # their other head size, large q
]


@pytest.mark.parametrize("B,T,NH,NKV,HS,lengths,qscale", CASES)
def test_attention_matches_torch(simd, rng, B, T, NH, NKV, HS, lengths, qscale):
    q, k, v = make(rng, B, T, NH, NKV, HS, qscale)
    lens = None if lengths is None else np.array(lengths, np.int32)
    out, lse = ours_forward(q, k, v, lens)

    tq, tk, tv = (torch.tensor(a, dtype=torch.float64, requires_grad=True) for a in (q, k, v))
    ref, ref_lse = torch_attention(tq, tk, tv, lens)
    assert rel_err(out, ref.detach().numpy()) < 1e-5
    assert rel_err(lse, ref_lse.detach().numpy()) < 1e-5
    if lens is not None:
        for b, n in enumerate(lens):
            assert not out[b, n:].any() and not lse[b, :, n:].any()

    dout = rng.standard_normal(q.shape).astype(np.float32)
    (ref * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    dq, dk, dv = ours_backward(dout, out, lse, q, k, v, lens)
    for ours, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        assert rel_err(ours, theirs.grad.numpy()) < 1e-5
    if lens is not None:
        for b, n in enumerate(lens):
            assert not dq[b, n:].any() and not dk[b, n:].any() and not dv[b, n:].any()

    # Backward adds into its outputs (rounding of 1.5 + the sum differs from the sum + 1.5 in the last bits
    # of float32, up to ~4e-6 for the 70-position case).
    dq2, dk2, dv2 = ours_backward(dout, out, lse, q, k, v, lens, init=1.5)
    for once, twice in ((dq, dq2), (dk, dk2), (dv, dv2)):
        np.testing.assert_allclose(twice, once + 1.5, rtol=1e-5, atol=1e-5)


def test_attention_backward_finite_differences(rng):
    B, T, NH, NKV, HS = 2, 6, 4, 2, 8
    lens = np.array([6, 4], np.int32)
    q, k, v = make(rng, B, T, NH, NKV, HS)
    dout = rng.standard_normal(q.shape).astype(np.float32)

    def loss(q, k, v):
        out, _ = ours_forward(q, k, v, lens)
        return float((out.astype(np.float64) * dout).sum())

    out, lse = ours_forward(q, k, v, lens)
    grads = ours_backward(dout, out, lse, q, k, v, lens)
    dirs = [rng.standard_normal(a.shape).astype(np.float32) for a in (q, k, v)]
    eps = 1e-2
    plus = [a + eps * d for a, d in zip((q, k, v), dirs)]
    minus = [a - eps * d for a, d in zip((q, k, v), dirs)]
    numeric = (loss(*plus) - loss(*minus)) / (2 * eps)
    analytic = sum(float((g.astype(np.float64) * d).sum()) for g, d in zip(grads, dirs))
    assert abs(numeric - analytic) < 2e-3 * max(1.0, abs(analytic))
    # Each input alone as well, so one wrong gradient cannot hide behind the others.
    for i in range(3):
        p = [q, k, v]
        m = [q, k, v]
        p[i], m[i] = plus[i], minus[i]
        num_i = (loss(*p) - loss(*m)) / (2 * eps)
        ana_i = float((grads[i].astype(np.float64) * dirs[i]).sum())
        assert abs(num_i - ana_i) < 2e-3 * max(1.0, abs(ana_i))


def test_attention_threads_and_simd_paths_bitwise(rng):
    q, k, v = make(rng, 3, 67, 6, 2, 16)
    lens = np.array([67, 30, 1], np.int32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    before_threads, before_path = cst.get_num_threads(), _core.simd_path()
    results = {}
    try:
        for path in _core.simd_supported():
            _core.set_simd_path(path)
            for n in (1, 2):
                cst.set_num_threads(n)
                out, lse = ours_forward(q, k, v, lens)
                results[path, n] = (out, lse) + ours_backward(dout, out, lse, q, k, v, lens)
    finally:
        cst.set_num_threads(before_threads)
        _core.set_simd_path(before_path)
    first = next(iter(results.values()))
    for key, res in results.items():
        for a, b in zip(first, res):
            # Same bits for any thread count; the SIMD paths do the same arithmetic, so they too.
            np.testing.assert_array_equal(a, b, err_msg=str(key))


@pytest.mark.parametrize("HS", [20, 64])
def test_attention_rows_do_not_depend_on_length_bitwise(simd, rng, HS):
    # Rows run four at a time where four valid rows exist and one at a time before the padding; a
    # row's result must not depend on which (causality, and the tiled code's fixed sum order).
    # HS = 64 takes the AVX-512 kernels on that path.
    q, k, v = make(rng, 1, 11, 6, 2, HS)
    full, lse_full = ours_forward(q, k, v)
    for n in range(1, 12):
        out, lse = ours_forward(q, k, v, np.array([n], np.int32))
        np.testing.assert_array_equal(out[:, :n], full[:, :n])
        np.testing.assert_array_equal(lse[:, :, :n], lse_full[:, :, :n])


def test_attention_thread_count_bitwise_every_path(simd, rng):
    """Head size 64 (the AVX-512 kernels on that path, the portable ones elsewhere): the same bits for 1
    and 2 threads, forward and backward, with key blocks and padded rows."""
    q, k, v = make(rng, 2, 70, 6, 2, 64)
    lens = np.array([70, 45], np.int32)
    dout = rng.standard_normal(q.shape).astype(np.float32)
    before, res = cst.get_num_threads(), []
    try:
        for n in (1, 2):
            cst.set_num_threads(n)
            out, lse = ours_forward(q, k, v, lens)
            res.append((out, lse) + ours_backward(dout, out, lse, q, k, v, lens))
    finally:
        cst.set_num_threads(before)
    for a, b in zip(*res):
        np.testing.assert_array_equal(a, b)


def test_attention_rejects_bad_input():
    B, T, NH, NKV, HS = 2, 4, 4, 2, 8
    q = np.zeros((B, T, NH, HS), np.float32)
    k = np.zeros((B, T, NKV, HS), np.float32)
    v = np.zeros_like(k)
    out = np.zeros_like(q)
    lse = np.zeros((B, NH, T), np.float32)
    f = _core.attention_forward
    with pytest.raises(TypeError, match="'q'"):
        f(out, lse, q.astype(np.float64), k, v)
    with pytest.raises(TypeError, match="'lengths'"):
        f(out, lse, q, k, v, np.array([1, 2], np.int64))
    with pytest.raises(ValueError, match="'lengths'"):
        f(out, lse, q, k, v, np.array([0, 2], np.int32))
    with pytest.raises(ValueError, match="'lengths'"):
        f(out, lse, q, k, v, np.array([5, 2], np.int32))
    with pytest.raises(ValueError, match="'lengths'"):
        f(out, lse, q, k, v, np.array([4], np.int32))
    with pytest.raises(ValueError, match="multiple"):
        f(np.zeros((B, T, 3, HS), np.float32), np.zeros((B, 3, T), np.float32),
          np.zeros((B, T, 3, HS), np.float32), k, v)
    with pytest.raises(ValueError, match="'v'"):
        f(out, lse, q, k, np.zeros((B, T, NKV, HS + 1), np.float32))
    with pytest.raises(ValueError, match="'lse'"):
        f(out, np.zeros((B, NH, T + 1), np.float32), q, k, v)
    with pytest.raises(ValueError, match="C-contiguous"):
        f(out, lse, np.zeros((B, T, HS, NH), np.float32).transpose(0, 1, 3, 2), k, v)
    ro = out.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="writeable"):
        f(ro, lse, q, k, v)
    g = _core.attention_backward
    with pytest.raises(ValueError, match="'dk'"):
        g(np.zeros_like(q), np.zeros_like(q), np.zeros_like(v), q, out, lse, q, k, v)
    with pytest.raises(ValueError, match="distinct"):
        dk = np.zeros_like(k)
        g(np.zeros_like(q), dk, dk, q, out, lse, q, k, v)
    with pytest.raises(TypeError, match="'dout'"):
        g(np.zeros_like(q), np.zeros_like(k), np.zeros_like(v), None, out, lse, q, k, v)


def test_attention_fuzz_only_raises_type_or_value_error():
    rng = np.random.default_rng(7)
    dtypes = [np.float32, np.float64, np.int32, np.float16]

    def rand_array(shape, dtype=np.float32):
        r = rng.random()
        if r < 0.05:
            return None
        if r < 0.1:
            return [[1.0]]
        if r < 0.2:
            dtype = dtypes[rng.integers(len(dtypes))]
        if r < 0.3:
            shape = tuple(int(max(0, s + rng.integers(-1, 2))) for s in shape)
        if r < 0.35:
            shape = shape[:-1]
        a = rng.standard_normal(shape).astype(dtype) if dtype != np.int32 else rng.integers(
            -2, 8, size=shape).astype(np.int32)
        if r > 0.95 and a.ndim >= 2:
            a = np.swapaxes(a, 0, 1)
        return a

    survived = 0
    for _ in range(300):
        B, T, NKV = (int(x) for x in rng.integers(1, 4, size=3))
        NH, HS = NKV * int(rng.integers(1, 4)), int(rng.integers(1, 9))
        qshape, kshape = (B, T, NH, HS), (B, T, NKV, HS)
        lens = rand_array((B,), np.int32) if rng.random() < 0.7 else None
        try:
            if rng.random() < 0.5:
                _core.attention_forward(rand_array(qshape), rand_array((B, NH, T)), rand_array(qshape),
                                        rand_array(kshape), rand_array(kshape), lens)
            else:
                _core.attention_backward(rand_array(qshape), rand_array(kshape), rand_array(kshape),
                                         rand_array(qshape), rand_array(qshape), rand_array((B, NH, T)),
                                         rand_array(qshape), rand_array(kshape), rand_array(kshape), lens)
            survived += 1
        except (TypeError, ValueError):
            survived += 1
    assert survived == 300
