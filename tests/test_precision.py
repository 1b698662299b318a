"""Mixed precision (``Pipeline(..., autocast=...)``, :mod:`pipeline_rt.precision`), on CPU with
bfloat16 / float16 autocast and float32 master weights (autocast does not cast float64).

Oracles, each written without the pipeline:

* the flush methods: single-device training under the same autocast, the minibatch's
  micro-batches accumulated as the pipeline splits them (``torch.tensor_split``, each loss
  weighted by its share of rows): bit for bit;
* the asynchronous methods: a sequential simulation under the same autocast, layer by layer:
  the forward of minibatch ``j`` at stage ``k`` runs on the weights the method's forward uses
  (the version table of ``tests/oracle.py``), keeping each layer's input; the backward
  re-runs each layer on its kept input with the weights the method's backward uses and
  differentiates that (a ``Linear``'s backward needs only its input and its weights, a
  ``Tanh``'s only its output, which its kept input gives again). So the backward's weights
  enter as autocast casts them, independently of any saved-tensor redirection;
* float16: single-device training with a ``torch.amp.GradScaler`` (``scale``, ``step``,
  ``update``): the same skipped update and the same scale.
"""
from __future__ import annotations

import copy
from typing import Callable, List, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call

from lookahead_opt.redirect import redirect
from oracle import versions
from pipeline_rt import Pipeline, split_by_balance

BF16 = torch.bfloat16
BALANCE = [2, 2, 1]
MSE = nn.functional.mse_loss


def mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))


def data(n: int, rows: int = 6, seed: int = 1) -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(rows, 6, generator=g), torch.randn(rows, 3, generator=g)) for _ in range(n)]


def sgd(ps): return torch.optim.SGD(ps, lr=0.5, momentum=0.9)  # noqa: E704 (large: versions differ visibly)
def adam(ps): return torch.optim.Adam(ps, lr=0.05)  # noqa: E704


def pipe_of(model: nn.Module, make_opt: Callable, method: str, **kw) -> Pipeline:
    return Pipeline(split_by_balance(copy.deepcopy(model), BALANCE), ["cpu"] * len(BALANCE), make_opt, MSE,
                    method=method, **kw)


def weights(pipe: Pipeline) -> List[Tensor]:
    return [p.detach() for m in pipe.stages for p in m.parameters()]  # type: ignore[union-attr]


def single_device(model: nn.Module, batches, make_opt: Callable, chunks: int, dtype: torch.dtype,
                  scaler: "torch.amp.GradScaler | None" = None, clip: "float | None" = None
                  ) -> Tuple[List[float], List[Tensor]]:
    """Plain training of a copy of ``model`` with each forward (and loss) under autocast
    (with a GradScaler: unscale, clip to ``clip``, step, update)."""
    model = copy.deepcopy(model)
    opt = make_opt(list(model.parameters()))
    losses = []
    for x, y in batches:
        total = 0.0
        for xm, ym in zip(torch.tensor_split(x, chunks), torch.tensor_split(y, chunks)):
            with torch.autocast("cpu", dtype):
                loss = MSE(model(xm), ym) * (ym.shape[0] / y.shape[0])
            total += loss.item()
            (loss if scaler is None else scaler.scale(loss)).backward()
        if scaler is None:
            opt.step()
        else:
            if clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(model.parameters(), clip)
            scaler.step(opt)
            scaler.update()
        opt.zero_grad()
        losses.append(total)
    return losses, [p.detach() for p in model.parameters()]


def assert_same(got: Tuple[List[float], List[Tensor]], want: Tuple[List[float], List[Tensor]], **tol) -> None:
    assert len(got[0]) == len(want[0])
    torch.testing.assert_close(torch.tensor(got[0]), torch.tensor(want[0]), **(tol or {"rtol": 0, "atol": 0}))
    for p, q in zip(got[1], want[1]):
        torch.testing.assert_close(p, q, **(tol or {"rtol": 0, "atol": 0}))


# -------------------------------------------------------------- redirect follows autocast's casts

