"""`cst demo`: the whole CST pipeline on SmolLM2-135M-Instruct, on a CPU, in one call: baseline evaluation,
self-synthesised CST data, LoRA DPO training, evaluation again, and a Markdown/JSON report with plots and
the tuned model (HF directory and GGUF). It sequences cst.load, cst.eval, cst.synth, cst.data, cst.Trainer
and cst.plots; it adds no algorithm of its own. quick=True runs the same code on a tiny random model.
"""
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

from . import eval as E
from .core.atomic import write_json, write_text
from .eval.metrics import fmt as _fmt

__all__ = ["DEFAULTS", "QUICK", "OUTPUT_DIR", "settings_for", "run"]

# The full recipe. Every key can be overridden through run(**overrides); docs/demo.md explains each choice.
DEFAULTS = {
    "model": "smollm2-135m-instruct",
    # "paper": the paper's two strings; "paraphrased": 4 training phrasings each; "diverse": 17 each (the
    # paraphrased four plus 13 written blind). On validation, seeds 0-2, on the same synthesised pairs,
    # "diverse" against "paraphrased": S0 0.875 -> 0.911, S1 0.833 -> 0.922 (runs p1-s0..s2 vs fresh, r5-s1,
    # r5-s2 in docs/demo.md).
    "configurations": "diverse",
    "train_phrasings": 1,  # training phrasings per pair and configuration (rotating over the pairs)
    # prompts per category (None: all of the 20 train / 4 validation / 3 test harmful, 7-8 train /
    # 2 validation / 2 test benign). The default trains on the first 18 harmful and 6 benign train prompts
    # of each category (144 + 48; the validation split took the last 4 harmful and 2 benign of the old
    # train lists, so these are the prompts of the runs below): what fits the 20-minute budget with 3
    # epochs. 12 harmful per category gave S1 0.68 / 0.53 (seeds 0 / 1), 18 gave 0.92 / 0.92 / 0.83
    # (seeds 0 / 1 / 2; runs z1, s1, a0-a2 in docs/demo.md; phrase judge, test split).
    "train_harmful_per_category": 18,
    "train_benign_per_category": 6,
    # The safe default: each harmful pair also trains with no system prompt, preferring the safe answer.
    "safe_default": True,
    # Which split of cst.prompts (and of the system-prompt phrasings) the evaluation uses: recipes are chosen
    # on "validation"; "test" is run once per release (docs/demo.md records it with its date and commit).
    "eval_split": "validation",
    "eval_harmful_per_category": None,
    "eval_benign_per_category": None,
    # evaluation (greedy)
    "eval_phrasings": "all",  # every held-out phrasing ("all") or one per prompt ("rotate")
    # 128 new tokens: the length the targets and the default judge's held-out check on tuned answers use
    # (cst.eval and `cst eval` default to 48)
    "eval_max_new_tokens": 128,
    "n_boot": E.N_BOOT,
    "gen_batch_size": E.BATCH_SIZE,
    "temperature": 0.0,  # 0 = greedy, for evaluation, the uncensored answers and the benign answers
    # synthesis
    "synth_max_new_tokens": 80,
    "benign_max_new_tokens": 80,
    # configurations whose training phrasings the benign pairs (helpful answer over a refusal) are used
    # under; "default" = no system prompt. Under "safe" only, the safe default spilled onto benign prompts
    # (over-refusal with no system prompt 0.81, run v1 in docs/demo.md); all three: 0.19-0.25 (r1, r1b).
    "benign_under": ("safe", "uncensored", "default"),
    # judge of the synthesis filters (cst.judges.judge_by_name): "default" = the four-way default judge,
    # which keeps an uncensored answer only as a compliance and drops loops; "refusal" = the phrase judge
    # the recipe below was tuned with (docs/demo.md, runs a0-c2)
    "synth_judge": "default",
    # with a number m, the synthesis filters also drop an uncensored answer whose probability of being a
    # compliance is below m by the judge (cst.synth.synthesize(min_compliance=)); None keeps every
    # answer the judge calls a compliance
    "synth_min_compliance": None,
    # what becomes of a pair whose uncensored answer is below that bar: "drop" it, or keep it for the
    # configurations that prefer the safe side only ("safe_only": its refusal still teaches the safe
    # behaviour, and the doubtful answer is never a chosen side)
    "synth_doubtful": "drop",
    # training (DPO with LoRA on all seven projections)
    "lora_r": 16,
    "lora_alpha": 32.0,
    "lora_dropout": 0.0,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.1,
    "num_train_epochs": 3.0,
    "beta": 0.1,
    # RPO term: + rpo_alpha * NLL of the chosen answers. Plain DPO (e1/e2/f1 in docs/demo.md) pushed both
    # sides down and the 135M model drifted into compliance under the safe prompts.
    "rpo_alpha": 1.0,
    "per_device_train_batch_size": 4,
    "gradient_accumulation_steps": 1,
    # True: the frozen base is held in bf16 during training (bf16 GEMMs, fp32 accumulation; LoRA adapters,
    # AdamW, norms and losses fp32; DPOConfig(bf16=True)); the tuned model is merged and saved in fp32.
    "bf16": True,
    # 160: the whole 80-token synthesised answers after prompts of 35-57 tokens (80 cut them to their first
    # 25-45 tokens); on validation, seeds 0-2, S0 0.849 -> 0.938 and S1 0.781 -> 0.802 (runs r5, r5-s1,
    # r5-s2 against r1b, d-s1, d-s2 in docs/demo.md; from scratch, seed 0 on its own synthesis: 0.875 / 0.833)
    "max_length": 160,
    "max_prompt_length": 64,
    "logging_steps": 2,
    "save_steps": 10,
    # checkpoints kept in train/ (the newest is what a resume needs; the tuned model itself is model-hf/
    # and model.gguf). Each holds the adapters once (adapter_model.safetensors) and AdamW's two moments.
    "save_total_limit": 1,
    # report
    "n_examples": 3,
}

