"""Tokenizers of the Llama family, trained here with the `tokenizers` library: SentencePiece-style BPE
with byte fallback (Llama 2 / Mistral / SOLAR, both the Metaspace and the legacy Prepend+Replace
spelling), Llama 3's and Qwen2's byte-level regexes, Unigram. cst's ids equal transformers' for the
same tokenizer.json, and for the GGUF files cst writes ("llama" and "gpt2" vocabularies), on a mixed
corpus (unicode, digits, whitespace runs, code)."""
import json
import logging

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers, trainers

import cst
import cst.io
from cst.gguf import load_gguf_tokenizer
from cst.tokenizer import _LLAMA3_SPLIT, _QWEN2_SPLIT, Tokenizer, _merges_from_scores

transformers = pytest.importorskip("transformers")
logging.getLogger("transformers").setLevel(logging.ERROR)

CORPUS = [
    "Hello world! How are you doing today?",
    "The year 2024 had 366 days; 1234567890 and 3.14159 are numbers.",
    "  leading spaces, trailing spaces   ",
    "tabs\tand\nnewlines\n\n\nand   runs      of spaces",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(12))",
    "for (int i = 0; i < n; ++i) { a[i] += b[i] * 2; }",
    "Ünïcödé: café, naïve, Straße, Ελληνικά, русский, 中文字符, 日本語のテキスト, 한국어",
    "emoji 😀🎉👍🏽 and symbols ©®™ ∑∫√ ≤≥≠",
    "I'm sure they'll say it's what we've done, you'd think.",
    "URL https://example.com/path?q=1&r=two#frag and email a.b@c.org",
    "ALL CAPS TEXT and MiXeD cAsE wOrDs",
    "e\u0301 vs \u00e9 (combining accents), fullwidth ＡＢＣ１２３",
    "\n",
    " ",
    "a",
    "Configurable safety tuning: the system prompt picks the behaviour.",
]
TRAIN = CORPUS * 3 + [" ".join(CORPUS[i % len(CORPUS)] for i in range(k, k + 5)) for k in range(40)]
SPECIAL = ["<unk>", "<s>", "</s>"]


def _spm_bpe(legacy):
    """Llama 2 style: specials, the 256 byte tokens, then pieces learned on "▁"-joined words."""
    t = Backend(models.BPE(unk_token="<unk>"))
    t.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=True)
    t.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL, show_progress=False))
    data = json.loads(t.to_str())
    learned = [k for k, _ in sorted(data["model"]["vocab"].items(), key=lambda kv: kv[1]) if k not in SPECIAL]
    vocab = {s: i for i, s in enumerate(SPECIAL + [f"<0x{b:02X}>" for b in range(256)] + learned)}
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in data["model"]["merges"]]
    out = Backend(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", fuse_unk=True, byte_fallback=True))
    if legacy:  # the tokenizer.json transformers' converter wrote for Llama 2 / Mistral 7B v0.1
        out.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
        out.pre_tokenizer = None
    else:
        out.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    out.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    out.add_special_tokens(SPECIAL)
    return out, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def _byte_level(regex, nfc, specials):
    t = Backend(models.BPE())
    if nfc:
        t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(regex), behavior="isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.train_from_iterator(TRAIN, trainers.BpeTrainer(vocab_size=500, special_tokens=specials, show_progress=False,
                                                     initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return t


def _unigram():
    t = Backend(models.Unigram())
    t.pre_tokenizer = pre_tokenizers.Metaspace()
    t.decoder = decoders.Metaspace()
    t.train_from_iterator(TRAIN, trainers.UnigramTrainer(vocab_size=300, special_tokens=SPECIAL, unk_token="<unk>",
                                                         show_progress=False))
    return t, {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


def build(kind):
    if kind in ("spm", "spm-legacy"):
        return _spm_bpe(kind == "spm-legacy")
    if kind == "llama3":
        sp = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
        return _byte_level(_LLAMA3_SPLIT, False, sp), {"bos_token": sp[0], "eos_token": sp[4]}
    if kind == "qwen2":
        sp = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        return _byte_level(_QWEN2_SPLIT, True, sp), {"eos_token": sp[2], "pad_token": sp[0]}
    return _unigram()


KINDS = ["spm", "spm-legacy", "llama3", "qwen2", "unigram"]


def save_dir(kind, d):
    backend, special = build(kind)
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, "add_eos_token": False,
         "clean_up_tokenization_spaces": False, **special}))
    return d


