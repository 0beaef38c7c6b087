"""KV-cache generation (csrc/kernels/gen.c, cst/generate.py) against a float64 NumPy full-recompute forward and
Hugging Face transformers (LlamaForCausalLM, logits processors, greedy generate) on tiny random models."""
import numpy as np
import pytest

import cst
import cst.ops
from cst import _core
from cst import generate as gen
from cst.generate import KVCache, apply_repetition_penalty, generate, process_logits
from cst.model import gen_offsets

from conftest import rel_err

CFG_TIED = cst.ModelConfig(vocab_size=97, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64,
                           max_seq_len=96, rope_theta=500.0, tie_embeddings=True)
CFG_UNTIED = cst.ModelConfig(vocab_size=300, dim=64, n_layers=2, n_heads=4, n_kv_heads=1, ffn_dim=96,
                             max_seq_len=96, rope_theta=10000.0, norm_eps=1e-6, tie_embeddings=False)
# SmolLM2's head size (64) and grouping (3 query heads per KV head): the AVX-512 attention kernel's case.
CFG_HS64 = cst.ModelConfig(vocab_size=150, dim=192, n_layers=2, n_heads=3, n_kv_heads=1, ffn_dim=64,
                           max_seq_len=96, rope_theta=10000.0, tie_embeddings=True)


def make_model(cfg, seed=0):
    """Weights large enough that logits are spread (no near-ties for argmax), norms not all ones."""
    m = cst.Model(cfg, seed=seed)
    rng = np.random.default_rng(seed + 100)
    for name, a in m.params.items():
        if a.ndim == 1:
            a[...] = 1.0 + 0.2 * rng.standard_normal(a.shape)
        else:
            a[...] = 0.25 * rng.standard_normal(a.shape)
    return m


@pytest.fixture(scope="module", params=["tied", "untied", "hs64"])
def model(request):
    return make_model({"tied": CFG_TIED, "untied": CFG_UNTIED, "hs64": CFG_HS64}[request.param], seed=3)


