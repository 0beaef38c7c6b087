"""Tests of the optimiser (csrc/kernels/optim.c, cst/optim.py): AdamW and clipping against torch.optim.AdamW
and torch.nn.utils.clip_grad_norm_, the deterministic sum of squares, state round trips, bad input."""
import math

import numpy as np
import pytest
import torch

from cst import _core
from conftest import with_threads
from cst.optim import AdamW, clip_grad_norm


@pytest.mark.parametrize("n", [0, 1, 7, 8, 255, 256, 257, 10007, 1 << 20])
def test_sum_squares_matches_float64(rng, n):
    x = (rng.standard_normal(n) * 3).astype(np.float32)
    ref = float(np.sum(x.astype(np.float64) ** 2))
    s = _core.sum_squares(x)
    assert isinstance(s, float)
    assert abs(s - ref) <= 1e-13 * max(ref, 1.0)


def test_sum_squares_is_thread_count_independent(rng):
    x = (rng.standard_normal(300001) * 1e3).astype(np.float32)
    a = with_threads(1, lambda: _core.sum_squares(x))
    assert a == with_threads(2, lambda: _core.sum_squares(x))
    assert a == with_threads(3, lambda: _core.sum_squares(x))


def test_adamw_step_is_thread_count_independent(rng):
    n = 100003
    p0, g = (rng.standard_normal(n).astype(np.float32) for _ in range(2))

    def run():
        p, m, v = p0.copy(), np.zeros(n, np.float32), np.zeros(n, np.float32)
        for step in (1, 2):
            _core.adamw_step(p, g, m, v, 1e-2, 0.9, 0.99, 1e-8, 0.1, step, 0.7)
        return p, m, v

    for a, b in zip(with_threads(1, run), with_threads(3, run)):
        np.testing.assert_array_equal(a, b)


def test_adamw_step_single_update_matches_formula(rng):
    n = 1001
    p = rng.standard_normal(n).astype(np.float32)
    g = rng.standard_normal(n).astype(np.float32)
    m = rng.standard_normal(n).astype(np.float32) * 0.1
    v = np.abs(rng.standard_normal(n).astype(np.float32)) * 0.01
    lr, b1, b2, eps, wd, step, gs = 1e-2, 0.9, 0.95, 1e-8, 0.1, 3, 0.5
    P, G, M, Vv = (a.astype(np.float64) for a in (p, g, m, v))
    G = G * gs
    P = P * (1 - lr * wd)
    M = b1 * M + (1 - b1) * G
    Vv = b2 * Vv + (1 - b2) * G * G
    P = P - lr / (1 - b1 ** step) * M / (np.sqrt(Vv) / math.sqrt(1 - b2 ** step) + eps)
    g_before = g.copy()
    _core.adamw_step(p, g, m, v, lr, b1, b2, eps, wd, step, gs)
    np.testing.assert_array_equal(g, g_before)
    for got, ref in ((p, P), (m, M), (v, Vv)):
        assert np.abs(got - ref).max() <= 1e-6 * np.abs(ref).max()


def quadratic_problem(rng, sizes):
    """Loss = sum_i 0.5 * a_i * (p_i - t_i)^2 with positive curvatures: gradient a * (p - t)."""
    a = [(rng.random(n) * 5 + 0.1).astype(np.float32) for n in sizes]
    t = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    p0 = [rng.standard_normal(n).astype(np.float32) for n in sizes]
    return a, t, p0


@pytest.mark.parametrize("wd,max_norm,betas", [(0.1, 1.0, (0.9, 0.999)), (0.0, 0.5, (0.8, 0.95)),
                                               (0.01, 1e6, (0.3, 0.9))])
def test_adamw_trajectory_matches_torch(rng, wd, max_norm, betas):
    sizes = [37, 1000, 5]
    a, t, p0 = quadratic_problem(rng, sizes)
    params = [p.copy() for p in p0]
    opt = AdamW(lr=3e-2, betas=betas, eps=1e-8, weight_decay=wd)
    tp = [torch.nn.Parameter(torch.from_numpy(p.copy())) for p in p0]
    topt = torch.optim.AdamW(tp, lr=3e-2, betas=betas, eps=1e-8, weight_decay=wd)
    clipped = 0
    for step in range(20):
        lr = 3e-2 * (1 - step / 40)  # a schedule, passed per step
        grads = [ai * (pi - ti) for ai, pi, ti in zip(a, params, t)]
        total, scale = clip_grad_norm(grads, max_norm)
        opt.step(params, grads, lr=lr, grad_scale=scale)

        topt.zero_grad()
        loss = sum((0.5 * torch.from_numpy(ai) * (pi - torch.from_numpy(ti)) ** 2).sum()
                   for ai, pi, ti in zip(a, tp, t))
        loss.backward()
        tnorm = float(torch.nn.utils.clip_grad_norm_(tp, max_norm))
        for group in topt.param_groups:
            group["lr"] = lr
        topt.step()

        assert abs(total - tnorm) <= 1e-5 * tnorm
        clipped += scale < 1.0
        for p, q in zip(params, tp):
            ref = q.detach().numpy()
            assert np.linalg.norm(p - ref) / np.linalg.norm(ref) < 1e-5
    assert opt.step_count == 20
    if max_norm < 10:
        assert clipped > 0  # the test exercises clipping


