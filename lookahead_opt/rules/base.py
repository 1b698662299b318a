"""What a prediction rule is: :class:`Direction` (the math of one parameter's ``dW``) and
:class:`Rule` (how to derive it from an optimizer's state).

Every rule writes the direction of its optimizer's last update in one shape,

.. math::

    dW = \\frac{\\sum_k c_k N_k}{\\beta\\, (D + \\iota)^{p} + \\epsilon}
         + \\sum_j a_j P_j + \\delta\\, W_t + o

(without the fraction when there is no denominator ``D``; :math:`p = 1/2` by default, :math:`p = 1`
when ``root`` is false), or, in *rate* form (``bounds`` or ``cap`` given: AdaBound, AdaMod),
with the fraction replaced by :math:`\\sum_k c_k N_k \\odot R`,
:math:`R = \\min(\\operatorname{clamp}(1/(\\beta (D+\\iota)^p + \\epsilon), lo, hi), C)`.
All of it is elementwise, so that one multi-tensor kernel
(:mod:`lookahead_opt.kernel`) evaluates every rule at memory speed. ``N_k`` and ``D`` are
tensors of the optimizer state (or tensors the wrapper kept at ``step()`` time), the
coefficients are Python floats derived from the state (bias corrections, step counts).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

__all__ = ["Direction", "Kept", "Rule", "step_count", "decoupled", "effective_grad", "keep_effective_grad",
           "group_lr"]

Group = Dict[str, Any]
State = Dict[str, Any]


@dataclass(frozen=True, init=False)
class Direction:
    """One parameter's update direction ``dW`` per unit learning rate (see module docs).

    Attributes:
        terms: ``((c_1, N_1), (c_2, N_2), ...)``, the numerator :math:`\\sum_k c_k N_k`.
        den: the denominator tensor ``D``, or ``None`` for a plain linear combination.
        root: take :math:`(D + \\iota)^p` (true) or :math:`D + \\iota` (false).
        power: :math:`p` (``0.5``, a square root, unless a rule says otherwise: Adahessian's
            ``hessian_power/2``, MADGRAD's cube root).
        inner: :math:`\\iota`, added to ``D`` before the root.
        scale: :math:`\\beta`, multiplies the root.
        eps: :math:`\\epsilon`, added after the root.
        decay: :math:`\\delta`, the coefficient of the current weights ``W_t``.
        plain: ``((a_1, P_1), ...)``, terms added without the denominator.
        offset: :math:`o`, a constant added to every element (torch_optimizer's ``SGDW`` decay).
        bounds: ``(lo, hi)``: rate form, the per-element rate is clamped to these.
        cap: a tensor: rate form, the per-element rate is at most ``cap`` (elementwise).
        lr: ``None`` when the terms are per unit learning rate (prediction multiplies by the
            group's ``lr`` now). A float when the terms are an update applied at that learning
            rate: prediction rescales it by ``lr_now / lr`` (exactly 1 when unchanged).
    """

    terms: Tuple[Tuple[float, Tensor], ...]
    den: Optional[Tensor] = None
    root: bool = True
    inner: float = 0.0
    scale: float = 1.0
    eps: float = 0.0
    decay: float = 0.0
    lr: Optional[float] = None
    power: float = 0.5
    plain: Tuple[Tuple[float, Tensor], ...] = ()
    offset: float = 0.0
    bounds: Optional[Tuple[float, float]] = None
    cap: Optional[Tensor] = None

    def __init__(self, terms: Tuple[Tuple[float, Tensor], ...], den: Optional[Tensor] = None, root: bool = True,
                 inner: float = 0.0, scale: float = 1.0, eps: float = 0.0, decay: float = 0.0,
                 lr: Optional[float] = None, power: float = 0.5, plain: Tuple[Tuple[float, Tensor], ...] = (),
                 offset: float = 0.0, bounds: Optional[Tuple[float, float]] = None,
                 cap: Optional[Tensor] = None) -> None:
        # Frozen, but set through the instance dict: the generated __init__'s thirteen
        # object.__setattr__ calls were half of a rebuilt prediction's per-parameter host time.
        self.__dict__.update(terms=terms, den=den, root=root, inner=inner, scale=scale, eps=eps, decay=decay, lr=lr,
                             power=power, plain=plain, offset=offset, bounds=bounds, cap=cap)

    @property
    def rate(self) -> bool:
        """Whether the denominator is used in rate form (``bounds`` or ``cap`` set)."""
        return self.den is not None and (self.bounds is not None or self.cap is not None)

    def materialize(self, w: Tensor) -> Tensor:
        """``dW`` as a new tensor, by plain (allocating) torch ops; ``w`` is ``W_t``."""
        num = torch.zeros_like(w) if not self.terms else self.terms[0][0] * self.terms[0][1]
        for c, n in self.terms[1:]:
            num = num + c * n
        if self.den is not None:
            d = self.den + self.inner
            d = (d.sqrt() if self.power == 0.5 else d.pow(self.power)) if self.root else d
            d = d * self.scale + self.eps
            if self.rate:
                r = 1.0 / d
                if self.bounds is not None:
                    r = r.clamp(*self.bounds)
                if self.cap is not None:
                    r = torch.minimum(r, self.cap)
                num = num * r
            else:
                num = num / d
        for a, n in self.plain:
            num = num + a * n
        if self.decay:
            num = num + self.decay * w
        if self.offset:
            num = num + self.offset
        return num


class Kept(NamedTuple):
    """What the wrapper kept for a parameter at its last ``step()``: the rule's buffer and
    the group's learning rate at that step."""

    tensor: Tensor
    lr: float


#: ``keep(group, state, w, grad)``: ``grad`` is a Tensor (a rule with ``keeps_grad=False`` is also
#: called with ``None``: its keep takes ``Optional[Tensor]``, which this type admits)
KeepFn = Callable[[Group, State, Tensor, Tensor], Optional[Tensor]]
DirectionFn = Callable[[Group, State, Tensor, Optional[Kept]], Optional[Direction]]
AfterFn = Callable[[Tensor, Tensor], None]


@dataclass(frozen=True)
class Rule:
    """How to derive ``dW`` for one optimizer family.

    Attributes:
        name: registry name (``rule="name"`` in :class:`~lookahead_opt.PredictiveOptimizer`).
        direction: ``direction(group, state, w, kept) -> Direction | None``, called at
            prediction time with the parameter's group, its optimizer state, its current
            weights ``W_t`` and what was kept at the last step (:class:`Kept`, or ``None``). ``None``
            means ``dW = 0`` (no step taken yet).
        keep: ``keep(group, state, w, grad) -> Tensor | None``, called in ``step()`` *before*
            the base optimizer steps (``w`` is ``W_{t-1}``, ``grad`` the gradient it is about
            to use; ``state`` the state before the step). What it returns is copied into one
            buffer per parameter (the rule's memory cost: one parameter-sized buffer, the
            same as the fallback's); ``None`` keeps nothing.
        after: ``after(kept, w)``, called after the base step on each kept buffer and the
            new weights ``W_t`` (the fallback turns ``W_{t-1}`` into ``W_{t-1} - W_t``).
        keeps_grad: whether ``keep`` reads the gradient (it is then called only for parameters
            that have one, and, with a closure, after the closure ran); false for a rule that
            keeps the weights (called for every parameter before the step, ``grad`` may be
            ``None``: its ``keep`` must accept ``grad: Optional[Tensor]``).
        exact: whether ``lr * dW`` reproduces the last update to rounding (used by tests
            and ``strict``); approximate rules state their error in their docstring.
        closed_form: false only for the generic fallback.
        settings: ``settings(optimizer, i) -> dict``: options the optimizer keeps outside its
            param groups (attributes such as AdaBelief's ``_rectify``, AdaBound's
            ``base_lrs[i]``); the wrapper passes ``direction`` and ``keep`` a read-only view of
            group ``i`` with these keys added. ``None``: the group as is.
        stationary: whether ``direction`` depends on nothing a step changes but the *values*
            of tensors: it reads the group, the settings, state entries and the kept buffer
            and its ``lr``, never a step counter or another scalar of the state. After a step
            that left all of these the same objects, the wrapper then keeps its prediction
            plan instead of asking the rule again (SGD-momentum: no per-step host work but
            the kernel's).
        signature: ``signature(group, state) -> hashable``, for a rule whose direction
            depends on a step beyond tensor values only through scalars of the state (Adam's
            step count): two parameters of one group with equal signatures (and state entries
            of the same kinds) get directions with equal coefficients. After a step that left
            the same objects in place, the wrapper then asks the rule for one parameter per
            bucket of its plan (parameters sharing coefficients) instead of every parameter.
        skips_without_grad: whether the optimizer leaves a parameter whose ``grad`` is ``None``
            at ``step()`` untouched, weights and state (every ``torch.optim`` and
            ``torch_optimizer`` optimizer with a registered rule does). The last update of
            such a parameter is then exactly 0, so the wrapper predicts
            :math:`dW = 0` for it (``direction`` is not asked) until a step updates it again:
            the state still holds the direction of an *older* step, which is not the last
            update. False for the generic fallback, which measures the last update
            (:math:`W_{t-1} - W_t`, 0 for a skipped parameter) and so also covers optimizers
            that move parameters without a gradient (LBFGS).
    """

    name: str
    direction: DirectionFn
    keep: Optional[KeepFn] = None
    after: Optional[AfterFn] = None
    keeps_grad: bool = True
    exact: bool = True
    closed_form: bool = True
    settings: Optional[Callable[[Any, int], Dict[str, Any]]] = None
    stationary: bool = False
    signature: Optional[Callable[[Group, State], Any]] = None
    skips_without_grad: bool = True


def step_count(state: State, key: str = "step") -> float:
    """The optimizer's step counter as a float (torch keeps a 0-d tensor, others an int)."""
    return float(state[key])


def group_lr(group: Group) -> float:
    """The group's learning rate as a float; ``1.0`` for optimizers whose groups hold
    ``lr=None`` (torch_optimizer's A2Grad and Adafactor without an explicit lr): their ``dW``
    is the update itself."""
    lr = group.get("lr")
    return 1.0 if lr is None else float(lr)


def decoupled(wd: float, lr: float) -> Tuple[float, float]:
    """Exact correction for a decay applied to the *previous* weights.

    An update ``W_t = W_{t-1} - lr*(u + wd*W_{t-1})`` (AdamW's ``W *= 1 - lr*wd`` is this
    form) gives ``W_{t-1} - W_t = lr*(u + wd*W_t) / (1 - lr*wd)``. Returns the factor
    ``1/(1 - lr*wd)`` for ``u`` and the decay coefficient ``wd/(1 - lr*wd)`` for ``W_t``.
    Exact while the group's ``lr`` is the one the step used.
    """
    if not wd:
        return 1.0, 0.0
    f = 1.0 - lr * wd
    if f == 0 or not math.isfinite(f):
        return 1.0, wd
    return 1.0 / f, wd / f


def effective_grad(group: Group, w: Tensor, grad: Tensor, coupled: bool = True) -> Tensor:
    """The gradient torch's optimizers feed their update: ``±grad + weight_decay * W_{t-1}``
    (negated when ``maximize``; the decay term only for coupled L2 weight decay)."""
    g = -grad if group.get("maximize", False) else grad
    wd = group.get("weight_decay", 0.0) if coupled else 0.0
    return g.add(w, alpha=wd) if wd else g


def keep_effective_grad(group: Group, state: State, w: Tensor, grad: Tensor) -> Tensor:
    """A :attr:`Rule.keep` that keeps :func:`effective_grad`."""
    return effective_grad(group, w, grad)
