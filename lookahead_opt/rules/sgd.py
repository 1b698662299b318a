"""SGD (momentum) family: ``dW`` is a linear combination of state buffers, plus the last
(effective) gradient where the update uses it.

``torch.optim.SGD`` (momentum, dampening, nesterov, weight_decay, maximize) is the model.
With momentum (the paper's rule) the state alone gives the update:

.. math::  m_t = \\mu m_{t-1} + (1-\\tau) g'_t, \\qquad dW_t = m_t

Without momentum :math:`dW_t = g'_t`, with Nesterov :math:`dW_t = g'_t + \\mu m_t`, where
:math:`g'_t = \\pm g_t + \\lambda W_{t-1}` is kept at step time (one buffer per parameter,
the fallback's cost). The same rule, with its parameters, covers (torch_optimizer):

* ``SGDW``: :math:`g'_t = g_t` (no coupled decay, no maximize) and its decay subtracts the
  constant ``lr*wd`` from every weight (a library bug, reproduced): ``offset = wd``.
* ``LARS``: :math:`g'_t` is LARS's trust-scaled gradient
  :math:`\\eta\\,\\|W\\|/(\\|g\\| + \\lambda\\|W\\| + \\epsilon)\\,(g_t + \\lambda W_{t-1})`, computed at
  step time only where it is kept (no momentum, or Nesterov).
* ``QHM``: :math:`\\nu\\, m_t + (1-\\nu) g'_t` (:math:`g'_t` kept only when :math:`\\nu \\ne 1`;
  ``weight_decay_type="direct"`` is a decoupled decay of :math:`W_{t-1}`).

and, where the state holds the update itself:

* ``AggMo``: the average of its dict of momentum buffers, one per beta.
* ``NovoGrad``: ``exp_avg`` (its step already divides by the gradient-norm average).
* ``Shampoo``: ``momentum_buffer`` (its step stores the preconditioned update there).
* ``PID`` with momentum: :math:`g'_t + K_I\\, i_t + K_D\\, d_t` from ``grad_buffer``,
  ``i_buffer``, ``d_buffer``; its first step (``grad_buffer`` still zero) and PID without
  momentum (plain SGD on the raw gradient) go to the fallback.
* ``Apollo``: ``update``, applied at the warm-up learning rate while ``step <= warmup``.
* ``Adafactor`` (torch_optimizer) with ``beta1``: ``exp_avg``, which is the update already
  scaled by Adafactor's own relative step size; its decay ``W *= 1 - wd*lr_eff`` is undone
  exactly. Without ``beta1`` the update needs the raw gradient: fallback.

All exact.
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
from torch import Tensor

from .base import Direction, Group, Kept, Rule, State, decoupled, effective_grad, group_lr, step_count
from .fallback import with_fallback

__all__ = ["SGD", "SGDW", "LARS", "QHM", "AGGMO", "NOVOGRAD", "SHAMPOO", "PID", "APOLLO", "ADAFACTOR",
           "sgd_rule", "sgd_direction"]

GradFn = Callable[[Group, Tensor, Tensor], Tensor]


def _needs_grad(group: Group) -> bool:
    return not group.get("momentum", 0.0) or bool(group.get("nesterov", False))


def sgd_rule(name: str, grad_fn: GradFn = lambda g, w, grad: effective_grad(g, w, grad), *,
             offset: bool = False) -> Rule:
    """The SGD rule with ``g' = grad_fn(group, W_{t-1}, grad)`` and, with ``offset``, the
    constant ``weight_decay`` added to ``dW`` (see module docs)."""

    def keep(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
        return grad_fn(group, w, grad) if _needs_grad(group) else None

    def direction(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
        mu = group.get("momentum", 0.0)
        off = float(group["weight_decay"]) if offset else 0.0
        if not mu:  # plain SGD: the kept gradient
            return None if kept is None else Direction(((1.0, kept.tensor),), offset=off)
        buf: Optional[Tensor] = state.get("momentum_buffer")
        if buf is None:
            return None
        if not _needs_grad(group):  # heavy ball: the buffer
            return Direction(((1.0, buf),), offset=off)
        return None if kept is None else Direction(((1.0, kept.tensor), (mu, buf)), offset=off)  # Nesterov

    return Rule(name, direction, keep=keep, stationary=True)


SGD = sgd_rule("sgd")
sgd_direction = SGD.direction


def _raw_grad(group: Group, w: Tensor, grad: Tensor) -> Tensor:
    return grad


def _lars_grad(group: Group, w: Tensor, grad: Tensor) -> Tensor:
    """LARS's scaled gradient, as its step computes it."""
    wd = group["weight_decay"]
    if wd != 0:
        p_norm, g_norm = torch.norm(w), torch.norm(grad)
        if p_norm != 0 and g_norm != 0:
            lars_lr = p_norm / (g_norm + p_norm * wd + group["eps"]) * group["trust_coefficient"]
            return grad.add(w, alpha=wd).mul_(lars_lr)
    return grad


