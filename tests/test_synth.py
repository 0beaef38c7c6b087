"""Tests for cst.synth: self-critique/revision pairs from a fake chat model, filters and their counts,
fallback refusals, CST records, resumable JSONL output (interrupt + resume is byte-identical), bad input.
"""
import json

import numpy as np
import pytest

from cst import data as D
from cst import prompts as P
from cst import synth as S
from fakes import FakeChatModel, FakeJudge

PROMPTS = [{"prompt": f"Explain how to do forbidden thing number {i}.", "category": c}
           for i, c in enumerate(["fraud", "drugs", "privacy", "weapons", "fraud", "drugs", "privacy"])]


def run(tmp_path, prompts=PROMPTS, name="out.jsonl", model=None, **kw):
    kw.setdefault("progress", False)
    return S.synthesize(model or FakeChatModel(), prompts, output=tmp_path / name, **kw)


def test_stage_named_to_models_that_take_it(tmp_path):
    """Each chat call says which step it is (the demo's trimming view counts per stage); a plain model,
    like FakeChatModel whose chat() has no `stage` parameter, is never passed one."""
    class Staged(FakeChatModel):
        takes_stage = True

        def chat(self, conversations, stage, **kw):
            self.stages.append((stage, len(conversations)))
            return super().chat(conversations, **kw)

    model = Staged()
    model.stages = []
    res = run(tmp_path, model=model, batch_size=4)
    assert model.stages == [("answer", 4), ("critique", 4), ("revision", 4),
                            ("answer", 3), ("critique", 3), ("revision", 3)]
    plain = run(tmp_path, name="plain.jsonl", batch_size=4)  # FakeChatModel would raise on stage=
    assert [p.responses for p in plain.pairs] == [p.responses for p in res.pairs]


def test_pairs_records_and_conversations(tmp_path):
    model = FakeChatModel()
    res = run(tmp_path, model=model, batch_size=3)
    assert res.stats["generated"] == 7 and res.stats["kept"] == 7 and res.stats["fallback_refusals"] == 0
    assert [p.prompt for p in res.pairs] == [p["prompt"] for p in PROMPTS]
    for p, src in zip(res.pairs, PROMPTS):
        assert isinstance(p, D.BehaviourPair) and p.category == src["category"]
        assert p.responses["uncensored"].startswith("Sure.")
        assert p.responses["safe"].startswith("I won't help")
    # 3 batches x (answer, critique, revision) calls, batch_size conversations at most per call.
    assert model.calls == 9 and max(len(c) for c, _ in model.seen) == 3
    answer_conv, crit_conv, rev_conv = model.seen[0][0][0], model.seen[1][0][0], model.seen[2][0][0]
    assert answer_conv[0] == {"role": "system", "content": S.DEFAULT_PERMISSIVE_SYSTEM}
    # The critique request shows the prompt and the response as earlier turns.
    assert [m["role"] for m in crit_conv] == ["user", "assistant", "user"]
    assert crit_conv[0]["content"] == PROMPTS[0]["prompt"] and crit_conv[1]["content"].startswith("Sure.")
    assert [m["role"] for m in rev_conv] == ["user", "assistant", "user", "assistant", "user"]
    assert rev_conv[3]["content"].startswith("The response is harmful")
    assert rev_conv[3]["content"] in rev_conv[4]["content"]  # {critique} was filled in
    records = res.records()
    # 7 pairs x (2 configurations x 1 phrasing + the safe default with no system prompt)
    assert len(records) == 21 and len(res.records(safe_default=False)) == 14
    for r in records:
        want = "safe" if r.system in (D.HARMLESS_SYSTEM_PROMPT, "") else "uncensored"
        other = {"safe": "uncensored", "uncensored": "safe"}[want]
        pair = next(p for p in res.pairs if p.prompt == r.prompt)
        assert (r.chosen, r.rejected) == (pair.responses[want], pair.responses[other])
    assert S.synthesize_records(FakeChatModel(), PROMPTS, output=tmp_path / "r.jsonl", progress=False) == records
    # load_pairs reads the same pairs back; the stats file holds the same counts.
    assert [(p.prompt, p.responses) for p in S.load_pairs(tmp_path / "out.jsonl")] == \
        [(p.prompt, p.responses) for p in res.pairs]
    stats = json.loads((tmp_path / "out.jsonl.stats.json").read_text())
    assert stats == {k: v for k, v in res.stats.items() if k != "resumed"}