def ref_logits(model, ids):
    """Full-recompute float64 forward of one sequence: (T, V) logits."""
    cfg, P = model.config, {k: v.astype(np.float64) for k, v in model.params.items()}
    T, HS, NH, NKV = len(ids), cfg.head_dim, cfg.n_heads, cfg.n_kv_heads
    rms = lambda x, w: x / np.sqrt((x * x).mean(-1, keepdims=True) + cfg.norm_eps) * w
    ang = np.arange(T)[:, None] / cfg.rope_theta ** (np.arange(0, HS, 2) / HS)[None]
    cos, sin = np.cos(np.concatenate([ang, ang], 1))[:, None], np.sin(np.concatenate([ang, ang], 1))[:, None]

    def rope(t):  # (T, nh, HS), HF rotate_half
        return t * cos + np.concatenate([-t[..., HS // 2:], t[..., :HS // 2]], -1) * sin

    x = P["model.embed_tokens.weight"][np.asarray(ids)]
    mask = np.triu(np.ones((T, T), dtype=bool), 1)
    for i in range(cfg.n_layers):
        w = lambda n: P[f"model.layers.{i}.{n}.weight"]
        xn = rms(x, w("input_layernorm"))
        q = rope((xn @ w("self_attn.q_proj").T).reshape(T, NH, HS))
        k = np.repeat(rope((xn @ w("self_attn.k_proj").T).reshape(T, NKV, HS)), NH // NKV, axis=1)
        v = np.repeat((xn @ w("self_attn.v_proj").T).reshape(T, NKV, HS), NH // NKV, axis=1)
        s = np.einsum("thd,shd->hts", q, k) / np.sqrt(HS)
        s[:, mask] = -np.inf
        p = np.exp(s - s.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        x = x + np.einsum("hts,shd->thd", p, v).reshape(T, NH * HS) @ w("self_attn.o_proj").T
        xn = rms(x, w("post_attention_layernorm"))
        g, u = xn @ w("mlp.gate_proj").T, xn @ w("mlp.up_proj").T
        x = x + (g / (1 + np.exp(-g)) * u) @ w("mlp.down_proj").T
    head = P["model.embed_tokens.weight"] if cfg.tie_embeddings else P["lm_head.weight"]
    return rms(x, P["model.norm.weight"]) @ head.T


_HF = {}


def hf_model(model):
    """LlamaForCausalLM in float64 with this model's weights (cached per model)."""
    if id(model) in _HF:
        return _HF[id(model)][1]
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    c = model.config
    hc = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta,
                        tie_word_embeddings=c.tie_embeddings, attn_implementation="eager")
    hm = tf.LlamaForCausalLM(hc)
    missing, unexpected = hm.load_state_dict({k: torch.from_numpy(v.copy()) for k, v in model.params.items()},
                                             strict=False)
    assert not unexpected and set(missing) <= ({"lm_head.weight"} if c.tie_embeddings else set())
    _HF[id(model)] = (model, hm.double().eval())  # keeps model alive, so its id stays unique
    return _HF[id(model)][1]


def greedy_by_recompute(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        ids.append(int(np.argmax(ref_logits(model, ids)[-1])))
    return ids[len(prompt):]


# ---------------------------------------------------------------- correctness of the cached forward

def test_greedy_equals_full_recompute(model):
    prompt = [5, 17, 2, 40, 33, 8]
    assert generate(model, [prompt], max_new_tokens=24) == [greedy_by_recompute(model, prompt, 24)]


def test_batch_of_different_lengths_equals_each_alone(model):
    prompts = [[3], [10, 20, 30, 40, 50, 60, 70], [9, 9, 1], list(range(1, 40, 3))]
    batched = generate(model, prompts, max_new_tokens=12)
    for p, out in zip(prompts, batched):
        assert out == generate(model, [p], max_new_tokens=12)[0]
    assert batched[1] == greedy_by_recompute(model, prompts[1], 12)


def test_chunked_prefill_is_identical(model, monkeypatch):
    prompts = [list(range(2, 30)), [7, 1, 4]]
    whole = generate(model, prompts, max_new_tokens=6)
    monkeypatch.setattr(gen, "PREFILL_CHUNK", 5)
    assert generate(model, prompts, max_new_tokens=6) == whole


def test_cached_logits_match_hf(model, simd):
    torch = pytest.importorskip("torch")
    hm = hf_model(model)
    rng = np.random.default_rng(7)
    V = model.config.vocab_size
    seqs = [rng.integers(0, V, 11).tolist(), rng.integers(0, V, 4).tolist()]
    with torch.no_grad():
        hf = [hm(torch.tensor([s])).logits[0].numpy() for s in seqs]
    # Prefill 3 and 2 tokens (ragged), then feed the rest in uneven steps, batch of two.
    cache = KVCache(model, 2, 16, max_chunk=4)
    done = [0, 0]
    for n in ([3, 2], [1, 1], [4, 0], [1, 1], [2, 0]):
        tok = np.zeros((2, 4), dtype=np.int32)
        for b in range(2):
            tok[b, :n[b]] = seqs[b][done[b]:done[b] + n[b]]
        before = cache.logits.copy()
        logits = cache.step(tok, np.array(n))
        for b in range(2):
            if n[b]:
                done[b] += n[b]
                assert rel_err(logits[b], hf[b][done[b] - 1]) < 1e-4
            else:  # an idle sequence's row is left as it was
                assert np.array_equal(logits[b], before[b])
    assert done == [11, 4]
    # The NumPy reference is HF's model (HF computes rotary angles in float32 even in float64 mode).
    assert rel_err(ref_logits(model, seqs[0]), hf[0]) < 1e-5


def test_long_cache_matches_reference(simd):
    """Cached positions well past one 16-position block and not a multiple of it (the AVX-512 kernel
    scores 16 positions at a time), for a prefill then single-token steps, against float64 NumPy."""
    m = make_model(CFG_HS64, seed=5)
    seq = np.random.default_rng(11).integers(0, CFG_HS64.vocab_size, 71).tolist()
    ref = ref_logits(m, seq)
    cache = KVCache(m, 1, 80, max_chunk=37)
    got = [cache.step(np.array([seq[:37]], np.int32), np.array([37]))[0].copy()]
    for t in range(37, 71):
        got.append(cache.step(np.array([[seq[t]]], np.int32), np.array([1]))[0].copy())
    for j, t in enumerate(range(36, 71)):
        assert rel_err(got[j], ref[t]) < 1e-4, t


def test_results_do_not_depend_on_thread_count(model):
    prompts = [[1, 2, 3, 4, 5], [6, 7]]
    outs = []
    before = cst.get_num_threads()
    try:
        for n in (1, 2, 3):
            cst.set_num_threads(n)
            cache = KVCache(model, 2, 12, max_chunk=5)
            tok = np.zeros((2, 5), dtype=np.int32)
            tok[0], tok[1, :2] = prompts[0], prompts[1]
            outs.append(cache.step(tok, np.array([5, 2])).copy())
    finally:
        cst.set_num_threads(before)
    assert np.array_equal(outs[0], outs[1]) and np.array_equal(outs[0], outs[2])


def _packed(model):
    buf = np.empty(_core.gen_packed_size(model.config), np.float32)
    assert _core.gen_pack(model.config, model.flat_params, gen_offsets(model.config), buf) is None
    return buf


def _ragged_steps(cache, seqs):
    """Feeds seqs through cache in ragged chunks; returns the logits after every step."""
    done, out = [0] * len(seqs), []
    for n in ([3, 2, 4], [1, 1, 0], [4, 0, 1], [1, 1, 1]):
        tok = np.zeros((len(seqs), 4), dtype=np.int32)
        for b in range(len(seqs)):
            tok[b, :n[b]] = seqs[b][done[b]:done[b] + n[b]]
            done[b] += n[b]
        out.append(cache.step(tok, np.array(n)).copy())
    return out


def test_packed_weights_match_unpacked_and_hf(model, simd):
    """gen_forward with the weights from gen_pack (GEMM microkernel on every path, V not a multiple of
    the panel width) against the unpacked path and transformers in float64."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(11)
    V = model.config.vocab_size
    seqs = [rng.integers(0, V, 9).tolist(), rng.integers(0, V, 4).tolist(), rng.integers(0, V, 6).tolist()]
    plain = _ragged_steps(KVCache(model, 3, 16, max_chunk=4), seqs)
    packed = _ragged_steps(KVCache(model, 3, 16, max_chunk=4, packed=_packed(model)), seqs)
    for a, b in zip(plain, packed):
        assert rel_err(b, a) < 1e-5
    hm = hf_model(model)
    with torch.no_grad():
        hf = hm(torch.tensor([seqs[0][:9]])).logits[0].numpy()
    assert rel_err(packed[-1][0], hf[8]) < 1e-4


def test_packing_is_the_same_on_every_simd_path(model):
    """One layout for every path (so weights packed before a path switch stay valid), and every padded
    slot is zero."""
    from conftest import SIMD_PATHS
    before, packs = _core.simd_path(), []
    try:
        for path in SIMD_PATHS:
            _core.set_simd_path(path)
            packs.append(_packed(model))
    finally:
        _core.set_simd_path(before)
    assert all(np.array_equal(packs[0], p) for p in packs[1:])
    cfg = model.config
    n_panels = -(-cfg.vocab_size // 16)  # the LM head is packed last, in panels of 16 rows
    panels = packs[0][-n_panels * 16 * cfg.dim:].reshape(n_panels, cfg.dim, 16)  # (panel, k, row in panel)
    W = model.params["model.embed_tokens.weight"] if cfg.tie_embeddings else model.params["lm_head.weight"]
    rows = panels.transpose(0, 2, 1).reshape(-1, cfg.dim)
    assert np.array_equal(rows[:cfg.vocab_size], W) and not rows[cfg.vocab_size:].any()


def test_packed_weights_long_prefill(model):
    """More than 64 rows in one call (a long prefill) use the ordinary GEMM even with packed weights; the
    packed pointer must still step over every matrix (the head is read packed)."""
    rng = np.random.default_rng(12)
    V = model.config.vocab_size
    tok = rng.integers(0, V, (3, 30)).astype(np.int32)
    n = np.array([30, 25, 28], np.int32)
    plain = KVCache(model, 3, 40, max_chunk=30).step(tok, n).copy()
    packed = KVCache(model, 3, 40, max_chunk=30, packed=_packed(model)).step(tok, n)
    assert rel_err(packed, plain) < 1e-5


def test_packed_results_do_not_depend_on_thread_count(model):
    seqs = [[1, 2, 3, 4, 5, 6, 7, 8, 9], [6, 7, 8, 9], [2, 4, 6, 8, 10, 12]]
    before, outs = cst.get_num_threads(), []
    try:
        for n in (1, 2, 3):
            cst.set_num_threads(n)
            outs.append(_ragged_steps(KVCache(model, 3, 16, max_chunk=4, packed=_packed(model)), seqs))
    finally:
        cst.set_num_threads(before)
    for o in outs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(outs[0], o))


def test_generate_packs_from_the_batch_threshold(model, monkeypatch):
    """generate() packs for B >= PACK_MIN_BATCH; the tokens agree with the unpacked path, and two
    threads generating at once (one gets the shared buffer, one its own) agree with both."""
    import threading
    prompts = [[3, 1], [10, 20, 30, 40, 50], [9, 9, 1], [7]]
    gen.free_pack_buffer()
    monkeypatch.setattr(gen, "PACK_MIN_BATCH", 10**9)
    plain = generate(model, prompts, max_new_tokens=10)
    assert gen._pack_buffer._buf is None  # below the threshold nothing was packed
    monkeypatch.setattr(gen, "PACK_MIN_BATCH", 1)
    assert generate(model, prompts, max_new_tokens=10) == plain
    assert gen._pack_buffer._buf is not None
    results = [None, None]

    def work(i):
        results[i] = generate(model, prompts, max_new_tokens=10)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [plain, plain]
    gen.free_pack_buffer()
    assert gen._pack_buffer._buf is None
    assert generate(model, prompts, max_new_tokens=10) == plain


def test_greedy_and_repetition_penalty_match_hf_generate(model):
    torch = pytest.importorskip("torch")
    hm = hf_model(model)
    prompt = [4, 8, 15, 16, 23, 42]
    for pen in (1.0, 1.5, 0.7):
        with torch.no_grad():
            ref = hm.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, repetition_penalty=pen,
                              pad_token_id=0, eos_token_id=None, attention_mask=torch.ones(1, len(prompt)))
        ours = generate(model, [prompt], max_new_tokens=15, repetition_penalty=pen)[0]
        assert ours == ref[0, len(prompt):].tolist(), pen
    plain = generate(model, [prompt], max_new_tokens=15)[0]
    assert generate(model, [prompt], max_new_tokens=15, repetition_penalty=1.5)[0] != plain


# ---------------------------------------------------------------- logits processing and sampling

def test_logit_processors_match_hf():
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    rng = np.random.default_rng(0)
    for trial in range(20):
        V = int(rng.integers(2, 200))
        logits = rng.normal(0, 3, V)
        logits[rng.integers(0, V, 3)] = 0.0
        seen = rng.integers(0, V, int(rng.integers(1, 20)))
        pen = float(rng.choice([0.5, 1.0, 1.3, 2.0]))
        hf = lp.RepetitionPenaltyLogitsProcessor(pen)(torch.tensor(seen)[None], torch.tensor(logits)[None])
        assert np.allclose(apply_repetition_penalty(logits, seen, pen), hf[0].numpy(), rtol=1e-12, atol=0)
        temp, k, p = float(rng.uniform(0.3, 2)), int(rng.integers(0, V + 3)), float(rng.uniform(0.05, 1))
        x = torch.tensor(logits)[None]
        x = lp.TemperatureLogitsWarper(temp)(None, x)
        if k:
            x = lp.TopKLogitsWarper(k)(None, x)
        x = lp.TopPLogitsWarper(p)(None, x)
        ours = process_logits(logits, temp, k, p)
        assert np.array_equal(np.isinf(ours), np.isinf(x[0].numpy()))
        fin = np.isfinite(ours)
        assert np.allclose(ours[fin], x[0].numpy()[fin], rtol=1e-12)


def test_sampler_follows_the_distribution():
    x = np.log(np.array([0.5, 0.25, 0.125, 0.125]))
    rng = np.random.default_rng(1)
    counts = np.bincount([gen._sample(x, rng) for _ in range(8000)], minlength=4) / 8000
    assert np.allclose(counts, [0.5, 0.25, 0.125, 0.125], atol=0.02)


def test_sampling_reproducible_with_seed(model):
    prompts = [[1, 2, 3], [4, 5]]
    a = generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=11)
    assert a == generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=11)
    assert a != generate(model, prompts, max_new_tokens=20, temperature=1.5, seed=12)


def test_top_k_1_and_tiny_top_p_equal_greedy(model):
    prompts = [[11, 12, 13], [2]]
    greedy = generate(model, prompts, max_new_tokens=15)
    assert generate(model, prompts, max_new_tokens=15, temperature=2.0, top_k=1, seed=0) == greedy
    assert generate(model, prompts, max_new_tokens=15, temperature=2.0, top_p=1e-9, seed=0) == greedy


# ---------------------------------------------------------------- stopping, streaming, interrupts

def test_stops_at_eos_included(model):
    prompt = [5, 6, 7]
    full = generate(model, [prompt], max_new_tokens=20)[0]
    eos = full[4]
    k = full.index(eos)
    assert generate(model, [prompt], max_new_tokens=20, eos_token_id=eos)[0] == full[:k + 1]
    unused = [i for i in range(model.config.vocab_size) if i not in full][0]
    assert generate(model, [prompt], max_new_tokens=20, eos_token_id=[unused, eos])[0] == full[:k + 1]
    # In a batch, the other sequence goes on unaffected.
    other = [9, 8, 7, 6]
    both = generate(model, [prompt, other], max_new_tokens=20, eos_token_id=eos)
    assert both[0] == full[:k + 1]
    assert both[1] == generate(model, [other], max_new_tokens=20, eos_token_id=eos)[0]


def test_stop_strings(model):
    prompt = [1, 2, 3]
    full = generate(model, [prompt], max_new_tokens=20)[0]
    decode = lambda ids: "".join(chr(ord("a") + i % 26) for i in ids)
    stop = decode(full[5:7])
    k = decode(full).index(stop) + len(stop)  # one char per token
    assert generate(model, [prompt], max_new_tokens=20, stop_strings=stop, tokenizer=decode)[0] == full[:k]

    class Tok:
        def decode(self, ids):
            return decode(ids)
    assert generate(model, [prompt], max_new_tokens=20, stop_strings=["zzzzzz", stop], tokenizer=Tok())[0] == full[:k]


def test_stream_receives_tokens_in_order(model):
    got = []
    out = generate(model, [[3, 1, 4, 1, 5]], max_new_tokens=10, temperature=1.0, seed=5, stream=got.append)
    assert got == out[0] and len(got) == 10


def test_keyboard_interrupt_leaves_no_state(model):
    def boom(tok, n=[0]):
        n[0] += 1
        if n[0] == 3:
            raise KeyboardInterrupt
    ref = generate(model, [[7, 7, 2]], max_new_tokens=8)
    with pytest.raises(KeyboardInterrupt):
        generate(model, [[7, 7, 2]], max_new_tokens=8, stream=boom)
    assert generate(model, [[7, 7, 2]], max_new_tokens=8) == ref


def test_zero_new_tokens_and_numpy_arguments(model):
    assert generate(model, [[1], [2, 3]], max_new_tokens=0) == [[], []]
    ref = generate(model, [[1, 2, 3]], max_new_tokens=6, temperature=0.5, top_p=0.9, seed=4)
    assert generate(model, [np.array([1, 2, 3])], max_new_tokens=np.int64(6), temperature=np.float32(0.5),
                    top_p=np.float64(0.9), seed=4) == ref


# ---------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs", [
    dict(prompts=[]), dict(prompts=[[]]), dict(prompts=[[1], []]), dict(prompts=[[1, 97]]),
    dict(prompts=[[-1]]), dict(prompts=[[1.5]]), dict(prompts=[[1] * 90], max_new_tokens=7),
    dict(max_new_tokens=-1), dict(max_new_tokens=2.0), dict(temperature=-0.1), dict(temperature=float("nan")),
    dict(top_k=-1), dict(top_k=1.5), dict(top_p=0.0), dict(top_p=1.5), dict(repetition_penalty=0.0),
    dict(repetition_penalty=-1.0), dict(eos_token_id=97), dict(eos_token_id="a"), dict(eos_token_id=[1, -1]),
    dict(stop_strings="x"), dict(stop_strings="", tokenizer=str), dict(stream=print, prompts=[[1], [2]]),
    dict(stream=5), dict(tokenizer=5), dict(temperature=True), dict(top_p="0.5"),
])
def test_bad_generate_arguments(kwargs):
    m = make_model(CFG_TIED)
    kwargs = dict(dict(prompts=[[1, 2]], max_new_tokens=4), **kwargs)
    with pytest.raises(ValueError):
        generate(m, **kwargs)


def test_bad_model():
    with pytest.raises(TypeError):
        generate(object(), [[1]])
    m = make_model(CFG_TIED)

    class Fake:
        config = CFG_TIED
        flat_params = m.flat_params[:-1]
    with pytest.raises(ValueError, match="flat_params"):
        generate(Fake(), [[1]])


def _core_args(cfg, B=2, S=3, maxT=8):
    kvd = cfg.n_kv_heads * cfg.head_dim
    m = make_model(cfg)
    cos, sin = cst.ops.rope_tables(maxT, cfg.head_dim, cfg.rope_theta)
    return dict(config=cfg, params=m.flat_params, layout=gen_offsets(cfg), tokens=np.ones((B, S), np.int32),
                start_pos=np.zeros(B, np.int32), n_new=np.full(B, S, np.int32), rope_cos=cos, rope_sin=sin,
                kcache=np.zeros((cfg.n_layers, B, maxT, kvd), np.float32),
                vcache=np.zeros((cfg.n_layers, B, maxT, kvd), np.float32),
                scratch=np.zeros(_core.gen_scratch_size(cfg, B, S, maxT), np.float32),
                logits=np.zeros((B, cfg.vocab_size), np.float32))


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(params=a["params"][:-1]), ValueError, "params"),
    (lambda a: a.update(params=a["params"].astype(np.float64)), TypeError, "params"),
    (lambda a: a.update(tokens=a["tokens"].astype(np.int64)), TypeError, "tokens"),
    (lambda a: a["tokens"].__setitem__((1, 2), 97), ValueError, "tokens"),
    (lambda a: a["tokens"].__setitem__((1, 2), -3), ValueError, "tokens"),
    (lambda a: a.update(start_pos=np.array([0, 6], np.int32)), ValueError, "start_pos"),
    (lambda a: a.update(start_pos=np.array([-1, 0], np.int32)), ValueError, "start_pos"),
    (lambda a: a.update(n_new=np.array([4, 1], np.int32)), ValueError, "n_new"),
    (lambda a: a.update(n_new=np.array([-1, 1], np.int32)), ValueError, "n_new"),
    (lambda a: a.update(n_new=np.array([1, 1, 1], np.int32)), ValueError, "n_new"),
    (lambda a: a.update(kcache=a["kcache"][:, :, :, :-1].copy()), ValueError, "kcache"),
    (lambda a: a.update(vcache=a["vcache"][:1].copy()), ValueError, "vcache"),
    (lambda a: a.update(vcache=a["kcache"]), ValueError, "share memory"),
    (lambda a: a.update(kcache=a["kcache"][:, :, ::2]), ValueError, "kcache"),
    (lambda a: a.update(scratch=a["scratch"][:-1].copy()), ValueError, "scratch"),
    (lambda a: a.update(logits=a["logits"][:, :-1].copy()), ValueError, "logits"),
    (lambda a: a.update(config=object()), TypeError, "config"),
    (lambda a: a.update(rope_cos=a["rope_cos"][:-1].copy()), ValueError, "rope_cos"),
    (lambda a: a.update(rope_sin=a["rope_sin"][:, :-1].copy()), ValueError, "rope_sin"),
    (lambda a: a.update(rope_sin=a["rope_cos"].astype(np.float64)), TypeError, "rope_sin"),
    (lambda a: a.update(tokens=[[1, 1, 1], [1, 1, 1]]), TypeError, "tokens"),
    (lambda a: a.update(layout=a["layout"][:-1].copy()), ValueError, "layout"),
    (lambda a: a.update(layout=a["layout"].astype(np.int32)), TypeError, "layout"),
    (lambda a: a["layout"].__setitem__((1, 3), a["params"].size - 5), ValueError, "layout"),
    (lambda a: a["layout"].__setitem__((0, 0), -1), ValueError, "layout"),
    (lambda a: a["layout"].__setitem__((2, 2), -1), ValueError, "layout"),
])
def test_core_rejects_bad_input(change, err, match):
    args = _core_args(CFG_TIED)
    change(args)
    with pytest.raises(err, match=match):
        _core.gen_forward(**args)


@pytest.mark.parametrize("change,err,match", [
    (lambda a: a.update(packed=a["packed"][:-1].copy()), ValueError, "packed"),
    (lambda a: a.update(packed=a["packed"].astype(np.float64)), TypeError, "packed"),
    (lambda a: a.update(packed=a["params"]), ValueError, "packed"),
])
def test_core_rejects_bad_packed_weights(change, err, match):
    args = _core_args(CFG_TIED)
    args["packed"] = np.zeros(_core.gen_packed_size(CFG_TIED), np.float32)
    _core.gen_pack(CFG_TIED, args["params"], args["layout"], args["packed"])
    _core.gen_forward(**args)
    change(args)
    with pytest.raises(err, match=match):
        _core.gen_forward(**args)


def test_gen_pack_rejects_bad_input():
    m = make_model(CFG_TIED)
    n = _core.gen_packed_size(CFG_TIED)
    lay = gen_offsets(CFG_TIED)
    with pytest.raises(ValueError, match="out"):
        _core.gen_pack(CFG_TIED, m.flat_params, lay, np.zeros(n - 1, np.float32))
    with pytest.raises(ValueError, match="params"):
        _core.gen_pack(CFG_TIED, m.flat_params[:-1], lay, np.zeros(n, np.float32))
    with pytest.raises(TypeError, match="out"):
        _core.gen_pack(CFG_TIED, m.flat_params, lay, np.zeros(n, np.float64))
    big = np.zeros(m.flat_params.size + n, np.float32)
    with pytest.raises(ValueError, match="share memory"):
        _core.gen_pack(CFG_TIED, big[:m.flat_params.size], lay, big[m.flat_params.size - 1:-1])


def test_core_read_only_outputs_and_padding():
    args = _core_args(CFG_TIED)
    args["logits"].setflags(write=False)
    with pytest.raises(ValueError, match="writeable"):
        _core.gen_forward(**args)
    # Padding beyond n_new is never read, so any value there is fine.
    args = _core_args(CFG_TIED)
    args["tokens"][1, 1:] = 12345
    args["n_new"][1] = 1
    _core.gen_forward(**args)
    assert np.isfinite(args["logits"]).all()
