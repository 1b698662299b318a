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
