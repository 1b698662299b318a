"""RolloutPredictor (lookahead_opt.rollout): with a constant gradient the roll-out equals the
weights the real torch optimizer reaches ``s`` steps later (the oracle: run it)."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.rollout import RolloutPredictor
from predictor_support import data, grads, params, pipe, step, true_future  # noqa: F401

pytestmark = pytest.mark.usefixtures("float64")

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


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
@pytest.mark.parametrize("history", [1, 4])
def test_rollout_equals_true_future_weights_under_constant_gradient(name, history):
    ps = params()
    po = PredictiveOptimizer(OPTIMIZERS[name](ps))
    roll = RolloutPredictor(po)
    for h in range(history - 1):  # a history of varying gradients, then the constant one
        step(po, ps, grads(10 + h))
    g = grads(99)
    step(po, ps, g)
    for s in (0, 1, 3, 7):
        got = [w.clone() for w in roll.predict(s)]
        torch.testing.assert_close(got, true_future(OPTIMIZERS[name], po, ps, g, s), rtol=1e-10, atol=1e-12)
    torch.testing.assert_close([p.detach() for p in ps], [w for w in po._weights()])  # params untouched


def test_sgd_momentum_closed_form():
    ps = params()
    mu, lr, s = 0.9, 0.05, 5
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=lr, momentum=mu))
    roll = RolloutPredictor(po)
    step(po, ps, grads(1))
    g = grads(2)
    step(po, ps, g)
    a = mu * (1 - mu ** s) / (1 - mu)
    for p, x, got in zip(ps, g, roll.predict(s)):
        m = po.state[p]["momentum_buffer"]
        torch.testing.assert_close(got, p.detach() - lr * (a * m + x * (s - a) / (1 - mu)))


def test_zero_future_gradient_coasts_on_momentum():
    ps = params()
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    roll = RolloutPredictor(po, future_grad="zero")
    step(po, ps, grads(1))
    a = sum(0.9 ** i for i in range(1, 5))
    for p, got in zip(ps, roll.predict(4)):
        torch.testing.assert_close(got, p.detach() - 0.05 * a * po.state[p]["momentum_buffer"])


def test_before_first_step_and_unsupported_optimizer():
    ps = params()
    roll = RolloutPredictor(PredictiveOptimizer(torch.optim.Adam(ps)))
    torch.testing.assert_close(roll.predict(3), [p.detach() for p in ps])
    po = PredictiveOptimizer(torch.optim.RMSprop(ps, lr=0.01))
    roll = RolloutPredictor(po)
    step(po, ps, grads(1))
    torch.testing.assert_close(roll.predict(3), [w.clone() for w in po.predict(3)])  # the paper's rule
    with pytest.raises(ValueError, match="future_grad"):
        RolloutPredictor(po, future_grad="mean")


def test_state_dict_round_trip():
    ps = params()
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.05, momentum=0.9))
    roll = RolloutPredictor(po)
    step(po, ps, grads(1))
    ps2 = [nn.Parameter(p.detach().clone()) for p in ps]
    po2 = PredictiveOptimizer(torch.optim.SGD(ps2, lr=0.05, momentum=0.9))
    po2.load_state_dict(po.state_dict())
    roll2 = RolloutPredictor(po2)
    roll2.load_state_dict(roll.state_dict())
    torch.testing.assert_close(roll2.predict(3), [w.clone() for w in roll.predict(3)])


def test_pipeoptim_rollout_with_plain_sgd_is_pipeoptim_with_predicted_backward():
    # plain SGD rolled out with the last gradient fixed is W - s lr g: the paper's rule for SGD
    def run(method, **kw):
        return pipe(method, lambda ps: torch.optim.SGD(ps, lr=0.05), **kw).train(data(10))
    torch.testing.assert_close(torch.tensor(run("pipeoptim-rollout")),
                               torch.tensor(run("pipeoptim", backward="predicted")))


def test_pipeoptim_rollout_trains_with_momentum_and_adam():
    for opt in (lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), lambda ps: torch.optim.Adam(ps, lr=1e-2)):
        p = pipe("pipeoptim-rollout", opt)
        losses = p.train(data(12))
        assert all(torch.isfinite(torch.tensor(losses)))
        assert isinstance(p.stage_runtimes[0].predictor, RolloutPredictor)
        assert p.stage_runtimes[0].predictor._grads  # gradients were captured
