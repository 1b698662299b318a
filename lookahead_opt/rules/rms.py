"""RMS family: ``RMSprop`` (momentum, centered), ``Adagrad`` (lr_decay), ``Adadelta``.

.. math::

    dW_t = \\frac{c\\, N_t}{\\sqrt{D_t + \\iota} + \\epsilon}

* ``RMSprop`` with momentum: :math:`dW_t = b_t` (the momentum buffer, from the state alone).
  Without: :math:`N = g'_t`, :math:`D = v_t` (``square_avg``), centered
  :math:`D = v_t - \\bar g_t^2` (allocates that one tensor per prediction).
* ``Adagrad``: :math:`N = g'_t`, :math:`D =` ``sum``, :math:`c = 1/(1 + (t-1)\\,\\text{lr\\_decay})`.
* ``Adadelta``: :math:`N = \\sqrt{a_{t-1} + \\epsilon}\\, g'_t` (kept before the step, when
  the state still holds :math:`a_{t-1}`), :math:`D = v_t`, :math:`\\iota = \\epsilon`.

:math:`g'_t = \\pm g_t + \\lambda W_{t-1}` is kept at step time: one buffer per parameter (the
fallback's cost), none for RMSprop with momentum. Exact.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State, effective_grad, keep_effective_grad, step_count

__all__ = ["RMSPROP", "ADAGRAD", "ADADELTA"]


def _keep_grad(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
    return None if group.get("momentum", 0.0) else effective_grad(group, w, grad)


def _rmsprop(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    if group["momentum"]:
        return Direction(((1.0, state["momentum_buffer"]),))
    if kept is None:
        return None
    v = state["square_avg"]
    if group["centered"]:
        v = v.addcmul(state["grad_avg"], state["grad_avg"], value=-1)
    return Direction(((1.0, kept.tensor),), den=v, eps=group["eps"])


def _adagrad(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if kept is None:
        return None
    c = 1.0 / (1.0 + (step_count(state) - 1.0) * group["lr_decay"])
    return Direction(((c, kept.tensor),), den=state["sum"], eps=group["eps"])


def _keep_adadelta(group: Group, state: State, w: Tensor, grad: Tensor) -> Tensor:
    g = effective_grad(group, w, grad)
    acc = state.get("acc_delta")
    return g * group["eps"] ** 0.5 if acc is None else acc.add(group["eps"]).sqrt_().mul_(g)


def _adadelta(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if kept is None:
        return None
    return Direction(((1.0, kept.tensor),), den=state["square_avg"], inner=group["eps"])


RMSPROP = Rule("rmsprop", _rmsprop, keep=_keep_grad)
ADAGRAD = Rule("adagrad", _adagrad, keep=keep_effective_grad)
ADADELTA = Rule("adadelta", _adadelta, keep=_keep_adadelta)
