"""Batch normalisation for stages whose minibatch arrives as micro-batches.

A pipeline splits each minibatch of ``n`` rows into ``chunks`` micro-batches and forwards
them one at a time. A plain :class:`torch.nn.BatchNorm2d` in a stage then (a) normalises
each micro-batch with that micro-batch's mean and variance and (b) updates its running
statistics ``chunks`` times per minibatch, each time from one micro-batch, so both the
training-mode outputs and the buffers differ from single-device training on the whole
minibatch. Two modules here, both committing running statistics once per minibatch:

* :class:`GhostBatchNorm`: **exact**. Training mode normalises fixed groups of
  ``group_rows`` consecutive rows (ghost batches) with each group's own statistics. A
  micro-batch of whole groups is then normalised exactly as inside the whole minibatch, so a
  pipeline with any ``chunks`` computes the same function as single-device training with the
  same ghost batch norm: the same losses, gradients, weights and running statistics (float
  rounding aside), at every layer. The model is a ghost-batch-norm model (Hoffer et al.,
  2017): with ``group_rows`` equal to the minibatch's rows it is plain batch norm.
* :class:`DeferredBatchNorm` (after torchgpipe's module of the same name): keeps plain
  batch norm's per-micro-batch normalisation and fixes only (b). What it guarantees, exactly:

  - **Normalisation** in training mode uses the micro-batch's own statistics, so outputs,
    gradients and from the first update on the weights differ from single-device training
    with ``BatchNorm`` (with ``chunks=1`` they are equal).
  - **Running statistics**: at the end of each minibatch it commits, once, what a
    ``BatchNorm`` would commit after one forward of the concatenation of **the inputs this
    module received** over that minibatch's micro-batches (formula below). Those inputs are
    those of single-device training only if nothing before this module depends on how the
    minibatch was cut: true for the first batch norm of a network at the first minibatch
    (and at every minibatch if the weights are the same), false for every later one, whose
    inputs went through earlier per-micro-batch normalisations (issue 24 measured 2e-1 on a
    ResNet-18; the small residual net of ``tests/test_batchnorm.py``: 6e-3 after one
    minibatch of 4 micro-batches).

  Use it where normalising per micro-batch is acceptable (micro-batches large enough for
  their statistics to be those of the population) and only the eval-mode statistics must
  not be skewed by ``chunks`` commits per minibatch; use :class:`GhostBatchNorm` where the
  pipeline must train exactly what one device would.

Running statistics. Over the ``chunks`` forwards of a minibatch both modules accumulate, per
channel, the element count ``c``, the mean and the centred sum of squares
``M2 = sum (x - mean)^2`` (micro-batches are merged with Chan et al.'s pairwise formula,
which is the sum / sum-of-squares accumulation written in a numerically stable form), and
after the last one commit, once::

    num_batches_tracked += 1
    f = momentum                      (or 1 / num_batches_tracked if momentum is None)
    running_mean = (1 - f) * running_mean + f * mean
    running_var  = (1 - f) * running_var  + f * M2 / (c - 1)     (unbiased, all rows)

which is what :class:`torch.nn.BatchNorm2d` does after one forward of all those rows.

Which forwards form a minibatch. The module counts training-mode forwards: forwards
``1..chunks`` are one minibatch, ``chunks+1..2*chunks`` the next, and so on. This relies on
an ordering that every schedule of :mod:`pipeline_rt.schedule` has: a stage forwards the
units ``(j, 0), (j, 1), ..., (j, chunks-1)`` of minibatch ``j`` in that order, and no
forward of minibatch ``j+1`` comes before the last forward of ``j`` at the same stage
(backwards and ``STEP`` actions may come in between; they do not touch the statistics).
``chunks=None`` (the default) follows the pipeline: :class:`~pipeline_rt.Pipeline` sets it
to its own ``chunks`` (:func:`bind_chunks`; outside a pipeline it acts as 1); an explicit
``chunks`` is checked against the pipeline's instead. A forward recomputed for its backward
(``Pipeline(recompute=...)``, or ``torch.utils.checkpoint`` inside the stage:
:func:`pipeline_rt.recompute.is_recomputing`) is not counted again. A training-mode forward
outside the pipeline counts too; call :func:`load_pending_stats` ``(module, {})`` to drop a
partial minibatch (e.g. after a run aborted in the middle of one). In eval mode both are a
plain batch norm using the running statistics.

The partial accumulation is not in ``state_dict`` (whose keys stay those of
:class:`torch.nn.BatchNorm2d`, so checkpoints load into either); :func:`pending_stats` and
:func:`load_pending_stats` save and restore it, for a checkpoint taken in the middle of a
minibatch.
"""
from __future__ import annotations

