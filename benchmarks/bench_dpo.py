"""Two races of cst's LoRA DPO training against the PyTorch stack, each side in its own spawned process.

Step mode (default): one CST/DPO optimizer step with LoRA (r=16 on all seven projections) on a
SmolLM2-135M-shaped model with random weights: cst (what Trainer does per step: forward_logprobs on the
packed chosen+rejected sequences, sigmoid DPO loss, backward_logprobs, clip_grad_norm, AdamW) against
PyTorch eager fp32 with transformers' LlamaForCausalLM + PEFT and the same loss written in torch (TRL's
selective log-softmax form). Reference log-probs are precomputed on both sides and not timed. Peak RSS
is each process's own (whole process, and during the timed steps only). --dtype bf16 runs cst with the
frozen base in bf16 (Model(dtype="bf16"): the same random weights rounded; torch stays fp32); --micro k
splits the step into micro-batches of k pairs (gradient accumulation; both sides).

Trainer mode (--trl): the real thing on both sides. The real SmolLM2-135M-Instruct (cst.load), the
demo's training recipe (cst.demo's settings: LoRA r 16 on all seven projections, lr 1e-3 cosine, beta
0.1, rpo_alpha 1, batches of 4, max_length 160) and the first --records-n records of a demo run's
train_records.jsonl (or of demo-style records made first with --synth-records K), one epoch: cst's
Trainer in fp32 and with the bf16 base, against TRL's DPOTrainer (with PEFT, on the same weights
exported by cst.save_hf) in fp32, in its fastest CPU configuration (bf16 autocast, no gradient
checkpointing), the same with the reference log-probs computed once before training
(precompute_ref_log_probs, as cst does; TRL's default recomputes them every step with the adapters off),
and with TRL's defaults (bf16 autocast and gradient checkpointing). Each timed figure is the whole
trainer construction (tokenisation) and train() call, reference log-probs included, model load excluded.

    python3 benchmarks/bench_dpo.py [--threads 2] [--pairs 4] [--seq 256] [--prompt 64] [--layers 30]
                                    [--steps 3] [--dropout 0.0] [--dtype f32|bf16] [--micro K]
                                    [--skip-torch] [--profile]
    python3 benchmarks/bench_dpo.py --trl [--records cst-demo/train_records.jsonl | --synth-records 4] [--records-n 64]
                                    [--runs 3] [--threads 2] [--sides cst-f32,cst-bf16,trl-f32,trl-bf16,trl-bf16-pre,trl-default]
"""
import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

SMOLLM2 = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
               max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def _reset_hwm():
    """Resets the kernel's peak-RSS mark (VmHWM) so that the timed phase can be measured alone."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_mb(key):
    """A memory figure of /proc/self/status (VmRSS: now, VmHWM: peak since the last reset) in MB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rss_mb():
    return _status_mb("VmRSS")


def _hwm_mb():
    return _status_mb("VmHWM")


def _data(cfg, P, T, prompt):
    """P pairs of T-token sequences (prompt shared by chosen and rejected): (2P, T) tokens, targets
    (-1 on the prompt), mask, all full length (no padding)."""
    import numpy as np
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    prompts = rng.integers(0, V, (P, prompt))
    seqs = np.concatenate([np.concatenate([prompts, rng.integers(0, V, (P, T - prompt))], 1),
                           np.concatenate([prompts, rng.integers(0, V, (P, T - prompt))], 1)])
    tokens = seqs.astype(np.int32)
    targets = np.full_like(tokens, -1)
    targets[:, prompt - 1:T - 1] = tokens[:, prompt:]
    mask = (targets >= 0).astype(np.float32)
    return tokens, targets, mask


def _micro_batches(tokens, targets, mask, P, micro):
    """The 2P rows (chosen then rejected) as micro-batches of `micro` pairs: [(k, rows of their k chosen
    then k rejected sequences)]."""
    import numpy as np
    out = []
    for i in range(0, P, micro):
        k = min(micro, P - i)
        rows = np.r_[i:i + k, P + i:P + i + k]
        out.append((k, tokens[rows], targets[rows], mask[rows]))
    return out