def test_redirect_follows_the_cast_autocast_saves():
    """Under autocast a Linear saves ``weight.to(bfloat16).t()``, outside the weight's storage:
    the backward must still see the cast of the redirected weights (STYLE.md's blocker)."""
    torch.manual_seed(0)
    lin, other = nn.Linear(4, 4), [torch.randn(4, 4), torch.randn(4)]
    x = torch.randn(3, 4, requires_grad=True)
    with torch.autocast("cpu", BF16), redirect(list(lin.parameters()), lambda i: other[i]):
        lin(x).float().sum().backward()
    w = [t.clone().requires_grad_(True) for t in other]
    x2 = x.detach().requires_grad_(True)
    with torch.autocast("cpu", BF16):
        nn.functional.linear(x2, *w).float().sum().backward()
    assert torch.equal(x.grad, x2.grad)


# -------------------------------------------------------------- flush methods: single-device training

@pytest.mark.parametrize("method", ["sync", "1f1b-flush"])
def test_flush_methods_under_bfloat16_equal_single_device_training(method):
    model, batches = mlp(), data(5)
    pipe = pipe_of(model, adam, method, autocast=BF16)
    got = pipe.train(batches), weights(pipe)
    assert all(p.dtype == torch.float32 for p in got[1])  # float32 master weights
    assert_same(got, single_device(model, batches, adam, pipe.chunks, BF16))
    ev = pipe.evaluate(batches[:1])["loss"]  # evaluation under the same autocast
    with torch.autocast("cpu", BF16):
        want = MSE(nn.Sequential(*pipe.stages)(batches[0][0]), batches[0][1]).item()
    assert ev == pytest.approx(want, rel=1e-6)


# -------------------------------------------------------------- asynchronous methods: a sequential simulation

def simulate(model: nn.Sequential, batches, make_opt: Callable, method: str,
             dtype: torch.dtype) -> Tuple[List[float], List[Tensor]]:
    """The asynchronous methods (chunks=1) under autocast, layer by layer (see the module's docstring)."""
    stages = [list(s) for s in split_by_balance(copy.deepcopy(model), BALANCE)]
    n = len(stages)
    names = [[[n_ for n_, _ in layer.named_parameters()] for layer in layers] for layers in stages]
    params = [[nn.Parameter(p.detach().clone()) for layer in layers for p in layer.parameters()] for layers in stages]
    opts = [make_opt(ps) for ps in params]
    W = [[[p.detach().clone() for p in ps]] for ps in params]                # W[k][v]: version v
    M = [[[torch.zeros_like(p) for p in ps]] for ps in params]              # momentum buffer at version v
    lr = [o.param_groups[0]["lr"] for o in opts]

    def at(k: int, v: int, s: int) -> List[Tensor]:  # version v, or the prediction s ahead (SGD: the momentum)
        if method not in ("pipeoptim", "spectrain") or s == 0:
            return W[k][v]
        return [w - lr[k] * s * m for w, m in zip(W[k][v], M[k][v])]

    def layer_weights(k: int, ws: Sequence[Tensor]) -> List[dict]:
        out, i = [], 0
        for ns in names[k]:
            out.append(dict(zip(ns, ws[i:i + len(ns)])))
            i += len(ns)
        return out

    losses = []
    for j, (x, y) in enumerate(batches):
        h, kept = x, []
        for k in range(n):
            vf, vb = versions(n, k, j, 1)
            extra = k // 2 if method == "spectrain" else 0  # SpecTrain's offset
            wf = at(k, vf, extra + vb - vf)
            wb = wf if method == "pipedream" else at(k, vb, extra)
            inputs = []
            with torch.no_grad(), torch.autocast("cpu", dtype):
                for layer, lw in zip(stages[k], layer_weights(k, wf)):
                    inputs.append(h)
                    h = functional_call(layer, lw, (h,))
            kept.append((inputs, wb))
        out = h.detach().requires_grad_(True)
        with torch.autocast("cpu", dtype):
            loss = MSE(out, y)
        (g,) = torch.autograd.grad(loss, out)
        losses.append(loss.item())
        for k in reversed(range(n)):
            inputs, wb = kept[k]
            wb = [w.detach().requires_grad_(True) for w in wb]
            grads: List[Tensor] = []
            for layer, lw, xin in reversed(list(zip(stages[k], layer_weights(k, wb), inputs))):
                xin = xin.detach().requires_grad_(True)
                with torch.autocast("cpu", dtype):
                    o = functional_call(layer, lw, (xin,))
                got = torch.autograd.grad(o, [xin, *lw.values()], g)
                g, grads = got[0], list(got[1:]) + grads
            for p, gr in zip(params[k], grads):
                p.grad = gr
            opts[k].step()
            W[k].append([p.detach().clone() for p in params[k]])
            M[k].append([opts[k].state[p]["momentum_buffer"].clone() for p in params[k]])
    return losses, [w for ws in W for w in ws[-1]]


