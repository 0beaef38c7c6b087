"""LoRA adapters (cst/lora.py) on the whole model against transformers + PEFT in float64: logits and
every adapter gradient for several target-module subsets, tied and untied heads, padded batches; the
same with dropout masks injected into PEFT, and a finite-difference check; enabled=False, merging,
frozen base, PEFT state-dict names, and adapter files that PEFT loads (and that we load from PEFT)."""
import os

import numpy as np
import pytest
import torch

from cst.lora import LoRA, TARGETS
from cst.model import Model
from cst.optim import AdamW
from conftest import rel_err
from test_model import hf_model, random_model, tiny_config

peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict  # noqa: E402

SUBSETS = [TARGETS, ("q_proj", "v_proj"), ("gate_proj", "up_proj", "down_proj"), ("k_proj", "o_proj", "up_proj")]


def adapted(tie=True, targets=TARGETS, r=4, alpha=8.0, dropout=0.0, seed=0):
    """A random tiny model with attached adapters whose B is random and nonzero."""
    m = random_model(tiny_config(tie), seed=seed)
    lora = LoRA(m, r=r, alpha=alpha, dropout=dropout, target_modules=targets, seed=seed + 1).attach()
    rng = np.random.default_rng(seed + 2)
    for name, arr in lora.params.items():
        if name.endswith("lora_B.weight"):
            arr[...] = rng.normal(0.0, 0.2, arr.shape)
    return m, lora


def peft_model(m, lora, dtype=torch.float64):
    """transformers + PEFT with our base weights and our adapter weights."""
    hf = hf_model(m, dtype)
    cfg = LoraConfig(r=lora.r, lora_alpha=lora.alpha, target_modules=list(lora.target_modules), lora_dropout=0.0)
    pm = get_peft_model(hf, cfg)
    res = set_peft_model_state_dict(pm, {k: torch.tensor(v) for k, v in lora.params.items()})
    assert not [k for k in res.unexpected_keys if "lora" in k]
    pm.to(dtype)
    return pm


def peft_param(pm, name):
    return dict(pm.named_parameters())[name.replace(".weight", ".default.weight")]


def batch(cfg, padded=True, seed=3):
    rng = np.random.default_rng(seed)
    B, T = 3, 9
    tokens = rng.integers(0, cfg.vocab_size, (B, T)).astype(np.int32)
    lengths = np.array([9, 5, 1], np.int32) if padded else None
    valid = np.arange(T)[None] < (lengths if padded else np.full(B, T))[:, None]
    R = rng.standard_normal((B, T, cfg.vocab_size)).astype(np.float32)
    return tokens, lengths, valid, R


def run_ours(m, lora, tokens, lengths, R):
    logits = m.forward(tokens, lengths).copy()
    lora.zero_grad()
    m.backward(R)
    return logits


def run_peft(pm, tokens, valid, R):
    out = pm(input_ids=torch.tensor(tokens, dtype=torch.int64),
             attention_mask=torch.tensor(valid.astype(np.int64))).logits
    (out * torch.tensor(R * valid[..., None], dtype=torch.float64)).sum().backward()
    return out.detach().numpy()


def compare(m, lora, pm, logits, ref, valid):
    assert rel_err(logits[valid], ref[valid]) < 1e-5
    for name, g in lora.grads.items():
        ref_g = peft_param(pm, name).grad
        assert ref_g is not None, name
        assert rel_err(g, ref_g.numpy()) < 1e-4, name
    # Frozen base: no base gradient was ever allocated or added.
    assert m.flat_grads is None or not m.flat_grads.any()


@pytest.mark.parametrize("tie", [True, False])
@pytest.mark.parametrize("targets", SUBSETS, ids=["all", "qv", "mlp", "k_o_up"])
def test_matches_peft(tie, targets):
    m, lora = adapted(tie, targets)
    tokens, lengths, valid, R = batch(m.config)
    logits = run_ours(m, lora, tokens, lengths, R)
    pm = peft_model(m, lora)
    ref = run_peft(pm, tokens, valid, R)
    compare(m, lora, pm, logits, ref, valid)
    # Only the targeted modules are adapted, on every layer.
    assert {n.split(".")[-3] for n in lora.params} == set(targets)
    assert {int(n.split(".")[4]) for n in lora.params} == set(range(m.config.n_layers))


