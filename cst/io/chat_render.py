"""Chat-template rendering that keeps the template's markup apart from the messages' contents, in a
bounded Jinja sandbox. A render is a RenderedChat: the text plus the character spans that came from
message contents, so that encoding can keep special-token strings typed into a message as plain text
(only the template's own markup becomes control tokens). Not a template engine of its own: Jinja renders.

How the spans are found, for any template: the conversation is rendered twice, as is and with every
content string wrapped in two sentinels built from random private-use characters; the sentinel render
splits into markup and content pieces, and the plain render is matched against that split (a template
may strip whitespace at a content's edges, as Llama 3's `| trim` does). A template that cuts contents
apart (slices, splits) cannot be split this way and gets a ChatTemplateError naming the opt-out."""
import json
import re
import secrets
import threading
import time
from datetime import datetime

from ..core.errors import ChatTemplateError

# Bounds on one render (a template is data read from a model file, so it is not trusted either).
TEMPLATE_TIME_LIMIT_S = 5.0
TEMPLATE_MAX_ITERATIONS = 1_000_000   # for-loop iterations, all loops of one render together
TEMPLATE_MAX_RANGE = 100_000          # items of one range()
TEMPLATE_MIN_SIZE = 1 << 20           # characters a value or the output may reach: this, or 4x the input

_PUA = (0xF0000, 0xFFFFD)  # supplementary private use area A: no case, not whitespace, not in vocabularies
_state = threading.local()


class RenderedChat(str):
    """A chat render (a str) that knows which characters came from message contents (`content_spans`,
    sorted (start, end) pairs). Slicing with a step of 1 keeps the spans; any other str operation
    (concatenation, replace, ...) gives a plain str, which Tokenizer.encode treats as trusted text."""

    content_spans: tuple = ()

    def __new__(cls, text, spans=()):  # the default lets pickle rebuild one (spans come back as state)
        s = super().__new__(cls, text)
        s.content_spans = tuple(spans)
        return s

    def __getitem__(self, key):
        if not isinstance(key, slice) or key.step not in (None, 1):
            return str.__getitem__(self, key)
        start, stop, _ = key.indices(len(self))
        stop = max(start, stop)
        spans = [(max(a, start) - start, min(b, stop) - start) for a, b in self.content_spans
                 if min(b, stop) > max(a, start)]
        return RenderedChat(str.__getitem__(self, key), spans)

    def markup_segments(self):
        """(start, end) of every piece outside the content spans."""
        out, pos = [], 0
        for a, b in self.content_spans:
            if a > pos:
                out.append((pos, a))
            pos = b
        if pos < len(self):
            out.append((pos, len(self)))
        return out


# ---------------------------------------------------------------------------------------- the sandbox


def _budget():
    b = getattr(_state, "budget", None)
    if b is None:  # called outside render(): a compile-time constant fold, say
        b = _state.budget = _Budget(TEMPLATE_MIN_SIZE)
    return b


class _Budget:
    def __init__(self, max_size):
        self.deadline = time.monotonic() + TEMPLATE_TIME_LIMIT_S
        self.iterations = 0
        self.max_size = max_size

    def tick(self, n=1):
        self.iterations += n
        if self.iterations > TEMPLATE_MAX_ITERATIONS:
            raise ChatTemplateError(f"chat template: more than {TEMPLATE_MAX_ITERATIONS} loop iterations in "
                                    "one render")
        if self.iterations & 1023 == 0 and time.monotonic() > self.deadline:
            self.timeout()

    def timeout(self):
        raise ChatTemplateError(f"chat template: rendering took longer than {TEMPLATE_TIME_LIMIT_S} s")

    def size(self, n, what):
        if n > self.max_size:
            raise ChatTemplateError(f"chat template: {what} would have {n} items, more than the "
                                    f"{self.max_size} allowed for this conversation")


def _sized(x):
    return isinstance(x, (str, list, tuple, bytes))


def _check_result(x, what):
    if _sized(x):
        _budget().size(len(x), what)
    return x


class _Loop:
    """Iterates a for-loop's sequence, counting iterations against the render's budget."""

    def __init__(self, it):
        self._it = iter(it)
        b = _budget()
        self._tick = b.tick

    def __iter__(self):
        return self

    def __next__(self):
        self._tick()
        return next(self._it)


def _bounded_range(*args):
    for a in args:
        if isinstance(a, int) and abs(a) > 1 << 62:
            raise ChatTemplateError("chat template: range() argument too large")
    r = range(*args)
    if len(r) > TEMPLATE_MAX_RANGE:
        raise ChatTemplateError(f"chat template: range() of {len(r)} items (at most {TEMPLATE_MAX_RANGE})")
    return r


