"""Shared by tests/test_split.py and its distributed case: a model whose tensor is used three
stages later, as a traced split (``split_model``), as hand-written stages with a declared skip,
and as the oracle's hand-written chain that passes the tensor explicitly; and the worker that
trains them under ``backend="dist"`` (launched by :func:`dist_worker.launch`).

Kept free of transformers, so that the worker processes start fast.
"""
from __future__ import annotations

import copy
import os
import traceback
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_rt import Pipeline, split_model
from pipeline_rt.skip import pop, skippable, stash

WIDTH = 4
SKIP_SPLITS = ["l1", "l2", "l3"]
#: the distributed launch's minibatches: 7 rows in 4 micro-batches of 2, 2, 2, 1 (the dist transport
#: fixes each micro-batch's shapes at its first message, so no short last minibatch there)
DIST_ROWS = (7, 7, 7, 7)
#: what the distributed launch trains: (kind, method)
DIST_CASES = [(kind, method) for kind in ("split", "skip") for method in ("sync", "pipedream", "pipeoptim")]


class SkipNet(nn.Module):
    """h0 = tanh(l0 x) is used after l3, three stages later (split before l1, l2, l3)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(3)
        self.l0, self.l1, self.l2 = nn.Linear(WIDTH, 6), nn.Linear(6, 6), nn.Linear(6, 6)
        self.l3 = nn.Linear(6, 1)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        h0 = torch.tanh(self.l0(x))
        h = torch.tanh(self.l2(torch.tanh(self.l1(h0))))
        return self.l3(h) * h0[:, :1]


@skippable(stash=["h0"])
class First(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, x: Tensor) -> Any:
        h0 = torch.tanh(self.lin(x))
        yield stash("h0", h0)
        return h0


class Middle(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, h: Tensor) -> Tensor:
        return torch.tanh(self.lin(h))


@skippable(pop=["h0"])
class Last(nn.Module):
    def __init__(self, lin: nn.Linear) -> None:
        super().__init__()
        self.lin = lin

    def forward(self, h: Tensor) -> Any:
        h0 = yield pop("h0")
        return self.lin(h) * h0[:, :1]


class Carry(nn.Module):
    """The oracle's hand-written stage: the skipped tensor passed explicitly along the chain."""

    def __init__(self, k: int, lin: nn.Linear) -> None:
        super().__init__()
        self.k, self.lin = k, lin

    def forward(self, h: Tensor, h0: Any = None) -> Any:
        if self.k == 0:
            h0 = torch.tanh(self.lin(h))
            return h0, h0
        if self.k == 3:
            return self.lin(h) * h0[:, :1]
        return torch.tanh(self.lin(h)), h0


def skip_stages(kind: str) -> List[nn.Module]:
    """The four stages of SkipNet: declared skips ("skip") or the explicit chain ("carry")."""
    net = SkipNet()
    lins = [net.l0, net.l1, net.l2, net.l3]
    if kind == "skip":
        return [First(lins[0]), Middle(lins[1]), Middle(lins[2]), Last(lins[3])]
    return [Carry(k, lin) for k, lin in enumerate(lins)]


def skip_data(rows: Sequence[int] = (8, 8, 8, 8, 5)) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(r, WIDTH, generator=g, dtype=torch.float64),
             torch.randn(r, 1, generator=g, dtype=torch.float64)) for r in rows]


_TRACED: List[Any] = []


def skip_stages_cached(kind: str) -> List[nn.Module]:
    """:func:`skip_stages`, the traced SkipNet traced once per process (reset to its initial weights)."""
    if kind != "split":
        return skip_stages(kind)
    if not _TRACED:
        net = SkipNet()
        _TRACED.append((net, split_model(net, SKIP_SPLITS, (torch.zeros(5, WIDTH, dtype=torch.float64),)),
                        copy.deepcopy(net.state_dict())))
    net, stages, init = _TRACED[0]
    net.load_state_dict(init)
    return list(stages)


def adam(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=0.05)


def run_skip(kind: str, method: str, backend: str = "local", data: Any = None,
             evaluate: bool = False) -> Tuple[List[float], List[Tensor], Any]:
    """Losses, the final weights (of this process's stages) and, with ``evaluate``, the
    evaluation on held-out data of SkipNet's ``kind`` of stages."""
    stages = skip_stages_cached(kind)
    pipe = Pipeline(stages, ["cpu"] * 4, adam, F.mse_loss, method=method, backend=backend)
    losses = pipe.train(skip_data() if data is None else data)
    weights = [p.detach().clone() for s in pipe.stages if s is not None for p in s.parameters()]
    evaluated = pipe.evaluate(skip_data((6, 3))) if evaluate else None
    if backend == "dist":
        pipe.close()
    return losses, weights, evaluated


def dist_worker(rank: int, spec: Any, port: int, out: str) -> None:
    """One rank of the launch: every case of :data:`DIST_CASES`, results saved for the test."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: Dict[Tuple[str, str], Any] = {}
    try:
        for case in DIST_CASES:
            result[case] = run_skip(*case, backend="dist", data=skip_data(DIST_ROWS), evaluate=True)
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    torch.save(result, Path(out, f"rank{rank}.pt"))
