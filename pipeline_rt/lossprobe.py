"""A loss that does not say how it reduces over rows, probed once.

The pipeline weighs micro-batch ``m``'s loss so that the weighted sum over the micro-batches
is the whole minibatch's loss (:func:`pipeline_rt.guards.micro_batch_weight`): ``n_m / n``
for a mean over rows, ``1`` for a sum. A loss that declares its reduction (an ``nn`` loss, a
:func:`functools.partial`, a signature default: :func:`pipeline_rt.guards.declared_reduction`)
is weighed from its declaration. A plain function such as
``lambda out, y: F.cross_entropy(out, y, reduction="sum")`` declares nothing: taken as a
mean, it would train at ``1 / chunks`` of the intended gradient. :class:`ReductionProbe`
finds out instead, once, at the loss's first call, without autograd and without touching
the random number generators::

    L = loss(out, y)
    D = loss(cat(out, out), cat(y, y))       (every row twice)
    D / L near 1  -> a mean over rows        (duplicating rows changes no mean, weighted ones neither)
    D / L near 2  -> a sum over rows
    otherwise     -> neither: the loss mixes rows or adds a term per call. Refused where the
                     pipeline splits minibatches (chunks > 1); taken as a mean otherwise.

(near: within 5%; the two answers are a factor 2 apart). ``L == 0`` decides nothing: the
next call probes again. A loss whose output or target is not a tensor (or a tuple/list of
tensors) with rows along dim 0, or that fails on twice the rows, cannot be probed and is
taken as a mean, as before the probe existed; declare its reduction (``loss.reduction =
"sum"``) to be sure.

Cost: one extra loss evaluation on twice the rows of one micro-batch, once per pipeline;
every later call is the loss's own plus one attribute test.

Weights decided before the probe. The feed fixes a micro-batch's weight when it reads its
minibatch, which can be before the loss has ever been called (minibatch 0, and those read
ahead). Until the probe has decided, the pipeline hands out :class:`Share` weights, which
hold the rows and the minibatch's rows and give their weight (:func:`resolve_weight`) when
the stage multiplies the loss by it, right after the loss call that probed.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor

from .guards import error_text, micro_batch_weight

__all__ = ["ReductionProbe", "Share", "resolve_weight"]

#: how far ``D / L`` may be from 1 (a mean) or 2 (a sum)
TOLERANCE = 0.05


def _doubled(x: Any) -> Any:
    """``x`` with every row twice (dim 0), for a tensor or a tuple/list of tensors."""
    if isinstance(x, Tensor) and x.dim() > 0:
        return torch.cat([x, x])
    if isinstance(x, (tuple, list)) and x and all(isinstance(t, Tensor) and t.dim() > 0 for t in x):
        return type(x)(torch.cat([t, t]) for t in x)
    raise TypeError("not rows")


def _rows(x: Any) -> int:
    return int((x if isinstance(x, Tensor) else x[0]).shape[0])


class ReductionProbe:
    """``loss_fn`` (called as itself), which tells at its first call whether it is a mean or
    a sum over rows (see the module docstring); :attr:`reduction` is ``None`` until then.

    Args:
        loss_fn: the user's ``loss_fn(output, target)``.
        strict: refuse (``ValueError``) a loss that is neither a mean nor a sum; the
            pipeline sets it where it splits minibatches into several micro-batches.
    """

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], strict: bool) -> None:
        self.loss_fn, self.strict = loss_fn, strict
        self.reduction: Optional[str] = None
        # randomness.may_draw sees the user's loss through the probe
        self.draws_random = getattr(loss_fn, "draws_random", None)

    def __call__(self, out: Any, target: Any) -> Tensor:
        loss = self.loss_fn(out, target)
        if self.reduction is None:
            self.reduction = self._probe(out, target, loss)
        return loss

    def as_mean(self, out: Any, target: Any) -> Tensor:
        """The loss as a mean over the rows of ``out`` (a sum divided by them), for evaluation."""
        loss = self(out, target)
        return loss / _rows(out) if self.reduction == "sum" else loss

    def _probe(self, out: Any, target: Any, loss: Tensor) -> Optional[str]:
        if not isinstance(loss, Tensor) or loss.numel() != 1:
            return "mean"  # not a scalar: the stage refuses it
        try:
            doubled_out, doubled_target = _doubled(out), _doubled(target)
        except TypeError:
            return "mean"  # no rows to duplicate: cannot tell
        devices = [t.device for t in (out if isinstance(out, (tuple, list)) else [out]) if t.device.type == "cuda"]
        with torch.no_grad(), torch.random.fork_rng(devices=devices[:1]):
            try:
                doubled = self.loss_fn(doubled_out, doubled_target)
            except (RuntimeError, ValueError, TypeError, IndexError):
                return "mean"  # the loss does not take twice the rows: cannot tell
        single, twice = float(loss.detach().sum()), float(doubled.detach().sum())
        if single == 0.0:
            return None  # 0 = 2 * 0: decides nothing; probe the next call
        ratio = twice / single
        if abs(ratio - 1) <= TOLERANCE:
            return "mean"
        if abs(ratio - 2) <= TOLERANCE:
            return "sum"
        if not self.strict:
            return "mean"
        raise ValueError(error_text(
            f"loss_fn is neither a mean nor a sum over rows: with every row of a micro-batch duplicated it "
            f"returned {twice:.6g} instead of {single:.6g} (a mean keeps its value, a sum doubles it), so the "
            f"pipeline cannot weigh its micro-batches to make the whole minibatch's loss.",
            fixes=["if it is a mean or a sum after all, say so: loss_fn.reduction = 'mean' (or 'sum'), or pass an "
                   "nn loss / functools.partial(F.some_loss, reduction=...)",
                   "if it mixes rows (a loss over the whole batch), train with chunks=1"]))


class Share(float):
    """A micro-batch's share of its minibatch's loss, decided by a :class:`ReductionProbe`.

    As a float it is the mean's weight ``rows / total``; :meth:`weight` is the weight for
    the reduction the probe found (the mean's while it has found none)."""

    rows: int
    total: int
    probe: ReductionProbe

    def __new__(cls, rows: int, total: int, probe: ReductionProbe) -> "Share":
        share = super().__new__(cls, micro_batch_weight("mean", rows, total))
        share.rows, share.total, share.probe = rows, total, probe
        return share

    def weight(self) -> float:
        return micro_batch_weight(self.probe.reduction or "mean", self.rows, self.total)

    def __reduce__(self) -> Any:  # a checkpoint stores the weight, not the probe and its loss
        return float, (self.weight(),)


def resolve_weight(weight: float) -> float:
    """The weight to multiply a micro-batch's loss by: :meth:`Share.weight` for a
    :class:`Share`, ``weight`` itself otherwise."""
    return weight.weight() if isinstance(weight, Share) else weight
