"""DPOConfig validation and JSON round trips; LR schedules against transformers' own schedulers."""
import json
import math
import os

import pytest
import torch

from cst.schedule import lr_at, lr_multiplier, resolve_total_steps, resolve_warmup
from cst.training_config import LORA_MODULES, DPOConfig


def test_defaults_follow_the_brief_and_paper():
    c = DPOConfig()
    assert (c.beta, c.loss_type, c.label_smoothing, c.learning_rate) == (0.1, "sigmoid", 0.0, 5e-5)
    assert (c.lr_scheduler_type, c.warmup_steps, c.warmup_ratio) == ("linear", 0, 0.0)
    assert (c.num_train_epochs, c.max_steps) == (1.0, -1)
    assert (c.per_device_train_batch_size, c.gradient_accumulation_steps) == (2, 4)
    assert c.effective_batch_size == 8
    assert (c.max_length, c.max_prompt_length, c.max_grad_norm) == (512, 128, 1.0)
    assert (c.adam_beta1, c.adam_beta2, c.adam_epsilon, c.weight_decay) == (0.9, 0.999, 1e-8, 0.0)
    assert c.lora_r is None and c.lora_alpha == 16.0 and c.lora_dropout == 0.0
    assert c.lora_target_modules == LORA_MODULES == (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert (c.logging_steps, c.eval_steps, c.save_steps) == (10, None, 500)
    assert (c.output_dir, c.mode, c.num_threads, c.seed) == ("runs/cst", "dpo", None, 42)


BAD = [
    ("beta", -0.1), ("beta", 0.0), ("beta", float("nan")), ("beta", "0.1"), ("beta", True),
    ("loss_type", "kto"), ("label_smoothing", 0.6), ("label_smoothing", -0.1),
    ("learning_rate", 0.0), ("learning_rate", -1e-5), ("learning_rate", float("inf")),
    ("lr_scheduler_type", "polynomial"), ("warmup_steps", -1), ("warmup_steps", 1.5),
    ("warmup_ratio", 1.5), ("warmup_ratio", -0.1), ("num_train_epochs", 0.0),
    ("max_steps", 0), ("max_steps", -2), ("per_device_train_batch_size", 0),
    ("gradient_accumulation_steps", 0), ("max_prompt_length", 0), ("weight_decay", -0.01),
    ("max_grad_norm", -1.0), ("adam_beta1", 1.0), ("adam_beta2", -0.1), ("adam_epsilon", 0.0),
    ("seed", -1), ("seed", 1.0), ("lora_r", 0), ("lora_r", -4), ("lora_r", 8.0), ("lora_alpha", 0.0),
    ("lora_dropout", 1.0), ("lora_target_modules", ("q_proj", "qkv_proj")),
    ("lora_target_modules", ()), ("lora_target_modules", "q_proj"),
    ("lora_target_modules", ("q_proj", "q_proj")), ("logging_steps", 0), ("eval_steps", 0),
    ("save_steps", 0), ("output_dir", ""), ("mode", "ppo"), ("num_threads", 0),
]


@pytest.mark.parametrize("name,value", BAD)
def test_bad_fields_raise_naming_the_field(name, value):
    with pytest.raises(ValueError, match=f"DPOConfig: {name} "):
        DPOConfig(**{name: value})


def test_cross_field_rules():
    with pytest.raises(ValueError, match="max_length .*max_prompt_length"):
        DPOConfig(max_length=100, max_prompt_length=128)
    with pytest.raises(ValueError, match="max_length"):
        DPOConfig(max_length=128, max_prompt_length=128)  # no room for a completion
    with pytest.raises(ValueError, match="label_smoothing .*ipo"):
        DPOConfig(loss_type="ipo", label_smoothing=0.1)
    DPOConfig(loss_type="sigmoid", label_smoothing=0.1)  # cDPO is fine
    DPOConfig(loss_type="hinge", lora_r=24, lora_alpha=48, lora_dropout=0.05, max_grad_norm=None,
              eval_steps=50, save_steps=None, num_threads=2, mode="sft", max_steps=10)


def test_normalisation():
    c = DPOConfig(beta=1, lora_target_modules=["q_proj", "v_proj"], output_dir=_P("x/y"))
    assert isinstance(c.beta, float) and c.beta == 1.0
    assert c.lora_target_modules == ("q_proj", "v_proj")
    assert c.output_dir == "x/y"


class _P(os.PathLike):
    def __init__(self, p):
        self.p = p

    def __fspath__(self):
        return self.p


def test_dict_and_json_round_trip(tmp_path):
    c = DPOConfig(beta=0.2, loss_type="ipo", lora_r=24, lora_alpha=48.0, lora_dropout=0.05,
                  lora_target_modules=("q_proj", "down_proj"), warmup_ratio=0.1, eval_steps=7)
    d = c.to_dict()
    assert d["lora_target_modules"] == ["q_proj", "down_proj"]
    json.dumps(d)  # JSON-ready
    assert DPOConfig.from_dict(d) == c
    path = tmp_path / "sub" / "config.json"
    c.to_json(path)
    assert DPOConfig.from_json(path) == c
    assert sorted(os.listdir(path.parent)) == ["config.json"]  # no temporary left behind
    c2 = DPOConfig(beta=0.3)
    c2.to_json(str(path))  # overwrite in place
    assert DPOConfig.from_json(path).beta == 0.3
    assert DPOConfig.from_dict({}) == DPOConfig()


def test_from_dict_rejects_unknown_keys_listing_them(tmp_path):
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['bogus', 'lr'\]"):
        DPOConfig.from_dict({"beta": 0.1, "lr": 1e-5, "bogus": 1})
    with pytest.raises(ValueError, match="DPOConfig: beta"):
        DPOConfig.from_dict({"beta": -1})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        DPOConfig.from_json(bad)


def test_failed_json_write_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "c.json"
    DPOConfig(beta=0.5).to_json(path)
    import cst.training_config as tc

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tc.json, "dump", boom)
    with pytest.raises(OSError, match="disk full"):
        DPOConfig(beta=0.7).to_json(path)
    monkeypatch.undo()
    assert DPOConfig.from_json(path).beta == 0.5
    assert sorted(os.listdir(tmp_path)) == ["c.json"]


