"""Peak memory and time of one LoRA DPO step on a Mistral-7B-shaped model (dim 4096, 32 layers, 32 heads,
8 kv heads, ffn 14336, vocab 32000, untied head) with its frozen base in bf16: random weights written
straight into the bf16 buffer 2^24 values at a time (a float32 copy never exists), LoRA r=16 on all seven
projections, 4 pairs x 256 tokens (prompt 64), micro-batches of --micro pairs (gradient accumulation).
The step is bench_dpo.py's (run_ours); the model lives in its own spawned process, whose peak RSS
(ru_maxrss: model, reference pass and steps) is reported. Target: <= 20 GB.

--layers N runs a smaller model of the same shape; --estimate A,B runs A and B layers and extrapolates
linearly to --layers (every per-layer cost, weights, activations, adapters and optimizer state, grows with
the layer count; the embedding, head and GEMM scratch do not). --dtype f32 runs the same weights in float32.

    python3 benchmarks/bench_bf16_memory.py [--layers 32] [--estimate 2,4] [--threads 2] [--micro 1]
                                            [--pairs 4] [--seq 256] [--prompt 64] [--steps 1] [--dtype bf16|f32]
"""
import argparse
import os

from bench_dpo import _spawn, run_ours

MISTRAL7B = dict(vocab_size=32000, dim=4096, n_layers=32, n_heads=32, n_kv_heads=8, ffn_dim=14336,
                 max_seq_len=4096, rope_theta=1000000.0, norm_eps=1e-5, tie_embeddings=False)
TARGET_GB = 20.0
CHUNK = 1 << 24


def random_model(cfg, dtype):
    """A Model of cfg whose matrices hold random bf16 values (|w| in [2^-6, 2^-5), random sign and
    mantissa: about the scale of N(0, 0.02)) drawn as 16-bit patterns, CHUNK values at a time, and norms of
    1. The same values for both dtypes (float32 holds them exactly)."""
    import numpy as np
    from cst.bf16 import from_bf16
    from cst.model import Model
    m = Model(cfg, init=False, dtype=dtype)
    rng = np.random.default_rng(0)
    for a in m.params.values():
        if a.ndim == 1:
            a[...] = 1.0
            continue
        flat = a.reshape(-1)
        for i in range(0, flat.size, CHUNK):
            bits = rng.integers(0, 1 << 16, min(CHUNK, flat.size - i), dtype=np.uint16)
            bits &= 0x807F  # sign and mantissa
            bits |= 121 << 7  # exponent of 2^-6
            if a.dtype == np.uint16:
                flat[i:i + bits.size] = bits
            else:
                from_bf16(bits, out=flat[i:i + bits.size])
    return m


def make_bf16(cfg):
    return random_model(cfg, "bf16")


def make_f32(cfg):
    return random_model(cfg, "f32")


def param_gb(cfg, dtype):
    """Bytes of the parameters of cfg in dtype (computed, nothing allocated), in GB (10^9)."""
    from cst.core.layout import param_layout
    import numpy as np
    mats = sum(int(np.prod(s)) for _, s in param_layout(cfg) if len(s) == 2)
    vecs = sum(int(np.prod(s)) for _, s in param_layout(cfg) if len(s) == 1)
    return ((2 if dtype == "bf16" else 4) * mats + 4 * vecs) / 1e9


def one(a, layers):
    cfg = dict(MISTRAL7B, n_layers=layers)
    r = _spawn(run_ours, cfg, a.pairs, a.seq, a.prompt, a.rank, 0.0, a.steps, a.threads, False,
               dtype=a.dtype, micro=a.micro, make=make_bf16 if a.dtype == "bf16" else make_f32)
    t = sorted(r["times"])
    gb = 2 ** 20 / 1e9  # MiB -> GB
    row = {"layers": layers, "param_gb": r["param_mb"] * gb, "model_rss_gb": r["model_rss_mb"] * gb,
           "peak_gb": r["peak_rss_mb"] * gb, "step_s": t[0], "make_s": r["make_s"], "loss": r["loss"]}
    print(f"{layers:6d} {row['param_gb']:9.2f} {row['model_rss_gb']:13.2f} {row['peak_gb']:13.2f} "
          f"{row['step_s']:8.2f} {row['make_s']:8.1f} {row['loss']:9.5f}", flush=True)
    return row


def main():
    import _srcpath
    _srcpath.prefer_built_source_tree()
    import cst
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=MISTRAL7B["n_layers"])
    ap.add_argument("--estimate", default=None, metavar="A,B",
                    help="run A and B layers and extrapolate to --layers instead of running it")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--pairs", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--micro", type=int, default=1, help="pairs per micro-batch")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=1, help="timed steps after one warm-up step")
    ap.add_argument("--dtype", choices=("bf16", "f32"), default="bf16")
    a = ap.parse_args()
    try:
        load = os.getloadavg()
    except OSError:
        load = (float("nan"),) * 3
    full = cst.ModelConfig(**dict(MISTRAL7B, n_layers=a.layers))
    print(f"Mistral-7B-shaped DPO step, base {a.dtype}, LoRA r={a.rank} on 7 projections: {a.pairs} pairs x {a.seq} "
          f"tokens (prompt {a.prompt}), micro-batches of {a.micro} pair(s), {a.threads} threads, bf16 GEMM way "
          f"{cst._core.bf16_gemm_way()}; parameters of {a.layers} layers: {param_gb(full, a.dtype):.2f} GB; load "
          f"average before: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    print(f"{'layers':>6s} {'params GB':>9s} {'RSS model GB':>13s} {'peak RSS GB':>13s} {'step s':>8s} "
          f"{'make s':>8s} {'loss':>9s}")
    if a.estimate:
        la, lb = (int(x) for x in a.estimate.split(","))
        ra, rb = one(a, la), one(a, lb)
        per_gb = (rb["peak_gb"] - ra["peak_gb"]) / (lb - la)
        per_s = (rb["step_s"] - ra["step_s"]) / (lb - la)
        peak = ra["peak_gb"] + (a.layers - la) * per_gb
        step = ra["step_s"] + (a.layers - la) * per_s
        print(f"per layer: {per_gb:.3f} GB peak RSS, {per_s:.2f} s/step; estimate for {a.layers} layers: "
              f"{peak:.2f} GB peak RSS, {step:.1f} s/step")
        how = f"estimated from {la} and {lb} layers"
    else:
        r = one(a, a.layers)
        peak, how = r["peak_gb"], f"measured, {a.layers} layers, {r['step_s']:.1f} s/step"
    try:
        load = os.getloadavg()
        print(f"load average after: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    except OSError:
        pass
    print(f"ratio peak RSS / {TARGET_GB:.0f} GB target: {peak / TARGET_GB:.2f}x ({peak:.2f} GB, {how})")


if __name__ == "__main__":
    main()
