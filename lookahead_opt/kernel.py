"""The multi-tensor prediction kernel: evaluates :math:`\\hat W = W - m\\,dW` for many
parameters at once, ``dW`` given as :class:`~lookahead_opt.rules.base.Direction`.

Parameters whose directions have the same shape and coefficients (normally all parameters of
one param group) and the same device and dtypes are evaluated together by a short chain of
``torch._foreach_*`` ops writing into the caller's output buffers:

.. code-block:: text

    tmp = sqrt(D + inner) + eps/scale          (only with a denominator; scratch buffer)
    out = W * (1 - m*decay)                     (a copy when there is no decay)
    out += (-m*c_k/scale) * N_k / tmp           (addcdiv, or add without a denominator)

On CUDA (and any non-CPU device) the chain is ``torch._foreach_*`` ops over whole tensors:
one launch per op for many tensors. On CPU a foreach op is only a C++ loop over tensors, each
op a full pass over memory, so a chain moves every temporary through DRAM (measured: Adam at
about a third of copy bandwidth); there each parameter is instead done by single-pass ``out=``
ops (``torch.sqrt(out=)``, ``torch.addcdiv(out=)``, ``torch.add(out=)``) with one temporary
reused across parameters, which reads ``W``, ``N_k``, ``D`` once and writes ``out`` once.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .rules.base import Direction

__all__ = ["predict_into", "FOREACH"]

#: Default of :func:`predict_into`'s ``foreach``: ``None`` picks by device.
FOREACH: Optional[bool] = None

_Item = Tuple[Tensor, ...]  # (out, W, N_1..N_k[, D])


def _key(w: Tensor, d: Optional[Direction], mult: float) -> Tuple[Hashable, _Item]:
    if d is None or mult == 0.0:
        return ("copy", w.device, w.dtype), ()
    tensors = tuple(n for _, n in d.terms) + ((d.den,) if d.den is not None else ())
    div = d.scale if d.den is not None else 1.0
    alphas = tuple(-mult * c / div for c, _ in d.terms)
    den = None if d.den is None else (d.root, d.inner, d.eps / d.scale)
    key = (w.device, w.dtype, tuple(t.dtype for t in tensors), alphas, den, 1.0 - mult * d.decay)
    return key, tensors


class _Scratch:
    """Reusable flat temporaries, one per (device, dtype)."""

    def __init__(self) -> None:
        self.bufs: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}

    def views(self, like: Sequence[Tensor]) -> List[Tensor]:
        total = sum(t.numel() for t in like)
        key = (like[0].device, like[0].dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < total:
            buf = self.bufs[key] = torch.empty(total, device=key[0], dtype=key[1])
        out, at = [], 0
        for t in like:
            out.append(buf[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return out


def _chain(items: Sequence[_Item], key: Tuple, scratch: _Scratch) -> None:
    """Multi-tensor (foreach) evaluation of one bucket."""
    outs = [it[0] for it in items]
    ws = [it[1] for it in items]
    if key[0] == "copy":
        torch._foreach_copy_(outs, ws)
        return
    _, _, _, alphas, den, wscale = key
    tmp = None
    if den is not None:
        root, inner, eps = den
        tmp = scratch.views([it[-1] for it in items])
        torch._foreach_copy_(tmp, [it[-1] for it in items])
        if inner:
            torch._foreach_add_(tmp, inner)
        if root:
            torch._foreach_sqrt_(tmp)
        if eps:
            torch._foreach_add_(tmp, eps)
    torch._foreach_copy_(outs, ws)
    if wscale != 1.0:
        torch._foreach_mul_(outs, wscale)
    for k, alpha in enumerate(alphas):
        nums = [it[2 + k] for it in items]
        if tmp is None:
            torch._foreach_add_(outs, nums, alpha=alpha)
        else:
            torch._foreach_addcdiv_(outs, nums, tmp, value=alpha)


def _loop(items: Sequence[_Item], key: Tuple, scratch: _Scratch) -> None:
    """Per-tensor single-pass evaluation of one bucket (CPU): the same math as :func:`_chain`."""
    if key[0] == "copy":
        torch._foreach_copy_([it[0] for it in items], [it[1] for it in items])
        return
    _, _, _, alphas, den, wscale = key
    for out, w, *rest in items:
        tmp = None
        if den is not None:
            root, inner, eps = den
            (tmp,) = scratch.views([rest[-1]])
            d = torch.add(rest[-1], inner, out=tmp) if inner else rest[-1]
            if root:
                torch.sqrt(d, out=tmp)
            elif d is not tmp:
                tmp.copy_(d)
            if eps:
                tmp.add_(eps)
        src = w
        if wscale != 1.0:
            src = torch.mul(w, wscale, out=out)
        for k, alpha in enumerate(alphas):
            if tmp is None:
                torch.add(src, rest[k], alpha=alpha, out=out)
            else:
                torch.addcdiv(src, rest[k], tmp, value=alpha, out=out)
            src = out
        if src is w:
            out.copy_(w)


def predict_into(
    outs: Sequence[Tensor],
    weights: Sequence[Tensor],
    directions: Sequence[Optional[Direction]],
    mults: Sequence[float],
    scratch: Optional[_Scratch] = None,
    *,
    foreach: Optional[bool] = None,
) -> None:
    """``outs[i] = weights[i] - mults[i] * directions[i]`` (a copy where the direction is
    ``None`` or the multiplier 0), by multi-tensor ops grouped by device, dtype and coefficients.

    ``foreach`` forces the multi-tensor chain (``True``) or the per-tensor loop (``False``);
    by default (:data:`FOREACH`, ``None``) CUDA and other accelerators use the chain, CPU the loop.
    """
    scratch = scratch if scratch is not None else _Scratch()
    buckets: Dict[Hashable, List[_Item]] = {}
    for out, w, d, m in zip(outs, weights, directions, mults):
        key, tensors = _key(w, d, m)
        buckets.setdefault(key, []).append((out, w) + tensors)
    for key, items in buckets.items():
        choice = FOREACH if foreach is None else foreach
        use_chain = items[0][1].device.type != "cpu" if choice is None else choice
        (_chain if use_chain else _loop)(items, key, scratch)
