"""The whole decoder (cst/model.py) against Hugging Face transformers' LlamaForCausalLM in float64:
logits and every parameter gradient, tied and untied heads, padded batches; the chunked log-prob
path against the full one; thread-count determinism; bad input; memory; a short AdamW trajectory."""
import gc

import numpy as np
import pytest
import torch

import cst
from cst.config import ModelConfig
from cst.model import LINEARS, Model
from conftest import rel_err

transformers = pytest.importorskip("transformers")


def tiny_config(tie=True, **kw):
    base = dict(vocab_size=67, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=32,
                rope_theta=5000.0, norm_eps=1e-5, tie_embeddings=tie)
    base.update(kw)
    return ModelConfig(**base)


def hf_model(model: Model, dtype=torch.float64):
    cfg = model.config
    hc = transformers.LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.n_kv_heads, max_position_embeddings=cfg.max_seq_len,
        rope_theta=cfg.rope_theta, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=cfg.tie_embeddings,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hc)
    state = {k: torch.tensor(v) for k, v in model.params.items()}
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    hf.load_state_dict(state, strict=True)
    return hf.to(dtype)


def random_model(cfg, seed=0):
    m = Model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    # Norm weights away from 1 so their gradients and effects are not trivial.
    for name, arr in m.params.items():
        if arr.ndim == 1:
            arr[...] = rng.uniform(0.5, 1.5, arr.shape)
        else:
            arr *= 5.0  # larger weights: activations of order 1, a harder test than N(0, 0.02)
    return m


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("padded", [False, True])
def test_matches_hugging_face(tie, padded):
    cfg = tiny_config(tie)
    m = random_model(cfg)
    rng = np.random.default_rng(3)
    B, T = 3, 11
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([11, 6, 1], np.int32) if padded else None
    valid = np.ones((B, T), bool) if not padded else np.arange(T)[None] < lengths[:, None]
    R = rng.standard_normal((B, T, cfg.vocab_size)).astype(np.float32)

    logits = m.forward(tokens, lengths).copy()
    m.zero_grad()
    m.backward(R)  # garbage in padded rows: backward must ignore them

    hf = hf_model(m)
    mask = torch.tensor(valid.astype(np.int64))
    out = hf(input_ids=torch.tensor(tokens, dtype=torch.int64), attention_mask=mask).logits
    loss = (out * torch.tensor(R * valid[..., None], dtype=torch.float64)).sum()
    loss.backward()
    ref = out.detach().numpy()
    assert rel_err(logits[valid], ref[valid]) < 1e-5
    hf_grads = dict(hf.named_parameters())
    for name, g in m.grads.items():
        assert rel_err(g, hf_grads[name].grad.numpy()) < 1e-4, name


def test_logprob_paths_agree_with_full_forward():
    cfg = tiny_config(False)
    m = random_model(cfg, seed=1)
    m.logits_chunk_rows = 4  # several chunks, some of them wholly padding
    rng = np.random.default_rng(5)
    B, T, V = 3, 9, cfg.vocab_size
    tokens = rng.integers(0, V, (B, T)).astype(np.int32)
    lengths = np.array([9, 2, 5], np.int32)
    valid = np.arange(T)[None] < lengths[:, None]

    logits = m.forward(tokens, lengths).astype(np.float64)
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    ref_next = np.take_along_axis(logsm[:, :-1], tokens[:, 1:, None], -1)[..., 0]
    ref_next = ref_next * valid[:, 1:]
    got = m.token_logprobs(tokens, lengths)
    assert got.shape == (B, T - 1)
    assert np.abs(got - ref_next).max() < 1e-5
    assert not got[~valid[:, 1:]].any()
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.zeros((B, T, V), np.float32))  # token_logprobs leaves nothing to backward
    assert m.token_logprobs(tokens[:, :1]).shape == (B, 0)
    one = m.forward(tokens[:, :1]).astype(np.float64)  # T = 1: the first position alone
    np.testing.assert_allclose(one[:, 0], logits[:, 0], rtol=1e-5, atol=1e-5)

    # Chunked forward/backward vs the full path with the same d loss / d logits.
    targets = rng.integers(-1, V, (B, T)).astype(np.int32)
    dlogp = rng.standard_normal((B, T)).astype(np.float32)
    lp = m.forward_logprobs(tokens, targets, lengths).copy()
    use = valid & (targets >= 0)
    ref_lp = np.where(use, np.take_along_axis(logsm, np.maximum(targets, 0)[..., None], -1)[..., 0], 0)
    assert np.abs(lp - ref_lp).max() < 1e-5
    m.zero_grad()
    m.backward_logprobs(dlogp)
    g_chunked = m.flat_grads.copy()

    p = np.exp(logsm)
    onehot = np.zeros_like(p)
    np.put_along_axis(onehot, np.maximum(targets, 0)[..., None], 1.0, -1)
    dlogits = ((dlogp * use)[..., None] * (onehot - p)).astype(np.float32)
    m.forward(tokens, lengths)
    m.zero_grad()
    m.backward(dlogits)
    assert rel_err(g_chunked, m.flat_grads) < 1e-5

    # Every target ignored: nothing reaches the LM head, log-probs and gradients are exactly zero.
    none = np.full((B, T), -1, np.int32)
    assert not m.forward_logprobs(tokens, none, lengths).any()
    m.zero_grad()
    m.backward_logprobs(dlogp)
    assert not m.flat_grads.any()


