"""Hugging Face checkpoint directories: a tiny random LlamaForCausalLM saved by transformers loads into
cst with identical weights (float32/float16/bfloat16, sharded), cst's export loads back in transformers
(tied and untied), bad inputs raise errors naming the file, and fuzzed safetensors raise FormatError."""
import json
import os

import numpy as np
import pytest

import cst
import cst.hf
import cst.io
from conftest import damaged_copies
from cst.errors import FormatError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def tiny_hf(tied, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   rope_theta=5000.0, rms_norm_eps=1e-6, tie_word_embeddings=tied)
    m = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a mixed-up norm would show
        for n, p in m.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return m


def state(m):
    return {k: v.detach().float().numpy() for k, v in m.state_dict().items()}


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_load_transformers_checkpoint(tmp_path, tied, dtype):
    hf = tiny_hf(tied).to(getattr(torch, dtype))
    hf.save_pretrained(tmp_path)
    m = cst.io.load(str(tmp_path))
    c = m.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (96, 48, 2, 4, 2, 80)
    assert c.tie_embeddings == tied and c.rope_theta == 5000.0 and c.norm_eps == 1e-6 and c.max_seq_len == 128
    want = state(hf)
    for name, a in m.params.items():
        np.testing.assert_array_equal(a, want[name], err_msg=name)  # f16/bf16 -> f32 is exact
    assert m.tokenizer is None


def test_load_sharded(tmp_path):
    hf = tiny_hf(False)
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    m = cst.io.load(str(tmp_path))
    want = state(hf)
    for name, a in m.params.items():
        np.testing.assert_array_equal(a, want[name], err_msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_save_loads_in_transformers(tmp_path, tied):
    hf = tiny_hf(tied)
    hf.save_pretrained(tmp_path / "src")
    m = cst.io.load(str(tmp_path / "src"))
    rng = np.random.default_rng(1)
    m.flat_params[...] += rng.normal(0, 0.01, size=m.flat_params.shape).astype(np.float32)  # "trained"
    out = tmp_path / "out"
    cst.io.save(m, str(out), format="hf")
    files = set(os.listdir(out))
    assert {"config.json", "model.safetensors", "generation_config.json"} <= files
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert back.config.tie_word_embeddings == tied
    got = state(back)
    for name, a in m.params.items():
        np.testing.assert_array_equal(got[name], a, err_msg=name)
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert ("lm_head.weight" in f.keys()) != tied
    # and transformers' forward agrees between the original-plus-delta and the re-loaded model
    ids = torch.tensor([[1, 5, 9, 17, 33]])
    with torch.no_grad():
        for n, p in hf.named_parameters():
            p.copy_(torch.from_numpy(m.params[n]))
        np.testing.assert_allclose(back(ids).logits.numpy(), hf(ids).logits.numpy(), rtol=0, atol=1e-5)
    again = cst.io.load(str(out))
    np.testing.assert_array_equal(again.flat_params, m.flat_params)


def test_save_float16_and_tokenizer(tmp_path):
    """With a tokenizer: tokenizer files, ids in config/generation_config; float16 weights."""
    from tokenizers import Tokenizer as B, models, pre_tokenizers, decoders
    from cst.tokenizer import Tokenizer
    vocab = {c: i for i, c in enumerate("abcdefghijklmnopqrstuvwxyzĠ")}
    vocab.update({"<s>": len(vocab), "</s>": len(vocab) + 1})
    b = B(models.BPE(vocab=vocab, merges=[]))
    b.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    b.decoder = decoders.ByteLevel()
    from tokenizers import AddedToken
    b.add_special_tokens([AddedToken("<s>", special=True, normalized=False),
                          AddedToken("</s>", special=True, normalized=False)])
    tok = Tokenizer(b, eos_token="</s>", bos_token="<s>",
                    chat_template="{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    cfg = cst.ModelConfig(vocab_size=96, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=48)
    m = cst.Model(cfg, seed=2)
    m.tokenizer = tok
    cst.io.save(m, str(tmp_path), format="hf", dtype="float16")
    conf = json.loads((tmp_path / "config.json").read_text())
    assert conf["eos_token_id"] == 28 and conf["bos_token_id"] == 27 and conf["tie_word_embeddings"] is True
    gen = json.loads((tmp_path / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 28
    back = cst.io.load(str(tmp_path))
    np.testing.assert_array_equal(back.flat_params, m.flat_params.astype(np.float16).astype(np.float32))
    assert back.tokenizer.encode("ab c</s>") == tok.encode("ab c</s>")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf_tok("ab c</s>", add_special_tokens=False)["input_ids"] == tok.encode("ab c</s>")
    assert hf_tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi</s>"
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    np.testing.assert_array_equal(hf.model.embed_tokens.weight.detach().numpy(),
                                  back.params["model.embed_tokens.weight"])


def test_atomic_save_leaves_no_temp_and_keeps_other_files(tmp_path):
    m = cst.Model(cst.ModelConfig(vocab_size=16, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=16))
    (tmp_path / "README.md").write_text("mine")
    cst.io.save(m, str(tmp_path), format="hf")
    cst.io.save(m, str(tmp_path), format="hf")
    assert (tmp_path / "README.md").read_text() == "mine"
    assert not [f for f in os.listdir(tmp_path.parent) if f.endswith(".tmp")]
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        cst.io.load(str(tmp_path))
    hf = tiny_hf(False)
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**conf, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="config.json.*not supported"):
        cst.io.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**conf, "hidden_size": 64, "head_dim": 16}))
    with pytest.raises(FormatError, match="model.safetensors.*shape"):
        cst.io.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{oops")
    with pytest.raises(FormatError, match="config.json"):
        cst.io.load(str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps(conf))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        cst.io.load(str(tmp_path))
    with pytest.raises(FileNotFoundError):
        cst.io.load(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="format"):
        cst.io.save(hf, str(tmp_path), format="onnx")


def test_fuzz_safetensors(tmp_path):
    """Random byte damage and truncation of a real safetensors file: FormatError/ValueError only."""
    import time
    hf = tiny_hf(True)
    hf.save_pretrained(tmp_path)
    st = tmp_path / "model.safetensors"
    good = st.read_bytes()
    hlen = 8 + int.from_bytes(good[:8], "little")
    errors = 0
    t0 = time.time()
    for i, data in enumerate(damaged_copies(good, hlen, 300, seed=3)):
        st.write_bytes(data)
        try:
            cst.hf.load_hf(str(tmp_path))
        except ValueError:
            errors += 1
    assert errors > 100
    assert time.time() - t0 < 40
    st.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(FormatError, match="header length"):
        cst.hf.read_safetensors_header(str(st))
