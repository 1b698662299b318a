"""`Pipeline` end to end on CPU, float64, against two oracles: single-device training (for
the flushing methods) and the sequential version-table simulation of :mod:`tests.oracle`
(for the asynchronous ones)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from pipeline_rt import METHODS, Pipeline, split_by_balance
from pipeline_rt.stage import StageError

import oracle

DT = torch.float64
TIGHT = dict(rtol=1e-10, atol=1e-12)
SGDM = lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)  # noqa: E731
ADAM = lambda ps: torch.optim.Adam(ps, lr=0.01)  # noqa: E731
MSE = nn.functional.mse_loss


def mlp(seed: int = 0, widths=(5, 7, 6, 6, 3)) -> nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for a, b in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(a, b, dtype=DT), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def convnet(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, dtype=DT), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(4, 4, 3, dtype=DT), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 2 * 2, 3, dtype=DT))


def data(num: int, rows: int, shape=(5,), out: int = 3, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, *shape, generator=g, dtype=DT), torch.randn(rows, out, generator=g, dtype=DT))
            for _ in range(num)]


def single_device(model: nn.Sequential, batches, make_opt, loss_fn=MSE):
    model = copy.deepcopy(model)
    opt = make_opt(model.parameters())
    losses = []
    for x, y in batches:
        opt.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def pipe_of(model, balance, make_opt, method, **kw):
    stages = split_by_balance(copy.deepcopy(model), balance)
    return Pipeline(stages, ["cpu"] * len(stages), make_opt, kw.pop("loss_fn", MSE), method=method, **kw)


def params_of(pipe):
    return [p for s in pipe.stages for p in s.parameters()]


# ----------------------------------------------------------------------------- flushing methods


@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
@pytest.mark.parametrize("make_opt", [SGDM, ADAM], ids=["sgdm", "adam"])
@pytest.mark.parametrize("net", ["mlp", "conv"])
def test_flushing_methods_match_single_device(method, make_opt, net):
    if net == "mlp":
        model, balance, batches = mlp(), [3, 2, 2], data(4, 7)
    else:
        model, balance, batches = convnet(), [2, 3, 2], data(4, 6, shape=(2, 8, 8))
    ref_losses, ref = single_device(model, batches, make_opt)
    pipe = pipe_of(model, balance, make_opt, method)
    losses = pipe.train(batches)
    assert_close(losses, ref_losses)
    for p, q in zip(params_of(pipe), ref.parameters()):
        assert_close(p, q)


def test_flushing_chunks_and_uneven_micro_batches():
    model, batches = mlp(), data(3, 7)  # 7 rows into 3 micro-batches: 3, 2, 2
    ref_losses, ref = single_device(model, batches, SGDM)
    pipe = pipe_of(model, [3, 2, 2], SGDM, "1f1b-flush", chunks=3)
    assert_close(pipe.train(batches), ref_losses)
    for p, q in zip(params_of(pipe), ref.parameters()):
        assert_close(p, q)


def test_successive_train_calls_equal_one_call():
    model, batches = mlp(), data(5, 6)
    one = pipe_of(model, [3, 2, 2], ADAM, "sync")
    two = pipe_of(model, [3, 2, 2], ADAM, "sync")
    l1 = one.train(batches)
    l2 = two.train(batches[:2]) + two.train(batches[2:])
    assert_close(l1, l2)
    for p, q in zip(params_of(one), params_of(two)):
        assert_close(p, q)


# ----------------------------------------------------------------------------- async methods

ASYNC = [
    ("async", {}), ("pipedream", {}), ("2bw", {}), ("pipeoptim", {}),
    ("pipeoptim", {"backward": "predicted"}), ("spectrain", {}),
]


@pytest.mark.parametrize("method,kw", ASYNC, ids=[m + "-" + "-".join(kw.values()) for m, kw in ASYNC])
@pytest.mark.parametrize("make_opt", [SGDM, ADAM], ids=["sgdm", "adam"])
def test_async_methods_match_oracle(method, kw, make_opt):
    model, balance, batches = mlp(), [2, 2, 2, 1], data(7, 8)
    name = "pipeoptim-predicted" if kw else method
    direction = oracle.last_update
    if method == "spectrain":  # SpecTrain's smoothed gradient: the momentum buffer / Adam's first moment
        direction = oracle.state_buffer("momentum_buffer" if make_opt is SGDM else "exp_avg")
    want_losses, want = oracle.simulate(split_by_balance(model, balance), batches, make_opt, MSE, name,
                                        direction=direction)
    pipe = pipe_of(model, balance, make_opt, method, **kw)
    losses = pipe.train(batches)
    assert_close(losses, want_losses, **TIGHT)
    for stage, w in zip(pipe.stages, want):
        for p, q in zip(stage.parameters(), w):
            assert_close(p.detach(), q, **TIGHT)


def test_oracle_distinguishes_the_methods():
    """The async methods really differ on this problem (so matching the oracle means something)."""
    model, balance, batches = mlp(), [2, 2, 2, 1], data(7, 8)
    finals = {}
    for name in ("async", "pipedream", "pipeoptim", "pipeoptim-predicted", "spectrain", "1f1b-flush"):
        finals[name] = oracle.simulate(split_by_balance(model, balance), batches, SGDM, MSE,
                                       "sync" if name == "1f1b-flush" else name)[1][0][0]
    names = list(finals)
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            assert (finals[names[a]] - finals[names[b]]).abs().max() > 1e-6, (names[a], names[b])


def test_accumulation_over_micro_batches_matches_oracle():
    model, balance, batches = mlp(), [3, 2, 2], data(5, 9)
    want_losses, want = oracle.simulate(split_by_balance(model, balance), batches, ADAM, MSE, "pipeoptim", chunks=3)
    pipe = pipe_of(model, balance, ADAM, "pipeoptim", chunks=3)
    assert_close(pipe.train(batches), want_losses, **TIGHT)
    for p, q in zip(params_of(pipe), [t for w in want for t in w]):
        assert_close(p.detach(), q, **TIGHT)


# ----------------------------------------------------------------------------- counters


def test_weight_version_counters():
    model, batches = mlp(), data(8, 8)
    n = 4
    expect = {
        "async": [1] * n,
        "pipedream": [n - k for k in range(n)],        # w_k + 1
        "2bw": [2, 2, 2, 1],                             # last stage: forward and backward back to back
        "pipeoptim": [2, 2, 2, 1],                       # live + one predicted buffer (s = 0 at the last stage)
        "sync": [1] * n,
    }
    for method, want in expect.items():
        pipe = pipe_of(model, [2, 2, 2, 1], SGDM, method)
        pipe.train(batches)
        assert pipe.peak_versions == want, method
        assert all(v <= 2 for v in pipe.peak_versions) or method == "pipedream"
    pipe = pipe_of(model, [2, 2, 2, 1], SGDM, "pipeoptim")
    pipe.train(batches)
    assert pipe.peak_in_flight == [n - k for k in range(n)]
    assert pipe.peak_in_flight == pipe.schedule.finite(len(batches)).simulation.peak_in_flight


def test_prediction_errors():
    model, batches = mlp(), data(8, 8)
    errs = {}
    for method in ("async", "pipeoptim"):
        pipe = pipe_of(model, [2, 2, 2, 1], SGDM, method, track_error=True)
        pipe.train(batches)
        e = pipe.prediction_errors
        # one entry per backward with s > 0: min(j, w_k) > 0 for j >= 1 at stages with w_k > 0
        assert [len(x) for x in e] == [7, 7, 7, 0]
        assert all(isinstance(v, float) for x in e for v in x)
        errs[method] = e
    # not predicting: W_hat = W_F, so the error is exactly 1
    assert_close(errs["async"][0], [1.0] * 7)
    # predicting with momentum beats not predicting on this smooth problem
    assert sum(errs["pipeoptim"][0]) < sum(errs["async"][0])


def test_prediction_errors_skip_parameterless_stages():
    # [Linear, Tanh, Linear, ...] cut one layer per stage: the Tanh stages have no weights
    model, batches = mlp(), data(4, 8)
    pipe = pipe_of(model, [1] * len(model), SGDM, "pipeoptim", track_error=True)
    pipe.train(batches)
    for k, errs in enumerate(pipe.prediction_errors):
        has_weights = any(True for _ in pipe.stages[k].parameters())
        last = k == len(model) - 1
        assert (len(errs) > 0) == (has_weights and not last), k


def test_schedule_is_printable():
    pipe = pipe_of(mlp(), [3, 2, 2], SGDM, "pipeoptim")
    text = str(pipe.schedule)
    assert "async-1f1b schedule: 3 stages" in text and "stage 2:" in text
    assert "a window of 5 minibatches" in text and "drains" in text


def test_tuples_and_integer_tensors_between_stages():
    class Split(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4, dtype=DT)

        def forward(self, x):
            return torch.tanh(self.lin(x)), (x[:, 0] > 0).long()

    class Join(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 2, dtype=DT)
            self.emb = nn.Embedding(2, 2, dtype=DT)

        def forward(self, h, idx):
            return self.lin(h) + self.emb(idx)

    torch.manual_seed(0)
    a, b = Split(), Join()
    batches = data(3, 6, shape=(4,), out=2)
    whole = nn.Sequential()  # single-device reference, written out
    ra, rb = copy.deepcopy(a), copy.deepcopy(b)
    opt = torch.optim.SGD(list(ra.parameters()) + list(rb.parameters()), lr=0.1)
    ref = []
    for x, y in batches:
        opt.zero_grad()
        loss = MSE(rb(*ra(x)), y)
        loss.backward()
        opt.step()
        ref.append(loss.item())
    del whole
    pipe = Pipeline([a, b], ["cpu", "cpu"], lambda ps: torch.optim.SGD(ps, lr=0.1), MSE, method="sync")
    assert_close(pipe.train(batches), ref)
    assert_close(pipe.stages[1].emb.weight, rb.emb.weight)


# ----------------------------------------------------------------------------- bad input


def test_bad_construction():
    stages = split_by_balance(mlp(), [3, 2, 2])
    with pytest.raises(ValueError, match="3 stages but 2 devices"):
        Pipeline(stages, ["cpu"] * 2, SGDM, MSE)
    with pytest.raises(ValueError, match="unknown method 'gpipe'.*pipeoptim"):
        Pipeline(stages, ["cpu"] * 3, SGDM, MSE, method="gpipe")
    with pytest.raises(ValueError, match="unknown backend"):
        Pipeline(stages, ["cpu"] * 3, SGDM, MSE, backend="mpi")
    with pytest.raises(ValueError, match="at least one stage"):
        Pipeline([], [], SGDM, MSE)
    with pytest.raises(TypeError, match="callable"):
        Pipeline(stages, ["cpu"] * 3, torch.optim.SGD(stages[0].parameters(), lr=0.1), MSE)
    with pytest.raises(ValueError, match="backward='predicted' needs a predicting method"):
        Pipeline(stages, ["cpu"] * 3, SGDM, MSE, method="pipedream", backward="predicted")


def test_bad_batches():
    pipe = pipe_of(mlp(), [3, 2, 2], SGDM, "sync")
    with pytest.raises(ValueError, match="no minibatches"):
        pipe.train([])
    with pytest.raises(ValueError, match="fewer than the 3 micro-batches"):
        pipe.train(data(1, 2))
    x, y = data(1, 6)[0]
    with pytest.raises(ValueError, match="target tensor must have 6 rows"):
        pipe.train([(x, y[:5])])
    with pytest.raises(TypeError, match="pair"):
        pipe.train([x])
    unreduced = pipe_of(mlp(), [3, 2, 2], SGDM, "pipeoptim", loss_fn=lambda out, target: (out - target) ** 2)
    with pytest.raises(ValueError, match="reduce the loss"):
        unreduced.train(data(2, 6))


def test_shapes_that_do_not_chain_fail_before_any_update():
    stages = [nn.Sequential(nn.Linear(5, 7, dtype=DT)), nn.Sequential(nn.Linear(6, 3, dtype=DT))]
    before = [p.detach().clone() for s in stages for p in s.parameters()]
    pipe = Pipeline(stages, ["cpu", "cpu"], SGDM, MSE, method="pipeoptim")
    with pytest.raises(StageError, match=r"stage 1 forward failed on micro-batch \(0, 0\).*\(4, 7\)"):
        pipe.train(data(3, 4))
    for p, q in zip(params_of(pipe), before):
        assert torch.equal(p, q)
    assert all(not s._records for s in pipe.stage_runtimes)  # cleared for the next call


def test_nan_loss_with_check_finite():
    model, batches = mlp(), data(3, 6)
    batches[1] = (batches[1][0], torch.full_like(batches[1][1], float("nan")))
    pipe = pipe_of(model, [3, 2, 2], SGDM, "pipeoptim", check_finite=True)
    with pytest.raises(FloatingPointError, match="loss of micro-batch \\(1, 0\\)"):
        pipe.train(batches)
    # without the check the NaN simply shows in the losses
    pipe = pipe_of(model, [3, 2, 2], SGDM, "pipeoptim")
    assert math.isnan(pipe.train(batches)[1])


def test_exception_in_a_stage_propagates_and_the_pipeline_recovers():
    class Boom(nn.Module):
        armed = True

        def forward(self, x):
            if Boom.armed:
                raise KeyError("boom")  # not a shape error: propagates as is
            return x

    model = mlp()
    stages = split_by_balance(copy.deepcopy(model), [3, 2, 2])
    stages[1].append(Boom())
    pipe = Pipeline(stages, ["cpu"] * 3, SGDM, MSE, method="pipedream")
    with pytest.raises(KeyError, match="boom"):
        pipe.train(data(4, 6))
    Boom.armed = False
    assert len(pipe.train(data(4, 6))) == 4


def test_all_methods_are_covered():
    tested = {m for m, _ in ASYNC} | {"sync", "1f1b-flush"}
    tested |= {"pipeoptim-cal"}  # against pipedream and pipeoptim(backward=predicted): tests/test_calibrated.py
    tested |= {"pipeoptim-rollout"}  # against pipeoptim(backward=predicted) with plain SGD: tests/test_rollout.py
    tested |= {"pipeoptim-calroll"}  # against pipedream and pipeoptim-rollout: tests/test_calroll.py
    tested |= {"2bw-dm"}  # against 2bw with each stage's momentum lowered by its delay: tests/test_methods.py
    assert tested == set(METHODS)
