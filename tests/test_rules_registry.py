"""Every optimizer class in torch.optim and torch_optimizer, wrapped: the prediction reproduces
the update just applied (closed-form rules: to float64 rounding; fallback: exactly), and
every closed-form rule agrees with the fallback on the same trajectory."""
from __future__ import annotations

import inspect

import pytest
import torch
import torch_optimizer

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.rules import rule_for

# Classes that cannot take a plain dense step from (params, **kwargs), and how they are run.
NEEDS_CLOSURE = {torch.optim.LBFGS}            # step(closure) only
NEEDS_HESSIAN = {torch_optimizer.Adahessian}   # backward(create_graph=True)
MATRIX_ONLY = {torch.optim.Muon}               # 2-D parameters only
# Not parametrised below (no dense step from (params, **kwargs)); each has its own test.
EXCLUDED = {
    torch.optim.SparseAdam: "needs sparse gradients: test_sparse_adam_uses_fallback",
    torch_optimizer.Lookahead: "wraps another optimizer: test_lookahead_wrapper_uses_fallback",
}

VARIANTS = [
    {},
    {"momentum": 0.9},
    {"momentum": 0.9, "nesterov": True},
    {"momentum": 0.9, "dampening": 0.3},
    {"momentum": 0.9, "weight_decay": 0.1},
    {"weight_decay": 0.1},
    {"amsgrad": True, "weight_decay": 0.1},
    {"maximize": True},
    {"centered": True},
    {"centered": True, "momentum": 0.5},
    {"decoupled_weight_decay": True, "weight_decay": 0.1},
    {"lr_decay": 0.1},
    {"nus": (0.7, 0.9)},
    {"nus": (0.7, 1.0), "decouple_weight_decay": True, "weight_decay": 0.1},
    {"weight_decouple": True, "weight_decay": 0.1},                         # AdaBelief
    {"weight_decouple": True, "fixed_decay": True, "weight_decay": 0.1},
    {"rectify": True},
    {"amsgrad": True, "rectify": True, "weight_decouple": True, "weight_decay": 0.1},
    {"amsbound": True, "weight_decay": 0.1},                                # AdaBound
    {"debias": True, "weight_decay": 0.1},                                  # Lamb
    {"adam": True},
    {"momentum": 0.9, "nu": 1.0},                                           # QHM
    {"momentum": 0.9, "weight_decay_type": "direct", "weight_decay": 0.1},
    {"warmup": 10, "weight_decay": 0.1},                                    # Apollo
    {"beta1": 0.9, "weight_decay": 0.1},                                    # Adafactor (torch_optimizer)
    {"hessian_power": 1.0, "weight_decay": 0.1},                            # Adahessian
    {"grad_averaging": True, "weight_decay": 0.1},                          # NovoGrad
    {"momentum": 0.9, "integral": 2.0, "derivative": 3.0},                  # PID
    {"momentum": 0.0, "weight_decay": 0.1},                                 # MADGRAD without momentum
]


def optimizer_classes():
    seen = []
    for mod in (torch.optim, torch_optimizer):
        for _, c in sorted(vars(mod).items()):
            if inspect.isclass(c) and issubclass(c, torch.optim.Optimizer) and c is not torch.optim.Optimizer \
                    and c not in seen:
                seen.append(c)
    return seen


def cases():
    out = []
    for cls in optimizer_classes():
        names = inspect.signature(cls.__init__).parameters
        for v in VARIANTS:
            if cls not in EXCLUDED and all(k in names for k in v):
                out.append(pytest.param(cls, v, id=f"{cls.__module__.split('.')[0]}.{cls.__name__}-{v}"))
    return out


def make_params(cls):
    g = torch.Generator().manual_seed(0)
    shapes = [(4, 3), (3, 5)] if cls in MATRIX_ONLY else [(4, 3), (3,)]
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in shapes]


def loss_of(params):
    return sum(((p - 0.3) ** 2).sum() + 0.1 * torch.sin(3 * p).sum() for p in params)


def build(cls, variant, params):
    kw = dict(variant)
    if "lr" in inspect.signature(cls.__init__).parameters:
        kw.setdefault("lr", 0.01)
    return cls(params, **kw)


def run(opt, params, cls, steps):
    """Takes `steps` steps; returns W_{t-1} of the last one."""
    prev = None
    for _ in range(steps):
        prev = [p.detach().clone() for p in params]

        def closure():
            opt.zero_grad()
            loss = loss_of(params)
            loss.backward(create_graph=cls in NEEDS_HESSIAN)
            return loss

        if cls in NEEDS_CLOSURE:
            opt.step(closure)
        else:
            closure()
            opt.step()
    return prev