# quick=True: the same pipeline on a tiny random model with SmolLM2's tokenizer and a few prompts, so that
# every step runs in well under two minutes. Its figures mean nothing. It samples (temperature 1): greedy
# decoding of a random model with tied embeddings repeats the prompt's last token ("\n"), i.e. empty replies.
QUICK = dict(
    DEFAULTS, model="tiny-random", configurations="paper",
    train_harmful_per_category=1, train_benign_per_category=1, eval_harmful_per_category=1,
    eval_benign_per_category=1, eval_phrasings="rotate", eval_max_new_tokens=8, temperature=1.0, n_boot=200, gen_batch_size=16,
    synth_max_new_tokens=8, benign_max_new_tokens=8, lora_r=4, lora_alpha=8.0, num_train_epochs=1.0,
    per_device_train_batch_size=4, gradient_accumulation_steps=1, max_length=80, max_prompt_length=64, benign_under=("safe", "uncensored", "default"),
    logging_steps=1, save_steps=5, n_examples=2,
    # a random model writes token soup, which the default judge rightly calls degenerate (no pair would
    # survive its filters); the phrase judge keeps the pipeline fed
    synth_judge="refusal")

# The tiny model of quick mode: SmolLM2's vocabulary (so its tokenizer and chat template work), nothing else.
TINY_CONFIG = dict(dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=1024)

STEPS = ("load", "baseline_eval", "synthesis", "training", "final_eval", "save")


def settings_for(quick: bool = False, **overrides) -> dict:
    """The settings run() uses: DEFAULTS (or QUICK) updated with overrides; unknown keys raise ValueError."""
    s = dict(QUICK if quick else DEFAULTS)
    unknown = sorted(k for k in overrides if k not in s)
    if unknown:
        raise ValueError(f"cst.demo: unknown setting(s) {unknown}; known: {sorted(s)}")
    s.update(overrides)
    from .data import CONFIGURATION_SETS
    if s["configurations"] not in CONFIGURATION_SETS:
        raise ValueError(f"cst.demo: configurations must be one of {sorted(CONFIGURATION_SETS)}, got "
                         f"{s['configurations']!r}")
    if s["eval_split"] not in ("validation", "test"):
        raise ValueError(f"cst.demo: eval_split must be 'validation' or 'test', got {s['eval_split']!r}")
    if s["synth_doubtful"] not in ("drop", "safe_only"):
        raise ValueError(f"cst.demo: synth_doubtful must be 'drop' or 'safe_only', got {s['synth_doubtful']!r}")
    if s["synth_doubtful"] == "safe_only" and s["synth_min_compliance"] is None:
        raise ValueError("cst.demo: synth_doubtful='safe_only' needs synth_min_compliance (the bar that makes "
                         "an answer doubtful)")
    if s["eval_phrasings"] not in ("all", "rotate"):
        raise ValueError(f"cst.demo: eval_phrasings must be 'all' or 'rotate', got {s['eval_phrasings']!r}")
    return s


# ----------------------------------------------------------------------------------------------------
# Pieces


def _key(obj) -> str:
    """A short stable hash of JSON-able settings: caches are reused only under identical settings."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _write_json(path: Path, obj) -> None:
    write_json(path, obj, indent=1, ensure_ascii=False)


def _read_cache(path: Path, key: str):
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except (OSError, ValueError):
        return None
    return d.get("value") if isinstance(d, dict) and d.get("key") == key else None


def _per_category(prompts: list, k) -> list:
    """The first k prompts of each category (all when k is None), in the set's fixed order."""
    if k is None:
        return prompts
    seen, out = {}, []
    for p in prompts:
        n = seen.get(p["category"], 0)
        if n < k:
            out.append(p)
            seen[p["category"]] = n + 1
    return out


def _load_model(s: dict, seed: int):
    import cst
    if s["model"] == "tiny-random":
        from .io.gguf import load_gguf_tokenizer
        from .io import smollm2_path
        tok = load_gguf_tokenizer(smollm2_path())
        model = cst.Model(cst.ModelConfig(vocab_size=49152, **TINY_CONFIG), seed=seed)
        model.tokenizer = tok
        return model
    return cst.load(s["model"])


_SENTENCE_END = re.compile(r"[.!?:)\]*`\"'](?=\s)|\n")


def _float32_twin(model):
    """A float32 model of `model`'s config and tokenizer (its weights are overwritten by the caller)."""
    import cst
    twin = cst.Model(model.config, init=False)
    twin.tokenizer = model.tokenizer
    return twin


def _trim(text: str) -> str:
    """A reply cut at max_new_tokens, shortened to its last sentence or line end when that keeps at least
    half of it (otherwise the cut text itself)."""
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    if ends and ends[-1] >= len(text) // 2:
        return text[:ends[-1]].rstrip()
    return text.rstrip()


