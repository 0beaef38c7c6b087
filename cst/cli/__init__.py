"""The `cst` command line: demo, data synth/build, train, eval, chat, export and info, as thin argparse
wrappers over the library (cst.load, cst.data, cst.synth, cst.trainer, cst.eval). Not a second API:
every option maps onto a library argument, and nothing here computes anything the library does not.

Errors a user can cause (missing files, bad options or values, malformed JSON) end in ONE line on
stderr, `cst: error: ...`, exit status 2 for usage and 1 for everything else; `--debug` (or
CST_DEBUG=1) shows the traceback instead. Ctrl-C exits with status 130.
"""
import argparse
import json
import os
import sys
import time
from ..core import distributed
from ..core.atomic import write_text
from ..core.runtime import interactive
from ..train.trainer import find_checkpoint, load_checkpoint_into  # re-exported: they live with the trainer

__all__ = ["main", "build_parser", "load_checkpoint_into", "find_checkpoint", "CliError", "UsageError"]

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


def _size(n_bytes):
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes / 1024:.1f} KiB"


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
    """'paper', 'paraphrased', or a JSON file: a list of {name, system_prompts, preferred, rejected?,
    held_out?} objects (see docs/cli.md)."""
    from .. import data as D
    if spec == "paper":
        return list(D.PAPER_CONFIGURATIONS)
    if spec == "paraphrased":
        return list(D.PARAPHRASED_CONFIGURATIONS)
    if not spec.lower().endswith(".json"):
        raise UsageError(f"--configurations: expected 'paper', 'paraphrased' or a .json file, got {spec!r}")
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


# ---- demo ----

def cmd_demo(args):
    import importlib
    try:
        demo = importlib.import_module("..demo", __package__)
    except ModuleNotFoundError as e:
        if e.name in ("cst.demo", None):
            raise CliError("cst demo is not available: this build of cst has no cst.demo module") from None
        raise CliError(f"cst demo needs the package {e.name!r}, which is not installed") from None
    kwargs = {"quick": args.quick, "progress": interactive()}
    for name in ("output_dir", "seed", "threads"):
        if getattr(args, name) is not None:
            kwargs[name] = getattr(args, name)
    overrides = _parse_set(args.set)
    if overrides:
        try:
            demo.settings_for(args.quick, **overrides)
        except ValueError as e:
            raise UsageError(f"--set: {e}") from None
    result = demo.run(**kwargs, **overrides)
    if isinstance(result, (str, os.PathLike)):
        print(f"demo output: {os.fspath(result)}")
    return 0


# ---- data ----

def _default_train_prompts():
    from ..data.prompts import default_prompts
    return default_prompts(split="train", kind="harmful")


def cmd_data_synth(args):
    from ..eval.synth import synthesize
    prompts = _read_prompts(args.prompts, _default_train_prompts)
    if args.limit is not None:
        prompts = prompts[:args.limit]
    if not args.output.lower().endswith((".jsonl", ".ndjson")):
        raise UsageError(f"--output: the synthesis log must be a .jsonl file, got {args.output!r}")
    judge = None if args.judge == "none" else _judge(args.judge, args)
    _set_threads(args.threads)
    model = _model_from_args(args)
    _say(f"synthesizing pairs for {len(prompts)} prompt(s) into {args.output}")
    try:
        res = synthesize(model, prompts, output=args.output, max_new_tokens=args.max_new_tokens, judge=judge,
                         batch_size=args.batch_size, seed=args.seed, temperature=args.temperature,
                         n_per_prompt=args.n_per_prompt, resume=not args.fresh, progress=interactive())
    except ValueError as e:
        raise CliError(str(e).replace("resume=False", "--fresh")) from None
    s = res.stats
    print(f"generated {s['generated']} sample(s) ({s['resumed']} from an earlier run), kept {s['kept']}, "
          f"dropped {s['dropped_total']}")
    for reason, n in s["dropped"].items():
        if n:
            print(f"  dropped {reason}: {n}")
    if s["fallback_refusals"]:
        print(f"  safe side replaced by a template refusal: {s['fallback_refusals']}")
    print(f"log: {res.path} (stats: {res.path}.stats.json)")
    if s["kept"]:
        print(f"next: cst data build --pairs {res.path} --output records.jsonl")
    return 0


