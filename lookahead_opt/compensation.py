"""Update compensations for delayed gradients: transforms wrapped around an optimizer step.

A prediction (:class:`~lookahead_opt.PredictiveOptimizer`) changes *which weights a forward
sees*. A compensation changes *the update* a delayed gradient makes (or its learning rate):
it wraps one optimizer step. It is called as

.. code-block:: python

    compensation(optimizer, base_step, ctx)

where ``optimizer`` is the stage's :class:`~lookahead_opt.PredictiveOptimizer` (its
``param_groups`` and ``state`` are the wrapped optimizer's), ``base_step()`` performs the plain
step (``optimizer.step()``) and ``ctx`` is a :class:`StepContext` describing the gradient about
to be applied. A compensation must call ``base_step()`` exactly once; what it does before
(change the gradients, the learning rates, hyper-parameters) it undoes after, where the change
is not meant to persist, and what it adds after (a correction of the weights) it adds in place
on the parameters' ``.data``.

Compensations compose like optax transforms: ``Chain(a, b)`` runs ``a`` around ``b`` around
the base step. A compensation holds no per-run state (everything it needs is in ``ctx`` and in
the optimizer's state), so checkpoints need nothing from it.

The compensations (derivations, sources and what was verified: :doc:`/compensation`), for a
gradient of delay :math:`D` (``ctx.delay``):

* :class:`PipeMareLR`: the learning rate divided by :math:`\\max(D,1)^{1-\\min(t/K,1)}`
  (PipeMare).
* :class:`SpikeCompensation`: the contributions the gradient missed in the optimizer's first
  moment, applied at once (Spike Compensation; ``torch.optim.SGD`` with momentum, ``Adam``,
  ``AdamW``).
* :class:`DelayMomentum`: the momentum (SGD's ``momentum``, Adam's ``betas[0]``) set from
  :math:`D` for the step.
* :class:`DCASGD`: the gradient corrected by a diagonal Hessian estimate,
  :math:`g + \\lambda\\, g \\odot g \\odot (W_t - W_{fwd})`.

Order in a :class:`Chain`: a compensation that changes what the step uses (the gradient:
:class:`DCASGD`; hyper-parameters: :class:`PipeMareLR`, :class:`DelayMomentum`) goes before
(outside) :class:`SpikeCompensation`, which reads the gradient and the hyper-parameters the
step uses before it calls the step: ``Chain(DCASGD(), PipeMareLR(warmup=K),
SpikeCompensation())``.

Nothing here synchronises the host with a device: the coefficients are Python numbers from
the param groups, Adam's step counter is read as a number only where it is a CPU tensor (it
stays a device tensor, and the coefficients with it, under ``capturable``/``fused``), the
tensor work is ``torch._foreach_*`` per param group.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["StepContext", "Compensation", "Chain", "PipeMareLR", "SpikeCompensation", "DelayMomentum", "DCASGD"]

Group = Dict[str, Any]
Tensors = Union[List[Tensor], Tuple[Tensor, ...]]  # what torch._foreach_* ops take and return


@dataclass(frozen=True)
class StepContext:
    """What a compensation knows about the update it wraps.

    Attributes:
        delay: D, the optimizer updates between the forward of the gradient being applied and
            this update, counted on the schedule (``v_B - v_F``; the largest over the
            micro-batches accumulated into this update). 0 for sequential training.
        step: the updates this stage has done before this one (0 for the first).
        stage: k, the stage's index.
        num_stages: N.
        forward_weights: the weights the gradient was computed at (parameters' order), for
            compensations with ``needs_forward_weights``; ``None`` otherwise.
    """

    delay: int
    step: int
    stage: int = 0
    num_stages: int = 1
    forward_weights: Optional[List[Tensor]] = None


class Compensation:
    """The identity compensation: the plain step. Subclasses override :meth:`__call__`."""

    #: the stage must pass :attr:`StepContext.forward_weights`
    needs_forward_weights: bool = False

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        base_step()

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Chain(Compensation):
    """``Chain(a, b, c)``: ``a`` wraps ``b`` wraps ``c`` wraps the base step."""

    def __init__(self, *parts: Compensation) -> None:
        self.parts = parts
        self.needs_forward_weights = any(p.needs_forward_weights for p in parts)

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        step = base_step
        for part in reversed(self.parts):
            step = (lambda p, inner: (lambda: p(optimizer, inner, ctx)))(part, step)
        step()

    def __repr__(self) -> str:
        return f"Chain({', '.join(map(repr, self.parts))})"


# -- helpers ---------------------------------------------------------------------------
@contextmanager
def _assigned(entries: Sequence[Tuple[Group, str, Any]]) -> Iterator[None]:
    """``group[key] = value`` for each entry inside the block; the original objects are put
    back after it, also when the block raises (so a torch lr scheduler, which reads and
    writes ``group["lr"]`` between steps, never sees the changed value)."""
    old = [(g, k, g[k]) for g, k, _ in entries]
    for g, k, v in entries:
        g[k] = v
    try:
        yield
    finally:
        for g, k, v in old:
            g[k] = v


def _with_grad(group: Group) -> Tuple[List[Tensor], List[Tensor]]:
    """The group's parameters that have a gradient (those the step updates) and their gradients."""
    params, grads = [], []
    for p in group["params"]:
        if p.grad is not None:
            params.append(p)
            grads.append(p.grad)
    return params, grads


def _fed(group: Group, params: List[Tensor], grads: Tensors, coupled: bool) -> Tensors:
    """The gradients as torch's SGD and Adam feed them to their first moment,
    :math:`g' = \\pm g + \\lambda W_{t-1}` (negated under ``maximize``; the decay term for coupled
    weight decay), computed before the step (``params`` hold :math:`W_{t-1}`); the gradient
    tensors themselves where neither applies."""
    if group.get("maximize", False):
        grads = torch._foreach_neg(grads)
    wd = group.get("weight_decay", 0.0) if coupled else 0.0
    return torch._foreach_add(grads, params, alpha=wd) if wd else grads


def _descend(params: List[Tensor], update: Tensors, lr: Union[float, Tensor]) -> None:
    """``params -= lr * update`` (``update`` is scratch: scaled in place for a tensor ``lr``)."""
    if isinstance(lr, Tensor):
        torch._foreach_mul_(update, lr)
        torch._foreach_sub_(params, update)
    else:
        torch._foreach_add_(params, update, alpha=-lr)


def _geometric(m: float, n: int) -> float:
    """:math:`\\sum_{j<n} m^j = (1 - m^n)/(1 - m)` (``n`` at ``m = 1``)."""
    return float(n) if m == 1 else (1 - m ** n) / (1 - m)


def _count(step: Any) -> Any:
    """Adam's step counter :math:`t`: a float where reading it is free (a number, a CPU tensor),
    else the device tensor itself, so that the coefficients derived from it stay 0-d device
    tensors (which ``torch._foreach_*`` take in place of a list of scalars)."""
    return step if isinstance(step, Tensor) and step.device.type != "cpu" else float(step)


def _base(optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The torch optimizer: a PredictiveOptimizer's ``base``, or ``optimizer`` itself."""
    base = getattr(optimizer, "base", optimizer)
    assert isinstance(base, torch.optim.Optimizer)
    return base


# -- PipeMare --------------------------------------------------------------------------
class PipeMareLR(Compensation):
    """PipeMare's learning-rate rescheduling (Yang et al., arXiv 1910.05124), per stage.

    .. math::

        \\eta'(t) = \\eta(t)\\, \\tau^{-(1 - \\min(t/K,\\, 1))}, \\qquad \\tau = \\max(D, 1)

    with :math:`t` = ``ctx.step`` (the stage's updates so far), :math:`K` = ``warmup`` and
    :math:`\\eta(t)` the group's ``lr`` at the step (whatever a torch lr scheduler set). A delay
    of 0 or 1, and every step from :math:`t = K` on, leave the step exactly the plain one.
    Each group's ``lr`` is multiplied for the step and the original object put back after
    it, so the rescheduling composes with any lr scheduler and is never seen by one.

    Args:
        warmup: :math:`K`, the steps over which the division by :math:`\\tau` fades out.
    """

    def __init__(self, warmup: int) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be a positive number of steps, got {warmup!r}")
        self.warmup = warmup

    def factor(self, ctx: StepContext) -> float:
        """:math:`\\tau^{-(1 - \\min(t/K, 1))}`, the multiplier of the step's learning rates."""
        return max(ctx.delay, 1) ** -(1 - min(ctx.step / self.warmup, 1))

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        f = self.factor(ctx)
        if f == 1:
            base_step()
            return
        with _assigned([(g, "lr", g["lr"] * f) for g in optimizer.param_groups]):
            base_step()

    def __repr__(self) -> str:
        return f"PipeMareLR(warmup={self.warmup})"


# -- Spike Compensation ------------------------------------------------------------------
_Correction = Callable[[], None]


def _spike_sgd(group: Group, state: Dict[Tensor, Dict[str, Any]], delay: int) -> Optional[_Correction]:
    """SGD-momentum: after the base step, :math:`W \\mathrel{-}= \\eta((a - \\alpha_0) v +
    (b c - \\beta_0) g')` (see :class:`SpikeCompensation`). Reads what it needs now, before the
    step; returns the correction to run after it (``None``: nothing to correct)."""
    m = group["momentum"]
    params, grads = _with_grad(group)
    if not m or not params:
        return None
    nesterov = bool(group["nesterov"])
    d = delay + 1 if nesterov else delay  # Nesterov's update already is SC at delay 1
    a, b = m ** d, _geometric(m, d)
    base_v, base_g = (m, 1.0) if nesterov else (1.0, 0.0)  # the base update: base_v*v + base_g*g'
    kept = 1.0 - group["dampening"]
    # c: g' enters the buffer with weight 1 at its first step (torch clones it), 1 - dampening after
    coef = [b * (1.0 if state.get(p, {}).get("momentum_buffer") is None else kept) - base_g for p in params]
    fed = _fed(group, params, grads, coupled=True)
    lr = group["lr"]

    def correct() -> None:
        update = torch._foreach_mul(fed, coef)
        torch._foreach_add_(update, [state[p]["momentum_buffer"] for p in params], alpha=a - base_v)
        _descend(params, update, lr)
    return correct


def _spike_adam(group: Group, state: Dict[Tensor, Dict[str, Any]], delay: int,
                decoupled: bool) -> Optional[_Correction]:
    """Adam/AdamW: after the base step, :math:`W \\mathrel{-}= \\eta\\,(\\tilde m_t - \\hat m_t)
    / (\\sqrt{\\hat v_t} + \\epsilon)` (see :class:`SpikeCompensation`)."""
    params, grads = _with_grad(group)
    if not params:
        return None
    b1, b2 = group["betas"]
    fed = _fed(group, params, grads, coupled=not decoupled)
    lr, eps = group["lr"], group["eps"]
    second = "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"
    a = b1 ** delay

    def correct() -> None:
        states = [state[p] for p in params]
        ts: List[Any] = [_count(s["step"]) for s in states]  # t of this step: floats or 0-d device tensors
        den = torch._foreach_sqrt([s[second] for s in states])
        torch._foreach_div_(den, [(1 - b2 ** t) ** 0.5 for t in ts])
        torch._foreach_add_(den, eps)
        update = torch._foreach_mul([s["exp_avg"] for s in states],
                                    [a / (1 - b1 ** (t + delay)) - 1 / (1 - b1 ** t) for t in ts])
        torch._foreach_add_(update, torch._foreach_mul(fed, [(1 - a) / (1 - b1 ** (t + delay)) for t in ts]))
        torch._foreach_div_(update, den)
        _descend(params, update, lr)
    return correct


class SpikeCompensation(Compensation):
    """Spike Compensation (Kosson et al., arXiv 2003.11666): the contributions a delayed gradient
    missed in the first moment are applied at once, the rest of its contributions as in the
    synchronous run.

    **SGD with momentum** :math:`m` (torch's :math:`v \\leftarrow m v + c\\, g'`,
    :math:`W \\leftarrow W - \\eta v`; :math:`g' = \\pm g + \\lambda W` as the step feeds it,
    :math:`c = 1 - \\text{dampening}`, 1 at a parameter's first step). A gradient of delay
    :math:`D` would, synchronously, have moved the weights by :math:`\\eta c\\, m^j g'` at each of
    the :math:`D` updates it missed and at every later one. Its update becomes

    .. math::

        W \\leftarrow W - \\eta\\,(a\\, v + b\\, c\\, g'), \\qquad a = m^D, \\quad
        b = \\frac{1 - m^D}{1 - m}

    :math:`b c g'` is the missed head :math:`\\sum_{j<D} c\\, m^j g'`, and :math:`a v` makes every
    gradient's later contributions :math:`c\\, m^{D+j}`, the synchronous tail. :math:`D = 0` is
    SGD-m, :math:`D = 1` (:math:`m v + g'`) is torch's ``nesterov=True``; with
    ``nesterov=True`` the base update is already :math:`m v + g'` (SC at delay 1), so the delay
    is counted from there: :math:`a = m^{D+1}`, :math:`b = (1 - m^{D+1})/(1 - m)`. Applied as a
    correction after the base step with the optimizer's own (new) momentum buffer:
    :math:`W \\mathrel{-}= \\eta((a - 1) v + b c g')` (Nesterov: :math:`(a - m) v + (b - 1) g'`).

    **Adam, AdamW** (:math:`m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) g'`; :math:`g'` includes
    Adam's coupled weight decay, not AdamW's decoupled one). The delayed gradient missed the
    weights :math:`(1-\\beta_1)\\beta_1^j`, :math:`j < D`, which sum to :math:`1 - \\beta_1^D`; the
    numerator becomes

    .. math::

        \\tilde m_t = \\frac{a\\, m_t + (1 - a)\\, g'}{1 - \\beta_1^{t+D}}, \\qquad a = \\beta_1^D

    (:math:`(1 - a) = b (1 - \\beta_1)` with :math:`b` as above). The weights of
    :math:`a m_t + (1-a) g'` over the gradients so far sum to :math:`1 - \\beta_1^{t+D}`, which is
    therefore its bias correction (the first step's numerator is exactly :math:`g'`, as Adam's);
    the denominator :math:`\\sqrt{\\hat v_t} + \\epsilon` (``amsgrad``: of the running maximum)
    is Adam's. Applied after the base step as
    :math:`W \\mathrel{-}= \\eta (\\tilde m_t - \\hat m_t)/(\\sqrt{\\hat v_t} + \\epsilon)`.
    :math:`D = 1` gives the numerator :math:`\\beta_1 m_t + (1 - \\beta_1) g'`, NAdam's (Dozat)
    at a constant momentum, up to the bias corrections.

    ``ctx.delay == 0`` calls the plain step and nothing else. Supported: every option of
    ``torch.optim.SGD`` (``momentum`` 0 leaves the step plain), ``Adam`` and ``AdamW``
    (``amsgrad``, ``maximize``, weight decay of either kind, ``foreach``, ``fused``,
    ``capturable``, a tensor ``lr``) except ``differentiable=True`` (the correction is not part
    of an autograd graph: ``ValueError``). Other optimizers: ``TypeError``. In a
    :class:`Chain`, put this last (innermost): it reads the gradient and the hyper-parameters
    the step uses before calling the step.
    """

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        if ctx.delay <= 0:
            base_step()
            return
        base = _base(optimizer)
        adamw = isinstance(base, torch.optim.AdamW)  # a subclass of Adam from torch 2.6, its own class before
        if not isinstance(base, (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)):
            cls = type(base)
            raise TypeError(f"SpikeCompensation derives its correction for torch.optim.SGD (momentum), Adam and AdamW, "
                            f"not {cls.__module__}.{cls.__qualname__}; use PipeMareLR or DelayMomentum with it, "
                            "which work with any optimizer")
        if any(g.get("differentiable", False) for g in base.param_groups):
            raise ValueError("SpikeCompensation: differentiable=True is not supported (its correction is applied "
                             "outside autograd); build the optimizer with differentiable=False")
        with torch.no_grad():
            if isinstance(base, torch.optim.SGD):
                todo = [_spike_sgd(g, base.state, ctx.delay) for g in base.param_groups]
            else:
                todo = [_spike_adam(g, base.state, ctx.delay, g.get("decoupled_weight_decay", adamw))
                        for g in base.param_groups]
        base_step()
        with torch.no_grad():
            for correct in todo:
                if correct is not None:
                    correct()


# -- delay-dependent momentum ------------------------------------------------------------
class DelayMomentum(Compensation):
    """The momentum set from the delay for the step (SGD's ``momentum``, ``betas[0]`` of Adam
    and the other optimizers with ``betas``), the group's own value put back after it.

    Without ``target`` (Mitliagkas et al., arXiv 1605.09774, *Asynchrony begets momentum*):
    asynchrony adds implicit momentum, so the explicit one is lowered by it,

    .. math::  m_D = \\max(\\text{floor},\\; m - \\tfrac{D}{D+1})

    :math:`D/(D+1) = 1 - 1/M` is the implicit momentum of :math:`M = D + 1` workers, and it is
    the momentum whose impulse response :math:`(1-\\mu)\\mu^j` has the mean lag
    :math:`\\mu/(1-\\mu) = D`: the delay's lag. A ``floor`` below 0 allows the negative momentum
    the paper suggests for high asynchrony.

    With ``target`` :math:`\\mu^*` (the per-stage momentum of Ajanthan et al.'s public code,
    arXiv 2505.01099, ``--adaptive_momentum``, with NAdamW and :math:`\\mu^* = 0.99`): momentum
    *raised* towards :math:`\\mu^*` in proportion to the delay, for Nesterov-type optimizers,

    .. math::  m_D = m + (\\mu^* - m)\\, \\min(D/N,\\, 1)

    with :math:`N` = ``ctx.num_stages``. ``ctx.delay == 0`` is the plain step.

    Args:
        target: :math:`\\mu^*` in [0, 1), or ``None`` for the lowering rule.
        floor: the lowest momentum of the lowering rule, in (-1, 1).
    """

    def __init__(self, target: Optional[float] = None, floor: float = 0.0) -> None:
        if target is not None and not 0 <= target < 1:
            raise ValueError(f"target must be in [0, 1), got {target!r}")
        if not -1 < floor < 1:
            raise ValueError(f"floor must be in (-1, 1), got {floor!r}")
        self.target = target
        self.floor = floor

    def momentum(self, m: float, ctx: StepContext) -> float:
        """:math:`m_D` for the group momentum :math:`m`."""
        d = ctx.delay
        if self.target is None:
            return max(self.floor, m - d / (d + 1))
        return m + (self.target - m) * min(d / ctx.num_stages, 1)

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        if ctx.delay <= 0:
            base_step()
            return
        entries: List[Tuple[Group, str, Any]] = []
        for g in optimizer.param_groups:
            if "momentum" in g:
                entries.append((g, "momentum", self.momentum(g["momentum"], ctx)))
            elif "betas" in g:
                b1, *rest = g["betas"]
                entries.append((g, "betas", (self.momentum(b1, ctx), *rest)))
            else:
                cls = type(_base(optimizer))
                raise TypeError(f"DelayMomentum: {cls.__module__}.{cls.__qualname__}'s param groups have neither "
                                "'momentum' nor 'betas'; it has no momentum to set")
        with _assigned(entries):
            base_step()

    def __repr__(self) -> str:
        return f"DelayMomentum(target={self.target!r}, floor={self.floor!r})"


# -- DC-ASGD -----------------------------------------------------------------------------
class DCASGD(Compensation):
    """Delay-compensated gradient (Zheng et al., arXiv 1609.08326, DC-ASGD with a constant
    :math:`\\lambda`): a first-order Taylor step of the gradient from the weights it was
    computed at to the weights it is applied to, with the diagonal outer-product estimate
    :math:`\\lambda\\, g \\odot g` of the Hessian,

    .. math::  \\tilde g = g + \\lambda\\, g \\odot g \\odot (W_t - W_{fwd})

    (:math:`\\tilde g = g - \\lambda\\, g \\odot g \\odot (W_t - W_{fwd})` under ``maximize``, the
    estimate being that of the minimised :math:`-f`), with :math:`W_{fwd}` =
    ``ctx.forward_weights``. :math:`g` is the gradient of the loss, so the optimizer's coupled
    weight decay (computed at :math:`W_t`, not delayed) is added by the step to :math:`\\tilde g`.
    Works with any optimizer: :math:`\\tilde g` is what the step sees as the gradient. Each
    parameter's ``.grad`` is pointed at :math:`\\tilde g` for the step and back at the original
    tensor (unchanged) after it. ``ctx.delay == 0`` is the plain step.

    Args:
        lam: :math:`\\lambda` (MXNet's ``DCASGD`` default: 0.04).
    """

    needs_forward_weights = True

    def __init__(self, lam: float = 0.04) -> None:
        if not lam >= 0:
            raise ValueError(f"lam must be >= 0, got {lam!r}")
        self.lam = lam

    def __call__(self, optimizer: torch.optim.Optimizer, base_step: Callable[[], None], ctx: StepContext) -> None:
        if ctx.delay <= 0 or not self.lam:
            base_step()
            return
        fwd = ctx.forward_weights
        groups = optimizer.param_groups
        n = sum(len(g["params"]) for g in groups)
        if fwd is None or len(fwd) != n:
            raise ValueError(f"DCASGD needs StepContext.forward_weights, one tensor per parameter ({n}, in "
                             f"param_groups order), got {'None' if fwd is None else len(fwd)}")
        original: List[Tuple[Tensor, Tensor]] = []
        i = 0
        with torch.no_grad():
            for g in groups:
                ws = [w for p, w in zip(g["params"], fwd[i:i + len(g["params"])]) if p.grad is not None]
                i += len(g["params"])
                params, grads = _with_grad(g)
                if not params:
                    continue
                new = torch._foreach_sub(params, ws)  # W_t - W_fwd
                torch._foreach_mul_(new, grads)
                torch._foreach_mul_(new, grads)
                torch._foreach_mul_(new, -self.lam if g.get("maximize", False) else self.lam)
                torch._foreach_add_(new, grads)
                for p, grad, t in zip(params, grads, new):
                    original.append((p, grad))
                    p.grad = t
        try:
            base_step()
        finally:
            for p, t in original:
                p.grad = t

    def __repr__(self) -> str:
        return f"DCASGD(lam={self.lam!r})"