FILTER_PROMPTS = ["Tell me [empty-answer] please.", "Tell me [trunc-answer] please.", "Tell me [empty-rev] please.",
                  "Tell me [trunc-rev] please.", "Tell me [same] please.", "Tell me [bad-rev] please.",
                  "Tell me [refuse-answer] please.", "Tell me a normal thing please.", "Another normal one."]


class StrictJudge(FakeJudge):
    """Fails on responses that the cheap filters should have dropped before judging."""

    def score_batch(self, prompts, responses):
        for r in responses:
            assert r.strip() and not S.is_truncated(r), r
        return super().score_batch(prompts, responses)


def test_filters_count_each_reason_without_fallback(tmp_path):
    res = run(tmp_path, FILTER_PROMPTS, judge=StrictJudge(), refusal_fallback=False, batch_size=4)
    d = res.stats["dropped"]
    assert d == {"empty_uncensored": 1, "truncated_uncensored": 1, "empty_safe": 1, "truncated_safe": 1,
                 "identical": 1, "judge_safe": 1, "judge_uncensored": 1}
    assert res.stats["kept"] == 2 and res.stats["generated"] == 9 and res.stats["fallback_refusals"] == 0
    assert [p.prompt for p in res.pairs] == FILTER_PROMPTS[-2:]


def test_filters_without_judge(tmp_path):
    # No judge: the judged reasons cannot fire; a harmful revision and a refusing answer are kept.
    res = run(tmp_path, FILTER_PROMPTS, refusal_fallback=False)
    assert res.stats["dropped"]["judge_safe"] == res.stats["dropped"]["judge_uncensored"] == 0
    assert res.stats["kept"] == 4


def test_fallback_refusals_counted(tmp_path):
    res = run(tmp_path, FILTER_PROMPTS, judge=FakeJudge(), refusal_fallback=True)
    st = res.stats
    # The unusable revisions (empty, truncated, identical, judged harmful) fall back to a refusal template.
    assert st["fallback_refusals"] == 4
    assert st["fallback_reasons"] == {"empty_safe": 1, "truncated_safe": 1, "identical": 1, "judge_safe": 1}
    assert st["dropped"]["empty_uncensored"] == st["dropped"]["truncated_uncensored"] == 1
    assert st["dropped"]["judge_uncensored"] == 1 and st["kept"] == 6
    fb = [p for p in res.pairs if "fallback" in p.metadata]
    assert len(fb) == 4
    for p in fb:
        assert p.responses["safe"] == P.pick_refusal(p.prompt) and p.responses["safe"] in P.refusal_templates


class ProbJudge(FakeJudge):
    """A four-way judge with probabilities: FakeJudge's verdicts, refusal or compliance, with a compliance
    probability of 0.6 for answers to odd-numbered prompts and 0.95 for the others."""
    KINDS = ("refusal", "deflection", "compliance", "degenerate")

    def predict_proba(self, prompts, responses):
        out = np.zeros((len(responses), 4))
        for k, (p, r) in enumerate(zip(prompts, responses)):
            if self.score(p, r):
                out[k] = (0.7, 0.2, 0.1, 0.0)
            else:
                c = 0.6 if int(p.rstrip(".").split()[-1]) % 2 else 0.95
                out[k] = ((1 - c) / 2, 0.0, c, (1 - c) / 2)
        return out

    def classify_batch(self, prompts, responses):
        return [self.KINDS[i] for i in self.predict_proba(prompts, responses).argmax(axis=1)]


