"""Activation recomputation, exact under every method, and the recomputation a stage's module does itself.

``Pipeline(..., recompute=True)`` (or a list of stage indices): a recomputed stage's forward
runs under :func:`torch.no_grad`, so it saves no activations; its record keeps a
:class:`~pipeline_rt.stage.Replay` (the inputs, the stage's RNG state at the forward, the
version, the prediction distance, and for a predicted forward a copy of the prediction).
Right before the backward, :func:`rebuild` re-runs the forward from it, with autograd
(``Stage._forward`` with the replay, the path a checkpoint resume takes), then the backward
runs as without recomputation (the re-run happens inside ``Stage.backward``: a context that
must surround every forward, such as an autocast, must surround the re-run too). The re-run
is exact:

* **weights**: the forward's own. A live forward's version is held in the stage's lazy
  stash until the backward (copied only when a ``STEP`` overwrites it while the micro-batch
  is in flight, as ``pipedream`` does); a predicted forward's prediction is the copy kept.
* **saved weights**: redirected (:class:`lookahead_opt.redirect`) to the weights the
  method's backward uses: the live ones (``async``, ``pipeoptim``), a fresh prediction
  (``spectrain``), the forward's (``pipedream``, ``2bw``, ``backward="predicted"``).
* **randomness**: the stage's RNG stream is set to its state at the forward: dropout draws
  the same masks.
* **statistics**: :func:`is_recomputing` is true during the re-run (and during every
  backward), so :class:`~pipeline_rt.batchnorm.DeferredBatchNorm` counts each micro-batch
  once. A torch batch norm that tracks running statistics would count it twice: a
  recomputed stage refuses one (:func:`check_recomputable`).

Memory: a recomputed stage holds, per micro-batch in flight, its inputs (and the stage's
RNG state, 5 KB on CPU) instead of every saved activation. The forward's weights must be
kept until the backward: free where the method keeps them anyway (``sync``,
``1f1b-flush``, ``pipedream``, ``2bw``, ``backward="predicted"``), a cost where it does
not: ``async`` holds up to :math:`w_k + 1` versions at stage :math:`k` (``pipedream``'s
stash), ``pipeoptim`` and ``spectrain`` one copy of the prediction per micro-batch in
flight (``backward="predicted"``'s). Time: one more forward per micro-batch.

Why not :func:`torch.utils.checkpoint` around the stage: a stage's inputs are already
detached leaves and the runtime calls its backward itself, so no autograd function is
needed to splice the re-run into a graph; and torch's recomputation runs on the weights the
parameters hold at the backward, and keeps what it saves (weights included) unredirected,
so it cannot re-run at the forward's weights while the backward uses others.

A module's own recomputation (``torch.utils.checkpoint`` inside a stage) runs inside the
stage's backward. :func:`backward_weights` makes it exact or refuses it:

* where the backward's weights are the forward's (every micro-batch of ``sync``,
  ``1f1b-flush``, ``pipedream``, ``2bw``, ``backward="predicted"``, and those with
  :math:`s = 0` elsewhere), the parameters hold the forward's weights during the backward:
  both kinds of torch checkpoint are exact;
* elsewhere (``async``, ``pipeoptim``, ``spectrain`` with :math:`s > 0`), with
  ``recompute`` on for the stage, the parameters hold the forward's weights and what the
  re-run saves is redirected to the backward's: ``use_reentrant=True`` is exact;
  ``use_reentrant=False`` keeps what it saves out of any redirection and is refused;
  without ``recompute`` the forward's weights are gone and both kinds are refused, naming
  the fix. Without ``recompute`` torch refuses them itself (saved-tensor hooks disabled
  during the backward stop a non-reentrant recomputation; a backward given its ``inputs``
  stops a reentrant one), so every one is caught. Otherwise (``recompute`` on, or hooks of
  the caller's active) a re-run is seen at its first module call (``checkpoint(block, x)``,
  ``checkpoint_sequential``, transformers' gradient checkpointing) or, reentrant, at its
  first saved tensor: a non-reentrant checkpoint of a plain function calling no module is
  not seen there.

A stage made only of stock ``torch.nn`` layers cannot recompute inside its backward
(:func:`may_recompute`): it skips all of this.
"""
from __future__ import annotations

from contextlib import nullcontext
from dataclasses import replace
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, ContextManager, FrozenSet, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from lookahead_opt.redirect import Swapped, redirect

if TYPE_CHECKING:
    from .stage import Stage, _Record

__all__ = ["is_recomputing", "recomputing", "recompute_stages", "check_recomputable", "may_recompute", "rebuild",
           "backward_weights"]

_DEPTH = [0]  # process-wide, not per thread: a module's own recomputation may run on an autograd device thread
_NO_CONTEXT: ContextManager[Mapping[str, Any]] = nullcontext(MappingProxyType({}))


def is_recomputing() -> bool:
    """Whether a forward running now is a recomputation (during a stage's re-run of its
    forward, and during every stage backward). Code with side effects in its forward (running
    statistics) checks it, as torchgpipe's ``is_recomputing``."""
    return _DEPTH[0] > 0


