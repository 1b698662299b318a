"""Parameters without a gradient in a step (a branch not taken, a frozen layer).

Optimizers skip a parameter whose ``grad`` is ``None`` at ``step()``: weights and state stay as
they were. Its last update is therefore exactly 0, and the prediction rule
(docs/prediction.rst, "Parameters without a gradient") is

.. math::  \\hat W_{t+s} = W_t \\quad\\text{for a parameter the last step skipped,}

for every rule family, the generic fallback (which measures the update: 0) being the oracle,
and for the improved predictors (calibrated, roll-out). A step that updates it again brings
its direction back. Every optimizer class the registry test sweeps is swept here.
"""
from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import pytest
import torch
from torch import Tensor, nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.calibrated import CalibratedPredictor
from lookahead_opt.rollout import RolloutPredictor
from predictor_support import float64, grads, params, true_future  # noqa: F401
from test_rules_registry import EXACT_RTOL, NEEDS_CLOSURE, NEEDS_HESSIAN, build, cases, loss_of, make_params

# Which parameters get a gradient at each step: both, then the second only every third step
# (a branch taken one minibatch in three), ending on a step that skips it, then one that does not.
PATTERN = [(0, 1), (0, 1), (0,), (0,), (0, 1), (0,), (0,), (0, 1), (0,)]


def take_step(opt: PredictiveOptimizer, ps: Sequence[nn.Parameter], cls: type, used: Sequence[int]) -> None:
    """One step in which only ``ps[i]`` for ``i`` in ``used`` get a gradient (the others' ``grad``
    is ``None``, as after ``zero_grad()`` and a backward that did not reach them)."""
    def closure() -> Tensor:
        opt.zero_grad(set_to_none=True)
        loss = loss_of([ps[i] for i in used])
        loss.backward(create_graph=cls in NEEDS_HESSIAN)
        return loss

    if cls in NEEDS_CLOSURE:
        opt.step(closure)
    else:
        closure()
        opt.step()


def assert_agrees(pred: Sequence[Tensor], fallback: Sequence[Tensor], last: Sequence[Tensor],
                  w: Sequence[Tensor], s: int, closed_form: bool) -> None:
    """``pred`` equals the fallback's prediction and ``W_t - s (W_{t-1} - W_t)`` (closed-form rules
    to float64 rounding of the last update's size), and a parameter whose last update was 0 is
    predicted exactly in place."""
    scale = max(max(float(d.abs().max()) for d in last), 1e-300)
    for p, f, d, x in zip(pred, fallback, last, w):
        oracle = x - s * d
        if not bool(d.any()):
            assert torch.equal(p, x), "a parameter the last step skipped must be predicted in place"
        if closed_form:
            torch.testing.assert_close(p, oracle, rtol=0, atol=EXACT_RTOL * scale * max(s, 1))
            torch.testing.assert_close(p, f, rtol=0, atol=EXACT_RTOL * scale * max(s, 1))
        else:
            torch.testing.assert_close(p, oracle, rtol=1e-15, atol=1e-15 * scale)


@pytest.mark.parametrize("cls,variant", cases())
def test_branch_taken_one_step_in_three_agrees_with_the_fallback(cls, variant):
    """After every step of :data:`PATTERN`, ``predict(s)`` equals the fallback on the same
    trajectory and the update just applied extrapolated; a skipped parameter stays in place."""
    ps = make_params(cls)
    opt = PredictiveOptimizer(build(cls, variant, ps))
    twin_ps = [nn.Parameter(p.detach().clone()) for p in ps]
    twin = PredictiveOptimizer(build(cls, variant, twin_ps), rule="fallback")
    for used in PATTERN:
        before = [p.detach().clone() for p in ps]
        take_step(opt, ps, cls, used)
        take_step(twin, twin_ps, cls, used)
        w = [p.detach().clone() for p in ps]
        last = [a - b for a, b in zip(before, w)]
        if opt.rule.skips_without_grad:  # the optimizer really skipped it (else the rule would be wrong)
            assert all(not bool(last[i].any()) for i in range(len(ps)) if i not in used)
        for s in (1, 3):
            assert_agrees([x.clone() for x in opt.predict(s)], twin.predict(s), last, w, s, opt.rule.closed_form)
    assert all(torch.equal(a, b) for a, b in zip(ps, w))  # predict never changes the params


def _model_opt(make: Callable, rule: Optional[str] = None):
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    return m, PredictiveOptimizer(make(m.parameters()), rule=rule)


def _train_step(opt: PredictiveOptimizer, m: nn.Module, frozen: Sequence[nn.Parameter]) -> None:
    opt.zero_grad()
    m(torch.randn(8, 4, dtype=torch.float64)).square().mean().backward()
    for p in frozen:
        p.grad = None
    opt.step()