def test_bitwise_identical_across_thread_counts():
    cfg = tiny_config(True)
    m = random_model(cfg, seed=2)
    rng = np.random.default_rng(9)
    tokens = rng.integers(0, cfg.vocab_size, (2, 13)).astype(np.int32)
    lengths = np.array([13, 7], np.int32)
    dl = rng.standard_normal((2, 13, cfg.vocab_size)).astype(np.float32)
    before = cst.get_num_threads()
    res = []
    try:
        for n in (1, 2):
            cst.set_num_threads(n)
            logits = m.forward(tokens, lengths).copy()
            m.zero_grad()
            m.backward(dl)
            res.append((logits, m.flat_grads.copy()))
    finally:
        cst.set_num_threads(before)
    np.testing.assert_array_equal(res[0][0], res[1][0])
    np.testing.assert_array_equal(res[0][1], res[1][1])
    # backward adds: a second backward of the same forward doubles every gradient (up to rounding:
    # kernels add term by term into the existing values).
    m.backward(dl)
    assert rel_err(m.flat_grads, 2 * res[1][1]) < 1e-6


def test_fused_views_share_memory_and_frozen_base():
    cfg = tiny_config(True)
    m = random_model(cfg, seed=4)
    C, HS = cfg.dim, cfg.head_dim
    qkv = m._fused[1]["qkv"]
    assert qkv.shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * HS, C)
    assert np.shares_memory(qkv, m.params["model.layers.1.self_attn.v_proj.weight"])
    np.testing.assert_array_equal(qkv[cfg.n_heads * HS:(cfg.n_heads + cfg.n_kv_heads) * HS],
                                  m.params["model.layers.1.self_attn.k_proj.weight"])
    gu = m._fused[0]["gu"]
    np.testing.assert_array_equal(gu[cfg.ffn_dim:], m.params["model.layers.0.mlp.up_proj.weight"])

    # Every projection goes through _linear_forward/_linear_backward; frozen base leaves grads alone.
    seen = []

    class Hooked(Model):
        def _linear_forward(self, layer, which, x, out, accumulate=False):
            seen.append(("f", layer, which))
            super()._linear_forward(layer, which, x, out, accumulate)

        def _linear_backward(self, layer, which, dx, dout, x, accumulate=True):
            seen.append(("b", layer, which))
            super()._linear_backward(layer, which, dx, dout, x, accumulate)

    h = Hooked(cfg)
    h.flat_params[...] = m.flat_params
    h.frozen_base = True
    tokens = np.arange(10, dtype=np.int32).reshape(2, 5)
    h.forward(tokens)
    h.backward(np.ones((2, 5, cfg.vocab_size), np.float32))
    assert h.grads is None
    expect = {(d, i, w) for d in "fb" for i in range(cfg.n_layers) for w in LINEARS}
    assert set(seen) == expect and len(seen) == len(expect)
    h.zero_grad()
    h.forward(tokens)
    h.backward(np.ones((2, 5, cfg.vocab_size), np.float32))
    assert not h.flat_grads.any()