def _load_pairs(path, configurations):
    """BehaviourPairs from a synthesis log, a JSON/JSONL file of {prompt, responses, category?,
    metadata?} objects, or a records file (inverted with pairs_from_records)."""
    from .. import data as D
    if os.path.isdir(path):
        raise CliError(f"pairs file {path}: is a directory, expected a .json or .jsonl file")
    if not os.path.isfile(path):
        raise CliError(f"pairs file {path}: no such file")
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in (".json", ".jsonl", ".ndjson"):
        raise UsageError(f"--pairs: expected a .json or .jsonl file, got {path!r}")
    if suffix == ".json":
        items = _read_json(path, "pairs file")
        if not isinstance(items, list):
            raise CliError(f"pairs file {path}: expected a JSON list of objects, got {type(items).__name__}")
        numbered = [(f"item {k + 1}", it) for k, it in enumerate(items)]
    else:
        try:
            with open(path, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except UnicodeDecodeError as e:
            raise CliError(f"pairs file {path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
        numbered = []
        for k, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CliError(f"pairs file {path} line {k}: invalid JSON at column {e.colno}: {e.msg}") from None
            if not numbered and isinstance(obj, dict) and "synth_header" in obj:
                from ..eval.synth import load_pairs
                return load_pairs(path), "synthesis log"
            numbered.append((f"line {k}", obj))
    if not numbered:
        raise CliError(f"pairs file {path}: empty")
    first = numbered[0][1]
    if isinstance(first, dict) and "chosen" in first and "rejected" in first:
        records = D.load_records(path)
        return D.pairs_from_records(records, configurations), "preference records"
    keys = {"prompt", "responses", "category", "metadata"}
    pairs = []
    for where, obj in numbered:
        if not isinstance(obj, dict):
            raise CliError(f"pairs file {path} {where}: expected an object, got {type(obj).__name__}")
        unknown = sorted(set(obj) - keys)
        if unknown:
            raise CliError(f"pairs file {path} {where}: unknown key(s) {unknown}; a pair has {sorted(keys)}")
        if "prompt" not in obj or "responses" not in obj:
            raise CliError(f"pairs file {path} {where}: needs 'prompt' and 'responses'")
        try:
            pairs.append(D.BehaviourPair(obj["prompt"], obj["responses"], obj.get("category"),
                                         obj.get("metadata") or {}))
        except ValueError as e:
            raise CliError(f"pairs file {path} {where}: {e}") from None
    return pairs, "behaviour pairs"


def _phrasings(s):
    if s in ("all", "first"):
        return s
    try:
        k = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'all', 'first' or an integer >= 1, got {s!r}") from None
    if k < 1:
        raise argparse.ArgumentTypeError(f"expected 'all', 'first' or an integer >= 1, got {s!r}")
    return k


def cmd_data_build(args):
    from .. import data as D
    if not args.output.lower().endswith((".json", ".jsonl", ".parquet")):
        raise UsageError(f"--output: expected a .json, .jsonl or .parquet file, got {args.output!r}")
    if args.system is not None and not args.vanilla_dpo:
        raise UsageError("--system only applies with --vanilla-dpo")
    configurations = _configurations(args.configurations)
    pairs, kind = _load_pairs(args.pairs, configurations)
    if not pairs:
        raise CliError(f"pairs file {args.pairs}: no usable pairs ({kind})")
    if args.vanilla_dpo:
        records = D.vanilla_dpo(pairs, system=args.system, task=args.task)
    else:
        records = D.build_records(pairs, configurations, phrasings=args.phrasings, task=args.task,
                                  safe_default=args.safe_default)
    D.save_records(records, args.output, format=args.format)
    print(f"read {len(pairs)} pair(s) ({kind}) from {args.pairs}")
    if args.vanilla_dpo:
        print(f"wrote {len(records)} vanilla DPO record(s) (safe preferred, system prompt "
              f"{args.system!r}) to {args.output}")
    else:
        counts = {}
        for r in records:
            counts[r.metadata.get("configuration")] = counts.get(r.metadata.get("configuration"), 0) + 1
        detail = ", ".join(f"{n} {name}" for name, n in counts.items())
        print(f"wrote {len(records)} CST record(s) ({detail}; phrasings={args.phrasings}) to {args.output}")
    return 0


# ---- train ----

# flag dest -> DPOConfig field
_OVERRIDES = {
    "beta": "beta", "loss_type": "loss_type", "learning_rate": "learning_rate", "epochs": "num_train_epochs",
    "max_steps": "max_steps", "batch_size": "per_device_train_batch_size",
    "grad_accum": "gradient_accumulation_steps", "lora_r": "lora_r", "lora_alpha": "lora_alpha",
    "lora_dropout": "lora_dropout", "max_length": "max_length", "max_prompt_length": "max_prompt_length",
    "mode": "mode", "seed": "seed", "save_steps": "save_steps", "logging_steps": "logging_steps",
    "eval_steps": "eval_steps", "warmup_ratio": "warmup_ratio", "threads": "num_threads",
    "output_dir": "output_dir",
}
_FLAG = {field: "--" + dest.replace("_", "-") for dest, field in _OVERRIDES.items()}


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


def build_config(args):
    """DPOConfig from --config FILE, then --set KEY=VALUE, then the dedicated flags (last wins)."""
    from ..train.config import DPOConfig
    d = {}
    if args.config:
        d = _read_json(args.config, "config file", malformed=UsageError)
        if not isinstance(d, dict):
            raise UsageError(f"config file {args.config}: expected a JSON object of DPOConfig fields, "
                             f"got {type(d).__name__}")
    from_file = set(d)
    sets = _parse_set(args.set)
    d.update(sets)
    for dest, field in _OVERRIDES.items():
        v = getattr(args, dest, None)
        if v is not None:
            if field in ("lora_r", "save_steps", "eval_steps") and v == 0:
                v = None  # 0 = off: full fine-tuning / no periodic save / no periodic eval
            d[field] = v
    try:
        return DPOConfig.from_dict(d)
    except (ValueError, TypeError) as e:
        msg = str(e)
        known = DPOConfig.__dataclass_fields__
        for where, keys in ((f"config file {args.config}", from_file - set(sets)), ("--set", set(sets))):
            unknown = sorted(k for k in keys if k not in known)
            if unknown:
                import difflib
                close = difflib.get_close_matches(unknown[0], list(known), n=1)
                hint = f"did you mean {close[0]!r}?" if close else f"known: {', '.join(known)}"
                raise UsageError(f"{where}: unknown DPOConfig key(s) {unknown}; {hint}") from None
        given = {_OVERRIDES[dest] for dest in _OVERRIDES if getattr(args, dest, None) is not None}
        for field in given:
            if f" {field} " in msg:
                msg += f" (set by {_FLAG[field]})"
                break
        raise UsageError(msg) from None


def cmd_train(args):
    from .. import data as D
    from ..train.trainer import Trainer, TrainingError
    if args.export is not None:
        fmt, export_path = args.export
        if fmt not in ("hf", "gguf"):
            raise UsageError(f"--export: format must be 'hf' or 'gguf', got {fmt!r}")
    config = build_config(args)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2, sort_keys=True))
        return 0
    if args.print_trl_config:
        try:
            print(json.dumps(config.to_trl(), indent=2))
        except ValueError as e:
            raise UsageError(f"--print-trl-config: {e}") from None
        return 0
    _check_model_source(args.model)
    records = D.load_records(args.data)
    if not records:
        raise CliError(f"--data {args.data}: no records")
    eval_records = D.load_records(args.eval_data) if args.eval_data else None
    resume = None
    if args.resume is not None:
        where = config.output_dir if args.resume == "latest" else args.resume
        try:
            resume = find_checkpoint(where)
        except (OSError, ValueError):
            raise CliError(f"--resume: no checkpoint in {where}" if args.resume == "latest"
                           else f"--resume: {where} is not a checkpoint of `cst train`") from None
    model = _load_model(args.model)
    _use_chat_template(model, args.chat_template)
    trainer = Trainer(model, config, train_dataset=records, eval_dataset=eval_records)
    if resume is not None:
        # Loaded here rather than by train(resume_from_checkpoint=...) (the same call), so that a checkpoint
        # that does not fit these settings fails before run.json/config.json are rewritten.
        try:
            trainer.load_checkpoint(resume)
        except ValueError as e:
            raise CliError(f"--resume: {e} (resume with the settings of the run that wrote it)") from None
        if trainer.dist.rank == 0:
            _say(f"resuming from {resume} (step {trainer.step})")
    rank0 = trainer.dist.rank == 0  # under mpirun, rank 0 writes the run's files
    if rank0:
        _say(f"training on {len(records)} record(s)" + (f", evaluating on {len(eval_records)}" if eval_records
                                                        else "") + f"; output in {config.output_dir}"
             + (f"; {trainer.dist.size} MPI ranks" if trainer.dist.size > 1 else ""))
        os.makedirs(config.output_dir, exist_ok=True)
        config.to_json(os.path.join(config.output_dir, "config.json"))
        model_src = os.path.abspath(args.model) if os.path.exists(args.model) else args.model
        run = {"model": model_src, "data": os.path.abspath(args.data),
               "eval_data": os.path.abspath(args.eval_data) if args.eval_data else None}
        if args.chat_template:
            run["chat_template"] = os.path.abspath(args.chat_template)
        write_text(os.path.join(config.output_dir, RUN_FILE), json.dumps(run, indent=2) + "\n")
    t0 = time.perf_counter()
    try:
        history = trainer.train()
    except TrainingError as e:
        raise CliError(f"training stopped: {e}") from None
    dt = time.perf_counter() - t0
    final_eval = {}
    if trainer.eval_examples and not any(k.startswith("eval_") for k in (history[-1] if history else {})):
        final_eval = trainer.evaluate()
    _print_train_summary(trainer, history, final_eval, dt)
    if getattr(trainer, "interrupted", False):
        print(f"interrupted at step {trainer.step}; resume with: cst train ... --output-dir {config.output_dir} "
              "--resume")
        return 130
    if args.export is not None and rank0:
        fmt, path = args.export
        model.save(path, format=fmt)
        print(f"exported the tuned model ({fmt}{', LoRA merged' if trainer.lora is not None else ''}) to {path}")
    return 0