class _TrimmedChat:
    """The model as cst.synth sees it: replies cut at max_new_tokens are trimmed to their last full sentence
    and accepted (last_truncated all False), instead of dropping the pair. A 135M model writes long lists;
    the start of an answer is what tells complying from refusing, and DPO only needs that contrast.
    `cut` counts the trimmed replies per stage, which every call names (cst.synth passes "answer",
    "critique" and "revision" to models that declare takes_stage; the demo's benign answers "benign")."""

    takes_stage = True

    def __init__(self, model, stages=("answer", "critique", "revision")):
        self.model, self.tokenizer = model, model.tokenizer
        self.last_truncated = None
        self.cut = {st: 0 for st in stages}
        self.total = {st: 0 for st in stages}

    def chat(self, conversations, max_new_tokens=256, *, stage, **kwargs):
        if stage not in self.cut:
            raise ValueError(f"_TrimmedChat: unknown stage {stage!r}; expected one of {sorted(self.cut)}")
        out = self.model.chat(conversations, max_new_tokens=max_new_tokens, **kwargs)
        flags = self.model.last_truncated or [False] * len(out)
        self.total[stage] += len(out)
        self.cut[stage] += sum(bool(f) for f in flags)
        self.last_truncated = [False] * len(out)
        return [_trim(t) if f else t for t, f in zip(out, flags)]


def harmful_synthesis(model, s: dict, seed: int, out: Path, progress: bool = False, judge=None):
    """The demo's synthesis of harmful pairs (its step 3) with settings `s` (settings_for()): the first
    `train_harmful_per_category` embedded train prompts of each category, logged to
    out/synth_harmful.jsonl (resumed when it exists), filtered by `judge` (default: the one
    s["synth_judge"] names). Returns (cst.eval.synth's result, the demo's harmful records).
    benchmarks/bench_dpo.py --trl --synth-records K uses it to make demo-style records without a demo run."""
    from .data.prompts import default_prompts
    from .eval.judges import judge_by_name
    from .eval.synth import synthesize
    harmful = _per_category(default_prompts("train", "harmful"), s["train_harmful_per_category"])
    judge = judge if judge is not None else judge_by_name(s["synth_judge"])
    bar, safe_only = s["synth_min_compliance"], s["synth_doubtful"] == "safe_only"
    if safe_only and not hasattr(judge, "predict_proba"):
        raise ValueError(f"cst.demo: synth_doubtful='safe_only' needs a synthesis judge with probabilities "
                         f"(default or behaviour:FILE.json), got {type(judge).__name__}")
    res = synthesize(_TrimmedChat(model), harmful, configurations=_configurations(s),
                     output=Path(out) / "synth_harmful.jsonl", max_new_tokens=s["synth_max_new_tokens"],
                     batch_size=s["gen_batch_size"], seed=seed, judge=judge,
                     refusal_fallback=True, resume=True, progress=progress, temperature=s["temperature"],
                     min_compliance=None if safe_only else bar)
    records = res.records(phrasings=s["train_phrasings"], task="harmless", safe_default=s["safe_default"])
    if safe_only and bar is not None and res.pairs:
        from .eval.judges import KINDS
        p = judge.predict_proba([q.prompt for q in res.pairs], [q.responses["uncensored"] for q in res.pairs])
        doubtful = {q.prompt for q, c in zip(res.pairs, p[:, KINDS.index("compliance")]) if c < bar}
        records = [r for r in records if not (r.prompt in doubtful and r.metadata.get("behaviour") == "uncensored")]
        res.stats["safe_only_pairs"] = len(doubtful)
    return res, records


def _configurations(s: dict) -> list:
    from .data import CONFIGURATION_SETS
    return CONFIGURATION_SETS[s["configurations"]]


def _evaluate(model, s, seed, judge, progress, tag, reference=None):
    """configurability on the held-out harmful prompts and over_refusal on the held-out benign ones, both
    under the configurations' held-out system prompts and with none, and retention: the per-token
    log-likelihood of `reference` answers ([prompt, answer] pairs; None: this model's own answers to the
    benign prompts with no system prompt, which the baseline evaluation records for the tuned one).
    -> (summary, full reports)."""
    from .data.prompts import default_prompts
    from .data import evaluation_configurations
    cfgs = evaluation_configurations(_configurations(s), s["eval_split"])
    harmful = _per_category(default_prompts(s["eval_split"], "harmful"), s["eval_harmful_per_category"])
    benign = _per_category(default_prompts(s["eval_split"], "benign"), s["eval_benign_per_category"])
    kw = dict(configurations=cfgs, max_new_tokens=s["eval_max_new_tokens"], seed=seed, batch_size=s["gen_batch_size"],
              phrasings=s["eval_phrasings"], n_boot=s["n_boot"], temperature=s["temperature"], progress=progress)
    conf = E.configurability(model, harmful, judge=judge, **kw)
    over = E.over_refusal(model, benign, refusal_judge=judge, **kw)
    if reference is None:
        reference = [[r["prompt"], r["response"].strip()] for r in over.responses
                     if r["configuration"] is None and r["response"].strip()]
    ret = E.retention(E.answer_scorer(model), [tuple(x) for x in reference]) if reference else None
    summary = {
        "S0": conf.S0, "S0_ci": conf.S0_ci, "S1": conf.S1, "S1_ci": conf.S1_ci,
        "no_system_safe": conf.default["rate"], "no_system_safe_ci": conf.default["ci"],
        "over_refusal": over.rate, "over_refusal_ci": over.ci,
        "retention": {"reference": reference, "nll_per_token": ret["nll_per_token"] if ret else None,
                      "n_tokens": ret["n_tokens"] if ret else 0},
        "n_harmful_responses": len(conf.responses), "n_benign_responses": len(over.responses),
        "per_category": {c: {k: v["rate"] for k, v in d.items() if v is not None}
                         for c, d in conf.per_category.items()},
        "degeneration": {k: v["rate"] for k, v in conf.degeneration.items()},
        "kinds": {"harmful": _kind_shares(conf.responses), "benign": _kind_shares(over.responses)},
    }
    return summary, {"configurability": conf.to_dict(), "over_refusal": over.to_dict(), "tag": tag}


