"""PredictiveOptimizer: API, errors, checkpoints, schedulers, swapping, properties."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch_optimizer
from hypothesis import given, settings
from hypothesis import strategies as st

from lookahead_opt import PredictiveOptimizer, Rule, register_rule
from lookahead_opt.rules import Direction


def model(dtype=torch.float64):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).to(dtype)


def train(opt, m, steps=3, closure=False):
    x = torch.linspace(-1, 1, 12, dtype=next(m.parameters()).dtype).reshape(3, 4)
    for _ in range(steps):
        def f():
            opt.zero_grad()
            loss = m(x).pow(2).sum()
            loss.backward()
            return loss
        if closure:
            opt.step(f)
        else:
            f()
            opt.step()


def test_api_surface():
    m = model()
    base = torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
    opt = PredictiveOptimizer(base)
    assert opt.base is base and opt.param_groups is base.param_groups and opt.state is base.state
    assert opt.params == list(m.parameters()) and opt.num_steps == 0
    train(opt, m)
    assert opt.num_steps == 3
    opt.zero_grad()
    assert all(p.grad is None for p in m.parameters())


def test_predict_reuses_its_buffer_and_writes_into_out():
    m = model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=0.01))
    train(opt, m)
    a = opt.predict(2)
    b = opt.predict(1)
    assert all(x is y for x, y in zip(a, b))  # the reusable buffer
    out = [torch.empty_like(p) for p in m.parameters()]
    c = opt.predict(2, out=out)
    assert all(x is y for x, y in zip(c, out))
    d = opt.predict(2)
    assert all(torch.equal(x, y) for x, y in zip(c, d))
    with pytest.raises(ValueError, match="shaped like the parameters"):
        opt.predict(1, out=out[:1])


@pytest.mark.parametrize("bad,exc", [(-1, ValueError), (1.5, TypeError), (2.0, TypeError), (True, TypeError),
                                     ("2", TypeError), (None, TypeError)])
def test_bad_s(bad, exc):
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(exc, match="s must"):
        opt.predict(bad)
    with pytest.raises(exc, match="s must"):
        opt.swap_in(bad)
    assert opt._swapped is None


def test_numpy_integer_s():
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    train(opt, m)
    assert all(torch.equal(a, b.clone()) for a, b in zip(opt.predict(2, out=[torch.empty_like(p) for p in m.parameters()]),
                                                          opt.predict(np.int64(2))))


def test_errors():
    with pytest.raises(TypeError, match="wraps a torch.optim.Optimizer"):
        PredictiveOptimizer(object())
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1))
    with pytest.raises(TypeError, match="already a PredictiveOptimizer"):
        PredictiveOptimizer(opt)
    with pytest.raises(RuntimeError, match="swap_out\\(\\) without swap_in"):
        opt.swap_out()
    opt.swap_in(1)
    with pytest.raises(RuntimeError, match="swap_in\\(\\) twice"):
        opt.swap_in(1)
    with pytest.raises(RuntimeError, match="swap_out\\(\\) first"):
        opt.step()
    with pytest.raises(RuntimeError, match="pass out="):
        opt.predict(1)
    opt.swap_out()
    with pytest.raises(ValueError, match="unknown rule"):
        PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1), rule="nope")


def test_strict_names_the_class():
    m = model()
    with pytest.raises(ValueError, match="torch.optim.lbfgs.LBFGS"):
        PredictiveOptimizer(torch.optim.LBFGS(m.parameters()), strict=True)
    with pytest.raises(ValueError, match="DiffGrad"):
        PredictiveOptimizer(torch_optimizer.DiffGrad(m.parameters()), strict=True)
    assert PredictiveOptimizer(torch.optim.Adam(m.parameters()), strict=True).rule.name == "adam"


def test_check_finite_names_the_parameter():
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.named_parameters(), lr=0.1, momentum=0.9), check_finite=True)
    train(opt, m)
    opt.predict(3)
    opt.state[m[2].weight]["momentum_buffer"][0, 1] = float("inf")
    with pytest.raises(RuntimeError, match=r"'2.weight' \(group 0, index 2, shape \(2, 5\)\)"):
        opt.predict(3)
    opt.state[m[2].weight]["momentum_buffer"][0, 1] = float("nan")
    with pytest.raises(RuntimeError, match="non-finite"):
        opt.swap_in(1)
    assert opt._swapped is None


def test_predict_never_changes_params_and_s0_is_exact():
    m = model()
    opt = PredictiveOptimizer(torch.optim.RMSprop(m.parameters(), lr=0.01))
    train(opt, m)
    before = [p.detach().clone() for p in m.parameters()]
    opt.predict(5)
    assert all(torch.equal(a, p) for a, p in zip(before, m.parameters()))
    assert all(torch.equal(a, p) for a, p in zip(before, opt.predict(0)))


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(momentum=0.9, nesterov=True)), (torch.optim.NAdam, {}),
                                    (torch.optim.LBFGS, {}), (torch.optim.Adadelta, {})])
def test_state_dict_round_trip_is_exact(cls, kw):
    m = model()
    opt = PredictiveOptimizer(cls(m.parameters(), lr=0.01, **kw))
    train(opt, m, closure=cls is torch.optim.LBFGS)
    sd = copy.deepcopy(opt.state_dict())
    assert sd["lookahead"]["kept"]  # the wrapper's own state is in there
    want = [x.clone() for x in opt.predict(2)]
    m2 = copy.deepcopy(m)
    opt2 = PredictiveOptimizer(cls(m2.parameters(), lr=0.01, **kw))
    opt2.load_state_dict(sd)
    assert opt2.num_steps == opt.num_steps
    assert all(torch.equal(a, b) for a, b in zip(want, opt2.predict(2)))
    # continue both: the same (not bitwise for NAdam: torch's own load_state_dict casts its
    # float32 mu_product to the parameters' dtype)
    train(opt, m, 2, closure=cls is torch.optim.LBFGS)
    train(opt2, m2, 2, closure=cls is torch.optim.LBFGS)
    for a, b in zip(opt.predict(3), opt2.predict(3)):
        torch.testing.assert_close(a, b)
    sd2 = opt2.state_dict()
    assert sd2["lookahead"]["kept"].keys() == opt.state_dict()["lookahead"]["kept"].keys()


def test_lr_scheduler_sets_the_lr_prediction_uses():
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    train(opt, m, 1)
    sched.step()
    assert opt.param_groups[0]["lr"] == 0.05
    w = m[0].weight.detach()
    buf = opt.state[m[0].weight]["momentum_buffer"]
    torch.testing.assert_close(opt.predict(2)[0], w - 0.05 * 2 * buf, rtol=0, atol=1e-15)
    # the fallback rescales the kept update by lr_now / lr_step
    m2 = model()
    fb = PredictiveOptimizer(torch.optim.SGD(m2.parameters(), lr=0.1, momentum=0.9), rule="fallback")
    train(fb, m2, 1)
    prev = m2[0].weight.detach().clone()
    train(fb, m2, 1)
    d = prev - m2[0].weight.detach()
    fb.param_groups[0]["lr"] = 0.05
    torch.testing.assert_close(fb.predict(2)[0], m2[0].weight.detach() - 2 * 0.5 * d, rtol=0, atol=1e-15)


@pytest.mark.parametrize("cls", [torch.optim.SGD, torch.optim.NAdam, torch.optim.Adagrad])
def test_closure_keeps_the_gradient_the_step_used(cls):
    ms = [model(), model()]
    opts = [PredictiveOptimizer(cls(m.parameters(), lr=0.01)) for m in ms]
    train(opts[0], ms[0], closure=False)
    train(opts[1], ms[1], closure=True)
    assert all(torch.equal(a, b) for a, b in zip(opts[0].predict(2), opts[1].predict(2)))


def test_register_rule_for_a_user_optimizer():
    class SignSGD(torch.optim.Optimizer):
        def __init__(self, params, lr=0.01):
            super().__init__(params, dict(lr=lr))

        @torch.no_grad()
        def step(self, closure=None):
            for g in self.param_groups:
                for p in g["params"]:
                    s = self.state[p]["sign"] = p.grad.sign()
                    p.add_(s, alpha=-g["lr"])

    m = model()
    assert PredictiveOptimizer(SignSGD(m.parameters())).rule.name == "fallback"
    with pytest.raises(TypeError):
        register_rule(object, Rule("x", lambda g, s, w, k: None))
    register_rule(SignSGD, Rule("signsgd", lambda g, s, w, k: Direction(((1.0, s["sign"]),)) if s else None))
    opt = PredictiveOptimizer(SignSGD(m.parameters()), strict=True)
    assert opt.rule.name == "signsgd"
    train(opt, m)
    w = m[0].weight.detach()
    torch.testing.assert_close(opt.predict(3)[0], w - 0.03 * opt.state[m[0].weight]["sign"])
    assert PredictiveOptimizer(SignSGD(m.parameters()), rule="signsgd").rule.name == "signsgd"


@pytest.mark.parametrize("cls,key", [(torch.optim.SGD, "momentum_buffer"), (torch.optim.Adam, "exp_avg"),
                                     (torch.optim.Adagrad, None)])
def test_smoothed_gradient_rule(cls, key):
    m = model()
    kw = dict(momentum=0.9) if cls is torch.optim.SGD else {}
    opt = PredictiveOptimizer(cls(m.parameters(), lr=0.01, **kw), rule="smoothed_gradient")
    assert all(torch.equal(a, p) for a, p in zip(opt.predict(2), m.parameters()))
    train(opt, m)
    p = m[0].weight
    want = opt.state[p][key] if key else p.grad
    torch.testing.assert_close(opt.predict(2)[0], p.detach() - 0.02 * want, rtol=0, atol=1e-15)


def test_swap_is_a_pointer_swap_and_predicted_is_exception_safe():
    m = model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=0.01))
    train(opt, m)
    ptrs = [p.data_ptr() for p in m.parameters()]
    want = [x.clone() for x in opt.predict(2)]
    opt.swap_in(2)
    assert all(p.data_ptr() != q for p, q in zip(m.parameters(), ptrs))
    assert all(torch.equal(p, w) for p, w in zip(m.parameters(), want))
    opt.swap_out()
    assert [p.data_ptr() for p in m.parameters()] == ptrs
    with pytest.raises(KeyError):
        with opt.predicted(2) as pw:
            assert all(torch.equal(a, b) for a, b in zip(pw, want))
            raise KeyError
    assert [p.data_ptr() for p in m.parameters()] == ptrs and opt._swapped is None


DTYPES = {
    torch.float32: dict(rtol=1e-5, atol=1e-6),
    torch.float64: dict(rtol=1e-12, atol=1e-12),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
}
OPTS = [(torch.optim.SGD, dict(momentum=0.9)), (torch.optim.Adam, {}), (torch.optim.AdamW, dict(amsgrad=True)),
        (torch.optim.RMSprop, dict(centered=True)), (torch.optim.Adagrad, {}), (torch.optim.NAdam, {})]


@settings(max_examples=40, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(1, 9), min_size=0, max_size=3), min_size=1, max_size=4),
       dtype=st.sampled_from(list(DTYPES)), s=st.integers(0, 6), which=st.integers(0, len(OPTS) - 1),
       steps=st.integers(0, 3))
def test_property_prediction_matches_the_direction(shapes, dtype, s, which, steps):
    """predict(s) == W - lr*s*dW with dW from the rule's plain-torch evaluation; params untouched;
    the rule reproduces the step (fallback agreement) within the dtype's rounding."""
    cls, kw = OPTS[which]
    g = torch.Generator().manual_seed(len(shapes) * 31 + s)
    params = [torch.nn.Parameter(torch.randn(tuple(sh), generator=g).to(dtype)) for sh in shapes]
    opt = PredictiveOptimizer(cls(params, lr=0.01, **kw))
    prev = [p.detach().clone() for p in params]
    for _ in range(steps):
        prev = [p.detach().clone() for p in params]
        opt.zero_grad()
        sum((p.float() ** 2).sum() + p.float().sum() for p in params).backward()
        opt.step()
    before = [p.detach().clone() for p in params]
    pred = opt.predict(s)
    assert all(torch.equal(a, p) for a, p in zip(before, params))
    tol = DTYPES[dtype]
    for w, d, x, a in zip(before, opt.direction(), pred, prev):
        torch.testing.assert_close(x.double(), w.double() - 0.01 * s * d.double(), **tol)
        if steps and dtype is not torch.bfloat16:
            torch.testing.assert_close(x.double(), w.double() - s * (a.double() - w.double()), **tol)