@pytest.mark.parametrize("method", ["async", "pipedream", "pipeoptim", "spectrain"])
def test_async_methods_under_bfloat16_equal_the_simulation(method):
    """The backward's weights are cast as autocast casts them (``async``, ``pipeoptim``: the
    live ones; ``pipedream``: the forward's, stashed in float32; ``spectrain``: a float32
    prediction made at the backward); the predicting methods' forwards run on the cast of
    their float32 prediction."""
    model, batches = mlp(), data(8)
    pipe = pipe_of(model, sgd, method, autocast=BF16)
    got = pipe.train(batches), weights(pipe)
    assert_same(got, simulate(model, batches, sgd, method, BF16))


# -------------------------------------------------------------- torch.autocast entered around train()

@pytest.mark.parametrize("method", ["sync", "pipeoptim"])
def test_autocast_around_train_is_autocast_option(method):
    """``with torch.autocast(...): pipe.train(...)`` is exactly ``autocast=``: the cache of
    the caller's autocast would keep casts of weights the steps and swaps changed since."""
    model, batches = mlp(), data(6)
    plain = pipe_of(model, sgd, method)
    with torch.autocast("cpu", BF16):
        got = plain.train(batches), weights(plain)
    option = pipe_of(model, sgd, method, autocast=BF16)
    assert_same(got, (option.train(batches), weights(option)))


def test_autocast_around_train_refused_where_it_cannot_be_exact():
    model, batches = mlp(), data(2)
    with torch.autocast("cpu", torch.float16), pytest.raises(ValueError, match="autocast=torch.float16"):
        pipe_of(model, sgd, "sync").train(batches)
    with torch.autocast("cpu", torch.float16), pytest.raises(ValueError, match="autocast=torch.bfloat16"):
        pipe_of(model, sgd, "sync", autocast=BF16).train(batches)


def test_float16_refused_where_one_skip_decision_is_not_made(tmp_path):
    for method, backend, what in (("pipeoptim", "local", "flush method"), ("sync", "dist", "backend='local'")):
        with pytest.raises(ValueError, match=what):
            pipe_of(mlp(), sgd, method, autocast=torch.float16, backend=backend)
    with pytest.raises(ValueError, match="loss scale"):
        pipe_of(mlp(), sgd, "sync", autocast=torch.float16).train(data(2), checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="autocast must be None"):
        pipe_of(mlp(), sgd, "sync", autocast=torch.float64)


# -------------------------------------------------------------- float16: loss scaling, one skip for all stages

@pytest.mark.parametrize("method,clip", [("sync", None), ("sync", 0.05), ("1f1b-flush", 0.05)])
def test_float16_skips_the_update_at_every_stage_and_backs_off_the_scale(method, clip):
    """An input too large for float16 (inf after autocast's cast) in minibatch 2: stage 0's
    weight gradient is NaN (0 * inf through tanh's saturation), stages 1 and 2 stay finite.
    Every stage skips that update, and the scale backs off, as GradScaler does in
    single-device training. Global clipping sees the unscaled gradients."""
    model, batches = mlp(), data(5)
    batches[2][0][1, 3] = 1e6
    kw = {} if clip is None else {"clip_grad_norm": clip, "clip_grad_scope": "global"}
    pipe = pipe_of(model, adam, method, autocast=torch.float16, **kw)
    got = pipe.train(batches), weights(pipe)
    scaler = torch.amp.GradScaler("cpu")
    want = single_device(model, batches, adam, pipe.chunks, torch.float16, scaler, clip)
    assert want[0][2] == want[0][2]  # the loss is finite: the inf is in stage 0's gradient only
    assert_same(got, want)
    assert pipe.loss_scaling is not None and pipe.loss_scaling.skipped == 1
    assert pipe.loss_scaling.scaler.get_scale() == scaler.get_scale() == 2.0 ** 15
