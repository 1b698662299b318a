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

Those build a whole run. A training run streams: :class:`LazySchedule` produces the same
actions on demand, one stage at a time, from a :class:`Cursor` (units forwarded, units
backwarded, STEPs done) and a question ``exists(j)`` (is there a minibatch ``j``?) asked
only when the stage is about to forward minibatch ``j``'s first micro-batch. Every shape is a
warm-up, a periodic steady state and a drain that starts when ``exists`` says no; the cost
of an action does not depend on the length of the run, and nothing grows with it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, NamedTuple, Optional, Sequence, Tuple

__all__ = [
    "Action", "Schedule", "SHAPES", "build", "simulate", "versions", "Simulation",
    "ScheduleError", "Cursor", "LazySchedule", "StageActions", "next_compute", "lower",
]

F, B, STEP = "F", "B", "STEP"
SEND_F, RECV_F, SEND_B, RECV_B = "SEND_F", "RECV_F", "SEND_B", "RECV_B"
COMPUTE = (F, B, STEP)
SHAPES = ("gpipe", "1f1b-flush", "async-1f1b")


_new = tuple.__new__  # Action's fields in order, without the generated __new__'s frame (hot path)


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

    def table(self, mark: Optional[Action] = None, offset: int = 0) -> str:
        """Stage x tick table; ``mark`` (any action) is highlighted where it runs;
        ``offset`` is added to every minibatch index shown (a window of a longer run)."""
        where = None
        if mark is not None:
            for t, row in enumerate(self.ticks):
                for k, a in enumerate(row):
                    if a is not None and _same(a, mark):
                        where = (t, k)
        cells = [[("" if a is None else str(a._replace(mb=a.mb + offset) if a.mb >= 0 else a)) for a in row]
                 for row in self.ticks]
        if where is not None:
            cells[where[0]][where[1]] = f">>{cells[where[0]][where[1]]}<<"
        width = max([len(c) for row in cells for c in row] + [4])
        lines = []
        for k in range(self.num_stages):
            line = " ".join(cells[t][k].ljust(width) for t in range(len(cells)))
            lines.append(f"stage {k}: {line}".rstrip())
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


# ----------------------------------------------------------------------------- lazy


@dataclass
class Cursor:
    """Where a stage is in its compute actions: ``nf`` units forwarded, ``nb`` units
    backwarded, ``steps`` STEPs done (units counted flat: ``u = j * chunks + m``)."""

    nf: int = 0
    nb: int = 0
    steps: int = 0

    def advance(self, a: Action) -> None:
        """Count compute action ``a`` as done."""
        if a.kind == F:
            self.nf += 1
        elif a.kind == B:
            self.nb += 1
        elif a.kind == STEP:
            self.steps += 1


