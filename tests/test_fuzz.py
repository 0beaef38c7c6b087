"""The structured fuzz harness (tests/fuzz/fuzz_inputs.py) at suite size: 100 fixed-seed cases each of
GGUF files, Hugging Face directories and datasets, each in a spawned worker. Every case must load or
raise one of cst's own errors: no crash, no hang, no exception cst did not mean to raise. Thousands of
cases: `python tests/fuzz/fuzz_inputs.py --cases 2000`."""
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "fuzz"))
import fuzz_inputs  # noqa: E402

N = 100


@pytest.mark.slow
def test_fuzz_harness_finds_no_crash_hang_or_stray_exception():
    rep = fuzz_inputs.fuzz(n=N, seed=0, workers=2, timeout=60.0)
    assert not rep["failures"], rep["failures"][:5]
    for kind, r in rep["kinds"].items():
        assert r["cases"] == N and r["crash"] == r["hang"] == r["other"] == 0, (kind, r)
        # The mutations bite: most cases are refused, and by the error meant for them.
        assert r["clean"] >= N // 2, (kind, r)
    assert rep["kinds"]["gguf"]["clean_by_type"].get("FormatError", 0) >= 30
    assert rep["kinds"]["gguf"]["clean_by_type"].get("ChatTemplateError", 0) >= 5
    assert rep["kinds"]["hf"]["clean_by_type"].get("FormatError", 0) >= 30
    assert rep["kinds"]["dataset"]["clean_by_type"].get("DataError", 0) >= 50


@pytest.mark.slow
def test_harness_detects_a_crash_a_hang_and_a_stray_exception():
    """The harness itself can fail: a worker that dies, one that never answers, and an AttributeError
    are each reported, not counted as clean."""
    cases = [("crash", "dataset", {"data.jsonl": b"CRASH"}), ("hang", "dataset", {"data.jsonl": b"HANG"}),
             ("stray", "dataset", {"data.jsonl": b"STRAY"}), ("fine", "dataset", {"data.jsonl": b"[]"})]
    results = {}
    pool = fuzz_inputs.Pool(1, timeout=3.0)
    try:
        pool.run([(t, "selftest", f) for t, _, f in cases], lambda case, res: results.__setitem__(case[0], res[0]))
    finally:
        pool.close()
    assert results == {"crash": "crash", "hang": "hang", "stray": "other", "fine": "ok"}
