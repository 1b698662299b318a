"""Adam family: one update shape, read from the state in per-optimizer ways.

.. math::

    dW_t = \\frac{\\sum_k c_k N_k}{\\beta \\sqrt{v} + \\epsilon}
           \\;\\big[+\\,\\lambda W_{t-1}\\big]_{\\text{decoupled decay}}

* ``Adam`` (and ``AdamW``, a subclass): :math:`\\hat m_t / (\\sqrt{\\hat v_t} + \\epsilon)`
  with :math:`\\hat m = m/(1-\\beta_1^t)`, :math:`\\hat v = v/(1-\\beta_2^t)`; ``amsgrad`` uses
  the running maximum of ``v``; coupled weight decay and ``maximize`` are already inside ``m``.
* ``Adamax``: :math:`\\hat m_t / u_t` (``u = exp_inf``, no root, its eps inside ``u``).
* ``RAdam``: :math:`r_t \\sqrt{1-\\beta_2^t}\\, \\hat m_t / (\\sqrt{v_t} + \\epsilon)` when
  :math:`\\rho_t > 5`, else :math:`\\hat m_t`.
* ``Yogi`` (torch_optimizer): Adam's rule on its own ``exp_avg_sq``.
* ``QHAdam`` (torch_optimizer): :math:`(\\nu_1 m_t + (1-\\nu_1) g'_t) / (\\sqrt{\\nu_2 v_t +
  (1-\\nu_2) g'^2_t} + \\epsilon)` (its moments are already debiased); :math:`g'_t` kept only when
  a :math:`\\nu \\ne 1` (and the denominator then allocated per prediction).
* ``AdaBelief`` (torch_optimizer): Adam's shape on ``exp_avg_var`` (which its step leaves
  with ``eps`` added in place); ``rectify`` as RAdam (SGD-style ``m_t`` when
  :math:`\\rho_t \\le 4`); ``weight_decouple`` decays by ``1 - lr*wd`` or, with
  ``fixed_decay``, by ``1 - wd`` (settings read from the optimizer's attributes).
* ``Lamb`` (torch_optimizer): :math:`\\tau_t\\, b\\, (m_t/(\\sqrt{v_t}+\\epsilon) + \\lambda W_{t-1})`
  with the trust ratio :math:`\\tau_t` the step stored in ``state["trust_ratio"]`` (computed on
  :math:`W_{t-1}`, so reading it is exact, not a recomputation on :math:`W_t`; 1 with ``adam``),
  :math:`b = \\sqrt{1-\\beta_2^t}/(1-\\beta_1^t)` with ``debias``, else 1. Reading the 0-d
  ``trust_ratio`` tensor is one host sync per parameter on CUDA.
* ``SWATS`` (torch_optimizer): Adam's shape in its Adam phase; in its SGD phase the momentum
  buffer is the update (its step rescales the buffer in place), except for the first SGD step,
  which goes to the fallback (:func:`~lookahead_opt.rules.fallback.with_fallback`).
* ``Adahessian`` (torch_optimizer): :math:`\\hat m_t / (\\hat v_t^{k/2} + \\epsilon)`,
  :math:`k` = ``hessian_power`` (a ``power`` of the denominator), decay on :math:`W_{t-1}`.
* ``NAdam``: :math:`\\frac{1-\\mu_t}{1-\\Pi_t} g'_t + \\frac{\\mu_{t+1}}{1-\\Pi_t\\mu_{t+1}} m_t`
  over :math:`\\sqrt{\\hat v_t} + \\epsilon`; :math:`g'_t` is kept at step time (one buffer per
  parameter, the fallback's cost).

Decoupled weight decay (``AdamW``; ``decoupled_weight_decay=True``) multiplies
:math:`W_{t-1}` by :math:`1 - lr\\,\\lambda`; :func:`~lookahead_opt.rules.base.decoupled`
rewrites it exactly in terms of :math:`W_t` while the group's ``lr`` is the one the step used
(approximate, with an error of order :math:`lr\\,\\lambda` relative, once a scheduler has
changed ``lr`` since the step). The paper leaves this decay out of ``dW``; it is included here
so that ``lr * dW`` reproduces the update.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple, Union

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State, decoupled, effective_grad, step_count
from .fallback import with_fallback

__all__ = ["ADAM", "ADAMAX", "RADAM", "NADAM", "QHADAM", "ADABELIEF", "LAMB", "SWATS", "ADAHESSIAN", "adam_like"]


def adam_like(
    group: Group,
    state: State,
    terms: Sequence[Tuple[float, Tensor]],
    *,
    second: Union[str, Tensor, None] = "exp_avg_sq",
    bias2: float = 1.0,
    root: bool = True,
    eps: Optional[float] = None,
    decay: bool = False,
    wd: Optional[float] = None,
    at_lr: Optional[float] = None,
    gain: float = 1.0,
    power: float = 0.5,
) -> Direction:
    """The shared Adam-family direction.

    ``sum(c*N for c, N in terms) / (sqrt(v / bias2) + eps)`` with ``v`` the state tensor
    named ``second`` (its running maximum ``max_<second>`` when the group has ``amsgrad``) or
    the tensor ``second``, or no denominator when ``second`` is None; ``decay`` adds decoupled weight decay ``wd``
    (default: the group's ``weight_decay``) applied to ``W_{t-1}`` by a step of learning rate
    ``at_lr`` (default: the group's); ``gain`` multiplies the whole direction; ``power`` is the
    root's exponent (with ``bias2`` then raised to it too).
    """
    lr = group["lr"] if at_lr is None else at_lr
    factor, lam = decoupled(group.get("weight_decay", 0.0) if wd is None else wd, lr) if decay else (1.0, 0.0)
    factor, lam = factor * gain, lam * gain
    terms = tuple((c * factor, n) for c, n in terms)
    if second is None:
        return Direction(terms, decay=lam)
    if isinstance(second, Tensor):
        v = second
    else:
        v = state["max_" + second] if group.get("amsgrad", False) else state[second]
    return Direction(terms, den=v, root=root, scale=(1.0 / math.sqrt(bias2) if power == 0.5 else bias2 ** -power) if root else 1.0 / bias2, power=power,
                     eps=group["eps"] if eps is None else eps, decay=lam)


def _bias(beta: float, t: float) -> float:
    return 1.0 - beta ** t


def _decoupled_wd(group: Group) -> bool:
    return bool(group.get("decoupled_weight_decay", False))


def _adam(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    return adam_like(group, state, ((1.0 / _bias(b1, t), state["exp_avg"]),), bias2=_bias(b2, t),
                     decay=_decoupled_wd(group))


def _adamax(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    b1, _ = group["betas"]
    return adam_like(group, state, ((1.0 / _bias(b1, step_count(state)), state["exp_avg"]),),
                     second="exp_inf", root=False, eps=0.0)


def _radam(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    bc2 = _bias(b2, t)
    rho_inf = 2 / (1 - b2) - 1
    rho_t = rho_inf - 2 * t * b2 ** t / bc2
    m = ((1.0 / _bias(b1, t), state["exp_avg"]),)
    if rho_t <= 5.0:
        return adam_like(group, state, m, second=None, decay=_decoupled_wd(group))
    rect = math.sqrt((rho_t - 4) * (rho_t - 2) * rho_inf / ((rho_inf - 4) * (rho_inf - 2) * rho_t))
    return adam_like(group, state, ((m[0][0] * rect * math.sqrt(bc2), m[0][1]),), decay=_decoupled_wd(group))


def _keep_nadam_grad(group: Group, state: State, w: Tensor, grad: Tensor) -> Tensor:
    return effective_grad(group, w, grad, coupled=not _decoupled_wd(group))


def _nadam(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state or kept is None:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    psi = group["momentum_decay"]
    mu = b1 * (1.0 - 0.5 * 0.96 ** (t * psi))
    mu_next = b1 * (1.0 - 0.5 * 0.96 ** ((t + 1) * psi))
    prod = float(state["mu_product"])
    terms = (((1.0 - mu) / (1.0 - prod), kept.tensor), (mu_next / (1.0 - prod * mu_next), state["exp_avg"]))
    return adam_like(group, state, terms, bias2=_bias(b2, t), decay=_decoupled_wd(group))


def _step(group: Group, state: State) -> Optional[float]:
    """The signature of the rules that read only the step count: its value."""
    return step_count(state) if "step" in state else None


ADAM = Rule("adam", _adam, signature=_step)
ADAMAX = Rule("adamax", _adamax, signature=_step)
RADAM = Rule("radam", _radam, signature=_step)
NADAM = Rule("nadam", _nadam, keep=_keep_nadam_grad)


def _keep_qhadam(group: Group, state: State, w: Tensor, grad: Tensor) -> Optional[Tensor]:
    if tuple(group["nus"]) == (1.0, 1.0):
        return None
    return effective_grad(group, w, grad, coupled=not group["decouple_weight_decay"])


def _qhadam(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "exp_avg" not in state:
        return None
    nu1, nu2 = group["nus"]
    terms: Tuple[Tuple[float, Tensor], ...] = ((nu1, state["exp_avg"]),)
    v = state["exp_avg_sq"]
    if (nu1, nu2) != (1.0, 1.0):  # quasi-hyperbolic: mixes in the kept gradient
        if kept is None:
            return None
        g = kept.tensor
        if nu1 != 1.0:
            terms += ((1.0 - nu1, g),)
        if nu2 != 1.0:
            v = (v * nu2).addcmul_(g, g, value=1.0 - nu2)
    return adam_like(group, state, terms, second=v, decay=group["decouple_weight_decay"])


QHADAM = Rule("qhadam", _qhadam, keep=_keep_qhadam)


def _adabelief_settings(opt, i: int) -> dict:
    return {"_decouple": opt._weight_decouple, "_fixed_decay": opt._fixed_decay, "_rectify": opt._rectify}


def _adabelief(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    bc1, bc2 = _bias(b1, t), _bias(b2, t)
    lr, wd = group["lr"], group["weight_decay"]
    decay = bool(group["_decouple"]) and wd != 0
    if decay and group["_fixed_decay"]:
        wd = wd / lr if lr else 0.0  # W *= 1 - wd: decoupled() at lr with wd/lr
    kw = dict(second="exp_avg_var", decay=decay, wd=wd)
    if not group["_rectify"]:
        return adam_like(group, state, ((1.0 / bc1, state["exp_avg"]),), bias2=bc2, **kw)
    rho_inf, rho_t = state["rho_inf"], state["rho_t"]
    if rho_t <= 4:
        return adam_like(group, state, ((1.0, state["exp_avg"]),), **dict(kw, second=None))
    rt = math.sqrt((rho_t - 4.0) * (rho_t - 2.0) * rho_inf / (rho_inf - 4.0) / (rho_inf - 2.0) / rho_t)
    return adam_like(group, state, ((rt / bc1, state["exp_avg"]),), bias2=bc2, **kw)


ADABELIEF = Rule("adabelief", _adabelief, settings=_adabelief_settings)


def _lamb_settings(opt, i: int) -> dict:
    return {"_adam": opt.adam, "_debias": opt.debias}


def _lamb(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    bc = math.sqrt(_bias(b2, t)) / _bias(b1, t) if group["_debias"] else 1.0
    gain = bc * (1.0 if group["_adam"] else float(state["trust_ratio"]))
    return adam_like(group, state, ((1.0, state["exp_avg"]),), decay=True, at_lr=group["lr"] * gain, gain=gain)


LAMB = Rule("lamb", _lamb, settings=_lamb_settings)


def _swats(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    if group["phase"] == "SGD":
        return Direction(((1.0, state["momentum_buffer"]),))
    t = step_count(state)
    b1, b2 = group["betas"]
    return adam_like(group, state, ((math.sqrt(_bias(b2, t)) / _bias(b1, t), state["exp_avg"]),))


def _swats_first_sgd_step(group: Group, state: State, w: Tensor, grad: Optional[Tensor]) -> bool:
    return group["phase"] == "SGD" and "momentum_buffer" not in state


SWATS = with_fallback("swats", _swats, _swats_first_sgd_step)


def _adahessian(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    t = step_count(state)
    b1, b2 = group["betas"]
    return adam_like(group, state, ((1.0 / _bias(b1, t), state["exp_avg"]),), second="exp_hessian_diag_sq",
                     bias2=_bias(b2, t), power=group["hessian_power"] / 2, decay=True)


ADAHESSIAN = Rule("adahessian", _adahessian)
