"""GFLOP/s of cst's linear-layer products against OpenBLAS (through NumPy) and PyTorch (fp32, and bf16
through oneDNN) on every product SmolLM2-135M training does: the base projections (q/o 576x576, k/v
192x576, gate/up 1536x576, down 576x1536, the fused q|k|v and gate|up cst really calls, the LM head
49152x576) in forward and both gradients, and the LoRA products at rank 8-64, with N = B*T = 1024.

Each library runs in its own process, one after another, because a thread pool left spinning by one
library halves the next one's speed on the same cores (see docs/benchmarks.md). OpenBLAS runs with
OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from its environment, so it picks its own kernels;
threadpoolctl's report of those kernels is printed. The whole sweep is repeated --runs times; the
table gives the min and median over runs of each shape's best time, and `ratio` lines compare cst
with the fastest anchor of the same precision, run by run. Not a test: it prints numbers.

Every side overwrites its output, as the model's first product into each input gradient does
(accumulate=False) and as torch.mm(out=) and numpy.matmul(out=) do; cst's weight gradient (dW) adds into
its output (dW +=), the anchors overwrite. cst's bf16 products read fp32 activations (rounded to bf16
inside, timed) and write fp32 outputs; torch's bf16 side gets bf16 operands and writes bf16, half the
bytes, which dominates where k is short (k/v, the input gradients with k = 192 or 576).

    python3 benchmarks/bench_matmul.py [--runs 3] [--threads 2] [--only model,lora] [--min-time 0.3]
                                       [--clock wall|cpu] [--libs cst,openblas,torch,cst-bf16,torch-bf16] [--quick]
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import _srcpath
from _machine import cpu_info

MODEL = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
         ("qkv fused", 960, 576), ("gate|up fused", 3072, 576), ("lm head", 49152, 576)]
RANKS = (8, 16, 32, 64)
N_TOKENS = 1024
LIBS = ("cst", "openblas", "torch", "cst-bf16", "torch-bf16")


def products():
    """(group, name, M, N, K, kind): kind says how the operands sit in memory, as the model has them.
    nt: out (M,N) = x (M,K) @ W (N,K)^T;  nn: out (M,N) = dy (M,K) @ W (K,N);  tn: out (M,N) = dy (K,M)^T @ x (K,N)."""
    out = []
    for name, oc, c in MODEL:
        out.append(("model", f"{name} fwd", N_TOKENS, oc, c, "nt"))
        out.append(("model", f"{name} dx", N_TOKENS, c, oc, "nn"))
        out.append(("model", f"{name} dW", oc, c, N_TOKENS, "tn"))  # the head's too: full fine-tuning
    for r in RANKS:
        c = out_ = 576
        out.append(("lora", f"r{r} h=xA^T", N_TOKENS, r, c, "nt"))           # (1024x576) @ A^T -> r
        out.append(("lora", f"r{r} dB=dy^T h", out_, r, N_TOKENS, "tn"))     # (576x1024) @ (1024xr)
        out.append(("lora", f"r{r} dA=dh^T x", r, c, N_TOKENS, "tn"))
        out.append(("lora", f"r{r} y+=hB^T", N_TOKENS, out_, r, "nt"))
        out.append(("lora", f"r{r} dh=dy B", N_TOKENS, r, out_, "nn"))
        out.append(("lora", f"r{r} dx+=dh A", N_TOKENS, c, r, "nn"))
    return out


# ---- worker: one library, every product, best time of each ----

def _operands(lib, M, N, K, kind, rng):
    import numpy as np
    a = rng.standard_normal((K, M) if kind == "tn" else (M, K)).astype(np.float32)
    b = rng.standard_normal((N, K) if kind == "nt" else (K, N)).astype(np.float32)
    c = np.zeros((M, N), np.float32)
    if lib in ("cst", "cst-bf16"):
        from cst import _core
        if lib == "cst-bf16":  # weights stored in bf16, activations fp32 (rounded inside, timed)
            from cst.bf16 import to_bf16
            if kind == "nt":
                w16 = to_bf16(b)
                return lambda: _core.matmul_bf16_forward(c, a, w16)
            if kind == "nn":
                w16, x = to_bf16(b), np.empty((M, N), np.float32)
                return lambda: _core.matmul_bf16_backward(c, None, a, x, w16, False)
            w16 = np.zeros((M, N), np.uint16)
            return lambda: _core.matmul_bf16_backward(None, c, a, b, w16)
        if kind == "nt":  # y = x W^T
            return lambda: _core.matmul_forward(c, a, b)
        if kind == "nn":  # dinp = dout @ W with W (K, N) = (OC, C)
            return lambda: _core.matmul_backward(c, None, a, np.empty((M, N), np.float32), b, False)
        return lambda: _core.matmul_backward(None, c, a, b, np.empty((M, N), np.float32))  # dW += dy^T x
    if lib == "openblas":
        if kind == "nt":
            return lambda: np.matmul(a, b.T, out=c)
        if kind == "nn":
            return lambda: np.matmul(a, b, out=c)
        return lambda: np.matmul(a.T, b, out=c)
    import torch
    dt = torch.bfloat16 if lib == "torch-bf16" else torch.float32
    ta, tb = torch.from_numpy(a).to(dt), torch.from_numpy(b).to(dt)
    tc = torch.zeros((M, N), dtype=dt)
    if kind == "nt":
        return lambda: torch.mm(ta, tb.t(), out=tc)
    if kind == "nn":
        return lambda: torch.mm(ta, tb, out=tc)
    return lambda: torch.mm(ta.t(), tb, out=tc)


def worker(lib, threads, only, min_time, clock):
    """Prints one JSON line: {"info": ..., "best": {product name: seconds}}."""
    import numpy as np
    info = {}
    if lib in ("cst", "cst-bf16"):
        _srcpath.prefer_built_source_tree()
        import cst
        from cst import _core
        cst.set_num_threads(threads)
        info = {"cst": cst.__file__, "simd": _core.simd_path(), "threads": _core.get_num_threads()}
        if lib == "cst-bf16":
            info["bf16_way"] = _core.bf16_gemm_way()
    elif lib == "openblas":
        try:
            from threadpoolctl import threadpool_info
            info = {"pools": [{k: p.get(k) for k in ("internal_api", "version", "architecture", "num_threads")}
                              for p in threadpool_info()]}
        except ImportError:
            info = {"pools": "threadpoolctl not installed (pip install threadpoolctl)"}
        info["numpy"] = np.__version__
    else:
        import torch
        torch.set_num_threads(threads)
        info = {"torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    rng = np.random.default_rng(0)
    now = time.process_time if clock == "cpu" else time.perf_counter
    best = {}
    for group, name, M, N, K, kind in products():
        if group not in only:
            continue
        fn = _operands(lib, M, N, K, kind, rng)
        if fn is None:
            continue
        fn()  # warm-up: page faults, packing buffers, thread pool
        t_best, total, reps = float("inf"), 0.0, 0
        while reps < 3 or (total < min_time and reps < 200):
            t = now()
            fn()
            dt = now() - t
            t_best, total, reps = min(t_best, dt), total + dt, reps + 1
        best[name] = t_best
    print(json.dumps({"info": info, "best": best}))


def run_worker(lib, args):
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env[var] = str(args.threads)
    if lib == "openblas":  # let OpenBLAS choose its kernels and blocking for this CPU
        env.pop("OPENBLAS_CORETYPE", None)
        env.pop("OPENBLAS_L2_SIZE", None)
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", lib, "--threads", str(args.threads),
           "--only", args.only, "--min-time", str(args.min_time), "--clock", args.clock]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode != 0:
        print(f"{lib}: worker failed ({p.returncode}):\n{p.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="model,lora")
    ap.add_argument("--libs", default=",".join(LIBS))
    ap.add_argument("--min-time", type=float, default=0.3, help="seconds of repeats per product and process")
    ap.add_argument("--quick", action="store_true", help="one run, 0.1 s per product")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="cpu: the process's CPU time instead of wall time; with --threads 1 it ignores time spent "
                         "descheduled on a loaded machine (with more threads it would count spinning threads too)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args.worker, args.threads, args.only.split(","), args.min_time, args.clock)
    libs = [lb for lb in args.libs.split(",") if lb]
    unknown = [lb for lb in libs if lb not in LIBS]
    if unknown:
        ap.error(f"--libs: unknown {', '.join(map(repr, unknown))}; choose from {', '.join(LIBS)}")
    if not libs:
        ap.error(f"--libs: name at least one of {', '.join(LIBS)}")
    if args.quick:
        args.runs, args.min_time = 1, 0.1
    model, family, simd = cpu_info()
    print(f"CPU: {model}, cpu family {family}, {os.cpu_count()} logical CPUs; flags: {' '.join(simd)}")
    print(f"threads per library: {args.threads}; N = {N_TOKENS} tokens; {args.runs} runs, each library in "
          f"its own process, one after another; {args.clock} clock")
    runs = []  # runs[i][lib] = {name: seconds}
    for i in range(args.runs):
        res = {}
        for lib in libs:
            r = run_worker(lib, args)
            if r is None:
                continue
            res[lib] = r["best"]
            if i == 0:
                print(f"  {lib}: {json.dumps(r['info'])}")
        runs.append(res)
    names = [(g, n, 2.0 * M * N * K) for g, n, M, N, K, _ in products() if g in args.only.split(",")]
    present = [lb for lb in libs if all(lb in r and r[lb] for r in runs)]
    print(f"\nGFLOP/s, min-median over {args.runs} runs of each process's best time")
    print(f"{'product':22}" + "".join(f"{lb:>16}" for lb in present) + f"{'cst/openblas':>14}{'bf16 cst/torch':>16}")

    def gf(lib, name, flop):
        return sorted(flop / r[lib][name] / 1e9 for r in runs)

    def per_run_ratio(lib, anchor, name):
        return [r[anchor][name] / r[lib][name] for r in runs]

    ratios = {"model": [], "lora": [], "bf16-model": [], "bf16-lora": [], "lora-as-trained": []}
    for g, name, flop in names:
        line = f"{name:22}"
        for lb in present:
            v = gf(lb, name, flop)
            line += f"{v[0]:7.0f}-{statistics.median(v):<8.0f}"
        if "cst" in present and "openblas" in present:
            rr = per_run_ratio("cst", "openblas", name)
            ratios[g].append((statistics.median(rr), min(rr), name))
            line += f"{statistics.median(rr):13.2f}x"
        if "cst-bf16" in present and "torch-bf16" in present:
            rr = per_run_ratio("cst-bf16", "torch-bf16", name)
            ratios[f"bf16-{g}"].append((statistics.median(rr), min(rr), name))
            line += f"{statistics.median(rr):15.2f}x"
        if g == "lora" and "cst" in present and "torch-bf16" in present:
            rr = per_run_ratio("cst", "torch-bf16", name)
            ratios["lora-as-trained"].append((statistics.median(rr), min(rr), name))
        print(line, flush=True)
    print()
    # cst keeps LoRA adapters and their products in fp32 even on a bf16 base, so in bf16 training its
    # adapter products are the fp32 "cst" column, raced here against torch's bf16 (autocast runs them in bf16).
    for key, label in (("model", "fp32 model shapes cst/openblas"), ("lora", "fp32 LoRA products cst/openblas"),
                       ("bf16-model", "bf16 model shapes cst/torch-bf16"),
                       ("bf16-lora", "bf16 LoRA products cst/torch-bf16 (a path cst's training does not take)"),
                       ("lora-as-trained", "LoRA products as trained on a bf16 base: cst fp32/torch-bf16")):
        if ratios[key]:
            med = sorted(r[0] for r in ratios[key])
            worst = min(ratios[key])
            print(f"ratio {label}: worst shape {worst[0]:.2f}x ({worst[2]}, min over runs {worst[1]:.2f}x), "
                  f"median shape {statistics.median(med):.2f}x, best {med[-1]:.2f}x")


if __name__ == "__main__":
    main()
