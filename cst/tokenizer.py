"""Byte-level BPE tokenizer (GPT-2 family, as used by SmolLM2) built on the `tokenizers` library, plus
the model's own Jinja chat template rendered the way transformers renders it, except that text inside
message contents never becomes a control token (cst/chat_render.py). Not a general tokenizer zoo:
SentencePiece/Unigram vocabularies are rejected with a clear error."""
import json
import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# llama.cpp's pre-tokenizer names (GGUF tokenizer.ggml.pre) that we can reproduce exactly.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


def _pre_tokenizer(pre):
    if pre == "smollm":
        # Every digit on its own, then the GPT-2 regex: llama.cpp's "smollm" and SmolLM2's tokenizer.json.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in (None, "", "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("llama3", "llama-v3", "llama-bpe", "smaug-bpe"):
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"Tokenizer: GGUF pre-tokenizer {pre!r} is not supported "
                     "(supported: smollm, gpt2/default, llama-bpe/llama3)")


def _pre_name(pre_json):
    """The llama.cpp pre-tokenizer name matching a tokenizer.json pre_tokenizer, or None."""
    if pre_json is None:
        return None
    t = pre_json.get("type")
    if t == "ByteLevel" and pre_json.get("use_regex", True) and not pre_json.get("add_prefix_space"):
        return "gpt2"
    if t == "Sequence":
        p = pre_json.get("pretokenizers", [])
        if (len(p) == 2 and p[0].get("type") == "Digits" and p[0].get("individual_digits")
                and _pre_name(p[1]) == "gpt2"):
            return "smollm"
        if (len(p) == 2 and p[0].get("type") == "Split" and p[0].get("pattern", {}).get("Regex") == _LLAMA3_SPLIT
                and p[1].get("type") == "ByteLevel" and not p[1].get("use_regex", True)):
            return "llama-bpe"
    return None


