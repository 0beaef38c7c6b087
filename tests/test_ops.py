"""Tests of the per-position kernels (csrc/kernels/ops.c): each forward against a float64 NumPy/PyTorch
reference, each backward against torch.autograd in float64 and against finite differences of the
float32 kernel itself, accumulate semantics, thread-count determinism and input validation."""
import numpy as np
import pytest
import torch

from cst import _core
from cst.ops import rope_tables
from conftest import rel_err, with_threads


def fd_directional(forward, x, dout, grad, rng, h=1e-2, tol=2e-2):
    """Checks <grad, u> against the central difference of L(x) = sum(dout * forward(x)) along a
    random direction u, with forward the float32 kernel itself (so the tolerance is loose)."""
    u = rng.standard_normal(x.shape)
    u /= np.linalg.norm(u)

    def loss(xx):
        return float(np.sum(dout.astype(np.float64) * forward(xx.astype(np.float32)).astype(np.float64)))

    num = (loss(x + h * u) - loss(x - h * u)) / (2 * h)
    ana = float(np.sum(grad.astype(np.float64) * u))
    assert abs(num - ana) <= tol * max(1.0, abs(ana)), (num, ana)


# ---------------------------------------------------------------- embedding

@pytest.mark.parametrize("B,T,V,C", [(1, 1, 1, 1), (2, 5, 7, 3), (3, 17, 50, 130), (1, 64, 11, 576)])
def test_embedding_forward_gathers_rows(simd, rng, B, T, V, C):
    wte = rng.standard_normal((V, C)).astype(np.float32)
    tok = rng.integers(0, V, (B, T)).astype(np.int32)
    out = np.full((B, T, C), np.nan, np.float32)
    _core.embedding_forward(out, tok, wte)
    np.testing.assert_array_equal(out, wte[tok])


@pytest.mark.parametrize("B,T,V,C", [(1, 1, 1, 1), (2, 5, 3, 70), (3, 33, 9, 130)])
def test_embedding_backward_scatter_adds(rng, B, T, V, C):
    tok = rng.integers(0, V, (B, T)).astype(np.int32)  # few ids: many repeats
    dout = rng.standard_normal((B, T, C)).astype(np.float32)
    lengths = rng.integers(0, T + 1, B).astype(np.int32)
    dw0 = rng.standard_normal((V, C)).astype(np.float32)
    for lens in (None, lengths):
        ref = dw0.astype(np.float64)
        for b in range(B):
            for t in range(T if lens is None else lens[b]):
                ref[tok[b, t]] += dout[b, t]
        dw = dw0.copy()
        _core.embedding_backward(dw, dout, tok, lens)
        assert np.abs(dw - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())


def test_embedding_backward_is_thread_count_independent(rng):
    B, T, V, C = 4, 100, 5, 200
    tok = rng.integers(0, V, (B, T)).astype(np.int32)
    dout = rng.standard_normal((B, T, C)).astype(np.float32)

    def run():
        dw = np.zeros((V, C), np.float32)
        _core.embedding_backward(dw, dout, tok)
        return dw

    a, b, c = with_threads(1, run), with_threads(2, run), with_threads(3, run)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)


def test_embedding_rejects_bad_input():
    wte = np.zeros((10, 4), np.float32)
    tok = np.zeros((2, 3), np.int32)
    out = np.zeros((2, 3, 4), np.float32)
    dout = np.zeros((2, 3, 4), np.float32)
    for bad in (-1, 10):
        t = tok.copy()
        t[1, 2] = bad
        with pytest.raises(ValueError, match="'tokens'.*outside"):
            _core.embedding_forward(out, t, wte)
        with pytest.raises(ValueError, match="'tokens'.*outside"):
            _core.embedding_backward(wte.copy(), dout, t)
    with pytest.raises(TypeError, match="'tokens'.*int32"):
        _core.embedding_forward(out, tok.astype(np.int64), wte)
    with pytest.raises(ValueError, match="'out'"):
        _core.embedding_forward(np.zeros((2, 3, 5), np.float32), tok, wte)
    with pytest.raises(ValueError, match="'lengths'.*outside"):
        _core.embedding_backward(wte.copy(), dout, tok, np.array([1, 4], np.int32))
    with pytest.raises(ValueError, match="'lengths'"):
        _core.embedding_backward(wte.copy(), dout, tok, np.array([1, 2, 3], np.int32))
    with pytest.raises(ValueError, match="'dout'.*C-contiguous"):
        _core.embedding_backward(wte.copy(), np.zeros((4, 3, 2), np.float32).T, tok)


