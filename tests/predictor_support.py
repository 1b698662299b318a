"""Shared helpers of the predictor tests (calibrated, roll-out, calibrated roll-out).

Imported by the test modules, which run in float64 (the ``float64`` fixture of conftest.py).
"""
from __future__ import annotations

import copy
from typing import Callable, List

import pytest
import torch
from torch import nn

from lookahead_opt.calibrated import CalibratedPredictor
from pipeline_rt import Pipeline, split_by_balance

SGDM: Callable = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731


@pytest.fixture(autouse=True)
def float64(float64):
    """conftest's ``float64``, autouse in a module that imports this name (the older form of
    ``pytestmark = pytest.mark.usefixtures("float64")``, still used by test_rules_no_grad)."""
    yield


def params(seed: int = 0) -> List[nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g))]


def grads(seed: int) -> List[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]


def step(po, ps, gs) -> None:
    """One optimizer step of ``po`` with the gradients ``gs``."""
    for p, g in zip(ps, gs):
        p.grad = g.clone()
    po.step()


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def data(n: int, rows: int = 6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(n)]


def pipe(method: str, opt: Callable = SGDM, **kw) -> Pipeline:
    """The 4-stage pipeline of :func:`mlp` (balance 2, 2, 2, 1) with ``method``."""
    return Pipeline(split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1]), ["cpu"] * 4, opt,
                    nn.functional.mse_loss, method=method, **kw)


def fixed_scale(p: Pipeline, scale: float, **predictor_kw) -> Pipeline:
    """Give every stage of ``p`` a calibrated predictor whose scale is pinned to ``scale``."""
    for st in p.stage_runtimes:
        st.predictor = CalibratedPredictor(st.optimizer, init_scale=scale, min_scale=scale, max_scale=scale,
                                           **predictor_kw)
    return p


def true_future(make_opt: Callable, po, ps, g, s: int) -> List[torch.Tensor]:
    """The oracle: a fresh copy of the real optimizer (state of ``po``) run ``s`` steps with
    the constant gradient ``g`` (an entry ``None``: that parameter has none); returns the
    weights it reaches."""
    qs = [nn.Parameter(p.detach().clone()) for p in ps]
    opt = make_opt(qs)
    opt.load_state_dict(copy.deepcopy(po.base.state_dict()))
    for _ in range(s):
        for q, x in zip(qs, g):
            q.grad = None if x is None else x.clone()
        opt.step()
    return [q.detach() for q in qs]


def observe_steps(cal: CalibratedPredictor, po, ps, g, s: int) -> None:
    """Predict ``s`` ahead, take ``s`` steps with gradient ``g``, and let ``cal`` fit on it."""
    start = [p.detach().clone() for p in ps]
    pred = [w.clone() for w in cal.predict(s)]
    used = cal.last_scales
    for _ in range(s):
        step(po, ps, g)
    cal.observe(start, pred, [p.detach() for p in ps], used)
