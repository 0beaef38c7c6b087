"""Shared prompt prefix: one row [prompt, chosen, rejected] per DPO pair instead of two rows.

A row with skip span [s0, s1) (s0 = len(prompt), s1 = s0 + len(chosen)) is computed as if the tokens
from s1 on (the rejected completion) followed the prompt directly: they attend to keys [0, s0) and to
the earlier rejected keys, never to the chosen span, and their rotary positions restart at s0. The
token at s1 follows token s0 - 1, so the target stored at position s1 - 1 (the chosen span's last
position, which predicts nothing of its own) is scored from the hidden state at s0 - 1.

Everything per token (embedding, norms, projections, the MLP, the LM head) runs once on the packed
row, so the prompt's forward and backward are computed once per pair. Attention uses the existing
causal kernels twice: once over the row cut at s1 (prompt and chosen queries), once over the gathered
sequence [prompt, rejected] (cut at len - (s1 - s0)), whose rejected rows are scattered back. The
second call recomputes only the prompt's attention scores (a few percent of a layer's FLOPs at these
lengths), and in backward its prompt rows get a zero output gradient, so they add exactly nothing
while the rejected queries' gradients reach the prompt's keys and values. Every value equals the
unshared two-row computation up to float32 summation order."""
import numpy as np

from .. import _core


def check_skip(fn, skip, lengths, B):
    """skip (B, 2) int32 with 1 <= s0 < s1 < lengths[b] (at least one token after the span)."""
    if not isinstance(skip, np.ndarray):
        raise TypeError(f"{fn}: 'skip' must be None or a numpy.ndarray of int32, got {type(skip).__name__}")
    if skip.dtype != np.int32:
        raise TypeError(f"{fn}: 'skip' must have dtype int32, got {skip.dtype}")
    if skip.shape != (B, 2):
        raise ValueError(f"{fn}: 'skip' must have shape ({B}, 2), got {skip.shape}")
    if lengths is None:
        raise ValueError(f"{fn}: 'skip' needs 'lengths' (the rows' real lengths)")
    s0, s1 = skip[:, 0].astype(np.int64), skip[:, 1].astype(np.int64)
    bad = np.flatnonzero((s0 < 1) | (s1 <= s0) | (s1 >= lengths))
    if bad.size:
        b = int(bad[0])
        raise ValueError(f"{fn}: 'skip' row {b} = [{int(s0[b])}, {int(s1[b])}) must satisfy 1 <= start < end "
                         f"< lengths[{b}] = {int(lengths[b])}")


