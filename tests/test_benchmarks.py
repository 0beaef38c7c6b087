"""The benchmark scripts start from any working directory (they find the checkout's cst through
_srcpath) and refuse bad input with a clear message. They are not run here: speed is never measured
by tests (docs/benchmarks.md)."""
import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = sorted(glob.glob(os.path.join(ROOT, "benchmarks", "bench_*.py")))


def _run(args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable] + args, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("script", SCRIPTS, ids=os.path.basename)
def test_every_benchmark_parses_its_arguments_from_elsewhere(script, tmp_path):
    r = _run([script, "--help"], tmp_path)
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower()


def test_trainer_race_names_a_missing_records_file(tmp_path):
    r = _run([os.path.join(ROOT, "benchmarks", "bench_dpo.py"), "--trl", "--records", "nope.jsonl"], tmp_path)
    assert r.returncode != 0
    assert "nope.jsonl" in r.stderr and "cst demo" in r.stderr


def test_trainer_race_names_an_unknown_side(tmp_path):
    rec = tmp_path / "r.jsonl"
    rec.write_text("")
    r = _run([os.path.join(ROOT, "benchmarks", "bench_dpo.py"), "--trl", "--records", str(rec), "--sides",
              "cst-f32,trl-fast"], tmp_path)
    assert r.returncode != 0 and "trl-fast" in r.stderr


def test_matmul_race_names_an_unknown_library(tmp_path):
    # "numpy" is not a side (OpenBLAS through NumPy is "openblas"); it once ran torch's fp32 under that name
    r = _run([os.path.join(ROOT, "benchmarks", "bench_matmul.py"), "--libs", "cst,numpy"], tmp_path)
    assert r.returncode != 0 and "'numpy'" in r.stderr and "openblas" in r.stderr


def test_machine_line_names_the_cpu_family():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import _machine
    finally:
        sys.path.pop(0)
    model, family, simd = _machine.cpu_info()
    if os.path.exists("/proc/cpuinfo"):
        assert family.isdigit() and model != "?"
    assert f"cpu family {family}" in _machine.cpu_line()


def test_trainer_race_refuses_a_non_positive_synth_records(tmp_path):
    r = _run([os.path.join(ROOT, "benchmarks", "bench_dpo.py"), "--trl", "--synth-records", "0"], tmp_path)
    assert r.returncode != 0 and "--synth-records" in r.stderr and "got 0" in r.stderr