# ---------------------------------------------------------------- rmsnorm

def rmsnorm_ref64(x, w, eps):
    x = x.astype(np.float64)
    r = 1.0 / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps)
    return x * r * w.astype(np.float64), r[:, 0]


@pytest.mark.parametrize("N,C,scale", [(1, 1, 1.0), (1, 7, 1.0), (5, 64, 1.0), (33, 130, 1e4), (9, 576, 1e-3)])
def test_rmsnorm_forward_matches_float64(simd, rng, N, C, scale):
    x = (rng.standard_normal((N, C)) * scale).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    out = np.full((N, C), np.nan, np.float32)
    rstd = np.full(N, np.nan, np.float32)
    _core.rmsnorm_forward(out, rstd, x, w, 1e-5)
    ref, rref = rmsnorm_ref64(x, w, 1e-5)
    assert rel_err(out, ref) < 1e-6
    assert rel_err(rstd, rref) < 1e-6


def test_rmsnorm_forward_matches_hugging_face(rng):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm
    N, C = 6, 48
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    norm = LlamaRMSNorm(C, eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.from_numpy(w))
        ref = norm(torch.from_numpy(x)).numpy()
    out, rstd = np.empty_like(x), np.empty(N, np.float32)
    _core.rmsnorm_forward(out, rstd, x, w, 1e-5)
    assert np.abs(out - ref).max() <= 4e-7 * np.abs(ref).max()


def rmsnorm_bwd_torch64(x, w, dy, eps):
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    y = xt * torch.rsqrt(xt.pow(2).mean(-1, keepdim=True) + eps) * wt
    y.backward(torch.tensor(dy, dtype=torch.float64))
    return xt.grad.numpy(), wt.grad.numpy()


@pytest.mark.parametrize("N,C,scale", [(1, 1, 1.0), (1, 5, 1.0), (7, 64, 1.0), (70, 130, 100.0), (3, 576, 1.0)])
def test_rmsnorm_backward_matches_autograd(simd, rng, N, C, scale):
    x = (rng.standard_normal((N, C)) * scale).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    out, rstd = np.empty_like(x), np.empty(N, np.float32)
    _core.rmsnorm_forward(out, rstd, x, w, 1e-5)
    dx0 = rng.standard_normal((N, C)).astype(np.float32)
    dw0 = rng.standard_normal(C).astype(np.float32)
    dx, dw = dx0.copy(), dw0.copy()
    _core.rmsnorm_backward(dx, dw, dy, x, w, rstd)
    rdx, rdw = rmsnorm_bwd_torch64(x, w, dy, 1e-5)
    # Elementwise: the float32 sum dx0 + grad rounds to half an ulp of dx0 on top of the kernel's error.
    err = np.abs(dx.astype(np.float64) - (dx0 + rdx))
    assert np.all(err <= 1e-6 * np.abs(rdx).max() + 6e-8 * np.abs(dx0) + 1e-30)
    fresh = np.zeros_like(x)
    _core.rmsnorm_backward(fresh, None, dy, x, w, rstd)
    if C > 1:  # C == 1: dx is 0 up to eps
        assert rel_err(fresh, rdx) < 1e-6
    assert rel_err(dw - dw0, rdw) < 1e-5
    # Either gradient may be skipped, the other is unchanged.
    only_dx = dx0.copy()
    _core.rmsnorm_backward(only_dx, None, dy, x, w, rstd)
    np.testing.assert_array_equal(only_dx, dx)
    only_dw = dw0.copy()
    _core.rmsnorm_backward(None, only_dw, dy, x, w, rstd)
    np.testing.assert_array_equal(only_dw, dw)


