"""Splitting an nn.Sequential: by balance, by size, by (profiled) time."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from pipeline_rt import partition
from pipeline_rt.partition import (
    balance_by_size, balance_by_time, balance_costs, split_by_balance, split_by_size, split_by_time,
)


def brute_force(costs, n):
    """Smallest max-part cost over every contiguous split (the oracle for the DP)."""
    L = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, L), n - 1):
        bounds = (0,) + cuts + (L,)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@pytest.mark.parametrize("seed", range(20))
def test_balance_costs_is_optimal(seed):
    g = torch.Generator().manual_seed(seed)
    L = int(torch.randint(1, 9, (1,), generator=g))
    n = int(torch.randint(1, L + 1, (1,), generator=g))
    costs = torch.randint(0, 10, (L,), generator=g).tolist()
    bal = balance_costs(costs, n)
    assert len(bal) == n and sum(bal) == L and min(bal) >= 1
    bounds = [0] + list(itertools.accumulate(bal))
    assert max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:])) == brute_force(costs, n)


def test_split_by_balance_shares_modules_and_checks():
    model = nn.Sequential(nn.Linear(2, 3), nn.ReLU(), nn.Linear(3, 3), nn.Linear(3, 1))
    stages = split_by_balance(model, [1, 2, 1])
    assert [len(s) for s in stages] == [1, 2, 1]
    assert stages[1][1] is model[2]
    x = torch.randn(4, 2)
    y = x
    for s in stages:
        y = s(y)
    assert torch.equal(y, model(x))
    with pytest.raises(ValueError, match="covers 3 layers, the model has 4"):
        split_by_balance(model, [1, 2])
    with pytest.raises(ValueError, match="at least one layer"):
        split_by_balance(model, [0, 4])
    with pytest.raises(ValueError, match="cannot split 4 layers into 5"):
        split_by_size(model, 5)
    with pytest.raises(TypeError, match="nn.Sequential"):
        split_by_size(nn.Linear(2, 2), 1)


def test_split_by_size():
    model = nn.Sequential(nn.Linear(10, 10), nn.ReLU(), nn.Linear(10, 10), nn.Linear(10, 100), nn.Linear(100, 1))
    # sizes 110, 0, 110, 1100, 101
    assert balance_by_size(model, 2) == [3, 2]  # max(220, 1201) < max(1320, 101)
    assert balance_by_size(model, 3) == [3, 1, 1]
    assert [len(s) for s in split_by_size(model, 3)] == [3, 1, 1]


class Clock:
    """A fake ``time.perf_counter`` that layers advance by their own cost."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class Costly(nn.Module):
    """Identity costing ``cost`` fake seconds per forward, ``first`` on its first ``lazy`` calls."""

    def __init__(self, clock, cost, first=None, lazy=0):
        super().__init__()
        self.clock, self.cost, self.first, self.lazy, self.calls = clock, cost, first, lazy, 0
        self.w = nn.Parameter(torch.ones(1))

    def forward(self, x):
        self.calls += 1
        self.clock.now += self.first if self.calls <= self.lazy else self.cost
        return x * self.w


def test_balance_by_time_warms_up_then_times(monkeypatch):
    clock = Clock()
    monkeypatch.setattr(partition.time, "perf_counter", clock)
    # layer 0 is very slow on its first two calls only (lazy initialisation), then cheap
    layers = [Costly(clock, 1.0, first=100.0, lazy=2), Costly(clock, 1.0), Costly(clock, 5.0), Costly(clock, 1.0)]
    model = nn.Sequential(*layers)
    assert balance_by_time(model, 2, torch.randn(3, 2), warmup=2, repeat=3) == [2, 2]
    assert all(l.w.grad is None for l in layers), "profiling leaves the gradients as they were"
    assert layers[1].calls == 5
    # without warm-up the lazy layer looks expensive and gets a stage of its own
    layers[0].calls = 0
    assert balance_by_time(model, 2, torch.randn(3, 2), warmup=0, repeat=1) == [1, 3]
    assert [len(s) for s in split_by_time(model, 3, torch.randn(3, 2))] == [2, 1, 1]
    with pytest.raises(ValueError, match="repeat >= 1"):
        balance_by_time(model, 2, torch.randn(3, 2), repeat=0)


def test_balance_by_time_real_clock_runs():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 2))
    bal = balance_by_time(model, 2, torch.randn(4, 8), warmup=1, repeat=2)
    assert sum(bal) == 4 and len(bal) == 2


class Masked(nn.Module):
    """A layer of a two-tensor message whose second tensor is absent (``None``)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x, mask):
        assert mask is None
        return self.lin(x), mask


def test_balance_by_time_passes_absent_tensors_between_layers():
    model = nn.Sequential(Masked(), Masked(), Masked())
    assert sum(balance_by_time(model, 2, (torch.randn(3, 4), None), warmup=0, repeat=1)) == 3
