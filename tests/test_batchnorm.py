"""DeferredBatchNorm: running statistics committed once per minibatch, equal to a batch norm
on the whole minibatch; normalisation per micro-batch; nn.BatchNorm-compatible state."""
import copy

import pytest
import torch
from torch import nn
from torch.testing import assert_close
from torch.nn.modules.batchnorm import _BatchNorm

from pipeline_rt import Pipeline
from pipeline_rt.batchnorm import (DeferredBatchNorm, GhostBatchNorm, Pending, convert_deferred_batch_norm,
                                   load_pending_stats, pending_stats)

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


# ---------------------------------------------------------------------- what DeferredBatchNorm guarantees


class _Residual(nn.Module):
    """``x + conv(relu(bn(x)))``: a pre-activation ResNet unit."""

    def __init__(self, c):
        super().__init__()
        self.bn, self.conv = nn.BatchNorm2d(c, momentum=None), nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv(torch.relu(self.bn(x)))


def _resnet(seed=0):
    torch.manual_seed(seed)
    stage0 = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4, momentum=None), nn.ReLU(),
                           _Residual(4)).double()
    stage1 = nn.Sequential(_Residual(4), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    return [stage0, stage1]


def _image_batches(count, rows=16, seed=2):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 2, 5, 5, generator=g, dtype=torch.float64) * 2 + 1,
             torch.randint(0, 3, (rows,), generator=g)) for _ in range(count)]


def _norms(stages):
    return [m for s in stages for m in s.modules() if isinstance(m, _BatchNorm)]


def test_deferred_batch_norm_guarantee_first_exact_later_not():
    """Pinned against single-device training with nn.BatchNorm2d after one minibatch of 4
    micro-batches: the first batch norm's running statistics are exact; the later ones are
    not (their inputs went through per-micro-batch normalisations), nor is the loss.
    ``momentum=None``: the first commit is the minibatch's statistics themselves."""
    ref = _resnet()
    stages = [DeferredBatchNorm.convert(s) for s in _resnet()]  # chunks=None: the pipeline's 4
    pipe = Pipeline(stages, ["cpu", "cpu"], lambda ps: torch.optim.SGD(ps, lr=0.1), nn.functional.cross_entropy,
                    method="sync", chunks=4)
    assert all(m.chunks == 4 for m in _norms(pipe.stages))
    (x, y), = batch = _image_batches(1)
    loss = pipe.train(batch)[0]
    ref_loss = nn.functional.cross_entropy(ref[1](ref[0](x)), y).item()
    ours, theirs = _norms(pipe.stages), _norms(ref)
    assert len(ours) == 3 and all(isinstance(m, DeferredBatchNorm) for m in ours)
    _assert_same_stats(ours[0], theirs[0])                      # the first: exact
    for m, r in zip(ours[1:], theirs[1:]):                      # the later ones: not
        off = max((m.running_mean - r.running_mean).abs().max(), (m.running_var - r.running_var).abs().max())
        assert off > 1e-3, off  # 6e-3 here, rounding is 1e-15
    assert abs(loss - ref_loss) > 1e-3                          # normalisation per micro-batch


# ---------------------------------------------------------------------- GhostBatchNorm


GHOST_SHAPES = {"1d-2D": (2,), "1d-3D": (2, 5), "2d": (2, 3, 4), "3d": (2, 2, 2, 3)}


@pytest.mark.parametrize("shape", sorted(GHOST_SHAPES))
@pytest.mark.parametrize("affine", [True, False])
def test_ghost_batch_norm_normalises_each_group_as_a_batch_norm_on_it(shape, affine):
    torch.manual_seed(0)
    gb = GhostBatchNorm(2, 3, affine=affine, chunks=2).double()
    if affine:
        nn.init.uniform_(gb.weight, 0.5, 1.5)
        nn.init.normal_(gb.bias)
    x = torch.randn(12, *GHOST_SHAPES[shape], dtype=torch.float64) * 3 + 1
    out = torch.cat([gb(xm) for xm in torch.tensor_split(x, 2)])  # two micro-batches of two groups
    ref = torch.cat([nn.functional.batch_norm(x[i:i + 3], None, None, gb.weight, gb.bias, True, 0.0, gb.eps)
                     for i in range(0, 12, 3)])
    assert_close(out, ref)
    mean, var = torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    nn.functional.batch_norm(x, mean, var, training=True, momentum=0.1)  # all 12 rows at once
    assert_close(gb.running_mean, mean)
    assert_close(gb.running_var, var)
    assert int(gb.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="an input of 4 rows is not a multiple of group_rows=3"):
        gb(x[:4])


def _ghost_model(seed=0):
    return [GhostBatchNorm.convert(s, group_rows=4) for s in _resnet(seed)]


@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
def test_ghost_batch_norm_under_micro_batches_equals_single_device_training(method):
    """The same ghost batch norm model trained on one device, one forward per minibatch:
    the pipeline with 4 micro-batches of 4 rows gives the same losses, weights and running
    statistics at every layer."""
    ref = _ghost_model()
    opt = lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9)  # noqa: E731
    pipe = Pipeline(_ghost_model(), ["cpu", "cpu"], opt, nn.functional.cross_entropy, method=method, chunks=4)
    batches = _image_batches(3)
    losses = pipe.train(batches)
    model = nn.Sequential(*ref)
    ref_opt, expected = opt(model.parameters()), []
    for x, y in batches:
        ref_opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        ref_opt.step()
        expected.append(loss.item())
    assert_close(torch.tensor(losses), torch.tensor(expected))
    for p, q in zip(nn.Sequential(*pipe.stages).state_dict().values(), model.state_dict().values()):
        assert_close(p, q)  # weights and running statistics of every batch norm
    assert [m.chunks for m in _norms(pipe.stages)] == [4, 4, 4] and [m.chunks for m in _norms(ref)] == [1, 1, 1]


def test_convert_to_ghost_keeps_tensors_and_follows_the_pipeline():
    bn1, bn3, untracked = nn.BatchNorm1d(4, eps=1e-3), nn.BatchNorm3d(2, momentum=None), \
        nn.BatchNorm2d(2, track_running_stats=False)
    bn1.eval()
    model = nn.Sequential(nn.Conv3d(2, 2, 1), bn3, nn.Sequential(untracked, nn.Flatten(), nn.Linear(2, 4), bn1))
    params = list(model.parameters())
    assert GhostBatchNorm.convert(model, group_rows=4) is model
    g3, g1 = model[1], model[2][3]
    assert type(g3) is GhostBatchNorm and type(g1) is GhostBatchNorm and model[2][0] is untracked
    assert (g1.group_rows, g1.eps, g1.training, g1.follows, g3.momentum) == (4, 1e-3, False, True, None)
    assert g1.weight is bn1.weight and g1.running_var is bn1.running_var
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    root = GhostBatchNorm.convert(nn.BatchNorm2d(3), group_rows=2, chunks=5)
    assert type(root) is GhostBatchNorm and (root.chunks, root.follows) == (5, False)
    assert "group_rows=2" in repr(root)
    with pytest.raises(ValueError, match="group_rows must be a positive int"):
        GhostBatchNorm(3, 0)
