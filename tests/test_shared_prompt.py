"""Shared prompt prefix (cst/shared_prompt.py): one row [prompt, chosen, rejected] per pair gives the
same sequence log-probs and every gradient (full fine-tuning and LoRA) as the two-row computation,
on every SIMD path; its masked attention against a torch float64 reference (forward and backward) and
finite differences; thread-count determinism; bad spans; the Trainer option end to end."""
import numpy as np
import pytest
import torch

from cst import _core, losses
from cst.config import ModelConfig
from cst.data import collate
from cst.lora import LoRA
from cst.model import Model
from cst.shared_prompt import SkipPlan
from conftest import rel_err, with_threads


def config(**kw):
    base = dict(vocab_size=67, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=96,
                rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=True)
    base.update(kw)
    return ModelConfig(**base)


def pairs(rng, n, V=67, lo=1):
    """Pairs with prompts and completions of mixed lengths (tiles of 4 rows and key blocks cross spans)."""
    out = []
    for _ in range(n):
        p, c, r = (int(x) for x in rng.integers(lo, 20, size=3))
        out.append({"prompt_ids": rng.integers(0, V, p).tolist(), "chosen_ids": rng.integers(0, V, c).tolist(),
                    "rejected_ids": rng.integers(0, V, r).tolist()})
    return out


def seq_logps_and_grads(m, ex, shared, weights):
    """Per-pair (chosen, rejected) log-prob sums and the gradient of sum(weights * logps)."""
    b = collate(ex, share_prompt=shared)
    m.zero_grad()
    tlp = m.forward_logprobs(b.tokens, b.targets, b.lengths, skip=b.skip)
    tlp2 = np.concatenate([tlp, tlp]) if shared else tlp
    lp = losses.sequence_logps(tlp2, b.mask)
    d = losses.sequence_logps_backward(weights, b.mask)
    if shared:
        d = d[:len(ex)] + d[len(ex):]
    m.backward_logprobs(np.ascontiguousarray(d, np.float32))
    P = len(ex)
    return np.stack([lp[:P], lp[P:]], 1), m.flat_grads.copy()


@pytest.mark.parametrize("tie", [True, False])
def test_shared_equals_unshared_full_finetuning(simd, rng, tie):
    m = Model(config(tie_embeddings=tie), seed=3)
    ex = pairs(rng, 5)
    w = rng.normal(size=2 * len(ex)).astype(np.float32)
    lp0, g0 = seq_logps_and_grads(m, ex, False, w)
    lp1, g1 = seq_logps_and_grads(m, ex, True, w)
    np.testing.assert_allclose(lp1, lp0, rtol=2e-6, atol=2e-5)
    assert rel_err(g1, g0) < 2e-6
    b = collate(ex, share_prompt=True)
    assert b.tokens.shape[0] == len(ex) and b.n_tokens < collate(ex).n_tokens


def test_shared_equals_unshared_lora_and_gqa_heads(simd, rng):
    # head sizes 64 and 128 take the AVX-512 kernels; 2 q heads over 1 kv head
    for heads, dim in ((2, 128), (1, 128)):
        m = Model(config(dim=dim, n_heads=heads, n_kv_heads=1, ffn_dim=96), seed=5)
        m.frozen_base = True
        lora = LoRA(m, r=4, alpha=8.0, seed=2).attach()
        for name, arr in lora.params.items():  # B = 0 at init would leave A's gradient zero
            if name.endswith("lora_B.weight"):
                arr[...] = rng.normal(0, 0.05, size=arr.shape).astype(np.float32)
        ex = pairs(rng, 4)
        w = rng.normal(size=2 * len(ex)).astype(np.float32)
        res = []
        for shared in (False, True):
            lora.zero_grad()
            lp, _ = seq_logps_and_grads(m, ex, shared, w)
            res.append((lp, lora.flat_grads.copy()))
        np.testing.assert_allclose(res[1][0], res[0][0], rtol=2e-6, atol=2e-5)
        assert rel_err(res[1][1], res[0][1]) < 5e-6


def test_thread_count_bitwise(rng):
    m = Model(config(), seed=1)
    ex = pairs(rng, 6)
    w = rng.normal(size=2 * len(ex)).astype(np.float32)
    r1 = with_threads(1, lambda: seq_logps_and_grads(m, ex, True, w))
    r2 = with_threads(2, lambda: seq_logps_and_grads(m, ex, True, w))
    assert np.array_equal(r1[0], r2[0]) and np.array_equal(r1[1], r2[1])


