"""Registry of prediction rules, keyed by optimizer class (looked up along the MRO) and by name.

Families live one per module (:mod:`~lookahead_opt.rules.sgd`,
:mod:`~lookahead_opt.rules.adam`, ...); :mod:`~lookahead_opt.rules.fallback` is the generic
rule for everything else.
"""
from __future__ import annotations

from typing import Dict, Optional, Union

import torch

from . import adam, fallback, rms, sgd, sign
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

try:  # torch_optimizer is optional
    import torch_optimizer as _to
except ImportError:  # pragma: no cover
    _to = None
if _to is not None:
    register_rule(_to.Yogi, adam.ADAM)
    register_rule(_to.QHAdam, adam.QHADAM)
