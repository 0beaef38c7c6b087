"""Shared by the `cst` commands: argparse plumbing (formatter, parser, value types), the two error
kinds (CliError, UsageError), status output, and the readers of prompts, configurations, JSON
and models (--model / --checkpoint)."""
import argparse
import json
import os
import sys
import time

from ..train.trainer import find_checkpoint, load_checkpoint_into


RUN_FILE = "run.json"  # written by `cst train` into its output dir: which model and data the run used


class CliError(Exception):
    """A runtime problem the user can fix; printed as one line, exit status 1."""


class UsageError(CliError):
    """Bad command-line usage (unknown option, bad value, inconsistent flags); exit status 2."""


# ---- argparse plumbing ----

class _Formatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults next to options. Descriptions and epilogs: each paragraph is wrapped to the
    terminal width, except lines that start with two spaces (examples), which are kept as written."""

    def _fill_text(self, text, width, indent):
        import textwrap
        out = []
        for para in text.split("\n\n"):
            if para.startswith("  ") or "\n  " in para:
                out.append(para)
            else:
                out.append(textwrap.fill(" ".join(para.split()), width, initial_indent=indent,
                                         subsequent_indent=indent))
        return "\n\n".join(out)

    def _get_help_string(self, action):
        # "(default: None)" and "(default: False)" say nothing useful.
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS \
                or "%(default)" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose errors raise UsageError (one line, handled by main) instead of printing
    the usage block and calling sys.exit."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        kwargs.setdefault("allow_abbrev", False)  # `--lora` must not silently mean `--lora-r`
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UsageError(f"{message} (see '{self.prog} --help')")


def _int_at_least(lo):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be >= {lo}, got {v}")
        return v
    parse.__name__ = f"int>={lo}"
    return parse


_pos_int = _int_at_least(1)
_nonneg_int = _int_at_least(0)


def _float(s):
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {s!r}") from None
    if v != v or v in (float("inf"), float("-inf")):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {s!r}")
    return v


def _common():
    p = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: a subcommand must not reset a --debug given before it (`cst --debug train ...`).
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                   help="show the full traceback on errors (also: CST_DEBUG=1)")
    return p


def _add_model_args(p, checkpoint=True, required=True):
    p.add_argument("--model", "-m", required=False, metavar="M",
                   help="'smollm2-135m-instruct', a .gguf file, or a Hugging Face model directory"
                        + ("" if required else "; may be omitted with --checkpoint of a `cst train` run "
                           "(the run's model is used)"))
    if checkpoint:
        p.add_argument("--checkpoint", metavar="CKPT",
                       help="a `cst train` checkpoint (checkpoint-N directory, or a run's output dir: its "
                            "latest checkpoint) to apply to the model; LoRA adapters are merged")
    _add_chat_template(p)


def _add_chat_template(p):
    p.add_argument("--chat-template", metavar="FILE",
                   help="render chats with this Jinja template instead of the model's own (a .jinja file, or a "
                        "tokenizer_config.json with a chat_template entry)")


def _use_chat_template(model, path):
    """--chat-template FILE: replaces the model's template (the GGUF's or the HF directory's)."""
    if path is None:
        return
    from ..io.tokenizer import read_chat_template
    if model.tokenizer is None:
        raise CliError(f"--chat-template {path}: the model has no tokenizer to give it to")
    model.tokenizer.set_chat_template(read_chat_template(path))
    _say(f"chat template: {path}")


def _add_threads(p):
    p.add_argument("--threads", type=_pos_int, metavar="N",
                   help="OpenMP threads for the kernels (default: the cores available, or OMP_NUM_THREADS)")


# ---- shared helpers ----

def _say(*parts):
    """Progress/status messages go to stderr, so stdout holds only results."""
    print(*parts, file=sys.stderr, flush=True)


def _set_threads(n):
    if n is not None:
        from ..core.runtime import set_num_threads
        set_num_threads(n)


def _count(n):
    return f"{n / 1e6:.1f}M" if n >= 1e6 else f"{n:,}"


