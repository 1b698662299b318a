"""Sign family: ``Rprop``.

Rprop's update does not scale with the learning rate: after its step the state holds the
per-element step sizes :math:`\\eta_t` and the (sign-masked) gradient ``prev``, and the update
just applied was

.. math::  W_{t-1} - W_t = \\eta_t \\odot \\operatorname{sign}(\\text{prev}_t)

which is extrapolated as is (the learning rate only sets Rprop's initial step sizes, so a
scheduler does not change the prediction). Exact from the state alone; allocates one
parameter-sized tensor per prediction.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from .base import Direction, Group, Kept, Rule, State

__all__ = ["RPROP"]


def _rprop(group: Group, state: State, w: Tensor, kept: Optional[Kept]) -> Optional[Direction]:
    if "step" not in state:
        return None
    return Direction(((1.0, state["prev"].sign().mul_(state["step_size"])),), lr=float(group["lr"]))


RPROP = Rule("rprop", _rprop)
