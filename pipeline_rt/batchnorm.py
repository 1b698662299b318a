"""Batch normalisation with running statistics committed once per minibatch.

A pipeline splits each minibatch of ``n`` rows into ``chunks`` micro-batches and forwards
them one at a time. A plain :class:`torch.nn.BatchNorm2d` in a stage then (a) normalises
each micro-batch with that micro-batch's mean and variance and (b) updates its running
statistics ``chunks`` times per minibatch, each time from one micro-batch, so both the
training-mode outputs and the buffers differ from single-device training on the whole
minibatch.

:class:`DeferredBatchNorm` (after torchgpipe's module of the same name) fixes (b) exactly
and leaves (a) as it is:

* **Normalisation** in training mode uses the micro-batch's own statistics. Making it equal
  to whole-minibatch batch norm would need every micro-batch's statistics before any of them
  is normalised (a synchronisation across micro-batches that defeats pipelining), so it is
  not done; with ``chunks=1`` it is exact.
* **Running statistics.** Over the ``chunks`` forwards of a minibatch it accumulates, per
  channel, the element count ``c``, the mean and the centred sum of squares
  ``M2 = sum (x - mean)^2`` (micro-batches are merged with Chan et al.'s pairwise formula,
  which is the sum / sum-of-squares accumulation written in a numerically stable form), and
  after the last one it commits, once::

      num_batches_tracked += 1
      f = momentum                      (or 1 / num_batches_tracked if momentum is None)
      running_mean = (1 - f) * running_mean + f * mean
      running_var  = (1 - f) * running_var  + f * M2 / (c - 1)     (unbiased, all rows)

  which is exactly what :class:`torch.nn.BatchNorm2d` does on the whole minibatch.

Which forwards form a minibatch. The module counts training-mode forwards: forwards
``1..chunks`` are one minibatch, ``chunks+1..2*chunks`` the next, and so on. This relies on
an ordering that every schedule of :mod:`pipeline_rt.schedule` has: a stage forwards the
units ``(j, 0), (j, 1), ..., (j, chunks-1)`` of minibatch ``j`` in that order, and no
forward of minibatch ``j+1`` comes before the last forward of ``j`` at the same stage
(backwards and ``STEP`` actions may come in between; they do not touch the statistics). A
forward recomputed for its backward (``Pipeline(recompute=...)``, or ``torch.utils.checkpoint``
inside the stage: :func:`pipeline_rt.recompute.is_recomputing`) is not counted again. A
training-mode forward outside the pipeline counts too; call :func:`load_pending_stats`
``(module, {})`` to drop a partial minibatch (e.g. after a run aborted in the middle of
one). In eval mode the module is a plain batch norm using the running statistics.

The partial accumulation is not in ``state_dict`` (whose keys stay those of
:class:`torch.nn.BatchNorm2d`, so checkpoints load into either); :func:`pending_stats` and
:func:`load_pending_stats` save and restore it, for a checkpoint taken in the middle of a
minibatch.
"""
from __future__ import annotations

from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .recompute import is_recomputing

__all__ = ["DeferredBatchNorm", "Pending", "convert_deferred_batch_norm", "pending_stats", "load_pending_stats"]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Pending(NamedTuple):
    """The statistics of a minibatch's forwards so far (per channel)."""

    forwards: int   # micro-batches accumulated
    elements: int   # elements per channel accumulated (rows times spatial size)
    mean: Tensor    # their mean
    m2: Tensor      # their centred sum of squares, sum (x - mean)^2


