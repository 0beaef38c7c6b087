"""Data parallelism over MPI (cst/distributed.py): `mpirun -n 2` against one process at the same global
batch (losses, gradient norms, a mean-residual check that a dropped accumulation step fails, final
weights), `mpirun -n 1` bitwise equal to no MPI, uneven last batches, accumulation, resume, errors on one
rank (agreed TrainingError; any other exception aborts every rank, the checkpoint intact), evaluation,
synthesis and `mpirun -n 2 cst train`. Every launch is a subprocess with a timeout, so a hang fails."""
import json
import os
import pickle
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

import mpi_worker as W
from test_cli import tiny  # noqa: F401  (the fixture: a tiny random Llama with a byte-level tokenizer)
from cst import distributed
from cst.trainer import Trainer, load_checkpoint_into


def ckpt_weights(ckpt):
    """A checkpoint's trainable values as one flat float64 vector: weights.npy (full fine-tuning) or the
    LoRA adapters of adapter_model.safetensors (their one copy), tensors in name order."""
    ckpt = str(ckpt)
    if os.path.isfile(os.path.join(ckpt, "weights.npy")):
        return np.load(os.path.join(ckpt, "weights.npy")).astype(np.float64)
    from safetensors.numpy import load_file
    t = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    return np.concatenate([t[k].astype(np.float64).ravel() for k in sorted(t)])

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MPIRUN = next((p for p in (os.path.join(os.path.dirname(sys.executable), "mpirun"), shutil.which("mpirun"))
               if p and os.path.exists(p)), None)
try:
    import mpi4py  # noqa: F401
    HAVE_MPI4PY = True
except ImportError:
    HAVE_MPI4PY = False
needs_mpi = pytest.mark.skipif(MPIRUN is None or not HAVE_MPI4PY,
                               reason="needs mpi4py and mpirun: pip install -e '.[mpi]' (the test extra has them)")


def mpi_test(f):
    return pytest.mark.slow(needs_mpi(f))


# TRL's invariant tolerances for a distributed run against one process.
LOSS_TOL, GRAD_TOL, WEIGHT_TOL = 1e-4, 1e-2, 1e-5
# Signed residuals averaged over the steps: one-sided drift (each step within LOSS_TOL, all of one sign).
MEAN_LOSS_TOL, MEAN_GRAD_TOL = 1e-5, 1e-3


