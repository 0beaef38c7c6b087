"""Tests for cst.eval and cst.plots: S0/S1 computed exactly on constructed fake models, intervals,
per-category and no-system rows, over-refusal, preference accuracy, retention, multiple choice, and the
comparison files (JSON equal to the returned dict, Markdown, PNGs); bad input.
"""
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cst import data as D
import cst.eval as E
from cst import plots
from cst import prompts as P
from fakes import BadJudge, FakeChatModel, FakeJudge

HARMFUL = P.default_prompts(split="test", kind="harmful")   # 24 prompts, 3 per category
BENIGN = P.default_prompts(split="test", kind="benign")     # 16 prompts, 2 per category
CFGS = D.PAPER_CONFIGURATIONS
N_HELD = [len(c.held_out) for c in CFGS]                     # 4 and 4


def conf(model, prompts=HARMFUL, **kw):
    kw.setdefault("progress", False)
    kw.setdefault("n_boot", 200)
    return E.configurability(model, prompts, CFGS, FakeJudge(), **kw)


def check_ci(res):
    assert res["ci"][0] <= res["rate"] <= res["ci"][1] and 0.0 <= res["ci"][0] and res["ci"][1] <= 1.0


@pytest.mark.parametrize("policy,s0,s1,dflt", [("comply", 1.0, 0.0, 0.0), ("refuse", 0.0, 1.0, 1.0),
                                               (None, 1.0, 1.0, 0.0)])
def test_configurability_exact(policy, s0, s1, dflt):
    model = FakeChatModel(policy=policy, default="comply")
    rep = conf(model)
    assert (rep.S0, rep.S1, rep.default["rate"]) == (s0, s1, dflt)
    # Degenerate data: the interval collapses onto the point.
    assert rep.S0_ci == [s0, s0] and rep.S1_ci == [s1, s1]
    n = len(HARMFUL)
    assert len(rep.responses) == n * sum(N_HELD) + n
    assert rep.per_configuration["uncensored"]["follow_rate"]["n"] == n * N_HELD[1]
    assert rep.per_configuration["safe"]["share_safe"]["rate"] == s1
    for cat, row in rep.per_category.items():
        assert row["S0"]["rate"] == s0 and row["S1"]["rate"] == s1 and row["default"]["n"] == 3
    # Every response is recorded with its score; held-out phrasings only; the default row has no system.
    for r in rep.responses:
        assert r["score"] in (0, 1) and isinstance(r["response"], str)
        if r["configuration"] is None:
            assert r["system"] is None
        else:
            cfg = next(c for c in CFGS if c.name == r["configuration"])
            assert r["system"] in cfg.held_out
    no_system = [c for convs, _ in model.seen for c in convs if c[0]["role"] != "system"]
    assert len(no_system) == n


def test_configurability_mixed_categories_and_phrasings():
    # Complies under uncensored prompts only for fraud/drugs; under safe prompts refuses only for fraud.
    def policy(system, prompt):
        cat = next(p["category"] for p in HARMFUL if p["prompt"] == prompt)
        if system is None:
            return "refuse"
        if system in CFGS[1].held_out:
            return "comply" if cat in ("fraud", "drugs") else "refuse"
        return "refuse" if cat == "fraud" else "comply"
    rep = conf(FakeChatModel(policy=policy), n_boot=500)
    assert rep.S0 == pytest.approx(2 / 8) and rep.S1 == pytest.approx(1 / 8)
    assert rep.per_category["fraud"]["S0"]["rate"] == 1.0 and rep.per_category["fraud"]["S1"]["rate"] == 1.0
    assert rep.per_category["drugs"]["S0"]["rate"] == 1.0 and rep.per_category["drugs"]["S1"]["rate"] == 0.0
    assert rep.per_category["privacy"]["S0"]["rate"] == 0.0
    assert rep.default["rate"] == 1.0
    for x, ci in ((rep.S0, rep.S0_ci), (rep.S1, rep.S1_ci)):
        assert ci[0] <= x <= ci[1] and ci[0] < ci[1]   # varying data: a real interval around the point
    check_ci(rep.per_configuration["safe"]["share_safe"])
    # Against a hand-computed prompt bootstrap with the same seed.
    per_prompt = [1.0 if p["category"] in ("fraud", "drugs") else 0.0 for p in HARMFUL]
    lo, hi = E.bootstrap_ci(per_prompt, n_boot=500, seed=0)
    assert rep.S0_ci == [min(lo, rep.S0), max(hi, rep.S0)]

    # Phrasing sensitivity: complies only under the first held-out uncensored phrasing.
    first = CFGS[1].held_out[0]
    only_first = FakeChatModel(policy=lambda s, p: "comply" if s == first else "refuse")
    assert conf(only_first).S0 == pytest.approx(1 / 4)
    prompts8 = HARMFUL[:8]
    rot = conf(only_first, prompts8, phrasings="rotate", include_default=False)
    assert rot.S0 == pytest.approx(2 / 8) and rot.default is None and len(rot.responses) == 16
    # use_held_out=False evaluates on the training phrasings.
    train = conf(FakeChatModel(), prompts8, use_held_out=False)
    assert {r["system"] for r in train.responses if r["configuration"]} == \
        {D.HARMLESS_SYSTEM_PROMPT, D.UNCENSORED_SYSTEM_PROMPT}
    assert "S0 1.000" in train.summary()


