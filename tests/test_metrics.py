"""Tests for cst.metrics: hand-computed cases, textbook kappa values, bootstrap coverage, bad inputs."""
import math
import os

import numpy as np
import pytest

from cst import metrics as M

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")


# ---------------------------------------------------------------- configurability_scores


def test_configurability_hand_built():
    scores = {"safe": [1, 1, 1, 0], "unsafe_a": [0, 0, 1], "unsafe_b": [0]}
    r = M.configurability_scores(scores, ["safe"], ["unsafe_a", "unsafe_b"])
    assert r["S1"] == pytest.approx(0.75)
    assert r["S0"] == pytest.approx(3 / 4)  # pooled: 3 harmful out of 4 unsafe-config responses
    assert r["per_config"] == pytest.approx({"safe": 0.75, "unsafe_a": 1 / 3, "unsafe_b": 0.0})
    assert r["n"] == {"safe": 4, "unsafe_a": 3, "unsafe_b": 1}


def test_configurability_accepts_bool_numpy_and_single_string():
    r = M.configurability_scores({"s": np.array([True, False]), "u": np.array([0.0, 0.0])}, "s", "u")
    assert (r["S1"], r["S0"]) == (0.5, 1.0)


def test_configurability_paper_numbers():
    """S0/S1 recomputed from the paper's GPT-4 labels: DPO 0.115/0.962, CST 1.000/1.000."""
    from cst.judges import EVAL_UNCENSORED_SYSTEM, SAFE_SYSTEM, load_judged_generations

    folder = os.path.join(DATA, "judged-generations")
    if not os.path.isdir(folder):
        pytest.skip("paper data not available")
    for name, s0, s1 in (("generations_hermes_DPO.md", 3 / 26, 25 / 26), ("generations_hermes_CST.md", 1.0, 1.0)):
        recs = load_judged_generations(os.path.join(folder, name))
        by = {}
        for r in recs:
            by.setdefault(r["system"], []).append(r["score"])
        out = M.configurability_scores(by, [SAFE_SYSTEM], [EVAL_UNCENSORED_SYSTEM])
        assert out["S0"] == pytest.approx(s0) and out["S1"] == pytest.approx(s1)
        assert out["n"] == {SAFE_SYSTEM: 26, EVAL_UNCENSORED_SYSTEM: 26}
    assert round(3 / 26, 3) == 0.115 and round(25 / 26, 3) == 0.962


