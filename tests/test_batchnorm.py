"""DeferredBatchNorm: running statistics committed once per minibatch, equal to a batch norm
on the whole minibatch; normalisation per micro-batch; nn.BatchNorm-compatible state."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from pipeline_rt import Pipeline
from pipeline_rt.batchnorm import (DeferredBatchNorm, Pending, convert_deferred_batch_norm, load_pending_stats,
                                   pending_stats)

ROWS = 15  # uneven splits for chunks 2, 4 and 7 (at least 2 rows each)

SHAPES = {  # batch norm class, one row's shape
    "1d-2D": (nn.BatchNorm1d, (3,)),
    "1d-3D": (nn.BatchNorm1d, (3, 5)),
    "2d": (nn.BatchNorm2d, (3, 4, 2)),
    "3d": (nn.BatchNorm3d, (3, 2, 2, 2)),
}


def _minibatches(row_shape, count=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    # non-zero mean and varying scale so that per-micro-batch commits are far off
    return [torch.randn(ROWS, *row_shape, generator=g, dtype=torch.float64) * (1 + j) + 3 * j for j in range(count)]


def _assert_same_stats(bn, ref):
    assert_close(bn.running_mean, ref.running_mean)
    assert_close(bn.running_var, ref.running_var)
    assert int(bn.num_batches_tracked) == int(ref.num_batches_tracked)


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("momentum", [0.1, 0.3, None])
@pytest.mark.parametrize("chunks", [1, 2, 3, 4, 7])
def test_running_stats_equal_whole_minibatch_batch_norm(shape, momentum, chunks):
    cls, row = SHAPES[shape]
    ref = cls(3, momentum=momentum).double()
    bn = convert_deferred_batch_norm(cls(3, momentum=momentum).double(), chunks)
    assert isinstance(bn, DeferredBatchNorm)
    for x in _minibatches(row):
        ref(x)
        for xm in torch.tensor_split(x, chunks):
            bn(xm)
        _assert_same_stats(bn, ref)  # after every minibatch, not only at the end
        assert bn.pending is None


def test_per_micro_batch_commits_would_differ():
    """The oracle above separates deferred from per-micro-batch commits (the bug it fixes)."""
    ref, plain = nn.BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
    for x in _minibatches((3, 4, 2)):
        ref(x)
        for xm in torch.tensor_split(x, 4):
            plain(xm)
    with pytest.raises(AssertionError):
        _assert_same_stats(plain, ref)


def test_stats_not_committed_before_the_last_micro_batch():
    bn = DeferredBatchNorm(3, chunks=3).double()
    before = bn.running_mean.clone(), bn.running_var.clone()
    x = _minibatches((3, 4, 2))[1]
    for xm in torch.tensor_split(x, 3)[:2]:
        bn(xm)
    assert_close(bn.running_mean, before[0])
    assert_close(bn.running_var, before[1])
    assert int(bn.num_batches_tracked) == 0 and bn.pending.forwards == 2


def test_training_output_is_per_micro_batch_and_exact_with_one_chunk():
    x = _minibatches((3, 4, 2))[1]
    bn = DeferredBatchNorm(3, chunks=4).double()
    nn.init.uniform_(bn.weight)
    nn.init.uniform_(bn.bias)
    for xm in torch.tensor_split(x, 4):
        alone = nn.BatchNorm2d(3).double()
        alone.load_state_dict(bn.state_dict())
        assert_close(bn(xm), alone(xm))
    one = DeferredBatchNorm(3, chunks=1).double()
    whole = nn.BatchNorm2d(3).double()
    assert_close(one(x), whole(x))


def test_gradients_match_batch_norm_on_the_micro_batch():
    xm = _minibatches((3, 4, 2))[0][:4].requires_grad_()
    bn, plain = DeferredBatchNorm(3, chunks=2).double(), nn.BatchNorm2d(3).double()
    xp = xm.detach().clone().requires_grad_()
    (bn(xm) ** 3).sum().backward()
    (plain(xp) ** 3).sum().backward()
    assert_close(xm.grad, xp.grad)
    assert_close(bn.weight.grad, plain.weight.grad)
    assert_close(bn.bias.grad, plain.bias.grad)


def test_eval_mode_is_a_plain_batch_norm_and_changes_nothing():
    bn, ref = DeferredBatchNorm(3, chunks=2).double(), nn.BatchNorm2d(3).double()
    for x in _minibatches((3, 4, 2)):
        for xm in torch.tensor_split(x, 2):
            bn(xm)
    ref.load_state_dict(bn.state_dict())
    bn.eval(), ref.eval()
    state = copy.deepcopy(bn.state_dict())
    x = _minibatches((3, 4, 2), seed=1)[0]
    assert_close(bn(x), ref(x))
    assert bn.pending is None
    for k, v in bn.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_state_dict_is_that_of_nn_batch_norm():
    ref = nn.BatchNorm2d(3).double()
    bn = DeferredBatchNorm(3, chunks=2).double()
    assert list(bn.state_dict()) == list(ref.state_dict())
    for x in _minibatches((3, 4, 2)):
        ref(x)
    bn.load_state_dict(ref.state_dict())  # strict, both ways
    _assert_same_stats(bn, ref)
    fresh = nn.BatchNorm2d(3).double()
    fresh.load_state_dict(bn.state_dict())
    _assert_same_stats(fresh, ref)


def test_convert_replaces_tracking_batch_norms_and_shares_their_tensors():
    bn1, bn2, untracked = nn.BatchNorm1d(4, momentum=None, eps=1e-3), nn.BatchNorm2d(2, affine=False), \
        nn.BatchNorm2d(2, track_running_stats=False)
    bn1.eval()
    model = nn.Sequential(nn.Conv2d(2, 2, 1), bn2, untracked, nn.Sequential(nn.Flatten(), nn.Linear(2, 4), bn1))
    params = list(model.parameters())
    out = convert_deferred_batch_norm(model, 3)
    assert out is model
    d2, d1 = model[1], model[3][2]
    assert isinstance(d2, DeferredBatchNorm) and isinstance(d1, DeferredBatchNorm)
    assert model[2] is untracked and isinstance(model[0], nn.Conv2d)
    assert (d1.chunks, d1.momentum, d1.eps, d1.affine, d1.training) == (3, None, 1e-3, True, False)
    assert (d2.affine, d2.training, d2.weight) == (False, True, None)
    assert d1.weight is bn1.weight and d1.bias is bn1.bias
    assert d1.running_mean is bn1.running_mean and d1.num_batches_tracked is bn1.num_batches_tracked
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    assert convert_deferred_batch_norm(nn.ReLU(), 2).__class__ is nn.ReLU


def test_chunks_must_be_positive():
    with pytest.raises(ValueError, match="chunks must be a positive int"):
        DeferredBatchNorm(3, chunks=0)


def test_pending_stats_resume_in_the_middle_of_a_minibatch():
    model = convert_deferred_batch_norm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(), 4)
    x = _minibatches((3,))[2]
    parts = torch.tensor_split(x, 4)
    for xm in parts[:2]:
        model(xm)
    saved, pending = copy.deepcopy(model.state_dict()), pending_stats(model)
    assert list(pending) == ["1"] and isinstance(pending["1"], Pending) and pending["1"].forwards == 2
    for xm in parts[2:]:
        model(xm)

    resumed = convert_deferred_batch_norm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(), 4)
    resumed.load_state_dict(saved)
    load_pending_stats(resumed, pending)
    for xm in parts[2:]:
        resumed(xm)
    _assert_same_stats(resumed[1], model[1])

    without = convert_deferred_batch_norm(nn.Sequential(nn.Linear(3, 3), nn.BatchNorm1d(3)).double(), 4)
    without.load_state_dict(saved)
    for xm in parts[2:]:
        without(xm)
    assert int(without[1].num_batches_tracked) == 0  # two forwards of four: nothing committed


def test_load_pending_stats_drops_and_checks_names():
    bn = DeferredBatchNorm(3, chunks=3).double()
    bn(_minibatches((3,))[0][:4])
    assert bn.pending is not None
    load_pending_stats(bn, {})
    assert bn.pending is None
    with pytest.raises(ValueError, match="no DeferredBatchNorm at \\['2'\\]"):
        load_pending_stats(bn, {"2": Pending(1, 4, torch.zeros(3), torch.zeros(3))})


@pytest.mark.parametrize("method", ["sync", "1f1b-flush", "2bw", "pipedream"])
def test_through_the_pipeline_running_stats_equal_single_device(method):
    """A batch norm first in each stage 0 sees the raw data, so its running statistics must
    equal a single-device batch norm's over the whole minibatches, whatever the schedule
    interleaves between the forwards (checks the ordering DeferredBatchNorm relies on)."""
    torch.manual_seed(0)
    chunks = 3
    stage0 = nn.Sequential(nn.BatchNorm1d(4, momentum=None), nn.Linear(4, 4), nn.Tanh()).double()
    stage1 = nn.Sequential(nn.Linear(4, 2)).double()
    stage0 = convert_deferred_batch_norm(stage0, chunks)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(ROWS, 4, generator=g, dtype=torch.float64) * 2 + 1,
                torch.randn(ROWS, 2, generator=g, dtype=torch.float64)) for _ in range(5)]
    pipe = Pipeline([stage0, stage1], ["cpu", "cpu"], lambda ps: torch.optim.SGD(ps, lr=0.01),
                    nn.functional.mse_loss, method=method, chunks=chunks)
    pipe.train(batches)
    ref = nn.BatchNorm1d(4, momentum=None).double()
    for x, _ in batches:
        ref(x)
    _assert_same_stats(pipe.stages[0][0], ref)


def test_every_schedule_forwards_a_minibatchs_micro_batches_consecutively():
    """The ordering DeferredBatchNorm's counting relies on, for every method's shape: at each
    stage the forwards come in (minibatch, micro-batch) order, so forwards k*chunks+1 ..
    (k+1)*chunks are exactly minibatch k's."""
    from pipeline_rt.methods import METHODS
    from pipeline_rt.schedule import F, build
    for shape in sorted({m.shape for m in METHODS.values()}):
        for stages in (1, 2, 3, 4):
            for chunks in (1, 2, 3, 5):
                sched = build(shape, stages, 6, chunks)
                for k in range(stages):
                    units = [a.unit for a in sched.compute(k) if a.kind == F]
                    assert units == [(j, m) for j in range(6) for m in range(chunks)], (shape, stages, chunks, k)
