"""pipeline_rt/clock.py: the measured per-stage costs (the clock itself is checked against closed
forms in tests/test_learning_efficiency.py, through benchmarks/time_to_target.py, which imports it)."""
from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

from pipeline_rt import Pipeline
from pipeline_rt.clock import StageCosts, measure_costs, steady_period

MS = 1e-3


def _spin(seconds: float) -> None:
    end = time.process_time() + seconds  # CPU time: the same under any load
    while time.process_time() < end:
        pass


class _Busy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, fwd: float, bwd: float) -> Tensor:  # type: ignore[override]
        ctx.bwd = bwd
        ctx.save_for_backward(x, w)
        _spin(fwd * x.shape[0])
        return x * w

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore[override]
        x, w = ctx.saved_tensors
        _spin(ctx.bwd * x.shape[0])
        return g * w, (g * x).sum().reshape(w.shape), None, None


class Busy(nn.Module):
    """Forward ``fwd`` and backward ``bwd`` seconds of CPU time per row."""

    def __init__(self, fwd: float, bwd: float) -> None:
        super().__init__()
        self.w, self.fwd, self.bwd = nn.Parameter(torch.ones(1)), fwd, bwd

    def forward(self, x: Tensor) -> Tensor:
        return _Busy.apply(x, self.w, self.fwd, self.bwd)


@pytest.fixture
def one_thread():
    """One intra-op thread (as ``pipeoptim compare`` runs on the CPU): then the costs are the
    process's CPU time, whatever else the machine runs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method,chunks", [("pipedream", 1), ("2bw", 3)])
def test_measured_costs_are_each_stages_own_per_action(method, chunks, one_thread):
    """Stage k spins (k + 1) ms per forward and 2 (k + 1) ms per backward of a minibatch (6 rows):
    the measured cost of each action is its stage's, per micro-batch (2bw: 3 micro-batches of
    a third of the rows, a third of the cost), plus at most the runtime's own work around it."""
    rows = 6
    per_row = MS / rows
    stages = [Busy((k + 1) * per_row, 2 * (k + 1) * per_row) for k in range(3)]
    pipe = Pipeline(stages, ["cpu"] * 3, lambda ps: torch.optim.SGD(ps, lr=1e-6),
                    lambda out, y: (out - y).pow(2).mean(), method=method)
    handlers = dict(pipe.executor._handlers)
    batches = [(torch.randn(rows, 1), torch.zeros(rows, 1))] * 2
    c = measure_costs(pipe, batches, repeat=3)
    assert pipe.executor._handlers == handlers  # the timers are gone again
    assert isinstance(c, StageCosts) and (c.shape, c.chunks, c.num_stages) == ("async-1f1b", chunks, 3)
    for k in range(3):
        f, b = (k + 1) * MS / chunks, 2 * (k + 1) * MS / chunks
        assert f <= c.t_f[k] < f + 0.8 * MS, (k, c.t_f)
        assert b <= c.t_b[k] < b + 0.8 * MS, (k, c.t_b)
        assert 0 < c.t_step[k] < 0.8 * MS
    # the clock on these costs: async 1F1B is bound by its slowest stage (closed form)
    assert c.period() == steady_period("async-1f1b", 3, chunks, c.t_f, c.t_b, c.t_step)
    assert c.period() == pytest.approx(max(chunks * (c.t_f[k] + c.t_b[k]) + c.t_step[k] for k in range(3)))
    assert len(pipe.train(batches)) == 2  # the pipeline trains on as before


def test_least_of_two_measurements_per_action():
    a = StageCosts([1.0, 5.0], [2.0, 2.0], [0.5, 0.1], "async-1f1b", 2)
    b = StageCosts([3.0, 4.0], [1.0, 3.0], [0.2, 0.3], "async-1f1b", 2)
    assert a.least(b) == StageCosts([1.0, 4.0], [1.0, 2.0], [0.2, 0.1], "async-1f1b", 2)
    with pytest.raises(ValueError, match="different pipelines"):
        a.least(StageCosts([1.0, 1.0], [1.0, 1.0], [1.0, 1.0], "gpipe", 2))


def test_compare_measures_every_run_once_per_round_in_turn(monkeypatch):
    """pipeoptim compare's costs: rounds interleaved over the runs, the least per action kept."""
    from pipeoptim_compare import cli
    from pipeoptim_compare.tasks import get_task

    task = get_task("teacher", depth=2)
    results = [cli.RunResult(m, "sgd", 0.1, [1.0], 1.0, None, None, 1.0) for m in ("sync", "pipedream")]
    calls = []

    def fake(pipe, batches, repeat):
        calls.append(pipe.method.name)
        x = [3.0, 1.0, 2.0][len(calls) // 2 % 3]  # rounds: 3, 1, 2 (the least: the second)
        return StageCosts([x, x], [x, x], [x, x], pipe.method.shape, pipe.chunks)

    monkeypatch.setattr(cli, "measure_costs", fake)
    cli.measure_all(task, results, 2, ["cpu", "cpu"], minibatches=2)
    assert calls == ["sync", "pipedream"] * cli.COST_ROUNDS
    assert all(r.costs is not None and r.costs.t_f == [1.0, 1.0] for r in results)
