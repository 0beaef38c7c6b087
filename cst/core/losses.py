"""Training losses on top of per-token log-probs: DPO (sigmoid/cDPO, IPO, hinge as in TRL's DPOTrainer)
and SFT negative log-likelihood, with their gradients. The arithmetic runs in cst._core (csrc/kernels/dpo.c);
this module validates arguments, allocates outputs and averages. It does not run any model.

Sequence log-probs: TRL sums the completion tokens' log-probs for "sigmoid" and "hinge", but for
"ipo" it divides that sum by the number of completion tokens (``if "ipo" in self.loss_type:
all_logps = all_logps / loss_mask.sum(-1)``). ``sequence_logps(..., average=uses_average_logps(t))``
reproduces that choice.
"""
import math
import warnings
from dataclasses import dataclass

import numpy as np

from .. import _core

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def uses_average_logps(loss_type: str) -> bool:
    """True when TRL feeds this loss per-token *average* sequence log-probs (IPO) instead of sums."""
    _check_loss_type("loss_type", loss_type)
    return loss_type == "ipo"


def _check_loss_type(name, loss_type):
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"{name} must be one of {LOSS_TYPES}, got {loss_type!r}")


def _as_f32_2d(name, x):
    a = np.ascontiguousarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise ValueError(f"{name} must be 2-D (B, T), got shape {a.shape}")
    return a


def _as_mask(x, shape):
    m = np.asarray(x)
    if m.dtype == np.bool_ or m.dtype == np.uint8:
        m = np.ascontiguousarray(m)
    elif np.issubdtype(m.dtype, np.number):
        m = np.ascontiguousarray(m, dtype=np.float32)
    else:
        raise TypeError(f"mask must be numeric or bool, got dtype {m.dtype}")
    if m.shape != shape:
        raise ValueError(f"mask must have the shape of token_logp {shape}, got {m.shape}")
    return m


def _check_rows_nonempty(mask):
    counts = (mask != 0).sum(axis=1)
    empty = np.flatnonzero(counts == 0)
    if empty.size:
        raise ValueError(f"mask selects no response tokens in row(s) {empty.tolist()[:8]}: "
                         "a sequence without completion tokens has no log-prob to train on")


def sequence_logps(token_logp, mask, average=False):
    """(B,) float64 sequence log-probs: the masked sum over T of token_logp (B, T) (or the per-token
    average when ``average``). Rows whose mask selects nothing raise ValueError."""
    lp = _as_f32_2d("token_logp", token_logp)
    m = _as_mask(mask, lp.shape)
    _check_rows_nonempty(m)
    out = np.empty(lp.shape[0], np.float64)
    _core.seq_logps_forward(out, lp, m, average=bool(average))
    return out


def sequence_logps_backward(dout, mask, average=False, dtoken_logp=None):
    """Gradient of sequence_logps w.r.t. token_logp: returns dtoken_logp (B, T) float32, to which
    dout (B,) * mask (/ row count when ``average``) has been ADDED (a new zero array if None)."""
    m = _as_mask(mask, np.shape(mask))
    if m.ndim != 2:
        raise ValueError(f"mask must be 2-D (B, T), got shape {m.shape}")
    _check_rows_nonempty(m)
    d = np.ascontiguousarray(dout, dtype=np.float64)
    if d.shape != (m.shape[0],):
        raise ValueError(f"dout must have shape ({m.shape[0]},), got {d.shape}")
    if dtoken_logp is None:
        dtoken_logp = np.zeros(m.shape, np.float32)
    _core.seq_logps_backward(dtoken_logp, d, m, average=bool(average))
    return dtoken_logp


@dataclass
class DPOLossOutput:
    """Result of dpo_loss. Arrays are (P,) float64; gradients are of the MEAN loss."""
    loss: float
    losses: np.ndarray
    chosen_rewards: np.ndarray
    rejected_rewards: np.ndarray
    margins: np.ndarray
    accuracies: np.ndarray
    grad_chosen: np.ndarray
    grad_rejected: np.ndarray


