"""Inputs that must never surprise (issue #15): each defect the fuzzing found, as a test. Damaged GGUF
vocabularies, misaligned tensor offsets and files cut short while loading; config.json keys of the wrong
type and JSON nested 100,000 deep; datasets with lone surrogates, null system prompts and 50 MB fields;
checkpoints left half-written by a kill."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import cst
import cst.gguf
import cst.hf
from cst import data as D
from cst.errors import FormatError

from test_forgery import CHATML, small_tokenizer

gguf = pytest.importorskip("gguf")
ROOT = Path(__file__).resolve().parents[1]
SMALL = cst.ModelConfig(vocab_size=409, dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32, max_seq_len=64,
                        tie_embeddings=True)


def tiny_gguf(path, fields=None):
    """A 1-layer llama GGUF with a small byte-level tokenizer; `fields` edits its tokenizer fields."""
    tok = small_tokenizer(CHATML, "<|im_start|>", "<|im_end|>")
    f = tok.gguf_fields()
    if fields:
        f = dict(f, **fields)

    class Fields:
        def gguf_fields(self):
            return f
    cst.gguf.save_gguf(cst.Model(SMALL, seed=0), Fields(), str(path))
    return path


# ---- GGUF ----

@pytest.mark.parametrize("edit, match", [
    ({"merges": ["zz qq"] * 3}, "damaged"),                   # a merge of tokens not in the vocabulary
    ({"tokens": ["a"] * 409}, "damaged|not in the vocabulary"),  # every entry the same
])
def test_damaged_gguf_vocab_is_a_format_error(tmp_path, edit, match):
    path = tiny_gguf(tmp_path / "v.gguf", edit)
    with pytest.raises(FormatError, match=match) as e:
        cst.gguf.load_gguf(str(path))
    assert str(path) in str(e.value)


def _offset_position(path, tensor_index):
    """Byte position in the file of a tensor's u64 data offset."""
    r = gguf.GGUFReader(str(path))
    part = r.tensors[tensor_index].field.parts[-1]
    return part.ctypes.data - r.data.ctypes.data


def test_misaligned_tensor_offset_is_refused(tmp_path):
    path = tiny_gguf(tmp_path / "a.gguf")
    data = bytearray(path.read_bytes())
    pos = _offset_position(path, 0)
    off = int.from_bytes(data[pos:pos + 8], "little")
    data[pos:pos + 8] = (off + 4).to_bytes(8, "little")  # still inside the file, off the 32-byte grid
    path.write_bytes(bytes(data))
    with pytest.raises(FormatError, match="alignment"):
        cst.gguf.load_gguf(str(path))


_CUT_WHILE_LOADING = textwrap.dedent("""
    import os, sys
    import gguf, cst.gguf
    from cst.errors import FormatError
    path, when = sys.argv[1], sys.argv[2]
    start = cst.gguf.check_gguf(path)["data_start"]
    real_reader, real_check = gguf.GGUFReader, cst.gguf.check_gguf
    def cut():
        os.truncate(path, start + 64)   # another process cuts the file: tensor data gone
    def reader(p, *a, **k):
        r = real_reader(p, *a, **k)     # mapped at the full size
        cut()
        return r
    def check(p):
        info = real_check(p)
        cut()
        return info
    if when == "mapped":
        gguf.GGUFReader = reader
    else:
        cst.gguf.check_gguf = check
    try:
        cst.gguf.load_gguf(path)
    except FormatError as e:
        print("FormatError:", e)
        sys.exit(0)
    sys.exit(3)
""")


