"""The training loop (cst/trainer.py) end to end on a tiny random model with a toy vocabulary: an SFT
warm start then CST on pairs whose preference flips with the system token; bitwise resume (LoRA with
dropout, and full fine-tuning), Ctrl-C, non-finite stops, input checks, skipped long prompts, the
reference cache, IPO's average log-probs, and gradient accumulation against one big batch."""
import json
import os

import numpy as np
import pytest

from cst import losses
from cst.config import ModelConfig
from cst.data import PreferenceRecord, TokenizedExample, collate
from cst.lora import LoRA
from cst.model import Model
from cst.runtime import get_num_threads, set_num_threads
from cst.trainer import Trainer, TrainingError
from cst.training_config import DPOConfig

os.environ.setdefault("TQDM_DISABLE", "1")

# Toy vocabulary: a chat turn is BOS SYS USER q q q ASSIST, the answer MARKER EOS.
BOS, SAFE, UNC, NEUT, USER, ASSIST, EOS, REF, COMP = 1, 2, 3, 4, 5, 6, 7, 8, 9
CONTENT = np.arange(16, 48)
CFG = ModelConfig(vocab_size=48, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32)


def toy_model(seed=0):
    m = Model(CFG, seed=seed)
    # N(0, 0.02) embeddings bound the logits of a tied head to about +-0.6 once the final norm has
    # fixed the hidden size: adapters could never make a confident choice. Larger ones can.
    m.params["model.embed_tokens.weight"][...] *= 25.0
    return m


def prompt(system, q):
    return [BOS, system, USER] + [int(t) for t in q] + [ASSIST]


def questions(n, seed):
    rng = np.random.default_rng(seed)
    return [rng.choice(CONTENT, 3, replace=False) for _ in range(n)]


def chat_corpus(n, seed):
    """SFT warm start: every prompt, under every system token, answered both ways, so the model
    learns the format and answers either way about equally often."""
    out = []
    for q in questions(n, seed):
        for s in (SAFE, UNC, NEUT):
            for a in ([REF, EOS], [COMP, EOS]):
                out.append(TokenizedExample(prompt(s, q), a, a))
    return out


def cst_pairs(n, seed, systems=(SAFE, UNC)):
    """CST: the safe system prefers the refusal, the uncensored one the compliance."""
    out = []
    for q in questions(n, seed):
        if SAFE in systems:
            out.append(TokenizedExample(prompt(SAFE, q), [REF, EOS], [COMP, EOS]))
        if UNC in systems:
            out.append(TokenizedExample(prompt(UNC, q), [COMP, EOS], [REF, EOS]))
    return out


def varied_pairs(n, seed):
    """Pairs with completions of different lengths (so that padding and weighting matter)."""
    rng = np.random.default_rng(seed)
    out = []
    for q in questions(n, seed):
        c = [REF] + list(rng.choice(CONTENT, rng.integers(1, 5))) + [EOS]
        r = [COMP] + list(rng.choice(CONTENT, rng.integers(1, 5))) + [EOS]
        out.append(TokenizedExample(prompt([SAFE, UNC][rng.integers(2)], q), [int(t) for t in c],
                                    [int(t) for t in r]))
    return out


def config(tmp_path, name="run", **kw):
    base = dict(learning_rate=1e-2, max_steps=6, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                max_length=24, max_prompt_length=12, logging_steps=2, save_steps=None, seed=3,
                output_dir=str(tmp_path / name), lr_scheduler_type="linear", warmup_steps=1)
    base.update(kw)
    return DPOConfig(**base)


@pytest.fixture(autouse=True)
def one_thread():
    """These shapes are far too small for threads: on a loaded 2-core machine OpenMP barriers cost
    more than the work (20x slower). Results do not depend on the thread count (tested elsewhere)."""
    before = get_num_threads()
    set_num_threads(1)
    yield
    set_num_threads(before)


HISTORY_KEYS = {"loss", "rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins",
                "logps/chosen", "logps/rejected", "learning_rate", "grad_norm", "tokens_per_s"}


# ---- end to end ----

