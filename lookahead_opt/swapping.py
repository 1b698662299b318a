"""Shared swap-in/swap-out machinery for predictors built on a :class:`PredictiveOptimizer`
(:class:`~lookahead_opt.calibrated.CalibratedPredictor`,
:class:`~lookahead_opt.rollout.RolloutPredictor`): a subclass defines :meth:`predict`."""
from __future__ import annotations

from typing import List, Optional, Sequence

from torch import Tensor

from .optimizer import PredictiveOptimizer
from .redirect import SwapMixin, Swapped

__all__ = ["SwappingPredictor"]


class SwappingPredictor(SwapMixin):
    """Base of the predictors that wrap a :class:`PredictiveOptimizer`; subclasses implement
    ``predict(s, out=None)`` with the same contract as :meth:`PredictiveOptimizer.predict`."""

    def __init__(self, optimizer: PredictiveOptimizer) -> None:
        if not isinstance(optimizer, PredictiveOptimizer):
            raise TypeError(f"{type(self).__name__} wraps a lookahead_opt.PredictiveOptimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._swapped: Optional[Swapped] = None

    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def _swap_params(self) -> List[Tensor]:
        return self.optimizer.params

    def _swap_busy(self) -> bool:
        return self._swapped is not None or self.optimizer._swapped is not None
