"""Training-step throughput of cst's decoder against Hugging Face transformers + PyTorch eager fp32 on
a SmolLM2-135M-shaped model with random weights: forward + backward of the token cross-entropy
(ours: forward_logprobs/backward_logprobs, the chunked LM head that never holds (B,T,V) logits, or
with --path full forward/backward over full logits; theirs: cross_entropy(logits).backward()).
Each side runs in its own spawned process so peak RSS is its own. Not a convergence benchmark.

    python3 benchmarks/bench_model.py [--threads 2] [--batch 4] [--seq 256] [--layers 30] [--iters 2]
                                      [--path lean|full] [--skip-torch]
"""
import argparse
import multiprocessing as mp
import os
import resource
import sys
import time

SMOLLM2 = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
               max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def train_flops(cfg, B, T):
    """FLOPs of one forward + backward (backward = 2x forward for every product): the linear layers,
    the LM head, and causal attention counted over the key positions it needs (s <= t)."""
    C, F, HS, L, V = cfg["dim"], cfg["ffn_dim"], cfg["dim"] // cfg["n_heads"], cfg["n_layers"], cfg["vocab_size"]
    QKV = (cfg["n_heads"] + 2 * cfg["n_kv_heads"]) * HS
    N = B * T
    linear = 2 * N * (L * (C * QKV + C * C + 3 * C * F) + V * C)
    attention = L * 2 * 2 * B * cfg["n_heads"] * HS * T * (T + 1) // 2  # q.k and p.v
    return 3 * (linear + attention)


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_ours(cfg, B, T, iters, threads, path, q):
    os.environ["OMP_NUM_THREADS"] = str(threads)
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import numpy as np
    import cst
    from cst.model import Model

    cst.set_num_threads(threads)
    m = Model(cst.ModelConfig(**cfg), seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg["vocab_size"], (B, T + 1)).astype(np.int32)
    inp, tgt = tokens[:, :-1].copy(), tokens[:, 1:].copy()
    dlogp = np.full((B, T), -1.0 / (B * T), np.float32)  # d mean cross-entropy / d logp
    m.zero_grad()
    N, V = B * T, cfg["vocab_size"]
    if path == "full":
        flat_tgt = tgt.reshape(N)
        logp, lse = np.empty(N, np.float32), np.empty(N, np.float64)
        dlogits = np.empty((B, T, V), np.float32)
    times, loss = [], None
    for i in range(iters + 1):  # the first call allocates the arena and warms caches
        t0 = time.perf_counter()
        if path == "lean":
            logp = m.forward_logprobs(inp, tgt)
            m.backward_logprobs(dlogp)
        else:
            logits = m.forward(inp).reshape(N, V)
            cst._core.logprobs_forward(logp, lse, logits, flat_tgt)
            dlogits.fill(0.0)
            cst._core.logprobs_backward(dlogits.reshape(N, V), dlogp.reshape(N), logits, flat_tgt, lse)
            m.backward(dlogits)
        times.append(time.perf_counter() - t0)
        loss = -float(logp.mean())
    q.put(dict(times=times[1:], loss=loss, rss=_peak_rss_mb(), simd=cst.simd_path()))


def run_torch(cfg, B, T, iters, threads, q):
    import numpy as np
    import torch
    import transformers

    torch.set_num_threads(threads)
    hc = transformers.LlamaConfig(
        vocab_size=cfg["vocab_size"], hidden_size=cfg["dim"], intermediate_size=cfg["ffn_dim"],
        num_hidden_layers=cfg["n_layers"], num_attention_heads=cfg["n_heads"],
        num_key_value_heads=cfg["n_kv_heads"], max_position_embeddings=cfg["max_seq_len"],
        rope_theta=cfg["rope_theta"], rms_norm_eps=cfg["norm_eps"], tie_word_embeddings=cfg["tie_embeddings"],
        attention_bias=False, mlp_bias=False, attn_implementation="eager")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(hc).float().train()
    rng = np.random.default_rng(0)
    tokens = torch.tensor(rng.integers(0, cfg["vocab_size"], (B, T + 1)), dtype=torch.int64)
    inp, tgt = tokens[:, :-1], tokens[:, 1:]
    times, loss = [], None
    for i in range(iters + 1):
        t0 = time.perf_counter()
        model.zero_grad(set_to_none=False)
        logits = model(input_ids=inp).logits
        out = torch.nn.functional.cross_entropy(logits.reshape(-1, hc.vocab_size), tgt.reshape(-1))
        out.backward()
        times.append(time.perf_counter() - t0)
        loss = float(out.detach())
    q.put(dict(times=times[1:], loss=loss, rss=_peak_rss_mb(), simd="torch"))


def in_child(target, *args):
    ctx = mp.get_context("spawn")  # never fork after OpenMP or torch threads started
    q = ctx.Queue()
    p = ctx.Process(target=target, args=args + (q,))
    p.start()
    res = q.get()
    p.join()
    if p.exitcode != 0:
        raise RuntimeError(f"{target.__name__} exited with {p.exitcode}")
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--layers", type=int, default=SMOLLM2["n_layers"])
    ap.add_argument("--iters", type=int, default=2)
    ap.add_argument("--path", choices=("lean", "full"), default="lean")
    ap.add_argument("--skip-torch", action="store_true")
    a = ap.parse_args()
    cfg = dict(SMOLLM2, n_layers=a.layers)
    B, T = a.batch, a.seq
    flops = train_flops(cfg, B, T)
    print(f"model: SmolLM2-135M shape, {a.layers} layers; B={B} T={T}; {a.threads} threads; "
          f"{flops / 1e9:.1f} GFLOP per step; {a.iters} timed steps after 1 warm-up; cst path {a.path}")
    results = {"cst": in_child(run_ours, cfg, B, T, a.iters, a.threads, a.path)}
    if not a.skip_torch:
        results["torch eager"] = in_child(run_torch, cfg, B, T, a.iters, a.threads)
    for name, r in results.items():
        t = min(r["times"])
        print(f"{name:12s} ({r['simd']}): step {t:7.3f} s  {B * T / t:8.1f} tokens/s  "
              f"{flops / t / 1e9:6.1f} GFLOP/s  peak RSS {r['rss']:7.0f} MB  loss {r['loss']:.4f}")
    if "torch eager" in results:
        ratio = min(results["torch eager"]["times"]) / min(results["cst"]["times"])
        print(f"cst / torch tokens/s ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
