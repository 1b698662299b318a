r"""Registry of prediction rules, keyed by optimizer class (looked up along the MRO) and by name.

Families live one per module, each rule a parameterisation of its family's shape:

* :mod:`~lookahead_opt.rules.sgd`: SGD; torch_optimizer SGDW, LARS, QHM, AggMo, NovoGrad,
  Shampoo, PID, Apollo, Adafactor (state buffers, plus the kept gradient where needed).
* :mod:`~lookahead_opt.rules.adam`: Adam/AdamW, Adamax, RAdam, NAdam; torch_optimizer Yogi,
  QHAdam, AdaBelief, Lamb, SWATS, Adahessian.
* :mod:`~lookahead_opt.rules.bounded`: torch_optimizer AdaBound, AdaMod (bounded rate).
* :mod:`~lookahead_opt.rules.projected`: torch_optimizer AdamP, SGDP (projected steps go to
  the fallback).
* :mod:`~lookahead_opt.rules.dual`: torch_optimizer MADGRAD (dual averaging).
* :mod:`~lookahead_opt.rules.rms`: RMSprop, Adagrad, Adadelta; :mod:`~lookahead_opt.rules.sign`:
  Rprop.

:mod:`~lookahead_opt.rules.fallback` is the generic rule for everything else. Left on it on
purpose, because a rule would be no cheaper than the fallback (one buffer per parameter,
refreshed each step) or not exact:

* torch_optimizer ``DiffGrad``: its update needs :math:`g_{t-1}` and :math:`g_t` (the state
  keeps only :math:`g_t`): a kept buffer plus a per-prediction sigmoid, dearer than the fallback.
* torch_optimizer ``A2GradUni/Inc/Exp``, ``AccSGD``: :math:`W_t` mixes :math:`W_{t-1}`, a state
  average and the raw gradient; the rule would keep the gradient (the fallback's buffer) and make
  a longer prediction pass.
* ``torch.optim.Adafactor``: no first moment; the update is the factored
  :math:`g_t/\sqrt{\hat v_t}` of the raw gradient (kept buffer plus a row/column outer product
  per prediction).
* torch_optimizer ``RAdam`` (a different class from torch's; keyed by class object, not name),
  ``LBFGS`` (closure, flattened state), ``SparseAdam`` (sparse rows), ``Muon`` (5 matmuls per
  prediction), ``ASGD``, ``Lookahead`` (a sync every k steps makes W jump).

Some rules hand particular steps to the fallback (:func:`~lookahead_opt.rules.fallback.with_fallback`):
SWATS's first SGD step, PID's first step and PID without momentum, AdamP/SGDP steps that are
projected or Nesterov, MADGRAD without momentum, torch_optimizer Adafactor without ``beta1``.
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, Optional, Union

import torch

from . import adam, bounded, dual, fallback, projected, rms, sgd, sign
from .base import Direction, Kept, Rule

__all__ = ["Direction", "Kept", "Rule", "register_rule", "rule_for", "rule_named", "FALLBACK", "SMOOTHED_GRADIENT"]

FALLBACK = fallback.FALLBACK
SMOOTHED_GRADIENT = fallback.SMOOTHED_GRADIENT

_BY_CLASS: Dict[type, Rule] = {}
_BY_NAME: Dict[str, Rule] = {}


def register_rule(optimizer_class: type, rule: Rule) -> None:
    """Use ``rule`` for ``optimizer_class`` and its subclasses (unless they have their own).

    Also makes the rule available by its name (``rule="<name>"``).
    """
    if not (isinstance(optimizer_class, type) and issubclass(optimizer_class, torch.optim.Optimizer)):
        raise TypeError(f"register_rule expects a torch.optim.Optimizer subclass, got {optimizer_class!r}")
    if not isinstance(rule, Rule):
        raise TypeError(f"register_rule expects a lookahead_opt.rules.Rule, got {type(rule).__name__}")
    _BY_CLASS[optimizer_class] = rule
    _BY_NAME.setdefault(rule.name, rule)


def rule_for(optimizer_class: type) -> Optional[Rule]:
    """The rule registered for the nearest class in ``optimizer_class.__mro__``, or ``None``."""
    for cls in optimizer_class.__mro__:
        if cls in _BY_CLASS:
            return _BY_CLASS[cls]
    return None


def rule_named(name: Union[str, Rule]) -> Rule:
    """A rule by registry name (``"fallback"``, ``"smoothed_gradient"``, ``"adam"``, ...)."""
    if isinstance(name, Rule):
        return name
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown rule {name!r}; known: {sorted(_BY_NAME)}") from None


for _r in (FALLBACK, SMOOTHED_GRADIENT):
    _BY_NAME[_r.name] = _r
_cls: type  # the optimizer classes below, of torch and of torch_optimizer
for _cls, _r in (
    (torch.optim.SGD, sgd.SGD),
    (torch.optim.Adam, adam.ADAM),
    (torch.optim.Adamax, adam.ADAMAX),
    (torch.optim.RAdam, adam.RADAM),
    (torch.optim.NAdam, adam.NADAM),
    (torch.optim.RMSprop, rms.RMSPROP),
    (torch.optim.Adagrad, rms.ADAGRAD),
    (torch.optim.Adadelta, rms.ADADELTA),
    (torch.optim.Rprop, sign.RPROP),
):
    register_rule(_cls, _r)

_to: Optional[ModuleType]
try:  # torch_optimizer is optional
    import torch_optimizer as _to
except ImportError:  # pragma: no cover
    _to = None
if _to is not None:
    for _cls, _r in (
        (_to.Yogi, adam.ADAM),
        (_to.QHAdam, adam.QHADAM),
        (_to.AdaBelief, adam.ADABELIEF),
        (_to.Lamb, adam.LAMB),
        (_to.SWATS, adam.SWATS),
        (_to.Adahessian, adam.ADAHESSIAN),
        (_to.AdaBound, bounded.ADABOUND),
        (_to.AdaMod, bounded.ADAMOD),
        (_to.AdamP, projected.ADAMP),
        (_to.SGDP, projected.SGDP),
        (_to.MADGRAD, dual.MADGRAD),
        (_to.SGDW, sgd.SGDW),
        (_to.LARS, sgd.LARS),
        (_to.QHM, sgd.QHM),
        (_to.AggMo, sgd.AGGMO),
        (_to.NovoGrad, sgd.NOVOGRAD),
        (_to.Shampoo, sgd.SHAMPOO),
        (_to.PID, sgd.PID),
        (_to.Apollo, sgd.APOLLO),
        (_to.Adafactor, sgd.ADAFACTOR),
    ):
        register_rule(_cls, _r)