def _pair_input(name, x):
    try:
        a = np.ascontiguousarray(x, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name} must be an array of numbers: {e}") from None
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D (P,), got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        i = int(np.flatnonzero(~np.isfinite(a))[0])
        raise ValueError(f"{name} must be finite, got {a[i]} at index {i}")
    return a


def dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.1, loss_type="sigmoid",
             label_smoothing=0.0) -> DPOLossOutput:
    """DPO-family loss over P preference pairs of sequence log-probs (TRL's DPOTrainer.dpo_loss).

    logits = (policy_chosen - policy_rejected) - (ref_chosen - ref_rejected);
    sigmoid: -(1-ls) logsigmoid(beta logits) - ls logsigmoid(-beta logits)  (cDPO when ls > 0);
    ipo: (logits - 1/(2 beta))^2;  hinge: relu(1 - beta logits).
    label_smoothing only affects "sigmoid" (TRL ignores it for the others; so do we, with a warning).
    Returns the mean loss, per-pair losses, rewards beta*(policy - ref), margins, accuracies
    (chosen_rewards > rejected_rewards) and d mean_loss / d policy_{chosen,rejected}.
    """
    _check_loss_type("loss_type", loss_type)
    if isinstance(beta, bool) or not isinstance(beta, (int, float, np.floating, np.integer)):
        raise ValueError(f"beta must be a number, got {type(beta).__name__}")
    if not (math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta must be finite and > 0, got {beta!r}")
    if isinstance(label_smoothing, bool) or not isinstance(
            label_smoothing, (int, float, np.floating, np.integer)):
        raise ValueError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not (0.0 <= label_smoothing <= 0.5):
        raise ValueError(f"label_smoothing must be in [0, 0.5], got {label_smoothing!r}")
    if label_smoothing > 0 and loss_type != "sigmoid":
        warnings.warn(f"label_smoothing={label_smoothing} is ignored by loss_type={loss_type!r} "
                      "(as in TRL); only 'sigmoid' uses it", stacklevel=2)
    names = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected")
    xs = [_pair_input(n, x) for n, x in zip(names, (policy_chosen, policy_rejected, ref_chosen,
                                                    ref_rejected))]
    for n, a in zip(names[1:], xs[1:]):
        if a.shape != xs[0].shape:
            raise ValueError(f"{n} has shape {a.shape}, but policy_chosen has {xs[0].shape}")
    P = xs[0].shape[0]
    if P == 0:
        raise ValueError("policy_chosen is empty: the mean loss over zero pairs is undefined")
    losses, cr, rr, gc, gr = (np.empty(P, np.float64) for _ in range(5))
    _core.dpo_loss(losses, cr, rr, gc, gr, *xs, float(beta), loss_type, float(label_smoothing))
    gc /= P  # per-pair gradients -> gradient of the mean
    gr /= P
    return DPOLossOutput(loss=float(losses.mean()), losses=losses, chosen_rewards=cr,
                         rejected_rewards=rr, margins=cr - rr, accuracies=(cr > rr).astype(np.float64),
                         grad_chosen=gc, grad_rejected=gr)


def sft_loss(token_logp, mask):
    """Mean negative log-likelihood over all masked completion tokens of the batch (like a
    cross-entropy with ignore_index), and its gradient (B, T) float32 w.r.t. token_logp.
    A row without any completion token raises ValueError."""
    lp = _as_f32_2d("token_logp", token_logp)
    m = _as_mask(mask, lp.shape)
    _check_rows_nonempty(m)
    sums = np.empty(lp.shape[0], np.float64)
    _core.seq_logps_forward(sums, lp, m)
    n_tokens = float(m.astype(np.float64).sum())
    loss = -float(sums.sum()) / n_tokens
    dtoken_logp = np.zeros(lp.shape, np.float32)
    _core.seq_logps_backward(dtoken_logp, np.full(lp.shape[0], -1.0 / n_tokens), m)
    return loss, dtoken_logp
