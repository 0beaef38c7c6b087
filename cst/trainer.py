"""The CST/DPO training loop: reference log-probs once, packed chosen+rejected batches, AdamW with
clipping and a schedule, atomic checkpoints that resume bitwise, Ctrl-C and non-finite stops.
The math is in cst._core (through Model, LoRA, losses, optim); this module only sequences it."""
import hashlib
import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass

import numpy as np

from . import losses
from .lora import LoRA
from .optim import AdamW, clip_grad_norm
from .runtime import set_num_threads
from .schedule import lr_at, resolve_total_steps, resolve_warmup
from .training_config import DPOConfig


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


@dataclass
class _Batch:
    tokens: np.ndarray  # (S, T) int32: the P chosen sequences, then the P rejected ones (DPO)
    targets: np.ndarray  # (S, T) int32: next token on completion positions, -1 elsewhere
    lengths: np.ndarray  # (S,) int32
    mask: np.ndarray  # (S, T) float32: 1 where targets >= 0
    index: np.ndarray  # (P,) example indices
    n_tokens: int  # real (non-pad) tokens in the batch


def _pack(seqs, prompt_lens):
    """Right-padded (tokens, targets, lengths, mask) for sequences whose completion starts at prompt_lens."""
    S, T = len(seqs), max(len(s) for s in seqs)
    tokens = np.zeros((S, T), np.int32)
    targets = np.full((S, T), -1, np.int32)
    lengths = np.empty(S, np.int32)
    for b, (s, p) in enumerate(zip(seqs, prompt_lens)):
        n = len(s)
        tokens[b, :n] = s
        lengths[b] = n
        # Position t predicts token t+1; only completion tokens (index >= p) are scored.
        targets[b, p - 1:n - 1] = s[p:]
    return tokens, targets, lengths, (targets >= 0).astype(np.float32)


def _ex_ids(ex, which):
    get = ex.get if isinstance(ex, dict) else (lambda k: getattr(ex, k))
    return list(get(which))


def _fingerprint(*arrays):
    h = hashlib.blake2b(digest_size=16)
    for a in arrays:
        a = np.ascontiguousarray(a)
        h.update(str((a.dtype, a.shape)).encode())
        h.update(memoryview(a).cast("B"))
    return h.hexdigest()


def _atomic_json(path, obj):
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=1)
    os.replace(tmp, path)