def _fresh(opt):
    """The prediction of a new wrapper around the same base optimizer and the same wrapper
    state (kept buffers, parameters the last step skipped) but no kept plan."""
    other = PredictiveOptimizer(opt.base, rule=opt.rule)
    other._kept = opt._kept
    other._set_skipped(opt.skipped)
    return [t.clone() for t in other.predict(2)]


def _same_as_fresh(opt):
    for a, b in zip(opt.predict(2), _fresh(opt)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, dict(lr=1e-2, weight_decay=0.1, decoupled_weight_decay=True)),
                                    (torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True))])
def test_kept_prediction_is_rebuilt_whenever_its_inputs_change(cls, kw):
    """The wrapper keeps its prediction plan between calls; every change it was derived from
    gives the prediction a fresh wrapper would make (bit for bit), and an unchanged wrapper
    repeats itself."""
    m = model()
    opt = PredictiveOptimizer(cls(m.parameters(), **kw))
    train(opt, m)
    first = [t.clone() for t in opt.predict(2)]
    assert all(torch.equal(a, b) for a, b in zip(first, opt.predict(2)))
    _same_as_fresh(opt)
    opt.param_groups[0]["lr"] *= 0.5                                    # a scheduler's lr
    _same_as_fresh(opt)
    assert not all(torch.equal(a, b) for a, b in zip(first, opt.predict(2)))
    opt.param_groups[0]["weight_decay"] = 0.3                           # another hyper-parameter
    _same_as_fresh(opt)
    p = opt.param_groups[0]["params"][0]
    key = "exp_avg" if cls is torch.optim.Adam else "momentum_buffer"
    opt.state[p][key] = torch.randn_like(p)                             # a state tensor replaced
    _same_as_fresh(opt)
    opt.state[p][key].mul_(3.0)                                         # its values changed in place
    _same_as_fresh(opt)
    train(opt.base, m, steps=1)                                         # a step of the base directly
    _same_as_fresh(opt)
    sd = copy.deepcopy(opt.state_dict())
    train(opt, m, steps=2)
    opt.load_state_dict(sd)                                             # the wrapper's load
    _same_as_fresh(opt)
    train(opt, m, steps=1)
    opt.base.load_state_dict({k: v for k, v in sd.items() if k != "lookahead"})  # the base's load
    _same_as_fresh(opt)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.ones(3, dtype=torch.float64))]})
    _same_as_fresh(opt)
    assert len(opt.predict(2)) == len(opt.params)
    extra = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt.param_groups[-1]["params"].append(extra)                       # a group's parameter list
    assert len(opt.predict(2)) == len(opt.params)


