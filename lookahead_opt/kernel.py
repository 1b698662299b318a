"""The multi-tensor prediction kernel: evaluates :math:`\\hat W = W - m\\,dW` for many
parameters at once, ``dW`` given as :class:`~lookahead_opt.rules.base.Direction`.

Parameters whose directions have the same shape and coefficients (normally all parameters of
one param group) and the same device and dtypes are evaluated together:

.. code-block:: text

    tmp = (D + inner)^p + eps/scale            (only with a denominator; scratch buffer)
          [rate form: tmp = min(clamp(1/(scale*(D + inner)^p + eps), lo, hi), cap)]
    out = W * (1 - m*decay)                     (a copy when there is no decay)
    out += (-m*a_j) * P_j                       (plain terms)
    out += (-m*c_k/scale) * N_k / tmp           (addcdiv; addcmul in rate form; add without D)
    out += -m*offset                            (only with an offset)

On CUDA (and any non-CPU device) the chain is ``torch._foreach_*`` ops over whole tensors:
one launch per op for many tensors. On CPU a foreach op is only a C++ loop over tensors, each
op a full pass over memory, so a chain moves every temporary through DRAM (measured: Adam at
about a third of copy bandwidth); there each parameter is instead done by single-pass ``out=``
ops (``torch.sqrt(out=)``, ``torch.addcdiv(out=)``, ``torch.add(out=)``) on chunks of
:data:`CHUNK` elements of contiguous tensors, with one chunk-sized temporary reused, which
reads ``W``, ``N_k``, ``D`` once and writes ``out`` once while the temporary stays in cache.
"""
from __future__ import annotations

from typing import Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import triton_kernel
from .rules.base import Direction

__all__ = ["predict_into", "FOREACH", "CHUNK", "COMPILE", "FUSED"]

#: Default of :func:`predict_into`'s ``foreach``: ``None`` picks by device.
FOREACH: Optional[bool] = None

#: Elements per chunk of the CPU per-tensor path (``0``: whole tensors). Measured (1 thread,
#: 50M float32 in 200 tensors): L2-sized chunks (4K-64K elements) are 1.4-7x *slower* than whole
#: tensors, as each chunk pays the dispatch of 3-4 ops; chunks only bound the temporary
#: (4 MiB in float32, within L3) for very large tensors.
CHUNK: int = 1 << 20

#: Opt-in: evaluate each parameter by one ``torch.compile``d fused kernel instead of the
#: per-tensor ``out=`` ops (where the loop would run). Never required and not used by the
#: tests' default paths: the first call compiles (tens of seconds, needs a C++ compiler on CPU).
#: Coefficients are passed as tensors, so new step sizes do not recompile.
COMPILE: bool = False

#: Where the chain would run, evaluate each bucket that the fused Triton kernel supports in
#: one launch and one pass instead (:mod:`lookahead_opt.triton_kernel`: on CUDA when Triton
#: imports, or under ``TRITON_INTERPRET=1``). ``False`` keeps the chain everywhere.
FUSED: bool = True

_Item = Tuple[Tensor, ...]  # (out, W, N_1..N_k, P_1..P_j[, D][, cap])


def _key(w: Tensor, d: Optional[Direction], mult: float) -> Tuple[Hashable, _Item]:
    if d is None or mult == 0.0:
        return ("copy", w.device, w.dtype), ()
    has_den = d.den is not None
    rate = d.rate
    tensors = tuple(n for _, n in d.terms) + tuple(n for _, n in d.plain) + ((d.den,) if has_den else ()) \
        + ((d.cap,) if rate and d.cap is not None else ())
    div = d.scale if has_den and not rate else 1.0
    alphas = tuple(-mult * c / div for c, _ in d.terms)
    plain = tuple(-mult * a for a, _ in d.plain)
    power = (d.power if d.root else 1.0) if has_den else None
    if not has_den:
        den = None
    elif rate:
        den = (power, d.inner, d.scale, d.eps, d.bounds, d.cap is not None)
    else:
        den = (power, d.inner, d.eps / d.scale)
    key = (w.device, w.dtype, tuple(t.dtype for t in tensors), alphas, plain, den, 1.0 - mult * d.decay,
           -mult * d.offset)
    return key, tensors


