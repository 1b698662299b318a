"""The executor core as a training loop: epochs, the callback, early stop, max_steps, the
learning-rate scheduler, gradient clipping, evaluation and inference.

Oracles: single-device training (the flush methods) and the sequential simulation of
``tests/oracle.py`` (the asynchronous ones), run over exactly the minibatches the pipeline ran.
"""
from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import oracle
from pipeline_rt import Pipeline, split_by_balance
from pipeline_rt.executor import LossLog
from test_pipeline import ADAM, MSE, SGDM, TIGHT, data, mlp, params_of, pipe_of, single_device

BALANCE = [3, 2, 2]


def test_epochs_equal_one_run_over_the_concatenation():
    model, batches = mlp(), data(4, 6)
    pipe = pipe_of(model, BALANCE, SGDM, "pipeoptim")
    losses = pipe.train(batches, epochs=3)
    want_losses, want = oracle.simulate(split_by_balance(model, BALANCE), batches * 3, SGDM, MSE, "pipeoptim",
                                        direction=oracle.state_buffer("momentum_buffer"))
    assert_close(losses, want_losses, **TIGHT)
    for p, q in zip(params_of(pipe), [w for ws in want for w in ws]):
        assert_close(p, q, **TIGHT)


def test_callback_sees_every_minibatch_in_order():
    seen = []
    pipe = pipe_of(mlp(), BALANCE, SGDM, "pipedream")
    losses = pipe.train(data(3, 6), epochs=2, callback=lambda info: seen.append((info.step, info.epoch, info.loss)))
    assert [(s, e) for s, e, _ in seen] == [(0, 0), (1, 0), (2, 0), (3, 1), (4, 1), (5, 1)]
    assert [x for _, _, x in seen] == losses


@pytest.mark.parametrize("method,lag", [("sync", 1), ("1f1b-flush", 1), ("pipeoptim", 3), ("pipedream", 3),
                                        ("2bw", 1)])
def test_early_stop_equals_the_oracle_over_the_minibatches_run(method, lag):
    """A callback returning False at minibatch j stops feeding at the first stage's next
    decision after minibatch j's gradient reached it (the first stage decides whether
    minibatch i + 1 exists when minibatch i's last micro-batch enters it): with 3 stages,
    ``j + 1 + lag`` minibatches run, and the weights equal training on exactly those."""
    model, batches = mlp(), data(12, 6)
    pipe = pipe_of(model, BALANCE, SGDM, method)
    losses = pipe.train(batches, callback=lambda info: info.step != 4)
    assert len(losses) == 5 + lag
    ran = batches[:len(losses)]
    if method in ("sync", "1f1b-flush"):
        twin = pipe_of(model, BALANCE, SGDM, method)
        want_losses = twin.train(ran)
        want = [p.detach() for p in params_of(twin)]
    else:
        direction = oracle.last_update if method == "2bw" else oracle.state_buffer("momentum_buffer")
        want_losses, ws = oracle.simulate(split_by_balance(model, BALANCE), ran, SGDM, MSE, method,
                                          direction=direction)
        want = [w for stage in ws for w in stage]
    assert_close(losses, want_losses, **TIGHT)
    for p, q in zip(params_of(pipe), want):
        assert_close(p, q, **TIGHT)


def test_max_steps_on_an_infinite_iterator():
    model, batches = mlp(), data(5, 6)
    pipe = pipe_of(model, BALANCE, ADAM, "pipeoptim")
    losses = pipe.train(itertools.cycle(batches), max_steps=12)
    twin = pipe_of(model, BALANCE, ADAM, "pipeoptim")
    assert losses == twin.train((batches * 3)[:12])  # the same minibatches, as a finite list
    for p, q in zip(params_of(pipe), params_of(twin)):
        assert torch.equal(p, q)
    with pytest.raises(ValueError, match="max_steps must be a positive int"):
        pipe.train(batches, max_steps=0)


def _per_stage_single_device(model, batches, make_opt, schedule, clip):
    """Single-device training with one optimizer, scheduler and clipping per stage."""
    stages = split_by_balance(copy.deepcopy(model), BALANCE)
    opts = [make_opt(list(s.parameters())) for s in stages]
    scheds = [schedule(o) for o in opts]
    losses = []
    for x, y in batches:
        h = x
        for s in stages:
            h = s(h)
        loss = MSE(h, y)
        loss.backward()
        losses.append(loss.item())
        for s, o, sc in zip(stages, opts, scheds):
            if clip is not None:
                torch.nn.utils.clip_grad_norm_(s.parameters(), clip)
            o.step()
            o.zero_grad()
            sc.step()
    return losses, [p for s in stages for p in s.parameters()]


