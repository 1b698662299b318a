"""Projected family (torch_optimizer ``AdamP``, ``SGDP``): Adam's or SGD-momentum's direction,
except on steps where the optimizer projects it.

On a parameter with more than one dimension, AdamP/SGDP remove the radial component
:math:`\\hat W (\\hat W \\cdot u)` of the update (and scale its decay by ``wd_ratio``) when the
gradient is nearly orthogonal to :math:`W_{t-1}` (cosine similarity per channel, then per layer,
below ``delta/sqrt(fan_in)``): the scale-invariant weights in front of a normalisation layer.
Whether that happened depends on :math:`g_t` and :math:`W_{t-1}`, which the state does not hold,
and when it happened the state rule's error is the whole radial component (not small).

So ``keep`` (before the step) repeats the optimizer's test on ``grad`` and :math:`W_{t-1}` with
the optimizer's own cosine-similarity function; steps that will be projected (and Nesterov
steps, which use the raw gradient) are handed to the fallback
(:func:`~lookahead_opt.rules.fallback.with_fallback`: one buffer, only while it happens); the
others are exact from the state:

* ``AdamP``: :math:`\\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)`, decay ``1 - lr*wd`` of
  :math:`W_{t-1}`.
* ``SGDP``: its buffer ``state["momentum"]``, decay ``1 - lr*wd/(1-momentum)`` of :math:`W_{t-1}`.

Exact; the test costs the norms of ``grad`` and ``W`` per step (the optimizer computes them too).
"""
from __future__ import annotations

import math
from typing import Optional

from torch import Tensor

from .adam import adam_like
from .base import Direction, Group, Kept, State, decoupled, step_count
from .fallback import with_fallback

__all__ = ["ADAMP", "SGDP", "will_project"]


def will_project(group: Group, w: Tensor, grad: Optional[Tensor]) -> bool:
    """Whether AdamP/SGDP's step will project the update of this parameter (their test)."""
    if grad is None or w.dim() <= 1:
        return False
    from torch_optimizer import AdamP  # the optimizer's own static helpers (SGDP has the same)

    for view in (AdamP._channel_view, AdamP._layer_view):
        cos = AdamP._cosine_similarity(grad, w, group["eps"], view)
        if cos.max() < group["delta"] / math.sqrt(view(w).size(1)):
            return True
    return False


def _needs_update(group: Group, state: State, w: Tensor, grad: Optional[Tensor]) -> bool:
    return bool(group["nesterov"]) or will_project(group, w, grad)


def _adamp(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    return adam_like(group, state, ((1.0 / (1.0 - b1 ** t), state["exp_avg"]),), bias2=1.0 - b2 ** t,
                     decay=group["weight_decay"] > 0)


def _sgdp(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "momentum" not in state:
        return None
    wd = group["weight_decay"] / (1.0 - group["momentum"])
    factor, lam = decoupled(wd, group["lr"]) if group["weight_decay"] else (1.0, 0.0)
    return Direction(((factor, state["momentum"]),), decay=lam)


ADAMP = with_fallback("adamp", _adamp, _needs_update)
SGDP = with_fallback("sgdp", _sgdp, _needs_update)
