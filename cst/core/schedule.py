"""Learning-rate schedules of transformers' get_scheduler ("constant", "linear", "cosine", with linear
warmup), as a pure function of the step, plus the step/warmup arithmetic of the HF Trainer. Not an
optimizer: the training loop sets its learning rate from lr_at before each update.

Step convention (as in a torch LambdaLR driven by the HF Trainer): ``step`` counts the optimizer
updates already done, so the first update uses lr_at(0, ...), which is 0 when warmup_steps > 0.
"""
import math

SCHEDULERS = ("constant", "linear", "cosine")


def _check_int(name, v, lo):
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ValueError(f"{name} must be an int >= {lo}, got {v!r}")


def lr_multiplier(step: int, total_steps: int, scheduler: str, warmup_steps: int = 0) -> float:
    """The factor that multiplies base_lr at ``step``.

    constant: 1, or constant_with_warmup's step/warmup ramp when warmup_steps > 0 (transformers'
    get_scheduler("constant") would ignore the warmup; a warmup the user asked for is honoured).
    linear: get_linear_schedule_with_warmup; cosine: get_cosine_schedule_with_warmup (half a cycle,
    min_lr_rate 0). Past total_steps, linear and cosine stay at 0.
    """
    _check_int("step", step, 0)
    _check_int("total_steps", total_steps, 0)
    _check_int("warmup_steps", warmup_steps, 0)
    if scheduler not in SCHEDULERS:
        raise ValueError(f"scheduler must be one of {SCHEDULERS}, got {scheduler!r}")
    if step < warmup_steps:
        return float(step) / float(max(1, warmup_steps))
    if scheduler == "constant":
        return 1.0
    progress_den = float(max(1, total_steps - warmup_steps))
    if scheduler == "linear":
        return max(0.0, float(total_steps - step) / progress_den)
    progress = float(step - warmup_steps) / progress_den
    # num_cycles = 0.5: cos(pi * 0.5 * 2 * progress), written as transformers writes it so the
    # floating-point result is the same.
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))


def lr_at(step: int, total_steps: int, base_lr: float, scheduler: str, warmup_steps: int = 0) -> float:
    """Learning rate for the update that follows ``step`` completed updates (see lr_multiplier)."""
    if isinstance(base_lr, bool) or not isinstance(base_lr, (int, float)) or not (
            math.isfinite(base_lr) and base_lr > 0):
        raise ValueError(f"base_lr must be a finite number > 0, got {base_lr!r}")
    return base_lr * lr_multiplier(step, total_steps, scheduler, warmup_steps)


def resolve_warmup(config, total_steps: int) -> int:
    """Warmup steps for a run of total_steps updates: config.warmup_steps when > 0, otherwise
    ceil(total_steps * config.warmup_ratio) (transformers' TrainingArguments.get_warmup_steps)."""
    _check_int("total_steps", total_steps, 0)
    if config.warmup_steps > 0:
        return int(config.warmup_steps)
    return int(math.ceil(total_steps * config.warmup_ratio))


def resolve_total_steps(config, num_examples: int, world_size: int = 1) -> int:
    """Optimizer updates of a run over num_examples training examples, as the HF Trainer counts
    them: config.max_steps when > 0, else ceil(epochs * updates per epoch), where an epoch has
    ceil(ceil(num_examples / batch) / gradient_accumulation_steps) updates (at least 1) and batch is
    per_device_train_batch_size times world_size (the data-parallel ranks)."""
    if config.max_steps > 0:
        return int(config.max_steps)
    _check_int("num_examples", num_examples, 1)
    _check_int("world_size", world_size, 1)
    batches = -(-num_examples // (config.per_device_train_batch_size * world_size))
    per_epoch = max(-(-batches // config.gradient_accumulation_steps), 1)
    return int(math.ceil(config.num_train_epochs * per_epoch))