def run_ours(cfg, P, T, prompt, r, dropout, steps, threads, profile, q, dtype="f32", micro=None, make=None):
    """make(ModelConfig) -> Model: how the weights are made (default: Model(cfg, seed=0, dtype=dtype))."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import numpy as np
    import cst
    from cst import losses
    from cst.lora import LoRA
    from cst.model import Model
    from cst.optim import AdamW, clip_grad_norm

    cst.set_num_threads(threads)
    t_make = time.perf_counter()
    m = make(cst.ModelConfig(**cfg)) if make else Model(cst.ModelConfig(**cfg), seed=0, dtype=dtype)
    t_make = time.perf_counter() - t_make
    model_rss_mb = _rss_mb()
    lora = LoRA(m, r=r, alpha=2.0 * r, dropout=dropout, target_modules=TARGETS, seed=0).attach()
    parts = _micro_batches(*_data(cfg, P, T, prompt), P, micro or P)
    lengths = [np.full(2 * k, T, np.int32) for k, *_ in parts]
    lora.enabled = False
    refs = [losses.sequence_logps(m.forward_logprobs(t, tg, ln), mk) for (k, t, tg, mk), ln in zip(parts, lengths)]
    lora.enabled = True
    opt = AdamW(lr=5e-5, weight_decay=0.0)
    phases = {}
    if profile:  # time per phase: the adapter hook separately from the base projections
        hook_t = {"lora": 0.0}
        f0, b0 = lora.forward, lora.backward

        def tf(*a):
            t = time.perf_counter()
            f0(*a)
            hook_t["lora"] += time.perf_counter() - t

        def tb(*a):
            t = time.perf_counter()
            b0(*a)
            hook_t["lora"] += time.perf_counter() - t

        lora.forward, lora.backward = tf, tb
    times, loss = [], None
    for i in range(steps + 1):  # the first step allocates the arena and the optimizer state
        if i == 1:
            _reset_hwm()
            if profile:
                phases = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
                hook_t["lora"] = 0.0
        t0 = time.perf_counter()
        lora.zero_grad()
        spent, loss = [0.0, 0.0, 0.0], 0.0
        for (k, tokens, targets, mask), ln, ref in zip(parts, lengths, refs):  # the step's mean over pairs
            ta = time.perf_counter()
            lora.new_step()
            tlp = m.forward_logprobs(tokens, targets, ln)
            tb = time.perf_counter()
            lp = losses.sequence_logps(tlp, mask)
            out = losses.dpo_loss(lp[:k], lp[k:], ref[:k], ref[k:], beta=0.1)
            dseq = np.concatenate([out.grad_chosen, out.grad_rejected]) * np.float32(k / P)
            dtlp = losses.sequence_logps_backward(dseq, mask)
            tc = time.perf_counter()
            m.backward_logprobs(dtlp)
            td = time.perf_counter()
            spent = [spent[0] + tb - ta, spent[1] + tc - tb, spent[2] + td - tc]
            loss += out.loss * k / P
        t3 = time.perf_counter()
        norm, scale = clip_grad_norm(lora.flat_grads, 1.0)
        opt.step(lora.flat_params, lora.flat_grads, grad_scale=scale)
        t4 = time.perf_counter()
        if i:
            times.append(t4 - t0)
            if profile:
                for key, v in zip(("forward", "loss", "backward", "optimizer"), spent + [t4 - t3]):
                    phases[key] += v
    if profile:
        phases = {k: v / steps for k, v in phases.items()}
        phases["lora hook (in fwd+bwd)"] = hook_t["lora"] / steps
    q.put({"times": times, "loss": loss, "peak_rss_mb": _peak_rss_mb(), "step_rss_mb": _hwm_mb(),
           "phases": phases, "trainable": lora.num_parameters, "model_rss_mb": model_rss_mb,
           "param_mb": m.nbytes / 2 ** 20, "make_s": t_make})


def run_torch(cfg, P, T, prompt, r, dropout, steps, threads, profile, q, micro=None):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import numpy as np
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    hc = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn_dim"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=cfg["max_seq_len"],
        rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=True,
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    model = transformers.LlamaForCausalLM(hc).float()
    model = get_peft_model(model, LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(TARGETS),
                                             lora_dropout=dropout))
    model.train()
    parts = [(k, torch.tensor(t, dtype=torch.long), torch.tensor(np.maximum(tg, 0), dtype=torch.long),
              torch.tensor(mk)) for k, t, tg, mk in _micro_batches(*_data(cfg, P, T, prompt), P, micro or P)]

    def seq_logps(logits, tg, mk):
        # TRL's selective_log_softmax for float32: gather minus logsumexp, no (B, T, V) log-softmax copy.
        picked = torch.gather(logits, -1, tg.unsqueeze(-1)).squeeze(-1)
        return ((picked - torch.logsumexp(logits, -1)) * mk).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        refs = [seq_logps(model(input_ids=ids).logits, tg, mk) for _, ids, tg, mk in parts]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-5, weight_decay=0.0)
    times, loss = [], None
    phases = {}
    for i in range(steps + 1):
        if i == 1:
            _reset_hwm()
            phases = {"forward": 0.0, "loss": 0.0, "backward": 0.0, "optimizer": 0.0}
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        spent, loss = [0.0, 0.0, 0.0], 0.0
        for (k, ids, tg, mk), ref in zip(parts, refs):  # the step's mean over pairs
            ta = time.perf_counter()
            logits = model(input_ids=ids).logits
            tb = time.perf_counter()
            lp = seq_logps(logits, tg, mk)
            margin = (lp[:k] - lp[k:]) - (ref[:k] - ref[k:])
            out = -torch.nn.functional.logsigmoid(0.1 * margin).mean() * (k / P)
            tc = time.perf_counter()
            out.backward()
            td = time.perf_counter()
            spent = [spent[0] + tb - ta, spent[1] + tc - tb, spent[2] + td - tc]
            loss += float(out.detach())
            del logits, lp, margin
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t4 = time.perf_counter()
        if i:
            times.append(t4 - t0)
            for key, v in zip(("forward", "loss", "backward", "optimizer"), spent + [t4 - t3]):
                phases[key] += v
    phases = {k: v / steps for k, v in phases.items()} if profile else {}
    q.put({"times": times, "loss": loss, "peak_rss_mb": _peak_rss_mb(), "step_rss_mb": _hwm_mb(),
           "phases": phases, "trainable": sum(p.numel() for p in params)})


def _spawn(fn, *args, **kwargs):
    ctx = mp.get_context("spawn")  # never fork after OpenMP started
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=args + (q,), kwargs=kwargs)
    p.start()
    import queue
    while True:  # a child that dies (killed for memory, a crash) must not leave us waiting forever
        try:
            res = q.get(timeout=5)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{fn.__name__} died with exit code {p.exitcode} before reporting")
    p.join()
    return res


# ---- trainer mode: cst's Trainer against TRL's DPOTrainer on the demo's recipe and data ----

TRL_SIDES = {  # name: (bf16, gradient checkpointing, precompute_ref_log_probs) for TRL; bf16 for cst
    "cst-f32": False, "cst-bf16": True,
    "trl-f32": (False, False, False), "trl-bf16": (True, False, False), "trl-bf16-pre": (True, False, True),
    "trl-default": (True, True, False),
}


def _demo_config(out_dir, threads, bf16):
    """The demo's training settings (cst.demo.DEFAULTS) as a DPOConfig for one epoch over the records,
    with no checkpoints and no grouping (TRL samples batches at random; so does cst here)."""
    import cst
    from cst import demo
    s = demo.settings_for()
    cfg = demo._train_config(s, 0, threads, out_dir).to_dict()
    cfg.update(bf16=bf16, num_train_epochs=1.0, save_steps=None, logging_steps=1, group_by=None)
    return cst.DPOConfig(**cfg)


def race_prepare(model_name, hf_dir, q):
    """The model as TRL loads it: cst's Hugging Face export of the same weights, with the tokenizer."""
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import cst
    from cst.io.hf import save_hf
    m = cst.load(model_name)
    save_hf(m, m.tokenizer, hf_dir)
    q.put({"ok": True})


