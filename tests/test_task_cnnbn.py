"""The ``cnnbn`` task: a BatchNorm CNN classifier that micro-batching methods run exactly.

Oracle of the model: a ghost batch norm over groups of ``bn_rows`` rows is a plain
``nn.BatchNorm2d`` on each group, so the network on a minibatch equals a copy of it with plain
batch norms run on each group of rows separately (every other layer is per row). Exactness of
micro-batching: ``1f1b-flush`` with ``chunks`` micro-batches equals ``sync`` with one, in
float64 (in float32 the two agree to rounding at first, but this net amplifies rounding
differences over a few dozen updates, as any chaotic training does).
"""
from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline_rt import Pipeline, StageError
from pipeline_rt.batchnorm import DeferredBatchNorm, GhostBatchNorm, convert_deferred_batch_norm
from pipeoptim_compare.tasks import SHAPES, TASKS, evaluate, get_task, set_bn_chunks

SMALL = {"train_size": 128, "eval_size": 64}  # 4 minibatches of 32


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread, as the benchmark runs (small convolutions: more threads only contend)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _run(stages, x):
    for s in stages:
        x = s(x)
    return x


def _plain_copy(model: nn.Module) -> nn.Module:
    """A deep copy with every GhostBatchNorm replaced by an nn.BatchNorm2d holding copies of
    its weight, bias and running statistics (same state_dict keys)."""
    ref = copy.deepcopy(model)

    def swap(m: nn.Module) -> None:
        for name, child in m.named_children():
            if isinstance(child, GhostBatchNorm):
                bn = nn.BatchNorm2d(child.num_features, child.eps, child.momentum).to(child.weight.dtype)
                bn.load_state_dict(child.state_dict())
                bn.train(child.training)
                setattr(m, name, bn)
            else:
                swap(child)
    swap(ref)
    return ref


def _sgdm(ps):
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


@pytest.mark.parametrize("depth", [1, 4, 8])
def test_builds_for_depths(depth):
    task = get_task("cnnbn", depth=depth, **SMALL)
    assert "cnnbn" in TASKS and task.name == "cnnbn" and task.epochs == 2
    assert set(task.lr) == {"sgd", "adam", "adamw"} and all(v > 0 for v in task.lr.values())
    assert len(task.model) == 8  # max(8, depth) blocks
    stages = task.split(depth)
    assert len(stages) == depth and sum(len(s) for s in stages) == 8
    x, y = task.batches[0]
    assert x.shape == (32, 1, 16, 16) and y.dtype == torch.long and len(task.batches) == 4
    out = _run(stages, x)
    assert out.shape == (32, len(SHAPES))
    loss = task.loss_fn(out, y)
    assert loss.dim() == 0 and abs(loss.item() - math.log(len(SHAPES))) < 0.5  # near chance at init
    ev, acc = evaluate(stages, task.eval_data, task.loss_fn, task.metric)
    assert task.eval_data[0].shape == (64, 1, 16, 16) and ev > 0 and 0.0 <= acc <= 1.0
    assert set(torch.cat([y for _, y in task.batches]).tolist()) == set(range(len(SHAPES)))
    assert len(get_task("cnnbn", depth=12, **SMALL).split(12)) == 12


def test_stages_equal_the_oracle(float64):
    """Train mode: the stages in sequence equal plain batch norm run on each group of 4 rows
    separately (and differ from plain batch norm on the whole minibatch); eval mode: equal to
    the plain-batch-norm copy with the same running statistics."""
    task = get_task("cnnbn", depth=4, **SMALL)
    task.model.double()
    stages = task.split(4)
    x, _ = task.batches[0]
    x = x.double()
    ref = _plain_copy(task.model)
    out = _run(stages, x)
    groups = torch.cat([ref(x[i:i + 4]) for i in range(0, len(x), 4)])
    torch.testing.assert_close(out, groups, rtol=1e-10, atol=1e-10)
    assert (out - _plain_copy(task.model)(x)).abs().max() > 1e-3  # whole-minibatch BN is another function
    for m in stages:
        m.eval()
    ref = _plain_copy(task.model).eval()
    torch.testing.assert_close(_run(stages, x), ref(x), rtol=1e-10, atol=1e-10)


