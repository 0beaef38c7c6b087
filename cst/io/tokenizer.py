"""Tokenizers built on the `tokenizers` library: any tokenizer.json (byte-level BPE as in SmolLM2, Llama 3
and Qwen2; SentencePiece-style BPE with byte fallback as in Llama 2, Mistral and SOLAR; Unigram), and
GGUF vocabularies of type "gpt2" (with llama.cpp's pre-tokenizer names) and "llama" (SentencePiece:
scores, token types, byte tokens); plus the model's own Jinja chat template rendered the way
transformers renders it, except that text inside message contents never becomes a control token
(cst/chat_render.py). Not a trainer."""
import json
import os

from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _Backend

# llama.cpp's pre-tokenizer names (GGUF tokenizer.ggml.pre) that we can reproduce exactly.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# Qwen2's split: Llama 3's with single digits.
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_REGEX_PRES = {"llama-bpe": _LLAMA3_SPLIT, "qwen2": _QWEN2_SPLIT}
_PRE_ALIASES = {"llama3": "llama-bpe", "llama-v3": "llama-bpe", "smaug-bpe": "llama-bpe",
                "deepseek-r1-qwen": "qwen2"}
# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER, _BYTE = 1, 2, 3, 4, 6


def _pre_tokenizer(pre):
    if pre == "smollm":
        # Every digit on its own, then the GPT-2 regex: llama.cpp's "smollm" and SmolLM2's tokenizer.json.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    if pre in (None, "", "default", "gpt2", "gpt-2"):
        return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    pre = _PRE_ALIASES.get(pre, pre)
    if pre in _REGEX_PRES:
        return pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(_REGEX_PRES[pre]), behavior="isolated"),
                                        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    raise ValueError(f"Tokenizer: GGUF pre-tokenizer {pre!r} is not supported "
                     "(supported: smollm, gpt2/default, llama-bpe/llama3, qwen2)")


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
        if len(p) == 2 and p[0].get("type") == "Split" and p[1].get("type") == "ByteLevel" \
                and not p[1].get("use_regex", True):
            for name, regex in _REGEX_PRES.items():
                if p[0].get("pattern", {}).get("Regex") == regex:
                    return name
    return None


def _is_spm_bpe(data):
    """A tokenizer.json that GGUF's "llama" vocabulary describes: BPE with byte fallback, the text
    turned into "▁"-joined words by a Metaspace pre-tokenizer (or Llama 2's Prepend + Replace
    normaliser), no other normaliser."""
    model, pre, norm = data.get("model") or {}, data.get("pre_tokenizer"), data.get("normalizer")
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        return False
    if pre is not None and pre.get("type") == "Metaspace" and norm is None:
        return pre.get("replacement") == "\u2581" and pre.get("prepend_scheme", "always") in ("first", "always")
    if pre is None and norm is not None and norm.get("type") == "Sequence":
        kinds = [n.get("type") for n in norm.get("normalizers", [])]
        return kinds == ["Prepend", "Replace"]
    return False


def _merges_from_scores(tokens, scores, skip):
    """BPE merges implied by a SentencePiece vocabulary: every split of a token into two vocabulary
    tokens, best-scored token first (ties: shorter left piece first), as transformers' GGUF reader
    derives them, so both tokenize a merge-less "llama" GGUF alike."""
    ids = {t: i for i, t in enumerate(tokens)}
    out = []
    for t, score in zip(tokens, scores):
        if t in skip:
            continue
        local = [(t[:k], t[k:]) for k in range(1, len(t))
                 if t[:k] in ids and t[k:] in ids and t[:k] not in skip and t[k:] not in skip]
        local.sort(key=lambda m: (ids[m[0]], ids[m[1]]))
        out += [(a, b, score) for a, b in local]
    out.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in out]


def _parse_merges(merges):
    """GGUF's "a b" merge strings -> (a, b) pairs."""
    pairs = []
    for m in merges:
        a, sep, b = m.partition(" ")
        if not sep:
            raise ValueError(f"Tokenizer: malformed merge {m!r}")
        pairs.append((a, b))
    return pairs