@pytest.mark.parametrize("rule,kw", [(None, dict(momentum=0.9, nesterov=True)), (None, dict(momentum=0.9)),
                                     ("fallback", dict(momentum=0.9)), ("smoothed_gradient", {})])
def test_stationary_rule_keeps_its_plan_across_steps_only_while_its_inputs_stay(rule, kw):
    """A stationary rule (SGD, the fallback, SpecTrain's) keeps its plan across a step that
    leaves its inputs the same objects, and still predicts what a fresh wrapper does when a
    step drops a parameter's kept buffer (no gradient), makes a new one, or runs at another lr."""
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, **kw), rule=rule)
    assert opt.rule.stationary
    train(opt, m, steps=2)
    opt.predict(2)
    plan = opt._cache.plan
    train(opt, m, steps=1)
    _same_as_fresh(opt)
    assert opt._cache.plan is plan                                      # nothing rebuilt
    first = m[0].weight
    for step in range(3):  # no gradient for one parameter, then one again, then a new lr
        x = torch.randn(8, 4, dtype=torch.float64)
        opt.zero_grad()
        m(x).square().mean().backward()
        if step == 0:
            first.grad = None
        if step == 2:
            opt.param_groups[0]["lr"] = 0.05
            _same_as_fresh(opt)  # the fallback rescales its kept update by 0.05/0.1 until the step
        opt.step()
        _same_as_fresh(opt)


