"""Autograd safety of swap_in/swap_out (lookahead_opt.redirect): a forward under the predicted
weights, swap_out, an optimizer step, then that forward's backward works and uses the live
weights current at the backward. Checked against oracles that never see the predicted weights
in the backward."""
from __future__ import annotations

import gc

import pytest
import torch
import torch.nn.functional as F

from lookahead_opt import PredictiveOptimizer, redirect


def scenario(module, x, use_context):
    """Returns (y_hat, W_hat, W_live_at_backward, grads of params, grad of x)."""
    opt = PredictiveOptimizer(torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9))
    module(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    x = x.clone().requires_grad_(True)
    if use_context:
        with opt.predicted(2) as pw:
            w_hat = [w.clone() for w in pw]
            y = module(x)
    else:
        opt.swap_in(2)
        w_hat = [p.detach().clone() for p in module.parameters()]
        y = module(x)
        opt.swap_out()
    module(x.detach()).pow(2).sum().backward()  # another minibatch, then a step: params change in place
    opt.step()
    opt.zero_grad()
    live = [p.detach().clone() for p in module.parameters()]
    (0.5 * y.pow(2)).sum().backward()  # dL/dy = y
    return y.detach(), w_hat, live, [p.grad for p in module.parameters()], x.grad


@pytest.mark.parametrize("use_context", [False, True])
def test_linear_by_hand(use_context):
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    y, (w_hat, b_hat), (w, b), (gw, gb), gx = scenario(lin, x, use_context)
    torch.testing.assert_close(y, x @ w_hat.T + b_hat)  # forward used the prediction
    torch.testing.assert_close(gx, y @ w)               # backward used the live weights
    torch.testing.assert_close(gw, y.T @ x)
    torch.testing.assert_close(gb, y.sum(0))
    assert not torch.allclose(w, w_hat)


@pytest.mark.parametrize("make,fn", [
    (lambda: torch.nn.Conv2d(2, 3, 3, padding=1), lambda x, w, b: F.conv2d(x, w, b, padding=1)),
    (lambda: torch.nn.LayerNorm(6), lambda x, w, b: F.layer_norm(x, (6,), w, b)),
])
def test_conv_and_layernorm_against_a_fresh_graph(make, fn):
    torch.manual_seed(0)
    mod = make().double()
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64) if isinstance(mod, torch.nn.Conv2d) else \
        torch.randn(3, 6, dtype=torch.float64)
    y, (w_hat, b_hat), live, grads, gx = scenario(mod, x, True)
    torch.testing.assert_close(y, fn(x, w_hat, b_hat))
    # oracle: dL/dy = y (from the predicted forward); derivatives taken at the live weights
    xo = x.clone().requires_grad_(True)
    wo = [t.clone().requires_grad_(True) for t in live]
    want = torch.autograd.grad(fn(xo, *wo), [xo, *wo], grad_outputs=y)
    for got, exp in zip([gx, *grads], want):
        torch.testing.assert_close(got, exp)


def test_redirect_resolves_views_to_other_weights():
    w = torch.nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
    other = torch.randn(3, 4, dtype=torch.float64)
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    with redirect([w], resolve=lambda i: other):
        y = x @ w.t()  # saves the view w.t()
    y.sum().backward()
    torch.testing.assert_close(x.grad, torch.ones(2, 3, dtype=torch.float64) @ other)


def test_backward_during_a_later_swap_uses_the_live_weights():
    # forward 1 under a prediction, step, then forward 2 swapped in: forward 1's backward,
    # run while forward 2's prediction is in the parameters, must still see the live weights
    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 3, bias=False, dtype=torch.float64)
    opt = PredictiveOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(5, 4, dtype=torch.float64)
    lin(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    x1 = x.clone().requires_grad_(True)
    with opt.predicted(3):
        y1 = lin(x1)
    lin(x).pow(2).sum().backward()
    opt.step()
    opt.zero_grad()
    live = lin.weight.detach().clone()
    g = torch.randn(5, 3, dtype=torch.float64)
    with opt.predicted(3) as pw:
        assert not torch.equal(pw[0], live)
        y1.backward(g)
    torch.testing.assert_close(x1.grad, g @ live, rtol=0, atol=0)


def test_redirect_and_swaps_make_no_reference_cycles():
    """A forward under :class:`redirect` (and under swapped-in predicted weights) and its
    backward leave nothing that only the cyclic garbage collector frees: a pipeline makes one
    per forward, so a cycle there is memory that grows between collections."""
    torch.manual_seed(0)
    lin = torch.nn.Linear(3, 3)
    opt = PredictiveOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9))
    x = torch.randn(2, 3)
    lin(x).sum().backward()
    opt.step()

    def rounds(n: int) -> None:
        for _ in range(n):
            with redirect(list(lin.parameters())):
                y = lin(x).sum()
            with opt.predicted(2):
                z = lin(x).sum()
            (y + z).backward()
            opt.step()
            opt.zero_grad()

    rounds(1)  # once-only objects (the kernels' ctypes array types) are made here
    gc.collect()
    gc.disable()
    try:
        rounds(5)
        assert gc.collect() == 0
    finally:
        gc.enable()