class SkipPlan:
    """Index arrays of one batch's packed rows (B, T) with skip spans: positions, the gather of the
    [prompt, rejected] sequences (B, T2) and the head-row remapping. Built once per forward."""

    def __init__(self, skip, lengths, T, cos, sin):
        B = len(lengths)
        s0, s1 = skip[:, 0].astype(np.int64), skip[:, 1].astype(np.int64)
        gap = s1 - s0
        ln = lengths.astype(np.int64)
        t = np.arange(T)[None, :]
        pos = np.where(t >= s1[:, None], t - gap[:, None], t)
        pos[t >= ln[:, None]] = 0  # padding: any row of the tables
        self.cos = np.ascontiguousarray(cos[pos.reshape(-1)])  # (B*T, HS/2): row b*T+t at its position
        self.sin = np.ascontiguousarray(sin[pos.reshape(-1)])
        self.first = s1.astype(np.int32)  # the first call's lengths: prompt and chosen
        self.second = (ln - gap).astype(np.int32)  # the second call's lengths: prompt and rejected
        T2 = int(self.second.max())
        self.T2 = T2
        j = np.arange(T2)[None, :]
        src = np.where(j >= s0[:, None], j + gap[:, None], j) + (np.arange(B) * T)[:, None]
        valid = j < self.second[:, None]
        self.gather = np.where(valid, src, (np.arange(B) * T)[:, None]).reshape(-1)  # (B*T2,) packed rows
        rej = (valid & (j >= s0[:, None])).reshape(-1)
        self.rej2 = np.flatnonzero(rej)  # rejected rows in the gathered layout
        self.rej = self.gather[self.rej2]  # the same rows in the packed layout
        self.prompt2 = np.flatnonzero((j < s0[:, None]).reshape(-1))  # prompt rows, gathered layout
        base = np.arange(B) * T
        self.slot = base + s1 - 1  # flat head row whose target is the rejected's first token ...
        self.slot_src = base + s0 - 1  # ... scored from the prompt's last hidden state
        self.valid2 = np.flatnonzero(valid.reshape(-1))  # real rows of the gathered layout
        self.valid_b, self.valid_t = np.divmod(self.valid2, T2)
        self.src_b, self.src_t = np.divmod(self.gather[self.valid2], T)
        self.B, self.T = B, T

    def rope(self, x, backward=False):
        """Rotary in place on x (B, T, H, HS) at the rows' own positions."""
        B, T, H, HS = x.shape
        flat = x.reshape(1, B * T, H, HS)
        (_core.rope_backward if backward else _core.rope_forward)(flat, self.cos, self.sin)

    def head_src(self, rows):
        """rows: sorted flat positions whose target is scored -> the positions whose hidden states score them."""
        src = rows.copy()
        i = np.minimum(np.searchsorted(rows, self.slot), len(rows) - 1)
        hit = rows[i] == self.slot  # a caller's targets may leave a slot unscored (-1)
        src[i[hit]] = self.slot_src[hit]
        return src

    def head_backward(self, dlnf):
        """Moves the gradient written at the slot rows to the rows that produced their hidden states."""
        dlnf[self.slot_src] += dlnf[self.slot]
        dlnf[self.slot] = 0.0

    def _gathered(self, buf, name, x):
        B, T = self.B, self.T
        rest = x.shape[2:]
        out = buf(name, (B, self.T2) + rest)
        np.take(x.reshape((B * T,) + rest), self.gather, axis=0, out=out.reshape((B * self.T2,) + rest))
        return out

    def _lse_gathered(self, buf, lse):
        out = buf("skip_lse2", (self.B, lse.shape[1], self.T2))
        out.fill(0.0)
        out[self.valid_b, :, self.valid_t] = lse[self.src_b, :, self.src_t]
        return out

    def attention_forward(self, buf, att, lse, q, k, v):
        """att (B,T,NH,HS), lse (B,NH,T) of the packed rows from rotated q, k, v."""
        B, T = self.B, self.T
        _core.attention_forward(att, lse, q, k, v, self.first)
        q2, k2, v2 = self._gathered(buf, "skip_q2", q), self._gathered(buf, "skip_k2", k), self._gathered(buf, "skip_v2", v)
        NH, HS = att.shape[2], att.shape[3]
        att2, lse2 = buf("skip_att2", (B, self.T2, NH, HS)), buf("skip_lse2", (B, NH, self.T2))
        _core.attention_forward(att2, lse2, q2, k2, v2, self.second)
        att.reshape(B * T, NH, HS)[self.rej] = att2.reshape(B * self.T2, NH, HS)[self.rej2]
        b2, t2 = np.divmod(self.rej2, self.T2)
        bp, tp = np.divmod(self.rej, T)
        lse[bp, :, tp] = lse2[b2, :, t2]

    def attention_backward(self, buf, dq, dk, dv, dout, att, lse, q, k, v):
        """Adds the packed rows' attention gradients into dq, dk, dv (B,T,H,HS)."""
        B, T = self.B, self.T
        _core.attention_backward(dq, dk, dv, dout, att, lse, q, k, v, self.first)
        g = lambda name, x: self._gathered(buf, name, x)  # noqa: E731
        q2, k2, v2, att2 = g("skip_q2", q), g("skip_k2", k), g("skip_v2", v), g("skip_att2", att)
        dout2 = g("skip_dout2", dout)
        NH, NKV, HS = q.shape[2], k.shape[2], q.shape[3]
        dout2.reshape(B * self.T2, NH, HS)[self.prompt2] = 0.0  # the prompt's own rows were counted above
        lse2 = self._lse_gathered(buf, lse)
        dq2, dk2, dv2 = buf("skip_dq2", q2.shape), buf("skip_dk2", k2.shape), buf("skip_dv2", v2.shape)
        dq2.fill(0.0)
        dk2.fill(0.0)
        dv2.fill(0.0)
        _core.attention_backward(dq2, dk2, dv2, dout2, att2, lse2, q2, k2, v2, self.second)
        valid = self.valid2
        dst = self.gather[valid]  # unique packed rows, so fancy += adds each once
        for d, d2, H in ((dq, dq2, NH), (dk, dk2, NKV), (dv, dv2, NKV)):
            d.reshape(B * T, H, HS)[dst] += d2.reshape(B * self.T2, H, HS)[valid]