def next_compute(shape: str, k: int, n: int, chunks: int, c: Cursor,
                 exists: Callable[[int], bool]) -> Optional[Action]:
    """Stage ``k``'s next compute action from cursor ``c`` (``None``: the stage is done).

    The rules of the three shapes (``w = N-1-k``; ``j = nb // chunks``, the minibatch of the
    next backward):

    * a STEP follows the backward of a minibatch's last micro-batch (``steps < nb // chunks``);
    * ``async-1f1b`` forwards while ``nf <= nb + w`` (warm-up ``w``, then one forward per
      backward), ``1f1b-flush`` does the same within minibatch ``j`` only, ``gpipe``
      forwards all of minibatch ``j`` first;
    * otherwise it backwards unit ``nb`` (``gpipe``: minibatch ``j``'s micro-batches in
      reverse) while some forwarded unit waits; a forward of a new minibatch ``j'`` happens
      only if ``exists(j')``, so the drain starts where the data ends.
    """
    if c.steps < c.nb // chunks:
        return _new(Action, (STEP, k, -1, -1))
    j = c.nb // chunks
    if shape == "async-1f1b":
        can_forward = c.nf <= c.nb + n - 1 - k
    elif shape == "1f1b-flush":
        can_forward = c.nf < (j + 1) * chunks and c.nf <= c.nb + n - 1 - k
    else:
        can_forward = c.nf < (j + 1) * chunks
    if can_forward and (c.nf % chunks or exists(c.nf // chunks)):
        return _new(Action, (F, k, c.nf // chunks, c.nf % chunks))
    if c.nb < c.nf:
        m = chunks - 1 - c.nb % chunks if shape == "gpipe" else c.nb % chunks
        return _new(Action, (B, k, j, m))
    return None


def lower(a: Action, n: int) -> Tuple[Action, ...]:
    """Compute action ``a`` with its transfers: receive right before use, send right after."""
    kind, k, mb, micro = a
    if kind == F:
        return ((_new(Action, (RECV_F, k, mb, micro)),) if k > 0 else ()) + (a,) + (
            (_new(Action, (SEND_F, k, mb, micro)),) if k < n - 1 else ())
    if kind == B:
        return ((_new(Action, (RECV_B, k, mb, micro)),) if k < n - 1 else ()) + (a,) + (
            (_new(Action, (SEND_B, k, mb, micro)),) if k > 0 else ())
    return (a,)


class StageActions:
    """Stage ``k``'s lowered actions, produced one at a time from its :class:`Cursor`.

    :meth:`peek` shows the next action (asking ``exists`` only when the next compute action
    could be a new minibatch's forward), :meth:`pop` counts it as done.
    """

    def __init__(self, sched: "LazySchedule", k: int, exists: Callable[[int], bool],
                 cursor: Optional[Cursor] = None) -> None:
        self.sched, self.k, self.exists = sched, k, exists
        self._pending: Tuple[Action, ...] = ()
        self._i = self._n = 0
        #: where the stage is
        self.cursor = Cursor() if cursor is None else cursor

    def restart(self, cursor: Cursor) -> None:
        """Continue from ``cursor`` (between two compute actions: a checkpoint's)."""
        self.cursor, self._pending, self._i, self._n = cursor, (), 0, 0

    def peek(self) -> Optional[Action]:
        if self._i == self._n:
            s = self.sched
            a = next_compute(s.shape, self.k, s.num_stages, s.chunks, self.cursor, self.exists)
            if a is None:
                return None
            self._pending, self._i = lower(a, s.num_stages), 0
            self._n = len(self._pending)
        return self._pending[self._i]

    def pop(self) -> Action:
        a = self._pending[self._i]
        self._i += 1
        if a.kind in COMPUTE:
            self.cursor.advance(a)
        return a

    def __iter__(self) -> Iterator[Action]:
        while True:
            a = self.peek()
            if a is None:
                return
            yield a
            self.pop()


class LazySchedule:
    """A schedule of any length, produced on demand (see the module docstring).

    Args:
        shape, num_stages, chunks: as for :func:`build`.

    Construction validates and simulates the lazily produced schedule of a bounded prefix
    (runs of 1, 2 and ``N + 2`` minibatches: warm-up, the steady state's period of one
    minibatch, and the drain) with :func:`validate` and :func:`simulate`;
    ``tests/test_schedule.py`` proves that this one equals :func:`build`'s for lengths
    1..40. It also finds the tick order's steady-state :attr:`period` then (once, so the
    first forward of a run waits for nothing). ``print()`` shows the table of an
    ``N + 2``-minibatch window.
    """

    def __init__(self, shape: str, num_stages: int, chunks: int = 1) -> None:
        if shape not in SHAPES:
            raise ScheduleError(f"unknown schedule shape {shape!r}; choose one of {SHAPES}")
        for name, v in (("num_stages", num_stages), ("chunks", chunks)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ScheduleError(f"{name} must be a positive int, got {v!r}")
        self.shape, self.num_stages, self.chunks = shape, num_stages, chunks
        self._ahead: Dict[Tuple[int, int, int, int, int], int] = {}
        for length in sorted({1, 2, num_stages + 2}):
            sched = self.finite(length)
            validate(sched)
            sched.simulation  # noqa: B018  (raises on deadlock)
        from .tickorder import Period  # (it imports this module)
        #: the steady state's period of the tick order (:class:`pipeline_rt.tickorder.Period`;
        #: ``None``: none found, the order is decided action by action)
        self.period: Optional[Period] = Period.find(
            lambda k, exists: StageActions(self, k, exists), num_stages, chunks, limit=16 * (num_stages + 2) * chunks)

    def actions(self, k: int, exists: Callable[[int], bool], cursor: Optional[Cursor] = None) -> StageActions:
        """Stage ``k``'s lowered actions from ``cursor`` (default: the start)."""
        return StageActions(self, k, exists, cursor)

    def distance(self, k: int, c: Cursor) -> int:
        """``s = v_B - v_F`` of the unit stage ``k`` is about to forward from cursor ``c``:
        the STEPs it will run before that unit's backward, counted on its own continuation.

        The continuation is taken with every minibatch present; where the data ends makes no
        difference (a drain only leaves out forwards, never moves a backward or a STEP relative
        to the backwards before it). The count depends on ``c`` only through
        ``(nf - nb, nf % chunks, nb % chunks, nb // chunks - steps)``, so it is memoised on that.
        """
        key = (k, c.nf - c.nb, c.nf % self.chunks, c.nb % self.chunks, c.nb // self.chunks - c.steps)
        s = self._ahead.get(key)
        if s is None:
            unit = (c.nf // self.chunks, c.nf % self.chunks)
            ahead = Cursor(c.nf, c.nb, c.steps)
            s = 0
            while True:
                a = next_compute(self.shape, k, self.num_stages, self.chunks, ahead, lambda j: True)
                if a is None:  # pragma: no cover - an infinite run always reaches the backward
                    raise ScheduleError(f"stage {k}: no backward of {unit} after {c}")
                if a.kind == B and a.unit == unit:
                    break
                s += a.kind == STEP
                ahead.advance(a)
            self._ahead[key] = s
        return s

    def order(self, stages: Sequence[StageActions], ready: Sequence[Tuple[str, int, int, int]] = ()) -> Iterator[Action]:
        """Every stage's actions in one dependency-respecting order, tick by tick: in each
        tick every stage runs its transfers and at most one compute action, a receive
        waiting for its send (the ideal machine of :func:`simulate`). Each action is
        yielded before it is counted as done, so ``exists`` is asked only after the
        actions before it have run. ``ready``: messages already in transit, as ``(RECV_F or
        RECV_B, receiving stage, minibatch, micro)``. The steady state is replayed from one
        recorded period (:mod:`pipeline_rt.tickorder`). Raises :class:`ScheduleError` on a deadlock."""
        from .tickorder import tick_order
        return tick_order(self.period, stages, set(ready))

    def finite(self, num_minibatches: int) -> Schedule:
        """The lazily produced schedule of a run of ``num_minibatches``, as a :class:`Schedule`."""
        exists = (lambda j: j < num_minibatches)
        acts = [list(self.actions(k, exists)) for k in range(self.num_stages)]
        return Schedule(self.shape, self.num_stages, num_minibatches, self.chunks, acts)

    def window(self, mark: Optional[Action] = None) -> str:
        """The stage x tick table of an ``N + 2``-minibatch run; a ``mark`` of a later
        minibatch is shown at the same place of the steady state (minibatch indices shifted)."""
        n = self.num_stages
        offset = 0
        if mark is not None and mark.mb > n:
            offset = mark.mb - n
            mark = mark._replace(mb=n)
        return self.finite(n + 2).simulation.table(mark, offset)

    def __str__(self) -> str:
        return (f"{self.shape} schedule: {self.num_stages} stages, x {self.chunks} micro-batches per minibatch "
                f"(a window of {self.num_stages + 2} minibatches; the steady state repeats until the data ends, "
                f"then the pipeline drains)\n" + self.window())