def test_rejects_bad_input():
    cfg = tiny_config(True)
    m = Model(cfg)
    V = cfg.vocab_size
    tok = np.zeros((2, 5), np.int32)
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.zeros((2, 5, V), np.float32))
    with pytest.raises(ValueError, match="forward_logprobs"):
        m.backward_logprobs(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="'tokens'"):
        m.forward(tok.astype(np.int64))
    with pytest.raises(TypeError, match="'tokens'"):
        m.forward(tok.tolist())
    with pytest.raises(ValueError, match="'tokens'"):
        m.forward(tok[0])
    with pytest.raises(ValueError, match="'tokens'"):
        m.forward(np.zeros((2, 0), np.int32))
    with pytest.raises(ValueError, match="'tokens'"):
        m.forward(tok - 1)
    with pytest.raises(ValueError, match="'tokens'"):
        m.forward(tok + V)
    with pytest.raises(ValueError, match="max_seq_len"):
        m.forward(np.zeros((1, cfg.max_seq_len + 1), np.int32))
    with pytest.raises(TypeError, match="'lengths'"):
        m.forward(tok, np.array([5, 5], np.int64))
    with pytest.raises(ValueError, match="'lengths'"):
        m.forward(tok, np.array([5], np.int32))
    with pytest.raises(ValueError, match="'lengths'"):
        m.forward(tok, np.array([0, 5], np.int32))
    with pytest.raises(ValueError, match="'lengths'"):
        m.forward(tok, np.array([6, 5], np.int32))
    with pytest.raises(TypeError, match="'targets'"):
        m.forward_logprobs(tok, tok.astype(np.float32))
    with pytest.raises(ValueError, match="'targets'"):
        m.forward_logprobs(tok, tok[:, :4].copy())
    with pytest.raises(ValueError, match="'targets'"):
        m.forward_logprobs(tok, tok - 2)
    with pytest.raises(TypeError, match="'tokens'"):
        m.token_logprobs(None)
    m.forward(tok)
    with pytest.raises(TypeError, match="'dlogits'"):
        m.backward(np.zeros((2, 5, V), np.float64))
    with pytest.raises(ValueError, match="'dlogits'"):
        m.backward(np.zeros((2, 5, V + 1), np.float32))
    with pytest.raises(ValueError, match="'dlogits'"):
        m.backward(np.zeros((2, V, 5), np.float32).transpose(0, 2, 1))
    with pytest.raises(ValueError, match="backward_logprobs"):
        m.backward_logprobs(np.zeros((2, 5), np.float32))
    m.forward_logprobs(tok, tok)
    with pytest.raises(ValueError, match="'dlogp'"):
        m.backward_logprobs(np.zeros((2, 4), np.float32))
    with pytest.raises(TypeError, match="'dlogp'"):
        m.backward_logprobs(None)
    # A failed call must not leave a half-valid state behind.
    with pytest.raises(ValueError):
        m.forward(tok + V)
    with pytest.raises(ValueError, match="forward"):
        m.backward(np.zeros((2, 5, V), np.float32))