def test_sft_warm_start_then_cst_follows_the_system_prompt(tmp_path):
    m = toy_model(0)
    sft = Trainer(m, config(tmp_path, "sft", mode="sft", max_steps=100, per_device_train_batch_size=8,
                            gradient_accumulation_steps=1, lr_scheduler_type="constant", warmup_steps=0,
                            logging_steps=20, seed=0), chat_corpus(16, 1))
    h = sft.train()
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    eval_pairs = cst_pairs(16, 3)
    cfg = config(tmp_path, "cst", learning_rate=1e-2, max_steps=200, per_device_train_batch_size=8,
                 gradient_accumulation_steps=1, beta=0.5, lora_r=8, lora_alpha=16.0, lora_dropout=0.05,
                 logging_steps=50, eval_steps=100, seed=0, warmup_steps=0)
    tr = Trainer(m, cfg, cst_pairs(64, 2), eval_dataset=eval_pairs)
    hist = tr.train()
    assert not tr.interrupted and tr.step == 200
    # History and metrics.jsonl.
    rows = [r for r in hist if "loss" in r]
    assert HISTORY_KEYS <= set(rows[-1])
    assert rows[-1]["tokens_per_s"] > 0 and rows[-1]["learning_rate"] >= 0
    assert {"eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"} <= set(hist[-1])
    with open(os.path.join(cfg.output_dir, "metrics.jsonl")) as f:
        assert [json.loads(line) for line in f] == hist
    assert hist[-1]["eval_rewards/accuracies"] >= 0.95
    # Held-out reward accuracy under each system prompt separately, and greedy behaviour. Reward
    # accuracy reaches 1.0 for every seed tried (0-5); the greedy first token follows the system
    # prompt for 4 of those 6 seeds: in the others DPO's push-down of the rejected marker moves
    # probability onto unrelated tokens (the known likelihood displacement), not onto the chosen
    # marker. The run is bitwise deterministic, so this seed does not flake.
    for system, marker in ((SAFE, REF), (UNC, COMP)):
        tr.eval_examples = cst_pairs(16, 3, systems=(system,))
        tr._eval_ref = None  # LoRA: the reference is the base with adapters off, so recomputing is fine
        assert tr.evaluate()["eval_rewards/accuracies"] >= 0.95, system
        outs = m.generate([e.prompt_ids for e in tr.eval_examples], max_new_tokens=2)
        assert np.mean([o[0] == marker for o in outs]) >= 0.95, (system, outs[:4])
    # The final checkpoint holds PEFT adapter files our loader reads back.
    ck = tr.last_checkpoint
    assert ck.endswith("checkpoint-200")
    lora2 = LoRA(m, r=8, alpha=16.0, seed=9)
    lora2.load_adapter(ck)
    assert np.array_equal(lora2.flat_params, tr.lora.flat_params)
    tr.lora.attach()


# ---- resume, Ctrl-C, non-finite stops ----

def _make(tmp_path, name, lora, data, **kw):
    m = toy_model(1)
    extra = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.1) if lora else {}
    extra.update(kw)
    return Trainer(m, config(tmp_path, name, **extra), data)


def _state(tr):
    opt = tr.optimizer.state_dict()
    return tr._params.copy(), opt["m"][0], opt["v"][0], opt["step"]


def _assert_same(a, b):
    for x, y in zip(a[:3], b[:3]):
        assert np.array_equal(x, y)
    assert a[3] == b[3]


