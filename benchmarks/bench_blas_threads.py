"""cst's GEMM right after a NumPy (OpenBLAS) matmul in the same process, with and without
cst.runtime.release_blas_threads() in between, against the same GEMM with OpenBLAS idle (0.3 s of sleep
first, past OpenBLAS's spin timeout). The three cases alternate, so load from other processes hits all
alike. Not a test: it prints numbers.

    python3 benchmarks/bench_blas_threads.py [--reps 40] [--threads 2]
"""
import argparse
import os
import statistics
import time

import _srcpath


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    os.environ["CST_KEEP_BLAS_THREADS"] = "1"  # this script decides when to release
    _srcpath.prefer_built_source_tree()
    import numpy as np
    from cst import _core
    from cst.runtime import release_blas_threads
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1024, 576)).astype(np.float32)
    w = rng.standard_normal((576, 576)).astype(np.float32)
    out, o2 = np.empty((1024, 576), np.float32), np.empty((1024, 576), np.float32)
    print(f"OpenBLAS libraries in the process: {release_blas_threads()}; threads {args.threads}")
    res = {"OpenBLAS idle": [], "after numpy": [], "after numpy + release": []}
    for _ in range(args.reps):
        for k in res:
            if k == "OpenBLAS idle":
                time.sleep(0.3)
            else:
                np.matmul(x, w.T, out=o2)
                if k.endswith("release"):
                    release_blas_threads()
            t = time.perf_counter()
            _core.matmul_forward(out, x, w)
            res[k].append(time.perf_counter() - t)
    flop = 2.0 * 1024 * 576 * 576 / 1e9
    med = {k: statistics.median(v) for k, v in res.items()}
    for k, v in res.items():
        print(f"{k:24} cst 1024x576x576 forward: median {flop / med[k]:5.0f} GFLOP/s, best {flop / min(v):5.0f}")
    print(f"ratio after numpy / idle {med['OpenBLAS idle'] / med['after numpy']:.2f}x; "
          f"after numpy + release / idle {med['OpenBLAS idle'] / med['after numpy + release']:.2f}x (medians)")


if __name__ == "__main__":
    main()
