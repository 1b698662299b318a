"""Shared by tests/test_dist.py and tests/test_checkpoint.py: a tiny float64 pipeline, the
oracle run (the local executor in this process) and a launcher of gloo worker processes.

Workers are forked from a forkserver that has imported torch once, so a launch of four
ranks costs well under a second instead of four cold interpreter starts.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import socket
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline_rt.pipeline import Pipeline

WIDTH, ROWS, MINIBATCHES = 4, 8, 6


class Fault(nn.Module):
    """Wraps a stage: sleeps ``seconds`` before every forward, and on forward number
    ``at`` (counting from 1) kills this process (``kill``) or sleeps ``stall`` seconds."""

    def __init__(self, inner: nn.Module, seconds: float = 0.0, at: int = 0, kill: bool = False,
                 stall: float = 0.0) -> None:
        super().__init__()
        self.inner, self.seconds, self.at, self.kill, self.stall = inner, seconds, at, kill, stall
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        time.sleep(self.seconds)  # an injected slow stage, not synchronisation
        if self.calls == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(self.stall)  # an injected stall
        return self.inner(x)


class Pair(nn.Module):
    """Tuple boundaries: adds the previous stage's int64 labels (if given) to the input, and
    (unless last) returns ``(h, labels of h)``: a float and a non-floating tensor."""

    def __init__(self, inner: nn.Module, emit: bool) -> None:
        super().__init__()
        self.inner, self.emit = inner, emit

    def forward(self, x: torch.Tensor, labels: Optional[torch.Tensor] = None):
        if labels is not None:
            x = x + 0.1 * labels.unsqueeze(1).to(x.dtype)
        h = self.inner(x)
        return (h, h.argmax(dim=1)) if self.emit else h


@dataclass
class Spec:
    """One launch: the pipeline, the faults to inject, what to run."""

    world: int
    methods: Tuple[str, ...] = ("sync", "pipedream", "pipeoptim")
    faults: Dict[int, Dict[str, Any]] = field(default_factory=dict)  # stage -> Fault kwargs
    timeout: float = 60.0
    train: Dict[str, Any] = field(default_factory=dict)  # extra train() kwargs; "{method}" in strings
    minibatches: int = MINIBATCHES
    dropout: float = 0.0  # makes the run depend on the RNG streams
    tuples: bool = False  # stages exchange (float, int64) tuples
    ragged: bool = False  # the last minibatch has fewer rows
    rank_minibatches: Dict[int, int] = field(default_factory=dict)  # a rank given another number of minibatches
    stop_at: Optional[int] = None  # the callback returns False at this minibatch (on the last stage)
    evaluate: bool = False  # also evaluate on held-out data (uneven last batch) after training
    pipe: Dict[str, Any] = field(default_factory=dict)  # extra Pipeline kwargs


def make_stage(k: int, n: int, dropout: float = 0.0) -> nn.Module:
    """Stage ``k`` of ``n``: deterministic float64 weights from a per-stage seed."""
    g = torch.Generator().manual_seed(1000 + k)
    lin = nn.Linear(WIDTH, 1 if k == n - 1 else WIDTH).double()
    with torch.no_grad():
        for p in lin.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    return lin if k == n - 1 else nn.Sequential(lin, nn.Tanh(), nn.Dropout(dropout))


def batches(count: int = MINIBATCHES, ragged: bool = False) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(7)
    rows = [ROWS] * (count - 1) + [ROWS - 2 if ragged else ROWS]
    return [(torch.randn(r, WIDTH, generator=g, dtype=torch.float64),
             torch.randn(r, 1, generator=g, dtype=torch.float64)) for r in rows]


def pipeline(spec: Spec, method: str, backend: str, **kwargs: Any) -> Pipeline:
    """The pipeline of ``spec`` (faults injected with ``backend="dist"`` only)."""
    n = spec.world

    def factory(k: int):
        def build() -> nn.Module:
            module = make_stage(k, n, spec.dropout)
            module = Pair(module, emit=k < n - 1) if spec.tuples else module
            return Fault(module, **spec.faults[k]) if backend == "dist" and k in spec.faults else module
        return build

    extra = {"timeout": spec.timeout} if backend == "dist" else {}
    return Pipeline([factory(k) for k in range(n)], ["cpu"] * n, lambda ps: torch.optim.Adam(ps, lr=0.05),
                    nn.functional.mse_loss, method=method, backend=backend, **extra, **kwargs)


def weights(module: Optional[nn.Module]) -> Dict[str, torch.Tensor]:
    """A stage's parameters (wrappers' prefixes removed)."""
    while isinstance(module, (Fault, Pair)):
        module = module.inner
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def held_out() -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Evaluation data with an uneven last batch."""
    g = torch.Generator().manual_seed(11)
    return [(torch.randn(r, WIDTH, generator=g, dtype=torch.float64), torch.randn(r, 1, generator=g, dtype=torch.float64))
            for r in (ROWS, ROWS, 3)]


