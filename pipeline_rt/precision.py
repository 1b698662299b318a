"""Mixed precision: each stage's forward under :class:`torch.autocast`; float16 with loss scaling.

``Pipeline(..., autocast=torch.bfloat16)`` (or ``torch.float16``) runs every forward of every
stage (the loss included, at the last stage; a checkpoint's re-run forwards too, and a
recomputation enters the same context: ``stage.autocast()``) inside :func:`autocast`:
``torch.autocast(device.type, dtype)`` whose cache of weight casts lives for that one forward
(cleared when it is entered and when it is left, also when an autocast of the caller is active
around it). The backward and the optimizer step run outside autocast, as torch recommends. The
weights stay in their own dtype (float32 master weights): predicted, stashed and replayed
weights are float32 tensors, and autocast casts whichever the forward runs on; the backward's
weights are cast the same way (:mod:`lookahead_opt.redirect` follows autocast's casts), so a
method whose backward uses other weights than its forward (``async``, ``pipedream``,
``pipeoptim``, ``spectrain``, ...) gets, at its backward, the cast of exactly those weights.

float16 (:class:`LossScaling`, on :class:`torch.amp.GradScaler`): the last stage's backward
differentiates ``scaler.scale(loss)``; at the STEP of a minibatch, once every stage's
gradients are complete (the flush methods: their STEPs wait for one another, as for global
clipping), every stage's gradients are unscaled (``scaler.unscale_``, per stage optimizer),
and if any stage found an inf or a NaN, every stage skips the update: its gradients are
dropped (``None``) before its STEP, which torch optimizers take as "no update" (weights and
state unchanged; the learning-rate scheduler still steps, as in torch's GradScaler loop; a
:class:`~lookahead_opt.PredictiveOptimizer` marks the parameters skipped, a zero update to its
prediction). Then ``scaler.update()`` backs the scale off (or grows it)
exactly as in single-device training with a GradScaler. The asynchronous methods are refused
with float16: a stage's update there holds gradients scaled at other times than its
neighbours', and no single decision skips "the minibatch" everywhere; so is ``backend="dist"``
(the decision would need a collective: not implemented yet), and checkpoints (the scale is not
saved yet).

``torch.autocast`` entered by the caller around :meth:`~pipeline_rt.Pipeline.train`
(:func:`caller_autocast`) is taken as ``autocast=`` its dtype for that call: its cache would
otherwise keep the casts of weights that the steps and the predicted-weight swaps have since
changed (stale by 4e-2 on a loss, measured), and its backward would run under autocast.
float16 that way is refused (it needs the loss scaling of ``autocast=torch.float16``), as is a
dtype other than the pipeline's ``autocast=``.
"""
from __future__ import annotations

import warnings
from contextlib import ExitStack, nullcontext
from typing import Any, ContextManager, Dict, Optional, Sequence

import torch
from torch import Tensor

__all__ = ["DTYPES", "autocast", "no_autocast", "check_autocast", "caller_autocast", "everywhere", "outside_autocast",
           "LossScaling"]

#: the dtypes ``autocast=`` takes (besides ``None``)
DTYPES = (torch.bfloat16, torch.float16)
_NO_CONTEXT = nullcontext()


def no_autocast() -> ContextManager[Any]:
    """The forward context of a stage without ``autocast=``: nothing."""
    return _NO_CONTEXT


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> ContextManager[Any]:
    """The context a stage's forward (or its recomputation) on ``device`` runs in:
    ``torch.autocast(device.type, dtype)`` with its weight-cast cache for this forward only
    (nothing for ``dtype=None``). Use one per forward."""
    return _NO_CONTEXT if dtype is None else _Autocast(device.type, dtype)


class _Autocast:
    """See :func:`autocast` (a plain context object: one is entered at every forward)."""

    __slots__ = ("ctx",)

    def __init__(self, device_type: str, dtype: torch.dtype) -> None:
        self.ctx = torch.autocast(device_type, dtype)

    def __enter__(self) -> None:
        torch.clear_autocast_cache()  # casts an enclosing autocast cached of weights since changed
        self.ctx.__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.ctx.__exit__(*exc)
        torch.clear_autocast_cache()  # (torch clears it only when leaving the outermost autocast)


def check_autocast(dtype: Optional[torch.dtype], devices: Sequence[torch.device], flush: bool, backend: str,
                   method: str) -> None:
    """Refuse an ``autocast=`` the pipeline cannot run exactly (readable errors)."""
    if dtype is None:
        return
    if dtype not in DTYPES:
        raise ValueError(f"autocast must be None, torch.bfloat16 or torch.float16, got {dtype!r}")
    for t in sorted({d.type for d in devices}):
        with warnings.catch_warnings(record=True) as said:  # torch warns and disables an unsupported dtype
            warnings.simplefilter("always")
            ok = torch.amp.is_autocast_available(t) and torch.autocast(t, dtype)._enabled
        if not ok:
            why = "; ".join(str(w.message) for w in said) or "no autocast for this device type"
            raise ValueError(f"autocast={dtype} is not supported on device type {t!r}: {why}")
    if dtype is torch.float16 and not flush:
        raise ValueError(
            f"autocast=torch.float16 needs loss scaling, and its inf/nan skip must be one decision for\n"
            f"  every stage; method {method!r} updates its stages at different times (no flush).\n"
            f"  Use autocast=torch.bfloat16 (no loss scaling needed), or a flush method (sync, 1f1b-flush).")
    if dtype is torch.float16 and backend != "local":
        raise ValueError(
            "autocast=torch.float16 (loss scaling) is implemented for backend='local' only.\n"
            "  Use autocast=torch.bfloat16 with backend='dist', or backend='local'.")


