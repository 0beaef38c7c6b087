"""cst.tokenizer.Tokenizer against transformers' tokenizer for the real SmolLM2 GGUF: ids on >= 1000
varied strings, decoding, chat-template rendering; plus the Hugging Face directory round trip."""
import json
import os

import numpy as np
import pytest

from cst.tokenizer import Tokenizer

from conftest import smollm2_gguf

transformers = pytest.importorskip("transformers")


# The tests that use `toks` are marked slow: reading SmolLM2's tokenizer with transformers' GGUF converter
# takes 10-50 s on 2 cores.
@pytest.fixture(scope="module")
def toks():
    """(ours, transformers') for the SmolLM2 GGUF; read once per module because both are slow."""
    import cst.gguf
    path = smollm2_gguf()
    ours = cst.gguf.load_gguf_tokenizer(path)
    theirs = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path))
    return ours, theirs


@pytest.fixture(scope="module")
def reference(toks):
    """transformers' GGUF tokenizer with SmolLM2's own pre-tokenizer (tokenizer.json on the Hub, and
    llama.cpp's "smollm": each digit alone, then the GPT-2 regex). transformers' GGUF converter has no
    entry for "smollm" and keeps GPT-2's plain ByteLevel, which differs on whitespace runs before digits."""
    from tokenizers import Tokenizer as B, pre_tokenizers
    b = B.from_str(toks[1].backend_tokenizer.to_str())
    b.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    return lambda texts: [e.ids for e in b.encode_batch(texts, add_special_tokens=False)]


_PIECES = [
    "Hello", " world", "The quick brown fox", " jumps", "naïve café", "Ünïcödé", "Ελληνικά", "русский текст",
    "日本語のテキスト", "中文字符", "한국어", "😀", "👍🏽", "🇫🇷", "👨‍👩‍👧", "∑∫√∞", "0", "7", "42", "1234567890",
    " 3.14159", "1e-10", "2024-01-01", "$100", "  ", "   ", "\t", "\n", "\n\n", "\r\n", " \n ", "        ",
    "def f(x):\n    return x**2\n", "int main(void) { return 0; }", "<div class=\"a\">", "{'k': [1, 2]}",
    "it's", "we'll", "I'M", "don't", "--", "...", "!!!", "?!", "a" * 30, "ab" * 10,
    "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>", "<|im_start|>user\n",
    "<|im_en", "d|>", "\u00a0", "\u200b", "\ufeff", "ﬁ", "Å", "A\u030a", "ǅ", "\x00", "\x7f", "é", "e\u0301",
]


def _corpus(n=1200, seed=0):
    rng = np.random.default_rng(seed)
    out = list(_PIECES) + ["", " ", "1 2 3", "x1y22z333"]
    while len(out) < n:
        k = int(rng.integers(1, 8))
        out.append("".join(_PIECES[int(i)] for i in rng.integers(0, len(_PIECES), size=k)))
    return out


@pytest.mark.slow
def test_interface(toks):
    ours, theirs = toks
    assert ours.eos_token_id == 2 and ours.bos_token_id == 1 and ours.pad_token_id == 2
    assert ours.vocab_size == 49152 == len(theirs)
    assert ours.special_tokens["<|im_start|>"] == 1 and ours.special_tokens["<|endoftext|>"] == 0
    assert len(ours.special_tokens) == 17
    assert ours.chat_template == theirs.chat_template
    assert ours.encode("hi") == ours.encode("hi") and ours.encode("hi")[0] != ours.bos_token_id


@pytest.mark.slow
def test_ids_match_transformers(toks, reference):
    ours, _ = toks
    corpus = _corpus()
    assert len(corpus) >= 1000
    want = reference(corpus)
    bad = [(s, o, w) for s, w in zip(corpus, want) if (o := ours.encode(s)) != w]
    assert not bad, f"{len(bad)} mismatches, first: {bad[0]!r}"


@pytest.mark.slow
def test_unpatched_transformers_differs_only_on_spaces_before_digits(toks):
    """Documents transformers' GGUF-converter deviation: identical ids except where a run of two or
    more whitespace characters meets a digit (GPT-2's regex then gives the last space to the digit)."""
    import re
    ours, theirs = toks
    corpus = _corpus()
    want = theirs(corpus, add_special_tokens=False)["input_ids"]
    differ = [s for s, w in zip(corpus, want) if ours.encode(s) != w]
    assert all(re.search(r"\s{2,}\d", s) for s in differ)
    assert len(differ) < len(corpus) // 10
    same = [s for s in corpus if not re.search(r"\s{2,}\d", s)]
    assert len(same) > 900


@pytest.mark.slow
def test_digits_split_individually(toks):
    ours, _ = toks
    ids = ours.encode("12345")
    assert len(ids) == 5 and ours.decode(ids) == "12345"


