"""Byte-level BPE tokenizer (GPT-2 family, as used by SmolLM2) built on the `tokenizers` library, plus
the model's own Jinja chat template rendered the way transformers renders it. Not a general
tokenizer zoo: SentencePiece/Unigram vocabularies are rejected with a clear error."""
import json
import os
from datetime import datetime

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


def _named_default(template):
    """tokenizer_config.json's chat_template: a string, or [{"name", "template"}] (the "default" one)."""
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template


def read_chat_template(path) -> str:
    """A chat template from a file, for overriding a model's own (as llama.cpp's --chat-template-file and
    transformers' apply_chat_template(chat_template=...) allow): a Jinja file as it is, or a .json file
    holding a "chat_template" entry (a tokenizer_config.json). Raises ValueError naming the file when
    it is empty or not valid Jinja."""
    import jinja2
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise FileNotFoundError(f"chat template {path}: no such file") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"chat template {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if path.lower().endswith(".json"):
        try:
            d = json.loads(text)
        except ValueError as e:
            raise ValueError(f"chat template {path}: not valid JSON ({e})") from None
        text = _named_default(d.get("chat_template")) if isinstance(d, dict) else None
        if not isinstance(text, str):
            raise ValueError(f"chat template {path}: no \"chat_template\" string in this JSON file")
    if not text.strip():
        raise ValueError(f"chat template {path}: empty")
    try:
        jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(text)
    except jinja2.TemplateSyntaxError as e:
        raise ValueError(f"chat template {path}: not a valid Jinja template (line {e.lineno}: {e.message})") from None
    return text


def _token_str(tok):
    if isinstance(tok, dict):
        return tok.get("content")
    return tok


class Tokenizer:
    """Text <-> token ids for one model, plus its chat template.

    encode() never adds BOS/EOS; special-token strings inside the text become their ids."""

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

    # ---- text <-> ids ----

    def encode(self, text: str) -> list:
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.encode: text must be str, got {type(text).__name__}")
        return self._backend.encode(text, add_special_tokens=False).ids

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
            import jinja2
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message):
                raise jinja2.exceptions.TemplateError(message)

            def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
                return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                  sort_keys=sort_keys)

            def strftime_now(fmt):
                return datetime.now().strftime(fmt)

            # Same environment settings as transformers' apply_chat_template, so templates render alike.
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                extensions=["jinja2.ext.loopcontrols"])
            env.filters["tojson"] = tojson
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = strftime_now
            self._template = env.from_string(self.chat_template)
        return self._template

    def set_chat_template(self, template: str) -> None:
        """Replaces the chat template (e.g. with read_chat_template(FILE)); exports then carry it."""
        if not isinstance(template, str) or not template.strip():
            raise ValueError("Tokenizer.set_chat_template: template must be a non-empty string")
        self.chat_template = template
        self._template = None

    def render_chat(self, messages, add_generation_prompt: bool = False) -> str:
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("Tokenizer.render_chat: messages must be a list of {'role', 'content'} dicts")
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                    if v is not None}
        return self._compiled_template().render(messages=list(messages), tools=None, documents=None,
                                                add_generation_prompt=add_generation_prompt, **specials)

    def encode_chat(self, messages, add_generation_prompt: bool = False) -> list:
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt))

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
        alphabet = set(_bytes_to_unicode().values())
        b2u = _bytes_to_unicode()
        vocab = {}
        for i, t in enumerate(tokens):
            # A token outside the byte alphabet (rare; llama.cpp writes some specials raw) is respelled.
            key = t if set(t) <= alphabet or token_types[i] in (3, 4) else "".join(b2u[b] for b in t.encode())
            vocab.setdefault(key, i)
        pairs = []
        for m in merges or []:
            a, sep, b = m.partition(" ")
            if not sep:
                raise ValueError(f"Tokenizer: malformed merge {m!r}")
            pairs.append((a, b))
        backend = _Backend(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        backend.pre_tokenizer = _pre_tokenizer(pre)
        backend.decoder = decoders.ByteLevel()
        control = [AddedToken(t, special=True, normalized=False)
                   for t, ty in zip(tokens, token_types) if ty == 3 and t in vocab]
        user = [AddedToken(t, special=False, normalized=False)
                for t, ty in zip(tokens, token_types) if ty == 4 and t in vocab]
        if control:
            backend.add_special_tokens(control)
        if user:
            backend.add_tokens(user)

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
        template = _named_default(cfg.get("chat_template"))
        jinja_path = os.path.join(path, "chat_template.jinja")
        if os.path.isfile(jinja_path):  # wins over tokenizer_config.json's entry, as in transformers
            with open(jinja_path, encoding="utf-8") as f:
                template = f.read()
        eos = _token_str(cfg.get("eos_token"))
        if eos is None:
            raise FormatError(f"{cfg_path}: no eos_token")
        return cls(backend, eos_token=eos, bos_token=_token_str(cfg.get("bos_token")),
                   pad_token=_token_str(cfg.get("pad_token")), unk_token=_token_str(cfg.get("unk_token")),
                   chat_template=template, pre=_pre_name(tj_data.get("pre_tokenizer")))

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