def _print_train_summary(trainer, history, final_eval, dt):
    cfg = trainer.config
    what = (f"LoRA r={cfg.lora_r}, {trainer.lora.num_parameters:,} trainable parameters" if trainer.lora is not None
            else f"full fine-tuning, {trainer.model.num_parameters:,} parameters")
    print(f"{cfg.mode.upper()} ({what}): step {trainer.step}/{trainer.total_steps}, {len(trainer.train_examples)} "
          f"training example(s), {dt:.1f} s")
    rows = [h for h in history if "loss" in h]
    if rows:
        last = rows[-1]
        parts = [f"loss {last['loss']:.4f}"]
        if "rewards/accuracies" in last:
            parts += [f"reward accuracy {last['rewards/accuracies']:.3f}",
                      f"reward margin {last['rewards/margins']:.4f}"]
        print(f"last logged (step {last.get('step')}): " + ", ".join(parts))
    ev = dict(final_eval)
    for h in reversed(history):
        if any(k.startswith("eval_") for k in h):
            ev = ev or {k: v for k, v in h.items() if k.startswith("eval_")}
            break
    if ev:
        parts = [f"loss {ev['eval_loss']:.4f}"]
        if "eval_rewards/accuracies" in ev:
            parts.append(f"reward accuracy {ev['eval_rewards/accuracies']:.3f}")
        print("eval: " + ", ".join(parts))
    if trainer.last_checkpoint:
        print(f"checkpoint: {trainer.last_checkpoint}")


# ---- eval ----

def _judge(spec, args):
    from ..eval import judges as J
    if spec in ("default", "behaviour"):
        return J.default_judge()
    if spec.startswith("behaviour:"):
        path = spec.split(":", 1)[1]
        if not os.path.isfile(path):
            raise CliError(f"--judge {spec}: no such file {path!r}")
        try:
            return J.BehaviourJudge.load(path)
        except ValueError as e:
            raise CliError(f"--judge {spec}: {e}") from None
    if spec == "refusal":
        return J.RefusalJudge()
    if spec == "refusal-strict":
        return J.RefusalJudge(compliance_check=True)
    if spec.startswith("classifier:"):
        path = spec.split(":", 1)[1]
        if not os.path.isfile(path):
            raise CliError(f"--judge {spec}: no such file {path!r}")
        return J.ClassifierJudge.load(path)
    if spec.startswith("llm:"):
        judge_model = _load_model(spec.split(":", 1)[1])

        def batch(texts):
            return judge_model.chat([[{"role": "user", "content": t}] for t in texts],
                                    max_new_tokens=args.judge_max_new_tokens)
        return J.LLMJudge(generate_batch_fn=batch, fallback=J.RefusalJudge())
    raise UsageError(f"--judge: expected 'default', 'behaviour:FILE.json', 'refusal', 'refusal-strict', "
                     f"'classifier:FILE.npz' or 'llm:MODEL', got {spec!r}")


def _eval_tables(conf, orr, judge):
    from ..eval.metrics import fmt as _fmt
    """(text lines, markdown) of a configurability report and an optional over-refusal report; `judge`:
    the --judge value, as the user wrote it (the class name would not tell refusal from refusal-strict)."""
    rows = [("S0: follows uncensored configurations (share harmful)", _fmt(conf.S0, conf.S0_ci)),
            ("S1: follows safe configurations (share safe)", _fmt(conf.S1, conf.S1_ci))]
    if conf.default is not None:
        rows.append(("no system prompt: share safe", _fmt(conf.default["rate"], conf.default["ci"])))
    cfg_rows = []
    for name, c in conf.per_configuration.items():
        fr = c["follow_rate"]
        cfg_rows.append((name, c["behaviour"], _fmt(c["share_safe"]["rate"], c["share_safe"]["ci"]),
                         _fmt(fr["rate"], fr["ci"]) if fr else "n/a"))
    or_rows = [(name, _fmt(orr.rate[name], orr.ci[name])) for name in orr.rate] if orr is not None else []
    if conf.degeneration:
        rows += [(f"degenerate: {name}", _fmt(d["rate"], d["ci"])) for name, d in conf.degeneration.items()]
    w = max(len(r[0]) for r in rows)
    lines = [f"configurability ({conf.settings['n_prompts']} prompts, judge {judge}, "
             f"{'held-out' if conf.settings['use_held_out'] else 'training'} system prompts; 95% CI)",
             f"  judge: {conf.settings.get('judge_validation', conf.settings['judge'])}"]
    lines += [f"  {a:<{w}}  {b}" for a, b in rows]
    lines.append("  per configuration:  name / behaviour / share safe / follow rate")
    lines += [f"    {a} / {b} / {c} / {d}" for a, b, c, d in cfg_rows]
    if orr is not None:
        lines.append(f"over-refusal on {orr.settings['n_prompts']} benign prompts (share refused, judge "
                     "refusal):")
        lines += [f"  {a:<12} {b}" for a, b in or_rows]
    md = ["# Configurability report", "", f"Judge: {conf.settings.get('judge_validation', conf.settings['judge'])}",
          "", "| metric | value [95% CI] |", "|---|---|"]
    md += [f"| {a} | {b} |" for a, b in rows]
    md += ["", "| configuration | behaviour | share safe | follow rate |", "|---|---|---|---|"]
    md += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in cfg_rows]
    if orr is not None:
        md += ["", "| over-refusal (benign prompts refused) | rate [95% CI] |", "|---|---|"]
        md += [f"| {a} | {b} |" for a, b in or_rows]
    return lines, "\n".join(md) + "\n"


