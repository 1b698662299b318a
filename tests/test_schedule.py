"""Schedules as data: no model, no tensor.

The expected values are the closed forms of docs/methods.rst, "The setting" (``w_k = N-1-k``),
written here independently of :mod:`pipeline_rt.schedule`, which derives them by counting STEPs.
"""
from __future__ import annotations

import itertools

import pytest

from pipeline_rt.schedule import (
    B, COMPUTE, F, RECV_B, RECV_F, SEND_B, SEND_F, SHAPES, STEP, Action, Cursor, LazySchedule, Schedule,
    ScheduleError, build, simulate, validate, versions,
)

SIZES = [(1, 1), (1, 4), (2, 1), (2, 5), (3, 2), (4, 7), (5, 9)]


def closed_form(n: int, k: int, u: int, chunks: int, shape: str):
    """(v_F, v_B) of the flat micro-batch index ``u = j*chunks + m`` at stage ``k``.

    Async 1F1B with warm-up ``w = N-1-k``: the forward of unit ``u >= w`` is issued right
    after the backward of unit ``u-w-1``, so ``u-w`` backwards (hence ``(u-w)//chunks``
    complete minibatches, one STEP each) precede it; the backward of ``u`` follows ``u``
    backwards. Flushing shapes see the version of their own minibatch in both passes.
    """
    if shape != "async-1f1b":
        return u // chunks, u // chunks
    w = n - 1 - k
    return max(0, u - w) // chunks, u // chunks


@pytest.mark.parametrize("n,m", SIZES)
def test_async_versions_one_update_per_minibatch(n, m):
    table = versions(build("async-1f1b", n, m))
    for k, j in itertools.product(range(n), range(m)):
        v = table[k][(j, 0)]
        assert v.forward == max(0, j - (n - 1 - k))
        assert v.backward == j
        assert v.s == min(j, n - 1 - k)
    assert all(v.s == 0 for v in table[n - 1].values()), "the last stage never predicts"


@pytest.mark.parametrize("shape", ["gpipe", "1f1b-flush", "async-1f1b"])
@pytest.mark.parametrize("n,m,chunks", [(2, 3, 2), (3, 4, 3), (4, 3, 2), (3, 2, 5), (4, 5, 4)])
def test_versions_with_accumulation(shape, n, m, chunks):
    table = versions(build(shape, n, m, chunks))
    for k, j, c in itertools.product(range(n), range(m), range(chunks)):
        assert tuple(table[k][(j, c)]) == closed_form(n, k, j * chunks + c, chunks, shape), (k, j, c)


def test_accumulation_known_values():
    # 3 stages, 3 micro-batches per update: the first stage's second minibatch straddles
    # the first update (its last micro-batch is forwarded after STEP 1).
    v = versions(build("async-1f1b", 3, 3, chunks=3))[0]
    assert [v[(1, c)].s for c in range(3)] == [1, 1, 0]
    assert [v[(2, c)].s for c in range(3)] == [1, 1, 0]
    assert all(x.s == 0 for x in versions(build("async-1f1b", 3, 3, chunks=3))[2].values())


@pytest.mark.parametrize("shape", ["gpipe", "1f1b-flush", "async-1f1b"])
@pytest.mark.parametrize("n,m,chunks", [(1, 3, 1), (3, 4, 1), (4, 3, 3), (2, 2, 6)])
def test_structure(shape, n, m, chunks):
    s = build(shape, n, m, chunks)
    for k, acts in enumerate(s.actions):
        assert sum(a.kind == STEP for a in acts) == m
        kinds = {a.kind for a in acts}
        assert (RECV_F in kinds) == (SEND_B in kinds) == (k > 0)
        assert (SEND_F in kinds) == (RECV_B in kinds) == (k < n - 1)
        # every transfer sits right next to the compute action it serves
        for i, a in enumerate(acts):
            if a.kind in (RECV_F, RECV_B):
                assert acts[i + 1] == Action(F if a.kind == RECV_F else B, k, a.mb, a.micro)
            if a.kind in (SEND_F, SEND_B):
                assert acts[i - 1] == Action(F if a.kind == SEND_F else B, k, a.mb, a.micro)
    order = list(s.order())
    assert sorted(order) == sorted(a for acts in s.actions for a in acts)
    # the global order is a merge of the per-stage orders that respects every transfer
    for k in range(n):
        assert [a for a in order if a.stage == k] == s.actions[k]
    pos = {a: i for i, a in enumerate(order)}
    for a in order:
        if a.kind == RECV_F:
            assert pos[Action(SEND_F, a.stage - 1, a.mb, a.micro)] < pos[a]
        if a.kind == RECV_B:
            assert pos[Action(SEND_B, a.stage + 1, a.mb, a.micro)] < pos[a]


