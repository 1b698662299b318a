"""The method table (docs/methods.rst, "The seven methods") as data."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn
from torch.testing import assert_close

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.calibrated import CalibratedPredictor
from lookahead_opt.compensation import Compensation, DelayMomentum
from lookahead_opt.predictors import Calibrated, Rollout, Rule
from lookahead_opt.rollout import RolloutPredictor
from pipeline_rt.methods import METHODS, RECOMMENDED, Method, get_method, half_stage
from pipeline_rt.schedule import ScheduleError

DT = torch.float64

PINNED = {"sync", "1f1b-flush", "async", "pipedream", "2bw", "spectrain", "pipeoptim"}


EXTRA = {"pipeoptim-cal", "pipeoptim-rollout", "pipeoptim-calroll",  # issue 6; tested in tests/test_calibrated.py,
         "2bw-dm"}  # tests/test_rollout.py, tests/test_calroll.py; 2bw-dm (issue 14) below


def test_pinned_names():
    assert set(METHODS) == PINNED | EXTRA


@pytest.mark.parametrize("name,shape,forward,backward,chunks", [
    ("sync", "gpipe", "live", "live", None),
    ("1f1b-flush", "1f1b-flush", "live", "live", None),
    ("async", "async-1f1b", "live", "live", 1),
    ("pipedream", "async-1f1b", "live", "forward", 1),
    ("2bw", "async-1f1b", "live", "forward", None),
    ("spectrain", "async-1f1b", "predict", "predict", 1),
    ("pipeoptim", "async-1f1b", "predict", "live", 1),
])
def test_policies(name, shape, forward, backward, chunks):
    m = get_method(name)
    assert (m.shape, m.forward, m.backward, m.chunks) == (shape, forward, backward, chunks)
    assert m.predicts == (forward == "predict")
    assert m.num_chunks(4) == (4 if chunks is None else chunks)


def test_spectrain_half_stage_lookahead_and_rule():
    m = get_method("spectrain")
    assert [m.extra(k) for k in range(6)] == [0, 0, 1, 1, 2, 2]
    assert m.rule == "smoothed_gradient"
    p = get_method("pipeoptim")
    assert [p.extra(k) for k in range(4)] == [0] * 4 and p.rule is None


def test_overrides():
    m = get_method("pipeoptim", backward="predicted")
    assert m.backward == "forward" and m.forward == "predict" and m.name == "pipeoptim"
    assert get_method("pipeoptim", backward="live") == METHODS["pipeoptim"]
    assert get_method("async", chunks=3).num_chunks(8) == 3
    custom = Method("mine", "async-1f1b", forward="predict")
    assert get_method(custom) is custom


def test_errors():
    with pytest.raises(ValueError, match=r"unknown method 'gpipe'; choose one of \['1f1b-flush', '2bw'"):
        get_method("gpipe")
    with pytest.raises(ValueError, match="backward must be 'live' or 'predicted'"):
        get_method("pipeoptim", backward="stashed")
    with pytest.raises(ValueError, match="needs a predicting method"):
        get_method("pipedream", backward="predicted")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="chunks must be a positive int"):
            get_method("async", chunks=bad)


# ----------------------------------------------------------------------------- methods as compositions


def test_named_methods_are_compositions_of_pieces():
    assert METHODS["pipeoptim"].predictor == Rule() and METHODS["pipeoptim"].rule is None
    assert METHODS["spectrain"].predictor == Rule("smoothed_gradient") and METHODS["spectrain"].offset is half_stage
    assert METHODS["pipeoptim-cal"].predictor == Calibrated(Rule())
    assert METHODS["pipeoptim-rollout"].predictor == Rollout()
    assert METHODS["pipeoptim-calroll"].predictor == Calibrated(Rollout())
    assert [n for n, m in METHODS.items() if m.predictor.observes] == ["pipeoptim-cal", "pipeoptim-calroll"]
    dm = METHODS["2bw-dm"]
    assert replace(dm, compensation=METHODS["2bw"].compensation) == replace(METHODS["2bw"], name="2bw-dm")
    assert type(dm.compensation) is DelayMomentum and (dm.compensation.target, dm.compensation.floor) == (None, 0.0)
    for m in METHODS.values():
        if m.name != "2bw-dm":
            assert type(m.compensation) is Compensation, m.name  # the identity
        assert (m.offset is half_stage) == (m.name == "spectrain"), m.name


# user-built methods, each equal to a named one; the Stage must not tell them apart
USER_BUILT = {
    "pipeoptim-calroll": Method("mine", "async-1f1b", forward="predict", backward="forward",
                                predictor=Calibrated(Rollout())),
    "pipeoptim-cal": Method("mine", "async-1f1b", forward="predict", backward="forward",
                            predictor=Calibrated(Rule(), smoothing=0.9)),
    "pipeoptim-rollout": Method("mine", "async-1f1b", forward="predict", backward="forward", predictor=Rollout()),
    "spectrain": Method("mine", "async-1f1b", forward="predict", backward="predict",
                        predictor=Rule("smoothed_gradient"), offset=lambda k: k // 2),
    "pipeoptim": Method("mine", "async-1f1b", forward="predict", predictor=Rule()),
    "2bw": Method("mine", "async-1f1b", chunks=None, backward="forward", compensation=Compensation()),
}


@pytest.mark.parametrize("name", sorted(USER_BUILT))
def test_a_user_built_method_equals_the_named_one_bit_for_bit(name):
    from test_pipeline import ADAM, SGDM, data, mlp, params_of, pipe_of
    for make_opt in (SGDM, ADAM):
        runs = []
        for method in (name, USER_BUILT[name]):
            pipe = pipe_of(mlp(), [2, 2, 2, 1], make_opt, method)
            runs.append((pipe.train(data(8, 8)), params_of(pipe), pipe.stage_runtimes[0].predictor))
        (want, w_want, p_want), (got, w_got, p_got) = runs
        assert got == want
        assert all(torch.equal(a, b) for a, b in zip(w_got, w_want))
        assert type(p_got) is type(p_want)


def test_piece_errors():
    with pytest.raises(TypeError, match=r"predictor must be a lookahead_opt.predictors piece \(Rule\(\), Rollout"):
        Method("m", "async-1f1b", forward="predict", predictor="calibrated")
    with pytest.raises(TypeError, match="compensation must be a lookahead_opt.compensation.Compensation"):
        Method("m", "async-1f1b", compensation=lambda opt, step, ctx: step())
    with pytest.raises(ValueError, match=r"method 'm': backward must be one of \('live', 'forward', 'predict'\)"):
        Method("m", "async-1f1b", backward="stashed")
    with pytest.raises(ValueError, match="method 'm': forward must be one of"):
        Method("m", "async-1f1b", forward="forward")
    with pytest.raises(ScheduleError, match="method 'm': unknown schedule shape 'pipedream'"):
        Method("m", "pipedream")
    with pytest.raises(ValueError, match="the inner predictor observes"):
        Calibrated(Calibrated(Rollout()))
    with pytest.raises(TypeError, match="inner must be a predictor piece"):
        Calibrated("rollout")
    po = PredictiveOptimizer(torch.optim.SGD([nn.Parameter(torch.ones(2))], lr=0.1, momentum=0.9))
    with pytest.raises(ValueError, match=r"predicts with rule 'smoothed_gradient', but the optimizer uses 'sgd'"):
        Rule("smoothed_gradient").build(po)


def _after_steps(make_opt, steps=3):
    g = torch.Generator().manual_seed(3)
    ps = [nn.Parameter(torch.randn(4, 3, generator=g, dtype=DT)), nn.Parameter(torch.randn(3, generator=g, dtype=DT))]
    po = PredictiveOptimizer(make_opt(ps))
    for _ in range(steps):
        for p in ps:
            p.grad = torch.randn(p.shape, generator=g, dtype=DT)
        po.step()
    return ps, po


@pytest.mark.parametrize("inner", [Rule(), Rollout(), Rollout(future_grad="zero")], ids=repr)
def test_calibrated_scales_the_displacement_of_any_inner_predictor(inner):
    """W - a (W - P_s) with P_s the inner piece's own prediction, for a pinned scale a."""
    a, s = 0.375, 3
    ps, po = _after_steps(lambda qs: torch.optim.Adam(qs, lr=0.01))
    w = [p.detach().clone() for p in ps]
    target = [x.clone() for x in inner.build(po).predict(s)]
    cal = Calibrated(inner, init_scale=a, min_scale=a, max_scale=a).build(po)
    assert isinstance(cal, CalibratedPredictor)
    assert cal.displacement == {"Rule": "linear", "Rollout": "rollout"}[type(inner).__name__]
    got = cal.predict(s)
    for g_, w_, t in zip(got, w, target):
        assert_close(g_, w_ - a * (w_ - t), rtol=1e-12, atol=1e-14)
    assert all(torch.equal(p.detach(), x) for p, x in zip(ps, w))  # params untouched


