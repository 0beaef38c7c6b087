"""Llama-family checkpoints (Llama 2, Llama 3.1/3.2 RoPE scaling, Mistral, Qwen2/2.5, SOLAR, a set
head_dim) against Hugging Face transformers on tiny random models built offline: weights loaded from
the checkpoint transformers saved, logits and every gradient (base, biases, LoRA) against float64,
KV-cache generation against full recomputation, HF and GGUF export round trips, clear refusals."""
import json
import logging

import numpy as np
import pytest

import cst
import cst.io
from cst.generate import KVCache, generate
from cst.lora import LoRA
from cst.ops import rope_tables

from conftest import rel_err

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

_BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, rms_norm_eps=1e-6, attn_implementation="eager")
LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 16}

# family -> (config class, its arguments beyond _BASE)
FAMILIES = {
    "llama2": ("LlamaConfig", dict(rope_theta=10000.0, tie_word_embeddings=False)),
    "llama3.2": ("LlamaConfig", dict(rope_theta=500000.0, tie_word_embeddings=True,
                                     rope_scaling=LLAMA3_SCALING)),
    "llama-linear": ("LlamaConfig", dict(rope_theta=10000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})),
    "mistral": ("MistralConfig", dict(rope_theta=10000.0, sliding_window=32, tie_word_embeddings=False)),
    "qwen2-tied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=True)),
    "qwen2-untied": ("Qwen2Config", dict(rope_theta=1000000.0, tie_word_embeddings=False)),
    "head_dim": ("LlamaConfig", dict(rope_theta=10000.0, head_dim=16)),
    "qwen2-head_dim": ("Qwen2Config", dict(rope_theta=1000000.0, head_dim=8, tie_word_embeddings=True)),
    "solar": ("LlamaConfig", dict(rope_theta=10000.0, num_hidden_layers=6)),  # SOLAR = a deeper Llama
}


def hf_family(family, seed=0):
    """A tiny random transformers model of the family (float32), norms and biases away from 0 and 1."""
    cls, extra = FAMILIES[family]
    torch.manual_seed(seed)
    m = getattr(transformers, cls.replace("Config", "ForCausalLM"))(getattr(transformers, cls)(**{**_BASE, **extra}))
    with torch.no_grad():
        for n, p in m.named_parameters():
            if n.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
            elif n.endswith(".bias"):
                p.normal_(0.0, 0.3)
            else:
                p.normal_(0.0, 0.15)
    return m.eval()


_CACHE = {}


def family_pair(family, tmp_path_factory):
    """(cst model loaded from the saved checkpoint, the transformers model in float64)."""
    if family not in _CACHE:
        hf = hf_family(family, seed=list(FAMILIES).index(family))
        d = tmp_path_factory.mktemp(family)
        hf.save_pretrained(d)
        m = cst.io.load(str(d))
        _CACHE[family] = (m, hf.double())
    return _CACHE[family]


@pytest.fixture(params=list(FAMILIES))
def pair(request, tmp_path_factory):
    return family_pair(request.param, tmp_path_factory)


def batch(cfg, seed=1, T=20):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, cfg.vocab_size, (3, T)).astype(np.int32)
    lengths = np.array([T, T - 7, 4], np.int32)
    valid = np.arange(T)[None] < lengths[:, None]
    R = rng.standard_normal((3, T, cfg.vocab_size)).astype(np.float32)
    return tokens, lengths, valid, R


def hf_loss_and_logits(hf, tokens, valid, R):
    out = hf(input_ids=torch.tensor(tokens, dtype=torch.int64),
             attention_mask=torch.tensor(valid.astype(np.int64))).logits
    (out * torch.tensor(R * valid[..., None], dtype=torch.float64)).sum().backward()
    return out.detach().numpy()