@pytest.mark.parametrize("n,m", [(2, 6), (4, 8), (5, 3)])
def test_async_in_flight_peak_is_warmup_plus_one(n, m):
    peak = build("async-1f1b", n, m).simulation.peak_in_flight
    assert peak == [min(n - k, m) for k in range(n)]


def test_gpipe_in_flight_peak_is_all_micro_batches():
    assert build("gpipe", 3, 2, chunks=5).simulation.peak_in_flight == [5, 5, 5]
    assert build("1f1b-flush", 3, 2, chunks=5).simulation.peak_in_flight == [3, 2, 1]


def test_async_never_flushes():
    # the ideal-machine run has no bubble between warm-up and drain at the last stage
    s = build("async-1f1b", 4, 10)
    last = [row[3] for row in s.simulation.ticks]
    busy = [a is not None for a in last]
    first, final = busy.index(True), len(busy) - 1 - busy[::-1].index(True)
    assert all(busy[first:final + 1])
    # and it is shorter than flushing every minibatch
    assert len(s.simulation.ticks) < len(build("1f1b-flush", 4, 10, chunks=1).simulation.ticks)


def test_table_printing_and_mark():
    s = build("async-1f1b", 3, 2)
    text = str(s)
    assert text.splitlines()[0].startswith("async-1f1b schedule: 3 stages, 2 minibatches")
    rows = s.table().splitlines()
    assert [r.split(":")[0] for r in rows] == ["stage 0", "stage 1", "stage 2"]
    assert rows[2].split()[2:4] == ["F0", "B0"]
    marked = s.table(mark=Action(SEND_B, 1, 1, 0))  # a transfer is shown on its compute action
    assert ">>B1<<" in marked.splitlines()[1]
    assert marked.count(">>") == 1


def test_bad_parameters():
    with pytest.raises(ScheduleError, match="unknown schedule shape"):
        build("zigzag", 2, 2)
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ScheduleError, match="positive int"):
            build("gpipe", bad, 2)
    with pytest.raises(ScheduleError, match="chunks"):
        build("gpipe", 2, 2, chunks=0)


def _edited(actions):
    s = build("async-1f1b", 2, 2)
    return Schedule(s.shape, s.num_stages, s.num_minibatches, s.chunks, actions(s.actions))


def test_validate_rejects_backward_before_forward():
    def swap(acts):
        acts = [list(a) for a in acts]
        last = acts[1]
        i, j = last.index(Action(F, 1, 0, 0)), last.index(Action(B, 1, 0, 0))
        last[i], last[j] = last[j], last[i]
        return acts
    with pytest.raises(ScheduleError, match="before its forward"):
        validate(_edited(swap))


def test_validate_rejects_missing_step_and_foreign_actions():
    with pytest.raises(ScheduleError, match="STEPs"):
        validate(_edited(lambda acts: [acts[0], acts[1][:-1]]))  # stage 1 ends with a STEP
    with pytest.raises(ScheduleError, match="holds an action of stage"):
        validate(_edited(lambda acts: [acts[0] + [Action(STEP, 1)], acts[1]]))
    with pytest.raises(ScheduleError, match="runs twice"):
        validate(_edited(lambda acts: [acts[0], acts[1] + [Action(F, 1, 0, 0)]]))


def test_validate_rejects_mismatched_transfer_order():
    def reorder(acts):
        acts = [list(a) for a in acts]
        sends = [i for i, a in enumerate(acts[0]) if a.kind == SEND_F]
        acts[0][sends[0]], acts[0][sends[1]] = acts[0][sends[1]], acts[0][sends[0]]
        return acts
    with pytest.raises(ScheduleError, match="same order"):
        validate(_edited(reorder))


