"""Generation throughput: cst.generate (KV cache, C kernels) vs transformers.generate (PyTorch CPU fp32)
on a SmolLM2-135M-shaped Llama with random weights, greedy, fixed number of new tokens, plus the memory
bandwidth of this machine and how close batch-1 decoding comes to the weight-streaming bound.
Not a test: it prints numbers. Keep it short on shared machines (--new-tokens, --batches, --no-hf).

    OMP_NUM_THREADS=2 python3 benchmarks/bench_generate.py [--new-tokens 128] [--batches 1 16]
"""
import argparse
import os
import sys
import time

import numpy as np

import _srcpath
_srcpath.prefer_built_source_tree()
import cst  # noqa: E402
from cst.generate import generate  # noqa: E402

SMOLLM2_135M = cst.ModelConfig(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
                               max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def copy_bandwidth(gib=1.0, repeats=3):
    """GB/s of a NumPy copy of a `gib` GiB float32 array, counting bytes read plus bytes written."""
    a = np.ones(int(gib * 2**30) // 4, dtype=np.float32)
    b = np.empty_like(a)
    np.copyto(b, a)  # fault the pages in
    best = min(_timed(lambda: np.copyto(b, a)) for _ in range(repeats))
    return 2 * a.nbytes / best / 1e9


def _timed(fn):
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def hf_model(model):
    import torch
    import transformers as tf
    c = model.config
    hc = tf.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.dim, intermediate_size=c.ffn_dim,
                        num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                        num_key_value_heads=c.n_kv_heads, max_position_embeddings=c.max_seq_len,
                        rms_norm_eps=c.norm_eps, rope_theta=c.rope_theta, tie_word_embeddings=c.tie_embeddings,
                        attn_implementation="sdpa")
    hm = tf.LlamaForCausalLM(hc)
    hm.load_state_dict({k: torch.from_numpy(v) for k, v in model.params.items()}, strict=False)
    return hm.float().eval()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers.generate")
    args = ap.parse_args()

    cst.set_num_threads(args.threads)
    model = cst.Model(SMOLLM2_135M, seed=0)
    weight_bytes = model.flat_params.nbytes  # every matrix, the tied LM head included, is read per step
    print(f"model: SmolLM2-135M shape, random weights, {model.num_parameters / 1e6:.1f}M params "
          f"({weight_bytes / 1e6:.0f} MB fp32); threads {args.threads}; SIMD {cst.simd_path()}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    bw = copy_bandwidth()
    print(f"memory bandwidth (NumPy copy of 1 GiB, read+write): {bw:.1f} GB/s")
    bound = bw * 1e9 / weight_bytes
    print(f"weight-streaming bound for batch-1 decoding: {bound:.1f} tokens/s")

    hm = None
    if not args.no_hf:
        import torch
        torch.set_num_threads(args.threads)
        hm = hf_model(model)

    rng = np.random.default_rng(0)
    N = args.new_tokens
    for B in args.batches:
        prompts = [rng.integers(0, SMOLLM2_135M.vocab_size, args.prompt_len).tolist() for _ in range(B)]
        t_pre = _timed(lambda: generate(model, prompts, max_new_tokens=1))
        t_all = _timed(lambda: generate(model, prompts, max_new_tokens=N))
        ours = B * N / t_all
        dec = B * (N - 1) / max(t_all - t_pre, 1e-9)
        line = (f"batch {B:3d}: cst {ours:7.1f} tok/s overall ({t_all:.1f} s; prefill {t_pre:.2f} s, "
                f"decode {dec:.1f} tok/s)")
        if B == 1:
            line += f", decode at {100 * dec / bound:.0f}% of the streaming bound"
        if hm is not None:
            import torch
            ids = torch.tensor(prompts)
            kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None,
                      attention_mask=torch.ones_like(ids))
            with torch.no_grad():
                hm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                            eos_token_id=None, attention_mask=torch.ones_like(ids))  # warm-up
                t_hf = _timed(lambda: hm.generate(ids, **kw))
            hf = B * N / t_hf
            line += f"; transformers {hf:7.1f} tok/s ({t_hf:.1f} s); cst/transformers = {ours / hf:.2f}x"
        print(line, flush=True)


if __name__ == "__main__":
    main()
