"""`cst eval`: configurability and over-refusal reports (cst.eval) with a chosen judge."""
import json
import os

from ..core.atomic import write_text
from ..core.runtime import interactive
from .common import (
    CliError, UsageError, _configurations, _load_model, _model_from_args, _read_prompts, _say, _set_threads)


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


def _labelled_paths(paths):
    for p in paths:
        if not os.path.isfile(p):
            raise CliError(f"no such file {p!r}")
    return paths


def cmd_judge_validate(args):
    from ..eval import judges as J
    paths = args.labelled
    for path in paths:
        if not os.path.exists(path):
            raise CliError(f"no such file or folder {path!r}")
    if any(os.path.isdir(p) or p.lower().endswith(".md") for p in paths):
        if len(paths) > 1:
            raise UsageError("judged generations (a folder or .md file) are validated one at a time")
        if args.folds is not None:
            raise UsageError("--folds applies to four-way labelled .json sets, not to judged generations")
        judge = _judge(args.judge, args)
        res = J.validate_binary(judge, J.load_judged_generations(paths[0]))
        title = f"{type(judge).__name__} vs GPT-4 scores (binary)"
    else:
        items, _ = J.load_labelled_sets(paths)
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
    items, names = J.load_labelled_sets(_labelled_paths(args.labelled))
    held_paths = _labelled_paths(args.held_out or [])
    try:
        held_names = J.labelled_set_names(held_paths)
    except ValueError as e:
        raise UsageError(f"--held-out: {e}") from None
    # a held-out file that is also a fit set has a fit set's name: fit_default refuses it
    held_out = {n: J.load_labelled(p) for n, p in zip(held_names, held_paths)}
    records = _paper_records(args.paper)
    judged = J.load_judged_generations(args.judged) if args.judged else None
    judge = J.fit_default(items, records, judged, fit_sets=names, held_out=held_out)
    judge.save(args.output)
    print(J.describe_judge(judge))
    print(f"wrote {args.output}")
    return 0