def test_rmsnorm_backward_finite_differences(rng):
    N, C = 3, 6
    x = rng.standard_normal((N, C))
    w = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)
    x32 = x.astype(np.float32)

    def fwd_x(xx):
        o, r = np.empty_like(xx), np.empty(N, np.float32)
        _core.rmsnorm_forward(o, r, xx, w, 1e-5)
        return o

    out, rstd = np.empty_like(x32), np.empty(N, np.float32)
    _core.rmsnorm_forward(out, rstd, x32, w, 1e-5)
    dx, dw = np.zeros_like(x32), np.zeros_like(w)
    _core.rmsnorm_backward(dx, dw, dy, x32, w, rstd)
    fd_directional(fwd_x, x, dy, dx, rng)

    def fwd_w(ww):
        o, r = np.empty_like(x32), np.empty(N, np.float32)
        _core.rmsnorm_forward(o, r, x32, ww, 1e-5)
        return o

    fd_directional(fwd_w, w.astype(np.float64), dy, dw, rng)


def test_rmsnorm_is_thread_count_independent(rng):
    N, C = 301, 200
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal(C).astype(np.float32)
    dy = rng.standard_normal((N, C)).astype(np.float32)

    def run():
        out, rstd = np.empty_like(x), np.empty(N, np.float32)
        _core.rmsnorm_forward(out, rstd, x, w, 1e-5)
        dx, dw = np.zeros_like(x), np.zeros_like(w)
        _core.rmsnorm_backward(dx, dw, dy, x, w, rstd)
        return out, dx, dw

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(with_threads(1, run), with_threads(3, run)):
        np.testing.assert_array_equal(a, b)


def test_rmsnorm_rejects_bad_input():
    x = np.zeros((4, 8), np.float32)
    w = np.ones(8, np.float32)
    out, rstd = np.zeros_like(x), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="'eps'"):
        _core.rmsnorm_forward(out, rstd, x, w, 0.0)
    with pytest.raises(ValueError, match="'eps'"):
        _core.rmsnorm_forward(out, rstd, x, w, float("nan"))
    with pytest.raises(ValueError, match="'weight'"):
        _core.rmsnorm_forward(out, rstd, x, np.ones(7, np.float32), 1e-5)
    with pytest.raises(ValueError, match="'rstd'"):
        _core.rmsnorm_forward(out, np.zeros(3, np.float32), x, w, 1e-5)
    with pytest.raises(TypeError, match="'rstd'.*float32"):
        _core.rmsnorm_backward(x.copy(), None, x, x, w, np.zeros(4, np.float64))
    with pytest.raises(ValueError, match="'dinp'.*writeable"):
        ro = x.copy()
        ro.flags.writeable = False
        _core.rmsnorm_backward(ro, None, x, x, w, rstd)


# ---------------------------------------------------------------- rope

