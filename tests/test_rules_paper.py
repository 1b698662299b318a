"""The paper's formulas (PipeOptim, arXiv 2312.00839, table of dW), written out by hand here,
not taken from our code: SGD-momentum m_t; Adam and AdamW m_hat / (sqrt(v_hat) + eps)."""
from __future__ import annotations

import math

import torch

from lookahead_opt import PredictiveOptimizer

STEPS, LR, S = 5, 0.05, 3


def grads_for(w):
    return torch.cos(w) + w  # gradient of sum(sin(w) + w^2/2)


def trained(opt_cls, **kw):
    p = torch.nn.Parameter(torch.linspace(-1, 1, 7, dtype=torch.float64))
    opt = PredictiveOptimizer(opt_cls([p], lr=LR, **kw))
    ws, gs = [p.detach().clone()], []
    for _ in range(STEPS):
        opt.zero_grad()
        (torch.sin(p) + p * p / 2).sum().backward()
        gs.append(p.grad.detach().clone())
        opt.step()
        ws.append(p.detach().clone())
    return opt, p, ws, gs


def test_sgd_momentum_m_t():
    mu, tau = 0.9, 0.1
    opt, p, ws, gs = trained(torch.optim.SGD, momentum=mu, dampening=tau)
    m = gs[0].clone()  # torch's first buffer is g_1 itself
    for g in gs[1:]:
        m = mu * m + (1 - tau) * g
    torch.testing.assert_close(opt.predict(S)[0], ws[-1] - LR * S * m, rtol=1e-12, atol=1e-12)


def adam_dw(gs, b1, b2, eps, ws=None, wd=0.0):
    m = torch.zeros_like(gs[0])
    v = torch.zeros_like(gs[0])
    for g in gs:
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
    t = len(gs)
    m_hat, v_hat = m / (1 - b1 ** t), v / (1 - b2 ** t)
    dw = m_hat / (v_hat.sqrt() + eps)
    return dw if not wd else dw + wd * ws[-2]  # AdamW: decay of W_{t-1}, left out by the paper


def test_adam_m_hat_over_sqrt_v_hat():
    opt, p, ws, gs = trained(torch.optim.Adam, betas=(0.8, 0.95), eps=1e-6)
    dw = adam_dw(gs, 0.8, 0.95, 1e-6)
    torch.testing.assert_close(opt.predict(S)[0], ws[-1] - LR * S * dw, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(opt.direction()[0], dw, rtol=1e-12, atol=1e-12)


def test_adamw_without_decay_is_the_papers_formula():
    opt, p, ws, gs = trained(torch.optim.AdamW, weight_decay=0.0)
    dw = adam_dw(gs, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(opt.predict(S)[0], ws[-1] - LR * S * dw, rtol=1e-12, atol=1e-12)


def test_adamw_decay_reproduces_the_update():
    wd = 0.1
    opt, p, ws, gs = trained(torch.optim.AdamW, weight_decay=wd)
    dw = adam_dw(gs, 0.9, 0.999, 1e-8, ws, wd)
    torch.testing.assert_close(opt.predict(S)[0], ws[-1] - LR * S * dw, rtol=1e-12, atol=1e-12)
    # the paper's formula (decay left out) differs by exactly that term
    paper = ws[-1] - LR * S * adam_dw(gs, 0.9, 0.999, 1e-8)
    torch.testing.assert_close(paper - opt.predict(S)[0], LR * S * wd * ws[-2], rtol=1e-9, atol=1e-12)


def test_adamw_decay_is_approximate_after_an_lr_change():
    """With the lr changed since the step, W_{t-1} = (W_t + lr u)/(1 - lr wd) uses the new lr:
    the stated bound is a relative error <= 2 * |lr_new - lr_old| * wd * |W| / |update|."""
    wd = 0.1
    opt, p, ws, gs = trained(torch.optim.AdamW, weight_decay=wd)
    dw = adam_dw(gs, 0.9, 0.999, 1e-8, ws, wd)
    new_lr = LR / 2
    opt.param_groups[0]["lr"] = new_lr
    err = (opt.predict(S)[0] - (ws[-1] - new_lr * S * dw)).abs().max()
    bound = 2 * abs(new_lr - LR) * wd * ws[-1].abs().max() * new_lr * S
    assert err <= bound
    assert math.isfinite(float(err))