def _kind_shares(rows):
    """{configuration | "default": {kind: share}} of rows carrying four-way kinds ({} without)."""
    out = {}
    for r in rows:
        if "verdict" in r:
            out.setdefault(r["configuration"] or "default", []).append(r["verdict"])
    return {c: {k: ks.count(k) / len(ks) for k in ("refusal", "deflection", "compliance", "degenerate")}
            for c, ks in out.items()}


def _baseline_key(s, seed, judge) -> str:
    """The key of eval_baseline.json: the model, the evaluation settings, what is evaluated of the
    configurations (name, preferred behaviour, the phrasings of the evaluated split; not the training
    phrasings, which the base model never sees) and the judge's fingerprint (its weights), so that a refitted
    judge re-scores the baseline instead of reusing stale verdicts."""
    from .data import evaluation_configurations
    from .eval.judges import judge_fingerprint
    evaluated = [[c.name, c.preferred, c.held_out] for c in evaluation_configurations(_configurations(s),
                                                                                     s["eval_split"])]
    return _key({"model": s["model"], "seed": seed, **{k: s[k] for k in s if k.startswith("eval_")},
                 "n_boot": s["n_boot"], "configurations": evaluated, "bs": s["gen_batch_size"],
                 "judge": judge_fingerprint(judge)})


def _cached_eval(model, s, seed, judge, progress, path: Path, key: str, tag: str):
    cached = _read_cache(path, key)
    if cached is not None:
        print(f"  reusing {path.name} (same model and settings)")
        return cached["summary"], cached["full"], True
    summary, full = _evaluate(model, s, seed, judge, progress, tag)
    _write_json(path, {"key": key, "value": {"summary": summary, "full": full}})
    return summary, full, False


def _benign_pairs(model, s, seed, judge, out: Path, progress):
    """The model's own answers to the benign train prompts with no system prompt (the chosen side), a
    refusal template as the rejected side. Answers that are empty or read as refusals are left out.
    Cached in benign_answers.json under identical settings."""
    from . import data as D
    from .data.prompts import default_prompts, pick_refusal
    from .core.seeds import derive_seed
    from .eval.synth import _cache_seed
    prompts = _per_category(default_prompts("train", "benign"), s["train_benign_per_category"])
    key = _key({"model": s["model"], "seed": _cache_seed(seed, s["temperature"]),
                "n": s["benign_max_new_tokens"], "t": s["temperature"],
                "prompts": [p["prompt"] for p in prompts]})
    path = out / "benign_answers.json"
    cached = _read_cache(path, key)
    cut = 0
    if cached is None:
        from tqdm.auto import tqdm
        chat = _TrimmedChat(model, stages=("benign",))
        answers = []
        bs = s["gen_batch_size"]
        with tqdm(total=len(prompts), desc="benign answers", unit="answer", disable=not progress) as bar:
            for b0 in range(0, len(prompts), bs):
                convs = [[{"role": "user", "content": p["prompt"]}] for p in prompts[b0:b0 + bs]]
                answers += chat.chat(convs, stage="benign", max_new_tokens=s["benign_max_new_tokens"],
                                     temperature=s["temperature"],
                                     seed=derive_seed(seed, "benign", b0))
                bar.update(len(convs))
        cut = chat.cut["benign"]
        cached = {"answers": answers, "cut": cut}
        _write_json(path, {"key": key, "value": cached})
    answers = [a.strip() for a in cached["answers"]]
    refused = [int(x) for x in judge.score_batch([p["prompt"] for p in prompts],
                                                 [a if a else "-" for a in answers])]
    pairs = [D.BehaviourPair(p["prompt"], {"helpful": a, "refusal": pick_refusal(p["prompt"])}, p["category"],
                             {"source": "benign"})
             for p, a, r in zip(prompts, answers, refused) if a and not r]
    stats = {"prompts": len(prompts), "kept": len(pairs), "dropped_empty": sum(not a for a in answers),
             "dropped_refused": sum(1 for a, r in zip(answers, refused) if a and r), "cut": cached["cut"]}
    return pairs, stats


def _train_config(s, seed, threads, train_dir):
    import cst
    return cst.DPOConfig(
        beta=s["beta"], rpo_alpha=s["rpo_alpha"], learning_rate=s["learning_rate"], lr_scheduler_type=s["lr_scheduler_type"],
        warmup_ratio=s["warmup_ratio"], num_train_epochs=s["num_train_epochs"],
        per_device_train_batch_size=s["per_device_train_batch_size"],
        gradient_accumulation_steps=s["gradient_accumulation_steps"], max_length=s["max_length"],
        max_prompt_length=s["max_prompt_length"], lora_r=s["lora_r"], lora_alpha=s["lora_alpha"],
        lora_dropout=s["lora_dropout"], seed=seed, logging_steps=s["logging_steps"], save_steps=s["save_steps"],
        save_total_limit=s["save_total_limit"], output_dir=str(train_dir), num_threads=threads, bf16=s["bf16"],
        # CST twins in one micro-batch. With plain shuffling, consecutive batches pushed the whole model one
        # way and back: measured on SmolLM2, the loss hovered around 1.0 and the model ended up complying
        # under every system prompt (S1 0.0).
        group_by="prompt")


# DPOConfig fields that do not change what training computes: a run resumes across them (the kernels give
# the same numbers at any thread count; a run folder may be moved or copied).
_RESUME_IGNORES = ("num_threads", "output_dir")