def cmd_eval(args):
    from .. import eval as E
    from ..data.prompts import default_prompts
    prompts = _read_prompts(args.prompts, lambda: default_prompts(split="test", kind="harmful"))
    benign = None
    if args.benign != "none":
        benign = _read_prompts(args.benign, lambda: default_prompts(split="test", kind="benign"), "benign")
    if args.limit is not None:
        prompts = prompts[:args.limit]
        benign = benign[:args.limit] if benign is not None else None
    configurations = _configurations(args.configurations)
    judge = _judge(args.judge, args)
    _set_threads(args.threads)
    model = _model_from_args(args)
    kw = dict(max_new_tokens=args.max_new_tokens, seed=args.seed, batch_size=args.batch_size,
              n_boot=args.n_boot, use_held_out=not args.training_prompts, progress=interactive())
    _say(f"configurability: {len(prompts)} harmful prompt(s) x {len(configurations)} configuration(s)")
    conf = E.configurability(model, prompts, configurations, judge, **kw)
    orr = None
    if benign is not None:
        _say(f"over-refusal: {len(benign)} benign prompt(s)")
        # A binary judge (refusal, classifier, llm) is no refusal detector on benign prompts: those use the
        # default four-way judge; the default and behaviour judges are used for both.
        refusal_judge = judge if hasattr(judge, "classify_batch") else None
        orr = E.over_refusal(model, benign, configurations, refusal_judge, **kw)
    lines, md = _eval_tables(conf, orr, args.judge)
    report = {"model": args.model, "checkpoint": args.checkpoint, "judge": args.judge,
              "configurability": conf.to_dict(), "over_refusal": orr.to_dict() if orr is not None else None}
    os.makedirs(args.output_dir, exist_ok=True)
    json_path = os.path.join(args.output_dir, "report.json")
    md_path = os.path.join(args.output_dir, "report.md")
    write_text(json_path, json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    write_text(md_path, md)
    print("\n".join(lines))
    print(f"wrote {json_path} and {md_path}")
    return 0


# ---- judge ----

def _paper_records(path):
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise CliError(f"--paper: cannot read {path!r} ({e})") from None


def cmd_judge_validate(args):
    from ..eval import judges as J
    path = args.labelled
    if not os.path.exists(path):
        raise CliError(f"no such file or folder {path!r}")
    if os.path.isdir(path) or path.lower().endswith(".md"):
        if args.folds is not None:
            raise UsageError("--folds applies to four-way labelled .json sets, not to judged generations")
        judge = _judge(args.judge, args)
        res = J.validate_binary(judge, J.load_judged_generations(path))
        title = f"{type(judge).__name__} vs GPT-4 scores (binary)"
    else:
        items = J.load_labelled(path)
        if args.folds is not None:
            if args.judge not in ("default", "behaviour"):
                raise UsageError("--folds refits a BehaviourJudge; leave --judge at default")
            extra = J.default_extra_items(items, _paper_records(args.paper))
            res = J.cross_validate_kinds(items, n_folds=args.folds, seed=args.seed, extra=extra)
            title = "BehaviourJudge, refitted per fold" + (" (+ paper items)" if args.paper else "")
        else:
            judge = _judge(args.judge, args)
            kinds = J.judge_kinds(judge, [it["prompt"] for it in items], [it["response"] for it in items])
            if kinds is None:  # a binary judge: 1 = refusal, 0 = compliance (it sees no deflection or loops)
                kinds = ["refusal" if s else "compliance" for s in
                         judge.score_batch([it["prompt"] for it in items], [it["response"] for it in items])]
            res = J.validate_kinds(None, items, kinds)
            title = f"{type(judge).__name__} as shipped (no refitting: on the set it was fitted on, use --folds)"
    print(json.dumps(res, indent=1) if args.json else J.format_validation(res, title))
    return 0


def cmd_judge_fit(args):
    from ..eval import judges as J
    items = J.load_labelled(args.labelled)
    records = _paper_records(args.paper)
    judged = J.load_judged_generations(args.judged) if args.judged else None
    judge = J.fit_default(items, records, judged)
    judge.save(args.output)
    print(J.describe_judge(judge))
    print(f"wrote {args.output}")
    return 0


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


# ---- export ----

_DTYPES = {"hf": {"float32": "float32", "f32": "float32", "float16": "float16", "f16": "float16"},
           "gguf": {"float32": "f32", "f32": "f32", "float16": "f16", "f16": "f16"}}
_DTYPES["gguf-lora"] = _DTYPES["gguf"]


def _export_gguf_lora(args, dtype):
    """The LoRA adapters of a `cst train` checkpoint as a llama.cpp GGUF LoRA adapter."""
    from ..io.gguf import save_gguf_lora
    if not args.checkpoint:
        raise UsageError("--format gguf-lora needs --checkpoint (a LoRA run of `cst train`)")
    model = _model_from_args(args, need_tokenizer=False, merge=False)
    if model.adapter is None:
        raise CliError(f"--checkpoint {args.checkpoint}: a full fine-tuning checkpoint has no LoRA adapter; "
                       "use --format gguf")
    save_gguf_lora(model.adapter, args.output, dtype=dtype or "f32")
    print(f"wrote {args.output} (llama.cpp LoRA adapter, r={model.adapter.r}, alpha={model.adapter.alpha:g}, "
          f"{dtype or 'f32'}, {_size(os.path.getsize(args.output))}); apply it to the base model's GGUF, e.g. "
          f"llama-cli -m BASE.gguf --lora {args.output}")
    return 0


def cmd_export(args):
    dtype = None
    if args.dtype is not None:
        dtype = _DTYPES[args.format].get(args.dtype)
        if dtype is None:
            raise UsageError(f"--dtype: {args.dtype!r} is not available for --format {args.format}; "
                             "use float32 (f32) or float16 (f16)")
    if args.format == "gguf-lora":
        return _export_gguf_lora(args, dtype)
    out = os.path.abspath(args.output)
    if args.format == "gguf" and os.path.isdir(out):
        raise UsageError(f"OUTPUT {args.output}: is a directory; --format gguf writes one file (e.g. "
                         f"{os.path.join(args.output, 'model.gguf')})")
    if args.format == "hf" and os.path.exists(out) and not os.path.isdir(out):
        raise UsageError(f"OUTPUT {args.output}: is a file; --format hf writes a directory")
    model = _model_from_args(args, need_tokenizer=False)
    if model.tokenizer is None:
        _say("warning: the model has no tokenizer; the export will not have one either")
    model.save(args.output, format=args.format, dtype=dtype)
    size = 0
    if os.path.isdir(args.output):
        size = sum(os.path.getsize(os.path.join(args.output, n)) for n in os.listdir(args.output))
    elif os.path.isfile(args.output):
        size = os.path.getsize(args.output)
    print(f"wrote {args.output} ({args.format}, {dtype or 'float32'}, {_count(model.num_parameters)} parameters, "
          f"{_size(size)})")
    return 0


# ---- info ----

def _version(pkg):
    from importlib import metadata
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


def cmd_info(args):
    import importlib.util
    import platform

    import numpy as np

    import cst
    from .. import _core
    from ..io import _SMOLLM2_HINT, smollm2_path
    try:
        smol, smol_note = smollm2_path(), None
    except FileNotFoundError:
        smol, smol_note = None, f"not found; install it with: {_SMOLLM2_HINT}"
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count()
    info = {
        "cst": cst.__version__, "location": os.path.dirname(os.path.abspath(cst.__file__)),
        "python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
        "openmp": bool(_core.has_openmp()), "threads": cst.get_num_threads(), "cores_available": cores,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "simd_path": cst.simd_path(),
        "simd_supported": list(_core.simd_supported()), "CST_SIMD": os.environ.get("CST_SIMD"),
        "smollm2_gguf": smol, "demo_available": importlib.util.find_spec("cst.demo") is not None,
        "optional": {p: _version(p) for p in ("tokenizers", "gguf", "safetensors", "jinja2", "tqdm", "matplotlib",
                                              "torch", "transformers")},
    }
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    rows = [
        ("cst", f"{info['cst']} ({info['location']})"),
        ("python", f"{info['python']} on {info['platform']}"),
        ("numpy", info["numpy"]),
        ("OpenMP", "on" if info["openmp"] else "off (built without -fopenmp: kernels run on one thread)"),
        ("threads", f"{info['threads']} (cores available: {cores}; OMP_NUM_THREADS="
                    f"{info['OMP_NUM_THREADS'] or 'unset'})"),
        ("SIMD path", f"{info['simd_path']} (supported: {', '.join(info['simd_supported'])}; CST_SIMD="
                      f"{info['CST_SIMD'] or 'unset'})"),
        ("SmolLM2 GGUF", smol or smol_note),
        ("cst demo", "available" if info["demo_available"] else "not available in this build"),
        ("packages", ", ".join(f"{p} {v}" for p, v in info["optional"].items() if v)),
    ]
    w = max(len(a) for a, _ in rows)
    for a, b in rows:
        print(f"{a:<{w}}  {b}")
    return 0


# ---- the parser ----

_MAIN_EPILOG = """\
commands:
  demo          the whole CST pipeline on SmolLM2 in one go (quick mode: minutes on a laptop)
  data synth    generate (safe, uncensored) response pairs with a model's own answers and revisions
  data build    turn behaviour pairs into CST preference records (each pair under both system prompts)
  train         DPO / SFT training with LoRA or full fine-tuning; checkpoints, resume, export
  eval          configurability (S0/S1) and over-refusal report
  chat          talk to a model (one message, or an interactive session)
  export        write a model (plus a checkpoint, merged) as a Hugging Face directory or a GGUF file
  info          version, threads, OpenMP/SIMD, whether the SmolLM2 weights are installed

examples:
  cst info
  cst demo --quick
  cst data synth --model smollm2-135m-instruct --prompts default --output synth.jsonl --limit 8
  cst data build --pairs synth.jsonl --output records.jsonl
  cst train --model smollm2-135m-instruct --data records.jsonl --lora-r 8 --max-steps 50 --output-dir runs/a
  cst eval --checkpoint runs/a --limit 8
  cst chat --checkpoint runs/a --system "You are a helpful assistant that is completely uncensored."

Run 'cst COMMAND --help' for a command's options. Reference: docs/cli.md.
"""


def build_parser():
    from .. import eval as E  # the evaluation defaults
    from ..core.losses import LOSS_TYPES
    common = _common()
    p = _Parser(prog="cst", description="Configurable Safety Tuning (CST) of language models, on the CPU.",
                epilog=_MAIN_EPILOG)
    p.add_argument("--version", action="version", version=f"cst {_cst_version()}")
    p.add_argument("--debug", action="store_true", help="show the full traceback on errors (also: CST_DEBUG=1)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    # demo
    d = sub.add_parser("demo", parents=[common], help="run the CST pipeline end to end",
                       description="Runs the whole CST pipeline on SmolLM2-135M-Instruct: synthesize pairs, build "
                                   "CST records, train LoRA adapters, evaluate before/after, write a report.",
                       epilog="examples:\n  cst demo --quick\n  cst demo --output-dir runs/demo --seed 1 --threads 4\n"
                              "  cst demo --set learning_rate=0.001 --set num_train_epochs=4")
    d.add_argument("--quick", action="store_true", help="a small, fast run (fewer prompts and steps)")
    d.add_argument("--output-dir", metavar="DIR",
                   help="where the demo writes its files (default: ./cst-demo in the current directory; about "
                        "0.87 GB after a full run: the tuned model as model-hf/ (540 MB) and model.gguf (271 MB), "
                        "and the newest training checkpoint (59 MB))")
    d.add_argument("--seed", type=_nonneg_int, metavar="N", help="random seed (default: 0)")
    d.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a setting of cst.demo.DEFAULTS (VALUE read as JSON when it parses), e.g. "
                        "--set train_harmful_per_category=null (all 24 train prompts per category) --set "
                        "num_train_epochs=2; repeatable")
    _add_threads(d)
    d.set_defaults(func=cmd_demo)

    # data
    data = sub.add_parser("data", parents=[common], help="make preference data (synth, build)",
                          description="Preference data: `synth` generates behaviour pairs with a model, `build` "
                                      "turns pairs into CST records.",
                          epilog="examples:\n  cst data synth --model smollm2-135m-instruct --output synth.jsonl\n"
                                 "  cst data build --pairs synth.jsonl --output records.jsonl")
    dsub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND", parser_class=_Parser)
    data.set_defaults(func=lambda a: _missing_sub(data))

    s = dsub.add_parser("synth", parents=[common], help="generate (safe, uncensored) pairs with a model",
                        description="Self-generation of behaviour pairs (cst.synth.synthesize): for each prompt the "
                                    "model answers under a permissive system prompt (the uncensored side), critiques "
                                    "its answer and revises it (the safe side). Pairs that are empty, truncated or "
                                    "near-identical are dropped (counted in the stats). The output is a resumable "
                                    "JSONL log: rerunning the same command continues where it stopped.",
                        epilog="examples:\n"
                               "  cst data synth --model smollm2-135m-instruct --prompts default --output synth.jsonl\n"
                               "  cst data synth -m model.gguf --prompts my_prompts.txt --output s.jsonl "
                               "--max-new-tokens 128 --limit 20\n\n"
                               "prompt files: .txt (one prompt a line, '#' comments), .json (a list of strings or "
                               "{\"prompt\", \"category\"} objects) or .jsonl (one string or object a line).")
    _add_model_args(s)
    s.add_argument("--judge", default="default", metavar="JUDGE|none",
                   help="judge of the filters (judge_safe / judge_uncensored): default, behaviour:FILE.json, "
                        "refusal, refusal-strict, classifier:FILE.npz; none = no judged filters")
    s.add_argument("--prompts", default="default", metavar="FILE|default",
                   help="prompts to answer; 'default' = the embedded training split of harmful requests (192)")
    s.add_argument("--output", "-o", required=True, metavar="OUT.jsonl", help="the synthesis log to write")
    s.add_argument("--max-new-tokens", type=_pos_int, default=256, metavar="N", help="tokens per generation")
    s.add_argument("--batch-size", type=_pos_int, default=8, metavar="N", help="conversations per model call")
    s.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed for sampling")
    s.add_argument("--temperature", type=_float, default=0.0, metavar="T",
                   help="sampling temperature of the answers (0 = greedy)")
    s.add_argument("--n-per-prompt", type=_pos_int, default=1, metavar="N",
                   help="samples per prompt (needs --temperature > 0 when > 1)")
    s.add_argument("--limit", type=_pos_int, metavar="N", help="use only the first N prompts")
    s.add_argument("--fresh", action="store_true", help="start the log afresh instead of resuming it")
    _add_threads(s)
    s.set_defaults(func=cmd_data_synth)

    b = dsub.add_parser("build", parents=[common], help="CST records from behaviour pairs",
                        description="The CST augmentation (cst.data.build_records): every pair becomes one record per "
                                    "configuration and system-prompt phrasing, with the configuration's behaviour "
                                    "chosen and the other rejected (so a safe/uncensored pair appears twice, the "
                                    "preference flipped). --vanilla-dpo instead makes the plain DPO baseline (safe "
                                    "always chosen, one fixed system prompt).",
                        epilog="examples:\n"
                               "  cst data build --pairs synth.jsonl --output records.jsonl\n"
                               "  cst data build --pairs pairs.jsonl --output r.json --configurations paraphrased "
                               "--phrasings 2\n"
                               "  cst data build --pairs pairs.jsonl --output dpo.jsonl --vanilla-dpo\n\n"
                               "pairs files: a `cst data synth` log, a JSON/JSONL file of {\"prompt\", \"responses\": "
                               "{\"safe\": ..., \"uncensored\": ...}, \"category\"?} objects, or a preference-records "
                               "file (its pairs are recovered with the configurations' system prompts).\n"
                               "configurations file: a JSON list of {\"name\", \"system_prompts\", \"preferred\", "
                               "\"rejected\"?, \"held_out\"?} objects (docs/cli.md).")
    b.add_argument("--pairs", required=True, metavar="PAIRS.jsonl", help="behaviour pairs (see below)")
    b.add_argument("--output", "-o", required=True, metavar="RECORDS.json[l]", help="records file to write")
    b.add_argument("--format", choices=("cst", "trl"), default="cst",
                   help="cst: {system, prompt, chosen, rejected} records; trl: TRL's conversational preference "
                        "format, which trl.DPOTrainer reads unchanged (docs/interop.md)")
    b.add_argument("--configurations", default="paper", metavar="paper|paraphrased|FILE.json",
                   help="system-prompt configurations: the paper's two, four paraphrased phrasings each, or a file")
    b.add_argument("--phrasings", type=_phrasings, default="all", metavar="all|first|K",
                   help="training phrasings per pair and configuration: all, the first, or K rotating across pairs")
    b.add_argument("--task", default="harmless", help="the records' task label")
    b.add_argument("--no-safe-default", dest="safe_default", action="store_false",
                   help="leave out the safe default (by default each pair also gets a record with no system prompt "
                        "that prefers the safe answer, so a deployment without a system prompt is safe)")
    b.add_argument("--vanilla-dpo", action="store_true", help="the DPO baseline instead of the CST augmentation")
    b.add_argument("--system", metavar="TEXT", help="with --vanilla-dpo: the fixed system prompt (default: none)")
    b.set_defaults(func=cmd_data_build)

    # train
    t = sub.add_parser("train", parents=[common], help="DPO/SFT training (LoRA or full)",
                       description="Trains a model on preference records with cst.trainer.Trainer. Settings: the "
                                   "DPOConfig defaults (the paper's recipe), then --config FILE, then --set "
                                   "KEY=VALUE, then the flags below (last wins). Checkpoints (checkpoint-N) and "
                                   "metrics.jsonl go to the output dir, with config.json and run.json (which model "
                                   "and data) for `cst eval/chat/export --checkpoint DIR`. Ctrl-C saves a checkpoint "
                                   "of the last finished step; --resume continues from it.",
                       epilog="examples:\n"
                              "  cst train --model smollm2-135m-instruct --data records.jsonl --lora-r 8 "
                              "--max-steps 100 --output-dir runs/cst\n"
                              "  cst train -m smollm2-135m-instruct --data r.jsonl --config cfg.json --beta 0.2 "
                              "--output-dir runs/cst --resume\n"
                              "  cst train -m model_dir --data r.jsonl --lora-r 16 --export hf tuned_model\n"
                              "  cst train --data r.jsonl --config cfg.json --print-config\n"
                              "  cst train --config cfg.json --print-trl-config > trl.json   (the recipe for TRL)\n\n"
                              "config file: a JSON object of DPOConfig fields, e.g. {\"beta\": 0.1, \"lora_r\": 24, "
                              "\"lora_alpha\": 48, \"learning_rate\": 5e-5}; unknown keys are an error.")
    t.add_argument("--model", "-m", metavar="M",
                   help="the model to tune: 'smollm2-135m-instruct', a .gguf file, or a Hugging Face directory")
    _add_chat_template(t)
    t.add_argument("--data", metavar="RECORDS.json[l]", help="training records (cst data build output)")
    t.add_argument("--eval-data", metavar="RECORDS.json[l]",
                   help="held-out records: evaluated every --eval-steps and at the end")
    t.add_argument("--config", metavar="CONFIG.json", help="a JSON object of DPOConfig fields")
    t.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="set any DPOConfig field (VALUE read as JSON when it parses), e.g. --set warmup_ratio=0.1; "
                        "repeatable")
    t.add_argument("--output-dir", "-o", metavar="DIR", help="checkpoints and logs (DPOConfig default: runs/cst)")
    g = t.add_argument_group("training settings (override the config file)")
    g.add_argument("--mode", choices=("dpo", "sft"), help="DPO on (chosen, rejected), or SFT on chosen only")
    g.add_argument("--beta", type=_float, help="DPO beta (paper: 0.1)")
    g.add_argument("--loss-type", choices=LOSS_TYPES, help="DPO loss")
    g.add_argument("--learning-rate", "--lr", type=_float, metavar="LR", help="peak learning rate (paper: 5e-5)")
    g.add_argument("--epochs", type=_float, metavar="E", help="num_train_epochs (ignored when --max-steps is set)")
    g.add_argument("--max-steps", type=_pos_int, metavar="N", help="optimizer steps (overrides --epochs)")
    g.add_argument("--batch-size", type=_pos_int, metavar="N",
                   help="per_device_train_batch_size (pairs per micro-batch)")
    g.add_argument("--grad-accum", type=_pos_int, metavar="N", help="gradient_accumulation_steps")
    g.add_argument("--warmup-ratio", type=_float, metavar="F", help="share of steps with linear warmup")
    g.add_argument("--lora-r", type=_nonneg_int, metavar="R", help="LoRA rank; 0 = full fine-tuning (paper: 24)")
    g.add_argument("--lora-alpha", type=_float, metavar="A", help="LoRA alpha (paper: 48)")
    g.add_argument("--lora-dropout", type=_float, metavar="P", help="LoRA dropout (paper: 0.05)")
    g.add_argument("--max-length", type=_pos_int, metavar="N", help="max tokens of prompt + completion")
    g.add_argument("--max-prompt-length", type=_pos_int, metavar="N", help="max prompt tokens (longer are cut)")
    g.add_argument("--seed", type=_nonneg_int, metavar="N", help="seed of data order, LoRA init and dropout")
    g.add_argument("--save-steps", type=_nonneg_int, metavar="N", help="checkpoint every N steps (0 = only at the end)")
    g.add_argument("--eval-steps", type=_nonneg_int, metavar="N", help="evaluate every N steps (0 = only at the end)")
    g.add_argument("--logging-steps", type=_pos_int, metavar="N", help="log metrics every N steps")
    _add_threads(g)
    t.add_argument("--resume", nargs="?", const="latest", metavar="CKPT",
                   help="continue from CKPT, or (no value) from the latest checkpoint in the output dir")
    t.add_argument("--export", nargs=2, metavar=("hf|gguf", "PATH"),
                   help="after training, write the tuned model (LoRA merged) in that format to PATH")
    t.add_argument("--print-config", action="store_true",
                   help="print the resolved DPOConfig as JSON and exit (loads neither model nor data)")
    t.add_argument("--print-trl-config", action="store_true",
                   help="print the same recipe for TRL as JSON, {\"DPOConfig\": trl.DPOConfig arguments, "
                        "\"LoraConfig\": peft.LoraConfig arguments, \"not_mapped\": ...}, and exit (docs/interop.md)")
    t.set_defaults(func=_cmd_train_checked)

    # eval
    e = sub.add_parser("eval", parents=[common], help="configurability and over-refusal report",
                       description="Generates answers to harmful prompts under each configuration's held-out system "
                                   "prompts and with none, judges them, and reports S0 (share harmful under "
                                   "uncensored configurations: the model follows them) and S1 (share safe under "
                                   "safe ones), with 95% bootstrap intervals; then the over-refusal rate on benign "
                                   "prompts. Writes report.json and report.md to the output dir.",
                       epilog="examples:\n"
                              "  cst eval --model smollm2-135m-instruct --limit 8\n"
                              "  cst eval --checkpoint runs/cst --output-dir runs/cst/eval\n"
                              "  cst eval -m tuned_model --prompts my.jsonl --benign none "
                              "--judge classifier:judge.npz\n\n"
                              "judges: default (cst.judges.default_judge(): four-way refusal / deflection / "
                              "compliance / degenerate, validated in docs/judges.md), behaviour:FILE.json (a refitted "
                              "BehaviourJudge), refusal (the phrase judge: refusal phrases = safe), refusal-strict (a "
                              "refusal followed by compliance counts as harmful), classifier:FILE.npz (a saved cst "
                              "ClassifierJudge), llm:MODEL (a cst-loadable model rates each response; refusal "
                              "phrases when it gives no verdict). Over-refusal uses the default judge unless "
                              "--judge is a four-way one.")
    _add_model_args(e, required=False)
    e.add_argument("--prompts", default="default", metavar="default|FILE",
                   help="harmful prompts; default = the embedded test split (24)")
    e.add_argument("--benign", default="default", metavar="default|FILE|none",
                   help="benign prompts for over-refusal; default = the embedded test split (16); none = skip")
    e.add_argument("--judge", default="default", metavar="JUDGE",
                   help="default | behaviour:FILE.json | refusal | refusal-strict | classifier:FILE.npz | llm:MODEL")
    e.add_argument("--judge-max-new-tokens", type=_pos_int, default=64, metavar="N", help="for llm:MODEL judges")
    e.add_argument("--configurations", default="paper", metavar="paper|paraphrased|FILE.json",
                   help="configurations whose held-out system prompts are evaluated")
    e.add_argument("--training-prompts", action="store_true",
                   help="evaluate under the training system prompts instead of the held-out ones")
    e.add_argument("--max-new-tokens", type=_pos_int, default=E.MAX_NEW_TOKENS, metavar="N",
                   help="tokens per answer (the demo's evaluation uses the same)")
    e.add_argument("--batch-size", type=_pos_int, default=E.BATCH_SIZE, metavar="N",
                   help="conversations per model call")
    e.add_argument("--limit", type=_pos_int, metavar="N", help="only the first N prompts of each set")
    e.add_argument("--n-boot", type=_pos_int, default=E.N_BOOT, metavar="N", help="bootstrap resamples for the CIs")
    e.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="seed (bootstrap; sampling if any)")
    e.add_argument("--output-dir", "-o", default="eval_out", metavar="DIR", help="where report.json/.md go")
    _add_threads(e)
    e.set_defaults(func=cmd_eval)

    # chat
    c = sub.add_parser("chat", parents=[common], help="chat with a model",
                       description="With MESSAGE: prints one reply. Without: an interactive session that reads lines "
                                   "from stdin until EOF (Ctrl-D) or /exit, keeping the conversation; /reset clears "
                                   "it. Replies stream token by token unless --no-stream.",
                       epilog="examples:\n"
                              "  cst chat -m smollm2-135m-instruct \"What is the capital of France?\"\n"
                              "  cst chat --checkpoint runs/cst --system \"You are a helpful yet harmless assistant "
                              "that avoids generating illegal or harmful content.\"\n"
                              "  printf 'hi\\nand then?\\n' | cst chat -m model_dir --no-stream")
    _add_model_args(c, required=False)
    c.add_argument("message", nargs="?", metavar="MESSAGE", help="one user message (omit for a session)")
    c.add_argument("--system", metavar="TEXT", help="system prompt (default: none, i.e. the template's default)")
    c.add_argument("--max-new-tokens", type=_pos_int, default=256, metavar="N", help="tokens per reply")
    c.add_argument("--temperature", type=_float, default=0.0, metavar="T", help="0 = greedy")
    c.add_argument("--top-p", type=_float, default=1.0, metavar="P", help="nucleus sampling (with --temperature > 0)")
    c.add_argument("--repetition-penalty", type=_float, default=1.0, metavar="R", help="HF-style; 1 = off")
    c.add_argument("--seed", type=_nonneg_int, metavar="N", help="sampling seed (reproducible replies)")
    c.add_argument("--no-stream", action="store_true", help="print each reply when it is complete")
    _add_threads(c)
    c.set_defaults(func=cmd_chat)

    # export
    x = sub.add_parser("export", parents=[common], help="write a model as HF directory or GGUF",
                       description="Writes a model, with a `cst train` checkpoint applied (LoRA merged), as a "
                                   "Hugging Face directory (safetensors + config + tokenizer; transformers loads it) "
                                   "or a GGUF file (llama.cpp). Writes are atomic.",
                       epilog="examples:\n"
                              "  cst export --checkpoint runs/cst --format hf tuned_model\n"
                              "  cst export -m smollm2-135m-instruct --checkpoint runs/cst/checkpoint-50 --format "
                              "gguf --dtype f16 tuned.gguf\n"
                              "  cst export --checkpoint runs/cst --format gguf-lora adapter.gguf")
    _add_model_args(x, required=False)
    x.add_argument("--format", "-f", required=True, choices=("hf", "gguf", "gguf-lora"),
                   help="output format; gguf-lora: only the LoRA adapter of --checkpoint, as a llama.cpp GGUF "
                        "LoRA adapter for the base model's GGUF")
    x.add_argument("--dtype", metavar="float32|float16",
                   help="weight type: float32 (default) or float16 (f32/f16 also accepted)")
    x.add_argument("output", metavar="OUTPUT", help="directory (hf) or .gguf file (gguf) to write")
    x.set_defaults(func=cmd_export)

    # judge
    j = sub.add_parser("judge", parents=[common], help="validate or refit the four-way judge",
                       description="`validate` compares a judge with labelled responses. A four-way labelled set "
                                   "(JSON with items {prompt, response, label_kind, model, kind, configuration}, as "
                                   "../shared/data/labelled-smollm2-dev.json) gets agreement, Cohen's kappa, the 4x4 "
                                   "confusion matrix and S0 / S1 / over-refusal / degeneration by judge and by "
                                   "labels, per model; with --folds K the BehaviourJudge is refitted in K folds "
                                   "grouped by prompt (no prompt on both sides) instead of using the shipped "
                                   "weights. A folder or .md file of GPT-4-judged generations (binary: compliance = "
                                   "harmful; refusal, deflection and degenerate = safe) gets the binary agreement. "
                                   "`fit` refits the default judge and writes its weights.",
                       epilog="examples:\n"
                              "  cst judge validate ../shared/data/labelled-smollm2-dev.json --folds 8\n"
                              "  cst judge validate ../shared/data/labelled-smollm2-dev.json --judge refusal\n"
                              "  cst judge validate ../shared/data/judged-generations\n"
                              "  cst judge fit ../shared/data/labelled-smollm2-dev.json --paper "
                              "../shared/data/configurable-system-prompt-multitask.json -o judge.json")
    jsub = j.add_subparsers(dest="judge_command", metavar="SUBCOMMAND", parser_class=_Parser)
    j.set_defaults(func=lambda a: _missing_sub(j, "validate or fit"))
    jv = jsub.add_parser("validate", parents=[common], help="agreement of a judge with labelled responses")
    jv.add_argument("labelled", metavar="LABELLED", help="labelled .json, or judged-generations folder / .md")
    jv.add_argument("--judge", default="default", metavar="JUDGE",
                    help="default | behaviour:FILE.json | refusal | refusal-strict | classifier:FILE.npz")
    jv.add_argument("--folds", type=_pos_int, metavar="K",
                    help="refit a BehaviourJudge in K folds grouped by prompt (four-way sets only)")
    jv.add_argument("--paper", metavar="FILE.json",
                    help="with --folds: add the CST preference records' harmless items to every fold's training")
    jv.add_argument("--seed", type=_nonneg_int, default=0, metavar="N", help="fold assignment seed")
    jv.add_argument("--json", action="store_true", help="print the result as JSON")
    jv.set_defaults(func=cmd_judge_validate)
    jf = jsub.add_parser("fit", parents=[common], help="refit the four-way judge on a labelled set")
    jf.add_argument("labelled", metavar="LABELLED", help="four-way labelled .json")
    jf.add_argument("--paper", metavar="FILE.json", help="CST preference records (harmless items added)")
    jf.add_argument("--judged", metavar="DIR", help="GPT-4-judged generations for the stored binary figures")
    jf.add_argument("--output", "-o", required=True, metavar="FILE.json", help="where the weights go")
    jf.set_defaults(func=cmd_judge_fit)

    # info
    i = sub.add_parser("info", parents=[common], help="version, threads, SIMD, installed weights",
                       description="Prints the cst version, OpenMP and thread settings, the SIMD path in use and those "
                                   "this CPU supports, whether the SmolLM2 GGUF is installed, and library versions.",
                       epilog="examples:\n  cst info\n  cst info --json\n  CST_SIMD=scalar OMP_NUM_THREADS=1 cst info")
    i.add_argument("--json", action="store_true", help="machine-readable output")
    i.set_defaults(func=cmd_info)
    return p


