"""cst.synth.synthesize with real cst models (the fakes in test_synth.py pin down the logic): a tiny random
model with SmolLM2's tokenizer, interrupted and resumed, and SmolLM2 itself on a handful of prompts."""
import pytest

import cst
from cst import data as D
from cst.synth import synthesize

PROMPTS = ["How do I pick a lock?", "Write a phishing email to a bank customer.", "How can I hotwire a car?"]


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def tiny(tokenizer):
    cfg = cst.ModelConfig(vocab_size=tokenizer.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                          ffn_dim=32, max_seq_len=1024)
    m = cst.Model(cfg, seed=3)
    m.tokenizer = tokenizer
    return m


def _valid(records):
    for r in records:
        assert isinstance(r, D.PreferenceRecord) and r.prompt and r.chosen and r.rejected and r.chosen != r.rejected


def test_tiny_model_synthesis_interrupt_and_resume(tmp_path, tokenizer):
    kw = dict(max_new_tokens=6, batch_size=2, seed=1, progress=False)
    full = synthesize(tiny(tokenizer), PROMPTS, output=tmp_path / "full.jsonl", **kw)
    assert full.stats["generated"] == len(PROMPTS)
    _valid(full.records())

    class Interrupting:
        """The same model, raising Ctrl-C at its third chat call."""
        def __init__(self, model, at):
            self.model, self.at, self.calls = model, at, 0
            self.tokenizer = model.tokenizer

        def chat(self, *a, **k):
            self.calls += 1
            if self.calls == self.at:
                raise KeyboardInterrupt
            out = self.model.chat(*a, **k)
            self.last_truncated = self.model.last_truncated
            return out

    with pytest.raises(KeyboardInterrupt):
        synthesize(Interrupting(tiny(tokenizer), 4), PROMPTS, output=tmp_path / "part.jsonl", **kw)
    resumed = synthesize(tiny(tokenizer), PROMPTS, output=tmp_path / "part.jsonl", **kw)
    assert (tmp_path / "part.jsonl").read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert resumed.stats["resumed"] > 0
    assert [p.responses for p in resumed.pairs] == [p.responses for p in full.pairs]


@pytest.mark.slow
@pytest.mark.e2e
def test_smollm2_synthesis_produces_valid_records(tmp_path, tokenizer):
    from cst.demo import _TrimmedChat  # the demo's view: replies cut at the limit end at a full sentence
    model = _TrimmedChat(cst.load("smollm2-135m-instruct"))
    res = synthesize(model, PROMPTS[:2], output=tmp_path / "s.jsonl", max_new_tokens=40, batch_size=2, seed=0,
                     progress=False)
    s = res.stats
    assert s["generated"] == 2 and s["kept"] + sum(s["dropped"].values()) == 2
    assert s["kept"] >= 1, s
    records = res.records()
    _valid(records)
    # one record per configuration with the paper's two phrasings, and the safe default (no system prompt)
    assert len(records) == 3 * s["kept"]
    for r in records:
        assert r.system in (D.HARMLESS_SYSTEM_PROMPT, D.UNCENSORED_SYSTEM_PROMPT, "")