def test_config_read_from_transformers(pair):
    m, hf = pair
    c, h = m.config, hf.config
    assert (c.vocab_size, c.dim, c.n_layers, c.n_heads, c.n_kv_heads, c.ffn_dim) == (
        h.vocab_size, h.hidden_size, h.num_hidden_layers, h.num_attention_heads, h.num_key_value_heads,
        h.intermediate_size)
    assert c.head_dim == (getattr(h, "head_dim", None) or h.hidden_size // h.num_attention_heads)
    assert c.tie_embeddings == h.tie_word_embeddings
    assert c.attention_bias == (h.model_type == "qwen2") and c.arch == h.model_type
    assert c.sliding_window == (h.sliding_window if h.model_type == "mistral" else None)
    if c.rope_scaling is not None:  # the scaling changes the rotary tables within the tested lengths
        assert c.rope_scaling["rope_type"] == h.rope_parameters["rope_type"]
        scaled = rope_tables(20, c.head_dim, c.rope_theta, c.rope_scaling)[0]
        assert np.abs(scaled - rope_tables(20, c.head_dim, c.rope_theta)[0]).max() > 0.05


def test_logits_and_every_gradient_match_transformers(pair, request):
    m, hf = pair
    tokens, lengths, valid, R = batch(m.config)
    hf.zero_grad()
    ref = hf_loss_and_logits(hf, tokens, valid, R)
    logits = m.forward(tokens, lengths).copy()
    m.zero_grad()
    m.backward(R * valid[..., None])
    lerr = rel_err(logits[valid], ref[valid])
    assert lerr < 1e-4
    refs = dict(hf.named_parameters())
    worst = 0.0
    for name, g in m.grads.items():
        want = refs["model.embed_tokens.weight" if name == "lm_head.weight" and name not in refs else name].grad
        e = rel_err(g, want.numpy())
        assert e < 1e-4, name
        worst = max(worst, e)
    assert set(m.grads) == set(refs)  # every parameter, biases included, has a gradient
    print(f"parity {request.node.callspec.id}: logits {lerr:.2e}, worst gradient {worst:.2e}")


def test_lora_matches_peft(pair, request):
    peft = pytest.importorskip("peft")
    m, hf = pair
    lora = LoRA(m, r=4, alpha=8.0, seed=5).attach()
    try:
        rng = np.random.default_rng(6)
        for name, arr in lora.params.items():
            if name.endswith("lora_B.weight"):
                arr[...] = rng.normal(0.0, 0.2, arr.shape)
        tokens, lengths, valid, R = batch(m.config, seed=2)
        logits = m.forward(tokens, lengths).copy()
        lora.zero_grad()
        m.backward(R * valid[..., None])
        base = type(hf)(hf.config).double()
        base.load_state_dict(hf.state_dict())
        pm = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8.0, lora_dropout=0.0,
                                                       target_modules=list(lora.target_modules)))
        peft.set_peft_model_state_dict(pm, {k: torch.tensor(v) for k, v in lora.params.items()})
        pm.double()
        ref = hf_loss_and_logits(pm, tokens, valid, R)
        assert rel_err(logits[valid], ref[valid]) < 1e-4
        named = dict(pm.named_parameters())
        worst = 0.0
        for name, g in lora.grads.items():
            e = rel_err(g, named[name.replace(".weight", ".default.weight")].grad.numpy())
            assert e < 1e-4, name
            worst = max(worst, e)
        print(f"lora parity {request.node.callspec.id}: logits {rel_err(logits[valid], ref[valid]):.2e}, "
              f"worst adapter gradient {worst:.2e}")
    finally:
        lora.detach()


def test_generation_equals_full_recomputation(pair):
    m, _ = pair
    rng = np.random.default_rng(3)
    prompts = [rng.integers(0, m.config.vocab_size, n).tolist() for n in (7, 3, 5)]
    n_new = 8
    for batch_prompts in (prompts[:1], prompts):  # one sequence (dot products) and three (packed weights)
        outs = generate(m, batch_prompts, max_new_tokens=n_new)
        for p, o in zip(batch_prompts, outs):
            seq = list(p)
            for t in o:
                logits = m.forward(np.array([seq], np.int32))[0, -1]
                assert int(np.argmax(logits)) == t
                seq.append(t)
    # The cached logits themselves equal the full forward's.
    cache = KVCache(m, 1, 16, max_chunk=16)
    seq = np.array([prompts[0] + [1, 2, 3]], np.int32)
    got = cache.step(seq, np.array([seq.shape[1]])).copy()
    want = m.forward(seq)[0, -1]
    assert rel_err(got[0], want) < 1e-5


