"""bfloat16 storage for the bf16 compute path: NumPy has no bf16 dtype, so bf16 arrays are uint16 arrays
holding the top 16 bits of each fp32 (round to nearest even, as torch's .to(torch.bfloat16)). Only
storage and conversion live here; the products are _core.matmul_bf16_forward / matmul_bf16_backward."""
import numpy as np

from .. import _core


def to_bf16(x) -> np.ndarray:
    """A uint16 array of x's shape holding x rounded to bf16 (x is converted to float32 first)."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16)
    _core.bf16_from_f32(out.reshape(-1), x.reshape(-1))
    return out


def from_bf16(h) -> np.ndarray:
    """The float32 values of a bf16 (uint16) array (exact)."""
    h = np.asarray(h)
    if h.dtype != np.uint16:
        raise TypeError(f"from_bf16: expected a uint16 array of bf16 bits, got dtype {h.dtype}")
    h = np.ascontiguousarray(h)
    out = np.empty(h.shape, np.float32)
    _core.bf16_to_f32(out.reshape(-1), h.reshape(-1))
    return out