def test_adamw_single_flat_array_and_state_round_trip(rng):
    n = 513
    a, t, p0 = quadratic_problem(rng, [n])
    a, t, p0 = a[0], t[0], p0[0]
    ref = p0.copy()
    ref_opt = AdamW(lr=1e-2, weight_decay=0.05)
    for _ in range(10):
        ref_opt.step(ref, a * (ref - t))

    p = p0.copy()
    opt = AdamW(lr=1e-2, weight_decay=0.05)
    for _ in range(5):
        opt.step(p, a * (p - t))
    state = opt.state_dict()
    assert state["step"] == 5 and state["m"][0].shape == (n,) and state["v"][0].dtype == np.float32
    p_saved = p.copy()
    # Keep going with the original, and with a fresh optimiser loaded from the state.
    opt2 = AdamW(lr=0.5, weight_decay=0.0)
    opt2.load_state_dict(state)
    assert opt2.lr == 1e-2 and opt2.weight_decay == 0.05
    for _ in range(5):
        opt.step(p, a * (p - t))
        opt2.step(p_saved, a * (p_saved - t))
    np.testing.assert_array_equal(p, ref)
    np.testing.assert_array_equal(p_saved, ref)
    # state_dict holds copies: mutating it does not touch the optimiser.
    state["m"][0][:] = 123.0
    assert not np.any(opt.m[0] == 123.0)


def test_clip_grad_norm_matches_torch(rng):
    grads = [rng.standard_normal(n).astype(np.float32) * 4 for n in (3, 100, 17)]
    for max_norm in (0.1, 1.0, 1e4):
        total, scale = clip_grad_norm(grads, max_norm)
        tg = [torch.nn.Parameter(torch.zeros(len(g))) for g in grads]
        for p, g in zip(tg, grads):
            p.grad = torch.from_numpy(g.copy())
        tn = float(torch.nn.utils.clip_grad_norm_(tg, max_norm))
        assert abs(total - tn) <= 1e-6 * tn
        assert scale == min(1.0, max_norm / (total + 1e-6))
        for p, g in zip(tg, grads):
            assert np.abs(p.grad.numpy() - g * np.float32(scale)).max() <= 1e-6 * np.abs(g).max()
    z = np.zeros(10, np.float32)
    assert clip_grad_norm(z, 1.0) == (0.0, 1.0)


def test_optim_rejects_bad_input():
    p = np.zeros(4, np.float32)
    args = (1e-3, 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(TypeError, match="'param'.*float32"):
        _core.adamw_step(p.astype(np.float64), p.copy(), p.copy(), p.copy(), *args)
    with pytest.raises(ValueError, match="'grad'"):
        _core.adamw_step(p.copy(), np.zeros(5, np.float32), p.copy(), p.copy(), *args)
    with pytest.raises(ValueError, match="'v'.*dimensions"):
        _core.adamw_step(p.copy(), p.copy(), p.copy(), np.zeros((2, 2), np.float32), *args)
    with pytest.raises(ValueError, match="'step'"):
        _core.adamw_step(p.copy(), p.copy(), p.copy(), p.copy(), 1e-3, 0.9, 0.999, 1e-8, 0.0, 0)
    with pytest.raises(ValueError, match="'beta1'"):
        _core.adamw_step(p.copy(), p.copy(), p.copy(), p.copy(), 1e-3, 1.0, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="'lr'"):
        _core.adamw_step(p.copy(), p.copy(), p.copy(), p.copy(), float("nan"), 0.9, 0.999, 1e-8, 0.0, 1)
    with pytest.raises(ValueError, match="distinct"):
        _core.adamw_step(p, p.copy(), p, p.copy(), *args)
    with pytest.raises(TypeError, match="'x'.*float32"):
        _core.sum_squares(np.zeros(3, np.float64))
    with pytest.raises(ValueError, match="betas"):
        AdamW(betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="lr"):
        AdamW(lr=-1.0)
    opt = AdamW()
    with pytest.raises(TypeError, match="'params_flat'.*float32"):
        opt.step(p.astype(np.float64), p)
    with pytest.raises(ValueError, match="elements"):
        opt.step(p, np.zeros(5, np.float32))
    with pytest.raises(ValueError, match="2 parameter arrays but 1"):
        opt.step([p, p.copy()], [p.copy()])
    opt.step(p, np.ones(4, np.float32))
    with pytest.raises(ValueError, match="sizes differ"):
        opt.step(np.zeros(3, np.float32), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm(p, 0.0)
    with pytest.raises(TypeError, match="'grads_flat\\[1\\]'"):
        clip_grad_norm([p, [1.0]], 1.0)
    with pytest.raises(ValueError, match="'step'"):
        opt.load_state_dict({"step": -1, "m": None, "v": None})
