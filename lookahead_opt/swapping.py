"""Shared swap-in/swap-out machinery for predictors built on a :class:`PredictiveOptimizer`
(:class:`~lookahead_opt.calibrated.CalibratedPredictor`,
:class:`~lookahead_opt.rollout.RolloutPredictor`): a subclass defines :meth:`predict`."""
from __future__ import annotations

import contextlib
from typing import Iterator, List, Optional, Sequence

from torch import Tensor

from .optimizer import PredictiveOptimizer
from .redirect import Swapped

__all__ = ["SwappingPredictor"]


class SwappingPredictor:
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

    def swap_in(self, s: int) -> None:
        """Point the parameters at :meth:`predict` ``(s)``; saved weights resolve to the live
        ones at backward (as :meth:`PredictiveOptimizer.swap_in`)."""
        opt = self.optimizer
        if self._swapped is not None or opt._swapped is not None:
            raise RuntimeError("swap_in() twice: the predicted weights are already swapped in; call swap_out() first")
        self._swapped = Swapped(opt.params, self.predict(s))

    def swap_out(self) -> None:
        """Undo :meth:`swap_in`."""
        if self._swapped is None:
            raise RuntimeError("swap_out() without swap_in(): the parameters already hold the live weights")
        swapped, self._swapped = self._swapped, None
        swapped.undo()

    @contextlib.contextmanager
    def predicted(self, s: int) -> Iterator[List[Tensor]]:
        """``with pred.predicted(s):`` the block runs on the prediction."""
        self.swap_in(s)
        try:
            yield [p.data for p in self._swapped.params]  # type: ignore[union-attr]
        finally:
            self.swap_out()