@pytest.mark.parametrize("when", ["mapped", "checked"])
def test_gguf_cut_short_while_loading_is_a_format_error_not_sigbus(tmp_path, when):
    """In a child process, so that a SIGBUS would show as a signal exit instead of killing pytest."""
    path = tiny_gguf(tmp_path / "c.gguf")
    r = subprocess.run([sys.executable, "-c", _CUT_WHILE_LOADING, str(path), when], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    assert ("shrank" if when == "mapped" else "changed size") in r.stdout


# ---- Hugging Face config.json ----

def _config(**kw):
    d = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 32, "hidden_size": 16,
         "num_hidden_layers": 1, "num_attention_heads": 2, "intermediate_size": 32}
    d.update(kw)
    return d


@pytest.mark.parametrize("kw, key", [
    ({"rope_scaling": "linear"}, "rope_scaling"),
    ({"rope_scaling": [1, 2]}, "rope_scaling"),
    ({"rope_parameters": 7}, "rope_parameters"),
    ({"architectures": 5}, "architectures"),
    ({"architectures": [5]}, "architectures"),
    ({"architectures": "LlamaForCausalLM"}, "architectures"),
])
def test_config_keys_of_the_wrong_type(tmp_path, kw, key):
    p = tmp_path / "config.json"
    p.write_text(json.dumps(_config(**kw)))
    with pytest.raises(FormatError, match=key) as e:
        cst.hf.config_from_hf(cst.hf._load_json(str(p)), str(p))
    assert str(p) in str(e.value)
    assert cst.hf.config_from_hf(_config()).dim == 16  # the unedited config is fine


