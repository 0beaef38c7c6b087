"""Generation throughput: cst.generate (KV cache, C kernels) vs transformers.generate (PyTorch CPU fp32)
on a SmolLM2-135M-shaped Llama with random weights, greedy, fixed number of new tokens, plus the memory
bandwidth of this machine and how close batch-1 decoding comes to the weight-streaming bound. Every cst
batch runs first; transformers then runs in its own spawned process (torch's OpenMP threads would slow
cst's), and a final `ratio cst/transformers ...` line compares them. Not a test: it prints numbers. Keep
it short on shared machines (--new-tokens, --batches, --no-hf).

    OMP_NUM_THREADS=2 python3 benchmarks/bench_generate.py [--new-tokens 128] [--batches 1 16]

--dtype bf16: both sides hold the weights in bf16 (cst.Model.to_bf16(): bf16 products, fp32 sums;
transformers: the model in torch.bfloat16).

--quantized: batch-1 decoding on the real SmolLM2 GGUF instead: cst on the GGUF blocks
(cst.load(path, dtype="q")), cst on the dequantised float32 weights, and llama.cpp (llama-cpp-python,
in its own process, same file) when it is installed, interleaved --repeats times; prints min and median
tok/s of each (128-token totals), the tok/s of each run's median gap between two generated tokens
(steadier on a noisy host), the weight-streaming bound of the blocks, greedy-token agreement of
the quantised and float32 paths, and a final `ratio ...` line. --gguf q4_1 (default) is the bundled Q4_1
file; --gguf bf16 (or q8_0, q4_0, q5_0, ...) is that model exported by cst as a BF16 (or Q8_0, ...) GGUF into a
temporary directory, which both sides then read.

    OMP_NUM_THREADS=2 python3 benchmarks/bench_generate.py --quantized [--gguf bf16|q8_0] [--new-tokens 128] [--repeats 3]
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
from bench_dpo import _spawn  # noqa: E402  (each library in its own process)

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


LLAMA_CPP = r"""
import sys, time
from llama_cpp import Llama
path, n, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
llm = Llama(model_path=path, n_threads=threads, n_ctx=512, verbose=False)
prompt = llm.tokenize(b"<|im_start|>user\nWrite a short story about a robot.<|im_end|>\n<|im_start|>assistant\n",
                      special=True)
def run(k, stamps=None):
    llm.reset()
    t = time.perf_counter()
    for i, _ in enumerate(llm.generate(prompt, temp=0.0, top_k=1, reset=True)):
        if stamps is not None:
            stamps.append(time.perf_counter())
        if i + 1 == k:
            break
    return time.perf_counter() - t
