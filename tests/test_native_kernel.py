"""lookahead_opt.native_kernel: the compiled multi-tensor CPU kernel against an IEEE oracle
(numpy, one rounding per operation in the same order), against the per-tensor loop it
replaces, against Direction.materialize; which buckets it takes; its build and fallback."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from lookahead_opt import PredictiveOptimizer, kernel, native_kernel
from lookahead_opt.kernel import predict_into
from lookahead_opt.rules import Direction

from test_kernel import SHAPES, directions, tensors

pytestmark = pytest.mark.skipif(not native_kernel.available(), reason="native kernel unavailable here (no C compiler, or LOOKAHEAD_OPT_NATIVE=0)")


@pytest.fixture
def launches(monkeypatch):
    """Counts the native kernel's launches; small blocks and no size floor for threads, so that
    small tensors span several blocks and threads."""
    calls = []
    real = native_kernel.launch
    monkeypatch.setattr(native_kernel, "launch", lambda table, key, dtype: (calls.append(table[3]), real(table, key, dtype)))
    monkeypatch.setattr(native_kernel, "BLOCK", 7)
    monkeypatch.setattr(native_kernel, "MIN_PARALLEL", 0)
    return calls


def _loop(outs, ws, dirs, mults, monkeypatch):
    monkeypatch.setattr(kernel, "NATIVE", False)
    predict_into(outs, ws, dirs, mults, foreach=False)
    monkeypatch.setattr(kernel, "NATIVE", True)


def _big(dtype):
    return torch.randn(3 * 7 + 4, generator=torch.Generator().manual_seed(5), dtype=dtype)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_equals_materialized_direction(launches, dtype):
    """Every Direction shape (those the kernel does not take go to the loop), against W - m dW."""
    tol = dict(rtol=1e-12, atol=1e-12) if dtype is torch.float64 else dict(rtol=1e-5, atol=1e-5)
    for shift in range(SHAPES):
        ws = tensors(dtype) + [_big(dtype)]
        dirs = directions(ws, shift)
        mults = [0.3 * (i + 1) for i in range(len(ws))]
        outs = [torch.empty_like(w) for w in ws]
        predict_into(outs, ws, dirs, mults, foreach=False)
        for o, w, d, m in zip(outs, ws, dirs, mults):
            want = w.clone() if d is None else w - m * d.materialize(w)
            torch.testing.assert_close(o, want, **tol)
    assert launches, "the native kernel never ran"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_without_denominator_bitwise_equal_to_loop(launches, monkeypatch, dtype):
    """SGD forms (fused multiply-adds, scale, shift): the same bits as the per-tensor ops."""
    g = torch.Generator().manual_seed(2)
    ws = [torch.randn(s, generator=g, dtype=dtype) for s in [(3, 4), (5,), (), (31,)]]

    def n(w):
        return torch.randn(w.shape, generator=g, dtype=dtype)

    for make in [lambda w: Direction(((1.0, n(w)),)),
                 lambda w: Direction(((0.5, n(w)), (-2.0, n(w))), decay=0.1),
                 lambda w: Direction(((0.9, n(w)),), plain=((0.3, n(w)), (-1.1, n(w))), offset=0.25)]:
        dirs = [make(w) for w in ws]
        a, b = [torch.empty_like(w) for w in ws], [torch.empty_like(w) for w in ws]
        predict_into(a, ws, dirs, [0.37] * len(ws), foreach=False)
        _loop(b, ws, dirs, [0.37] * len(ws), monkeypatch)
        assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert len(launches) == 3


def _ieee(w, key, rest):
    """The kernel's formula with a denominator and no plain terms in numpy, one correctly
    rounded operation at a time."""
    _, _, _, alphas, plain, den, wscale, shift = key
    assert not plain and den is not None
    t = np.dtype(str(w.dtype).split(".")[-1]).type
    acc = w.numpy() * t(wscale)
    power, inner, eps = den
    d = rest[len(alphas)].numpy() + t(inner)
    d = (np.sqrt(d) if power == 0.5 else d) + t(eps)
    for a, n in zip(alphas, rest):
        acc = acc + (t(a) * n.numpy()) / d
    return acc + t(shift)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_denominator_forms_bitwise_equal_ieee_oracle(launches, dtype):
    """Adam/RMSprop/Adagrad/Adadelta forms: exactly numpy's correctly rounded ops in the same
    order. (PyTorch's vectorised CPU ``sqrt`` is not always correctly rounded, so the loop's
    result can differ from both in the last bit; see the next test.)"""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(1001, generator=g, dtype=dtype)
    n1, n2 = torch.randn_like(w), torch.randn_like(w)
    v = torch.rand(w.shape, generator=g, dtype=dtype) * 1e-3
    for d in [Direction(((1.0, n1),), den=v, eps=1e-8),
              Direction(((0.7, n1), (-0.2, n2)), den=v, scale=0.3, inner=1e-6, eps=1e-3, decay=0.05),
              Direction(((1.0, n1),), den=v + 0.5, root=False, eps=1e-8, offset=0.1)]:
        key, rest = kernel._key(w, d, 0.01)
        out = torch.empty_like(w)
        predict_into([out], [w], [d], [0.01], foreach=False)
        assert np.array_equal(out.numpy(), _ieee(w, key, rest))
    assert len(launches) == 3


def test_differs_from_loop_by_at_most_the_sqrt_rounding(launches, monkeypatch):
    """float32 Adam form against the loop: equal but for last-bit differences of ``sqrt``."""
    g = torch.Generator().manual_seed(4)
    w = torch.randn(10_000, generator=g)
    d = Direction(((1.0, torch.randn(w.shape, generator=g)),), den=torch.rand(w.shape, generator=g) * 1e-4, eps=1e-8)
    a, b = torch.empty_like(w), torch.empty_like(w)
    predict_into([a], [w], [d], [1e-3], foreach=False)
    _loop([b], [w], [d], [1e-3], monkeypatch)
    ulp = torch.finfo(torch.float32).eps * (w - a).abs().max()
    assert (a - b).abs().max() <= 4 * ulp


def test_supports_only_what_the_kernel_computes():
    w = torch.randn(4, 3)
    n, v = torch.randn_like(w), torch.rand_like(w)

    def bucket(d, x=w):
        key, ts = kernel._key(x, d, 0.5)
        return key, [(torch.empty_like(x), x) + ts]

    assert native_kernel.supports(*bucket(Direction(((1.0, n),), den=v, eps=1e-8)))
    assert native_kernel.supports(*bucket(Direction(((1.0, n),), den=v, root=False)))
    assert native_kernel.supports(*bucket(Direction(((1.0, n),), plain=((1.0, n), (2.0, n)))))
    assert native_kernel.supports(*bucket(Direction(((1.0, n.double()),)), x=w.double()))
    assert not native_kernel.supports(*bucket(Direction(((1.0, n),), den=v, power=1 / 3)))  # other powers
    assert not native_kernel.supports(*bucket(Direction(((1.0, n),), den=v, bounds=(0.1, 1.0))))  # rate form
    assert not native_kernel.supports(*bucket(Direction(((1.0, n), (1.0, n), (1.0, n)))))  # three numerators
    assert not native_kernel.supports(*bucket(None))  # a copy
    assert not native_kernel.supports(*bucket(Direction(((1.0, n.half()),)), x=w.half()))  # float16
    key, ts = kernel._key(w, Direction(((1.0, n),)), 0.5)
    assert not native_kernel.supports(key, [(torch.empty_like(w), w.t().contiguous().t()) + ts])  # layout


@pytest.mark.parametrize("cls,kw", [(torch.optim.SGD, dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.01)),
                                    (torch.optim.Adam, dict(lr=0.01, weight_decay=0.1)),
                                    (torch.optim.AdamW, dict(lr=0.01, amsgrad=True)),
                                    (torch.optim.RMSprop, dict(lr=0.01, centered=True, momentum=0.5)),
                                    (torch.optim.Adagrad, dict(lr=0.1)),
                                    (torch.optim.Adadelta, dict(lr=1.0))],
                         ids=lambda v: v.__name__ if isinstance(v, type) else "")
def test_predictive_optimizer_native_equals_fallback_rule(launches, cls, kw):
    """PredictiveOptimizer.predict through the kernel (float64) against the last applied update
    (the generic fallback's oracle) extrapolated: W_t - s (W_{t-1} - W_t)."""
    g = torch.Generator().manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(7, 5), (5,), (), (40,)]]
    opt = PredictiveOptimizer(cls(ps, **kw))
    for _ in range(3):
        before = [p.detach().clone() for p in ps]
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
        opt.step()
    for got, p, b in zip(opt.predict(3), ps, before):
        torch.testing.assert_close(got, p.detach() - 3 * (b - p.detach()), rtol=1e-9, atol=1e-12)
    assert launches, "the native kernel never ran"