def race_records(model_name, per_category, threads, out_dir, q):
    """Demo-style records without a demo run: the demo's harmful synthesis (cst.demo.harmful_synthesis:
    its settings and judge, greedy) on the first `per_category` harmful train prompts of each category,
    and their records (safe default on) in out_dir/train_records.jsonl. A demo run's file starts with
    its harmful records too."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import cst
    from cst import data as D
    from cst import demo
    cst.set_num_threads(threads)
    s = demo.settings_for(train_harmful_per_category=per_category)
    res, records = demo.harmful_synthesis(cst.load(model_name), s, 0, out_dir)
    path = os.path.join(out_dir, "train_records.jsonl")
    D.save_records(records, path)
    q.put({"path": path, "n": len(records), "prompts": res.stats["generated"], "kept": res.stats["kept"]})


def race_cst(model_name, records_path, n, threads, bf16, out_dir, q):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import cst
    from cst import data as D
    from cst.train.trainer import Trainer
    cst.set_num_threads(threads)
    records = D.load_records(records_path)[:n]
    model = cst.load(model_name)
    config = _demo_config(out_dir, threads, bf16)
    t0 = time.perf_counter()
    trainer = Trainer(model, config, train_dataset=records)
    hist = trainer.train()
    dt = time.perf_counter() - t0
    losses_ = [h["loss"] for h in hist if "loss" in h]  # one row a step: their mean is TRL's training_loss
    q.put({"time": dt, "steps": trainer.step, "loss": sum(losses_) / len(losses_) if losses_ else float("nan"),
           "peak_rss_mb": _peak_rss_mb()})


def race_trl(hf_dir, records_path, n, threads, bf16, checkpointing, precompute, out_dir, q):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import datasets
    import peft
    import torch
    import transformers
    import trl
    from cst import data as D
    torch.set_num_threads(threads)
    records = D.load_records(records_path)[:n]
    t = _demo_config(out_dir, threads, bf16).to_trl()
    args = dict(t["DPOConfig"], report_to="none", use_cpu=True, dataloader_num_workers=0, bf16=bf16,
                gradient_checkpointing=checkpointing, precompute_ref_log_probs=precompute, disable_tqdm=True)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    ds = datasets.Dataset.from_list([D.to_trl(r) for r in records])
    t0 = time.perf_counter()
    trainer = trl.DPOTrainer(model=model, args=trl.DPOConfig(**args), train_dataset=ds, processing_class=tok,
                             peft_config=peft.LoraConfig(**t["LoraConfig"]))
    out = trainer.train()
    dt = time.perf_counter() - t0
    q.put({"time": dt, "steps": trainer.state.global_step, "loss": float(out.training_loss),
           "peak_rss_mb": _peak_rss_mb()})


def race_main(a):
    import statistics
    import tempfile
    records = a.records
    if a.synth_records is None and not os.path.exists(records):
        sys.exit(f"bench_dpo --trl: no records file {records!r}; run `cst demo` (it writes "
                 "train_records.jsonl in its output folder), pass --records FILE, or make demo-style "
                 "records first with --synth-records K")
    if a.synth_records is not None and a.synth_records < 1:
        sys.exit(f"bench_dpo --trl: --synth-records must be a positive number of prompts per category, "
                 f"got {a.synth_records}")
    sides = [x.strip() for x in a.sides.split(",") if x.strip()]
    bad = [x for x in sides if x not in TRL_SIDES]
    if bad:
        sys.exit(f"bench_dpo --trl: unknown side(s) {bad}; known: {sorted(TRL_SIDES)}")
    res = {k: [] for k in sides}
    with tempfile.TemporaryDirectory(prefix="bench_dpo_") as tmp:
        if a.synth_records is not None:
            t0 = time.perf_counter()
            r = _spawn(race_records, a.model, a.synth_records, a.threads, tmp)
            records = r["path"]
            print(f"records: the demo's synthesis on the first {a.synth_records} harmful train prompts of each "
                  f"category ({r['prompts']} prompts, {r['kept']} pairs kept): {r['n']} records in "
                  f"{time.perf_counter() - t0:.0f} s (not timed in the race)")
        load = os.getloadavg()
        print(f"trainer race: {a.model}, the demo's recipe, the first {a.records_n} records of {records}, one "
              f"epoch; {a.threads} threads; {a.runs} run(s), the sides one after another in their own processes; "
              f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
        from _machine import cpu_line
        print("CPU: " + cpu_line())
        hf_dir = os.path.join(tmp, "hf")
        if any(k.startswith("trl") for k in sides):
            _spawn(race_prepare, a.model, hf_dir)
        for run in range(a.runs):
            for k in sides:
                out_dir = os.path.join(tmp, f"{k}-{run}")
                if k.startswith("cst"):
                    r = _spawn(race_cst, a.model, records, a.records_n, a.threads, TRL_SIDES[k], out_dir)
                else:
                    r = _spawn(race_trl, hf_dir, records, a.records_n, a.threads, *TRL_SIDES[k], out_dir)
                res[k].append(r)
                print(f"  run {run + 1} {k:12s} {r['time']:8.2f} s, {r['steps']} steps, "
                      f"{r['time'] / max(r['steps'], 1):.3f} s/step, mean loss {r['loss']:.4f}, "
                      f"peak RSS {r['peak_rss_mb']:.0f} MB", flush=True)
    print(f"\n{'side':12s} {'train s min':>12s} {'median':>8s} {'s/step min':>11s} {'steps':>6s}")
    for k in sides:
        t = [r["time"] for r in res[k]]
        print(f"{k:12s} {min(t):12.2f} {statistics.median(t):8.2f} {min(t) / max(res[k][0]['steps'], 1):11.3f} "
              f"{res[k][0]['steps']:6d}")
    load = os.getloadavg()
    print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for ours in (k for k in sides if k.startswith("cst")):
        for theirs in (k for k in sides if k.startswith("trl")):
            mo = min(r["time"] for r in res[ours])
            mt = min(r["time"] for r in res[theirs])
            med = statistics.median(r["time"] for r in res[theirs]) / statistics.median(r["time"] for r in res[ours])
            print(f"ratio {ours} vs {theirs}: cst is {mt / mo:.2f}x faster (min over runs; median {med:.2f}x)")
    trl_sides = [k for k in sides if k.startswith("trl")]
    if "cst-bf16" in sides and trl_sides:  # the figure: against whichever TRL configuration ran fastest
        per_run = [min(res[k][i]["time"] for k in trl_sides) / res["cst-bf16"][i]["time"] for i in range(a.runs)]
        print(f"ratio cst-bf16 vs TRL's fastest side, per run: {', '.join(f'{x:.2f}x' for x in per_run)} "
              f"(min {min(per_run):.2f}x)")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64, help="prompt tokens of each sequence (not scored)")
    ap.add_argument("--layers", type=int, default=SMOLLM2["n_layers"])
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="cst's base weights")
    ap.add_argument("--micro", type=int, default=None, help="pairs per micro-batch (default: all in one)")
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time per phase (adds a little overhead)")
    ap.add_argument("--trl", action="store_true", help="trainer mode: cst's Trainer against TRL's DPOTrainer")
    ap.add_argument("--model", default="smollm2-135m-instruct", help="trainer mode: the model (cst.load)")
    ap.add_argument("--records", default=os.path.join("cst-demo", "train_records.jsonl"),
                    help="trainer mode: CST records (a demo run's train_records.jsonl)")
    ap.add_argument("--synth-records", type=int, default=None, metavar="K",
                    help="trainer mode: instead of --records, first make demo-style records with the demo's "
                         "synthesis on the first K harmful train prompts of each category (K=4: 75 records)")
    ap.add_argument("--records-n", type=int, default=64, help="trainer mode: records trained on (one epoch)")
    ap.add_argument("--runs", type=int, default=3, help="trainer mode: runs of every side")
    ap.add_argument("--sides", default=",".join(TRL_SIDES), help="trainer mode: which sides race")
    a = ap.parse_args()
    if a.trl:
        return race_main(a)
    cfg = dict(SMOLLM2, n_layers=a.layers)
    P, T = a.pairs, a.seq
    tokens = 2 * P * T
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"DPO step, LoRA r={a.rank} on {len(TARGETS)} projections, dropout {a.dropout}: {P} pairs x "
          f"{T} tokens = {2 * P} sequences ({tokens} tokens), micro-batches of {a.micro or P} pairs, "
          f"{a.layers} layers, {a.threads} threads, cst base {a.dtype}; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    args = (cfg, P, T, min(a.prompt, T // 4), a.rank, a.dropout, a.steps, a.threads, a.profile)
    rows = [(f"cst {a.dtype}", _spawn(run_ours, *args, dtype=a.dtype, micro=a.micro))]
    if not a.skip_torch:
        rows.append(("pytorch+peft", _spawn(run_torch, *args, micro=a.micro)))
    print(f"{'':14s} {'step s (min)':>13s} {'median':>8s} {'tokens/s':>9s} {'peak RSS MB':>12s} "
          f"{'in steps':>9s} {'loss':>9s} {'trainable':>10s}")
    for name, r in rows:
        t = sorted(r["times"])
        print(f"{name:14s} {t[0]:13.3f} {t[len(t) // 2]:8.3f} {tokens / t[0]:9.1f} {r['peak_rss_mb']:12.0f} "
              f"{r['step_rss_mb']:9.0f} {r['loss']:9.5f} {r['trainable']:10d}")
        if r["phases"]:
            print("    per step: " + ", ".join(f"{k} {v:.3f}s" for k, v in r["phases"].items()))
    if len(rows) == 2:
        ours, theirs = rows[0][1], rows[1][1]
        speed = min(theirs["times"]) / min(ours["times"])
        print(f"ratio cst {a.dtype} vs pytorch+peft fp32 step: {speed:.2f}x faster (min over steps)")
        print(f"speed: cst is {speed:.2f}x PyTorch (target >= 1.5x); peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x "
              f"(during steps {ours['step_rss_mb'] / theirs['step_rss_mb']:.2f}x; target <= 1x)")
    try:
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
