"""A loss whose reduction the pipeline cannot see (a plain function) is probed once: a sum
trains as single-device training with that sum, a mean as with that mean; a loss that is
neither is refused where minibatches are split; evaluate() takes a metric returning a number."""
import copy
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.testing import assert_close

from pipeline_rt import Pipeline, StageError
from pipeline_rt.lossprobe import ReductionProbe, Share
from test_pipeline import single_device

pytestmark = pytest.mark.usefixtures("float64")

ROWS = 10  # split into 3 micro-batches: 4, 3, 3 rows


def _model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def _batches(n=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ROWS, 4, generator=g), torch.randint(0, 3, (ROWS,), generator=g)) for _ in range(n)]


def _opt(ps):
    return torch.optim.SGD(ps, lr=0.02, momentum=0.9)


def _pipeline(model, loss_fn, method="sync", chunks=3):
    stages = [copy.deepcopy(model[:2]), copy.deepcopy(model[2:])]
    return Pipeline(stages, ["cpu", "cpu"], _opt, loss_fn, method=method, chunks=chunks)


@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
def test_a_plain_function_loss_trains_as_single_device_training(reduction, method):
    """``lambda o, t: F.cross_entropy(o, t, reduction=...)`` says nothing about its reduction;
    weighed as a mean, the sum would train at 1/chunks of its gradient."""
    calls = []

    def loss_fn(out, y):
        calls.append(len(out))
        return F.cross_entropy(out, y, reduction=reduction)

    model, batches = _model(), _batches()
    pipe = _pipeline(model, loss_fn, method)
    losses = pipe.train(batches)
    assert pipe.reduction == reduction
    expected, ref = single_device(_model(), batches, _opt, lambda o, t: F.cross_entropy(o, t, reduction=reduction))
    assert_close(torch.tensor(losses), torch.tensor(expected))
    for p, q in zip([p for s in pipe.stages for p in s.parameters()], ref.parameters()):
        assert_close(p, q)
    # one probe (twice the rows of the first micro-batch), then the loss's own calls only
    assert calls == [4, 8, 3, 3] + [4, 3, 3] * (len(batches) - 1)


def test_probe_leaves_random_numbers_alone_and_decides_once():
    torch.manual_seed(3)
    out, y = torch.randn(6, 3), torch.randint(0, 3, (6,))

    def noisy_sum(o, t):  # draws: the probe's extra call must not move the generator
        return F.cross_entropy(o, t, reduction="sum") + 0 * torch.rand(())

    state = torch.get_rng_state()
    probe = ReductionProbe(noisy_sum, strict=True)
    probe(out, y)
    after_probe = torch.get_rng_state()
    torch.set_rng_state(state)
    noisy_sum(out, y)
    assert torch.equal(after_probe, torch.get_rng_state())
    assert probe.reduction == "sum"
    zero = ReductionProbe(lambda o, t: (o * 0).sum(), strict=True)
    zero(out, y)
    assert zero.reduction is None  # 0 = 2 * 0 decides nothing: the next call probes again
    cannot = ReductionProbe(lambda o, t: o["logits"].sum(), strict=True)
    cannot({"logits": out}, y)
    assert cannot.reduction == "mean"  # no rows to duplicate: taken as a mean, as before the probe


def test_a_loss_neither_mean_nor_sum_is_refused_where_minibatches_are_split():
    def squared_sum(out, y):  # a batch-level loss: duplicating rows multiplies it by 4
        return (out.sum() - y.sum()) ** 2

    model, batches = _model(), _batches(2)
    with pytest.raises(StageError, match="neither a mean nor a sum over rows") as e:
        _pipeline(model, squared_sum, chunks=3).train(batches)
    assert "loss_fn.reduction = 'mean'" in str(e.value) and "chunks=1" in str(e.value)
    pipe = _pipeline(model, squared_sum, chunks=1)  # one micro-batch: nothing to weigh
    assert_close(torch.tensor(pipe.train(batches)), torch.tensor(single_device(_model(), batches, _opt, squared_sum)[0]))


def test_share_weighs_after_the_probe_and_pickles_as_its_weight():
    probe = ReductionProbe(lambda o, t: o.sum(), strict=True)
    share = Share(3, 10, probe)
    assert share == 0.3 and share.weight() == 0.3
    probe.reduction = "sum"
    assert share.weight() == 1.0
    loaded = pickle.loads(pickle.dumps(share))
    assert type(loaded) is float and loaded == 1.0


@pytest.mark.parametrize("kind", ["float", "int", "numpy", "numpy-0d", "tensor-0d", "tensor-1"])
def test_evaluate_takes_a_metric_returning_a_number(kind):
    def accuracy(out, y):
        acc = (out.argmax(1) == y).double().mean()
        return {"float": acc.item(), "int": int((out.argmax(1) == y).all()), "numpy": np.float64(acc.item()),
                "numpy-0d": np.array(acc.item()), "tensor-0d": acc, "tensor-1": acc.reshape(1)}[kind]

    model, batches = _model(), _batches(3)
    batches[2] = (batches[2][0][:6], batches[2][1][:6])  # uneven minibatches: rows-weighted means
    pipe = _pipeline(model, lambda o, t: F.cross_entropy(o, t, reduction="sum"))
    res = pipe.evaluate(batches, metric=accuracy)
    rows = sum(len(y) for _, y in batches)
    with torch.no_grad():
        want_metric = sum(float(accuracy(model(x), y)) * len(y) for x, y in batches) / rows
        want_loss = sum(F.cross_entropy(model(x), y, reduction="sum").item() for x, y in batches) / rows
    assert res["metric"] == pytest.approx(want_metric, rel=1e-12)
    assert res["loss"] == pytest.approx(want_loss, rel=1e-12)  # the probed sum: per row, as a declared sum
    with pytest.raises(ValueError, match="metric a one-element tensor or a number"):
        pipe.evaluate(batches, metric=lambda o, t: "high")
