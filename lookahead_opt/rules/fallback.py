"""The generic rule: extrapolate the update that was last applied.

At each ``step()`` the wrapper copies ``W_{t-1}`` into one parameter-sized buffer and, after
the base optimizer's step, turns it into the applied update :math:`W_{t-1} - W_t`. Then

.. math::  \\hat W_{t+s} = W_t - s\\,\\frac{lr_{now}}{lr_{step}} (W_{t-1} - W_t)

which is exactly :math:`W_t - s (W_{t-1} - W_t)` while the learning rate is unchanged.
Works for any optimizer (LBFGS, SparseAdam, Lookahead wrappers, user-defined ones).
Memory: one extra buffer per parameter. It is the oracle closed-form rules are tested against.

:data:`SMOOTHED_GRADIENT` is SpecTrain's rule (what the ``spectrain`` pipeline method uses
whatever the optimizer): ``dW`` is the momentum buffer if the state has one, else Adam's
first moment ``exp_avg`` (no bias correction), else the last gradient (kept at step time:
one buffer per parameter only for optimizers with neither).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State

__all__ = ["FALLBACK", "SMOOTHED_GRADIENT"]


def _keep_weights(group: Group, state: State, w: Tensor, grad: Optional[Tensor]) -> Tensor:
    return w


def _to_update(kept: Tensor, w: Tensor) -> None:
    kept.sub_(w)


def _last_update(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    return None if kept is None else Direction(((1.0, kept.tensor),), lr=kept.lr)


FALLBACK = Rule("fallback", _last_update, keep=_keep_weights, after=_to_update, keeps_grad=False, closed_form=False)

_SMOOTHED_KEYS = ("momentum_buffer", "exp_avg")


def _keep_grad_unless_smoothed(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
    if any(isinstance(state.get(k), Tensor) for k in _SMOOTHED_KEYS):
        return None
    if not state and (group.get("momentum") or "betas" in group):
        return None  # first step of an optimizer that will create one of them
    return grad


def _smoothed(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    for k in _SMOOTHED_KEYS:
        if isinstance(state.get(k), Tensor):
            return Direction(((1.0, state[k]),))
    return None if kept is None else Direction(((1.0, kept.tensor),))


SMOOTHED_GRADIENT = Rule("smoothed_gradient", _smoothed, keep=_keep_grad_unless_smoothed, exact=False)
