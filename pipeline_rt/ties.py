"""Tied parameters across stages: one parameter to the user, one update per minibatch.

A parameter is *tied* when several stages hold it: GPT-2's output projection
``lm_head.weight`` is its input embedding ``wte.weight``, so a split puts it in the first and
the last stage. Without care each stage's optimizer would step it, with its own state and
half of its gradient. A tie is found two ways:

* the same :class:`~torch.nn.Parameter` object in several stage modules (found by identity:
  with ``backend="local"`` in the built stages, with ``backend="dist"`` among the stages
  given as modules);
* declared, ``Pipeline(..., ties=[{0: "wte.weight", 3: "lm_head.weight"}])``: one mapping
  per tie, stage index -> the parameter's name in that stage's module (as
  ``named_parameters()`` names it). Declare the ties of stages given as factories under
  ``backend="dist"``: each rank builds only its own stage, so nothing can be compared.

The stage of lowest index holding a tie is its **owner**; its value is the tie's (a declared
tie's other copies are overwritten with it when the pipeline is built).

Semantics (the flush methods, ``sync`` and ``1f1b-flush``). Minibatch ``j``'s update of a
tied parameter ``w`` held by stages ``K`` is one optimizer step on the sum of the holders'
gradients, :math:`g_j = \\sum_{k \\in K} \\partial L_j / \\partial w_k`, the gradient of
single-device training where every use of ``w`` is one parameter; every copy holds the
same value at every forward. How:

* ``backend="local"``: the stages share one tensor (a declared tie is made one: the other
  holders' attribute is set to the owner's parameter; the holders must be on one device,
  as one tensor cannot live on two). Only the owner's optimizer has it; autograd sums every
  holder's backward into its ``.grad``. The owner's STEP of ``j`` comes after every
  holder's backward of ``j`` (gradients flow to lower stages), and every holder's forward
  of ``j + 1`` after it (activations flow to higher ones), so nothing else is needed.
  Loading a state dict into a non-owner stage's module leaves the shared tensor as it is
  (its value is the owner's: a checkpoint cut of a later stage can precede the owner's
  STEP).
* ``backend="dist"``: each holder's rank has its own copy and steps it with its own
  optimizer, after an all-reduce (sum) of the copy's gradient over the tie's process group
  right before its STEP (the hook :attr:`~pipeline_rt.executor.Executor.before_step`), as
  Megatron's embedding group and DeepSpeed's tied layers do: the copies see the same
  gradient, start equal (broadcast from the owner when the pipeline is built) and have the
  same optimizer state, so they stay bit-identical. A holder whose forward did not use the
  copy contributes zeros.

Refused, with the fix in the error: the asynchronous methods (their stages update at
different times, so the copies would hold different versions: untie, or use a flush
method); local holders on different devices; ``clip_grad_norm`` with ``backend="dist"``
(each copy would be clipped by its own stage's norm, or counted once per holder in the
global one; clipping works with ``backend="local"``, where the tie has one owner and
counts once).
"""
from __future__ import annotations

from datetime import timedelta
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .methods import Method

if TYPE_CHECKING:
    from .dist import DistExecutor
    from .executor import Executor

__all__ = ["Ties", "TieError"]

#: one tie: stage index -> the parameter's name in that stage's module
TieSpec = Mapping[int, str]


class TieError(ValueError):
    """A tie that cannot be trained exactly as asked (the message says what to do)."""