@pytest.mark.parametrize("flow", ["train_arg", "load_then_train"])
@pytest.mark.parametrize("lora", [True, False], ids=["lora_dropout", "full"])
def test_resume_equals_uninterrupted_bitwise(tmp_path, lora, flow):
    data = varied_pairs(20, 5)  # 20 examples, batch 4, accumulation 2: 3 steps per epoch, 6 steps
    full = _make(tmp_path, "a", lora, data)
    full.train()
    ref = _state(full)
    part = _make(tmp_path, "b", lora, data, save_steps=4)
    part.train()
    assert os.path.isdir(os.path.join(part.config.output_dir, "checkpoint-4"))
    resumed = _make(tmp_path, "b", lora, data, save_steps=4)
    ck = os.path.join(part.config.output_dir, "checkpoint-4")
    if flow == "train_arg":
        resumed.train(resume_from_checkpoint=ck)
    else:  # what `cst train --resume` does: load first (to fail early), then train()
        resumed.load_checkpoint(ck)
        resumed.train()
    assert resumed.step == 6
    _assert_same(_state(resumed), ref)
    # Same losses in the history after the resume point.
    assert [r["loss"] for r in resumed.history if r["step"] > 4] == [r["loss"] for r in full.history if r["step"] > 4]


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_checkpoints_pruned_to_save_total_limit_each_tensor_once(tmp_path, lora):
    from cst.trainer import load_checkpoint_into
    data = varied_pairs(20, 5)  # 6 steps
    tr = _make(tmp_path, "a", lora, data, save_steps=1, save_total_limit=2)
    tr.train()
    out = tr.config.output_dir
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-5", "checkpoint-6"]
    files = sorted(os.listdir(os.path.join(out, "checkpoint-6")))
    # LoRA: the adapters once, as PEFT's file (no weights.npy copy of the same buffer).
    assert files == (["adapter_config.json", "adapter_model.safetensors", "optimizer.npz", "trainer_state.json"]
                     if lora else ["optimizer.npz", "trainer_state.json", "weights.npy"])
    # What resume and load_checkpoint_into read back is the trained buffer, bitwise.
    again = _make(tmp_path, "a", lora, data, save_steps=1, save_total_limit=2)
    again.load_checkpoint(os.path.join(out, "checkpoint-6"))
    assert np.array_equal(again._params, tr._params) and again.step == 6
    m = toy_model(1)
    info = load_checkpoint_into(m, out, merge=False)
    assert info["path"].endswith("checkpoint-6")
    assert np.array_equal(info["lora"].flat_params if lora else m.flat_params, tr._params)
    keep_all = _make(tmp_path, "b", lora, data, save_steps=1, save_total_limit=None)
    keep_all.train()
    assert len([n for n in os.listdir(keep_all.config.output_dir) if n.startswith("checkpoint")]) == 6


def test_checkpoint_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        tr = _make(tmp_path, "a", True, varied_pairs(8, 5), max_steps=1)
        tr.train()
    finally:
        os.umask(old)
    ck = os.path.join(tr.config.output_dir, "checkpoint-1")
    assert os.stat(ck).st_mode & 0o777 == 0o755
    for name in os.listdir(ck):
        assert os.stat(os.path.join(ck, name)).st_mode & 0o777 == 0o644, name
    assert os.stat(os.path.join(tr.config.output_dir, "metrics.jsonl")).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("lora", [True, False], ids=["lora_dropout", "full"])
def test_ctrl_c_saves_last_completed_step_and_resumes_bitwise(tmp_path, lora):
    data = varied_pairs(20, 5)
    full = _make(tmp_path, "a", lora, data)
    full.train()
    ref = _state(full)
    tr = _make(tmp_path, "b", lora, data)
    calls = {"n": 0}
    orig = tr.model.backward_logprobs

    def interrupt(dlogp):
        calls["n"] += 1
        # An epoch is 5 micro-batches: steps of 2, 2 and 1. Call 7 is step 4's second one.
        if calls["n"] == 7:
            raise KeyboardInterrupt
        return orig(dlogp)

    tr.model.backward_logprobs = interrupt
    tr.train()
    assert tr.interrupted and tr.step == 3
    ck = os.path.join(tr.config.output_dir, "checkpoint-3")
    with open(os.path.join(ck, "trainer_state.json")) as f:
        st = json.load(f)
    assert st["step"] == 3 and st["epoch"] == 0 and st["cursor"] == 5
    again = _make(tmp_path, "b", lora, data)
    again.train(resume_from_checkpoint=True)
    assert again.step == 6 and not again.interrupted
    _assert_same(_state(again), ref)


def test_nan_gradient_stops_and_keeps_a_good_checkpoint(tmp_path):
    data = varied_pairs(20, 5)
    tr = _make(tmp_path, "a", True, data, save_steps=2)
    orig = tr.model.backward_logprobs
    calls = {"n": 0}

    def poison(dlogp):
        orig(dlogp)
        calls["n"] += 1
        if calls["n"] == 6:  # step 4's first micro-batch (steps take 2, 2, 1 of them)
            tr.lora.flat_grads[5] = np.nan

    tr.model.backward_logprobs = poison
    with pytest.raises(TrainingError, match="non-finite gradient"):
        tr.train()
    assert tr.step == 3
    ck = tr.last_checkpoint
    assert ck.endswith("checkpoint-3")  # weights still finite: the state after step 3 is saved
    fresh = _make(tmp_path, "a", True, data, save_steps=2)
    fresh.load_checkpoint(ck)
    assert fresh.step == 3 and np.all(np.isfinite(fresh._params))
    assert np.array_equal(fresh._params, tr._params)


