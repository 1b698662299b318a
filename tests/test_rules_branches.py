"""Branches of the torch_optimizer rules that the registry sweep (4 steps of a smooth loss,
defaults) does not reach: AdamP/SGDP projected steps, SWATS's SGD phase, AdaBelief's
rectified phase, PID's first step, optimizers whose groups hold lr=None. Each: the prediction
reproduces the last update (to float64 rounding) and agrees with the fallback."""
from __future__ import annotations

import pytest
import torch
import torch_optimizer

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.rules import projected
from test_rules_registry import EXACT_RTOL, loss_of


def scale_invariant(params):
    """A loss of W/|W| per row: its gradient is orthogonal to every row (AdamP/SGDP project)."""
    w = params[0]
    return (((w / w.norm(dim=1, keepdim=True)) - 0.3) ** 2).sum() + ((params[1] - 0.3) ** 2).sum()


def params64():
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in ((4, 3), (3,))]


def trained(make, steps, loss=loss_of, prep=None, rule=None):
    params = params64()
    opt = PredictiveOptimizer(make(params), **({} if rule is None else {"rule": rule}))
    if prep is not None:
        prep(opt)
    prev = None
    for _ in range(steps):
        prev = [p.detach().clone() for p in params]
        opt.zero_grad()
        loss(params).backward()
        opt.step()
    return opt, params, prev


def assert_reconstructs(make, steps, loss=loss_of, prep=None):
    opt, params, prev = trained(make, steps, loss, prep)
    twin, twin_params, _ = trained(make, steps, loss, prep, rule="fallback")
    assert opt.rule.closed_form
    for s in (1, 3):
        for p, a, x, f in zip(params, prev, opt.predict(s), twin.predict(s)):
            d = a - p.detach()
            tol = EXACT_RTOL * float(d.abs().max()) * s
            torch.testing.assert_close(x, p.detach() - s * d, rtol=0, atol=tol)
            torch.testing.assert_close(x, f, rtol=0, atol=tol)
    return opt, params


@pytest.mark.parametrize("make", [
    lambda ps: torch_optimizer.AdamP(ps, lr=0.01, weight_decay=0.1),
    lambda ps: torch_optimizer.SGDP(ps, lr=0.01, momentum=0.9, weight_decay=0.1),
], ids=["AdamP", "SGDP"])
def test_projected_steps_go_to_the_fallback(make):
    opt, params = assert_reconstructs(make, 4, loss=scale_invariant)
    assert list(opt._kept) == [params[0]]  # only the projected matrix keeps W_{t-1}
    # why: the state-only direction misses the removed radial component entirely
    opt2, params2, prev2 = trained(make, 4, loss=scale_invariant)
    g = opt2.param_groups[0]
    w = params2[0].detach()
    d = prev2[0] - w
    state_rule = projected._adamp if isinstance(opt2.base, torch_optimizer.AdamP) else projected._sgdp
    dw = state_rule(g, opt2.base.state[params2[0]], w, None).materialize(w)
    assert float((g["lr"] * dw - d).abs().max()) > 0.3 * float(d.abs().max())


def test_unprojected_steps_keep_nothing():
    opt, _ = assert_reconstructs(lambda ps: torch_optimizer.AdamP(ps, lr=0.01, weight_decay=0.1), 4)
    assert not opt._kept


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("steps", [1, 3])
def test_swats_sgd_phase(steps, nesterov):
    def sgd_phase(opt):
        opt.param_groups[0]["phase"] = "SGD"
    opt, _ = assert_reconstructs(lambda ps: torch_optimizer.SWATS(ps, lr=0.01, nesterov=nesterov), steps,
                                 prep=sgd_phase)
    assert bool(opt._kept) == (steps == 1)  # only the first SGD step needs the fallback


@pytest.mark.parametrize("kw", [{}, {"amsgrad": True, "weight_decouple": True, "weight_decay": 0.1}])
def test_adabelief_rectified_phase(kw):
    opt, params = assert_reconstructs(lambda ps: torch_optimizer.AdaBelief(ps, lr=0.01, rectify=True, **kw), 8)
    assert opt.base.state[params[0]]["rho_t"] > 4


@pytest.mark.parametrize("steps", [1, 2, 3])
def test_pid_first_step_goes_to_the_fallback(steps):
    opt, _ = assert_reconstructs(lambda ps: torch_optimizer.PID(ps, lr=0.01, momentum=0.9), steps)
    assert bool(opt._kept) == (steps == 1)


@pytest.mark.parametrize("make", [
    lambda ps: torch_optimizer.A2GradUni(ps),
    lambda ps: torch_optimizer.Adafactor(ps),
    lambda ps: torch_optimizer.Adafactor(ps, beta1=0.9, weight_decay=0.1),
], ids=["A2GradUni", "Adafactor", "Adafactor-beta1"])
def test_groups_with_lr_none(make):
    opt, params, prev = trained(make, 3)
    assert opt.param_groups[0]["lr"] is None
    for p, a, x in zip(params, prev, opt.predict(2)):
        d = a - p.detach()
        torch.testing.assert_close(x, p.detach() - 2 * d, rtol=0, atol=EXACT_RTOL * float(d.abs().max()))


def test_adabound_clamp_and_lr_change():
    """The bounds are active (final_lr small, gamma large); after halving lr the applied-update
    direction is rescaled by lr_now/lr_step."""
    opt, params = assert_reconstructs(
        lambda ps: torch_optimizer.AdaBound(ps, lr=0.01, final_lr=1e-3, gamma=0.5), 4)
    d = opt.rule.direction(opt.rule.settings(opt.base, 0) | opt.param_groups[0], opt.state[params[0]],
                           params[0].detach(), None)
    rate = 1 / (d.scale * d.den.sqrt() + d.eps)
    assert bool(((rate < d.bounds[0]) | (rate > d.bounds[1])).any())  # the clamp is active
    w = [p.detach().clone() for p in params]
    one = [w_ - x for w_, x in zip(w, [x.clone() for x in opt.predict(1)])]
    opt.param_groups[0]["lr"] = 0.005
    for w_, o, x in zip(w, one, opt.predict(1)):
        torch.testing.assert_close(w_ - x, 0.5 * o, rtol=1e-12, atol=1e-15)
