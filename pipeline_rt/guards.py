"""Checks that turn silent wrong results into errors naming the problem, the place and the fix.

Pure functions for :class:`pipeline_rt.Pipeline` to call at construction and while
splitting minibatches (docs/batch_dependent.rst):

* :func:`batch_dependent` / :func:`check_batch_dependent`: modules whose training-mode
  forward depends on other rows of the batch, which micro-batches would change;
* :func:`declared_reduction` / :func:`loss_reduction` / :func:`micro_batch_weight`: how a
  micro-batch's loss is weighted;
* :func:`check_device`: a stage placed on a device this machine does not have;
* :func:`as_message`: what may pass between stages;
* :func:`error_text`: the layout of their messages (problem, where, fixes; short lines).
"""
from __future__ import annotations

import functools
import inspect
import textwrap
from typing import Any, Callable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .batchnorm import DeferredBatchNorm
from .methods import METHODS

__all__ = ["batch_dependent", "check_batch_dependent", "BatchDependentError", "loss_reduction",
           "declared_reduction", "micro_batch_weight", "check_device", "as_message", "error_text"]

REDUCTIONS = ("mean", "sum")
#: the longest line :func:`error_text` writes (a longer word, e.g. a path, stays whole)
WIDTH = 100
_EXACT_WITH_ONE_CHUNK = ("sync", "1f1b-flush")
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def error_text(problem: str, where: Sequence[str] = (), fixes: Sequence[str] = (), see: Optional[str] = None) -> str:
    """An error message in short lines, grouped: the problem (wrapped at :data:`WIDTH`
    columns), then ``Where:`` one line per place, ``Fix:`` or ``Fixes (any one):``
    numbered, and ``See <see>.``; empty groups are left out."""
    def wrap(text: str, first: str, rest: str) -> List[str]:
        return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest,
                             break_long_words=False, break_on_hyphens=False)
    lines = wrap(problem, "", "")
    if where:
        lines.append("Where:")
        for w in where:
            lines += wrap(w, "  - ", "    ")
    if fixes:
        lines.append("Fix:" if len(fixes) == 1 else "Fixes (any one):")
        for i, f in enumerate(fixes, 1):
            lines += wrap(f, "  - " if len(fixes) == 1 else f"  {i}. ", "     ")
    if see:
        lines.append(f"See {see}.")
    return "\n".join(lines)


class BatchDependentError(ValueError):
    """A pipeline refused by :func:`check_batch_dependent`; ``problem``, ``where`` and
    ``fixes`` are the parts of the message (:func:`error_text`), for a front end (the
    ``pipeoptim compare`` command line) that offers its own fixes."""

    def __init__(self, problem: str, where: Sequence[str], fixes: Sequence[str], see: Optional[str] = None) -> None:
        super().__init__(error_text(problem, where, fixes, see))
        self.problem, self.where, self.fixes, self.see = problem, list(where), list(fixes), see


def _is_batch_dependent(m: nn.Module) -> bool:
    mark = getattr(m, "batch_dependent", None)
    if isinstance(mark, bool):
        return mark
    if isinstance(m, _BatchNorm):  # BatchNorm1d/2d/3d, their Lazy forms, SyncBatchNorm
        return True
    return isinstance(m, _InstanceNorm) and m.track_running_stats


