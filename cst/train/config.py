"""The training configuration: one dataclass with TRL DPOConfig / transformers TrainingArguments names,
validated on construction, saved and loaded as JSON. It holds settings only; the training loop, the
LR schedule (cst.schedule) and the losses (cst.losses) read it."""
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from typing import List, Optional, Tuple, Union
from ..core.atomic import write_json
from ..core.losses import LOSS_TYPES
LR_SCHEDULERS = ("constant", "linear", "cosine")
MODES = ("dpo", "sft")
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _is_int(v):
    return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v):
    return isinstance(v, (int, float)) and not isinstance(v, bool)


@dataclass
class DPOConfig:
    """Hyper-parameters of a DPO (or SFT) run, named as in TRL's DPOConfig.

    Defaults follow the CST paper's recipe (its cst_train.py on TRL 0.9.6) where it fixes a value:
    beta 0.1, sigmoid loss, learning_rate 5e-5 (TRL's own default is 1e-6), 1 epoch, batch 2 x
    gradient accumulation 4, max_length 512, max_prompt_length 128. The paper trains LoRA r=24,
    alpha=48, dropout 0.05 on all seven projections; here lora_r=None means full fine-tuning.

    Warmup: warmup_steps > 0 wins over warmup_ratio (as in transformers 4.x); see
    cst.schedule.resolve_warmup. max_steps > 0 overrides num_train_epochs. max_grad_norm None or 0
    disables clipping. eval_steps/save_steps None disable periodic evaluation/saving.
    save_total_limit (as in transformers): after each checkpoint, only the newest save_total_limit
    checkpoint-N directories of output_dir are kept (None: all). The newest is what resume needs.
    label_smoothing (cDPO) only exists for loss_type "sigmoid" and is rejected for the others.
    rpo_alpha (TRL's name, "RPO"): adds rpo_alpha times the mean negative log-likelihood of the chosen
    completions' tokens to the DPO loss, so the policy keeps writing the preferred answers instead of
    only pushing both sides down (None or 0: plain DPO). loss_type also takes TRL's list form with
    loss_weights, e.g. ["sigmoid", "sft"] with [1.0, 0.5]: one DPO loss at weight 1 plus optionally
    "sft", folded on construction into loss_type "sigmoid" and rpo_alpha 0.5. to_trl() gives the
    recipe back as keyword arguments of trl.DPOConfig and peft.LoraConfig (the LoRA fields carry the
    names of TRL's ModelConfig: lora_r, lora_alpha, lora_dropout, lora_target_modules).
    group_by "prompt": each micro-batch keeps together the records that share a user prompt (CST's two
    versions of a pair, under the safe and the uncensored system prompt, with opposite preferences), so
    their shared "refuse more" / "comply more" gradients cancel inside a step and what is left depends on
    the system prompt; needs text records. None: seeded random batches bucketed by length.
    share_prompt (DPO): one row [prompt, chosen, rejected] per pair, so the prompt's forward and
    backward run once per pair instead of twice (cst.shared_prompt); the same log-probs and gradients
    as two rows per pair up to float32 rounding. With lora_dropout > 0 the prompt's tokens then draw
    one dropout mask per pair instead of one per row. False: TRL's two rows per pair.
    bf16 (TRL's name, mixed precision): the frozen base runs in bf16 (its matrices stored as bf16, the
    products' inputs bf16 with fp32 accumulation) while the LoRA adapters, their AdamW state, norms,
    softmax and losses stay float32; the Trainer converts a float32 model in place (Model.to_bf16) at
    its start. Needs LoRA (lora_r, or lora= given to the Trainer): a bf16 base cannot be trained.
    """
    beta: float = 0.1
    loss_type: Union[str, List[str]] = "sigmoid"
    loss_weights: Optional[List[float]] = None
    label_smoothing: float = 0.0
    rpo_alpha: Optional[float] = None
    learning_rate: float = 5e-5
    lr_scheduler_type: str = "linear"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    num_train_epochs: float = 1.0
    max_steps: int = -1
    per_device_train_batch_size: int = 2
    gradient_accumulation_steps: int = 4
    max_length: int = 512
    max_prompt_length: int = 128
    weight_decay: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_epsilon: float = 1e-8
    seed: int = 42
    lora_r: Optional[int] = None
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_target_modules: Tuple[str, ...] = LORA_MODULES
    logging_steps: int = 10
    eval_steps: Optional[int] = None
    save_steps: Optional[int] = 500
    save_total_limit: Optional[int] = 2
    output_dir: str = "runs/cst"
    mode: str = "dpo"
    num_threads: Optional[int] = None
    group_by: Optional[str] = None
    share_prompt: bool = True
    bf16: bool = False

    def __post_init__(self):
        def fail(name, msg):
            raise ValueError(f"DPOConfig: {name} {msg}, got {getattr(self, name)!r}")

        def real(name, lo=None, hi=None, lo_open=False, hi_open=False, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_number(v) or not math.isfinite(v):
                fail(name, "must be a finite number")
            if lo is not None and (v <= lo if lo_open else v < lo):
                fail(name, f"must be {'>' if lo_open else '>='} {lo}")
            if hi is not None and (v >= hi if hi_open else v > hi):
                fail(name, f"must be {'<' if hi_open else '<='} {hi}")
            setattr(self, name, float(v))

        def integer(name, lo, optional=False):
            v = getattr(self, name)
            if optional and v is None:
                return
            if not _is_int(v) or v < lo:
                fail(name, f"must be an int >= {lo}" + (" or None" if optional else ""))

        def choice(name, options):
            if getattr(self, name) not in options:
                fail(name, f"must be one of {options}")

        real("beta", 0.0, lo_open=True)
        self._fold_loss_list()
        choice("loss_type", LOSS_TYPES)
        real("label_smoothing", 0.0, 0.5)
        real("rpo_alpha", 0.0, optional=True)
        choice("group_by", (None, "prompt"))
        if self.label_smoothing > 0 and self.loss_type != "sigmoid":
            fail("label_smoothing", f"must be 0 for loss_type={self.loss_type!r} (only 'sigmoid' "
                 "supports label smoothing)")
        real("learning_rate", 0.0, lo_open=True)
        choice("lr_scheduler_type", LR_SCHEDULERS)
        integer("warmup_steps", 0)
        real("warmup_ratio", 0.0, 1.0)
        real("num_train_epochs", 0.0, lo_open=True)
        if not _is_int(self.max_steps) or not (self.max_steps == -1 or self.max_steps >= 1):
            fail("max_steps", "must be -1 (use num_train_epochs) or an int >= 1")
        integer("per_device_train_batch_size", 1)
        integer("gradient_accumulation_steps", 1)
        integer("max_prompt_length", 1)
        integer("max_length", 2)
        if self.max_length <= self.max_prompt_length:
            fail("max_length", f"must exceed max_prompt_length ({self.max_prompt_length}) to leave "
                 "room for the completion")
        real("weight_decay", 0.0)
        real("max_grad_norm", 0.0, optional=True)
        real("adam_beta1", 0.0, 1.0, hi_open=True)
        real("adam_beta2", 0.0, 1.0, hi_open=True)
        real("adam_epsilon", 0.0, lo_open=True)
        integer("seed", 0)
        integer("lora_r", 1, optional=True)
        real("lora_alpha", 0.0, lo_open=True)
        real("lora_dropout", 0.0, 1.0, hi_open=True)
        mods = self.lora_target_modules
        if isinstance(mods, str) or not isinstance(mods, (list, tuple)) or not mods:
            fail("lora_target_modules", f"must be a non-empty list of names from {LORA_MODULES}")
        unknown = [m for m in mods if m not in LORA_MODULES]
        if unknown:
            fail("lora_target_modules", f"has unknown module(s) {unknown}; known: {LORA_MODULES}")
        if len(set(mods)) != len(mods):
            fail("lora_target_modules", "has duplicates")
        self.lora_target_modules = tuple(mods)
        integer("logging_steps", 1)
        integer("eval_steps", 1, optional=True)
        integer("save_steps", 1, optional=True)
        integer("save_total_limit", 1, optional=True)
        if isinstance(self.output_dir, os.PathLike):
            self.output_dir = os.fspath(self.output_dir)
        if not isinstance(self.output_dir, str) or not self.output_dir:
            fail("output_dir", "must be a non-empty path")
        choice("mode", MODES)
        integer("num_threads", 1, optional=True)
        if not isinstance(self.share_prompt, bool):
            fail("share_prompt", "must be True or False")
        if not isinstance(self.bf16, bool):
            fail("bf16", "must be True or False")

    def _fold_loss_list(self):
        """TRL's form, loss_type ["sigmoid", "sft"] with loss_weights [1.0, a], into cst's: loss_type
        "sigmoid" plus rpo_alpha a (TRL's "sft" term is the same mean NLL of the chosen tokens). cst
        trains one DPO loss, weighted 1, plus optionally "sft"."""
        types, weights = self.loss_type, self.loss_weights
        if isinstance(types, str) and weights is None:
            return
        types = [types] if isinstance(types, str) else types
        if not isinstance(types, (list, tuple)) or not all(isinstance(t, str) for t in types):
            raise ValueError(f"DPOConfig: loss_type must be a loss name or a list of them, got {self.loss_type!r}")
        if weights is None:
            weights = [1.0] * len(types)
        if not isinstance(weights, (list, tuple)) or not all(_is_number(w) and math.isfinite(w) for w in weights):
            raise ValueError(f"DPOConfig: loss_weights must be a list of finite numbers, got {weights!r}")
        if len(weights) != len(types):
            raise ValueError(f"DPOConfig: loss_weights has {len(weights)} weight(s) for {len(types)} loss type(s) "
                             f"{list(types)}")
        unknown = [t for t in types if t not in LOSS_TYPES + ("sft",)]
        if unknown or len(set(types)) != len(types):
            raise ValueError(f"DPOConfig: loss_type {list(types)}: each of {LOSS_TYPES + ('sft',)} at most once "
                             f"(unknown: {unknown})")
        dpo = [(t, w) for t, w in zip(types, weights) if t != "sft"]
        if len(dpo) != 1:
            raise ValueError(f"DPOConfig: loss_type {list(types)}: cst trains exactly one DPO loss (one of "
                             f"{LOSS_TYPES}), optionally with 'sft'; use mode='sft' for SFT alone")
        if dpo[0][1] != 1.0:
            raise ValueError(f"DPOConfig: loss_weights: the {dpo[0][0]!r} term must have weight 1.0 in cst "
                             f"(got {dpo[0][1]}); scale the 'sft' weight relative to it")
        sft = [w for t, w in zip(types, weights) if t == "sft"]
        if sft and self.rpo_alpha not in (None, 0, 0.0, sft[0]):
            raise ValueError(f"DPOConfig: rpo_alpha={self.rpo_alpha} and an 'sft' loss weight {sft[0]} both set "
                             "the same term; give one")
        self.loss_type, self.loss_weights = dpo[0][0], None
        if sft:
            self.rpo_alpha = sft[0]

    def to_trl(self) -> dict:
        """The same recipe for TRL: {"DPOConfig": keyword arguments of trl.DPOConfig (TRL >= 1.0),
        "LoraConfig": keyword arguments of peft.LoraConfig (None for full fine-tuning), "not_mapped":
        {field: why} for settings TRL has no name for}. Raises ValueError for settings whose maths
        TRL cannot reproduce (mode "sft": that is TRL's SFTTrainer; cDPO label smoothing, which TRL 1.x's
        sigmoid loss ignores; a warmup_ratio of 1, which transformers reads as one step)."""
        if self.mode != "dpo":
            raise ValueError("DPOConfig.to_trl: mode 'sft' is TRL's SFTTrainer, not DPOConfig")
        if self.label_smoothing > 0:
            raise ValueError("DPOConfig.to_trl: label_smoothing (cDPO) has no equivalent in TRL >= 1.0, whose "
                             "sigmoid loss ignores it")
        types, weights = [self.loss_type], [1.0]
        if self.rpo_alpha:
            types.append("sft")
            weights.append(self.rpo_alpha)
        if self.warmup_steps > 0:
            warmup = self.warmup_steps
        elif self.warmup_ratio < 1.0:
            warmup = self.warmup_ratio  # transformers >= 5: a float below 1 is a share of the steps
        else:
            raise ValueError("DPOConfig.to_trl: warmup_ratio 1.0 has no equivalent (transformers reads "
                             "warmup_steps >= 1 as a number of steps); give warmup_steps instead")
        scheduler = self.lr_scheduler_type
        if scheduler == "constant" and warmup:
            scheduler = "constant_with_warmup"  # cst's "constant" honours a warmup; transformers' ignores it
        trl = {
            "output_dir": self.output_dir, "beta": self.beta, "loss_type": types, "loss_weights": weights,
            "learning_rate": self.learning_rate, "lr_scheduler_type": scheduler, "warmup_steps": warmup,
            "num_train_epochs": self.num_train_epochs, "max_steps": self.max_steps,
            "per_device_train_batch_size": self.per_device_train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps, "max_length": self.max_length,
            "weight_decay": self.weight_decay, "max_grad_norm": self.max_grad_norm or 0.0,
            "adam_beta1": self.adam_beta1, "adam_beta2": self.adam_beta2, "adam_epsilon": self.adam_epsilon,
            "seed": self.seed, "logging_steps": self.logging_steps,
            "bf16": self.bf16,  # TRL's bf16 autocast: bf16 products, float32 master weights, as cst's bf16
            # TRL's disable_dropout also zeroes PEFT's lora_dropout: keep dropout when the recipe has it.
            "disable_dropout": not (self.lora_r is not None and self.lora_dropout > 0),
        }
        if self.bf16:
            trl["use_cpu"] = True  # transformers refuses bf16 without a GPU unless told to run on the CPU
        if self.save_steps is None:
            trl["save_strategy"] = "no"
        else:
            trl["save_steps"] = self.save_steps
        if self.eval_steps is None:
            trl["eval_strategy"] = "no"
        else:
            trl.update(eval_strategy="steps", eval_steps=self.eval_steps)
        lora = None
        if self.lora_r is not None:
            lora = {"r": self.lora_r, "lora_alpha": self.lora_alpha, "lora_dropout": self.lora_dropout,
                    "target_modules": list(self.lora_target_modules), "bias": "none", "task_type": "CAUSAL_LM"}
        not_mapped = {"max_prompt_length": "TRL >= 1.0 does not cut prompts: it cuts whole sequences to max_length, "
                                           "keeping their start",
                      "num_threads": "cst's OpenMP threads"}
        if self.group_by is not None:
            not_mapped["group_by"] = "TRL samples batches at random"
        return {"DPOConfig": trl, "LoraConfig": lora, "not_mapped": not_mapped}

    @property
    def effective_batch_size(self) -> int:
        """Examples per optimizer step (per device batch x gradient accumulation)."""
        return self.per_device_train_batch_size * self.gradient_accumulation_steps

    def to_dict(self) -> dict:
        """Plain JSON-ready dict (lora_target_modules as a list)."""
        d = asdict(self)
        d["lora_target_modules"] = list(self.lora_target_modules)
        del d["loss_weights"]  # always folded into loss_type and rpo_alpha (see _fold_loss_list)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DPOConfig":
        if not isinstance(d, dict):
            raise ValueError(f"DPOConfig.from_dict: expected a dict, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown = sorted(k for k in d if k not in names)
        if unknown:
            raise ValueError(f"DPOConfig.from_dict: unknown key(s) {unknown}")
        return cls(**d)

    def to_json(self, path) -> None:
        """Writes the config as JSON atomically: a temporary file in the same folder, then a rename,
        so a crash never leaves a half-written config behind."""
        write_json(path, self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, path) -> "DPOConfig":
        with open(os.fspath(path), encoding="utf-8") as f:
            try:
                d = json.load(f)
            except json.JSONDecodeError as e:
                raise ValueError(f"DPOConfig.from_json: {path} is not valid JSON: {e}") from None
        return cls.from_dict(d)
