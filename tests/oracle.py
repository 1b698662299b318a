"""Oracle for the asynchronous methods: a plain sequential simulation of docs/methods.rst
("The setting": the version closed forms; "The seven methods": the method table).

Written independently of :mod:`pipeline_rt`: no schedule, no stage, no saved-tensor
redirection. Minibatches are processed one after the other; for minibatch ``j`` and stage
``k`` the weights of each pass are picked from an explicit list of versions
``W_k[0], W_k[1], ...`` (version ``v`` = after ``v`` updates) by the version table below, and the
backward is written by hand for ``Linear``/``Tanh``/``ReLU`` stacks, so the forward's
activations and the backward's weights can differ exactly as the method says.

Version table (async 1F1B, warm-up ``w = N-1-k``, ``C`` micro-batches per update, flat
micro-batch index ``u = j*C + m``): ``v_F = max(0, u - w) // C``, ``v_B = u // C``,
``s = v_B - v_F`` (flushing methods: ``v_F = v_B = j``). With ``dW_v`` the last update direction per unit learning rate at
version ``v`` (``(W_{v-1} - W_v) / lr`` by default, ``0`` at ``v = 0``):

============================  ===================================  ==============================
method                        forward weights                      backward weights
============================  ===================================  ==============================
sync, 1f1b-flush, async       ``W[v_F]``                           ``W[v_B]``
pipedream, 2bw (C = N)        ``W[v_F]``                           ``W[v_F]``
pipeoptim                     ``W[v_F] - lr s dW[v_F]``            ``W[v_B]``
pipeoptim, predicted          ``W[v_F] - lr s dW[v_F]``            the forward's
spectrain                     ``W[v_F] - lr (k//2 + s) dW[v_F]``   ``W[v_B] - lr (k//2) dW[v_B]``
============================  ===================================  ==============================
"""
from __future__ import annotations

import copy
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

Weights = List[Tensor]
Direction = Callable[[torch.optim.Optimizer, List[nn.Parameter], Weights, Weights], Weights]


def last_update(opt: torch.optim.Optimizer, params: List[nn.Parameter], before: Weights, after: Weights) -> Weights:
    """``dW = (W_{v-1} - W_v) / lr``: the update just applied, per unit learning rate."""
    lrs = [g["lr"] for g in opt.param_groups for _ in g["params"]]
    return [(b - a) / lr for b, a, lr in zip(before, after, lrs)]


def state_buffer(key: str) -> Direction:
    """``dW`` = the optimizer state tensor ``key`` (e.g. SpecTrain's smoothed gradient)."""
    def direction(opt, params, before, after):
        return [opt.state[p][key].detach().clone() for p in params]
    return direction


def versions(n: int, k: int, u: int, chunks: int, flush: bool = False) -> Tuple[int, int]:
    """``(v_F, v_B)`` of flat micro-batch ``u`` at stage ``k`` under async 1F1B (or, with
    ``flush``, a schedule that flushes every minibatch: both its own version)."""
    if flush:
        return u // chunks, u // chunks
    return max(0, u - (n - 1 - k)) // chunks, u // chunks


def _forward(layers: Sequence[nn.Module], params: Weights, x: Tensor) -> Tuple[Tensor, list]:
    """Run the stage with explicit weights; return the output and what each layer saves."""
    saved, i = [], 0
    for layer in layers:
        if isinstance(layer, nn.Linear):
            w, b = params[i], params[i + 1]
            i += 2
            saved.append(("linear", x))
            x = x @ w.T + b
        elif isinstance(layer, (nn.Tanh, nn.ReLU)):
            x = torch.tanh(x) if isinstance(layer, nn.Tanh) else torch.relu(x)
            saved.append((type(layer).__name__, x))
        else:
            raise TypeError(f"oracle handles Linear/Tanh/ReLU stacks, not {type(layer).__name__}")
    return x, saved


def _backward(layers: Sequence[nn.Module], params: Weights, saved: list, g: Tensor) -> Tuple[Tensor, Weights]:
    """Hand-written backward using ``params`` as the weights; returns (dL/dx, dL/dparams)."""
    grads: Weights = [torch.zeros_like(p) for p in params]
    i = len(params)
    for layer, (kind, s) in zip(reversed(layers), reversed(saved)):
        if kind == "linear":
            i -= 2
            grads[i], grads[i + 1] = g.T @ s, g.sum(0)
            g = g @ params[i]
        elif kind == "Tanh":
            g = g * (1 - s * s)
        else:
            g = g * (s > 0).to(g.dtype)
    return g, grads


def simulate(stages: Sequence[nn.Sequential], batches: Sequence[Tuple[Tensor, Tensor]],
             make_opt: Callable, loss_fn: Callable, method: str, *, chunks: Optional[int] = None,
             direction: Direction = last_update) -> Tuple[List[float], List[Weights]]:
    """Train copies of ``stages`` sequentially under ``method``'s version table.

    Returns the per-minibatch losses (sum of each micro-batch's size-weighted loss) and the
    final weights of every stage.
    """
    n = len(stages)
    layers = [list(copy.deepcopy(s)) for s in stages]
    params = [[nn.Parameter(p.detach().clone()) for p in s.parameters()] for s in stages]
    opts = [make_opt(ps) for ps in params]
    lrs = [[g["lr"] for g in o.param_groups for _ in g["params"]] for o in opts]
    W: List[List[Weights]] = [[[p.detach().clone() for p in ps]] for ps in params]
    D: List[List[Weights]] = [[[torch.zeros_like(p) for p in ps]] for ps in params]
    chunks = chunks or (n if method == "2bw" else 1)
    extra = [k // 2 if method == "spectrain" else 0 for k in range(n)]
    predicts = method.startswith("pipeoptim") or method == "spectrain"

    def predicted(k: int, v: int, s: int) -> Weights:
        return [w - lr * s * d for w, d, lr in zip(W[k][v], D[k][v], lrs[k])]

    losses = []
    for j, (x, y) in enumerate(batches):
        xs, ys = torch.tensor_split(x, chunks), torch.tensor_split(y, chunks)
        acc = [[torch.zeros_like(p) for p in ps] for ps in params]
        total = 0.0
        for m in range(chunks):
            u = j * chunks + m
            h, saved, back = xs[m], [], []
            for k in range(n):
                vf, vb = versions(n, k, u, chunks, flush=method in ("sync", "1f1b-flush"))
                s = vb - vf
                wf = predicted(k, vf, extra[k] + s) if predicts else W[k][vf]
                if method in ("pipedream", "2bw", "pipeoptim-predicted"):
                    wb = wf
                elif method == "spectrain":
                    wb = predicted(k, vb, extra[k])
                else:
                    wb = W[k][vb]
                h, sv = _forward(layers[k], wf, h)
                saved.append(sv)
                back.append(wb)
            out = h.detach().requires_grad_(True)
            loss = loss_fn(out, ys[m]) * (ys[m].shape[0] / y.shape[0])
            (g,) = torch.autograd.grad(loss, out)
            total += loss.item()
            for k in reversed(range(n)):
                g, grads = _backward(layers[k], back[k], saved[k], g)
                for a, gr in zip(acc[k], grads):
                    a += gr
        losses.append(total)
        for k in range(n):
            for p, a in zip(params[k], acc[k]):
                p.grad = a
            opts[k].step()
            new = [p.detach().clone() for p in params[k]]
            D[k].append(direction(opts[k], params[k], W[k][-1], new))
            W[k].append(new)
    return losses, [w[-1] for w in W]
