"""Calibrated weight prediction: the paper's linear rule with a per-tensor scale fitted online.

The paper's prediction (:meth:`PredictiveOptimizer.predict`) extrapolates the last update
linearly, :math:`\\hat W_{t+s} = W_t - s\\,lr\\,dW_t`. Measured on the built-in tasks it
over-shoots: the least-squares optimal multiplier of ``s lr dW`` is about 0.6-0.7 at the
first stages of an 8-stage pipeline (``s = 7``) and tends to 1 as ``s -> 1``, and it differs
between tensors (a tensor whose updates oscillate should not be extrapolated at all).

:class:`CalibratedPredictor` predicts, per parameter tensor ``i``,

.. math::

    \\hat W^{(i)}_{t+s} = W^{(i)}_t - \\alpha_i\\, s\\, lr\\, dW^{(i)}_t ,
    \\qquad \\alpha_i \\in [\\alpha_{\\min}, \\alpha_{\\max}]

and fits :math:`\\alpha_i` from what actually happened. Whenever the weights the prediction
aimed at become known (in a pipeline: at the backward of the micro-batch, ``W_B``), with
``W_F`` the live weights the prediction started from and :math:`P = W_F - \\hat W` the
displacement it applied with scale :math:`a` (so the *unit* displacement is
:math:`B = P / a = s\\,lr\\,dW`) and :math:`D = W_F - W_B` the true displacement,
:meth:`CalibratedPredictor.observe` updates two exponential moving averages

.. math::

    n_i \\leftarrow \\beta n_i + (1-\\beta) \\langle D, B\\rangle , \\qquad
    d_i \\leftarrow \\beta d_i + (1-\\beta) \\lVert B\\rVert^2 ,

and the scale is the smoothed least-squares solution
:math:`\\alpha_i = \\mathrm{clip}(n_i / d_i, \\alpha_{\\min}, \\alpha_{\\max})`, i.e. the
:math:`\\alpha` minimising the (exponentially weighted) squared prediction error
:math:`\\sum \\beta^{\\cdot} \\lVert D - \\alpha B\\rVert^2`. Before the first observation
:math:`\\alpha_i` is ``init_scale`` (1: the paper's rule).

Properties (tested in ``tests/test_calibrated.py``):

* Exactly linear trajectory (every update equal, :math:`D = B`): :math:`\\alpha = 1`, the
  paper's rule, which is then exact.
* True displacement orthogonal to (uncorrelated with) the predicted one: :math:`n \\to 0`,
  :math:`\\alpha \\to \\max(0, \\alpha_{\\min})`: no prediction.
* :math:`\\alpha = 0` predicts the live weights; in a pipeline whose backward reuses the
  forward's weights this is exactly PipeDream (weight stashing). ``max_scale = 1`` forbids
  extrapolating further than the paper.

Any displacement. The same fit scales the displacement of any other predictor :math:`P`
(``displacement=``, e.g. a :class:`~lookahead_opt.rollout.RolloutPredictor`, or
:class:`lookahead_opt.predictors.Calibrated` around any piece):
:math:`\\hat W = W - \\alpha_i (W - P_s)`, unit displacement :math:`B = W - P_s`; the paper's
rule is the case :math:`P_s = W - s\\,lr\\,dW`.

Cost: one prediction of the base rule with ``s = 1`` (the :mod:`lookahead_opt.kernel`
foreach chain; linear in ``s``, so ``s`` scales it) or one of the inner predictor with ``s``,
plus one in-place ``_foreach_lerp_`` with a per-tensor weight (``1 - alpha_i s`` or
``1 - alpha_i``); :meth:`observe` is two reductions per tensor. The scales stay on the
device (0-d tensors): no host synchronisation.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import Tensor

from .optimizer import PredictiveOptimizer, _check_s
from .rollout import RolloutPredictor
from .swapping import SwappingPredictor, WeightPredictor

__all__ = ["CalibratedPredictor"]


class CalibratedPredictor(SwappingPredictor):
    """A per-tensor, online-calibrated scale on top of a :class:`PredictiveOptimizer`'s rule.

    Args:
        optimizer: the wrapped :class:`PredictiveOptimizer` (its rule gives ``dW``; its
            ``param_groups`` give ``lr``; its steps are taken as usual, through it).
        smoothing: :math:`\\beta`, the EMA factor of the least-squares statistics
            (0: the last observation only).
        init_scale: :math:`\\alpha` before any observation (1: the paper's rule).
        min_scale, max_scale: the clip range of :math:`\\alpha`.
        displacement: whose displacement is scaled: ``"linear"`` (the optimizer's rule,
            ``s lr dW``), ``"rollout"`` (a :class:`~lookahead_opt.rollout.RolloutPredictor` on
            the optimizer, ``W - R_s``) or any predictor of the optimizer's weights
            (:class:`~lookahead_opt.swapping.SwappingPredictor` built on it).

    Usage outside a pipeline (any delayed-gradient trainer)::

        pred = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=.1, momentum=.9)))
        w_f = [p.detach().clone() for p in ps]        # weights when predicting
        w_hat = [w.clone() for w in pred.predict(s)]   # with pred.last_scales
        ...                                            # s steps later:
        pred.observe(w_f, w_hat, [p.detach() for p in ps], pred_scales)
    """

    name = "calibrated"

    def __init__(self, optimizer: PredictiveOptimizer, *, smoothing: float = 0.9, init_scale: float = 1.0,
                 min_scale: float = 0.0, max_scale: float = 1.0,
                 displacement: Union[str, WeightPredictor] = "linear") -> None:
        super().__init__(optimizer)
        if displacement == "rollout":
            displacement = RolloutPredictor(optimizer)
        elif displacement == "linear":
            displacement = optimizer
        elif isinstance(displacement, str):
            raise ValueError(f"displacement must be 'linear', 'rollout' or a predictor, got {displacement!r}")
        elif displacement is not optimizer and getattr(displacement, "optimizer", None) is not optimizer:
            raise ValueError(f"displacement {type(displacement).__name__} must predict this optimizer's weights "
                             f"(a SwappingPredictor built on it, or the optimizer itself)")
        #: :math:`P`, the predictor whose displacement :math:`W - P_s` is scaled: the optimizer
        #: itself (the paper's ``s lr dW``) or any other, e.g. a
        #: :class:`~lookahead_opt.rollout.RolloutPredictor` (``W - R_s``, the update rolled ``s``
        #: steps with the last gradient held fixed)
        self.inner: WeightPredictor = displacement
        #: what the scaled displacement is: ``"linear"`` (the optimizer's rule) or the inner
        #: predictor's :attr:`~lookahead_opt.swapping.SwappingPredictor.name` (``"rollout"``)
        self.displacement: str = "linear" if displacement is optimizer else \
            getattr(displacement, "name", type(displacement).__name__)
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"smoothing must be in [0, 1), got {smoothing}")
        if not min_scale <= max_scale:
            raise ValueError(f"min_scale {min_scale} > max_scale {max_scale}")
        self.smoothing, self.init_scale = float(smoothing), float(init_scale)
        self.min_scale, self.max_scale = float(min_scale), float(max_scale)
        params = optimizer.params
        self._num = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        self._den = [torch.zeros((), dtype=torch.float32, device=p.device) for p in params]
        self.num_observations = 0
        #: the per-tensor scales used by the last :meth:`predict` (0-d tensors)
        self.last_scales: List[Tensor] = []

    # ----------------------------------------------------------------- scales
    def scales(self) -> List[Tensor]:
        """:math:`\\alpha_i` per parameter tensor, as new 0-d float32 tensors on its device."""
        out = []
        for n, d in zip(self._num, self._den):
            a = torch.where(d > 0, n / d.clamp_min(torch.finfo(d.dtype).tiny), torch.full_like(d, self.init_scale))
            out.append(a.clamp(self.min_scale, self.max_scale))
        return out

    def observe(self, start: Sequence[Tensor], predicted: Sequence[Tensor], actual: Sequence[Tensor],
                scales: Sequence[Tensor]) -> None:
        """Update the fit from one prediction whose target is now known.

        Args:
            start: :math:`W_F`, the live weights the prediction was made from.
            predicted: :math:`\\hat W`, what :meth:`predict` returned (a copy).
            actual: the weights the prediction aimed at (:math:`W_{t+s}`; in a pipeline the
                live weights at the micro-batch's backward).
            scales: the :attr:`last_scales` of that prediction (tensors with scale 0
                carry no information and are skipped).
        """
        b = self.smoothing
        for i, (w0, wh, w1, a) in enumerate(zip(start, predicted, actual, scales)):
            p = (w0 - wh).float()
            dn = (w0 - w1).float()
            a = a.to(p.device, torch.float32)
            ok = a > 0
            inv = torch.where(ok, 1.0 / a.clamp_min(1e-12), torch.zeros_like(a))
            num = (p * dn).sum() * inv          # <D, B>, B = P / a
            den = (p * p).sum() * inv * inv     # ||B||^2
            self._num[i] = torch.where(ok & (den > 0), b * self._num[i] + (1 - b) * num, self._num[i])
            self._den[i] = torch.where(ok & (den > 0), b * self._den[i] + (1 - b) * den, self._den[i])
        self.num_observations += 1

    # ----------------------------------------------------------------- prediction
    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """:math:`W_t - \\alpha_i s\\, lr\\, dW_t` per tensor (same contract as
        :meth:`PredictiveOptimizer.predict`: params untouched, written into ``out`` or the
        wrapper's reusable buffer). Sets :attr:`last_scales`."""
        s = _check_s(s)
        self.last_scales = self.scales()
        opt = self.optimizer
        if s == 0:
            return opt.predict(0, out)
        weights = opt._weights()
        if self.inner is opt:                          # linear in s: P_s - W = s (P_1 - W)
            res = opt.predict(1, out)                  # W - lr dW
            # res <- W + a s (res - W) = lerp(res, W, 1 - a s)
            torch._foreach_lerp_(res, weights, [1.0 - s * a.to(r.dtype) for a, r in zip(self.last_scales, res)])
            return res
        res = self.inner.predict(s, out)               # P_s
        # res <- W + a (P_s - W) = lerp(res, W, 1 - a)
        torch._foreach_lerp_(res, weights, [1.0 - a.to(r.dtype) for a, r in zip(self.last_scales, res)])
        return res

    # ----------------------------------------------------------------- checkpoints
    def state_dict(self) -> Dict[str, Any]:
        """The fit (EMA statistics) and options; the optimizer is saved separately."""
        state = {"num": [n.clone() for n in self._num], "den": [d.clone() for d in self._den],
                 "num_observations": self.num_observations}
        if self.inner is not self.optimizer:
            state["inner"] = self.inner.state_dict()
        return state

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self._num = [n.clone().to(m.device) for n, m in zip(state["num"], self._num)]
        self._den = [d.clone().to(m.device) for d, m in zip(state["den"], self._den)]
        self.num_observations = int(state["num_observations"])
        inner = state.get("inner", state.get("rollout"))  # "rollout": saved by 0.1.0
        if self.inner is not self.optimizer and inner is not None:
            self.inner.load_state_dict(inner)
