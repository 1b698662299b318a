"""Dual-averaging family (torch_optimizer ``MADGRAD``).

MADGRAD with momentum :math:`\\mu` keeps :math:`x_0`, the gradient sum :math:`s_t` and the
squared-gradient sum :math:`\\nu_t` and steps :math:`W_t = \\mu W_{t-1} + (1-\\mu) z_t`,
:math:`z_t = x_0 - s_t / (\\nu_t^{1/3} + \\epsilon)`. Solving for :math:`W_{t-1}`:

.. math::

    W_{t-1} - W_t = \\frac{1-\\mu}{\\mu}\\Big(W_t - x_0 + \\frac{s_t}{\\nu_t^{1/3} + \\epsilon}\\Big)

from the state alone (a cube-root denominator, one plain term, a ``W_t`` term); the update is
not proportional to ``lr`` so the direction is the applied update (``Direction.lr``). Exact up to
the cancellation in :math:`W_t - z_t` (relative error about ``ulp(|W|)/|update|``: 1e-14 in
float64 at lr 1e-2). Without momentum ``x_0`` is not kept and the update needs the gradient:
fallback.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, State
from .fallback import with_fallback

__all__ = ["MADGRAD"]


def _madgrad(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if not group["k"] or "x0" not in state:
        return None  # its state exists from construction; k counts the group's steps
    mu = group["momentum"]
    c = (1.0 - mu) / mu
    return Direction(((c, state["s"]),), den=state["grad_sum_sq"], power=1 / 3, eps=group["eps"],
                     plain=((-c, state["x0"]),), decay=c, lr=float(group["lr"]))


MADGRAD = with_fallback("madgrad", _madgrad, lambda g, s, w, grad: not g["momentum"])
