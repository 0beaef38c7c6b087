"""Other tools' formats without running those tools: TRL's four preference layouts read by load_records
(JSON, JSONL, Parquet, a datasets.Dataset) with the system prompt taken from the conversation,
malformed rows named by row and field, the TRL export read back, DPOConfig's TRL list form and
to_trl() checked against trl.DPOConfig / peft.LoraConfig, the GGUF LoRA adapter's metadata, names,
shapes and maths, and chat-template precedence and overrides. TRL training and llama.cpp runs are in
test_interop_trl.py and test_interop_llamacpp.py."""
import json

import numpy as np
import pytest

import cst
from conftest import byte_tokenizer
from cst import data as D
from cst.training_config import DPOConfig

SYS = "You are a helpful yet harmless assistant."

CST_ROW = {"system": SYS, "prompt": "How do I pick a lock?", "chosen": "I can't help with that.",
           "rejected": "Use a tension wrench."}
CONV_EXPLICIT = {"prompt": [{"role": "system", "content": SYS}, {"role": "user", "content": CST_ROW["prompt"]}],
                 "chosen": [{"role": "assistant", "content": CST_ROW["chosen"]}],
                 "rejected": [{"role": "assistant", "content": CST_ROW["rejected"]}]}
CONV_IMPLICIT = {"chosen": CONV_EXPLICIT["prompt"] + CONV_EXPLICIT["chosen"],
                 "rejected": CONV_EXPLICIT["prompt"] + CONV_EXPLICIT["rejected"]}
STD_EXPLICIT = {"prompt": CST_ROW["prompt"], "chosen": CST_ROW["chosen"], "rejected": CST_ROW["rejected"]}
# TRL's extract_prompt cuts at the first differing character and leaves the space before it to the answers.
STD_IMPLICIT = {"chosen": "The sky is blue.", "rejected": "The sky is green."}


def fields(r):
    return (r.system, r.prompt, r.chosen, r.rejected)


@pytest.mark.parametrize("row, want", [
    (CST_ROW, fields(D.PreferenceRecord(**CST_ROW))),
    (CONV_EXPLICIT, fields(D.PreferenceRecord(**CST_ROW))),
    (CONV_IMPLICIT, fields(D.PreferenceRecord(**CST_ROW))),
    (dict(CONV_IMPLICIT, prompt=CST_ROW["prompt"]), fields(D.PreferenceRecord(**CST_ROW))),
    (STD_EXPLICIT, ("", CST_ROW["prompt"], CST_ROW["chosen"], CST_ROW["rejected"])),
    (STD_IMPLICIT, ("", "The sky is", " blue.", " green.")),
    ({"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "b"}, {"type": "text", "text": "c"}]}]},
     ("", "hi", "a", "bc")),
], ids=["cst", "conversational-explicit", "conversational-implicit", "implicit-beside-text-prompt",
        "standard-explicit", "standard-implicit", "content-parts"])
def test_every_format_from_every_source(tmp_path, row, want):
    rows = [row, row]
    p = tmp_path / "r.json"
    p.write_text(json.dumps(rows))
    q = tmp_path / "r.jsonl"
    q.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sources = [rows, p, q]
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    sources.append(tmp_path / "r.parquet")
    for src in sources:
        got = D.load_records(src)
        assert [fields(r) for r in got] == [want, want], src


@pytest.mark.slow  # importing datasets takes seconds
def test_every_format_from_a_datasets_dataset():
    datasets = pytest.importorskip("datasets")
    for row in (CST_ROW, CONV_EXPLICIT, CONV_IMPLICIT, STD_EXPLICIT):
        (r,) = D.load_records(datasets.Dataset.from_list([row]))
        assert fields(r) == (fields(D.PreferenceRecord(**CST_ROW)) if row is not STD_EXPLICIT
                             else ("", CST_ROW["prompt"], CST_ROW["chosen"], CST_ROW["rejected"]))
    with pytest.raises(D.DataError, match="lacks column"):
        D.load_records(datasets.Dataset.from_list([{"prompt": "p", "chosen": "c"}]))


@pytest.mark.slow  # importing trl takes seconds
def test_matches_trl_extract_prompt():
    trl = pytest.importorskip("trl")
    for row in (STD_IMPLICIT, {"chosen": "Say it: yes", "rejected": "Say it: no"}, CONV_IMPLICIT):
        want = trl.extract_prompt(row)
        (r,) = D.load_records([row])
        if isinstance(want["prompt"], str):
            assert (r.prompt, r.chosen, r.rejected) == (want["prompt"], want["chosen"], want["rejected"])
        else:
            assert D.to_trl(r)["prompt"] == want["prompt"] and D.to_trl(r)["chosen"] == want["chosen"]


BAD = [
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": [{"role": "assistant", "content": "b"}]},
     "chosen", "must be a list of messages"),
    ({"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "x"},
                 {"role": "user", "content": "q2"}],
      "chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     "prompt", "single-turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "bot", "content": "b"}]}, "rejected", "message 0"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": 5}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen", "'content' must be a string"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}]},
     "rejected", "missing"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
      "rejected": [{"role": "assistant", "content": "   "}]}, "rejected", "empty"),
    ({"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
      "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]},
     "prompt", "single-turn"),
    ({"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"},
                                                               {"role": "assistant", "content": "more"}],
      "rejected": [{"role": "assistant", "content": "b"}]}, "chosen", "one assistant message"),
]