def test_lean_logprob_path_matches_full_path():
    """forward_logprobs / backward_logprobs (chunked LM head) give the same adapter gradients."""
    m, lora = adapted(False, ("q_proj", "v_proj", "down_proj"))
    m.logits_chunk_rows = 4  # several chunks
    tokens, lengths, valid, _ = batch(m.config)
    rng = np.random.default_rng(5)
    targets = rng.integers(-1, m.config.vocab_size, tokens.shape).astype(np.int32)
    dlogp = rng.standard_normal(tokens.shape).astype(np.float32)
    lp = m.forward_logprobs(tokens, targets, lengths).copy()
    lora.zero_grad()
    m.backward_logprobs(dlogp)
    g_lean = lora.flat_grads.copy()
    # Same through full logits: dlogits = dlogp * (onehot - softmax).
    logits = m.forward(tokens, lengths).astype(np.float64)
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    use = valid & (targets >= 0)
    lp_ref = np.where(use, np.take_along_axis(logsm, np.maximum(targets, 0)[..., None], -1)[..., 0], 0.0)
    assert rel_err(lp, lp_ref) < 1e-5
    onehot = np.zeros_like(logits)
    np.put_along_axis(onehot, np.maximum(targets, 0)[..., None], 1.0, -1)
    dlogits = ((onehot - np.exp(logsm)) * (dlogp * use)[..., None]).astype(np.float32)
    lora.zero_grad()
    m.backward(dlogits)
    assert rel_err(g_lean, lora.flat_grads) < 1e-4


# ---- dropout ----

class _FixedDropout(torch.nn.Module):
    def __init__(self, scaled_mask):
        super().__init__()
        self.mask = scaled_mask

    def forward(self, x):
        return x * self.mask


def test_dropout_masks_match_peft_with_the_same_masks():
    m, lora = adapted(True, ("q_proj", "v_proj", "o_proj", "up_proj", "down_proj"), dropout=0.3)
    tokens, lengths, valid, R = batch(m.config)
    lora.calls = 7
    logits = run_ours(m, lora, tokens, lengths, R)
    pm = peft_model(m, lora)
    B, T = tokens.shape
    for s in lora._sites:
        mod = pm.get_submodule(f"base_model.model.model.layers.{s.layer}."
                               f"{'self_attn' if s.module.endswith(('q_proj', 'k_proj', 'v_proj', 'o_proj')) else 'mlp'}"
                               f".{s.module}")
        C = s.A.shape[1]
        keep = lora._keep(s, 7, (B * T, C)).reshape(B, T, C)
        mod.lora_dropout["default"] = _FixedDropout(torch.tensor(keep / (1.0 - 0.3), dtype=torch.float64))
    ref = run_peft(pm, tokens, valid, R)
    compare(m, lora, pm, logits, ref, valid)
    # Sanity of the masks themselves: the kept fraction is about 1 - p, masks differ between sites.
    k0, k1 = (lora._keep(s, 7, (B * T, m.config.dim)) for s in lora._sites[:2])
    assert abs(k0.mean() - 0.7) < 0.05 and not np.array_equal(k0, k1)


def test_dropout_reproducible_and_off_in_eval():
    m, lora = adapted(True, dropout=0.25)
    tokens, lengths, valid, _ = batch(m.config)
    lora.calls = 3
    a = m.forward(tokens, lengths).copy()
    b = m.forward(tokens, lengths).copy()
    assert np.array_equal(a, b)  # same (seed, calls): same masks
    lora.new_step()
    c = m.forward(tokens, lengths).copy()
    assert not np.array_equal(a[valid], c[valid])
    # A second LoRA with the same seed, weights and call count reproduces the first.
    m2, lora2 = adapted(True, dropout=0.25)
    lora2.calls = 3
    assert np.array_equal(m2.forward(tokens, lengths), a)
    # training=False: no dropout, equal to a dropout-free adapter with the same weights.
    lora.training = False
    d = m.forward(tokens, lengths).copy()
    m3, lora3 = adapted(True, dropout=0.0)
    assert np.array_equal(d, m3.forward(tokens, lengths))


def test_dropout_backward_matches_finite_differences():
    m, lora = adapted(True, ("q_proj", "v_proj", "gate_proj", "down_proj"), dropout=0.2)
    tokens, lengths, valid, R = batch(m.config)
    R64 = (R * valid[..., None]).astype(np.float64)
    lora.calls = 11  # fixed masks for every evaluation

    def loss():
        return float((m.forward(tokens, lengths).astype(np.float64) * R64).sum())

    lora.zero_grad()
    m.forward(tokens, lengths)
    m.backward(R * valid[..., None])
    g = lora.flat_grads.astype(np.float64).copy()
    theta = lora.flat_params.copy()
    # Directions: the whole gradient, and layer 0's adapters only (their gradient flows back
    # through layer 1's adapter dropout, so this checks the input-gradient mask too).
    layer0 = np.zeros_like(g)
    off = 0
    for name, (a, b) in lora.layout:
        if ".layers.0." in name:
            layer0[off:off + a * b] = 1.0
        off += a * b
    for d in (g, g * layer0):
        d = d / np.linalg.norm(d)
        eps = 3e-3
        lora.flat_params[...] = theta + eps * d
        lp = loss()
        lora.flat_params[...] = theta - eps * d
        lm = loss()
        lora.flat_params[...] = theta
        fd = (lp - lm) / (2 * eps)
        an = float(g @ d)
        assert abs(fd - an) < 2e-3 * abs(an), (fd, an)


# ---- switching off, merging, freezing, names, files ----

