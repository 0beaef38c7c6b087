"""Model configuration: the hyper-parameters of a Llama-family decoder (Llama 2/3.x, Mistral, Qwen2,
SOLAR). Not the parameter layout (cst.model.tensor_table) and not a file format (cst.hf, cst.gguf)."""
import math
from dataclasses import asdict, dataclass

# Rotary-embedding scalings cst computes (Hugging Face's rope_type names, plus "freq_factors": per
# frequency divisors as GGUF's rope_freqs.weight stores them).
ROPE_SCALINGS = {
    "linear": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "freq_factors": ("factors",),
}
ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    dim: int = 576
    n_layers: int = 30
    n_heads: int = 9
    n_kv_heads: int = 3
    ffn_dim: int = 1536
    max_seq_len: int = 8192
    rope_theta: float = 100000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = True
    head_dim: int = None  # None: dim // n_heads
    attention_bias: bool = False  # q/k/v biases (Qwen2)
    rope_scaling: dict = None  # None, or {"rope_type": one of ROPE_SCALINGS, its fields}
    sliding_window: int = None  # None: full causal attention; else sequences longer than it are refused
    arch: str = "llama"  # what the exporters write: "llama", "mistral" or "qwen2"

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {v!r}")
        if self.head_dim is None:
            if self.dim % self.n_heads:
                raise ValueError(f"ModelConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads}) "
                                 "unless head_dim is given")
            self.head_dim = self.dim // self.n_heads
        if isinstance(self.head_dim, bool) or not isinstance(self.head_dim, int) or self.head_dim < 1:
            raise ValueError(f"ModelConfig: head_dim must be a positive int, got {self.head_dim!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head size {self.head_dim} must be even for rotary embeddings")
        if not 0 < self.rope_theta < float("inf"):
            raise ValueError(f"ModelConfig: rope_theta must be finite and > 0, got {self.rope_theta!r}")
        if not 0 < self.norm_eps < float("inf"):
            raise ValueError(f"ModelConfig: norm_eps must be finite and > 0, got {self.norm_eps!r}")
        if not isinstance(self.attention_bias, bool):
            raise ValueError(f"ModelConfig: attention_bias must be a bool, got {self.attention_bias!r}")
        if self.sliding_window is not None and (isinstance(self.sliding_window, bool) or not isinstance(
                self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"ModelConfig: sliding_window must be None or a positive int, got "
                             f"{self.sliding_window!r}")
        if self.arch not in ARCHITECTURES:
            raise ValueError(f"ModelConfig: arch must be one of {ARCHITECTURES}, got {self.arch!r}")
        if self.rope_scaling is not None:
            self.rope_scaling = _check_scaling(self.rope_scaling, self.head_dim)

    @property
    def attention_window(self) -> int:
        """The longest sequence attention is exact for: max_seq_len, or sliding_window when smaller."""
        w = self.sliding_window
        return self.max_seq_len if w is None else min(w, self.max_seq_len)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


def _check_scaling(s, HS):
    if not isinstance(s, dict):
        raise ValueError(f"ModelConfig: rope_scaling must be a dict or None, got {type(s).__name__}")
    kind = s.get("rope_type")
    if kind not in ROPE_SCALINGS:
        raise ValueError(f"ModelConfig: rope_scaling rope_type {kind!r} is not supported "
                         f"(supported: {sorted(ROPE_SCALINGS)})")
    out = {"rope_type": kind}
    for k in ROPE_SCALINGS[kind]:
        if k not in s:
            raise ValueError(f"ModelConfig: rope_scaling of type {kind!r} needs {k!r}")
        v = s[k]
        if k == "factors":
            v = [float(x) for x in v]
            if len(v) != HS // 2 or not all(math.isfinite(x) and x > 0 for x in v):
                raise ValueError(f"ModelConfig: rope_scaling factors must be {HS // 2} positive numbers")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"ModelConfig: rope_scaling {k} must be a positive number, got {v!r}")
        out[k] = v
    if kind == "llama3" and not out["high_freq_factor"] > out["low_freq_factor"]:
        raise ValueError("ModelConfig: rope_scaling high_freq_factor must exceed low_freq_factor")
    return out
