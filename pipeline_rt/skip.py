"""Tensors that skip stages, declared on hand-written layers (after torchgpipe's ``skip``).

A layer that makes a tensor for a later layer *stashes* it; the later layer *pops* it. The
layer class declares the names, and its ``forward`` is a generator:

.. code-block:: python

    @skippable(stash=["embedded"])
    class Embed(nn.Module):
        def forward(self, ids):
            x = self.embedding(ids)
            yield stash("embedded", x)
            return x

    @skippable(pop=["embedded"])
    class Head(nn.Module):
        def forward(self, h):
            x = yield pop("embedded")
            return self.out(h + x)

Outside a pipeline (``nn.Sequential(Embed(), ..., Head())`` on one device) the stashed
tensors wait in a per-thread table until popped: single-device training is the oracle.
In a :class:`~pipeline_rt.Pipeline`, :func:`wire` finds the stage of every stash and pop
(``Pipeline`` calls it on the stage modules) and wraps each stage in a :class:`SkipStage`:
a tensor stashed in stage ``s`` and popped in stage ``p > s`` rides as an extra entry of the
messages from ``s`` to ``p`` (after the stage's own outputs, in the order of the names),
passed on unchanged by the stages between. The transports make every received tensor a leaf
and the backward returns every input's gradient, so the popped tensor's gradient flows back
to the stage that stashed it, under every method, locally and across ranks.

Rules (checked by :func:`wire`, each with an error naming the layer): every name is stashed
by one layer and popped by one later layer (or one in the same stage); stash and pop as
declared, once per forward.
"""
from __future__ import annotations

import threading
from typing import Any, Callable, Dict, FrozenSet, Generator, Iterable, List, Optional, Tuple, Type, TypeVar

from torch import Tensor, nn

__all__ = ["skippable", "stash", "pop", "wire", "SkipStage", "skips_of"]

M = TypeVar("M", bound=Type[nn.Module])


class _Stash:
    __slots__ = ("name", "tensor")

    def __init__(self, name: str, tensor: Optional[Tensor]) -> None:
        self.name, self.tensor = name, tensor


class _Pop:
    __slots__ = ("name",)

    def __init__(self, name: str) -> None:
        self.name = name


def stash(name: str, tensor: Optional[Tensor]) -> _Stash:
    """``yield stash(name, tensor)`` in a :func:`skippable` layer's forward: keep ``tensor``
    for the layer that pops ``name``."""
    return _Stash(name, tensor)


def pop(name: str) -> _Pop:
    """``tensor = yield pop(name)`` in a :func:`skippable` layer's forward: the tensor
    stashed as ``name``."""
    return _Pop(name)


class _Table(threading.local):
    """The stashed tensors of the forward running on this thread (the current stage's, in a
    pipeline; otherwise the thread's own, kept until popped)."""

    def __init__(self) -> None:
        self.current: Dict[str, Optional[Tensor]] = {}


_table = _Table()


def skippable(stash: Iterable[str] = (), pop: Iterable[str] = ()) -> Callable[[M], M]:
    """Class decorator: the layer's ``forward`` is a generator that yields
    :func:`stash`/:func:`pop` of the names declared here and returns the output."""
    stashes, pops = frozenset(stash), frozenset(pop)

    def decorate(cls: M) -> M:
        inner = cls.forward

        def forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
            gen = inner(self, *args, **kwargs)
            if not isinstance(gen, Generator):
                return gen
            return _drive(type(self).__name__, gen, stashes, pops)

        cls.forward = forward
        cls._skip_stash, cls._skip_pop = stashes, pops  # type: ignore[attr-defined]
        return cls
    return decorate


def _drive(layer: str, gen: Generator[Any, Optional[Tensor], Any], stashes: FrozenSet[str],
           pops: FrozenSet[str]) -> Any:
    table = _table.current
    sent: Optional[Tensor] = None
    try:
        while True:
            op = gen.send(sent)
            sent = None
            if isinstance(op, _Stash):
                if op.name not in stashes:
                    raise RuntimeError(f"{layer} stashes {op.name!r} but declares stash={sorted(stashes)}")
                table[op.name] = op.tensor
            elif isinstance(op, _Pop):
                if op.name not in pops:
                    raise RuntimeError(f"{layer} pops {op.name!r} but declares pop={sorted(pops)}")
                if op.name not in table:
                    raise RuntimeError(f"{layer} pops {op.name!r}, which nothing stashed before it")
                sent = table.pop(op.name)
            else:
                raise TypeError(f"{layer}'s forward yielded {type(op).__name__}; yield stash(name, t) or pop(name)")
    except StopIteration as done:
        return done.value


