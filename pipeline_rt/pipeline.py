"""`Pipeline`: the user-facing runtime (DESIGN.md §5).

.. code-block:: python

    pipe = Pipeline(split_by_balance(model, [2, 3]), ["cuda:0", "cuda:1"],
                    lambda ps: torch.optim.AdamW(ps, lr=1e-3), nn.functional.cross_entropy,
                    method="pipeoptim")
    losses = pipe.train(batches)       # one float per minibatch

Each minibatch ``(input, target)`` is split along dim 0 into ``chunks`` micro-batches of
sizes differing by at most one; micro-batch ``m`` of ``n_m`` rows out of ``n`` contributes
``(n_m / n) * loss_fn(out_m, target_m)``, so with a mean-reduced loss the minibatch loss and
its gradient are those of the whole minibatch, and ``sync``/``1f1b-flush`` reproduce
single-device training.

Every :meth:`Pipeline.train` call runs the method's full schedule over its batches and
drains (all updates applied before it returns); the prediction distances restart with it.

Errors. Shapes that do not chain fail at the first micro-batch's forward, before any
update (:class:`~pipeline_rt.stage.StageError` names the stage and the input shapes). An
exception in a stage propagates from :meth:`Pipeline.train` as is: the local executor is a
single-threaded loop with no worker to wait for, so it cannot hang; the in-flight state is
dropped (updates already applied stay) and the pipeline can train again.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lookahead_opt import PredictiveOptimizer

from . import checkpoint
from .executor import Executor, MicroBatch, Plan
from .methods import Method, get_method
from .schedule import Schedule, build
from .stage import Stage, as_tuple

__all__ = ["Pipeline", "make_executor", "split_batch"]

Device = Union[torch.device, str, int]
StageSpec = Union[nn.Module, Callable[[], nn.Module]]
BuildStage = Callable[[int], Stage]
BACKENDS = ("local", "dist")


def make_executor(backend: str, build_stage: BuildStage, devices: Sequence[torch.device],
                  timeout: Optional[float] = None) -> Tuple[Executor, List[Optional[Stage]]]:
    """The executor of ``backend`` and the stages it runs (``None`` where another process
    runs that stage).

    ``"local"`` builds every stage and runs them in this process; ``"dist"`` hands
    ``build_stage`` to :class:`pipeline_rt.dist.DistExecutor`, which builds only its
    rank's stage and exposes the list as ``.stages``.
    """
    if backend == "local":
        from .local import LocalExecutor
        stages = [build_stage(k) for k in range(len(devices))]
        return LocalExecutor(stages, devices), list(stages)
    if backend == "dist":
        try:
            from .dist import DistExecutor
        except ImportError as e:
            raise RuntimeError(f"backend='dist' needs pipeline_rt.dist.DistExecutor, which failed to import: {e}") from e
        ex = DistExecutor(build_stage, devices, timeout=timeout)
        return ex, list(ex.stages)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


def _rows(x: Any) -> int:
    """Dim-0 size of a tensor or of the first of a tuple of tensors (0 for a scalar)."""
    t = as_tuple(x)[0]
    return t.shape[0] if t.dim() else 0


def split_batch(x: Any, chunks: int) -> List[Any]:
    """Split a tensor, or a tuple/list of tensors, into ``chunks`` pieces along dim 0."""
    if isinstance(x, Tensor):
        return list(torch.tensor_split(x, chunks))
    parts = [torch.tensor_split(t, chunks) for t in as_tuple(x)]
    return [tuple(p[i] for p in parts) for i in range(chunks)]


class Pipeline:
    """Trains ``stages`` as a pipeline with one of the methods of DESIGN.md §3.

    Args:
        stages: the stage modules, in order (or zero-argument factories; with
            ``backend="dist"`` only the rank's own stage is built). Stage ``k``'s output
            (a tensor or a tuple of tensors) is stage ``k+1``'s input; the last stage's
            output and the target go to ``loss_fn``. Modules are moved to their device.
        devices: one device per stage; stages may share a device.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once per stage
            that has parameters;
            each is wrapped in :class:`~lookahead_opt.PredictiveOptimizer` with the
            method's prediction rule.
        loss_fn: ``loss_fn(output, target) -> scalar tensor`` (mean-reduced for
            ``sync``/``1f1b-flush`` to equal single-device training).
        method: one of :data:`pipeline_rt.methods.METHODS`.
        chunks: micro-batches per minibatch (default: the method's, see :class:`Method`).
        backward: ``"predicted"`` with ``pipeoptim``: the backward reuses the forward's
            predicted weights (kept per micro-batch).
        backend: ``"local"`` (this process; CUDA streams) or ``"dist"`` (one stage per rank).
        check_finite: raise ``FloatingPointError`` on a non-finite loss or gradient and
            check predicted weights (one host sync per check).
        track_error: record the prediction error at every backward with ``s > 0``
            (see :attr:`prediction_errors`); no host sync until it is read.
        strict: refuse optimizers without a closed-form prediction rule.
        timeout: ``backend="dist"``: seconds a rank waits for a peer before it fails with
            the schedule table (default ``$PIPELINE_RT_TIMEOUT`` or 300).
    """

    def __init__(self, stages: Sequence[StageSpec], devices: Sequence[Device],
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 loss_fn: Callable[[Any, Any], Tensor], method: Union[str, Method] = "pipeoptim", *,
                 chunks: Optional[int] = None, backward: Optional[str] = None, backend: str = "local",
                 check_finite: bool = False, track_error: bool = False, strict: bool = False,
                 timeout: Optional[float] = None) -> None:
        stages, devices = list(stages), [torch.device(d) for d in devices]
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        if len(devices) != len(stages):
            raise ValueError(f"{len(stages)} stages but {len(devices)} devices; give one device per stage")
        if not callable(optimizer):
            raise TypeError("optimizer must be a callable params -> torch optimizer, "
                            "e.g. lambda ps: torch.optim.SGD(ps, lr=0.1)")
        self.method = get_method(method, backward=backward, chunks=chunks)
        self.num_stages = len(stages)
        self.chunks = self.method.num_chunks(self.num_stages)
        self.devices = devices

        def build_stage(k: int) -> Stage:
            spec = stages[k]
            module = spec if isinstance(spec, nn.Module) else spec()
            if not isinstance(module, nn.Module):
                raise TypeError(f"stage {k} must be an nn.Module or a factory of one, got {type(module).__name__}")
            module.to(devices[k])
            params = list(module.parameters())
            opt = PredictiveOptimizer(optimizer(params), rule=self.method.rule, strict=strict,
                                      check_finite=check_finite) if params else None
            return Stage(k, self.num_stages, module, opt, self.method, loss_fn,
                         check_finite=check_finite, track_error=track_error)

        self.executor, self._stages = make_executor(backend, build_stage, devices, timeout)
        self._schedules: Dict[int, Schedule] = {}
        self._last: Optional[Schedule] = None

    # ------------------------------------------------------------------ training

    def train(self, batches: Iterable[Tuple[Any, Any]], *, checkpoint_every: Optional[int] = None,
              checkpoint_dir: Optional[checkpoint.PathLike] = None,
              resume_from: Optional[checkpoint.PathLike] = None) -> List[float]:
        """Run the method's schedule over ``batches`` (``(input, target)`` pairs), drain,
        and return the per-minibatch losses as floats (one host sync, at the end).

        Checkpoints (see :mod:`pipeline_rt.checkpoint`): with ``checkpoint_every=K`` and
        ``checkpoint_dir``, the run is saved after minibatches ``K, 2K, ...`` (folders
        ``mb00000K``). ``resume_from`` (a checkpoint folder, or a ``checkpoint_dir``: its
        latest complete checkpoint) continues that run; give the same ``batches``. The
        losses returned (all of them) and the final weights are identical to an
        uninterrupted run's.
        """
        plan = self.plan(batches)
        try:
            if checkpoint_every is None and checkpoint_dir is None and resume_from is None:
                losses = self.executor.run(plan)
            else:
                losses = checkpoint.train(self.executor, plan, self._stages, checkpoint_every=checkpoint_every,
                                          checkpoint_dir=checkpoint_dir, resume_from=resume_from)
        except BaseException:
            for s in self._stages:
                if s is not None:
                    s.clear()
            raise
        return [float(x) for x in losses.tolist()]

    def plan(self, batches: Iterable[Tuple[Any, Any]]) -> Plan:
        """The :class:`Plan` :meth:`train` runs: the schedule and the split micro-batches."""
        batches = list(batches)
        if not batches:
            raise ValueError("train() needs at least one (input, target) minibatch; got an empty batch list")
        micro: Dict[Tuple[int, int], MicroBatch] = {}
        for j, pair in enumerate(batches):
            if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
                raise TypeError(f"minibatch {j} must be an (input, target) pair, got {type(pair).__name__}")
            x, y = pair
            n = _rows(x)
            for name, v in (("input", x), ("target", y)):
                sizes = {_rows(t) for t in as_tuple(v)}
                if sizes != {n}:
                    raise ValueError(f"minibatch {j}: every {name} tensor must have {n} rows (dim 0), got {sorted(sizes)}")
            if n < self.chunks:
                raise ValueError(f"minibatch {j} has {n} rows, fewer than the {self.chunks} micro-batches "
                                 f"method {self.method.name!r} splits it into; pass chunks= or larger batches")
            xs, ys = split_batch(x, self.chunks), split_batch(y, self.chunks)
            for m, (xm, ym) in enumerate(zip(xs, ys)):
                micro[(j, m)] = MicroBatch(as_tuple(xm), ym, _rows(xm) / n)
        self._last = self._schedule(len(batches))
        return Plan(self._last, micro)

    def _schedule(self, num_minibatches: int) -> Schedule:
        if num_minibatches not in self._schedules:
            self._schedules[num_minibatches] = build(self.method.shape, self.num_stages, num_minibatches, self.chunks)
        return self._schedules[num_minibatches]

    # ------------------------------------------------------------------ inspection

    @property
    def stages(self) -> List[Optional[nn.Module]]:
        """The stage modules, weights as trained (``None`` for stages of other ranks)."""
        return [None if s is None else s.module for s in self._stages]

    @property
    def stage_runtimes(self) -> List[Optional[Stage]]:
        """The :class:`Stage` objects (module, predictive optimizer, counters)."""
        return list(self._stages)

    @property
    def schedule(self) -> Schedule:
        """The schedule of the last :meth:`train` (before any, one over ``N + 1`` minibatches);
        ``print(pipe.schedule)`` shows the stage x time table."""
        return self._last if self._last is not None else self._schedule(self.num_stages + 1)

    @property
    def peak_versions(self) -> List[Optional[int]]:
        """Per stage, the most weight versions held at once (live + stashed + predicted buffers)."""
        return [None if s is None else s.peak_versions for s in self._stages]

    @property
    def peak_in_flight(self) -> List[Optional[int]]:
        """Per stage, the most micro-batches forwarded and not yet backwarded (activations held)."""
        return [None if s is None else s.peak_in_flight for s in self._stages]

    @property
    def prediction_errors(self) -> List[Optional[List[float]]]:
        """Per stage, ``||W_hat - W_B|| / ||W_B - W_F||`` at every backward with ``s > 0``, in
        order (``track_error=True``). The forward's weights ``W_hat`` (the prediction, or the
        live ``W_F`` for non-predicting methods, where the error is 1) against the weights
        ``W_B`` current at the backward. Read from the device here, once."""
        out: List[Optional[List[float]]] = []
        for s in self._stages:
            if s is None:
                out.append(None)
            else:
                out.append(torch.stack(s.errors).tolist() if s.errors else [])
        return out