def _fails_at(source, where, field, msg, **attrs):
    """load_records(source) raises a DataError that names `where` and the field, with those attributes."""
    with pytest.raises(D.DataError, match=rf"{where}: field '{field}'.*{msg}") as e:
        D.load_records(source)
    assert e.value.field == field and all(getattr(e.value, k) == v for k, v in attrs.items())


@pytest.mark.parametrize("row, field, msg", BAD)
def test_malformed_conversational_rows_name_row_and_field(tmp_path, row, field, msg):
    _fails_at([CONV_EXPLICIT, row], "record 1", field, msg, index=1)
    p = tmp_path / "bad.jsonl"
    p.write_text(json.dumps(CONV_EXPLICIT) + "\n" + json.dumps(row) + "\n")
    _fails_at(p, "line 2", field, msg, line=2)


@pytest.mark.parametrize("row, field, msg", [
    ({"prompt": "p", "chosen": "c", "rejected": 3}, "rejected", "must be a string"),
    ({"prompt": "p", "chosen": "c"}, "rejected", "missing"),
    ({"system": "s", "prompt": "p", "chosen": "c", "rejected": "r"}, "system", "first record has none"),
    ({"chosen": "same", "rejected": "same and more"}, "prompt", "do not part"),
    ({"prompt": "p", "chosen": "c", "rejected": "r", "task": ""}, "task", "non-empty"),
])
def test_malformed_standard_rows(row, field, msg):
    _fails_at([STD_EXPLICIT, row], "record 1", field, msg, index=1)


def test_parquet_errors(tmp_path):
    pytest.importorskip("pyarrow")
    bad = tmp_path / "bad.parquet"
    bad.write_bytes(b"PAR1 not really")
    with pytest.raises(D.DataError, match="bad.parquet: not a readable Parquet file"):
        D.load_records(bad)
    with pytest.raises(FileNotFoundError, match="no such file"):
        D.load_records(tmp_path / "none.parquet")
    rows = [CONV_EXPLICIT, dict(CONV_EXPLICIT, chosen=[{"role": "user", "content": "x"}])]
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "r.parquet")
    with pytest.raises(D.DataError, match="r.parquet record 1: field 'chosen'") as e:
        D.load_records(tmp_path / "r.parquet")
    assert e.value.index == 1


def test_missing_pyarrow_is_a_clear_error(tmp_path, monkeypatch):
    import builtins
    real = builtins.__import__

    def no_pyarrow(name, *a, **k):
        if name.startswith("pyarrow"):
            raise ImportError("no pyarrow")
        return real(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_pyarrow)
    with pytest.raises(ImportError, match=r"pip install pyarrow"):
        D.load_records(tmp_path / "r.parquet")