def hf_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("kind", KINDS)
def test_tokenizer_json_ids_equal_transformers(tmp_path, kind):
    save_dir(kind, tmp_path)
    ours = Tokenizer.from_hf_dir(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in CORPUS + ["\n".join(CORPUS), "".join(CORPUS)]:
        ids = ours.encode(text)
        assert ids == hf_ids(ref, text), (kind, text)
        assert ours.decode(ids) == ref.decode(ids), (kind, text)
    if kind in ("spm", "spm-legacy"):  # bytes outside the learned pieces go through <0xXX>
        ids = ours.encode("\u0b85\u0b86")  # Tamil letters, not in the training text
        assert any(ours.id_to_token(i).startswith("<0x") for i in ids)


@pytest.mark.parametrize("kind", ["spm", "spm-legacy", "llama3", "qwen2"])
def test_gguf_vocabulary_round_trip(tmp_path, kind):
    """cst writes the tokenizer into a GGUF ("llama" for SentencePiece, "gpt2" + pre-tokenizer name for
    byte-level); cst and transformers read that file back to the same ids."""
    save_dir(kind, tmp_path)
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    m = cst.Model(cst.ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  ffn_dim=16, max_seq_len=64))
    (tmp_path / "g").mkdir()  # away from tokenizer.json, which transformers would read instead
    out = tmp_path / "g" / "t.gguf"
    cst.io.save(m, str(out), format="gguf", tokenizer=tok)
    import gguf
    r = gguf.GGUFReader(str(out))
    want_model = "llama" if kind.startswith("spm") else "gpt2"
    assert r.fields["tokenizer.ggml.model"].contents() == want_model
    back = load_gguf_tokenizer(str(out))
    ref = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in CORPUS + ["\n".join(CORPUS)]:
        ids = back.encode(text)
        assert ids == hf_ids(ref, text), (kind, text)
        if kind != "spm-legacy" and not (kind == "qwen2" and "\u0301" in text):
            # Same ids as the tokenizer.json (GGUF has no normaliser: Qwen2's NFC and Llama 2's legacy
            # per-segment "▁" are not stored; on this corpus only the combining accent shows it).
            assert ids == tok.encode(text), (kind, text)
    assert (back.bos_token_id, back.eos_token_id) == (tok.bos_token_id, tok.eos_token_id)


def test_merges_from_scores_match_transformers():
    """A "llama" GGUF without merges: the merges implied by the scores are transformers' own."""
    from transformers.tokenization_utils_base import generate_merges
    backend, _ = build("spm")
    vocab = backend.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    scores = list(np.random.default_rng(0).normal(size=len(tokens)).round(2))  # ties included
    scores[100:110] = [scores[100]] * 10
    ours = _merges_from_scores(tokens, scores, set())
    assert ours == generate_merges({t: i for i, t in enumerate(tokens)}, dict(zip(tokens, scores)))
    t = Tokenizer.from_gguf_fields(tokens, [3, 3, 3] + [6] * 256 + [1] * (len(tokens) - 259), None, model="llama",
                                   scores=scores, bos_token_id=1, eos_token_id=2, unk_token_id=0)
    assert t.encode("Hello world") and t.decode(t.encode("Hello world")) == "Hello world"


def test_bad_gguf_vocabularies_are_named():
    with pytest.raises(ValueError, match="model 'bert'"):
        Tokenizer.from_gguf_fields(["a"], model="bert", eos_token_id=0)
    with pytest.raises(ValueError, match="scores"):
        Tokenizer.from_gguf_fields(["<unk>", "<s>"], model="llama", eos_token_id=1)
    with pytest.raises(ValueError, match="byte token"):
        Tokenizer.from_gguf_fields(["<unk>", "<s>"], model="llama", scores=[0.0, 0.0], eos_token_id=1)
    with pytest.raises(ValueError, match="pre-tokenizer 'nope'"):
        Tokenizer.from_gguf_fields(["a", "b"], model="gpt2", pre="nope", eos_token_id=0)


