"""The multi-tensor prediction kernel: evaluates :math:`\\hat W = W - m\\,dW` for many
parameters at once, ``dW`` given as :class:`~lookahead_opt.rules.base.Direction`.

Parameters whose directions have the same shape and coefficients (normally all parameters of
one param group) and the same device and dtypes are evaluated together by a short chain of
``torch._foreach_*`` ops writing into the caller's output buffers:

.. code-block:: text

    tmp = sqrt(D + inner) + eps/scale          (only with a denominator; scratch buffer)
    out = W * (1 - m*decay)                     (a copy when there is no decay)
    out += (-m*c_k/scale) * N_k / tmp           (addcdiv, or add without a denominator)

On CUDA the foreach ops run over whole tensors (one launch per op for many tensors). On CPU a
foreach op is a loop over tensors, each op one full pass over memory, so the chain would move
every temporary through DRAM; there the tensors are cut into chunks and the chain runs over
batches of chunk views small enough to stay in cache, so that memory traffic is close to the
ideal: read ``W``, ``N_k``, ``D`` once, write ``out`` once.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .rules.base import Direction

__all__ = ["predict_into", "CPU_CHUNK", "CPU_BATCH"]

#: CPU chunk length (elements) a tensor is cut into.
CPU_CHUNK = 1 << 16
#: CPU elements per foreach chain (all chunks of a batch together stay in cache).
CPU_BATCH = 1 << 18

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


def _chunks(item: _Item, chunk: int) -> List[_Item]:
    if chunk <= 0 or item[0].numel() <= chunk or not all(t.is_contiguous() for t in item):
        return [item]
    flat = [t.view(-1) for t in item]
    return [tuple(f[i:i + chunk] for f in flat) for i in range(0, flat[0].numel(), chunk)]


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


def predict_into(
    outs: Sequence[Tensor],
    weights: Sequence[Tensor],
    directions: Sequence[Optional[Direction]],
    mults: Sequence[float],
    scratch: Optional[_Scratch] = None,
    *,
    chunk: Optional[int] = None,
    batch: Optional[int] = None,
) -> None:
    """``outs[i] = weights[i] - mults[i] * directions[i]`` (a copy where the direction is
    ``None`` or the multiplier 0), by multi-tensor ops grouped by device, dtype and coefficients.

    ``chunk``/``batch`` override the CPU chunking (:data:`CPU_CHUNK`, :data:`CPU_BATCH`;
    ``chunk=0``: whole tensors, ``batch=0``: one chain over all); CUDA tensors are never
    chunked.
    """
    scratch = scratch if scratch is not None else _Scratch()
    buckets: Dict[Hashable, List[_Item]] = {}
    for out, w, d, m in zip(outs, weights, directions, mults):
        key, tensors = _key(w, d, m)
        buckets.setdefault(key, []).append((out, w) + tensors)
    for key, items in buckets.items():
        dev = items[0][1].device
        if dev.type != "cpu":
            _chain(items, key, scratch)
            continue
        c = CPU_CHUNK if chunk is None else chunk
        b = CPU_BATCH if batch is None else batch
        pending: List[_Item] = []
        size = 0
        for item in items:
            for piece in _chunks(item, c):
                pending.append(piece)
                size += piece[0].numel()
                if 0 < b <= size:
                    _chain(pending, key, scratch)
                    pending, size = [], 0
        if pending:
            _chain(pending, key, scratch)
