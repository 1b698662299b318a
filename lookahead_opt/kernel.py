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
one launch per op for many tensors, or, where it applies, one fused Triton kernel per bucket
(:data:`FUSED`). On CPU a bucket goes to the compiled native kernel where it applies
(:data:`NATIVE`). Otherwise, on CPU, a foreach op would be only a C++ loop over tensors, each
op a full pass over memory, so a chain moves every temporary through DRAM (measured: Adam at
about a third of copy bandwidth); there each parameter is instead done by single-pass ``out=``
ops (``torch.sqrt(out=)``, ``torch.addcdiv(out=)``, ``torch.add(out=)``) on chunks of
:data:`CHUNK` elements of contiguous tensors, with one chunk-sized temporary reused, which
reads ``W``, ``N_k``, ``D`` once and writes ``out`` once while the temporary stays in cache.
Small tensors are packed instead (:data:`PACK`): per bucket a few ops over flat buffers.

:class:`Plan` does the bucketing once for operands that are evaluated again and again
(:class:`~lookahead_opt.PredictiveOptimizer` keeps one between calls); :func:`predict_into`
builds a plan and runs it once.
"""
from __future__ import annotations

import itertools
import operator
from typing import Any, Dict, Hashable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from . import native_kernel, triton_kernel
from .launcher import Launcher
from .rules.base import Direction

__all__ = ["predict_into", "Plan", "FOREACH", "CHUNK", "PACK", "PACK_GROUP", "NATIVE", "FUSED"]

#: Default of :func:`predict_into`'s ``foreach``: ``None`` picks by device.
FOREACH: Optional[bool] = None

#: Elements per chunk of the CPU per-tensor path (``0``: whole tensors). Measured (1 thread,
#: 50M float32 in 200 tensors): L2-sized chunks (4K-64K elements) are 1.4-7x *slower* than whole
#: tensors, as each chunk pays the dispatch of 3-4 ops; chunks only bound the temporary
#: (4 MiB in float32, within L3) for very large tensors.
CHUNK: int = 1 << 20

#: CPU per-tensor path: contiguous tensors of at most this many elements are not done one by
#: one (each op's dispatch, a few microseconds, costs more than its work) but gathered, per
#: bucket and operand, into flat buffers of at most :data:`PACK_GROUP` elements (one
#: ``torch.cat``), evaluated by one op chain and copied out: the same ops on the same values.
#: Only where a bucket has at least :data:`_PACK_MIN` of them: for fewer, the gathers cost
#: more dispatches than they save.
PACK: int = 4096

_PACK_MIN = 4

#: Elements per packed group (see :data:`PACK`): bounds the buffers a bucket keeps.
PACK_GROUP: int = 1 << 16

#: Where the per-tensor ``out=`` ops would run (CPU), evaluate each bucket that the native
#: kernel supports in one call and one pass instead (:mod:`lookahead_opt.native_kernel`: built
#: with the machine's C compiler at first use; same operations and rounding). ``False`` keeps
#: the per-tensor ops.
NATIVE: bool = True

#: Where the chain would run, evaluate each bucket that the fused Triton kernel supports in
#: one launch and one pass instead (:mod:`lookahead_opt.triton_kernel`: on CUDA when Triton
#: imports, or under ``TRITON_INTERPRET=1``). ``False`` keeps the chain everywhere.
FUSED: bool = True

_Item = Tuple[Tensor, ...]  # (out, W, N_1..N_k, P_1..P_j[, D][, cap])
_Cols = Sequence[List[Tensor]]  # per operand, its tensors over a bucket's items (lists: what foreach ops take)


def _key(w: Tensor, d: Optional[Direction], mult: float) -> Tuple[Tuple, _Item]:
    if d is None or mult == 0.0:
        return ("copy", w.device, w.dtype), ()
    has_den = d.den is not None
    rate = d.rate
    tensors: _Item = tuple(n for _, n in d.terms) + tuple(n for _, n in d.plain) \
        + ((d.den,) if d.den is not None else ()) + ((d.cap,) if rate and d.cap is not None else ())
    div = d.scale if has_den and not rate else 1.0
    alphas = tuple(-mult * c / div for c, _ in d.terms)
    plain = tuple(-mult * a for a, _ in d.plain)
    power = (d.power if d.root else 1.0) if has_den else None
    den: Optional[Tuple[Any, ...]]
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
    """Reusable flat temporaries, one per (device, dtype). :meth:`reserve` sizes a buffer before
    views are taken from it, so that views kept across calls (by a :class:`Plan`) share it."""

    def __init__(self) -> None:
        self.bufs: Dict[Tuple[torch.device, torch.dtype], Tensor] = {}

    def reserve(self, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
        buf = self.bufs.get((device, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.bufs[(device, dtype)] = torch.empty(numel, device=device, dtype=dtype)
        return buf

    def views(self, like: Sequence[Tensor], numel: Optional[int] = None) -> List[Tensor]:
        total = sum(t.numel() for t in like) if numel is None else numel
        buf = self.reserve(like[0].device, like[0].dtype, total)
        if numel is not None:
            return [buf]
        out, at = [], 0
        for t in like:
            out.append(buf[at:at + t.numel()].view(t.shape))
            at += t.numel()
        return out


def _chain(cols: _Cols, key: Tuple, tmp: Optional[List[Tensor]]) -> None:
    """Multi-tensor (foreach) evaluation of one bucket, given as its operand lists ``cols``
    (outs, W, N_1..N_k, P_1..P_j[, D][, cap]); ``tmp``: scratch tensors shaped like ``D``."""
    outs, ws = cols[0], cols[1]
    if key[0] == "copy":
        torch._foreach_copy_(outs, ws)
        return
    _, _, _, alphas, plain, den, wscale, shift = key
    k, j = len(alphas), len(plain)
    if den is not None:
        assert tmp is not None
        power, inner = den[0], den[1]
        torch._foreach_copy_(tmp, cols[2 + k + j])
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
                torch._foreach_minimum_(tmp, cols[3 + k + j])
    torch._foreach_copy_(outs, ws)
    if wscale != 1.0:
        torch._foreach_mul_(outs, wscale)
    for i, a in enumerate(plain):
        torch._foreach_add_(outs, cols[2 + k + i], alpha=a)
    rate = den is not None and len(den) != 3
    for i, alpha in enumerate(alphas):
        if tmp is None:
            torch._foreach_add_(outs, cols[2 + i], alpha=alpha)
        elif rate:
            torch._foreach_addcmul_(outs, cols[2 + i], tmp, value=alpha)
        else:
            torch._foreach_addcdiv_(outs, cols[2 + i], tmp, value=alpha)
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
        if tmp is None:  # no denominator (asserted above: a denominator comes with tmp)
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

def _one_chunked(out: Tensor, w: Tensor, rest: Sequence[Tensor], key: Tuple, scratch: _Scratch, chunk: int) -> None:
    """:func:`_one` over chunks of ``chunk`` elements of contiguous tensors (whole tensors
    otherwise), with one chunk-sized temporary."""
    n = out.numel()
    if chunk and n > chunk and all(t.is_contiguous() for t in (out, w, *rest)):
        flat = [t.view(-1) for t in (out, w, *rest)]
        tmp = scratch.views([w], numel=chunk)[0] if key[5] is not None else None
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            _one(flat[0][a:b], flat[1][a:b], [t[a:b] for t in flat[2:]], key, None if tmp is None else tmp[:b - a])
    else:
        _one(out, w, rest, key, scratch.views([w])[0] if key[5] is not None else None)


class _Packed:
    """Consecutive small contiguous items of a bucket, evaluated as one: each operand column is
    gathered (``torch.cat``, or one ``_foreach_copy_`` where the tensors are not 1-d) into a
    flat buffer, :func:`_one` runs once over the buffers and the result is copied out. The
    buffers are the bucket's (shared by its packed groups); the operands are read at each
    run, never through views kept from an earlier one."""

    __slots__ = ("lo", "hi", "ins", "gather", "out", "out_views", "tmp")

    def __init__(self, items: Sequence[_Item], lo: int, hi: int, bufs: Sequence[Tensor],
                 tmp: Optional[Tensor]) -> None:
        n = sum(it[1].numel() for it in items[lo:hi])
        self.lo, self.hi = lo, hi
        self.ins = [b[:n] for b in bufs[1:]]
        # per input column: None (torch.cat: all 1-d), else views of the buffer to copy into
        self.gather: List[Optional[List[Tensor]]] = []
        for c, flat in enumerate(self.ins, start=1):
            col = [it[c] for it in items[lo:hi]]
            self.gather.append(None if all(t.dim() == 1 for t in col) else _split(flat, col))
        self.out = bufs[0][:n]
        self.out_views = _split(self.out, [it[0] for it in items[lo:hi]])
        self.tmp = None if tmp is None else tmp[:n]

    def run(self, cols: _Cols, key: Tuple) -> None:
        lo, hi = self.lo, self.hi
        for c, (flat, views) in enumerate(zip(self.ins, self.gather), start=1):
            if views is None:
                torch.cat(cols[c][lo:hi], out=flat)
            else:
                torch._foreach_copy_(views, cols[c][lo:hi])
        _one(self.out, self.ins[0], self.ins[1:], key, self.tmp)
        torch._foreach_copy_(cols[0][lo:hi], self.out_views)


def _split(flat: Tensor, like: Sequence[Tensor]) -> List[Tensor]:
    """Views of ``flat``, one shaped like each of ``like``, back to back."""
    return [v if t.dim() == 1 else v.view(t.shape) for v, t in zip(flat.split([t.numel() for t in like]), like)]


def _packable(item: _Item) -> bool:
    out, w = item[0], item[1]
    return w.numel() <= PACK and out.dtype == w.dtype and all(
        t.is_contiguous() and t.device == w.device for t in item)


class _Bucket:
    """The items ``(out, W, N_1..N_k, P_1..P_j[, D][, cap])`` that share one key for every
    ``s`` (same device, dtypes, coefficients and rate), their operand lists, and what each
    evaluation path keeps between runs (built at its first use)."""

    __slots__ = ("source", "items", "idx", "cols", "proto", "keys", "tmp", "packed", "npacked", "fused", "native")
    source: Tuple[List[int], Tuple[int, bool], List[_Item]]
    items: List[_Item]
    idx: List[int]
    cols: List[List[Tensor]]
    proto: Optional[Tuple[Tensor, Direction, float]]
    keys: Dict[float, Tuple]
    tmp: Optional[List[Tensor]]
    packed: Optional[List["_Packed"]]
    npacked: int
    fused: Launcher
    native: Launcher

    def __init__(self, items: List[_Item], idx: List[int], proto: Optional[Tuple[Tensor, Direction, float]],
                 previous: Optional["_Bucket"] = None) -> None:
        self.proto = proto  # (W, direction, rate) of one item; None: a copy bucket
        self.keys = {}  # by s
        form = (len(items[0]), proto is None or proto[1].den is None)
        if previous is not None and previous.source[:2] == (idx, form) and len(previous.source[2]) == len(items) \
                and all(map(operator.is_, itertools.chain.from_iterable(items),
                            itertools.chain.from_iterable(previous.source[2]))):
            self.source = previous.source
            self.items, self.idx, self.cols = previous.items, previous.idx, previous.cols
            self.npacked, self.tmp, self.packed = previous.npacked, previous.tmp, previous.packed
            self.fused, self.native = previous.fused, previous.native
            return
        self.source = (idx, form, items)  # what a later plan's bucket must match to take this one over
        # the loop packs small tensors: put them first, in order (order within a bucket is free)
        small = [i for i, it in enumerate(items) if proto is not None and _packable(it)]
        if len(small) < _PACK_MIN:
            small = []
        packed = set(small)
        order = small + [i for i in range(len(items)) if i not in packed]
        self.items = [items[i] for i in order]
        self.idx = [idx[i] for i in order]
        self.cols = [list(c) for c in zip(*self.items)]
        self.npacked = len(small)
        self.tmp = None
        self.packed = None
        self.fused = Launcher(triton_kernel)
        self.native = Launcher(native_kernel)

    def key(self, s: float) -> Tuple:
        """The bucket's key (coefficients) for ``s`` steps ahead (not a copy bucket)."""
        key = self.keys.get(s)
        if key is None:
            assert self.proto is not None
            w, d, rate = self.proto
            if len(self.keys) >= 16:
                self.keys.clear()
            key = self.keys[s] = _key(w, d, s * rate)[0]
        return key

    def chain_tmp(self, key: Tuple, scratch: _Scratch) -> Optional[List[Tensor]]:
        if key[5] is None:
            return None
        if self.tmp is None:
            self.tmp = scratch.views(self.cols[2 + len(key[3]) + len(key[4])])
        return self.tmp

    def loop(self, cols: _Cols, key: Tuple, scratch: _Scratch, chunk: int) -> None:
        """Per-tensor single-pass evaluation (:func:`_one`): small tensors packed (:data:`PACK`),
        larger ones one by one, in chunks of ``chunk`` elements."""
        if self.packed is None:
            self.packed = self._pack(key)
        for p in self.packed:
            p.run(cols, key)
        for i in range(self.npacked, len(self.items)):
            _one_chunked(cols[0][i], cols[1][i], [c[i] for c in cols[2:]], key, scratch, chunk)

    def _pack(self, key: Tuple) -> List[_Packed]:
        items = self.items[:self.npacked]
        if not items:
            return []
        groups, lo, n = [], 0, 0
        for i, it in enumerate(items):
            if n and n + it[1].numel() > PACK_GROUP:
                groups.append((lo, i))
                lo, n = i, 0
            n += it[1].numel()
        groups.append((lo, len(items)))
        size = max(sum(it[1].numel() for it in items[a:b]) for a, b in groups)
        w = self.items[0][1]
        bufs = [torch.empty(size, device=w.device, dtype=t.dtype) for t in self.items[0][1:]]
        bufs.insert(0, torch.empty(size, device=w.device, dtype=w.dtype))
        tmp = torch.empty(size, device=w.device, dtype=w.dtype) if key[5] is not None else None
        return [_Packed(items, a, b, bufs, tmp) for a, b in groups]