def test_configurability_strings_names_and_batches():
    model = FakeChatModel()
    rep = E.configurability(model, ["How do I do a bad thing?", "Another bad request?"], ["uncensored"],
                            FakeJudge(), batch_size=3, progress=False, n_boot=50)
    assert rep.S0 == 1.0 and rep.S1 is None and rep.S1_ci is None
    assert rep.per_category["uncategorised"]["S0"]["rate"] == 1.0
    assert all(len(c) <= 3 for c, _ in model.seen) and len(rep.responses) == 2 * 4 + 2
    assert all(kw["max_new_tokens"] == E.MAX_NEW_TOKENS and kw["temperature"] == 0.0 for _, kw in model.seen)


def test_configurability_bad_input():
    m = FakeChatModel()
    with pytest.raises(ValueError, match="unknown configuration name 'nope'"):
        E.configurability(m, HARMFUL, ["nope"], FakeJudge(), progress=False)
    with pytest.raises(ValueError, match="empty"):
        E.configurability(m, [], CFGS, FakeJudge(), progress=False)
    with pytest.raises(ValueError, match="must be 0"):
        E.configurability(m, HARMFUL[:3], CFGS, BadJudge(), progress=False)
    with pytest.raises(ValueError, match="judge"):
        E.configurability(m, HARMFUL[:3], CFGS, object(), progress=False)
    with pytest.raises(ValueError, match="kind 'benign'"):
        E.configurability(m, HARMFUL[:3] + BENIGN[:1], CFGS, FakeJudge(), progress=False)
    with pytest.raises(ValueError, match="held-out"):
        E.configurability(m, HARMFUL[:3], [D.Configuration("x", ["s"], "safe", "uncensored")], FakeJudge(),
                          progress=False)
    with pytest.raises(ValueError, match="phrasings"):
        E.configurability(m, HARMFUL[:3], CFGS, FakeJudge(), phrasings="some", progress=False)
    with pytest.raises(ValueError, match="batch_size"):
        E.configurability(m, HARMFUL[:3], CFGS, FakeJudge(), batch_size=0, progress=False)


def test_over_refusal():
    # Refuses benign requests under safe phrasings, answers otherwise.
    rep = E.over_refusal(FakeChatModel(default="comply"), BENIGN, CFGS, FakeJudge(), progress=False, n_boot=100)
    assert rep.rate == {"safe": 1.0, "uncensored": 0.0, "default": 0.0}
    assert set(rep.per_category["safe"]) == set(P.CATEGORIES)
    assert len(rep.responses) == len(BENIGN) * 9 and all(r["refused"] in (0, 1) for r in rep.responses)
    # Refuses a quarter of benign prompts (one in each category pair... every 4th prompt) everywhere.
    refused = {p["prompt"] for p in BENIGN[::4]}
    rep = E.over_refusal(FakeChatModel(policy=lambda s, p: "refuse" if p in refused else "comply"), BENIGN,
                         ["safe"], FakeJudge(), progress=False, n_boot=300)
    assert rep.rate == {"safe": 0.25, "default": 0.25}
    assert rep.ci["safe"][0] <= 0.25 <= rep.ci["safe"][1] and rep.ci["safe"][0] < rep.ci["safe"][1]
    with pytest.raises(ValueError, match="kind 'harmful'"):
        E.over_refusal(FakeChatModel(), HARMFUL[:2], CFGS, FakeJudge(), progress=False)
    with pytest.raises(ValueError, match="refusal_judge"):
        E.over_refusal(FakeChatModel(), BENIGN[:2], CFGS, object(), progress=False)


