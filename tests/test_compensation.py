"""lookahead_opt.compensation: each compensation against the plain step (bit for bit where the
compensation is the identity) and against its closed form written out by hand here."""
from __future__ import annotations

import math
from typing import List, Optional

import pytest
import torch

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.compensation import (DCASGD, Chain, Compensation, DelayMomentum, PipeMareLR, SpikeCompensation,
                                        StepContext)

pytestmark = pytest.mark.usefixtures("float64")

SHAPES = [(3, 2), (4,)]
LR = 0.1


def params() -> List[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in SHAPES]


def grads(step: int) -> List[torch.Tensor]:
    """The gradients of step ``step``: the same for every optimizer compared."""
    g = torch.Generator().manual_seed(100 + step)
    return [torch.randn(*s, generator=g) for s in SHAPES]


def wrapped(cls: type, rule: Optional[str] = None, **kw) -> PredictiveOptimizer:
    return PredictiveOptimizer(cls(params(), **{"lr": LR, **kw}), rule=rule)


def ctx(delay: int, step: int = 0, **kw) -> StepContext:
    return StepContext(delay=delay, step=step, **kw)


def step(opt: PredictiveOptimizer, comp: Compensation, c: StepContext, t: int) -> None:
    for p, g in zip(opt.params, grads(t)):
        p.grad = g.clone()
    comp(opt, opt.step, c)


def plain(opt: PredictiveOptimizer, t: int) -> None:
    step(opt, Compensation(), ctx(0), t)


def weights(opt: PredictiveOptimizer) -> List[torch.Tensor]:
    return [p.detach().clone() for p in opt.params]


def assert_equal(a: List[torch.Tensor], b: List[torch.Tensor]) -> None:
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def assert_close(a: List[torch.Tensor], b: List[torch.Tensor]) -> None:
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=1e-12, atol=1e-14)


OPTIMIZERS = [
    (torch.optim.SGD, {"momentum": 0.9, "weight_decay": 0.01}),
    (torch.optim.SGD, {"momentum": 0.9, "dampening": 0.2, "maximize": True}),
    (torch.optim.SGD, {"momentum": 0.9, "nesterov": True}),
    (torch.optim.Adam, {"weight_decay": 0.01}),
    (torch.optim.AdamW, {"weight_decay": 0.01, "amsgrad": True}),
]


# -- the identity cases, bit for bit ----------------------------------------------------
@pytest.mark.parametrize("cls, kw", OPTIMIZERS)
@pytest.mark.parametrize("make, delay", [
    (lambda: PipeMareLR(warmup=10), 0), (lambda: PipeMareLR(warmup=10), 1), (SpikeCompensation, 0),
    (DelayMomentum, 0), (lambda: DelayMomentum(target=0.99), 0), (DCASGD, 0),
    (lambda: Chain(PipeMareLR(warmup=10), DelayMomentum(), SpikeCompensation()), 0)])
def test_identity_cases_are_the_plain_step_bit_for_bit(cls, kw, make, delay):
    comp, ref, opt = make(), wrapped(cls, **kw), wrapped(cls, **kw)
    for t in range(4):
        plain(ref, t)
        step(opt, comp, ctx(delay, t, forward_weights=[w + 1 for w in weights(opt)]), t)
        assert_equal(weights(opt), weights(ref))


# -- PipeMare ------------------------------------------------------------------------------
@pytest.mark.parametrize("cls, kw", OPTIMIZERS[:1] + OPTIMIZERS[3:4])
def test_pipemare_is_the_closed_form_lr_then_the_base_schedule(cls, kw):
    """Warm-up: each step is the plain step at lr(t) * tau^-(1 - t/K), bit for bit; from t = K
    on the base schedule (a torch lr scheduler's) exactly; group lr objects never changed."""
    K, tau = 4, 3
    opt, ref = wrapped(cls, **kw), wrapped(cls, **kw)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 0.9 ** t)
    seen: List[float] = []
    opt.base.register_step_pre_hook(lambda o, a, k: seen.append(o.param_groups[0]["lr"]))
    comp = PipeMareLR(warmup=K)
    for t in range(K + 3):
        scheduled = opt.param_groups[0]["lr"]
        expect = LR * 0.9 ** t * tau ** -(1 - t / K) if t < K else scheduled
        ref.param_groups[0]["lr"] = expect
        plain(ref, t)
        step(opt, comp, ctx(tau, t), t)
        assert seen[-1] == expect and opt.param_groups[0]["lr"] is scheduled
        assert_equal(weights(opt), weights(ref))
        sched.step()
    assert seen[0] != LR  # the warm-up did change the lr