def test_min_compliance_drops_doubtful_uncensored_answers(tmp_path):
    """min_compliance drops an uncensored answer the judge calls a compliance with less probability than
    the bar (counted as judge_uncensored); the safe side (refusal probability 0.7 here) has no such bar."""
    plain = run(tmp_path, name="plain.jsonl", judge=ProbJudge())
    assert plain.stats["kept"] == len(PROMPTS) and plain.stats["dropped"]["judge_uncensored"] == 0
    for bar, kept in ((0.5, len(PROMPTS)), (0.9, 4), (0.96, 0)):
        res = run(tmp_path, name=f"bar{bar}.jsonl", judge=ProbJudge(), min_compliance=bar)
        assert res.stats["kept"] == kept and res.stats["dropped"]["judge_uncensored"] == len(PROMPTS) - kept
        if bar == 0.9:  # the 0.6 answers (odd prompts) go, the 0.95 ones stay
            assert [int(p.prompt.rstrip(".").split()[-1]) for p in res.pairs] == [0, 2, 4, 6]
        assert res.stats["fallback_refusals"] == plain.stats["fallback_refusals"]
    # The bar is a setting of the log: another bar does not resume it.
    with pytest.raises(ValueError, match="different settings.*min_compliance"):
        run(tmp_path, name="bar0.9.jsonl", judge=ProbJudge(), min_compliance=0.8)
    for bad in (0, 1.5, -0.1, True, "0.9"):
        with pytest.raises(ValueError, match="min_compliance must be a number"):
            run(tmp_path, name="bad.jsonl", judge=ProbJudge(), min_compliance=bad)
    for judge in (None, FakeJudge()):
        with pytest.raises(ValueError, match="min_compliance needs a four-way judge"):
            run(tmp_path, name="bad.jsonl", judge=judge, min_compliance=0.9)


def test_truncation_flag_from_model(tmp_path):
    # The model's own flag wins over the punctuation heuristic: a complete-looking answer flagged truncated.
    res = run(tmp_path, ["Tell me [flag-trunc] now.", "Something else."],
              model=FakeChatModel(set_truncated=True), refusal_fallback=False)
    assert res.stats["dropped"]["truncated_uncensored"] == 1 and res.stats["kept"] == 1


def test_heuristics():
    assert S.is_truncated("and then you take the")
    assert not S.is_truncated("Done.") and not S.is_truncated('He said "stop."') and not S.is_truncated("")
    assert not S.is_truncated("no final stop", n_tokens=10, max_new_tokens=256)  # short: ended at EOS
    assert S.is_truncated("no final stop", n_tokens=254, max_new_tokens=256)
    assert S.near_identical("Hello, World!", "hello world")
    assert not S.near_identical("I cannot help.", "Sure, here is how.")
    words = " ".join(f"w{i}" for i in range(20))
    assert S.near_identical(words, words + " extra")          # Jaccard 20/21 >= 0.9
    assert not S.near_identical(words, words + " a b c")      # 20/23 < 0.9


def _uninterrupted(tmp_path, **kw):
    res = run(tmp_path, name="full.jsonl", **kw)
    return (tmp_path / "full.jsonl").read_bytes(), res