def test_batch_norm_is_really_there(float64):
    task = get_task("cnnbn", depth=8, **SMALL)
    task.model.double()
    bns = [m for m in task.model.modules() if isinstance(m, GhostBatchNorm)]
    assert len(bns) == 2 * 8 + 1 and all(isinstance(m, (_BatchNorm, DeferredBatchNorm)) for m in bns)
    x, _ = task.batches[0]
    x = x.double()
    out = task.model(x)
    # a row's output depends on the other rows of its group of 4, not on rows of other groups
    x2 = x.clone()
    x2[1] += 1.0
    out2 = task.model(x2)
    assert (out2[0] - out[0]).abs().max() > 1e-6
    torch.testing.assert_close(out2[4:], out[4:], rtol=1e-10, atol=1e-10)
    # running statistics are updated by training forwards (one commit per forward at chunks=1)
    assert all(int(m.num_batches_tracked) == 2 for m in bns)
    assert all(not torch.equal(m.running_mean, torch.zeros_like(m.running_mean)) for m in bns)


def test_ghost_batch_norm_unit(float64):
    """Output and gradient: plain BN per group; running stats: plain BN on all rows, committed
    once per `chunks` forwards; rows not a multiple of the group are refused."""
    torch.manual_seed(0)
    gb = GhostBatchNorm(3, 4, chunks=2).double()
    plain = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        gb.weight.uniform_(0.5, 1.5)
        gb.bias.normal_()
        plain.weight.copy_(gb.weight)
        plain.bias.copy_(gb.bias)
    x = (torch.randn(16, 3, 5, 6) * 2 + 1).requires_grad_()
    out = torch.cat([gb(xm) for xm in torch.tensor_split(x, 2)])
    ref = torch.cat([nn.functional.batch_norm(x[i:i + 4], None, None, plain.weight, plain.bias, True, 0.0, 1e-5)
                     for i in range(0, 16, 4)])
    torch.testing.assert_close(out, ref)
    w = torch.randn_like(out)
    g1 = torch.autograd.grad((out * w).sum(), (x, gb.weight, gb.bias))
    g2 = torch.autograd.grad((ref * w).sum(), (x, plain.weight, plain.bias))
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b)
    plain(x.detach())  # the whole minibatch at once
    torch.testing.assert_close(gb.running_mean, plain.running_mean)
    torch.testing.assert_close(gb.running_var, plain.running_var)
    assert int(gb.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="6 rows is not a multiple of group_rows=4"):
        gb(torch.randn(6, 3, 2, 2))


def _pipe(task, depth, method, chunks, opt=_sgdm):
    stages = task.split(depth)
    set_bn_chunks(stages, chunks)
    return Pipeline(stages, ["cpu"] * depth, opt, task.loss_fn, method=method, chunks=chunks)


@pytest.mark.parametrize("chunks", [2, 8])
def test_flush_with_micro_batches_matches_sync(float64, chunks):
    """1f1b-flush with 2 (16 rows each) or 8 (one group of 4 each) micro-batches: the same
    losses, weights and running statistics as sync with one micro-batch, to float64 rounding."""
    results = []
    for method, c in (("sync", 1), ("1f1b-flush", chunks)):
        task = get_task("cnnbn", depth=4, **SMALL)
        task.model.double()
        pipe = _pipe(task, 4, method, c)
        assert pipe.chunks == c
        losses = pipe.train([(x.double(), y) for x, y in task.batches] * 2)
        results.append((losses, task.model.state_dict()))
    (l1, s1), (l2, s2) = results
    assert l1[-1] < l1[0]  # it trained
    torch.testing.assert_close(torch.tensor(l2), torch.tensor(l1), rtol=1e-9, atol=1e-9)
    assert s1.keys() == s2.keys()
    for k in s1:
        torch.testing.assert_close(s2[k], s1[k], rtol=1e-9, atol=1e-9, msg=k)
    assert int(s2["0.1.bn1.num_batches_tracked"]) == 8  # one commit per minibatch


