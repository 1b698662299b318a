"""benchmarks/learning_efficiency.py: seed-keyed dumps, merging, seed means and counts (no training)."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "learning_efficiency.py"
_spec = importlib.util.spec_from_file_location("learning_efficiency", _PATH)
le = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(le)

NAN = float("nan")


def rec(last, lr=0.1, diverged=False):
    return {"lr": lr, "last": NAN if diverged else last, "eval": NAN if diverged else last + 0.01,
            "diverged": diverged, "seconds": 1.0}


def cell(sync, pd, cr):
    return {"sync": rec(sync), "pipedream": rec(pd, diverged=pd is None),
            "pipeoptim-calroll": rec(cr, diverged=cr is None)}


A, B = ("teacher", "sgdm", 8, 3.0), ("teacher", "adam", 4, 1.0)


def test_old_single_seed_dump_loads_as_seed_0_and_merges(tmp_path):
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"|".join(map(str, A)): cell(1.0, 2.0, 1.5)}))
    new = tmp_path / "new.json"
    le.dump({1: {A: cell(1.0, 2.0, 3.0)}, 2: {A: cell(1.0, 2.0, 1.1)}}, new)
    runs = le.merge(le.load_dump(old), le.load_dump(new))
    assert sorted(runs) == [0, 1, 2] and runs[0][A]["pipeoptim-calroll"]["last"] == 1.5
    # a later dump wins per seed, cell and method; other methods stay
    runs = le.merge(runs, {0: {A: {"pipeoptim-calroll": rec(1.7)}}})
    assert runs[0][A]["pipeoptim-calroll"]["last"] == 1.7 and runs[0][A]["sync"]["last"] == 1.0
    le.dump(runs, tmp_path / "all.json")
    assert le.load_dump(tmp_path / "all.json") == runs


def test_seed_mean_counts_and_divergence():
    runs = {0: {A: cell(1.0, 2.0, 1.5), B: cell(1.0, 1.2, 1.1)},
            1: {A: cell(1.0, 2.0, 3.0), B: cell(1.0, 1.2, None)},
            2: {A: cell(1.0, 2.0, 1.1), B: cell(1.0, 1.2, 1.0)}}
    methods = le.common_methods(runs)
    assert methods == ["sync", "pipedream", "pipeoptim-calroll"]
    agg = le.aggregate(runs, methods)
    assert agg[A]["pipeoptim-calroll"]["last"] == pytest.approx(5.6 / 3)
    assert agg[B]["pipeoptim-calroll"]["diverged"] and agg[B]["pipeoptim-calroll"]["ndiv"] == 1
    assert le.fmt(agg[B]["pipeoptim-calroll"]) == "div 1/3"
    assert le.counts(agg, "pipeoptim-calroll") == ("<= pipedream 1/2, within 1.2x sync 0/2, diverged 1 "
                                                   "(1 where pipedream did not)")
    tab = le.table(runs, methods)
    assert "| yes (2/3) | 1.87 (1/3) |" in tab and "| **no** (2/3) | - (2/3) |" in tab
    s = le.summary(runs, methods)
    assert "seed 1: <= pipedream 0/2, within 1.2x sync 0/2, diverged 1" in s
    assert "above pipedream, some seeds only (2)" in s and "not within 1.2x sync, every seed (0)" in s
    assert "* <= pipedream: in every seed in 0/2 cells, in most seeds in 2/2" in s
    assert "* within 1.2x sync: in every seed in 0/2 cells, in most seeds in 1/2" in s


def test_single_seed_table_keeps_the_old_format():
    runs = {0: {A: cell(1.0, 2.0, 1.5)}}
    tab = le.table(runs, le.common_methods(runs))
    assert tab.splitlines()[-1] == ("| teacher | sgdm | 8 | 0.1 | 1.000 (1.010) | 2.000 (2.010) | 1.500 (1.510) "
                                    "| yes | 1.50 |")
    assert "per seed" not in le.summary(runs, le.common_methods(runs)).lower()


# ----------------------------------------------------------------------------- time to target (issue 14)

_TT = Path(__file__).resolve().parents[1] / "benchmarks" / "time_to_target.py"
_tspec = importlib.util.spec_from_file_location("time_to_target", _TT)
tt = importlib.util.module_from_spec(_tspec)
_tspec.loader.exec_module(tt)


def steady(shape, n, chunks, t_f, t_b, t_step, mbs=16):
    ts = tt.minibatch_times(shape, n, mbs, chunks, t_f, t_b, t_step)
    gaps = [ts[j + 1] - ts[j] for j in range(n + 1, mbs - n - 1)]
    assert max(gaps) - min(gaps) < 1e-9, gaps  # a periodic steady state
    return gaps[0], ts


@pytest.mark.parametrize("n", [1, 2, 4, 5])
def test_clock_closed_forms_equal_costs(n):
    f, b, s = 1.0, 2.0, 0.25
    eq = ([f] * n, [b] * n, [s] * n)
    # async 1F1B, one micro-batch (pipedream, pipeoptim): every stage busy, one F + B + STEP per minibatch
    assert steady("async-1f1b", n, 1, *eq)[0] == pytest.approx(f + b + s)
    # 2bw: async 1F1B with M micro-batches, still no bubble
    assert steady("async-1f1b", n, 3, *eq)[0] == pytest.approx(3 * (f + b) + s)
    # sync (GPipe, one micro-batch): the stages run one after the other, then stage 0 steps
    assert steady("gpipe", n, 1, *eq)[0] == pytest.approx(n * (f + b) + s)
    # GPipe and 1F1B with a flush, M micro-batches: (N + M - 1)(t_f + t_b) + t_step per minibatch
    for shape in ("gpipe", "1f1b-flush"):
        for m in (1, 2, n, 2 * n):
            assert steady(shape, n, m, *eq)[0] == pytest.approx((n + m - 1) * (f + b) + s)


def test_clock_per_stage_costs_bottleneck_and_ideal_time():
    import sys
    sys.path.insert(0, str(_TT.parent))
    from utilisation import ideal_time
    from pipeline_rt.schedule import build
    t_f, t_b, t_s = [1.0, 3.0, 1.0, 2.0], [2.0, 2.0, 5.0, 1.0], [0.5, 0.1, 0.2, 0.3]
    # async: the slowest stage sets the period; sync: all forwards, all backwards, stage 0's step
    assert steady("async-1f1b", 4, 1, t_f, t_b, t_s)[0] == pytest.approx(1 + 5 + 0.2)
    assert steady("async-1f1b", 4, 4, t_f, t_b, t_s)[0] == pytest.approx(4 * 6 + 0.2)
    assert steady("gpipe", 4, 1, t_f, t_b, t_s)[0] == pytest.approx(7 + 10 + 0.5)
    # with equal costs the last minibatch ends at utilisation.ideal_time's makespan
    for shape, m in (("gpipe", 1), ("gpipe", 3), ("1f1b-flush", 4), ("async-1f1b", 1), ("async-1f1b", 4)):
        ts = tt.minibatch_times(shape, 4, 9, m, [1.0] * 4, [2.0] * 4, [0.5] * 4)
        assert ts[-1] == pytest.approx(ideal_time(build(shape, 4, 9, m), 1.0, 2.0, 0.5))
        assert all(x < y for x, y in zip(ts, ts[1:]))


def test_warm_up_and_drain_of_the_clocks():
    # async 1F1B: minibatch 0's forward goes down and its backward comes up (stage 0's warm-up
    # forwards overlap it); then one minibatch per t_f + t_b
    ts = tt.minibatch_times("async-1f1b", 3, 6, 1, [1.0] * 3, [2.0] * 3, [0.0] * 3)
    assert ts == pytest.approx([9.0 + 3.0 * j for j in range(6)])
    # sync: every minibatch alone
    ts = tt.minibatch_times("gpipe", 3, 4, 1, [1.0] * 3, [2.0] * 3, [0.5] * 3)
    assert ts == pytest.approx([9.5 * (j + 1) for j in range(4)])


def test_reach_interpolates_between_bin_centres():
    # bins of 4 minibatches: points at 1.5, 5.5, 9.5; the target 1.5 is half-way from 2.0 to 1.0
    assert tt.reach([3.0, 2.0, 1.0], 4, 12, 1.5) == pytest.approx(7.5)
    assert tt.reach([3.0, 2.0, 1.0], 4, 12, 2.0) == pytest.approx(5.5)  # reached exactly at a point
    assert tt.reach([1.0, 2.0], 4, 8, 1.5) == pytest.approx(1.5)  # the first bin already below
    assert tt.reach([3.0, 2.0, 1.9], 4, 12, 1.5) is None  # never
    assert tt.reach([3.0, None, 1.0], 4, 12, 1.5) is None  # a non-finite bin ends the curve
    assert tt.reach([3.0, 2.0, 1.0], 4, 10, 1.0) == pytest.approx(8.5)  # a short last bin: its centre
    # on the clock: fractional minibatches interpolate linearly, the ends clamp
    ts = [10.0, 20.0, 30.0]
    assert tt.at(ts, 0.5) == 15.0 and tt.at(ts, -1) == 10.0 and tt.at(ts, 7) == 30.0 and tt.at(ts, 2) == 30.0
    rec = {"curve": [3.0, 2.0, 1.0], "bin": 4, "diverged": False}
    assert tt.time_to_target(rec, [float(j) * 2 for j in range(12)], 1.5) == pytest.approx(15.0)


def test_curve_of_and_method_specs():
    curve, size = le.curve_of([float(i) for i in range(10)], per_epoch=5, bins=2)
    assert size == 3 and curve == [1.0, 4.0, 7.0, 9.0]
    assert le.split_methods("sync,x=replace(METHODS['2bw'], name='x', chunks=2),2bw") == [
        "sync", "x=replace(METHODS['2bw'], name='x', chunks=2)", "2bw"]
    name, m = le.resolve_method("x=replace(METHODS['2bw'], name='x', chunks=2)")
    assert name == "x" and m.chunks == 2 and m.shape == "async-1f1b"
    le.CANDIDATES["tmp-cand"] = lambda: le.resolve_method("pipedream")[1]
    try:
        assert le.resolve_method("tmp-cand")[1].name == "pipedream"
    finally:
        del le.CANDIDATES["tmp-cand"]
    assert le.resolve_method("1f1b-flush")[1].chunks is None


def _run(curve, last, diverged=False):
    return {"lr": 0.1, "last": last, "eval": last, "diverged": diverged, "seconds": 1.0, "per_epoch": 8,
            "minibatches": 8, "bin": 2, "curve": curve}


def test_time_to_target_report():
    k = ("teacher", "sgdm", 2, 1.0)
    runs = {0: {k: {"sync": _run([4.0, 3.0, 2.0, 1.0], 1.0), "pipedream": _run([4.0, 3.0, 2.0, 1.2], 1.2),
                    "2bw": _run([4.0, 3.0, 1.0, 1.0], 1.0)}}}
    eq = {"t_f": [1.0, 1.0], "t_b": [1.0, 1.0], "t_step": [0.0, 0.0]}
    costs = {"teacher|sgdm|2": {"sync": dict(eq, shape="gpipe", chunks=1),  # 4 per minibatch
                                "pipedream": dict(eq, shape="async-1f1b", chunks=1),  # 2 per minibatch
                                "2bw": dict(eq, shape="async-1f1b", chunks=2)}}  # 4 per minibatch
    t = tt.cell_times(runs, k, ["sync", "pipedream", "2bw"], costs["teacher|sgdm|2"])
    # target 1.1: sync reaches it at 6.5 - 0.1 * 2 = 6.3 minibatches -> (6.3 + 1) * 4 s
    assert t["sync"]["mean"] == pytest.approx(7.3 * 4)
    assert t["pipedream"]["never"] == 1 and t["pipedream"]["mean"] == tt.INF
    # 2bw: at 4.5 - 0.9 / 2 * 2... (3.0 at 2.5, 1.0 at 4.5): 2.5 + 1.9 / 2 * 2 = 4.4 minibatches
    assert t["2bw"]["mean"] == pytest.approx(tt.at(tt.minibatch_times("async-1f1b", 2, 8, 2, [1] * 2, [1] * 2,
                                                                      [0] * 2), 4.4))
    rep = tt.report(runs, costs, ["sync", "pipedream", "2bw"], field=("sync", "pipedream", "2bw"))
    assert "| teacher | sgdm | 2 | 29200.0 (1.24) | never | 23600.0 (1.00) * |" in rep  # ms
    assert "never" in rep and "* 2bw: 1/1" in rep and "* pipedream: 0/1" in rep and "* sync: 0/1" in rep


def test_compute_bound_costs_give_a_micro_batch_its_share():
    sync = {"t_f": [4.0, 8.0], "t_b": [6.0, 10.0], "t_step": [1.0, 1.0], "rows": 32.0, "chunks": 1, "shape": "gpipe"}
    mb = {"t_f": [3.0, 3.0], "t_b": [3.0, 3.0], "t_step": [0.5, 2.0], "rows": 8.0, "chunks": 4, "shape": "async-1f1b"}
    out = tt.compute_bound({"c": {"sync": sync, "2bw": mb}, "no sync": {"2bw": mb}})
    assert list(out) == ["c"] and out["c"]["sync"]["t_f"] == [4.0, 8.0]
    two = out["c"]["2bw"]
    assert two["t_f"] == [1.0, 2.0] and two["t_b"] == [1.5, 2.5] and two["t_step"] == [0.5, 2.0]
    assert two["chunks"] == 4 and mb["t_f"] == [3.0, 3.0]  # the input is left as it was
