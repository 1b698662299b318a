"""One pipeline stage: its module, its predictive optimizer and its method's weight policy.

The executors (local and distributed) only move tensors and call :meth:`Stage.forward`,
:meth:`Stage.backward` and :meth:`Stage.step` in schedule order; every weight-version
decision of every method is made here, from the :class:`~pipeline_rt.methods.Method`
data, with no method-specific branches.

Weight versions. The forward of micro-batch ``u`` runs on the live weights or on
``predict(extra(k) + s)`` (the parameters' ``.data`` pointed at the predicted buffer).
Autograd's saved weights are redirected (:class:`lookahead_opt.redirect`) to the version
the backward must use:

* ``live``: the weights current when the backward runs;
* ``forward``: the forward's own weights. For a live forward they are stashed lazily:
  only when a ``STEP`` is about to overwrite a version that an in-flight micro-batch still
  needs is a copy made (PipeDream's ``w_k + 1`` versions, 2BW's two). For a predicted
  forward the prediction is copied at the forward.
* ``predict``: ``predict(extra(k))`` computed from the live weights at backward time.

Gradients reach the parameters themselves (they are the autograd leaves whatever their
``.data`` holds), so micro-batches accumulate and ``STEP`` applies the sum.

Randomness. Each stage draws random numbers (dropout) from its own stream: the process's
RNG state when the stage first runs a forward, then carried from forward to forward (the
process's own RNG is left as it was). So the stages of one process do not depend on the
order in which the executor interleaves them, and the local executor draws exactly what
one process per stage (``backend="dist"``, every rank seeded alike) draws.

Checkpoints. An autograd graph cannot be saved, so a micro-batch in flight at a checkpoint
is re-run at resume: the forwards of the units :attr:`Stage.retain` selects (chosen from the
schedule, see :mod:`pipeline_rt.checkpoint`) keep a :class:`Replay` (inputs, a copy of the
weights they ran on, the stage's RNG state, the version, the prediction distance), and
:meth:`Stage.load_state_dict` re-runs them, so their backwards see the same graph and the
same redirected weights.

Hooks. ``clip_grad_norm`` clips the stage's gradients (total 2-norm, as
:func:`torch.nn.utils.clip_grad_norm_`) right before its STEP; ``lr_scheduler`` is stepped
right after every STEP.
"""
from __future__ import annotations

from collections import Counter
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.calibrated import CalibratedPredictor
from lookahead_opt.redirect import Swapped, redirect
from lookahead_opt.rollout import RolloutPredictor

from .batchnorm import load_pending_stats, pending_stats
from .guards import as_message
from .methods import Method

__all__ = ["Stage", "StageError", "Replay", "as_tuple", "as_leaf", "retain_none"]

_NO_CONTEXT = nullcontext()

Unit = Tuple[int, int]


class StageError(RuntimeError):
    """An error inside a stage, naming the stage, the action and the shapes involved."""


def as_tuple(x: Any, where: str = "a stage's output") -> Tuple[Optional[Tensor], ...]:
    """What passes between stages as a tuple (:func:`pipeline_rt.guards.as_message`)."""
    return as_message(x, where)


def as_leaf(t: Optional[Tensor]) -> Optional[Tensor]:
    """A stage boundary: ``t`` detached, as a leaf that collects its gradient when it is
    floating point (or complex); ``None`` stays ``None``."""
    if t is None:
        return None
    x = t.detach()
    if x.is_floating_point() or x.is_complex():
        x.requires_grad_(True)
    return x


def _shapes(ts: Sequence[Tensor]) -> str:
    return ", ".join(f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in ts)


@dataclass
class _Record:
    """What a forward leaves for its backward."""

    inputs: Tuple[Tensor, ...]
    outputs: Tuple[Tensor, ...] = ()
    loss: Optional[Tensor] = None
    version: int = 0
    predicted: bool = False  # the forward ran on predicted weights (distance > 0)
    weights: Optional[List[Tensor]] = None      # the backward's weights, when not live/stashed
    forward_weights: Optional[List[Tensor]] = None  # prediction-error tracking only
    start_weights: Optional[List[Tensor]] = None    # prediction-error tracking only
    calib: Optional[tuple] = None  # calibrated prediction: (start weights, prediction, scales) to observe