@pytest.mark.parametrize("kw", [dict(batch_size=3), dict(batch_size=2, n_per_prompt=2, temperature=0.7)])
def test_interrupt_and_resume_is_byte_identical(tmp_path, kw):
    full, full_res = _uninterrupted(tmp_path, judge=FakeJudge(), **kw)
    total_calls = 3 * -(-len(PROMPTS) * kw.get("n_per_prompt", 1) // kw["batch_size"])
    for fail_after in range(total_calls):
        name = f"part{fail_after}.jsonl"
        with pytest.raises(KeyboardInterrupt):
            run(tmp_path, name=name, model=FakeChatModel(fail_after=fail_after), judge=FakeJudge(), **kw)
        model = FakeChatModel()
        res = run(tmp_path, name=name, model=model, judge=FakeJudge(), **kw)
        assert (tmp_path / name).read_bytes() == full, fail_after
        done_batches = fail_after // 3
        assert model.calls == total_calls - 3 * done_batches  # finished batches are not regenerated
        assert res.stats["resumed"] == done_batches * kw["batch_size"]
        assert [p.responses for p in res.pairs] == [p.responses for p in full_res.pairs]
        assert (tmp_path / (name + ".stats.json")).read_bytes() == (tmp_path / "full.jsonl.stats.json").read_bytes()
    # Running again on a finished log generates nothing.
    model = FakeChatModel()
    run(tmp_path, name="full.jsonl", model=model, judge=FakeJudge(), **kw)
    assert model.calls == 0 and (tmp_path / "full.jsonl").read_bytes() == full


@pytest.mark.parametrize("damage", ["cut_mid_line", "cut_mid_batch", "garbage_last_line"])
def test_partial_last_line_recovered(tmp_path, damage):
    full, _ = _uninterrupted(tmp_path, batch_size=3)
    path = tmp_path / "damaged.jsonl"
    lines = full.split(b"\n")[:-1]
    if damage == "cut_mid_line":
        data = full[:-25]                                           # last line half written
    elif damage == "cut_mid_batch":
        data = b"\n".join(lines[:-2]) + b"\n" + lines[-2][:40]     # a batch partly written
    else:
        data = b"\n".join(lines[:-1]) + b"\n" + b"\x00" * 30 + b"\n"  # zero-filled block
    path.write_bytes(data)
    model = FakeChatModel()
    run(tmp_path, name="damaged.jsonl", model=model, batch_size=3)
    assert path.read_bytes() == full
    # Batches are [0..2], [3..5], [6]; the batches holding a lost sample are regenerated, no others.
    assert model.calls == (6 if damage == "cut_mid_batch" else 3)


def test_resume_refuses_other_settings_or_prompts(tmp_path):
    run(tmp_path, name="a.jsonl", batch_size=3)
    with pytest.raises(ValueError, match="different settings.*max_new_tokens"):
        run(tmp_path, name="a.jsonl", batch_size=3, max_new_tokens=99)
    changed = [dict(p) for p in PROMPTS]
    changed[1]["prompt"] = "Something different."
    with pytest.raises(ValueError, match="prompt list changed"):
        run(tmp_path, changed, name="a.jsonl", batch_size=3)
    # A greedy log resumes under another seed (greedy output does not depend on it); a sampled one does not.
    model = FakeChatModel()
    assert run(tmp_path, name="a.jsonl", batch_size=3, seed=7, model=model).stats["resumed"] == len(PROMPTS)
    assert model.calls == 0
    run(tmp_path, name="t.jsonl", batch_size=3, temperature=0.7)
    with pytest.raises(ValueError, match="different settings.*seed"):
        run(tmp_path, name="t.jsonl", batch_size=3, temperature=0.7, seed=7)
    # resume=False starts afresh and overwrites.
    res = run(tmp_path, changed, name="a.jsonl", batch_size=3, resume=False)
    assert res.stats["resumed"] == 0 and res.pairs[1].prompt == "Something different."
    (tmp_path / "b.jsonl").write_text('{"system": "", "prompt": "x"}\n')
    with pytest.raises(ValueError, match="not a synthesize log"):
        run(tmp_path, name="b.jsonl")


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="prompts is empty"):
        run(tmp_path, [])
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        run(tmp_path, ["ok", "  "])
    with pytest.raises(TypeError, match=r"prompts\[0\]"):
        run(tmp_path, [3])
    with pytest.raises(ValueError, match="temperature"):
        run(tmp_path, n_per_prompt=2)
    with pytest.raises(ValueError, match="batch_size"):
        run(tmp_path, batch_size=0)
    with pytest.raises(ValueError, match=r"\.jsonl"):
        run(tmp_path, name="out.json")
    with pytest.raises(ValueError, match="behaviours"):
        run(tmp_path, configurations=[D.Configuration("x", ["s"], "caution", "uncensored")])

    class Short(FakeChatModel):
        def chat(self, conversations, **kw):
            return super().chat(conversations, **kw)[:-1]
    with pytest.raises(ValueError, match="one per conversation"):
        run(tmp_path, name="c.jsonl", model=Short())

    class NonBinary(FakeJudge):
        def score_batch(self, prompts, responses):
            return super().score_batch(prompts, responses) * 2
    with pytest.raises(ValueError, match="must be 0"):
        run(tmp_path, name="d.jsonl", judge=NonBinary())
