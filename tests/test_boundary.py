"""The one argument parser of cst._core (csrc/python/glue.c) on its own: what every entry point gets
from its table row — keywords, signatures, the aliasing rule, ranges, derived dimensions."""
import inspect

import numpy as np
import pytest

from cst import _core

ENTRIES = ["matmul_forward", "matmul_backward", "embedding_forward", "embedding_backward", "rmsnorm_forward",
           "rmsnorm_backward", "rope_forward", "rope_backward", "swiglu_forward", "swiglu_backward",
           "logprobs_forward", "logprobs_backward", "logprobs_backward_inplace", "attention_forward",
           "attention_backward", "seq_logps_forward", "seq_logps_backward", "dpo_loss_forward",
           "dpo_loss_backward", "dpo_loss", "adamw_step", "sum_squares", "dequantize",
           "matmul_bf16_forward", "matmul_bf16_backward", "gemv_bf16", "matmul_backward_block", "bf16_from_f32",
           "bf16_to_f32",
           "gen_scratch_size", "gen_packed_size", "gen_pack", "gen_forward", "q8_quantize", "qmatvec"]


def test_every_entry_has_its_rows_signature():
    plain = {"set_num_threads", "get_num_threads", "has_openmp", "simd_path", "simd_supported", "set_simd_path",
             "quant_block_info", "bf16_gemm_way"}
    public = {n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))}
    assert public - plain == set(ENTRIES)
    for name in ENTRIES:  # the signature (from the row) names what the docstring's argument lines list
        params = list(inspect.signature(getattr(_core, name)).parameters)
        doc_arrays = [line.split(":")[0].strip() for line in getattr(_core, name).__doc__.splitlines()
                      if line.startswith("  ")]
        assert all(a in params for a in doc_arrays) and (doc_arrays or params[0] == "config"), name
    assert list(inspect.signature(_core.attention_backward).parameters) == [
        "dq", "dk", "dv", "dout", "out", "lse", "q", "k", "v", "lengths"]
    assert list(inspect.signature(_core.adamw_step).parameters) == [
        "param", "grad", "m", "v", "lr", "beta1", "beta2", "eps", "weight_decay", "step", "grad_scale"]
    sig = inspect.signature(_core.dpo_loss_forward)
    assert sig.parameters["loss_type"].default == "sigmoid"
    assert sig.parameters["label_smoothing"].default == 0.0
    assert sig.parameters["beta"].default is inspect.Parameter.empty
    assert "dinp: float32 (NC), written, or None" in _core.matmul_backward.__doc__


def test_keywords_defaults_and_arity():
    x, w = np.arange(8, dtype=np.float32).reshape(2, 4), np.ones((3, 4), np.float32)
    out = np.zeros((2, 3), np.float32)
    _core.matmul_forward(weight=w, inp=x, out=out)
    np.testing.assert_array_equal(out, x @ w.T)
    _core.matmul_forward(out, x, w, accumulate=True)
    np.testing.assert_array_equal(out, 2 * (x @ w.T))
    with pytest.raises(TypeError):
        _core.matmul_forward(out, x)
    with pytest.raises(TypeError):
        _core.matmul_forward(out, x, w, bogus=1)
    with pytest.raises(TypeError):
        _core.matmul_forward(out, x, w, False, 1)


def test_exclusive_arrays_reject_partial_overlap():
    buf = np.zeros(12, np.float32)
    p, g, v = buf[0:4], np.zeros(4, np.float32), np.zeros(4, np.float32)
    with pytest.raises(ValueError, match="'param' must not be 'm' or share memory"):
        _core.adamw_step(p, g, buf[3:7], v, 1e-3, 0.9, 0.99, 1e-8, 0.0, 1)
    _core.adamw_step(p, g, buf[4:8], v, 1e-3, 0.9, 0.99, 1e-8, 0.0, 1)  # adjacent, not overlapping
    with pytest.raises(ValueError, match="'dlogits' must not be 'logits'"):
        lg = np.zeros((2, 5), np.float32)
        _core.logprobs_backward(lg, np.zeros(2, np.float32), lg, np.zeros(2, np.int32), np.zeros(2))


def test_scalar_ranges_and_choices():
    p, g, m, v = (np.zeros(3, np.float32) for _ in range(4))
    with pytest.raises(ValueError, match=r"'beta2' must be a finite number in \[0, 1\), got 1.0"):
        _core.adamw_step(p, g, m, v, 1e-3, 0.9, 1.0, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="'step' must be >= 1, got 0"):
        _core.adamw_step(p, g, m, v, 1e-3, 0.9, 0.99, 1e-8, 0.0, 0)
    with pytest.raises(TypeError, match="'lr' must be a real number, got str"):
        _core.adamw_step(p, g, m, v, "1e-3", 0.9, 0.99, 1e-8, 0.0, 1)
    x = [np.zeros(2) for _ in range(4)]
    with pytest.raises(ValueError, match="'loss_type' must be 'sigmoid', 'ipo' or 'hinge', got 'kto'"):
        _core.dpo_loss_forward(None, None, None, *x, 0.1, "kto")


def test_derived_dimensions():
    with pytest.raises(ValueError, match="'x' has D = 5, which must be even"):
        _core.rope_forward(np.zeros((1, 2, 1, 5), np.float32), np.zeros((2, 2), np.float32),
                           np.zeros((2, 2), np.float32))
    with pytest.raises(ValueError, match=r"axis 1 \(G\) must be 8 to match '2 \* dout's F'"):
        _core.swiglu_backward(np.zeros((3, 6), np.float32), np.zeros((3, 4), np.float32),
                              np.zeros((3, 6), np.float32))
