"""One pipeline stage: its module, its predictive optimizer and its method's pieces.

The executors (local and distributed) only move tensors and call :meth:`Stage.forward`,
:meth:`Stage.backward` and :meth:`Stage.step` in schedule order; every weight-version
decision of every method is made here, from the pieces of its
:class:`~pipeline_rt.methods.Method` (version policy, predictor, offset, compensation),
with no method-specific branches.

Weight versions. The forward of micro-batch ``u`` runs on the live weights or on
``predict(offset(k) + s)`` of the stage's predictor (``method.predictor.build(optimizer)``;
the parameters' ``.data`` pointed at the predicted buffer). Autograd's saved weights are
redirected (:class:`lookahead_opt.redirect`) to the version the backward must use:

* ``live``: the weights current when the backward runs;
* ``forward``: the forward's own weights. For a live forward they are stashed lazily:
  only when a ``STEP`` is about to overwrite a version that an in-flight micro-batch still
  needs is a copy made (PipeDream's ``w_k + 1`` versions, 2BW's two). For a predicted
  forward the prediction is copied at the forward.
* ``predict``: ``predict(offset(k))`` computed from the live weights at backward time.

Gradients reach the parameters themselves (they are the autograd leaves whatever their
``.data`` holds), so micro-batches accumulate and ``STEP`` applies the sum. A predictor that
observes (``method.predictor.observes``, e.g. a calibrated one) is handed, at each backward
of a predicted forward, the weights its prediction aimed at (the live ones then).

Updates. ``STEP`` clips (``clip_grad_norm``), then calls
``method.compensation(optimizer, optimizer.step, ctx)`` (the identity: the plain step), then
steps the learning-rate scheduler. ``ctx`` (:class:`~lookahead_opt.compensation.StepContext`)
has the update's delay :math:`D = \\max s` over the micro-batches accumulated into it, the
updates done before it, the stage and, for a compensation with ``needs_forward_weights``,
the weights its gradients were computed at: those the forwards ran on (a live forward's
version, held in the stash until the STEP; a predicted forward's copy). All the
micro-batches of such an update must have run on the same weights (true with ``chunks=1``
and with the flush schedules), else the backward that adds the second raises.

Randomness. Each stage draws random numbers (dropout) from its own stream: the process's
RNG state when the stage first runs a forward, then carried from forward to forward (the
process's own RNG is left as it was). So the stages of one process do not depend on the
order in which the executor interleaves them, and the local executor draws exactly what
one process per stage (``backend="dist"``, every rank seeded alike) draws. A stage whose
forward provably cannot draw (:func:`pipeline_rt.randomness.may_draw`, read at every
:meth:`start_run`) skips the swap: its stream would be left as it was anyway.

Checkpoints. An autograd graph cannot be saved, so a micro-batch in flight at a checkpoint
is re-run at resume: the forwards of the units :attr:`Stage.retain` selects (chosen from the
schedule, see :mod:`pipeline_rt.checkpoint`) keep a :class:`Replay` (inputs, a copy of the
weights they ran on, the stage's RNG state, the version, the prediction distance), and
:meth:`Stage.load_state_dict` re-runs them, so their backwards see the same graph and the
same redirected weights.

Recomputation (``recompute=True``, :mod:`pipeline_rt.recompute`): the forward runs without a
graph and its record keeps a :class:`Replay` (a live forward's version held in the stash);
the backward first re-runs it from the replay, the same way.
"""
from __future__ import annotations

from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Dict, List, Optional, Sequence, Tuple, Union, cast

import torch
from torch import Tensor, nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.compensation import Compensation, StepContext
from lookahead_opt.redirect import Swapped, current_live, redirect
from lookahead_opt.swapping import ObservingPredictor, WeightPredictor

from .batchnorm import Pending, load_pending_stats, pending_stats
from .guards import as_message
from .lossprobe import resolve_weight
from .methods import Method
from .precision import LossScaling, no_autocast
from .randomness import may_draw
from .recompute import backward_weights, is_recomputing, may_recompute, rebuild, recomputing

__all__ = ["Stage", "StageError", "Replay", "as_tuple", "as_leaf", "retain_none"]

_NO_CONTEXT = nullcontext()

