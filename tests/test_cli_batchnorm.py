"""``pipeoptim compare --entry`` on a model with batch norms: refused before training with
the fixes as command-line flags, and run with ``--batch-norm ghost`` (every method trains the
same function: sync and 1f1b-flush, both splitting minibatches, agree) or ``deferred``."""
from __future__ import annotations

import csv
from collections import defaultdict

import pytest
import torch
from torch import nn

from pipeoptim_compare import cli
from pipeoptim_compare.batchnorm import ghost_rows, prepare_batch_norm
from pipeoptim_compare.tasks import Task, get_task

#: a user's model with BatchNorm1d, float64; 3 minibatches of 8 rows
ENTRY = """
    import torch
    from torch import nn

    def build():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(24, 4, generator=g, dtype=torch.float64) * 2 + 1
        batches = [(x[i:i + 8], (x[i:i + 8, 0] > 1).long()) for i in range(0, 24, 8)]
        model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 8), nn.BatchNorm1d(8),
                              nn.ReLU(), nn.Linear(8, 2)).double()
        return model, batches

    def with_instance_norm():
        model, batches = build()
        model[4] = nn.InstanceNorm1d(8, track_running_stats=True).double()  # not a batch norm to convert
        return model, batches
"""
ARGS = ["compare", "--entry", "bn_user_mod:build", "--depth", "2", "--methods", "sync,1f1b-flush,pipeoptim",
        "--no-progress", "--optimizers", "sgd", "--lr", "0.1"]


@pytest.fixture
def entry(user_module):
    user_module("bn_user_mod", ENTRY)


def _losses(out):
    runs = defaultdict(list)
    for row in list(csv.reader(open(out / "losses.csv")))[1:]:
        runs[row[1]].append(float(row[3]))
    return runs


def test_refused_before_training_naming_the_flags(entry, tmp_path, capsys):
    assert cli.main(ARGS + ["--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    flat = " ".join(line.strip() for line in err.splitlines())
    for part in ("pipeoptim compare: error: Batch-dependent modules", "method 'sync' splits each minibatch into 2 micro-batches",
                 "stage 0 holds module '1' (BatchNorm1d)", "--batch-norm ghost", "--batch-norm deferred"):
        assert part in flat, (part, err)
    assert "stages[k] =" not in err  # Python fixes the command line cannot take are not offered
    assert max(len(line) for line in err.splitlines()) <= 100
    assert not (tmp_path / "losses.csv").exists()


def test_ghost_runs_and_every_method_trains_the_same_function(entry, tmp_path, capsys):
    assert cli.main(ARGS + ["--out", str(tmp_path), "--batch-norm", "ghost"]) == 0
    assert "2 batch norm(s) -> GhostBatchNorm(group_rows=4)" in capsys.readouterr().out
    runs = _losses(tmp_path)
    assert len(runs["sync"]) == 3
    assert runs["1f1b-flush"] == pytest.approx(runs["sync"], rel=1e-5)  # both split into 2 micro-batches
    assert runs["pipeoptim"][0] == pytest.approx(runs["sync"][0], rel=1e-5)  # one forward: the same groups


def test_deferred_runs(entry, tmp_path, capsys):
    assert cli.main(ARGS + ["--out", str(tmp_path), "--batch-norm", "deferred"]) == 0
    assert "2 batch norm(s) -> DeferredBatchNorm" in capsys.readouterr().out
    assert len(_losses(tmp_path)["pipeoptim"]) == 3


def test_ghost_rows_divide_every_micro_batch():
    def task(*rows):
        return Task("t", nn.Sequential(nn.Linear(2, 2)), [(torch.zeros(n, 2), torch.zeros(n)) for n in rows],
                    nn.functional.mse_loss)
    assert ghost_rows(task(24, 24), 3, ["sync", "pipeoptim"]) == 8     # 3 micro-batches of 8; 24
    assert ghost_rows(task(12, 10), 2, ["pipeoptim"]) == 2              # whole minibatches of 12 and 10
    assert ghost_rows(task(12, 10), 2, ["sync"]) == 1                   # 6, 6 and 5, 5
    assert ghost_rows(task(10), 3, ["sync"]) == 1                       # 4, 3, 3 (tensor_split)


def test_what_a_conversion_leaves_is_refused_before_training(entry, tmp_path, capsys):
    args = [a if a != "bn_user_mod:build" else "bn_user_mod:with_instance_norm" for a in ARGS]
    assert cli.main(args + ["--out", str(tmp_path), "--batch-norm", "ghost"]) == 2
    flat = " ".join(line.strip() for line in capsys.readouterr().err.splitlines())
    assert "stage 1 holds module '0' (InstanceNorm1d)" in flat and "--methods without" in flat
    assert "--batch-norm ghost:" not in flat and not (tmp_path / "losses.csv").exists()


def test_the_cnnbn_task_passes_refuse():
    """Its ghost batch norms are built for chunks=1; every run sets the method's chunks
    (set_bn_chunks), and so does the check before training."""
    task = get_task("cnnbn", depth=2, blocks=2, train_size=64, eval_size=32)
    assert prepare_batch_norm(task, 2, ["sync", "2bw", "pipeoptim"], "refuse") is None
