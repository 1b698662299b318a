"""Bounded-rate family (torch_optimizer ``AdaBound``, ``AdaMod``): Adam's per-element rate,
bounded, times the first moment.

.. math::

    W_{t-1} - W_t = m_t \\odot \\operatorname{bound}\\Big(\\frac{lr\\,\\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)}
                    {\\sqrt{v_t} + \\epsilon}\\Big)

* ``AdaBound``: bound = clamp to :math:`[\\eta_l(t), \\eta_u(t)]`,
  :math:`\\eta = \\text{final\\_lr}\\cdot lr/\\text{base\\_lr}` (``base_lr`` is the optimizer's
  ``base_lrs[i]``, read through :attr:`Rule.settings`); ``amsbound`` uses ``max_exp_avg_sq``.
* ``AdaMod``: bound = elementwise minimum with ``exp_avg_lr`` (the state's smoothed rate, after
  the step); its decoupled decay :math:`W_{t-1}(1 - lr\\,\\lambda)` is undone exactly.

Both are learning-rate-dependent in ways a per-unit-lr direction cannot express (the bounds, the
smoothed rate), so the direction is the applied update (``Direction.lr``: rescaled by
``lr_now / lr``). Evaluated in the kernel's rate form (reciprocal, clamp/minimum, addcmul) from
the state alone: no extra memory. Exact (the rate is computed as ``1/(denom/step_size)`` instead of
``step_size/denom``: an ulp or two).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State, decoupled, step_count

__all__ = ["ADABOUND", "ADAMOD"]


def _step_size(group: Group, state: State) -> float:
    t = step_count(state)
    b1, b2 = group["betas"]
    return group["lr"] * math.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)


def _adabound(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state or not group["lr"]:
        return None
    t = step_count(state)
    ss = _step_size(group, state)
    final_lr = group["final_lr"] * group["lr"] / group["_base_lr"]
    bounds = (final_lr * (1 - 1 / (group["gamma"] * t + 1)), final_lr * (1 + 1 / (group["gamma"] * t)))
    v = state["max_exp_avg_sq"] if group["amsbound"] else state["exp_avg_sq"]
    return Direction(((1.0, state["exp_avg"]),), den=v, scale=1.0 / ss, eps=group["eps"] / ss, bounds=bounds,
                     lr=float(group["lr"]))


ADABOUND = Rule("adabound", _adabound, settings=lambda opt, i: {"_base_lr": opt.base_lrs[i]})


def _adamod(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state or not group["lr"]:
        return None
    ss = _step_size(group, state)
    lr = float(group["lr"])
    factor, lam = decoupled(group["weight_decay"], lr)
    return Direction(((factor, state["exp_avg"]),), den=state["exp_avg_sq"], scale=1.0 / ss, eps=group["eps"] / ss,
                     cap=state["exp_avg_lr"], decay=lam * lr, lr=lr)


ADAMOD = Rule("adamod", _adamod)
