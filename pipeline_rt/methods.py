"""The training methods: each one is a schedule shape plus a weight-version policy.

A policy says which weights a micro-batch's forward uses (``"live"``, or ``"predict"``:
the live weights extrapolated ``s`` updates ahead by the stage's
:class:`~lookahead_opt.PredictiveOptimizer`) and which its backward uses (``"live"``: the
weights current when the backward runs; ``"forward"``: exactly the forward's weights,
stashed; ``"predict"``: a fresh prediction made at backward time). The prediction distance
of a forward is ``extra(k) + s``, with ``s = v_B - v_F`` counted on the schedule; a
``"predict"`` backward uses ``extra(k)``.

=====================  ==========  =======  ========  ===================================
method                 shape       forward  backward  prediction rule
=====================  ==========  =======  ========  ===================================
``sync``               gpipe       live     live      --
``1f1b-flush``         1f1b-flush  live     live      --
``async``              async-1f1b  live     live      --
``pipedream``          async-1f1b  live     forward   --
``2bw``                async-1f1b  live     forward   -- (micro-batches, one update each)
``spectrain``          async-1f1b  predict  predict   smoothed gradient, extra = k // 2
``pipeoptim``          async-1f1b  predict  live      the optimizer's own rule
``pipeoptim-cal``      async-1f1b  predict  forward   own rule, calibrated scale
``pipeoptim-rollout``  async-1f1b  predict  forward   own update rolled s steps
``pipeoptim-calroll``  async-1f1b  predict  forward   roll-out, calibrated scale
=====================  ==========  =======  ========  ===================================

``pipeoptim-cal`` scales each tensor's predicted displacement by a factor in [0, 1] fitted
online by least squares against the weights each backward finds
(:class:`lookahead_opt.calibrated.CalibratedPredictor`; docs/improved_prediction.rst), and
its backward reuses the forward's weights, so a scale of 0 is exactly ``pipedream``.
``pipeoptim-rollout`` rolls the optimizer's real update ``s`` steps forward with the last
gradient held fixed (:class:`lookahead_opt.rollout.RolloutPredictor`; exact when the
gradient is constant), with the same consistent backward. ``pipeoptim-calroll`` (the
recommended improved method) scales the roll-out's displacement per tensor by the same
least-squares factor as ``pipeoptim-cal`` (``CalibratedPredictor(displacement="rollout")``):
a scale of 1 is ``pipeoptim-rollout``, 0 is ``pipedream``.

``pipeoptim`` with ``backward="predicted"`` keeps each micro-batch's predicted weights until
its backward (``backward="forward"`` policy).
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Union

__all__ = ["Method", "METHODS", "get_method"]


@dataclass(frozen=True)
class Method:
    """A method's schedule and weight-version policy (pure data).

    Attributes:
        name: the pinned method name.
        shape: schedule shape for :func:`pipeline_rt.schedule.build`.
        chunks: micro-batches per minibatch; ``None`` means one per stage.
        forward: ``"live"`` or ``"predict"``.
        backward: ``"live"``, ``"forward"`` or ``"predict"``.
        rule: prediction rule name for :class:`~lookahead_opt.PredictiveOptimizer`
            (``None``: the optimizer's own rule).
        half_stage_lookahead: add ``extra(k) = k // 2`` to every prediction distance
            (SpecTrain's correction for the time a backward takes to reach stage k).
        predictor: what predicts a ``"predict"`` forward: ``"rule"`` (the optimizer's own
            rule, :meth:`~lookahead_opt.PredictiveOptimizer.predict`), ``"calibrated"``
            (:class:`~lookahead_opt.calibrated.CalibratedPredictor`, per-tensor scale fitted
            at each backward), ``"rollout"`` (:class:`~lookahead_opt.rollout.RolloutPredictor`,
            the update rule rolled ``s`` steps forward with the last gradient held fixed) or
            ``"calibrated-rollout"`` (the roll-out's displacement with the calibrated scale).
    """

    name: str
    shape: str
    chunks: Optional[int] = 1
    forward: str = "live"
    backward: str = "live"
    rule: Optional[str] = None
    half_stage_lookahead: bool = False
    predictor: str = "rule"

    @property
    def calibrate(self) -> bool:
        """Whether the forward's prediction is calibrated at each backward."""
        return self.predictor in ("calibrated", "calibrated-rollout")

    def extra(self, stage: int) -> int:
        """Prediction distance added at stage ``stage`` (0 unless SpecTrain-style)."""
        return stage // 2 if self.half_stage_lookahead else 0

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
        Method("spectrain", "async-1f1b", forward="predict", backward="predict",
               rule="smoothed_gradient", half_stage_lookahead=True),
        Method("pipeoptim", "async-1f1b", forward="predict"),
        Method("pipeoptim-cal", "async-1f1b", forward="predict", backward="forward", predictor="calibrated"),
        Method("pipeoptim-rollout", "async-1f1b", forward="predict", backward="forward", predictor="rollout"),
        Method("pipeoptim-calroll", "async-1f1b", forward="predict", backward="forward",
               predictor="calibrated-rollout"),
    )
}


def get_method(name: Union[str, Method], *, backward: Optional[str] = None, chunks: Optional[int] = None) -> Method:
    """Look up a method by name, with optional overrides.

    Args:
        name: one of :data:`METHODS`.
        backward: ``"predicted"`` (with ``pipeoptim``) keeps the forward's predicted
            weights for the backward; ``"live"`` is the default.
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