def _read_json(path, what, malformed=None):
    """Parsed JSON of `path`; a missing or unreadable file is a CliError, malformed JSON a `malformed`
    (default CliError; UsageError for settings files)."""
    malformed = malformed or CliError
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise CliError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise CliError(f"{what} {path}: is a directory, expected a JSON file") from None
    except UnicodeDecodeError as e:
        raise CliError(f"{what} {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise malformed(f"{what} {path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None


def _read_prompts(spec, default, what="prompts"):
    """`default` (a callable giving the embedded set) or a file: .txt (one prompt a line; blank lines and
    lines starting with '#' skipped), .json (a list of strings or {"prompt", "category"?, "kind"?}
    objects), or .jsonl (one string or object a line)."""
    if spec == "default":
        return default()
    path = spec
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".txt", ".json", ".jsonl", ".ndjson"):
        raise UsageError(f"--{what}: expected 'default' or a .txt/.json/.jsonl file, got {path!r}")
    if suffix == ".json":
        items = _read_json(path, f"{what} file")
        if not isinstance(items, list):
            raise CliError(f"{what} file {path}: expected a JSON list of strings or objects, "
                           f"got {type(items).__name__}")
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except FileNotFoundError:
            raise CliError(f"{what} file {path}: no such file") from None
        except UnicodeDecodeError as e:
            raise CliError(f"{what} file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        items = []
        for k, line in enumerate(lines, 1):
            if not line.strip() or (suffix == ".txt" and line.lstrip().startswith("#")):
                continue
            if suffix == ".txt":
                items.append(line.strip())
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise CliError(f"{what} file {path} line {k}: invalid JSON at column {e.colno}: {e.msg}") from None
    for k, it in enumerate(items):
        ok = (isinstance(it, str) and it.strip()) or (isinstance(it, dict) and isinstance(it.get("prompt"), str)
                                                       and it["prompt"].strip())
        if not ok:
            raise CliError(f"{what} file {path}: item {k + 1} must be a non-empty string or an object with a "
                           "non-empty 'prompt'")
    if not items:
        raise CliError(f"{what} file {path}: no prompts")
    return items


def _configurations(spec):
    """'paper', 'paraphrased', 'diverse', or a JSON file: a list of {name, system_prompts, preferred, rejected?,
    held_out?} objects (see docs/cli.md)."""
    from .. import data as D
    if spec in D.CONFIGURATION_SETS:
        return list(D.CONFIGURATION_SETS[spec])
    if not spec.lower().endswith(".json"):
        raise UsageError(f"--configurations: expected 'paper', 'paraphrased', 'diverse' or a .json file, got {spec!r}")
    items = _read_json(spec, "configurations file")
    if not isinstance(items, list) or not items:
        raise CliError(f"configurations file {spec}: expected a non-empty JSON list of configuration objects")
    keys = {"name", "system_prompts", "preferred", "rejected", "held_out"}
    out = []
    for k, it in enumerate(items):
        where = f"configurations file {spec}: item {k + 1}"
        if not isinstance(it, dict):
            raise CliError(f"{where}: expected an object, got {type(it).__name__}")
        unknown = sorted(set(it) - keys)
        if unknown:
            raise CliError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(keys)}")
        missing = [n for n in ("name", "system_prompts", "preferred") if n not in it]
        if missing:
            raise CliError(f"{where}: missing key(s) {missing}")
        if not isinstance(it["name"], str) or not it["name"]:
            raise CliError(f"{where}: 'name' must be a non-empty string")
        if not isinstance(it["preferred"], str) or not it["preferred"]:
            raise CliError(f"{where}: 'preferred' must be a behaviour name (a string)")
        rej = it.get("rejected")
        if rej is not None and not isinstance(rej, str) and not (
                isinstance(rej, list) and rej and all(isinstance(r, str) for r in rej)):
            raise CliError(f"{where}: 'rejected' must be a behaviour name, a list of them, or null")
        for key in ("system_prompts", "held_out"):
            v = it.get(key, [])
            if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
                raise CliError(f"{where}: {key!r} must be a list of strings")
        try:
            out.append(D.Configuration(it["name"], it["system_prompts"], it["preferred"], rej,
                                       it.get("held_out", [])))
        except ValueError as e:
            raise CliError(f"{where}: {e}") from None
    names = [c.name for c in out]
    if len(set(names)) != len(names):
        raise CliError(f"configurations file {spec}: duplicate names {names}")
    return out


def _check_model_source(source):
    """Fails with one clear line, before anything is printed or loaded, when `source` names no model."""
    from ..io import SMOLLM2_NAME, smollm2_path
    if source.lower() == SMOLLM2_NAME and not os.path.exists(source):
        smollm2_path()  # raises FileNotFoundError with the install hint
    elif not os.path.exists(source):
        raise CliError(f"model {source!r}: no such file or directory (expected {SMOLLM2_NAME!r}, a .gguf file "
                       "or a Hugging Face model directory)")


def _load_model(source, need_tokenizer=True):
    from ..io import load
    _check_model_source(source)
    t0 = time.perf_counter()
    model = load(source)
    if need_tokenizer and model.tokenizer is None:
        raise CliError(f"model {source}: has no tokenizer (a GGUF without tokenizer metadata, or a directory "
                       "without tokenizer.json); this command needs one")
    c = model.config
    _say(f"loaded {source}: {_count(model.num_parameters)} parameters, {c.n_layers} layers, dim {c.dim} "
         f"({time.perf_counter() - t0:.1f} s)")
    return model


def _run_info(ckpt_path):
    """run.json of the `cst train` run a checkpoint belongs to (in the checkpoint's parent or in the
    output dir given), or None."""
    for d in (ckpt_path, os.path.dirname(os.path.abspath(ckpt_path))):
        p = os.path.join(d, RUN_FILE)
        if os.path.isfile(p):
            try:
                with open(p, encoding="utf-8") as f:
                    info = json.load(f)
                return info if isinstance(info, dict) else None
            except (OSError, json.JSONDecodeError):
                return None
    return None


def _model_from_args(args, need_tokenizer=True, merge=True):
    """--model (and --checkpoint, merged; merge=False: a LoRA checkpoint stays attached as
    model.adapter) -> a Model ready for generation or export."""
    source = args.model
    ckpt = getattr(args, "checkpoint", None)
    if source is None:
        info = _run_info(ckpt) if ckpt and os.path.isdir(ckpt) else None
        if not ckpt:
            raise UsageError("--model is required")
        if not info or not info.get("model"):
            raise UsageError(f"--model is required (no {RUN_FILE} of a `cst train` run next to {ckpt})")
        source = args.model = info["model"]
        _say(f"model of the run: {source}")
    if ckpt:
        find_checkpoint(ckpt)  # fail on a bad path before loading the model
    _check_model_source(source)
    model = _load_model(source, need_tokenizer)
    template = getattr(args, "chat_template", None)
    if template is None and ckpt:  # the template the run trained with, if it was given one
        template = (_run_info(ckpt) or {}).get("chat_template")
    _use_chat_template(model, template)
    if ckpt:
        res = load_checkpoint_into(model, ckpt, merge=merge)
        _say(f"applied {res['kind']} checkpoint {res['path']} (step {res['step']})"
             + (f", LoRA r={res['lora'].r} {'merged' if merge else 'attached'}" if res["lora"] is not None else ""))
    return model


def _parse_set(items):
    """--set KEY=VALUE pairs; VALUE is read as JSON when it parses (numbers, null, lists), else a string."""
    out = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--set: expected KEY=VALUE, got {item!r}")
        try:
            val = json.loads(raw)
        except json.JSONDecodeError:
            val = raw
        out[key.strip()] = val
    return out


def _cst_version():
    try:
        from .. import __version__
        return __version__
    except Exception:  # a broken native build must not break --version
        return "unknown"


# ---- entry point ----

def _one_line(msg):
    return " ".join(str(msg).split())


def _describe(e):
    """One line for an exception: the message for errors a user can cause, type + message otherwise."""
    if isinstance(e, OSError) and getattr(e, "filename", None) and e.strerror:
        return _one_line(f"{e.filename}: {e.strerror}")
    msg = _one_line(e) or type(e).__name__
    if isinstance(e, (CliError, ValueError, OSError, RuntimeError)):
        if isinstance(e, KeyError):
            msg = f"missing key {msg}"
        return msg
    if isinstance(e, MemoryError):
        return "out of memory" + (f": {msg}" if msg != "MemoryError" else "")
    return f"{type(e).__name__}: {msg} (rerun with --debug for the traceback)"
