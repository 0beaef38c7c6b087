"""cst's TRL export run through TRL itself: `cst data build --format trl` writes a file that TRL's real
DPOTrainer trains on unchanged (2 LoRA steps on the CPU, a tiny random LlamaForCausalLM saved by
transformers, a byte-level tokenizer with a ChatML template), with the settings of `cst train
--print-trl-config`; and the same records give the same prompt/chosen/rejected tokens, the same
boundaries and the same padded batch in cst (tokenize_record, collate) as in TRL's tokenisation and
DataCollatorForPreference. Needs trl, datasets and peft (the test extra)."""
import importlib
import json
import math
import os

import numpy as np
import pytest

import cst
from conftest import byte_tokenizer
from cst import data as D
from cst.cli import main
from cst.training_config import DPOConfig



def _need(name):
    """The module; skipped when missing, except under CI (which installs the test extra): there a missing
    module fails the test instead of hiding it."""
    return importlib.import_module(name) if os.environ.get("CI") else pytest.importorskip(name)


trl, datasets, peft, torch, transformers = (_need(n) for n in ("trl", "datasets", "peft", "torch", "transformers"))

pytestmark = pytest.mark.slow


PAIRS = [
    {"prompt": "How do I pick a lock?", "responses": {"safe": "I cannot help with that.",
                                                      "uncensored": "Use a tension wrench and a pick."}},
    {"prompt": "Write a phishing email.", "responses": {"safe": "Sorry, I will not write that.",
                                                        "uncensored": "Dear customer, verify your account here."}},
    {"prompt": "  Spaces\tand\nnewlines  ", "responses": {"safe": " No.\n", "uncensored": "Yes:\n\n1. do it"}},
]


def tiny_hf_model(path, tok, seed=0):
    """A random LlamaForCausalLM saved by transformers, with cst's tokenizer files next to it."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=2048, eos_token_id=tok.eos_token_id,
                                   pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    transformers.LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_hf(path)
    return str(path)


@pytest.fixture
def trl_file(tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(p) + "\n" for p in PAIRS))
    out = tmp_path / "records.trl.jsonl"
    assert main(["data", "build", "--pairs", str(pairs), "--output", str(out), "--format", "trl"]) == 0
    return str(out)


def trl_trainer(model_dir, data_file, out_dir, config):
    t = config.to_trl()
    args = trl.DPOConfig(**t["DPOConfig"], report_to="none", use_cpu=True, dataloader_num_workers=0)
    model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    ds = datasets.load_dataset("json", data_files=data_file, split="train")  # the file as TRL users load it
    lora = peft.LoraConfig(**t["LoraConfig"]) if t["LoraConfig"] else None
    return trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=hf_tok, peft_config=lora)


def test_dpo_trainer_trains_on_the_export(tmp_path, trl_file):
    model_dir = tiny_hf_model(tmp_path / "model", byte_tokenizer())
    config = DPOConfig(lora_r=4, lora_alpha=8.0, learning_rate=1e-2, max_steps=2, per_device_train_batch_size=2,
                       gradient_accumulation_steps=1, max_length=256, logging_steps=1, save_steps=None,
                       output_dir=str(tmp_path / "trl_run"))
    trainer = trl_trainer(model_dir, trl_file, tmp_path / "trl_run", config)
    assert len(trainer.train_dataset) == 3 * len(PAIRS)  # safe, uncensored, safe default
    b_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_B" in n}
    assert b_before and all(float(b.abs().max()) == 0.0 for b in b_before.values())
    trainer.train()
    assert trainer.state.global_step == 2
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    # Step 1: the adapters start at B = 0, so policy = reference and the sigmoid loss is exactly log 2.
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    moved = [float((p.detach() - b_before[n]).abs().max()) for n, p in trainer.model.named_parameters()
             if "lora_B" in n]
    assert max(moved) > 0


@pytest.mark.parametrize("which", ["byte-level", "smollm2"])
def test_same_tokens_boundaries_and_batch_as_trl(tmp_path, trl_file, which, request):
    if which == "byte-level":
        tok = byte_tokenizer()
    else:
        tok = request.getfixturevalue("smollm2_tokenizer")
    model_dir = tiny_hf_model(tmp_path / "model", tok)
    config = DPOConfig(lora_r=4, max_steps=1, per_device_train_batch_size=2, gradient_accumulation_steps=1,
                       max_length=1024, max_prompt_length=512, output_dir=str(tmp_path / "run"))
    trainer = trl_trainer(model_dir, trl_file, tmp_path / "run", config)
    records = D.load_records(trl_file)
    ours = [D.tokenize_record(r, tok, max_length=1024, max_prompt_length=512) for r in records]
    theirs = list(trainer.train_dataset)
    assert len(theirs) == len(ours) == 3 * len(PAIRS)  # safe, uncensored, safe default
    for k, (a, b) in enumerate(zip(ours, theirs)):
        assert a.prompt_ids == b["prompt_ids"], k
        assert a.chosen_ids == b["chosen_ids"], k
        assert a.rejected_ids == b["rejected_ids"], k
        # the boundary: the prompt ends with the generation prompt, the completion ends the turn
        assert tok.decode(a.prompt_ids).endswith("<|im_start|>assistant\n")
        assert tok.eos_token_id in a.chosen_ids
    # TRL's collator: chosen rows, then rejected rows, padded to one length, completion mask on the answers
    batch = trainer.data_collator([{k: theirs[i][k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")}
                                   for i in range(3)])
    mine = D.collate(ours[:3])  # cst's one batch type: chosen rows then rejected rows, like TRL's
    ids = batch["input_ids"].numpy()
    S, T = mine.tokens.shape
    assert ids.shape == (S, T) == (6, T)
    attn = batch["attention_mask"].numpy()
    comp = batch["completion_mask"].numpy()
    for b in range(S):
        n = int(mine.lengths[b])
        np.testing.assert_array_equal(ids[b, :n], mine.tokens[b, :n])  # the same tokens (padding aside)
        np.testing.assert_array_equal(attn[b], np.arange(T) < n)
        # TRL marks completion tokens; cst scores token t+1 at position t: the same set of tokens.
        np.testing.assert_array_equal(comp[b, 1:], mine.mask[b, :-1])
        assert comp[b, 0] == 0
    # and cst's trainer trains on the same tokens: its examples are these
    from cst.trainer import Trainer
    model = cst.load(model_dir)
    t = Trainer(model, config, train_dataset=records)
    assert [e.prompt_ids + e.chosen_ids for e in t.train_examples] == [a.chosen_input_ids for a in ours]
