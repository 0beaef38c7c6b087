"""`cst train`: DPOConfig from a config file, --set and flags; cst.Trainer; export of the result."""
import json
import os
import time

from ..core.atomic import write_text
from ..train.trainer import find_checkpoint
from .common import (
    CliError, RUN_FILE, UsageError, _check_model_source, _load_model, _parse_set, _read_json, _say,
    _use_chat_template)


# ---- train ----

# cst train's settings flags, one row per DPOConfig field: (field, help, flag, metavar). The flag is the
# field's name with dashes where it maps 1:1 (flag None), and its type and choices come from the field
# (cst.train.config's annotations and choice lists). Fields where 0 means "off" (None in the config) are
# in _ZERO_IS_NONE.
_SETTINGS = (
    ("mode", "DPO on (chosen, rejected), or SFT on chosen only", None, None),
    ("beta", "DPO beta (paper: 0.1)", None, None),
    ("loss_type", "DPO loss", None, None),
    ("learning_rate", "peak learning rate (paper: 5e-5)", "--learning-rate", "LR"),
    ("num_train_epochs", "num_train_epochs (ignored when --max-steps is set)", "--epochs", "E"),
    ("max_steps", "optimizer steps (overrides --epochs)", None, "N"),
    ("per_device_train_batch_size", "per_device_train_batch_size (pairs per micro-batch)", "--batch-size", "N"),
    ("gradient_accumulation_steps", "gradient_accumulation_steps", "--grad-accum", "N"),
    ("warmup_ratio", "share of steps with linear warmup", None, "F"),
    ("lora_r", "LoRA rank; 0 = full fine-tuning (paper: 24)", None, "R"),
    ("lora_alpha", "LoRA alpha (paper: 48)", None, "A"),
    ("lora_dropout", "LoRA dropout (paper: 0.05)", None, "P"),
    ("max_length", "max tokens of prompt + completion", None, "N"),
    ("max_prompt_length", "max prompt tokens (longer are cut)", None, "N"),
    ("seed", "seed of data order, LoRA init and dropout", None, "N"),
    ("save_steps", "checkpoint every N steps (0 = only at the end)", None, "N"),
    ("eval_steps", "evaluate every N steps (0 = only at the end)", None, "N"),
    ("logging_steps", "log metrics every N steps", None, "N"),
)
_ZERO_IS_NONE = ("lora_r", "save_steps", "eval_steps")


def _flag(field, flag):
    return flag or "--" + field.replace("_", "-")


def add_settings_flags(group):
    """The _SETTINGS flags on an argparse group: float fields read as finite floats, int fields as ints
    >= 1 (>= 0 where 0 is allowed or means off), fields with a fixed list of values as choices."""
    import typing

    from ..train import config as C
    from .common import _float, _nonneg_int, _pos_int
    choices = {"mode": C.MODES, "loss_type": C.LOSS_TYPES, "lr_scheduler_type": C.LR_SCHEDULERS}
    hints = typing.get_type_hints(C.DPOConfig)
    for field, help_, flag, metavar in _SETTINGS:
        kind = {a for a in typing.get_args(hints[field]) if a is not type(None)} or {hints[field]}
        kw = {"help": help_, "dest": _dest(field, flag)}
        if field in choices:
            kw["choices"] = choices[field]
        elif float in kind:
            kw["type"] = _float
        elif int in kind:
            kw["type"] = _nonneg_int if field in _ZERO_IS_NONE or field == "seed" else _pos_int
        else:
            raise TypeError(f"add_settings_flags: DPOConfig.{field} is neither float, int nor a choice")
        if metavar:
            kw["metavar"] = metavar
        names = [_flag(field, flag)] + (["--lr"] if field == "learning_rate" else [])
        group.add_argument(*names, **kw)


def _dest(field, flag):
    return _flag(field, flag)[2:].replace("-", "_")


# flag dest -> DPOConfig field (the settings flags, --threads and --output-dir)
_OVERRIDES = {_dest(field, flag): field for field, _, flag, _ in _SETTINGS}
_OVERRIDES.update(threads="num_threads", output_dir="output_dir")
_FLAG = {field: "--" + dest.replace("_", "-") for dest, field in _OVERRIDES.items()}


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
            if field in _ZERO_IS_NONE and v == 0:
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


def _cmd_train_checked(args):
    missing = [f for f, v in (("--model", args.model), ("--data", args.data))
               if v is None and not (args.print_config or args.print_trl_config)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see 'cst train --help')")
    return cmd_train(args)