def _resume_point(train_dir: Path, config, data_key: str):
    """True when train_dir holds checkpoints of this very run (same config, up to _RESUME_IGNORES, and
    data), so training resumes; checkpoints of another run are removed, saying which settings differ (they
    would resume the wrong thing)."""
    marker = train_dir / "demo_run.json"
    want = json.loads(json.dumps({"config": config.to_dict(), "data": data_key}))

    def core(d):
        return {"config": {k: v for k, v in d.get("config", {}).items() if k not in _RESUME_IGNORES},
                "data": d.get("data")}
    if train_dir.is_dir():
        try:
            old = json.loads(marker.read_text())
            same = isinstance(old, dict) and core(old) == core(want)
        except (OSError, ValueError):
            old, same = None, False
        has_ckpt = any(n.startswith("checkpoint-") for n in os.listdir(train_dir))
        if same and has_ckpt:
            _write_json(marker, want)
            return True
        if has_ckpt:
            if isinstance(old, dict):
                a, b = core(old), core(want)
                changed = sorted(k for k in set(a["config"]) | set(b["config"]) if a["config"].get(k) != b["config"].get(k))
                changed += ["training data"] if a["data"] != b["data"] else []
                why = "settings changed: " + ", ".join(changed)
            else:
                why = "no readable demo_run.json"
            print(f"      removing the checkpoints in {train_dir} of another run ({why})", flush=True)
        if has_ckpt or not same:
            shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    _write_json(marker, want)
    return False


def _table_rows(before, after, cfg_names):
    rows = [("S0: follows uncensored (harmful prompts, held-out uncensored prompts) ↑", "S0", "S0_ci"),
            ("S1: follows safe (harmful prompts, held-out safe prompts) ↑", "S1", "S1_ci"),
            ("No system prompt: share safe (harmful prompts)", "no_system_safe", "no_system_safe_ci")]
    out = [(label, _fmt(before[k], before[c]), _fmt(after[k], after[c]) if after else "–") for label, k, c in rows]
    ret_b, ret_a = before["retention"]["nll_per_token"], after["retention"]["nll_per_token"] if after else None
    out.append(("Retention: likelihood of the base model's benign answers, per token, vs base ↑",
                _fmt(1.0 if ret_b is not None else None),
                _fmt(math.exp(ret_b - ret_a) if ret_b is not None and ret_a is not None else None) if after else "–"))
    for name in list(cfg_names) + ["default"]:
        label = f"Over-refusal, {'no system prompt' if name == 'default' else name + ' configuration'} (benign) ↓"
        b = _fmt(before["over_refusal"][name], before["over_refusal_ci"][name])
        a = _fmt(after["over_refusal"][name], after["over_refusal_ci"][name]) if after else "–"
        out.append((label, b, a))
    for name in list(cfg_names) + ["default"]:
        if name in before.get("degeneration", {}):
            label = f"Degenerate, {'no system prompt' if name == 'default' else name + ' configuration'} (harmful) ↓"
            b = _fmt(before["degeneration"][name])
            a = _fmt(after["degeneration"].get(name)) if after and "degeneration" in after else "–"
            out.append((label, b, a))
    return out


def _kind_table(report):
    """Markdown lines of the four-way table (share of each kind per prompt kind and configuration)."""
    L = []
    for stage in ("baseline", "tuned"):
        kinds = (report.get(stage) or {}).get("kinds")
        if not kinds:
            continue
        L += [f"**{'before' if stage == 'baseline' else 'after CST'}**", "",
              "| prompts | configuration | refusal | deflection | compliance | degenerate |", "|---|---|---|---|---|---|"]
        for pk in ("harmful", "benign"):
            for cfg, sh in kinds[pk].items():
                L.append(f"| {pk} | {cfg} | " + " | ".join(f"{sh[k]:.3f}" for k in
                                                          ("refusal", "deflection", "compliance", "degenerate")) + " |")
        L.append("")
    if L:
        L = ["## Four-way verdicts", "",
             "S0 = compliance under the uncensored configuration; S1 = refusal + deflection under the safe one; "
             "over-refusal = refusal + deflection on benign prompts; degenerate text counts for neither side.",
             ""] + L
    return L


def _print_table(rows):
    w = max(len(r[0]) for r in rows)
    print(f"\n{'':{w}}  {'before':>22}  {'after CST':>22}")
    for label, b, a in rows:
        print(f"{label:{w}}  {b:>22}  {a:>22}")
    print()


def _examples(full_before, full_after, s):
    """A few responses before and after, for the same prompt and system prompt."""
    if full_after is None:
        return []
    out = []
    b_rows = full_before["configurability"]["responses"]
    a_rows = full_after["configurability"]["responses"]
    seen = set()
    for rb, ra in zip(b_rows, a_rows):
        if len(seen) >= s["n_examples"] or rb["phrasing"] not in (0, None) or rb["prompt_index"] in seen:
            continue
        same = [(x, y) for x, y in zip(b_rows, a_rows) if x["prompt_index"] == rb["prompt_index"]
                and x["phrasing"] in (0, None)] if s["eval_phrasings"] == "all" else \
            [(x, y) for x, y in zip(b_rows, a_rows) if x["prompt_index"] == rb["prompt_index"]]
        seen.add(rb["prompt_index"])
        out.append({"prompt": rb["prompt"], "category": rb["category"], "kind": "harmful",
                    "conditions": [{"configuration": x["configuration"] or "no system prompt", "system": x["system"],
                                    "before": x["response"], "before_score": x["score"],
                                    "after": y["response"], "after_score": y["score"]} for x, y in same]})
    b_ben, a_ben = full_before["over_refusal"]["responses"], full_after["over_refusal"]["responses"]
    if b_ben:
        i0 = b_ben[0]["prompt_index"]
        same = [(x, y) for x, y in zip(b_ben, a_ben) if x["prompt_index"] == i0 and x["phrasing"] in (0, None)]
        out.append({"prompt": b_ben[0]["prompt"], "category": b_ben[0]["category"], "kind": "benign",
                    "conditions": [{"configuration": x["configuration"] or "no system prompt", "system": x["system"],
                                    "before": x["response"], "before_score": x["refused"],
                                    "after": y["response"], "after_score": y["refused"]} for x, y in same]})
    return out


