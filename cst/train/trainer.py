"""The CST/DPO training loop: reference log-probs once, packed chosen+rejected batches, AdamW with
clipping and a schedule, atomic checkpoints that resume bitwise, Ctrl-C and non-finite stops.
The math is in cst._core (through Model, LoRA, losses, optim); this module only sequences it."""
import hashlib
import json
import math
import os
import shutil
import signal
import tempfile
import threading
import time
import warnings

import numpy as np

from .. import _core
from ..core import distributed, losses
from ..core.lora import LoRA
from ..core.optim import AdamW, clip_grad_norm
from ..core.runtime import interactive, set_num_threads
from ..core.schedule import lr_at, resolve_total_steps, resolve_warmup
from .config import DPOConfig
from ..core.atomic import atomic_open, fsync_dir, fsync_tree, honour_umask, write_json, write_text
from ..data import collate


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or gradient); the last good checkpoint is kept."""


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


class _DeferInterrupt:
    """Holds Ctrl-C back while a step is being committed (optimizer update, counters, log,
    checkpoint), then raises it: a checkpoint never sees weights of step k+1 with the counters of
    step k. Only the main thread can own signal handlers; elsewhere this does nothing."""

    def __enter__(self):
        self.hit, self.old, self.installed = False, None, False
        if threading.current_thread() is threading.main_thread():
            try:
                self.old = signal.signal(signal.SIGINT, self._handler)
                self.installed = True
            except (ValueError, TypeError, OSError):
                self.old = None
        return self

    def _handler(self, signum, frame):
        self.hit = True

    def __exit__(self, exc_type, exc, tb):
        if self.old is not None:
            signal.signal(signal.SIGINT, self.old)
        elif self.installed:  # the previous handler was not set from Python: Python's default
            signal.signal(signal.SIGINT, signal.default_int_handler)
        if self.hit and exc_type is None:
            raise KeyboardInterrupt
        return False


def _finite(a):
    """True when every value of the flat float32 array is finite (one pass, no temporary)."""
    return math.isfinite(_core.sum_squares(a))


class Trainer:
    """Trains `model` on preference examples with `config` (a cst.DPOConfig).

    train_dataset / eval_dataset: tokenised examples (cst.data.TokenizedExample or dicts with
    prompt_ids, chosen_ids, rejected_ids), or preference records, which are tokenised with the
    model's tokenizer (or `tokenizer=`). LoRA is used when config.lora_r is set or `lora=` is given
    (adapters are created here and exposed as `trainer.lora`), full fine-tuning otherwise.

    Lengths: an example whose prompt alone has max_length tokens or more is skipped (counted in
    `train_stats`, the first one described, and a warning says so); otherwise, when prompt plus the
    longer completion exceed max_length, TRL's rule applies: the prompt keeps its last
    max_prompt_length tokens, then the completions their first (max_length - prompt) tokens.

    Gradient accumulation: the gradient of one step is that of the mean over every completion token
    (SFT) or every pair (DPO) of its micro-batches, whatever their sizes, so 2 micro-batches of 2
    give the step of 1 batch of 4 (like transformers >= 4.46 with num_items_in_batch, not the older
    equal weighting of micro-batches). A step never spans two epochs: the last one of an epoch may
    have fewer micro-batches (as the HF Trainer does)."""

    def __init__(self, model, config=None, train_dataset=None, eval_dataset=None, tokenizer=None, lora=None):
        from ..core.layout import check_trainable
        check_trainable(model, "Trainer")
        self.config = config = config if config is not None else DPOConfig()
        if not isinstance(config, DPOConfig):
            raise TypeError(f"Trainer: config must be a cst.DPOConfig, got {type(config).__name__}")
        if train_dataset is None or len(train_dataset) == 0:
            raise ValueError("Trainer: train_dataset is empty")
        if config.max_length > model.config.max_seq_len:
            raise ValueError(f"Trainer: config.max_length = {config.max_length} exceeds the model's "
                             f"max_seq_len = {model.config.max_seq_len}")
        if lora is not None and config.lora_r is not None and lora.r != config.lora_r:
            raise ValueError(f"Trainer: lora= has r={lora.r} but config.lora_r={config.lora_r}")
        if lora is not None and lora.model is not model:
            raise ValueError("Trainer: lora= was built for another model")
        if (config.bf16 or getattr(model, "dtype", "f32") == "bf16") and config.lora_r is None and lora is None:
            why = "config.bf16 = True" if config.bf16 else "this model's base is stored in bf16 (dtype='bf16')"
            raise ValueError(f"Trainer: {why} needs LoRA (config.lora_r or lora=): a bf16 base is frozen; full "
                             "fine-tuning trains float32 weights (load the model without dtype='bf16' and keep "
                             "bf16=False)")
        self.model = model
        self.dist = distributed.world()  # a world of one process unless launched by mpirun/srun
        self.tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
        self.train_examples, self.train_stats, records = self._examples(train_dataset, "train_dataset")
        self._groups = None  # per training example: its group key (config.group_by)
        if config.group_by == "prompt":
            if records is None:
                raise ValueError("Trainer: group_by='prompt' needs text records with a 'prompt', not tokenised "
                                 "examples")
            self._groups = [records[ex.index].prompt for ex in self.train_examples]
        self.eval_examples, self.eval_stats, _ = (self._examples(eval_dataset, "eval_dataset")
                                                  if eval_dataset is not None and len(eval_dataset)
                                                  else ([], None, None))
        if not self.train_examples:
            raise ValueError("Trainer: no usable training example (every prompt is at least max_length = "
                             f"{config.max_length} tokens; first: {self.train_stats['first_skipped']})")
        if config.num_threads:
            set_num_threads(int(config.num_threads))
        if config.lora_r is not None or lora is not None:
            self.lora = lora if lora is not None else LoRA(
                model, r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout,
                target_modules=config.lora_target_modules, seed=config.seed)
            self.lora.attach()
            if self.dist.size > 1:
                self.lora.stream = (self.dist.rank,)  # each rank its own dropout masks
            self._params, self._grads = self.lora.flat_params, self.lora.flat_grads
            if config.bf16:  # the frozen base in bf16 from here on; adapters and optimizer stay float32
                model.to_bf16()
        else:
            self.lora = None
            model.adapter = None
            model.frozen_base = False
            model.zero_grad()
            self._params, self._grads = model.flat_params, model.flat_grads
        self.optimizer = AdamW(lr=config.learning_rate, betas=(config.adam_beta1, config.adam_beta2),
                               eps=config.adam_epsilon, weight_decay=config.weight_decay)
        self.total_steps = resolve_total_steps(config, len(self.train_examples), world_size=self.dist.size)
        self.warmup_steps = resolve_warmup(config, self.total_steps)
        self.step = 0
        self.epoch = 0
        self.cursor = 0  # micro-batches of the current epoch already consumed
        self.history = []
        self.interrupted = False
        self._ref = None
        self._eval_ref = None
        self._epoch_batches = None
        self.last_checkpoint = None

    # ---- data ----

    def _examples(self, dataset, name):
        """Checked, length-limited TokenizedExamples, their stats, and the PreferenceRecords they came from
        (None for tokenised input)."""
        from ..data import PreferenceRecord, TokenizedExample, load_records, tokenize_dataset, truncate
        first = dataset[0]
        has_ids = (isinstance(first, dict) and "prompt_ids" in first) or hasattr(first, "prompt_ids")
        texts = None
        if has_ids:
            raw = list(dataset)
        else:
            if self.tokenizer is None:
                raise ValueError(f"Trainer: {name} holds records, but the model has no tokenizer; pass tokenizer=")
            records = list(dataset) if isinstance(first, PreferenceRecord) else load_records(list(dataset))
            # Tokenised without truncation (the limits are applied below, the same way for both kinds),
            # but no further than max_length + 1 tokens can reach, which is all the limits below look at.
            raw, _ = tokenize_dataset(records, self.tokenizer, max_length=1 << 40, max_prompt_length=None,
                                      max_tokens=self.config.max_length + 1)
            texts = records
        cfg, V = self.config, self.model.config.vocab_size
        out, skipped, first_skipped, p_trunc, c_trunc = [], 0, None, 0, 0
        for i, ex in enumerate(raw):
            try:
                p, c, r = (_ex_ids(ex, k) for k in ("prompt_ids", "chosen_ids", "rejected_ids"))
            except (AttributeError, KeyError, TypeError) as e:
                raise ValueError(f"Trainer: {name}[{i}] lacks prompt_ids/chosen_ids/rejected_ids ({e})") from None
            for key, ids in (("prompt_ids", p), ("chosen_ids", c), ("rejected_ids", r)):
                if not ids:
                    raise ValueError(f"Trainer: {name}[{i}].{key} is empty (a completion needs a prompt "
                                     "token before it and at least one token to score)")
                try:
                    a = np.asarray(ids)
                    ok = a.ndim == 1 and np.issubdtype(a.dtype, np.integer)
                except (TypeError, ValueError):
                    ok = False
                if not ok:
                    raise ValueError(f"Trainer: {name}[{i}].{key} must be a list of ints")
                lo, hi = int(a.min()), int(a.max())
                if lo < 0 or hi >= V:
                    raise ValueError(f"Trainer: {name}[{i}].{key} has token id {hi if hi >= V else lo} outside "
                                     f"[0, {V}) (the model's vocab_size): was it tokenised for another model?")
            if len(p) >= cfg.max_length:
                skipped += 1
                if first_skipped is None:
                    first_skipped = {"index": i, "prompt_tokens": len(p)}
                    if texts is not None:
                        ix = getattr(ex, "index", i)
                        first_skipped.update(prompt=texts[ix].prompt[:200], system=texts[ix].system[:200])
                continue
            # len(p) < max_length and max_prompt_length < max_length (DPOConfig) leave room: never None.
            p, c, r, p_cut, c_cut = truncate(p, c, r, cfg.max_length, cfg.max_prompt_length)
            p_trunc, c_trunc = p_trunc + p_cut, c_trunc + c_cut
            out.append(TokenizedExample([int(t) for t in p], [int(t) for t in c], [int(t) for t in r],
                                        index=getattr(ex, "index", i) if not isinstance(ex, dict) else i,
                                        task=getattr(ex, "task", "default") if not isinstance(ex, dict)
                                        else ex.get("task", "default")))
        stats = {"count": len(out), "skipped": skipped, "first_skipped": first_skipped,
                 "prompt_truncated": p_trunc, "completion_truncated": c_trunc}
        if skipped:
            warnings.warn(f"Trainer: {name}: skipped {skipped} example(s) whose prompt alone has max_length="
                          f"{cfg.max_length} tokens or more; first: {first_skipped}", stacklevel=3)
        if p_trunc:
            warnings.warn(f"Trainer: {name}: {p_trunc} prompt(s) cut to their last max_prompt_length="
                          f"{cfg.max_prompt_length} tokens, which drops the system prompt that CST conditions "
                          "on; raise max_length or max_prompt_length", stacklevel=3)
        return out, stats, texts

    def _batches(self, epoch):
        if self._epoch_batches is None or self._epoch_batches[0] != epoch:
            self._epoch_batches = (epoch, self._make_batches(epoch))
        return self._epoch_batches[1]

    def _make_batches(self, epoch):
        """Micro-batches of example indices for one epoch: a seeded permutation, then sorted by length
        inside windows of 16 batches so that padding stays small while the order stays random. With
        group_by, whole groups in a seeded order, cut into batches: exactly ceil(n / bs) batches, as the
        step count assumes; a group is split only where a batch boundary falls inside it."""
        cfg, n = self.config, len(self.train_examples)
        bs = cfg.per_device_train_batch_size * self.dist.size  # global: rank r takes rows r::size (train)
        rng = np.random.default_rng([cfg.seed, epoch])
        if self._groups is not None:
            by = {}
            for i, key in enumerate(self._groups):
                by.setdefault(key, []).append(i)
            groups = list(by.values())
            flat = [i for g in rng.permutation(len(groups)) for i in groups[g]]
            return [np.asarray(flat[i:i + bs]) for i in range(0, len(flat), bs)]
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
        return len(ex.prompt_ids) + max(len(ex.chosen_ids), len(ex.rejected_ids))

    # ---- reference log-probs ----

    def _seq_logps(self, batch):
        avg = losses.uses_average_logps(self.config.loss_type)
        tlp = self.model.forward_logprobs(batch.tokens, batch.targets, batch.lengths, batch.skip)
        if batch.skip is not None:  # one shared-prompt row per pair: its chosen and rejected masks
            tlp = np.concatenate([tlp, tlp])
        return tlp, losses.sequence_logps(tlp, batch.mask, average=avg)

    def _reference(self, examples, tag):
        """(n, 2) float64 reference log-probs of (chosen, rejected), computed once with the frozen
        reference (adapters off, or the weights the model has before any update) and cached in
        output_dir under a key of the token ids, the base weights and the settings that change them."""
        if self.config.mode == "sft" or not examples:
            return None
        ids = np.concatenate([np.asarray(getattr(e, k), np.int64) for e in examples
                              for k in ("prompt_ids", "chosen_ids", "rejected_ids")] +
                             [np.asarray([len(getattr(e, k)) for e in examples for k in
                                          ("prompt_ids", "chosen_ids", "rejected_ids")], np.int64)])
        key = _fingerprint(ids, *self.model.param_buffers()) + f"-{self.config.loss_type}"
        path = os.path.join(self.config.output_dir, f"ref_logps_{tag}.npz")
        ref = None
        if self.dist.rank == 0 and os.path.exists(path):
            try:
                with np.load(path) as z:
                    if str(z["key"]) == key and z["ref"].shape == (len(examples), 2):
                        ref = z["ref"]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: recompute and overwrite it
        ref = self.dist.bcast(ref)  # rank 0's cache decides for all: the ranks need not share a disk
        if ref is not None:
            return ref
        was = None
        if self.lora is not None:
            was, self.lora.enabled = self.lora.enabled, False
        ref = np.zeros((len(examples), 2), np.float64)
        try:
            bs = max(1, self.config.per_device_train_batch_size)
            starts = range(0, len(examples), bs)
            for k in self.dist.share(len(starts)):  # each rank its batches, then one sum below
                s = starts[k]
                idx = np.arange(s, min(s + bs, len(examples)))
                _, lp = self._seq_logps(collate(examples, idx, share_prompt=self.config.share_prompt))
                ref[idx, 0], ref[idx, 1] = lp[:len(idx)], lp[len(idx):]
        finally:
            if was is not None:
                self.lora.enabled = was
        # Each row was filled by one rank and is 0 on the others, so the sum is exact (x + 0 = x).
        self.dist.allreduce_(ref)
        if not np.all(np.isfinite(ref)):
            raise TrainingError(f"non-finite reference log-probs for {tag}: the model's weights are not finite")
        if self.dist.rank == 0:
            os.makedirs(self.config.output_dir, exist_ok=True)
            with atomic_open(path, "wb") as f:
                np.savez(f, ref=ref, key=np.array(key))
        return ref

    def _ensure_references(self):
        if self._ref is None:
            self._ref = self._reference(self.train_examples, "train")
        if self._eval_ref is None and self.eval_examples:
            self._eval_ref = self._reference(self.eval_examples, "eval")

    # ---- one micro-batch ----

    def _micro_step(self, batch, weight):
        """Forward, loss, backward for one micro-batch; its gradient times `weight` (its share of
        the step's tokens or pairs) is added into the trainable gradients."""
        cfg = self.config
        if self.lora is not None:
            self.lora.new_step()
        if cfg.mode == "sft":
            tlp = self.model.forward_logprobs(batch.tokens, batch.targets, batch.lengths)
            loss, dtlp = losses.sft_loss(tlp, batch.mask)
            if not math.isfinite(loss):
                raise TrainingError(f"non-finite SFT loss {loss} at step {self.step}")
            dtlp *= np.float32(weight)
            self.model.backward_logprobs(dtlp)
            return {"loss": loss}
        tlp, lp = self._seq_logps(batch)
        if not np.all(np.isfinite(lp)):
            raise TrainingError(f"non-finite policy log-probs at step {self.step}")
        P = len(batch.index)
        ref = self._ref[batch.index]
        out = losses.dpo_loss(lp[:P], lp[P:], ref[:, 0], ref[:, 1], beta=cfg.beta, loss_type=cfg.loss_type,
                              label_smoothing=cfg.label_smoothing)
        if not math.isfinite(out.loss):
            raise TrainingError(f"non-finite DPO loss {out.loss} at step {self.step}")
        dseq = np.concatenate([out.grad_chosen, out.grad_rejected]) * weight
        dtlp = losses.sequence_logps_backward(dseq, batch.mask, average=losses.uses_average_logps(cfg.loss_type))
        metrics = _dpo_metrics(out, lp, P)
        if cfg.rpo_alpha:
            # RPO: + alpha * mean NLL over the chosen completions' tokens (the first P rows).
            nll, dnll = losses.sft_loss(tlp[:P], batch.mask[:P])
            dtlp[:P] += dnll * np.float32(cfg.rpo_alpha * weight)
            metrics["nll_loss"] = nll
            metrics["loss"] = out.loss + cfg.rpo_alpha * nll
        if batch.skip is not None:  # the two masks are disjoint: the sum is exact
            dtlp = np.ascontiguousarray(dtlp[:P] + dtlp[P:])
        self.model.backward_logprobs(dtlp)
        return metrics

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
        sums, n, err = {}, 0, None
        try:
            bs = max(1, cfg.per_device_train_batch_size)
            starts = range(0, len(self.eval_examples), bs)
            for j in self.dist.share(len(starts)):  # each rank its batches, summed by _agree
                s = starts[j]
                idx = np.arange(s, min(s + bs, len(self.eval_examples)))
                if cfg.mode == "sft":
                    b = collate(self.eval_examples, idx, sft=True)
                    tlp = self.model.forward_logprobs(b.tokens, b.targets, b.lengths)
                    loss, _ = losses.sft_loss(tlp, b.mask)
                    w = float(b.mask.sum())
                    sums["loss"] = sums.get("loss", 0.0) + loss * w
                    n += w
                    continue
                _, lp = self._seq_logps(collate(self.eval_examples, idx, share_prompt=self.config.share_prompt))
                P, ref = len(idx), self._eval_ref[idx]
                if not np.all(np.isfinite(lp)):
                    raise TrainingError(f"non-finite eval log-probs at step {self.step}")
                o = losses.dpo_loss(lp[:P], lp[P:], ref[:, 0], ref[:, 1], beta=cfg.beta,
                                    loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
                for k, v in _dpo_metrics(o, lp, P).items():
                    sums[k] = sums.get(k, 0.0) + v * P
                n += P
        except TrainingError as e:
            err = str(e)
        finally:
            if self.lora is not None:
                self.lora.training = training
        sums, n = self._agree(err, sums, n)
        return {"eval_" + k: v / n for k, v in sums.items()}

    # ---- checkpoints ----

    def _state(self):
        return {"step": self.step, "epoch": self.epoch, "cursor": self.cursor,
                "lora_calls": self.lora.calls if self.lora is not None else 0,
                "total_steps": self.total_steps, "config": self.config.to_dict(),
                "history": self.history, "kind": "lora" if self.lora is not None else "full",
                "world_size": self.dist.size}

    def save_checkpoint(self, path=None):
        """Writes trainable weights, optimizer state, step, data position and dropout stream into a
        directory, atomically (a temp directory renamed into place). LoRA runs also get PEFT's
        adapter_model.safetensors + adapter_config.json there. Returns its path."""
        path = path or os.path.join(self.config.output_dir, f"checkpoint-{self.step}")
        if self.dist.rank != 0:  # every rank holds the same state; rank 0 writes it
            self.last_checkpoint = path
            return path
        parent = os.path.dirname(os.path.abspath(path))
        os.makedirs(parent, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=parent, prefix=".tmp-ckpt-")
        try:
            if self.lora is None:
                np.save(os.path.join(tmp, "weights.npy"), self._params)
            opt = self.optimizer.state_dict()
            moments = {} if opt["m"] is None else {"m": opt["m"][0], "v": opt["v"][0]}
            np.savez(os.path.join(tmp, "optimizer.npz"), **moments)
            state = self._state()
            state["optimizer"] = {k: opt[k] for k in ("step", "lr", "betas", "eps", "weight_decay")}
            write_json(os.path.join(tmp, "trainer_state.json"), state, indent=1)
            if self.lora is not None:
                self.lora.save_adapter(os.path.join(tmp, "adapter"))
                for f in os.listdir(os.path.join(tmp, "adapter")):
                    os.replace(os.path.join(tmp, "adapter", f), os.path.join(tmp, f))
                os.rmdir(os.path.join(tmp, "adapter"))
            honour_umask(tmp)
            # Every byte on disk before the rename makes the directory visible, and the rename itself
            # on disk before the next step: a power cut leaves the old checkpoint or the new one.
            fsync_tree(tmp)
            if os.path.exists(path):
                old = path + ".old"
                shutil.rmtree(old, ignore_errors=True)
                os.replace(path, old)
                os.replace(tmp, path)
                fsync_dir(parent)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
                fsync_dir(parent)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.last_checkpoint = path
        self._prune_checkpoints(path)
        return path

    def _clean_stale(self):
        """What a run killed inside save_checkpoint leaves in output_dir: .tmp-ckpt-* directories
        (removed) and checkpoint-N.old (put back when checkpoint-N is missing, else removed). Assumes
        one run per output_dir, as resuming does."""
        d = self.config.output_dir
        for name in sorted(os.listdir(d)):
            p = os.path.join(d, name)
            if not os.path.isdir(p) or os.path.islink(p):
                continue
            if name.startswith(".tmp-ckpt-"):
                shutil.rmtree(p, ignore_errors=True)
            elif name.startswith("checkpoint-") and name.endswith(".old"):
                if os.path.exists(p[:-4]):
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    os.replace(p, p[:-4])

    def _checkpoints(self):
        """The checkpoint-N directories of output_dir, oldest first."""
        d = self.config.output_dir
        if not os.path.isdir(d):
            return []
        steps = sorted(int(n.split("-", 1)[1]) for n in os.listdir(d)
                       if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit())
        return [os.path.join(d, f"checkpoint-{k}") for k in steps]

    def _latest_checkpoint(self):
        found = self._checkpoints()
        return found[-1] if found else None

    def _prune_checkpoints(self, keep):
        """Removes the oldest checkpoint-N directories beyond config.save_total_limit; never `keep`."""
        limit = self.config.save_total_limit
        if not limit:
            return
        found = [p for p in self._checkpoints() if os.path.abspath(p) != os.path.abspath(keep)]
        for old in found[:max(0, len(found) - (limit - 1))]:
            shutil.rmtree(old, ignore_errors=True)

    def load_checkpoint(self, path):
        """Restores what save_checkpoint wrote (weights, optimizer, counters, history)."""
        for f in ("optimizer.npz", "trainer_state.json"):
            if not os.path.exists(os.path.join(path, f)):
                raise ValueError(f"load_checkpoint: {path} is not a cst checkpoint (missing {f})")
        with open(os.path.join(path, "trainer_state.json")) as f:
            st = json.load(f)
        if st["kind"] != ("lora" if self.lora is not None else "full"):
            raise ValueError(f"load_checkpoint: {path} holds a {st['kind']} run, this trainer is not")
        saved = st.get("world_size", 1) * st["config"]["per_device_train_batch_size"]
        here = self.dist.size * self.config.per_device_train_batch_size
        if saved != here:
            raise ValueError(f"load_checkpoint: {path} was written with a global batch of {saved} "
                             f"(per_device_train_batch_size x ranks), this run has {here}; its data position "
                             "counts batches of that size, so resume with the same global batch")
        w = _checkpoint_weights(path, self.lora)
        if w.shape != self._params.shape or w.dtype != self._params.dtype:
            raise ValueError(f"load_checkpoint: weights in {path} have {w.size} values, expected {self._params.size}")
        opt = dict(st["optimizer"], betas=tuple(st["optimizer"]["betas"]))
        with np.load(os.path.join(path, "optimizer.npz")) as z:
            opt["m"] = [z["m"]] if "m" in z.files else None
            opt["v"] = [z["v"]] if "v" in z.files else None
        self.optimizer.load_state_dict(opt)
        if self.lora is None:
            # Full fine-tuning: the references are the weights before any update, which this model
            # holds only until the checkpoint's weights replace them (cached, so usually free).
            self._ensure_references()
        self._params[...] = w
        self.step, self.epoch, self.cursor = st["step"], st["epoch"], st["cursor"]
        if self.lora is not None:
            self.lora.calls = st["lora_calls"]
        self.history = st["history"]
        self.last_checkpoint = path

    # ---- the loop ----

    def _next_micro_batches(self):
        """Up to gradient_accumulation_steps micro-batches of the current epoch (advancing it first
        when it is used up); moves the data cursor past them."""
        batches = self._batches(self.epoch)
        if self.cursor >= len(batches):
            self.epoch, self.cursor = self.epoch + 1, 0
            batches = self._batches(self.epoch)
        take = batches[self.cursor:self.cursor + self.config.gradient_accumulation_steps]
        self.cursor += len(take)
        return take

    def _fail(self, msg, start):
        """Rolls the data position back to the step's start (None: the step was committed) and
        raises TrainingError, keeping the last good checkpoint: the current weights are saved
        only if they are finite."""
        if start is not None:
            self.epoch, self.cursor = start[0], start[1]
            if self.lora is not None:
                self.lora.calls = start[2]
        if _finite(self._params):
            self.save_checkpoint()
            self.dist.barrier()  # written before any rank goes on (and perhaps aborts the run)
        where = f"; the last good state is in {self.last_checkpoint}" if self.last_checkpoint else \
            "; no checkpoint was written (set save_steps)"
        raise TrainingError(msg + where)

    def train(self, resume_from_checkpoint=None):
        """Runs to total_steps and returns the history (a list of metric dicts). Ctrl-C saves a
        checkpoint of the last completed step and returns (with `interrupted` True); a non-finite
        loss or gradient raises TrainingError, keeping the last good checkpoint. Under mpirun every
        rank calls this: TrainingError is raised on all ranks together, any other error on one rank
        aborts them all (docs/scale.md)."""
        with self.dist.fail_together("Trainer.train", agreed=(TrainingError, distributed.DistributedError)):
            return self._train(resume_from_checkpoint)

    def _train(self, resume_from_checkpoint):
        from tqdm.auto import tqdm

        cfg = self.config
        os.makedirs(cfg.output_dir, exist_ok=True)
        if self.dist.rank == 0:
            self._clean_stale()
        self.dist.barrier()  # no rank looks for checkpoints while rank 0 tidies them
        # The references come first: for full fine-tuning they are the weights before any update,
        # which a resumed run only has before its checkpoint is loaded (else they come from the cache).
        self._ensure_references()
        if resume_from_checkpoint:
            path = self.dist.bcast(self._latest_checkpoint()) if resume_from_checkpoint is True \
                else resume_from_checkpoint
            if path is None:
                raise ValueError(f"train: no checkpoint to resume from in {cfg.output_dir}")
            self.load_checkpoint(path)
        self.dist.check_same("the trainable weights and the batch plan", self._params,
                             np.concatenate(self._batches(self.epoch)))
        if self.lora is not None:
            self.lora.training = True
        metrics_path = os.path.join(cfg.output_dir, "metrics.jsonl")
        # metrics.jsonl mirrors the history: rows logged after the checkpoint we resume from go.
        if self.dist.rank == 0:
            write_text(metrics_path, "".join(json.dumps(r) + "\n" for r in self.history))
        bar = tqdm(total=self.total_steps, initial=self.step, desc=f"{cfg.mode.upper()} train", unit="step",
                   dynamic_ncols=True, disable=self.dist.rank != 0 or not interactive())
        self.interrupted = False
        window = []
        self._t0, self._tokens = time.perf_counter(), 0
        try:
            while self.step < self.total_steps:
                start = (self.epoch, self.cursor, self.lora.calls if self.lora is not None else 0)
                committed = False
                if self.lora is not None:
                    self.lora.zero_grad()
                else:
                    self.model.zero_grad()
                try:
                    micro = self._next_micro_batches()
                    total = sum(self._share(idx) for idx in micro)
                    batches, weights, parts, err = [], [], [], None
                    try:
                        for idx in micro:
                            mine = idx[self.dist.rank::self.dist.size]  # this rank's part of the global batch
                            if not len(mine):  # a short last batch: the dropout stream still advances
                                if self.lora is not None:
                                    self.lora.new_step()
                                continue
                            batches.append(collate(self.train_examples, mine, sft=cfg.mode == "sft",
                                                   share_prompt=cfg.share_prompt))
                            weights.append(self._share(mine) / total)
                            parts.append(self._micro_step(batches[-1], weights[-1]))
                    except TrainingError as e:
                        err = str(e)
                    local = {k: float(sum(w * p[k] for w, p in zip(weights, parts))) for k in parts[0]} \
                        if parts else {}
                    m, n_tokens = self._agree(err, local, sum(b.n_tokens for b in batches))
                    self.dist.allreduce_(self._grads)  # the sum of the weighted shares: the step's gradient
                    norm = math.sqrt(_core.sum_squares(self._grads))
                    if not math.isfinite(norm):
                        raise TrainingError(f"non-finite gradient norm at step {self.step}")
                    scale = 1.0
                    if cfg.max_grad_norm:
                        norm, scale = clip_grad_norm(self._grads, cfg.max_grad_norm)
                    lr = lr_at(self.step, self.total_steps, cfg.learning_rate, cfg.lr_scheduler_type,
                               self.warmup_steps)
                    with _DeferInterrupt():
                        self.optimizer.step(self._params, self._grads, lr=lr, grad_scale=scale)
                        self.step += 1
                        committed = True
                        self._after_step(m, n_tokens, lr, norm, window, metrics_path, bar)
                except KeyboardInterrupt:
                    if not committed:  # the unfinished step is discarded
                        self.epoch, self.cursor = start[0], start[1]
                        if self.lora is not None:
                            self.lora.calls = start[2]
                    raise
                except TrainingError as e:
                    self._fail(str(e), None if committed else start)
        except KeyboardInterrupt:
            self.interrupted = True
            path = self.save_checkpoint()
            bar.write(f"Interrupted: saved {path} at step {self.step}")
            if self.dist.size > 1:
                raise  # the other ranks wait in a collective: fail_together ends them
        finally:
            bar.close()
        return self.history

    def _share(self, idx):
        """What examples idx weigh in a step: their pairs (DPO) or completion tokens (SFT)."""
        if self.config.mode == "sft":
            return float(sum(len(self.train_examples[i].chosen_ids) for i in idx))
        return float(len(idx))

    def _agree(self, err, sums, count):
        """One verdict over all ranks: a TrainingError message `err` on any rank is raised on every
        rank (before the next collective, which would otherwise wait for that rank forever); else the
        dicts `sums` and the numbers `count` are added up over the ranks (a step's weighted metrics and
        tokens, or the eval sums)."""
        got = self.dist.allgather((err, sums, count))
        failed = [(r, e) for r, (e, _, _) in enumerate(got) if e is not None]
        if failed:
            raise TrainingError(failed[0][1] if self.dist.size == 1 else f"rank {failed[0][0]}: {failed[0][1]}")
        total = {}
        for _, part, _ in got:
            for k, v in part.items():
                total[k] = total[k] + v if k in total else v
        return total, sum(c for _, _, c in got)

    def _after_step(self, m, n_tokens, lr, norm, window, metrics_path, bar):
        """Bookkeeping of a committed step: metrics, logging, evaluation, periodic checkpoint."""
        cfg = self.config
        self._tokens += n_tokens
        m.update(learning_rate=lr, grad_norm=norm)
        window.append(m)
        bar.update(1)
        dt = time.perf_counter() - self._t0
        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{self._tokens / dt:.0f}" if dt > 0 else "-")
        last = self.step == self.total_steps
        evaluate = bool(cfg.eval_steps) and (self.step % cfg.eval_steps == 0 or last)
        if self.step % cfg.logging_steps == 0 or last:
            dt = time.perf_counter() - self._t0
            row = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
            row.update(step=self.step, epoch=self.epoch + self.cursor / max(1, len(self._batches(self.epoch))),
                       tokens_per_s=self._tokens / dt if dt > 0 else 0.0)
            if evaluate:
                row.update(self.evaluate())
            self._log(row, metrics_path)
            window.clear()
            self._t0, self._tokens = time.perf_counter(), 0
        elif evaluate:
            self._log({"step": self.step, **self.evaluate()}, metrics_path)
        if (cfg.save_steps and self.step % cfg.save_steps == 0) or last:
            self.save_checkpoint()
            self.dist.barrier()  # no rank runs ahead, and perhaps fails, while rank 0 writes

    def _log(self, row, path):
        self.history.append(row)
        if self.dist.rank == 0:
            with open(path, "a") as f:
                f.write(json.dumps(row) + "\n")


def _dpo_metrics(out, lp, P):
    return {"loss": out.loss, "rewards/chosen": float(out.chosen_rewards.mean()),
            "rewards/rejected": float(out.rejected_rewards.mean()),
            "rewards/accuracies": float(out.accuracies.mean()), "rewards/margins": float(out.margins.mean()),
            "logps/chosen": float(lp[:P].mean()), "logps/rejected": float(lp[P:].mean())}


# ---- checkpoints as models ----

def _checkpoint_weights(ckpt, lora):
    """The trainable flat buffer a checkpoint holds: weights.npy for full fine-tuning; for LoRA the
    PEFT adapter_model.safetensors (the one copy of the adapters), read into a copy of lora's buffer
    (`lora` itself is left as it was). Raises ValueError naming the file when it is missing or bad."""
    if lora is not None and not os.path.isfile(os.path.join(ckpt, "weights.npy")):
        if not os.path.isfile(os.path.join(ckpt, "adapter_model.safetensors")):
            raise ValueError(f"checkpoint {ckpt}: adapter_model.safetensors is missing")
        was = lora.flat_params.copy()
        try:
            lora.load_adapter(ckpt)
            return lora.flat_params.copy()
        finally:
            lora.flat_params[...] = was
    weights_path = os.path.join(ckpt, "weights.npy")
    if not os.path.isfile(weights_path):
        raise ValueError(f"checkpoint {ckpt}: weights.npy is missing")
    try:
        w = np.load(weights_path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{weights_path}: not a NumPy array file ({e})") from None
    if w.dtype != np.float32 or w.ndim != 1:
        raise ValueError(f"{weights_path}: expected a 1-D float32 array, got {w.dtype} {w.shape}")
    return w


def find_checkpoint(path):
    """The checkpoint directory that `path` names: path itself when it holds
    trainer_state.json, else the checkpoint-N inside it with the largest N (a `cst train` output dir)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path}: no such file or directory")
    if not os.path.isdir(path):
        raise ValueError(f"checkpoint {path}: not a directory (expected a checkpoint-N directory of `cst train`)")
    if os.path.isfile(os.path.join(path, "trainer_state.json")):
        return path
    steps = [int(n.split("-", 1)[1]) for n in os.listdir(path)
             if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit()
             and os.path.isfile(os.path.join(path, n, "trainer_state.json"))]
    if not steps:
        raise ValueError(f"checkpoint {path}: neither a checkpoint (no trainer_state.json) nor a training "
                         "output dir with checkpoint-N subdirectories")
    return os.path.join(path, f"checkpoint-{max(steps)}")


def load_checkpoint_into(model, path, merge=True):
    """Applies a cst.trainer.Trainer checkpoint to `model` (the base model the run started from).

    path: a checkpoint-N directory, or a run's output dir (its latest checkpoint). A full fine-tuning
    checkpoint replaces the weights. A LoRA checkpoint holds the adapters' flat buffer: the adapters
    are rebuilt with the run's config (trainer_state.json), loaded, and then merged into the weights
    (merge=True: a plain model, fastest for generation and export) or attached (merge=False,
    dropout off). Returns {"path", "kind", "step", "lora"} (lora: the LoRA object or None).
    Raises ValueError when the checkpoint does not fit the model, or when its weights would have to be
    written into a bf16 base (a full checkpoint, or merge=True: use merge=False, or a float32 model)."""
    ckpt = find_checkpoint(path)
    state_path = os.path.join(ckpt, "trainer_state.json")
    try:
        with open(state_path, encoding="utf-8") as f:
            state = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{state_path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    if not isinstance(state, dict) or state.get("kind") not in ("full", "lora"):
        raise ValueError(f"{state_path}: not a cst trainer state (no kind 'full' or 'lora')")
    lora = None
    if getattr(model, "dtype", "f32") == "bf16" and (state["kind"] == "full" or merge):
        raise ValueError(f"checkpoint {ckpt}: this model's base is stored in bf16, and "
                         + ("a full fine-tuning checkpoint replaces the base weights" if state["kind"] == "full"
                            else "merge=True folds the adapters into the base weights")
                         + ", which needs a float32 model: load it without dtype='bf16'"
                         + ("" if state["kind"] == "full" else ", or pass merge=False (adapters kept attached)"))
    if state["kind"] == "full":
        w = _checkpoint_weights(ckpt, None)
        if w.size != model.flat_params.size:
            raise ValueError(f"checkpoint {ckpt}: holds {w.size} weights, this model has {model.flat_params.size}; "
                             "it was trained from a different model")
        if model.adapter is not None:
            model.adapter.detach()
        model.flat_params[...] = w
    else:
        c = state.get("config") or {}
        try:
            lora = LoRA(model, r=c["lora_r"], alpha=c["lora_alpha"], dropout=c["lora_dropout"],
                        target_modules=c["lora_target_modules"], seed=c["seed"])
        except KeyError as e:
            raise ValueError(f"{state_path}: the config lacks {e.args[0]!r}, needed to rebuild the LoRA "
                             "adapters") from None
        w = _checkpoint_weights(ckpt, lora)
        if w.size != lora.num_parameters:
            raise ValueError(f"checkpoint {ckpt}: holds {w.size} adapter weights, LoRA r={lora.r} on this model "
                             f"needs {lora.num_parameters}; it was trained from a different model")
        lora.flat_params[...] = w
        lora.training = False
        if merge:
            model.flat_params[...] = lora.merged_params()
            lora.detach()
        else:
            lora.attach()
    return {"path": ckpt, "kind": state["kind"], "step": state.get("step"), "lora": lora}