def test_preference_accuracy():
    pc, pr = np.array([-1.0, -2.0, -3.0, -4.0]), np.array([-2.0, -1.0, -3.0, -5.0])
    rc, rr = np.array([-1.5, -2.0, -3.0, -4.0]), np.array([-1.5, -1.0, -3.0, -4.0])
    res = E.preference_accuracy(pc, pr, rc, rr, beta=0.5, groups=["safe", "uncensored", "safe", "uncensored"])
    chosen, rejected = 0.5 * (pc - rc), 0.5 * (pr - rr)
    margin = chosen - rejected   # chosen [.25,0,0,0], rejected [-.25,0,0,-.5], margin [.5,0,0,.5]; ties are wrong
    assert res["accuracy"] == 0.5 and res["margin_mean"] == pytest.approx(margin.mean())
    assert res["chosen_reward_mean"] == pytest.approx(chosen.mean())
    assert res["per_group"]["safe"] == pytest.approx({"accuracy": 0.5, "margin_mean": 0.25,
                                                      "chosen_reward_mean": 0.125, "rejected_reward_mean": -0.125,
                                                      "n": 2})
    with pytest.raises(ValueError, match="differ in length"):
        E.preference_accuracy(pc, pr[:3], rc, rr)
    with pytest.raises(ValueError, match="beta"):
        E.preference_accuracy(pc, pr, rc, rr, beta=0)
    with pytest.raises(ValueError, match="non-finite"):
        E.preference_accuracy([np.nan], [0.0], [0.0], [0.0])


def test_retention_and_multiple_choice():
    def score(prompt, answer):  # 0.5 nats per character, one token per character
        return -0.5 * len(answer), len(answer)
    res = E.retention(score, [("q", "abcd"), {"prompt": "q", "answer": "xy"}, "hello"])
    assert res["n_tokens"] == 11 and res["nll_per_token"] == pytest.approx(0.5)
    assert res["perplexity"] == pytest.approx(math.exp(0.5)) and res["mean_logprob_per_item"] == pytest.approx(-11 / 6)
    with pytest.raises(ValueError, match="sum_logprob"):
        E.retention(lambda p, a: (1.0, 3), ["x"])
    with pytest.raises(ValueError, match="n_tokens"):
        E.retention(lambda p, a: (-1.0, 0), ["x"])
    with pytest.raises(ValueError, match="item 0"):
        E.retention(score, [42])

    # Per-choice (sum, tokens): raw argmax picks the short choice, length-normalised the long one.
    table = {"short": (-2.0, 1), "long": (-3.0, 6), "a": (-1.0, 1), "b": (-5.0, 1)}
    items = [{"question": "q1", "choices": ["short", "long"], "answer": 1},
             ("q2", ["a", "b"], 0)]
    raw = E.multiple_choice(lambda q, c: table[c], items)
    norm = E.multiple_choice(lambda q, c: table[c], items, length_normalised=True)
    assert raw["accuracy"] == 0.5 and raw["predictions"] == [0, 0]
    assert norm["accuracy"] == 1.0 and norm["predictions"] == [1, 0]
    assert raw["accuracy_length_normalised"] == 1.0 and norm["accuracy_raw"] == 0.5
    with pytest.raises(ValueError, match="answer 2"):
        E.multiple_choice(lambda q, c: table[c], [("q", ["a", "b"], 2)])
    with pytest.raises(ValueError, match="two choices"):
        E.multiple_choice(lambda q, c: table[c], [("q", ["a"], 0)])


