"""The kernels (csrc/kernels) as plain C: no Python header in sight, and a small C program
(tests/c/test_kernels.c) built with the system C compiler and run on every SIMD path the CPU has,
checking a few results of each kernel family against values worked out by hand."""
import os
import re
import shutil
import subprocess
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "csrc" / "kernels"


def test_kernels_include_no_python():
    files = sorted(KERNELS.glob("*.[ch]"))
    assert len(files) > 10, f"expected the kernel sources in {KERNELS}"
    for f in files:
        includes = re.findall(r'#include\s*[<"]([^>"]+)[>"]', f.read_text())
        bad = [i for i in includes if i in ("Python.h", "glue.h") or i.startswith("numpy/")]
        assert not bad, f"{f.name} includes {bad}: kernels take plain pointers and sizes"


def _cc():
    cc = os.environ.get("CC") or (sysconfig.get_config_var("CC") or "cc").split()[0]
    path = shutil.which(cc) or shutil.which("cc")
    assert path, "no C compiler found (the extension needs one too)"
    return path


@pytest.mark.slow
def test_kernels_build_and_pass_as_plain_c(tmp_path):
    exe = tmp_path / "test_kernels"
    cmd = [_cc(), "-std=c11", "-O2", "-Wall", "-Wno-unknown-pragmas", f"-I{KERNELS}",
           *map(str, sorted(KERNELS.glob("*.c"))), str(ROOT / "tests" / "c" / "test_kernels.c"),
           "-lm", "-o", str(exe)]
    build = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr
    run = subprocess.run([str(exe)], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and re.search(r"^0 failure\(s\) on [1-9]", run.stdout, re.M), run.stdout + run.stderr
