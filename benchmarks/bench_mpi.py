"""Data-parallel CST/DPO training over MPI: steps/s of cst.Trainer with N=1 and N=2 ranks (one OpenMP
thread each) at the same global batch, the share of a step spent in collectives, and the time of one
allreduce at the gradient sizes of SmolLM2-135M (LoRA r=16 on all seven projections, and full
fine-tuning). LoRA DPO on a model of SmolLM2-135M's width with fewer layers and random weights (the
per-layer work and the vocabulary projection are the real ones). Not a convergence benchmark.

    python3 benchmarks/bench_mpi.py [--layers 2] [--seq 64] [--pairs 4] [--steps 4] [--lora-r 16] [--ranks 2]

It launches itself under `mpirun -n 1` and `mpirun -n N` (mpi4py + Open MPI: pip install "cst[mpi]").
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

SMOLLM2 = dict(vocab_size=49152, dim=576, n_heads=9, n_kv_heads=3, ffn_dim=1536, max_seq_len=8192,
               rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)
# Gradient sizes (float32 values) of SmolLM2-135M: LoRA r=16 on q,k,v,o,gate,up,down of 30 layers
# (r * (in + out) per projection), and every weight.
LORA16_135M = 16 * 30 * ((576 + 576) * 2 + (576 + 192) * 2 + (576 + 1536) * 3)
FULL_135M = 134_515_008


def worker(args):
    import numpy as np
    from cst import ModelConfig, distributed
    from cst.data import TokenizedExample
    from cst.model import Model
    from cst.trainer import Trainer
    from cst.training_config import DPOConfig

    world = distributed.world()
    cfg = ModelConfig(n_layers=args.layers, **SMOLLM2)
    model = Model(cfg, seed=0)
    rng = np.random.default_rng(0)
    half = args.seq // 2
    n = args.pairs * (args.steps + 1)
    data = [TokenizedExample([int(t) for t in rng.integers(0, cfg.vocab_size, half)],
                             [int(t) for t in rng.integers(0, cfg.vocab_size, half)],
                             [int(t) for t in rng.integers(0, cfg.vocab_size, half)], index=i) for i in range(n)]
    out = tempfile.mkdtemp(prefix="bench-mpi-") if world.rank == 0 else None
    out = world.bcast(out)
    config = DPOConfig(per_device_train_batch_size=args.pairs // world.size, gradient_accumulation_steps=1,
                       max_steps=args.steps + 1, lora_r=args.lora_r, lora_alpha=2.0 * args.lora_r, lora_dropout=0.0,
                       max_length=args.seq, max_prompt_length=half, logging_steps=1, save_steps=None,
                       learning_rate=1e-4, output_dir=out)
    tr = Trainer(model, config, data)
    comm = [0.0]

    def timed(f):
        def run(*a, **k):
            t0 = time.perf_counter()
            try:
                return f(*a, **k)
            finally:
                comm[0] += time.perf_counter() - t0
        return run
    tr.dist.allreduce_, tr.dist.allgather = timed(tr.dist.allreduce_), timed(tr.dist.allgather)
    ends, comm_at = [], []
    step = tr.optimizer.step

    def step_and_mark(*a, **k):
        r = step(*a, **k)
        ends.append(time.perf_counter())
        comm_at.append(comm[0])
        return r
    tr.optimizer.step = step_and_mark
    os.environ["TQDM_DISABLE"] = "1"
    tr.train()
    # Steps after the first (warm-up): wall time, and time inside collectives (including waiting for
    # the slower rank). Rank 0's view; the ranks run in lockstep.
    dts = np.diff(ends)
    dcs = np.diff(comm_at)
    # One allreduce alone (ranks lined up by a barrier first) at this run's and at SmolLM2-135M's sizes.
    sizes = {"this run's LoRA gradient": tr._grads.size, "SmolLM2-135M LoRA r=16": LORA16_135M}
    if args.full:
        sizes["SmolLM2-135M full fine-tuning"] = FULL_135M
    alone = {}
    for name, size in sizes.items():
        buf = np.ones(size, np.float32)
        ts = []
        for _ in range(3):
            world.barrier()
            t0 = time.perf_counter()
            world.allreduce_(buf)
            ts.append(time.perf_counter() - t0)
        alone[name] = {"values": size, "seconds": min(ts)}
        del buf
    world.barrier()
    if world.rank == 0:
        shutil.rmtree(out, ignore_errors=True)
        print(json.dumps({"ranks": world.size, "threads": __import__("cst.runtime").runtime.get_num_threads(),
                          "step_s": float(np.median(dts)), "comm_s": float(np.median(dcs)),
                          "comm_share": float(np.sum(dcs) / np.sum(dts)), "allreduce_alone": alone}))


def launch(n, args):
    mpirun = os.path.join(os.path.dirname(sys.executable), "mpirun")
    env = dict(os.environ, OMP_NUM_THREADS="1", OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe",
               PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                           os.environ.get("PYTHONPATH", "")]))
    cmd = [mpirun if os.path.exists(mpirun) else "mpirun", "-n", str(n), sys.executable, os.path.abspath(__file__),
           "--worker", *sys.argv[1:]]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if p.returncode != 0:
        sys.exit(f"mpirun -n {n} failed:\n{p.stdout[-2000:]}\n{p.stderr[-2000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (half prompt, half completion)")
    ap.add_argument("--pairs", type=int, default=4, help="global batch (pairs per step), divisible by --ranks")
    ap.add_argument("--steps", type=int, default=4, help="timed steps (after one warm-up step)")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--full", action="store_true", help="also time an allreduce of SmolLM2-135M's full gradient")
    ap.add_argument("--timeout", type=int, default=1800)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if args.pairs % args.ranks:
        sys.exit("--pairs must be divisible by --ranks")
    print(f"LoRA r={args.lora_r} DPO, SmolLM2-135M width, {args.layers} layers, {args.seq} tokens per sequence, "
          f"global batch {args.pairs} pairs, 1 OpenMP thread per rank")
    res = {n: launch(n, args) for n in (1, args.ranks)}
    for n, r in res.items():
        print(f"N={n}: {1.0 / r['step_s']:.3f} steps/s ({r['step_s']:.3f} s/step), collectives "
              f"{100 * r['comm_share']:.2f}% of a step ({1e3 * r['comm_s']:.2f} ms, waiting for the slower rank "
              f"included), threads {r['threads']}")
        for name, a in r["allreduce_alone"].items():
            print(f"    one allreduce alone, {name} ({a['values']:,} floats, {a['values'] * 4 / 1e6:.1f} MB): "
                  f"{1e3 * a['seconds']:.2f} ms")
    n = args.ranks
    speedup = res[1]["step_s"] / res[n]["step_s"]
    print(f"ratio N={n}/N=1 steps/s: {speedup:.2f} (ideal {n}.00; parallel efficiency {100 * speedup / n:.0f}%)")


if __name__ == "__main__":
    main()