def _bytes_to_unicode():
    """GPT-2's reversible byte -> printable character map (the byte-level alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _token_str(tok):
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    encode() never adds BOS/EOS. On a plain str, special-token strings become their ids (trusted text);
    on a chat render (render_chat) only the template's markup does, and encode_chat is that by default."""

    def __init__(self, backend: _Backend, *, eos_token: str, bos_token=None, pad_token=None,
                 unk_token=None, chat_template=None, pre="gpt2"):
        self._backend = backend
        self._pre = pre
        vocab = backend.get_vocab(with_added_tokens=True)

        def tid(tok, what):
            if tok is None:
                return None
            if tok not in vocab:
                raise ValueError(f"Tokenizer: {what} {tok!r} is not in the vocabulary")
            return vocab[tok]

        self.eos_token = eos_token
        self.bos_token = bos_token
        self.unk_token = unk_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        self.eos_token_id: int = tid(eos_token, "eos_token")
        if self.eos_token_id is None:
            raise ValueError("Tokenizer: an eos_token is required")
        self.bos_token_id = tid(bos_token, "bos_token")
        self.unk_token_id = tid(unk_token, "unk_token")
        self.pad_token_id: int = tid(self.pad_token, "pad_token")
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        self.special_tokens: dict = {t.content: i for i, t in backend.get_added_tokens_decoder().items()
                                     if t.special}
        self._template = None
        self._plain = None  # a copy of the backend that encodes special-token strings as text
        self._max_token_chars = None
        self._control = None

    # ---- text <-> ids ----

    def encode(self, text: str) -> list:
        """Token ids of `text`. A RenderedChat (what render_chat returns, or a slice of it) keeps
        special-token strings inside message contents as plain text; any other str is trusted: every
        special-token string in it becomes its control id (use encode_plain for untrusted text)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be str, got {type(text).__name__}")
        from .chat_render import RenderedChat, encode_rendered
        if isinstance(text, RenderedChat):
            return encode_rendered(text, self._encode_with_offsets, self.encode_plain,
                                   set(self.control_tokens.values()))
        return self._backend.encode(text, add_special_tokens=False).ids

    def _encode_with_offsets(self, text):
        e = self._backend.encode(text, add_special_tokens=False)
        return e.ids, e.offsets

    def encode_plain(self, text: str) -> list:
        """Token ids of `text` with every control-token string in it (control_tokens) encoded as
        ordinary text (like transformers' split_special_tokens=True)."""
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode_plain: text must be str, got {type(text).__name__}")
        if self._plain is None:
            # A copy of the backend in which every control token is special, set to encode specials as
            # text (non-special added tokens would still be split out).
            data = json.loads(self._backend.to_str())
            control = self.control_tokens
            for t in data.get("added_tokens", []):
                if t.get("content") in control:
                    t["special"] = True
            self._plain = _Backend.from_str(json.dumps(data))
            self._plain.encode_special_tokens = True
        return self._plain.encode(str(text), add_special_tokens=False).ids

    @property
    def control_tokens(self) -> dict:
        """{text: id} of the tokens that only the chat template's markup may produce: the special added
        tokens, and any other added token the chat template spells out (some tokenizer.json files add
        `<|im_start|>` without marking it special)."""
        if self._control is None:
            added = {t.content: i for i, t in self._backend.get_added_tokens_decoder().items()}
            template = self.chat_template or ""
            # Whitespace runs and short pieces some vocabularies add are text, not markup.
            self._control = {c: i for c, i in added.items() if c in self.special_tokens or (
                len(c) >= 3 and not any(ch.isspace() for ch in c) and c in template)}
        return self._control

    @property
    def max_token_chars(self) -> int:
        """The most characters one token can stand for (the longest vocabulary entry): a text of n
        characters has at least n / max_token_chars tokens."""
        if self._max_token_chars is None:
            self._max_token_chars = max(map(len, self._backend.get_vocab(with_added_tokens=True)))
        return self._max_token_chars

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = [int(i) for i in ids]
        for i in ids:
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"Tokenizer.decode: id {i} outside [0, {self.vocab_size})")
        return self._backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str):
        return self._backend.token_to_id(token)

    def id_to_token(self, i: int):
        return self._backend.id_to_token(int(i))

    # ---- chat template ----

    def _compiled_template(self):
        if self._template is None:
            if not self.chat_template:
                raise ValueError("Tokenizer: this tokenizer has no chat template")
            from .chat_render import compile_template
            self._template = compile_template(self.chat_template)
        return self._template

    def render_chat(self, messages, add_generation_prompt: bool = False, trust_content: bool = False) -> str:
        """The conversation rendered with the chat template (as transformers renders it), in a bounded
        sandbox. Returns a cst.chat_render.RenderedChat: a str that remembers which characters came from
        message contents, so that encode() keeps special-token text typed into a message as plain text.
        trust_content=True returns a plain str instead (every special-token string in it, contents
        included, then becomes a control token: for trusted pipelines only)."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("Tokenizer.render_chat: messages must be a list of {'role', 'content'} dicts")
        from .chat_render import render
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                    if v is not None}
        return render(self._compiled_template(), messages,
                      dict(tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials),
                      list(self.control_tokens), trust_content=trust_content)

    def encode_chat(self, messages, add_generation_prompt: bool = False, trust_content: bool = False) -> list:
        """Token ids of the rendered conversation. Only the template's markup yields special tokens;
        special-token strings in message contents are encoded as plain text, unless trust_content=True
        (the opt-out for trusted pipelines that put raw control tokens into contents on purpose)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                            trust_content=trust_content))

    # ---- constructors ----

    @classmethod
    def from_gguf_fields(cls, tokens, token_types=None, merges=None, *, model="gpt2", pre=None,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, unk_token_id=None,
                         chat_template=None):
        """Byte-level BPE from GGUF tokenizer.ggml.* metadata. Control tokens (type 3) become special
        added tokens, user-defined ones (type 4) plain added tokens, as transformers' converter does."""
        if model != "gpt2":
            raise ValueError(f"Tokenizer: GGUF tokenizer model {model!r} is not supported (only 'gpt2' "
                             "byte-level BPE)")
        tokens = list(tokens)
        if not tokens:
            raise ValueError("Tokenizer: empty token list")
        token_types = list(token_types) if token_types is not None else [1] * len(tokens)
        if len(token_types) != len(tokens):
            raise ValueError(f"Tokenizer: {len(token_types)} token types for {len(tokens)} tokens")
        merges = list(merges or [])
        for what, items, kind in (("token", tokens, str), ("merge", merges, str), ("token type", token_types, int)):
            bad = next((i for i, x in enumerate(items) if not isinstance(x, kind) or isinstance(x, bool)), None)
            if bad is not None:
                raise ValueError(f"Tokenizer: {what} {bad} is a {type(items[bad]).__name__}, not a {kind.__name__}")
        alphabet = set(_bytes_to_unicode().values())
        b2u = _bytes_to_unicode()
        vocab = {}
        for i, t in enumerate(tokens):
            # A token outside the byte alphabet (rare; llama.cpp writes some specials raw) is respelled.
            key = t if set(t) <= alphabet or token_types[i] in (3, 4) else "".join(b2u[b] for b in t.encode())
            vocab.setdefault(key, i)
        pairs = []
        for m in merges:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"Tokenizer: malformed merge {m!r}")
            pairs.append((a, b))
        pre_tokenizer = _pre_tokenizer(pre)
        try:  # `tokenizers` raises a bare Exception on a merge of unknown tokens and the like
            backend = _Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
            backend.pre_tokenizer = pre_tokenizer
            backend.decoder = decoders.ByteLevel()
            control = [AddedToken(t, special=True, normalized=False)
                       for t, ty in zip(tokens, token_types) if ty == 3 and t in vocab]
            user = [AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, token_types) if ty == 4 and t in vocab]
            if control:
                backend.add_special_tokens(control)
            if user:
                backend.add_tokens(user)
        except Exception as e:
            raise ValueError(f"Tokenizer: the vocabulary or merges are damaged ({e})") from None

        def tok(i):
            if i is None:
                return None
            i = int(i)
            if not 0 <= i < len(tokens):
                raise ValueError(f"Tokenizer: special token id {i} outside the vocabulary of {len(tokens)}")
            return tokens[i]

        if eos_token_id is None:
            raise ValueError("Tokenizer: GGUF has no tokenizer.ggml.eos_token_id")
        return cls(backend, eos_token=tok(eos_token_id), bos_token=tok(bos_token_id),
                   pad_token=tok(pad_token_id), unk_token=tok(unk_token_id), chat_template=chat_template,
                   pre=pre or "gpt2")

    @classmethod
    def from_hf_dir(cls, path):
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja / special_tokens_map.json)."""
        from .errors import FormatError
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"Tokenizer: {tj} not found (only fast-tokenizer directories are supported)")
        try:
            backend = _Backend.from_file(tj)
            with open(tj, encoding="utf-8") as f:
                tj_data = json.load(f)
        except Exception as e:
            raise FormatError(f"{tj}: not a valid tokenizer.json ({e})") from None
        if tj_data.get("model", {}).get("type") != "BPE":
            raise ValueError(f"{tj}: only BPE tokenizers are supported, got {tj_data.get('model', {}).get('type')!r}")
        cfg = {}
        cfg_path = os.path.join(path, "tokenizer_config.json")
        for name in ("special_tokens_map.json", "tokenizer_config.json"):
            p = os.path.join(path, name)
            if os.path.isfile(p):
                try:
                    with open(p, encoding="utf-8") as f:
                        d = json.load(f)
                except Exception as e:
                    raise FormatError(f"{p}: not valid JSON ({e})") from None
                if not isinstance(d, dict):
                    raise FormatError(f"{p}: expected a JSON object")
                cfg.update(d)
        template = cfg.get("chat_template")
        if isinstance(template, list):  # [{"name": ..., "template": ...}]
            named = {t.get("name"): t.get("template") for t in template
                     if isinstance(t, dict) and isinstance(t.get("name"), (str, type(None)))}
            template = named.get("default") or next(iter(named.values()), None)
        jinja_path = os.path.join(path, "chat_template.jinja")
        if template is None and os.path.isfile(jinja_path):
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        if template is not None and not isinstance(template, str):
            raise FormatError(f"{cfg_path}: chat_template must be a string, got {type(template).__name__}")
        tokens = {}
        for key in ("eos_token", "bos_token", "pad_token", "unk_token"):
            t = _token_str(cfg.get(key))
            if t is not None and not isinstance(t, str):
                raise FormatError(f"{cfg_path}: {key} must be a string, got {type(t).__name__} {t!r:.40}")
            tokens[key] = t
        if tokens["eos_token"] is None:
            raise FormatError(f"{cfg_path}: no eos_token")
        try:
            return cls(backend, **tokens, chat_template=template, pre=_pre_name(tj_data.get("pre_tokenizer")))
        except ValueError as e:
            raise FormatError(f"{cfg_path}: {e}") from None

    # ---- export ----

    def hf_files(self) -> dict:
        """{file name: text} of a Hugging Face tokenizer directory describing this tokenizer."""
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
            "pad_token": self.pad_token,
            "unk_token": self.unk_token,
            "add_bos_token": False,
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,
            "model_max_length": 1000000000000000019884624838656,
            "chat_template": self.chat_template,
        }
        cfg = {k: v for k, v in cfg.items() if v is not None}
        return {"tokenizer.json": self._backend.to_str(),
                "tokenizer_config.json": json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"}

    def save_hf(self, path):
        """Writes tokenizer.json and tokenizer_config.json into directory `path` (created if needed),
        each file atomically."""
        from .atomic import write_text
        os.makedirs(path, exist_ok=True)
        for name, text in self.hf_files().items():
            write_text(os.path.join(path, name), text)

    def gguf_fields(self) -> dict:
        """tokens, token_types, merges, pre and special ids in GGUF's terms (for save_gguf)."""
        data = json.loads(self._backend.to_str())
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError("Tokenizer: only BPE tokenizers can be written to GGUF")
        if self._pre is None:
            raise ValueError("Tokenizer: this pre-tokenizer has no llama.cpp equivalent; cannot write GGUF")
        vocab = self._backend.get_vocab(with_added_tokens=True)
        n = self.vocab_size
        tokens = [None] * n
        for t, i in vocab.items():
            if not 0 <= i < n:
                raise ValueError(f"Tokenizer: token id {i} outside [0, {n})")
            tokens[i] = t
        if any(t is None for t in tokens):
            raise ValueError("Tokenizer: vocabulary ids are not dense; cannot write GGUF")
        types = [1] * n
        for i, t in self._backend.get_added_tokens_decoder().items():
            types[i] = 3 if t.special else 4
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        return {"tokens": tokens, "token_types": types, "merges": merges, "pre": self._pre,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "unk_token_id": self.unk_token_id,
                "chat_template": self.chat_template}

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pre={self._pre!r}, chat_template={'yes' if self.chat_template else 'no'})")