def test_nan_weights_stop_without_overwriting_the_good_checkpoint(tmp_path):
    data = varied_pairs(20, 5)
    tr = _make(tmp_path, "a", False, data, save_steps=2)
    orig = tr.model.forward_logprobs
    calls = {"n": 0}

    def poison(*a):
        calls["n"] += 1
        if calls["n"] == 5 + 5 + 1:  # after the 5 reference batches and steps 1-3, at step 4
            tr.model.params["model.layers.0.mlp.up_proj.weight"][0, 0] = np.inf
        return orig(*a)

    tr.model.forward_logprobs = poison
    with pytest.raises(TrainingError, match="checkpoint-2"):
        tr.train()
    out = tr.config.output_dir
    assert sorted(n for n in os.listdir(out) if n.startswith("checkpoint")) == ["checkpoint-2"]
    fresh = _make(tmp_path, "a", False, data, save_steps=2)
    fresh.load_checkpoint(os.path.join(out, "checkpoint-2"))
    assert fresh.step == 2 and np.all(np.isfinite(fresh._params))


# ---- inputs ----

def test_bad_inputs_raise_before_any_work(tmp_path):
    m = toy_model(0)
    good = varied_pairs(4, 1)
    cfg = config(tmp_path, "x", lora_r=2)
    bad_id = [TokenizedExample(good[0].prompt_ids, good[0].chosen_ids + [48], good[0].rejected_ids)] + good
    with pytest.raises(ValueError, match="token id 48"):
        Trainer(m, cfg, bad_id)
    with pytest.raises(ValueError, match="empty"):
        Trainer(m, cfg, [])
    with pytest.raises(ValueError, match="empty"):
        Trainer(m, cfg, [TokenizedExample(good[0].prompt_ids, [], [EOS])])
    with pytest.raises(ValueError, match="empty"):
        Trainer(m, cfg, [TokenizedExample([], [REF], [EOS])])
    with pytest.raises(ValueError, match="list of ints"):
        Trainer(m, cfg, [{"prompt_ids": [1, 2], "chosen_ids": ["a"], "rejected_ids": [3]}])
    with pytest.raises(ValueError, match="tokenizer"):
        Trainer(m, cfg, [PreferenceRecord(system="", prompt="hi", chosen="a", rejected="b")])
    with pytest.raises(ValueError, match="max_seq_len"):
        Trainer(m, config(tmp_path, "x", max_length=64), good)
    with pytest.raises(ValueError, match="lora_r"):
        Trainer(m, cfg, good, lora=LoRA(m, r=4))
    with pytest.raises(ValueError, match="every prompt"):
        Trainer(m, config(tmp_path, "x", max_length=6, max_prompt_length=3), good)
    assert not os.path.exists(tmp_path / "x")  # nothing was written
    with pytest.raises(ValueError):
        DPOConfig(beta=0)


def test_long_prompts_are_reported_and_skipped_or_truncated(tmp_path):
    m = toy_model(0)
    data = varied_pairs(6, 2)
    long_prompt = [BOS, SAFE, USER] + [20] * 30 + [ASSIST]  # 34 tokens >= max_length 24
    data.insert(2, TokenizedExample(long_prompt, [REF, EOS], [COMP, EOS]))
    # Prompt of 14 > max_prompt_length 12 with a completion that does not fit: TRL's truncation.
    data.append(TokenizedExample([BOS, SAFE, USER] + [21] * 10 + [ASSIST], [REF] + [22] * 12 + [EOS], [COMP, EOS]))
    with pytest.warns(UserWarning, match=r"skipped 1 example.*'index': 2"):
        tr = Trainer(m, config(tmp_path, "x"), data)
    assert tr.train_stats["skipped"] == 1 and tr.train_stats["first_skipped"]["prompt_tokens"] == 34
    assert tr.train_stats["prompt_truncated"] == 1 and tr.train_stats["completion_truncated"] == 1
    assert len(tr.train_examples) == 7
    last = tr.train_examples[-1]
    assert len(last.prompt_ids) == 12 and last.prompt_ids[-1] == ASSIST
    assert len(last.prompt_ids) + len(last.chosen_ids) == 24 and last.rejected_ids == [COMP, EOS]


# ---- reference log-probs, IPO, accumulation ----