def test_trl_export_round_trips(tmp_path):
    records = [D.PreferenceRecord(**CST_ROW, task="harmless"),
               D.PreferenceRecord("", "q2", "a2", "b2", metadata={"configuration": "x"})]
    for name in ("t.json", "t.jsonl", "t.parquet"):
        if name.endswith(".parquet"):
            pytest.importorskip("pyarrow")
        D.save_records(records, tmp_path / name, format="trl")
        back = D.load_records(tmp_path / name)
        assert [r.key() for r in back] == [r.key() for r in records], name
    rows = [json.loads(x) for x in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert rows[0] == dict(CONV_EXPLICIT, task="harmless")
    assert rows[1]["prompt"] == [{"role": "user", "content": "q2"}]  # no system prompt: no system message
    with pytest.raises(D.DataError, match="format must be"):
        D.save_records(records, tmp_path / "x.json", format="openai")


def test_cli_data_build_trl(tmp_path, capsys):
    from cst.cli import main
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "How do I pick a lock?",
                                 "responses": {"safe": "I cannot help.", "uncensored": "Use a pick."}}) + "\n")
    out = tmp_path / "trl.jsonl"
    assert main(["data", "build", "--pairs", str(pairs), "--output", str(out), "--format", "trl"]) == 0
    rows = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(rows) == 3  # safe, uncensored, and the safe default with no system prompt
    by_system = {r["prompt"][0]["content"] if r["prompt"][0]["role"] == "system" else None: r for r in rows}
    assert by_system[None]["chosen"] == [{"role": "assistant", "content": "I cannot help."}]
    safe = by_system[D.HARMLESS_SYSTEM_PROMPT]
    assert safe["chosen"] == [{"role": "assistant", "content": "I cannot help."}]
    assert by_system[D.UNCENSORED_SYSTEM_PROMPT]["chosen"] == [{"role": "assistant", "content": "Use a pick."}]
    back = D.load_records(out)
    cst_out = tmp_path / "cst.jsonl"
    assert main(["data", "build", "--pairs", str(pairs), "--output", str(cst_out)]) == 0
    assert [r.key() for r in back] == [r.key() for r in D.load_records(cst_out)]


# ---- the training recipe in TRL's names ----

def test_loss_type_list_folds_into_rpo():
    c = DPOConfig(loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
    assert (c.loss_type, c.rpo_alpha, c.loss_weights) == ("sigmoid", 0.5, None)
    assert DPOConfig.from_dict(c.to_dict()) == c and "loss_weights" not in c.to_dict()
    assert DPOConfig(loss_type=["ipo"]).loss_type == "ipo"
    for kw, msg in [({"loss_type": ["sigmoid", "ipo"]}, "exactly one DPO loss"),
                    ({"loss_type": ["sft"]}, "exactly one DPO loss"),
                    ({"loss_type": ["sigmoid", "robust"]}, "unknown: \\['robust'\\]"),
                    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, "1 weight"),
                    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [0.5, 1.0]}, "weight 1.0"),
                    ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0, 0.5], "rpo_alpha": 2.0}, "give one"),
                    ({"loss_type": ["sigmoid"], "loss_weights": ["x"]}, "finite numbers")]:
        with pytest.raises(ValueError, match=msg):
            DPOConfig(**kw)


def _trl_config(d):
    trl = pytest.importorskip("trl")
    return trl.DPOConfig(**d)


