"""CalibratedPredictor (lookahead_opt.calibrated) and the pipeoptim-cal method, against closed forms."""
from __future__ import annotations


import pytest
import torch
from torch import nn

from lookahead_opt import PredictiveOptimizer
from lookahead_opt.calibrated import CalibratedPredictor
from predictor_support import data, fixed_scale, observe_steps, params, pipe, step  # noqa: F401

pytestmark = pytest.mark.usefixtures("float64")



def _opt(kind, ps):
    if kind == "sgd":
        return torch.optim.SGD(ps, lr=0.1)
    if kind == "sgdm":
        return torch.optim.SGD(ps, lr=0.05, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(ps, lr=1e-2)
    return torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1)


def _stepped(kind, steps, seed):
    """Parameters, their PredictiveOptimizer after ``steps`` random-gradient steps, a predictor."""
    ps = params()
    po = PredictiveOptimizer(_opt(kind, ps))
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        step(po, ps, [torch.randn(p.shape, generator=g) for p in ps])
    return ps, po, CalibratedPredictor(po)


@pytest.mark.parametrize("kind", ["sgdm", "adam", "adamw"])
def test_initial_scale_is_the_papers_rule(kind):
    ps, po, cal = _stepped(kind, 3, 1)
    for s in (0, 1, 4):
        want = [w.clone() for w in po.predict(s)]
        torch.testing.assert_close(cal.predict(s), want)


@pytest.mark.parametrize("kind", ["sgdm", "adam"])
def test_predict_is_w_minus_alpha_s_lr_dw(kind):
    ps, po, cal = _stepped(kind, 2, 2)
    cal._num = [torch.tensor(0.3), torch.tensor(0.7)]
    cal._den = [torch.tensor(1.0), torch.tensor(1.0)]
    lr = po.param_groups[0]["lr"]
    dw = po.direction()
    got = cal.predict(3)
    for p, d, a, out in zip(ps, dw, (0.3, 0.7), got):
        torch.testing.assert_close(out, p.detach() - a * 3 * lr * d)
    torch.testing.assert_close(torch.stack(cal.last_scales), torch.tensor([0.3, 0.7], dtype=torch.float32),
                               check_dtype=False)


def test_exactly_linear_trajectory_gives_scale_one_and_exact_prediction():
    # plain SGD on a linear loss: every update is the same vector, the trajectory is a line
    ps = params()
    po = PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1))
    cal = CalibratedPredictor(po, init_scale=0.3, smoothing=0.5)
    c = [torch.randn(p.shape) for p in ps]
    step(po, ps, c)
    s = 4
    for _ in range(3):
        observe_steps(cal, po, ps, c, s)
        for a in cal.scales():
            assert float(a) == pytest.approx(1.0, rel=1e-6)
    # with alpha = 1 the prediction is the future, exactly
    pred = [w.clone() for w in cal.predict(s)]
    for _ in range(s):
        step(po, ps, c)
    torch.testing.assert_close(pred, [p.detach() for p in ps])


def _observe_displacements(cal, ps, B, D, scales):
    start = [p.detach().clone() for p in ps]
    pred = [w - a * b for w, a, b in zip(start, scales, B)]
    actual = [w - d for w, d in zip(start, D)]
    cal.observe(start, pred, actual, [torch.tensor(a) for a in scales])


def test_orthogonal_or_opposite_displacement_gives_scale_zero():
    ps = params()
    cal = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1, momentum=0.9)))
    B = [torch.zeros(5, 3), torch.ones(4)]
    B[0][0, 0] = 1.0
    D = [torch.zeros(5, 3), -torch.ones(4)]  # tensor 0: orthogonal, tensor 1: opposite
    D[0][1, 1] = 2.0
    _observe_displacements(cal, ps, B, D, [0.8, 0.5])
    assert [float(a) for a in cal.scales()] == [0.0, 0.0]


def test_pure_noise_gives_scale_near_zero():
    ps = params()
    cal = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1)), smoothing=0.99, min_scale=-1.0)
    g = torch.Generator().manual_seed(3)
    big = [torch.zeros(2000), torch.zeros(2000)]
    cal._num = [torch.zeros(()), torch.zeros(())]
    cal._den = [torch.zeros(()), torch.zeros(())]
    for _ in range(300):
        B = [torch.randn(2000, generator=g) for _ in big]
        D = [torch.randn(2000, generator=g) for _ in big]
        start = [torch.zeros(2000) for _ in big]
        cal.observe(start, [w - b for w, b in zip(start, B)], [w - d for w, d in zip(start, D)],
                    [torch.tensor(1.0), torch.tensor(1.0)])
    for a in cal.scales():
        assert abs(float(a)) < 0.02