class recomputing:
    """The block is a recomputation (:func:`is_recomputing` is true inside it)."""

    def __enter__(self) -> None:
        _DEPTH[0] += 1

    def __exit__(self, *exc: Any) -> None:
        _DEPTH[0] -= 1


def recompute_stages(recompute: Union[bool, Sequence[int]], num_stages: int) -> FrozenSet[int]:
    """The stages that recompute: all (``True``), none (``False``) or the given indices."""
    if isinstance(recompute, bool):
        return frozenset(range(num_stages)) if recompute else frozenset()
    if isinstance(recompute, (str, bytes)) or not isinstance(recompute, (list, tuple, set, frozenset, range)):
        raise TypeError(f"recompute must be True, False or a list of stage indices, got {recompute!r}")
    bad = [k for k in recompute if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < num_stages]
    if bad:
        raise ValueError(f"recompute: {bad} are not stage indices of this {num_stages}-stage pipeline "
                         f"(0..{num_stages - 1})")
    return frozenset(recompute)


def check_recomputable(module: nn.Module, index: int) -> None:
    """Refuse a torch batch norm that tracks running statistics in a recomputed stage: the
    re-run would update them a second time."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from .batchnorm import DeferredBatchNorm
    found = [name or type(m).__name__ for name, m in module.named_modules()
             if isinstance(m, _BatchNorm) and not isinstance(m, DeferredBatchNorm) and m.track_running_stats]
    if found:
        raise ValueError(
            f"recompute: stage {index} has batch norms that track running statistics: {found}.\n"
            f"Recomputing the stage's forward would update their statistics twice per micro-batch.\n"
            f"Fix: pipeline_rt.batchnorm.convert_deferred_batch_norm(module, chunks), whose statistics count "
            f"each micro-batch once; or leave stage {index} out of recompute.")


def may_recompute(module: nn.Module) -> bool:
    """Whether ``module``'s backward may run a forward of its own (``torch.utils.checkpoint``);
    ``False`` only where it provably cannot: every module in it a stock ``torch.nn`` layer
    (:data:`pipeline_rt.randomness.QUIET_MODULES`, dropouts) without hooks or an
    instance-level ``forward``. Read at every run's start (``Stage.start_run``)."""
    from torch.nn.modules import module as _module

    from .randomness import _DROPOUTS, QUIET_MODULES
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    return any(type(m) not in QUIET_MODULES and type(m) not in _DROPOUTS or m._forward_hooks
               or m._forward_pre_hooks or "forward" in m.__dict__ for m in module.modules())


def rebuild(stage: "Stage", unit: Any, rec: "_Record") -> "_Record":
    """Re-run the forward of ``rec`` (run without a graph, ``rec.replay`` set) with autograd,
    at the forward's weights and RNG state; returns the record with the graph."""
    r = rec.replay
    assert r is not None
    full = replace(r, weights=r.weights or forward_version(stage, r.version))
    with recomputing():
        stage._forward(unit, r.inputs, r.s, r.target, r.weight, full)
    new = stage._records.pop(unit)
    new.replay = full
    new.track, new.start_weights, new.forward_weights = rec.track, rec.start_weights, rec.forward_weights
    return new


def forward_version(stage: "Stage", version: int) -> List[Tensor]:
    """The weights of ``version`` of a live forward: stashed, or the live ones if no STEP
    came since (the stage holds the version: a recomputed forward takes a hold)."""
    if version in stage._stash:
        return stage._stash[version]
    assert version == stage.version, f"stage {stage.index}: version {version} was not held for its recomputation"
    return [p.detach() for p in stage.params]


def backward_weights(stage: "Stage", rec: "_Record", unit: Any) -> ContextManager[Mapping[str, Any]]:
    """Around a stage's backward: the parameters hold the weights ``rec``'s forward ran on
    (so a recomputation inside the module re-runs on them) and what it saves resolves to the
    backward's; where that cannot be exact, a recomputation inside the backward raises.
    Yields the keywords the backward's ``torch.autograd.backward`` takes (``inputs``, the
    stage's leaves, where a reentrant checkpoint is to refuse itself)."""
    if not stage.may_recompute or not stage.params:  # (no weights: nothing can differ)
        return _NO_CONTEXT
    m = stage.method
    same = m.backward == "forward" or rec.key == _backward_key(stage)
    held = _forward_weights(stage, rec)
    if held is None and same:
        held = rec.weights  # (a "predict" backward's prediction: the forward's weights again)
    if same and held is _LIVE:
        return _NO_CONTEXT  # the parameters hold the forward's weights, which the backward uses
    return _Backward(stage, rec, unit, held, same)


_LIVE: List[Tensor] = []  # sentinel: the forward's weights are the live ones
_NO_KWARGS: Mapping[str, Any] = MappingProxyType({})
_REFUSED = "pipeline_rt.recompute: no recomputation inside this backward"
#: what torch.utils.checkpoint(use_reentrant=True) raises in a backward given ``inputs``
_REENTRANT_REFUSED = "torch.utils.checkpoint is incompatible with .grad()"


