"""Redirect the weights autograd saves, so a backward can use another weight version.

A forward records, for its backward, the tensors each op needs: activations, and
parameters or views of them (``nn.Linear`` saves ``weight.t()``). If the optimizer
steps between that forward and its backward, the saved parameter has been changed in
place and autograd raises "modified by an inplace operation". Asynchronous pipelines
do exactly that, and each method wants a *different* weight version in the backward
(the live weights, the forward's own version, a fresh prediction...).

:class:`redirect` is a :func:`torch.autograd.graph.saved_tensors_hooks` context: while
it is active, a saved tensor that lives in the storage of one of the given parameters is
not kept; a reference ``(index, size, stride, offset)`` is kept instead. At backward
time the reference is resolved by ``resolve(index)``, a tensor laid out like the
parameter, and viewed the same way. Every other saved tensor is kept as usual.

The parameters are matched by storage at the time the context is entered, so it also
works while the parameters' ``.data`` has been pointed at predicted weights
(:meth:`PredictiveOptimizer.swap_in`).

Casts of a parameter are followed too. Under :class:`torch.autocast` an op does not see the
parameter but a cast of it (``weight.to(bfloat16)``, a new tensor outside the parameter's
storage), and that cast (or a view of it) is what autograd saves. A saved tensor whose storage
belongs to a cast made by ``aten::_to_copy`` directly from one of the parameters (its dtype is
none of the parameters', its ``grad_fn`` is ``ToCopyBackward0`` and the next node accumulates
into the parameter) is redirected as well: at backward it is ``resolve(index)`` cast the same
way (``.to(dtype, device)``, which is autocast's cast), viewed as the saved tensor was. So the
backward of a forward under autocast sees the cast of the weights it is to use, not the cast
of the forward's. (A parameter with ``requires_grad=False`` has no such node: its copies are
kept as saved, which is right for weights that never change.)
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Set, Tuple

import torch
from torch import Tensor

__all__ = ["redirect", "live", "Swapped", "SwapMixin", "current_live"]


def live(params: Sequence[Tensor]) -> Callable[[int], Tensor]:
    """Resolver that returns parameter ``i``'s weights current at backward time."""
    return lambda i: params[i].detach()


class redirect(torch.autograd.graph.saved_tensors_hooks):
    """Saved-tensor hooks that replace saved parameters by ``resolve(i)`` at backward.

    Args:
        params: the parameters whose saved copies (or views) are redirected.
        resolve: ``resolve(i) -> Tensor`` gives the weights parameter ``i`` is to have in
            the backward; called once per saved use, at backward time. The tensor must
            have the parameter's shape and strides. Defaults to :func:`live` (the
            weights current when the backward runs).
    """

    def __init__(self, params: Sequence[Tensor], resolve: Optional[Callable[[int], Tensor]] = None) -> None:
        params = list(params)
        self.resolve = resolve if resolve is not None else live(params)
        # storage pointer -> (index, storage offset of the parameter itself)
        self._by_storage: Dict[int, Tuple[int, int]] = {}
        # id(parameter) -> index, and the parameters' dtypes, for the casts of a parameter
        by_id: Dict[int, int] = {}
        dtypes: Set[torch.dtype] = set()
        for i, p in enumerate(params):
            key = p.untyped_storage().data_ptr()
            if key and key not in self._by_storage:
                self._by_storage[key] = (i, int(p.storage_offset()))
            by_id.setdefault(id(p), i)
            dtypes.add(p.dtype)
        # the hooks hold what they use, not this object: a bound method kept in its own
        # attributes would make a reference cycle per forward, freed only by the cyclic GC
        super().__init__(functools.partial(_pack, self._by_storage, by_id, dtypes, self.resolve), _unpack)


def _pack(by_storage: Dict[int, Tuple[int, int]], by_id: Dict[int, int], dtypes: Set[torch.dtype],
          resolve: Callable[[int], Tensor], t: Tensor) -> Any:
    """What autograd saves for ``t``: a :class:`_Ref` if it lives in a redirected parameter's
    storage or in a cast of one (:func:`_cast_of`)."""
    if t.layout is torch.strided and t.device.type != "meta":
        hit = by_storage.get(t.untyped_storage().data_ptr())
        if hit is not None:
            i, base_offset = hit
            return _Ref(i, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()) - base_offset, resolve)
        if t.dtype not in dtypes and t.requires_grad:
            return _cast_of(by_id, resolve, t)
    return t


@functools.lru_cache(maxsize=None)
def _to_copy_node() -> type:
    """The class of autograd's node for ``aten::_to_copy`` (``ToCopyBackward0``)."""
    with torch.enable_grad():  # (a pack hook may run where grad mode is off)
        return type(torch.zeros(1, requires_grad=True).to(torch.float16).grad_fn)


