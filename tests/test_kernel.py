"""lookahead_opt.kernel: the foreach chain and the per-tensor loop both compute
out = W - m * dW for every Direction shape, against Direction.materialize. (The native CPU
kernel, which takes most CPU buckets by default, is switched off here so that the loop it
falls back to is what runs: tests/test_native_kernel.py tests it.)"""
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


@pytest.fixture(autouse=True)
def loop_not_native(monkeypatch):
    monkeypatch.setattr(kernel, "NATIVE", False)


@pytest.mark.parametrize("foreach,chunk,pack", [(True, None, None), (False, 0, False), (False, 5, False),
                                                (False, None, False), (False, None, True)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_all_direction_shapes(foreach, chunk, pack, dtype, monkeypatch):
    """Every Direction shape, chain and loop (whole tensors, small chunks with a ragged last
    chunk, the default chunk; small tensors packed, even one alone, or not), against
    Direction.materialize."""
    if pack is not None:
        monkeypatch.setattr(kernel, "PACK", kernel.PACK if pack else 0)
        monkeypatch.setattr(kernel, "_PACK_MIN", 1)
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


@pytest.mark.parametrize("foreach", [True, False])
def test_plan_runs_again_and_follows_values_and_swapped_data(foreach, monkeypatch):
    """A Plan reads the operands' values at each run (also a parameter's new ``.data``), for any
    ``s``, into its outs or others given (in any bucket order); small tensors are packed in
    groups of at most PACK_GROUP elements next to tensors too large to pack, whose results must
    land in the right outs."""
    monkeypatch.setattr(kernel, "PACK_GROUP", 7)
    monkeypatch.setattr(kernel, "PACK", 6)
    g = torch.Generator().manual_seed(1)
    shapes = [(3,), (2, 2), (4,), (9,), (1, 3), (5,), (2,)]
    ws = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in shapes]
    dirs = [Direction(((0.5, torch.randn(s, generator=g, dtype=torch.float64)),),
                      den=torch.rand(s, generator=g, dtype=torch.float64) + 0.5, eps=1e-3) for s in shapes]
    outs = [torch.empty(s, dtype=torch.float64) for s in shapes]
    plan = kernel.Plan(outs, ws, dirs, [0.1] * len(ws))
    assert len(plan.buckets) == 1 and plan.buckets[0].npacked == 6
    for s in (1, 3, 0):
        with torch.no_grad():
            ws[1].data = torch.randn(2, 2, generator=g, dtype=torch.float64)
            for d in dirs:
                d.terms[0][1].mul_(1.5)
        plan.run(s, foreach=foreach)
        others = [torch.empty_like(o) for o in outs]
        plan.run(s, others, foreach=foreach)
        for o, p, w, d in zip(outs, others, ws, dirs):
            want = (w - 0.1 * s * d.materialize(w)).detach()
            torch.testing.assert_close(o, want, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(p, want, rtol=1e-12, atol=1e-12)


def test_a_rebuilt_plan_takes_over_only_matching_buckets():
    """A plan built again for the same operands and coefficients is the previous one; with
    new coefficients (or rates) it is new but reuses the previous plan's layouts and computes
    with the new coefficients; other operands get their own."""
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4)]
    ns = [torch.randn(4, generator=g, dtype=torch.float64) for _ in range(4)]
    outs = [torch.empty_like(w) for w in ws]
    first = kernel.Plan(outs, ws, [Direction(((1.0, n),)) for n in ns], [0.1] * 4)
    first.run(1, foreach=False)
    assert len(first.buckets[0].packed) == 1
    assert kernel.Plan.build(outs, ws, [Direction(((1.0, n),)) for n in ns], [0.1] * 4, previous=first) is first
    assert kernel.Plan.build(outs, ws, [Direction(((1.0, n),)) for n in ns], [0.2] * 4, previous=first) is not first
    again = kernel.Plan.build(outs, ws, [Direction(((2.0, n),)) for n in ns], [0.1] * 4, previous=first)
    assert again is not first
    assert again.buckets[0].packed is first.buckets[0].packed
    again.run(1, foreach=False)
    for o, w, n in zip(outs, ws, ns):
        torch.testing.assert_close(o, w - 0.2 * n, rtol=1e-12, atol=1e-12)
    other = [n.clone() for n in ns]
    moved = kernel.Plan(outs, ws, [Direction(((2.0, n),)) for n in other], [0.1] * 4, previous=first)
    assert moved.buckets[0].packed is None
    with_den = kernel.Plan(outs, ws[:1], [Direction(((1.0, ns[0]),), den=ns[1].abs())], [0.1], previous=first)
    assert with_den.buckets[0].packed is None



def test_retarget_takes_new_coefficients_only_in_the_same_form():
    """Plan.retarget: new coefficients on the same operands give what a new plan gives; a
    direction of another form (no root), or on other tensors, is refused and changes nothing."""
    g = torch.Generator().manual_seed(0)
    w, n, v = (torch.randn(6, generator=g, dtype=torch.float64) for _ in range(3))
    v = v.abs()
    out = torch.empty_like(w)
    plan = kernel.Plan([out], [w], [Direction(((1.0, n),), den=v, scale=0.5, eps=1e-3)], [0.1])
    new = Direction(((2.0, n),), den=v, scale=0.25, eps=1e-3)
    for refused in (Direction(((2.0, n),), den=v, root=False, scale=0.25, eps=1e-3),
                    Direction(((2.0, v),), den=v, scale=0.25, eps=1e-3)):
        assert not plan.retarget([[(0, refused, 0.1)]])
    plan.run(3)
    before = out.clone()
    assert torch.equal(before, _fresh_run(w, Direction(((1.0, n),), den=v, scale=0.5, eps=1e-3), 0.1))
    assert plan.retarget([[(0, new, 0.1)]])
    plan.run(3)
    assert torch.equal(out, _fresh_run(w, new, 0.1)) and not torch.equal(out, before)


def _fresh_run(w, d, rate):
    out = torch.empty_like(w)
    kernel.Plan([out], [w], [d], [rate]).run(3)
    return out
