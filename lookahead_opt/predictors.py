"""Weight predictors as composable pieces, optax-style.

A piece is pure data (a frozen dataclass of options, no tensors); ``piece.build(optimizer)``
makes the predictor that forecasts ``optimizer``'s weights, so one piece describes the
predictor of every stage of a pipeline (:class:`pipeline_rt.methods.Method`'s ``predictor``):

==============================  ========================================================================
piece                           builds, predicting :math:`\\hat W_{t+s}`
==============================  ========================================================================
``Rule()``                      the optimizer itself: :math:`W_t - s\\,lr\\,dW_t`, its own rule
                                (:meth:`~lookahead_opt.PredictiveOptimizer.predict`)
``Rule("smoothed_gradient")``   the same with a named rule (SpecTrain's smoothed gradient)
``Rollout()``                   :class:`~lookahead_opt.rollout.RolloutPredictor`: the update rule rolled
                                ``s`` steps with the last gradient held fixed, :math:`R_s`
``Calibrated(inner)``           :class:`~lookahead_opt.calibrated.CalibratedPredictor`: ``inner``'s
                                displacement scaled per tensor, :math:`W_t - \\alpha_i (W_t - P_s)`,
                                :math:`\\alpha_i` fitted online by least squares
==============================  ========================================================================

(The piece ``Rule`` names a prediction rule; the rules themselves are
:class:`lookahead_opt.rules.Rule` objects, ``lookahead_opt.Rule``, in the registry.)

``Calibrated`` calibrates any inner piece (its displacement :math:`W_t - P_s` is whatever the
inner predictor predicts), e.g. ``Calibrated(Rule())`` (the method ``pipeoptim-cal``) and
``Calibrated(Rollout())`` (``pipeoptim-calroll``).

Outside a pipeline::

    piece = Calibrated(Rollout())
    po = PredictiveOptimizer(torch.optim.Adam(ps, lr=1e-3), rule=piece.rule)
    pred = piece.build(po)
    with pred.predicted(s):          # the parameters hold the prediction in the block
        out = model(x)

A new predictor is a :class:`~lookahead_opt.swapping.SwappingPredictor` subclass (its
``predict``) plus a piece whose :meth:`Predictor.build` makes it.
"""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import ClassVar, Union

from .calibrated import CalibratedPredictor
from .optimizer import PredictiveOptimizer
from .rollout import RolloutPredictor
from .rules import Rule as UpdateRule
from .rules import rule_named
from .swapping import WeightPredictor

__all__ = ["Predictor", "Rule", "Rollout", "Calibrated"]


class Predictor(abc.ABC):
    """A piece: builds a stage's :class:`~lookahead_opt.swapping.WeightPredictor` from its optimizer."""

    #: whether the built predictor is an :class:`~lookahead_opt.swapping.ObservingPredictor`
    observes: ClassVar[bool] = False

    @property
    def rule(self) -> Union[None, str, UpdateRule]:
        """The rule the :class:`~lookahead_opt.PredictiveOptimizer` must be built with
        (``PredictiveOptimizer(base, rule=piece.rule)``; ``None``: the optimizer's own)."""
        return None

    @abc.abstractmethod
    def build(self, optimizer: PredictiveOptimizer) -> WeightPredictor:
        """The predictor of ``optimizer``'s weights (steps still go through ``optimizer``)."""


@dataclass(frozen=True)
class Rule(Predictor):
    """:math:`W_t - s\\,lr\\,dW_t` with the optimizer's rule (``name=None``) or a named one
    (a registry name such as ``"smoothed_gradient"``, or a :class:`lookahead_opt.rules.Rule`).
    Builds the optimizer itself."""

    name: Union[None, str, UpdateRule] = None

    @property
    def rule(self) -> Union[None, str, UpdateRule]:
        return self.name

    def build(self, optimizer: PredictiveOptimizer) -> WeightPredictor:
        if self.name is not None and optimizer.rule is not rule_named(self.name):
            raise ValueError(f"{self!r} predicts with rule {rule_named(self.name).name!r}, but the optimizer uses "
                             f"{optimizer.rule.name!r}; build it as PredictiveOptimizer(base, rule=piece.rule)")
        return optimizer


@dataclass(frozen=True)
class Rollout(Predictor):
    """:math:`R_s`: the optimizer's update applied ``s`` times to a copy of its weights and
    state, every future raw gradient the last one (``future_grad="last"``) or zero
    (:class:`~lookahead_opt.rollout.RolloutPredictor`)."""

    future_grad: str = "last"

    def build(self, optimizer: PredictiveOptimizer) -> WeightPredictor:
        return RolloutPredictor(optimizer, future_grad=self.future_grad)


@dataclass(frozen=True)
class Calibrated(Predictor):
    """``inner``'s displacement scaled per tensor: :math:`W_t - \\alpha_i (W_t - P_s)` with
    :math:`P_s` what ``inner`` predicts and :math:`\\alpha_i \\in [` ``min_scale``,
    ``max_scale`` :math:`]` the exponentially smoothed least-squares fit of the true
    displacements (:class:`~lookahead_opt.calibrated.CalibratedPredictor`, whose options the
    others are)."""

    inner: Predictor = Rule()
    smoothing: float = 0.9
    init_scale: float = 1.0
    min_scale: float = 0.0
    max_scale: float = 1.0
    observes: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not isinstance(self.inner, Predictor):
            raise TypeError(f"Calibrated(inner): inner must be a predictor piece (Rule(), Rollout(), ...), "
                            f"got {self.inner!r}")
        if self.inner.observes:
            raise ValueError(f"Calibrated({self.inner!r}): the inner predictor observes its own outcomes, which a "
                             f"calibrated predictor does not pass on; calibrate an inner that does not observe")

    @property
    def rule(self) -> Union[None, str, UpdateRule]:
        return self.inner.rule

    def build(self, optimizer: PredictiveOptimizer) -> WeightPredictor:
        inner = self.inner.build(optimizer)
        return CalibratedPredictor(optimizer, displacement=inner, smoothing=self.smoothing, init_scale=self.init_scale,
                                   min_scale=self.min_scale, max_scale=self.max_scale)