def _guard_ast(tree):
    """Wraps every for-loop's sequence in cst_loop__(...) and every `~` concatenation in
    cst_sized__(...), so that loops count iterations and strings built by joining are bounded."""
    from jinja2 import nodes

    def call(name, arg):
        return nodes.Call(nodes.Name(name, "load"), [arg], [], None, None)

    for node in tree.find_all(nodes.For):
        node.iter = call("cst_loop__", node.iter)
    _wrap_concats(tree, call)
    return tree


def _wrap_concats(node, call):
    """Concat nodes have no parent link: each is replaced where it appears in a node's fields."""
    from jinja2 import nodes
    for field in node.fields:
        v = getattr(node, field, None)
        if isinstance(v, nodes.Concat):
            _wrap_concats(v, call)
            setattr(node, field, call("cst_sized__", v))
        elif isinstance(v, nodes.Node):
            _wrap_concats(v, call)
        elif isinstance(v, list):
            for i, item in enumerate(v):
                if isinstance(item, nodes.Concat):
                    _wrap_concats(item, call)
                    v[i] = call("cst_sized__", item)
                elif isinstance(item, nodes.Node):
                    _wrap_concats(item, call)


_FORMAT_WIDTH = re.compile(r"\d+")


def _make_env():
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class BoundedSandbox(ImmutableSandboxedEnvironment):
        """The sandbox transformers renders chat templates in, plus bounds on time, loop iterations,
        range sizes and the size of every string or list a template builds."""
        intercepted_binops = frozenset(["*", "+", "**", "%"])

        def call_binop(self, context, operator, left, right):
            b = _budget()
            b.tick()
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if _sized(seq) and isinstance(n, int):
                        b.size(len(seq) * max(n, 0), "a repeated string or list")
            elif operator == "**":
                if isinstance(left, int) and isinstance(right, int) and right > 0 and abs(left) > 1:
                    if abs(left).bit_length() * right > 1 << 16:
                        raise ChatTemplateError(f"chat template: {left} ** {right} is too large")
            elif operator == "%" and isinstance(left, str):
                _check_widths(left)
            return _check_result(super().call_binop(context, operator, left, right), f"'{operator}'")

        def call(__self, __context, __obj, *args, **kwargs):  # noqa: N805 (jinja's own signature)
            b = _budget()
            b.tick()
            for a in list(args) + list(kwargs.values()):
                if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.max_size:
                    raise ChatTemplateError(f"chat template: argument {a} of a call is too large")
            # str.format reaches here wrapped by the sandbox (functools.update_wrapper keeps __wrapped__).
            name = getattr(__obj, "__name__", None)
            owner = getattr(getattr(__obj, "__wrapped__", __obj), "__self__", None)
            if isinstance(owner, str) and name == "replace":
                _check_replace(owner, *args[:2])
            elif isinstance(owner, str) and name in ("format", "format_map"):
                _check_widths(owner)
            if time.monotonic() > b.deadline:
                b.timeout()
            return _check_result(super().call(__context, __obj, *args, **kwargs), "a call's result")

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        if isinstance(indent, int) and indent > 64:
            raise ChatTemplateError(f"chat template: tojson indent {indent} is too large")
        return _check_result(json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                                        sort_keys=sort_keys), "tojson's result")

    def strftime_now(fmt):
        return datetime.now().strftime(fmt)

    # Same environment settings as transformers' apply_chat_template, so templates render alike.
    env = BoundedSandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    for name in ("center", "indent", "format", "join", "wordwrap", "truncate", "replace", "string"):
        env.filters[name] = _bounded_filter(env.filters[name], name)
    env.filters["tojson"] = tojson
    # lipsum(n) writes n paragraphs in one Python loop that no bound sees; no chat template needs it.
    env.globals.pop("lipsum", None)
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, range=_bounded_range,
                       cst_loop__=_Loop, cst_sized__=lambda s: _check_result(s, "a joined string"))
    return env


def _check_widths(fmt):
    """Refuses a format string whose widths or precisions ('%999999999d', '{:>999999999}') would build a
    string past the bound."""
    b = _budget()
    for m in _FORMAT_WIDTH.finditer(fmt):
        if len(m.group()) > 7 or int(m.group()) > b.max_size:
            raise ChatTemplateError("chat template: a format width is too large")


def _check_replace(s, old=None, new=None, *_):
    if isinstance(s, str) and isinstance(old, str) and isinstance(new, str):
        n = (len(s) + 1) if old == "" else s.count(old)
        _budget().size(len(s) + n * max(len(new) - len(old), 0), "a replace()'s result")