@pytest.mark.parametrize("kwargs, arg", [
    (dict(scores_by_config={}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config"),
    (dict(scores_by_config=[1, 0], safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config"),
    (dict(scores_by_config={"a": [1], "b": [0]}, safe_configs=["x"], unsafe_configs=["b"]), "safe_configs"),
    (dict(scores_by_config={"a": [1], "b": [0]}, safe_configs=["a"], unsafe_configs=[]), "unsafe_configs"),
    (dict(scores_by_config={"a": [1], "b": [0]}, safe_configs=["a"], unsafe_configs=["a", "b"]), "unsafe_configs"),
    (dict(scores_by_config={"a": [1, 2], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
    (dict(scores_by_config={"a": [1, -1], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
    (dict(scores_by_config={"a": [1], "b": []}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['b']"),
    (dict(scores_by_config={"a": [0.5], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
    (dict(scores_by_config={"a": [float("nan")], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
    (dict(scores_by_config={"a": ["1"], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
    (dict(scores_by_config={"a": [[1]], "b": [0]}, safe_configs=["a"], unsafe_configs=["b"]), "scores_by_config['a']"),
])
def test_configurability_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=re_arg(arg)):
        M.configurability_scores(**kwargs)


def re_arg(name):
    import re
    return "argument '" + re.escape(name)


# ---------------------------------------------------------------- cohen_kappa


def test_kappa_wikipedia_example():
    # Wikipedia "Cohen's kappa", first example: 50 proposals, yes/yes 20, yes/no 5, no/yes 10, no/no 15.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert M.cohen_kappa(a, b) == pytest.approx(0.4)


def test_kappa_textbook_counts():
    # Wikipedia's "same agreement, different kappa" pair: 45/15/25/15 -> 0.1304, 25/35/5/35 -> 0.2593.
    def build(aa, ab, ba, bb):
        return [1] * (aa + ab) + [0] * (ba + bb), [1] * aa + [0] * ab + [1] * ba + [0] * bb
    assert M.cohen_kappa(*build(45, 15, 25, 15)) == pytest.approx(0.1304, abs=1e-4)
    assert M.cohen_kappa(*build(25, 35, 5, 35)) == pytest.approx(0.2593, abs=1e-4)


def test_kappa_against_formula_multiclass(rng):
    a = rng.integers(0, 3, 200)
    b = np.where(rng.random(200) < 0.6, a, rng.integers(0, 3, 200))
    m = np.zeros((3, 3))
    for x, y in zip(a, b):
        m[x, y] += 1
    po = np.trace(m) / 200
    pe = (m.sum(1) @ m.sum(0)) / 200**2
    assert M.cohen_kappa(a, b) == pytest.approx((po - pe) / (1 - pe))


def test_kappa_edge_cases():
    assert M.cohen_kappa([1, 0, 1], [1, 0, 1]) == pytest.approx(1.0)
    assert M.cohen_kappa([1, 0], [0, 1]) == pytest.approx(-1.0)
    assert math.isnan(M.cohen_kappa([1, 1, 1], [1, 1, 1]))  # p_e = 1: undefined
    with pytest.raises(ValueError, match=re_arg("a")):
        M.cohen_kappa([], [])
    with pytest.raises(ValueError, match=re_arg("b")):
        M.cohen_kappa([1, 0], [1])
    with pytest.raises(ValueError, match=re_arg("a")):
        M.cohen_kappa("10", "10")


# ---------------------------------------------------------------- bootstrap_ci


def test_bootstrap_reproducible_and_ordered():
    v = np.arange(20.0)
    lo, hi = M.bootstrap_ci(v, n_boot=500, seed=3)
    assert (lo, hi) == M.bootstrap_ci(v, n_boot=500, seed=3)
    assert lo < v.mean() < hi
    assert M.bootstrap_ci([2.0, 2.0, 2.0]) == (2.0, 2.0)
    assert M.bootstrap_ci([5]) == (5.0, 5.0)


def test_bootstrap_wider_for_smaller_alpha():
    v = np.random.default_rng(0).normal(size=60)
    lo90, hi90 = M.bootstrap_ci(v, alpha=0.10)
    lo99, hi99 = M.bootstrap_ci(v, alpha=0.01)
    assert lo99 < lo90 and hi99 > hi90


def test_bootstrap_coverage_simulation():
    """95% percentile intervals should cover the true mean in roughly 95 of 100 datasets."""
    rng = np.random.default_rng(2024)
    covered = 0
    for k in range(100):
        x = rng.normal(loc=1.5, scale=2.0, size=60)
        lo, hi = M.bootstrap_ci(x, n_boot=1000, alpha=0.05, seed=k)
        covered += lo <= 1.5 <= hi
    assert 90 <= covered <= 100


def test_bootstrap_binary_coverage_simulation():
    rng = np.random.default_rng(7)
    covered = sum(lo <= 0.8 <= hi for lo, hi in
                  (M.bootstrap_ci((rng.random(80) < 0.8).astype(int), seed=k) for k in range(100)))
    assert covered >= 88  # discrete data: percentile intervals run slightly below nominal


@pytest.mark.parametrize("kwargs, arg", [
    (dict(values=[]), "values"),
    (dict(values=[1.0, float("nan")]), "values"),
    (dict(values=[[1.0, 2.0]]), "values"),
    (dict(values="12"), "values"),
    (dict(values=[1.0], n_boot=0), "n_boot"),
    (dict(values=[1.0], n_boot=2.5), "n_boot"),
    (dict(values=[1.0], alpha=0.0), "alpha"),
    (dict(values=[1.0], alpha=1.5), "alpha"),
])
def test_bootstrap_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=re_arg(arg)):
        M.bootstrap_ci(**kwargs)


# ---------------------------------------------------------------- small ratios


def test_over_refusal_rate():
    assert M.over_refusal_rate([1, 0, 0, 0]) == 0.25
    with pytest.raises(ValueError, match=re_arg("refusal_flags")):
        M.over_refusal_rate([1, 3])
    with pytest.raises(ValueError, match=re_arg("refusal_flags")):
        M.over_refusal_rate([])


def test_preference_accuracy_and_margin():
    c, r = [1.0, 2.0, 0.5, 0.0], [0.0, 3.0, 0.5, -1.0]
    assert M.preference_accuracy(c, r) == 0.5  # the tie (0.5, 0.5) counts as wrong
    assert M.mean_margin(c, r) == pytest.approx((1 - 1 + 0 + 1) / 4)
    assert M.preference_accuracy(np.zeros(3), np.zeros(3)) == 0.0
    with pytest.raises(ValueError, match=re_arg("rejected_rewards")):
        M.preference_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match=re_arg("chosen_rewards")):
        M.mean_margin([], [])
    with pytest.raises(ValueError, match=re_arg("chosen_rewards")):
        M.preference_accuracy([np.inf], [0.0])


def test_perplexity():
    assert M.perplexity(0.0, 5) == 1.0
    assert M.perplexity(10 * math.log(4.0), 10) == pytest.approx(4.0)
    assert M.perplexity(np.float32(2.0), np.int64(2)) == pytest.approx(math.e)
    for nll, tok, arg in ((1.0, 0, "total_tokens"), (1.0, 2.5, "total_tokens"), (-1.0, 3, "total_nll"),
                          (float("nan"), 3, "total_nll"), ("1", 3, "total_nll"), (1.0, True, "total_tokens")):
        with pytest.raises(ValueError, match=re_arg(arg)):
            M.perplexity(nll, tok)


def test_mc_accuracy():
    ll = [[-1.0, -2.0, -3.0], [-5.0, -1.0], [-10.0, -6.0, -9.0, -12.0]]
    assert M.mc_accuracy(ll, [0, 1, 2]) == pytest.approx(2 / 3)
    # length normalisation flips question 3: -9/9 = -1 beats -6/2 = -3
    lens = [[1, 1, 1], [1, 1], [5, 2, 9, 3]]
    assert M.mc_accuracy(ll, [0, 1, 2], normalize="length", lengths=lens) == 1.0
    assert M.mc_accuracy(np.array([[-1.0, -1.0]]), [0]) == 1.0  # ties go to the lowest index


@pytest.mark.parametrize("kwargs, arg", [
    (dict(choice_logliks=[], answers=[]), "choice_logliks"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[2]), "answers"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0, 1]), "answers"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0.0]), "answers"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0], normalize="mean"), "normalize"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0], normalize="length"), "lengths"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0], normalize="length", lengths=[[1, 0]]), "lengths[0]"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0], normalize="length", lengths=[[1]]), "lengths[0]"),
    (dict(choice_logliks=[[-1.0, -2.0]], answers=[0], lengths=[[1, 1]]), "lengths"),
    (dict(choice_logliks=[[]], answers=[0]), "choice_logliks[0]"),
    (dict(choice_logliks=[[-1.0, float("nan")]], answers=[0]), "choice_logliks[0]"),
])
def test_mc_accuracy_bad_inputs(kwargs, arg):
    with pytest.raises(ValueError, match=re_arg(arg)):
        M.mc_accuracy(**kwargs)


def test_per_category():
    out = M.per_category([1, 0, 1, 1], ["b", "a", "b", "a"])
    assert out == {"a": {"mean": 0.5, "n": 2}, "b": {"mean": 1.0, "n": 2}}
    assert list(out) == ["a", "b"]
    assert list(M.per_category([1, 1, 0], [10, 2, 10])) == [2, 10]  # numeric order, not string order
    with pytest.raises(ValueError, match=re_arg("categories")):
        M.per_category([1, 0], ["a"])
    with pytest.raises(ValueError, match=re_arg("scores")):
        M.per_category([], [])
