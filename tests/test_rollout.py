"""RolloutPredictor (lookahead_opt.rollout): with a constant gradient the roll-out equals the
weights the real torch optimizer reaches ``s`` steps later (the oracle: run it)."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.rollout import RolloutPredictor
from pipeline_rt import Pipeline, split_by_balance

OPTIMIZERS = {
    "sgd": lambda ps: torch.optim.SGD(ps, lr=0.1),
    "sgd-wd": lambda ps: torch.optim.SGD(ps, lr=0.1, weight_decay=0.1),
    "sgdm": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "sgdm-damp-wd-max": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.8, dampening=0.3, weight_decay=0.05,
                                                   maximize=True),
    "nesterov": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "adam-l2-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, betas=(0.8, 0.95), weight_decay=0.1, amsgrad=True),
    "adam-max": lambda ps: torch.optim.Adam(ps, lr=1e-2, maximize=True, eps=1e-3),
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1),
    "adamw-amsgrad": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.3, amsgrad=True),
}


@pytest.fixture(autouse=True)
def _float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def _params():
    g = torch.Generator().manual_seed(0)
    return [nn.Parameter(torch.randn(5, 3, generator=g)), nn.Parameter(torch.randn(4, generator=g))]


def _grads(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(5, 3, generator=g), torch.randn(4, generator=g)]


def _step(po, ps, grads):
    for p, g in zip(ps, grads):
        p.grad = g.clone()
    po.step()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("history", [1, 4])
def test_rollout_equals_true_future_weights_under_constant_gradient(name, history):
    ps = _params()
    po = PredictiveOptimizer(OPTIMIZERS[name](ps))
    roll = RolloutPredictor(po)
    for h in range(history - 1):  # a history of varying gradients, then the constant one
        _step(po, ps, _grads(10 + h))
    g = _grads(99)
    _step(po, ps, g)
    for s in (0, 1, 3, 7):
        got = [w.clone() for w in roll.predict(s)]
        oracle_ps = [nn.Parameter(p.detach().clone()) for p in ps]
        oracle = OPTIMIZERS[name](oracle_ps)
        oracle.load_state_dict(copy.deepcopy(po.base.state_dict()))
        for _ in range(s):
            for p, x in zip(oracle_ps, g):
                p.grad = x.clone()
            oracle.step()
        torch.testing.assert_close(got, [p.detach() for p in oracle_ps], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close([p.detach() for p in ps], [w for w in po._weights()])  # params untouched


def test_sgd_momentum_closed_form():
    ps = _params()
    mu, lr, s = 0.9, 0.05, 5
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=lr, momentum=mu))
    roll = RolloutPredictor(po)
    _step(po, ps, _grads(1))
    g = _grads(2)
    _step(po, ps, g)
    a = mu * (1 - mu ** s) / (1 - mu)
    for p, x, got in zip(ps, g, roll.predict(s)):
        m = po.state[p]["momentum_buffer"]
        torch.testing.assert_close(got, p.detach() - lr * (a * m + x * (s - a) / (1 - mu)))


def test_zero_future_gradient_coasts_on_momentum():
    ps = _params()
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    roll = RolloutPredictor(po, future_grad="zero")
    _step(po, ps, _grads(1))
    a = sum(0.9 ** i for i in range(1, 5))
    for p, got in zip(ps, roll.predict(4)):
        torch.testing.assert_close(got, p.detach() - 0.05 * a * po.state[p]["momentum_buffer"])


def test_before_first_step_and_unsupported_optimizer():
    ps = _params()
    roll = RolloutPredictor(PredictiveOptimizer(torch.optim.Adam(ps)))
    torch.testing.assert_close(roll.predict(3), [p.detach() for p in ps])
    po = PredictiveOptimizer(torch.optim.RMSprop(ps, lr=0.01))
    roll = RolloutPredictor(po)
    _step(po, ps, _grads(1))
    torch.testing.assert_close(roll.predict(3), [w.clone() for w in po.predict(3)])  # the paper's rule
    with pytest.raises(ValueError, match="future_grad"):
        RolloutPredictor(po, future_grad="mean")


def test_state_dict_round_trip():
    ps = _params()
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    roll = RolloutPredictor(po)
    _step(po, ps, _grads(1))
    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    po2 = PredictiveOptimizer(torch.optim.SGD(ps2, lr=0.05, momentum=0.9))
    po2.load_state_dict(po.state_dict())
    roll2 = RolloutPredictor(po2)
    roll2.load_state_dict(roll.state_dict())
    torch.testing.assert_close(roll2.predict(3), [w.clone() for w in roll.predict(3)])


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(),
                         nn.Linear(8, 3))


def _data(n, rows=6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(n)]


def test_pipeoptim_rollout_with_plain_sgd_is_pipeoptim_with_predicted_backward():
    # plain SGD rolled out with the last gradient fixed is W - s lr g: the paper's rule for SGD
    def run(method, **kw):
        return Pipeline(split_by_balance(copy.deepcopy(_mlp()), [2, 2, 2, 1]), ["cpu"] * 4,
                        lambda ps: torch.optim.SGD(ps, lr=0.05), nn.functional.mse_loss, method=method,
                        **kw).train(_data(10))
    torch.testing.assert_close(torch.tensor(run("pipeoptim-rollout")),
                               torch.tensor(run("pipeoptim", backward="predicted")))


def test_pipeoptim_rollout_trains_with_momentum_and_adam():
    for opt in (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)):
        pipe = Pipeline(split_by_balance(copy.deepcopy(_mlp()), [2, 2, 2, 1]), ["cpu"] * 4, opt,
                        nn.functional.mse_loss, method="pipeoptim-rollout")
        losses = pipe.train(_data(12))
        assert all(torch.isfinite(torch.tensor(losses)))
        assert isinstance(pipe.stage_runtimes[0].predictor, RolloutPredictor)
        assert pipe.stage_runtimes[0].predictor._grads  # gradients were captured
