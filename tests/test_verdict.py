"""The verdict of ``pipeoptim compare`` (pipeoptim_compare/verdict.py): checked against the run's
own numbers (its losses.csv and results.csv) recomputed here from the definitions, and on
hand-made results whose answers are known."""
from __future__ import annotations

import math
from pathlib import Path
from typing import List, Optional, Sequence

import pytest
import torch
from torch import nn

from pipeline_rt.clock import StageCosts, at
from pipeoptim_compare import cli
from pipeoptim_compare.tasks import TASKS, Task, register_task
from pipeoptim_compare.verdict import binned, closest_lines, reach, seconds, verdict, verdict_rows


@pytest.fixture
def vtask():
    @register_task("_verdict_tiny")
    def tiny(depth: int = 2, seed: int = 0) -> Task:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(160, 6, generator=g)
        y = (x[:, 0] + x[:, 1] > 0).long()
        torch.manual_seed(seed)
        model = nn.Sequential(nn.Sequential(nn.Linear(6, 12), nn.Tanh()), nn.Linear(12, 2))
        batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 128, 8)]
        return Task("_verdict_tiny", model, batches, nn.functional.cross_entropy, (x[128:], y[128:]),
                    lambda o, t: float((o.argmax(-1) == t).float().mean()), lr={"sgd": 0.2})
    yield "_verdict_tiny"
    TASKS.pop("_verdict_tiny")


def oracle_reached(losses: Sequence[float], target: float, bins: int = 20) -> Optional[float]:
    """Where the curve of bin means (size ceil(n / bins), points at the bins' centres) first
    reaches ``target``, interpolated linearly from the point before it: written out again here."""
    size = math.ceil(len(losses) / bins)
    xs, ys = [], []
    for i in range(0, len(losses), size):
        part = losses[i:i + size]
        xs.append(i + (len(part) - 1) / 2)
        ys.append(sum(part) / len(part))
    for i, y in enumerate(ys):
        if y <= target:
            return xs[0] if i == 0 else xs[i - 1] + (ys[i - 1] - target) / (ys[i - 1] - y) * (xs[i] - xs[i - 1])
    return None