class _Scratch:
    """Reusable flat temporaries, one per (device, dtype)."""

    def __init__(self) -> None:
        self.bufs: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}

    def views(self, like: Sequence[Tensor], numel: Optional[int] = None) -> List[Tensor]:
        total = sum(t.numel() for t in like) if numel is None else numel
        key = (like[0].device, like[0].dtype)
        buf = self.bufs.get(key)
        if buf is None or buf.numel() < total:
            buf = self.bufs[key] = torch.empty(total, device=key[0], dtype=key[1])
        if numel is not None:
            return [buf]
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
    _, _, _, alphas, plain, den, wscale, shift = key
    k, j = len(alphas), len(plain)
    tmp = None
    if den is not None:
        power, inner = den[0], den[1]
        dens = [it[2 + k + j] for it in items]
        tmp = scratch.views(dens)
        torch._foreach_copy_(tmp, dens)
        if inner:
            torch._foreach_add_(tmp, inner)
        if power == 0.5:
            torch._foreach_sqrt_(tmp)
        elif power != 1.0:
            torch._foreach_pow_(tmp, power)
        if len(den) == 3:
            if den[2]:
                torch._foreach_add_(tmp, den[2])
        else:
            _, _, scale, eps, bounds, has_cap = den
            if scale != 1.0:
                torch._foreach_mul_(tmp, scale)
            if eps:
                torch._foreach_add_(tmp, eps)
            torch._foreach_reciprocal_(tmp)
            if bounds is not None:
                torch._foreach_clamp_min_(tmp, bounds[0])
                torch._foreach_clamp_max_(tmp, bounds[1])
            if has_cap:
                torch._foreach_minimum_(tmp, [it[3 + k + j] for it in items])
    torch._foreach_copy_(outs, ws)
    if wscale != 1.0:
        torch._foreach_mul_(outs, wscale)
    for i, a in enumerate(plain):
        torch._foreach_add_(outs, [it[2 + k + i] for it in items], alpha=a)
    rate = den is not None and len(den) != 3
    for i, alpha in enumerate(alphas):
        nums = [it[2 + i] for it in items]
        if tmp is None:
            torch._foreach_add_(outs, nums, alpha=alpha)
        elif rate:
            torch._foreach_addcmul_(outs, nums, tmp, value=alpha)
        else:
            torch._foreach_addcdiv_(outs, nums, tmp, value=alpha)
    if shift:
        torch._foreach_add_(outs, shift)


def _one(out: Tensor, w: Tensor, rest: Sequence[Tensor], key: Tuple, tmp: Optional[Tensor]) -> None:
    """``out = W - m dW`` for one tensor (or one chunk) by single-pass ``out=`` ops; ``tmp`` is
    a scratch tensor shaped like ``out`` (needed only with a denominator)."""
    _, _, _, alphas, plain, den, wscale, shift = key
    k, j = len(alphas), len(plain)
    rate = False
    if den is not None:
        assert tmp is not None
        power, inner = den[0], den[1]
        d = rest[k + j]
        if inner:
            d = torch.add(d, inner, out=tmp)
        if power == 0.5:
            torch.sqrt(d, out=tmp)
        elif power != 1.0:
            torch.pow(d, power, out=tmp)
        elif d is not tmp:
            tmp.copy_(d)
        if len(den) == 3:
            if den[2]:
                tmp.add_(den[2])
        else:
            rate = True
            _, _, scale, eps, bounds, has_cap = den
            if scale != 1.0:
                tmp.mul_(scale)
            if eps:
                tmp.add_(eps)
            tmp.reciprocal_()
            if bounds is not None:
                tmp.clamp_(bounds[0], bounds[1])
            if has_cap:
                torch.minimum(tmp, rest[k + j + 1], out=tmp)
    src = w
    if wscale != 1.0:
        src = torch.mul(w, wscale, out=out)
    for i, a in enumerate(plain):
        src = torch.add(src, rest[k + i], alpha=a, out=out)
    for i, alpha in enumerate(alphas):
        if den is None:
            torch.add(src, rest[i], alpha=alpha, out=out)
        elif rate:
            torch.addcmul(src, rest[i], tmp, value=alpha, out=out)
        else:
            torch.addcdiv(src, rest[i], tmp, value=alpha, out=out)
        src = out
    if shift:
        torch.add(src, shift, out=out)
    elif src is w:
        out.copy_(w)


def _loop(items: Sequence[_Item], key: Tuple, scratch: _Scratch, chunk: int) -> None:
    """Per-tensor single-pass evaluation of one bucket (CPU), in chunks of ``chunk`` elements of
    contiguous tensors (whole tensors otherwise): the same math as :func:`_chain`."""
    if key[0] == "copy":
        torch._foreach_copy_([it[0] for it in items], [it[1] for it in items])
        return
    den = key[5]
    for out, w, *rest in items:
        n = out.numel()
        if chunk and n > chunk and all(t.is_contiguous() for t in (out, w, *rest)):
            flat = [t.view(-1) for t in (out, w, *rest)]
            tmp = scratch.views([w], numel=chunk)[0] if den is not None else None
            for a in range(0, n, chunk):
                b = min(n, a + chunk)
                _one(flat[0][a:b], flat[1][a:b], [t[a:b] for t in flat[2:]], key,
                     None if tmp is None else tmp[:b - a])
        else:
            tmp = scratch.views([w])[0] if den is not None else None
            _one(out, w, rest, key, tmp)