def test_pipemare_restores_the_lr_when_the_step_raises():
    opt = wrapped(torch.optim.SGD, momentum=0.9)

    def fail() -> None:
        raise RuntimeError("step failed")
    with pytest.raises(RuntimeError, match="step failed"):
        PipeMareLR(warmup=5)(opt, fail, ctx(4))
    assert opt.param_groups[0]["lr"] == LR
    with pytest.raises(ValueError, match="warmup"):
        PipeMareLR(warmup=0)


# -- Spike Compensation, SGD-momentum --------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"weight_decay": 0.05}, {"weight_decay": 0.05, "maximize": True}])
def test_spike_delay_1_is_torch_nesterov(kw):
    """D = 1: a = m, b = 1, the update m v + g' is torch's nesterov=True."""
    opt, ref = wrapped(torch.optim.SGD, momentum=0.9, **kw), wrapped(torch.optim.SGD, momentum=0.9, nesterov=True, **kw)
    for t in range(6):
        step(opt, SpikeCompensation(), ctx(1, t), t)
        plain(ref, t)
        assert_close(weights(opt), weights(ref))


def sgd_closed_form(w, v, g, m, dampening, wd, lr, delay, first, nesterov=False, sign=1.0):
    """One SC step of SGD-m by hand: g' = ±g + wd w, v' = m v + c g', w - lr (a v' + b c g')."""
    gp = sign * g + wd * w
    c = 1.0 if first else 1.0 - dampening
    v = gp.clone() if first else m * v + c * gp
    d = delay + 1 if nesterov else delay
    a, b = m ** d, sum(m ** j for j in range(d))
    return w - lr * (a * v + b * c * gp), v


@pytest.mark.parametrize("kw", [{"dampening": 0.1, "weight_decay": 0.05}, {"nesterov": True, "weight_decay": 0.05},
                                {"maximize": True}])
def test_spike_sgd_closed_form_at_delay_3(kw):
    m, D = 0.9, 3
    opt = wrapped(torch.optim.SGD, momentum=m, **kw)
    args = dict(m=m, dampening=kw.get("dampening", 0.0), wd=kw.get("weight_decay", 0.0), lr=LR, delay=D,
                nesterov=kw.get("nesterov", False), sign=-1.0 if kw.get("maximize") else 1.0)
    w0 = weights(opt)
    step(opt, SpikeCompensation(), ctx(D), 0)  # the first step: the buffer starts as g'
    first = [sgd_closed_form(w, None, g, first=True, **args) for w, g in zip(w0, grads(0))]
    assert_close(weights(opt), [w for w, _ in first])
    plain(opt, 1)
    w1 = weights(opt)
    v1 = [opt.state[p]["momentum_buffer"].clone() for p in opt.params]
    step(opt, SpikeCompensation(), ctx(D, 2), 2)
    expect = [sgd_closed_form(w, v, g, first=False, **args)[0] for w, v, g in zip(w1, v1, grads(2))]
    assert_close(weights(opt), expect)
    assert not all(torch.allclose(x, y) for x, y in zip(expect, [w - LR * v for w, v in zip(w1, v1)]))


# -- Spike Compensation, Adam/AdamW ---------------------------------------------------
ADAMS = [(torch.optim.Adam, {"weight_decay": 0.05}),
         (torch.optim.Adam, {"maximize": True, "amsgrad": True, "betas": (0.9, 0.5)}),  # b2 small: max > v
         (torch.optim.AdamW, {"weight_decay": 0.05})]


def adam_closed_form(w, s, g, t, delay, b1, b2, eps, lr, wd, decoupled, amsgrad, sign):
    """One SC step of Adam by hand from the state ``s`` before it (t: this step's count)."""
    gp = sign * g + (0.0 if decoupled else wd) * w
    m = b1 * s["exp_avg"] + (1 - b1) * gp
    v = b2 * s["exp_avg_sq"] + (1 - b2) * gp * gp
    if amsgrad:
        v = torch.maximum(s["max_exp_avg_sq"], v)
    a = b1 ** delay
    num = (a * m + (1 - a) * gp) / (1 - b1 ** (t + delay))
    den = (v / (1 - b2 ** t)).sqrt() + eps
    return w * (1 - lr * wd if decoupled else 1.0) - lr * num / den