from typing import Any, Dict, Iterable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .recompute import is_recomputing

__all__ = ["DeferredBatchNorm", "GhostBatchNorm", "Pending", "convert_deferred_batch_norm", "bind_chunks",
           "pending_stats", "load_pending_stats"]

_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


class Pending(NamedTuple):
    """The statistics of a minibatch's forwards so far (per channel)."""

    forwards: int   # micro-batches accumulated
    elements: int   # elements per channel accumulated (rows times spatial size)
    mean: Tensor    # their mean
    m2: Tensor      # their centred sum of squares, sum (x - mean)^2


def _positive(name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


class DeferredBatchNorm(_BatchNorm):
    """Batch norm for a stage whose minibatch arrives as ``chunks`` micro-batches.

    Training mode: normalises each micro-batch with its own statistics (as a batch norm on
    that micro-batch alone) and commits the running statistics once every ``chunks``
    forwards, equal to a batch norm's single update on all the rows those forwards received
    (see the module docstring for what this does and does not make equal to single-device
    training). Eval mode: a plain batch norm with the running statistics. Accepts any input
    of shape ``(N, C, *)``.

    Args:
        num_features: ``C``.
        eps, momentum, affine: as :class:`torch.nn.BatchNorm2d` (``momentum=None``: a
            cumulative average, ``f = 1 / num_batches_tracked``).
        chunks: micro-batches per minibatch; ``None``: the pipeline's (set by
            :class:`~pipeline_rt.Pipeline`, 1 outside one).
    """

    batch_dependent = False  # handled: see pipeline_rt.guards.batch_dependent
    running_mean: Tensor  # always tracked (track_running_stats=True)
    running_var: Tensor
    num_batches_tracked: Tensor

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, *, chunks: Optional[int] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        if chunks is not None:
            _positive(f"{type(self).__name__}: chunks", chunks)
        #: whether :func:`bind_chunks` sets :attr:`chunks` (it was not given)
        self.follows = chunks is None
        self.chunks = chunks or 1
        self.pending: Optional[Pending] = None

    def extra_repr(self) -> str:
        follows = " (follows the pipeline)" if self.follows else ""
        return f"{super().extra_repr()}, chunks={self.chunks}{follows}"

    def _check_input_dim(self, input: Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects an input of shape (N, C, *), got {input.dim()}D")

    def forward(self, input: Tensor) -> Tensor:
        self._check_input_dim(input)
        if not self.training:
            return super().forward(input)
        out = self._normalise(input)
        if not is_recomputing():  # a recomputed forward was counted when it first ran
            with torch.no_grad():
                self._accumulate(input.detach())
        return out

    def _normalise(self, input: Tensor) -> Tensor:
        """Training mode: batch statistics of this micro-batch only (no running statistics)."""
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

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

    @classmethod
    def convert(cls, module: nn.Module, *, chunks: Optional[int] = None, **options: Any) -> nn.Module:
        """Replace every :class:`~torch.nn.BatchNorm1d`/``2d``/``3d`` in ``module`` (itself
        included) that tracks running statistics by a ``cls`` (this class, or
        :class:`GhostBatchNorm` with ``group_rows=`` among ``options``) with the same
        ``num_features``, ``eps``, ``momentum``, ``affine``, training flag, and the very same
        parameter and buffer tensors (an optimizer already built over the old parameters keeps
        updating them). Batch norms with ``track_running_stats=False`` have nothing to defer
        and are left as they are (:func:`pipeline_rt.guards.check_batch_dependent` still
        reports them). Children are replaced in place; use the returned module (a new one when
        ``module`` itself is a batch norm). ``chunks``: as the constructor's (``None``: the
        pipeline's)."""
        if isinstance(module, _CONVERTIBLE) and module.track_running_stats:
            mean, var, tracked = module.running_mean, module.running_var, module.num_batches_tracked
            assert mean is not None and var is not None and tracked is not None  # track_running_stats
            new = cls(module.num_features, eps=module.eps, momentum=module.momentum, affine=module.affine,
                      chunks=chunks, device=mean.device, dtype=mean.dtype, **options)
            if module.affine:
                new.weight, new.bias = module.weight, module.bias
            new.running_mean, new.running_var, new.num_batches_tracked = mean, var, tracked
            new.train(module.training)
            return new
        for name, child in list(module.named_children()):
            new_child = cls.convert(child, chunks=chunks, **options)
            if new_child is not child:
                setattr(module, name, new_child)
        return module


class GhostBatchNorm(DeferredBatchNorm):
    """Batch norm over fixed groups of ``group_rows`` consecutive rows (ghost batches), exact
    under micro-batches; running statistics of the whole minibatch, as
    :class:`DeferredBatchNorm`'s.

    Training mode: rows ``g * group_rows .. (g + 1) * group_rows - 1`` of the input are
    normalised with their own per-channel mean and (biased) variance over those rows (and the
    spatial positions ``*``), then the affine weight and bias are applied::

        y[i, c] = (x[i, c] - mean_g[c]) / sqrt(var_g[c] + eps) * weight[c] + bias[c],  i in group g

    so a micro-batch made of whole groups is normalised exactly as inside the whole
    minibatch: a pipeline with any ``chunks`` computes what one forward of the minibatch
    computes. An input whose rows are not a multiple of ``group_rows`` is refused
    (``ValueError``): its normalisation would depend on how the minibatch was cut. Running
    statistics (eval mode): those of a plain batch norm on all the rows of the minibatch
    (mean and unbiased variance), committed once per ``chunks`` training forwards. For 1d, 2d
    and 3d inputs alike (``(N, C)``, ``(N, C, L)``, ``(N, C, H, W)``, ``(N, C, D, H, W)``).

    Args:
        num_features: ``C``.
        group_rows: rows per ghost batch; every micro-batch's rows must be a multiple of it
            (for a minibatch of ``n`` rows split into ``chunks``: ``n / chunks``).
        eps, momentum, affine, chunks: as :class:`DeferredBatchNorm`.

    :meth:`convert` turns a model's batch norms into ghost batch norms:
    ``GhostBatchNorm.convert(model, group_rows=8)``.
    """

    def __init__(self, num_features: int, group_rows: int, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 affine: bool = True, *, chunks: Optional[int] = None, device: Optional[torch.device] = None,
                 dtype: Optional[torch.dtype] = None) -> None:
        super().__init__(num_features, eps, momentum, affine, chunks=chunks, device=device, dtype=dtype)
        _positive("GhostBatchNorm: group_rows", group_rows)
        self.group_rows = group_rows

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, group_rows={self.group_rows}"

    def _normalise(self, input: Tensor) -> Tensor:
        n, c = input.shape[:2]
        g = self.group_rows
        if n % g:
            raise ValueError(
                f"GhostBatchNorm: an input of {n} rows is not a multiple of group_rows={g}.\n"
                f"  Its normalisation would depend on how the minibatch was cut.\n"
                f"  Fix: micro-batches of a multiple of {g} rows (minibatch rows / chunks), "
                f"or another group_rows.")
        k, rest = n // g, input.shape[2:]
        # (rows, C, *) -> (g, k * C, *): group j's channel c becomes channel j * C + c of one
        # batch norm over g rows (its batch statistics only: F.batch_norm's fused kernel)
        xt = input.reshape(k, g, c, *rest).transpose(0, 1).reshape(g, k * c, *rest)
        weight = None if self.weight is None else self.weight.repeat(k)
        bias = None if self.bias is None else self.bias.repeat(k)
        out = F.batch_norm(xt, None, None, weight, bias, True, 0.0, self.eps)
        return out.reshape(g, k, c, *rest).transpose(0, 1).reshape(input.shape)


def convert_deferred_batch_norm(module: nn.Module, chunks: Optional[int] = None) -> nn.Module:
    """:meth:`DeferredBatchNorm.convert`: every tracking ``BatchNorm1d/2d/3d`` of ``module``
    becomes a :class:`DeferredBatchNorm` sharing its parameters and buffers."""
    return DeferredBatchNorm.convert(module, chunks=chunks)


def bind_chunks(modules: Iterable[Optional[nn.Module]], chunks: int) -> None:
    """Give every :class:`DeferredBatchNorm` (so every :class:`GhostBatchNorm`) in
    ``modules`` that follows the pipeline (built with ``chunks=None``) the pipeline's
    ``chunks``, dropping a partial minibatch if the number changes. :class:`~pipeline_rt.Pipeline`
    calls it at construction; ``None`` entries (other ranks' stages) are skipped."""
    for module in modules:
        for m in ([] if module is None else module.modules()):
            if isinstance(m, DeferredBatchNorm) and m.follows and m.chunks != chunks:
                m.chunks, m.pending = chunks, None


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