_FUSED = None


def _fused_impl(out: Tensor, w: Tensor, ns: List[Tensor], ps: List[Tensor], d: Optional[Tensor],
                cap: Optional[Tensor], c: Tensor, power: Optional[float], rate: bool, bounded: bool) -> None:
    # c = [wscale, shift, inner, eps, scale, lo, hi, alpha_1..alpha_k, plain_1..plain_j]
    k = len(ns)
    acc = w * c[0]
    for i, p in enumerate(ps):
        acc = acc + c[7 + k + i] * p
    num = ns[0] * c[7]
    for i in range(1, k):
        num = num + ns[i] * c[7 + i]
    if d is not None:
        r = d + c[2]
        r = r.sqrt() if power == 0.5 else (r if power == 1.0 else r.pow(power))
        if rate:
            r = 1.0 / (r * c[4] + c[3])
            if bounded:
                r = torch.clamp(r, c[5], c[6])
            if cap is not None:
                r = torch.minimum(r, cap)
            num = num * r
        else:
            num = num / (r + c[3])
    out.copy_(acc + num + c[1])


def _compiled(items: Sequence[_Item], key: Tuple) -> None:
    """One compiled fused kernel call per tensor (see :data:`COMPILE`)."""
    global _FUSED
    if key[0] == "copy" or key[5] is None or not key[3]:
        return _loop(items, key, _Scratch(), 0)  # no denominator: already one single-pass op
    if _FUSED is None:
        _FUSED = torch.compile(_fused_impl, dynamic=True)
    _, _, _, alphas, plain, den, wscale, shift = key
    k, j = len(alphas), len(plain)
    rate = len(den) != 3
    inner, eps, scale, bounds = (den[1], den[2], 1.0, None) if not rate else (den[1], den[3], den[2], den[4])
    lo, hi = bounds if bounds is not None else (0.0, 0.0)
    w0 = items[0][1]
    c = torch.tensor([wscale, shift, inner, eps, scale, lo, hi, *alphas, *plain], dtype=torch.float64,
                     device=w0.device)
    for out, w, *rest in items:
        cap = rest[k + j + 1] if rate and den[5] else None
        _FUSED(out, w, rest[:k], rest[k:k + j], rest[k + j], cap, c, den[0], rate, bounds is not None)


@torch.no_grad()
def predict_into(
    outs: Sequence[Tensor],
    weights: Sequence[Tensor],
    directions: Sequence[Optional[Direction]],
    mults: Sequence[float],
    scratch: Optional[_Scratch] = None,
    *,
    foreach: Optional[bool] = None,
    chunk: Optional[int] = None,
) -> None:
    """``outs[i] = weights[i] - mults[i] * directions[i]`` (a copy where the direction is
    ``None`` or the multiplier 0), by multi-tensor ops grouped by device, dtype and coefficients.

    ``foreach`` forces the multi-tensor chain (``True``) or the per-tensor loop (``False``);
    by default (:data:`FOREACH`, ``None``) CUDA and other accelerators use the chain, CPU the loop.
    ``chunk``: elements per chunk of the loop (default :data:`CHUNK`; ``0``: whole tensors).
    Runs without autograd (state tensors of some optimizers, e.g. Apollo's with weight decay,
    carry ``requires_grad``).
    """
    scratch = scratch if scratch is not None else _Scratch()
    chunk = CHUNK if chunk is None else chunk
    buckets: Dict[Hashable, List[_Item]] = {}
    for out, w, d, m in zip(outs, weights, directions, mults):
        key, tensors = _key(w, d, m)
        buckets.setdefault(key, []).append((out, w) + tensors)
    for key, items in buckets.items():
        choice = FOREACH if foreach is None else foreach
        use_chain = items[0][1].device.type != "cpu" if choice is None else choice
        if use_chain and FUSED and triton_kernel.supports(key, items):
            triton_kernel.predict_bucket(items, key)
        elif use_chain:
            _chain(items, key, scratch)
        elif COMPILE:
            _compiled(items, key)
        else:
            _loop(items, key, scratch, chunk)