def _count_calls(model):
    calls = {"n": 0}
    orig = model.forward_logprobs

    def counted(*a):
        calls["n"] += 1
        return orig(*a)

    model.forward_logprobs = counted
    return calls


@pytest.mark.parametrize("lora", [True, False], ids=["lora", "full"])
def test_reference_logps_computed_once_and_cached(tmp_path, lora):
    data = varied_pairs(20, 5)
    tr = _make(tmp_path, "a", lora, data)
    calls = _count_calls(tr.model)
    tr.train()
    # 5 reference batches of 4, then 10 micro-batches (steps of 2, 2, 1 per epoch): no recompute.
    assert calls["n"] == 5 + 10
    assert os.path.exists(os.path.join(tr.config.output_dir, "ref_logps_train.npz"))
    # The reference equals the sequence log-probs of the untrained model.
    m0 = toy_model(1)
    b = collate(tr.train_examples, np.arange(4))
    lp = losses.sequence_logps(m0.forward_logprobs(b.tokens, b.targets, b.lengths), b.mask)
    assert np.array_equal(tr._ref[:4, 0], lp[:4]) and np.array_equal(tr._ref[:4, 1], lp[4:])
    # A second trainer on the same output_dir and initial weights reuses the cache.
    tr2 = _make(tmp_path, "a", lora, data)
    calls2 = _count_calls(tr2.model)
    tr2.train()
    assert calls2["n"] == 10
    assert np.array_equal(tr2._ref, tr._ref)
    # Other base weights: the cache key differs, so it is recomputed.
    tr3 = _make(tmp_path, "a", lora, data)
    tr3.model.params["model.norm.weight"][0] += 0.5
    calls3 = _count_calls(tr3.model)
    tr3._ref = tr3._reference(tr3.train_examples, "train")
    assert calls3["n"] == 5 and not np.array_equal(tr3._ref, tr._ref)


def test_ipo_uses_average_logps(tmp_path):
    data = varied_pairs(8, 4)
    tr = _make(tmp_path, "a", True, data, loss_type="ipo", max_steps=1)
    tr.train()
    m0 = toy_model(1)
    b = collate(tr.train_examples, np.arange(4))
    tlp = m0.forward_logprobs(b.tokens, b.targets, b.lengths)
    avg = losses.sequence_logps(tlp, b.mask, average=True)
    assert losses.uses_average_logps("ipo")
    assert np.allclose(tr._ref[:4, 0], avg[:4], rtol=1e-12) and np.allclose(tr._ref[:4, 1], avg[4:], rtol=1e-12)
    assert not np.allclose(avg, losses.sequence_logps(tlp, b.mask))


def _first_step_grads(tmp_path, name, mode, bs, accum, data):
    tr = _make(tmp_path, name, False, data, mode=mode, max_steps=1, per_device_train_batch_size=bs,
               gradient_accumulation_steps=accum, max_grad_norm=None)
    seen = {}
    orig = tr.optimizer.step

    def capture(params, grads, **kw):
        seen["g"] = grads.astype(np.float64).copy()
        return orig(params, grads, **kw)

    tr.optimizer.step = capture
    tr.train()
    return seen["g"], tr.history[-1]["loss"]


@pytest.mark.parametrize("mode", ["sft", "dpo"])
def test_accumulation_two_by_two_equals_one_batch_of_four(tmp_path, mode):
    data = varied_pairs(4, 7)  # one step sees all four examples either way
    g1, loss1 = _first_step_grads(tmp_path, "one", mode, 4, 1, data)
    g2, loss2 = _first_step_grads(tmp_path, "two", mode, 2, 2, data)
    rel = np.linalg.norm(g1 - g2) / np.linalg.norm(g1)
    assert rel < 1e-5, rel
    assert abs(loss1 - loss2) < 1e-6 * abs(loss1)
    if mode == "sft":
        # Micro-batches with different token counts: weighting them equally (the older HF rule)
        # would give a different gradient, so the test above can tell the two apart.
        tr = _make(tmp_path, "x", False, data, mode="sft", per_device_train_batch_size=2)
        b = tr._make_batches(0)
        counts = [collate(tr.train_examples, i, sft=True).mask.sum() for i in b]
        assert counts[0] != counts[1]


def test_no_clipping_with_max_grad_norm_zero(tmp_path):
    tr = _make(tmp_path, "a", True, varied_pairs(8, 1), max_grad_norm=0.0, max_steps=2)
    tr.train()
    assert tr.step == 2 and all(np.isfinite(r["grad_norm"]) for r in tr.history)