@pytest.mark.parametrize("cls,kw", [(torch.optim.Adam, dict(lr=1e-2)), (torch.optim.AdamW, dict(lr=1e-2)),
                                    (torch.optim.Adam, dict(lr=1e-2, amsgrad=True)),
                                    (torch.optim.RAdam, dict(lr=1e-2)), (torch.optim.Adamax, dict(lr=1e-2))])
def test_signature_rule_refreshes_its_plan_per_bucket_and_stays_exact(cls, kw):
    """Rules with a signature (the step count) get new coefficients after a step from one
    rule call per bucket; a parameter whose step count falls behind (no gradient at a step:
    the optimizer skips it), a second group with the same coefficients, and a group with
    another lr still predict what a fresh wrapper does, bit for bit."""
    m = model()
    extra = torch.nn.Parameter(torch.randn(3, dtype=torch.float64))
    other = torch.nn.Parameter(torch.randn(2, dtype=torch.float64))
    opt = PredictiveOptimizer(cls([{"params": list(m.parameters())}, {"params": [extra]},
                                   {"params": [other], "lr": 3e-3}], **kw))
    assert opt.rule.signature is not None
    for step in range(7):
        x = torch.randn(8, 4, dtype=torch.float64)
        opt.zero_grad()
        (m(x).square().mean() + extra.square().sum() + other.sum()).backward()
        if step in (2, 3):
            m[0].bias.grad = None  # its step count falls behind from here on
        opt.step()
        _same_as_fresh(opt)
        # steps that change no step count's order (nor RAdam's form, which it changes at t = 6)
        if step in ((1,) if cls is torch.optim.RAdam else (1, 5)):  # refreshed, not rebuilt
            assert opt._cache.plan is plan
        plan = opt._cache.plan


