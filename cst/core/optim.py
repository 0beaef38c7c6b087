"""AdamW with global-norm gradient clipping over flat float32 parameter arrays (the update runs in
cst._core, csrc/kernels/optim.c). Semantics follow torch.optim.AdamW and torch.nn.utils.clip_grad_norm_.
Not a learning-rate scheduler: pass lr= to step() to change it per step.
"""
import math

import numpy as np

from .. import _core


def _as_list(arrays, what, fn):
    """Accepts one flat array or a list/tuple of them; returns a list of 1-D float32 views."""
    items = list(arrays) if isinstance(arrays, (list, tuple)) else [arrays]
    out = []
    for i, a in enumerate(items):
        name = what if len(items) == 1 and not isinstance(arrays, (list, tuple)) else f"{what}[{i}]"
        if not isinstance(a, np.ndarray):
            raise TypeError(f"{fn}: '{name}' must be a numpy.ndarray, got {type(a).__name__}")
        if a.dtype != np.float32:
            raise TypeError(f"{fn}: '{name}' must have dtype float32, got {a.dtype}")
        if not a.flags.c_contiguous:
            raise ValueError(f"{fn}: '{name}' must be C-contiguous")
        out.append(a.reshape(-1))  # a view, so in-place updates reach the caller's array
    return out


def clip_grad_norm(grads_flat, max_norm: float):
    """Global L2 norm of the gradients and the factor that clips it to max_norm, as
    torch.nn.utils.clip_grad_norm_: scale = min(1, max_norm / (norm + 1e-6)).

    Returns (total_norm, scale) as Python floats and does NOT modify the gradients: pass scale to
    AdamW.step(grad_scale=...), which applies it on the fly. The norm is summed in double in a fixed
    order, so it does not depend on the thread count."""
    grads = _as_list(grads_flat, "grads_flat", "clip_grad_norm")
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float, np.floating, np.integer)):
        raise TypeError(f"clip_grad_norm: max_norm must be a number, got {type(max_norm).__name__}")
    if not max_norm > 0:
        raise ValueError(f"clip_grad_norm: max_norm must be > 0, got {max_norm!r}")
    total = math.sqrt(sum(_core.sum_squares(g) for g in grads))
    scale = min(1.0, float(max_norm) / (total + 1e-6))
    return total, scale


class AdamW:
    """torch.optim.AdamW on flat float32 arrays: decoupled weight decay (p *= 1 - lr * wd), bias
    correction, eps added to sqrt(v_hat). State (m, v, step) is created at the first step, one pair
    of moment arrays per parameter array."""

    def __init__(self, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 1e-2):
        self.lr = self._number("lr", lr, lo=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise TypeError(f"AdamW: betas must be a pair of floats, got {betas!r}")
        b1, b2 = (self._number(f"betas[{i}]", b, lo=0.0) for i, b in enumerate(betas))
        if not (b1 < 1.0 and b2 < 1.0):
            raise ValueError(f"AdamW: betas must lie in [0, 1), got {tuple(betas)!r}")
        self.betas = (b1, b2)
        self.eps = self._number("eps", eps, lo=0.0)
        self.weight_decay = self._number("weight_decay", weight_decay, lo=0.0)
        self.step_count = 0
        self.m = None
        self.v = None

    @staticmethod
    def _number(name, x, lo):
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)):
            raise TypeError(f"AdamW: {name} must be a number, got {type(x).__name__}")
        x = float(x)
        if not math.isfinite(x) or x < lo:
            raise ValueError(f"AdamW: {name} must be a finite number >= {lo}, got {x!r}")
        return x

    def step(self, params_flat, grads_flat, lr=None, grad_scale: float = 1.0):
        """One update, in place on params_flat (one flat float32 array, or a list of them matching
        grads_flat). grads are read, never modified; they are multiplied by grad_scale first (the
        scale from clip_grad_norm). lr overrides the learning rate for this step and later ones."""
        params = _as_list(params_flat, "params_flat", "AdamW.step")
        grads = _as_list(grads_flat, "grads_flat", "AdamW.step")
        if len(params) != len(grads):
            raise ValueError(f"AdamW.step: {len(params)} parameter arrays but {len(grads)} gradient arrays")
        for i, (p, g) in enumerate(zip(params, grads)):
            if p.size != g.size:
                raise ValueError(f"AdamW.step: params_flat[{i}] has {p.size} elements, grads_flat[{i}] {g.size}")
        if lr is not None:
            self.lr = self._number("lr", lr, lo=0.0)
        grad_scale = self._number("grad_scale", grad_scale, lo=0.0)
        if self.m is None:
            self.m = [np.zeros_like(p) for p in params]
            self.v = [np.zeros_like(p) for p in params]
        elif [m.size for m in self.m] != [p.size for p in params]:
            raise ValueError("AdamW.step: parameter sizes differ from those the optimiser state was made for")
        self.step_count += 1
        b1, b2 = self.betas
        for p, g, m, v in zip(params, grads, self.m, self.v):
            _core.adamw_step(p, g, m, v, self.lr, b1, b2, self.eps, self.weight_decay, self.step_count,
                             grad_scale)

    def state_dict(self) -> dict:
        """Copies of the state: step, m and v (lists of flat float32 arrays, None before the first
        step) and the hyper-parameters."""
        return {
            "step": self.step_count,
            "m": None if self.m is None else [a.copy() for a in self.m],
            "v": None if self.v is None else [a.copy() for a in self.v],
            "lr": self.lr,
            "betas": self.betas,
            "eps": self.eps,
            "weight_decay": self.weight_decay,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restores what state_dict() returned (hyper-parameters too, when present)."""
        if not isinstance(state, dict):
            raise TypeError(f"AdamW.load_state_dict: state must be a dict, got {type(state).__name__}")
        for key in ("step", "m", "v"):
            if key not in state:
                raise ValueError(f"AdamW.load_state_dict: state lacks '{key}'")
        step = state["step"]
        if isinstance(step, bool) or not isinstance(step, (int, np.integer)) or step < 0:
            raise ValueError(f"AdamW.load_state_dict: 'step' must be an int >= 0, got {step!r}")
        if (state["m"] is None) != (state["v"] is None):
            raise ValueError("AdamW.load_state_dict: 'm' and 'v' must both be present or both None")
        if state["m"] is not None:
            m = [a.copy() for a in _as_list(state["m"], "m", "AdamW.load_state_dict")]
            v = [a.copy() for a in _as_list(state["v"], "v", "AdamW.load_state_dict")]
            if [a.size for a in m] != [a.size for a in v]:
                raise ValueError("AdamW.load_state_dict: 'm' and 'v' sizes differ")
        else:
            m = v = None
        for key in ("lr", "eps", "weight_decay"):
            if key in state:
                setattr(self, key, self._number(key, state[key], lo=0.0))
        if "betas" in state:
            self.betas = tuple(self._number("betas", b, lo=0.0) for b in state["betas"])
        self.step_count, self.m, self.v = int(step), m, v
