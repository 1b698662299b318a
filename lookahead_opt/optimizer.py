"""`PredictiveOptimizer`: wrap an optimizer, predict its weights ``s`` steps ahead."""
from __future__ import annotations

import itertools
import operator
import weakref
from collections import ChainMap, OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .kernel import Plan, _Scratch
from .redirect import SwapMixin, Swapped
from .rules import FALLBACK, Direction, Kept, Rule, rule_for, rule_named
from .rules.base import group_lr

__all__ = ["PredictiveOptimizer"]

_Closure = Callable[[], Any]


def _check_s(s: Any) -> int:
    if isinstance(s, bool):
        raise TypeError("s must be a non-negative integer number of steps, got a bool")
    try:
        n = operator.index(s)
    except TypeError:
        raise TypeError(f"s must be a non-negative integer number of steps, got {s!r} "
                        f"({type(s).__name__}); round it yourself if you mean an integer") from None
    if n < 0:
        raise ValueError(f"s must be >= 0 (steps ahead), got {n}")
    return n


class PredictiveOptimizer(torch.optim.Optimizer, SwapMixin):
    """Wraps an already-built optimizer and predicts its weights ``s`` steps ahead.

    .. math::  \\hat W_{t+s} = W_t - lr \\cdot s \\cdot dW_t

    per parameter, where ``dW_t`` is the direction of the optimizer's most recent update per
    unit learning rate, derived from its state by the optimizer's rule (``dW = 0`` before the
    first step, and for a parameter whose ``grad`` was ``None`` at the last :meth:`step`: the
    optimizer skipped it, its last update was 0; see
    :attr:`~lookahead_opt.rules.Rule.skips_without_grad`) and ``lr`` is the parameter group's learning rate at the time of the call (so
    ``torch.optim.lr_scheduler`` schedules are followed; build the scheduler on this wrapper
    or on :attr:`base`, they share ``param_groups``).

    Args:
        base: the optimizer to wrap (any ``torch.optim.Optimizer``).
        rule: ``None`` looks the rule up by the optimizer's class (along its MRO) and uses the
            generic fallback (the last applied update, one extra buffer per parameter) when
            none is registered; a registered name (``"fallback"``, ``"smoothed_gradient"``,
            ``"sgd"``, ``"adam"``, ...) or a :class:`~lookahead_opt.rules.Rule` forces one.
        strict: refuse (``ValueError``) to use the generic fallback.
        check_finite: after each prediction check the predicted weights are finite and raise
            ``RuntimeError`` naming the parameter otherwise (costs one host synchronisation).

    :meth:`swap_in`, :meth:`swap_out` and :meth:`predicted` (from
    :class:`~lookahead_opt.redirect.SwapMixin`) point the parameters at ``predict(s)``'s buffer
    and back, by pointer. The forward that runs under :meth:`swap_in` (or :meth:`predicted`)
    may be differentiated after :meth:`swap_out` and even after later optimizer steps: saved
    weights are redirected to the live weights current at backward time
    (:mod:`lookahead_opt.redirect`). Call
    ``swap_in``, the forward and ``swap_out`` on the same thread (saved-tensor hooks are
    thread-local) and nest other saved-tensor hooks inside, not across, the swap.

    Repeated predictions are cheap: the directions and their bucketing
    (:class:`~lookahead_opt.kernel.Plan`) are kept between calls and rebuilt when anything
    they were derived from may have changed: a step of this wrapper or of the base optimizer
    (seen by a post-hook on it, where ``torch.optim.Optimizer.__init__`` set it up; for a
    :attr:`~lookahead_opt.rules.Rule.stationary` rule only if it replaced a kept buffer or
    changed its learning rate), this
    wrapper's ``load_state_dict`` or ``add_param_group``, any param group's entries (``lr``
    from a scheduler, betas, ...: by identity, and those that can change in place, tensors,
    lists and dicts, also by value: a one-element tensor by its value), the rule's settings,
    the groups or their parameter lists, any parameter's state dict or state entries (compared
    by identity: the base's ``load_state_dict`` replaces them; a replaced state tensor). In-place
    edits of a state tensor's *values* are always seen (the kernel reads them at each call),
    except of the scalars a rule reads as coefficients (``state["step"]``, ...): change those
    through ``step()`` or ``load_state_dict``. A ``load_state_dict`` (this wrapper's, or the
    base's where it runs torch's hooks) drops the kept plan at once, so that it does not hold
    the replaced state tensors.
    """

    def __init__(self, base: torch.optim.Optimizer, *, rule: Union[None, str, Rule] = None,
                 strict: bool = False, check_finite: bool = False) -> None:
        if isinstance(base, PredictiveOptimizer):
            raise TypeError("base is already a PredictiveOptimizer; wrap its .base instead")
        if not isinstance(base, torch.optim.Optimizer):
            raise TypeError(f"PredictiveOptimizer wraps a torch.optim.Optimizer, got {type(base).__name__}; "
                            "build the optimizer first, e.g. PredictiveOptimizer(torch.optim.SGD(model.parameters(), lr=0.1))")
        chosen = rule_named(rule) if rule is not None else (rule_for(type(base)) or FALLBACK)
        if strict and not chosen.closed_form:
            cls = type(base)
            raise ValueError(f"strict=True: no closed-form prediction rule for {cls.__module__}.{cls.__qualname__}; "
                             "register one with lookahead_opt.register_rule(cls, rule) or use strict=False "
                             "(the generic fallback: last applied update, one buffer per parameter)")
        self.base = base
        self.rule = chosen
        self.strict = strict
        self.check_finite = check_finite
        self.defaults = base.defaults
        self.num_steps = 0
        self._kept: Dict[Tensor, Kept] = {}
        #: the parameters the last step skipped (no gradient; see Rule.skips_without_grad), by identity
        self._skipped: Tuple[Tensor, ...] = ()
        self._skipped_ids: frozenset = frozenset()
        self._skip_generation = 0  # bumped when _skipped changes
        self._buffers: Optional[List[Tensor]] = None
        self._swapped: Optional[Swapped] = None
        self._scratch = _Scratch()
        self._generation = _Generation()
        self._cache: Optional[_Cached] = None
        if "_optimizer_step_post_hooks" in vars(base):  # set up by torch.optim.Optimizer.__init__
            base.register_step_post_hook(self._generation.bump)
            base.register_load_state_dict_post_hook(_dropping_cache_of(self))
        for name in ("_optimizer_step_pre_hooks", "_optimizer_step_post_hooks", "_optimizer_state_dict_pre_hooks",
                     "_optimizer_state_dict_post_hooks", "_optimizer_load_state_dict_pre_hooks",
                     "_optimizer_load_state_dict_post_hooks"):
            setattr(self, name, OrderedDict())

    # -- the wrapped optimizer ---------------------------------------------------------
    @property
    def param_groups(self) -> List[Dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's param groups (shared, not copied)."""
        return self.base.param_groups

    @property
    def state(self) -> Dict[Tensor, Dict[str, Any]]:  # type: ignore[override]
        """The base optimizer's state (shared)."""
        return self.base.state

    @property
    def params(self) -> List[Tensor]:
        """All parameters, flat, in ``param_groups`` order (the order of every list returned)."""
        return [p for g in self.base.param_groups for p in g["params"]]

    @property
    def skipped(self) -> Tuple[Tensor, ...]:
        """The parameters the last :meth:`step` skipped (``grad`` was ``None``), whose predicted
        displacement is therefore 0; empty for a rule that measures the last update instead
        (the fallback: see :attr:`~lookahead_opt.rules.Rule.skips_without_grad`)."""
        return self._skipped

    def __repr__(self) -> str:
        return f"PredictiveOptimizer(rule={self.rule.name!r}, base={self.base!r})"

    def add_param_group(self, param_group: Dict[str, Any]) -> None:
        """Adds a group to the base optimizer."""
        self.base.add_param_group(param_group)
        self._buffers = None
        self._generation.bump()

    def zero_grad(self, set_to_none: bool = True) -> None:
        """The base optimizer's ``zero_grad``."""
        self.base.zero_grad(set_to_none=set_to_none)

    def step(self, closure: Optional[_Closure] = None) -> Any:
        """One step of the base optimizer; keeps what the rule needs (see :class:`Rule`)."""
        if self._swapped is not None:
            raise RuntimeError("step() while the predicted weights are swapped in would update the predicted "
                               "weights, not the live ones; call swap_out() first")
        rule = self.rule
        keep_now = rule.keep is not None and (closure is None or not rule.keeps_grad)
        keep_later = rule.keep is not None and not keep_now  # after the closure made the gradients
        mark = rule.skips_without_grad
        self._see_grads(keep_now, mark and closure is None)
        if closure is not None and (keep_later or mark):
            user_closure = closure

            def closure() -> Any:  # see the gradients the step is about to use
                with torch.enable_grad():
                    loss = user_closure()
                self._see_grads(keep_later, mark)
                return loss
        loss = self.base.step() if closure is None else self.base.step(closure)
        self._generation.bump()
        if self.rule.after is not None:
            for p, k in self._kept.items():
                self.rule.after(k.tensor, p.detach())
        self.num_steps += 1
        return loss

    def _groups(self) -> Iterator[Tuple[Dict[str, Any], Any]]:
        """(group, what the rule sees of it): the group itself, or a view with the rule's settings."""
        settings = self.rule.settings
        for i, g in enumerate(self.base.param_groups):
            yield g, (g if settings is None else ChainMap(settings(self.base, i), g))

    def _see_grads(self, keep: bool, mark: bool) -> None:
        """Before a step, from the gradients it will use: what the rule keeps (``keep``) and
        which parameters it skips (``mark``), in one pass over the parameters when both."""
        if keep:
            skipped = self._keep()
            if mark:
                self._set_skipped(skipped)
        elif mark:
            self._mark_skipped()

    def _mark_skipped(self) -> None:
        """Records the parameters the coming step skips (``grad`` is ``None``; see
        :attr:`~lookahead_opt.rules.Rule.skips_without_grad`): their predicted displacement
        is 0 until a step updates them. One ``is None`` test per parameter (the base step
        makes the same test); the kept plan is rebuilt only when the set changes."""
        self._set_skipped(tuple([p for g in self.base.param_groups for p in g["params"] if p.grad is None]))

    def _set_skipped(self, skipped: Tuple[Tensor, ...]) -> None:
        old = self._skipped
        if not skipped and not old:  # (both empty: nothing changes)
            return
        if len(skipped) != len(old) or not all(map(operator.is_, skipped, old)):
            self._skipped = skipped
            self._skipped_ids = frozenset(map(id, skipped))
            self._skip_generation += 1

    def _keep(self) -> Tuple[Tensor, ...]:
        """Keeps what the rule needs of every parameter; returns those without a gradient
        (what :meth:`_mark_skipped` finds, found in the same pass)."""
        keep = self.rule.keep
        assert keep is not None
        skipped: List[Tensor] = []
        for g0, g in self._groups():
            lr = group_lr(g0)
            for p in g0["params"]:
                grad = p.grad
                if grad is not None:
                    t = keep(g, self.base.state.get(p, {}), p.detach(), grad)
                else:
                    skipped.append(p)
                    # a rule keeping the weights takes grad=None (Rule.keeps_grad); KeepFn cannot say so
                    t = None if self.rule.keeps_grad else keep(g, self.base.state.get(p, {}), p.detach(), None)  # type: ignore[arg-type]
                if t is None:
                    self._kept.pop(p, None)
                    continue
                old = self._kept.get(p)
                buf = old.tensor if old is not None and old.tensor.shape == p.shape and old.tensor.dtype == p.dtype \
                    and old.tensor.device == p.device else torch.empty_like(p, memory_format=torch.preserve_format)
                buf.copy_(t)
                self._kept[p] = Kept(buf, lr)
        return tuple(skipped)

    # -- prediction --------------------------------------------------------------------
    def _weights(self) -> List[Tensor]:
        return list(self._swapped.live) if self._swapped is not None else [p.detach() for p in self.params]

    def _directions(self, weights: Sequence[Tensor]) -> Tuple[List[Optional[Direction]], List[float]]:
        dirs: List[Optional[Direction]] = []
        lrs: List[float] = []
        direction, state, kept, skipped = self.rule.direction, self.base.state, self._kept, self._skipped_ids
        i = 0
        for g0, g in self._groups():
            ps = g0["params"]
            if skipped:  # dW = 0 for a parameter the last step skipped
                dirs += [None if id(p) in skipped else direction(g, state.get(p) or {}, w, kept.get(p))
                         for p, w in zip(ps, weights[i:i + len(ps)])]
            else:
                dirs += [direction(g, state.get(p) or {}, w, kept.get(p)) for p, w in zip(ps, weights[i:i + len(ps)])]
            lrs += [group_lr(g0)] * len(ps)
            i += len(ps)
        return dirs, lrs

    def _output(self, weights: Sequence[Tensor]) -> List[Tensor]:
        bufs = self._buffers
        if bufs is None or len(bufs) != len(weights) or any(
                b.shape != w.shape or b.dtype != w.dtype or b.device != w.device for b, w in zip(bufs, weights)):
            bufs = self._buffers = [torch.empty_like(w, memory_format=torch.preserve_format) for w in weights]
        return bufs

    def predict(self, s: int, out: Optional[Sequence[Tensor]] = None) -> List[Tensor]:
        """The weights predicted ``s`` steps ahead, :math:`W_t - lr \\cdot s \\cdot dW_t`, one tensor
        per parameter in ``param_groups`` order; the parameters are not changed.

        Args:
            s: steps ahead, a non-negative integer (``0`` returns the weights exactly).
            out: tensors to write into (shapes, dtypes and devices of the parameters). Without
                it the result is written into a buffer the wrapper reuses: it stays valid only
                until the next :meth:`predict` or :meth:`swap_in`; copy it to keep it.
        """
        s = _check_s(s)
        if out is None and self._swapped is not None:
            raise RuntimeError("predict() without out= while swapped in would overwrite the weights the "
                               "parameters now hold; pass out= or call swap_out() first")
        if out is not None:
            out = list(out)
            weights = self._weights()
            if len(out) != len(weights) or any(o.shape != w.shape for o, w in zip(out, weights)):
                raise ValueError(f"out must be {len(weights)} tensors shaped like the parameters (in param_groups order)")
        if s == 0:
            weights = self._weights()
            out = self._output(weights) if out is None else out
            torch._foreach_copy_(out, weights)
        elif self._swapped is not None:  # from the live weights kept aside: a plan for this call only
            self._build(self._swapped.live, out).run(s)
        elif out is not None and self._buffers is None:  # no buffer yet: none allocated for out=
            self._build(self.params, out).run(s)
        else:
            self._plan().run(s, out)
            out = self._buffers if out is None else out
        assert out is not None  # every branch above sets it
        if self.check_finite:
            self._assert_finite(out)
        return list(out)

    def _plan(self) -> Plan:
        """The kept plan for the parameters and the wrapper's buffer, rebuilt when stale (see the
        class docs for what is compared)."""
        cached = self._cache
        if cached is None or cached.plan_outs is not self._buffers or not cached.valid(self):
            params = self.params
            previous = None if cached is None else cached.plan
            cached = self._cache = _Cached(self, self._build(params, None, previous), params, self._buffers)
            cached.kept = self._kept_signature(params)
        elif cached.generation != self._generation.n:  # a step: the same tensors, new coefficients
            kept = self._kept_signature(cached.params)
            if kept is None or kept != cached.kept or cached.skips != self._skip_generation \
                    or not (self.rule.stationary or self._refresh(cached)):
                cached.plan = self._build(cached.params, None, cached.plan)
            cached.kept = kept
            cached.generation = self._generation.n
            cached.skips = self._skip_generation
        return cached.plan

    def _refresh(self, cached: "_Cached") -> bool:
        """After a step that left every object the plan reads in place: new coefficients from
        one rule call per bucket of the plan and distinct (group, signature) among its items
        (see :attr:`~lookahead_opt.rules.Rule.signature`) instead of one per parameter.
        ``False``, changing nothing, where that does not apply: the plan must be rebuilt."""
        signature = self.rule.signature
        if signature is None:
            return False
        views = [g for _, g in self._groups()]
        # the state dicts are the cached ones (the plan is valid)
        groups, params, states, kept, which = self.base.param_groups, cached.params, cached.states, self._kept, \
            cached.group_index
        reps: List[List[Tuple[int, Direction, float]]] = []
        for b in cached.plan.buckets:
            if b.proto is None:
                continue
            seen: Dict[Tuple[int, Any], int] = {}
            for pos, i in enumerate(b.idx):
                seen.setdefault((which[i], signature(views[which[i]], states[i])), pos)
            mine = []
            for (gi, _), pos in seen.items():
                i = b.idx[pos]
                p = params[i]
                d = self.rule.direction(views[gi], states[i], p.detach(), kept.get(p))
                if d is None:
                    return False
                mine.append((pos, d, _rate(d, group_lr(groups[gi]))))
            reps.append(mine)
        return cached.plan.retarget(reps)

    def _kept_signature(self, params: List[Tensor]) -> Optional[List[Optional[Tuple[int, float]]]]:
        """Per parameter, the kept buffer (by identity) and its step's lr: what a stationary or
        signature rule reads besides what :meth:`_Cached.valid` compares (``None`` for the
        other rules, whose plan is rebuilt after every step anyway)."""
        if not (self.rule.stationary or self.rule.signature):
            return None
        kept = self._kept
        if not kept:
            return []
        return [None if k is None else (id(k.tensor), k.lr) for k in map(kept.get, params)]

    def _build(self, weights: List[Tensor], out: Optional[List[Tensor]], previous: Optional[Plan] = None) -> Plan:
        """A plan from ``weights`` (parameters, or live weights) into ``out`` (default: the buffer)."""
        detached = [w.detach() for w in weights]
        dirs, lrs = self._directions(detached)
        rates = [0.0 if d is None else _rate(d, lr) for d, lr in zip(dirs, lrs)]
        return Plan.build(self._output(detached) if out is None else out, weights, dirs, rates, self._scratch, previous)

    def direction(self) -> List[Tensor]:
        """``dW`` per unit learning rate, one new tensor per parameter (zeros before any step)."""
        weights = self._weights()
        dirs, lrs = self._directions(weights)
        out = []
        for w, d, lr in zip(weights, dirs, lrs):
            if d is None:
                out.append(torch.zeros_like(w))
            else:
                dw = d.materialize(w)
                out.append(dw if d.lr is None else dw * (_ratio(lr, d.lr) / lr if lr else 0.0))
        return out

    def _assert_finite(self, out: Sequence[Tensor]) -> None:
        by_device: Dict[torch.device, List[int]] = {}
        for i, o in enumerate(out):
            by_device.setdefault(o.device, []).append(i)
        for idx in by_device.values():
            ok = torch.stack([torch.isfinite(out[i]).all() for i in idx])
            if not bool(ok.all()):
                raise RuntimeError(f"non-finite predicted weights for {self._describe(idx[int((~ok).nonzero()[0])])}; "
                                   "the optimizer state holds inf/nan or the learning rate or s is too large")

    def _describe(self, flat: int) -> str:
        i = flat
        for gi, g in enumerate(self.base.param_groups):
            if i < len(g["params"]):
                names = g.get("param_names")
                name = f" {names[i]!r}" if names else ""
                return f"parameter{name} (group {gi}, index {i}, shape {tuple(g['params'][i].shape)})"
            i -= len(g["params"])
        raise IndexError(flat)

    # -- swapping (swap_in, swap_out, predicted: redirect.SwapMixin) --------------------
    def _swap_params(self) -> List[Tensor]:
        return self.params

    # -- checkpoints -------------------------------------------------------------------
    def state_dict(self) -> Dict[str, Any]:
        """The base optimizer's state dict plus the wrapper's own state under ``"lookahead"``
        (rule name, step count, kept buffers by flat parameter index, with their step lr, and
        the flat indices of the parameters the last step skipped)."""
        sd = self.base.state_dict()
        index = {p: i for i, p in enumerate(self.params)}
        sd["lookahead"] = {
            "rule": self.rule.name,
            "num_steps": self.num_steps,
            "kept": {index[p]: k.tensor for p, k in self._kept.items() if p in index},
            "kept_lr": {index[p]: k.lr for p, k in self._kept.items() if p in index},
            "skipped": [index[p] for p in self._skipped if p in index],
        }
        return sd

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Restores :meth:`state_dict` (base state too); kept buffers are copied, not shared."""
        sd = dict(state_dict)
        own = sd.pop("lookahead", None)
        self.base.load_state_dict(sd)
        self._kept = {}
        self._cache = None  # also lets go of the replaced state tensors now
        self._set_skipped(())
        if own is None:
            return
        if own["rule"] != self.rule.name:
            raise ValueError(f"state dict was saved with rule {own['rule']!r}, this wrapper uses {self.rule.name!r}")
        params = self.params
        self.num_steps = int(own["num_steps"])
        for i, t in own["kept"].items():
            p = params[int(i)]
            buf = torch.empty_like(p, memory_format=torch.preserve_format)
            buf.copy_(t)
            self._kept[p] = Kept(buf, float(own["kept_lr"][i]))
        self._set_skipped(tuple(params[int(i)] for i in own.get("skipped", ())))  # absent in older checkpoints: none


def _rate(d: Direction, lr: float) -> float:
    """A direction's multiplier at the group's ``lr`` now: ``lr`` for a direction per unit
    learning rate, else the ratio to the step's learning rate (see :class:`Direction`)."""
    return lr if d.lr is None else _ratio(lr, d.lr)


def _ratio(lr_now: float, lr_then: float) -> float:
    """``lr_now / lr_then``, exactly 1 when unchanged (and when the step's lr was 0)."""
    return 1.0 if lr_now == lr_then or lr_then == 0 else lr_now / lr_then


def _dropping_cache_of(opt: PredictiveOptimizer) -> Callable[..., None]:
    """A load_state_dict post-hook for the base optimizer that drops ``opt``'s kept plan, which
    would otherwise hold the replaced state tensors until the next prediction (weakly
    referenced: the hook does not keep the wrapper alive)."""
    ref = weakref.ref(opt)

    def hook(*_: Any) -> None:
        wrapper = ref()
        if wrapper is not None:
            wrapper._cache = None
    return hook


class _Generation:
    """Counts events after which the kept plan is stale: steps of the base optimizer (its step
    post-hook calls :meth:`bump`) and the wrapper's own changes."""

    __slots__ = ("n",)

    def __init__(self) -> None:
        self.n = 0

    def bump(self, *_: Any) -> None:
        self.n += 1


_NO_STATE: Dict[str, Any] = {}


def _frozen(v: Any) -> Any:
    """A param group entry as a value to compare with later: a one-element CPU tensor by its
    value (schedulers may set a tensor ``lr`` in place), other tensors by identity and version
    (reading a GPU tensor's value would synchronise the host), sequences and dicts entry by entry."""
    if isinstance(v, Tensor):
        return float(v) if v.numel() == 1 and v.device.type == "cpu" else (id(v), v._version)
    if isinstance(v, (tuple, list)):
        return tuple(_frozen(x) for x in v)
    if isinstance(v, dict):
        return tuple((k, _frozen(x)) for k, x in v.items())
    return v


def _settings(opt: PredictiveOptimizer) -> Optional[List[Any]]:
    """The rule's settings of every group, frozen (``None`` for a rule without settings)."""
    settings = opt.rule.settings
    return None if settings is None else [_frozen(settings(opt.base, i)) for i in range(len(opt.base.param_groups))]


class _Cached:
    """A :class:`~lookahead_opt.kernel.Plan` and what its directions were derived from."""

    __slots__ = ("plan", "plan_outs", "params", "generation", "groups", "lists", "values", "mutable", "frozen",
                 "settings", "states", "entries", "counts", "kept", "group_index", "skips")
    kept: Optional[List[Optional[Tuple[int, float]]]]  # set by its maker (PredictiveOptimizer._plan)

    def __init__(self, opt: PredictiveOptimizer, plan: Plan, params: List[Tensor],
                 outs: Optional[List[Tensor]]) -> None:
        self.plan = plan
        self.plan_outs = outs
        self.params = params
        self.generation = opt._generation.n
        self.skips = opt._skip_generation  # the set of skipped parameters the plan was built with
        self.groups = list(opt.base.param_groups)
        self.lists = [(g["params"], list(g["params"])) for g in self.groups]
        self.group_index = [i for i, g in enumerate(self.groups) for _ in g["params"]]
        # the group entries by identity, and those that can change in place also by value
        self.values = list(itertools.chain.from_iterable(map(dict.values, self.groups)))
        self.mutable = [(g, k) for g in self.groups for k, v in g.items()
                        if k != "params" and isinstance(v, (Tensor, list, dict))]
        self.frozen = [_frozen(g[k]) for g, k in self.mutable]
        self.settings = _settings(opt)
        self.states = list(map(opt.base.state.get, params, itertools.repeat(_NO_STATE)))
        self.counts = list(map(len, self.states))
        self.entries = list(itertools.chain.from_iterable(map(dict.values, self.states)))

    def valid(self, opt: PredictiveOptimizer) -> bool:
        """Whether nothing the plan was derived from has changed but, maybe, the generation
        (see the optimizer's docs)."""
        base = opt.base
        groups = base.param_groups
        if len(groups) != len(self.groups) or not all(map(operator.is_, groups, self.groups)):
            return False
        values = list(itertools.chain.from_iterable(map(dict.values, groups)))
        if len(values) != len(self.values) or not all(map(operator.is_, values, self.values)):
            return False
        for plist, kept in self.lists:
            if len(plist) != len(kept) or not all(map(operator.is_, plist, kept)):
                return False
        if self.mutable and [_frozen(g[k]) for g, k in self.mutable] != self.frozen:
            return False
        if self.settings is not None and _settings(opt) != self.settings:
            return False
        states = list(map(base.state.get, self.params, itertools.repeat(_NO_STATE)))
        if not all(map(operator.is_, states, self.states)) or list(map(len, states)) != self.counts:
            return False
        entries = self.entries
        now = list(itertools.chain.from_iterable(map(dict.values, states)))
        return len(now) == len(entries) and all(map(operator.is_, now, entries))