Unit = Tuple[int, int]
#: which weights a forward ran on: (version, prediction distance, observations made); a live
#: forward's is (version, 0, 0)
Key = Tuple[int, int, int]


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


def _shapes(ts: Sequence[Optional[Tensor]]) -> str:
    return ", ".join("None" if t is None else f"{tuple(t.shape)}:{str(t.dtype).replace('torch.', '')}" for t in ts)


@dataclass
class _Record:
    """What a forward leaves for its backward."""

    inputs: Tuple[Optional[Tensor], ...]
    key: Key
    outputs: Tuple[Optional[Tensor], ...] = ()
    loss: Optional[Tensor] = None
    version: int = 0
    s: int = 0               # v_B - v_F on the schedule
    predicted: bool = False  # the forward ran on predicted weights (distance > 0)
    track: bool = False      # measure the prediction error at the backward
    weights: Optional[List[Tensor]] = None          # the backward's weights, when not live/stashed
    forward_weights: Optional[List[Tensor]] = None  # what the forward ran on (error tracking, compensation)
    start_weights: Optional[List[Tensor]] = None    # the live weights at the forward (error tracking, observing)
    calib: Optional[tuple] = None  # an observing predictor's (start weights, prediction, scales) to observe
    replay: Optional[Replay] = None  # recompute: what re-runs the forward (pipeline_rt.recompute)

    def backward_weight(self, i: int) -> Tensor:
        """Parameter ``i`` of :attr:`weights` (set by the time the backward runs)."""
        assert self.weights is not None
        return self.weights[i]


@dataclass
class _Update:
    """What the next STEP applies: the micro-batches accumulated since the last one."""

    delay: int = 0                # D: their largest s
    key: Optional[Key] = None     # the weights they ran on (needs_forward_weights only) ...
    weights: Optional[List[Tensor]] = None  # ... a predicted forward's copy; None: version key[0], stashed


@dataclass
class Replay:
    """What it takes to re-run one forward exactly (a checkpointed in-flight micro-batch)."""

    unit: Unit
    inputs: Tuple[Optional[Tensor], ...]  # the forward's inputs (leaves; requires_grad as they were)
    weights: List[Tensor]      # a copy of the weights the forward ran on (live or predicted); empty for
    #                            a recomputed live forward: its version, held in the stash
    version: int               # the STEPs done at the forward
    predicted: bool
    rng: Tuple[Tensor, Optional[Tensor]]  # the stage's CPU and (on CUDA) device RNG states at the forward
    s: int = 0                 # the forward's v_B - v_F
    target: Any = None
    weight: float = 1.0
    calib: Optional[tuple] = None  # an observing predictor's (start weights, prediction, scales)
    observed: int = 0          # the observations the predictor had made at the forward