@pytest.mark.slow
def test_special_tokens_in_text(toks):
    ours, _ = toks
    assert ours.encode("<|im_start|>user\nhi<|im_end|>")[0] == 1
    assert 2 in ours.encode("a<|im_end|>b")


@pytest.mark.slow
def test_decode_round_trip_and_matches_transformers(toks):
    ours, theirs = toks
    for s in _corpus(300, seed=1):
        ids = ours.encode(s)
        assert ours.decode(ids) == s
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == theirs.decode(ids, skip_special_tokens=True)
    with pytest.raises(ValueError, match="outside"):
        ours.decode([49152])


CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are a helpful assistant that is completely uncensored."},
     {"role": "user", "content": "Tell me a joke."}],
    [{"role": "system", "content": "Be safe."}, {"role": "user", "content": "hi"},
     {"role": "assistant", "content": "Hello! 😀"}, {"role": "user", "content": "日本語で?"}],
    [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}],
]


@pytest.mark.slow
@pytest.mark.parametrize("gen", [False, True])
@pytest.mark.parametrize("chat", range(len(CHATS)))
def test_chat_template_matches_transformers(toks, reference, chat, gen):
    ours, theirs = toks
    msgs = CHATS[chat]
    want = theirs.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert ours.render_chat(msgs, add_generation_prompt=gen) == want
    want_ids = reference([want])[0]
    assert want_ids == theirs(want, add_special_tokens=False)["input_ids"]  # no digits after spaces here
    assert ours.encode_chat(msgs, add_generation_prompt=gen) == want_ids
    if chat == 0:
        assert "You are a helpful AI assistant named SmolLM" in want
    if gen:
        assert want.endswith("<|im_start|>assistant\n")


def test_template_sandbox_and_raise_exception():
    from tokenizers import Tokenizer as B, models
    b = B(models.BPE(vocab={"a": 0, "<e>": 1}, merges=[]))
    t = Tokenizer(b, eos_token="<e>",
                  chat_template="{% if messages|length > 1 %}{{ raise_exception('too many') }}{% endif %}"
                                "{{ messages[0]['content'] }}{{ eos_token }}")
    assert t.render_chat([{"role": "user", "content": "a"}]) == "a<e>"
    import jinja2
    with pytest.raises(jinja2.exceptions.TemplateError, match="too many"):
        t.render_chat([{"role": "user", "content": "a"}] * 2)
    t2 = Tokenizer(b, eos_token="<e>", chat_template="{{ messages.__class__.__mro__ }}")
    with pytest.raises(jinja2.exceptions.SecurityError):
        t2.render_chat([])


@pytest.mark.slow
def test_hf_dir_round_trip(toks, reference, tmp_path):
    ours, theirs = toks
    ours.save_hf(tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == ours.chat_template and cfg["eos_token"] == "<|im_end|>"
    back = Tokenizer.from_hf_dir(tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    corpus = _corpus(200, seed=2)
    want = reference(corpus)
    for s, w in zip(corpus, want):
        # transformers loading our tokenizer.json keeps our (SmolLM2's) pre-tokenizer
        assert back.encode(s) == ours.encode(s) == hf(s, add_special_tokens=False)["input_ids"] == w
    assert (back.eos_token_id, back.bos_token_id, back.pad_token_id) == (2, 1, 2)
    assert back.special_tokens == ours.special_tokens
    assert hf.apply_chat_template(CHATS[1], tokenize=False) == back.render_chat(CHATS[1])
    assert hf.eos_token_id == 2 and hf.bos_token_id == 1
    # and GGUF fields derived back from the HF directory describe the same tokenizer
    f = back.gguf_fields()
    assert f["pre"] == "smollm" and f["token_types"][:17] == [3] * 17 and len(f["merges"]) == 48900
    again = Tokenizer.from_gguf_fields(f["tokens"], f["token_types"], f["merges"], pre=f["pre"],
                                       eos_token_id=2, bos_token_id=1)
    assert all(again.encode(s) == ours.encode(s) for s in corpus)


def test_from_hf_dir_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    from cst.errors import FormatError
    with pytest.raises(FormatError, match="tokenizer.json"):
        Tokenizer.from_hf_dir(tmp_path)


def test_from_gguf_fields_errors():
    with pytest.raises(ValueError, match="'llama'"):
        Tokenizer.from_gguf_fields(["a"], model="llama", eos_token_id=0)
    with pytest.raises(ValueError, match="pre-tokenizer 'weird'"):
        Tokenizer.from_gguf_fields(["a"], pre="weird", eos_token_id=0)
    with pytest.raises(ValueError, match="eos"):
        Tokenizer.from_gguf_fields(["a"])
