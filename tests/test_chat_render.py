"""Bounds on chat-template rendering (cst/chat_render.py): loops, ranges, string growth, time; each
ends in a ChatTemplateError naming the bound, quickly and without the memory the template asks for."""
import time

import pytest

from cst import chat_render
from cst.errors import ChatTemplateError

from test_forgery import small_tokenizer

MSGS = [{"role": "user", "content": "hi"}]


@pytest.mark.parametrize("template, match", [
    ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
    ("{% for i in range(200000) %}{% endfor %}", "range"),
    ("{% for i in range(10**9) %}{% endfor %}", "too large"),
    ("{{ 'a' * 2000000000 }}", "repeated"),
    ("{{ ['a'] * 2000000000 }}", "repeated"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "joined"),
    ("{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}", "'\\+'"),
    ("{{ 10 ** (10 ** 10) }}", "too large"),
    ("{{ '%2000000000d' % 1 }}", "width"),
    ("{{ 'x'.center(2000000000) }}", "too large"),
    ("{{ 'x' | center(2000000000) }}", "too large"),
    ("{{ ('a' * 1000) | replace('', 'b' * 100000) }}", "replace"),
    ("{{ ('a' * 1000).replace('a', 'b' * 100000) }}", "replace"),
    ("{% for i in range(3000) %}{{ 'x' * 1000 }}{% endfor %}", "rendered conversation"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", "recursion"),
    ("{{ messages | tojson(indent=100000) }}", "indent"),
    ("{% for", "syntax error"),
])
def test_bounds(template, match):
    tok = small_tokenizer(template, "<|im_start|>", "<|im_end|>")
    t = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=match):
        tok.render_chat(MSGS)
    assert time.perf_counter() - t < 8.0


def test_time_limit(monkeypatch):
    monkeypatch.setattr(chat_render, "TEMPLATE_TIME_LIMIT_S", 0.05)
    monkeypatch.setattr(chat_render, "TEMPLATE_MAX_ITERATIONS", 10**9)
    tok = small_tokenizer("{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
                          "<|im_start|>", "<|im_end|>")
    t = time.perf_counter()
    with pytest.raises(ChatTemplateError, match="longer than 0.05 s"):
        tok.render_chat(MSGS)
    assert time.perf_counter() - t < 2.0


def test_bounds_grow_with_the_conversation():
    """A 5 MB message renders (the size bound is 4x the input), and real templates stay within bounds."""
    tok = small_tokenizer("{% for m in messages %}<|im_start|>{{ m['role'] + '\n' + m['content'] }}<|im_end|>"
                          "{% endfor %}", "<|im_start|>", "<|im_end|>")
    text = tok.render_chat([{"role": "user", "content": "word " * 1_000_000}])
    assert len(text) == 5_000_000 + len("<|im_start|>user\n<|im_end|>")


@pytest.mark.parametrize("template, kind", [("{{ 1 / 0 }}", "ZeroDivisionError"), ("{{ 'a' + 1 }}", "TypeError"),
                                            ("{{ {}['x']['y'] }}", None)])
def test_template_runtime_failures_are_chat_template_errors(template, kind):
    import jinja2
    tok = small_tokenizer(template, "<|im_start|>", "<|im_end|>")
    if kind is None:  # jinja's own errors stay what they are (as transformers raises them)
        with pytest.raises(jinja2.exceptions.UndefinedError):
            tok.render_chat(MSGS)
        return
    with pytest.raises(ChatTemplateError, match=f"chat template failed: {kind}"):
        tok.render_chat(MSGS)


@pytest.mark.parametrize("template, match", [
    ("{{ lipsum(1000000) }}", "undefined"),                       # found by the fuzz harness: a hang
    ("{{ '{:>999999999}'.format(1) }}", "width"),
    ("{{ '%999999999d' | format(1) }}", "width"),
    ("{{ ('a\n' * 100000) | indent(1000) }}", "indent"),
])
def test_more_bounds(template, match):
    tok = small_tokenizer(template, "<|im_start|>", "<|im_end|>")
    import jinja2
    with pytest.raises((ChatTemplateError, jinja2.exceptions.UndefinedError), match=match):
        tok.render_chat(MSGS)
