"""SGD family: ``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize).

With momentum (the paper's rule) the state alone gives the update:

.. math::  m_t = \\mu m_{t-1} + (1-\\tau) g'_t, \\qquad dW_t = m_t

Without momentum :math:`dW_t = g'_t`, with Nesterov :math:`dW_t = g'_t + \\mu m_t`, where
:math:`g'_t = \\pm g_t + \\lambda W_{t-1}` is kept at step time (one buffer per parameter,
the fallback's cost). Exact.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State, effective_grad

__all__ = ["SGD"]


def _needs_grad(group: Group) -> bool:
    return not group.get("momentum", 0.0) or bool(group.get("nesterov", False))


def _keep(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
    return effective_grad(group, w, grad) if _needs_grad(group) else None


def sgd_direction(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    """``dW`` of torch's SGD (see module docs)."""
    mu = group.get("momentum", 0.0)
    buf = state.get("momentum_buffer")
    if mu and buf is None:
        return None
    if not _needs_grad(group):
        return Direction(((1.0, buf),))
    if kept is None:
        return None
    terms = ((1.0, kept.tensor),) + (((mu, buf),) if mu else ())
    return Direction(terms)


SGD = Rule("sgd", sgd_direction, keep=_keep)