@pytest.mark.parametrize("tie", [True, False])
def test_disabled_gives_base_and_merged_equals_adapted(tie):
    m = random_model(tiny_config(tie))
    tokens, lengths, valid, _ = batch(m.config)
    base = m.forward(tokens, lengths).copy()
    lora = LoRA(m, r=4, alpha=8.0, seed=1).attach()
    assert np.array_equal(m.forward(tokens, lengths), base)  # B = 0 at initialisation: exactly the base
    rng = np.random.default_rng(0)
    for name, arr in lora.params.items():
        if name.endswith("lora_B.weight"):
            arr[...] = rng.normal(0.0, 0.2, arr.shape)
    adapted_logits = m.forward(tokens, lengths).copy()
    assert rel_err(adapted_logits[valid], base[valid]) > 1e-2
    lora.enabled = False
    assert np.array_equal(m.forward(tokens, lengths), base)
    assert m.merged() is m
    lora.enabled = True
    merged = Model(m.config, init=False)
    merged.flat_params[...] = lora.merged_params()
    assert rel_err(merged.forward(tokens, lengths)[valid], adapted_logits[valid]) < 1e-5
    snap = m.merged()
    assert np.array_equal(snap.flat_params, merged.flat_params)


def test_training_leaves_base_frozen():
    m, lora = adapted(False, TARGETS)
    before = m.flat_params.copy()
    tokens, lengths, valid, R = batch(m.config)
    opt = AdamW(lr=1e-2, weight_decay=0.1)
    p0 = lora.flat_params.copy()
    for _ in range(3):
        lora.zero_grad()
        m.forward(tokens, lengths)
        m.backward(R)
        opt.step(lora.flat_params, lora.flat_grads)
    assert np.array_equal(m.flat_params, before)
    assert m.flat_grads is None or not m.flat_grads.any()
    assert not np.array_equal(lora.flat_params, p0)


@pytest.mark.parametrize("targets", SUBSETS[:3], ids=["all", "qv", "mlp"])
def test_names_and_shapes_match_peft_state_dict(targets):
    m, lora = adapted(True, targets)
    pm = peft_model(m, lora)
    sd = get_peft_model_state_dict(pm)
    assert set(sd) == set(lora.params)
    for k, v in sd.items():
        assert tuple(v.shape) == lora.params[k].shape, k
        assert np.allclose(v.numpy(), lora.params[k]), k  # the values we set went where PEFT reads them


def test_save_adapter_loads_in_peft_and_back(tmp_path):
    m, lora = adapted(False, ("q_proj", "k_proj", "gate_proj", "down_proj"))
    tokens, lengths, valid, _ = batch(m.config)
    ours = m.forward(tokens, lengths).copy()
    path = tmp_path / "adapter"
    lora.save_adapter(path)
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    assert [n for n in os.listdir(tmp_path) if n != "adapter"] == []  # no temporary left behind
    pm = PeftModel.from_pretrained(hf_model(m), str(path)).to(torch.float64)
    ref = pm(input_ids=torch.tensor(tokens, dtype=torch.int64),
             attention_mask=torch.tensor(valid.astype(np.int64))).logits.detach().numpy()
    assert rel_err(ours[valid], ref[valid]) < 1e-5
    # Saving over an existing adapter replaces it.
    lora.flat_params *= 0.5
    lora.save_adapter(path)
    # Our loader reads it back bitwise, into fresh adapters.
    m2 = Model(m.config, init=False)
    m2.flat_params[...] = m.flat_params
    lora2 = LoRA(m2, r=4, alpha=8.0, target_modules=("q_proj", "k_proj", "gate_proj", "down_proj"))
    lora2.load_adapter(path)
    assert np.array_equal(lora2.flat_params, lora.flat_params)
    # And a directory written by PEFT itself.
    pm_dir = tmp_path / "from_peft"
    pm.save_pretrained(str(pm_dir))
    lora2.load_adapter(pm_dir)
    assert np.allclose(lora2.flat_params, lora.flat_params / 0.5, rtol=1e-6, atol=0)
    # Mismatched adapters are refused with a message, not loaded.
    with pytest.raises(ValueError, match="r="):
        LoRA(m2, r=8, alpha=8.0, target_modules=("q_proj", "k_proj", "gate_proj", "down_proj")).load_adapter(path)
    with pytest.raises(ValueError, match="target_modules"):
        LoRA(m2, r=4, alpha=8.0, target_modules=("q_proj",)).load_adapter(path)


def test_bad_arguments():
    m = Model(tiny_config(), seed=0)
    for kw in ({"r": 0}, {"r": 2.5}, {"r": True}, {"alpha": 0.0}, {"alpha": float("nan")}, {"dropout": 1.0},
               {"dropout": -0.1}, {"target_modules": ["q_proj", "foo"]}, {"target_modules": []}):
        with pytest.raises(ValueError):
            LoRA(m, **kw)
    lora = LoRA(m, r=2, target_modules=("q_proj",))
    with pytest.raises(ValueError, match="missing"):
        lora.load_state_dict({})
    sd = lora.state_dict()
    name = next(iter(sd))
    sd[name] = np.zeros((3, 3), np.float32)
    with pytest.raises(ValueError, match="shape"):
        lora.load_state_dict(sd)