run(4)
stamps = []
t1, tn = run(1), run(n, stamps)
gaps = sorted(b - a for a, b in zip(stamps, stamps[1:]))
mid = len(gaps) // 2
print((n - 1) / (tn - t1), 2.0 / (gaps[mid] + gaps[~mid]))  # the median gap, as numpy.median takes it
"""


def _decode_rates(fn, n):
    """Decode tok/s of fn(k, stream) (k new tokens, prefill included, stream(token) called per token) two
    ways: (n - 1) / (time(n) - time(1)), and one over the median gap between two streamed tokens of the
    n-token call (a burst of noise on a shared host moves a median gap far less than a total). The
    llama.cpp side (LLAMA_CPP) measures both the same way."""
    t1 = _timed(lambda: fn(1, None))
    stamps = []
    tn = _timed(lambda: fn(n, lambda _tok: stamps.append(time.perf_counter())))
    return (n - 1) / max(tn - t1, 1e-9), 1.0 / float(np.median(np.diff(stamps)))


def quantized(args):
    import tempfile
    if args.gguf == "q4_1":
        return _quantized(args, cst.io.smollm2_path(), "Q4_1")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, f"smollm2-{args.gguf}.gguf")
        cst.load(cst.io.smollm2_path()).save(path, format="gguf", dtype=args.gguf)
        return _quantized(args, path, f"{args.gguf.upper()} (cst's export)")


def _quantized(args, path, kind):
    import statistics
    import subprocess
    mq = cst.load(path, dtype="q")
    mf = cst.load(path)
    tok = mq.tokenizer
    prompt = tok.encode_chat([{"role": "user", "content": "Write a short story about a robot."}],
                             add_generation_prompt=True)
    N = args.new_tokens
    bw = copy_bandwidth()
    print(f"SmolLM2-135M-Instruct {kind} GGUF; threads {args.threads}; SIMD {cst.simd_path()}; prompt "
          f"{len(prompt)} tokens, {N} new tokens, greedy; load average {os.getloadavg()[0]:.1f}")
    print(f"blocks held: {mq.gen_quant['qweights'].nbytes / 1e6:.0f} MB (float32 model: {mf.flat_params.nbytes / 1e6:.0f} MB); "
          f"memory bandwidth {bw:.1f} GB/s -> streaming bounds {bw * 1e9 / mq.nbytes:.0f} tok/s (blocks), "
          f"{bw * 1e9 / mf.flat_params.nbytes:.0f} tok/s (float32)")
    a = generate(mq, [prompt], max_new_tokens=N)[0]
    b = generate(mf, [prompt], max_new_tokens=N)[0]
    first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    same = sum(x == y for x, y in zip(a, b))
    print(f"greedy tokens: quantised and float32 agree on the first {first} of {N} "
          f"({same} equal by position)")
    try:
        import llama_cpp  # noqa: F401
        have_lcp = True
    except ImportError:
        have_lcp = False
        print("llama-cpp-python not installed: no llama.cpp anchor (pip install llama-cpp-python)")
    rates = {"cst q": [], "cst f32": [], "llama.cpp": []}
    steps = {k: [] for k in rates}  # tok/s of each run's median gap between two tokens
    for r in range(args.repeats):
        for k, m in (("cst q", mq), ("cst f32", mf)):
            total, step = _decode_rates(lambda n, cb: generate(m, [prompt], max_new_tokens=n, stream=cb), N)
            rates[k].append(total)
            steps[k].append(step)
        if have_lcp:
            out = subprocess.run([sys.executable, "-c", LLAMA_CPP, path, str(N), str(args.threads)],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode == 0:
                total, step = map(float, out.stdout.strip().splitlines()[-1].split())
                rates["llama.cpp"].append(total)
                steps["llama.cpp"].append(step)
            else:
                print("llama.cpp run failed:", out.stderr[-500:])
        print(f"run {r + 1}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in rates.items() if v) +
              f" tok/s (load {os.getloadavg()[0]:.1f})", flush=True)
    for k, v in rates.items():
        if v:
            print(f"{k:10s} decode tok/s: min {min(v):.1f}, median {statistics.median(v):.1f}, max {max(v):.1f}")
    for k, v in steps.items():
        if v:
            print(f"{k:10s} median gap between two tokens, as tok/s, per run: {', '.join(f'{x:.1f}' for x in v)}")
    q = statistics.median(rates["cst q"])
    if steps["llama.cpp"]:
        ratio = statistics.median(steps["cst q"]) / statistics.median(steps["llama.cpp"])
        print(f"ratio cst_q/llama.cpp by the median gap between tokens {ratio:.2f} (medians over runs)")
    if rates["llama.cpp"]:
        print(f"ratio cst_q/llama.cpp {q / statistics.median(rates['llama.cpp']):.2f} (medians)")
    else:
        print(f"ratio cst_q/cst_f32 {q / statistics.median(rates['cst f32']):.2f} (medians; no llama.cpp), "
              f"cst_q at {100 * q / (bw * 1e9 / mq.nbytes):.0f}% of the blocks' streaming bound")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-hf", action="store_true", help="skip transformers.generate")
    ap.add_argument("--quantized", action="store_true", help="batch-1 decode on the SmolLM2 GGUF's blocks")
    from cst.io.gguf import SAVE_DTYPES
    exports = tuple(d for d in SAVE_DTYPES if d == "bf16" or d.startswith("q") and d != "q4_1")
    ap.add_argument("--gguf", choices=("q4_1",) + exports, default="q4_1",
                    help="with --quantized: the bundled Q4_1 file, or cst's export of it in that type")
    ap.add_argument("--dtype", choices=("f32", "bf16"), default="f32", help="weights of both sides (batch mode)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    cst.set_num_threads(args.threads)
    if args.quantized:
        return quantized(args)
    model = cst.Model(SMOLLM2_135M, seed=0)
    if args.dtype == "bf16":
        model.to_bf16()
    weight_bytes = model.nbytes  # every matrix, the tied LM head included, is read per step
    print(f"model: SmolLM2-135M shape, random weights, {model.num_parameters / 1e6:.1f}M params "
          f"({weight_bytes / 1e6:.0f} MB {args.dtype}); threads {args.threads}; SIMD {cst.simd_path()}; "
          f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens, greedy")
    bw = copy_bandwidth()
    print(f"memory bandwidth (NumPy copy of 1 GiB, read+write): {bw:.1f} GB/s")
    bound = bw * 1e9 / weight_bytes
    print(f"weight-streaming bound for batch-1 decoding: {bound:.1f} tokens/s")

    prompts = _batch_prompts(args.batches, args.prompt_len)
    N = args.new_tokens
    rows = {}
    for B in args.batches:
        t_pre = _timed(lambda: generate(model, prompts[B], max_new_tokens=1))
        t_all = _timed(lambda: generate(model, prompts[B], max_new_tokens=N))
        rows[B] = (t_pre, t_all)
    # transformers afterwards, in its own process: torch's spinning OpenMP threads would slow cst's.
    hf = None if args.no_hf else _spawn(hf_side, args.batches, args.prompt_len, N, args.threads, args.dtype)
    ratios = []
    for B in args.batches:
        t_pre, t_all = rows[B]
        ours = B * N / t_all
        dec = B * (N - 1) / max(t_all - t_pre, 1e-9)
        line = (f"batch {B:3d}: cst {ours:7.1f} tok/s overall ({t_all:.1f} s; prefill {t_pre:.2f} s, "
                f"decode {dec:.1f} tok/s)")
        if B == 1:
            line += f", decode at {100 * dec / bound:.0f}% of the streaming bound"
        if hf is not None:
            rate = B * N / hf[B]
            ratios.append(f"batch {B} {ours / rate:.2f}x")
            line += f"; transformers {rate:7.1f} tok/s ({hf[B]:.1f} s); cst/transformers = {ours / rate:.2f}x"
        print(line, flush=True)
    if ratios:
        print("ratio cst/transformers " + ", ".join(ratios))


def _batch_prompts(batches, prompt_len):
    """{B: B random prompts}, the same in every process (one generator, batches in order)."""
    rng = np.random.default_rng(0)
    return {B: [rng.integers(0, SMOLLM2_135M.vocab_size, prompt_len).tolist() for _ in range(B)] for B in batches}


def hf_side(batches, prompt_len, N, threads, dtype, q):
    """transformers.generate on the same weights (cst.Model(seed=0)) and prompts: {B: seconds}."""
    import torch
    torch.set_num_threads(threads)
    hm = hf_model(cst.Model(SMOLLM2_135M, seed=0))
    if dtype == "bf16":
        hm = hm.to(torch.bfloat16)
    prompts = _batch_prompts(batches, prompt_len)
    out = {}
    for B in batches:
        ids = torch.tensor(prompts[B])
        kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0, eos_token_id=None,
                  attention_mask=torch.ones_like(ids))
        with torch.no_grad():
            hm.generate(ids, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=0,
                        eos_token_id=None, attention_mask=torch.ones_like(ids))  # warm-up
            out[B] = _timed(lambda: hm.generate(ids, **kw))
    q.put(out)


if __name__ == "__main__":
    main()
