"""What a weight predictor is (:class:`WeightPredictor`, :class:`ObservingPredictor`) and the
shared swap-in/swap-out machinery of the predictors built on a :class:`PredictiveOptimizer`
(:class:`~lookahead_opt.calibrated.CalibratedPredictor`,
:class:`~lookahead_opt.rollout.RolloutPredictor`): a subclass defines :meth:`predict`."""
from __future__ import annotations

from typing import Any, ClassVar, Dict, List, Optional, Protocol, Sequence

from torch import Tensor

from .optimizer import PredictiveOptimizer
from .redirect import SwapMixin, Swapped

__all__ = ["WeightPredictor", "ObservingPredictor", "SwappingPredictor"]


class WeightPredictor(Protocol):
    """What a predictor does (:class:`PredictiveOptimizer` and every :class:`SwappingPredictor`)."""

    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """:math:`\\hat W_{t+s}`, one tensor per parameter, written into ``out`` or a reusable
        buffer; the parameters untouched."""

    def swap_in(self, s: int) -> None:
        """The parameters hold :meth:`predict` ``(s)`` until :meth:`swap_out`."""

    def swap_out(self) -> None:
        """The parameters hold the live weights again."""

    def state_dict(self) -> Dict[str, Any]:
        """The predictor's state (for a checkpoint)."""

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


class ObservingPredictor(WeightPredictor, Protocol):
    """A predictor that learns from the outcomes of its predictions: the caller keeps
    :attr:`last_scales` after a :meth:`predict` and, once the weights that prediction aimed at
    are known, hands both back to :meth:`observe`."""

    #: what the last :meth:`predict` used (handed back to :meth:`observe`)
    last_scales: List[Tensor]

    def observe(self, start: Sequence[Tensor], predicted: Sequence[Tensor], actual: Sequence[Tensor],
                scales: Sequence[Tensor]) -> None:
        """Fit on one prediction: made from ``start`` with ``scales``, it gave ``predicted``;
        the weights it aimed at turned out to be ``actual``."""


class SwappingPredictor(SwapMixin):
    """Base of the predictors that wrap a :class:`PredictiveOptimizer`; subclasses implement
    ``predict(s, out=None)`` with the same contract as :meth:`PredictiveOptimizer.predict`
    and, if they have state of their own, ``state_dict``/``load_state_dict``."""

    #: a short name (what a calibrated predictor calls the displacement it scales)
    name: ClassVar[str] = "swapping"

    def __init__(self, optimizer: PredictiveOptimizer) -> None:
        if not isinstance(optimizer, PredictiveOptimizer):
            raise TypeError(f"{type(self).__name__} wraps a lookahead_opt.PredictiveOptimizer, "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        self._swapped: Optional[Swapped] = None

    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:  # pragma: no cover
        raise NotImplementedError

    def state_dict(self) -> Dict[str, Any]:
        """No state of its own (the optimizer's is saved with the optimizer)."""
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Nothing to restore (see :meth:`state_dict`)."""

    def _swap_params(self) -> List[Tensor]:
        return self.optimizer.params

    def _swap_busy(self) -> bool:
        return self._swapped is not None or self.optimizer._swapped is not None