def test_deeply_nested_json(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "config.json"
    p.write_text('{"a": ' + deep + "}")
    with pytest.raises(FormatError, match="nested too deeply") as e:
        cst.hf._load_json(str(p))
    assert str(p) in str(e.value)
    for name, text in (("r.json", deep), ("r.jsonl", json.dumps(_rec()) + "\n" + deep + "\n")):
        q = tmp_path / name
        q.write_text(text)
        with pytest.raises(D.DataError, match="nested too deeply") as e:
            D.load_records(q)
        assert str(q) in str(e.value)
        if name.endswith("l"):
            assert e.value.line == 2 and "line 2" in str(e.value)


# ---- datasets ----

def _rec(**kw):
    d = {"system": "Be safe.", "prompt": "Hi", "chosen": "Hello.", "rejected": "No."}
    d.update(kw)
    return d


@pytest.mark.parametrize("field", ["system", "prompt", "chosen", "rejected", "task"])
def test_lone_surrogate_is_rejected_with_line_and_field(tmp_path, field):
    p = tmp_path / "s.jsonl"
    bad = json.dumps(_rec(**{field: "ok \ud800 not ok"}))
    assert "\\ud800" in bad
    p.write_text(json.dumps(_rec()) + "\n" + bad + "\n")
    with pytest.raises(D.DataError, match="lone surrogate U\\+D800 at character 3") as e:
        D.load_records(p)
    assert (e.value.line, e.value.field) == (2, field) and "line 2" in str(e.value)


def test_null_system_is_rejected_with_line_and_field(tmp_path):
    p = tmp_path / "n.jsonl"
    p.write_text(json.dumps(_rec()) + "\n" + json.dumps(_rec(system=None)) + "\n")
    with pytest.raises(D.DataError, match="'system' is null") as e:
        D.load_records(p)
    assert (e.value.line, e.value.field) == (2, "system")
    assert D.load_records([_rec(system="")])[0].system == ""


def test_50mb_fields_tokenise_only_what_survives_truncation(smollm2_tokenizer):
    """Each giant field is cut before rendering: the example equals the one from a record cut by hand
    far above what truncation keeps, and takes well under a second (about 2 minutes before)."""
    tok = smollm2_tokenizer
    big = ("All work and no play makes Jack a dull boy. 12345 " * 1_000_000)[:50_000_000]
    recs = [D.PreferenceRecord("Be safe.", big, "Sure.", "No."), D.PreferenceRecord("Be safe.", "Hi", big, "No."),
            D.PreferenceRecord(big, "Hi", "Sure.", big)]
    t = time.perf_counter()
    got, stats = D.tokenize_dataset(recs, tok, max_length=512, max_prompt_length=128)
    took = time.perf_counter() - t
    assert took < 10.0, took
    k = 200_000  # far more than 512 tokens' worth
    by_hand = [D.PreferenceRecord(r.system[-k:], r.prompt[-k:], r.chosen[:k], r.rejected[:k]) for r in recs]
    want, want_stats = D.tokenize_dataset(by_hand, tok, max_length=512, max_prompt_length=128)
    assert [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in got] == \
        [(e.prompt_ids, e.chosen_ids, e.rejected_ids) for e in want]
    assert stats["prompt_truncated"] == want_stats["prompt_truncated"] == 2
    assert stats["completion_truncated"] == want_stats["completion_truncated"] == 2
    # The Trainer's call (no truncation, max_tokens = max_length + 1) is as fast and keeps what it needs.
    t = time.perf_counter()
    raw, _ = D.tokenize_dataset(recs, tok, max_length=1 << 40, max_prompt_length=None, max_tokens=513)
    assert time.perf_counter() - t < 10.0
    assert len(raw[0].prompt_ids) > 513 and raw[0].prompt_ids[-128:] == got[0].prompt_ids
    assert raw[1].chosen_ids[:512 - len(got[1].prompt_ids)] == got[1].chosen_ids


# ---- checkpoints ----

_TRAIN_CHILD = textwrap.dedent("""
    import os, sys
    os.environ["TQDM_DISABLE"] = "1"
    sys.path[:0] = [".", "tests"]
    from test_trainer import toy_model, cst_pairs, config
    from cst.trainer import Trainer
    from pathlib import Path
    cfg = config(Path(sys.argv[1]), "run", max_steps=100000, save_steps=None, logging_steps=1)
    Trainer(toy_model(0), cfg, cst_pairs(32, 1)).train()
""")


def test_kill_before_the_first_checkpoint(tmp_path):
    """kill -9 during training before any checkpoint: a fresh start works, resuming says there is
    nothing to resume, and nothing stale is left."""
    from test_trainer import config, cst_pairs, toy_model
    from cst.trainer import Trainer
    child = subprocess.Popen([sys.executable, "-c", _TRAIN_CHILD, str(tmp_path)], cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "run"
    deadline = time.time() + 120
    try:
        while time.time() < deadline and not (run / "metrics.jsonl").exists():
            time.sleep(0.05)
        time.sleep(0.5)  # some steps in, no checkpoint (save_steps=None saves only at the end)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert (run / "metrics.jsonl").exists() and not any(n.startswith("checkpoint-") for n in os.listdir(run))
    cfg = config(tmp_path, "run", max_steps=2, save_steps=None)
    with pytest.raises(ValueError, match="no checkpoint to resume from"):
        Trainer(toy_model(0), cfg, cst_pairs(8, 1)).train(resume_from_checkpoint=True)
    tr = Trainer(toy_model(0), cfg, cst_pairs(8, 1))
    tr.train()
    names = os.listdir(run)
    assert "checkpoint-2" in names and not any(n.startswith(".tmp-ckpt-") for n in names), names


def test_stale_checkpoint_leftovers_are_cleaned_on_start_and_resume(tmp_path):
    from test_trainer import config, cst_pairs, toy_model
    from cst.trainer import Trainer
    cfg = config(tmp_path, "run", max_steps=2, save_steps=1, logging_steps=1, save_total_limit=None)
    first = Trainer(toy_model(0), cfg, cst_pairs(8, 1)).train()
    run = tmp_path / "run"
    # What kills inside save_checkpoint leave: a half-written temp dir; a renamed-away old checkpoint
    # whose replacement never arrived; one whose replacement did.
    (run / ".tmp-ckpt-abc123").mkdir()
    (run / ".tmp-ckpt-abc123" / "weights.npy").write_bytes(b"\x93NUMPY half")
    os.replace(run / "checkpoint-2", run / "checkpoint-2.old")
    (run / "checkpoint-1.old").mkdir()
    tr = Trainer(toy_model(0), config(tmp_path, "run", max_steps=3, save_steps=1, logging_steps=1,
                                      save_total_limit=None), cst_pairs(8, 1))
    tr.train(resume_from_checkpoint=True)
    names = os.listdir(run)
    assert not any(n.startswith(".tmp-ckpt-") or n.endswith(".old") for n in names), names
    assert tr.history[:len(first)] == first and tr.step == 3  # resumed from the restored checkpoint-2
    assert {"checkpoint-1", "checkpoint-2", "checkpoint-3"} <= set(names)


def test_checkpoint_files_and_directory_are_fsynced(tmp_path, monkeypatch):
    from test_trainer import config, cst_pairs, toy_model
    from cst.trainer import Trainer
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)
    monkeypatch.setattr(os, "fsync", spy)
    tr = Trainer(toy_model(0), config(tmp_path, "run", max_steps=1, save_steps=None), cst_pairs(8, 1))
    tr.train()
    ck = tr.last_checkpoint
    names = [os.path.basename(p) for p in synced]
    assert "weights.npy" in names and "optimizer.npz" in names
    w = max(i for i, n in enumerate(names) if n == "weights.npy")
    tmpdir = os.path.dirname(synced[w])
    assert os.path.basename(tmpdir).startswith(".tmp-ckpt-")
    assert tmpdir in synced[w:]                       # the directory, after its files
    assert str(tmp_path / "run") in synced[w:]        # the parent, after the rename
    assert os.path.isdir(ck)


# ---- found by tests/fuzz/fuzz_inputs.py ----

def _hf_dir(tmp_path):
    tok = small_tokenizer(CHATML, "<|im_start|>", "<|im_end|>")
    m = cst.Model(SMALL, seed=0)
    m.tokenizer = tok
    d = tmp_path / "hf"
    m.save(str(d))
    return d


@pytest.mark.parametrize("dtype", [["F32"], {"a": 1}, 5])
def test_safetensors_dtype_of_the_wrong_type(tmp_path, dtype):
    import struct
    d = _hf_dir(tmp_path)
    st = (d / "model.safetensors").read_bytes()
    n = struct.unpack("<Q", st[:8])[0]
    header = json.loads(st[8:8 + n])
    header["model.norm.weight"]["dtype"] = dtype
    raw = json.dumps(header).encode()
    (d / "model.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + st[8 + n:])
    with pytest.raises(FormatError, match="model.norm.weight.*dtype"):
        cst.load(str(d))


@pytest.mark.parametrize("key, value", [("eos_token", ["</s>"]), ("pad_token", 7), ("bos_token", True),
                                        ("chat_template", 5), ("chat_template", [{"name": [1], "template": "x"}]),
                                        ("eos_token", "<not-in-vocab>")])
def test_tokenizer_config_values_of_the_wrong_type(tmp_path, key, value):
    d = _hf_dir(tmp_path)
    p = d / "tokenizer_config.json"
    cfg = json.loads(p.read_text())
    cfg[key] = value
    p.write_text(json.dumps(cfg))
    if key == "chat_template" and isinstance(value, list):  # no usable entry: no template, not an error
        assert cst.load(str(d)).tokenizer.chat_template is None
        return
    with pytest.raises(FormatError, match=key if key != "eos_token" or value != "<not-in-vocab>" else "vocabulary") as e:
        cst.load(str(d))
    assert str(p) in str(e.value)


def test_non_finite_hyper_parameters_are_refused():
    for kw in ({"rope_theta": float("inf")}, {"rope_theta": float("nan")}, {"norm_eps": float("inf")}):
        with pytest.raises(ValueError, match="finite"):
            cst.ModelConfig(vocab_size=8, dim=8, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=8, **kw)