def test_benchmark_runs_flush_and_2bw_with_their_chunks():
    """learning_efficiency.make_pipeline tells the batch norms the method's chunks (float32: the
    first minibatches agree with sync to rounding)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import learning_efficiency as le
    losses = {}
    for method in ("sync", "1f1b-flush", "2bw"):
        pipe, task, batches, _ = le.make_pipeline("cnnbn", "sgdm", 4, 1.0, method, 3, 0)
        assert pipe.chunks == (1 if method == "sync" else 4)
        assert all(m.chunks == pipe.chunks for s in pipe.stages for m in s.modules()
                   if isinstance(m, GhostBatchNorm))
        losses[method] = pipe.train(batches)
    torch.testing.assert_close(torch.tensor(losses["1f1b-flush"]), torch.tensor(losses["sync"]),
                               rtol=1e-4, atol=1e-4)
    assert losses["2bw"][0] == pytest.approx(losses["sync"][0], abs=1e-5)  # same weights before any update


def test_compare_runs_cnnbn_with_every_methods_chunks():
    """``pipeoptim compare``'s run_one tells the batch norms the method's chunks (sync and 2bw split
    into depth micro-batches there); the first minibatch's loss is the same whatever the split."""
    from pipeoptim_compare.cli import run_one
    task = get_task("cnnbn", depth=4)
    first = {m: run_one(task, m, "sgd", 0.1, 4, ["cpu"] * 4, 1, minibatches=2) for m in ("sync", "2bw", "pipedream")}
    assert all(math.isfinite(r.final_loss) for r in first.values())
    for m in ("2bw", "pipedream"):  # minibatch 0 runs on the initial weights in every method
        assert first[m].losses[0] == pytest.approx(first["sync"].losses[0], abs=1e-5)


def test_refused_not_silently_wrong():
    """Plain BatchNorm under micro-batches, ghost batch norms told the wrong chunks, and
    micro-batches that split a group of rows: each refused."""
    task = get_task("cnnbn", depth=4, **SMALL)
    plain = _plain_copy(task.model)
    stages = [plain[0:2], plain[2:4], plain[4:6], plain[6:8]]
    with pytest.raises(ValueError, match="Batch-dependent modules"):
        Pipeline(stages, ["cpu"] * 4, _sgdm, task.loss_fn, method="1f1b-flush", chunks=2)
    with pytest.raises(ValueError, match="GhostBatchNorm built for chunks=1"):
        Pipeline(task.split(4), ["cpu"] * 4, _sgdm, task.loss_fn, method="1f1b-flush", chunks=2)
    pipe = _pipe(task, 4, "1f1b-flush", 3)  # 32 rows -> 11, 11, 10
    with pytest.raises(StageError, match="11 rows is not a multiple of group_rows=4"):
        pipe.train(task.batches[:1])


def test_library_deferred_batch_norm_alone_is_not_exact(float64):
    """Why the task's norms are ghost batch norms: plain BatchNorm converted to the library's
    DeferredBatchNorm normalises each micro-batch with its own statistics, so 1f1b-flush with
    2 micro-batches trains another function than sync (the loss differs from the first update)."""
    losses = []
    for method, c in (("sync", 1), ("1f1b-flush", 2)):
        task = get_task("cnnbn", depth=4, **SMALL)
        model = convert_deferred_batch_norm(_plain_copy(task.model).double(), c)
        stages = [model[0:2], model[2:4], model[4:6], model[6:8]]
        pipe = Pipeline(stages, ["cpu"] * 4, _sgdm, task.loss_fn, method=method, chunks=c)
        losses.append(pipe.train([(x.double(), y) for x, y in task.batches]))
    assert abs(losses[0][0] - losses[1][0]) > 1e-4
