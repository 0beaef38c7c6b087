"""GFLOP/s of cst's linear-layer products (every SIMD path) against NumPy (OpenBLAS) and PyTorch, on
the SmolLM2-135M training shapes (N = B*T = 1024), token-by-token generation shapes and LoRA shapes.
Best of several repeats, since the machine is shared. Not a test: it checks nothing but prints numbers.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/bench_matmul.py [--quick] [--paths avx512,avx2]
"""
import argparse
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "2")
os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
os.environ.setdefault("MKL_NUM_THREADS", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import numpy as np  # noqa: E402

from cst import _core  # noqa: E402

try:
    import torch  # noqa: E402
    torch.set_num_threads(2)
except ImportError:  # pragma: no cover
    torch = None

TRAIN = [(1024, 576, 960), (1024, 576, 576), (1024, 576, 3072), (1024, 1536, 576), (1024, 576, 49152)]
GEN = [(1, 576, 49152), (1, 576, 1536), (4, 576, 49152), (16, 576, 49152), (16, 576, 3072)]
LORA = [(1024, 576, 8), (1024, 576, 32), (1024, 16, 576), (1024, 32, 1536)]


def best_times(fns, min_time, max_reps):
    """Best wall time of each fn; the fns are interleaved so load from other processes hits all alike."""
    for _, fn in fns:
        fn()  # warm-up (page faults, packing buffers, thread pool)
    best = [float("inf")] * len(fns)
    total, reps = 0.0, 0
    while reps < max_reps and (reps < 3 or total < min_time):
        for i, (setup, fn) in enumerate(fns):
            setup()
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            best[i] = min(best[i], dt)
            total += dt
        reps += 1
    return best


def ops(kind, N, C, OC, rng):
    x = rng.standard_normal((N, C)).astype(np.float32)
    w = rng.standard_normal((OC, C)).astype(np.float32)
    dy = rng.standard_normal((N, OC)).astype(np.float32)
    if kind == "fwd":
        out = np.empty((N, OC), np.float32)
        ours = lambda: _core.matmul_forward(out, x, w)  # noqa: E731
        npf = lambda: np.matmul(x, w.T, out=out)  # noqa: E731
        if torch is not None:
            tx, tw, to = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(out)
            tf = lambda: torch.mm(tx, tw.t(), out=to)  # noqa: E731
    elif kind == "dinp":
        dx = np.zeros((N, C), np.float32)
        ours = lambda: _core.matmul_backward(dx, None, dy, x, w)  # noqa: E731
        npf = lambda: np.matmul(dy, w, out=dx)  # noqa: E731
        if torch is not None:
            tdy, tw, tdx = torch.from_numpy(dy), torch.from_numpy(w), torch.from_numpy(dx)
            tf = lambda: torch.mm(tdy, tw, out=tdx)  # noqa: E731
    else:
        dw = np.zeros((OC, C), np.float32)
        ours = lambda: _core.matmul_backward(None, dw, dy, x, w)  # noqa: E731
        npf = lambda: np.matmul(dy.T, x, out=dw)  # noqa: E731
        if torch is not None:
            tdy, tx, tdw = torch.from_numpy(dy), torch.from_numpy(x), torch.from_numpy(dw)
            tf = lambda: torch.mm(tdy.t(), tx, out=tdw)  # noqa: E731
    return ours, npf, (tf if torch is not None else None)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats, skip the 49152-column training shape")
    ap.add_argument("--paths", default=",".join(_core.simd_supported()))
    ap.add_argument("--only", default="train,gen,lora")
    args = ap.parse_args()
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if var in os.environ:
            print(f"note: {var}={os.environ[var]} is set; it can detune OpenBLAS. For a fair numpy figure run\n"
                  "      env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python3 benchmarks/bench_matmul.py")
    print(f"threads: cst {_core.get_num_threads()}, torch {torch.get_num_threads() if torch else '-'}, "
          f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS')}")
    paths = [p for p in args.paths.split(",") if p]
    min_time = 0.1 if args.quick else 0.3
    max_reps = 5 if args.quick else 15
    rng = np.random.default_rng(0)
    groups = {"train": TRAIN, "gen": GEN, "lora": LORA}
    before = _core.simd_path()
    head = "".join(f"{p:>9}" for p in paths)
    print(f"{'op':5} {'N':>5} {'C':>5} {'OC':>6} |{head} {'numpy':>9} {'torch':>9} | best/torch  (GFLOP/s)")
    try:
        for g in args.only.split(","):
            for (N, C, OC) in groups[g]:
                if args.quick and OC == 49152 and N > 16:
                    continue
                kinds = ["fwd"] if g == "gen" else ["fwd", "dinp", "dweight"]
                for kind in kinds:
                    ours, npf, tf = ops(kind, N, C, OC, rng)
                    flop = 2.0 * N * C * OC
                    fns = [((lambda p=p: _core.set_simd_path(p)), ours) for p in paths]
                    fns += [(lambda: None, npf)] + ([(lambda: None, tf)] if tf else [])
                    best = best_times(fns, min_time * (len(fns) + 1), max_reps)
                    _core.set_simd_path(before)
                    res = [flop / t / 1e9 for t in best[:len(paths)]]
                    npg = flop / best[len(paths)] / 1e9
                    tg = flop / best[len(paths) + 1] / 1e9 if tf else float("nan")
                    cols = "".join(f"{r:9.1f}" for r in res)
                    print(f"{kind:5} {N:5d} {C:5d} {OC:6d} |{cols} {npg:9.1f} {tg:9.1f} | {max(res) / tg:5.2f}x",
                          flush=True)
    finally:
        _core.set_simd_path(before)


if __name__ == "__main__":
    main()