def test_follows_weights_whose_data_moved(launches):
    """The cached address table is rebuilt when a weight's storage moves (as the swaps do), and
    a non-contiguous replacement leaves the kernel for the loop; predictions stay right."""
    g = torch.Generator().manual_seed(1)
    ps = [torch.nn.Parameter(torch.randn(s, generator=g, dtype=torch.float64)) for s in [(6, 4), (4,), (3, 3)]]
    opt = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1, momentum=0.9))
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g, dtype=torch.float64)
    opt.step()
    buf = [opt.state[p]["momentum_buffer"] for p in ps]
    opt.predict(2)
    for new in (ps[1].data * 3.0, ps[0].data.t().contiguous().t() * 2.0):
        target = ps[1] if new.shape == ps[1].shape else ps[0]
        target.data = new
        for got, p, m in zip(opt.predict(2), ps, buf):
            torch.testing.assert_close(got, p.detach() - 2 * 0.1 * m, rtol=1e-14, atol=1e-14)
    assert len(launches) == 2  # the second move (transposed strides) went to the loop


def test_disabled_or_unbuildable_falls_back(monkeypatch, tmp_path):
    """``LOOKAHEAD_OPT_NATIVE=0`` or no working compiler: no kernel, the loop gives the result."""
    monkeypatch.setenv("LOOKAHEAD_OPT_NATIVE", "0")
    assert not native_kernel.available()
    w, n = torch.randn(10, dtype=torch.float64), torch.randn(10, dtype=torch.float64)
    out = torch.empty_like(w)
    predict_into([out], [w], [Direction(((1.0, n),))], [0.5])
    torch.testing.assert_close(out, w - 0.5 * n, rtol=0, atol=1e-15)
    monkeypatch.setenv("LOOKAHEAD_OPT_NATIVE", "1")
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("LOOKAHEAD_OPT_CACHE", str(tmp_path / "cache"))
    assert native_kernel._build() is None
    assert not list((tmp_path / "cache").glob("*"))  # no half-written library left behind


def test_cache_directory_falls_back_when_unusable(monkeypatch, tmp_path):
    """A ``LOOKAHEAD_OPT_CACHE`` that cannot be a directory (here: an existing file) is passed
    over for the next candidate, which is created."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("LOOKAHEAD_OPT_CACHE", str(blocker))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert native_kernel._cache_dir() == tmp_path / "xdg" / "lookahead_opt"
    assert (tmp_path / "xdg" / "lookahead_opt").is_dir()


def test_shared_temporary_folder_must_be_our_own(monkeypatch, tmp_path):
    """The last resort, a folder in the temporary directory, is refused when others can write it
    (someone could have planted a library under the name the kernel would load)."""
    monkeypatch.delenv("LOOKAHEAD_OPT_CACHE", raising=False)
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # ~/.cache candidate unusable
    monkeypatch.setattr(native_kernel.tempfile, "gettempdir", lambda: str(tmp_path))
    shared = tmp_path / f"lookahead_opt-{native_kernel.os.getuid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    assert native_kernel._cache_dir() is None
    shared.chmod(0o700)
    assert native_kernel._cache_dir() == shared
