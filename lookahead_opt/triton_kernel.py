"""One fused multi-tensor Triton kernel for the prediction on CUDA.

:func:`lookahead_opt.kernel.predict_into`'s foreach chain costs about a dozen passes over
memory for Adam (copies, ``sqrt``, ``add``, ``addcdiv``, each a separate launch reading and
writing whole tensors). This kernel evaluates a whole bucket (the parameters that share a
:class:`~lookahead_opt.rules.base.Direction` shape and coefficients) in one launch and one pass:

.. code-block:: text

    out = W * wscale + sum_j b_j P_j + (sum_k a_k N_k) / ((D + inner)^p + eps) + shift

with ``p`` in {1/2, 1} (or no ``D``), at most two ``N_k`` and two ``P_j``: SGD and its momentum
forms, Adam/AdamW/NAdam/RAdam, RMSprop, Adagrad, Adadelta. Other forms (rate form with bounds
and caps, other powers) and float64 tensors keep the chain (Triton passes the coefficients as
float32 scalars, which is what the chain does for float32 but not for float64). Arithmetic is
in float32, so results agree with the chain to float32 rounding, not bitwise.

It reads, per launch, a table of the operands' addresses (one row per tensor) and a table of
blocks (tensor index, first element): the multi-tensor-apply idea of apex and
``torch._foreach_*``, with the tables cached by the operands' addresses. Tensors must be
contiguous and of one dtype per bucket (checked by :func:`supports`).

Used automatically when Triton imports and the tensors are on CUDA (see
:data:`lookahead_opt.kernel.FUSED`). ``TRITON_INTERPRET=1`` runs it on CPU tensors with
Triton's interpreter (the tests do).
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Sequence, Tuple

import torch
from torch import Tensor

from .launcher import fits

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

__all__ = ["AVAILABLE", "supports", "table", "launch", "mode"]

#: Whether Triton imports here.
AVAILABLE: bool = triton is not None

BLOCK = 1024  # elements per inner iteration of one program
ITERS = 8  # inner iterations per program: one program covers BLOCK * ITERS elements
_COLUMNS = 7  # out, W, N_1, N_2, P_1, P_2, D
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

if AVAILABLE:
    def _body(ptrs, blocks, numels, wscale, shift, inner, eps, a1, a2, b1, b2,
              K: tl.constexpr, J: tl.constexpr, HAS_DEN: tl.constexpr, ROOT: tl.constexpr,
              DTYPE: tl.constexpr, BLOCK: tl.constexpr, ITERS: tl.constexpr):
        pid = tl.program_id(0)
        t = tl.load(blocks + 2 * pid)
        first = tl.load(blocks + 2 * pid + 1)
        n = tl.load(numels + t)
        row = ptrs + t * 7
        ptype = tl.pointer_type(DTYPE)
        out_p = tl.load(row).to(ptype)
        w_p = tl.load(row + 1).to(ptype)
        for it in range(ITERS):
            offs = first + it * BLOCK + tl.arange(0, BLOCK)
            mask = offs < n
            acc = tl.load(w_p + offs, mask=mask).to(tl.float32) * wscale
            if J >= 1:
                acc += b1 * tl.load(tl.load(row + 4).to(ptype) + offs, mask=mask).to(tl.float32)
            if J >= 2:
                acc += b2 * tl.load(tl.load(row + 5).to(ptype) + offs, mask=mask).to(tl.float32)
            if K >= 1:
                num = a1 * tl.load(tl.load(row + 2).to(ptype) + offs, mask=mask).to(tl.float32)
                if K >= 2:
                    num += a2 * tl.load(tl.load(row + 3).to(ptype) + offs, mask=mask).to(tl.float32)
                if HAS_DEN:
                    d = tl.load(tl.load(row + 6).to(ptype) + offs, mask=mask, other=1.0).to(tl.float32) + inner
                    if ROOT:
                        d = tl.sqrt(d)
                    num = num / (d + eps)
                acc += num
            acc += shift
            tl.store(out_p + offs, acc.to(DTYPE), mask=mask)

_kernels: Dict[bool, object] = {}  # one per interpreter mode (TRITON_INTERPRET read at jit time)
_tables: Dict[Tuple[int, ...], tuple] = {}
_TL: Dict[torch.dtype, Any] = {}  # torch dtype -> triton.language dtype, filled at first use


def supports(key: Tuple, items: Sequence[Tuple[Tensor, ...]]) -> bool:
    """Whether a bucket (``kernel._key``'s key, its items) fits the fused kernel: the form of
    :func:`~lookahead_opt.launcher.fits` in float32/16/bf16, with a numerator wherever there is
    a denominator, on CUDA (or any device under the interpreter)."""
    if not AVAILABLE or key[0] == "copy" or (not key[3] and key[5] is not None):
        return False
    if items[0][1].device.type != "cuda" and not mode():
        return False
    return fits(key, items, _DTYPES)


def mode() -> bool:
    """Whether Triton's interpreter runs (part of a :class:`~lookahead_opt.launcher.Launcher`'s
    verdict: the same bucket may be taken with it and refused without it)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _kernel():
    interpret = mode()
    if interpret not in _kernels:
        _kernels[interpret] = triton.jit(_body)
    return _kernels[interpret]