def _table(md: str, first_cell: str) -> List[List[str]]:
    """The rows (cells) of the markdown table of ``md`` whose header starts with ``first_cell``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_cell} |"))
    rows = []
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return [rows[0]] + rows[2:]


def test_verdict_of_a_run_equals_its_own_numbers(vtask, tmp_path, capsys):
    """A tiny run: every number of its verdict table recomputed from the run's own results
    (losses, held-out loss and accuracy, measured costs) by the definitions written out here."""
    results = cli.compare(task=vtask, depth=2, methods=["sync", "pipedream", "pipeoptim", "2bw"],
                          optimizers=["sgd"], epochs=3, out=tmp_path, progress=False)
    printed = capsys.readouterr().out
    md = (tmp_path / "results.md").read_text(encoding="utf-8")
    run = {r.method: r for r in results}
    sync = run["sync"]
    n = len(sync.losses)
    assert n == 48
    final = sum(sync.losses[-(n // 10):]) / (n // 10)
    target = 1.1 * final
    rows = _table(md, "opt")
    assert rows[0] == ["opt", "method", "eval loss vs sync", "accuracy vs sync", "mb to target",
                       "sim. time to target"]
    by = {r[1]: r for r in rows[1:]}
    assert list(by) == ["sync", "pipedream", "pipeoptim", "2bw"]
    assert by["sync"][2:4] == [f"{sync.eval_loss:.3f} (ref.)", f"{sync.metric:.3g} (ref.)"]
    gaps = {}
    for m in ("pipedream", "pipeoptim", "2bw"):
        r = run[m]
        ratio, diff = r.eval_loss / sync.eval_loss, r.eval_loss - sync.eval_loss
        gaps[m] = 100 * (r.metric - sync.metric)
        assert by[m][2:4] == [f"{ratio:.2f}x ({diff:+.3f})", f"{gaps[m]:+.1f} pts"], m
    reached = []
    for m, row in by.items():
        x = oracle_reached(run[m].losses, target)
        # the time on the method's own clock: its schedule with the costs measured for it
        assert run[m].costs is not None and run[m].costs.num_stages == 2
        want = "never" if x is None else seconds(at(run[m].costs.minibatch_times(n), x))
        assert row[4:] == (["never", "never"] if x is None else [f"{x + 1:.0f}", want]), m
        reached += [m] * (x is not None)
    assert "sync" in reached and len(reached) >= 2  # the check is not vacuous
    closest = min(gaps, key=lambda m: abs(gaps[m]))
    assert f"* sgd: closest to sync by accuracy: {closest} (" in md
    assert f"target: training loss {target:.3g} (1.1x sync's final {final:.3g})" in " ".join(md.split())
    assert "Verdict (computed from this run)" in printed and max(map(len, printed.splitlines())) <= cli.WIDTH


def _r(method: str, losses: Sequence[float], eval_loss: Optional[float] = None, metric: Optional[float] = None,
       opt: str = "sgd", costs: Optional[StageCosts] = None) -> cli.RunResult:
    tail = max(1, len(losses) // 10)
    return cli.RunResult(method, opt, 0.1, list(losses), sum(losses[-tail:]) / tail, eval_loss, metric, 1.0,
                         costs=costs)


EQUAL = StageCosts([1.0, 1.0], [2.0, 2.0], [0.0, 0.0], "async-1f1b", 1)  # 3 s per minibatch, 9 s for the first


def test_closest_by_metric_else_held_out_loss_else_training_loss():
    down = [4.0 - 0.1 * i for i in range(20)]  # final 2.15
    res = [_r("sync", down, 1.0, 0.80), _r("a", down, 1.5, 0.79), _r("b", down, 1.01, 0.70)]
    (v,) = verdict(res, metric_name="accuracy")
    assert v.closest == "a" and v.by == "accuracy"  # 1 point beats 10, though b's loss is closer
    assert [g.method for g in v.gaps] == ["sync", "a", "b"]
    assert v.gaps[1].loss_ratio == pytest.approx(1.5) and v.gaps[1].metric_diff == pytest.approx(-0.01)
    (v,) = verdict([_r(m, down, e) for m, e in (("sync", 1.0), ("a", 1.5), ("b", 0.9))])
    assert v.closest == "b" and v.by == "held-out loss"  # |log 0.9| < |log 1.5|: above or below sync alike
    (v,) = verdict([_r("sync", down), _r("a", [x * 2 for x in down]), _r("b", [x * 1.2 for x in down])])
    assert v.closest == "b" and v.by == "training loss" and v.gaps[2].loss_ratio == pytest.approx(1.2)
    rows = verdict_rows([v], "metric")
    assert rows[0][2] == "train loss vs sync" and len(rows[0]) == 5  # no metric column without a metric


def test_minibatches_and_time_to_target():
    # sync ends at 1.0: target 1.1. Bins of 2 (40 losses / 20): points at 0.5, 2.5, ...
    sync = [2.0] * 10 + [1.0] * 30
    never = [2.0] * 40
    nan = [2.0] * 10 + [float("nan")] * 30
    (v,) = verdict([_r("sync", sync, costs=EQUAL), _r("never", never, costs=EQUAL), _r("nan", nan),
                    _r("nocost", sync)])
    assert v.target == pytest.approx(1.1) and v.bin == 2
    g = {x.method: x for x in v.gaps}
    # bin 4 (minibatches 8, 9) is 2.0 at x=8.5, bin 5 is 1.0 at x=10.5: 1.1 is reached at 8.5 + 0.9 * 2
    assert g["sync"].reached == pytest.approx(10.3)
    # async 1F1B on 2 stages with F=1, B=2: minibatch j done at 6 + 3j (closed form)
    assert g["sync"].seconds == pytest.approx(6 + 3 * 10.3)
    assert g["never"].reached is None and g["never"].seconds is None
    assert g["nan"].reached is None  # a non-finite loss ends the curve
    assert g["nocost"].reached == pytest.approx(10.3) and g["nocost"].seconds is None
    rows = {r[1]: r for r in verdict_rows([v], "metric")[1:]}
    assert rows["sync"][-2:] == ["11", "36.9 s"] and rows["never"][-2:] == ["never", "never"]
    assert rows["nocost"][-2:] == ["11", "never"]


def test_target_of_a_negative_loss_is_above_it_and_no_reference_no_verdict():
    (v,) = verdict([_r("sync", [-1.0] * 10), _r("a", [-0.95] * 10)])
    assert v.target == pytest.approx(-0.9) and v.gaps[1].reached == 0.0
    assert verdict([_r("a", [1.0]), _r("b", [1.0])]) == []
    assert cli.verdict_text([_r("a", [1.0])], "metric", "points").startswith("No verdict")
    (v,) = verdict([_r("sync", [1.0])])
    assert v.closest is None and "no other method" in closest_lines([v])[0]


def test_units_of_a_metric_gap():
    res = [_r("sync", [1.0], 1.0, 30.0), _r("a", [1.0], 1.0, 29.5)]
    (v,) = verdict(res, metric_name="PSNR dB")
    assert verdict_rows([v], "PSNR dB", "dB")[2][3] == "-0.5 dB"
    assert verdict_rows([v], "m", "")[2][3] == "-0.5"
    assert "(-50.0 pts)" in closest_lines([v], "points")[0]


def test_bins_and_reach():
    assert binned([1.0, 2.0, 3.0, 4.0, 5.0], bins=2) == ([2.0, 4.5], 3)
    assert binned([1.0, 2.0], bins=20) == ([1.0, 2.0], 1)
    assert reach([3.0, 2.0, 1.0], 4, 12, 1.5) == pytest.approx(7.5)
    assert seconds(None) == "never" and seconds(0.0123) == "12.3 ms" and seconds(3.14159) == "3.14 s"
    assert seconds(1234.4) == "1234 s"


def test_results_md_lines_are_short(vtask, tmp_path):
    cli.compare(task=vtask, depth=2, methods=["sync", "pipeoptim"], optimizers=["sgd"], epochs=1,
                out=tmp_path, progress=False)
    text = (tmp_path / "results.md").read_text(encoding="utf-8")
    long = [line for line in text.splitlines() if len(line) > cli.WIDTH and not line.startswith("|")]
    assert long == []
    assert Path(tmp_path / "results.md").read_text().count("Verdict (computed from this run)") == 1
