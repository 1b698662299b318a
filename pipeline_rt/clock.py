"""The schedule's clock: how long a schedule takes on N devices, from per-stage action costs.

On one CPU process the stages of a :class:`~pipeline_rt.Pipeline` run one after another, so its
wall time is the sum of every stage's work, not what a pipeline of N devices takes. This module
puts a schedule (:func:`pipeline_rt.schedule.build`) on the clock of N ideal devices instead:

* :func:`stage_clock`: stage ``k``'s ``F``, ``B`` and ``STEP`` take ``t_f[k]``, ``t_b[k]`` and
  ``t_step[k]`` seconds, transfers take nothing, and every stage runs its actions in order,
  each as soon as its inputs (the neighbour's send) are there;
* :func:`minibatch_times`: ``T[j]``, the time at which minibatch ``j``'s STEP has run at every
  stage; :func:`steady_period`: ``T[j+1] - T[j]`` in the steady state (warm-up and drain left
  out); :func:`at`: ``T`` at a fractional minibatch count;
* :func:`measure_costs`: the per-stage costs of a real pipeline on this machine: every F, B and
  STEP action of a short training run timed (the process's CPU time on one CPU thread, so that
  other jobs on the machine count less: they still share caches and, on SMT cores, the core;
  else wall time, on CUDA with the device synchronised around each action), the median over the
  steady-state minibatches.

``benchmarks/time_to_target.py``, ``benchmarks/utilisation.py`` and ``pipeoptim compare`` use it.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, Schedule, build

__all__ = ["stage_clock", "ideal_time", "minibatch_times", "steady_period", "at", "StageCosts", "measure_costs"]


def stage_clock(sched: Schedule, t_f: Sequence[float], t_b: Sequence[float],
                t_step: Sequence[float]) -> Tuple[List[List[float]], List[float]]:
    """Run ``sched`` on ideal devices where stage k's F takes ``t_f[k]``, B ``t_b[k]`` and STEP
    ``t_step[k]``, transfers take nothing, and every stage runs its actions in order, each as
    soon as its inputs (the neighbour's send) are there. Returns, per stage, the end time of each
    of its STEPs, and each stage's final clock."""
    n = sched.num_stages
    clock, pos = [0.0] * n, [0] * n
    sent: Dict[tuple, float] = {}
    steps: List[List[float]] = [[] for _ in range(n)]
    remaining = sum(len(a) for a in sched.actions)
    while remaining:
        progressed = False
        for k in range(n):
            acts = sched.actions[k]
            while pos[k] < len(acts):
                a = acts[pos[k]]
                kind = a.kind
                if kind == RECV_F or kind == RECV_B:
                    src = (SEND_F, k - 1, a.mb, a.micro) if kind == RECV_F else (SEND_B, k + 1, a.mb, a.micro)
                    t = sent.get(src)
                    if t is None:
                        break
                    if t > clock[k]:
                        clock[k] = t
                elif kind == SEND_F or kind == SEND_B:
                    sent[(kind, k, a.mb, a.micro)] = clock[k]
                elif kind == F:
                    clock[k] += t_f[k]
                elif kind == B:
                    clock[k] += t_b[k]
                elif kind == STEP:
                    clock[k] += t_step[k]
                    steps[k].append(clock[k])
                pos[k] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            raise RuntimeError("schedule cannot make progress")
    return steps, clock


def ideal_time(sched: Schedule, t_f: float, t_b: float, t_step: float = 0.0) -> float:
    """Makespan of ``sched`` when each F takes ``t_f``, B ``t_b``, STEP ``t_step`` at every stage
    and transfers nothing (:func:`stage_clock` with equal costs)."""
    n = sched.num_stages
    return max(stage_clock(sched, [t_f] * n, [t_b] * n, [t_step] * n)[1])


def minibatch_times(shape: str, num_stages: int, num_minibatches: int, chunks: int, t_f: Sequence[float],
                    t_b: Sequence[float], t_step: Sequence[float]) -> List[float]:
    """``T[j]``: the simulated time at which minibatch j's STEP has run at every stage (each stage's
    j-th STEP applies minibatch j's gradient in every shape)."""
    sched = build(shape, num_stages, num_minibatches, chunks)
    steps, _ = stage_clock(sched, t_f, t_b, t_step)
    return [max(s[j] for s in steps) for j in range(num_minibatches)]


def steady_period(shape: str, num_stages: int, chunks: int, t_f: Sequence[float], t_b: Sequence[float],
                  t_step: Sequence[float]) -> float:
    """Seconds per minibatch in the steady state: ``(T[2N+4] - T[N+4]) / N`` over a run of
    ``3N + 8`` minibatches (:func:`minibatch_times`), past the warm-up and before the drain of
    every shape."""
    n = num_stages
    ts = minibatch_times(shape, n, 3 * n + 8, chunks, t_f, t_b, t_step)
    return (ts[2 * n + 4] - ts[n + 4]) / n


def at(ts: Sequence[float], x: float) -> float:
    """``ts`` (one value per minibatch index) linearly interpolated at fractional index ``x``
    (clamped to the ends)."""
    if x <= 0:
        return ts[0]
    i = int(math.floor(x))
    if i >= len(ts) - 1:
        return ts[-1]
    return ts[i] + (x - i) * (ts[i + 1] - ts[i])


@dataclass
class StageCosts:
    """Measured seconds per action of each stage of one pipeline, and its schedule's shape.

    Attributes:
        t_f, t_b: per stage, seconds per forward / backward of one micro-batch.
        t_step: per stage, seconds per STEP (the optimizer step and the method's work there).
        shape, chunks: the schedule the pipeline runs (:func:`pipeline_rt.schedule.build`).
    """

    t_f: List[float]
    t_b: List[float]
    t_step: List[float]
    shape: str
    chunks: int

    @property
    def num_stages(self) -> int:
        """N, the number of stages (devices of the simulated pipeline)."""
        return len(self.t_f)

    def minibatch_times(self, num_minibatches: int) -> List[float]:
        """:func:`minibatch_times` of a run of ``num_minibatches`` with these costs."""
        return minibatch_times(self.shape, self.num_stages, num_minibatches, self.chunks, self.t_f, self.t_b,
                               self.t_step)

    def least(self, other: "StageCosts") -> "StageCosts":
        """Per stage and action, the smaller of this and ``other``'s cost (two measurements of
        the same pipeline: other processes on the machine only ever add time)."""
        if (self.shape, self.chunks, self.num_stages) != (other.shape, other.chunks, other.num_stages):
            raise ValueError(f"least: costs of different pipelines ({self.shape}, {self.chunks} chunks, "
                             f"{self.num_stages} stages vs {other.shape}, {other.chunks}, {other.num_stages})")
        def low(xs: List[float], ys: List[float]) -> List[float]:
            return [min(x, y) for x, y in zip(xs, ys)]
        return StageCosts(low(self.t_f, other.t_f), low(self.t_b, other.t_b), low(self.t_step, other.t_step),
                          self.shape, self.chunks)

    def period(self) -> float:
        """:func:`steady_period` with these costs: seconds per minibatch on N devices."""
        return steady_period(self.shape, self.num_stages, self.chunks, self.t_f, self.t_b, self.t_step)


def measure_costs(pipe: Any, batches: Sequence[Any], repeat: int = 8, rounds: int = 1,
                  timer: Optional[Callable[[], float]] = None) -> StageCosts:
    """Per-stage costs of ``pipe``'s F, B and STEP actions, measured by training it.

    Each of ``rounds`` training runs takes ``N + repeat + N`` minibatches (``batches`` cycled: it
    trains ``pipe``, so give it a copy); every F, B and STEP of the local executor is timed (the
    stage's work and the host work around it on that stage: slicing, the method's prediction,
    swaps and stashes; sends and receives are free in the simulation), and the per-stage cost is
    the median over the ``repeat`` steady-state minibatches (warm-up and drain left out), the
    least of the rounds' medians (other processes on the machine only ever add time).

    ``timer`` (seconds): by default :func:`time.process_time` (this process's CPU time) when every
    stage is on the CPU and torch runs one intra-op thread: the work itself, though other jobs
    still slow it through shared caches (and a shared SMT core); else :func:`time.perf_counter`
    (wall time), with each CUDA stage's device synchronised before and after its timed actions.
    """
    n = pipe.num_stages
    ex = pipe.executor
    times: Dict[Tuple[str, int], List[float]] = {}
    steps_done = [0] * n
    cuda = [torch.device(d) if torch.device(d).type == "cuda" else None for d in pipe.devices]
    if timer is None:
        one_cpu_thread = all(d is None for d in cuda) and torch.get_num_threads() == 1
        timer = time.process_time if one_cpu_thread else time.perf_counter

    def timed(kind: str, fn: Callable[[Any, Action], None]) -> Callable[[Any, Action], None]:
        def run(r: Any, a: Action) -> None:
            dev = cuda[a.stage]
            if dev is not None:
                torch.cuda.synchronize(dev)
            t0 = timer()
            fn(r, a)
            if dev is not None:
                torch.cuda.synchronize(dev)
            dt = timer() - t0
            mb = a.mb if kind != STEP else steps_done[a.stage]
            if kind == STEP:
                steps_done[a.stage] += 1
            if n <= mb < n + repeat:  # steady state: warm-up and drain left out
                times.setdefault((kind, a.stage), []).append(dt)
        return run

    saved = dict(ex._handlers)
    for kind in (F, B, STEP):
        ex._handlers[kind] = timed(kind, saved[kind])
    data = [batches[i % len(batches)] for i in range(2 * n + repeat)]
    best: Optional[StageCosts] = None
    try:
        for _ in range(rounds):
            times.clear()
            steps_done[:] = [0] * n
            pipe.train(data)
            t_f, t_b, t_step = ([statistics.median(times[(kind, k)]) for k in range(n)] for kind in (F, B, STEP))
            got = StageCosts(t_f, t_b, t_step, pipe.method.shape, pipe.chunks)
            best = got if best is None else best.least(got)
    finally:
        ex._handlers.update(saved)
    assert best is not None, "rounds must be at least 1"
    return best
