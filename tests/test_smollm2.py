"""The real instruction model end to end: chat answers, and KV-cache generation equal to argmax decoding by
full recomputation on SmolLM2-135M-Instruct (the weights the demo trains)."""
import numpy as np
import pytest

import cst

from conftest import smollm2_gguf

pytestmark = [pytest.mark.slow, pytest.mark.e2e]


@pytest.fixture(scope="module")
def smollm2():
    smollm2_gguf()
    return cst.load("smollm2-135m-instruct")


def test_greedy_chat_knows_paris(smollm2):
    reply = smollm2.chat([{"role": "user", "content": "What is the capital of France?"}], max_new_tokens=24)
    assert "Paris" in reply
    assert smollm2.last_truncated == [False]  # the answer ended with EOS, not at the limit


def test_kv_cache_generation_equals_full_recomputation(smollm2):
    tok = smollm2.tokenizer
    convs = [[{"role": "user", "content": "Name a colour that you often see in the sky at noon on a clear day."}],
             [{"role": "system", "content": "You are terse."},
              {"role": "user", "content": "What is two plus two? Answer with a number and explain briefly."}],
             [{"role": "user", "content": "Write one word."}]]
    prompts = [tok.encode_chat(c, add_generation_prompt=True) for c in convs]
    assert len({len(p) for p in prompts}) == 3  # different lengths in one batch
    n_new = 6
    got = smollm2.generate(prompts, max_new_tokens=n_new, eos_token_id=None)
    for p, g in zip(prompts, got):
        seq = list(p)
        for _ in range(n_new):
            logits = smollm2.forward(np.array([seq], dtype=np.int32))
            seq.append(int(np.argmax(logits[0, -1])))
        assert g == seq[len(p):]