def caller_autocast(devices: Sequence[torch.device], dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The dtype the forwards of a :meth:`~pipeline_rt.Pipeline.train` call run in: the
    pipeline's ``dtype``, or that of a ``torch.autocast`` the caller entered around the call
    for one of ``devices``' types. Raises where the two disagree, and for a caller's float16."""
    found: Dict[str, torch.dtype] = {t: torch.get_autocast_dtype(t) for t in sorted({d.type for d in devices})
                                     if torch.is_autocast_enabled(t)}
    for t, d in found.items():
        if dtype is not None and d is not dtype:
            raise ValueError(
                f"train() runs inside torch.autocast({t!r}, {d}), but the pipeline was built with\n"
                f"  autocast={dtype}. Leave the torch.autocast out (autocast= already runs every\n"
                f"  forward under autocast), or build the pipeline with autocast={d}.")
        if d is torch.float16 and dtype is None:
            raise ValueError(
                f"train() runs inside torch.autocast({t!r}, torch.float16): float16 needs loss scaling.\n"
                f"  Build the pipeline with autocast=torch.float16 (it scales the loss with\n"
                f"  torch.amp.GradScaler) and call train() outside torch.autocast.")
    if dtype is not None or not found:
        return dtype
    if len(set(found.values())) > 1:
        raise ValueError(f"train() runs inside torch.autocast with different dtypes per device type ({found}); "
                         f"use one dtype, or autocast= on the pipeline")
    return next(iter(found.values()))


def everywhere(devices: Sequence[torch.device], dtype: Optional[torch.dtype]) -> ContextManager[Any]:
    """Evaluation and inference (no weights change inside): :func:`autocast` for every device
    type of ``devices`` (``dtype=None``: a caller's autocast, if any, applies as it is, its
    cache of weight casts cleared first)."""
    stack = ExitStack()
    torch.clear_autocast_cache()
    if dtype is not None:
        for t in sorted({d.type for d in devices}):
            stack.enter_context(_Autocast(t, dtype))
    return stack


def outside_autocast(devices: Sequence[torch.device]) -> ContextManager[Any]:
    """The caller's autocast switched off for ``devices``' types (the backward and the step
    run outside autocast; each forward enters its own, :func:`autocast`)."""
    stack = ExitStack()
    for t in sorted({d.type for d in devices}):
        if torch.is_autocast_enabled(t):
            stack.enter_context(torch.autocast(t, enabled=False))
    return stack


class LossScaling:
    """float16 loss scaling for a pipeline whose STEPs flush, on :class:`torch.amp.GradScaler`.

    Args:
        device_type: the last stage's device type (where the loss, and the scale, live).
        **kwargs: :class:`torch.amp.GradScaler`'s (``init_scale``, ``growth_factor``,
            ``backoff_factor``, ``growth_interval``).

    Attributes:
        scaler: the :class:`torch.amp.GradScaler` (``scaler.get_scale()``; its ``state_dict``).
        skipped: the updates skipped so far (an inf or a NaN in some stage's gradients).
    """

    def __init__(self, device_type: str, **kwargs: Any) -> None:
        self.scaler = torch.amp.GradScaler(device_type, **kwargs)
        self.skipped = 0

    def scale(self, loss: Tensor) -> Tensor:
        """What the last stage's backward differentiates: ``loss * scale``."""
        return self.scaler.scale(loss)

    def unscale(self, optimizers: Sequence[Optional[torch.optim.Optimizer]],
                contexts: Sequence[ContextManager[Any]]) -> bool:
        """Unscale every stage's gradients (``scaler.unscale_``, in the stage's context: its
        stream); if any is inf or NaN (the flags ``GradScaler.step`` reads: a host sync per
        stage, as there), skip the update at every stage: drop their gradients (``grad =
        None``: the coming STEPs update nothing). Returns whether it skipped. ``None``
        optimizers: stages without parameters."""
        found = False
        states = self.scaler._per_optimizer_states
        states.clear()  # (what a round interrupted by an error left between unscale_ and update)
        for opt, ctx in zip(optimizers, contexts):
            if opt is not None:
                with ctx:
                    self.scaler.unscale_(opt)
                    found = any([bool(f) for f in states[id(opt)]["found_inf_per_device"].values()]) or found
        if found:
            for opt in optimizers:
                if opt is not None:
                    opt.zero_grad(set_to_none=True)
            self.skipped += 1
        return found

    def update(self) -> None:
        """``scaler.update()``: back off after a skipped update, grow after ``growth_interval``
        good ones (every stage's inf/nan checks of this update combined)."""
        if self.scaler._per_optimizer_states:  # (no stage has parameters: nothing was checked)
            self.scaler.update()