SGDW = sgd_rule("sgdw", _raw_grad, offset=True)
LARS = sgd_rule("lars", _lars_grad)


def _qhm_grad(group: Group, w: Tensor, grad: Tensor) -> Tensor:
    return effective_grad(group, w, grad, coupled=group["weight_decay_type"] == "grad")


def _keep_qhm(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
    return None if group["nu"] == 1.0 else _qhm_grad(group, w, grad)


def _qhm(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    nu = group["nu"]
    if "momentum_buffer" not in state:
        return None
    direct = group["weight_decay_type"] != "grad"
    factor, lam = decoupled(group["weight_decay"], group["lr"]) if direct else (1.0, 0.0)
    terms: Tuple[Tuple[float, Tensor], ...] = ((nu * factor, state["momentum_buffer"]),)
    if nu != 1.0:
        if kept is None:
            return None
        terms += (((1.0 - nu) * factor, kept.tensor),)
    return Direction(terms, decay=lam)


QHM = Rule("qhm", _qhm, keep=_keep_qhm)


def _aggmo(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    bufs = state.get("momentum_buffer")
    if not bufs:
        return None
    return Direction(tuple((1.0 / len(group["betas"]), bufs[b]) for b in group["betas"]))


AGGMO = Rule("aggmo", _aggmo)


def _state_update(key: str) -> Callable[..., Optional[Direction]]:
    def direction(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
        return Direction(((1.0, state[key]),)) if "step" in state and key in state else None
    return direction


NOVOGRAD = Rule("novograd", _state_update("exp_avg"))
SHAMPOO = Rule("shampoo", _state_update("momentum_buffer"))


def _pid(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "grad_buffer" not in state:
        return None
    return Direction(((1.0, state["grad_buffer"]), (group["integral"], state["i_buffer"]),
                      (group["derivative"], state["d_buffer"])))


PID = with_fallback("pid", _pid, lambda g, s, w, grad: not g["momentum"] or "grad_buffer" not in s)


def _apollo(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if not state.get("step"):
        return None
    used = step_count(state) - 1  # the step counter the update used
    if used < group["warmup"]:
        lr_used = (group["base_lr"] - group["init_lr"]) * used / group["warmup"] + group["init_lr"]
        return Direction(((lr_used, state["update"]),), lr=float(group["lr"]))
    return Direction(((1.0, state["update"]),))


APOLLO = Rule("apollo", _apollo)


def _adafactor(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    from torch_optimizer import Adafactor  # only registered when torch_optimizer is installed

    delta = group["weight_decay"] * Adafactor._get_lr(None, group, state)  # type: ignore[arg-type]
    f = 1.0 - delta
    if f == 0 or not math.isfinite(f):
        return None
    return Direction(((1.0 / f, state["exp_avg"]),), decay=delta / f, lr=group_lr(group))


ADAFACTOR = with_fallback("adafactor", _adafactor, lambda g, s, w, grad: g["beta1"] is None)