class Trainer:
    """Trains `model` on preference examples with `config` (a cst.DPOConfig).

    train_dataset / eval_dataset: tokenised examples (cst.data.TokenizedExample or dicts with
    prompt_ids, chosen_ids, rejected_ids), or preference records, which are tokenised with the
    model's tokenizer (or `tokenizer=`). LoRA is used when config.lora_r is set (adapters are
    created here and exposed as `trainer.lora`), full fine-tuning otherwise."""

    def __init__(self, model, config=None, train_dataset=None, eval_dataset=None, tokenizer=None, lora=None):
        self.config = config = config if config is not None else DPOConfig()
        if not isinstance(config, DPOConfig):
            raise TypeError(f"Trainer: config must be a cst.DPOConfig, got {type(config).__name__}")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("Trainer: train_dataset is empty")
        self.model = model
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.train_examples, self.train_stats = self._examples(train_dataset, "train_dataset")
        self.eval_examples, self.eval_stats = (self._examples(eval_dataset, "eval_dataset")
                                               if eval_dataset is not None and len(eval_dataset) else ([], None))
        if not self.train_examples:
            raise ValueError("Trainer: no usable training example after tokenisation "
                             f"(stats: {self.train_stats})")
        if config.num_threads:
            set_num_threads(int(config.num_threads))
        if config.lora_r is not None:
            self.lora = lora if lora is not None else LoRA(
                model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                target_modules=config.lora_target_modules, seed=config.seed)
            self.lora.attach()
            self._params, self._grads = self.lora.flat_params, self.lora.flat_grads
        else:
            self.lora = None
            model.adapter = None
            model.frozen_base = False
            model.zero_grad()
            self._params, self._grads = model.flat_params, model.flat_grads
        self.optimizer = AdamW(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self.total_steps = resolve_total_steps(config, len(self.train_examples))
        self.warmup_steps = resolve_warmup(config, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.cursor = 0  # micro-batches of the current epoch already consumed
        self.history = []
        self._ref = None
        self._eval_ref = None
        self._epoch_batches = None
        self.last_checkpoint = None

    # ---- data ----

    def _examples(self, dataset, name):
        first = dataset[0]
        has_ids = (isinstance(first, dict) and "prompt_ids" in first) or hasattr(first, "prompt_ids")
        if has_ids:
            return list(dataset), None
        from .data import PreferenceRecord, load_records, tokenize_dataset
        if self.tokenizer is None:
            raise ValueError(f"Trainer: {name} holds records, but the model has no tokenizer; pass tokenizer=")
        records = dataset if isinstance(first, PreferenceRecord) else load_records(list(dataset))
        examples, stats = tokenize_dataset(records, self.tokenizer, self.config.max_length,
                                           self.config.max_prompt_length)
        if stats["skipped"]:
            print(f"Trainer: {name}: skipped {stats['skipped']} record(s) whose prompt alone exceeds "
                  f"max_length={self.config.max_length}; first: {stats['first_skipped']}")
        return examples, stats

    def _batches(self, epoch):
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self._make_batches(epoch))
        return self._epoch_batches[1]

    def _make_batches(self, epoch):
        """Micro-batches of example indices for one epoch: a seeded permutation, then sorted by length
        inside windows of 16 batches so that padding stays small while the order stays random."""
        cfg, n = self.config, len(self.train_examples)
        bs = cfg.per_device_train_batch_size
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(n)
        window = bs * 16
        out = []
        for w0 in range(0, n, window):
            chunk = order[w0:w0 + window]
            lens = np.array([self._length(i) for i in chunk])
            chunk = chunk[np.argsort(-lens, kind="stable")]
            out += [chunk[i:i + bs] for i in range(0, len(chunk), bs)]
        perm = rng.permutation(len(out))
        return [out[i] for i in perm]

    def _length(self, i):
        ex = self.train_examples[i]
        return len(_ex_ids(ex, "prompt_ids")) + max(len(_ex_ids(ex, "chosen_ids")), len(_ex_ids(ex, "rejected_ids")))

    def _collate(self, examples, idx, sft=False):
        seqs, plens = [], []
        sides = ("chosen_ids",) if sft else ("chosen_ids", "rejected_ids")
        for side in sides:
            for i in idx:
                ex = examples[i]
                p = _ex_ids(ex, "prompt_ids")
                seqs.append(p + _ex_ids(ex, side))
                plens.append(len(p))
        tokens, targets, lengths, mask = _pack(seqs, plens)
        return _Batch(tokens, targets, lengths, mask, np.asarray(idx), int(lengths.sum()))

    # ---- reference log-probs ----

    def _seq_logps(self, batch):
        avg = losses.uses_average_logps(self.config.loss_type)
        tlp = self.model.forward_logprobs(batch.tokens, batch.targets, batch.lengths)
        return tlp, losses.sequence_logps(tlp, batch.mask, average=avg)

    def _reference(self, examples, tag):
        """(n, 2) float64 reference log-probs of (chosen, rejected), computed once with the frozen
        reference (adapters off, or the initial weights) and cached in output_dir."""
        if self.config.mode == "sft" or not examples:
            return None
        ids = np.concatenate([np.asarray(_ex_ids(e, k), np.int64) for e in examples
                              for k in ("prompt_ids", "chosen_ids", "rejected_ids")] +
                             [np.asarray([len(_ex_ids(e, k)) for e in examples for k in
                                          ("prompt_ids", "chosen_ids", "rejected_ids")], np.int64)])
        base = self.model.flat_params
        key = _fingerprint(ids, base) + f"-{self.config.loss_type}-{self.config.max_length}"
        path = os.path.join(self.config.output_dir, f"ref_logps_{tag}.npz")
        if os.path.exists(path):
            with np.load(path) as z:
                if str(z["key"]) == key:
                    return z["ref"]
        was = None
        if self.lora is not None:
            was, self.lora.enabled = self.lora.enabled, False
        ref = np.empty((len(examples), 2), np.float64)
        try:
            bs = max(1, self.config.per_device_train_batch_size)
            for s in range(0, len(examples), bs):
                idx = np.arange(s, min(s + bs, len(examples)))
                _, lp = self._seq_logps(self._collate(examples, idx))
                ref[idx, 0], ref[idx, 1] = lp[:len(idx)], lp[len(idx):]
        finally:
            if was is not None:
                self.lora.enabled = was
        os.makedirs(self.config.output_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.config.output_dir, prefix=".tmp-", suffix=".npz")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, ref=ref, key=np.array(key))
        os.replace(tmp, path)
        return ref

    # ---- one micro-batch ----

    def _micro_step(self, batch, scale):
        """Forward, loss, backward for one micro-batch; gradients (times `scale`) are added."""
        cfg = self.config
        if self.lora is not None:
            self.lora.new_step()
        tlp, lp = self._seq_logps(batch) if cfg.mode == "dpo" else (None, None)
        if cfg.mode == "sft":
            tlp = self.model.forward_logprobs(batch.tokens, batch.targets, batch.lengths)
            loss, dtlp = losses.sft_loss(tlp, batch.mask)
            dtlp *= np.float32(scale)
            if not math.isfinite(loss):
                raise TrainingError(f"non-finite SFT loss {loss} at step {self.step}")
            self.model.backward_logprobs(dtlp)
            return {"loss": loss}
        P = len(batch.index)
        ref = self._ref[batch.index]
        out = losses.dpo_loss(lp[:P], lp[P:], ref[:, 0], ref[:, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=cfg.label_smoothing)
        if not math.isfinite(out.loss):
            raise TrainingError(f"non-finite DPO loss {out.loss} at step {self.step}")
        dseq = np.concatenate([out.grad_chosen, out.grad_rejected]) * scale
        dtlp = losses.sequence_logps_backward(dseq, batch.mask, average=losses.uses_average_logps(cfg.loss_type))
        self.model.backward_logprobs(dtlp)
        return {"loss": out.loss, "rewards/chosen": float(out.chosen_rewards.mean()),
                "rewards/rejected": float(out.rejected_rewards.mean()),
                "rewards/accuracies": float(out.accuracies.mean()), "rewards/margins": float(out.margins.mean()),
                "logps/chosen": float(lp[:P].mean()), "logps/rejected": float(lp[P:].mean())}

    # ---- evaluation ----

    def evaluate(self):
        """DPO (or SFT) metrics on eval_dataset, with an eval_ prefix; no update, no dropout."""
        if not self.eval_examples:
            return {}
        cfg = self.config
        if self._eval_ref is None:
            self._eval_ref = self._reference(self.eval_examples, "eval")
        training = self.lora.training if self.lora is not None else None
        if self.lora is not None:
            self.lora.training = False
        sums, n = {}, 0
        try:
            bs = max(1, cfg.per_device_train_batch_size)
            for s in range(0, len(self.eval_examples), bs):
                idx = np.arange(s, min(s + bs, len(self.eval_examples)))
                if cfg.mode == "sft":
                    b = self._collate(self.eval_examples, idx, sft=True)
                    tlp = self.model.forward_logprobs(b.tokens, b.targets, b.lengths)
                    m = {"loss": losses.sft_loss(tlp, b.mask)[0]}
                else:
                    _, lp = self._seq_logps(self._collate(self.eval_examples, idx))
                    P, ref = len(idx), self._eval_ref[idx]
                    o = losses.dpo_loss(lp[:P], lp[P:], ref[:, 0], ref[:, 1], beta=cfg.beta,
                                        loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
                    m = {"loss": o.loss, "rewards/chosen": float(o.chosen_rewards.mean()),
                         "rewards/rejected": float(o.rejected_rewards.mean()),
                         "rewards/accuracies": float(o.accuracies.mean()),
                         "rewards/margins": float(o.margins.mean()),
                         "logps/chosen": float(lp[:P].mean()), "logps/rejected": float(lp[P:].mean())}
                for k, v in m.items():
                    sums[k] = sums.get(k, 0.0) + v * len(idx)
                n += len(idx)
        finally:
            if self.lora is not None:
                self.lora.training = training
        return {"eval_" + k: v / n for k, v in sums.items()}

    # ---- checkpoints ----

    def _state(self):
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor,
                "lora_calls": self.lora.calls if self.lora is not None else 0,
                "total_steps": self.total_steps, "config": self.config.to_dict(),
                "history": self.history, "kind": "lora" if self.lora is not None else "full"}

    def save_checkpoint(self, path=None):
        """Writes trainable weights, optimizer state, step, data position and RNG stream into a
        directory, atomically (a temp directory renamed into place). Returns its path."""
        path = path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
        try:
            np.save(os.path.join(tmp, "weights.npy"), self._params)
            opt = self.optimizer.state_dict()
            moments = {} if opt["m"] is None else {"m": opt["m"][0], "v": opt["v"][0]}
            np.savez(os.path.join(tmp, "optimizer.npz"), **moments)
            state = self._state()
            state["optimizer"] = {k: opt[k] for k in ("step", "lr", "betas", "eps", "weight_decay")}
            _atomic_json(os.path.join(tmp, "trainer_state.json"), state)
            if os.path.exists(path):
                old = path + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_checkpoint = path
        return path

    def _latest_checkpoint(self):
        d = self.config.output_dir
        if not os.path.isdir(d):
            return None
        steps = [int(n.split("-", 1)[1]) for n in os.listdir(d)
                 if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()]
        return os.path.join(d, f"checkpoint-{max(steps)}") if steps else None

    def load_checkpoint(self, path):
        for f in ("weights.npy", "optimizer.npz", "trainer_state.json"):
            if not os.path.exists(os.path.join(path, f)):
                raise ValueError(f"load_checkpoint: {path} is not a cst checkpoint (missing {f})")
        with open(os.path.join(path, "trainer_state.json")) as f:
            st = json.load(f)
        if st["kind"] != ("lora" if self.lora is not None else "full"):
            raise ValueError(f"load_checkpoint: {path} holds a {st['kind']} run, this trainer is not")
        w = np.load(os.path.join(path, "weights.npy"))
        if w.shape != self._params.shape:
            raise ValueError(f"load_checkpoint: weights in {path} have {w.size} values, expected {self._params.size}")
        self._params[...] = w
        opt = dict(st["optimizer"], betas=tuple(st["optimizer"]["betas"]))
        with np.load(os.path.join(path, "optimizer.npz")) as z:
            opt["m"] = [z["m"]] if "m" in z.files else None
            opt["v"] = [z["v"]] if "v" in z.files else None
        self.optimizer.load_state_dict(opt)
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        if self.lora is not None:
            self.lora.calls = st["lora_calls"]
        self.history = st["history"]

    # ---- the loop ----

    def train(self, resume_from_checkpoint=None):
        """Runs to total_steps and returns the history (a list of metric dicts). Ctrl-C saves a
        checkpoint of the last completed step and returns; a non-finite loss or gradient raises
        TrainingError after saving the last good state."""
        from tqdm.auto import tqdm

        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        if resume_from_checkpoint:
            path = self._latest_checkpoint() if resume_from_checkpoint is True else resume_from_checkpoint
            if path is None:
                raise ValueError(f"train: no checkpoint to resume from in {cfg.output_dir}")
            self.load_checkpoint(path)
        # Both references before any update: for full fine-tuning the reference is the initial weights.
        if self._ref is None:
            self._ref = self._reference(self.train_examples, "train")
        if self._eval_ref is None and self.eval_examples:
            self._eval_ref = self._reference(self.eval_examples, "eval")
        if self.lora is not None:
            self.lora.training = True
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        accum = cfg.gradient_accumulation_steps
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.mode.upper()} train", unit="step",
                   dynamic_ncols=True)
        self.interrupted = False
        window, t0, tokens = [], time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                start = (self.epoch, self.cursor)
                calls0 = self.lora.calls if self.lora is not None else 0
                if self.lora is not None:
                    self.lora.zero_grad()
                else:
                    self.model.zero_grad()
                parts = []
                try:
                    for _ in range(accum):
                        batches = self._batches(self.epoch)
                        if self.cursor >= len(batches):
                            self.epoch, self.cursor = self.epoch + 1, 0
                            batches = self._batches(self.epoch)
                        idx = batches[self.cursor]
                        self.cursor += 1
                        b = self._collate(self.train_examples, idx, sft=cfg.mode == "sft")
                        parts.append(self._micro_step(b, 1.0 / accum))
                        tokens += b.n_tokens
                except KeyboardInterrupt:
                    self.epoch, self.cursor = start  # the unfinished step is discarded
                    if self.lora is not None:
                        self.lora.calls = calls0
                    raise
                except TrainingError:
                    self.epoch, self.cursor = start
                    self.save_checkpoint()
                    raise
                scale, norm = 1.0, float(np.sqrt(np.sum(np.square(self._grads, dtype=np.float64))))
                if cfg.max_grad_norm is not None:
                    norm, scale = clip_grad_norm(self._grads, cfg.max_grad_norm)
                if not math.isfinite(norm):
                    self.epoch, self.cursor = start
                    self.save_checkpoint()
                    raise TrainingError(f"non-finite gradient norm at step {self.step}; the last good state "
                                        f"is saved in {self.last_checkpoint}")
                lr = lr_at(self.step, self.total_steps, cfg.learning_rate, cfg.lr_scheduler_type,
                           self.warmup_steps)
                self.optimizer.step(self._params, self._grads, lr=lr, grad_scale=scale)
                self.step += 1
                m = {k: float(np.mean([p[k] for p in parts])) for k in parts[0]}
                m.update(learning_rate=lr, grad_norm=norm)
                window.append(m)
                bar.update(1)
                dt = time.perf_counter() - t0
                bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{tokens / dt:.0f}" if dt > 0 else "-")
                last = self.step == self.total_steps
                if self.step % cfg.logging_steps == 0 or last:
                    dt = time.perf_counter() - t0
                    row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
                    row.update(step=self.step, epoch=self.epoch + self.cursor / max(1, len(self._batches(self.epoch))),
                               tokens_per_s=tokens / dt if dt > 0 else 0.0)
                    if cfg.eval_steps and (self.step % cfg.eval_steps == 0 or last):
                        row.update(self.evaluate())
                    self._log(row, metrics_path)
                    window, t0, tokens = [], time.perf_counter(), 0
                elif cfg.eval_steps and self.step % cfg.eval_steps == 0:
                    self._log({"step": self.step, **self.evaluate()}, metrics_path)
                if cfg.save_steps and self.step % cfg.save_steps == 0 and not last:
                    self.save_checkpoint()
            self.save_checkpoint()
        except KeyboardInterrupt:
            self.interrupted = True
            path = self.save_checkpoint()
            bar.write(f"Interrupted: saved {path} at step {self.step}")
        finally:
            bar.close()
        return self.history

    def _log(self, row, path):
        self.history.append(row)
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
