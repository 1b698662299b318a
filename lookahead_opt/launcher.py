"""A bucket's fused evaluation, kept between runs of a :class:`~lookahead_opt.kernel.Plan`.

Both fused kernels (:mod:`lookahead_opt.triton_kernel` on CUDA, :mod:`lookahead_opt.native_kernel`
on CPU) evaluate a whole bucket from a table of its operands' addresses. A :class:`Launcher`
keeps, per bucket, the kernel's verdict on the bucket's form and that table, and per call only
reads the weights' addresses (parameters whose data are swapped move; the plan's outputs and
the optimizer's state tensors do not).

A backend is a module with ``supports(key, items) -> bool``, ``table(items, key)`` (built when
the weights' addresses change), ``launch(table, key, dtype)`` and ``mode()`` (a hashable that
changes when the same bucket may get another verdict, e.g. Triton's interpreter switched on).
"""
from __future__ import annotations

from types import ModuleType
from typing import Dict, List, Sequence, Tuple

from torch import Tensor

__all__ = ["Launcher"]


class Launcher:
    """Calling it evaluates the bucket ``items`` (``kernel._key``'s ``key``) with ``backend``
    and returns ``True``, or returns ``False`` if the backend does not take the bucket."""

    __slots__ = ("backend", "verdicts", "wptrs", "table")

    def __init__(self, backend: ModuleType) -> None:
        self.backend = backend
        self.verdicts: Dict[Tuple, bool] = {}
        self.wptrs: List[int] = []
        self.table: object = None

    def __call__(self, items: Sequence[Tuple[Tensor, ...]], key: Tuple) -> bool:
        den = key[5]
        form = (key[2], len(key[3]), len(key[4]), None if den is None else (len(den), den[0]), self.backend.mode())
        ok = self.verdicts.get(form)
        if ok is None:
            ok = self.verdicts[form] = self.backend.supports(key, items)
        if not ok:
            return False
        wptrs = [it[1].data_ptr() for it in items]
        if wptrs != self.wptrs:  # a weight's storage moved: check its layout again
            if not self.backend.supports(key, items):
                self.verdicts[form] = False
                return False
            self.table = self.backend.table(items, key)
            self.wptrs = wptrs
        self.backend.launch(self.table, key, items[0][1].dtype)
        return True