def test_hf_export_round_trip(pair, tmp_path):
    m, hf = pair
    cst.io.save(m, str(tmp_path), format="hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float64)
    assert type(back) is type(hf)
    sd = back.state_dict()
    for name, a in m.params.items():
        np.testing.assert_array_equal(sd[name].numpy(), a, err_msg=name)
    tokens = np.random.default_rng(4).integers(0, m.config.vocab_size, (1, 12))
    with torch.no_grad():
        want = hf(torch.tensor(tokens)).logits.numpy()
        got = back(torch.tensor(tokens)).logits.numpy()
    assert rel_err(got, want) < 1e-6  # same weights; the rotary tables are rounded differently
    again = cst.io.load(str(tmp_path))
    assert again.config == m.config


def test_gguf_export_round_trip(pair, tmp_path):
    m, hf = pair
    out = tmp_path / "m.gguf"
    cst.io.save(m, str(out), format="gguf")
    back = cst.io.load(str(out))
    for name, a in m.params.items():
        np.testing.assert_array_equal(back.params[name], a, err_msg=name)
    c, b = m.config, back.config
    assert (b.head_dim, b.attention_bias, b.tie_embeddings, b.sliding_window, b.arch) == (
        c.head_dim, c.attention_bias, c.tie_embeddings, c.sliding_window, c.arch)
    # llama3 scaling comes back as GGUF's per-frequency factors: the same rotary tables.
    T = c.max_seq_len
    for x, y in zip(rope_tables(T, c.head_dim, c.rope_theta, c.rope_scaling),
                    rope_tables(T, b.head_dim, b.rope_theta, b.rope_scaling)):
        np.testing.assert_allclose(x, y, rtol=0, atol=2e-7)
    tokens = np.random.default_rng(5).integers(0, c.vocab_size, (2, 10)).astype(np.int32)
    assert rel_err(back.forward(tokens), m.forward(tokens).copy()) < 1e-6


def test_gguf_export_loads_in_transformers(tmp_path, tmp_path_factory):
    """transformers' own GGUF reader (llama and qwen2) sees the same weights and computes the same logits."""
    pytest.importorskip("gguf")
    for family in ("llama2", "qwen2-untied", "qwen2-tied"):
        m, hf = family_pair(family, tmp_path_factory)
        out = tmp_path / f"{family}.gguf"
        cst.io.save(m, str(out), format="gguf")
        g = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=out.name,
                                                              dtype=torch.float64)
        tokens = torch.tensor(np.random.default_rng(6).integers(0, m.config.vocab_size, (1, 12)))
        with torch.no_grad():
            assert rel_err(g(tokens).logits.numpy(), hf(tokens).logits.numpy()) < 1e-6, family


def test_sliding_window_refused_beyond_the_window(tmp_path_factory):
    m, _ = family_pair("mistral", tmp_path_factory)
    w = m.config.sliding_window
    ok = np.zeros((1, w), np.int32)
    m.forward(ok)
    with pytest.raises(ValueError, match="sliding_window"):
        m.forward(np.zeros((1, w + 1), np.int32))
    with pytest.raises(ValueError, match="sliding_window"):
        generate(m, [[1] * (w - 2)], max_new_tokens=3)
    assert len(generate(m, [[1] * (w - 2)], max_new_tokens=2)[0]) == 2