@pytest.mark.slow
@pytest.mark.parametrize("kw", [
    dict(lora_r=24, lora_alpha=48, lora_dropout=0.05, rpo_alpha=1.0, learning_rate=5e-4, warmup_ratio=0.1,
         lr_scheduler_type="cosine", num_train_epochs=3, eval_steps=5, group_by="prompt"),
    dict(loss_type="ipo", beta=0.3, warmup_steps=7, lr_scheduler_type="constant", max_steps=40,
         max_grad_norm=None, save_steps=None, weight_decay=0.01),
    dict(loss_type="hinge", lora_r=4, lora_target_modules=("q_proj", "v_proj"), seed=3, bf16=True),
])
def test_to_trl_builds_trl_and_peft_configs(kw, tmp_path):
    c = DPOConfig(output_dir=str(tmp_path), **kw)
    t = c.to_trl()
    json.dumps(t)  # plain JSON
    d = _trl_config(t["DPOConfig"])
    want_types = [c.loss_type] + (["sft"] if c.rpo_alpha else [])
    assert d.loss_type == want_types and d.loss_weights == [1.0] + ([c.rpo_alpha] if c.rpo_alpha else [])
    for name in ("beta", "learning_rate", "num_train_epochs", "max_steps", "per_device_train_batch_size",
                 "gradient_accumulation_steps", "max_length", "weight_decay", "adam_beta1", "adam_beta2",
                 "adam_epsilon", "seed", "logging_steps", "output_dir"):
        assert getattr(d, name) == getattr(c, name), name
    assert d.max_grad_norm == (c.max_grad_norm or 0.0)
    from cst.schedule import resolve_warmup
    for total in (10, 33, 100):
        assert d.get_warmup_steps(total) == resolve_warmup(c, total)
    sched = str(getattr(d.lr_scheduler_type, "value", d.lr_scheduler_type))
    want = c.lr_scheduler_type + ("_with_warmup" if c.lr_scheduler_type == "constant" and c.warmup_steps else "")
    assert sched == want
    assert d.disable_dropout == (not (c.lora_r and c.lora_dropout > 0)) and d.bf16 is c.bf16
    assert d.use_cpu is c.bf16  # transformers accepts bf16 on a CPU only with use_cpu
    if c.lora_r is None:
        assert t["LoraConfig"] is None
    else:
        peft = pytest.importorskip("peft")
        lc = peft.LoraConfig(**t["LoraConfig"])
        assert (lc.r, lc.lora_alpha, lc.lora_dropout) == (c.lora_r, c.lora_alpha, c.lora_dropout)
        assert set(lc.target_modules) == set(c.lora_target_modules)
    assert "max_prompt_length" in t["not_mapped"]


def test_to_trl_refuses_what_trl_cannot_do():
    for kw, msg in [({"mode": "sft"}, "SFTTrainer"), ({"label_smoothing": 0.1}, "cDPO"),
                    ({"warmup_ratio": 1.0}, "warmup_ratio 1.0")]:
        with pytest.raises(ValueError, match=msg):
            DPOConfig(**kw).to_trl()


@pytest.mark.slow
def test_cli_print_trl_config(capsys, tmp_path):
    from cst.cli import main
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"lora_r": 8, "loss_type": ["sigmoid", "sft"], "loss_weights": [1, 0.25]}))
    assert main(["train", "--config", str(cfg), "--beta", "0.2", "--print-trl-config"]) == 0
    t = json.loads(capsys.readouterr().out)
    assert t["DPOConfig"]["beta"] == 0.2 and t["DPOConfig"]["loss_weights"] == [1.0, 0.25]
    assert t["LoraConfig"]["r"] == 8
    _trl_config(t["DPOConfig"])
    assert main(["train", "--mode", "sft", "--print-trl-config"]) == 2
    assert "SFTTrainer" in capsys.readouterr().err


# ---- GGUF LoRA adapters ----

def _tiny_lora(seed=0):
    from cst.lora import LoRA
    m = cst.Model(cst.ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48,
                                  max_seq_len=64), seed=seed)
    lora = LoRA(m, r=4, alpha=8.0, target_modules=("q_proj", "k_proj", "v_proj", "o_proj", "down_proj"))
    rng = np.random.default_rng(seed)
    lora.flat_params[...] = rng.normal(0, 0.2, lora.flat_params.shape).astype(np.float32)
    return m, lora