class DeferredBatchNorm(_BatchNorm):
    """Batch norm for a stage whose minibatch arrives as ``chunks`` micro-batches.

    Training mode: normalises each micro-batch with its own statistics (as a batch norm on
    that micro-batch alone) and commits the running statistics once every ``chunks``
    forwards, equal to a batch norm's single update on all the rows of those forwards (see
    the module docstring for the formula and the ordering it relies on). Eval mode: a plain
    batch norm with the running statistics. Accepts any input of shape ``(N, C, *)``.

    Args:
        num_features: ``C``.
        eps, momentum, affine: as :class:`torch.nn.BatchNorm2d` (``momentum=None``: a
            cumulative average, ``f = 1 / num_batches_tracked``).
        chunks: micro-batches per minibatch (the pipeline's ``chunks``).
    """

    batch_dependent = False  # handled: see pipeline_rt.guards.batch_dependent
    running_mean: Tensor  # always tracked (track_running_stats=True)
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, *, chunks: int, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"DeferredBatchNorm: chunks must be a positive int, got {chunks!r}")
        self.chunks = chunks
        self.pending: Optional[Pending] = None

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, chunks={self.chunks}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects an input of shape (N, C, *), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        # batch statistics of this micro-batch only; no running statistics touched here
        out = F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)
        if not is_recomputing():  # a recomputed forward was counted when it first ran
            with torch.no_grad():
                self._accumulate(input.detach())
        return out

    def _accumulate(self, x: Tensor) -> None:
        """Merge this micro-batch's per-channel (elements, mean, M2) into :attr:`pending`;
        commit after the ``chunks``-th."""
        acc = torch.promote_types(torch.promote_types(x.dtype, torch.float32), self.running_mean.dtype)
        x = x.to(acc)
        dims = [0, *range(2, x.dim())]
        n_b = x.numel() // x.shape[1]
        mean_b = x.mean(dims)
        m2_b = (x - mean_b.view(1, -1, *[1] * (x.dim() - 2))).square().sum(dims)
        p = self.pending
        if p is None:
            p = Pending(1, n_b, mean_b, m2_b)
        else:
            n = p.elements + n_b
            delta = mean_b - p.mean
            p = Pending(p.forwards + 1, n, p.mean + delta * (n_b / n),
                        p.m2 + m2_b + delta.square() * (p.elements * n_b / n))
        if p.forwards < self.chunks:
            self.pending = p
            return
        self.pending = None
        self.num_batches_tracked.add_(1)
        # momentum None: f = 1 / num_batches_tracked, kept on the device (no host sync)
        f = self.num_batches_tracked.to(p.mean.dtype).reciprocal() if self.momentum is None else self.momentum
        var = p.m2 / (p.elements - 1)
        self.running_mean.copy_((1 - f) * self.running_mean + f * p.mean.to(self.running_mean.dtype))
        self.running_var.copy_((1 - f) * self.running_var + f * var.to(self.running_var.dtype))


def convert_deferred_batch_norm(module: nn.Module, chunks: int) -> nn.Module:
    """Replace every :class:`~torch.nn.BatchNorm1d`/``2d``/``3d`` in ``module`` (itself
    included) that tracks running statistics by a :class:`DeferredBatchNorm` with the same
    ``num_features``, ``eps``, ``momentum``, ``affine``, training flag, and the very same
    parameter and buffer tensors (an optimizer already built over the old parameters keeps
    updating them). Batch norms with ``track_running_stats=False`` have nothing to defer
    and are left as they are (:func:`pipeline_rt.guards.check_batch_dependent` still
    reports them). Children are replaced in place; use the returned module (a new one when
    ``module`` itself is a batch norm).
    """
    if isinstance(module, _CONVERTIBLE) and module.track_running_stats:
        mean, var, tracked = module.running_mean, module.running_var, module.num_batches_tracked
        assert mean is not None and var is not None and tracked is not None  # track_running_stats
        new = DeferredBatchNorm(module.num_features, module.eps, module.momentum, module.affine, chunks=chunks,
                                device=mean.device, dtype=mean.dtype)
        if module.affine:
            new.weight, new.bias = module.weight, module.bias
        new.running_mean, new.running_var, new.num_batches_tracked = mean, var, tracked
        new.train(module.training)
        return new
    for name, child in list(module.named_children()):
        new_child = convert_deferred_batch_norm(child, chunks)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def pending_stats(module: nn.Module) -> Dict[str, Pending]:
    """The partial minibatch of every :class:`DeferredBatchNorm` in ``module`` that has
    one, by module path (``""`` for ``module`` itself); copies, for a checkpoint."""
    return {name: Pending(p.forwards, p.elements, p.mean.clone(), p.m2.clone())
            for name, m in module.named_modules() if isinstance(m, DeferredBatchNorm)
            for p in [m.pending] if p is not None}


def load_pending_stats(module: nn.Module, state: Dict[str, Pending]) -> None:
    """Restore :func:`pending_stats`: every :class:`DeferredBatchNorm` in ``module`` gets
    its entry of ``state``, and those without one start a fresh minibatch (so
    ``load_pending_stats(module, {})`` drops every partial minibatch)."""
    found = {name: m for name, m in module.named_modules() if isinstance(m, DeferredBatchNorm)}
    unknown = sorted(set(state) - set(found))
    if unknown:
        raise ValueError(f"load_pending_stats: no DeferredBatchNorm at {unknown} in this module "
                         f"(it has {sorted(found)}); was the state saved from another model?")
    for name, m in found.items():
        p = state.get(name)
        m.pending = None if p is None else Pending(
            p.forwards, p.elements, p.mean.to(m.running_mean.device), p.m2.to(m.running_mean.device))
