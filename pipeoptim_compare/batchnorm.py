"""What ``pipeoptim compare`` does with a task's batch norms (``--batch-norm``).

Some methods split every minibatch into micro-batches (``sync`` and ``2bw`` at depth ``N``
into ``N``), which a plain batch norm would silently change (:mod:`pipeline_rt.guards`). The
command line cannot take the library's Python fixes, so it offers them as modes:

* ``refuse`` (default): a method that splits minibatches and a model with batch norms stop
  the command before any training, with the pipeline's message and these modes as fixes.
* ``ghost``: every ``BatchNorm1d/2d/3d`` becomes a :class:`~pipeline_rt.batchnorm.GhostBatchNorm`
  (:meth:`~pipeline_rt.batchnorm.DeferredBatchNorm.convert`) normalising fixed groups of
  ``R`` rows, with ``R`` the largest number of rows that divides every micro-batch of every
  method run (:func:`ghost_rows`): every method trains the same function, exactly.
* ``deferred``: every ``BatchNorm1d/2d/3d`` becomes a
  :class:`~pipeline_rt.batchnorm.DeferredBatchNorm`: running statistics committed once per
  minibatch, normalisation per micro-batch (methods that split minibatches train a
  different function from those that do not).
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Type, cast

from torch import nn

from pipeline_rt.batchnorm import DeferredBatchNorm, GhostBatchNorm
from pipeline_rt.guards import BatchDependentError, check_batch_dependent, error_text
from pipeline_rt.methods import get_method

from .tasks import Task, set_bn_chunks

__all__ = ["MODES", "BatchNormError", "ghost_rows", "prepare_batch_norm"]

#: the values of ``--batch-norm``
MODES = ("refuse", "deferred", "ghost")
_CONVERTIBLE = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

_CONVERT_FIXES = ["--batch-norm ghost: exact, every method trains the same model: ghost batch norm over fixed "
                  "groups of rows that divide every micro-batch",
                  "--batch-norm deferred: running statistics once per minibatch, normalisation per micro-batch "
                  "(methods that split minibatches then train another function)"]
_OTHER_FIXES = ["--methods without the methods that split minibatches (sync, 1f1b-flush, 2bw, 2bw-dm at depth > 1)",
                "in your entry point, set `batch_dependent = False` on each such module to accept its "
                "per-micro-batch behaviour"]


class BatchNormError(ValueError):
    """``--batch-norm`` cannot do what was asked; the message names the fix."""


def _chunks(methods: Sequence[str], depth: int) -> List[int]:
    return [get_method(m).num_chunks(depth) for m in methods]


def ghost_rows(task: Task, depth: int, methods: Sequence[str]) -> int:
    """The largest number of rows dividing every micro-batch of every minibatch of ``task``
    under each of ``methods`` at ``depth`` (a minibatch of ``n`` rows in ``c`` micro-batches:
    sizes ``n // c`` and, where ``c`` does not divide ``n``, ``n // c + 1``)."""
    rows = 0
    for x, _ in task.batches:
        n = int((x if hasattr(x, "shape") else x[0]).shape[0])
        for c in _chunks(methods, depth):
            rows = math.gcd(rows, n // c, n // c + (n % c > 0))
    return rows


def _convert(task: Task, convert: Type[DeferredBatchNorm], **options: int) -> int:
    """Convert the task's batch norms in place; how many there were."""
    if task.stages is not None:
        task.stages = [convert.convert(s, **options) for s in task.stages]
        task.model = nn.Sequential(*task.stages)
    else:
        task.model = cast(nn.Sequential, convert.convert(task.model, **options))  # a Sequential stays one
    return sum(type(m) is convert for m in task.model.modules())


def prepare_batch_norm(task: Task, depth: int, methods: Sequence[str], mode: str) -> Optional[str]:
    """Apply ``mode`` (:data:`MODES`) to ``task``'s model, in place, before any run: return a
    line saying what was converted (``None`` if nothing), or raise :class:`BatchNormError`
    where a method would split minibatches over batch-dependent modules that are left (every
    one under ``refuse``; those the conversion does not handle otherwise, e.g. a tracking
    ``InstanceNorm``), or where ``ghost`` finds no common group of at least 2 rows."""
    if mode not in MODES:
        raise BatchNormError(f"--batch-norm must be one of {', '.join(MODES)}, got {mode!r}")
    note = None
    if mode == "deferred":
        count = _convert(task, DeferredBatchNorm)
        note = f"--batch-norm deferred: {count} batch norm(s) -> DeferredBatchNorm" if count else None
    elif mode == "ghost" and any(isinstance(m, _CONVERTIBLE) for m in task.model.modules()):
        rows = ghost_rows(task, depth, methods)
        if rows < 2:
            raise BatchNormError(error_text(
                f"--batch-norm ghost needs groups of at least 2 rows dividing every micro-batch, but the "
                f"micro-batches of methods {', '.join(methods)} at depth {depth} have no common divisor above "
                f"{rows}.",
                fixes=["use minibatches whose rows are a multiple of every method's number of micro-batches",
                       "--batch-norm deferred"]))
        count = _convert(task, GhostBatchNorm, group_rows=rows)
        note = f"--batch-norm ghost: {count} batch norm(s) -> GhostBatchNorm(group_rows={rows})"
    stages = task.split(depth)  # what the conversion left (or, refusing, everything) is checked now
    for method, chunks in zip(methods, _chunks(methods, depth)):
        set_bn_chunks(stages, chunks)  # as run_one does for each run
        try:
            check_batch_dependent(stages, chunks, method)
        except BatchDependentError as e:
            fixes = _CONVERT_FIXES + _OTHER_FIXES if mode == "refuse" else _OTHER_FIXES
            raise BatchNormError(error_text(e.problem, e.where, fixes, e.see)) from None
    return note