@pytest.mark.parametrize("change,match", [
    ({"model_type": "gemma", "architectures": ["GemmaForCausalLM"]}, "model_type 'gemma'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0}}, "rope_type 'yarn'"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "rope_type 'dynamic'"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
    ({"pretraining_tp": 2}, "pretraining_tp"),
])
def test_unsupported_fields_named(tmp_path, change, match):
    hf = hf_family("llama2")
    hf.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf.pop("rope_parameters", None) if "rope_scaling" in change else None
    (tmp_path / "config.json").write_text(json.dumps({**conf, **change}))
    with pytest.raises(ValueError, match=match):
        cst.io.load(str(tmp_path))


@pytest.mark.parametrize("kw,match", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), "rope_type 'yarn'"),
    (dict(rope_scaling={"rope_type": "linear"}), "needs 'factor'"),
    (dict(rope_scaling={"rope_type": "linear", "factor": -1.0}), "factor must be a positive"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                        "original_max_position_embeddings": 16}), "high_freq_factor"),
    (dict(rope_scaling={"rope_type": "freq_factors", "factors": [1.0]}), "factors"),
    (dict(head_dim=7), "even"),
    (dict(head_dim=0), "head_dim"),
    (dict(dim=50), "divisible"),
    (dict(sliding_window=0), "sliding_window"),
    (dict(arch="gemma"), "arch"),
    (dict(attention_bias=1), "attention_bias"),
])
def test_model_config_rejects_bad_family_fields(kw, match):
    base = dict(vocab_size=16, dim=48, n_layers=1, n_heads=4, n_kv_heads=2, ffn_dim=16)
    with pytest.raises(ValueError, match=match):
        cst.ModelConfig(**{**base, **kw})


def copy_gguf(src, dst, drop=(), edit=None, tensor=None):
    """Rewrites GGUF src as dst without the metadata keys in `drop`; edit(writer) adds more; tensor(t), when
    given, returns the (data, ggml type) to write for reader tensor t instead of a copy."""
    import gguf
    r = gguf.GGUFReader(str(src))
    w = gguf.GGUFWriter(str(dst), r.fields["general.architecture"].contents())
    for f in r.fields.values():
        if f.name.startswith("GGUF.") or f.name == "general.architecture" or f.name in drop:
            continue
        t = gguf.GGUFValueType(f.types[0])
        if t == gguf.GGUFValueType.ARRAY:
            w.add_array(f.name, f.contents())
        else:
            w.add_key_value(f.name, f.contents(), t)
    if edit is not None:
        edit(w)
    for t in r.tensors:
        data, qtype = (np.asarray(t.data), t.tensor_type) if tensor is None else tensor(t)
        w.add_tensor(t.name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_unsupported_rope_scaling_named(tmp_path, tmp_path_factory):
    import gguf
    m, _ = family_pair("llama2", tmp_path_factory)
    good = tmp_path / "m.gguf"
    cst.io.save(m, str(good), format="gguf")
    copy_gguf(good, tmp_path / "yarn.gguf", edit=lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.YARN))
    with pytest.raises(ValueError, match="rope.scaling.type 'yarn'"):
        cst.io.load(str(tmp_path / "yarn.gguf"))


def test_config_json_as_released_checkpoints_write_it():
    """The keys of Llama 3.2's, Mistral 7B v0.1's and Qwen2.5's own config.json files (transformers 4
    era: rope_scaling + rope_theta at the top level, "type" in older files)."""
    from cst.hf import config_from_hf
    base = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, hidden_act="silu")
    c = config_from_hf({**base, "model_type": "llama", "architectures": ["LlamaForCausalLM"], "rope_theta": 500000.0,
                        "head_dim": 16, "tie_word_embeddings": True, "pretraining_tp": 1, "mlp_bias": False,
                        "attention_bias": False, "rope_scaling": {
                            "factor": 32.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                            "original_max_position_embeddings": 8192, "rope_type": "llama3"}})
    assert c.rope_theta == 500000.0 and c.rope_scaling == {
        "rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    c = config_from_hf({**base, "model_type": "llama", "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert c.rope_scaling == {"rope_type": "linear", "factor": 2.0} and c.rope_theta == 10000.0
    c = config_from_hf({**base, "model_type": "mistral", "architectures": ["MistralForCausalLM"],
                        "sliding_window": 4096, "rope_theta": 10000.0})
    assert c.sliding_window == 4096 and c.arch == "mistral"
    c = config_from_hf({**base, "model_type": "mistral", "sliding_window": None})
    assert c.sliding_window is None
    c = config_from_hf({**base, "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "rope_theta": 1e6,
                        "sliding_window": 131072, "use_sliding_window": False, "max_window_layers": 21,
                        "tie_word_embeddings": True})
    assert c.attention_bias and c.sliding_window is None and c.tie_embeddings and c.rope_theta == 1e6