def _add_gguf_specials(backend, tokens, types, vocab):
    """Control tokens (GGUF type 3) become special added tokens, user-defined ones (type 4) plain added
    tokens, as transformers' converter does."""
    control = [AddedToken(t, special=True, normalized=False)
               for t, ty in zip(tokens, types) if ty == _CONTROL and t in vocab]
    user = [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types) if ty == _USER and t in vocab]
    if control:
        backend.add_special_tokens(control)
    if user:
        backend.add_tokens(user)


def _gguf_token(tokens, i):
    """The token string of a GGUF special-token id (None stays None)."""
    if i is None:
        return None
    i = int(i)
    if not 0 <= i < len(tokens):
        raise ValueError(f"Tokenizer: special token id {i} outside the vocabulary of {len(tokens)}")
    return tokens[i]


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
        named = {t.get("name"): t.get("template") for t in template
                 if isinstance(t, dict) and isinstance(t.get("name"), (str, type(None)))}
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
        self._system_role = None  # probed on first use (system_role)
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

    def set_chat_template(self, template: str) -> None:
        """Replaces the chat template (e.g. with read_chat_template(FILE)); exports then carry it."""
        if not isinstance(template, str) or not template.strip():
            raise ValueError("Tokenizer.set_chat_template: template must be a non-empty string")
        self.chat_template = template
        # What was derived from the old template goes with it.
        self._template = self._system_role = self._control = None

    def render_chat(self, messages, add_generation_prompt: bool = False, trust_content: bool = False) -> str:
        """The conversation rendered with the chat template (as transformers renders it), in a bounded
        sandbox. Returns a cst.chat_render.RenderedChat: a str that remembers which characters came from
        message contents, so that encode() keeps special-token text typed into a message as plain text.
        trust_content=True returns a plain str instead (every special-token string in it, contents
        included, then becomes a control token: for trusted pipelines only)."""
        if not isinstance(messages, (list, tuple)) or not all(isinstance(m, dict) for m in messages):
            raise TypeError("Tokenizer.render_chat: messages must be a list of {'role', 'content'} dicts")
        from .chat_render import render
        messages = self._fold_system(messages)
        return render(self._compiled_template(), messages, self._render_context(add_generation_prompt),
                      list(self.control_tokens), trust_content=trust_content)

    def _render_context(self, add_generation_prompt):
        """The variables a chat template sees besides `messages`, as transformers passes them."""
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("unk_token", self.unk_token), ("pad_token", self.pad_token))
                    if v is not None}
        return dict(tools=None, documents=None, add_generation_prompt=add_generation_prompt, **specials)

    def encode_chat(self, messages, add_generation_prompt: bool = False, trust_content: bool = False) -> list:
        """Token ids of the rendered conversation. Only the template's markup yields special tokens;
        special-token strings in message contents are encoded as plain text, unless trust_content=True
        (the opt-out for trusted pipelines that put raw control tokens into contents on purpose)."""
        return self.encode(self.render_chat(messages, add_generation_prompt=add_generation_prompt,
                                            trust_content=trust_content))

    # ---- templates without a system role ----

    @property
    def system_role(self) -> bool:
        """Whether the chat template renders a system message (probed once: Mistral-Instruct's, for
        one, raises on it or drops it)."""
        if self._system_role is None:
            probe = "cst-system-probe-5b1e"
            from .chat_render import render
            try:  # through the bounded renderer: a template's own budget holds for the probe too
                text = render(self._compiled_template(),
                              [{"role": "system", "content": probe}, {"role": "user", "content": "hi"}],
                              self._render_context(True), [], trust_content=True)
                self._system_role = probe in text
            except Exception:  # the template refused the system turn (raise_exception or an error)
                self._system_role = False
        return self._system_role

    def _fold_system(self, messages):
        """CST lives in the system prompt, so a template without a system role gets it folded into the
        first user turn ("<system>\n\n<user>"), with a warning, instead of losing it. Documented in
        docs/models.md."""
        messages = list(messages)
        if not messages or messages[0].get("role") != "system" or not self.chat_template or self.system_role:
            return messages
        if len(messages) < 2 or messages[1].get("role") != "user":
            raise ValueError("Tokenizer.render_chat: this chat template has no system role and the system "
                             "message is not followed by a user message to fold it into")
        import warnings
        warnings.warn("Tokenizer: the chat template has no system role; the system prompt is folded into the "
                      "first user message", stacklevel=3)
        first = dict(messages[1], content=f"{messages[0].get('content', '')}\n\n{messages[1].get('content', '')}")
        return [first] + messages[2:]

    # ---- constructors ----

    @classmethod
    def from_gguf_fields(cls, tokens, token_types=None, merges=None, *, model="gpt2", pre=None,
                         bos_token_id=None, eos_token_id=None, pad_token_id=None, unk_token_id=None,
                         chat_template=None, scores=None):
        """A tokenizer from GGUF tokenizer.ggml.* metadata: model "gpt2" (byte-level BPE, `pre` one of
        llama.cpp's pre-tokenizer names) or "llama" (SentencePiece BPE with byte fallback, merges from
        the file or else from `scores`). Control tokens (type 3) become special added tokens,
        user-defined ones (type 4) plain added tokens, as transformers' converter does."""
        if model == "llama":
            return cls._from_gguf_spm(tokens, token_types, merges, scores, bos_token_id=bos_token_id,
                                      eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                                      unk_token_id=unk_token_id, chat_template=chat_template)
        if model != "gpt2":
            raise ValueError(f"Tokenizer: GGUF tokenizer model {model!r} is not supported ('gpt2' byte-level "
                             "BPE, 'llama' SentencePiece)")
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
        try:  # `tokenizers` raises a bare Exception on a merge of unknown tokens and the like
            backend = _Backend(models.BPE(vocab=vocab, merges=_parse_merges(merges or []), fuse_unk=False,
                                          byte_fallback=False))
            backend.pre_tokenizer = _pre_tokenizer(pre)
            backend.decoder = decoders.ByteLevel()
            _add_gguf_specials(backend, tokens, token_types, vocab)
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"Tokenizer: the vocabulary or merges are damaged ({e})") from None
        if eos_token_id is None:
            raise ValueError("Tokenizer: GGUF has no tokenizer.ggml.eos_token_id")
        tok = lambda i: _gguf_token(tokens, i)  # noqa: E731
        return cls(backend, eos_token=tok(eos_token_id), bos_token=tok(bos_token_id),
                   pad_token=tok(pad_token_id), unk_token=tok(unk_token_id), chat_template=chat_template,
                   pre=_PRE_ALIASES.get(pre, pre) or "gpt2")

    @classmethod
    def _from_gguf_spm(cls, tokens, token_types, merges, scores, *, bos_token_id, eos_token_id, pad_token_id,
                       unk_token_id, chat_template):
        """SentencePiece ("llama") vocabulary: BPE with byte fallback over "▁"-joined words (Metaspace,
        "▁" prepended to the first word), as transformers' LlamaTokenizer reads the same file."""
        tokens = [str(t) for t in tokens]
        n = len(tokens)
        if not n:
            raise ValueError("Tokenizer: empty token list")
        types = list(token_types) if token_types is not None else [_NORMAL] * n
        if len(types) != n:
            raise ValueError(f"Tokenizer: {len(types)} token types for {n} tokens")
        if len(set(tokens)) != n:
            raise ValueError("Tokenizer: duplicate tokens in a SentencePiece vocabulary")
        if merges:
            pairs = _parse_merges(merges)
        else:
            if scores is None or len(scores) != n:
                raise ValueError("Tokenizer: a 'llama' GGUF vocabulary needs tokenizer.ggml.scores (one per "
                                 "token) or merges")
            pairs = _merges_from_scores(tokens, [float(x) for x in scores], set())
        vocab = {t: i for i, t in enumerate(tokens)}
        for b in range(256):
            if f"<0x{b:02X}>" not in vocab:
                raise ValueError(f"Tokenizer: SentencePiece vocabulary lacks the byte token <0x{b:02X}>")
        unk = None
        if unk_token_id is not None and 0 <= int(unk_token_id) < n:
            unk = tokens[int(unk_token_id)]
        elif _UNKNOWN in types:
            unk = tokens[types.index(_UNKNOWN)]
        backend = _Backend(models.BPE(vocab=vocab, merges=pairs, unk_token=unk, fuse_unk=True,
                                      byte_fallback=True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first",
                                                         split=False)
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                             decoders.Fuse(), decoders.Strip(" ", 1, 0)])
        _add_gguf_specials(backend, tokens, types, vocab)
        tok = lambda i: _gguf_token(tokens, i)  # noqa: E731
        if eos_token_id is None:
            raise ValueError("Tokenizer: GGUF has no tokenizer.ggml.eos_token_id")
        return cls(backend, eos_token=tok(eos_token_id), bos_token=tok(bos_token_id), pad_token=tok(pad_token_id),
                   unk_token=unk, chat_template=chat_template, pre="llama-spm")

    @classmethod
    def from_hf_dir(cls, path):
        """tokenizer.json + tokenizer_config.json (+ chat_template.jinja / special_tokens_map.json)."""
        from ..core.errors import FormatError
        tj = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tj):
            raise FileNotFoundError(f"Tokenizer: {tj} not found (only fast-tokenizer directories are supported)")
        try:
            backend = _Backend.from_file(tj)
            with open(tj, encoding="utf-8") as f:
                tj_data = json.load(f)
        except Exception as e:
            raise FormatError(f"{tj}: not a valid tokenizer.json ({e})") from None
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
            return cls(backend, **tokens, chat_template=template,
                       pre="llama-spm" if _is_spm_bpe(tj_data) else _pre_name(tj_data.get("pre_tokenizer")))
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
        from ..core.atomic import write_text
        os.makedirs(path, exist_ok=True)
        for name, text in self.hf_files().items():
            write_text(os.path.join(path, name), text)

    def gguf_fields(self) -> dict:
        """model, tokens, token_types, merges, scores, pre and special ids in GGUF's terms (for
        save_gguf): "gpt2" for byte-level BPE with a llama.cpp pre-tokenizer, "llama" for
        SentencePiece-style BPE with byte fallback (scores: minus the merge rank that forms a token)."""
        data = json.loads(self._backend.to_str())
        model = data.get("model", {})
        if model.get("type") != "BPE":
            raise ValueError(f"Tokenizer: a {model.get('type')} tokenizer cannot be written to GGUF (BPE only)")
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
        spm = self._pre == "llama-spm"
        types = [_NORMAL] * n
        if spm:
            for b in range(256):
                i = vocab.get(f"<0x{b:02X}>")
                if i is not None:
                    types[i] = _BYTE
            if self.unk_token_id is not None:
                types[self.unk_token_id] = _UNKNOWN
        for i, t in self._backend.get_added_tokens_decoder().items():
            if types[i] == _NORMAL:
                types[i] = _CONTROL if t.special else _USER
        merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
        scores = None
        if spm:  # llama.cpp's SentencePiece tokenizer merges the best-scored pair: score = -(merge rank)
            scores = [0.0] * n
            for rank, m in enumerate(merges):
                i = vocab.get(m.replace(" ", "", 1)) if m.count(" ") == 1 else None
                if i is not None and scores[i] == 0.0:
                    scores[i] = -float(rank + 1)
        return {"model": "llama" if spm else "gpt2", "tokens": tokens, "token_types": types, "merges": merges,
                "scores": scores, "pre": "default" if spm else self._pre,
                "bos_token_id": self.bos_token_id, "eos_token_id": self.eos_token_id,
                "pad_token_id": self.pad_token_id, "unk_token_id": self.unk_token_id,
                "chat_template": self.chat_template}

    def __repr__(self):
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pre={self._pre!r}, chat_template={'yes' if self.chat_template else 'no'})")