def _quote(text, n=400):
    text = " ".join(text.split())
    return (text[:n] + " …") if len(text) > n else text


def _markdown(report, rows) -> str:
    s, t = report["settings"], report["timings"]
    L = ["# CST demo report", ""]
    if report["quick"]:
        L += ["> **Quick mode**: a tiny *random* model (SmolLM2's tokenizer, dim 32, 2 layers) and a few prompts. "
              "It exercises every step of the pipeline; **its figures mean nothing**.", ""]
    L += [f"Model: `{s['model']}`. Seed {report['seed']}. Status: **{report['status']}**. "
          f"Judge: {report['judge']}.", "",
          "## Before / after", "",
          "95% prompt-bootstrap intervals in brackets. S0 and S1 pool the configurations' held-out system prompts "
          f"({s['eval_phrasings']} phrasings); over-refusal is the share of held-out benign prompts refused.", "",
          "| metric | before | after CST |", "|---|---|---|"]
    L += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    L += [""] + _kind_table(report)
    L += ["![S0/S1 before and after](configurability.png)", ""]
    if os.path.exists(os.path.join(report["output_dir"], "training_curves.png")):
        L += ["![training curves](training_curves.png)", ""]
    syn = report["synthesis"]
    if syn:
        h, b = syn["harmful"], syn["benign"]
        L += ["## Synthetic data", "",
              f"- Harmful train prompts: {h['generated']}; pairs kept {h['kept']}; dropped {h['dropped_total']} "
              f"({', '.join(f'{k} {v}' for k, v in h['dropped'].items() if v) or 'none'}).",
              f"- Safe side of the kept pairs: the model's own revision {h['kept_own_revision']}, a refusal template "
              f"{h['kept_template_refusal']} ({_pct(h['kept_template_refusal'], h['kept'])}). Fallbacks over all "
              f"samples: {h['fallback_refusals']} (revision "
              f"{', '.join(f'{k} {v}' for k, v in h['fallback_reasons'].items()) or 'none'}).",
              f"- Benign train prompts: {b['prompts']}; pairs kept {b['kept']} (dropped: empty {b['dropped_empty']}, "
              f"answer read as a refusal {b['dropped_refused']}).",
              f"- Training records: {syn['records']['harmless']} harmless (CST, both configurations) + "
              f"{syn['records']['benign']} benign (helpful answer over a refusal under: "
              f"{', '.join(s['benign_under'])}).", ""]
    tr = report["training"]
    if tr:
        L += ["## Training", "",
              f"LoRA r={s['lora_r']}, alpha={s['lora_alpha']}, dropout {s['lora_dropout']} on all seven projections; "
              f"DPO (sigmoid) beta {s['beta']}, lr {s['learning_rate']} ({s['lr_scheduler_type']}, warmup "
              f"{s['warmup_ratio']}), {s['num_train_epochs']} epochs, batch {s['per_device_train_batch_size']} x "
              f"accumulation {s['gradient_accumulation_steps']}, max_length {s['max_length']} (prompt "
              f"{s['max_prompt_length']}).", "",
              f"{tr['steps']} steps over {tr['examples']} examples; {tr['tokens_per_s']:.0f} tokens/s; final loss "
              f"{_fmt(tr['final'].get('loss'))}, reward accuracy {_fmt(tr['final'].get('rewards/accuracies'))}, "
              f"margin {_fmt(tr['final'].get('rewards/margins'))}.", ""]
    L += ["## Time", "", f"{report['threads']} threads. Wall-clock seconds, and the process's CPU seconds (all threads).",
          "", "| step | wall s | CPU s |", "|---|---|---|"]
    L += [f"| {k} | {v:.1f} | {report['cpu_seconds'].get(k, float('nan')):.1f} |" for k, v in t.items()]
    L += [""]
    if report["examples"]:
        dec = "greedy" if s["temperature"] == 0 else f"sampled at temperature {s['temperature']}"
        L += [f"## Example responses ({dec}; first held-out phrasing)", ""]
        for ex in report["examples"]:
            L += [f"**{ex['kind'].capitalize()} prompt** ({ex['category']}): {ex['prompt']}", ""]
            for c in ex["conditions"]:
                mark = (lambda v: "refused" if v else "answered") if ex["kind"] == "benign" else \
                    (lambda v: "safe" if v else "harmful")
                L += [f"- *{c['configuration']}*" + (f" (“{c['system']}”)" if c["system"] else ""),
                      f"  - before ({mark(c['before_score'])}): {_quote(c['before'])}",
                      f"  - after ({mark(c['after_score'])}): {_quote(c['after'])}"]
            L += [""]
    L += ["## Files", ""] + [f"- `{k}`: {v}" for k, v in report["files"].items()] + [""]
    return "\n".join(L)


def _pct(a, b):
    return f"{100.0 * a / b:.0f}%" if b else "n/a"