EXACT_RTOL = 1e-9  # float64 rounding of the optimizer's own formulas vs. the rule's


@pytest.mark.parametrize("cls,variant", cases())
def test_reconstruction_and_agreement_with_fallback(cls, variant):
    params = make_params(cls)
    opt = PredictiveOptimizer(build(cls, variant, params))
    twin_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    twin = PredictiveOptimizer(build(cls, variant, twin_params), rule="fallback")
    assert all(torch.equal(x, p) for x, p in zip(opt.predict(3), params))  # dW = 0 before a step
    prev = run(opt, params, cls, 4)
    run(twin, twin_params, cls, 4)
    w = [p.detach().clone() for p in params]
    d = [a - b for a, b in zip(prev, w)]
    scale = max(float(x.abs().max()) for x in d)
    assert scale > 0
    for s in (0, 1, 2, 3):
        pred = [x.clone() for x in opt.predict(s)]
        oracle = [a - s * b for a, b in zip(w, d)]
        fb = twin.predict(s)
        for p, o, f in zip(pred, oracle, fb):
            if opt.rule.closed_form:
                torch.testing.assert_close(p, o, rtol=0, atol=EXACT_RTOL * scale * max(s, 1))
                torch.testing.assert_close(p, f, rtol=0, atol=EXACT_RTOL * scale * max(s, 1))
            elif s in (0, 1, 2):  # s*d exact in binary: one rounding either way
                assert torch.equal(p, o)
            else:
                torch.testing.assert_close(p, o, rtol=1e-15, atol=1e-15 * scale)
    assert all(torch.equal(a, b) for a, b in zip(params, w))  # predict never changes the params


TO = torch_optimizer
CLOSED_FORM = {torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.Adamax, torch.optim.NAdam,
               torch.optim.RAdam, torch.optim.RMSprop, torch.optim.Adagrad, torch.optim.Adadelta, torch.optim.Rprop,
               TO.Yogi, TO.QHAdam, TO.AdaBelief, TO.AdaBound, TO.AdaMod, TO.AdamP, TO.Lamb, TO.SGDW, TO.SGDP,
               TO.AggMo, TO.LARS, TO.NovoGrad, TO.Apollo, TO.SWATS, TO.Shampoo, TO.QHM, TO.MADGRAD, TO.PID,
               TO.Adafactor, TO.Adahessian}
# Left on the fallback on purpose: see the lookahead_opt.rules docstring for why.
ON_FALLBACK = {torch.optim.Adafactor, torch.optim.ASGD, torch.optim.LBFGS, torch.optim.SparseAdam, torch.optim.Muon,
               TO.DiffGrad, TO.A2GradUni, TO.A2GradInc, TO.A2GradExp, TO.AccSGD, TO.RAdam, TO.Lookahead}


def test_registry_covers_the_families():
    classes = set(optimizer_classes())
    closed = {c for c in classes if rule_for(c) is not None}
    assert closed == CLOSED_FORM, (closed - CLOSED_FORM, CLOSED_FORM - closed)
    assert ON_FALLBACK <= classes - closed
    assert all(rule_for(c).closed_form for c in closed)
    assert rule_for(torch_optimizer.RAdam) is None  # a different RAdam: keyed by class object, not name
    assert rule_for(torch.optim.AdamW) is rule_for(torch.optim.Adam)  # AdamW subclasses Adam


def test_every_closed_form_rule_is_swept():
    """The reconstruction test above runs every registered class with at least one variant."""
    swept = {p.values[0] for p in cases()}
    assert CLOSED_FORM <= swept


def test_sparse_adam_uses_fallback():
    emb = torch.nn.Embedding(10, 3, sparse=True).double()
    opt = PredictiveOptimizer(torch.optim.SparseAdam(emb.parameters(), lr=0.1))
    assert opt.rule.name == "fallback"
    for _ in range(3):
        prev = emb.weight.detach().clone()
        opt.zero_grad()
        emb(torch.tensor([1, 2, 2, 7])).pow(2).sum().backward()
        opt.step()
    assert torch.equal(opt.predict(2)[0], emb.weight.detach() - 2 * (prev - emb.weight.detach()))


def test_lookahead_wrapper_uses_fallback():
    params = make_params(torch.optim.SGD)
    opt = PredictiveOptimizer(torch_optimizer.Lookahead(torch.optim.SGD(params, lr=0.1, momentum=0.9), k=2))
    assert opt.rule.name == "fallback"
    prev = run(opt, params, torch.optim.SGD, 4)  # a sync step: W jumps, the fallback follows it
    for p, a, x in zip(params, prev, opt.predict(1)):
        assert torch.equal(x, p.detach() - (a - p.detach()))
