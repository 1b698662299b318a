"""Update compensations for delayed gradients: transforms wrapped around an optimizer step.

A prediction (:class:`~lookahead_opt.PredictiveOptimizer`) changes *which weights a forward
sees*. A compensation changes *the update* a delayed gradient makes (or its learning rate):
it wraps one optimizer step. It is called as

.. code-block:: python

    compensation(optimizer, base_step, ctx)

where ``optimizer`` is the stage's :class:`~lookahead_opt.PredictiveOptimizer` (its
``param_groups`` and ``state`` are the wrapped optimizer's), ``base_step()`` performs the plain
step (``optimizer.step()``) and ``ctx`` is a :class:`StepContext` describing the gradient about
to be applied. A compensation must call ``base_step()`` exactly once; what it does before
(change the gradients, the learning rates, hyper-parameters) it undoes after, where the change
is not meant to persist, and what it adds after (a correction of the weights) it adds in place
on the parameters' ``.data``.

Compensations compose like optax transforms: ``Chain(a, b)`` runs ``a`` around ``b`` around
the base step. A compensation holds no per-run state (everything it needs is in ``ctx`` and in
the optimizer's state), so checkpoints need nothing from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional

import torch
from torch import Tensor

__all__ = ["StepContext", "Compensation", "Chain"]


@dataclass(frozen=True)
class StepContext:
    """What a compensation knows about the update it wraps.

    Attributes:
        delay: D, the optimizer updates between the forward of the gradient being applied and
            this update, counted on the schedule (``v_B - v_F``; the largest over the
            micro-batches accumulated into this update). 0 for sequential training.
        step: the updates this stage has done before this one (0 for the first).
        stage: k, the stage's index.
        num_stages: N.
        forward_weights: the weights the gradient was computed at (parameters' order), for
            compensations with ``needs_forward_weights``; ``None`` otherwise.
    """

    delay: int
    step: int
    stage: int = 0
    num_stages: int = 1
    forward_weights: Optional[List[Tensor]] = None


class Compensation:
    """The identity compensation: the plain step. Subclasses override :meth:`__call__`."""

    #: the stage must pass :attr:`StepContext.forward_weights`
    needs_forward_weights: bool = False

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        base_step()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Chain(Compensation):
    """``Chain(a, b, c)``: ``a`` wraps ``b`` wraps ``c`` wraps the base step."""

    def __init__(self, *parts: Compensation) -> None:
        self.parts = parts
        self.needs_forward_weights = any(p.needs_forward_weights for p in parts)

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        step = base_step
        for part in reversed(self.parts):
            step = (lambda p, inner: (lambda: p(optimizer, inner, ctx)))(part, step)
        step()

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.parts))})"
