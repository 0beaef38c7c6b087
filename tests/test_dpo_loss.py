"""DPO-family losses and sequence log-probs against float64 references: a PyTorch transcription of
TRL's DPOTrainer.dpo_loss formulas (autograd for the gradients) and NumPy for the masked sums."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cst import _core
from cst import losses as L

LOSS_TYPES = ("sigmoid", "ipo", "hinge")


def torch_dpo(pc, pr, rc, rr, beta, loss_type, ls):
    """TRL's formulas in float64 torch; returns (losses, chosen_rewards, rejected_rewards,
    d mean / d pc, d mean / d pr) as NumPy arrays."""
    pc = torch.tensor(pc, dtype=torch.float64, requires_grad=True)
    pr = torch.tensor(pr, dtype=torch.float64, requires_grad=True)
    rc = torch.tensor(rc, dtype=torch.float64)
    rr = torch.tensor(rr, dtype=torch.float64)
    logits = (pc - pr) - (rc - rr)
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * logits) * (1 - ls) - F.logsigmoid(-beta * logits) * ls
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * logits)
    elif loss_type == "ipo":
        losses = (logits - 1 / (2 * beta)) ** 2
    else:
        raise AssertionError(loss_type)
    losses.mean().backward()
    cr = beta * (pc - rc).detach()
    rj = beta * (pr - rr).detach()
    return (losses.detach().numpy(), cr.numpy(), rj.numpy(), pc.grad.numpy(), pr.grad.numpy())


def random_pairs(rng, P, scale=30.0):
    ref_c = -rng.uniform(10, 300, P)
    ref_r = -rng.uniform(10, 300, P)
    return (ref_c + rng.normal(0, scale, P), ref_r + rng.normal(0, scale, P), ref_c, ref_r)


def assert_matches_torch(out, ref, rtol=1e-12, atol=1e-14):
    losses, cr, rj, gc, gr = ref
    np.testing.assert_allclose(out.losses, losses, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.chosen_rewards, cr, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.rejected_rewards, rj, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.grad_chosen, gc, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.grad_rejected, gr, rtol=rtol, atol=atol)
    np.testing.assert_allclose(out.loss, losses.mean(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("ls", [0.0, 0.1, 0.25, 0.5])
@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_loss_matches_torch(rng, loss_type, ls, beta):
    for P in (1, 7, 64):
        pc, pr, rc, rr = random_pairs(rng, P, scale=5.0 / beta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # label_smoothing ignored for ipo/hinge (tested below)
            out = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
        ref = torch_dpo(pc, pr, rc, rr, beta, loss_type, ls if loss_type == "sigmoid" else 0.0)
        assert_matches_torch(out, ref)
        np.testing.assert_array_equal(out.margins, out.chosen_rewards - out.rejected_rewards)
        np.testing.assert_array_equal(out.accuracies,
                                      (out.chosen_rewards > out.rejected_rewards).astype(float))
        assert out.losses.dtype == np.float64 and out.grad_chosen.shape == (P,)


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
@pytest.mark.parametrize("ls", [0.0, 0.3])
@pytest.mark.parametrize("gap", [1e3, 1e4, 1e5, 1e6])
def test_dpo_loss_extreme_gaps(loss_type, ls, gap):
    """Log-prob gaps of 1e3..1e6 in both directions: finite everywhere and equal to torch's
    (whose logsigmoid is the stable form too)."""
    signs = np.array([1.0, -1.0, 1.0, -1.0, 0.5, -0.5])
    pc = -50.0 + signs * gap
    pr = np.full(6, -50.0)
    rc = np.array([-50.0, -50.0, -50.0 - gap, -50.0 + gap, -50.0, -50.0])
    rr = np.array([-50.0, -50.0, -50.0, -50.0, -50.0 + gap, -50.0 - gap])
    for beta in (0.1, 1.0):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = L.dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=ls)
        for name in ("losses", "chosen_rewards", "rejected_rewards", "grad_chosen", "grad_rejected"):
            assert np.all(np.isfinite(getattr(out, name))), name
        assert np.isfinite(out.loss)
        ref = torch_dpo(pc, pr, rc, rr, beta, loss_type, ls if loss_type == "sigmoid" else 0.0)
        assert_matches_torch(out, ref, rtol=1e-12, atol=1e-300)


def test_sigmoid_saturates_exactly():
    """Far past the margin the sigmoid loss is exactly the linear tail: beta*|logits| when wrong,
    and 0 (not NaN) when right."""
    out = L.dpo_loss([1e6, -1e6], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], beta=1.0)
    np.testing.assert_array_equal(out.losses, [0.0, 1e6])
    np.testing.assert_array_equal(out.grad_chosen, [0.0, -0.5])
    np.testing.assert_array_equal(out.grad_rejected, [0.0, 0.5])


def test_hinge_kink_has_zero_gradient_like_torch_relu():
    # beta * logits == 1 exactly: relu'(0) = 0 in torch.
    pc, pr, rc, rr = [2.0], [0.0], [0.0], [0.0]
    out = L.dpo_loss(pc, pr, rc, rr, beta=0.5, loss_type="hinge")
    ref = torch_dpo(pc, pr, rc, rr, 0.5, "hinge", 0.0)
    assert out.losses[0] == 0.0
    assert out.grad_chosen[0] == ref[3][0] == 0.0


@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_dpo_gradient_finite_differences(rng, loss_type):
    pc, pr, rc, rr = random_pairs(rng, 5, scale=10.0)
    beta, ls = 0.2, (0.15 if loss_type == "sigmoid" else 0.0)
    out = L.dpo_loss(pc, pr, rc, rr, beta, loss_type, ls)
    h = 1e-6
    for i in range(5):
        for arr, grad in ((pc, out.grad_chosen), (pr, out.grad_rejected)):
            up, dn = arr.copy(), arr.copy()
            up[i] += h
            dn[i] -= h
            args = [up if a is arr else a for a in (pc, pr, rc, rr)]
            f_up = L.dpo_loss(*args, beta, loss_type, ls).loss
            args = [dn if a is arr else a for a in (pc, pr, rc, rr)]
            f_dn = L.dpo_loss(*args, beta, loss_type, ls).loss
            fd = (f_up - f_dn) / (2 * h)
            assert abs(fd - grad[i]) < 1e-6 * max(1.0, abs(grad[i])), (i, fd, grad[i])


def test_core_forward_backward_agree_with_one_call(rng):
    P = 33
    pc, pr, rc, rr = random_pairs(rng, P)
    for loss_type in LOSS_TYPES:
        ls = 0.2 if loss_type == "sigmoid" else 0.0
        l, cr, rj, gc, gr = (np.empty(P) for _ in range(5))
        _core.dpo_loss(l, cr, rj, gc, gr, pc, pr, rc, rr, 0.1, loss_type, ls)
        l2 = np.empty(P)
        _core.dpo_loss_forward(l2, None, None, pc, pr, rc, rr, 0.1, loss_type, ls)
        np.testing.assert_array_equal(l, l2)
        # backward ADDS dlosses-weighted gradients; None outputs are skipped
        w = rng.standard_normal(P)
        dc0, dr0 = rng.standard_normal(P), rng.standard_normal(P)
        dc, dr = dc0.copy(), dr0.copy()
        _core.dpo_loss_backward(dc, dr, w, pc, pr, rc, rr, 0.1, loss_type, ls)
        np.testing.assert_allclose(dc - dc0, w * gc, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(dr - dr0, w * gr, rtol=1e-12, atol=1e-15)
        dc = dc0.copy()
        _core.dpo_loss_backward(dc, None, None, pc, pr, rc, rr, 0.1, loss_type, ls)
        np.testing.assert_allclose(dc - dc0, gc, rtol=1e-12, atol=1e-15)
        np.testing.assert_array_equal(gr, -gc)


def test_dpo_results_do_not_depend_on_thread_count(rng):
    P = 5000  # above the kernel's parallel threshold
    pc, pr, rc, rr = random_pairs(rng, P)
    before = _core.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            _core.set_num_threads(n)
            o = L.dpo_loss(pc, pr, rc, rr, 0.1, "sigmoid", 0.1)
            outs.append((o.losses, o.grad_chosen))
    finally:
        _core.set_num_threads(before)
    for o in outs[1:]:
        np.testing.assert_array_equal(o[0], outs[0][0])
        np.testing.assert_array_equal(o[1], outs[0][1])


def test_label_smoothing_ignored_for_ipo_and_hinge_with_warning(rng):
    pc, pr, rc, rr = random_pairs(rng, 4)
    for loss_type in ("ipo", "hinge"):
        with pytest.warns(UserWarning, match="label_smoothing"):
            a = L.dpo_loss(pc, pr, rc, rr, 0.1, loss_type, 0.3)
        b = L.dpo_loss(pc, pr, rc, rr, 0.1, loss_type, 0.0)
        np.testing.assert_array_equal(a.losses, b.losses)


def test_dpo_loss_rejects_bad_input():
    ok = np.array([-1.0, -2.0])
    with pytest.raises(ValueError, match="loss_type"):
        L.dpo_loss(ok, ok, ok, ok, loss_type="kto")
    for beta in (0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="beta"):
            L.dpo_loss(ok, ok, ok, ok, beta=beta)
    for ls in (-0.01, 0.51, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing"):
            L.dpo_loss(ok, ok, ok, ok, label_smoothing=ls)
    with pytest.raises(ValueError, match="ref_rejected"):
        L.dpo_loss(ok, ok, ok, np.array([-1.0, -2.0, -3.0]))
    with pytest.raises(ValueError, match="policy_rejected"):
        L.dpo_loss(ok, ok[None], ok, ok)
    for bad in (np.nan, np.inf, -np.inf):
        with pytest.raises(ValueError, match="ref_chosen.*finite"):
            L.dpo_loss(ok, ok, np.array([-1.0, bad]), ok)
    with pytest.raises(ValueError, match="policy_chosen"):
        L.dpo_loss([], [], [], [])
    with pytest.raises(ValueError, match="policy_chosen"):
        L.dpo_loss(["a", "b"], ok, ok, ok)


def test_core_dpo_rejects_bad_input():
    ok = np.array([-1.0, -2.0])
    out = [np.empty(2) for _ in range(5)]
    with pytest.raises(ValueError, match="'loss_type'"):
        _core.dpo_loss(*out, ok, ok, ok, ok, 0.1, "kto")
    with pytest.raises(ValueError, match="'beta'"):
        _core.dpo_loss(*out, ok, ok, ok, ok, 0.0)
    with pytest.raises(ValueError, match="'label_smoothing'"):
        _core.dpo_loss(*out, ok, ok, ok, ok, 0.1, "sigmoid", 0.6)
    with pytest.raises(ValueError, match="'policy_rejected'.*finite"):
        _core.dpo_loss(*out, ok, np.array([np.nan, 1.0]), ok, ok, 0.1)
    with pytest.raises(TypeError, match="'ref_chosen'.*float64"):
        _core.dpo_loss(*out, ok, ok, ok.astype(np.float32), ok, 0.1)
    with pytest.raises(ValueError, match="'grad_rejected'"):
        _core.dpo_loss(*out[:4], np.empty(3), ok, ok, ok, ok, 0.1)
    with pytest.raises(ValueError, match="'dlosses'.*finite"):
        _core.dpo_loss_backward(None, None, np.array([np.inf, 0.0]), ok, ok, ok, ok, 0.1)


# ---- sequence log-probs ----

def masked_sum_ref(lp, mask, average):
    m = mask.astype(np.float64)
    x = np.where(m != 0, lp.astype(np.float64), 0.0)
    s = (x * m).sum(axis=1)
    return s / m.sum(axis=1) if average else s


@pytest.mark.parametrize("B,T", [(1, 1), (2, 7), (5, 64), (3, 513)])
@pytest.mark.parametrize("mask_dtype", [np.float32, np.uint8, np.bool_])
@pytest.mark.parametrize("average", [False, True])
def test_seq_logps_matches_numpy(rng, B, T, mask_dtype, average):
    lp = (-rng.exponential(3.0, (B, T))).astype(np.float32)
    m = rng.random((B, T)) < 0.6
    m[:, -1] = True  # every row has at least one response token
    if mask_dtype == np.float32:
        mask = (m * rng.uniform(0.5, 2.0, (B, T))).astype(np.float32)
    else:
        mask = m.astype(mask_dtype)
    lp_pad = lp.copy()
    lp_pad[~m] = -np.inf  # padding may hold garbage: masked-out positions must be skipped
    if T > 1:
        lp_pad[0, 0] = np.nan if not m[0, 0] else lp_pad[0, 0]
    out = L.sequence_logps(lp_pad, mask, average=average)
    ref = masked_sum_ref(lp, mask, average)
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-12)  # double accumulation: exact-ish
    # backward ADDS dout * mask (/ count)
    dout = rng.standard_normal(B)
    d0 = rng.standard_normal((B, T)).astype(np.float32)
    d = L.sequence_logps_backward(dout, mask, average=average, dtoken_logp=d0.copy())
    mw = mask.astype(np.float64)
    g = dout[:, None] * mw / (mw.sum(axis=1, keepdims=True) if average else 1.0)
    np.testing.assert_allclose(d - d0, g, rtol=1e-6, atol=1e-6)
    assert np.all(d[~m] == d0[~m])


def test_seq_logps_is_linear_so_backward_matches_finite_difference(rng):
    B, T = 3, 9
    lp = rng.standard_normal((B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.7).astype(np.float32)
    mask[:, 0] = 1
    w = rng.standard_normal(B)
    g = L.sequence_logps_backward(w, mask, average=True)
    h = 1e-2
    for b, t in [(0, 0), (1, 3), (2, 8)]:
        up, dn = lp.copy(), lp.copy()
        up[b, t] += h
        dn[b, t] -= h
        fd = (w @ L.sequence_logps(up, mask, True) - w @ L.sequence_logps(dn, mask, True)) / (2 * h)
        assert abs(fd - g[b, t]) < 1e-4 * max(1, abs(g[b, t]))


def test_seq_logps_thread_count_invariant(rng):
    B, T = 64, 4200  # above the kernel's parallel threshold (2^18 tokens)
    lp = rng.standard_normal((B, T)).astype(np.float32)
    mask = (rng.random((B, T)) < 0.9).astype(np.uint8)
    before = _core.get_num_threads()
    try:
        res = []
        for n in (1, 2, 3):
            _core.set_num_threads(n)
            res.append(L.sequence_logps(lp, mask))
            res.append(L.sequence_logps_backward(np.arange(B, dtype=np.float64), mask, True))
    finally:
        _core.set_num_threads(before)
    for i in range(2, len(res)):
        np.testing.assert_array_equal(res[i], res[i % 2])


def test_all_zero_mask_rows_rejected(rng):
    lp = rng.standard_normal((3, 5)).astype(np.float32)
    mask = np.ones((3, 5), np.uint8)
    mask[1] = 0
    with pytest.raises(ValueError, match=r"row\(s\) \[1\]"):
        L.sequence_logps(lp, mask)
    with pytest.raises(ValueError, match="no response tokens"):
        L.sft_loss(lp, mask)
    with pytest.raises(ValueError, match="no response tokens"):
        L.sequence_logps_backward(np.ones(3), mask)
    # the C sum accepts an empty row (its sum is 0); the average rejects it by name
    out = np.empty(3)
    _core.seq_logps_forward(out, lp, mask)
    assert out[1] == 0.0
    with pytest.raises(ValueError, match="'mask' row 1"):
        _core.seq_logps_forward(out, lp, mask, average=True)
    with pytest.raises(ValueError, match="'mask' row 1"):
        _core.seq_logps_backward(np.zeros((3, 5), np.float32), np.ones(3), mask, average=True)


def test_seq_logps_rejects_bad_input():
    lp = np.zeros((2, 4), np.float32)
    out = np.empty(2)
    with pytest.raises(TypeError, match="'mask'.*float32, uint8 or bool"):
        _core.seq_logps_forward(out, lp, np.ones((2, 4), np.int64))
    with pytest.raises(ValueError, match="'mask'"):
        _core.seq_logps_forward(out, lp, np.ones((2, 5), np.uint8))
    with pytest.raises(ValueError, match="'mask' must be finite and >= 0"):
        _core.seq_logps_forward(out, lp, np.full((2, 4), -1.0, np.float32))
    with pytest.raises(ValueError, match="'mask' must be finite"):
        _core.seq_logps_forward(out, lp, np.full((2, 4), np.nan, np.float32))
    with pytest.raises(TypeError, match="'token_logp'.*float32"):
        _core.seq_logps_forward(out, lp.astype(np.float64), np.ones((2, 4), np.uint8))
    with pytest.raises(ValueError, match="'out'"):
        _core.seq_logps_forward(np.empty(3), lp, np.ones((2, 4), np.uint8))
    with pytest.raises(TypeError, match="'dout'.*float64"):
        _core.seq_logps_backward(lp.copy(), np.ones(2, np.float32), np.ones((2, 4), np.uint8))
    with pytest.raises(ValueError, match="mask must have the shape"):
        L.sequence_logps(lp, np.ones((2, 3)))
    with pytest.raises(ValueError, match="token_logp must be 2-D"):
        L.sequence_logps(np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="dout must have shape"):
        L.sequence_logps_backward(np.ones(3), np.ones((2, 4)))


def test_uses_average_logps_follows_trl():
    assert L.uses_average_logps("ipo") is True
    assert L.uses_average_logps("sigmoid") is False
    assert L.uses_average_logps("hinge") is False
    with pytest.raises(ValueError, match="loss_type"):
        L.uses_average_logps("dpo")


# ---- SFT ----

def test_sft_loss_matches_torch_cross_entropy(rng):
    B, T, V = 3, 11, 17
    logits = torch.tensor(rng.standard_normal((B, T, V)), dtype=torch.float64)
    labels = torch.tensor(rng.integers(0, V, (B, T)))
    mask = rng.random((B, T)) < 0.6
    mask[:, -1] = True
    logp = torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0]
    tok = logp.numpy().astype(np.float32)
    loss, dtok = L.sft_loss(tok, mask)
    ref = F.cross_entropy(logits.reshape(-1, V), torch.where(torch.tensor(mask), labels, -100).reshape(-1),
                          ignore_index=-100)
    assert abs(loss - ref.item()) < 1e-6 * max(1.0, abs(ref.item()))
    # gradient w.r.t. token log-probs: -1/N on masked positions, 0 elsewhere
    t = torch.tensor(tok, dtype=torch.float64, requires_grad=True)
    (-(t * torch.tensor(mask)).sum() / mask.sum()).backward()
    np.testing.assert_allclose(dtok, t.grad.numpy(), rtol=1e-6, atol=0)
    assert dtok.dtype == np.float32