def test_unigram_cannot_be_written_to_gguf(tmp_path):
    save_dir("unigram", tmp_path)
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    with pytest.raises(ValueError, match="Unigram"):
        tok.gguf_fields()


# Chat templates in each family's format (written for these tests; the markers are the families').
TEMPLATES = {
    "llama3": (
        "{{ bos_token }}{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n"
        "{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
        "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"),
    "llama2": (
        "{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
        "{% set rest = messages[1:] %}{% else %}{% set sys = none %}{% set rest = messages %}{% endif %}"
        "{% for m in rest %}{% if m['role'] == 'user' %}{{ bos_token }}[INST] "
        "{% if loop.first and sys is not none %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}"
        "{{ m['content'] | trim }} [/INST]{% else %} {{ m['content'] | trim }} {{ eos_token }}{% endif %}"
        "{% endfor %}"),
    "chatml": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    "mistral": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
        "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"),
}
TEMPLATE_TOKENIZER = {"llama3": "llama3", "llama2": "spm", "chatml": "qwen2", "mistral": "spm"}
CONVERSATIONS = [
    [{"role": "system", "content": "You are a helpful assistant that is completely uncensored."},
     {"role": "user", "content": "How do I pick a lock?"}],
    [{"role": "system", "content": "You are a helpful yet harmless assistant."},
     {"role": "user", "content": "Hi  there\n"}, {"role": "assistant", "content": "Hello! 123"},
     {"role": "user", "content": "Write def f(): pass"}],
    [{"role": "user", "content": "No system prompt here, café 😀"}],
]


def template_pair(tmp_path, name):
    save_dir(TEMPLATE_TOKENIZER[name], tmp_path)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATES[name]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer.from_hf_dir(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))


@pytest.mark.parametrize("name", ["llama3", "llama2", "chatml"])
def test_chat_rendering_equals_apply_chat_template(tmp_path, name):
    ours, ref = template_pair(tmp_path, name)
    assert ours.system_role
    for conv in CONVERSATIONS:
        for gen in (False, True):
            text = ours.render_chat(conv, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=gen)
            ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=gen)
            ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
            assert ours.encode_chat(conv, add_generation_prompt=gen) == list(ids)
        assert conv[0]["content"] in ours.render_chat(conv)


def test_template_without_system_role_folds_it_into_the_first_user_turn(tmp_path):
    ours, ref = template_pair(tmp_path, "mistral")
    assert not ours.system_role
    conv = CONVERSATIONS[1]
    with pytest.raises(Exception, match="alternate"):
        ref.apply_chat_template(conv, tokenize=False)
    folded = [{"role": "user", "content": conv[0]["content"] + "\n\n" + conv[1]["content"]}] + conv[2:]
    with pytest.warns(UserWarning, match="no system role"):
        text = ours.render_chat(conv, add_generation_prompt=True)
    assert text == ref.apply_chat_template(folded, tokenize=False, add_generation_prompt=True)
    assert conv[0]["content"] in text
    # Without a system message nothing is folded and nothing is said.
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ours.render_chat(CONVERSATIONS[2]) == ref.apply_chat_template(CONVERSATIONS[2], tokenize=False)
    with pytest.raises(ValueError, match="no system role"):
        ours.render_chat([conv[0], {"role": "assistant", "content": "x"}])


def test_gguf_llama_vocabulary_without_merges(tmp_path):
    """A "llama" GGUF as llama.cpp's converter writes it (scores, no merges): cst derives the merges
    from the scores and tokenizes the corpus as transformers reads the same file."""
    from test_families import copy_gguf
    save_dir("spm", tmp_path)
    tok = Tokenizer.from_hf_dir(str(tmp_path))
    m = cst.Model(cst.ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  ffn_dim=16, max_seq_len=64))
    cst.io.save(m, str(tmp_path / "with.gguf"), format="gguf", tokenizer=tok)
    (tmp_path / "g").mkdir()
    out = tmp_path / "g" / "t.gguf"
    copy_gguf(tmp_path / "with.gguf", out, drop=("tokenizer.ggml.merges",))
    import gguf
    assert "tokenizer.ggml.merges" not in gguf.GGUFReader(str(out)).fields
    back = load_gguf_tokenizer(str(out))
    ref = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    for text in CORPUS + ["\n".join(CORPUS)]:
        assert back.encode(text) == hf_ids(ref, text), text
