"""Pipeline schedules as plain data.

A schedule is, for every stage, the list of actions it runs, in order:

* ``F`` / ``B``: forward / backward of one micro-batch ``(minibatch, micro)``;
* ``STEP``: one optimizer update (a first-class action: counting them gives every
  weight version);
* ``SEND_F`` / ``RECV_F``: the activation of a micro-batch to / from the next / previous stage;
* ``SEND_B`` / ``RECV_B``: the gradient of a micro-batch to / from the previous / next stage.

:func:`build` makes the compute order of one of three shapes (``gpipe``, ``1f1b-flush``,
``async-1f1b``) and lowers it (inserts the transfers); :func:`simulate` runs it on an ideal
machine (one tick per compute action, transfers free) and fails on a deadlock;
:func:`versions` derives, by counting STEPs, the weight version each forward and backward
sees and the prediction distance ``s = v_B - v_F``. Nothing here touches a tensor.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "Action", "Schedule", "SHAPES", "build", "simulate", "versions", "Simulation",
    "ScheduleError",
]

F, B, STEP = "F", "B", "STEP"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, STEP)
SHAPES = ("gpipe", "1f1b-flush", "async-1f1b")


class ScheduleError(ValueError):
    """A schedule that is malformed or cannot run (deadlock, wrong counts)."""


class Action(NamedTuple):
    """One action of one stage. ``mb``/``micro`` are -1 for ``STEP``."""

    kind: str
    stage: int
    mb: int = -1
    micro: int = -1

    @property
    def unit(self) -> Tuple[int, int]:
        """The micro-batch ``(minibatch, micro)`` this action works on."""
        return (self.mb, self.micro)

    def __str__(self) -> str:
        if self.kind == STEP:
            return "STEP"
        tag = {F: "F", B: "B", SEND_F: "sF", RECV_F: "rF", SEND_B: "sB", RECV_B: "rB"}[self.kind]
        return f"{tag}{self.mb}" + (f".{self.micro}" if self.micro else "")


@dataclass
class Schedule:
    """Per-stage action lists plus the parameters they were built from."""

    shape: str
    num_stages: int
    num_minibatches: int
    chunks: int
    actions: List[List[Action]]
    _sim: Optional["Simulation"] = field(default=None, repr=False, compare=False)
    _versions: Optional[List[Dict[Tuple[int, int], "Versions"]]] = field(default=None, repr=False, compare=False)

    def compute(self, stage: int) -> List[Action]:
        """Stage ``stage``'s F/B/STEP actions, transfers left out."""
        return [a for a in self.actions[stage] if a.kind in COMPUTE]

    @property
    def simulation(self) -> "Simulation":
        """The (cached) ideal-machine run of this schedule; see :func:`simulate`."""
        if self._sim is None:
            self._sim = simulate(self)
        return self._sim

    @property
    def weight_versions(self) -> List[Dict[Tuple[int, int], "Versions"]]:
        """The (cached) :func:`versions` of this schedule; shared, do not modify."""
        if self._versions is None:
            self._versions = versions(self)
        return self._versions

    def order(self) -> Iterator[Action]:
        """All actions of all stages in one dependency-respecting order (tick by tick)."""
        return iter(self.simulation.order)

    def table(self, mark: Optional[Action] = None) -> str:
        """The stage x tick table of compute actions; ``mark`` is shown as ``>>X<<``."""
        return self.simulation.table(mark)

    def __str__(self) -> str:
        head = (f"{self.shape} schedule: {self.num_stages} stages, {self.num_minibatches} minibatches"
                f" x {self.chunks} micro-batches")
        return head + "\n" + self.table()


# ----------------------------------------------------------------------------- building