def _cast_of(by_id: Dict[int, int], resolve: Callable[[int], Tensor], t: Tensor) -> Any:
    """A :class:`_Ref` to a cast of parameter ``i`` if ``t`` is (a view of) ``params[i].to(...)``
    (autocast's cast: ``aten::_to_copy`` of the parameter itself), else ``t``."""
    base = t._base
    if base is None:
        base = t
    fn = base.grad_fn
    if fn is None or type(fn) is not _to_copy_node():
        return t
    i = by_id.get(id(getattr(fn.next_functions[0][0], "variable", None)))
    if i is None:
        return t
    return _Ref(i, tuple(t.shape), tuple(t.stride()), int(t.storage_offset()) - int(base.storage_offset()), resolve,
                (base.dtype, base.device))


def _unpack(packed: Any) -> Tensor:
    """The saved tensor back, a :class:`_Ref` resolved at the backward."""
    if isinstance(packed, _Ref):
        return packed.get()
    return packed


class _Ref:
    """A saved parameter (or view of one, or of a cast of one: ``copy`` is the cast's dtype and
    device), resolved to concrete weights at backward."""

    __slots__ = ("index", "size", "stride", "offset", "resolve", "copy")

    def __init__(self, index: int, size: tuple, stride: tuple, offset: int, resolve: Callable[[int], Tensor],
                 copy: Optional[Tuple[torch.dtype, torch.device]] = None):
        self.index, self.size, self.stride, self.offset, self.resolve = index, size, stride, offset, resolve
        self.copy = copy

    def get(self) -> Tensor:
        w = self.resolve(self.index)
        if self.copy is not None:  # cast as the forward cast (preserving the layout)
            w = w.to(dtype=self.copy[0], device=self.copy[1])
        if self.offset == 0 and tuple(w.shape) == self.size and tuple(w.stride()) == self.stride:
            return w
        return w.as_strided(self.size, self.stride, w.storage_offset() + self.offset)


#: id(parameter) -> its live tensor, for every parameter swapped right now
_KEPT_ASIDE: Dict[int, Tensor] = {}


def current_live(p: Tensor) -> Tensor:
    """``p``'s live weights now: kept aside while ``p`` is swapped, else its own data."""
    return _KEPT_ASIDE.get(id(p), p).detach()


class Swapped:
    """Parameters pointed at other weights, by pointer (no copy), until :meth:`undo`.

    ``params[i].data`` holds ``weights[i]``; the live tensors are kept aside in :attr:`live`.
    While swapped, a forward's saved parameters are :class:`redirect`\\ ed to the live
    weights current at backward time (:func:`current_live`: kept aside while the parameter
    is swapped, its own data otherwise), so an optimizer step in between is seen.
    """

    def __init__(self, params: Sequence[Tensor], weights: Sequence[Tensor]) -> None:
        self.params = list(params)
        self.weights = list(weights)
        self.live: List[Tensor] = [p.data for p in self.params]
        for p, w, x in zip(self.params, weights, self.live):
            p.data = w
            _KEPT_ASIDE[id(p)] = x
        params_ = self.params
        self._ctx = redirect(params_, lambda i: current_live(params_[i]))  # matches the swapped-in storages
        self._ctx.__enter__()

    def undo(self) -> None:
        """Point the parameters back at the live weights."""
        for p, w in zip(self.params, self.live):
            p.data = w
            _KEPT_ASIDE.pop(id(p), None)
        self._ctx.__exit__(None, None, None)


class SwapMixin:
    """``swap_in``/``swap_out``/``predicted`` for an object with ``predict(s)`` (returning the
    predicted weights) and the parameters it swaps (:meth:`_swap_params`): one
    :class:`Swapped` at a time, kept in ``self._swapped``."""

    _swapped: Optional[Swapped]

    def _swap_params(self) -> List[Tensor]:  # pragma: no cover - provided by the class
        raise NotImplementedError

    def _swap_busy(self) -> bool:
        """Whether predicted weights are swapped in already (here, or where else it matters)."""
        return self._swapped is not None

    def swap_in(self, s: int) -> None:
        """Point every parameter's ``.data`` at :meth:`predict` ``(s)``; the live weights are
        kept aside (no copy) and saved weights resolve to them at backward."""
        if self._swap_busy():
            raise RuntimeError("swap_in() twice: the predicted weights are already swapped in; call swap_out() first")
        self._swapped = Swapped(self._swap_params(), self.predict(s))  # type: ignore[attr-defined]

    def swap_out(self) -> None:
        """Point the parameters back at the live weights (undoes :meth:`swap_in`)."""
        if self._swapped is None:
            raise RuntimeError("swap_out() without swap_in(): the parameters already hold the live weights")
        swapped, self._swapped = self._swapped, None
        swapped.undo()

    @contextlib.contextmanager
    def predicted(self, s: int) -> Iterator[List[Tensor]]:
        """``with obj.predicted(s):`` runs the block with the predicted weights swapped in,
        swapping out even if it raises. Yields the predicted weights."""
        self.swap_in(s)
        try:
            yield self._swapped.weights  # type: ignore[union-attr]
        finally:
            self.swap_out()
