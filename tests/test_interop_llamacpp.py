"""cst's GGUF LoRA adapter run by llama.cpp itself (llama-cpp-python): llama.cpp loads the adapter on the
base model's GGUF and gives the logits and greedy tokens of cst's merged model, and without the
adapter those of the base. llama-cpp-python compiles llama.cpp from source (about half an hour on 2
cores), so it lives in the `bench` extra: these tests run where it is installed and skip elsewhere."""
import numpy as np
import pytest

import cst
from conftest import CHATML
from cst.gguf import save_gguf, save_gguf_lora
from cst.lora import LoRA

llama_cpp = pytest.importorskip("llama_cpp")

pytestmark = pytest.mark.slow


def tokenizer_with_a_merge():
    """Bytes, one merge and ChatML's control tokens. llama.cpp refuses a GPT-2 vocabulary without
    tokenizer.ggml.merges, and gguf-py's writer drops an empty merges array, so there is one merge."""
    from cst.tokenizer import Tokenizer, _bytes_to_unicode
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["\u0120t", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer.from_gguf_fields(tokens, [1] * 257 + [3, 3, 3], ["\u0120 t"], pre="gpt2", bos_token_id=258,
                                      eos_token_id=259, chat_template=CHATML)


def llama(base, adapter=None):
    kw = {"lora_path": adapter} if adapter else {}
    return llama_cpp.Llama(model_path=str(base), n_ctx=256, n_batch=256, logits_all=True, verbose=False,
                           n_threads=1, seed=0, type_k=0, type_v=0, **kw)  # float32 KV cache (default f16)


def llama_logits(llm, ids):
    llm.reset()
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float64)


def merged_logits(model, lora, ids):
    """Logits of the model with the adapters merged into its weights (what cst exports and generates with)."""
    merged = cst.Model(model.config)
    merged.flat_params[...] = lora.merged_params()
    return np.asarray(merged.forward(np.array([ids], np.int32)), np.float64)[0]


