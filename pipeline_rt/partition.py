"""Split an ``nn.Sequential`` into pipeline stages.

A *balance* is the number of consecutive layers per stage. :func:`balance_by_size` and
:func:`balance_by_time` choose it from a per-layer cost ``c_i`` (parameter count, or
profiled forward + backward seconds): the contiguous split into ``n`` non-empty parts that
minimises the largest part's cost,

.. math::  \\min_{0 = b_0 < b_1 < \\dots < b_n = L} \\; \\max_k \\sum_{b_k \\le i < b_{k+1}} c_i,

found exactly by dynamic programming (``O(n L^2)``; ties go to the earliest split).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .stage import as_leaf, as_tuple

__all__ = ["split_by_balance", "balance_by_size", "balance_by_time", "split_by_size", "split_by_time",
           "balance_costs"]


def _check(model: nn.Sequential, num_stages: int) -> None:
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"expected an nn.Sequential, got {type(model).__name__}")
    if not isinstance(num_stages, int) or num_stages < 1:
        raise ValueError(f"num_stages must be a positive int, got {num_stages!r}")
    if num_stages > len(model):
        raise ValueError(f"cannot split {len(model)} layers into {num_stages} non-empty stages")


def split_by_balance(model: nn.Sequential, balance: Sequence[int]) -> List[nn.Sequential]:
    """Stage ``k`` gets the next ``balance[k]`` layers (the modules are shared, not copied)."""
    balance = list(balance)
    _check(model, max(len(balance), 1))
    if any(not isinstance(b, int) or b < 1 for b in balance):
        raise ValueError(f"every stage needs at least one layer; got balance {balance}")
    if sum(balance) != len(model):
        raise ValueError(f"balance {balance} covers {sum(balance)} layers, the model has {len(model)}")
    layers = list(model)
    out, i = [], 0
    for b in balance:
        out.append(nn.Sequential(*layers[i:i + b]))
        i += b
    return out


def balance_costs(costs: Sequence[float], num_stages: int) -> List[int]:
    """The balance minimising the largest stage cost (see the module docs)."""
    n, L = num_stages, len(costs)
    if not 1 <= n <= L:
        raise ValueError(f"cannot split {L} layers into {n} non-empty stages")
    prefix = [0.0]
    for c in costs:
        prefix.append(prefix[-1] + float(c))
    inf = float("inf")
    # best[k][i]: smallest max-cost of splitting the first i layers into k stages
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0.0
    for k in range(1, n + 1):
        for i in range(k, L - (n - k) + 1):
            for j in range(k - 1, i):
                v = max(best[k - 1][j], prefix[i] - prefix[j])
                if v < best[k][i]:
                    best[k][i], cut[k][i] = v, j
    balance, i = [], L
    for k in range(n, 0, -1):
        j = cut[k][i]
        balance.append(i - j)
        i = j
    return balance[::-1]


def balance_by_size(model: nn.Sequential, num_stages: int) -> List[int]:
    """Balance by parameter count (elements) per layer."""
    _check(model, num_stages)
    return balance_costs([sum(p.numel() for p in layer.parameters()) for layer in model], num_stages)


def balance_by_time(model: nn.Sequential, num_stages: int, sample: Union[Tensor, Sequence[Tensor]], *,
                    warmup: int = 2, repeat: int = 5, device: Optional[torch.device] = None) -> List[int]:
    """Balance by profiled forward + backward time per layer on ``sample``.

    Each layer is run ``warmup`` times untimed (allocator, kernels, lazy init), then timed
    ``repeat`` times; its cost is the median. CUDA layers are synchronised around each
    timing (profiling happens before training, never inside it). The model's parameters'
    gradients are left as they were.
    """
    _check(model, num_stages)
    if warmup < 0 or repeat < 1:
        raise ValueError("warmup must be >= 0 and repeat >= 1")
    given = as_tuple(sample, "balance_by_time's sample")
    device = torch.device(device) if device is not None else next(
        (p.device for p in model.parameters()), next(t.device for t in given if t is not None))
    x: Tuple[Optional[Tensor], ...] = tuple(None if t is None else t.to(device) for t in given)
    saved = [(p, p.grad) for p in model.parameters()]
    costs = []
    try:
        for layer in model:
            times = []
            for r in range(warmup + repeat):
                inputs = tuple(as_leaf(t) for t in x)
                _sync(device)
                t0 = time.perf_counter()
                out = as_tuple(layer(*inputs))
                floats = [o for o in out if o is not None and o.requires_grad]
                if floats:
                    torch.autograd.backward(floats, [torch.ones_like(o) for o in floats])
                _sync(device)
                if r >= warmup:
                    times.append(time.perf_counter() - t0)
            costs.append(statistics.median(times))
            x = tuple(None if o is None else o.detach() for o in out)  # None passes to the next layer
    finally:
        for p, g in saved:
            p.grad = g
    return balance_costs(costs, num_stages)


def split_by_size(model: nn.Sequential, num_stages: int) -> List[nn.Sequential]:
    """:func:`split_by_balance` with :func:`balance_by_size`."""
    return split_by_balance(model, balance_by_size(model, num_stages))


def split_by_time(model: nn.Sequential, num_stages: int, sample: Union[Tensor, Sequence[Tensor]],
                  **kwargs: Any) -> List[nn.Sequential]:
    """:func:`split_by_balance` with :func:`balance_by_time` (same keyword arguments)."""
    return split_by_balance(model, balance_by_time(model, num_stages, sample, **kwargs))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