def step_lr(opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """A learning-rate schedule (picklable, for the worker processes)."""
    return torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)


def metric(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (out - target).abs().mean()


def _train(spec: Spec, pipe: Pipeline, data: Any, **kwargs: Any) -> Any:
    if spec.stop_at is not None:
        kwargs["callback"] = lambda info: info.step != spec.stop_at
    torch.manual_seed(0)  # dropout: every stage's stream starts from the process's state (ranks and the oracle alike)
    losses = pipe.train(data, **kwargs)
    return losses, pipe.evaluate(held_out(), metric) if spec.evaluate else None


def oracle(spec: Spec, method: str) -> Tuple[List[float], List[Dict[str, torch.Tensor]]]:
    """Losses and final weights of the local executor on the same pipeline and data."""
    pipe = pipeline(spec, method, "local", **spec.pipe)
    losses, _ = _train(spec, pipe, batches(spec.minibatches, spec.ragged), **spec.train)
    return losses, [weights(m) for m in pipe.stages]


def oracle_eval(spec: Spec, method: str) -> Any:
    """The local executor's evaluation after the same training."""
    return _train(spec, pipeline(spec, method, "local", **spec.pipe), batches(spec.minibatches, spec.ragged),
                  **spec.train)[1]


def _run(rank: int, spec: Spec) -> Dict[str, Any]:
    """One rank of a :class:`Spec`: per method, the losses, its stage's weights, the evaluation."""
    result: Dict[str, Any] = {}
    for method in spec.methods:
        pipe = pipeline(spec, method, "dist", **spec.pipe)
        kwargs = {k: v.format(method=method) if isinstance(v, str) else v for k, v in spec.train.items()}
        count = spec.rank_minibatches.get(rank, spec.minibatches)
        losses, evaluated = _train(spec, pipe, batches(count, spec.ragged), **kwargs)
        result[method] = (losses, weights(pipe.stages[rank]), evaluated)
    return result


def _worker(rank: int, spec: Any, port: int, out: str) -> None:
    """A rank: ``spec.run(rank)`` where the spec has one (another test's launch), else :func:`_run`."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(spec.world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        result = spec.run(rank) if hasattr(spec, "run") else _run(rank, spec)
    except BaseException:
        Path(out, f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    torch.save(result, Path(out, f"rank{rank}.pt"))


@dataclass
class Outcome:
    """What a launch left: exit codes, per-rank results or error texts, wall time."""

    exitcodes: List[Optional[int]]
    results: List[Optional[Dict[str, Any]]]
    errors: List[str]
    seconds: float


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(spec: Any, out: Path, deadline: float = 60.0, wait_for: Optional[Sequence[int]] = None,
           target: Callable[[int, Any, int, str], None] = _worker) -> Outcome:
    """Run ``spec.world`` gloo ranks of ``target(rank, spec, port, out)`` (default: this
    module's worker, which runs a :class:`Spec`, or any picklable object with ``world`` and
    ``run(rank) -> result``); wait until the ranks ``wait_for`` (default: all) have exited,
    at most ``deadline`` s, then kill what is left."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "torch._dynamo", "torch.distributed", "pipeline_rt.pipeline", "pipeline_rt.dist"])
    port = _free_port()
    procs = [ctx.Process(target=target, args=(r, spec, port, str(out))) for r in range(spec.world)]
    t0 = time.monotonic()
    for p in procs:
        p.start()
    waiting = {procs[r].sentinel for r in (range(spec.world) if wait_for is None else wait_for)}
    while waiting and time.monotonic() - t0 < deadline:
        waiting -= set(mp_connection.wait(list(waiting), deadline - (time.monotonic() - t0)))
    seconds = time.monotonic() - t0
    codes = [p.exitcode for p in procs]  # None: still running at the deadline
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    results = [torch.load(out / f"rank{r}.pt") if (out / f"rank{r}.pt").exists() else None for r in range(spec.world)]
    errors = [(out / f"rank{r}.err").read_text() if (out / f"rank{r}.err").exists() else "" for r in range(spec.world)]
    return Outcome(codes, results, errors, seconds)