def build(shape: str, num_stages: int, num_minibatches: int, chunks: int = 1) -> Schedule:
    """Build and lower a schedule, then validate and simulate it.

    Args:
        shape: ``"gpipe"`` (per minibatch: all forwards, all backwards, STEP: a flush),
            ``"1f1b-flush"`` (per minibatch: 1F1B over its micro-batches, STEP, flush) or
            ``"async-1f1b"`` (PipeDream: stage k runs ``w_k = N-1-k`` warm-up forwards,
            then alternates one forward and one backward across minibatch boundaries
            without flushing, then drains; STEP after the backward of each minibatch's
            last micro-batch).
        num_stages: N >= 1.
        num_minibatches: number of minibatches (one STEP each per stage).
        chunks: micro-batches per minibatch (gradients accumulate over them).
    """
    if shape not in SHAPES:
        raise ScheduleError(f"unknown schedule shape {shape!r}; choose one of {SHAPES}")
    for name, v in (("num_stages", num_stages), ("num_minibatches", num_minibatches), ("chunks", chunks)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ScheduleError(f"{name} must be a positive int, got {v!r}")
    n = num_stages
    compute = [_compute_order(shape, k, n, num_minibatches, chunks) for k in range(n)]
    sched = Schedule(shape, n, num_minibatches, chunks, [_lower(k, n, acts) for k, acts in enumerate(compute)])
    validate(sched)
    sched.simulation  # noqa: B018  (raises on deadlock)
    return sched


def _compute_order(shape: str, k: int, n: int, num_mb: int, chunks: int) -> List[Action]:
    units = [(j, m) for j in range(num_mb) for m in range(chunks)]
    out: List[Action] = []
    backwards_done = [0] * num_mb

    def fwd(u):
        out.append(Action(F, k, *u))

    def bwd(u):
        out.append(Action(B, k, *u))
        backwards_done[u[0]] += 1
        if backwards_done[u[0]] == chunks:  # the minibatch's gradient is complete
            out.append(Action(STEP, k))

    if shape == "gpipe":
        for j in range(num_mb):
            mine = units[j * chunks:(j + 1) * chunks]
            for u in mine:
                fwd(u)
            for u in reversed(mine):
                bwd(u)
        return out
    if shape == "1f1b-flush":
        for j in range(num_mb):
            _one_f_one_b(units[j * chunks:(j + 1) * chunks], n - 1 - k, fwd, bwd)
        return out
    _one_f_one_b(units, n - 1 - k, fwd, bwd)
    return out


def _one_f_one_b(units: Sequence[Tuple[int, int]], warmup: int, fwd, bwd) -> None:
    """Warm-up forwards, then alternate F(i + warmup), B(i), then drain the backwards."""
    warmup = min(warmup, len(units))
    for u in units[:warmup]:
        fwd(u)
    for i in range(len(units)):
        if i + warmup < len(units):
            fwd(units[i + warmup])
        bwd(units[i])


def _lower(k: int, n: int, compute: List[Action]) -> List[Action]:
    """Insert the transfers: receive right before use, send right after production."""
    out: List[Action] = []
    for a in compute:
        if a.kind == F:
            if k > 0:
                out.append(Action(RECV_F, k, a.mb, a.micro))
            out.append(a)
            if k < n - 1:
                out.append(Action(SEND_F, k, a.mb, a.micro))
        elif a.kind == B:
            if k < n - 1:
                out.append(Action(RECV_B, k, a.mb, a.micro))
            out.append(a)
            if k > 0:
                out.append(Action(SEND_B, k, a.mb, a.micro))
        else:
            out.append(a)
    return out


def validate(sched: Schedule) -> None:
    """Check counts and local order: every unit forwarded and backwarded once per stage,
    each F before its B, one STEP per minibatch, sends matching receives."""
    units = {(j, m) for j in range(sched.num_minibatches) for m in range(sched.chunks)}
    for k, acts in enumerate(sched.actions):
        seen_f, seen_b = set(), set()
        for a in acts:
            if a.stage != k:
                raise ScheduleError(f"stage {k} holds an action of stage {a.stage}: {a}")
            if a.kind == F:
                if a.unit in seen_f:
                    raise ScheduleError(f"stage {k}: {a} runs twice")
                seen_f.add(a.unit)
            elif a.kind == B:
                if a.unit not in seen_f:
                    raise ScheduleError(f"stage {k}: {a} comes before its forward")
                if a.unit in seen_b:
                    raise ScheduleError(f"stage {k}: {a} runs twice")
                seen_b.add(a.unit)
        if seen_f != units or seen_b != units:
            raise ScheduleError(f"stage {k}: forwards/backwards do not cover every micro-batch exactly once")
        steps = sum(a.kind == STEP for a in acts)
        if steps != sched.num_minibatches:
            raise ScheduleError(f"stage {k}: {steps} STEPs for {sched.num_minibatches} minibatches")
    for k in range(sched.num_stages - 1):
        sends = [a.unit for a in sched.actions[k] if a.kind == SEND_F]
        recvs = [a.unit for a in sched.actions[k + 1] if a.kind == RECV_F]
        gsends = [a.unit for a in sched.actions[k + 1] if a.kind == SEND_B]
        grecvs = [a.unit for a in sched.actions[k] if a.kind == RECV_B]
        if sends != recvs or gsends != grecvs:
            raise ScheduleError(f"stages {k} and {k + 1}: sends and receives are not in the same order")


# ----------------------------------------------------------------------------- simulating


@dataclass
class Simulation:
    """An ideal-machine run: each compute action takes one tick, transfers take none.

    Attributes:
        ticks: ``ticks[t][k]`` is the compute action stage k ran at tick t (or None).
        order: every action (transfers included) in an order that respects dependencies.
        peak_in_flight: per stage, the most micro-batches forwarded but not yet backwarded.
    """

    ticks: List[List[Optional[Action]]]
    order: List[Action]
    peak_in_flight: List[int]
    num_stages: int

    def table(self, mark: Optional[Action] = None) -> str:
        """Stage x tick table; ``mark`` (any action) is highlighted where it runs."""
        where = None
        if mark is not None:
            for t, row in enumerate(self.ticks):
                for k, a in enumerate(row):
                    if a is not None and _same(a, mark):
                        where = (t, k)
        cells = [[("" if a is None else str(a)) for a in row] for row in self.ticks]
        if where is not None:
            cells[where[0]][where[1]] = f">>{cells[where[0]][where[1]]}<<"
        width = max([len(c) for row in cells for c in row] + [4])
        lines = []
        for k in range(self.num_stages):
            row = " ".join(cells[t][k].ljust(width) for t in range(len(cells)))
            lines.append(f"stage {k}: {row}".rstrip())
        if mark is not None and where is None:
            lines.append(f"(failing action: stage {mark.stage} {mark})")
        return "\n".join(lines)


def _same(a: Action, b: Action) -> bool:
    if b.kind in COMPUTE:
        return a == b
    # a transfer is shown on the compute action it serves
    serves = {SEND_F: F, RECV_F: F, SEND_B: B, RECV_B: B}[b.kind]
    return a == Action(serves, b.stage, b.mb, b.micro)


def simulate(sched: Schedule) -> Simulation:
    """Run the schedule tick by tick; raise :class:`ScheduleError` with the table on deadlock.

    A ``RECV_F(u)`` at stage k is ready once stage k-1 has done ``SEND_F(u)``; likewise for
    gradients. Sends never block (they are buffered), so a deadlock is a cycle of receives.
    """
    n = sched.num_stages
    pos = [0] * n
    sent = set()  # (kind, stage, unit) of completed sends
    ticks: List[List[Optional[Action]]] = []
    order: List[Action] = []
    in_flight = [0] * n
    peak = [0] * n
    total = sum(len(a) for a in sched.actions)
    done = 0
    while done < total:
        row: List[Optional[Action]] = [None] * n
        progressed = False
        for k in range(n):
            acts = sched.actions[k]
            computed = False
            while pos[k] < len(acts):
                a = acts[pos[k]]
                if a.kind == RECV_F and (SEND_F, k - 1, a.unit) not in sent:
                    break
                if a.kind == RECV_B and (SEND_B, k + 1, a.unit) not in sent:
                    break
                if a.kind in COMPUTE:
                    if computed:
                        break
                    computed = True
                    row[k] = a
                    if a.kind == F:
                        in_flight[k] += 1
                        peak[k] = max(peak[k], in_flight[k])
                    elif a.kind == B:
                        in_flight[k] -= 1
                if a.kind in (SEND_F, SEND_B):
                    sent.add((a.kind, k, a.unit))
                order.append(a)
                pos[k] += 1
                done += 1
                progressed = True
        if not progressed:
            ticks.append(row)
            stuck = [sched.actions[k][pos[k]] for k in range(n) if pos[k] < len(sched.actions[k])]
            partial = Simulation(ticks, order, peak, n)
            raise ScheduleError(
                "schedule deadlocks; waiting: " + ", ".join(f"stage {a.stage} {a}" for a in stuck)
                + "\n" + partial.table())
        ticks.append(row)
    return Simulation(ticks, order, peak, n)


# ----------------------------------------------------------------------------- versions


class Versions(NamedTuple):
    """Weight versions of one micro-batch at one stage (counted in STEPs)."""

    forward: int
    backward: int

    @property
    def s(self) -> int:
        """Prediction distance: updates between this micro-batch's forward and backward."""
        return self.backward - self.forward


def versions(sched: Schedule) -> List[Dict[Tuple[int, int], Versions]]:
    """Per stage, ``{(minibatch, micro): Versions(v_F, v_B)}``, by counting STEPs.

    For ``async-1f1b`` with one micro-batch per minibatch this gives
    ``v_F(j) = max(0, j - w_k)``, ``v_B(j) = j`` and ``s_k(j) = min(j, N-1-k)``.
    """
    out = []
    for k in range(sched.num_stages):
        steps, fwd, table = 0, {}, {}
        for a in sched.compute(k):
            if a.kind == STEP:
                steps += 1
            elif a.kind == F:
                fwd[a.unit] = steps
            else:
                table[a.unit] = Versions(fwd[a.unit], steps)
        out.append(table)
    return out
