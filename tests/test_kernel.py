"""lookahead_opt.kernel: the foreach chain and the per-tensor loop both compute
out = W - m * dW for every Direction shape, against Direction.materialize."""
from __future__ import annotations

import pytest
import torch

from lookahead_opt import kernel
from lookahead_opt.kernel import predict_into
from lookahead_opt.rules import Direction


def tensors(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (5,), (2, 3, 2), ()]
    ts = [torch.randn(s, generator=g, dtype=dtype) for s in shapes]
    ts.append(torch.randn(4, 3, generator=g, dtype=dtype).t())  # non-contiguous
    return ts


def directions(ws, shift=0):
    out = []
    for i, w in enumerate(ws):
        n1, n2 = torch.randn_like(w), torch.randn_like(w)
        v = torch.rand_like(w) + 0.1
        out.append([
            None,
            Direction(((1.0, n1),)),
            Direction(((0.5, n1), (-2.0, n2)), decay=0.1),
            Direction(((0.7, n1),), den=v, scale=0.3, eps=1e-3),
            Direction(((1.0, n1), (0.2, n2)), den=v, inner=1e-2, decay=0.05),
            Direction(((1.0, n1),), den=v, root=False, eps=1e-8),
            Direction(((1.0, n1),), lr=0.5),
            Direction(((0.8, n1),), den=v, power=1 / 3, scale=2.0, eps=1e-2, plain=((-0.4, n2),), decay=0.2),
            Direction(((1.0, n1),), offset=0.25),
            Direction(((0.6, n1), (0.1, n2)), den=v, scale=0.5, eps=1e-3, bounds=(0.4, 1.5)),
            Direction(((1.5, n1),), den=v, inner=1e-3, eps=1e-3, cap=v * 0.8, decay=0.1),
            Direction(((1.0, n1),), den=v, power=0.75, bounds=(0.1, 0.9), cap=torch.rand_like(w), offset=-0.1),
        ][(i + shift) % SHAPES])
    return out


SHAPES = 12


@pytest.mark.parametrize("foreach,chunk", [(True, None), (False, 0), (False, 5), (False, None)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_direction_shapes(foreach, chunk, dtype):
    """Every Direction shape, chain and loop (whole tensors, small chunks with a ragged last
    chunk, the default chunk), against Direction.materialize."""
    for shift in range(SHAPES):
        ws = tensors(dtype) + tensors(dtype)[:2]
        dirs = directions(ws, shift)
        mults = [0.3 * (i + 1) for i in range(len(ws))]
        outs = [torch.empty_like(w) for w in ws]
        predict_into(outs, ws, dirs, mults, foreach=foreach, chunk=chunk)
        tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-5)
        for o, w, d, m in zip(outs, ws, dirs, mults):
            want = w.clone() if d is None else w - m * d.materialize(w)
            torch.testing.assert_close(o, want, **tol)


def test_zero_multiplier_copies_exactly():
    ws = tensors(torch.float64)
    outs = [torch.empty_like(w) for w in ws]
    predict_into(outs, ws, directions(ws), [0.0] * len(ws))
    assert all(torch.equal(o, w) for o, w in zip(outs, ws))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fused_kernel_math(monkeypatch, dtype):
    """The opt-in COMPILE path's fused function, run eagerly (compiling is never done in tests)."""
    monkeypatch.setattr(kernel, "COMPILE", True)
    monkeypatch.setattr(kernel, "_FUSED", kernel._fused_impl)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for shift in range(SHAPES):
        ws = tensors(dtype)
        dirs = directions(ws, shift)
        mults = [0.3 * (i + 1) for i in range(len(ws))]
        outs = [torch.empty_like(w) for w in ws]
        predict_into(outs, ws, dirs, mults, foreach=False)
        for o, w, d, m in zip(outs, ws, dirs, mults):
            want = w.clone() if d is None else w - m * d.materialize(w)
            torch.testing.assert_close(o, want, **tol)
