"""Python helpers for the per-position kernels in cst._core (csrc/kernels/ops.c): the rotary-embedding tables.

The kernels themselves are called directly as cst._core.<op>_forward / <op>_backward. There is no
residual-add kernel: NumPy's np.add(a, b, out=a) is already in place, vectorised and exact.
"""
import numpy as np


def rope_tables(T: int, HS: int, theta: float, scaling: dict | None = None):
    """cos, sin tables (T, HS // 2) float32 for positions 0..T-1, as Hugging Face's
    LlamaRotaryEmbedding builds them; `scaling` is a ModelConfig.rope_scaling (None: default RoPE).

    inv_freq = 1 / theta ** (arange(0, HS, 2) / HS) and the angles pos * inv_freq are bit-identical to
    HF's float32 values (torch's float32 pow is correctly rounded, reproduced here by rounding a float64
    pow). cos and sin are the correctly rounded float32 values of those float32 angles; torch's own
    float32 cos/sin differ from them by at most 1 ulp in a few percent of entries.
    """
    for name, v in (("T", T), ("HS", HS)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"rope_tables: {name} must be an int, got {type(v).__name__}")
        if v < 1:
            raise ValueError(f"rope_tables: {name} must be >= 1, got {v}")
    if HS % 2:
        raise ValueError(f"rope_tables: HS must be even, got {HS}")
    if isinstance(theta, bool) or not isinstance(theta, (int, float, np.floating, np.integer)):
        raise TypeError(f"rope_tables: theta must be a number, got {type(theta).__name__}")
    if not (np.isfinite(theta) and theta > 0):
        raise ValueError(f"rope_tables: theta must be a finite number > 0, got {theta!r}")
    expo = np.arange(0, HS, 2, dtype=np.float32) / np.float32(HS)
    inv_freq = np.float32(1.0) / (np.float64(theta) ** expo.astype(np.float64)).astype(np.float32)
    if scaling is not None:
        inv_freq = scaled_inv_freq(inv_freq, scaling)
    angles = np.arange(T, dtype=np.float32)[:, None] * inv_freq[None, :]
    a64 = angles.astype(np.float64)
    return np.cos(a64).astype(np.float32), np.sin(a64).astype(np.float32)


def scaled_inv_freq(inv_freq, s):
    """inverse frequencies (HS/2,) float32 rescaled by a ModelConfig.rope_scaling, as transformers'
    ROPE_INIT_FUNCTIONS do: "linear" divides them by factor (positions / factor); "llama3" keeps the
    high frequencies, divides the low ones by factor and blends in between by wavelength;
    "freq_factors" divides each by its own factor (GGUF's rope_freqs.weight)."""
    f = inv_freq.astype(np.float64)
    kind = s["rope_type"]
    if kind == "linear":
        f = f / s["factor"]
    elif kind == "llama3":
        factor, lo, hi = s["factor"], s["low_freq_factor"], s["high_freq_factor"]
        old = s["original_max_position_embeddings"]
        wavelen = 2 * np.pi / f
        low = np.where(wavelen > old / lo, f / factor, f)
        smooth = (old / wavelen - lo) / (hi - lo)
        medium = ~(wavelen < old / hi) & ~(wavelen > old / lo)
        f = np.where(medium, (1 - smooth) * low / factor + smooth * low, low)
    elif kind == "freq_factors":
        f = f / np.asarray(s["factors"], np.float64)
    else:
        raise ValueError(f"rope_tables: rope scaling {kind!r} is not supported")
    return f.astype(np.float32)


def llama3_freq_factors(HS: int, theta: float, s: dict):
    """The per-frequency divisors (HS/2,) that llama3 scaling applies: what GGUF stores as
    rope_freqs.weight."""
    expo = np.arange(0, HS, 2, dtype=np.float32) / np.float32(HS)
    base = np.float32(1.0) / (np.float64(theta) ** expo.astype(np.float64)).astype(np.float32)
    return (base.astype(np.float64) / scaled_inv_freq(base, s).astype(np.float64)).astype(np.float32)