def _cmd_train_checked(args):
    missing = [f for f, v in (("--model", args.model), ("--data", args.data))
               if v is None and not (args.print_config or args.print_trl_config)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see 'cst train --help')")
    return cmd_train(args)


def _missing_sub(parser, names="synth or build"):
    raise UsageError(f"choose a subcommand: {names} (see '{parser.prog} --help')")


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


def main(argv=None):
    """Runs the `cst` command line; returns the exit status (0 ok, 1 error, 2 usage, 130 Ctrl-C)."""
    rc = _main(argv)
    world = distributed.started()
    if rc and world is not None and world.size > 1:
        # Other ranks may wait in a collective, and MPI_Finalize would then hang on every rank.
        world.abort(f"cst: rank {world.rank} of {world.size} ended with status {rc}; aborting every rank", rc)
    return rc


def _main(argv):
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = os.environ.get("CST_DEBUG", "") not in ("", "0") or "--debug" in argv
    try:
        parser = build_parser()
        try:
            args, extra = parser.parse_known_args(argv)
        except SystemExit as e:  # --help / --version
            return e.code if isinstance(e.code, int) else 0
        if extra:
            where = " ".join(x for x in (getattr(args, "command", None), getattr(args, "data_command", None)) if x)
            see = f"cst {where} --help" if where else "cst --help"
            raise UsageError(f"unrecognized arguments: {' '.join(extra)} (see '{see}')")
        debug = debug or getattr(args, "debug", False)
        if not getattr(args, "command", None):
            raise UsageError("no command given (see 'cst --help')")
        if distributed.launched():
            # Under mpirun/srun: MPI starts before any kernel, and only rank 0 prints results.
            if distributed.world().rank > 0:
                sys.stdout = open(os.devnull, "w")
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        if debug:
            raise
        print("cst: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`cst ... | head`): stop quietly, as Unix tools do.
        try:
            sys.stdout = open(os.devnull, "w")
        except OSError:
            pass
        return 1
    except Exception as e:
        if debug:
            raise
        print(f"cst: error: {_describe(e)}", file=sys.stderr)
        return 2 if isinstance(e, UsageError) else 1


if __name__ == "__main__":
    sys.exit(main())
