"""The tick order of a lazy schedule, with its steady state replayed from one recorded period.

:meth:`~pipeline_rt.schedule.LazySchedule.order` runs every stage's actions on the ideal
machine of :func:`~pipeline_rt.schedule.simulate` as they are produced (:func:`ticks`): in
each tick every stage runs its transfers and at most one compute action, a receive waiting
for its send. Deciding every action afresh (the stage's next compute action from its cursor,
its transfers, the receive's message) is most of the local executor's own work per action.

The loop is a deterministic function of its state at a tick boundary (every stage's cursor
and pending actions, and the messages in flight) and of the answers to ``exists(j)``. With
every minibatch present that state is periodic after the warm-up: it recurs shifted by
``delta`` minibatches. :meth:`Period.find` finds the period once per schedule, running the
loop on a run that never ends, and records what the loop does over one period: the actions
it yields and each question ``exists(j)`` at the place it asks it, minibatch indices relative
to the period's start (``b``: stage 0's STEPs then).

A run's order is then: the loop, until its state equals the period's start state shifted by
some ``b``; the period replayed with minibatch indices shifted by ``b``, ``b + delta``, ...,
each question asked where the loop asks it; and, at the first question answered no (the data
ended, or the run was stopped), the loop again, restarted from the state at the start of the
current period and run over the actions already yielded in it without yielding them again
(the questions asked there get the answers they got). Being the same deterministic function
of the same state and answers, it is exactly the order of the loop alone
(``tests/test_tickorder.py`` checks every shape, depth 1..8, chunks 1..4, length 1..40, and
runs resumed mid-way). A replayed action costs a tuple and a counter; nothing grows with the run.
"""
from __future__ import annotations

import itertools
from typing import Callable, Dict, FrozenSet, Iterator, List, Optional, Sequence, Set, Tuple, cast

from .schedule import RECV_B, RECV_F, SEND_B, SEND_F, STEP, F, B, Action, Cursor, ScheduleError, StageActions, _new

__all__ = ["ticks", "tick_order", "Period"]

#: a message in flight: (the receive that takes it, receiving stage, minibatch, micro)
Message = Tuple[str, int, int, int]
#: an action with its minibatch relative to a base (``None`` for a STEP)
_Rel = Tuple[str, int, Optional[int], int]
#: one stage at a tick boundary, relative to ``b``: (nf - chunks b, nb - chunks b, steps - b,
#: index into the pending actions, the pending actions)
_StageState = Tuple[int, int, int, int, Tuple[_Rel, ...]]
State = Tuple[Tuple[_StageState, ...], FrozenSet[Message]]

# what a recorded entry does: a transfer, F, B, STEP, or ask ``exists``
_MOVE, _F, _B, _STEP, _ASK = range(5)
_OPS = {SEND_F: _MOVE, RECV_F: _MOVE, SEND_B: _MOVE, RECV_B: _MOVE, F: _F, B: _B, STEP: _STEP}


def ticks(stages: Sequence[StageActions], waiting: Set[Message],
          at_tick: Optional[Callable[[], bool]] = None) -> Iterator[Action]:
    """Every stage's actions in one dependency-respecting order, tick by tick: in each tick
    every stage runs its transfers and at most one compute action, a receive waiting for its
    send (in ``waiting``, updated in place). Each action is yielded before it is counted as
    done, so ``exists`` is asked only after the actions before it have run. ``at_tick()``, if
    given, is called before every tick; when it returns true the order stops there.
    Raises :class:`ScheduleError` on a deadlock."""
    while True:
        if at_tick is not None and at_tick():
            return
        progressed = alive = False
        for it in stages:
            computed = False
            while True:
                # it.peek() and it.pop(), inlined: this loop runs once per action of the run
                if it._i == it._n:
                    if it.peek() is None:
                        break
                a = it._pending[it._i]
                alive = True
                kind = a.kind
                if kind == RECV_F or kind == RECV_B:
                    key = (kind, a.stage, a.mb, a.micro)
                    if key not in waiting:
                        break
                    waiting.discard(key)
                elif kind == SEND_F:
                    waiting.add((RECV_F, a.stage + 1, a.mb, a.micro))
                elif kind == SEND_B:
                    waiting.add((RECV_B, a.stage - 1, a.mb, a.micro))
                elif computed:
                    break
                else:
                    computed = True
                yield a
                it._i += 1
                if kind == F:  # it.cursor.advance(a), inlined
                    it.cursor.nf += 1
                elif kind == B:
                    it.cursor.nb += 1
                elif kind == STEP:
                    it.cursor.steps += 1
                progressed = True
        if not alive:
            return
        if not progressed:
            stuck = [(it.k, it.peek()) for it in stages if it.peek() is not None]
            raise ScheduleError("schedule deadlocks; waiting: " + ", ".join(f"stage {k} {a}" for k, a in stuck))