@dataclass
class Replay:
    """What it takes to re-run one forward exactly (a checkpointed in-flight micro-batch)."""

    unit: Unit
    inputs: Tuple[Tensor, ...]  # the forward's inputs (leaves; requires_grad as they were)
    weights: List[Tensor]      # a copy of the weights the forward ran on (live or predicted)
    version: int               # the STEPs done at the forward
    predicted: bool
    rng: Tuple[Tensor, Optional[Tensor]]  # the stage's CPU and (on CUDA) device RNG states at the forward
    s: int = 0                 # the forward's v_B - v_F
    target: Any = None
    weight: float = 1.0
    calib: Optional[tuple] = None  # pipeoptim-cal: (start weights, prediction, scales) for observe()


class Stage:
    """A stage of the pipeline.

    Args:
        index: k, the stage's position (0 = first).
        num_stages: N.
        module: the stage's module, already on its device.
        optimizer: the stage's :class:`~lookahead_opt.PredictiveOptimizer`; ``None`` for a
            stage without parameters (its F and B still run, its STEP does nothing).
        method: the method's policy.
        loss_fn: ``loss_fn(output, target)``; used by the last stage only.
        check_finite: check the loss and the gradients at every step (one host sync each).
        track_error: measure the prediction error at every backward (see :attr:`errors`).
        lr_scheduler: ``lr_scheduler(optimizer) -> LRScheduler``, stepped after every STEP.
        clip_grad_norm: clip the stage's gradients to this total 2-norm before every STEP.
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: Optional[PredictiveOptimizer],
                 method: Method, loss_fn: Optional[Callable[[Any, Any], Tensor]] = None, *,
                 check_finite: bool = False, track_error: bool = False,
                 lr_scheduler: Optional[Callable[[Any], Any]] = None, clip_grad_norm: Optional[float] = None) -> None:
        self.index, self.num_stages = index, num_stages
        self.module, self.optimizer, self.method, self.loss_fn = module, optimizer, method, loss_fn
        self.check_finite, self.track_error = check_finite, track_error
        self.params: List[Tensor] = [] if optimizer is None else list(optimizer.params)
        self.names: List[str] = _param_names(module, self.params)
        self.version = 0  # STEPs done
        self._records: Dict[Unit, _Record] = {}
        self._stash: Dict[int, List[Tensor]] = {}
        self._refs: Counter = Counter()
        #: per backward with s > 0: ||W_hat - W_B|| / ||W_B - W_F|| as 0-d device tensors
        self.errors: List[Tensor] = []
        self.peak_in_flight = 0
        self.peak_versions = 1
        self._buffer_used = False  # the predictor's reusable buffer exists
        #: which units' forwards keep a :class:`Replay` (in flight at a planned checkpoint)
        self.retain: Callable[[Unit], bool] = retain_none
        self.scheduler = None if lr_scheduler is None or optimizer is None else lr_scheduler(optimizer)
        self.clip_grad_norm = clip_grad_norm
        self._rng: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # the stage's own RNG stream
        self._cuda = _cuda_devices(self.params)
        self._replays: Dict[Unit, Replay] = {}
        #: what swaps predicted weights in: the optimizer, or its calibrated predictor
        self.predictor = optimizer
        if optimizer is not None and method.predictor != "rule":
            self.predictor = {"calibrated": CalibratedPredictor, "rollout": RolloutPredictor,
                              "calibrated-rollout": lambda o: CalibratedPredictor(o, displacement="rollout"),
                              }[method.predictor](optimizer)

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    # ------------------------------------------------------------------ actions

    def forward(self, unit: Unit, inputs: Tuple[Tensor, ...], s: int,
                target: Any = None, weight: float = 1.0) -> Tuple[Tensor, ...]:
        """Forward of micro-batch ``unit``; ``s`` is its ``v_B - v_F`` on the schedule.

        Returns the outputs to send on (detach them before sending), or, at the last
        stage, ``(loss * weight,)`` where ``weight`` scales the micro-batch's share.
        """
        return self._forward(unit, inputs, s, target, weight, None)

    def _forward(self, unit: Unit, inputs: Tuple[Tensor, ...], s: int, target: Any, weight: float,
                 replay: Optional[Replay]) -> Tuple[Tensor, ...]:
        m = self.method
        distance = m.extra(self.index) + s
        # predict(0) is the live weights: no prediction, no buffer
        predicted = m.forward == "predict" and distance > 0 and bool(self.params)
        if replay is not None:
            predicted = replay.predicted
        rec = _Record(inputs=inputs, version=self.version if replay is None else replay.version, predicted=predicted)
        keep = replay is None and self.retain(unit)
        # a replay has no start weights; a stage without parameters has nothing to predict
        track = self.track_error and s > 0 and replay is None and bool(self.params)
        calib = m.calibrate and predicted and replay is None
        if track or calib:
            rec.start_weights = [p.detach().clone() for p in self.params]
        if self._rng is None:
            self._rng = self.rng_state()
        rng = self._rng if keep else None
        # the backward uses the weights the forward saved unless a swap or a step comes between
        # them or its policy is a prediction: only then are the saved weights redirected
        same = replay is None and not predicted and s == 0 and m.backward != "predict"
        with self._weights_for(distance, predicted, replay), self._own_rng(replay), \
                (_NO_CONTEXT if same else redirect(self.params, self._resolver(rec))):
            try:
                out = self.module(*inputs)
                if self.is_last:
                    out = self.loss_fn(out, target) * weight
            except (RuntimeError, TypeError, ValueError) as e:
                what = "loss_fn" if self.is_last and "out" in locals() else "forward"
                raise StageError(
                    f"stage {self.index} {what} failed on micro-batch {unit} with inputs of shapes "
                    f"[{_shapes(inputs)}]: {e}. The previous stage's outputs must match this stage's "
                    f"inputs (check the split of the model).") from e
            need = keep or (predicted and (m.backward == "forward" or track or calib))
            snap = [p.detach().clone() for p in self.params] if need else []
        if predicted and m.backward == "forward":
            rec.weights = snap
        if track:
            rec.forward_weights = snap if predicted else rec.start_weights
        if calib:
            rec.calib = (rec.start_weights, snap, self.predictor.last_scales)
        if replay is not None and replay.calib is not None:
            rec.calib = replay.calib
        if keep:
            self._replays[unit] = Replay(unit, inputs, snap, rec.version, predicted, rng, s, target, weight,
                                         rec.calib)
        outs = as_tuple(out, f"stage {self.index}'s output")
        if self.is_last:
            rec.loss = outs[0]
            if self.check_finite and not bool(torch.isfinite(rec.loss).all()):
                raise FloatingPointError(f"stage {self.index}: loss of micro-batch {unit} is {rec.loss.item()}")
        else:
            rec.outputs = outs
        if m.backward == "forward" and not predicted:
            self._refs[rec.version] += 1
        self._records[unit] = rec
        self.peak_in_flight = max(self.peak_in_flight, len(self._records))
        if predicted or rec.weights is not None:  # otherwise the count of versions held is unchanged
            self._count_versions()
        return outs

    def backward(self, unit: Unit, grads: Optional[Tuple[Optional[Tensor], ...]] = None) -> Tuple[Optional[Tensor], ...]:
        """Backward of micro-batch ``unit``; returns the gradients of its inputs."""
        rec = self._records.pop(unit)
        self._replays.pop(unit, None)
        m = self.method
        if m.backward == "predict":
            extra = m.extra(self.index)
            if extra > 0 and self.params:
                rec.weights = self.optimizer.predict(extra)
                self._buffer_used = True
                self._count_versions()
            else:
                rec.weights = [p.detach() for p in self.params]
        if rec.forward_weights is not None:
            self._record_error(rec)
        if rec.calib is not None:  # the weights the prediction aimed at are the live ones now
            start, prediction, scales = rec.calib
            self.predictor.observe(start, prediction, [p.detach() for p in self.params], scales)
        if self.is_last:
            torch.autograd.backward(rec.loss)
        else:
            pairs = [(o, g) for o, g in zip(rec.outputs, grads) if o is not None and o.requires_grad and g is not None]
            if pairs:
                torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        if m.backward == "forward" and not rec.predicted:
            self._release(rec.version)
        return tuple(x.grad if x is not None and x.requires_grad else None for x in rec.inputs)

    def step(self) -> None:
        """One optimizer update: clip (``clip_grad_norm``), step, clear the gradients, step
        the learning-rate scheduler."""
        if self._refs.get(self.version):
            # an in-flight micro-batch still needs the version this step overwrites
            self._stash[self.version] = [p.detach().clone() for p in self.params]
            self._count_versions()
        if self.check_finite:
            self._check_grads()
        if self.optimizer is not None:
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        self.version += 1

    def grads(self) -> List[Tensor]:
        """The accumulated gradients of the stage's parameters (those that have one)."""
        return [p.grad for p in self.params if p.grad is not None]

    def clear(self) -> None:
        """Drop everything in flight (after an interrupted run): the micro-batches' records,
        stashed versions and accumulated gradients. Updates already applied stay."""
        self._records.clear()
        self._replays.clear()
        self._stash.clear()
        self._refs.clear()
        load_pending_stats(self.module, {})
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def outputs_of(self, unit: Unit) -> Tuple[Optional[Tensor], ...]:
        """The outputs of an in-flight micro-batch (not the last stage)."""
        return self._records[unit].outputs

    def loss_of(self, unit: Unit) -> Tensor:
        """The (weighted) loss tensor of an in-flight micro-batch at the last stage."""
        return self._records[unit].loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything of this stage between two actions: module, optimizer (with the
        predictor's state; a calibrated or roll-out predictor's own state too), STEPs done, stashed versions, accumulated gradients and a
        :class:`Replay` per micro-batch in flight (each must be in :attr:`retain`)."""
        missing = [u for u in self._records if u not in self._replays]
        if missing:
            raise RuntimeError(f"stage {self.index}: micro-batches {missing} are in flight but their forwards were "
                               f"not retained; set Stage.retain before the run (pipeline_rt.checkpoint does)")
        return {
            "module": self.module.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "version": self.version,
            "stash": self._stash,
            "grads": [p.grad for p in self.params],
            "replays": [self._replays[u] for u in self._records],
            # the calibrated scales' statistics / the roll-out's last gradients
            "predictor": None if self.predictor is self.optimizer else self.predictor.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": self._rng,
            "pending_stats": pending_stats(self.module),  # a DeferredBatchNorm's partial minibatch
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-run the in-flight forwards. Module buffers
        that the forwards update (e.g. running statistics) end as saved."""
        self.clear()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if state.get("predictor") is not None:
            self.predictor.load_state_dict(state["predictor"])
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"]
        self._stash = {v: list(ws) for v, ws in state["stash"].items()}
        for p, g in zip(self.params, state["grads"]):
            p.grad = g
        for r in state["replays"]:
            self._forward(r.unit, r.inputs, r.s, r.target, r.weight, r)
            self._replays[r.unit] = r
        self._rng = state["rng"]
        self.module.load_state_dict(state["module"])
        load_pending_stats(self.module, state["pending_stats"])  # after the replays, which counted

    # ------------------------------------------------------------------ helpers

    def rng_state(self) -> Tuple[Tensor, Optional[Tensor]]:
        """The process's CPU RNG state and, for a stage on a CUDA device, that device's."""
        cuda = self._cuda
        return torch.default_generator.get_state(), torch.cuda.get_rng_state(cuda[0]) if cuda else None

    def set_rng_state(self, state: Tuple[Tensor, Optional[Tensor]]) -> None:
        """Restore :meth:`rng_state`."""
        torch.default_generator.set_state(state[0])
        cuda = self._cuda
        if cuda and state[1] is not None:
            torch.cuda.set_rng_state(state[1], cuda[0])

    def _own_rng(self, replay: Optional[Replay]) -> "_OwnRng":
        """The stage's RNG stream is the process's inside the block (a replay's saved state
        for a replay); the process's own state is put back after."""
        return _OwnRng(self, replay)

    def _weights_for(self, distance: int, predicted: bool, replay: Optional[Replay]) -> ContextManager[None]:
        """The parameters hold the forward's weights inside the block: a replay's, a
        prediction, or the live ones."""
        return self._swapped_in(distance, replay) if predicted or replay is not None else _NO_CONTEXT

    @contextmanager
    def _swapped_in(self, distance: int, replay: Optional[Replay]) -> Iterator[None]:
        if replay is not None:
            swapped = Swapped(self.params, replay.weights)
            try:
                yield
            finally:
                swapped.undo()
        else:
            self.predictor.swap_in(distance)
            self._buffer_used = True
            try:
                yield
            finally:
                self.predictor.swap_out()

    def _resolver(self, rec: _Record) -> Callable[[int], Tensor]:
        policy, params = self.method.backward, self.params
        if policy == "live":
            return lambda i: params[i].detach()
        if policy == "forward" and not rec.predicted:
            stash, v = self._stash, rec.version
            return lambda i: stash[v][i] if v in stash else params[i].detach()
        return lambda i: rec.weights[i]

    def _release(self, version: int) -> None:
        self._refs[version] -= 1
        if self._refs[version] <= 0:
            del self._refs[version]
            self._stash.pop(version, None)

    def _count_versions(self) -> None:
        held = 1 + len(self._stash) + sum(r.weights is not None for r in self._records.values())
        if self._buffer_used:
            held += 1  # the predictor's reusable buffer
        self.peak_versions = max(self.peak_versions, held)

    def _record_error(self, rec: _Record) -> None:
        live = [p.detach() for p in self.params]
        num = _norm(torch._foreach_sub(rec.forward_weights, live))
        den = _norm(torch._foreach_sub(live, rec.start_weights))
        self.errors.append(num / den)

    def _check_grads(self) -> None:
        for name, p in zip(self.names, self.params):
            if p.grad is not None and not bool(torch.isfinite(p.grad).all()):
                raise FloatingPointError(
                    f"stage {self.index}: gradient of {name} {tuple(p.shape)} is not finite before STEP "
                    f"{self.version}; lower the learning rate or check the inputs")


class _OwnRng:
    """See :meth:`Stage._own_rng` (a plain context object: it is entered at every forward)."""

    __slots__ = ("stage", "replay", "process")

    def __init__(self, stage: Stage, replay: Optional[Replay]) -> None:
        self.stage, self.replay = stage, replay

    def __enter__(self) -> None:
        stage = self.stage
        self.process = stage.rng_state()
        stage.set_rng_state(stage._rng if self.replay is None else self.replay.rng)  # type: ignore[arg-type]

    def __exit__(self, *exc: Any) -> None:
        if self.replay is None:
            self.stage._rng = self.stage.rng_state()
        self.stage.set_rng_state(self.process)


def retain_none(unit: Unit) -> bool:
    """The default :attr:`Stage.retain`: no forward keeps a replay."""
    return False


def _cuda_devices(params: Sequence[Tensor]) -> List[torch.device]:
    """The (first) CUDA device the parameters are on (whose RNG the stage's stream includes)."""
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)[:1]


def _norm(ts: List[Tensor]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(ts)]))


def _param_names(module: nn.Module, params: List[Tensor]) -> List[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