def _tl_dtype(dtype: torch.dtype):
    if not _TL:
        _TL.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _TL[dtype]


def table(items: Sequence[Tuple[Tensor, ...]], key: Tuple) -> tuple:
    """(address table, block table, numels) for the bucket, cached by the operands' addresses."""
    k, j, has_den = len(key[3]), len(key[4]), key[5] is not None
    cols = [0, 1] + [2 + i for i in range(k)] + [2 + k + i for i in range(j)] + ([2 + k + j] if has_den else [])
    slots = [0, 1] + [2 + i for i in range(k)] + [4 + i for i in range(j)] + ([6] if has_den else [])
    sig = tuple(it[c].data_ptr() for it in items for c in cols) + tuple(it[1].numel() for it in items)
    cached = _tables.get(sig)
    if cached is not None:
        return cached
    device = items[0][1].device
    rows: List[List[int]] = []
    blocks: List[int] = []
    per = BLOCK * ITERS
    for i, it in enumerate(items):
        row = [0] * _COLUMNS
        for c, s in zip(cols, slots):
            row[s] = it[c].data_ptr()
        rows.append(row)
        for first in range(0, it[1].numel(), per):
            blocks += (i, first)
    host = [torch.tensor(rows, dtype=torch.int64), torch.tensor(blocks, dtype=torch.int64),
            torch.tensor([it[1].numel() for it in items], dtype=torch.int64)]
    if device.type == "cuda":  # pinned and non-blocking: building a table never syncs the host
        host = [t.pin_memory() for t in host]
    built = tuple(t.to(device, non_blocking=True) for t in host) + (host,)  # host copies kept alive
    if len(_tables) > 64:
        _tables.clear()
    _tables[sig] = built
    return built


def launch(table: tuple, key: Tuple, dtype: torch.dtype) -> None:
    """Run the kernel over a bucket whose :func:`table` is ``table``."""
    ptrs, blocks, numels, _ = table
    if not blocks.numel():  # only empty tensors
        return
    _, _, _, alphas, plain, den, wscale, shift = key
    k, j = len(alphas), len(plain)
    a = list(alphas) + [0.0] * (2 - k)
    b = list(plain) + [0.0] * (2 - j)
    inner, eps = (den[1], den[2]) if den is not None else (0.0, 0.0)
    _kernel()[(blocks.numel() // 2,)](
        ptrs, blocks, numels, float(wscale), float(shift), float(inner), float(eps),
        float(a[0]), float(a[1]), float(b[0]), float(b[1]),
        K=k, J=j, HAS_DEN=den is not None, ROOT=den is not None and den[0] == 0.5,
        DTYPE=_tl_dtype(dtype), BLOCK=BLOCK, ITERS=ITERS)