def test_fuzz_public_api_only_raises_type_or_value_error():
    cfg = tiny_config(True, max_seq_len=8)
    m = Model(cfg)
    rng = np.random.default_rng(11)
    V = cfg.vocab_size
    dtypes = [np.int32, np.int64, np.float32, np.float64, np.uint8, bool]

    def rand(shape, dtype, lo=0, hi=V):
        r = rng.random()
        if r < 0.08:
            return None
        if r < 0.12:
            return 3
        if r < 0.25:
            dtype = dtypes[rng.integers(len(dtypes))]
        if r < 0.4:
            shape = tuple(int(s) for s in rng.integers(0, 10, size=rng.integers(0, 4)))
        a = rng.integers(lo - 2 if r > 0.9 else lo, hi + 2 if r < 0.5 else hi, size=shape).astype(dtype)
        if 0.45 < r < 0.5 and a.ndim == 2:
            a = np.asfortranarray(a)
        return a

    calls = 0
    for _ in range(300):
        B, T = int(rng.integers(1, 4)), int(rng.integers(1, 10))
        which = rng.integers(0, 6)
        try:
            if which == 0:
                m.forward(rand((B, T), np.int32), rand((B,), np.int32, 1, T + 1) if rng.random() < 0.5 else None)
            elif which == 1:
                m.forward_logprobs(rand((B, T), np.int32), rand((B, T), np.int32, -1, V),
                                   rand((B,), np.int32, 1, T + 1) if rng.random() < 0.5 else None)
            elif which == 2:
                m.token_logprobs(rand((B, T), np.int32))
            elif which == 3:
                m.backward(rand((B, T, V), np.float32, -1, 2))
            elif which == 4:
                m.backward_logprobs(rand((B, T), np.float32, -1, 2))
            else:
                m.zero_grad()
        except (TypeError, ValueError):
            pass
        calls += 1
    assert calls == 300
    assert np.isfinite(m.flat_params).all()


def test_memory_flat_over_repeated_steps():
    psutil = pytest.importorskip("psutil")
    cfg = tiny_config(True, vocab_size=512, dim=96, ffn_dim=160, max_seq_len=64)
    m = Model(cfg)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (4, 48)).astype(np.int32)
    lengths = np.array([48, 30, 48, 5], np.int32)
    dl = rng.standard_normal((4, 48, cfg.vocab_size)).astype(np.float32)
    m.zero_grad()

    def step():
        m.forward(tokens, lengths)
        m.backward(dl)
        m.forward_logprobs(tokens, tokens, lengths)
        m.backward_logprobs(dl[..., 0].copy())
        m.token_logprobs(tokens, lengths)

    # One thread: a leak does not depend on it, and OpenMP barriers are slow on a crowded box.
    before_threads = cst.get_num_threads()
    cst.set_num_threads(1)
    try:
        for _ in range(3):
            step()
        gc.collect()
        proc = psutil.Process()
        before = proc.memory_info().rss
        for _ in range(20):
            step()
        gc.collect()
        grown = proc.memory_info().rss - before
    finally:
        cst.set_num_threads(before_threads)
    # One step's arrays are ~1.5 MB (logits alone 0.4 MB); 20 steps leaking even one logits-sized
    # array each would add 8 MB.
    assert grown < 3 << 20, f"RSS grew by {grown / 2**20:.1f} MiB over 20 steps"


def test_adamw_trajectory_matches_pytorch():
    from cst import optim
    cfg = tiny_config(True)
    m = random_model(cfg, seed=6)
    hf = hf_model(m, torch.float32)
    rng = np.random.default_rng(21)
    B, T, V = 2, 8, cfg.vocab_size
    lr, wd, clip = 3e-3, 0.1, 1.0
    opt = optim.AdamW(lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    params = list(hf.parameters())
    topt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=wd)
    ours_losses, ref_losses = [], []
    for step in range(20):
        tokens = rng.integers(0, V, (B, T + 1)).astype(np.int32)
        inp, tgt = tokens[:, :-1].copy(), tokens[:, 1:].copy()
        logp = m.forward_logprobs(inp, tgt)
        ours_losses.append(-float(logp.astype(np.float64).mean()))
        m.zero_grad()
        m.backward_logprobs(np.full((B, T), -1.0 / (B * T), np.float32))
        _, scale = optim.clip_grad_norm(m.flat_grads, clip)
        opt.step(m.flat_params, m.flat_grads, grad_scale=scale)

        topt.zero_grad()
        out = hf(input_ids=torch.tensor(inp, dtype=torch.int64)).logits
        loss = torch.nn.functional.cross_entropy(out.reshape(-1, V), torch.tensor(tgt.reshape(-1), dtype=torch.int64))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        topt.step()
        ref_losses.append(float(loss.detach()))
    np.testing.assert_allclose(ours_losses, ref_losses, rtol=2e-4)
    state = hf.state_dict()
    for name, w in m.params.items():
        assert rel_err(w, state[name].numpy()) < 1e-4, name