@pytest.mark.parametrize("dtype", ["f32", "f16"])
def test_gguf_lora_file_layout_and_maths(tmp_path, dtype):
    """The adapter applied in GGUF space (W_gguf + alpha/r B A, as llama.cpp does) equals the merged
    model's weights written to GGUF: the Q/K permutation of B is right."""
    import gguf
    from cst.gguf import save_gguf, save_gguf_lora
    m, lora = _tiny_lora()
    save_gguf(m, None, tmp_path / "base.gguf")
    save_gguf_lora(lora, tmp_path / "lora.gguf", dtype=dtype)
    merged = cst.Model(m.config)
    merged.flat_params[...] = lora.merged_params()
    save_gguf(merged, None, tmp_path / "merged.gguf")
    r = gguf.GGUFReader(tmp_path / "lora.gguf")
    meta = {k: f.contents() for k, f in r.fields.items() if not k.startswith("GGUF.")}
    assert meta["general.type"] == "adapter" and meta["adapter.type"] == "lora"
    assert meta["general.architecture"] == "llama" and meta["adapter.lora.alpha"] == 8.0
    ad = {t.name: t for t in r.tensors}
    assert len(ad) == 2 * 2 * 5
    base = {t.name: np.asarray(t.data, np.float64) for t in gguf.GGUFReader(tmp_path / "base.gguf").tensors}
    want = {t.name: np.asarray(t.data, np.float64) for t in gguf.GGUFReader(tmp_path / "merged.gguf").tensors}
    tol = 1e-6 if dtype == "f32" else 2e-3
    changed = 0
    for name in base:
        if name + ".lora_a" not in ad:
            np.testing.assert_array_equal(base[name], want[name])
            continue
        a, b = ad[name + ".lora_a"], ad[name + ".lora_b"]
        # ggml shapes: A [in, r], B [r, out] (ne[0] first), as llama.cpp's loader checks them.
        assert list(a.shape) == [base[name].shape[1], 4] and list(b.shape) == [4, base[name].shape[0]]
        got = base[name] + 8.0 / 4 * np.asarray(b.data, np.float64) @ np.asarray(a.data, np.float64)
        np.testing.assert_allclose(got, want[name], atol=tol, err_msg=name)
        changed += not np.allclose(base[name], want[name], atol=tol)
    assert changed == 2 * 5


def test_cli_export_gguf_lora(tmp_path, capsys):
    from cst.cli import main
    from cst.lora import LoRA
    m, _ = _tiny_lora()
    src = tmp_path / "model"
    m.save(str(src))
    run = tmp_path / "run"
    cfg = DPOConfig(lora_r=4, lora_alpha=8.0, output_dir=str(run))
    # a LoRA checkpoint as cst.trainer writes it (trainer_state.json + the adapters' flat weights.npy)
    l2 = LoRA(m, r=4, alpha=8.0)
    l2.flat_params[...] = np.random.default_rng(0).normal(0, 0.1, l2.flat_params.shape)
    ckpt = run / "checkpoint-1"
    ckpt.mkdir(parents=True)
    np.save(ckpt / "weights.npy", l2.flat_params)
    (ckpt / "trainer_state.json").write_text(json.dumps({"kind": "lora", "step": 1, "config": cfg.to_dict()}))
    out = tmp_path / "adapter.gguf"
    assert main(["export", "-m", str(src), "--checkpoint", str(ckpt), "--format", "gguf-lora", str(out)]) == 0
    assert "llama.cpp LoRA adapter, r=4" in capsys.readouterr().out
    import gguf
    r = gguf.GGUFReader(out)
    t = {x.name: x for x in r.tensors}
    np.testing.assert_array_equal(np.asarray(t["blk.1.attn_v.weight.lora_a"].data),
                                  l2.params["base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"])
    assert main(["export", "-m", str(src), "--format", "gguf-lora", str(out)]) == 2
    assert "needs --checkpoint" in capsys.readouterr().err


# ---- chat templates ----