def _group(w: Tensor, d: Optional[Direction], rate: float) -> Tuple[Hashable, _Item]:
    """What :func:`_key` depends on but ``s`` (items that share it share the key for every
    ``s``: same device, dtypes, rate and coefficients), and the item's operands."""
    if d is None or rate == 0.0:
        return ("copy", w.device, w.dtype), ()
    den, cap, terms, plain = d.den, d.cap, d.terms, d.plain
    if len(terms) == 1 and not plain:  # the common case, without the generic comprehensions
        ((c, n),) = terms
        tensors: Tuple[Tensor, ...] = (n,)
        coefficients: Tuple[float, ...] = (c,)
    else:
        tensors = tuple([n for _, n in terms] + [n for _, n in plain])
        coefficients = tuple([c for c, _ in terms])
    if den is not None:
        tensors += (den,) if cap is None or not d.rate else (den, cap)
        shape: Hashable = (d.root, d.power, d.inner, d.scale, d.eps, d.bounds, cap is None)
    else:
        shape = None
    return (w.device, w.dtype, tuple([t.dtype for t in tensors]), rate, coefficients,
            tuple([a for a, _ in plain]), shape, d.decay, d.offset), tensors


def _form(d: Direction) -> Hashable:
    """What a bucket's layout depends on in a direction besides its coefficients (the operand
    columns and the shape of the denominator)."""
    return len(d.terms), len(d.plain), d.den is None, d.rate, d.root, d.power, d.cap is None


