"""The package as a user meets it: a light, fast import; clean reference counting at the C boundary; and
the README's first command (quick form) in a fresh virtual environment."""
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cst
from cst import _core

ROOT = Path(__file__).resolve().parents[1]


def test_import_is_light_and_fast():
    code = ("import time, sys; t = time.perf_counter(); import cst; dt = time.perf_counter() - t; "
            "heavy = [m for m in ('torch', 'transformers', 'matplotlib', 'tokenizers', 'gguf', 'jinja2') "
            "if m in sys.modules]; print(dt, heavy)")
    best = None
    for _ in range(3):  # the first run may pay for a cold page cache
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
        dt, heavy = out.stdout.split(" ", 1)
        assert heavy.strip() == "[]", f"import cst pulled in {heavy}"
        best = float(dt) if best is None else min(best, float(dt))
    assert best < 0.5, f"import cst took {best:.3f} s"


def test_refcounts_unchanged_by_kernel_calls():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 16)).astype(np.float32)
    w = rng.standard_normal((4, 16)).astype(np.float32)
    out = np.empty((8, 4), np.float32)
    dx, dw = np.zeros_like(x), np.zeros_like(w)
    arrays = (x, w, out, dx, dw)
    before = [sys.getrefcount(a) for a in arrays]
    for _ in range(1000):
        _core.matmul_forward(out, x, w)
        _core.matmul_backward(dx, dw, out, x, w)
        with pytest.raises(ValueError):
            _core.matmul_forward(out, x, w[:, :3].copy())
    assert [sys.getrefcount(a) for a in arrays] == before
    m = cst.Model(cst.ModelConfig(vocab_size=32, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                                  max_seq_len=16))
    tok = rng.integers(0, 32, (2, 5)).astype(np.int32)
    lengths = np.array([5, 3], np.int32)
    rc = (sys.getrefcount(tok), sys.getrefcount(lengths))
    for _ in range(50):
        m.forward(tok, lengths)
        m.backward(np.ones((2, 5, 32), np.float32))
    assert (sys.getrefcount(tok), sys.getrefcount(lengths)) == rc


def _readme_first_command():
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)\n```", text, re.S)
    return blocks[0].strip()


def _see_packages_of_this_interpreter(venv):
    """Puts the site-packages of the running interpreter after the new venv's own, by a .pth file.
    `venv --system-site-packages` would not do: it exposes the *base* interpreter's packages, which are
    not these when the tests themselves run in a virtual environment (as the README's test command may).
    Plain path lines: the .pth files found there (e.g. an editable install of cst) are not run."""
    import site
    dirs = [d for d in site.getsitepackages() + [site.getusersitepackages()] if os.path.isdir(d)]
    own = subprocess.run([str(venv / "bin" / "python"), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                         capture_output=True, text=True, check=True).stdout.strip()
    Path(own, "_cst_test_outer_site.pth").write_text("".join(d + "\n" for d in dirs))


@pytest.mark.slow
@pytest.mark.e2e
def test_readme_first_command_quick_in_fresh_venv(tmp_path):
    """Installs the package from this checkout into a new virtual environment and runs the README's
    first command with --quick. The new venv sees the packages of the interpreter running the tests (CI
    has already installed the dependencies and the SmolLM2 GGUF there), so what is tested is that cst
    itself builds, installs, and that its console script runs the demo."""
    cmd = _readme_first_command()
    assert cmd.startswith("pip install . ") and cmd.endswith("cst demo"), cmd
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    _see_packages_of_this_interpreter(venv)
    pip, cli = venv / "bin" / "pip", venv / "bin" / "cst"
    src = tmp_path / "src"  # a copy without build products, as a fresh clone would be
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True,
                           text=True, check=True).stdout.split()
    for f in files:
        p = ROOT / f
        if p.is_file():
            (src / f).parent.mkdir(parents=True, exist_ok=True)
            (src / f).write_bytes(p.read_bytes())
    env = dict(os.environ, PIP_DISABLE_PIP_VERSION_CHECK="1", OMP_NUM_THREADS="2")
    env.pop("PYTHONPATH", None)
    # Built as the README's `pip install .` builds it: in an isolated build environment (pyproject.toml's
    # build requirements from the package index), whatever setuptools the new venv came with.
    r = subprocess.run([str(pip), "install", "-q", "--no-deps", "."], cwd=src, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    out = tmp_path / "demo"
    r = subprocess.run([str(cli), "demo", "--quick", "--output-dir", str(out)], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-3000:])
    assert (out / "report.md").is_file() and (out / "report.json").is_file()
    # The installed copy, not the checkout, ran.
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import cst; print(cst.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, check=True).stdout
    assert str(venv) in where


def test_progress_bars_only_on_a_terminal(monkeypatch):
    import io

    from cst.runtime import interactive

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert interactive() is False  # a log or a pipe, even with ipykernel imported somewhere in the process
    monkeypatch.setattr(sys, "stderr", Terminal())
    assert interactive() is True


def test_old_module_names_are_the_same_modules():
    """cst.trainer, cst.judges, ... (the names from before the layered tree) import as the very modules of
    cst.train.trainer, cst.eval.judges, ...; `from cst import X` and attribute access agree."""
    import importlib

    from cst._aliases import MOVED
    assert {"trainer", "judges", "gguf", "tokenizer", "synth", "prompts", "training_config"} <= set(MOVED)
    for old, new in MOVED.items():
        real = importlib.import_module(f"cst.{new}")
        assert importlib.import_module(f"cst.{old}") is real, old
        assert sys.modules[f"cst.{old}"] is real and getattr(cst, old) is real, old
        assert real.__name__ == f"cst.{new}" and real.__spec__.name == f"cst.{new}"
    from cst import generate as gen
    assert gen is importlib.import_module("cst.core.generate")
    assert cst.Trainer is importlib.import_module("cst.trainer").Trainer
