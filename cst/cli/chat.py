"""`cst chat`: one reply or an interactive session, streamed."""
import sys

from .common import UsageError, _model_from_args, _one_line, _say, _set_threads


# ---- chat ----

def _reply(model, messages, args, out=None):
    """One assistant reply to `messages`; streamed to `out` token by token when given."""
    tok = model.tokenizer
    prompt = tok.encode_chat(messages, add_generation_prompt=True)
    eos = tok.eos_token_id
    ids, shown = [], [0]

    def on_token(t):
        if t == eos:
            return
        ids.append(t)
        text = tok.decode(ids, skip_special_tokens=True).lstrip()
        # An unfinished multi-byte character decodes to U+FFFD: wait for the rest of it.
        if text.endswith("\ufffd") or len(text) <= shown[0]:
            return
        out.write(text[shown[0]:])
        out.flush()
        shown[0] = len(text)

    gen = model.generate([prompt], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                         top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed,
                         stream=on_token if out is not None else None)[0]
    text = tok.decode([t for t in gen if t != eos], skip_special_tokens=True).strip()
    if out is not None:
        rest = text[shown[0]:] if len(text) >= shown[0] else ""
        out.write(rest + "\n")
        out.flush()
    return text


def cmd_chat(args):
    _set_threads(args.threads)
    model = _model_from_args(args)
    system = [{"role": "system", "content": args.system}] if args.system else []
    stream = sys.stdout if not args.no_stream else None
    if args.message is not None:
        if not args.message.strip():
            raise UsageError("MESSAGE is empty")
        text = _reply(model, system + [{"role": "user", "content": args.message}], args, stream)
        if stream is None:
            print(text)
        return 0
    tty = sys.stdin.isatty()
    _say("chat ready: type a message; /reset starts over, /exit or Ctrl-D quits")
    history = list(system)
    while True:
        if tty:
            sys.stderr.write("> ")
            sys.stderr.flush()
        line = sys.stdin.readline()
        if not line:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history = list(system)
            _say("(conversation cleared)")
            continue
        history.append({"role": "user", "content": line})
        try:
            text = _reply(model, history, args, stream)
        except ValueError as e:  # e.g. the conversation outgrew the context window
            history.pop()
            _say(f"cst: error: {_one_line(str(e))} (/reset clears the conversation)")
            continue
        if stream is None:
            print(text, flush=True)
        history.append({"role": "assistant", "content": text})
    return 0
