"""Model configuration: the hyper-parameters of a Llama-family decoder."""
from dataclasses import asdict, dataclass


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

    def __post_init__(self):
        for name in ("vocab_size", "dim", "n_layers", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"ModelConfig: {name} must be a positive int, got {v!r}")
        if self.dim % self.n_heads:
            raise ValueError(f"ModelConfig: dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(
                f"ModelConfig: n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"ModelConfig: head size {self.head_dim} must be even for rotary embeddings")
        if not 0 < self.rope_theta < float("inf"):
            raise ValueError(f"ModelConfig: rope_theta must be finite and > 0, got {self.rope_theta!r}")
        if not 0 < self.norm_eps < float("inf"):
            raise ValueError(f"ModelConfig: norm_eps must be finite and > 0, got {self.norm_eps!r}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)