@pytest.mark.parametrize("HS,theta,T", [(64, 100000.0, 300), (16, 10000.0, 40), (128, 500000.0, 17), (2, 3.0, 5)])
def test_rope_tables_match_hugging_face(HS, theta, T):
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    cfg = LlamaConfig(hidden_size=HS * 2, num_attention_heads=2, head_dim=HS, rope_theta=theta,
                      max_position_embeddings=T)
    emb = LlamaRotaryEmbedding(cfg)
    cos_hf, sin_hf = emb(torch.zeros(1), torch.arange(T)[None])
    cos_hf, sin_hf = cos_hf[0].numpy(), sin_hf[0].numpy()
    cos, sin = rope_tables(T, HS, theta)
    assert cos.shape == (T, HS // 2) and cos.dtype == np.float32
    # HF's tables are [cos(f), cos(f)] along the head: both halves agree with ours to 1 ulp.
    for half in (slice(0, HS // 2), slice(HS // 2, HS)):
        assert np.abs(cos - cos_hf[:, half]).max() <= np.spacing(np.float32(1.0))
        assert np.abs(sin - sin_hf[:, half]).max() <= np.spacing(np.float32(1.0))
    # The angles themselves are HF's, bit for bit: rebuilt from inv_freq they give the same tables.
    inv = emb.inv_freq.numpy()
    ang = np.arange(T, dtype=np.float32)[:, None] * inv[None, :]
    np.testing.assert_array_equal(cos, np.cos(ang.astype(np.float64)).astype(np.float32))
    with pytest.raises(ValueError, match="HS"):
        rope_tables(T, 3, theta)
    with pytest.raises(ValueError, match="theta"):
        rope_tables(T, HS, -1.0)


def rope_ref64(x, cos, sin, pos0=0):
    T, half = x.shape[1], x.shape[-1] // 2
    c = cos[pos0:pos0 + T].astype(np.float64)[None, :, None, :]
    s = sin[pos0:pos0 + T].astype(np.float64)[None, :, None, :]
    x = x.astype(np.float64)
    x1, x2 = x[..., :half], x[..., half:]
    return np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)


@pytest.mark.parametrize("B,T,H,HS", [(1, 1, 1, 2), (2, 5, 9, 64), (3, 7, 3, 64), (1, 33, 4, 16), (2, 1, 3, 8)])
def test_rope_forward_matches_reference_and_hf(simd, rng, B, T, H, HS):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb
    cos, sin = rope_tables(T + 3, HS, 100000.0)
    x = (rng.standard_normal((B, T, H, HS)) * 10).astype(np.float32)
    y = x.copy()
    _core.rope_forward(y, cos, sin)
    assert rel_err(y, rope_ref64(x, cos, sin)) < 1e-6
    # With the same tables, HF's apply_rotary_pos_emb gives the same float32 bits.
    c = torch.from_numpy(np.concatenate([cos[:T], cos[:T]], -1))[None]
    s = torch.from_numpy(np.concatenate([sin[:T], sin[:T]], -1))[None]
    xt = torch.from_numpy(x).transpose(1, 2)  # HF layout (B, H, T, HS)
    q_hf, _ = apply_rotary_pos_emb(xt, xt, c, s)
    np.testing.assert_array_equal(y, q_hf.transpose(1, 2).numpy())


def test_rope_pos0_matches_full_sequence(rng):
    B, T, H, HS = 2, 6, 3, 16
    cos, sin = rope_tables(T, HS, 10000.0)
    x = rng.standard_normal((B, T, H, HS)).astype(np.float32)
    full = x.copy()
    _core.rope_forward(full, cos, sin)
    for p in range(T):
        one = np.ascontiguousarray(x[:, p:p + 1])
        _core.rope_forward(one, cos, sin, pos0=p)
        np.testing.assert_array_equal(one, full[:, p:p + 1])


@pytest.mark.parametrize("B,T,H,HS", [(1, 1, 1, 2), (2, 5, 3, 8), (1, 9, 9, 64)])
def test_rope_backward_is_the_transpose(rng, B, T, H, HS):
    cos, sin = rope_tables(T, HS, 100000.0)
    x = rng.standard_normal((B, T, H, HS)).astype(np.float32)
    g = rng.standard_normal((B, T, H, HS)).astype(np.float32)
    rx = x.copy()
    _core.rope_forward(rx, cos, sin)
    rtg = g.copy()
    _core.rope_backward(rtg, cos, sin)
    # <R x, g> == <x, R^T g>, and R^T R = I.
    lhs = float(np.sum(rx.astype(np.float64) * g))
    rhs = float(np.sum(x.astype(np.float64) * rtg))
    assert abs(lhs - rhs) < 1e-5 * max(1.0, abs(lhs))
    back = rx.copy()
    _core.rope_backward(back, cos, sin)
    assert np.abs(back - x).max() < 1e-5
    # The backward against autograd of the float64 reference.
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    c = torch.tensor(cos, dtype=torch.float64)[None, :, None, :]
    s = torch.tensor(sin, dtype=torch.float64)[None, :, None, :]
    x1, x2 = xt[..., :HS // 2], xt[..., HS // 2:]
    torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], -1).backward(torch.tensor(g, dtype=torch.float64))
    assert rel_err(rtg, xt.grad.numpy()) < 1e-6


def test_rope_backward_finite_differences(rng):
    B, T, H, HS = 1, 3, 2, 4
    cos, sin = rope_tables(T, HS, 10.0)
    x = rng.standard_normal((B, T, H, HS))
    dy = rng.standard_normal((B, T, H, HS)).astype(np.float32)

    def fwd(xx):
        xx = xx.copy()
        _core.rope_forward(xx, cos, sin)
        return xx

    g = dy.copy()
    _core.rope_backward(g, cos, sin)
    fd_directional(fwd, x, dy, g, rng)


def test_rope_rejects_bad_input():
    cos, sin = rope_tables(4, 8, 10000.0)
    x = np.zeros((1, 4, 2, 8), np.float32)
    with pytest.raises(ValueError, match="'cos'"):
        _core.rope_forward(x, cos[:, :3].copy(), sin)
    with pytest.raises(ValueError, match="pos0"):
        _core.rope_forward(x, cos, sin, pos0=1)
    with pytest.raises(ValueError, match="pos0"):
        _core.rope_forward(x, cos, sin, pos0=-1)
    with pytest.raises(ValueError, match="even"):
        _core.rope_forward(np.zeros((1, 4, 2, 7), np.float32), cos, sin)
    with pytest.raises(TypeError, match="'sin'"):
        _core.rope_forward(x, cos, sin.astype(np.float64))
    with pytest.raises(ValueError, match="'dx'.*dimensions"):
        _core.rope_backward(np.zeros((4, 2, 8), np.float32), cos, sin)


# ---------------------------------------------------------------- swiglu

def silu64(g):
    with np.errstate(over="ignore"):  # exp(1e4) = inf gives silu = -0, as it should
        return g / (1.0 + np.exp(-g))


@pytest.mark.parametrize("N,F,scale", [(1, 1, 1.0), (3, 7, 3.0), (17, 64, 1.0), (5, 1536, 5.0), (4, 33, 200.0)])
def test_swiglu_forward_matches_float64(simd, rng, N, F, scale):
    gu = (rng.standard_normal((N, 2 * F)) * scale).astype(np.float32)
    out = np.full((N, F), np.nan, np.float32)
    _core.swiglu_forward(out, gu)
    g, u = gu[:, :F].astype(np.float64), gu[:, F:].astype(np.float64)
    ref = silu64(g) * u
    assert np.all(np.isfinite(out))
    assert np.abs(out - ref).max() <= 1e-6 * max(1.0, np.abs(ref).max())
    assert rel_err(out, ref) < 1e-6


def test_swiglu_extreme_gates(simd):
    g = np.array([[-1e4, -100.0, -88.5, -87.0, -20.0, 0.0, 20.0, 87.0, 88.5, 100.0, 1e4]], np.float32)
    gu = np.concatenate([g, np.full_like(g, 2.0)], 1)
    out = np.empty_like(g)
    _core.swiglu_forward(out, gu)
    ref = 2.0 * silu64(g.astype(np.float64))
    assert np.all(np.isfinite(out))
    assert np.abs(out - ref).max() <= 1e-6 * np.abs(ref).max()
    dgu = np.zeros_like(gu)
    _core.swiglu_backward(dgu, np.ones_like(g), gu)
    assert np.all(np.isfinite(dgu))


def swiglu_bwd_torch64(gu, dy):
    t = torch.tensor(gu, dtype=torch.float64, requires_grad=True)
    F = dy.shape[1]
    (torch.nn.functional.silu(t[:, :F]) * t[:, F:]).backward(torch.tensor(dy, dtype=torch.float64))
    return t.grad.numpy()


@pytest.mark.parametrize("N,F,scale", [(1, 1, 1.0), (3, 7, 3.0), (9, 130, 1.0), (2, 40, 50.0)])
def test_swiglu_backward_matches_autograd(simd, rng, N, F, scale):
    gu = (rng.standard_normal((N, 2 * F)) * scale).astype(np.float32)
    dy = rng.standard_normal((N, F)).astype(np.float32)
    d0 = rng.standard_normal((N, 2 * F)).astype(np.float32)
    d = d0.copy()
    _core.swiglu_backward(d, dy, gu)
    ref = swiglu_bwd_torch64(gu, dy)
    assert np.abs((d - d0) - ref).max() <= 2e-6 * max(1.0, np.abs(ref).max())
    written, zeroed = np.full_like(d0, np.nan), np.zeros_like(d0)
    _core.swiglu_backward(written, dy, gu, accumulate=False)  # written, not added into
    _core.swiglu_backward(zeroed, dy, gu)
    np.testing.assert_array_equal(written, zeroed)


def test_swiglu_backward_finite_differences(rng):
    N, F = 2, 3
    gu = rng.standard_normal((N, 2 * F)) * 2
    dy = rng.standard_normal((N, F)).astype(np.float32)

    def fwd(x):
        o = np.empty((N, F), np.float32)
        _core.swiglu_forward(o, x)
        return o

    d = np.zeros((N, 2 * F), np.float32)
    _core.swiglu_backward(d, dy, gu.astype(np.float32))
    fd_directional(fwd, gu, dy, d, rng)


def test_swiglu_rejects_bad_input():
    with pytest.raises(ValueError, match="'gu'.*2 \\* out's F"):
        _core.swiglu_forward(np.zeros((3, 4), np.float32), np.zeros((3, 7), np.float32))
    with pytest.raises(ValueError, match="'gu'"):
        _core.swiglu_forward(np.zeros((3, 4), np.float32), np.zeros((2, 8), np.float32))
    with pytest.raises(TypeError, match="'dout'"):
        _core.swiglu_backward(np.zeros((3, 8), np.float32), np.zeros((3, 4), np.float16),
                              np.zeros((3, 8), np.float32))
    with pytest.raises(ValueError, match="'dgu'"):
        _core.swiglu_backward(np.zeros((3, 6), np.float32), np.zeros((3, 4), np.float32),
                              np.zeros((3, 8), np.float32))


# ---------------------------------------------------------------- logprobs

def logprobs_ref64(logits, targets):
    x = torch.tensor(logits, dtype=torch.float64)
    lsm = torch.log_softmax(x, -1).numpy()
    lse = torch.logsumexp(x, -1).numpy()
    n = np.arange(len(targets))
    lp = np.where(targets >= 0, lsm[n, np.maximum(targets, 0)], 0.0)
    return lp, lse, np.exp(lsm)


def run_logprobs(logits, targets):
    N = logits.shape[0]
    logp = np.full(N, np.nan, np.float32)
    lse = np.full(N, np.nan, np.float64)
    _core.logprobs_forward(logp, lse, logits, targets)
    return logp, lse


@pytest.mark.parametrize("N,V,scale", [(1, 1, 1.0), (1, 2, 1.0), (4, 17, 3.0), (7, 1000, 10.0), (3, 49152, 5.0),
                                       (5, 333, 1e4)])
def test_logprobs_forward_matches_float64(simd, rng, N, V, scale):
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    if N > 2:
        targets[1] = -1
        targets[2] = int(np.argmax(logits[2]))  # a confident target at 1e4 scale: logp ~ 0
    logp, lse = run_logprobs(logits, targets)
    ref, rlse, _ = logprobs_ref64(logits, targets)
    assert np.all(np.isfinite(logp)) and np.all(np.isfinite(lse))
    # logp is rounded to float32 from a double computation: its error is relative to |lse| and |logp|.
    tol = 1e-6 * np.maximum(1.0, np.abs(ref)) + 2e-7 * np.abs(rlse)
    assert np.all(np.abs(logp - ref) <= tol)
    keep = targets >= 0
    assert np.all(np.abs(lse[keep] - rlse[keep]) <= 1e-9 * np.maximum(1.0, np.abs(rlse[keep])) + 1e-7)
    assert np.all(logp[~keep] == 0.0)


def test_logprobs_dominant_and_tied_logits(simd):
    V = 50
    logits = np.zeros((3, V), np.float32)
    logits[0, 7] = 3e4            # one logit dominates: logp(7) = 0 exactly-ish, others = -3e4
    logits[1, :] = -2e4           # all tied at a huge negative value: uniform
    logits[2, ::2] = 1e4          # half tied at the max
    targets = np.array([7, 3, 4], np.int32)
    logp, lse = run_logprobs(logits, targets)
    ref, rlse, _ = logprobs_ref64(logits, targets)
    np.testing.assert_allclose(logp, ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse, rlse, rtol=1e-12)
    lg = np.zeros_like(logits)
    _core.logprobs_backward(lg, np.ones(3, np.float32), logits, targets, lse)
    assert np.all(np.isfinite(lg))


@pytest.mark.parametrize("N,V,scale", [(1, 1, 1.0), (1, 3, 1.0), (5, 17, 3.0), (6, 1000, 1e4), (2, 49152, 4.0)])
def test_logprobs_backward_matches_float64(simd, rng, N, V, scale):
    logits = (rng.standard_normal((N, V)) * scale).astype(np.float32)
    targets = rng.integers(0, V, N).astype(np.int32)
    if N > 3:
        targets[0] = -1
        targets[3] = int(np.argmax(logits[3]))
    dlogp = rng.standard_normal(N).astype(np.float32)
    logp, lse = run_logprobs(logits, targets)
    _, _, p = logprobs_ref64(logits, targets)
    onehot = np.zeros((N, V))
    keep = targets >= 0
    onehot[np.arange(N)[keep], targets[keep]] = 1.0
    ref = dlogp[:, None].astype(np.float64) * (onehot - p)
    ref[~keep] = 0.0
    d0 = rng.standard_normal((N, V)).astype(np.float32)
    d = d0.copy()
    _core.logprobs_backward(d, dlogp, logits, targets, lse)
    err = np.abs((d.astype(np.float64) - d0) - ref)
    assert np.all(err <= 2e-6 * np.abs(dlogp)[:, None] + 2e-7 * np.abs(d0))
    np.testing.assert_array_equal(d[~keep], d0[~keep])
    # In place: logits overwritten by the gradient, ignored rows zeroed.
    ip = logits.copy()
    _core.logprobs_backward_inplace(ip, dlogp, targets, lse)
    assert np.all(np.abs(ip - ref) <= 2e-6 * np.abs(dlogp)[:, None])
    assert np.all(ip[~keep] == 0.0)
    fresh = np.zeros_like(logits)
    _core.logprobs_backward(fresh, dlogp, logits, targets, lse)
    np.testing.assert_array_equal(ip, fresh)


def test_logprobs_backward_finite_differences(rng):
    N, V = 3, 5
    logits = rng.standard_normal((N, V)) * 2
    targets = np.array([1, -1, 4], np.int32)
    dlogp = rng.standard_normal(N).astype(np.float32)

    def fwd(x):
        return run_logprobs(x, targets)[0]

    _, lse = run_logprobs(logits.astype(np.float32), targets)
    d = np.zeros((N, V), np.float32)
    _core.logprobs_backward(d, dlogp, logits.astype(np.float32), targets, lse)
    fd_directional(fwd, logits, dlogp, d, rng)


def test_logprobs_is_thread_count_independent(rng):
    N, V = 37, 3001
    logits = (rng.standard_normal((N, V)) * 4).astype(np.float32)
    targets = rng.integers(-1, V, N).astype(np.int32)
    dlogp = rng.standard_normal(N).astype(np.float32)

    def run():
        logp, lse = run_logprobs(logits, targets)
        d = np.zeros_like(logits)
        _core.logprobs_backward(d, dlogp, logits, targets, lse)
        return logp, lse, d

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        np.testing.assert_array_equal(a, b)


def test_simd_paths_agree_bitwise(rng):
    """The vectorised exp is the same C code on every path, so the paths agree to the bit."""
    logits = (rng.standard_normal((4, 777)) * 6).astype(np.float32)
    targets = rng.integers(0, 777, 4).astype(np.int32)
    gu = (rng.standard_normal((4, 2 * 99)) * 6).astype(np.float32)
    before = _core.simd_path()
    results = []
    try:
        for path in _core.simd_supported():
            _core.set_simd_path(path)
            logp, lse = run_logprobs(logits, targets)
            d = np.zeros_like(logits)
            _core.logprobs_backward(d, np.ones(4, np.float32), logits, targets, lse)
            out = np.empty((4, 99), np.float32)
            _core.swiglu_forward(out, gu)
            dgu = np.zeros_like(gu)
            _core.swiglu_backward(dgu, out, gu)
            results.append((logp, lse, d, out, dgu))
    finally:
        _core.set_simd_path(before)
    for r in results[1:]:
        for a, b in zip(results[0], r):
            np.testing.assert_array_equal(a, b)


def test_logprobs_rejects_bad_input():
    logits = np.zeros((3, 5), np.float32)
    logp, lse = np.zeros(3, np.float32), np.zeros(3, np.float64)
    t = np.array([0, 4, -1], np.int32)
    for bad in (5, -2):
        tb = t.copy()
        tb[1] = bad
        with pytest.raises(ValueError, match="'targets'.*outside"):
            _core.logprobs_forward(logp, lse, logits, tb)
        with pytest.raises(ValueError, match="'targets'.*outside"):
            _core.logprobs_backward(logits.copy(), logp, logits, tb, lse)
    with pytest.raises(TypeError, match="'lse'.*float64"):
        _core.logprobs_forward(logp, np.zeros(3, np.float32), logits, t)
    with pytest.raises(TypeError, match="'targets'.*int32"):
        _core.logprobs_forward(logp, lse, logits, t.astype(np.int64))
    with pytest.raises(ValueError, match="'logp'"):
        _core.logprobs_forward(np.zeros(4, np.float32), lse, logits, t)
    with pytest.raises(ValueError, match="'dlogits' must not be 'logits'"):
        _core.logprobs_backward(logits, logp, logits, t, lse)
    with pytest.raises(ValueError, match="at least one column"):
        _core.logprobs_forward(logp, lse, np.zeros((3, 0), np.float32), np.full(3, -1, np.int32))
    ro = logits.copy()
    ro.flags.writeable = False
    with pytest.raises(ValueError, match="'logits'.*writeable"):
        _core.logprobs_backward_inplace(ro, logp, t, lse)


def test_swiglu_and_rope_are_thread_count_independent(rng):
    N, F = 67, 130
    gu = (rng.standard_normal((N, 2 * F)) * 4).astype(np.float32)
    dy = rng.standard_normal((N, F)).astype(np.float32)
    x = rng.standard_normal((3, 11, 9, 64)).astype(np.float32)
    cos, sin = rope_tables(11, 64, 100000.0)

    def run():
        out = np.empty((N, F), np.float32)
        _core.swiglu_forward(out, gu)
        d = np.zeros_like(gu)
        _core.swiglu_backward(d, dy, gu)
        r = x.copy()
        _core.rope_forward(r, cos, sin)
        _core.rope_backward(r, cos, sin)
        return out, d, r

    for a, b in zip(with_threads(1, run), with_threads(2, run)):
        np.testing.assert_array_equal(a, b)
