"""`cst data synth` and `cst data build`: behaviour pairs from a model (cst.synth), CST records from
pairs (cst.data)."""
import argparse
import json
import os

from ..core.runtime import interactive
from .common import (
    CliError, UsageError, _configurations, _model_from_args, _read_json, _read_prompts, _say, _set_threads)
from .eval import _judge


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
                         n_per_prompt=args.n_per_prompt, resume=not args.fresh, progress=interactive(),
                         min_compliance=args.min_compliance)
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
