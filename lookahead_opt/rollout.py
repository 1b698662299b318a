"""Roll-out prediction: run the optimizer's own update rule ``s`` steps ahead with the last
gradient held fixed, instead of multiplying one step by ``s``.

The paper's rule (:meth:`PredictiveOptimizer.predict`) is :math:`W_t - s\\,lr\\,dW_t`: the
last update repeated ``s`` times. If the gradient stayed what it was at step ``t`` the
optimizer would *not* repeat its last update: momentum keeps accumulating, Adam's moments
and bias corrections keep moving. :class:`RolloutPredictor` applies the optimizer's real
update ``s`` times to a copy of the weights and state, with the last raw gradient ``g``
(captured by a step pre-hook; one extra buffer per parameter) held constant. It therefore
**equals the true future weights when the gradient is constant** (tested against the real
``torch.optim`` optimizer in ``tests/test_rollout.py``), including weight decay (the decay
term is re-evaluated on the rolled weights), Nesterov, dampening, ``maximize``, AMSGrad and
AdamW's decoupled decay.

Closed forms (what the loop computes). SGD with momentum :math:`\\mu`, dampening
:math:`d`, no weight decay, buffer :math:`m_t`:

.. math::

    m_{t+i} = \\mu^i m_t + (1-d)\\,g\\,\\frac{1-\\mu^i}{1-\\mu},\\qquad
    W_{t+s} = W_t - lr \\sum_{i=1}^{s} m_{t+i}
            = W_t - lr\\Big(A\\, m_t + (1-d)\\,g\\,\\frac{s - A}{1-\\mu}\\Big),
    \\quad A = \\sum_{i=1}^{s}\\mu^i = \\mu\\frac{1-\\mu^s}{1-\\mu}

(Nesterov: the update is :math:`g + \\mu m_{t+i}`, so add :math:`s\\,g` inside and
multiply the rest by :math:`\\mu`). Adam, step count :math:`k`:

.. math::

    m_{k+i} = \\beta_1^i m_k + (1-\\beta_1^i) g,\\quad
    v_{k+i} = \\beta_2^i v_k + (1-\\beta_2^i) g^2,\\quad
    W_{t+s} = W_t - lr\\sum_{i=1}^{s}
        \\frac{m_{k+i}/(1-\\beta_1^{k+i})}{\\sqrt{v_{k+i}/(1-\\beta_2^{k+i})}+\\epsilon}

(elementwise; no closed-form sum, so ``s`` elementwise passes with ``torch._foreach_*``).

Supported: ``torch.optim.SGD``, ``Adam``, ``AdamW`` (and subclasses). Any other optimizer
falls back to the wrapped optimizer's own linear prediction. Before the first step the
prediction is the live weights (as for :meth:`PredictiveOptimizer.predict`), and so it is for
a parameter the last step skipped (no gradient: :attr:`PredictiveOptimizer.skipped`; the
optimizer would skip it again if it still had none). Adam's bias corrections use each
parameter's own step count (parameters skipped by some steps have fewer).

``future_grad="zero"`` rolls the optimizer out with zero future gradients instead (the
momentum "coasts": for SGD-momentum :math:`W_t - lr A\\,m_t`, i.e. the paper's rule scaled
by :math:`A/s`).

Measured in a pipeline (``pipeoptim-rollout``, docs/improved_prediction.rst): holding the
last gradient fixed extrapolates *further* than the paper for momentum (``g/(1-mu)`` per
step once the buffer has caught up) and did not train better; see the benchmark section.
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional, Sequence, cast

import torch
from torch import Tensor

from .optimizer import PredictiveOptimizer, _check_s
from .swapping import SwappingPredictor

__all__ = ["RolloutPredictor"]


class RolloutPredictor(SwappingPredictor):
    """Predict ``s`` steps ahead by rolling the optimizer's update rule forward with the last
    gradient held fixed (see the module docs).

    Args:
        optimizer: the wrapped :class:`PredictiveOptimizer` (steps go through it as usual).
        future_grad: ``"last"`` (hold the last raw gradient fixed) or ``"zero"``.
    """

    name = "rollout"

    def __init__(self, optimizer: PredictiveOptimizer, *, future_grad: str = "last") -> None:
        super().__init__(optimizer)
        if future_grad not in ("last", "zero"):
            raise ValueError(f"future_grad must be 'last' or 'zero', got {future_grad!r}")
        self.future_grad = future_grad
        base = optimizer.base
        self.kind = ("adam" if isinstance(base, (torch.optim.Adam, torch.optim.AdamW))
                     else "sgd" if isinstance(base, torch.optim.SGD) else None)
        self._grads: Dict[Tensor, Tensor] = {}
        if self.kind is not None and future_grad == "last":
            self._hook = base.register_step_pre_hook(lambda opt, args, kwargs: self._capture())

    def _capture(self) -> None:
        for p in self.optimizer.params:
            if p.grad is None:
                self._grads.pop(p, None)
                continue
            buf = self._grads.get(p)
            if buf is None or buf.shape != p.shape or buf.dtype != p.grad.dtype or buf.device != p.device:
                buf = self._grads[p] = torch.empty_like(p.grad)
            buf.copy_(p.grad)

    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """:math:`W_{t+s}` if every future raw gradient were the last one (or zero); same
        contract as :meth:`PredictiveOptimizer.predict`."""
        s = _check_s(s)
        opt = self.optimizer
        if self.kind is None:
            return opt.predict(s, out)
        res = opt.predict(0, out)  # the live weights, in out / the reusable buffer
        if s == 0 or opt.num_steps == 0:
            return res
        skipped = {id(p) for p in opt.skipped}
        i = 0
        for g in opt.param_groups:
            n = len(g["params"])
            idx = [j for j, p in enumerate(g["params"]) if id(p) not in skipped
                   and (opt.state.get(p) or (self.kind == "sgd" and p in self._grads))]
            ps = [g["params"][j] for j in idx]
            ws = [res[i + j] for j in idx]
            if ps:
                (self._sgd if self.kind == "sgd" else self._adam)(g, ps, ws, s)
            i += n
        return res

    def _grad(self, ps: List[Tensor], ws: List[Tensor], maximize: bool) -> List[Tensor]:
        gs = [self._grads[p].to(w.dtype) if self.future_grad == "last" and p in self._grads else torch.zeros_like(w)
              for p, w in zip(ps, ws)]
        return list(torch._foreach_neg(gs)) if maximize else gs

    def _sgd(self, g: dict, ps: List[Tensor], ws: List[Tensor], s: int) -> None:
        lr, mu, damp, wd = float(g["lr"]), g["momentum"], g["dampening"], g["weight_decay"]
        grad = self._grad(ps, ws, g["maximize"])
        bufs = [self.optimizer.state[p].get("momentum_buffer") for p in ps]
        bufs = [b.to(w.dtype).clone() if b is not None else None for b, w in zip(bufs, ws)]
        for _ in range(s):
            d = torch._foreach_add(grad, ws, alpha=wd) if wd else grad
            if mu:
                for k, (b, x) in enumerate(zip(bufs, d)):
                    if b is None:
                        bufs[k] = x.clone()
                    else:
                        b.mul_(mu).add_(x, alpha=1 - damp)
                full = cast(List[Tensor], bufs)  # every buffer is set by now
                d = torch._foreach_add(d, full, alpha=mu) if g["nesterov"] else full
            torch._foreach_add_(ws, d, alpha=-lr)

    def _adam(self, g: dict, ps: List[Tensor], ws: List[Tensor], s: int) -> None:
        lr, (b1, b2), eps, wd = float(g["lr"]), g["betas"], g["eps"], g["weight_decay"]
        decoupled = g.get("decoupled_weight_decay", isinstance(self.optimizer.base, torch.optim.AdamW))
        grad = self._grad(ps, ws, g["maximize"])
        st = [self.optimizer.state[p] for p in ps]
        m = [x["exp_avg"].to(w.dtype).clone() for x, w in zip(st, ws)]
        v = [x["exp_avg_sq"].to(w.dtype).clone() for x, w in zip(st, ws)]
        vmax = [x["max_exp_avg_sq"].to(w.dtype).clone() for x, w in zip(st, ws)] if g["amsgrad"] else None
        steps = [float(x["step"]) for x in st]  # per parameter: a skipped step does not count
        for _ in range(s):
            steps = [k + 1 for k in steps]
            if wd and decoupled:
                torch._foreach_mul_(ws, 1 - lr * wd)
            d = torch._foreach_add(grad, ws, alpha=wd) if wd and not decoupled else grad
            torch._foreach_lerp_(m, d, 1 - b1)
            torch._foreach_mul_(v, b2)
            torch._foreach_addcmul_(v, d, d, value=1 - b2)
            if vmax is not None:
                torch._foreach_maximum_(vmax, v)
            denom = torch._foreach_sqrt(vmax if vmax is not None else v)
            torch._foreach_div_(denom, [math.sqrt(1 - b2 ** k) for k in steps])
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(ws, m, denom, [-lr / (1 - b1 ** k) for k in steps])

    def state_dict(self) -> Dict[str, Any]:
        """The captured last gradients (by flat parameter index)."""
        index = {p: i for i, p in enumerate(self.optimizer.params)}
        return {"grads": {index[p]: t.clone() for p, t in self._grads.items() if p in index}}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        params = self.optimizer.params
        self._grads = {params[int(i)]: t.clone().to(params[int(i)].device) for i, t in state["grads"].items()}