def tick_order(period: Optional["Period"], stages: Sequence[StageActions], waiting: Set[Message]) -> Iterator[Action]:
    """The order of :func:`ticks`, replayed from ``period``'s recordings where the loop's state
    is one they start from (``None``: the loop alone). ``stages``: stage ``k``'s at index ``k``."""
    if period is None or [it.k for it in stages] != list(range(period.num_stages)):
        return ticks(stages, waiting)
    found: List[Tuple[_Segment, int]] = []
    return itertools.chain(ticks(stages, waiting, period.matcher(stages, waiting, found)),
                           period.replay(stages, waiting, found))


class _Segment:
    """What the loop does from one state (relative to a base ``b``) given the answers its
    questions got: ``entries`` are ``(op, stage, mb, micro, kind)`` for an action, ``(ASK,
    stage, j, index of the entry, answer)`` for a question ``exists(j)``; after the last entry
    the loop goes on as ``then`` from ``b + shift`` (``None``: the loop ended). ``branches[i]``:
    the recorded segment from the same state whose question ``i`` got the other answer."""

    __slots__ = ("start", "entries", "then", "shift", "branches")

    def __init__(self, start: State, entries: List[Tuple[int, int, int, int, object]],
                 then: Optional["_Segment"] = None, shift: int = 0) -> None:
        self.start, self.entries, self.then, self.shift = start, entries, then, shift
        self.branches: Dict[int, _Segment] = {}


class Period:
    """The recorded tick order of a schedule (see the module docstring): the warm-up from the
    start, the steady state's period, and the drains met so far.

    Attributes:
        num_stages, chunks: the schedule's.
        warmup: the segment from the initial state (every stage at the start, nothing in flight).
        period: the segment from the steady state's start, which goes on as itself shifted by
            ``delta`` minibatches.
    """

    def __init__(self, num_stages: int, chunks: int, warmup: _Segment, period: _Segment, limit: int) -> None:
        self.num_stages, self.chunks, self.warmup, self.period = num_stages, chunks, warmup, period
        self.delta = period.shift
        self._limit = limit  # the most entries a branch recording may take

    @classmethod
    def find(cls, make: Callable[[int, Callable[[int], bool]], StageActions], num_stages: int, chunks: int,
             limit: int) -> Optional["Period"]:
        """Run the loop on a run that never ends (``make(k, exists)``: stage ``k``'s actions)
        until a tick-boundary state recurs, shifted; ``None`` if none does within ``limit`` ticks."""
        log: List[object] = []

        def asker(k: int) -> Callable[[int], bool]:
            def exists(j: int) -> bool:
                log.append((_ASK, k, j))
                return True
            return exists

        stages = [make(k, asker(k)) for k in range(num_stages)]
        waiting: Set[Message] = set()
        seen: Dict[State, Tuple[int, int]] = {}
        found: List[Tuple[State, Tuple[int, int], Tuple[int, int]]] = []

        def at_tick() -> bool:
            state, b = _state(stages, waiting, chunks)
            if state in seen:
                found.append((state, seen[state], (len(log), b)))
                return True
            seen[state] = (len(log), b)
            return len(seen) > limit

        initial = _state(stages, waiting, chunks)[0]
        log.extend(ticks(stages, waiting, at_tick))  # the asks land in the log where they are made
        if not found or found[0][2][1] <= found[0][1][1]:
            return None
        state, (i0, b0), (i1, b1) = found[0]
        period = _Segment(state, _entries(log[i0:i1], b0), shift=b1 - b0)
        period.then = period
        return cls(num_stages, chunks, _Segment(initial, _entries(log[:i0], 0), period, b0), period,
                   limit=64 * (len(period.entries) + num_stages * num_stages * chunks * 8))

    def matcher(self, stages: Sequence[StageActions], waiting: Set[Message],
                found: List[Tuple[_Segment, int]]) -> Callable[[], bool]:
        """An ``at_tick`` for :func:`ticks` that stops the loop where its state is a recorded
        segment's start shifted by some ``b`` (``(segment, b)`` appended to ``found``)."""
        c, first = self.chunks, stages[0]
        segments = [(seg, seg.start[0][0]) for seg in (self.warmup, self.period)]

        def at_tick() -> bool:
            cur = first.cursor
            b = cur.steps
            mine = (cur.nf - c * b, cur.nb - c * b, first._i if first._i < first._n else 0)
            for seg, (nf, nb, _, i, _) in segments:
                if mine == (nf, nb, i) and _state(stages, waiting, c)[0] == seg.start:  # stage 0 first: cheap
                    found.append((seg, b))
                    return True
            return False
        return at_tick

    def replay(self, stages: Sequence[StageActions], waiting: Set[Message],
               found: List[Tuple[_Segment, int]]) -> Iterator[Action]:
        """The recorded segments from ``found[0]`` (nothing if the loop ended first), cursors
        counted, each question asked where the loop asks it; where an answer has no
        recording yet, the loop (recorded for the next time)."""
        if not found:
            return
        seg: Optional[_Segment] = found[0][0]
        base = found[0][1]
        cursors = [it.cursor for it in stages]
        exists = [it.exists for it in stages]
        steps = [_new(Action, (STEP, k, -1, -1)) for k in range(self.num_stages)]
        at = 0
        while seg is not None:
            branch = None
            for op, k, mb, micro, kind in (seg.entries if at == 0 else seg.entries[at:]):
                if op < _STEP:  # a transfer, F or B
                    yield _new(Action, (kind, k, mb + base, micro))
                    if op == _F:
                        cursors[k].nf += 1
                    elif op == _B:
                        cursors[k].nb += 1
                elif op == _STEP:
                    yield steps[k]
                    cursors[k].steps += 1
                elif exists[k](mb + base) != kind:  # kind: the answer recorded
                    branch = seg.branches.get(micro)  # micro: the entry's index
                    if branch is None:
                        yield from self._leave(stages, waiting, seg, base, micro)
                        return
                    break
            if branch is not None:
                seg, at = branch, micro + 1
            else:
                base += seg.shift
                seg, at = seg.then, 0

    def _leave(self, stages: Sequence[StageActions], waiting: Set[Message], seg: _Segment, base: int,
               at: int) -> Iterator[Action]:
        """The loop from ``seg``'s start at ``base``, after the actions of its entries before
        ``at`` (already yielded; their questions get the answers recorded), recorded as
        ``seg``'s branch at ``at`` if it ends within the limit."""
        done = seg.entries[:at]
        answered = {(k, j + base): bool(ans) for op, k, j, _, ans in done if op == _ASK}
        rec = _Recording(list(done))
        c = self.chunks
        for it, (nf, nb, st, i, pending) in zip(stages, seg.start[0]):
            it.restart(Cursor(nf + c * base, nb + c * base, st + base))
            it._pending = tuple(_new(Action, (kind, k, -1 if mb is None else mb + base, micro))
                                for kind, k, mb, micro in pending)
            it._i, it._n = i, len(pending)
            it.exists = _answering(answered, it.k, it.exists, rec, base)
        waiting.clear()
        waiting.update((kind, k, mb + base, micro) for kind, k, mb, micro in seg.start[1])
        again = ticks(stages, waiting)
        for _ in range(sum(op != _ASK for op, *_ in done)):
            next(again)
        for a in again:
            yield a
            entries = rec.entries
            if entries is not None:
                if len(entries) > self._limit:  # not a drain: stop recording
                    rec.entries = None
                else:
                    entries.append((_OPS[a.kind], a.stage, -1 if a.kind == STEP else a.mb - base, a.micro, a.kind))
        if rec.entries is not None:
            seg.branches[at] = _Segment(seg.start, rec.entries)