def mpi_env():
    env = dict(os.environ, OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1", OMP_NUM_THREADS="1",
               PRTE_MCA_rmaps_default_mapping_policy=":oversubscribe", TQDM_DISABLE="1",
               PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    env.pop("CST_MPI", None)
    return env


def mpirun(n, args, timeout=120, check=True):
    t0 = time.perf_counter()
    p = subprocess.run([MPIRUN, "-n", str(n), sys.executable, *args], env=mpi_env(), capture_output=True, text=True,
                       timeout=timeout, cwd=ROOT)
    if check and p.returncode != 0:
        raise AssertionError(f"mpirun -n {n} failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}")
    return p, time.perf_counter() - t0


def launch(n, out, names, **kw):
    p, _ = mpirun(n, [os.path.join(ROOT, "tests", "mpi_worker.py"), str(out), *names], **kw)
    with open(os.path.join(out, "results.pkl"), "rb") as f:
        return pickle.load(f)


def launch_failing(out, name):
    """Runs a scenario that must fail on 2 ranks; returns stderr (a hang fails by the timeout)."""
    p, _ = mpirun(2, [os.path.join(ROOT, "tests", "mpi_worker.py"), str(out), name], timeout=90, check=False)
    assert p.returncode != 0 and not os.path.exists(os.path.join(out, "results.pkl"))
    return p.stderr


def equivalence_failures(ref, got):
    """The checks a distributed run must pass against one process; returns the names of those failed."""
    if len(ref["loss"]) != len(got["loss"]):
        return ["steps"]
    dl, dg = got["loss"] - ref["loss"], got["grad_norm"] - ref["grad_norm"]
    out = []
    if np.max(np.abs(dl)) > LOSS_TOL:
        out.append("loss")
    if np.max(np.abs(dg)) > GRAD_TOL:
        out.append("grad_norm")
    if abs(np.mean(dl)) > MEAN_LOSS_TOL or abs(np.mean(dg)) > MEAN_GRAD_TOL:
        out.append("mean_residual")
    rel = np.linalg.norm(got["params"] - ref["params"]) / np.linalg.norm(ref["params"])
    if not rel <= WEIGHT_TOL:
        out.append("weights")
    return out


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """One `mpirun -n 2` launch for every scenario (startup dominates on 2 cores)."""
    out = tmp_path_factory.mktemp("mpi2")
    res = launch(2, out, ["dpo_lora", "dpo_lora_broken", "dpo_uneven", "sft_full", "resume", "nan_on_rank",
                          "dropout", "evaluation", "synthesis"])
    res["out"] = out
    return res


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same scenarios in this process, without MPI (the reference)."""
    out = tmp_path_factory.mktemp("mpi1")
    assert distributed.world().size == 1 and distributed.world().comm is None
    res = {name: W.SCENARIOS[name](out) for name in ("dpo_lora", "dpo_uneven", "sft_full", "evaluation",
                                                      "synthesis")}
    res["out"] = out
    return res


@mpi_test
@pytest.mark.parametrize("name", ["dpo_lora", "dpo_uneven", "sft_full"])
def test_two_ranks_match_one_process(two, one, name):
    assert two["world"] == {"size": 2, "threads": 1, "mpi": True}
    ref, got = one[name], two[name]
    assert len(ref["loss"]) >= (20 if name == "dpo_lora" else 6)
    assert equivalence_failures(ref, got) == []
    assert got["step"] == ref["step"]
    # Trainer.evaluate, sharded over the ranks too.
    assert len(got["eval_loss"]) == len(ref["eval_loss"]) == {"dpo_lora": 4, "dpo_uneven": 0, "sft_full": 2}[name]
    assert np.max(np.abs(got["eval_loss"] - ref["eval_loss"]), initial=0.0) <= LOSS_TOL


@mpi_test
def test_checks_fail_a_dropped_accumulation_step(two, one):
    fails = equivalence_failures(one["dpo_lora"], two["dpo_lora_broken"])
    assert "mean_residual" in fails and "weights" in fails


def test_mean_residual_catches_one_sided_drift_within_the_step_tolerance():
    rng = np.random.default_rng(0)
    ref = {"loss": rng.random(24), "grad_norm": rng.random(24), "params": np.ones(8)}
    noise = {"loss": ref["loss"] + 5e-6 * rng.standard_normal(24), "grad_norm": ref["grad_norm"],
             "params": ref["params"]}
    drift = dict(noise, loss=ref["loss"] + 5e-5)  # every step within LOSS_TOL, all of one sign
    assert equivalence_failures(ref, noise) == []
    assert equivalence_failures(ref, drift) == ["mean_residual"]


@mpi_test
def test_resume_with_the_same_global_batch(two, one, tmp_path):
    r = two["resume"]
    assert r["b"]["step"] == 10 and np.array_equal(r["a"]["params"], r["b"]["params"])
    assert [h["loss"] for h in r["a"]["history"]] == [h["loss"] for h in r["b"]["history"]]
    # One process resumes the 2-rank checkpoint: the same global batch of 4 (4 x 1 rank = 2 x 2 ranks).
    tr = W._trainer(tmp_path, "resume_c", max_steps=10, save_steps=5, **W.LORA)
    tr.train(resume_from_checkpoint=r["checkpoint"])
    assert np.linalg.norm(tr._params - r["a"]["params"]) / np.linalg.norm(r["a"]["params"]) < WEIGHT_TOL
    cfg = W.config(tmp_path, "other", per_device_train_batch_size=2, max_steps=10, **W.LORA)
    with pytest.raises(ValueError, match="global batch of 4.*this run has 2"):
        Trainer(W.toy_model(1), cfg, W.varied_pairs(21, 5)).load_checkpoint(r["checkpoint"])


@mpi_test
def test_non_finite_loss_on_one_rank_stops_every_rank(two):
    r = two["nan_on_rank"]
    assert r["messages"][0] == r["messages"][1]
    assert r["messages"][0].startswith("rank 1: non-finite policy log-probs at step 3")
    ck = r["last_checkpoint"]
    assert os.path.basename(ck) == "checkpoint-3" and ckpt_weights(ck).size > 0


@mpi_test
def test_each_rank_draws_its_own_dropout_masks(two):
    a, b = two["dropout"]["masks"]
    assert a.shape == b.shape == (4, 8) and not np.array_equal(a, b)
    assert 0.2 < a.mean() < 0.8 and two["dropout"]["stream"] == (0,)


@mpi_test
def test_evaluation_and_synthesis_identical_to_one_process(two, one):
    assert two["evaluation"] == one["evaluation"]
    assert len(one["evaluation"]["responses"]) > 6  # several batches of 3
    assert two["synthesis"]["pairs"] == one["synthesis"]["pairs"] and one["synthesis"]["pairs"]
    assert two["synthesis"]["stats"] == one["synthesis"]["stats"]
    assert two["synthesis"]["log"] == one["synthesis"]["log"]  # rank 0 wrote every rank's samples, in order


@mpi_test
def test_one_rank_under_mpi_is_bitwise_equal_to_no_mpi(one, tmp_path):
    res = launch(1, tmp_path, ["dpo_lora", "sft_full", "evaluation", "synthesis"])
    assert res["world"]["mpi"] and res["world"]["size"] == 1
    def untimed(history):
        return [{k: v for k, v in h.items() if k != "tokens_per_s"} for h in history]
    for name in ("dpo_lora", "sft_full"):
        assert np.array_equal(res[name]["params"], one[name]["params"])
        assert untimed(res[name]["history"]) == untimed(one[name]["history"])
    assert res["evaluation"] == one["evaluation"] and res["synthesis"]["log"] == one["synthesis"]["log"]


@mpi_test
def test_a_rank_that_raises_aborts_every_rank_and_keeps_the_checkpoint(tmp_path):
    err = launch_failing(tmp_path, "crash")
    assert "cst: rank 1 of 2 failed in Trainer.train: RuntimeError: injected failure on rank 1" in err
    run = tmp_path / "crash-n2"
    assert sorted(n for n in os.listdir(run) if n.startswith(("checkpoint-", ".tmp"))) == ["checkpoint-2"]
    # The checkpoint is whole and holds step 2 of the run (one process, same global batch, as reference).
    W.crash(str(tmp_path))
    ref = ckpt_weights(tmp_path / "crash-n1" / "checkpoint-2")
    got = ckpt_weights(run / "checkpoint-2")
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < WEIGHT_TOL
    info = load_checkpoint_into(W.toy_model(1), run, merge=True)
    assert info["step"] == 2


@mpi_test
def test_a_rank_failing_in_synthesis_aborts_every_rank(tmp_path):
    err = launch_failing(tmp_path, "synthesis_crash")
    assert "cst: rank 1 of 2 failed in synthesize: OSError: injected model failure on rank 1" in err
    lines = (tmp_path / "crash.jsonl").read_text().splitlines()
    # The header and round 1 (batches 0 and 1, 4 samples); round 2 failed on rank 1, so nothing of it.
    assert "synth_header" in json.loads(lines[0]) and [json.loads(x)["index"] for x in lines[1:]] == [0, 1, 2, 3]


@mpi_test
def test_cli_eval_and_synth_under_mpirun_match_one_process(tmp_path, tiny):
    """The real (tiny) model generating: greedy evaluation and sampled synthesis, 2 ranks against one process."""
    from cst import cli
    model = tiny
    harmful = tmp_path / "p.jsonl"
    harmful.write_text("".join(json.dumps({"prompt": f"How do I do bad thing {i}?", "category": "c"}) + "\n"
                               for i in range(3)))
    plain = tmp_path / "p.txt"
    plain.write_text("".join(f"Tell me a secret number {i}.\n" for i in range(5)))

    def argv(tag):
        return (["eval", "-m", model, "--prompts", str(harmful), "--benign", "none", "--max-new-tokens", "4",
                 "--batch-size", "3", "--n-boot", "20", "-o", str(tmp_path / f"ev{tag}")],
                ["data", "synth", "--model", model, "--prompts", str(plain), "--output", str(tmp_path / f"s{tag}.jsonl"),
                 "--max-new-tokens", "4", "--batch-size", "2", "--temperature", "0.9", "--n-per-prompt", "2",
                 "--seed", "3"])
    code = f"import sys; from cst import cli; sys.exit(max(cli.main(a) for a in {argv(2)!r}))"
    mpirun(2, ["-c", code])
    assert all(cli.main(a) == 0 for a in argv(1))
    r1, r2 = (json.load(open(tmp_path / f"ev{t}" / "report.json")) for t in (1, 2))
    assert r1["configurability"]["responses"] == r2["configurability"]["responses"]
    assert len(r1["configurability"]["responses"]) > 3  # several batches of 3, so both ranks generated
    assert (tmp_path / "s1.jsonl").read_text() == (tmp_path / "s2.jsonl").read_text()


@mpi_test
def test_cli_train_under_mpirun_matches_one_process(tmp_path, tiny):
    """`mpirun -n 2 python -m cst train --batch-size 1` against `cst train --batch-size 2` in one process."""
    from cst import cli
    model = tiny
    data = tmp_path / "records.jsonl"
    data.write_text("".join(json.dumps({"system": s, "prompt": f"Question {i}?", "chosen": c, "rejected": r}) + "\n"
                            for i in range(5) for s, c, r in (("Be safe.", "No.", "Sure, here."),
                                                              ("No limits.", "Sure, here.", "No."))))
    flags = ["train", "--model", model, "--data", str(data), "--max-steps", "4", "--lora-r", "2", "--lr", "1e-2",
             "--grad-accum", "2", "--max-length", "128", "--max-prompt-length", "96", "--logging-steps", "1"]
    p, _ = mpirun(2, ["-m", "cst", *flags, "--batch-size", "1", "--output-dir", str(tmp_path / "n2")])
    assert p.stdout.count("step 4/4") == 1  # rank 0 alone prints the summary
    assert cli.main([*flags, "--batch-size", "2", "--output-dir", str(tmp_path / "n1")]) == 0

    def rows(run):
        with open(tmp_path / run / "metrics.jsonl") as f:
            return [json.loads(line) for line in f]
    a, b = rows("n1"), rows("n2")
    assert len(a) == len(b) == 4
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) <= LOSS_TOL
    wa = ckpt_weights(tmp_path / "n1" / "checkpoint-4")
    wb = ckpt_weights(tmp_path / "n2" / "checkpoint-4")
    assert np.linalg.norm(wa - wb) / np.linalg.norm(wa) < WEIGHT_TOL
    state = json.load(open(tmp_path / "n2" / "checkpoint-4" / "trainer_state.json"))
    assert state["world_size"] == 2 and os.path.isfile(tmp_path / "n2" / "run.json")


# ---- without MPI ----

def test_importing_cst_does_not_import_mpi4py():
    code = ("import sys, cst, cst.trainer, cst.eval, cst.synth, cst.cli, cst.distributed as d; "
            "w = d.world(); assert (w.size, w.rank, w.comm) == (1, 0, None); assert 'mpi4py' not in sys.modules")
    env = {k: v for k, v in mpi_env().items() if k not in distributed._LAUNCH_VARS}
    subprocess.run([sys.executable, "-c", code], env=env, check=True, timeout=60, cwd=ROOT)


def test_launched_without_mpi4py_is_a_clear_error():
    code = ("import sys; sys.modules['mpi4py'] = None; import cst.distributed as d\n"
            "try:\n    d.world()\nexcept d.DistributedError as e:\n    print(e)")
    env = dict(mpi_env(), OMPI_COMM_WORLD_SIZE="2")
    p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "started by an MPI launcher (2 ranks) but mpi4py is not installed" in p.stdout


class _Local:
    def __init__(self, sets):
        self.sets = sets

    def allgather(self, mine):
        assert mine in self.sets
        return self.sets


@pytest.mark.parametrize("mine,sets,threads", [
    (range(16), [range(16)] * 2, 8),                       # --bind-to none: 2 ranks share 16 cores
    (range(8), [range(8), range(8, 16)], 8),               # bound to a socket each
    ([3], [[k] for k in range(16)], 1),                     # bound to a core each (mpirun's default for -n <= 2)
    (range(16), [range(16)] * 32, 1),                       # more ranks than cores: never 0
])
def test_threads_per_rank_split_the_cores_a_rank_shares(monkeypatch, mine, sets, threads):
    w = distributed.World()
    w.comm, w._local = object(), _Local([list(s) for s in sets])
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(mine))
    assert w.thread_count() == threads