# ---- schedules ----

def hf_lrs(name, total, warmup, base_lr):
    # Importing this pulls in much of transformers (~5-10 s here); skipped where it is absent.
    get_scheduler = pytest.importorskip("transformers.optimization").get_scheduler
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=base_lr)
    sched = get_scheduler(name, opt, num_warmup_steps=warmup, num_training_steps=total)
    out = []
    for _ in range(total + 5):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


@pytest.mark.parametrize("scheduler", ["constant", "linear", "cosine"])
@pytest.mark.parametrize("total,warmup", [(300, 0), (300, 30), (250, 1), (7, 7), (1, 0), (40, 50)])
def test_lr_matches_transformers(scheduler, total, warmup):
    base = 5e-5
    hf_name = "constant_with_warmup" if scheduler == "constant" and warmup > 0 else scheduler
    ref = hf_lrs(hf_name, total, warmup, base)
    ours = [lr_at(s, total, base, scheduler, warmup) for s in range(total + 5)]
    for s, (a, b) in enumerate(zip(ours, ref)):
        assert math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-20), (s, a, b)


def test_lr_shapes():
    assert lr_at(0, 100, 1e-4, "linear", 10) == 0.0
    assert lr_at(10, 100, 1e-4, "linear", 10) == 1e-4
    assert lr_at(100, 100, 1e-4, "linear", 10) == 0.0
    assert lr_multiplier(55, 100, "cosine", 10) == pytest.approx(0.5)
    assert lr_at(500, 100, 1e-4, "constant") == 1e-4
    for bad in [dict(step=-1), dict(total_steps=-1), dict(warmup_steps=-1), dict(scheduler="poly"),
                dict(base_lr=0.0), dict(step=1.0)]:
        kw = dict(step=0, total_steps=10, base_lr=1e-4, scheduler="linear", warmup_steps=0)
        kw.update(bad)
        with pytest.raises(ValueError, match=list(bad)[0]):
            lr_at(**kw)


def test_resolve_warmup_and_total_steps():
    assert resolve_warmup(DPOConfig(), 100) == 0
    assert resolve_warmup(DPOConfig(warmup_ratio=0.1), 95) == 10  # ceil(9.5)
    assert resolve_warmup(DPOConfig(warmup_ratio=0.1, warmup_steps=3), 95) == 3  # steps win
    assert resolve_warmup(DPOConfig(warmup_ratio=1.0), 17) == 17
    # paper-sized run: 1,952 examples, batch 2, accumulation 4 -> 976 batches -> 244 updates
    assert resolve_total_steps(DPOConfig(), 1952) == 244
    assert resolve_total_steps(DPOConfig(), 1953) == 245  # a partial last accumulation counts
    assert resolve_total_steps(DPOConfig(num_train_epochs=2.5), 10) == 5  # 2 updates/epoch
    assert resolve_total_steps(DPOConfig(), 1) == 1
    assert resolve_total_steps(DPOConfig(max_steps=37), 1952) == 37
    with pytest.raises(ValueError, match="num_examples"):
        resolve_total_steps(DPOConfig(), 0)