def test_kept_prediction_follows_a_tensor_lr_set_in_place():
    m = model(torch.float32)
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=torch.tensor(0.01)))
    train(opt, m)
    before = [t.clone() for t in opt.predict(1)]
    opt.param_groups[0]["lr"].fill_(0.02)
    _same_as_fresh(opt)
    assert not all(torch.equal(a, b) for a, b in zip(before, opt.predict(1)))


def test_out_and_swapped_predictions_use_the_kept_plan_correctly():
    """predict(out=) writes every parameter's prediction into its own tensor (buckets reorder
    small and large tensors), equal to the buffer; while swapped in, out= predicts from the
    live weights."""
    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(n, dtype=torch.float64)) for n in (3, 5000, 2, 7000, 4)]
    opt = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    want = [t.clone() for t in opt.predict(3)]
    out = [torch.empty_like(p) for p in ps]
    assert opt.predict(3, out=out) == out
    assert all(torch.equal(a, b) for a, b in zip(out, want))
    with opt.predicted(1):
        again = [torch.empty_like(p) for p in ps]
        opt.predict(3, out=again)
    assert all(torch.equal(a, b) for a, b in zip(again, want))


@pytest.mark.parametrize("through", ["wrapper", "base"])
def test_load_state_dict_lets_go_of_the_replaced_state(through):
    """The kept prediction plan references the state tensors; a load replaces them and must
    not keep the old ones alive until the next prediction."""
    import gc
    import weakref
    m = model()
    opt = PredictiveOptimizer(torch.optim.Adam(m.parameters(), lr=1e-2))
    train(opt, m)
    opt.predict(2)
    sd = copy.deepcopy(opt.state_dict())
    old = weakref.ref(opt.state[opt.params[0]]["exp_avg"])
    if through == "wrapper":
        opt.load_state_dict(sd)
    else:
        opt.base.load_state_dict({k: v for k, v in sd.items() if k != "lookahead"})
    gc.collect()
    assert old() is None
    _same_as_fresh(opt)


def test_predict_into_out_allocates_no_buffer():
    m = model()
    opt = PredictiveOptimizer(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9))
    train(opt, m)
    out = [torch.empty_like(p) for p in opt.params]
    opt.predict(2, out=out)
    assert opt._buffers is None
    assert all(torch.equal(a, b) for a, b in zip(out, opt.predict(2)))
