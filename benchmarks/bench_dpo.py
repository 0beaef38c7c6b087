"""One CST/DPO optimizer step with LoRA (r=16 on all seven projections) on a SmolLM2-135M-shaped model
with random weights: cst (what Trainer does per step: forward_logprobs on the packed chosen+rejected
sequences, sigmoid DPO loss, backward_logprobs, clip_grad_norm, AdamW) against PyTorch eager fp32 with
transformers' LlamaForCausalLM + PEFT and the same loss written in torch (TRL's selective log-softmax
form). Reference log-probs are precomputed on both sides and not timed. Each side runs in its own
spawned process: peak RSS is its own (whole process, and during the timed steps only). Not a
convergence benchmark; TRL's DPOTrainer is not used (not installed).

    python3 benchmarks/bench_dpo.py [--threads 2] [--pairs 4] [--seq 256] [--prompt 64] [--layers 30]
                                    [--steps 3] [--dropout 0.0] [--skip-torch] [--profile]
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


def _hwm_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


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


def run_ours(cfg, P, T, prompt, r, dropout, steps, threads, profile, q):
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
    m = Model(cst.ModelConfig(**cfg), seed=0)
    lora = LoRA(m, r=r, alpha=2.0 * r, dropout=dropout, target_modules=TARGETS, seed=0).attach()
    tokens, targets, mask = _data(cfg, P, T, prompt)
    lengths = np.full(2 * P, T, np.int32)
    lora.enabled = False
    ref = losses.sequence_logps(m.forward_logprobs(tokens, targets, lengths), mask)
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
        lora.new_step()
        tlp = m.forward_logprobs(tokens, targets, lengths)
        t1 = time.perf_counter()
        lp = losses.sequence_logps(tlp, mask)
        out = losses.dpo_loss(lp[:P], lp[P:], ref[:P], ref[P:], beta=0.1)
        dtlp = losses.sequence_logps_backward(np.concatenate([out.grad_chosen, out.grad_rejected]), mask)
        t2 = time.perf_counter()
        m.backward_logprobs(dtlp)
        t3 = time.perf_counter()
        norm, scale = clip_grad_norm(lora.flat_grads, 1.0)
        opt.step(lora.flat_params, lora.flat_grads, grad_scale=scale)
        t4 = time.perf_counter()
        if i:
            times.append(t4 - t0)
            if profile:
                for k, v in zip(("forward", "loss", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                    phases[k] += v
        loss = out.loss
    if profile:
        phases = {k: v / steps for k, v in phases.items()}
        phases["lora hook (in fwd+bwd)"] = hook_t["lora"] / steps
    q.put({"times": times, "loss": loss, "peak_rss_mb": _peak_rss_mb(), "step_rss_mb": _hwm_mb(),
           "phases": phases, "trainable": lora.num_parameters})


def run_torch(cfg, P, T, prompt, r, dropout, steps, threads, profile, q):
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
    tokens, targets, mask = _data(cfg, P, T, prompt)
    ids = torch.tensor(tokens, dtype=torch.long)
    tg = torch.tensor(np.maximum(targets, 0), dtype=torch.long)
    mk = torch.tensor(mask)

    def seq_logps(logits):
        # TRL's selective_log_softmax for float32: gather minus logsumexp, no (B, T, V) log-softmax copy.
        picked = torch.gather(logits, -1, tg.unsqueeze(-1)).squeeze(-1)
        return ((picked - torch.logsumexp(logits, -1)) * mk).sum(-1)

    with torch.no_grad(), model.disable_adapter():
        ref = seq_logps(model(input_ids=ids).logits)
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
        logits = model(input_ids=ids).logits
        t1 = time.perf_counter()
        lp = seq_logps(logits)
        margin = (lp[:P] - lp[P:]) - (ref[:P] - ref[P:])
        out = -torch.nn.functional.logsigmoid(0.1 * margin).mean()
        t2 = time.perf_counter()
        out.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        t4 = time.perf_counter()
        del logits, lp, margin
        if i:
            times.append(t4 - t0)
            for k, v in zip(("forward", "loss", "backward", "optimizer"), (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                phases[k] += v
        loss = float(out.detach())
    phases = {k: v / steps for k, v in phases.items()} if profile else {}
    q.put({"times": times, "loss": loss, "peak_rss_mb": _peak_rss_mb(), "step_rss_mb": _hwm_mb(),
           "phases": phases, "trainable": sum(p.numel() for p in params)})


def _spawn(fn, *args):
    ctx = mp.get_context("spawn")  # never fork after OpenMP started
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=args + (q,))
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
    ap.add_argument("--skip-torch", action="store_true")
    ap.add_argument("--profile", action="store_true", help="time per phase (adds a little overhead)")
    a = ap.parse_args()
    cfg = dict(SMOLLM2, n_layers=a.layers)
    P, T = a.pairs, a.seq
    tokens = 2 * P * T
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    print(f"DPO step, LoRA r={a.rank} on {len(TARGETS)} projections, dropout {a.dropout}: {P} pairs x "
          f"{T} tokens = {2 * P} sequences ({tokens} tokens), {a.layers} layers, {a.threads} threads; "
          f"load average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    args = (cfg, P, T, min(a.prompt, T // 4), a.rank, a.dropout, a.steps, a.threads, a.profile)
    rows = [("cst", _spawn(run_ours, *args))]
    if not a.skip_torch:
        rows.append(("pytorch+peft", _spawn(run_torch, *args)))
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
        print(f"speed: cst is {speed:.2f}x PyTorch (target >= 1.5x); peak RSS {ours['peak_rss_mb'] / theirs['peak_rss_mb']:.2f}x "
              f"(during steps {ours['step_rss_mb'] / theirs['step_rss_mb']:.2f}x; target <= 1x)")
    try:
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass


if __name__ == "__main__":
    main()