def _backward_key(stage: "Stage") -> tuple:
    """The key (version, distance, observations) of the weights the backward uses."""
    extra = stage._extra
    if stage.method.backward == "predict" and extra > 0 and stage.params:
        return stage.version, extra, stage._observed
    return stage.version, 0, 0


def _forward_weights(stage: "Stage", rec: "_Record") -> Optional[List[Tensor]]:
    """The weights ``rec``'s forward ran on, if the stage still has them (:data:`_LIVE`: the
    live ones); ``None``: gone."""
    copy = rec.replay.weights if rec.replay is not None and rec.replay.weights else None
    if rec.predicted:  # (a "predict" backward's rec.weights are the backward's own)
        own = rec.weights if stage.method.backward == "forward" else None
        return own or rec.forward_weights or copy
    if rec.version == stage.version:
        return _LIVE
    return stage._stash.get(rec.version) or copy


class _Backward:
    """See :func:`backward_weights`."""

    def __init__(self, stage: "Stage", rec: "_Record", unit: Any, held: Optional[List[Tensor]], same: bool) -> None:
        self.stage, self.rec, self.unit, self.held, self.same = stage, rec, unit, held, same
        self.swapped: Optional[Swapped] = None
        self.live: List[Tensor] = []
        self.handle: Any = None

    def __enter__(self) -> Mapping[str, Any]:
        stage, held = self.stage, self.held
        if self.same:  # (held): what a recomputation saves is the backward's weights as it is
            assert held is not None
            self.live = [p.data for p in stage.params]
            for p, w in zip(stage.params, held):
                p.data = w
            return _NO_KWARGS
        if held is None and torch._C._autograd._top_saved_tensors_default_hooks(False) is None:
            # a recomputation cannot be exact, and torch refuses both kinds itself: a non-reentrant
            # one cannot push its hooks, a reentrant one cannot run in a backward given `inputs`
            self.hooks: Any = torch.autograd.graph.disable_saved_tensors_hooks(_REFUSED)
            self.hooks.__enter__()
            return {"inputs": [t for t in (*stage.params, *self.rec.inputs) if t is not None and t.requires_grad]}
        if held is None:  # (hooks of the caller's are active): a recomputation's first save raises
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._refuse_save, _identity)
        else:  # the forward's weights in, what a recomputation saves resolved to the backward's
            if held is not _LIVE:
                self.swapped = Swapped(stage.params, held)
            self.hooks = redirect(stage.params, stage._resolver(self.rec))
        self.hooks.__enter__()
        self.handle = nn.modules.module.register_module_forward_pre_hook(self._check_forward)
        return _NO_KWARGS

    def __exit__(self, kind: Any, exc: Optional[BaseException], tb: Any) -> None:
        if self.same:
            for p, w in zip(self.stage.params, self.live):
                p.data = w
            return
        if self.handle is not None:
            self.handle.remove()
        self.hooks.__exit__(None, None, None)
        if self.swapped is not None:
            self.swapped.undo()
        if isinstance(exc, RuntimeError) and any(mark in str(exc) for mark in (_REFUSED, _REENTRANT_REFUSED)):
            self._refuse()  # torch's refusal, in our words

    def _check_forward(self, module: nn.Module, args: Any) -> None:
        """A module forward inside the backward with autograd on: a recomputation. Exact only
        if what it saves goes through this backward's redirection (torch's reentrant one)."""
        if not torch.is_grad_enabled():
            return
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        if self.held is None or top is None or top[0] is not self.hooks.pack_hook:
            self._refuse()

    def _refuse_save(self, t: Tensor) -> Tensor:
        self._refuse()
        return t  # (not reached)

    def _refuse(self) -> None:
        from .stage import StageError, _describe
        stage, m = self.stage, self.stage.method
        k = stage.index
        head = (f"stage {k}: its module recomputes activations during its backward (torch.utils.checkpoint inside "
                f"the stage), and under method {m.name!r}\nmicro-batch {self.unit}'s backward uses other weights "
                f"({_describe(_backward_key(stage))}) than its forward ({_describe(self.rec.key)}).\n")
        if self.held is not None:  # a recomputation that saves outside this backward's redirection
            raise StageError(
                head + "torch.utils.checkpoint(use_reentrant=False) keeps what its recomputation saves out of the "
                "runtime's redirection:\nits backward would use the forward's weights, a silently different result.\n"
                f"Fix: pass use_reentrant=True to it (exact), or remove it and recompute the whole stage "
                f"(recompute=[{k}])." + (" recompute is on for this stage already." if stage.recompute else ""))
        raise StageError(
            head + "The stage no longer holds the forward's weights, and torch's recomputation would run on the "
            "backward's:\na silently different result.\n"
            f"Fix: Pipeline(..., recompute=True) (or recompute=[{k}]) keeps the forward's weights and recomputes "
            "the whole stage at them\n(remove the inner checkpoint, or keep it with use_reentrant=True: exact);\n"
            "or use a method whose backward reuses the forward's weights (pipedream, 2bw, or pipeoptim with "
            "backward='predicted'),\nwhere torch.utils.checkpoint is exact.")


def _identity(x: Any) -> Any:
    return x
