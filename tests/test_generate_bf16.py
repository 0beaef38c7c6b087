"""Generation on bf16 weights: the bf16 product of decoding (_core.gemv_bf16: bf16 inputs and weights,
fp32 sums) against float64 on every SIMD path and both ways ("dot": vdpbf16ps on k pairs, "convert":
widened to fp32), independent of the number of rows and of the thread count; a bf16 Model generating
from its bf16 matrices (no float32 copy) against the float32 model of the same weights and bitwise
against the same weights read from a BF16 GGUF (cst's export, cst.load(..., dtype="q")); adapters still
merged in float32; and the checks on BF16 blocks handed to gen_forward."""
import numpy as np
import pytest

import cst
from cst import _core
from cst.bf16 import from_bf16, to_bf16
from cst.core.generate import KVCache, generate
from conftest import rel_err, with_threads
from test_bf16 import way  # noqa: F401  (the fixture: each bf16 way this CPU runs)
from test_bf16_model import twins


def _operands(rng, N, C, OC):
    return to_bf16(rng.standard_normal((N, C))), to_bf16(rng.standard_normal((OC, C)))


# (N, C, OC): one row (weight rows streamed singly), two (2 x 8 tiles), many (4 x 4 over the rows); weight rows that leave
# partial tiles; odd C (no whole k pairs: the convert way everywhere); SmolLM2's shapes.
SHAPES = [(1, 576, 960), (2, 576, 100), (3, 32, 17), (5, 1537, 33), (7, 1536, 577), (16, 576, 49), (1, 5, 3)]


@pytest.mark.parametrize("N,C,OC", SHAPES)
def test_gemv_bf16_against_float64(simd, way, rng, N, C, OC):
    x, w = _operands(rng, N, C, OC)
    want = from_bf16(x).astype(np.float64) @ from_bf16(w).astype(np.float64).T
    out = np.full((N, OC), np.nan, np.float32)
    _core.gemv_bf16(out, x, w)
    # exact products of bf16 values summed in fp32: relative error at fp32's level, not bf16's (4e-3)
    assert rel_err(out, want) < 1e-6
    base = rng.standard_normal((N, OC)).astype(np.float32)
    acc = base.copy()
    _core.gemv_bf16(acc, x, w, accumulate=True)
    np.testing.assert_array_equal(acc, base + out)


@pytest.mark.parametrize("N,C,OC", [(7, 576, 1536), (16, 1536, 577), (5, 1537, 33)])
def test_gemv_bf16_rows_do_not_depend_on_n_or_threads(simd, way, rng, N, C, OC):
    x, w = _operands(rng, N, C, OC)
    out = np.empty((N, OC), np.float32)
    with_threads(2, lambda: _core.gemv_bf16(out, x, w))
    for i in range(N):  # each row alone (weight rows streamed singly), on one thread
        one = np.empty((1, OC), np.float32)
        with_threads(1, lambda: _core.gemv_bf16(one, x[i:i + 1].copy(), w))
        np.testing.assert_array_equal(one[0], out[i])


def test_gemv_bf16_checks_its_operands():
    x, w = _operands(np.random.default_rng(0), 2, 8, 4)
    with pytest.raises(ValueError):
        _core.gemv_bf16(np.empty((2, 4), np.float32), x, to_bf16(np.ones((4, 9))))  # C differs
    with pytest.raises(TypeError):
        _core.gemv_bf16(np.empty((2, 4), np.float32), from_bf16(x), w)  # float32 where bf16 bits are expected


def _last_logits(model, prompt):
    c = KVCache(model, 1, len(prompt) + 4)
    return c.step(np.array([prompt], np.int32), np.array([len(prompt)], np.int32)).copy()[0]


@pytest.mark.parametrize("tie", [True, False])
def test_bf16_model_generates_from_its_bf16_matrices(tie, monkeypatch):
    (m32, l32), (m16, l16) = twins(tie, seed=4)
    l32.enabled = l16.enabled = False
    prompt = [1, 2, 3, 4, 5, 6]
    # the float32 model holds the same (bf16-valued) weights; bf16 generation also rounds each product's
    # input to bf16, which moves the logits by bf16's precision (measured 3.4e-3 here), not more
    err = rel_err(_last_logits(m16._generation_view(), prompt), _last_logits(m32, prompt))
    assert 1e-6 < err < 2e-2
    # no float32 copy of the weights is made for it
    monkeypatch.setattr(type(m16), "float32_params", lambda self: pytest.fail("float32 copy made"))
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11], [12]]
    together = m16.generate(prompts, max_new_tokens=6)
    # a sequence alone or in a batch, on 1 or 2 threads: the same tokens
    for p, want in zip(prompts, together):
        assert with_threads(1, lambda: m16.generate([p], max_new_tokens=6))[0] == want
    assert generate(m16, prompts, max_new_tokens=6) == together  # the free function reads it too


