"""LoRA adapters for cst.Model: y = x W^T + (alpha/r) * dropout(x) A^T B^T on any of the seven
projections, base weights frozen; PEFT's math, names and adapter files (save_adapter/load_adapter).
Adapter weights live in one flat buffer. The math reuses the linear-layer kernels; no kernels here."""
import json
import os

import numpy as np

from .. import _core
from .model import LINEARS, _views

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Which fused projection of the model each Hugging Face module belongs to.
_FUSED = {"q_proj": "qkv", "k_proj": "qkv", "v_proj": "qkv", "o_proj": "o", "gate_proj": "gu",
          "up_proj": "gu", "down_proj": "down"}
_PREFIX = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
           "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


class _Site:
    """One adapted module: its A (R, in) and B (out, R) views and gradient views, its column block
    j*R:(j+1)*R in its group, and the rows r0:r1 it occupies in the fused projection's output."""
    __slots__ = ("layer", "module", "j", "r0", "r1", "A", "B", "dA", "dB", "index")


class _Group:
    """The adapted modules of one fused projection of one layer (q/k/v, o, gate/up or down). Their A
    matrices are adjacent in the flat buffer, so one (n*R, in) matmul computes every h = x A^T at
    once; the B matrices are copied into a block-diagonal (rows, n*R) scratch so that one
    accumulating matmul adds every x A^T B^T into the fused output (the zero blocks cost a few
    percent of the base projection's flops and save a temporary per module and a strided add). A
    group of one module that fills the projection (o, down) uses B directly, no scratch. The backward
    takes each module on its own (_core.matmul_backward_block on its rows of the fused gradient): the
    zero blocks would double (gate|up) or triple (q|k|v) its work."""
    __slots__ = ("sites", "A", "dA", "rows", "Bbd", "H", "dropout_calls")


