"""LoRA adapters for cst.Model: y = x W^T + (alpha/r) * dropout(x) A^T B^T on any of the seven
projections, base weights frozen. Adapter weights live in one flat buffer (names as PEFT saves them).
The math reuses the linear-layer kernels; this module holds no kernels of its own."""
import numpy as np

from . import _core
from .model import LINEARS, _views

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Which fused projection of the model each Hugging Face module belongs to.
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu",
          "up_proj": "gu", "down_proj": "down"}
_PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class _Site:
    """One adapted module: its A (R, in) and B (out, R) views, its gradient views, and the rows it
    occupies in the fused projection's output."""
    __slots__ = ("layer", "module", "which", "r0", "r1", "A", "B", "dA", "dB", "index")


class LoRA:
    """Adapters on `target_modules` of every layer of `model`. `attach()` makes the model route its
    projections through them and freezes the base; `enabled = False` gives the base model back
    without a second copy of the weights (the reference model of DPO)."""

    def __init__(self, model, r=16, alpha=32.0, dropout=0.0, target_modules=TARGETS, seed=0):
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise ValueError(f"LoRA: r must be a positive int, got {r!r}")
        if not alpha > 0:
            raise ValueError(f"LoRA: alpha must be > 0, got {alpha!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout must lie in [0, 1), got {dropout!r}")
        target_modules = tuple(target_modules)
        unknown = [m for m in target_modules if m not in TARGETS]
        if unknown or not target_modules:
            raise ValueError(f"LoRA: target_modules must be a non-empty subset of {TARGETS}, got unknown {unknown}")
        self.model, self.r, self.alpha, self.dropout = model, r, float(alpha), float(dropout)
        self.scale = self.alpha / r
        self.target_modules = tuple(m for m in TARGETS if m in target_modules)
        self.enabled = True
        self.training = True
        self.seed = int(seed)
        self.calls = 0  # forward calls so far: with the seed, fixes every dropout mask
        cfg = model.config
        layout, sites = [], {}
        for i in range(cfg.n_layers):
            for which, parts in LINEARS.items():
                row = 0
                for part in parts:
                    module = part.split(".")[1]
                    out_dim, in_dim = model.params[f"model.layers.{i}.{part}.weight"].shape
                    if module in self.target_modules:
                        s = _Site()
                        s.layer, s.module, s.which, s.r0, s.r1 = i, module, which, row, row + out_dim
                        s.index = len(sites)
                        base = f"base_model.model.model.layers.{i}.{_PREFIX[module]}.{module}"
                        layout.append((base + ".lora_A.weight", (r, in_dim)))
                        layout.append((base + ".lora_B.weight", (out_dim, r)))
                        sites.setdefault((i, which), []).append(s)
                    row += out_dim
        self.layout = layout
        n = sum(a * b for _, (a, b) in layout)
        self.flat_params = np.zeros(n, np.float32)
        self.flat_grads = np.zeros(n, np.float32)
        self.params = _views(self.flat_params, layout)
        self.grads = _views(self.flat_grads, layout)
        self._sites = sites
        for site_list in sites.values():
            for s in site_list:
                a_name, b_name = self._names(s)
                s.A, s.B = self.params[a_name], self.params[b_name]
                s.dA, s.dB = self.grads[a_name], self.grads[b_name]
        # PEFT's initialisation: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
        # so the adapted model starts equal to the base.
        rng = np.random.default_rng(self.seed)
        for name, arr in self.params.items():
            if name.endswith("lora_A.weight"):
                bound = 1.0 / np.sqrt(arr.shape[1])
                arr[...] = rng.uniform(-bound, bound, size=arr.shape).astype(np.float32)
        self._saved = {}

    @staticmethod
    def _names(s):
        base = f"base_model.model.model.layers.{s.layer}.{_PREFIX[s.module]}.{s.module}"
        return base + ".lora_A.weight", base + ".lora_B.weight"

    @property
    def num_parameters(self):
        return int(self.flat_params.size)

    def attach(self):
        """Routes the model's projections through these adapters and freezes its base weights."""
        self.model.adapter = self
        self.model.frozen_base = True
        return self

    def detach(self):
        self.model.adapter = None
        self.model.frozen_base = False

    def zero_grad(self):
        self.flat_grads[...] = 0.0

    def new_step(self):
        """Advances the dropout stream: call once per forward pass that will be back-propagated."""
        self.calls += 1

    def _dropped(self, s, x):
        """dropout(x) for site s; the mask is a function of (seed, calls, site), so backward
        regenerates it instead of storing it."""
        if not (self.training and self.dropout > 0.0):
            return x
        rng = np.random.default_rng([self.seed, self.calls, s.index])
        keep = rng.random(x.shape, dtype=np.float32) >= self.dropout
        return np.where(keep, x * np.float32(1.0 / (1.0 - self.dropout)), np.float32(0.0)).astype(np.float32)

    def forward(self, layer, which, x, out):
        """out (N, rows) += scale * dropout(x) A^T B^T for each adapted module of this projection."""
        sites = self._sites.get((layer, which))
        if not sites or not self.enabled:
            return
        N = x.shape[0]
        for s in sites:
            xd = self._dropped(s, x)
            h = np.empty((N, self.r), np.float32)
            _core.matmul_forward(h, xd, s.A)
            h *= np.float32(self.scale)
            self._saved[(layer, s.module)] = h
            if s.r0 == 0 and s.r1 == out.shape[1]:
                _core.matmul_forward(out, h, s.B, True)
            else:
                delta = np.empty((N, s.r1 - s.r0), np.float32)
                _core.matmul_forward(delta, h, s.B)
                out[:, s.r0:s.r1] += delta

    def backward(self, layer, which, dx, dout, x):
        """Adds adapter gradients (dA, dB) and the adapter path's input gradient into dx."""
        sites = self._sites.get((layer, which))
        if not sites or not self.enabled:
            return
        N = x.shape[0]
        for s in sites:
            h = self._saved[(layer, s.module)]
            d = dout if (s.r0 == 0 and s.r1 == dout.shape[1]) else np.ascontiguousarray(dout[:, s.r0:s.r1])
            dh = np.zeros((N, self.r), np.float32)
            _core.matmul_backward(dh, s.dB, d, h, s.B)  # h already carries the scale
            dh *= np.float32(self.scale)
            xd = self._dropped(s, x)
            if xd is x:
                _core.matmul_backward(dx, s.dA, dh, x, s.A)
            else:
                dxd = np.zeros_like(x)
                _core.matmul_backward(dxd, s.dA, dh, xd, s.A)
                # d dropout(x)/dx is the same mask scaled by 1/(1-p): reuse xd's zero pattern.
                dx += np.where(xd != 0, dxd * np.float32(1.0 / (1.0 - self.dropout)), np.float32(0.0))

    def delta(self, layer, module):
        """scale * B @ A for one adapted module, (out, in) float32."""
        for s in self._sites.get((layer, _FUSED[module]), []):
            if s.module == module:
                return (np.float32(self.scale) * (s.B.astype(np.float64) @ s.A.astype(np.float64))).astype(np.float32)
        raise KeyError(f"no adapter on layer {layer} {module}")

    def merged_params(self):
        """A copy of the model's flat parameters with every adapter added into its base weight."""
        flat = self.model.flat_params.copy()
        views = _views(flat, self.model.layout)
        for site_list in self._sites.values():
            for s in site_list:
                name = f"model.layers.{s.layer}.{_PREFIX[s.module]}.{s.module}.weight"
                views[name] += self.delta(s.layer, s.module)
        return flat

    def state_dict(self):
        return {name: arr.copy() for name, arr in self.params.items()}

    def load_state_dict(self, sd):
        missing = [n for n in self.params if n not in sd]
        if missing:
            raise ValueError(f"LoRA.load_state_dict: missing {len(missing)} tensors, e.g. {missing[0]}")
        for name, arr in self.params.items():
            src = np.asarray(sd[name])
            if src.shape != arr.shape:
                raise ValueError(f"LoRA.load_state_dict: '{name}' has shape {src.shape}, expected {arr.shape}")
            arr[...] = src

