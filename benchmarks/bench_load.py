"""Time to load the SmolLM2-135M-Instruct Q4_1 GGUF into float32 with cst vs with transformers
(AutoModelForCausalLM.from_pretrained(dir, gguf_file=...)), in one run, same process, same machine.
Usage: python3 benchmarks/bench_load.py [--repeat N] [--threads T]"""
import argparse
import os
import sys
import time

import _srcpath
_srcpath.prefer_built_source_tree()


def best_of(fn, n):
    times = []
    for _ in range(n):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
        del out
    return min(times), times


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    import cst
    import cst.io
    if args.threads:
        cst.set_num_threads(args.threads)
    path = cst.io.smollm2_path()
    print(f"file: {path} ({os.path.getsize(path) / 1e6:.1f} MB), cst threads: {cst.get_num_threads()}")

    best, all_t = best_of(lambda: cst.io.load(path), args.repeat)
    print(f"cst.io.load:                    best {best:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in all_t)})")

    import cst.gguf
    best_r, _ = best_of(lambda: cst.gguf._reader(path), args.repeat)
    print(f"  of which check + GGUFReader:  best {best_r:6.2f} s")

    import logging
    import torch
    import transformers
    logging.getLogger("transformers").setLevel(logging.ERROR)

    def hf():
        return transformers.AutoModelForCausalLM.from_pretrained(
            os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32)

    best_hf, all_hf = best_of(hf, args.repeat)
    print(f"transformers gguf_file= load:   best {best_hf:6.2f} s  (runs: {', '.join(f'{t:.2f}' for t in all_hf)})")
    print(f"speed-up: {best_hf / best:.2f}x")


if __name__ == "__main__":
    main()
