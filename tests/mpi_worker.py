"""Scenarios of tests/test_mpi.py: each trains, evaluates or synthesises on the toy model of
test_trainer.py at a fixed GLOBAL batch, so that the same function run in one process (the
reference) and under `mpirun -n N python tests/mpi_worker.py OUT NAME...` (every rank its share)
must agree. Run as a script, rank 0 pickles {name: result} into OUT/results.pkl."""
import os
import pickle
import sys
from pathlib import Path

import numpy as np

os.environ.setdefault("TQDM_DISABLE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from cst import distributed  # noqa: E402
from cst.trainer import Trainer, TrainingError  # noqa: E402
from test_trainer import config, toy_model, varied_pairs  # noqa: E402

GLOBAL_BATCH = 4
LORA = dict(lora_r=4, lora_alpha=8.0, lora_dropout=0.0)
# 21 examples in micro-batches of 4: the sixth of each epoch holds 1 example (nothing on rank 1).
DATA = dict(n=21, seed=5)


def _trainer(out, name, mode="dpo", data=DATA, eval_data=None, **kw):
    world = distributed.world()
    kw.setdefault("gradient_accumulation_steps", 2)
    kw.setdefault("save_total_limit", None)  # the tests compare checkpoints of earlier steps
    cfg = config(Path(out), f"{name}-n{world.size}", per_device_train_batch_size=GLOBAL_BATCH // world.size,
                 logging_steps=1, mode=mode, **kw)
    return Trainer(toy_model(1), cfg, varied_pairs(data["n"], data["seed"]),
                   eval_dataset=varied_pairs(eval_data["n"], eval_data["seed"]) if eval_data else None)


def _record(tr):
    return {"loss": np.array([h["loss"] for h in tr.history]),
            "grad_norm": np.array([h["grad_norm"] for h in tr.history]),
            "eval_loss": np.array([h["eval_loss"] for h in tr.history if "eval_loss" in h]),
            "params": tr._params.copy(), "step": tr.step, "history": tr.history}


def dpo_lora(out):
    """LoRA DPO, 24 steps of 2 micro-batches of 4 over 4+ epochs (each with a batch of 1), evaluated
    on 7 held-out pairs every 6 steps (batches of 2 per rank: uneven too)."""
    tr = _trainer(out, "dpo_lora", max_steps=24, save_steps=2, eval_data=dict(n=7, seed=9), eval_steps=6, **LORA)
    tr.train()
    return _record(tr)


def dpo_lora_broken(out):
    """As dpo_lora, but rank 1 drops its last accumulation micro-batch of every step: a bug the
    equivalence check must catch (run only with 2 ranks)."""
    tr = _trainer(out, "broken", max_steps=24, **LORA)
    if tr.dist.rank == 1:
        take = tr._next_micro_batches
        tr._next_micro_batches = lambda: take()[:-1]
    tr.train()
    return _record(tr)


def dpo_uneven(out):
    """No accumulation: every sixth step is one example, so rank 1 has no work and sends zeros."""
    tr = _trainer(out, "uneven", max_steps=12, gradient_accumulation_steps=1, **LORA)
    tr.train()
    return _record(tr)


def sft_full(out):
    """Full fine-tuning (every weight allreduced), SFT: micro-batches weighted by completion tokens."""
    tr = _trainer(out, "sft_full", mode="sft", max_steps=6, data=dict(n=10, seed=3), eval_data=dict(n=5, seed=4),
                  eval_steps=3)
    tr.train()
    return _record(tr)


def resume(out):
    """10 steps straight, and 5 then a resume from checkpoint-5 of the first run: bitwise the same."""
    a = _trainer(out, "resume_a", max_steps=10, save_steps=5, **LORA)
    a.train()
    b = _trainer(out, "resume_b", max_steps=10, save_steps=5, **LORA)
    b.train(resume_from_checkpoint=os.path.join(a.config.output_dir, "checkpoint-5"))
    return {"a": _record(a), "b": _record(b), "checkpoint": os.path.join(a.config.output_dir, "checkpoint-5")}


def nan_on_rank(out):
    """Rank `size - 1` sees non-finite log-probs at step 3: every rank raises TrainingError."""
    tr = _trainer(out, "nan", max_steps=6, save_steps=2, **LORA)
    if tr.dist.rank == tr.dist.size - 1:
        fwd = tr.model.forward_logprobs

        def poisoned(*a, **k):
            tlp = fwd(*a, **k)
            if tr.step == 3:
                tlp[...] = np.nan
            return tlp
        tr.model.forward_logprobs = poisoned
    try:
        tr.train()
        msg = None
    except TrainingError as e:
        msg = str(e)
    return {"messages": tr.dist.allgather(msg), "step": tr.step, "last_checkpoint": tr.last_checkpoint}


def crash(out):
    """Rank 1 raises an ordinary exception during step 3 (after checkpoint-2): the run must abort."""
    tr = _trainer(out, "crash", max_steps=8, save_steps=2, **LORA)
    if tr.dist.rank == 1:
        step = tr._micro_step

        def failing(batch, weight):
            if tr.step == 2:
                raise RuntimeError("injected failure on rank 1")
            return step(batch, weight)
        tr._micro_step = failing
    tr.train()
    return {"finished": True}


def dropout(out):
    """LoRA dropout under data parallelism: each rank its own masks (the rank enters their seed)."""
    tr = _trainer(out, "dropout", max_steps=2, **dict(LORA, lora_dropout=0.5))
    tr.train()
    return {"masks": tr.dist.allgather(tr.lora._keep(tr.lora._sites[0], 1, (4, 8))), "stream": tr.lora.stream}


def evaluation(out):
    """Configurability with sampling (temperature 0.7) on the fake chat model, batches of 3."""
    import cst.eval as E
    from cst import data as D
    from cst import prompts as P
    from fakes import FakeChatModel, FakeJudge
    rep = E.configurability(FakeChatModel(), P.default_prompts(split="test", kind="harmful")[:7],
                            D.PAPER_CONFIGURATIONS, FakeJudge(), batch_size=3, temperature=0.7, seed=4,
                            n_boot=100, progress=False)
    return rep.to_dict()


def synthesis(out):
    """Synthesis with sampling, 2 samples per prompt, batches of 3, a judge: pairs, stats and the log."""
    from cst import synth as S
    from fakes import FakeChatModel, FakeJudge
    prompts = [f"How do I do bad thing {i}?" for i in range(6)] + ["[same] Pick a lock?", "[empty-rev] X?"]
    path = Path(out) / f"synth-n{distributed.world().size}.jsonl"
    res = S.synthesize(FakeChatModel(), prompts, output=path, n_per_prompt=2, batch_size=3, temperature=0.7,
                       seed=2, judge=FakeJudge(), progress=False, resume=False)
    return {"pairs": [p.__dict__ for p in res.pairs], "stats": res.stats, "log": path.read_text()}


def synthesis_crash(out):
    """Rank 1's model fails in its second batch: the run must abort, the log holding whole lines only."""
    from cst import synth as S
    from fakes import FakeChatModel
    model = FakeChatModel(fail_after=4 if distributed.world().rank == 1 else None)
    model.chat = _raising(model.chat)
    S.synthesize(model, [f"How do I do bad thing {i}?" for i in range(8)], output=Path(out) / "crash.jsonl",
                 batch_size=2, progress=False, resume=False)
    return {"finished": True}


def _raising(chat):
    def run(*a, **k):
        try:
            return chat(*a, **k)
        except KeyboardInterrupt:  # the fake's crash; an ordinary exception here
            raise OSError("injected model failure on rank 1") from None
    return run


SCENARIOS = {f.__name__: f for f in (dpo_lora, dpo_lora_broken, dpo_uneven, sft_full, resume, nan_on_rank,
                                     crash, dropout, evaluation, synthesis, synthesis_crash)}

if __name__ == "__main__":
    out, names = sys.argv[1], sys.argv[2:]
    results = {name: SCENARIOS[name](out) for name in names}
    world = distributed.world()
    results["world"] = {"size": world.size, "threads": __import__("cst.runtime").runtime.get_num_threads(),
                        "mpi": world.comm is not None}
    if world.rank == 0:
        with open(os.path.join(out, "results.pkl"), "wb") as f:
            pickle.dump(results, f)
