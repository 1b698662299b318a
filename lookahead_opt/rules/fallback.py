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

:func:`with_fallback` builds a closed-form rule that hands the steps (or parameters) its
state cannot explain to this fallback, one step at a time: memory for the buffer only while
such steps happen.
"""
from __future__ import annotations

from typing import Callable, Optional

from torch import Tensor

from .base import Direction, DirectionFn, Group, Kept, Rule, State

__all__ = ["FALLBACK", "SMOOTHED_GRADIENT", "with_fallback"]


def _keep_weights(group: Group, state: State, w: Tensor, grad: Optional[Tensor]) -> Tensor:
    return w


def _to_update(kept: Tensor, w: Tensor) -> None:
    kept.sub_(w)


def _last_update(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    return None if kept is None else Direction(((1.0, kept.tensor),), lr=kept.lr)


FALLBACK = Rule("fallback", _last_update, keep=_keep_weights, after=_to_update, keeps_grad=False, closed_form=False,
                stationary=True, skips_without_grad=False)

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


SMOOTHED_GRADIENT = Rule("smoothed_gradient", _smoothed, keep=_keep_grad_unless_smoothed, exact=False, stationary=True)


NeedsFn = Callable[[Group, State, Tensor, Optional[Tensor]], bool]


def with_fallback(name: str, direction: DirectionFn, needs_update: NeedsFn, **rule_kw) -> Rule:
    """A closed-form rule that falls back to the last applied update for some steps.

    ``needs_update(group, state, w, grad)`` is asked in ``step()`` before the base step
    (``state`` as before the step, ``w`` = :math:`W_{t-1}`, ``grad`` the gradient): when true,
    :math:`W_{t-1}` is kept and turned into the applied update, and the prediction extrapolates
    it exactly as :data:`FALLBACK` does; when false nothing is kept and ``direction`` (which
    then gets ``kept=None``) derives ``dW`` from the state. Exact when both parts are. Used for
    a first step that the state cannot describe (SWATS's first SGD step, PID's first step), a
    step that the state cannot tell happened (AdamP/SGDP's projection) and configurations that
    need the raw gradient (MADGRAD without momentum, Adafactor without ``beta1``).
    """
    def keep(group: Group, state: State, w: Tensor, grad: Optional[Tensor]) -> Optional[Tensor]:
        return w if needs_update(group, state, w, grad) else None

    def derive(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
        return _last_update(group, state, w, kept) if kept is not None else direction(group, state, w, None)

    return Rule(name, derive, keep=keep, after=_to_update, **rule_kw)