@pytest.mark.parametrize("cls, kw", ADAMS)
def test_spike_adam_closed_form_at_delay_2(cls, kw):
    D, eps = 2, 1e-8
    b1, b2 = kw.get("betas", (0.9, 0.999))
    opt = wrapped(cls, **kw)
    args = dict(delay=D, b1=b1, b2=b2, eps=eps, lr=LR, wd=kw.get("weight_decay", 0.0),
                decoupled=cls is torch.optim.AdamW, amsgrad=kw.get("amsgrad", False),
                sign=-1.0 if kw.get("maximize") else 1.0)
    zero = {k: torch.zeros(()) for k in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")}
    w0 = weights(opt)
    step(opt, SpikeCompensation(), ctx(D), 0)
    assert_close(weights(opt), [adam_closed_form(w, zero, g, 1, **args) for w, g in zip(w0, grads(0))])
    for t in (1, 2):
        plain(opt, t)
    w3 = weights(opt)
    states = [{k: v.clone() for k, v in opt.state[p].items()} for p in opt.params]
    step(opt, SpikeCompensation(), ctx(D, 3), 3)
    assert_close(weights(opt), [adam_closed_form(w, s, g, 4, **args) for w, s, g in zip(w3, states, grads(3))])
    assert not args["amsgrad"] or any((s["max_exp_avg_sq"] > s["exp_avg_sq"]).any() for s in opt.state.values())


def test_spike_adam_first_numerator_is_the_gradient():
    """The compensated numerator's weights sum to 1 - b1^(t+D): at t = 1 it is g' itself, for any D."""
    for D in (1, 5):
        opt = wrapped(torch.optim.Adam, eps=0.0)
        w0 = weights(opt)
        step(opt, SpikeCompensation(), ctx(D), 0)
        assert_close(weights(opt), [w - LR * g.sign() for w, g in zip(w0, grads(0))])


@pytest.mark.parametrize("cls, kw", [(torch.optim.SGD, {"momentum": 0.9}), (torch.optim.Adam, {})])
def test_a_tensor_lr_gives_the_float_lr_result(cls, kw):
    comp = Chain(PipeMareLR(warmup=5), SpikeCompensation())
    opt, ref = wrapped(cls, **kw, lr=torch.tensor(LR), foreach=False), wrapped(cls, **kw)
    for t in range(3):
        step(opt, comp, ctx(3, t), t)
        step(ref, comp, ctx(3, t), t)
        assert_close(weights(opt), weights(ref))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)


def test_spike_refuses_what_it_cannot_derive():
    with pytest.raises(TypeError, match="RMSprop"):
        step(wrapped(torch.optim.RMSprop, momentum=0.9), SpikeCompensation(), ctx(2), 0)
    with pytest.raises(ValueError, match="differentiable=False"):
        step(wrapped(torch.optim.SGD, momentum=0.9, differentiable=True), SpikeCompensation(), ctx(2), 0)


# -- delay-dependent momentum ----------------------------------------------------------
@pytest.mark.parametrize("comp, expect", [
    (DelayMomentum(), lambda m, D, N: max(0.0, m - D / (D + 1))),
    (DelayMomentum(floor=-0.5), lambda m, D, N: m - D / (D + 1)),
    (DelayMomentum(target=0.99), lambda m, D, N: m + (0.99 - m) * min(D / N, 1))])
@pytest.mark.parametrize("D", [1, 3, 9])
def test_delay_momentum_closed_form_sgd_and_adam(comp, expect, D):
    N, m = 8, 0.9
    mD = expect(m, D, N)
    assert comp.momentum(m, ctx(D, num_stages=N)) == pytest.approx(mD)
    sgd = wrapped(torch.optim.SGD, momentum=m)
    plain(sgd, 0)
    w, v = weights(sgd), [sgd.state[p]["momentum_buffer"].clone() for p in sgd.params]
    group = sgd.param_groups[0]
    step(sgd, comp, ctx(D, 1, num_stages=N), 1)
    assert group["momentum"] == m
    assert_close(weights(sgd), [w - LR * (mD * v + g) for w, v, g in zip(w, v, grads(1))])

    adam = wrapped(torch.optim.Adam)
    plain(adam, 0)
    betas = adam.param_groups[0]["betas"]
    w, states = weights(adam), [{k: x.clone() for k, x in adam.state[p].items()} for p in adam.params]
    step(adam, comp, ctx(D, 1, num_stages=N), 1)
    assert adam.param_groups[0]["betas"] is betas
    expect_w = []
    for x, s, g in zip(w, states, grads(1)):
        mt = mD * s["exp_avg"] + (1 - mD) * g
        vt = 0.999 * s["exp_avg_sq"] + 0.001 * g * g
        expect_w.append(x - LR * (mt / (1 - mD ** 2)) / ((vt / (1 - 0.999 ** 2)).sqrt() + 1e-8))
    assert_close(weights(adam), expect_w)


