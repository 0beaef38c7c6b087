"""bfloat16 storage for the bf16 compute path: NumPy has no bf16 dtype, so bf16 arrays are uint16 arrays
holding the top 16 bits of each fp32 (round to nearest even, as torch's .to(torch.bfloat16)). Only
storage and conversion live here; the products are _core.matmul_bf16_forward / matmul_bf16_backward."""
from contextlib import contextmanager

import numpy as np

from .. import _core


def _out(out, shape, dtype, fn):
    if out is None:
        return np.empty(shape, dtype)
    if not isinstance(out, np.ndarray) or out.dtype != dtype or out.shape != shape or not out.flags.c_contiguous:
        raise ValueError(f"{fn}: 'out' must be a C-contiguous {np.dtype(dtype).name} array of shape {shape}, got "
                         f"{getattr(out, 'dtype', type(out).__name__)} {getattr(out, 'shape', '')}")
    return out


def to_bf16(x, out=None) -> np.ndarray:
    """A uint16 array of x's shape holding x rounded to bf16 (x is converted to float32 first); written
    into `out` (uint16, x's shape, C-contiguous) when given."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = _out(out, x.shape, np.uint16, "to_bf16")
    _core.bf16_from_f32(out.reshape(-1), x.reshape(-1))
    return out


def from_bf16(h, out=None) -> np.ndarray:
    """The float32 values of a bf16 (uint16) array (exact); written into `out` (float32, h's shape,
    C-contiguous) when given."""
    h = np.asarray(h)
    if h.dtype != np.uint16:
        raise TypeError(f"from_bf16: expected a uint16 array of bf16 bits, got dtype {h.dtype}")
    h = np.ascontiguousarray(h)
    out = _out(out, h.shape, np.float32, "from_bf16")
    _core.bf16_to_f32(out.reshape(-1), h.reshape(-1))
    return out


@contextmanager
def staged(dst):
    """A float32 array to fill in place of `dst` (what the file readers write into): dst itself when
    it is float32, else a scratch array of its shape, rounded into the bf16 (uint16) dst on leaving."""
    if dst.dtype == np.float32:
        yield dst
        return
    tmp = np.empty(dst.shape, np.float32)
    yield tmp
    to_bf16(tmp, out=dst)