@pytest.mark.parametrize("clip", [None, 0.05])
@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
def test_scheduler_and_clipping_per_stage_equal_single_device(method, clip):
    model, batches = mlp(), data(6, 6)
    schedule = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1.0, (t + 1) / 3) * 0.9 ** t)  # noqa: E731
    pipe = pipe_of(model, BALANCE, SGDM, method, lr_scheduler=schedule, clip_grad_norm=clip)
    losses = pipe.train(batches)
    want_losses, want = _per_stage_single_device(model, batches, SGDM, schedule, clip)
    assert_close(losses, want_losses, **TIGHT)
    for p, q in zip(params_of(pipe), want):
        assert_close(p, q, **TIGHT)
    lrs = [s.optimizer.param_groups[0]["lr"] for s in pipe.stage_runtimes]
    assert lrs == [0.05 * 0.9 ** 6] * 3, "each stage's scheduler stepped once per minibatch"


@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
def test_global_clipping_equals_clipping_the_whole_model(method):
    model, batches = mlp(), data(5, 6)
    pipe = pipe_of(model, BALANCE, SGDM, method, clip_grad_norm=0.05, clip_grad_scope="global")
    losses = pipe.train(batches)
    ref = copy.deepcopy(model)
    opt = SGDM(ref.parameters())
    want = []
    for x, y in batches:
        loss = MSE(ref(x), y)
        loss.backward()
        want.append(loss.item())
        torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
        opt.step()
        opt.zero_grad()
    assert_close(losses, want, **TIGHT)
    for p, q in zip(params_of(pipe), ref.parameters()):
        assert_close(p, q, **TIGHT)
    with pytest.raises(ValueError, match="only the flush methods"):
        pipe_of(model, BALANCE, SGDM, "pipeoptim", clip_grad_norm=1.0, clip_grad_scope="global")


def test_evaluate_and_forward_equal_the_stages_in_sequence():
    model = nn.Sequential(nn.Linear(5, 6, dtype=torch.float64), nn.Dropout(0.5), nn.Tanh(),
                          nn.Linear(6, 3, dtype=torch.float64))
    pipe = pipe_of(model, [2, 2], SGDM, "pipeoptim")
    pipe.train(data(4, 6))
    evals = data(3, 7, seed=5) + data(1, 2, seed=6)  # an uneven last batch
    metric = lambda out, y: (out.argmax(1) == y.argmax(1)).double().mean()  # noqa: E731
    got = pipe.evaluate(evals, metric=metric)
    assert all(m.training for s in pipe.stages for m in s.modules()), "modes restored"
    ref = copy.deepcopy(nn.Sequential(*pipe.stages)).eval()
    rows = sum(x.shape[0] for x, _ in evals)
    with torch.no_grad():
        want_loss = sum(MSE(ref(x), y).item() * x.shape[0] for x, y in evals) / rows
        want_metric = sum(metric(ref(x), y).item() * x.shape[0] for x, y in evals) / rows
    assert got["loss"] == pytest.approx(want_loss, rel=1e-12) and got["metric"] == pytest.approx(want_metric, rel=1e-12)
    x = evals[0][0]
    with torch.no_grad():
        assert torch.equal(pipe.forward(x), ref(x))
    assert pipe.evaluate(evals)["metric"] is None
    with pytest.raises(ValueError, match="at least one"):
        pipe.evaluate([])


def test_sum_reduced_loss_weights_micro_batches_by_one():
    model, batches = mlp(), data(4, 6)
    loss_sum = nn.MSELoss(reduction="sum")
    pipe = pipe_of(model, BALANCE, SGDM, "sync", loss_fn=loss_sum)
    losses = pipe.train(batches)
    want_losses, want = single_device(model, batches, SGDM, loss_sum)
    assert_close(losses, want_losses, **TIGHT)
    for p, q in zip(params_of(pipe), want.parameters()):
        assert_close(p, q, **TIGHT)
    with pytest.raises(ValueError, match="reduction='none'"):
        pipe_of(model, BALANCE, SGDM, "sync", loss_fn=nn.MSELoss(reduction="none"))


def test_progress_bar(capsys):
    pipe = pipe_of(mlp(), BALANCE, SGDM, "pipeoptim")
    pipe.train(data(3, 6), epochs=2, progress=True)
    assert "6/6" in capsys.readouterr().err


@pytest.mark.parametrize("block", [1, 2, 5, 1024])
def test_loss_log_sums_each_minibatch_in_float64_in_order(block):
    """Against the closed form: minibatch j's loss is ((0 + l_j0) + l_j1) + l_j2 in float64,
    whatever the block size (blocks end between minibatches); current() and upto() agree."""
    g = torch.Generator().manual_seed(3)
    parts = torch.randn(7, 3, generator=g, dtype=torch.float32) * 1e3
    want = []
    for row in parts.tolist():  # float32 values, as Python floats (exact)
        acc = 0.0
        for v in row:
            acc += v
        want.append(acc)
    log = LossLog([], block=block)
    for j in range(7):
        for m in range(3):
            log.add(j, parts[j, m].reshape(1))
        assert log.current(j).dtype == torch.float64 and float(log.current(j)) == want[j]
        assert log.upto(j + 1) == want[:j + 1]
    assert log.finish(7) == want
    resumed = LossLog(want[:4], block=block)
    for j in range(4, 7):
        for m in range(3):
            resumed.add(j, parts[j, m])
    assert resumed.finish(7) == want
    with pytest.raises(ValueError, match="scalar"):
        LossLog().add(0, torch.zeros(2))
