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
from typing import Collection, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

__all__ = ["Launcher", "fits"]


def fits(key: Tuple, items: Sequence[Tuple[Tensor, ...]], dtypes: Collection[torch.dtype],
         device_type: Optional[str] = None) -> bool:
    """Whether a bucket (``kernel._key``'s key, its items) has the form both fused kernels
    compute: not a copy; at most two ``N_k`` and two ``P_j``; no denominator, or
    ``(D + inner)^p + eps`` with ``p`` in {1/2, 1} (not the rate form); every operand contiguous
    and of one dtype among ``dtypes`` (and, given ``device_type``, on a device of that type)."""
    if key[0] == "copy":
        return False
    _, _, operand_dtypes, alphas, plain, den, _, _ = key
    if len(alphas) > 2 or len(plain) > 2 or (den is not None and (len(den) != 3 or den[0] not in (0.5, 1.0))):
        return False
    dtype = items[0][1].dtype
    if dtype not in dtypes or any(d != dtype for d in operand_dtypes):
        return False
    return all(t.is_contiguous() and t.dtype == dtype and (device_type is None or t.device.type == device_type)
               for it in items for t in it)


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