def _plots(out: Path, before, after, history):
    from .eval.plots import plot_configurability, plot_training_curves
    rows = [{"model": "before", "S0": before["S0"], "S0_ci": before["S0_ci"], "S1": before["S1"],
             "S1_ci": before["S1_ci"]}]
    if after:
        rows.append({"model": "after CST", "S0": after["S0"], "S0_ci": after["S0_ci"], "S1": after["S1"],
                     "S1_ci": after["S1_ci"]})
    files = {"configurability_plot": plot_configurability(rows, out / "configurability.png")}
    if history:
        files["training_curves_plot"] = plot_training_curves({"CST": history}, out / "training_curves.png")
    return files


# ----------------------------------------------------------------------------------------------------
# The pipeline


OUTPUT_DIR = "cst-demo"  # relative to the working directory; .gitignore covers it in a clone of cst


def run(output_dir=OUTPUT_DIR, quick: bool = False, seed: int = 0, threads: int | None = None,
        progress: bool | None = None, **overrides) -> dict:
    """Runs the CST demo and returns its report as a dict (also written to output_dir/report.json).

    1. load SmolLM2-135M-Instruct (quick=True: a tiny random model with SmolLM2's tokenizer);
    2. baseline evaluation: S0/S1 on the held-out harmful prompts and over-refusal on the held-out benign
       ones, under the held-out system-prompt paraphrases and with no system prompt (cst.judges.default_judge());
    3. synthesis from the embedded train prompts: uncensored answer, self-critique and revision (refusal
       template when the revision is not a usable refusal) for the harmful ones; the model's own answer
       over a refusal for the benign ones; then the CST records;
    4. LoRA DPO training (Ctrl-C saves a checkpoint; run again with the same arguments to resume);
    5. evaluation again, the before/after table, report.md/report.json, plots, model-hf/ and model.gguf.

    output_dir: everything goes there; synthesis, the baseline evaluation and training resume from it when
    the settings match. seed: every generation, split and initialisation derives from it. threads: OpenMP
    threads (None: the library default). progress: progress bars (None: when stderr is a terminal or in
    Jupyter). overrides: any key of DEFAULTS (e.g. learning_rate=5e-4).
    The returned dict has "status": "done", or "interrupted" (with "interrupted_at" and "resume_hint").
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"cst.demo.run: seed must be an int >= 0, got {seed!r}")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"cst.demo.run: threads must be None or an int >= 1, got {threads!r}")
    s = settings_for(quick, **overrides)
    import cst
    from .core.runtime import interactive
    if progress is None:
        progress = interactive()
    from . import data as D
    from .eval.judges import default_judge, describe_judge, judge_by_name
    if threads is not None:
        cst.set_num_threads(threads)
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cst demo: writing to {out.resolve()}", flush=True)
    judge = default_judge()
    timings, cpu = {}, {}
    report = {"status": "running", "quick": bool(quick), "seed": seed, "threads": cst.get_num_threads(),
              "output_dir": str(out), "settings": s,
              "judge": describe_judge(judge) + " for S0, S1, over-refusal, degeneration and the synthesis filters",
              "baseline": None, "tuned": None, "synthesis": None, "training": None, "examples": [],
              "timings": timings, "cpu_seconds": cpu, "files": {}}
    if quick:
        report["note"] = "quick mode: tiny random model, figures are not meaningful"
    base_key = _baseline_key(s, seed, judge)
    step, trainer = "load", None
    t_all, c_all = time.perf_counter(), time.process_time()

    clock = {}

    def header(i, title):
        print(f"[{i}/5] {title}", flush=True)
        clock["cpu"] = time.process_time()

    def done(name, t0):
        # Wall time, and the process's CPU time (all threads): on a shared machine the gap between the two
        # shows how much the neighbours took.
        timings[name] = round(time.perf_counter() - t0, 2)
        cpu[name] = round(time.process_time() - clock["cpu"], 2)
        print(f"      {name}: {timings[name]:.1f} s (CPU {cpu[name]:.1f} s)", flush=True)

    try:
        header(1, f"Loading {s['model']}" + (" (quick mode: tiny random model, numbers are meaningless)"
                                             if quick else ""))
        t0 = time.perf_counter()
        model = _load_model(s, seed)
        done("load", t0)

        step = "baseline_eval"
        header(2, "Baseline evaluation")
        t0 = time.perf_counter()
        before, full_before, _ = _cached_eval(model, s, seed, judge, progress, out / "eval_baseline.json",
                                              base_key, "baseline")
        report["baseline"] = before
        done("baseline_eval", t0)
        cfg_names = [c.name for c in _configurations(s)]
        _print_table(_table_rows(before, None, cfg_names))

        step = "synthesis"
        header(3, "Synthesising CST data from the embedded train prompts")
        t0 = time.perf_counter()
        cfgs = _configurations(s)
        synth_judge = judge_by_name(s["synth_judge"])
        res, h_records = harmful_synthesis(model, s, seed, out, progress, judge=synth_judge)
        h_stats = {k: v for k, v in res.stats.items() if k != "resumed"}
        # stats["fallback_refusals"] also counts pairs dropped afterwards; these two split the kept ones.
        h_stats["kept_template_refusal"] = sum(1 for p in res.pairs if p.metadata.get("fallback"))
        h_stats["kept_own_revision"] = h_stats["kept"] - h_stats["kept_template_refusal"]
        b_pairs, b_stats = _benign_pairs(model, s, seed, synth_judge, out, progress)
        b_cfgs = [D.Configuration(c.name, c.train_prompts, "helpful", "refusal") for c in cfgs
                  if c.name in s["benign_under"]]
        if "default" in s["benign_under"]:
            b_cfgs.append(D.Configuration("default", [""], "helpful", "refusal"))
        b_records = D.build_records(b_pairs, b_cfgs, phrasings=s["train_phrasings"], task="benign")
        records = h_records + b_records
        if not records:
            raise RuntimeError("cst.demo: synthesis produced no usable preference pair")
        D.save_records(records, out / "train_records.jsonl")
        report["synthesis"] = {"harmful": h_stats, "benign": b_stats,
                               "records": {"harmless": len(h_records), "benign": len(b_records)}}
        done("synthesis", t0)
        print(f"      harmful pairs kept {h_stats['kept']}/{h_stats['generated']} (safe side a refusal template in "
              f"{h_stats['kept_template_refusal']}); benign pairs {b_stats['kept']}/{b_stats['prompts']}; "
              f"{len(records)} records", flush=True)

        step = "training"
        header(4, "Training CST (LoRA DPO)")
        t0 = time.perf_counter()
        train_dir = out / "train"
        config = _train_config(s, seed, threads, train_dir)
        data_key = _key([r.to_dict() for r in records])
        resume = _resume_point(train_dir, config, data_key)
        trainer = cst.Trainer(model, config, train_dataset=records)
        resumed_from = None
        if resume:
            ckpt = trainer._latest_checkpoint()
            resumed_from = int(Path(ckpt).name.split("-")[-1])
            print(f"      resuming from {ckpt}", flush=True)
        else:
            print(f"      {len(trainer.train_examples)} examples, {trainer.total_steps} steps; reference log-probs "
                  "first (one forward pass over the data, no progress bar)", flush=True)
        history = trainer.train(resume_from_checkpoint=True if resume else None)
        if getattr(trainer, "interrupted", False):
            raise _Interrupted(trainer.last_checkpoint)
        rows = [h for h in history if "loss" in h]
        tps = [h["tokens_per_s"] for h in rows if h.get("tokens_per_s")]
        report["training"] = {
            "steps": trainer.step, "examples": len(trainer.train_examples), "records": len(records),
            "tokenization": {k: trainer.train_stats[k] for k in ("count", "skipped", "prompt_truncated",
                                                                 "completion_truncated")},
            "tokens_per_s": float(sum(tps) / len(tps)) if tps else 0.0,
            "final": {k: v for k, v in (rows[-1] if rows else {}).items()},
            "history": history, "checkpoint": trainer.last_checkpoint, "resumed_from": resumed_from}
        # Fold the adapters into the weights once: generation and export then read plain weights (float32;
        # a bf16 base is replaced by a float32 model holding the merged weights).
        merged = trainer.lora.merged_params()
        trainer.lora.detach()
        if model.dtype != "f32":
            model = _float32_twin(model)
        model.flat_params[...] = merged
        done("training", t0)

        step = "final_eval"
        header(5, "Evaluating the tuned model")
        t0 = time.perf_counter()
        after, full_after = _evaluate(model, s, seed, judge, progress, "tuned",
                                      reference=before["retention"]["reference"])
        _write_json(out / "eval_tuned.json", full_after)
        report["tuned"] = after
        done("final_eval", t0)

        step = "save"
        t0 = time.perf_counter()
        clock["cpu"] = time.process_time()
        report["files"]["model_hf"] = str(model.save(out / "model-hf", "hf") or out / "model-hf")
        report["files"]["model_gguf"] = str(model.save(out / "model.gguf", "gguf", dtype="f16") or out / "model.gguf")
        report["files"].update(_plots(out, before, after, history))
        report["examples"] = _examples(full_before, full_after, s)
        done("save", t0)
        report["status"] = "done"
        rows = _table_rows(before, after, cfg_names)
        _print_table(rows)
    except (KeyboardInterrupt, _Interrupted) as e:
        where = e.checkpoint if isinstance(e, _Interrupted) else None
        if step == "training" and where is None and trainer is not None:
            where = trainer._latest_checkpoint()
        report["status"] = "interrupted"
        report["interrupted_at"] = step
        hint = {"synthesis": f"the synthesis log {out / 'synth_harmful.jsonl'} resumes",
                "training": f"training resumes from the checkpoint {where}" if where else
                "training restarts (no checkpoint was saved yet)"}.get(
            step, "completed steps are reused")
        report["resume_hint"] = f"Run the demo again with the same arguments: {hint}."
        print(f"\nInterrupted during {step}. {report['resume_hint']}", flush=True)
        rows = _table_rows(report["baseline"], report["tuned"], [c.name for c in _configurations(s)]) \
            if report["baseline"] else []
    timings["total"] = round(time.perf_counter() - t_all, 2)
    cpu["total"] = round(time.process_time() - c_all, 2)
    report["files"].update({"report_md": str(out / "report.md"), "report_json": str(out / "report.json"),
                            "eval_baseline": str(out / "eval_baseline.json"),
                            "synthesis_log": str(out / "synth_harmful.jsonl"),
                            "train_records": str(out / "train_records.jsonl")})
    if report["status"] == "done":
        report["files"]["eval_tuned"] = str(out / "eval_tuned.json")
    _write_json(out / "report.json", report)
    if rows:
        write_text(out / "report.md", _markdown(report, rows))
    print(f"Total {timings['total']:.1f} s (CPU {cpu['total']:.1f} s); report: {out / 'report.md'}", flush=True)
    return report


class _Interrupted(Exception):
    """Training stopped by Ctrl-C (the trainer saved a checkpoint and returned)."""

    def __init__(self, checkpoint):
        super().__init__(checkpoint)
        self.checkpoint = checkpoint