def _entries(log: List[object], b: int) -> List[Tuple[int, int, int, int, object]]:
    """The loop's log (actions and asks ``(ASK, k, j)``, every answer yes) relative to ``b``."""
    out: List[Tuple[int, int, int, int, object]] = []
    for e in log:
        if isinstance(e, Action):
            out.append((_OPS[e.kind], e.stage, e.mb - b, e.micro, e.kind))
        else:
            _, k, j = cast(Tuple[int, int, int], e)
            out.append((_ASK, k, j - b, len(out), True))
    return out


class _Recording:
    """The entries of a branch being recorded (``None``: given up)."""

    __slots__ = ("entries",)

    def __init__(self, entries: List[Tuple[int, int, int, int, object]]) -> None:
        self.entries: Optional[List[Tuple[int, int, int, int, object]]] = entries


def _answering(answered: Dict[Tuple[int, int], bool], k: int, exists: Callable[[int], bool],
               rec: _Recording, base: int) -> Callable[[int], bool]:
    """Stage ``k``'s ``exists``: the recorded answer where there is one, else asked (and
    recorded in ``rec``)."""
    def ask(j: int) -> bool:
        ans = answered.get((k, j))
        if ans is None:
            ans = exists(j)
            if rec.entries is not None:
                rec.entries.append((_ASK, k, j - base, len(rec.entries), ans))
        return ans
    return ask


def _state(stages: Sequence[StageActions], waiting: Set[Message], chunks: int) -> Tuple[State, int]:
    """The loop's state at a tick boundary relative to ``b`` (stage 0's STEPs), and ``b``."""
    b = stages[0].cursor.steps
    per = []
    for it in stages:
        c = it.cursor
        pending: Tuple[_Rel, ...] = ()
        if it._i < it._n:  # (a finished group is stale: the next peek replaces it)
            pending = tuple((a.kind, a.stage, None if a.kind == STEP else a.mb - b, a.micro) for a in it._pending)
        per.append((c.nf - chunks * b, c.nb - chunks * b, c.steps - b, it._i if pending else 0, pending))
    return (tuple(per), frozenset((kind, k, mb - b, micro) for kind, k, mb, micro in waiting)), b
