"""The training methods. A method is a composition of pieces, optax-style:

* a **schedule shape** and its **chunks** (micro-batches per minibatch, gradients accumulated
  over them: one STEP per minibatch);
* a **weight-version policy**: which weights a micro-batch's forward uses (``"live"``, or
  ``"predict"``: the live weights extrapolated by the predictor) and which its backward uses
  (``"live"``: the weights current when the backward runs; ``"forward"``: exactly the
  forward's weights, stashed; ``"predict"``: a fresh prediction made at backward time);
* a **predictor** (:mod:`lookahead_opt.predictors`: ``Rule()``, ``Rule("smoothed_gradient")``,
  ``Rollout()``, ``Calibrated(inner)``, ...) and a distance **offset** ``offset(k)``: a
  ``"predict"`` forward of a micro-batch with ``s = v_B - v_F`` (counted on the schedule)
  predicts ``offset(k) + s`` updates ahead, a ``"predict"`` backward ``offset(k)``;
* an **update compensation** (:class:`lookahead_opt.compensation.Compensation`, default the
  identity), wrapped around every optimizer step of every stage: it may change the
  gradients, the learning rate or the weights of an update as a function of its delay
  :math:`D = \\max s` over the micro-batches accumulated into it
  (:class:`~lookahead_opt.compensation.StepContext`). A learning-rate policy is a
  compensation too (it changes the learning rate around the step and restores it).

=====================  ==========  =======  ========  ========================================
method                 shape       forward  backward  predictor
=====================  ==========  =======  ========  ========================================
``sync``               gpipe       live     live      --
``1f1b-flush``         1f1b-flush  live     live      --
``async``              async-1f1b  live     live      --
``pipedream``          async-1f1b  live     forward   --
``2bw``                async-1f1b  live     forward   -- (chunks = N, one update each)
``2bw-dm``             async-1f1b  live     forward   -- (as ``2bw``; compensation
                                                      ``DelayMomentum()``)
``spectrain``          async-1f1b  predict  predict   ``Rule("smoothed_gradient")``,
                                                      ``offset=half_stage`` (``k // 2``)
``pipeoptim``          async-1f1b  predict  live      ``Rule()``: the optimizer's own rule
``pipeoptim-cal``      async-1f1b  predict  forward   ``Calibrated(Rule())``
``pipeoptim-rollout``  async-1f1b  predict  forward   ``Rollout()``
``pipeoptim-calroll``  async-1f1b  predict  forward   ``Calibrated(Rollout())``
=====================  ==========  =======  ========  ========================================

Every named method has the identity compensation and ``chunks=1`` unless shown (``sync`` and
``1f1b-flush``: ``N``).

``2bw`` is :data:`RECOMMENDED`, chosen by measurement (docs/choosing.rst). ``2bw-dm`` is
``2bw`` with the momentum lowered by the update's delay
(:class:`lookahead_opt.compensation.DelayMomentum`: :math:`m_D = \\max(0, m - D/(D+1))`, the
explicit momentum minus the implicit momentum a delay of :math:`D` adds; SGD's ``momentum``,
Adam's :math:`\beta_1`). In 2BW's schedule every stage but the last has :math:`D = 1`, so
:math:`m = 0.9` becomes 0.4 there: lower losses than ``2bw`` in most measured cells, but the
effective SGD step :math:`lr/(1-m)` shrinks six-fold, which loses at small learning rates.

``pipeoptim-cal`` scales each tensor's predicted displacement by a factor in [0, 1] fitted
online by least squares against the weights each backward finds
(:class:`lookahead_opt.calibrated.CalibratedPredictor`; docs/improved_prediction.rst), and
its backward reuses the forward's weights, so a scale of 0 is exactly ``pipedream``.
``pipeoptim-rollout`` rolls the optimizer's real update ``s`` steps forward with the last
gradient held fixed (:class:`lookahead_opt.rollout.RolloutPredictor`; exact when the
gradient is constant), with the same consistent backward. ``pipeoptim-calroll`` (the
recommended improved method) scales the roll-out's displacement per tensor by the same
least-squares factor: a scale of 1 is ``pipeoptim-rollout``, 0 is ``pipedream``.

``pipeoptim`` with ``backward="predicted"`` keeps each micro-batch's predicted weights until
its backward (``backward="forward"`` policy).

Local accumulation ("update every ``a`` micro-batches") is no separate mechanism: the shape
``async-1f1b`` with ``chunks=a`` runs ``a`` micro-batches per minibatch, accumulates their
gradients and STEPs once per minibatch, i.e. once every ``a`` micro-batches
(``get_method("pipedream", chunks=a)``, or any method with ``chunks=a``). ``2bw`` is the case
``a = N`` with a stash (``backward="forward"``): each micro-batch's backward uses its
forward's weights.

A new method is a :class:`Method` built from pieces, passed as ``Pipeline(..., method=m)``::

    from lookahead_opt.predictors import Calibrated, Rollout
    m = Method("my-method", "async-1f1b", forward="predict", backward="forward",
               predictor=Calibrated(Rollout(), max_scale=0.8), compensation=MyCompensation())
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Optional, Union

from lookahead_opt.compensation import Compensation, DelayMomentum
from lookahead_opt.predictors import Calibrated, Predictor, Rollout, Rule
from lookahead_opt.rules import Rule as UpdateRule

from .schedule import SHAPES, ScheduleError

__all__ = ["Method", "METHODS", "RECOMMENDED", "get_method", "no_offset", "half_stage"]

FORWARD = ("live", "predict")
BACKWARD = ("live", "forward", "predict")


def no_offset(stage: int) -> int:
    """No extra prediction distance: 0 at every stage."""
    return 0


def half_stage(stage: int) -> int:
    """SpecTrain's extra distance :math:`\\lfloor k/2 \\rfloor` at stage ``k`` (the time a
    backward takes to come back to stage ``k``)."""
    return stage // 2


@dataclass(frozen=True)
class Method:
    """A method: schedule shape x chunks, weight-version policy, predictor, update compensation.

    Attributes:
        name: the method's name (a key of :data:`METHODS` for the named ones).
        shape: schedule shape for :func:`pipeline_rt.schedule.build`.
        chunks: micro-batches per minibatch; ``None`` means one per stage.
        forward: ``"live"`` or ``"predict"``.
        backward: ``"live"``, ``"forward"`` or ``"predict"``.
        predictor: what predicts the ``"predict"`` passes: a piece of
            :mod:`lookahead_opt.predictors`, built once per stage from the stage's
            :class:`~lookahead_opt.PredictiveOptimizer` (which is built with
            ``predictor.rule``).
        offset: ``offset(k)``, the prediction distance added at stage ``k``
            (:func:`no_offset`, or SpecTrain's :func:`half_stage`).
        compensation: called as ``compensation(optimizer, optimizer.step, ctx)`` for every
            optimizer step (after clipping, before the learning-rate scheduler).
    """

    name: str
    shape: str
    chunks: Optional[int] = 1
    forward: str = "live"
    backward: str = "live"
    predictor: Predictor = Rule()
    offset: Callable[[int], int] = no_offset
    compensation: Compensation = Compensation()

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ScheduleError(f"method {self.name!r}: unknown schedule shape {self.shape!r}; choose one of {SHAPES}")
        for what, value, allowed in (("forward", self.forward, FORWARD), ("backward", self.backward, BACKWARD)):
            if value not in allowed:
                raise ValueError(f"method {self.name!r}: {what} must be one of {allowed}, got {value!r}")
        if not isinstance(self.predictor, Predictor):
            raise TypeError(f"method {self.name!r}: predictor must be a lookahead_opt.predictors piece (Rule(), "
                            f"Rollout(), Calibrated(Rollout()), ...), got {self.predictor!r}")
        if not isinstance(self.compensation, Compensation):
            raise TypeError(f"method {self.name!r}: compensation must be a lookahead_opt.compensation.Compensation, "
                            f"got {self.compensation!r}")

    @property
    def rule(self) -> Union[None, str, UpdateRule]:
        """The prediction rule of the stages' :class:`~lookahead_opt.PredictiveOptimizer`
        (``None``: the optimizer's own)."""
        return self.predictor.rule

    def extra(self, stage: int) -> int:
        """Prediction distance added at stage ``stage``: ``offset(stage)``."""
        return self.offset(stage)

    def num_chunks(self, num_stages: int) -> int:
        """Micro-batches per minibatch for a pipeline of ``num_stages`` stages."""
        return num_stages if self.chunks is None else self.chunks

    @property
    def predicts(self) -> bool:
        """Whether any pass of this method uses predicted weights."""
        return "predict" in (self.forward, self.backward)


METHODS = {
    m.name: m
    for m in (
        Method("sync", "gpipe", chunks=None),
        Method("1f1b-flush", "1f1b-flush", chunks=None),
        Method("async", "async-1f1b"),
        Method("pipedream", "async-1f1b", backward="forward"),
        Method("2bw", "async-1f1b", chunks=None, backward="forward"),
        Method("2bw-dm", "async-1f1b", chunks=None, backward="forward", compensation=DelayMomentum()),
        Method("spectrain", "async-1f1b", forward="predict", backward="predict",
               predictor=Rule("smoothed_gradient"), offset=half_stage),
        Method("pipeoptim", "async-1f1b", forward="predict"),
        Method("pipeoptim-cal", "async-1f1b", forward="predict", backward="forward", predictor=Calibrated(Rule())),
        Method("pipeoptim-rollout", "async-1f1b", forward="predict", backward="forward", predictor=Rollout()),
        Method("pipeoptim-calroll", "async-1f1b", forward="predict", backward="forward",
               predictor=Calibrated(Rollout())),
    )
}

#: The method the project recommends, by measurement (docs/choosing.rst: the learning-efficiency
#: table and the time to a target loss on a simulated pipeline).
RECOMMENDED = "2bw"


def get_method(name: Union[str, Method], *, backward: Optional[str] = None, chunks: Optional[int] = None) -> Method:
    """Look up a method by name (or take a :class:`Method` as is), with optional overrides.

    Args:
        name: one of :data:`METHODS`, or a :class:`Method`.
        backward: ``"predicted"`` (with a predicting forward, e.g. ``pipeoptim``) keeps the
            forward's predicted weights for the backward; ``"live"`` is the default.
        chunks: micro-batches per minibatch, overriding the method's default.
    """
    if isinstance(name, Method):
        method = name
    elif name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {sorted(METHODS)}")
    else:
        method = METHODS[name]
    if backward is not None:
        if backward not in ("live", "predicted"):
            raise ValueError(f"backward must be 'live' or 'predicted', got {backward!r}")
        if backward == "predicted":
            if method.forward != "predict":
                raise ValueError(f"backward='predicted' needs a predicting method (pipeoptim), not {method.name!r}")
            method = replace(method, backward="forward")
    if chunks is not None:
        if not isinstance(chunks, int) or chunks < 1:
            raise ValueError(f"chunks must be a positive int, got {chunks!r}")
        method = replace(method, chunks=chunks)
    return method