def _hf_tokenizer_dir(path, config_template, jinja_template):
    """A Hugging Face tokenizer directory whose tokenizer_config.json holds config_template and, unless
    None, whose chat_template.jinja holds jinja_template."""
    tok = byte_tokenizer(config_template)
    tok.save_hf(path)
    if jinja_template is not None:
        (path / "chat_template.jinja").write_text(jinja_template)
    return tok


CONFIG_T = "{% for m in messages %}{{ m['role'] }}:{{ m['content'] }}{{ eos_token }}{% endfor %}"
JINJA_T = "{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}{% if add_generation_prompt %}a:{% endif %}"


@pytest.mark.slow  # importing transformers takes seconds
def test_chat_template_precedence_matches_transformers(tmp_path):
    """An HF directory whose chat_template.jinja and tokenizer_config.json disagree: the .jinja file wins,
    as in transformers; a GGUF exported from it carries that template, and a GGUF's own template is the
    one used when it is loaded."""
    transformers = pytest.importorskip("transformers")
    _hf_tokenizer_dir(tmp_path, CONFIG_T, JINJA_T)
    from cst.tokenizer import Tokenizer
    ours = Tokenizer.from_hf_dir(str(tmp_path))
    theirs = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = [{"role": "user", "content": "hi"}]
    assert ours.chat_template == JINJA_T
    assert ours.render_chat(msgs, True) == theirs.apply_chat_template(msgs, tokenize=False,
                                                                      add_generation_prompt=True) == "hi<|im_end|>a:"
    _hf_tokenizer_dir(tmp_path / "b", CONFIG_T, None)
    assert Tokenizer.from_hf_dir(str(tmp_path / "b")).chat_template == CONFIG_T
    # exported to GGUF, the model keeps the template it rendered with; loading the GGUF uses the GGUF's
    m = cst.Model(cst.ModelConfig(vocab_size=ours.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  ffn_dim=16), seed=0)
    m.tokenizer = ours
    cst.io.save(m, str(tmp_path / "m.gguf"), format="gguf")
    assert cst.load(str(tmp_path / "m.gguf")).tokenizer.render_chat(msgs, True) == "hi<|im_end|>a:"


def test_read_chat_template_and_cli_override(tmp_path, capsys):
    from cst.cli import main
    from cst.tokenizer import read_chat_template
    (tmp_path / "t.jinja").write_text(JINJA_T)
    assert read_chat_template(tmp_path / "t.jinja") == JINJA_T
    (tmp_path / "tc.json").write_text(json.dumps({"chat_template": [{"name": "default", "template": JINJA_T}]}))
    assert read_chat_template(tmp_path / "tc.json") == JINJA_T
    (tmp_path / "bad.jinja").write_text("{% for m in messages %}")
    with pytest.raises(ValueError, match=r"bad.jinja: not a valid Jinja template \(line 1"):
        read_chat_template(tmp_path / "bad.jinja")
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="empty"):
        read_chat_template(tmp_path / "empty.jinja")
    with pytest.raises(ValueError, match="no \"chat_template\""):
        (tmp_path / "x.json").write_text("{}")
        read_chat_template(tmp_path / "x.json")
    # the CLI: export with --chat-template writes the override into the exported model
    model_dir = tmp_path / "m"
    tok = _hf_tokenizer_dir(model_dir, CONFIG_T, None)
    m = cst.Model(cst.ModelConfig(vocab_size=tok.vocab_size, dim=16, n_layers=1, n_heads=2, n_kv_heads=1,
                                  ffn_dim=16), seed=0)
    m.tokenizer = tok
    m.save(str(model_dir))
    out = tmp_path / "out.gguf"
    assert main(["export", "-m", str(model_dir), "--chat-template", str(tmp_path / "t.jinja"),
                 "--format", "gguf", str(out)]) == 0
    assert cst.load(str(out)).tokenizer.chat_template == JINJA_T
    rc = main(["chat", "-m", str(model_dir), "--chat-template", str(tmp_path / "bad.jinja"), "hi"])
    assert rc == 1 and "not a valid Jinja template" in capsys.readouterr().err