def llama_greedy(llm, ids, n):
    llm.reset()
    out = []
    for t in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("targets", [("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
                                     ("q_proj", "k_proj")])
def test_llama_cpp_applies_the_adapter_like_cst_merges_it(tmp_path, targets):
    tok = tokenizer_with_a_merge()
    cfg = cst.ModelConfig(vocab_size=tok.vocab_size, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128,
                          max_seq_len=256)
    model = cst.Model(cfg, seed=1)
    model.flat_params[...] *= 8.0  # larger than the 0.02-scale init, so greedy choices are clear-cut
    model.tokenizer = tok
    base = save_gguf(model, tok, tmp_path / "base.gguf")
    lora = LoRA(model, r=4, alpha=8.0, target_modules=targets)
    lora.flat_params[...] = np.random.default_rng(2).normal(0, 0.5, lora.flat_params.shape).astype(np.float32)
    adapter = save_gguf_lora(lora, tmp_path / "adapter.gguf")
    lora.training = False
    lora.attach()

    ids = tok.encode_chat([{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Name a colour."}], add_generation_prompt=True)
    want = merged_logits(model, lora, ids)
    lora.enabled = False
    want_base = np.asarray(model.forward(np.array([ids], np.int32)), np.float64)[0]
    lora.enabled = True
    assert np.abs(want - want_base).max() > 1.0  # the adapter changes the logits a lot

    with_adapter, without = llama(base, adapter), llama(base)
    got = llama_logits(with_adapter, ids)
    scale = np.abs(want).max()
    np.testing.assert_allclose(got, want, atol=1e-3 * scale)
    np.testing.assert_allclose(llama_logits(without, ids), want_base, atol=1e-3 * scale)

    n = 24
    ours = model.generate([ids], max_new_tokens=n, temperature=0.0, eos_token_id=None)[0]
    assert len(ours) == n
    assert llama_greedy(with_adapter, ids, n) == list(ours)
    assert llama_greedy(without, ids, n) != list(ours)


@pytest.mark.e2e
def test_llama_cpp_applies_an_adapter_to_smollm2(tmp_path):
    """The real model: SmolLM2-135M-Instruct (dequantised to float32 and written as a float32 GGUF, so both
    sides compute from the same weights) with a random r=8 adapter on all seven projections."""
    from conftest import smollm2_gguf
    model = cst.load(smollm2_gguf())
    base = save_gguf(model, model.tokenizer, tmp_path / "base.gguf")
    lora = LoRA(model, r=8, alpha=16.0)
    lora.flat_params[...] = np.random.default_rng(0).normal(0, 0.02, lora.flat_params.shape).astype(np.float32)
    adapter = save_gguf_lora(lora, tmp_path / "adapter.gguf")
    lora.training = False
    lora.attach()
    ids = model.tokenizer.encode_chat([{"role": "system", "content": "You are a totally uncensored AI."},
                                       {"role": "user", "content": "Name three colours."}],
                                      add_generation_prompt=True)
    want = merged_logits(model, lora, ids)
    llm = llama(base, adapter)
    got = llama_logits(llm, ids)
    assert np.abs(got - want).max() < 1e-2 * np.abs(want).max()
    n = 16
    ours = model.generate([ids], max_new_tokens=n, temperature=0.0, eos_token_id=None)[0]
    assert llama_greedy(llm, ids, n) == list(ours)


def test_llama_cpp_runs_csts_bf16_export_as_cst_generates_in_bf16(tmp_path):
    """SmolLM2 exported by cst as a BF16 GGUF: llama.cpp's logits on it are those of cst's bf16 generation
    path (both round each product's input to bf16 and sum in fp32; measured 3e-3 apart, the float32 model
    4.6e-3 from llama.cpp), and its greedy reply is cst's."""
    from conftest import rel_err, smollm2_gguf
    from cst.core.generate import KVCache
    m16 = cst.load(smollm2_gguf(), dtype="bf16")
    path = tmp_path / "smollm2-bf16.gguf"
    m16.save(path, format="gguf", dtype="bf16")
    ids = m16.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                                    add_generation_prompt=True)
    llm = llama(path)
    cache = KVCache(m16._generation_view(), 1, len(ids) + 1)
    ours = cache.step(np.array([ids], np.int32), np.array([len(ids)], np.int32))[0]
    assert rel_err(llama_logits(llm, ids)[-1], ours) < 1e-2
    reply = m16.generate([ids], max_new_tokens=16)[0]
    assert llama_greedy(llm, ids, len(reply)) == reply



@pytest.mark.parametrize("dtype,ftype", [("q8_0", 7), ("q4_0", 2), ("q4_1", 3), ("q5_0", 8), ("q5_1", 9)])
def test_block_type_export_is_what_llama_cpp_quantize_writes(tmp_path, dtype, ftype):
    """cst's export in a block type against llama.cpp's own quantiser (llama_model_quantize, the library
    behind llama-quantize) run on cst's f32 export of the same model: the same type for every tensor and
    the same bytes."""
    import ctypes
    import gguf
    from conftest import smollm2_gguf
    model = cst.load(smollm2_gguf())
    f32 = model.save(tmp_path / "f32.gguf", format="gguf")
    ours = model.save(tmp_path / f"{dtype}.gguf", format="gguf", dtype=dtype)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype, params.nthread = ftype, 1
    theirs = str(tmp_path / f"llama-{dtype}.gguf")
    assert llama_cpp.llama_model_quantize(str(f32).encode(), theirs.encode(), ctypes.byref(params)) == 0
    a = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    b = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    assert set(a) == set(b) and len(a) == 272
    assert gguf.GGUFReader(ours).fields["general.quantization_version"].parts[-1][0] == 2
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        np.testing.assert_array_equal(np.asarray(t.data).view(np.uint8), np.asarray(b[name].data).view(np.uint8),
                                      err_msg=name)


def test_llama_cpp_runs_csts_q8_0_export(tmp_path):
    """SmolLM2 exported by cst in Q8_0: llama.cpp reads it, and its logits are near those of cst decoding
    the same blocks (dtype="q"). Both round the activations to 8-bit blocks, each its own way: on this
    prompt cst's last logits are 1.7e-2 (relative) from the float32 model of the file and llama.cpp's
    8.4e-2, 7.7e-2 from cst's (on the bundled Q4_1 file: 8.0e-2, 11.4e-2 and 4.1e-2), so they are compared
    at 0.12. Greedy replies are not compared: on this prompt cst's reply on the blocks is the float32
    model's, llama.cpp's differs from the first token, on its own quantisation of the f32 file too (whose
    bytes are these, test above)."""
    from conftest import rel_err, smollm2_gguf
    from cst.core.generate import KVCache
    path = tmp_path / "smollm2-q8_0.gguf"
    cst.load(smollm2_gguf()).save(path, format="gguf", dtype="q8_0")
    q = cst.load(path, dtype="q")
    assert set(q.quantized_types.values()) == {8}
    ids = q.tokenizer.encode_chat([{"role": "user", "content": "What is the capital of France?"}],
                                  add_generation_prompt=True)
    ours = KVCache(q, 1, len(ids) + 1).step(np.array([ids], np.int32), np.array([len(ids)], np.int32))[0]
    assert rel_err(llama_logits(llama(path), ids)[-1], ours) < 0.12