def _grouped(outs: Sequence[Tensor], weights: Sequence[Tensor], directions: Sequence[Optional[Direction]],
             rates: Sequence[float]) -> Tuple[List[Hashable], List[_Item]]:
    """Per item, its :func:`_group` key and its operands ``(out, W, N_1.., P_1.., D, cap)``."""
    keys, items = [], []
    for out, w, d, r in zip(outs, weights, directions, rates):
        key, tensors = _group(w, d, r)
        keys.append(key)
        items.append((out, w) + tensors)
    return keys, items


class Plan:
    """:func:`predict_into` for fixed operands, prepared once and run many times:
    ``outs[i] = weights[i] - s * rates[i] * directions[i]`` for any ``s``.

    The operands are bucketed (by device, dtypes and coefficients, such that each bucket has
    one key for every ``s``) when the plan is built; the buckets keep their operand lists and,
    once used, their scratch views and packed layouts (:data:`PACK` as it was at the build,
    :data:`PACK_GROUP` at the first use). :meth:`run` reads the tensors' values (and
    :data:`FOREACH`, :data:`CHUNK`, :data:`NATIVE`, :data:`FUSED`) when it runs, so a plan
    stays valid while the *same* tensor objects (``weights`` may be parameters: ``.data``
    swaps are followed), directions and rates apply; whoever builds it decides when to
    rebuild (:class:`~lookahead_opt.PredictiveOptimizer`: see its docs).
    A rebuild may pass the ``previous`` plan: buckets with the same operands (the same tensor
    objects, as after an optimizer step, which changes only coefficients) take over its
    layouts and views instead of building them again.
    """

    scratch: _Scratch
    keys: List[Hashable]
    operands: List[_Item]
    buckets: List[_Bucket]

    def __init__(self, outs: Sequence[Tensor], weights: Sequence[Tensor], directions: Sequence[Optional[Direction]],
                 rates: Sequence[float], scratch: Optional[_Scratch] = None, previous: Optional["Plan"] = None) -> None:
        self._init(_grouped(outs, weights, directions, rates), directions, rates, scratch, previous)

    @classmethod
    def build(cls, outs: Sequence[Tensor], weights: Sequence[Tensor], directions: Sequence[Optional[Direction]],
              rates: Sequence[float], scratch: Optional[_Scratch] = None, previous: Optional["Plan"] = None) -> "Plan":
        """A plan for these operands: ``previous`` itself when nothing differs (the same tensor
        objects, coefficients and rates: an optimizer step that changed only the values of its
        state), else a new plan (see ``previous`` in the class docs)."""
        grouped = _grouped(outs, weights, directions, rates)
        if previous is not None and previous.keys == grouped[0] and len(previous.operands) == len(grouped[1]) \
                and all(map(operator.is_, itertools.chain.from_iterable(previous.operands),
                            itertools.chain.from_iterable(grouped[1]))):
            return previous
        plan = cls.__new__(cls)
        plan._init(grouped, directions, rates, scratch, previous)
        return plan

    def _init(self, grouped: Tuple[List[Hashable], List[_Item]], directions: Sequence[Optional[Direction]],
              rates: Sequence[float], scratch: Optional[_Scratch], previous: Optional["Plan"]) -> None:
        self.scratch = scratch if scratch is not None else _Scratch()
        self.keys, self.operands = grouped  # per item, what build() compares
        groups: Dict[Hashable, Tuple[List[_Item], List[int], Optional[Tuple[Tensor, Direction, float]]]] = {}
        for i, (key, item, d, r) in enumerate(zip(self.keys, self.operands, directions, rates)):
            group = groups.get(key)
            if group is None:
                group = groups[key] = ([], [], None if d is None or r == 0.0 else (item[1], d, r))
            group[0].append(item)
            group[1].append(i)
        olds: Sequence[Optional[_Bucket]] = [None] * len(groups)
        if previous is not None and len(previous.buckets) == len(groups):
            olds = previous.buckets
        self.buckets = [_Bucket(*g, old) for g, old in zip(groups.values(), olds)]
        for b in self.buckets:  # one scratch buffer per (device, dtype) for every bucket's views
            d = None if b.proto is None else b.proto[1]
            if d is not None and d.den is not None:
                den = b.cols[2 + len(d.terms) + len(d.plain)]
                self.scratch.reserve(den[0].device, den[0].dtype, sum(t.numel() for t in den))

    def retarget(self, reps: Sequence[Sequence[Tuple[int, Direction, float]]]) -> bool:
        """New coefficients for the same operands: ``reps[k]`` lists, for the ``k``-th bucket
        that is not a copy, ``(position, direction, rate)`` of items that stand for the others
        (the caller knows every item shares the coefficients of one of them, see
        :attr:`~lookahead_opt.rules.Rule.signature`). Returns ``False``, changing nothing,
        unless every direction reads its own item's tensors, in the bucket's form, and the
        directions of a bucket agree (else the plan must be rebuilt). Afterwards :meth:`build`
        never returns this plan as ``previous`` itself (it builds anew, keeping layouts)."""
        buckets = [b for b in self.buckets if b.proto is not None]
        if len(buckets) != len(reps):
            return False
        for b, mine in zip(buckets, reps):
            assert b.proto is not None
            form = _form(b.proto[1])
            key = None
            for pos, d, r in mine:
                if r == 0.0 or _form(d) != form:
                    return False
                item = b.items[pos]
                k, tensors = _group(item[1], d, r)
                if len(tensors) != len(item) - 2 or not all(map(operator.is_, tensors, item[2:])) \
                        or (key is not None and k != key):
                    return False
                key = k
        for b, mine in zip(buckets, reps):
            pos, d, r = mine[0]
            b.proto = (b.items[pos][1], d, r)
            b.keys = {}
        self.keys = [None] * len(self.keys)
        return True

    @torch.no_grad()
    def run(self, s: float, outs: Optional[Sequence[Tensor]] = None, *, foreach: Optional[bool] = None,
            chunk: Optional[int] = None) -> None:
        """Evaluate for ``s`` (into ``outs`` if given, else into the plan's own). Runs without
        autograd (state tensors of some optimizers, e.g. Apollo's with weight decay, carry
        ``requires_grad``)."""
        chunk = CHUNK if chunk is None else chunk
        choice = FOREACH if foreach is None else foreach
        for b in self.buckets:
            cols = b.cols if outs is None else [[outs[i] for i in b.idx]] + b.cols[1:]
            if s == 0 or b.proto is None:
                torch._foreach_copy_(cols[0], cols[1])
                continue
            key = b.key(s)
            items = b.items if outs is None else [(o,) + it[1:] for o, it in zip(cols[0], b.items)]
            use_chain = items[0][1].device.type != "cpu" if choice is None else choice
            if use_chain:
                if not (FUSED and (b.fused if outs is None else Launcher(triton_kernel))(items, key)):
                    _chain(cols, key, b.chain_tmp(key, self.scratch))
            elif not (NATIVE and (b.native if outs is None else Launcher(native_kernel))(items, key)):
                b.loop(cols, key, self.scratch, chunk)


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
    Runs without autograd (see :meth:`Plan.run`).
    """
    Plan(outs, weights, directions, mults, scratch).run(1, foreach=foreach, chunk=chunk)