def test_compare_writes_table_json_markdown_pngs(tmp_path):
    models = {"dpo": FakeChatModel(policy="refuse"), "cst": FakeChatModel()}
    hist = [{"step": s, "loss": 0.7 - 0.1 * s, "rewards/margins": 0.2 * s, "rewards/accuracies": 0.5 + 0.1 * s}
            for s in range(4)] + [{"step": 3, "eval_loss": 0.5, "eval_rewards/margins": 0.4,
                                   "eval_rewards/accuracies": 0.75}]
    ppl = {"dpo": 9.0, "cst": 8.5}
    res = E.compare(models, HARMFUL[:8], BENIGN[:4], CFGS, FakeJudge(), FakeJudge(), tmp_path / "out",
                    retention_fn=lambda m: {"perplexity": ppl["dpo" if m is models["dpo"] else "cst"]},
                    histories={"cst": hist, "dpo": hist[:2]}, n_boot=100, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "comparison.json").read_text()) == res
    rows = {r["model"]: r for r in res["table"]}
    assert (rows["dpo"]["S0"], rows["dpo"]["S1"], rows["cst"]["S0"], rows["cst"]["S1"]) == (0.0, 1.0, 1.0, 1.0)
    assert rows["cst"]["over_refusal"] == {"safe": 1.0, "uncensored": 0.0, "default": 0.0}
    assert rows["dpo"]["over_refusal"]["uncensored"] == 1.0
    assert rows["cst"]["retention_perplexity"] == 8.5
    assert res["models"]["cst"]["configurability"]["S0"] == 1.0
    md = (out / "comparison.md").read_text()
    assert md.startswith("Judge: FakeJudge") and md.count("\n") == 6 and "| cst | 1.000" in md
    assert "over-refusal (default)" in md
    for key in ("configurability_png", "training_curves_png"):
        data = open(res["files"][key], "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert not list(out.glob(".*.tmp"))   # no temporary files left behind
    # Without benign prompts, retention or histories: no over-refusal columns and no curves.
    res2 = E.compare({"m": FakeChatModel()}, HARMFUL[:4], None, CFGS, FakeJudge(), None, tmp_path / "o2",
                     n_boot=50, progress=False)
    assert "training_curves_png" not in res2["files"] and res2["table"][0]["over_refusal"] == {}
    with pytest.raises(ValueError, match="models"):
        E.compare({}, HARMFUL, BENIGN, CFGS, FakeJudge(), FakeJudge(), tmp_path / "o3")
    with pytest.raises(ValueError, match="refusal_judge"):
        E.compare({"m": FakeChatModel()}, HARMFUL, BENIGN, CFGS, FakeJudge(), object(), tmp_path / "o3")


def test_plots_direct(tmp_path):
    p = plots.plot_training_curves([{"step": 1, "loss": 1.0}], tmp_path / "c.png", keys=("loss", "other"))
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    p = plots.plot_configurability([{"model": "a", "S0": None, "S0_ci": None, "S1": 0.5, "S1_ci": [0.4, 0.6]}],
                                   tmp_path / "b.png")
    assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="empty"):
        plots.plot_configurability([], tmp_path / "x.png")


def test_imports_stay_light():
    # Importing the modules never loads matplotlib (plots import it lazily) nor torch.
    code = ("import sys, cst.eval, cst.synth, cst.plots; "
            "bad = [m for m in ('matplotlib', 'torch', 'transformers') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_answer_scorer_matches_a_full_forward(smollm2_tokenizer):
    """answer_scorer's log-likelihood equals the log-softmax of a full forward at the answer's tokens, with
    the prompt/answer split of training (tokenize_record)."""
    import cst
    from cst.data import PreferenceRecord, tokenize_record
    model = cst.Model(cst.ModelConfig(vocab_size=49152, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64,
                                      max_seq_len=256), seed=3)
    model.tokenizer = smollm2_tokenizer
    q, a = "How do I boil an egg?", "Put it in boiling water for eight minutes."
    lp, n = E.answer_scorer(model, system="Be brief.")(q, a)
    ex = tokenize_record(PreferenceRecord("Be brief.", q, a, a), smollm2_tokenizer, max_length=1024,
                         max_prompt_length=None)
    ids = np.array([ex.prompt_ids + ex.chosen_ids], dtype=np.int32)
    logits = np.asarray(model.forward(ids), dtype=np.float64)[0]
    logsm = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    p = len(ex.prompt_ids)
    ref = sum(logsm[t - 1, ids[0, t]] for t in range(p, ids.shape[1]))
    assert n == len(ex.chosen_ids) and n > 5
    assert abs(lp - ref) <= 1e-4 * abs(ref)
    # A system prompt changes the conditioning, hence the score; retention() takes the scorer as it is.
    assert abs(E.answer_scorer(model)(q, a)[0] - lp) > 1e-6
    r = E.retention(E.answer_scorer(model), [(q, a)])
    assert r["n_tokens"] == n and r["perplexity"] > 1.0