def batch_dependent(module: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The submodules of ``module`` (itself included, path ``""``) whose training-mode
    forward depends on other rows of the batch, as ``(path, module)`` in
    :meth:`~torch.nn.Module.named_modules` order.

    * The batch-norm family (``BatchNorm1d/2d/3d``, ``LazyBatchNorm*``, ``SyncBatchNorm``):
      normalises over the batch and updates its running statistics once per forward.
    * ``InstanceNorm*`` with ``track_running_stats=True``: its normalisation is per row, but
      its running statistics are updated once per forward (``chunks`` times per minibatch,
      each from a micro-batch), so its eval-mode output would differ. With the default
      ``track_running_stats=False`` it is per row entirely and not reported.
    * ``GroupNorm``, ``LayerNorm``, ``RMSNorm`` and other per-row layers: not reported.
    * :class:`~pipeline_rt.batchnorm.DeferredBatchNorm`: not reported (running statistics
      exact, normalisation per micro-batch by choice).
    * A module's own attribute ``batch_dependent`` (a bool) overrides all of the above for
      that module: set ``batch_dependent = True`` on (the class or an instance of) your
      own module whose forward mixes rows (a batch-wise softmax, a contrastive loss inside
      a stage, a custom normaliser), and ``batch_dependent = False`` on a module whose
      per-micro-batch behaviour you accept. The mark applies to that module only; its
      children are checked on their own.
    """
    return [(name, m) for name, m in module.named_modules() if _is_batch_dependent(m)]


def _chunks_fix(method_name: str) -> str:
    if method_name in _EXACT_WITH_ONE_CHUNK:
        return (f"pass chunks=1: method {method_name!r} then equals single-device training exactly, "
                f"but only one stage works at a time (no pipelining)")
    method = METHODS.get(method_name)
    if method is not None and method.chunks == 1:
        return f"pass chunks=1 (the default of method {method_name!r})"
    return (f"pass chunks=1 (for method {method_name!r} this makes every micro-batch its own "
            f"update, without gradient accumulation, which changes the method)")


def check_batch_dependent(modules: Sequence[Optional[nn.Module]], chunks: int, method_name: str) -> None:
    """Refuse a pipeline whose micro-batches would silently change a batch-dependent layer.

    Raises :class:`BatchDependentError` (a ``ValueError``) if ``chunks > 1`` and some stage
    holds a module reported by :func:`batch_dependent` (naming every such module, its stage
    and the fixes), or if a :class:`~pipeline_rt.batchnorm.DeferredBatchNorm` built for a
    fixed number of micro-batches (not following the pipeline's) has another number than
    ``chunks`` (it would commit its running statistics at the wrong forwards). ``None``
    entries (stages run by other processes) are skipped. With ``chunks == 1`` every
    minibatch is one forward, equal to single-device training, and only the second check
    applies.
    """
    for k, module in enumerate(modules):
        if module is None:
            continue
        for name, m in module.named_modules():
            if isinstance(m, DeferredBatchNorm) and not m.follows and m.chunks != chunks:
                raise BatchDependentError(
                    f"A {type(m).__name__} built for chunks={m.chunks} is in a pipeline whose method {method_name!r} "
                    f"splits each minibatch into {chunks} micro-batches: it would commit its running statistics "
                    f"at the wrong forwards.",
                    [f"stage {k}: {_where(name)}"],
                    [f"build or convert it with chunks=None (it then follows the pipeline's chunks), e.g. "
                     f"pipeline_rt.batchnorm.convert_deferred_batch_norm(stage)",
                     f"set m.chunks = {chunks} on it"])
    if chunks <= 1:
        return
    found = {k: batch_dependent(module) for k, module in enumerate(modules) if module is not None}
    found = {k: f for k, f in found.items() if f}
    if not found:
        return
    where = [f"stage {k} holds " + ", ".join(f"{_where(name)} ({type(m).__name__})" for name, m in f)
             for k, f in found.items()]
    fixes = []
    convertible = [k for k, f in found.items() if any(isinstance(m, _CONVERTIBLE) and m.track_running_stats
                                                      for _, m in f)]
    if convertible:
        ks = f"for k in {convertible}"
        fixes.append(f"exact, a ghost batch norm over fixed groups of R rows (each micro-batch whole groups): {ks}: "
                     f"stages[k] = pipeline_rt.batchnorm.GhostBatchNorm.convert(stages[k], group_rows=R)")
        fixes.append(f"running statistics committed once per minibatch, normalisation per micro-batch: {ks}: "
                     f"stages[k] = pipeline_rt.batchnorm.convert_deferred_batch_norm(stages[k])")
    fixes.append(_chunks_fix(method_name))
    fixes.append("accept the per-micro-batch behaviour: set `batch_dependent = False` on each such module")
    raise BatchDependentError(
        f"Batch-dependent modules in a pipeline that splits minibatches: method {method_name!r} splits each "
        f"minibatch into {chunks} micro-batches, so in training mode these modules would normalise over (or "
        f"update running statistics from) each micro-batch instead of the whole minibatch, silently differing "
        f"from single-device training.", where, fixes, "docs/batch_dependent.rst")


def _where(name: str) -> str:
    return f"module {name!r}" if name else "the stage module itself"


def loss_reduction(loss_fn: Callable[..., Tensor]) -> str:
    """How ``loss_fn`` reduces over rows: ``"mean"`` or ``"sum"``; :func:`declared_reduction`,
    with a loss whose reduction cannot be seen taken as ``"mean"`` (the pipeline instead
    probes such a loss once: :mod:`pipeline_rt.lossprobe`)."""
    return declared_reduction(loss_fn) or "mean"


def declared_reduction(loss_fn: Callable[..., Tensor]) -> Optional[str]:
    """How ``loss_fn`` says it reduces over rows: ``"mean"``, ``"sum"``, or ``None`` where it
    does not say.

    Read from, in order: an attribute ``loss_fn.reduction`` (an ``nn`` loss such as
    ``nn.CrossEntropyLoss(reduction="sum")``, or any callable carrying one); the
    ``reduction`` keyword of a :func:`functools.partial`; the default of a ``reduction``
    parameter in the function's signature (``F.cross_entropy``: ``"mean"``). A plain
    function or lambda that calls a loss with ``reduction="sum"`` inside says nothing:
    ``None``. ``"batchmean"`` (``nn.KLDivLoss``) divides by the rows and counts as
    ``"mean"``.

    ``"mean"`` means an equally weighted mean over rows: a weighted mean (class
    ``weight=``, or an ``ignore_index`` that occurs in the targets) is exact only when every
    micro-batch holds the same total weight.

    Raises ``ValueError`` for ``"none"`` (per-row losses) and unknown reductions.
    """
    red = getattr(loss_fn, "reduction", None)
    if red is None and isinstance(loss_fn, functools.partial):
        red = loss_fn.keywords.get("reduction")
        if red is None:
            return declared_reduction(loss_fn.func)
    if red is None:
        red = _signature_default(loss_fn)
    if red is None:
        return None
    if red == "batchmean":
        return "mean"
    if red == "none":
        raise ValueError(error_text(
            f"loss_fn {_name(loss_fn)} has reduction='none': it returns per-row losses, but the pipeline needs "
            f"one scalar per micro-batch.",
            fixes=["pass reduction='mean' (or 'sum')",
                   "wrap it: lambda out, y: loss_fn(out, y).mean()"]))
    if red not in REDUCTIONS:
        raise ValueError(error_text(
            f"loss_fn {_name(loss_fn)} has reduction={red!r}; the pipeline knows how to weight micro-batches "
            f"only for {REDUCTIONS} (or 'batchmean').",
            fixes=["give the loss reduction='mean' or 'sum'"]))
    return red


def _signature_default(fn: Callable[..., Any]) -> Optional[str]:
    try:
        param = inspect.signature(fn).parameters.get("reduction")
    except (TypeError, ValueError):  # builtins without a signature
        return None
    if param is None or not isinstance(param.default, str):
        return None
    return param.default


def _name(fn: Any) -> str:
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def micro_batch_weight(reduction: str, rows: int, total: int) -> float:
    """The factor on a micro-batch's loss so that the micro-batches' weighted sum is the
    whole minibatch's loss (and its gradient that loss's gradient).

    ``"mean"``: ``rows / total`` (``sum_m (n_m/n) * mean_m = mean over all n rows``);
    ``"sum"``: ``1.0`` (``sum_m sum_m' = sum over all rows``; the reported minibatch loss
    is then the sum over its rows, as single-device training with the same loss reports).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"micro_batch_weight: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not 0 <= rows <= total or total <= 0:
        raise ValueError(f"micro_batch_weight: need 0 <= rows <= total and total > 0, got rows={rows}, total={total}")
    return rows / total if reduction == "mean" else 1.0


def check_device(device: Union[torch.device, str, int], stage: int) -> None:
    """Raise ``ValueError`` naming the stage and the device if this machine does not have
    ``device`` (CUDA unavailable or its index >= ``torch.cuda.device_count()``; MPS
    unavailable; likewise for other accelerator back ends torch exposes as
    ``torch.<type>`` with ``is_available``/``device_count``). CPU and device types torch
    has no availability query for (``meta``) pass."""
    device = torch.device(device)
    if device.type == "cpu":
        return
    if device.type == "mps":
        available, count = torch.backends.mps.is_available(), 1
    else:
        backend = getattr(torch, device.type, None)
        if backend is None or not hasattr(backend, "is_available"):
            return
        available = backend.is_available()
        count = backend.device_count() if available and hasattr(backend, "device_count") else 0
    kind = device.type.upper()
    if not available:
        build = {"cuda": "install a CUDA build of torch", "mps": "run on Apple silicon with an MPS build of torch"
                 }.get(device.type, f"install a torch build with {kind} support")
        query = f"torch.{'backends.mps' if device.type == 'mps' else device.type}.is_available()"
        raise ValueError(error_text(f"stage {stage} is placed on {device} but this machine has no {kind} device "
                                    f"({query} is False).", fixes=["use devices=['cpu', ...]", build]))
    if device.index is not None and device.index >= count:
        raise ValueError(error_text(
            f"stage {stage} is placed on {device} but this machine has {count} {kind} device(s) "
            f"(torch.{device.type}.device_count() is {count}, indices 0..{count - 1}).",
            fixes=["use a smaller index (stages may share a device)"]))


def as_message(x: Any, where: str) -> Tuple[Optional[Tensor], ...]:
    """What passes between stages, as a tuple: a Tensor ``t`` gives ``(t,)``; a tuple or
    list whose entries are Tensors or ``None`` (at least one Tensor) gives the tuple of
    its entries, ``None`` entries kept in place (``return h, None`` reaches the next stage
    as ``(h, None)``).

    Raises ``TypeError`` naming ``where`` (``"stage 1's output"``, ``"minibatch 3's
    input"``) for anything else: a dict, nested lists or tuples, a Python number, a string,
    an empty or all-``None`` tuple.
    """
    allowed = "a Tensor, or a tuple/list of Tensors (None entries pass through unchanged)"
    if isinstance(x, Tensor):
        return (x,)
    if not isinstance(x, (tuple, list)):
        raise TypeError(error_text(f"{where} must be {allowed}; got {_describe(x)}."))
    for i, e in enumerate(x):
        if e is not None and not isinstance(e, Tensor):
            raise TypeError(error_text(f"{where} must be {allowed}; got a {type(x).__name__} whose entry {i} is "
                                       f"{_describe(e)}.", fixes=["nest no containers: flatten them into one tuple"]))
    if not any(isinstance(e, Tensor) for e in x):
        raise TypeError(error_text(f"{where} must be {allowed} with at least one Tensor; got {_describe(x)}."))
    return tuple(x)


def _describe(x: Any) -> str:
    if isinstance(x, dict):
        return f"a dict with keys {list(x)[:5]} (pass its values as a tuple in a fixed order)"
    if isinstance(x, (tuple, list)):
        return f"a {type(x).__name__} of length {len(x)}" if x else f"an empty {type(x).__name__}"
    if isinstance(x, (bool, int, float, complex)):
        return f"a Python {type(x).__name__} ({x!r}; return it as a tensor)"
    if isinstance(x, str):
        return f"a str ({x[:20]!r})"
    return f"a {type(x).__module__}.{type(x).__qualname__}"
