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


def _cmd_train_checked(args):
    missing = [f for f, v in (("--model", args.model), ("--data", args.data))
               if v is None and not (args.print_config or args.print_trl_config)]
    if missing:
        raise UsageError(f"the following arguments are required: {', '.join(missing)} (see 'cst train --help')")
    return cmd_train(args)