class LoRA:
    """Adapters on `target_modules` of every layer of `model`, as PEFT's LoraConfig(r, lora_alpha,
    target_modules, lora_dropout) builds them: scale alpha / r, A initialised kaiming-uniform, B
    zero, dropout on the adapter's input only. `attach()` makes the model route its projections
    through them and freezes the base; `enabled = False` gives the base model back without a second
    copy of the weights (the reference model of DPO); `training = False` turns dropout off.

    Parameter names are PEFT's `get_peft_model_state_dict` keys
    (base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight, ...)."""

    def __init__(self, model, r=16, alpha=32.0, dropout=0.0, target_modules=TARGETS, seed=0):
        from .layout import check_trainable
        check_trainable(model, "LoRA")
        if isinstance(r, bool) or not isinstance(r, (int, np.integer)) or r <= 0:
            raise ValueError(f"LoRA: r must be a positive int, got {r!r}")
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)) \
                or not np.isfinite(alpha) or not alpha > 0:
            raise ValueError(f"LoRA: alpha must be a finite number > 0, got {alpha!r}")
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float, np.floating, np.integer)) \
                or not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA: dropout must lie in [0, 1), got {dropout!r}")
        if isinstance(target_modules, str):
            target_modules = (target_modules,)
        target_modules = tuple(target_modules)
        unknown = [m for m in target_modules if m not in TARGETS]
        if unknown or not target_modules:
            raise ValueError(f"LoRA: target_modules must be a non-empty subset of {TARGETS}, got unknown {unknown}")
        r = int(r)
        self.model, self.r, self.alpha, self.dropout = model, r, float(alpha), float(dropout)
        self.scale = self.alpha / r
        self.target_modules = tuple(m for m in TARGETS if m in target_modules)
        self.enabled = True
        self.training = True
        self.seed = int(seed)
        self.calls = 0  # training forward passes so far: with the seed, fixes every dropout mask
        self.stream = ()  # more entropy for the masks: (rank,) under data parallelism, so ranks differ
        cfg = model.config
        layout, groups, sites = [], {}, []
        for i in range(cfg.n_layers):
            for which, parts in LINEARS.items():
                row, members = 0, []
                for part in parts:
                    module = part.split(".")[1]
                    out_dim, in_dim = model.params[f"model.layers.{i}.{part}.weight"].shape
                    if module in self.target_modules:
                        s = _Site()
                        s.layer, s.module, s.j, s.r0, s.r1 = i, module, len(members), row, row + out_dim
                        s.index = len(sites)
                        members.append((s, in_dim, out_dim))
                        sites.append(s)
                    row += out_dim
                if not members:
                    continue
                # All A's of the group first (adjacent: one stacked view), then the B's.
                layout += [(self._names(s)[0], (r, in_dim)) for s, in_dim, _ in members]
                layout += [(self._names(s)[1], (out_dim, r)) for s, _, out_dim in members]
                g = _Group()
                g.sites, g.rows = [s for s, _, _ in members], row
                g.H, g.dropout_calls = None, None
                groups[(i, which)] = g
        self.layout = layout
        n = sum(a * b for _, (a, b) in layout)
        self.flat_params = np.zeros(n, np.float32)
        self.flat_grads = np.zeros(n, np.float32)
        self.params = _views(self.flat_params, layout)
        self.grads = _views(self.flat_grads, layout)
        offsets, off = {}, 0
        for name, (a, b) in layout:
            offsets[name] = off
            off += a * b
        for g in groups.values():
            for s in g.sites:
                a_name, b_name = self._names(s)
                s.A, s.B = self.params[a_name], self.params[b_name]
                s.dA, s.dB = self.grads[a_name], self.grads[b_name]
            first = offsets[self._names(g.sites[0])[0]]
            nR, C = len(g.sites) * r, g.sites[0].A.shape[1]
            g.A = self.flat_params[first:first + nR * C].reshape(nR, C)
            g.dA = self.flat_grads[first:first + nR * C].reshape(nR, C)
            if len(g.sites) == 1 and g.sites[0].r0 == 0 and g.sites[0].r1 == g.rows:
                g.Bbd = None  # o and down: B itself is the whole block
            else:
                g.Bbd = np.zeros((g.rows, nR), np.float32)
        self._groups = groups
        self._sites = sites
        # PEFT's initialisation: A ~ kaiming-uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)), B = 0,
        # so the adapted model starts equal to the base.
        rng = np.random.default_rng(self.seed)
        for name, arr in self.params.items():
            if name.endswith("lora_A.weight"):
                bound = 1.0 / np.sqrt(arr.shape[1])
                arr[...] = rng.uniform(-bound, bound, size=arr.shape).astype(np.float32)

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
        self.model.frozen_base = self.model.dtype == "bf16"  # a bf16 base stays frozen

    def zero_grad(self):
        self.flat_grads[...] = 0.0

    def new_step(self):
        """Advances the dropout stream: call once per forward pass that will be back-propagated."""
        self.calls += 1

    # ---- the projection hook ----

    def _keep(self, s, calls, shape):
        """Dropout keep-mask of site s for forward pass `calls`: a function of (seed, calls, site),
        so backward regenerates it instead of storing N x in bytes per module."""
        rng = np.random.default_rng([self.seed, calls, s.index, *self.stream])
        return rng.random(shape, dtype=np.float32) >= np.float32(self.dropout)

    def _dropped(self, s, calls, x):
        keep = self._keep(s, calls, x.shape)
        return np.multiply(x, keep, dtype=np.float32) * np.float32(1.0 / (1.0 - self.dropout)), keep

    def forward(self, layer, which, x, out):
        """out (N, rows) += scale * dropout(x) A^T B^T for each adapted module of this projection."""
        g = self._groups.get((layer, which))
        if g is None or not self.enabled:
            return
        N, R = x.shape[0], self.r
        nR = len(g.sites) * R
        if g.H is None or g.H.shape[0] < N:
            g.H = np.empty((N, nR), np.float32)
        H = g.H[:N]
        use_dropout = self.training and self.dropout > 0.0
        g.dropout_calls = self.calls if use_dropout else None
        if not use_dropout:
            _core.matmul_forward(H, x, g.A)  # every module's x A^T in one product
        else:
            h = np.empty((N, R), np.float32)
            for s in g.sites:
                _core.matmul_forward(h, self._dropped(s, self.calls, x)[0], s.A)
                H[:, s.j * R:(s.j + 1) * R] = h
        H *= np.float32(self.scale)
        if g.Bbd is None:
            _core.matmul_forward(out, H, g.sites[0].B, True)
            return
        for s in g.sites:
            g.Bbd[s.r0:s.r1, s.j * R:(s.j + 1) * R] = s.B
        _core.matmul_forward(out, H, g.Bbd, True)

    def backward(self, layer, which, dx, dout, x):
        """Adds adapter gradients (dA, dB) and the adapter path's input gradient into dx."""
        g = self._groups.get((layer, which))
        if g is None or not self.enabled:
            return
        N, R = x.shape[0], self.r
        if g.H is None or g.H.shape[0] < N:
            raise ValueError("LoRA.backward: no saved activations for this shape (forward first)")
        H = g.H[:N]  # already carries the scale
        nR = len(g.sites) * R
        dH = np.empty((N, nR), np.float32)
        for s in g.sites:  # each module's rows of dout with its own B: the block-diagonal scratch is forward-only
            _core.matmul_backward_block(dH, s.dB, dout, H, s.B, s.r0, s.j * R, accumulate=False)
        dH *= np.float32(self.scale)
        if g.dropout_calls is None:
            _core.matmul_backward(dx, g.dA, dH, x, g.A)
            return
        inv = np.float32(1.0 / (1.0 - self.dropout))
        dxd = np.empty_like(x)
        for s in g.sites:
            xd, keep = self._dropped(s, g.dropout_calls, x)
            _core.matmul_backward_block(dxd, s.dA, dH, xd, s.A, s.j * R, 0, accumulate=False)
            # d dropout(x) / dx is the same mask times 1/(1-p).
            dxd *= keep
            dxd *= inv
            dx += dxd

    # ---- merging, state, files ----

    def delta(self, layer, module):
        """scale * B @ A for one adapted module, (out, in) float32."""
        for s in self._sites:
            if s.layer == layer and s.module == module:
                return (np.float32(self.scale) * (s.B.astype(np.float64) @ s.A.astype(np.float64))).astype(np.float32)
        raise KeyError(f"no adapter on layer {layer} {module}")

    def merged_params(self):
        """A float32 copy of the model's flat parameters with every adapter added into its base weight."""
        flat = self.model.float32_params()
        views = _views(flat, self.model.layout)
        for s in self._sites:
            name = f"model.layers.{s.layer}.{_PREFIX[s.module]}.{s.module}.weight"
            views[name] += self.delta(s.layer, s.module)
        return flat

    def state_dict(self):
        return {name: arr.copy() for name, arr in self.params.items()}

    def load_state_dict(self, sd):
        missing = [n for n in self.params if n not in sd]
        if missing:
            raise ValueError(f"LoRA.load_state_dict: missing {len(missing)} tensors, e.g. {missing[0]}")
        extra = [n for n in sd if n not in self.params]
        if extra:
            raise ValueError(f"LoRA.load_state_dict: {len(extra)} unexpected tensors, e.g. {extra[0]}")
        for name, arr in self.params.items():
            src = np.asarray(sd[name])
            if src.shape != arr.shape:
                raise ValueError(f"LoRA.load_state_dict: '{name}' has shape {src.shape}, expected {arr.shape}")
            if not np.all(np.isfinite(src)):
                raise ValueError(f"LoRA.load_state_dict: '{name}' holds non-finite values")
        for name, arr in self.params.items():
            arr[...] = sd[name]

    def peft_config(self):
        """The adapter_config.json that PEFT's LoraConfig reads for these adapters."""
        return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": self.r, "lora_alpha": self.alpha,
                "lora_dropout": self.dropout, "target_modules": list(self.target_modules), "bias": "none",
                "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True,
                "use_rslora": False, "use_dora": False, "modules_to_save": None, "layers_to_transform": None,
                "layers_pattern": None, "rank_pattern": {}, "alpha_pattern": {},
                "base_model_name_or_path": None, "revision": None}

    def save_adapter(self, path):
        """Writes adapter_model.safetensors and adapter_config.json into directory `path` (atomically),
        loadable by peft.PeftModel.from_pretrained(hf_model, path) and by load_adapter."""
        from safetensors.numpy import save_file
        from .atomic import atomic_dir
        with atomic_dir(path) as tmp:
            save_file({n: np.ascontiguousarray(a) for n, a in self.params.items()},
                      os.path.join(tmp, "adapter_model.safetensors"), metadata={"format": "pt"})
            with open(os.path.join(tmp, "adapter_config.json"), "w") as f:
                json.dump(self.peft_config(), f, indent=2)
        return os.fspath(path)

    def load_adapter(self, path):
        """Reads adapter weights written by save_adapter or by PEFT's save_pretrained (any float dtype
        NumPy knows; bfloat16 files need PEFT's safetensors-with-torch and are refused). r, alpha and target modules must match these adapters."""
        from .errors import FormatError
        path = os.fspath(path)
        cfg_path = os.path.join(path, "adapter_config.json")
        with open(cfg_path, encoding="utf-8") as f:
            try:
                c = json.load(f)
            except ValueError as e:
                raise FormatError(f"{cfg_path}: not valid JSON ({e})") from None
        if not isinstance(c, dict) or c.get("peft_type", "LORA") != "LORA":
            raise ValueError(f"load_adapter: {cfg_path} is not a LoRA adapter config")
        tm = c.get("target_modules")
        tm = [tm] if isinstance(tm, str) else list(tm or [])
        if c.get("r") != self.r or not np.isclose(float(c.get("lora_alpha", -1)), self.alpha) \
                or sorted(tm) != sorted(self.target_modules):
            raise ValueError(f"load_adapter: {path} has r={c.get('r')}, lora_alpha={c.get('lora_alpha')}, "
                             f"target_modules={tm}; these adapters have r={self.r}, alpha={self.alpha}, "
                             f"target_modules={list(self.target_modules)}")
        if c.get("use_dora") or c.get("use_rslora") or c.get("rank_pattern") or c.get("alpha_pattern"):
            raise ValueError(f"load_adapter: {cfg_path} uses DoRA/rsLoRA/per-module ranks (not supported)")
        st = os.path.join(path, "adapter_model.safetensors")
        from safetensors import SafetensorError
        from safetensors.numpy import load_file
        try:
            tensors = load_file(st)
        except (SafetensorError, ValueError, TypeError) as e:
            raise FormatError(f"{st}: not a readable safetensors file ({e})") from None
        # Older PEFT files keep the adapter name in keys (".lora_A.default.weight").
        tensors = {k.replace(".default.weight", ".weight"): v for k, v in tensors.items()}
        missing = [n for n in self.params if n not in tensors]
        extra = [n for n in tensors if n not in self.params]
        if missing or extra:
            raise ValueError(f"load_adapter: {st} lacks {len(missing)} tensors (e.g. {missing[:1]}) and has "
                             f"{len(extra)} unexpected ones (e.g. {extra[:1]})")
        new = np.empty_like(self.flat_params)
        views = _views(new, self.layout)
        for name, arr in self.params.items():
            src = tensors[name]
            if src.shape != arr.shape or src.dtype.kind != "f":
                raise ValueError(f"load_adapter: {st}: '{name}' is {src.dtype} {src.shape}, expected float "
                                 f"{arr.shape}")
            views[name][...] = src
        if not np.all(np.isfinite(new)):
            raise ValueError(f"load_adapter: {st} holds non-finite values")
        self.flat_params[...] = new
        return self