def test_simulate_reports_deadlock_with_table():
    # stage 0 waits for B0's gradient before it sends F0's activation: a cycle of receives
    def cycle(acts):
        first = list(acts[0])
        first.remove(Action(SEND_F, 0, 0, 0))
        first.insert(first.index(Action(B, 0, 0, 0)) + 1, Action(SEND_F, 0, 0, 0))
        return [first, acts[1]]
    sched = _edited(cycle)
    with pytest.raises(ScheduleError, match="deadlocks") as err:
        simulate(sched)
    msg = str(err.value)
    assert "stage 0 rB0" in msg and "stage 1 rF0" in msg
    assert "stage 0:" in msg and "stage 1:" in msg


def test_compute_view_drops_transfers():
    s = build("1f1b-flush", 3, 2, chunks=2)
    for k in range(3):
        assert all(a.kind in COMPUTE for a in s.compute(k))
        assert len(s.compute(k)) == 2 * 2 * 2 + 2


def test_weight_versions_are_computed_once_per_schedule():
    sched = build("async-1f1b", 3, 4, 2)
    assert sched.weight_versions is sched.weight_versions
    assert sched.weight_versions == versions(sched)



# ----------------------------------------------------------------------------- lazy


@pytest.mark.slow
@pytest.mark.parametrize("shape", SHAPES)
def test_lazy_schedule_equals_the_built_one(shape):
    """Per-stage actions and the prediction distance of every forward, counted on the lazy
    schedule's own continuation, equal :func:`build` and :func:`versions` for every depth
    1..8, micro-batch count 1..4 and length 1..40; the tick order too (lengths 1..12, 40)."""
    for n, chunks in itertools.product(range(1, 9), range(1, 5)):
        lazy = LazySchedule(shape, n, chunks)
        for m in range(1, 41):
            ref = build(shape, n, m, chunks)
            table = versions(ref)
            exists = (lambda j, m=m: j < m)
            for k in range(n):
                it, got = lazy.actions(k, exists), []
                while (a := it.peek()) is not None:
                    if a.kind == F:
                        v = table[k][a.unit]
                        assert (it.cursor.steps, lazy.distance(k, it.cursor)) == (v.forward, v.s), (n, chunks, m, k, a)
                    got.append(it.pop())
                assert got == ref.actions[k], (n, chunks, m, k)
            if m <= 12 or m == 40:
                order = list(lazy.order([lazy.actions(k, exists) for k in range(n)]))
                assert order == list(ref.order()), (n, chunks, m)


def test_lazy_schedule_cost_does_not_grow_with_the_run():
    """A long run: the memo of STEP counts stops growing after the warm-up, and the
    messages in flight stay bounded."""
    lazy = LazySchedule("async-1f1b", 4, 2)
    stages = [lazy.actions(k, lambda j: j < 3000) for k in range(4)]
    sizes, count = [], 0
    for a in lazy.order(stages):
        count += 1
        if a.kind == F:
            lazy.distance(a.stage, stages[a.stage].cursor)
            sizes.append(len(lazy._ahead))
    assert count == 3000 * 2 * (4 * 2 + 3 * 2 * 2) + 4 * 3000
    assert sizes[100] == sizes[-1] <= 4 * 4 * 2 * 2 * 2


def test_lazy_schedule_window_and_errors():
    lazy = LazySchedule("async-1f1b", 3)
    text = str(lazy)
    assert text.splitlines()[0].startswith("async-1f1b schedule: 3 stages")
    assert "window of 5 minibatches" in text
    marked = lazy.window(mark=Action(B, 1, 1000, 0))  # a late minibatch is shown in the steady state
    assert ">>B1000<<" in marked and "F1001" in marked
    with pytest.raises(ScheduleError, match="unknown schedule shape"):
        LazySchedule("zigzag", 2)
    with pytest.raises(ScheduleError, match="positive int"):
        LazySchedule("gpipe", 0)