def skips_of(module: nn.Module) -> Tuple[List[str], List[str]]:
    """The names ``module``'s :func:`skippable` layers stash and pop, in module order."""
    stashes: List[str] = []
    pops: List[str] = []
    for m in module.modules():
        stashes += sorted(getattr(m, "_skip_stash", ()))
        pops += sorted(getattr(m, "_skip_pop", ()))
    return stashes, pops


class SkipStage(nn.Module):
    """A stage whose message carries, after the stage's own tensors, the skips in flight.

    Args:
        module: the stage's module.
        carried_in: the names of the skips that arrive with the input, in order.
        carried_out: the names of the skips that leave with the output, in order.
    """

    def __init__(self, module: nn.Module, carried_in: Tuple[str, ...], carried_out: Tuple[str, ...]) -> None:
        super().__init__()
        self.module, self.carried_in, self.carried_out = module, carried_in, carried_out

    def forward(self, *message: Optional[Tensor]) -> Any:
        n = len(message) - len(self.carried_in)
        saved, _table.current = _table.current, dict(zip(self.carried_in, message[n:]))
        try:
            out = self.module(*message[:n])
            table = _table.current
        finally:
            _table.current = saved
        if not self.carried_out:
            return out
        missing = [s for s in self.carried_out if s not in table]
        if missing:
            raise RuntimeError(f"skips {missing} were to leave this stage but were not stashed (or were popped)")
        own = (out,) if isinstance(out, Tensor) else tuple(out)
        return own + tuple(table[s] for s in self.carried_out)


def wire(stages: List[Any]) -> List[Any]:
    """``stages`` with each stage that stashes, pops or passes on a skip wrapped in a
    :class:`SkipStage` (unchanged when no stage declares skips). Factories (zero-argument
    callables) are built later on their own ranks: a factory whose module declares skips
    fails at that build, asking for modules instead."""
    found = [skips_of(s) if isinstance(s, nn.Module) else None for s in stages]
    if not any(f is not None and (f[0] or f[1]) for f in found):
        return [s if isinstance(s, nn.Module) else _no_skips(s, k) for k, s in enumerate(stages)]
    if any(f is None for f in found):
        raise ValueError("some stages declare skips (skippable layers) and some are factories; give stage modules, "
                         "so that the skips' routes can be found (every rank may build every stage)")
    where: Dict[str, int] = {}
    popped: Dict[str, int] = {}
    for k, f in enumerate(found):
        assert f is not None
        for name in f[0]:
            if name in where:
                raise ValueError(f"skip {name!r} is stashed by two layers (stages {where[name]} and {k}); "
                                 f"give each stash its own name")
            where[name] = k
        for name in f[1]:
            if name in popped:
                raise ValueError(f"skip {name!r} is popped by two layers (stages {popped[name]} and {k})")
            if name not in where:
                raise ValueError(f"stage {k} pops skip {name!r}, which no earlier layer stashes")
            popped[name] = k
    unpopped = sorted(set(where) - set(popped))
    if unpopped:
        raise ValueError(f"skips {unpopped} are stashed but never popped; pop them, or do not stash them")
    names = sorted(where)
    live = [tuple(s for s in names if where[s] <= k < popped[s]) for k in range(len(stages))]
    return [SkipStage(s, live[k - 1] if k else (), live[k]) if (live[k] or (k and live[k - 1])) else s
            for k, s in enumerate(stages)]


def _no_skips(factory: Callable[[], nn.Module], k: int) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        module = factory()
        if isinstance(module, nn.Module) and any(skips_of(module)):
            raise ValueError(f"stage {k}'s factory built a module with skippable layers; give stage modules instead "
                             f"of factories, so that the skips' routes can be found")
        return module
    return build
