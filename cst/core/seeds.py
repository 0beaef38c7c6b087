"""The one way cst derives seeds: np.random.SeedSequence over (run seed, *key). The trainer's data order
(default_rng([seed, epoch]), which is SeedSequence([seed, epoch])), LoRA dropout (default_rng([seed,
calls, site])) and the generation seeds of evaluation and synthesis (derive_seed below) all use it, so a
run's randomness is a function of its seed alone, the same on every machine and Python version."""
import numpy as np

__all__ = ["derive_seed"]


def _word(part) -> int:
    if isinstance(part, (int, np.integer)) and not isinstance(part, bool) and part >= 0:
        return int(part)
    if isinstance(part, str):  # a stage name: its UTF-8 bytes as one non-negative integer
        return int.from_bytes(part.encode("utf-8"), "little")
    raise TypeError(f"derive_seed: key parts must be ints >= 0 or str, got {part!r}")


def derive_seed(seed: int, *key) -> int:
    """A 31-bit seed for one unit of work, e.g. derive_seed(seed, "answer", batch_start): independent
    streams for different keys, reproducible from (seed, key)."""
    words = [_word(seed)] + [_word(k) for k in key]
    return int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)