class Ties:
    """The ties of one pipeline: found, declared and checked while the stages are built
    (:meth:`params_of`), then kept in sync (:meth:`attach`).

    Args:
        declared: the ``ties=`` argument of :class:`~pipeline_rt.pipeline.Pipeline`.
        specs: the stages as given (modules or factories).
        method: the pipeline's method.
        backend: ``"local"`` or ``"dist"``.
        clip: whether gradients are clipped (``clip_grad_norm``).
    """

    def __init__(self, declared: Optional[Sequence[TieSpec]], specs: Sequence[Any], method: Method, backend: str,
                 clip: bool) -> None:
        self.method, self.local, self.clip = method, backend == "local", clip
        self.groups: List[Dict[int, str]] = [dict(sorted(t.items())) for t in _checked(declared, len(specs))]
        if not self.local:
            for tie in _shared([s if isinstance(s, nn.Module) else None for s in specs]):
                self._add(tie)
            if self.groups:
                self._check_supported()
        #: local: every parameter of the stages built so far, by id: (stage, name, device)
        self._seen: Dict[int, Tuple[int, str, torch.device]] = {}
        self._built: Dict[int, nn.Module] = {}  # local: the stage modules built so far
        #: dist: this rank's copy of every tie it holds, by the tie's position in :attr:`groups`
        self._held: Dict[int, nn.Parameter] = {}
        self._reduce: List[Tuple[Dict[int, str], nn.Parameter, Any]] = []

    # ------------------------------------------------------------------ while building

    def params_of(self, k: int, module: nn.Module, device: torch.device) -> List[nn.Parameter]:
        """The parameters stage ``k``'s optimizer steps (call before moving ``module`` to
        ``device``, stages in increasing order). Locally: a declared tie's copy is replaced
        by the owner's parameter; a parameter of a lower stage (its owner) is left out."""
        named = dict(module.named_parameters())
        for tie in self.groups:
            if k in tie and tie[k] not in named:
                raise TieError(f"tie {_show(tie)}: stage {k} has no parameter {tie[k]!r}\n"
                               f"its parameters: {', '.join(list(named)[:12])}{', ...' if len(named) > 12 else ''}")
        if not self.local:
            self._held.update({i: named[tie[k]] for i, tie in enumerate(self.groups) if k in tie})
            return list(module.parameters())
        self._built[k] = module
        for tie in self.groups:
            owner = min(tie)
            if k in tie and k != owner:
                _replace(module, tie[k], self._built[owner].get_parameter(tie[owner]), k)
        named = dict(module.named_parameters())
        mine: List[nn.Parameter] = []
        shared: Dict[str, nn.Parameter] = {}
        for name, p in named.items():
            if id(p) not in self._seen:
                self._seen[id(p)] = (k, name, device)
                mine.append(p)
                continue
            j, owner_name, owner_device = self._seen[id(p)]
            if _place(owner_device) != _place(device):
                raise TieError(f"stages {j} and {k} hold the same parameter ({owner_name!r} in stage {j}, {name!r} in "
                               f"stage {k}) but are on different devices ({owner_device} and {device});\n"
                               f"one tensor cannot live on two devices. Put the stages holding it on one device, or\n"
                               f"use backend='dist' with ties=[{{{j}: {owner_name!r}, {k}: {name!r}}}] (a copy per rank, "
                               f"kept identical)")
            self._add({j: owner_name, k: name})
            shared[name] = p
        if shared:
            self._check_supported()
            module.register_load_state_dict_pre_hook(_KeepShared(shared))
        return mine

    def _add(self, tie: Dict[int, str]) -> None:
        """Merge ``tie`` into the groups (a member in two ties makes them one)."""
        members = set(tie.items())
        merged = dict(tie)
        rest = []
        for g in self.groups:
            if members & set(g.items()):
                merged.update(g)
            else:
                rest.append(g)
        self.groups = rest + [dict(sorted(merged.items()))]

    def _check_supported(self) -> None:
        m = self.method
        if m.shape == "async-1f1b" or m.predicts:
            raise TieError(
                f"method {m.name!r} cannot train tied parameters exactly: {', '.join(_show(t) for t in self.groups)}.\n"
                f"Its stages update at different times (or on predicted weights), so the holders of a tie would use\n"
                f"different versions of one parameter. Either:\n"
                f"  * use a flush method, method='sync' or method='1f1b-flush' (exact: one update per minibatch\n"
                f"    with every holder's gradient, as single-device training), or\n"
                f"  * untie: give each stage its own parameter (e.g. a transformers model built with\n"
                f"    tie_word_embeddings=False, or module.weight = nn.Parameter(module.weight.detach().clone()))")
        if self.clip and not self.local:
            raise TieError(
                f"clip_grad_norm with tied parameters and backend='dist' is not supported: {_show(self.groups[0])}.\n"
                f"Each holder's copy would be clipped by its own stage's norm (clip_grad_scope='stage') or counted\n"
                f"once per holder (clip_grad_scope='global'), and the copies would differ. Train without clipping,\n"
                f"or with backend='local', where a tie has one owner and counts once")

    # ------------------------------------------------------------------ after building

    @property
    def found(self) -> List[Dict[int, str]]:
        """Every tie, as ``{stage: parameter name}``."""
        return [dict(t) for t in self.groups]

    def attach(self, executor: "Executor") -> None:
        """``backend="dist"``: join a process group per tie (every rank, in the same order),
        broadcast each copy from its owner, and sum the copies' gradients before every STEP
        of a holder (:attr:`~pipeline_rt.executor.Executor.before_step`)."""
        if self.local or not self.groups:
            return
        ex: "DistExecutor" = executor  # type: ignore[assignment]
        layout = ex.layout
        for i, tie in enumerate(self.groups):
            # one group per replica (data_parallel=D), joined by every rank in the same order
            groups = [dist.new_group([layout.rank(r, k) for k in tie], timeout=timedelta(seconds=ex.timeout))
                      for r in range(layout.data_parallel)]
            group, ranks = groups[ex.replica], [layout.rank(ex.replica, k) for k in tie]
            p = self._held.get(i)
            if p is None:
                continue

            def broadcast(t: Tensor, g: Any = group, src: int = ranks[0]) -> Any:
                return dist.broadcast(t, src, group=g, async_op=True)

            mine = _meta(p)
            owners = mine.clone()
            self._collective(ex, tie, "broadcast of the owner's shape", broadcast, owners)
            if not torch.equal(owners, mine):
                raise TieError(f"tie {_show(tie)}: stage {ex.rank}'s copy {tuple(p.shape)}:{p.dtype} differs in shape "
                               f"or dtype from the owner's (stage {min(tie)}); a tie's copies must have one shape and "
                               f"dtype")
            with torch.no_grad():
                self._collective(ex, tie, "broadcast of the owner's value", broadcast, p.data)
            self._reduce.append((tie, p, group))
        if self._reduce:
            ex.before_step.append(lambda run, k: self._sum_grads(ex, k))

    def _sum_grads(self, ex: "DistExecutor", k: int) -> None:
        """Before stage ``k``'s STEP: each tied copy's gradient becomes the sum over its holders."""
        for tie, p, group in self._reduce:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self._collective(ex, tie, "all-reduce of the gradient before STEP",
                             lambda t, g=group: dist.all_reduce(t, group=g, async_op=True), p.grad)

    @staticmethod
    def _collective(ex: "DistExecutor", tie: Dict[int, str], what: str, post: Any, t: Tensor) -> None:
        """``post(t)`` over the tie's holders; a failure is the executor's
        :class:`~pipeline_rt.dist.PipelineCommError` (stage, rank, replica, timeout, schedule)."""
        text = f"tied parameter {_show(tie)}: {what}"

        def run() -> None:
            ex.transport.flush()  # NCCL: held sends must not wait behind the collective
            ex.transport.collective(lambda: post(t), [t], text)
        ex._guard(None, None, run, where=f"the {text}, with the tie's holders (stages {sorted(tie)})")