class Stage:
    """A stage of the pipeline.

    Args:
        index: k, the stage's position (0 = first).
        num_stages: N.
        module: the stage's module, already on its device.
        optimizer: the stage's :class:`~lookahead_opt.PredictiveOptimizer` (built with
            ``method.rule``); ``None`` for a stage without parameters (its F and B still run,
            its STEP does nothing).
        method: the method's pieces.
        loss_fn: ``loss_fn(output, target)``; used by the last stage only.
        check_finite: check the loss and the gradients at every step (one host sync each).
        track_error: measure the prediction error at every backward (see :attr:`errors`).
        lr_scheduler: ``lr_scheduler(optimizer) -> LRScheduler``, stepped after every STEP.
        clip_grad_norm: clip the stage's gradients to this total 2-norm before every STEP.
        recompute: keep only the inputs of a forward and re-run it right before its backward
            (:mod:`pipeline_rt.recompute`).
    """

    def __init__(self, index: int, num_stages: int, module: nn.Module, optimizer: Optional[PredictiveOptimizer],
                 method: Method, loss_fn: Optional[Callable[[Any, Any], Tensor]] = None, *,
                 check_finite: bool = False, track_error: bool = False,
                 lr_scheduler: Optional[Callable[[Any], Any]] = None, clip_grad_norm: Optional[float] = None,
                 recompute: bool = False) -> None:
        self.index, self.num_stages = index, num_stages
        self.is_last = index == num_stages - 1
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
        self.recompute = recompute
        self._rng: Optional[Tuple[Tensor, Optional[Tensor]]] = None  # the stage's own RNG stream
        self._cuda = _cuda_devices(self.params)
        self._replays: Dict[Unit, Replay] = {}
        #: what predicts (and swaps in) the predicted weights: ``method.predictor`` built on the
        #: optimizer (for ``Rule()``, and for a method that predicts nothing, the optimizer itself)
        self.predictor: Optional[WeightPredictor] = \
            method.predictor.build(optimizer) if optimizer is not None and method.predicts else optimizer
        self.observes = method.predictor.observes
        self.compensation = method.compensation
        #: whether the compensation changes the step (one that does not override ``__call__`` is
        #: the identity: the stage then calls the optimizer's step itself, without a context)
        self._compensates = type(method.compensation).__call__ is not Compensation.__call__
        self._extra = method.extra(index)  # the method's offset at this stage
        self._needs_forward_weights = method.compensation.needs_forward_weights and bool(self.params)
        self._observed = 0  # observations handed to the predictor
        self._update = _Update()
        #: the context every forward (and recomputation) of the stage runs in: ``with stage.autocast():``
        #: (:func:`pipeline_rt.precision.autocast`, set by the pipeline for each run)
        self.autocast: Callable[[], ContextManager[Any]] = no_autocast
        #: float16: the loss scaling the last stage's backward applies (:mod:`pipeline_rt.precision`)
        self.loss_scaling: Optional[LossScaling] = None
        self.start_run()

    def start_run(self) -> None:
        """Read what a run needs of the module as it is now: whether its forward (and, at
        the last stage, the loss) may draw random numbers (:func:`~pipeline_rt.randomness.may_draw`)."""
        self._draws = may_draw(self.module, self.loss_fn if self.is_last else None)  # else the RNG swap is skipped
        self.may_recompute = may_recompute(self.module)  # else pipeline_rt.recompute.backward_weights is skipped

    # ------------------------------------------------------------------ actions

    def forward(self, unit: Unit, inputs: Tuple[Optional[Tensor], ...], s: int,
                target: Any = None, weight: float = 1.0) -> Tuple[Optional[Tensor], ...]:
        """Forward of micro-batch ``unit``; ``s`` is its ``v_B - v_F`` on the schedule.

        Returns the outputs to send on (detach them before sending), or, at the last
        stage, ``(loss * weight,)`` where ``weight`` scales the micro-batch's share.
        """
        return self._forward(unit, inputs, s, target, weight, None)

    def _forward(self, unit: Unit, inputs: Tuple[Optional[Tensor], ...], s: int, target: Any, weight: float,
                 replay: Optional[Replay]) -> Tuple[Optional[Tensor], ...]:
        m = self.method
        distance = self._extra + s
        # predict(0) is the live weights: no prediction, no buffer
        predicted = m.forward == "predict" and distance > 0 and bool(self.params)
        observed = self._observed
        if replay is not None:
            predicted, observed = replay.predicted, replay.observed
        version = self.version if replay is None else replay.version
        rec = _Record(inputs=inputs, key=(version, distance, observed) if predicted else (version, 0, 0),
                      version=version, s=s, predicted=predicted)
        keep = replay is None and self.retain(unit)
        # a replay has no start weights; a stage without parameters has nothing to predict
        rec.track = self.track_error and s > 0 and replay is None and bool(self.params)
        observe = self.observes and predicted and replay is None
        lazy = self.recompute and not is_recomputing()  # no graph now: the backward re-runs the forward
        if rec.track or observe:
            rec.start_weights = [p.detach().clone() for p in self.params]
        if self._rng is None:
            self._rng = self.rng_state()
        rng = self._rng
        # the backward uses the weights the forward saved unless a swap or a step comes between
        # them or its policy is a prediction: only then are the saved weights redirected
        same = lazy or replay is None and not predicted and s == 0 and m.backward != "predict"
        with self._weights_for(distance, predicted, replay), (self._own_rng(replay) if self._draws else _NO_CONTEXT), \
                (_NO_CONTEXT if same else redirect(self.params, self._resolver(rec))), self.autocast(), \
                (torch.no_grad() if lazy else _NO_CONTEXT):
            try:
                out = self.module(*inputs)
                if self.is_last:
                    assert self.loss_fn is not None, "the last stage needs a loss_fn"
                    out = self.loss_fn(out, target) * resolve_weight(weight)  # after the loss: lossprobe
            except (RuntimeError, TypeError, ValueError) as e:
                what = "loss_fn" if self.is_last and "out" in locals() else "forward"
                raise StageError(
                    f"stage {self.index} {what} failed on micro-batch {unit} with inputs of shapes "
                    f"[{_shapes(inputs)}]: {e}. The previous stage's outputs must match this stage's "
                    f"inputs (check the split of the model).") from e
            kept = m.backward == "forward" or rec.track or observe or self._needs_forward_weights or lazy
            snap = replay.weights if replay is not None and replay.weights else \
                [p.detach().clone() for p in self.params] if keep or (predicted and kept) else []
        if predicted and m.backward == "forward":
            rec.weights = snap
        if predicted and (rec.track or self._needs_forward_weights):
            rec.forward_weights = snap
        elif rec.track:
            rec.forward_weights = rec.start_weights
        if observe:
            rec.calib = (rec.start_weights, snap, cast(ObservingPredictor, self.predictor).last_scales)
        if replay is not None and replay.calib is not None:
            rec.calib = replay.calib
        if keep:
            self._replays[unit] = Replay(unit, inputs, snap, rec.version, predicted, rng, s, target, weight,
                                         rec.calib, observed)
        if lazy:
            rec.replay = replay or self._replays.get(unit) or \
                Replay(unit, inputs, snap if predicted else [], rec.version, predicted, rng, s, target, weight,
                       rec.calib, observed)
        outs = (out,) if isinstance(out, Tensor) else as_tuple(out, f"stage {self.index}'s output")
        if self.is_last:
            rec.loss = loss = outs[0]
            assert loss is not None
            if self.check_finite and not bool(torch.isfinite(loss).all()):
                raise FloatingPointError(f"stage {self.index}: loss of micro-batch {unit} is {loss.item()}")
        elif not lazy or keep:  # (a recomputed forward's outputs are only needed by a checkpoint's transit)
            rec.outputs = outs
        if not predicted and (m.backward == "forward" or self._needs_forward_weights or lazy):
            self._refs[rec.version] += 1  # the version is needed after the next STEP: stash it then
        self._records[unit] = rec
        if len(self._records) > self.peak_in_flight:
            self.peak_in_flight = len(self._records)
        if predicted or rec.weights is not None or lazy:  # otherwise the count of versions held is unchanged
            self._count_versions()
        return outs

    def backward(self, unit: Unit, grads: Optional[Tuple[Optional[Tensor], ...]] = None) -> Tuple[Optional[Tensor], ...]:
        """Backward of micro-batch ``unit``; returns the gradients of its inputs."""
        rec = self._records.pop(unit)
        self._replays.pop(unit, None)
        if rec.replay is not None:  # the forward ran without a graph: re-run it (pipeline_rt.recompute)
            rec = rebuild(self, unit, rec)
        m = self.method
        if m.backward == "predict":
            extra = self._extra
            if extra > 0 and self.predictor is not None:
                rec.weights = self.predictor.predict(extra)
                self._buffer_used = True
                self._count_versions()
            else:
                rec.weights = [p.detach() for p in self.params]
        if rec.track:
            self._record_error(rec)
        if rec.calib is not None:  # the weights the prediction aimed at are the live ones now
            start, prediction, scales = rec.calib
            cast(ObservingPredictor, self.predictor).observe(start, prediction, [p.detach() for p in self.params],
                                                             scales)
            self._observed += 1
        with recomputing(), backward_weights(self, rec, unit) as kw:  # a recomputation inside: exact or refused
            if self.is_last:
                assert rec.loss is not None
                loss = rec.loss if self.loss_scaling is None else self.loss_scaling.scale(rec.loss)
                torch.autograd.backward(loss, **kw)
            else:
                assert grads is not None, "a backward before the last stage needs the outputs' gradients"
                pairs = [(o, g) for o, g in zip(rec.outputs, grads)
                         if o is not None and o.requires_grad and g is not None]
                if pairs:
                    torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs], **kw)
        self._accumulate(rec)
        if rec.replay is not None and not rec.predicted:
            self._release(rec.version)  # the hold a recomputed live forward took on its version
        return tuple(x.grad if x is not None and x.requires_grad else None for x in rec.inputs)

    def step(self) -> None:
        """One optimizer update: clip (``clip_grad_norm``), step through the method's
        compensation, clear the gradients, step the learning-rate scheduler."""
        if self._refs.get(self.version):
            # an in-flight micro-batch (or this update's context) still needs the version this step overwrites
            self._stash[self.version] = [p.detach().clone() for p in self.params]
            self._count_versions()
        if self.check_finite:
            self._check_grads()
        opt = self.optimizer
        if opt is not None:
            if self.clip_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(self.params, self.clip_grad_norm)
            if self._compensates:
                self.compensation(opt, opt.step, self._context())
            else:
                opt.step()
            opt.zero_grad(set_to_none=True)
            if self.scheduler is not None:
                self.scheduler.step()
        up = self._update
        if up.key is not None:
            if up.weights is None:
                self._release(up.key[0])  # the live forward's version held for the context
            self._update = _Update()
        else:
            up.delay = 0  # (all there is to clear)
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
        self._update = _Update()
        load_pending_stats(self.module, {})
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)

    def outputs_of(self, unit: Unit) -> Tuple[Optional[Tensor], ...]:
        """The outputs of an in-flight micro-batch (not the last stage)."""
        return self._records[unit].outputs

    def loss_of(self, unit: Unit) -> Tensor:
        """The (weighted) loss tensor of an in-flight micro-batch at the last stage."""
        loss = self._records[unit].loss
        assert loss is not None, f"stage {self.index} is not the last: it has no loss"
        return loss

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """Everything of this stage between two actions: module, optimizer (with the
        predictor's state; a calibrated or roll-out predictor's own state too), STEPs done,
        stashed versions, accumulated gradients (and what the update context knows of them)
        and a :class:`Replay` per micro-batch in flight (each must be in :attr:`retain`)."""
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
            "update": (self._update.delay, self._update.key, self._update.weights),
            "replays": [dict(vars(self._replays[u])) for u in self._records],  # plain data: loads with weights_only
            # the calibrated scales' statistics / the roll-out's last gradients
            "predictor": None if self.predictor is None or self.predictor is self.optimizer
            else self.predictor.state_dict(),
            "observed": self._observed,
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "rng": self._rng,
            # a DeferredBatchNorm's partial minibatch (as plain tuples)
            "pending_stats": {name: tuple(p) for name, p in pending_stats(self.module).items()},
        }

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and re-run the in-flight forwards. Module buffers
        that the forwards update (e.g. running statistics) end as saved."""
        self.clear()
        if self.optimizer is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        if self.predictor is not None and state.get("predictor") is not None:
            self.predictor.load_state_dict(state["predictor"])
        self._observed = state.get("observed", 0)  # (the get()s: checkpoints of 0.1.0)
        if self.scheduler is not None and state.get("scheduler") is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self.version = state["version"]
        self._stash = {v: list(ws) for v, ws in state["stash"].items()}
        for p, g in zip(self.params, state["grads"]):
            p.grad = g
        self._update = _Update(*state.get("update", (0, None, None)))
        if self._update.key is not None and self._update.weights is None:
            self._refs[self._update.key[0]] += 1
        for fields in state["replays"]:
            r = Replay(**fields)
            self._forward(r.unit, r.inputs, r.s, r.target, r.weight, r)
            self._replays[r.unit] = r
        self._rng = state["rng"]
        self.module.load_state_dict(state["module"])
        pending = {name: Pending(*p) for name, p in state["pending_stats"].items()}
        load_pending_stats(self.module, pending)  # after the replays, which counted

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
        return _SwappedIn(self, distance, replay) if predicted or replay is not None else _NO_CONTEXT

    def _resolver(self, rec: _Record) -> Callable[[int], Tensor]:
        policy, params = self.method.backward, self.params
        if policy == "live":  # (current_live: the parameters may hold other weights during the backward)
            return lambda i: current_live(params[i])
        if policy == "forward" and not rec.predicted:
            stash, v = self._stash, rec.version
            return lambda i: stash[v][i] if v in stash else current_live(params[i])
        return rec.backward_weight

    def _release(self, version: int) -> None:
        self._refs[version] -= 1
        if self._refs[version] <= 0:
            del self._refs[version]
            self._stash.pop(version, None)

    def _count_versions(self) -> None:
        held = 1 + len(self._stash) + sum(r.weights is not None or r.replay is not None and bool(r.replay.weights)
                                          for r in self._records.values())
        if self._buffer_used:
            held += 1  # the predictor's reusable buffer
        self.peak_versions = max(self.peak_versions, held)

    def _accumulate(self, rec: _Record) -> None:
        """Count micro-batch ``rec``, just backwarded, into the next STEP's context; release
        what its backward needed."""
        up = self._update
        if rec.s > up.delay:
            up.delay = rec.s
        holds = not rec.predicted and (self.method.backward == "forward" or self._needs_forward_weights)
        if self._needs_forward_weights:
            if up.key is None:
                up.key, up.weights = rec.key, rec.forward_weights
                return  # a live forward's hold on its version passes to the update
            if up.key != rec.key:
                m = self.method
                raise StageError(
                    f"stage {self.index}: method {m.name!r} has compensation {m.compensation!r}, which needs the "
                    f"weights an update's gradients were computed at, but update {self.version} adds micro-batches "
                    f"that ran on different weights ({_describe(up.key)}, then {_describe(rec.key)}); use chunks=1 "
                    f"or a flush schedule (shape 'gpipe' or '1f1b-flush')")
        if holds:
            self._release(rec.version)

    def _context(self) -> StepContext:
        """The :class:`~lookahead_opt.compensation.StepContext` of the update about to be applied."""
        up, weights = self._update, None
        if self._needs_forward_weights:
            if up.weights is not None:
                weights = up.weights
            elif up.key is not None:
                weights = self._stash[up.key[0]]  # held since the forward, stashed by this STEP at the latest
            else:  # no micro-batch in this update: its gradients (if any) are at the live weights
                weights = [p.detach().clone() for p in self.params]
        return StepContext(up.delay, self.version, self.index, self.num_stages, weights)

    def _record_error(self, rec: _Record) -> None:
        assert rec.forward_weights is not None and rec.start_weights is not None
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


class _SwappedIn:
    """See :meth:`Stage._weights_for`: a replay's weights (``replay``) or the prediction
    ``distance`` ahead swapped in for the block (a plain context object: it is entered at
    every predicted forward)."""

    __slots__ = ("stage", "distance", "replay", "swapped")

    def __init__(self, stage: Stage, distance: int, replay: Optional[Replay]) -> None:
        self.stage, self.distance, self.replay = stage, distance, replay

    def __enter__(self) -> None:
        stage = self.stage
        if self.replay is not None:
            self.swapped = Swapped(stage.params, self.replay.weights)
            return
        predictor = stage.predictor
        assert predictor is not None  # a stage without parameters predicts nothing
        predictor.swap_in(self.distance)
        stage._buffer_used = True

    def __exit__(self, *exc: Any) -> None:
        if self.replay is not None:
            self.swapped.undo()
        else:
            self.stage.predictor.swap_out()  # type: ignore[union-attr]


def retain_none(unit: Unit) -> bool:
    """The default :attr:`Stage.retain`: no forward keeps a replay."""
    return False


def _cuda_devices(params: Sequence[Tensor]) -> List[torch.device]:
    """The (first) CUDA device the parameters are on (whose RNG the stage's stream includes)."""
    return sorted({p.device for p in params if p.device.type == "cuda"}, key=str)[:1]


def _describe(key: Key) -> str:
    version, distance, _ = key
    return f"version {version}" + (f" predicted {distance} ahead" if distance else "")


def _norm(ts: Union[List[Tensor], Tuple[Tensor, ...]]) -> Tensor:
    return torch.linalg.vector_norm(torch.stack([n.float() for n in torch._foreach_norm(ts)]))


def _param_names(module: nn.Module, params: List[Tensor]) -> List[str]:
    by_id = {id(p): n for n, p in module.named_parameters()}
    return [by_id.get(id(p), f"param{i}") for i, p in enumerate(params)]
