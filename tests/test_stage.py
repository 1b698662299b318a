"""`Stage`: the weight version each pass uses, stashing, prediction, errors (no executor)."""
from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lookahead_opt import PredictiveOptimizer
from pipeline_rt.methods import get_method
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