def _meta(p: Tensor) -> Tensor:
    """``p``'s dtype and shape as a fixed-length integer tensor (compared across ranks)."""
    from .p2p import _encode, describe
    code = _encode(describe((p,)))
    return torch.tensor(code + [-2] * (16 - len(code)), dtype=torch.int64, device=p.device)


class _KeepShared:
    """A load-state-dict pre-hook of a non-owner stage: its shared parameters keep their
    value (the owner's load sets it)."""

    def __init__(self, shared: Dict[str, nn.Parameter]) -> None:
        self.shared = shared

    def __call__(self, module: nn.Module, state_dict: Dict[str, Any], prefix: str, *args: Any) -> None:
        for name, p in self.shared.items():
            if prefix + name in state_dict:
                state_dict[prefix + name] = p.detach()


def _replace(module: nn.Module, name: str, param: nn.Parameter, k: int) -> None:
    """Make ``module``'s parameter ``name`` be ``param`` (a local declared tie)."""
    old = module.get_parameter(name)
    if old.shape != param.shape or old.dtype != param.dtype:
        raise TieError(f"stage {k}'s {name!r} {tuple(old.shape)}:{old.dtype} cannot be tied to its owner's parameter "
                       f"{tuple(param.shape)}:{param.dtype}; a tie's copies must have one shape and dtype")
    path, _, attr = name.rpartition(".")
    setattr(module.get_submodule(path), attr, param)


def _checked(declared: Optional[Sequence[TieSpec]], n: int) -> List[TieSpec]:
    if declared is None:
        return []
    out = []
    for tie in declared:
        if not isinstance(tie, Mapping) or len(tie) < 2 or not all(
                isinstance(k, int) and 0 <= k < n and isinstance(v, str) for k, v in tie.items()):
            raise TieError(f"each tie must map two or more stage indices (0..{n - 1}) to parameter names, e.g.\n"
                           f"ties=[{{0: 'wte.weight', {n - 1}: 'lm_head.weight'}}]; got {tie!r}")
        out.append(tie)
    return out


def _shared(modules: Sequence[Optional[nn.Module]]) -> List[Dict[int, str]]:
    """The same parameter object in several of ``modules`` (``None``: not built here)."""
    where: Dict[int, Dict[int, str]] = {}
    for k, m in enumerate(modules):
        if m is not None:
            for name, p in m.named_parameters():
                where.setdefault(id(p), {})[k] = name
    return [t for t in where.values() if len(t) > 1]


def _place(d: torch.device) -> Tuple[str, Optional[int]]:
    """Where a tensor lives (``cpu`` and ``cpu:0`` are one place)."""
    return d.type, None if d.type == "cpu" else d.index


def _show(tie: Mapping[int, str]) -> str:
    return "{" + ", ".join(f"stage {k}: {v!r}" for k, v in sorted(tie.items())) + "}"
