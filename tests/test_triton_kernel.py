"""lookahead_opt.triton_kernel: the fused multi-tensor kernel, run by Triton's interpreter on
CPU tensors, against Direction.materialize and against the foreach chain; which buckets it
takes. (On CUDA the same kernel runs compiled: tests/test_cuda.py.)"""
from __future__ import annotations

import pytest
import torch

from lookahead_opt import PredictiveOptimizer, kernel, triton_kernel
from lookahead_opt.kernel import predict_into
from lookahead_opt.rules import Direction

from test_kernel import SHAPES, directions, tensors

pytestmark = pytest.mark.skipif(not triton_kernel.AVAILABLE, reason="needs Triton (pip install triton)")

TOL = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-2, atol=1e-2),
       torch.bfloat16: dict(rtol=5e-2, atol=5e-2)}  # the chain rounds each op in bf16


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    calls = []
    real = triton_kernel.launch
    monkeypatch.setattr(triton_kernel, "launch", lambda table, key, dtype: (calls.append(len(table[2])), real(table, key, dtype)))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_fused_equals_materialized_direction(interpret, dtype):
    """Every Direction shape the kernel takes (the others fall back to the chain), contiguous
    tensors of several sizes incl. one spanning several programs, against W - m * dW."""
    big = torch.randn(2 * triton_kernel.BLOCK * triton_kernel.ITERS + 5, generator=torch.Generator().manual_seed(3),
                      dtype=torch.float64).to(dtype)
    for shift in range(SHAPES):
        ws = [t.contiguous().to(dtype) for t in tensors(torch.float64)] + [big]
        dirs = [None if d is None else Direction(tuple((c, n.to(dtype)) for c, n in d.terms),
                                                 den=None if d.den is None else d.den.to(dtype),
                                                 **{f: getattr(d, f) for f in ("scale", "eps", "inner", "decay", "root",
                                                                               "power", "lr", "offset", "bounds")},
                                                 plain=tuple((c, p.to(dtype)) for c, p in d.plain),
                                                 cap=None if d.cap is None else d.cap.to(dtype))
                for d in directions(ws, shift)]
        mults = [0.3 * (i + 1) for i in range(len(ws))]
        outs = [torch.empty_like(w) for w in ws]
        predict_into(outs, ws, dirs, mults, foreach=True)
        for o, w, d, m in zip(outs, ws, dirs, mults):
            want = w.clone() if d is None else (w.double() - m * d.materialize(w.double()))
            torch.testing.assert_close(o.double(), want.double(), **TOL[dtype])
    assert interpret, "the fused kernel never ran"


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
                                    (torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
                                    (torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
                                    (torch.optim.Adagrad, dict(lr=0.1))],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_predictive_optimizer_fused_equals_chain(interpret, monkeypatch, cls, kw):
    """PredictiveOptimizer.predict through the fused kernel equals the foreach chain (float32),
    also after steps that only refresh the kept plan's coefficients (predicted after each)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(7, 5), (5,), ()]]
    opt = PredictiveOptimizer(cls(ps, **kw))
    monkeypatch.setattr(kernel, "FOREACH", True)
    for _ in range(3):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g)
        opt.step()
        fused = [t.clone() for t in opt.predict(3)]
    assert interpret, "the fused kernel never ran"
    monkeypatch.setattr(kernel, "FUSED", False)
    opt._cache = None  # the chain from a plan built anew
    for a, b in zip(fused, opt.predict(3)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_supports_only_what_the_kernel_computes(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    w = torch.randn(4, 3)
    n, v = torch.randn_like(w), torch.rand_like(w)

    def bucket(d, ws=(w,)):
        key, ts = kernel._key(ws[0], d, 0.5)
        return key, [(torch.empty_like(x), x) + ts for x in ws]

    assert triton_kernel.supports(*bucket(Direction(((1.0, n),), den=v, eps=1e-8)))
    assert triton_kernel.supports(*bucket(Direction(((1.0, n),), den=v, root=False, eps=1e-8)))
    assert not triton_kernel.supports(*bucket(Direction(((1.0, n),), den=v, power=1 / 3)))  # other powers
    assert not triton_kernel.supports(*bucket(Direction(((1.0, n),), den=v, bounds=(0.1, 1.0))))  # rate form
    assert not triton_kernel.supports(*bucket(Direction(((1.0, n), (1.0, n), (1.0, n)))))  # three numerators
    assert not triton_kernel.supports(*bucket(None))  # a plain copy stays a foreach copy
    t = w.t()
    key, ts = kernel._key(t, Direction(((1.0, n.t()),)), 0.5)
    assert not triton_kernel.supports(key, [(torch.empty_like(t), t) + ts])  # not contiguous
    key, ts = kernel._key(w.double(), Direction(((1.0, n.double()),)), 0.5)
    assert not triton_kernel.supports(key, [(w.double(), w.double()) + ts])  # float64: the chain
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_kernel.supports(*bucket(Direction(((1.0, n),))))  # CPU tensors, compiled mode


def test_launcher_follows_weights_whose_data_moved(interpret, monkeypatch):
    """The cached address table is rebuilt when a weight's storage moves (``param.data = ...``,
    as the swaps do); the prediction then reads the new storage (against the chain)."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(6, 4), (4,), (3, 3), (9,)]]
    opt = PredictiveOptimizer(torch.optim.Adam(ps, lr=0.01))
    monkeypatch.setattr(kernel, "FOREACH", True)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.predict(2)
    ps[1].data = ps[1].data * 3.0  # new storage, new values
    fused = [t.clone() for t in opt.predict(2)]
    assert len(interpret) == 2
    monkeypatch.setattr(kernel, "FUSED", False)
    for a, b in zip(fused, opt.predict(2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_launcher_rechecks_layout_when_data_moves(interpret, monkeypatch):
    """A weight whose storage is replaced by a non-contiguous view leaves the fused kernel (which
    reads storage order) for the chain; the prediction stays right."""
    g = torch.Generator().manual_seed(2)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 5), (5,), (4, 4), (3,)]]
    opt = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    monkeypatch.setattr(kernel, "FOREACH", True)
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.predict(2)
    ps[0].data = ps[0].data.t().contiguous().t() * 2.0  # same shape, transposed strides
    got = [t.clone() for t in opt.predict(2)]
    monkeypatch.setattr(kernel, "FUSED", False)
    for a, b in zip(got, opt.predict(2)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