def _bounded_filter(f, name):
    import functools

    @functools.wraps(f)
    def bounded(*args, **kwargs):
        b = _budget()
        b.tick()
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, int) and not isinstance(a, bool) and abs(a) > b.max_size:
                raise ChatTemplateError(f"chat template: argument {a} of the {name} filter is too large")
        if name == "replace":
            strs = [a for a in args if isinstance(a, str)]
            if len(strs) >= 3:
                _check_replace(*strs[-3:])
        elif name == "format" and args and isinstance(args[0], str):
            _check_widths(args[0])
        elif name == "indent" and args and isinstance(args[0], str):
            width = args[1] if len(args) > 1 else kwargs.get("width", 4)
            width = len(width) if isinstance(width, str) else width
            if isinstance(width, int):
                b.size(len(args[0]) + max(width, 0) * (args[0].count("\n") + 1), "the indent filter's result")
        return _check_result(f(*args, **kwargs), f"the {name} filter's result")
    return bounded


def compile_template(source):
    """A bounded Jinja template from the source text; syntax errors raise ChatTemplateError."""
    import jinja2
    env = _make_env()
    try:
        return env.from_string(_guard_ast(env.parse(source)))
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ChatTemplateError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _input_size(obj, depth=0):
    if isinstance(obj, str):
        return len(obj)
    if depth > 16:
        return 0
    if isinstance(obj, dict):
        return sum(_input_size(k, depth + 1) + _input_size(v, depth + 1) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return sum(_input_size(v, depth + 1) for v in obj)
    return 0


def _jinja_error():
    import jinja2
    return jinja2.exceptions.TemplateError


def _render_text(template, context, max_size):
    prev = getattr(_state, "budget", None)
    b = _state.budget = _Budget(max_size)
    out, n = [], 0
    try:
        for piece in template.generate(**context):
            n += len(piece)
            b.size(n, "the rendered conversation")
            if time.monotonic() > b.deadline:
                b.timeout()
            out.append(piece)
    except RecursionError:
        raise ChatTemplateError("chat template: recursion too deep") from None
    except MemoryError:
        raise ChatTemplateError("chat template: out of memory while rendering") from None
    except (ChatTemplateError, _jinja_error()):
        raise  # ours, or the template's own (raise_exception, undefined names, the sandbox's refusals)
    except Exception as e:  # a template doing 1/0, "a" + 1, ...: the template's fault, said as such
        raise ChatTemplateError(f"chat template failed: {type(e).__name__}: {e}") from e
    finally:
        _state.budget = prev
    return "".join(out)


# ------------------------------------------------------------------------------------ content spans


def _sentinels():
    r = secrets.SystemRandom()
    nonce = "".join(chr(r.randint(*_PUA)) for _ in range(6))
    return "\U000FFFF0" + nonce + "\U000FFFF1", "\U000FFFF2" + nonce + "\U000FFFF3", set(nonce) | {
        "\U000FFFF0", "\U000FFFF1", "\U000FFFF2", "\U000FFFF3"}


def _wrap(messages, open_, close, special_strings):
    """Copies of the messages with every content string (and every "text" of a list of content parts)
    wrapped in the sentinels. Other string fields (role, name, ...) must not hold special tokens."""
    out = []
    for i, m in enumerate(messages):
        w = dict(m)
        for k, v in m.items():
            if k == "content" and isinstance(v, str):
                w[k] = open_ + v + close
            elif k == "content" and isinstance(v, (list, tuple)):
                parts = []
                for p in v:
                    if isinstance(p, dict) and isinstance(p.get("text"), str):
                        p = dict(p, text=open_ + p["text"] + close)
                    _no_specials(p, special_strings, f"messages[{i}]['content'] part", skip="text")
                    parts.append(p)
                w[k] = parts
            else:
                _no_specials(v, special_strings, f"messages[{i}][{k!r}]")
        out.append(w)
    return out


def _no_specials(v, special_strings, where, skip=None, depth=0):
    if isinstance(v, str):
        hit = next((s for s in special_strings if s in v), None)
        if hit is not None:
            raise ValueError(f"render_chat: {where} contains the control token {hit!r}; only message "
                             "contents may carry special-token text (as plain text)")
    elif depth < 8 and isinstance(v, dict):
        for k, x in v.items():
            if k != skip:
                _no_specials(x, special_strings, f"{where}[{k!r}]", depth=depth + 1)
    elif depth < 8 and isinstance(v, (list, tuple)):
        for j, x in enumerate(v):
            _no_specials(x, special_strings, f"{where}[{j}]", depth=depth + 1)


def _split(wrapped, open_, close, alphabet):
    """Sentinel render -> (markup pieces, content pieces), len(markup) == len(content) + 1."""
    markup, content, pos = [], [], 0
    while True:
        a = wrapped.find(open_, pos)
        if a < 0:
            markup.append(wrapped[pos:])
            break
        b = wrapped.find(close, a + len(open_))
        nxt = wrapped.find(open_, a + len(open_))
        if b < 0 or 0 <= nxt < b:
            raise ChatTemplateError(_CUT)
        markup.append(wrapped[pos:a])
        content.append(wrapped[a + len(open_):b])
        pos = b + len(close)
    leftover = re.compile("[" + "".join(sorted(alphabet)) + "]")
    low = min(alphabet)
    if any(piece and max(piece) >= low and leftover.search(piece) for piece in markup + content):
        raise ChatTemplateError(_CUT)
    return markup, content


_CUT = ("render_chat: this chat template cuts message contents apart (slices or splits them), so its "
        "markup cannot be told from the contents; pass trust_content=True to render and encode it "
        "as plain text with special tokens recognised everywhere (trusted input only)")


def _candidates(c):
    lead, trail = len(c) - len(c.lstrip()), len(c) - len(c.rstrip())
    if lead == len(c):  # only whitespace
        lead, trail = len(c), 0
    heads = range(lead + 1) if lead <= 8 else (0, lead)
    tails = range(trail + 1) if trail <= 8 else (0, trail)
    seen = []
    for a in heads:
        for b in tails:
            s = c[a:len(c) - b] if a <= len(c) - b else ""
            if s not in seen:
                seen.append(s)
    return seen


def _align(text, markup, content):
    """Content spans of `text` such that text = markup[0] + c1 + markup[1] + ... where each ci is the
    sentinel render's content piece, possibly with whitespace stripped at its edges."""
    if not text.startswith(markup[0]):
        raise ChatTemplateError(_DIFFER)
    failed = set()
    stack = [(0, len(markup[0]), [])]
    while stack:
        k, pos, spans = stack.pop()
        if k == len(content):
            if pos == len(text):
                return [s for s in spans if s[1] > s[0]]
            continue
        if (k, pos) in failed:
            continue
        failed.add((k, pos))
        nxt = markup[k + 1]
        for cand in reversed(_candidates(content[k])):
            end = pos + len(cand)
            if text.startswith(cand, pos) and text.startswith(nxt, end):
                stack.append((k + 1, end + len(nxt), spans + [(pos, end)]))
    raise ChatTemplateError(_DIFFER)


_DIFFER = ("render_chat: this chat template renders the conversation differently once its contents "
           "are marked (it branches on or transforms the content text), so its markup cannot be told "
           "from the contents; pass trust_content=True to render and encode it as plain text with "
           "special tokens recognised everywhere (trusted input only)")


def render(template, messages, context, special_strings, trust_content=False):
    """Renders `messages` with the compiled template and extra `context`. Returns a RenderedChat (or,
    with trust_content=True, a plain str)."""
    if trust_content:
        return _render_text(template, dict(context, messages=list(messages)),
                            max(TEMPLATE_MIN_SIZE, 4 * _input_size(messages)))
    open_, close, alphabet = _sentinels()
    wrapped = _wrap(messages, open_, close, special_strings)
    max_size = max(TEMPLATE_MIN_SIZE, 4 * _input_size(wrapped))
    text = _render_text(template, dict(context, messages=list(messages)), max_size)
    markup, content = _split(_render_text(template, dict(context, messages=wrapped), max_size),
                             open_, close, alphabet)
    return RenderedChat(text, _align(text, markup, content))


# ------------------------------------------------------------------------------------------- encoding


def encode_rendered(text, encode, encode_plain, special_ids):
    """Token ids of a RenderedChat: special tokens only where the markup has them, special-token
    strings inside contents as plain text. encode(s) -> (ids, offsets) recognises special tokens,
    encode_plain(s) -> ids does not.

    The usual case (no special-token text in any content) is one ordinary encode of the whole text,
    checked: every special id must lie inside the markup. Otherwise the text is cut at the markup's own
    special tokens and the pieces between them are encoded as plain text."""
    import bisect
    spans = text.content_spans
    ids, offsets = encode(str(text))
    starts = [a for a, _ in spans]

    def in_content(a, b):
        j = bisect.bisect_right(starts, b - 1) - 1  # the last span starting before b
        return j >= 0 and spans[j][1] > a

    if not any(t in special_ids and in_content(a, b) for t, (a, b) in zip(ids, offsets)):
        return ids
    trusted = []  # (start, end, id) of the markup's special tokens
    for a, b in text.markup_segments():
        seg_ids, seg_off = encode(str.__getitem__(text, slice(a, b)))
        trusted += [(a + s, a + e, t) for t, (s, e) in zip(seg_ids, seg_off) if t in special_ids]
    out, pos = [], 0
    for a, b, t in trusted:
        if a > pos:
            out += encode_plain(str.__getitem__(text, slice(pos, a)))
        out.append(t)
        pos = b
    if pos < len(text):
        out += encode_plain(str.__getitem__(text, slice(pos, len(text))))
    return out