# ---- the masked attention alone, against torch float64 ----

def torch_masked_attention(q, k, v, lengths, skip):
    """Reference: row b's query t sees keys s <= t, s < lengths[b], minus [s0, s1) when t >= s1."""
    B, T, NH, HS = q.shape
    rep = NH // k.shape[2]
    kk, vv = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    s = torch.einsum("bthd,bshd->bhts", q, kk) / HS ** 0.5
    t = torch.arange(T)
    allow = torch.zeros(B, T, T, dtype=torch.bool)
    for b in range(B):
        s0, s1 = int(skip[b, 0]), int(skip[b, 1])
        a = (t[None, :] <= t[:, None]) & (t[None, :] < int(lengths[b]))
        a &= ~((t[:, None] >= s1) & (t[None, :] >= s0) & (t[None, :] < s1))
        allow[b] = a
    s = s.masked_fill(~allow[:, None], float("-inf"))
    p = torch.softmax(s, -1)
    out = torch.einsum("bhts,bshd->bthd", p, vv)
    valid = (t[None, :] < torch.as_tensor(lengths)[:, None]).to(q.dtype)
    return out * valid[:, :, None, None]


def plan_case(rng, HS):
    B, NH, NKV = 3, 4, 2
    lengths = np.array([37, 70, 12], np.int32)
    skip = np.array([[9, 21], [5, 50], [3, 4]], np.int32)
    T = int(lengths.max()) + 3
    cos, sin = np.ones((T, HS // 2), np.float32), np.zeros((T, HS // 2), np.float32)
    plan = SkipPlan(skip, lengths, T, cos, sin)
    q = rng.normal(size=(B, T, NH, HS)).astype(np.float32)
    k = rng.normal(size=(B, T, NKV, HS)).astype(np.float32)
    v = rng.normal(size=(B, T, NKV, HS)).astype(np.float32)
    return plan, q, k, v, lengths, skip


def arena():
    store = {}

    def buf(name, shape, dtype=np.float32):
        a = store.get(name)
        if a is None or a.shape != tuple(shape):
            a = store[name] = np.empty(shape, dtype)
        return a
    return buf


@pytest.mark.parametrize("HS", [16, 64, 128])
def test_masked_attention_against_torch_float64(simd, rng, HS):
    plan, q, k, v, lengths, skip = plan_case(rng, HS)
    B, T, NH, _ = q.shape
    buf = arena()
    att, lse = np.empty_like(q), np.empty((B, NH, T), np.float32)
    plan.attention_forward(buf, att, lse, q, k, v)
    tq, tk, tv = (torch.tensor(x, dtype=torch.float64, requires_grad=True) for x in (q, k, v))
    ref = torch_masked_attention(tq, tk, tv, lengths, skip)
    assert rel_err(att, ref.detach().numpy()) < 1e-5
    dout = rng.normal(size=q.shape).astype(np.float32)
    for b in range(B):
        dout[b, lengths[b]:] = 0.0  # padded rows' gradient is ignored by both
    (ref * torch.tensor(dout, dtype=torch.float64)).sum().backward()
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    plan.attention_backward(buf, dq, dk, dv, dout, att, lse, q, k, v)
    for mine, theirs in ((dq, tq), (dk, tk), (dv, tv)):
        assert rel_err(mine, theirs.grad.numpy()) < 1e-5


def test_masked_attention_finite_differences(rng):
    plan, q, k, v, lengths, skip = plan_case(rng, 16)
    B, T, NH, _ = q.shape
    buf = arena()
    dout = rng.normal(size=q.shape).astype(np.float32)

    def f(q, k, v):
        att, lse = np.empty_like(q), np.empty((B, NH, T), np.float32)
        plan.attention_forward(buf, att, lse, q, k, v)
        return float((att.astype(np.float64) * dout).sum()), att, lse

    _, att, lse = f(q, k, v)
    dq, dk, dv = np.zeros_like(q), np.zeros_like(k), np.zeros_like(v)
    plan.attention_backward(buf, dq, dk, dv, dout, att, lse, q, k, v)
    h = 1e-2
    # keys of the skipped span (b=0: 9..20) seen by chosen queries, prompt keys seen by both sides
    for name, x, g, idx in (("k", k, dk, (0, 12, 1, 3)), ("k", k, dk, (0, 4, 0, 1)), ("v", v, dv, (1, 2, 1, 5)),
                            ("q", q, dq, (0, 30, 2, 7)), ("q", q, dq, (1, 60, 3, 0))):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        args = lambda y: {"q": (y, k, v), "k": (q, y, v), "v": (q, k, y)}[name]  # noqa: E731
        fd = (f(*args(xp))[0] - f(*args(xm))[0]) / (2 * h)
        assert abs(fd - g[idx]) < 2e-3 * max(1.0, abs(fd)), (name, idx, fd, g[idx])


def test_bad_skip_spans(rng):
    m = Model(config(), seed=0)
    b = collate(pairs(rng, 2), share_prompt=True)
    for skip, err in ((b.skip.astype(np.int64), TypeError), (b.skip[:1], ValueError),
                      (np.array([[0, 3], [1, 2]], np.int32), ValueError),
                      (np.array([[3, 3], [1, 2]], np.int32), ValueError),
                      (np.stack([b.skip[:, 0], b.lengths], 1).astype(np.int32), ValueError)):
        with pytest.raises(err, match="skip"):
            m.forward_logprobs(b.tokens, b.targets, b.lengths, skip=skip)
    with pytest.raises(ValueError, match="lengths"):
        m.forward_logprobs(b.tokens, b.targets, None, skip=b.skip)
    with pytest.raises(ValueError, match="non-empty"):
        collate([{"prompt_ids": [1], "chosen_ids": [], "rejected_ids": [2]}], share_prompt=True)


# ---- the Trainer option ----

@pytest.mark.parametrize("kind", ["lora", "full", "ipo_rpo"])
def test_trainer_share_prompt_equals_two_rows(tmp_path, kind):
    from test_trainer import config as tconfig, toy_model, varied_pairs
    from cst.trainer import Trainer
    extra = {"lora": dict(lora_r=4, lora_alpha=8.0), "full": {},
             "ipo_rpo": dict(lora_r=4, lora_alpha=8.0, loss_type="ipo", rpo_alpha=0.5)}[kind]
    data = varied_pairs(12, 3)
    runs = {}
    for share in (False, True):
        m = toy_model(1)
        seen = []
        orig = m.forward_logprobs
        m.forward_logprobs = lambda *a: seen.append(a[3] if len(a) > 3 else None) or orig(*a)
        tr = Trainer(m, tconfig(tmp_path, f"{kind}{share}", max_steps=3, eval_steps=3, share_prompt=share,
                                **extra), data, eval_dataset=varied_pairs(4, 9))
        with_threads(1, tr.train)
        assert all((s is not None) == share for s in seen) and seen  # references, steps and eval alike
        runs[share] = (tr._params.copy(), tr._ref.copy(), [h.get("loss", h.get("eval_loss")) for h in tr.history])
    (p0, r0, h0), (p1, r1, h1) = runs[False], runs[True]
    np.testing.assert_allclose(r1, r0, rtol=1e-6, atol=1e-5)
    assert rel_err(p1, p0) < 1e-5
    np.testing.assert_allclose(h1, h0, rtol=1e-5)


def test_share_prompt_config_checked():
    from cst.training_config import DPOConfig
    assert DPOConfig().share_prompt is True
    with pytest.raises(ValueError, match="share_prompt"):
        DPOConfig(share_prompt=1)
    b = collate([{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5]}], sft=True, share_prompt=True)
    assert b.skip is None and b.tokens.tolist() == [[1, 2, 3]]  # SFT has no pairs to share


def test_unscored_slot_is_left_alone(rng):
    """Targets that ignore the rejected side's first token: the remaining positions still equal the
    two-row computation (the remapping touches only scored slots)."""
    m = Model(config(), seed=2)
    ex = pairs(rng, 3, lo=2)
    b = collate(ex, share_prompt=True)
    tg = b.targets.copy()
    tg[np.arange(3), b.skip[:, 1] - 1] = -1
    lp = m.forward_logprobs(b.tokens, tg, b.lengths, skip=b.skip).copy()
    u = collate(ex)
    ref = m.forward_logprobs(u.tokens, u.targets, u.lengths)
    for i, (s0, s1) in enumerate(b.skip):
        np.testing.assert_allclose(lp[i, s0 - 1:s1 - 1], ref[i, s0 - 1:s1 - 1], rtol=1e-6, atol=1e-6)
        n = b.lengths[i] - s1
        np.testing.assert_allclose(lp[i, s1:s1 + n - 1], ref[3 + i, s0:s0 + n - 1], rtol=1e-6, atol=1e-6)
        assert lp[i, s1 - 1] == 0.0
