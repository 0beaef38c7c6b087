"""Speed of cst's products against GGUF blocks (csrc/kernels/qdot.c), one input row, as batch-1 decoding
calls them: (1) each block type on one weight matrix that stays in the caches (the kernel's own speed,
cycles per 32 weights at --ghz), (2) every product of one decoded token of the SmolLM2 Q4_1 GGUF in
sequence (96 MB streamed from memory, as a real decoding step does), against the same products in
float32 through NumPy's BLAS (the anchor of the final `ratio` line, timed after cst so that no BLAS
thread spins beside it), (3) the whole decoding step (KVCache.step) on that file. Best of --repeats; not
a test, it prints numbers. bench_generate.py --quantized races llama.cpp end to end.

    OMP_NUM_THREADS=1 python3 benchmarks/bench_qdot.py [--threads 1] [--repeats 100] [--ghz 3.0]
"""
import argparse
import os
import time

import numpy as np

import _srcpath
_srcpath.prefer_built_source_tree()
import cst  # noqa: E402
from cst import _core  # noqa: E402

# ggml type id: (name, weights per block, bytes per block, offset of the f16 scale)
TYPES = {8: ("Q8_0", 32, 34, 0), 2: ("Q4_0", 32, 18, 0), 3: ("Q4_1", 32, 20, 0), 6: ("Q5_0", 32, 22, 0),
         7: ("Q5_1", 32, 24, 0), 12: ("Q4_K", 256, 144, 0), 13: ("Q5_K", 256, 176, 0),
         14: ("Q6_K", 256, 210, 208)}


def best_of(fn, repeats):
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def quantized_input(rng, k):
    x = rng.normal(size=(1, k)).astype(np.float32)
    q, d, s = np.empty((1, k), np.uint8), np.empty((1, k // 32), np.float32), np.empty((1, k // 32), np.float32)
    _core.q8_quantize(q, d, s, x)
    return q, d, s


def resident(args, rng):
    print(f"one matrix in the caches, 1 input row, {args.threads} thread(s), SIMD {cst.simd_path()}:")
    for t, (name, be, bb, dpos) in TYPES.items():
        for o, k in ((3072, 576), (576, 1536)) if be == 32 else ((3072, 1536), (1536, 3072)):
            raw = rng.integers(0, 256, size=(o * k // be, bb), dtype=np.uint8)
            raw[:, dpos:dpos + 2] = np.full((len(raw), 1), 0.01, np.float16).view(np.uint8)
            if t in (3, 7, 12, 13):
                raw[:, 2:4] = raw[:, 0:2]
            q, d, s = quantized_input(rng, k)
            out = np.empty((1, o), np.float32)
            sec = best_of(lambda: _core.qmatvec(out, raw.reshape(-1), q, d, s, t), args.repeats)
            print(f"  {name} {o}x{k}: {sec * 1e6:7.0f} us  {raw.nbytes / sec / 1e9:5.1f} GB/s  "
                  f"{sec * args.ghz * 1e9 / (o * k / 32):4.1f} cycles/32 weights at {args.ghz} GHz")


def one_token(args, rng):
    m = cst.load(cst.io.smollm2_path(), dtype="q")
    g, cfg = m.gen_quant, m.config
    C, F, QD, KVD = cfg.dim, cfg.ffn_dim, cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    shapes = {1: (QD + 2 * KVD, C), 3: (C, QD), 5: (2 * F, C), 6: (C, F)}  # layout roles q|k|v, o, gate|up, down
    calls = []
    for layer in list(range(cfg.n_layers)) + [None]:
        for r, (o, k) in ({0: (cfg.vocab_size, C)} if layer is None else shapes).items():
            i = cfg.n_layers if layer is None else layer
            t, off = int(g["qtypes"][i, r, 0]), int(g["qoffsets"][i, r, 0])
            _, be, bb, _ = TYPES[t]
            calls.append((g["qweights"][off:off + o * k // be * bb], t, o, k))
    ins = {k: quantized_input(rng, k) for k in (C, QD, F)}
    outs = {o: np.empty((1, o), np.float32) for _, _, o, _ in calls}

    def run():
        for w, t, o, k in calls:
            _core.qmatvec(outs[o], w, *ins[k], t)
    sec = best_of(run, args.repeats)
    total = sum(w.nbytes for w, *_ in calls)
    print(f"every product of one SmolLM2 Q4_1 token ({len(calls)} calls, {total / 1e6:.0f} MB): "
          f"{sec * 1e3:.2f} ms, {total / sec / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}")
    return m, calls, sec


def blas_anchor(args, rng, calls):
    """The same products from the dequantised float32 weights, one NumPy matrix-vector product each."""
    dense = []
    for w, t, o, k in calls:
        a = np.empty((o, k), np.float32)
        _core.dequantize(a, w, t)
        dense.append((a, rng.normal(size=k).astype(np.float32)))
    sec = best_of(lambda: [a @ x for a, x in dense], max(3, args.repeats // 10))
    total = sum(a.nbytes for a, _ in dense)
    print(f"the same in float32 through NumPy ({total / 1e6:.0f} MB): {sec * 1e3:.2f} ms, "
          f"{total / sec / 1e9:.1f} GB/s; load average {os.getloadavg()[0]:.1f}")
    return sec


def decode_step(args, m):
    """The whole decoding step around those products, after a 38-token prefill."""
    from cst.generate import KVCache
    cache = KVCache(m, 1, 64 + args.repeats)
    cache.step(np.arange(100, 138, dtype=np.int32)[None], np.array([38], np.int32))
    tok = iter(range(200, 200 + args.repeats))
    sec = best_of(lambda: cache.step(np.array([[next(tok)]], np.int32), np.array([1], np.int32)), args.repeats)
    print(f"one decoding step (KVCache.step, 1 token): {sec * 1e3:.2f} ms = {1 / sec:.0f} tok/s; "
          f"load average {os.getloadavg()[0]:.1f}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=100)
    ap.add_argument("--ghz", type=float, default=3.0, help="clock for the cycles column")
    args = ap.parse_args()
    cst.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    print(f"load average {os.getloadavg()[0]:.1f}")
    resident(args, rng)
    m, calls, sec = one_token(args, rng)
    decode_step(args, m)
    anchor = blas_anchor(args, rng, calls)
    print(f"ratio cst_blocks/numpy_f32 {anchor / sec:.2f} (one token's products, speed-up of the blocks)")


if __name__ == "__main__":
    main()