def test_delay_momentum_arguments():
    with pytest.raises(ValueError, match="target"):
        DelayMomentum(target=1.0)
    with pytest.raises(ValueError, match="floor"):
        DelayMomentum(floor=-1.0)
    with pytest.raises(TypeError, match="neither 'momentum' nor 'betas'"):
        step(wrapped(torch.optim.Adagrad), DelayMomentum(), ctx(2), 0)


# -- DC-ASGD -----------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [{}, {"momentum": 0.9, "weight_decay": 0.05}, {"maximize": True}])
def test_dcasgd_closed_form(kw):
    lam, wd = 0.5, kw.get("weight_decay", 0.0)
    sign = -1.0 if kw.get("maximize") else 1.0
    opt = wrapped(torch.optim.SGD, **kw)
    w = weights(opt)
    fwd = [x - 0.3 * torch.arange(x.numel()).reshape(x.shape) for x in w]
    gs = grads(0)
    for p, g in zip(opt.params, gs):
        p.grad = g.clone()
    before = [p.grad for p in opt.params]
    DCASGD(lam)(opt, opt.step, ctx(2, forward_weights=fwd))
    assert all(p.grad is g for p, g in zip(opt.params, before)) and all(map(torch.equal, before, gs))
    tilde = [g + sign * lam * g * g * (x - f) for g, x, f in zip(gs, w, fwd)]
    assert_close(weights(opt), [x - LR * (sign * gt + wd * x) for x, gt in zip(w, tilde)])  # v = g' at step 1


def test_dcasgd_at_the_forward_weights_is_plain():
    """A delay with W_t == W_fwd: the correction is exactly 0."""
    opt, ref = wrapped(torch.optim.Adam), wrapped(torch.optim.Adam)
    for t in range(3):
        step(opt, DCASGD(1.0), ctx(3, t, forward_weights=weights(opt)), t)
        plain(ref, t)
        assert_equal(weights(opt), weights(ref))
    with pytest.raises(ValueError, match="forward_weights"):
        step(opt, DCASGD(), ctx(3), 3)
    assert Chain(PipeMareLR(warmup=2), DCASGD()).needs_forward_weights
    assert not Chain(PipeMareLR(warmup=2), SpikeCompensation()).needs_forward_weights


# -- composition ---------------------------------------------------------------------------
def test_chain_pipemare_and_spike_is_the_closed_form_of_both():
    """w <- w - lr tau^-(1-t/K) (a v + b c g'), delays changing from step to step."""
    m, damp, wd, K = 0.9, 0.1, 0.01, 4
    opt = wrapped(torch.optim.SGD, momentum=m, dampening=damp, weight_decay=wd)
    comp = Chain(PipeMareLR(warmup=K), SpikeCompensation())
    w, v = weights(opt), [None] * len(SHAPES)
    for t, D in enumerate([3, 3, 2, 5, 1, 4]):
        step(opt, comp, ctx(D, t), t)
        lr = LR * max(D, 1) ** -(1 - min(t / K, 1))
        out = [sgd_closed_form(x, b, g, m, damp, wd, lr, D, first=t == 0) for x, b, g in zip(w, v, grads(t))]
        w, v = [x for x, _ in out], [b for _, b in out]
        assert_close(weights(opt), w)
    assert opt.param_groups[0]["lr"] == LR


def test_chain_delay_momentum_then_spike_uses_the_lowered_momentum():
    m, D = 0.9, 2
    mD = m - D / (D + 1)
    opt = wrapped(torch.optim.SGD, momentum=m)
    plain(opt, 0)
    w, v = weights(opt), [opt.state[p]["momentum_buffer"].clone() for p in opt.params]
    step(opt, Chain(DelayMomentum(), SpikeCompensation()), ctx(D, 1), 1)
    assert_close(weights(opt), [sgd_closed_form(x, b, g, mD, 0.0, 0.0, LR, D, first=False)[0]
                                for x, b, g in zip(w, v, grads(1))])