def test_least_squares_closed_form_with_smoothing_per_tensor():
    ps = params()
    beta = 0.7
    cal = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1)), smoothing=beta, max_scale=10.0)
    g = torch.Generator().manual_seed(4)
    num = [0.0, 0.0]
    den = [0.0, 0.0]
    for used in (1.0, 0.5, 0.25):
        B = [torch.randn(p.shape, generator=g) for p in ps]
        D = [0.6 * B[0] + 0.1 * torch.randn(5, 3, generator=g), 2.0 * B[1]]
        _observe_displacements(cal, ps, B, D, [used, used])
        for i in range(2):
            num[i] = beta * num[i] + (1 - beta) * float((D[i] * B[i]).sum())
            den[i] = beta * den[i] + (1 - beta) * float((B[i] * B[i]).sum())
    got = [float(a) for a in cal.scales()]
    assert got[0] == pytest.approx(num[0] / den[0], rel=1e-5)
    assert got[1] == pytest.approx(2.0, rel=1e-5)  # D = 2B exactly, whatever the scale used
    cal.max_scale = 1.0
    assert float(cal.scales()[1]) == 1.0  # clipped: never extrapolate further than the paper


def test_zero_scale_observation_is_skipped():
    ps = params()
    cal = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1)), init_scale=0.4)
    B = [torch.ones(5, 3), torch.ones(4)]
    _observe_displacements(cal, ps, B, B, [0.0, 0.0])
    assert [float(a) for a in cal.scales()] == pytest.approx([0.4, 0.4])


def test_swap_in_is_autograd_safe_and_backward_sees_live_weights():
    lin = nn.Linear(3, 2)
    po = PredictiveOptimizer(torch.optim.SGD(lin.parameters(), lr=0.1, momentum=0.9))
    cal = CalibratedPredictor(po)
    x = torch.randn(4, 3)
    lin(x).sum().backward()
    po.step()
    po.zero_grad()
    pred = [w.clone() for w in cal.predict(2)]
    with cal.predicted(2) as ws:
        torch.testing.assert_close([w.clone() for w in ws], pred)
        h = torch.randn(4, 3, requires_grad=True)
        out = lin(h)
    torch.testing.assert_close(lin.weight.detach(), po.params[0].detach())
    torch.testing.assert_close(out, nn.functional.linear(h, pred[0], pred[1]))
    out.sum().backward()
    po.step()  # the live weights change; the input gradient uses them (PipeOptim's live backward)
    po.zero_grad()
    out2 = lin(h.detach().requires_grad_())  # not used; only checks the module still works
    assert out2.shape == (4, 2)
    with pytest.raises(RuntimeError):
        cal.swap_out()


def test_state_dict_round_trip():
    ps = params()
    cal = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1)))
    _observe_displacements(cal, ps, [torch.ones(5, 3), torch.ones(4)], [0.5 * torch.ones(5, 3), torch.ones(4)],
                           [1.0, 1.0])
    other = CalibratedPredictor(PredictiveOptimizer(torch.optim.SGD(ps, lr=0.1)))
    other.load_state_dict(cal.state_dict())
    torch.testing.assert_close(other.scales(), cal.scales())


# ----------------------------------------------------------------------------- the method


@pytest.mark.parametrize("opt", [lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
                                 lambda ps: torch.optim.Adam(ps, lr=1e-2)])
def test_scale_zero_is_exactly_pipedream(opt):
    batches = data(10)
    want = pipe("pipedream", opt).train(batches)
    got = fixed_scale(pipe("pipeoptim-cal", opt), 0.0).train(batches)
    assert got == want


def test_scale_one_is_exactly_pipeoptim_with_predicted_backward():
    batches = data(10)
    want = pipe("pipeoptim", backward="predicted").train(batches)
    got = fixed_scale(pipe("pipeoptim-cal"), 1.0).train(batches)
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want))


def test_pipeoptim_cal_fits_scales_in_the_pipeline():
    p = pipe("pipeoptim-cal")
    losses = p.train(data(16))
    assert all(torch.isfinite(torch.tensor(losses)))
    first = p.stage_runtimes[0].predictor
    assert first.num_observations > 0
    assert all(0.0 <= float(a) <= 1.0 for a in first.scales())
    assert p.stage_runtimes[-1].predictor.num_observations == 0  # the last stage never predicts
