"""Shared by tests/test_ties.py and its gloo ranks: a 4-stage token model whose output
projection is its input embedding (GPT-2's tie), its data, and one launch's worth of
``backend="dist"`` runs (:class:`TieRuns`, launched by :func:`dist_worker.launch`).

Stage 0 embeds, stages 1-2 are tanh layers, stage 3 projects back with the embedding's
weight.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

from pipeline_rt import Pipeline

VOCAB, WIDTH, ROWS, MINIBATCHES, N = 11, 6, 8, 5, 4
TIE = {0: "weight", 3: "weight"}


class Head(nn.Module):
    """The output projection: logits = h @ weight.T (weight: the embedding's when tied)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(VOCAB, WIDTH, dtype=torch.float64) * 0.5)

    def forward(self, h: Tensor) -> Tensor:
        return h @ self.weight.t()


def modules(seed: int = 0, tied: bool = True) -> List[nn.Module]:
    """The four stages (float64); the head shares the embedding's Parameter when ``tied``."""
    torch.manual_seed(seed)
    embed = nn.Embedding(VOCAB, WIDTH, dtype=torch.float64)
    mid = [nn.Sequential(nn.Linear(WIDTH, WIDTH, dtype=torch.float64), nn.Tanh()) for _ in range(2)]
    head = Head()
    if tied:
        head.weight = embed.weight
    return [embed, *mid, head]


def data(count: int = MINIBATCHES) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [(torch.randint(VOCAB, (ROWS,), generator=g), torch.randint(VOCAB, (ROWS,), generator=g))
            for _ in range(count)]


def adamw(params: Any) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=0.05, weight_decay=0.1)


def _stage(k: int) -> nn.Module:
    """Stage ``k`` built apart (its own copy of the tie, a different value at stage 3)."""
    return modules(seed=0 if k < N - 1 else 5, tied=False)[k]


@dataclass
class TieRuns:
    """Every rank: ``sync`` with factories and a declared tie, ``1f1b-flush`` with the stages
    as modules (the tie found), and ``sync`` resumed from a checkpoint in ``folder``."""

    folder: str
    world: int = N

    def run(self, rank: int) -> Dict[str, Any]:
        def train(pipe: Pipeline, **kwargs: Any) -> Tuple[List[float], Dict[str, Tensor]]:
            losses = pipe.train(kwargs.pop("batches", data()), **kwargs)
            return losses, {n: p.detach().clone() for n, p in pipe.stages[rank].named_parameters()}

        def declared() -> Pipeline:
            return Pipeline([lambda k=k: _stage(k) for k in range(N)], ["cpu"] * N, adamw,
                            nn.functional.cross_entropy, method="sync", backend="dist", ties=[TIE], timeout=60)

        out = {"declared": train(declared())}
        found = Pipeline(modules(), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="1f1b-flush",
                         backend="dist", timeout=60)
        out["found"] = train(found)
        out["found_ties"] = found.ties
        train(declared(), batches=data(3), checkpoint_every=1, checkpoint_dir=self.folder)
        out["resumed"] = train(declared(), resume_from=f"{self.folder}/mb000002")
        found.close()
        return out


TIE2 = {0: "weight", 1: "1.weight"}


def two_stages(seed: int = 0, tied: bool = True) -> List[nn.Module]:
    """A 2-stage version: the embedding, then a tanh layer and the tied projection."""
    embed, mid, _, head = modules(seed, tied)
    return [embed, nn.Sequential(mid, head)]


def shard(replica: int) -> List[Tuple[Tensor, Tensor]]:
    """Replica ``replica``'s minibatches (its own token ids)."""
    g = torch.Generator().manual_seed(30 + replica)
    return [(torch.randint(VOCAB, (ROWS,), generator=g), torch.randint(VOCAB, (ROWS,), generator=g))
            for _ in range(MINIBATCHES)]


def _apart(k: int) -> nn.Module:
    """Stage ``k`` of :func:`two_stages` built apart: stage 1's copy of the tie has another value."""
    stage = two_stages(tied=False)[k]
    if k == 1:
        with torch.no_grad():
            stage[1].weight.add_(1.0)
    return stage


@dataclass
class TieReplicas:
    """Every rank of 2 stages x 2 data-parallel replicas: ``sync`` with a declared tie between
    the stages (built apart), each replica on its own shard."""

    world: int = 4

    def run(self, rank: int) -> Dict[str, Any]:
        pipe = Pipeline([lambda k=k: _apart(k) for k in range(2)],
                        ["cpu"] * 2, adamw, nn.functional.cross_entropy, method="sync", backend="dist",
                        ties=[TIE2], data_parallel=2, timeout=60)
        k = next(i for i, m in enumerate(pipe.stages) if m is not None)
        losses = pipe.train(shard(pipe.replica))
        out = {"replica": pipe.replica, "stage": k, "losses": losses,
               "weights": {n: p.detach().clone() for n, p in pipe.stages[k].named_parameters()}}
        pipe.close()
        return out
