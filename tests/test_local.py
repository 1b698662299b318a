"""`LocalExecutor` and its stream/event helpers on CPU (the CUDA paths: tests/test_cuda.py)."""
from __future__ import annotations

import contextlib
import copy
import gc
import weakref

import pytest
import torch
from torch import nn

from pipeline_rt import Pipeline, split_by_balance
from pipeline_rt.local import LocalExecutor
from pipeline_rt.local import _Lifetimes
from pipeline_rt.streams import CPUEvent, CPUStream, new_stream, record, use_streams, wait

DT = torch.float64
SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6, dtype=DT), nn.Tanh(), nn.Linear(6, 6, dtype=DT), nn.Tanh(),
                         nn.Linear(6, 2, dtype=DT))


def batches(num=5, rows=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 4, generator=g, dtype=DT), torch.randn(rows, 2, generator=g, dtype=DT))
            for _ in range(num)]


def make(method="pipeoptim", balance=(2, 2, 1), **kw):
    return Pipeline(split_by_balance(copy.deepcopy(mlp()), list(balance)), ["cpu"] * len(balance), SGDM,
                    nn.functional.mse_loss, method=method, **kw)


def test_cpu_placeholders():
    s = new_stream(torch.device("cpu"))
    assert isinstance(s, CPUStream)
    e = record(s)
    assert isinstance(e, CPUEvent) and e.query()
    wait(s, e)
    with use_streams(s, s):
        pass


@contextlib.contextmanager
def host_sync_forbidden():
    """Any device-to-host read raises inside the block."""
    def boom(*a, **k):
        raise AssertionError("host synchronisation inside the executor loop")
    names = ("item", "tolist", "__bool__", "__float__", "__int__")
    saved = {n: getattr(torch.Tensor, n) for n in names}
    sync = torch.cuda.synchronize
    try:
        for n in names:
            setattr(torch.Tensor, n, boom)
        torch.cuda.synchronize = boom
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
        torch.cuda.synchronize = sync


@pytest.mark.parametrize("method", ["pipeoptim", "pipedream", "2bw", "spectrain", "sync"])
def test_no_host_sync_in_the_loop(method, monkeypatch):
    """Nothing reads the device from the first action to the last (the losses are read once,
    after the loop, in ``_end``)."""
    pipe = make(method, track_error=True)
    guard = host_sync_forbidden()
    end = LocalExecutor._end

    def unguarded_end(self, run, ok):
        guard.__exit__(None, None, None)
        return end(self, run, ok)

    monkeypatch.setattr(LocalExecutor, "_end", unguarded_end)
    guard.__enter__()
    losses = pipe.train(batches())
    assert len(losses) == 5
    # the guard itself works
    with host_sync_forbidden(), pytest.raises(AssertionError, match="host synchronisation"):
        torch.zeros(2).tolist()


class Probe(nn.Module):
    """Identity that records what it is given."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, *xs):
        self.seen.append(xs)
        return xs if len(xs) > 1 else xs[0]


def test_boundaries_are_detached_leaves_and_same_device_aliases():
    class Out(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, dtype=DT)
            self.outs = []

        def forward(self, x):
            y = self.lin(x)
            self.outs.append(y)
            return y, torch.zeros(x.shape[0], dtype=torch.long)

    first, probe = Out(), Probe()
    pipe = Pipeline([first, probe], ["cpu", "cpu"], SGDM, lambda out, y: nn.functional.mse_loss(out[0], y),
                    method="pipedream")
    pipe.train([(torch.randn(4, 4, dtype=DT), torch.randn(4, 4, dtype=DT))])
    (x, idx), = probe.seen
    assert x.is_leaf and x.requires_grad and x.grad_fn is None
    assert not idx.requires_grad and idx.dtype == torch.long
    assert x.data_ptr() == first.outs[0].data_ptr()  # one device: no copy
    assert x.grad is not None and first.lin.weight.grad is None  # flowed back, then stepped and cleared


def test_first_stage_inputs_do_not_require_grad():
    probe = Probe()
    pipe = Pipeline([nn.Sequential(probe, nn.Linear(4, 2, dtype=DT))], ["cpu"], SGDM, nn.functional.mse_loss,
                    method="async")
    pipe.train(batches(1))
    assert not probe.seen[0][0].requires_grad


def test_lifetimes_keep_tensors_until_their_event_completes():
    class Event:
        done = False

        def query(self):
            return self.done

    life, ev = _Lifetimes(), Event()
    t = torch.ones(3)
    ref = weakref.ref(t)
    life.keep(ev, [t, None])
    del t
    gc.collect()
    life.collect()
    assert ref() is not None and len(life) == 1
    ev.done = True
    life.collect()
    gc.collect()
    assert ref() is None and len(life) == 0
    life.keep(CPUEvent(), [torch.ones(1)])  # complete already: nothing kept
    assert len(life) == 0


def test_executor_argument_errors():
    pipe = make()
    stages = pipe.stage_runtimes
    with pytest.raises(ValueError, match="3 stages but 2 devices"):
        LocalExecutor(stages, ["cpu", "cpu"], pipe.schedule)
    other = make(balance=(3, 2))
    with pytest.raises(ValueError, match="the schedule has 2 stages, the executor 3"):
        LocalExecutor(stages, ["cpu"] * 3, other.schedule)


def test_stages_share_a_device_with_one_stream_each():
    pipe = make()
    ex = pipe.executor
    assert len(ex.compute) == 3 and len({id(s) for s in ex.compute}) == 3
    assert set(ex.copy_f) == {torch.device("cpu")} and ex.copy_f[torch.device("cpu")] is not ex.copy_b[torch.device("cpu")]