def test_bf16_model_with_adapters_generates_from_merged_float32_weights():
    (m32, l32), (m16, l16) = twins(True, seed=5)
    prompts = [[1, 2, 3, 4], [5, 6], [7, 8, 9, 10, 11], [12]]  # 4 sequences: the packed float32 path too
    want = m32.generate(prompts, max_new_tokens=6)
    assert m16.generate(prompts, max_new_tokens=6) == want
    assert m16.dtype == "bf16"


def test_bf16_gguf_blocks_generate_as_the_bf16_model(tmp_path):
    """cst's BF16 GGUF export, read back as blocks (dtype="q", Q/K rows un-permuted from llama.cpp's
    order) and as a bf16 Model: the same products on the same bf16 values, so the same logits bit for bit."""
    (m32, l32), _ = twins(False, seed=6)
    l32.enabled = False
    path = tmp_path / "m.gguf"
    cst.io.save(m32, path, format="gguf", dtype="bf16")
    q = cst.load(str(path), dtype="q")
    assert set(q.quantized_types.values()) == {30}  # every matrix kept as BF16
    assert q.flat_params.size == sum(a.size for a in m32.params.values() if a.ndim == 1)  # only norms in float32
    m16 = cst.load(str(path), dtype="bf16")
    np.testing.assert_array_equal(m16.float32_params(), m32.float32_params())  # bf16 values are exact
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    np.testing.assert_array_equal(_last_logits(q, prompt), _last_logits(m16._generation_view(), prompt))
    assert q.generate([prompt], max_new_tokens=8) == m16.generate([prompt], max_new_tokens=8)


def test_gen_forward_refuses_misplaced_bf16_blocks():
    _, (m16, l16) = twins(True, seed=7)
    l16.enabled = False
    v = m16._generation_view()
    cfg = m16.config
    qo = v.gen_quant["qoffsets"].copy()
    qo[0, 1, 0] += 1  # layer 0's q|k|v one byte further: an odd address
    c = KVCache(v, 1, 8)
    tokens, n_new = np.array([[1, 2]], np.int32), np.array([2], np.int32)
    with pytest.raises(ValueError, match="odd address"):
        _core.gen_forward(cfg, v.flat_params, v.gen_layout, tokens, c.lengths, n_new, c.rope_cos, c.rope_sin,
                          c.k, c.v, c.scratch, c.logits, qweights=v.gen_quant["qweights"], qoffsets=qo,
                          qtypes=v.gen_quant["qtypes"])
    qo = v.gen_quant["qoffsets"].copy()
    qo[0, 1, 0] = v.gen_quant["qweights"].size - 2  # the matrix would run past the buffer
    with pytest.raises(ValueError, match="outside"):
        _core.gen_forward(cfg, v.flat_params, v.gen_layout, tokens, c.lengths, n_new, c.rope_cos, c.rope_sin,
                          c.k, c.v, c.scratch, c.logits, qweights=v.gen_quant["qweights"], qoffsets=qo,
                          qtypes=v.gen_quant["qtypes"])


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_bf16_generation_follows_float32(tmp_path):
    from conftest import smollm2_gguf
    path = smollm2_gguf()
    m32, m16 = cst.io.load(path), cst.io.load(path, dtype="bf16")
    tok = m16.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True)
    assert rel_err(_last_logits(m16._generation_view(), prompt), _last_logits(m32, prompt)) < 3e-2
    assert "Paris" in m16.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=12)
    out = tmp_path / "smollm2-bf16.gguf"
    m16.save(out, format="gguf", dtype="bf16")
    q = cst.load(str(out), dtype="q")
    assert q.generate([prompt], max_new_tokens=16) == m16.generate([prompt], max_new_tokens=16)
