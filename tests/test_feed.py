"""`Feed`: minibatches pulled just in time; memory and start-up that do not grow with the run."""
from __future__ import annotations

import gc
import itertools
import sys
import time
import tracemalloc

import pytest
import torch
from torch import nn

from pipeline_rt import Pipeline
from pipeline_rt.feed import Feed

DT = torch.float64
SGDM = lambda ps: torch.optim.SGD(ps, lr=0.01, momentum=0.9)  # noqa: E731


def tiny_pipeline(n: int, method: str = "pipeoptim", probe=None) -> Pipeline:
    torch.manual_seed(0)
    stages = [nn.Linear(2, 2, dtype=DT) for _ in range(n)]
    if probe is not None:
        stages[0] = nn.Sequential(probe, stages[0])
    return Pipeline(stages, ["cpu"] * n, SGDM, nn.functional.mse_loss, method=method)


class Counter(nn.Module):
    """Identity that counts its forwards and checks how far the data generator got."""

    def __init__(self, pulled, bound):
        super().__init__()
        self.pulled, self.bound, self.calls, self.worst = pulled, bound, 0, 0

    def forward(self, x):
        self.worst = max(self.worst, self.pulled[0] - self.calls)
        self.calls += 1
        return x


@pytest.mark.parametrize("method,n", [("pipeoptim", 4), ("pipedream", 8), ("sync", 3), ("2bw", 4)])
def test_generator_is_pulled_just_in_time(method, n):
    pulled = [0]

    def gen():
        g = torch.Generator().manual_seed(0)
        for _ in range(300):
            pulled[0] += 1
            yield torch.randn(8, 2, generator=g, dtype=DT), torch.randn(8, 2, generator=g, dtype=DT)

    chunks = tiny_pipeline(n, method).chunks
    probe = Counter(pulled, 2 * n + 8)
    pipe = tiny_pipeline(n, method, probe)
    losses = pipe.train(gen())
    assert len(losses) == 300 and probe.calls == 300 * chunks
    # minibatches read ahead of the first stage's forwards (counted in micro-batches)
    assert probe.worst <= 2 * n + 8, probe.worst


def _measure(count: int):
    data = ((torch.zeros(2, 2, dtype=DT), torch.zeros(2, 2, dtype=DT)) for _ in range(count))
    first = []

    class First(nn.Module):
        def forward(self, x):
            if not first:
                first.append(time.perf_counter())
            return x

    pipe = tiny_pipeline(2, "async", First())
    gc.collect()
    gc.disable()  # what only the cyclic collector frees counts: its timing would make the peak vary
    tracemalloc.start()
    try:
        t0 = time.perf_counter()
        losses = pipe.train(data)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        gc.enable()
    # the returned list of floats must grow; so must the transient of its last resize, when the
    # old pointer array (at most 8 bytes a loss) is still alive next to the new one
    returned = sys.getsizeof(losses) + sum(sys.getsizeof(x) for x in losses) + 8 * len(losses)
    return peak - returned, first[0] - t0


@pytest.mark.slow
def test_memory_and_start_up_do_not_grow_with_the_number_of_minibatches():
    """15,000 vs 1,500 minibatches of a generator: the traced peak (less the returned list of
    floats and its resize, which must grow) within 1.3x, the time to the first forward within
    3x + 20 ms. (A per-minibatch leak of one small object, ~50 bytes, adds 0.7 MB: caught; so is
    a reference cycle per forward, the cyclic garbage collector being off while it runs.)"""
    _measure(100)  # warm caches (the schedule's memo, imports)
    small_peak, small_first = _measure(1500)
    big_peak, big_first = _measure(15000)
    assert big_peak <= 1.3 * small_peak, (small_peak, big_peak)
    assert big_first <= 3 * small_first + 0.02, (small_first, big_first)


def test_epochs_and_iterables():
    data = [(torch.ones(4, 2) * i, torch.zeros(4, 2)) for i in range(3)]
    feed = Feed(data, 2, epochs=2)
    assert [feed.has(j) for j in range(7)] == [True] * 6 + [False]
    assert [feed.epoch(j) for j in range(6)] == [0, 0, 0, 1, 1, 1]
    x, _ = feed.take_input(4, 1), feed.take_target(4, 1)
    assert torch.equal(x[0], torch.ones(2, 2))
    with pytest.raises(TypeError, match="iterator that runs out after one pass"):
        Feed(iter(data), 1, epochs=2)
    with pytest.raises(ValueError, match="epoch 0 of batches has no minibatches"):
        Feed([], 1).has(0)
    with pytest.raises(ValueError, match="epochs must be a positive int"):
        Feed(data, 1, epochs=0)


def test_minibatches_are_released_once_used():
    data = itertools.repeat((torch.zeros(4, 2), torch.zeros(4, 2)))
    feed = Feed(data, 2)
    for j in range(50):
        assert feed.has(j + 1)
        for m in range(2):
            feed.take_input(j, m)
            feed.take_target(j, m)
    assert feed.held == 1  # only the one looked ahead


def test_fingerprint_sees_values_and_order():
    a = [(torch.arange(6.0).reshape(3, 2) + i, torch.zeros(3)) for i in range(4)]
    b = [a[1], a[0]] + a[2:]
    fa, fb = Feed(a, 1), Feed(b, 1)
    fa.has(3), fb.has(3)
    assert fa.fingerprint(2) != fb.fingerprint(2) and fa.fingerprint(0) == fb.fingerprint(0)
    assert fa.fingerprint(3)[:8] != fb.fingerprint(3)[:8] or fa.fingerprint(3) != fb.fingerprint(3)


def test_without_fingerprint_the_feed_is_the_same_and_refuses_to_fingerprint():
    data = [(torch.arange(8.0).reshape(4, 2) + i, (torch.ones(4) * i, torch.zeros(4))) for i in range(3)]
    for chunks in (1, 2):
        plain, bare = Feed(data, chunks), Feed(data, chunks, fingerprint=False)
        for j in range(3):
            for m in range(chunks):
                a, b = plain.micro(j, m), bare.micro(j, m)
                assert a.weight == b.weight and type(a.target) is type(b.target) is tuple
                assert all(torch.equal(x, y) for x, y in zip(a.inputs + a.target, b.inputs + b.target))
        assert plain.pulled == bare.pulled == 3 and not bare.has(3)
        with pytest.raises(RuntimeError, match="fingerprint=False"):
            bare.fingerprint(3)
