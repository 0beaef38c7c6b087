"""Every family through the CST pipeline end to end on a tiny random model with a tokenizer and chat
template of its kind: CST records, two LoRA DPO steps, a configurability evaluation, export to HF and
GGUF (reloaded by cst and, for HF, by transformers, with the same logits)."""
import json
import os
import warnings

import numpy as np
import pytest

import cst
import cst.io
from cst.data import PAPER_CONFIGURATIONS, BehaviourPair, build_records
from cst.eval import configurability
from cst.judges import RefusalJudge
from cst.runtime import get_num_threads, set_num_threads

from conftest import rel_err
from test_families import FAMILIES, _BASE
from test_families_tokenizers import TEMPLATES, save_dir

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
os.environ.setdefault("TQDM_DISABLE", "1")

# family -> (tokenizer kind, chat template)
PIPELINE = {"llama2": ("spm", "llama2"), "llama3.2": ("llama3", "llama3"), "mistral": ("spm", "mistral"),
            "qwen2-tied": ("qwen2", "chatml"), "solar": ("spm", "chatml"), "head_dim": ("llama3", "llama3")}


@pytest.fixture(autouse=True)
def one_thread():
    before = get_num_threads()
    set_num_threads(1)
    yield
    set_num_threads(before)


def tiny_checkpoint(family, d):
    kind, template = PIPELINE[family]
    d.mkdir()
    save_dir(kind, d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = TEMPLATES[template]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    vocab = len(json.loads((d / "tokenizer.json").read_text())["model"]["vocab"])
    cls, extra = FAMILIES[family]
    torch.manual_seed(0)
    conf = getattr(transformers, cls)(**{**_BASE, **extra, "vocab_size": vocab, "max_position_embeddings": 512,
                                         **({"sliding_window": 512} if cls == "MistralConfig" else {})})
    getattr(transformers, cls.replace("Config", "ForCausalLM"))(conf).save_pretrained(d)
    return d


@pytest.mark.slow
@pytest.mark.parametrize("family", list(PIPELINE))
def test_family_through_the_cst_pipeline(tmp_path, family):
    m = cst.io.load(str(tiny_checkpoint(family, tmp_path / "base")))
    assert m.tokenizer is not None and m.config.arch == FAMILIES[family][0][:-6].lower()
    pairs = [BehaviourPair(f"How do I do bad thing number {i}?",
                           {"safe": "I'm sorry, I cannot help with that.", "uncensored": f"Sure: step {i} is easy."})
             for i in range(4)]
    records = build_records(pairs, PAPER_CONFIGURATIONS, phrasings="first")
    assert len(records) == 8
    config = cst.DPOConfig(lora_r=4, lora_alpha=8, learning_rate=1e-3, max_steps=2, per_device_train_batch_size=2,
                           gradient_accumulation_steps=1, max_length=320, max_prompt_length=256, logging_steps=1,
                           save_steps=None, output_dir=str(tmp_path / "run"))
    with warnings.catch_warnings():  # Mistral's template has no system role: folded, with a warning
        warnings.simplefilter("ignore", UserWarning)
        trainer = cst.Trainer(m, config, records)
        history = trainer.train()
        losses = [h["loss"] for h in history if "loss" in h]
        assert len(losses) == 2 and all(np.isfinite(losses))
        assert np.any(trainer.lora.flat_params != 0)
        report = configurability(m, [p.prompt for p in pairs[:2]], judge=RefusalJudge(), max_new_tokens=4,
                                 n_boot=10, progress=False)
    assert 0.0 <= report.S0 <= 1.0 and 0.0 <= report.S1 <= 1.0
    assert all(r["response"] is not None for r in report.responses)
    tokens = np.array([m.tokenizer.encode("Sure: step 1 is easy.")], np.int32)
    want = m.merged()
    want_logits = cst.Model.forward(m, tokens).copy()  # adapters enabled: the tuned model
    m.save(str(tmp_path / "hf"), format="hf")
    m.save(str(tmp_path / "m.gguf"), format="gguf")
    for path in (tmp_path / "hf", tmp_path / "m.gguf"):
        back = cst.io.load(str(path))
        assert back.config == want.config or path.suffix == ".gguf"
        assert rel_err(back.forward(tokens), want_logits) < 1e-5, path
        assert back.tokenizer.encode("Sure: step 1 is easy.") == tokens[0].tolist()
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float64)
    with torch.no_grad():
        assert rel_err(hf(torch.tensor(tokens, dtype=torch.int64)).logits.numpy(), want_logits) < 1e-4
