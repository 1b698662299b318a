"""The tick order replayed from recorded periods equals the loop alone (and build()'s)."""
import itertools
import random

import pytest

from pipeline_rt import schedule as schedule_mod
from pipeline_rt.schedule import SHAPES, Cursor, LazySchedule, build
from pipeline_rt.tickorder import Period, tick_order, ticks


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_replayed_order_equals_the_built_one(shape):
    """Every depth 1..8, chunks 1..4, length 1..40; a second pass replays the drains
    recorded by the first."""
    for n, chunks in itertools.product(range(1, 9), range(1, 5)):
        lazy = LazySchedule(shape, n, chunks)
        assert lazy.period is not None, (n, chunks)
        for rep, lengths in enumerate((range(1, 41), range(1, 41, 3))):
            for m in lengths:
                exists = (lambda j, m=m: j < m)
                got = list(lazy.order([lazy.actions(k, exists) for k in range(n)]))
                assert got == list(build(shape, n, m, chunks).order()), (n, chunks, m, rep)


def _copy(lazy, stages, exists):
    out = []
    for it in stages:
        c = lazy.actions(it.k, exists, Cursor(it.cursor.nf, it.cursor.nb, it.cursor.steps))
        c._pending, c._i, c._n = it._pending, it._i, it._n
        out.append(c)
    return out


@pytest.mark.parametrize("shape", SHAPES)
def test_replayed_order_from_any_state_equals_the_loop(shape):
    """From states the loop passes through (a resumed run starts from one, with messages in
    flight), the replay equals the loop run on from the same state."""
    rng = random.Random(0)
    for n, chunks in ((1, 1), (2, 3), (4, 1), (4, 2), (7, 2), (8, 1)):
        lazy = LazySchedule(shape, n, chunks)
        for _ in range(6):
            m = rng.randrange(1, 30)
            exists = (lambda j, m=m: j < m)
            stages = [lazy.actions(k, exists) for k in range(n)]
            waiting = set()
            cut = iter(range(rng.randrange(0, m * chunks * 3 + 2 * n)))  # stop after that many ticks
            for _ in ticks(stages, waiting, at_tick=lambda: next(cut, None) is None):
                pass
            ref = list(ticks(_copy(lazy, stages, exists), set(waiting)))
            got = list(tick_order(lazy.period, _copy(lazy, stages, exists), set(waiting)))
            assert got == ref, (n, chunks, m, cut)


def test_the_steady_state_is_replayed_not_decided_again(monkeypatch):
    """The loop decides (next_compute) only in the warm-up and a drain not met before: a
    second run of any length decides nothing more than a short one."""
    lazy = LazySchedule("async-1f1b", 8, 2)
    calls = []
    real = schedule_mod.next_compute
    monkeypatch.setattr(schedule_mod, "next_compute", lambda *a: calls.append(1) or real(*a))

    def run(m):
        calls.clear()
        exists = (lambda j: j < m)
        count = sum(1 for _ in lazy.order([lazy.actions(k, exists) for k in range(8)]))
        return count, len(calls)

    run(100), run(400)  # record the drains after 100 and 400 minibatches (same phase: delta 1)
    assert lazy.period.delta == 1
    (c1, d1), (c2, d2) = run(100), run(400)
    assert c2 > c1 and d1 == d2 == 0


def test_a_schedule_without_a_period_keeps_the_loop():
    """No recurrence within the limit: no period, and the order is the loop's."""
    lazy = LazySchedule("gpipe", 3, 2)
    assert Period.find(lambda k, e: lazy.actions(k, e), 3, 2, limit=1) is None
    exists = (lambda j: j < 5)
    got = list(tick_order(None, [lazy.actions(k, exists) for k in range(3)], set()))
    assert got == list(build("gpipe", 3, 5, 2).order())
