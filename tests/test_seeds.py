"""cst.seeds.derive_seed: NumPy's SeedSequence over (seed, *key), the one seed scheme of cst."""
import numpy as np
import pytest

from cst.seeds import derive_seed


def test_reproducible_independent_and_in_range():
    seeds = {derive_seed(s, stage, b) for s in range(3) for stage in ("answer", "critique", "eval") for b in (0, 8)}
    assert len(seeds) == 18  # every (seed, stage, batch) its own stream
    assert all(0 <= x < 2**31 for x in seeds)
    assert derive_seed(0, "answer", 8) == derive_seed(0, "answer", 8)
    # The same words as np.random.default_rng([seed, ...]) takes: one scheme with the trainer's data order.
    words = [7, int.from_bytes(b"eval", "little"), 3]
    assert derive_seed(7, "eval", 3) == int(np.random.SeedSequence(words).generate_state(1)[0] & 0x7FFFFFFF)


@pytest.mark.parametrize("bad", [-1, 1.5, None, True])
def test_bad_parts_rejected(bad):
    with pytest.raises(TypeError, match="derive_seed"):
        derive_seed(bad, "x")
