"""`Stage`: the weight version each pass uses, stashing, prediction, errors (no executor)."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.compensation import Chain, Compensation
from pipeline_rt import Pipeline, schedule, split_by_balance
from pipeline_rt.methods import Method, get_method
from pipeline_rt.stage import Stage, StageError, as_leaf

DT = torch.float64


def stage(method="async", index=0, num_stages=2, lr=0.1, **kw):
    torch.manual_seed(0)
    lin = nn.Linear(3, 2, dtype=DT)
    opt = PredictiveOptimizer(torch.optim.SGD(lin.parameters(), lr=lr, momentum=0.9))
    return Stage(index, num_stages, lin, opt, get_method(method, **kw), nn.functional.mse_loss)


def fake_step(st, seed):
    """One STEP with arbitrary gradients."""
    g = torch.Generator().manual_seed(seed)
    for p in st.params:
        p.grad = torch.randn(p.shape, generator=g, dtype=DT)
    st.step()


def x_and_g(seed=1):
    g = torch.Generator().manual_seed(seed)
    return as_leaf(torch.randn(4, 3, generator=g, dtype=DT)), torch.randn(4, 2, generator=g, dtype=DT)


def test_live_backward_after_a_step():
    st = stage("async", index=1, num_stages=3)
    x, g = x_and_g()
    st.forward((0, 0), (x,), s=1)
    fake_step(st, 0)  # would make autograd raise "modified by an inplace operation" without redirection
    w_live = st.module.weight.detach().clone()
    (gx,) = st.backward((0, 0), (g,))
    assert_close(gx, g @ w_live, rtol=0, atol=0)
    assert_close(st.module.weight.grad, g.T @ x.detach())


def test_pipedream_stashes_lazily_and_uses_the_forward_version():
    st = stage("pipedream", index=1, num_stages=3)
    (x0, g), (x1, _) = x_and_g(1), x_and_g(2)
    w0 = st.module.weight.detach().clone()
    st.forward((0, 0), (x0,), s=0)
    st.forward((1, 0), (x1,), s=1)
    assert st.peak_versions == 1  # nothing copied yet
    st.backward((0, 0), (g,))
    fake_step(st, 0)  # (1, 0) still needs version 0: stashed now
    assert st.peak_versions == 2 and set(st._stash) == {0}
    (gx,) = st.backward((1, 0), (g,))
    assert_close(gx, g @ w0, rtol=0, atol=0)  # the forward's version, not the live one
    assert not torch.equal(w0, st.module.weight.detach())
    assert not st._stash and not st._refs  # released after the last use


def test_pipeoptim_forward_runs_on_the_prediction():
    st = stage("pipeoptim")
    x, g = x_and_g()
    fake_step(st, 0)
    out0 = st.forward((0, 0), (x,), s=0)[0]
    assert st.peak_versions == 1, "predict(0) is the live weights: no buffer"
    assert_close(out0, st.module(x))
    w_hat = [t.clone() for t in st.optimizer.predict(2)]
    out2 = st.forward((1, 0), (x,), s=2)[0]
    assert_close(out2, x @ w_hat[0].T + w_hat[1], rtol=0, atol=0)
    assert st.peak_versions == 2
    assert not torch.equal(w_hat[0], st.module.weight.detach())  # live weights restored


def test_shape_error_names_stage_and_shapes():
    st = stage(index=1, num_stages=3)
    bad = as_leaf(torch.zeros(4, 5, dtype=DT))
    with pytest.raises(StageError, match=r"stage 1 forward failed on micro-batch \(2, 1\) with inputs of shapes "
                                         r"\[\(4, 5\):float64\]"):
        st.forward((2, 1), (bad,), s=0)


def test_check_finite_gradients():
    st = stage()
    st.check_finite = True
    st.module.bias.grad = torch.tensor([1.0, float("inf")], dtype=DT)
    with pytest.raises(FloatingPointError, match="gradient of bias"):
        st.step()


def test_clear_drops_in_flight_state():
    st = stage("pipedream")
    x, _ = x_and_g()
    st.forward((0, 0), (x,), s=0)
    st.forward((1, 0), (x,), s=1)
    fake_step(st, 0)
    st.module.weight.grad = torch.ones_like(st.module.weight)
    st.clear()
    assert not st._records and not st._stash and not st._refs and st.module.weight.grad is None


def test_stage_without_parameters():
    st = Stage(1, 2, nn.Tanh(), None, get_method("pipeoptim"), nn.functional.mse_loss)
    x = as_leaf(torch.randn(3, 2, dtype=DT))
    (loss,) = st.forward((0, 0), (x,), s=0, target=torch.zeros(3, 2, dtype=DT), weight=0.5)
    (gx,) = st.backward((0, 0))
    st.step()
    assert_close(loss, 0.5 * torch.tanh(x.detach()).pow(2).mean())
    assert gx.shape == (3, 2) and st.version == 1


# ----------------------------------------------------------------------------- the update compensation


class Recorder(Compensation):
    """Records every StepContext (and, before the step, the live weights: ``before[k][v]`` is
    version ``v`` of stage ``k``), then takes the plain step."""

    def __init__(self, needs_forward_weights=False):
        self.needs_forward_weights = needs_forward_weights
        self.calls = {}   # stage -> [ctx with forward_weights copied]
        self.before = {}  # stage -> [weights before update v]
        self.lrs = {}     # stage -> [lr during the step]
        self.norms = {}   # stage -> [gradient norm the step sees]

    def __call__(self, optimizer, base_step, ctx):
        k = ctx.stage
        fw = None if ctx.forward_weights is None else [w.clone() for w in ctx.forward_weights]
        self.calls.setdefault(k, []).append(replace(ctx, forward_weights=fw))
        self.before.setdefault(k, []).append([p.detach().clone() for p in optimizer.params])
        self.lrs.setdefault(k, []).append(optimizer.param_groups[0]["lr"])
        self.norms.setdefault(k, []).append(torch.linalg.vector_norm(torch.cat([p.grad.flatten()
                                                                                for p in optimizer.params])))
        base_step()


class DoubleGradients(Compensation):
    """g <- 2 g, then the plain step."""

    def __call__(self, optimizer, base_step, ctx):
        for p in optimizer.params:
            if p.grad is not None:
                p.grad.mul_(2)
        base_step()


class Plain(Compensation):
    needs_forward_weights = True  # the stage then keeps every forward's weights for the context


N, MINIBATCHES = 4, 7
SGD = lambda ps: torch.optim.SGD(ps, lr=0.05)  # noqa: E731


def run(method, make_opt=SGD, loss_fn=nn.functional.mse_loss, chunks=None, hooks=False, **kw):
    """A 4-stage float64 MLP trained on MINIBATCHES minibatches; with ``hooks``, also the
    weights every forward of every stage ran on (``ran_on[k][i]``: its i-th forward)."""
    from test_pipeline import data, mlp, params_of
    pipe = Pipeline(split_by_balance(copy.deepcopy(mlp()), [2, 2, 2, 1]), ["cpu"] * N, make_opt, loss_fn,
                    method=method, chunks=chunks, **kw)
    ran_on = {k: [] for k in range(N)}
    if hooks:
        for k, m in enumerate(pipe.stages):
            m.register_forward_pre_hook(lambda mod, inp, k=k: ran_on[k].append(
                [p.detach().clone() for p in mod.parameters()]))
    losses = pipe.train(data(MINIBATCHES, 8))
    return losses, params_of(pipe), ran_on


def composed(name, compensation, **kw):
    return replace(get_method(name, **kw), name=f"{name}+{type(compensation).__name__}", compensation=compensation)


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("shape,chunks", [("async-1f1b", 1), ("async-1f1b", 2), ("1f1b-flush", 4), ("gpipe", 2)])
def test_compensation_context_delay_is_the_schedules_largest_s_per_update(shape, chunks):
    rec = Recorder()
    run(Method("rec", shape, chunks=chunks, compensation=rec))
    table = schedule.build(shape, N, MINIBATCHES, chunks).weight_versions
    for k in range(N):
        want = [max(table[k][(j, m)].s for m in range(chunks)) for j in range(MINIBATCHES)]
        assert [c.delay for c in rec.calls[k]] == want, k
        assert [c.step for c in rec.calls[k]] == list(range(MINIBATCHES))
        assert {(c.stage, c.num_stages, c.forward_weights) for c in rec.calls[k]} == {(k, N, None)}
    if (shape, chunks) == ("async-1f1b", 1):
        assert [c.delay for c in rec.calls[0]] == [min(j, N - 1) for j in range(MINIBATCHES)]


@pytest.mark.parametrize("name", ["async", "pipedream", "pipeoptim", "pipeoptim-calroll", "spectrain", "sync"])
def test_compensation_gets_the_weights_the_forward_ran_on(name):
    """Oracles: the weights seen by a forward pre-hook of the stage's module, and, for a live
    forward, version v_F of the schedule (the weights before update v_F, as recorded)."""
    rec = Recorder(needs_forward_weights=True)
    losses, weights, ran_on = run(composed(name, rec), hooks=True)
    m = get_method(name)
    table = schedule.build(m.shape, N, MINIBATCHES, m.num_chunks(N)).weight_versions
    for k in range(N):
        assert len(rec.calls[k]) == MINIBATCHES
        for j, ctx in enumerate(rec.calls[k]):
            if m.num_chunks(N) == 1:
                assert same(ctx.forward_weights, ran_on[k][j]), (k, j)
            if m.forward == "live":
                assert same(ctx.forward_weights, rec.before[k][table[k][(j, 0)].forward]), (k, j)
    # keeping the forward weights for the context changes nothing in the training
    want_losses, want_weights, _ = run(name)
    assert losses == want_losses and same(weights, want_weights)


def test_forward_weights_of_an_update_must_be_one_version():
    with pytest.raises(StageError, match=r"stage 2: method 'rec' has compensation Recorder\(\), which needs .* but "
                                         r"update 1 adds micro-batches that ran on different weights \(version 0, "
                                         r"then version 1\); use chunks=1 or a flush schedule"):
        run(Method("rec", "async-1f1b", chunks=2, compensation=Recorder(needs_forward_weights=True)))


@pytest.mark.parametrize("name", ["async", "pipedream", "2bw", "pipeoptim", "spectrain", "pipeoptim-calroll"])
def test_identity_compensation_is_bit_identical_to_none(name):
    want_losses, want_weights, _ = run(name)
    for comp in (Compensation(), Chain(Compensation(), Compensation()), Recorder()):
        losses, weights, _ = run(composed(name, comp))
        assert losses == want_losses and same(weights, want_weights), comp


@pytest.mark.parametrize("name", ["pipedream", "async", "pipeoptim"])
def test_doubled_gradients_equal_a_doubled_loss_under_plain_sgd(name):
    """SGD without momentum: W - lr (2 g) is the step of the loss 2 L (exact: a factor 2)."""
    losses, weights, _ = run(composed(name, DoubleGradients()))
    want_losses, want_weights, _ = run(name, loss_fn=lambda out, y: 2 * nn.functional.mse_loss(out, y))
    assert [2 * x for x in losses] == want_losses and same(weights, want_weights)
    plain_losses, plain_weights, _ = run(name)
    assert not same(weights, plain_weights)


def test_compensation_runs_after_clipping_and_before_the_scheduler():
    rec = Recorder()
    run(composed("pipedream", rec), clip_grad_norm=1e-3,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5))
    for k in range(N):
        assert rec.lrs[k] == [0.05 * 0.5 ** j for j in range(MINIBATCHES)]
        assert all(n <= 1e-3 * (1 + 1e-6) for n in rec.norms[k])


def test_the_pending_update_survives_a_checkpoint():
    """state_dict between a backward and its STEP keeps the delay and the forward weights."""
    rec = Recorder(needs_forward_weights=True)
    st = stage(composed("pipedream", rec), index=1, num_stages=3)
    st.retain = lambda unit: True
    w0 = [p.detach().clone() for p in st.params]
    (x0, g), (x1, _) = x_and_g(1), x_and_g(2)
    st.forward((0, 0), (x0,), s=0)
    st.forward((1, 0), (x1,), s=1)
    st.backward((0, 0), (g,))
    fake_step(st, 0)  # update 0: delay 0, version 0
    (_, g1) = x_and_g(3)
    st.backward((1, 0), (g1,))  # update 1 pending: delay 1, computed at version 0
    state = copy.deepcopy(st.state_dict())
    other = stage(composed("pipedream", rec), index=1, num_stages=3)
    other.load_state_dict(state)
    for s_ in (st, other):
        s_.step()
    first, original, resumed = rec.calls[1]
    assert (original.delay, original.step, resumed.delay, resumed.step) == (1, 1, 1, 1)
    assert same(original.forward_weights, w0) and same(resumed.forward_weights, w0)
    assert same(st.params, other.params) and not st._stash and not other._stash and not other._refs