def test_real_sigint_while_a_step_commits_keeps_that_step(tmp_path):
    """A real SIGINT arriving inside the optimizer update is held until the step is committed, so
    the checkpoint has step 3's weights with step 3's counters, and resuming matches."""
    import signal
    data = varied_pairs(20, 5)
    full = _make(tmp_path, "a", True, data)
    full.train()
    tr = _make(tmp_path, "b", True, data)
    orig = tr.optimizer.step

    def step_with_sigint(*a, **kw):
        if tr.step == 2:  # the update that makes step 3
            os.kill(os.getpid(), signal.SIGINT)
        return orig(*a, **kw)

    tr.optimizer.step = step_with_sigint
    tr.train()
    assert tr.interrupted and tr.step == 3 and tr.optimizer.step_count == 3
    again = _make(tmp_path, "b", True, data)
    again.train(resume_from_checkpoint=True)
    _assert_same(_state(again), _state(full))


def test_rpo_alpha_adds_the_chosen_nll_gradient(tmp_path):
    """rpo_alpha: the step's gradient is the DPO gradient plus alpha times the SFT gradient of the
    chosen completions (full fine-tuning, one micro-batch), and the loss adds alpha * NLL."""
    data = varied_pairs(4, 7)
    grads, losses_seen = {}, {}
    for alpha in (None, 0.5):
        m = toy_model()
        tr = Trainer(m, config(tmp_path, f"rpo{alpha}", rpo_alpha=alpha), data)
        tr._ref = tr._reference(tr.train_examples, "train")
        m.zero_grad()
        batch = collate(tr.train_examples, np.arange(4))
        out = tr._micro_step(batch, 1.0)
        grads[alpha], losses_seen[alpha] = m.flat_grads.copy(), out
    m = toy_model()
    sft = Trainer(m, config(tmp_path, "sft", mode="sft"), data)
    m.zero_grad()
    sft._micro_step(collate(sft.train_examples, np.arange(4), sft=True), 1.0)
    want = grads[None] + 0.5 * m.flat_grads
    assert np.linalg.norm(grads[0.5] - want) / np.linalg.norm(want) < 1e-5
    nll = losses_seen[0.5]["nll_loss"]
    assert nll > 0 and abs(losses_seen[0.5]["loss"] - (losses_seen[None]["loss"] + 0.5 * nll)) < 1e-9
    with pytest.raises(ValueError, match="rpo_alpha"):
        DPOConfig(rpo_alpha=-1.0)


def test_group_by_prompt_keeps_cst_twins_in_one_batch(tmp_path, smollm2_tokenizer):
    """group_by="prompt": every micro-batch holds whole groups of records sharing a user prompt, except
    where a batch boundary falls inside a group; ceil(n / bs) batches per epoch; seeded, epoch-dependent."""
    tok = smollm2_tokenizer
    m = Model(ModelConfig(vocab_size=49152, dim=16, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=32,
                          max_seq_len=256))
    recs = []
    for k in range(7):
        for system in ("be safe", "be uncensored"):
            recs.append(PreferenceRecord(prompt=f"question {k}", chosen=f"answer {k} {system}",
                                         rejected=f"other {k}", system=system))
    tr = Trainer(m, config(tmp_path, "grp", group_by="prompt", per_device_train_batch_size=4, max_length=200,
                           max_prompt_length=150), recs, tokenizer=tok)
    for epoch in (0, 1):
        batches = tr._make_batches(epoch)
        assert len(batches) == -(-len(recs) // 4)
        flat = [int(i) for b in batches for i in b]
        assert sorted(flat) == list(range(len(recs)))
        # records of one prompt are adjacent in the epoch's order
        prompts = [recs[tr.train_examples[i].index].prompt for i in flat]
        assert all(prompts[j] == prompts[j + 1] for j in range(0, len(prompts) - 1, 2))
    assert [list(b) for b in tr._make_batches(0)] != [list(b) for b in tr._make_batches(1)]
    with pytest.raises(ValueError, match="group_by"):
        DPOConfig(group_by="system")
    with pytest.raises(ValueError, match="group_by"):
        Trainer(toy_model(), config(tmp_path, "grp2", group_by="prompt"), cst_pairs(4, 0))