def test_pieces_build_the_predictors_of_the_named_methods():
    ps, po = _after_steps(lambda qs: torch.optim.SGD(qs, lr=0.1, momentum=0.9))
    assert Rule().build(po) is po
    assert isinstance(Rollout().build(po), RolloutPredictor)
    cal = Calibrated(Rollout(), smoothing=0.5, max_scale=2.0).build(po)
    assert isinstance(cal, CalibratedPredictor) and isinstance(cal.inner, RolloutPredictor)
    assert (cal.smoothing, cal.max_scale, cal.displacement) == (0.5, 2.0, "rollout")
    assert Calibrated(Rollout()).rule is None and Calibrated(Rule("smoothed_gradient")).rule == "smoothed_gradient"
    smoothed = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1), rule="smoothed_gradient")
    assert Rule("smoothed_gradient").build(smoothed) is smoothed


def test_2bw_dm_is_2bw_with_each_stage_s_momentum_lowered_by_its_delay():
    """The oracle: plain ``2bw`` where every stage but the last (whose updates have delay 1
    from the second on; the first has delay 0, where SGD's momentum does not matter yet)
    runs SGD with momentum ``0.9 - 1/2``, the last stage (delay 0) with 0.9."""
    from test_pipeline import data, mlp, params_of, pipe_of
    assert RECOMMENDED in METHODS
    balance = [2, 2, 2, 1]

    def per_stage():
        calls = iter(range(len(balance)))
        return lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9 if next(calls) == len(balance) - 1 else 0.9 - 1 / 2)

    runs = []
    for method, make_opt in (("2bw-dm", lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9)), ("2bw", per_stage())):
        pipe = pipe_of(mlp(), balance, make_opt, method)
        runs.append((pipe.train(data(8, 8)), params_of(pipe), pipe))
    (got, w_got, dm), (want, w_want, _) = runs
    assert all(g["momentum"] == 0.9 for s in dm.stage_runtimes for g in s.optimizer.param_groups)  # restored
    assert got == want
    assert all(torch.equal(a, b) for a, b in zip(w_got, w_want))
