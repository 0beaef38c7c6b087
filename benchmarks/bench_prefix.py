"""Shared prompt prefix against two rows per pair: the DPO micro-batch step the Trainer runs (collate,
forward_logprobs, sigmoid DPO loss, backward_logprobs; LoRA r=16 on all seven projections of a
random-weight SmolLM2-135M-shaped model), with DPOConfig(share_prompt=True) and False, in one process.
Each side runs `--runs` times, interleaved (unshared, shared, unshared, ...), each run one warm-up
step then `--steps` timed ones; prints min and median s/step per side, in wall time and in the
process's CPU time (all threads; less sensitive to other processes on a loaded machine), and a final
`ratio` line (unshared / shared medians). Shapes: "demo" is the demo's recipe (4 pairs, max_length 80, prompts
of --demo-prompt tokens, completions filling the rest), "smollm2" the shape of bench_dpo.py (4 pairs x
256 tokens, 64 of them prompt). The optimizer step (the same on both sides) is not timed.

    PYTHONPATH=. python3 benchmarks/bench_prefix.py [--shape demo|smollm2|both] [--threads 2]
                                                    [--runs 3] [--steps 3] [--demo-prompt 56]
"""
import argparse
import os
import statistics
import time

SMOLLM2 = dict(vocab_size=49152, dim=576, n_layers=30, n_heads=9, n_kv_heads=3, ffn_dim=1536,
               max_seq_len=8192, rope_theta=100000.0, norm_eps=1e-5, tie_embeddings=True)


def pairs(P, prompt, completion, V, seed=0):
    import numpy as np
    rng = np.random.default_rng(seed)
    return [{"prompt_ids": rng.integers(0, V, prompt).tolist(),
             "chosen_ids": rng.integers(0, V, completion).tolist(),
             "rejected_ids": rng.integers(0, V, completion).tolist()} for _ in range(P)]


def step(model, examples, share):
    """One micro-batch as Trainer._micro_step runs it (references fixed at 0; their value is not timed)."""
    import numpy as np
    from cst import losses
    from cst.data import collate
    b = collate(examples, share_prompt=share)
    P = len(examples)
    tlp = model.forward_logprobs(b.tokens, b.targets, b.lengths, b.skip)
    if share:
        tlp = np.concatenate([tlp, tlp])
    lp = losses.sequence_logps(tlp, b.mask)
    out = losses.dpo_loss(lp[:P], lp[P:], np.zeros(P), np.zeros(P), beta=0.1)
    d = losses.sequence_logps_backward(np.concatenate([out.grad_chosen, out.grad_rejected]), b.mask)
    if share:
        d = np.ascontiguousarray(d[:P] + d[P:])
    model.backward_logprobs(d)
    return lp


def bench(name, P, prompt, completion, runs, steps):
    import numpy as np
    import cst
    from cst.lora import LoRA
    m = cst.Model(cst.ModelConfig(**SMOLLM2), seed=0)
    LoRA(m, r=16, alpha=32.0, seed=1).attach()
    ex = pairs(P, prompt, completion, SMOLLM2["vocab_size"])
    lp0, lp1 = step(m, ex, False), step(m, ex, True)  # the two agree (tests/test_shared_prompt.py)
    print(f"{name}: {P} pairs, prompt {prompt} + completions {completion} tokens (trunk tokens per pair "
          f"{2 * (prompt + completion)} unshared, {prompt + 2 * completion} shared); "
          f"max |logp shared - unshared| = {float(np.abs(lp1 - lp0).max()):.2e}", flush=True)
    wall, cpu = {False: [], True: []}, {False: [], True: []}
    for r in range(runs):
        for share in (False, True):
            step(m, ex, share)  # warm-up: arena sized for this side
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(steps):
                step(m, ex, share)
            wall[share].append((time.perf_counter() - t0) / steps)
            cpu[share].append((time.process_time() - c0) / steps)
            print(f"  run {r + 1} {'shared  ' if share else 'unshared'} {wall[share][-1]:.3f} s/step wall, "
                  f"{cpu[share][-1]:.3f} s/step CPU, load {os.getloadavg()[0]:.1f}", flush=True)
    med = {}
    for share in (False, True):
        w, c = wall[share], cpu[share]
        med[share] = statistics.median(w), statistics.median(c)
        print(f"{name} {'shared  ' if share else 'unshared'}: wall min {min(w):.3f} median {med[share][0]:.3f}, "
              f"CPU min {min(c):.3f} median {med[share][1]:.3f} s/step")
    del m
    return med[False][0] / med[True][0], med[False][1] / med[True][1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=("demo", "smollm2", "both"), default="both")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--demo-prompt", type=int, default=56)
    a = ap.parse_args()
    import cst
    cst.set_num_threads(a.threads)
    print(f"cst {cst.__file__}, {a.threads} threads, load average {os.getloadavg()[0]:.2f} at start")
    ratios = []
    if a.shape in ("demo", "both"):
        ratios.append(("demo", bench("demo", 4, a.demo_prompt, 80 - a.demo_prompt, a.runs, a.steps)))
    if a.shape in ("smollm2", "both"):
        ratios.append(("smollm2", bench("smollm2", 4, 64, 192, a.runs, a.steps)))
    print(f"load average {os.getloadavg()[0]:.2f} at end")
    print("ratio " + ", ".join(f"{n} {w:.2f}x wall {c:.2f}x CPU" for n, (w, c) in ratios)
          + " (unshared / shared median s/step)")


if __name__ == "__main__":
    main()
