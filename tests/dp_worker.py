"""Shared by tests/test_data_parallel.py and benchmarks/data_parallel.py: data-parallel
replicas of the tiny float64 pipeline of :mod:`dist_worker`, each replica with its own
minibatches, and the oracle: the local single pipeline on the concatenated minibatches.

Ranks are laid out ``"pipeline"``: rank ``r * N + k`` runs stage ``k`` of replica ``r``.
"""
from __future__ import annotations

import os
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from dist_worker import Fault, held_out, make_stage, metric, step_lr, weights
from pipeline_rt.pipeline import Pipeline

WIDTH = 4
Batches = List[Tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class Case:
    """One pipeline trained in a launch: ``method`` with extra ``Pipeline`` kwargs, and
    whether it checkpoints (every 2 minibatches, then resumes a fresh pipeline after 4)."""

    method: str
    pipe: Tuple[Tuple[str, Any], ...] = ()
    checkpoint: bool = False
    stop_at: Optional[int] = None  # the callback (replica 0's) stops at this minibatch

    @property
    def label(self) -> str:
        extra = ",".join(f"{k}={getattr(v, '__name__', v)}" for k, v in self.pipe)
        return self.method + (f"[{extra}]" if extra else "") + ("+checkpoint" if self.checkpoint else "") + \
            (f"+stop{self.stop_at}" if self.stop_at is not None else "")


@dataclass
class DPSpec:
    """One launch of ``replicas x stages`` ranks and the cases each runs, in order."""

    stages: int = 2
    replicas: int = 2
    cases: Tuple[Case, ...] = ()
    rows: Tuple[int, ...] = (8, 6)  # each replica's rows per minibatch (unequal: rows weighting)
    minibatches: int = 6
    counts: Dict[int, int] = field(default_factory=dict)  # replica -> another number of minibatches
    faults: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # rank -> Fault kwargs
    timeout: float = 30.0
    evaluate: bool = False

    @property
    def world(self) -> int:
        return self.stages * self.replicas


def shard(spec: DPSpec, replica: int, count: Optional[int] = None) -> Batches:
    """Replica ``replica``'s minibatches (its own rows per minibatch, its own values)."""
    g = torch.Generator().manual_seed(100 + replica)
    n = spec.rows[replica]
    count = spec.counts.get(replica, spec.minibatches) if count is None else count
    return [(torch.randn(n, WIDTH, generator=g, dtype=torch.float64), torch.randn(n, 1, generator=g, dtype=torch.float64))
            for _ in range(count)]


def concatenated(spec: DPSpec, chunks: int = 1) -> Batches:
    """The global minibatches: the replicas' ``j``-th minibatches concatenated in replica
    order, micro-batch by micro-batch (global micro-batch ``m`` = the replicas' micro-batches
    ``m``; with ``chunks=1`` the plain concatenation). Where a method runs the micro-batches
    of one minibatch on different weights (2bw), only this order is the same computation."""
    shards = [shard(spec, r) for r in range(spec.replicas)]

    def join(j: int, i: int) -> torch.Tensor:
        parts = [torch.tensor_split(s[j][i], chunks) for s in shards]
        return torch.cat([p[m] for m in range(chunks) for p in parts])
    return [(join(j, 0), join(j, 1)) for j in range(spec.minibatches)]


def eval_shard(replica: int) -> Batches:
    """Replica ``replica``'s evaluation data: a part of :func:`dist_worker.held_out` (the oracle's)."""
    data = held_out()
    return data[:2] if replica == 0 else data[2:]


def pipeline(spec: DPSpec, case: Case, backend: str, rank: int = 0) -> Pipeline:
    n = spec.stages

    def factory(k: int):
        def build() -> nn.Module:
            module = make_stage(k, n)
            return Fault(module, **spec.faults[rank]) if backend == "dist" and rank in spec.faults else module
        return build

    extra = {"timeout": spec.timeout, "data_parallel": spec.replicas} if backend == "dist" else {}
    return Pipeline([factory(k) for k in range(n)], ["cpu"] * n, lambda ps: torch.optim.Adam(ps, lr=0.05),
                    nn.functional.mse_loss, method=case.method, backend=backend, **extra, **dict(case.pipe))


def _train(case: Case, pipe: Pipeline, data: Batches, **kwargs: Any) -> List[float]:
    if case.stop_at is not None:
        kwargs["callback"] = lambda info: info.step != case.stop_at
    return pipe.train(data, **kwargs)


def oracle(spec: DPSpec, case: Case) -> Dict[str, Any]:
    """The local single pipeline on the concatenated minibatches: losses, weights, evaluation."""
    pipe = pipeline(spec, case, "local")
    losses = _train(case, pipe, concatenated(spec, pipe.chunks))
    return {"losses": losses, "weights": [weights(m) for m in pipe.stages],
            "eval": pipe.evaluate(held_out(), metric) if spec.evaluate else None,
            "forward": [pipe.forward(eval_shard(r)[0][0]) for r in range(spec.replicas)]}


def worker(rank: int, spec: DPSpec, port: int, out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    result: Dict[str, Any] = {}
    t0 = 0.0
    try:
        for i, case in enumerate(spec.cases):
            pipe = pipeline(spec, case, "dist", rank)
            t0 = time.monotonic()  # a failure's time is counted from the last pipeline's start
            replica, k = pipe.replica, next(i for i, m in enumerate(pipe.stages) if m is not None)
            data = shard(spec, replica)
            got: Dict[str, Any] = {"replica": replica, "stage": k}
            if case.checkpoint:
                ckpt = Path(out, f"ckpt-{i}")
                got["losses"] = _train(case, pipe, data, checkpoint_every=2, checkpoint_dir=ckpt)
                got["weights"] = weights(pipe.stages[k])
                again = pipeline(spec, case, "dist", rank)  # fresh weights, resumed after minibatch 4
                got["resumed"] = _train(case, again, data, resume_from=ckpt / "mb000004")
                got["resumed_weights"] = weights(again.stages[k])
            else:
                got["losses"] = _train(case, pipe, data)
                got["weights"] = weights(pipe.stages[k])
            if spec.evaluate:
                got["eval"] = pipe.evaluate(eval_shard(replica), metric)
                got["forward"] = pipe.forward(eval_shard(replica)[0][0])  # each replica its own inputs
            result[case.label] = got
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(f"{traceback.format_exc()}\nfailed after {time.monotonic() - t0:.2f} s\n")
        raise
    torch.save(result, Path(out, f"rank{rank}.pt"))


__all__ = ["Case", "DPSpec", "shard", "concatenated", "oracle", "worker", "step_lr"]
