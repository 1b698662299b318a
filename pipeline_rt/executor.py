"""What an executor is given and what it returns (shared by the local and distributed ones).

An executor interprets a lowered :class:`~pipeline_rt.schedule.Schedule`: it walks the
actions in :meth:`Schedule.order` (the local executor: all of them; a distributed rank:
its own stage's), moves tensors between stages, and calls :class:`~pipeline_rt.stage.Stage`
for F, B and STEP. It has no method-specific branches: the weight-version policy lives in
the stages, the prediction distance ``s`` comes from :func:`~pipeline_rt.schedule.versions`.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .schedule import Schedule, Versions

__all__ = ["MicroBatch", "Plan", "Executor", "add_loss"]

Unit = Tuple[int, int]


@dataclass
class MicroBatch:
    """One micro-batch: the first stage's inputs, the last stage's target, and its share
    ``weight = micro-batch size / minibatch size`` of the minibatch's (mean) loss."""

    inputs: Tuple[Tensor, ...]
    target: Any
    weight: float = 1.0


@dataclass
class Plan:
    """A schedule together with the data it runs on."""

    schedule: Schedule
    micro: Dict[Unit, MicroBatch]

    def __post_init__(self) -> None:
        self.versions: List[Dict[Unit, Versions]] = self.schedule.weight_versions
        self.order = list(self.schedule.order())

    def s(self, stage: int, unit: Unit) -> int:
        """``v_B - v_F`` of micro-batch ``unit`` at ``stage``, counted on the schedule."""
        return self.versions[stage][unit].s


def add_loss(losses: Optional[Tensor], loss: Tensor, minibatch: int, num_minibatches: int) -> Tensor:
    """Add the last stage's (weighted, detached) micro-batch loss into the per-minibatch
    losses, allocated on first use with the loss's dtype and device; returns them."""
    if loss.numel() != 1:
        raise ValueError(f"loss_fn must return a scalar (reduce the loss), got shape {tuple(loss.shape)}")
    if losses is None:
        losses = torch.zeros(num_minibatches, dtype=loss.dtype, device=loss.device)
    losses[minibatch] += loss.reshape(())
    return losses


class Executor(abc.ABC):
    """Runs a :class:`Plan`'s actions ``order[start:stop]``."""

    @abc.abstractmethod
    def run(self, plan: Plan, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Run the actions with global-order index in ``[start, stop)``.

        Returns the per-minibatch losses (sum over its micro-batches of ``weight * loss``),
        a float tensor of shape ``(num_minibatches,)``; entries of minibatches not finished
        in the range are partial. The distributed executor returns the same tensor on
        every rank.
        """