# -- what the prediction sees after a compensated step -----------------------------------
@pytest.mark.parametrize("rule", [None, "fallback"])
@pytest.mark.parametrize("comp", [SpikeCompensation(), PipeMareLR(warmup=10), DelayMomentum()])
def test_sgd_prediction_after_a_compensated_step_extrapolates_lr_v(rule, comp):
    """Both rules predict W_t - s lr v with the group's (restored) lr: the closed-form rule reads
    the momentum buffer, the fallback the base step's update (measured before a correction)."""
    opt = wrapped(torch.optim.SGD, rule=rule, momentum=0.9)
    plain(opt, 0)
    step(opt, comp, ctx(3, 1), 1)
    w, v = weights(opt), [opt.state[p]["momentum_buffer"] for p in opt.params]
    assert_close(opt.predict(2), [x - 2 * LR * b for x, b in zip(w, v)])


def test_nesterov_prediction_after_delay_momentum_uses_the_groups_momentum():
    """The SGD rule's Nesterov direction g' + m v reads m at prediction time: the group's own m,
    while the step used m_D (so it is not the update just applied)."""
    opt = wrapped(torch.optim.SGD, momentum=0.9, nesterov=True)
    plain(opt, 0)
    step(opt, DelayMomentum(), ctx(1, 1), 1)
    v = [opt.state[p]["momentum_buffer"] for p in opt.params]
    assert_close(opt.predict(2), [x - 2 * LR * (g + 0.9 * b) for x, g, b in zip(weights(opt), grads(1), v)])


def adam_extrapolated(opt: PredictiveOptimizer, s: int) -> List[torch.Tensor]:
    """W_t - s lr m_hat / (sqrt(v_hat) + eps) from the state, with the default betas, at t = 2."""
    out = []
    for x, p in zip(weights(opt), opt.params):
        st = opt.state[p]
        den = (st["exp_avg_sq"] / (1 - 0.999 ** 2)).sqrt() + 1e-8
        out.append(x - s * LR * (st["exp_avg"] / (1 - 0.9 ** 2)) / den)
    return out


@pytest.mark.parametrize("rule", [None, "fallback"])
def test_adam_prediction_after_a_spike_step_is_the_base_direction(rule):
    """SC changes the weights after the step, not the state: the Adam rule and the fallback (the
    base step's update) both extrapolate lr m_hat / (sqrt(v_hat) + eps)."""
    opt = wrapped(torch.optim.Adam, rule=rule)
    plain(opt, 0)
    step(opt, SpikeCompensation(), ctx(3, 1), 1)
    assert_close(opt.predict(2), adam_extrapolated(opt, 2))


def test_adam_prediction_after_delay_momentum_uses_the_groups_beta1():
    """The Adam rule's bias correction reads betas[0] at prediction time: the group's own b1, not
    the lowered one the step used (a difference that vanishes as b1^t -> 0)."""
    opt = wrapped(torch.optim.Adam)
    plain(opt, 0)
    step(opt, DelayMomentum(), ctx(1, 1), 1)
    assert_close(opt.predict(2), adam_extrapolated(opt, 2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kw", [{}, {"fused": True}, {"capturable": True}])
def test_no_host_synchronisation_on_cuda(kw):
    ps = [torch.nn.Parameter(torch.randn(*s, device="cuda")) for s in SHAPES]
    opt = PredictiveOptimizer(torch.optim.Adam(ps, lr=LR, **kw))
    comp = Chain(DCASGD(), PipeMareLR(warmup=3), DelayMomentum(), SpikeCompensation())
    fwd = [p.detach() - 0.1 for p in ps]
    for p in ps:
        p.grad = torch.randn_like(p)
    comp(opt, opt.step, ctx(2, 0, forward_weights=fwd))  # warm up allocations outside the check
    torch.cuda.set_sync_debug_mode("error")
    try:
        comp(opt, opt.step, ctx(2, 1, forward_weights=fwd))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert all(torch.isfinite(p).all() for p in ps)


def test_reprs():
    assert repr(Chain(PipeMareLR(warmup=3), SpikeCompensation(), DelayMomentum(target=0.99), DCASGD(0.1))) == (
        "Chain(PipeMareLR(warmup=3), SpikeCompensation(), DelayMomentum(target=0.99, floor=0.0), DCASGD(lam=0.1))")
    assert math.isclose(PipeMareLR(warmup=4).factor(ctx(9, 2)), 9 ** -0.5)