@pytest.mark.parametrize("make,rule", [
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), None),                  # stationary
    (lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "smoothed_gradient"),   # SpecTrain's
    (lambda ps: torch.optim.Adam(ps, lr=1e-2), None),                              # signature
    (lambda ps: torch.optim.NAdam(ps, lr=1e-2), None),                             # rebuilt each step
], ids=["sgd", "smoothed_gradient", "adam", "nadam"])
def test_kept_plan_follows_the_skipped_set(make, rule):
    """The kept plan is rebuilt when the set of skipped parameters changes, and otherwise
    kept (stationary rules) or refreshed per bucket (signature rules) as without skips; the
    prediction is always what a fresh wrapper with the same state makes, the skipped
    parameter in place."""
    m, opt = _model_opt(make, rule)
    first = m[0].weight
    for frozen in ([], [first], [first], [first], [], []):
        _train_step(opt, m, frozen)
        plan = None if opt._cache is None else opt._cache.plan
        pred = [t.clone() for t in opt.predict(2)]
        fresh = PredictiveOptimizer(opt.base, rule=opt.rule)
        fresh._kept = opt._kept
        fresh._set_skipped(opt.skipped)
        assert all(torch.equal(a, b) for a, b in zip(pred, fresh.predict(2)))
        assert opt.skipped == tuple(frozen)
        assert torch.equal(pred[0], first.detach()) == bool(frozen)
    if opt.rule.stationary:  # the same skipped set as the step before: nothing rebuilt
        _train_step(opt, m, [])
        opt.predict(2)
        assert opt._cache.plan is plan


def test_closure_step_sees_the_gradients_the_closure_made():
    """With ``step(closure)`` the skipped set is what the closure leaves (the gradients the
    optimizer is about to use), not what was there before."""
    m, opt = _model_opt(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    _train_step(opt, m, [])
    first = m[0].weight

    def closure() -> Tensor:
        opt.zero_grad()
        loss = m(torch.randn(8, 4, dtype=torch.float64)).square().mean()
        loss.backward()
        first.grad = None
        return loss

    _train_step(opt, m, [])  # gradients present before the closure runs
    opt.step(closure)
    assert opt.skipped == (first,)
    assert torch.equal(opt.predict(3)[0], first.detach())


def test_skipped_set_survives_a_checkpoint():
    """``state_dict``/``load_state_dict`` carry the skipped set: a resumed wrapper predicts
    what the original does (a checkpoint without it, from before, means none skipped)."""
    m, opt = _model_opt(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    _train_step(opt, m, [])
    _train_step(opt, m, [m[2].bias])
    sd = copy.deepcopy(opt.state_dict())
    m2, opt2 = _model_opt(lambda ps: torch.optim.Adam(ps, lr=1e-2))
    m2.load_state_dict(m.state_dict())
    opt2.load_state_dict(sd)
    assert opt2.skipped == (m2[2].bias,)
    assert all(torch.equal(a, b) for a, b in zip(opt.predict(2), opt2.predict(2)))
    del sd["lookahead"]["skipped"]
    opt2.load_state_dict(sd)
    assert opt2.skipped == ()


ADAM: Callable = lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=0.1)  # noqa: E731
SGDM: Callable = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0.1)  # noqa: E731


@pytest.mark.parametrize("make", [SGDM, ADAM], ids=["sgdm", "adam"])
def test_rollout_leaves_a_skipped_parameter_in_place_and_counts_its_steps(make):
    """The roll-out equals the real optimizer run on with the last gradients held fixed: a
    parameter without one stays where it is, and a parameter that missed earlier steps gets
    the bias corrections of its own (smaller) step count."""
    ps = params()
    po = PredictiveOptimizer(make(ps))
    roll = RolloutPredictor(po)
    for h, used in enumerate([(0, 1), (0,), (0,), (0, 1)]):  # ps[1] misses two steps
        g = [x if i in used else None for i, x in enumerate(grads(10 + h))]
        for p, x in zip(ps, g):
            p.grad = x
        po.step()
        got = [w.clone() for w in roll.predict(3)]
        torch.testing.assert_close(got, true_future(make, po, ps, g, 3), rtol=1e-10, atol=1e-12)
        if 1 not in used:
            assert torch.equal(got[1], ps[1].detach())


@pytest.mark.parametrize("displacement", ["linear", "rollout"])
def test_calibrated_leaves_a_skipped_parameter_in_place(displacement):
    ps = params()
    po = PredictiveOptimizer(SGDM(ps))
    cal = CalibratedPredictor(po, init_scale=0.7, displacement=displacement)
    for used in [(0, 1), (0,)]:
        for i, (p, x) in enumerate(zip(ps, grads(3))):
            p.grad = x if i in used else None
        po.step()
    pred = cal.predict(4)
    assert torch.equal(pred[1], ps[1].detach())
    assert not torch.equal(pred[0], ps[0].detach())


def test_fallback_measures_instead_of_marking():
    """The fallback keeps no skipped set (it measures the update: 0 for a skipped parameter,
    and right for an optimizer that moves parameters without a gradient, LBFGS)."""
    m, opt = _model_opt(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), "fallback")
    _train_step(opt, m, [])
    _train_step(opt, m, [m[0].weight])
    assert opt.skipped == ()
    assert torch.equal(opt.predict(2)[0], m[0].weight.detach())
