"""`Pipeline`: the user-facing runtime, a training loop over streamed data.

.. code-block:: python

    pipe = Pipeline(split_by_balance(model, [2, 3]), ["cuda:0", "cuda:1"],
                    lambda ps: torch.optim.AdamW(ps, lr=1e-3), nn.functional.cross_entropy,
                    method="pipeoptim", lr_scheduler=lambda opt: CosineAnnealingLR(opt, 1000),
                    clip_grad_norm=1.0)
    losses = pipe.train(loader, epochs=3, callback=log, progress=True)   # one float per minibatch
    print(pipe.evaluate(val_loader, metric=accuracy))

Each minibatch ``(input, target)`` is split along dim 0 into ``chunks`` micro-batches of
sizes differing by at most one; micro-batch ``m`` of ``n_m`` rows out of ``n`` contributes
``(n_m / n) * loss_fn(out_m, target_m)``, so with a mean-reduced loss the minibatch loss and
its gradient are those of the whole minibatch, and ``sync``/``1f1b-flush`` reproduce
single-device training.

Streaming. :meth:`Pipeline.train` pulls minibatches from ``batches`` only when the schedule
needs them (:mod:`pipeline_rt.feed`), runs the method's schedule as it is produced
(:class:`~pipeline_rt.schedule.LazySchedule`), and drains once, when the data ends (or
``max_steps`` is reached, or the callback stops it). Memory and per-step cost do not grow
with the number of minibatches; the returned list of losses does (one float each).

Host synchronisation. None per minibatch: losses stay on the device and are read back a
block at a time; a ``callback`` that reads ``info.loss`` waits for that minibatch's loss
(one sync per minibatch), one that does not costs nothing on the device. ``check_finite``
syncs at every step.

Errors. Shapes that do not chain fail at the first micro-batch's forward, before any
update (:class:`~pipeline_rt.stage.StageError` names the stage and the input shapes). An
exception in a stage propagates from :meth:`Pipeline.train` as is: the local executor is a
single-threaded loop with no worker to wait for, so it cannot hang; the in-flight state is
dropped (updates already applied stay) and the pipeline can train again.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lookahead_opt import PredictiveOptimizer

from . import checkpoint, precision
from .batchnorm import bind_chunks
from .executor import EXISTS, Executor, Info, Run, StageRun, eval_mode
from .feed import Feed
from .guards import check_batch_dependent, check_device, declared_reduction, micro_batch_weight
from .lossprobe import ReductionProbe, Share
from .layout import Layout
from .methods import Method, get_method
from .recompute import check_recomputable, recompute_stages
from .schedule import LazySchedule
from .split import as_stages
from .stage import Stage, retain_none
from .ties import TieSpec, Ties

__all__ = ["Pipeline", "make_executor"]

Device = Union[torch.device, str, int]
StageSpec = Union[nn.Module, Callable[[], nn.Module]]
BuildStage = Callable[[int], Stage]
BACKENDS = ("local", "dist")
CLIP_SCOPES = ("stage", "global")


def make_executor(backend: str, build_stage: BuildStage, devices: Sequence[Device], schedule: LazySchedule,
                  timeout: Optional[float] = None, **dist_options: Any) -> Tuple[Executor, List[Optional[Stage]]]:
    """The executor of ``backend`` and the stages it runs (``None`` where another process
    runs that stage).

    ``"local"`` builds every stage and runs them in this process; ``"dist"`` hands
    ``build_stage`` to :class:`pipeline_rt.dist.DistExecutor`, which builds only its
    rank's stage (``dist_options``: its ``data_parallel`` and ``rank_layout``).
    """
    if backend == "local":
        from .local import LocalExecutor
        stages = [build_stage(k) for k in range(len(devices))]
        return LocalExecutor(stages, devices, schedule), list(stages)
    if backend == "dist":
        try:
            from .dist import DistExecutor
        except ImportError as e:
            raise RuntimeError(f"backend='dist' needs pipeline_rt.dist.DistExecutor, which failed to import: {e}") from e
        ex = DistExecutor(build_stage, devices, schedule, timeout=timeout, **dist_options)
        return ex, list(ex.stages)
    raise ValueError(f"unknown backend {backend!r}; choose one of {BACKENDS}")


class Pipeline:
    """Trains ``stages`` as a pipeline with one of the methods of :mod:`pipeline_rt.methods`.

    Args:
        stages: the stage modules, in order (or zero-argument factories; with
            ``backend="dist"`` only the rank's own stage is built). Stage ``k``'s output
            (a tensor or a tuple of tensors, ``None`` entries allowed) is stage ``k+1``'s
            input; the last stage's output and the target go to ``loss_fn``. Modules are
            moved to their device. Also: :func:`~pipeline_rt.split_model`'s stages, or a
            torch ``Pipe`` (tensors that skip stages are routed, :mod:`pipeline_rt.split`);
            stages with :mod:`pipeline_rt.skip` layers are wired.
        devices: one device per stage; stages may share a device.
        optimizer: ``optimizer(params) -> torch.optim.Optimizer``, called once per stage
            that has parameters; each is wrapped in
            :class:`~lookahead_opt.PredictiveOptimizer` with the rule of the method's
            predictor (``method.rule``).
        loss_fn: ``loss_fn(output, target) -> scalar tensor``, mean- or sum-reduced over
            rows (seen from its ``reduction``: :func:`pipeline_rt.guards.declared_reduction`;
            a plain function that says nothing is probed once, at its first call:
            :mod:`pipeline_rt.lossprobe`): micro-batches are weighted so that the
            minibatch's loss and gradient are those of the whole minibatch.
        method: a name of :data:`pipeline_rt.methods.METHODS`, or a
            :class:`~pipeline_rt.methods.Method` composed of pieces (a method of your own).
        chunks: micro-batches per minibatch (default: the method's, see :class:`Method`).
        backward: ``"predicted"`` with ``pipeoptim``: the backward reuses the forward's
            predicted weights (kept per micro-batch).
        backend: ``"local"`` (this process; CUDA streams) or ``"dist"`` (one stage per rank).
        lr_scheduler: ``lr_scheduler(optimizer) -> LRScheduler``, called once per stage with
            parameters; each stage's scheduler is stepped right after every STEP of that
            stage (one per minibatch) and saved in checkpoints.
        clip_grad_norm: clip gradients to this total 2-norm right before every STEP.
        clip_grad_scope: ``"stage"`` (each stage clips its own gradients' norm; every method)
            or ``"global"`` (the norm over all stages' gradients, as
            :func:`torch.nn.utils.clip_grad_norm_` over the whole model; the flush methods
            only, where all stages' gradients are complete at once).
        check_finite: raise ``FloatingPointError`` on a non-finite loss or gradient and
            check predicted weights (one host sync per check).
        track_error: record the prediction error at every backward with ``s > 0``
            (see :attr:`prediction_errors`); no host sync until it is read.
        strict: refuse optimizers without a closed-form prediction rule.
        timeout: ``backend="dist"``: seconds a rank waits for a peer before it fails with
            the schedule table (default ``$PIPELINE_RT_TIMEOUT`` or 300).
        ties: parameters held by several stages, one mapping per tie, stage index ->
            parameter name in that stage's module, e.g. ``[{0: "wte.weight", 3:
            "lm_head.weight"}]``; the same ``Parameter`` object in several stage modules is
            found without it. The flush methods train a tie exactly (one update per
            minibatch on the sum of its holders' gradients); the others refuse it
            (:mod:`pipeline_rt.ties`).
        autocast: ``torch.bfloat16`` or ``torch.float16``: every forward of every stage (and
            the loss) under ``torch.autocast``, the weights kept in their own dtype (float32
            master weights); float16 with loss scaling (:attr:`loss_scaling`, flush methods).
            See :mod:`pipeline_rt.precision`.
        recompute: ``True`` or a list of stage indices: those stages keep only their inputs
            and recompute their forward right before its backward, at exactly the weights the
            method's forward used (:mod:`pipeline_rt.recompute`).
        data_parallel: ``backend="dist"``: ``D`` replicas of the pipeline on ``D x N`` ranks,
            each trained on its own minibatches; every STEP applies the rows-weighted sum of
            the replicas' gradients (the global minibatch's), see :mod:`pipeline_rt.reduce`.
        rank_layout: which rank runs which (replica, stage), ``"pipeline"`` or
            ``"replica"`` (:mod:`pipeline_rt.layout`).
    """

    def __init__(self, stages: Sequence[StageSpec], devices: Sequence[Device],
                 optimizer: Callable[[Iterable[nn.Parameter]], torch.optim.Optimizer],
                 loss_fn: Callable[[Any, Any], Tensor], method: Union[str, Method] = "pipeoptim", *,
                 chunks: Optional[int] = None, backward: Optional[str] = None, backend: str = "local",
                 lr_scheduler: Optional[Callable[[torch.optim.Optimizer], Any]] = None,
                 clip_grad_norm: Optional[float] = None, clip_grad_scope: str = "stage",
                 check_finite: bool = False, track_error: bool = False, strict: bool = False,
                 timeout: Optional[float] = None, ties: Optional[Sequence[TieSpec]] = None,
                 autocast: Optional[torch.dtype] = None, recompute: Union[bool, Sequence[int]] = False,
                 data_parallel: int = 1, rank_layout: str = "pipeline") -> None:
        stages = as_stages(stages)
        self.devices: List[torch.device] = [torch.device(d) for d in devices]
        devices = self.devices
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        if len(devices) != len(stages):
            raise ValueError(f"{len(stages)} stages but {len(devices)} devices; give one device per stage")
        if not callable(optimizer):
            raise TypeError("optimizer must be a callable params -> torch optimizer, "
                            "e.g. lambda ps: torch.optim.SGD(ps, lr=0.1)")
        if lr_scheduler is not None and not callable(lr_scheduler):
            raise TypeError("lr_scheduler must be a callable optimizer -> LRScheduler, e.g. "
                            "lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1000)")
        if clip_grad_norm is not None and not (isinstance(clip_grad_norm, (int, float)) and clip_grad_norm > 0):
            raise ValueError(f"clip_grad_norm must be a positive number, got {clip_grad_norm!r}")
        if clip_grad_scope not in CLIP_SCOPES:
            raise ValueError(f"clip_grad_scope must be one of {CLIP_SCOPES}, got {clip_grad_scope!r}")
        Layout(len(stages), data_parallel, rank_layout)  # checks both
        if data_parallel != 1 and backend != "dist":
            raise ValueError(f"data_parallel={data_parallel!r} runs replicas of the pipeline on separate processes: "
                             f"use backend='dist' under torchrun (world size data_parallel x stages)")
        self.method = get_method(method, backward=backward, chunks=chunks)
        if clip_grad_scope == "global" and self.method.shape == "async-1f1b":
            raise ValueError(f"clip_grad_scope='global' needs all stages' gradients of a minibatch at once, which only "
                             f"the flush methods (sync, 1f1b-flush) have; method {self.method.name!r} updates stages "
                             f"at different times: use clip_grad_scope='stage'")
        self.num_stages = len(stages)
        self.chunks = self.method.num_chunks(self.num_stages)
        self.loss_fn = loss_fn
        declared = declared_reduction(loss_fn)
        # a loss that does not say how it reduces is probed at its first call (pipeline_rt.lossprobe)
        self._probe = None if declared is not None else ReductionProbe(loss_fn, strict=self.chunks > 1)
        self._declared = declared
        self._clip_global = float(clip_grad_norm) if clip_grad_norm is not None and clip_grad_scope == "global" \
            else None
        stage_clip = None if clip_grad_norm is None or clip_grad_scope == "global" else float(clip_grad_norm)
        self._schedule = LazySchedule(self.method.shape, self.num_stages, self.chunks)
        self._ties = Ties(ties, stages, self.method, backend, clip_grad_norm is not None)
        precision.check_autocast(autocast, self.devices, self.method.shape != "async-1f1b", backend, self.method.name)
        self.autocast = autocast
        #: float16: the loss scaling (its ``scaler``, a torch.amp.GradScaler; ``skipped`` updates); else None
        self.loss_scaling = precision.LossScaling(self.devices[-1].type) if autocast is torch.float16 else None
        self.recompute = recompute_stages(recompute, self.num_stages)

        def build_stage(k: int) -> Stage:
            spec = stages[k]
            check_device(devices[k], k)
            module = spec if isinstance(spec, nn.Module) else spec()
            if not isinstance(module, nn.Module):
                raise TypeError(f"stage {k} must be an nn.Module or a factory of one, got {type(module).__name__}")
            params = self._ties.params_of(k, module, self.devices[k])
            module.to(devices[k])
            if k in self.recompute:
                check_recomputable(module, k)
            opt = PredictiveOptimizer(optimizer(params), rule=self.method.rule, strict=strict,
                                      check_finite=check_finite) if params else None
            stage_loss = loss_fn if self._probe is None else self._probe
            stage = Stage(k, self.num_stages, module, opt, self.method, stage_loss, check_finite=check_finite,
                          track_error=track_error, lr_scheduler=lr_scheduler, clip_grad_norm=stage_clip,
                          recompute=k in self.recompute)
            stage.loss_scaling = self.loss_scaling
            return stage

        options = {"data_parallel": data_parallel, "rank_layout": rank_layout} if backend == "dist" else {}
        self.executor, self._stages = make_executor(backend, build_stage, devices, self._schedule, timeout, **options)
        self._ties.attach(self.executor)
        modules = [None if s is None else s.module for s in self._stages]
        bind_chunks(modules, self.chunks)  # batch norms built with chunks=None follow the pipeline's
        check_batch_dependent(modules, self.chunks, self.method.name)

    # ------------------------------------------------------------------ training

    def train(self, batches: Iterable[Tuple[Any, Any]], *, epochs: int = 1, max_steps: Optional[int] = None,
              callback: Optional[Callable[[Info], Optional[bool]]] = None, progress: bool = False,
              checkpoint_every: Optional[int] = None, checkpoint_dir: Optional[checkpoint.PathLike] = None,
              resume_from: Optional[checkpoint.PathLike] = None, skip_consumed: bool = True) -> List[float]:
        """Train on ``batches`` (``(input, target)`` pairs, pulled just in time), drain at the
        end, and return the per-minibatch losses as floats.

        Args:
            batches: any iterable: a list, a generator, a ``DataLoader``, an infinite
                iterator (with ``max_steps``). With ``backend="dist"`` every rank passes the
                same data; only the first stage's rank uses the inputs and only the last's
                the targets (others may pass anything, e.g. ``None``). With
                ``data_parallel`` each replica's ranks pass that replica's own minibatches
                (global minibatch ``j``: the replicas' ``j``-th, concatenated in replica
                order; the same number of minibatches on every replica).
            epochs: passes over ``batches`` back to back, without draining between them
                (the same as one run over the concatenation).
            max_steps: stop after this many minibatches (counted from the run's start).
            callback: ``callback(info)`` on the host once per minibatch, in order, when its
                loss is known (:class:`~pipeline_rt.executor.Info`: ``step``, ``epoch``,
                ``loss``); returning ``False`` stops feeding: the minibatches already fed
                finish (their losses included). With ``backend="dist"`` it runs on the last
                stage's rank (of replica 0, seeing the global loss; give it on every rank).
            progress: show a tqdm bar (on the last stage's process).
            checkpoint_every, checkpoint_dir: checkpoint after every ``checkpoint_every``
                minibatches and at the end, into folders ``checkpoint_dir/mb00000K`` (a
                ``checkpoint_dir`` alone: at the end only); see :mod:`pipeline_rt.checkpoint`.
            resume_from: a checkpoint folder (or a ``checkpoint_dir``: its latest complete
                checkpoint) to continue from: give the same ``batches``; the losses returned
                (all of them) and the final weights are identical to an uninterrupted run's.
                From the final checkpoint of a run, more data or epochs extend it.
            skip_consumed: on resume, read and drop the minibatches the checkpoint consumed
                (checked against its fingerprint); ``False``: ``batches`` is already
                positioned after them.
        """
        if max_steps is not None and (not isinstance(max_steps, int) or isinstance(max_steps, bool) or max_steps < 1):
            raise ValueError(f"max_steps must be a positive int or None, got {max_steps!r}")
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError("checkpoint_every needs checkpoint_dir (where the checkpoints go)")
        n = self.num_stages
        mine = {k: s for k, s in enumerate(self._stages) if s is not None}
        feed = None
        if 0 in mine or n - 1 in mine:
            feed = Feed(batches, self.chunks, epochs=epochs,
                        weight=self._weight,
                        fingerprint=checkpoint_dir is not None or resume_from is not None,
                        total=self.executor.global_rows)
        if self.loss_scaling is not None and (checkpoint_dir is not None or resume_from is not None):
            raise ValueError("checkpoints do not save the loss scale of autocast=torch.float16 yet; train without\n"
                             "  checkpoint_dir/resume_from, or use autocast=torch.bfloat16 (no loss scale)")
        dtype = precision.caller_autocast(self._local_devices(), self.autocast)
        for k, s in mine.items():
            s.autocast = partial(precision.autocast, self.devices[k], dtype)
        run = Run(feed, {k: StageRun(self._schedule, k) for k in mine}, max_steps=max_steps, callback=callback,
                  clip_global=self._clip_global, scaling=self.loss_scaling, agree=self.executor.agree)
        saver = None
        if checkpoint_dir is not None:
            saver = checkpoint.Checkpointer(checkpoint_dir, checkpoint_every, self._describe())
            for s in mine.values():
                s.retain = saver.retain
        run.checkpoint = saver
        for s in mine.values():
            s.start_run()
        done = 0
        try:
            if resume_from is not None:
                done = checkpoint.resume(resume_from, self.executor, run, self._describe(), skip_consumed=skip_consumed)
            else:
                for k, view in run.views.items():
                    view.known[0] = run.decide(0, view) if k == 0 else EXISTS
                if 0 in run.views and run.views[0].known[0] != EXISTS:
                    raise ValueError("train() needs at least one (input, target) minibatch; got no minibatches")
            if progress and n - 1 in mine and self.replica == 0:
                run.progress = _progress_bar(batches, epochs, max_steps, done)
            with precision.outside_autocast(self._local_devices()):  # a caller's: F enters its own
                return self.executor.train(run)
        except BaseException:
            for s in mine.values():
                s.clear()
            raise
        finally:
            if run.progress is not None:
                run.progress.close()
            for s in mine.values():
                s.retain = retain_none

    @property
    def reduction(self) -> str:
        """How ``loss_fn`` reduces over rows, ``"mean"`` or ``"sum"``: declared
        (:func:`~pipeline_rt.guards.declared_reduction`), else found by its probe at the first
        loss (:mod:`pipeline_rt.lossprobe`; ``"mean"`` until then)."""
        if self._probe is not None:
            return self._probe.reduction or "mean"
        return self._declared or "mean"

    def _weight(self, rows: int, total: int) -> float:
        """A micro-batch's share of its minibatch's loss (:func:`~pipeline_rt.guards.micro_batch_weight`);
        a :class:`~pipeline_rt.lossprobe.Share` while the loss's probe has not decided."""
        if self._probe is not None and self._probe.reduction is None:
            return Share(rows, total, self._probe)
        return micro_batch_weight(self.reduction, rows, total)

    def _describe(self) -> Dict[str, Any]:
        out = {"method": self.method.name, "shape": self.method.shape, "num_stages": self.num_stages,
               "chunks": self.chunks}
        if self.data_parallel > 1:
            out["data_parallel"] = self.data_parallel
        return out

    # ------------------------------------------------------------------ evaluation and inference

    def evaluate(self, batches: Iterable[Tuple[Any, Any]],
                 metric: Optional[Callable[[Any, Any], Any]] = None) -> Dict[str, Optional[float]]:
        """Forward only, on the live weights, modules in eval mode (their modes are restored
        after): the rows-weighted means over ``batches`` of ``loss_fn`` and of
        ``metric(output, target)`` (per minibatch a one-element tensor or a number: a Python
        ``float``, a NumPy scalar; e.g. accuracy), as
        ``{"loss": ..., "metric": ...}`` (``metric`` None without one). With
        ``backend="dist"`` every rank returns the same values. Under ``autocast=`` the
        forwards run under torch.autocast, as in training."""
        with precision.everywhere(self._local_devices(), self.autocast):
            if self._probe is not None:
                return self.executor.evaluate(batches, self._probe.as_mean, metric, "mean")
            return self.executor.evaluate(batches, self.loss_fn, metric, self.reduction)

    def forward(self, inputs: Any) -> Any:
        """Inference: the last stage's output for ``inputs`` (forward only, live weights,
        modules in eval mode and restored after, no autograd). With ``backend="dist"`` every
        rank calls it, and the output is returned on the last stage's rank (``None`` on the
        others)."""
        with eval_mode([s.module for s in self._stages if s is not None]), \
                precision.everywhere(self._local_devices(), self.autocast):
            return self.executor.infer(inputs)

    def _local_devices(self) -> List[torch.device]:
        return [d for d, s in zip(self.devices, self._stages) if s is not None]

    def close(self) -> None:
        """End this process's distributed work cleanly (``backend="dist"``: waits for every
        posted transfer and destroys the process group, :func:`pipeline_rt.p2p.shutdown`);
        call it on every rank after the last ``train``/``evaluate``. A ``backend="dist"``
        pipeline built after it joins a new process group. Nothing to do locally."""
        if self._stages.count(None):
            from .p2p import shutdown
            shutdown()

    # ------------------------------------------------------------------ inspection

    @property
    def stages(self) -> List[Optional[nn.Module]]:
        """The stage modules, weights as trained (``None`` for stages of other ranks)."""
        return [None if s is None else s.module for s in self._stages]

    @property
    def ties(self) -> List[Dict[int, str]]:
        """The tied parameters, declared or found, as ``{stage: parameter name}`` each."""
        return self._ties.found

    @property
    def replica(self) -> int:
        """This rank's replica, ``0 .. data_parallel - 1`` (0 without data parallelism)."""
        return self.executor.replica

    @property
    def data_parallel(self) -> int:
        """The number of replicas of the pipeline (1 without data parallelism)."""
        return self.executor.data_parallel

    @property
    def stage_runtimes(self) -> List[Optional[Stage]]:
        """The :class:`Stage` objects (module, predictive optimizer, counters)."""
        return list(self._stages)

    @property
    def schedule(self) -> LazySchedule:
        """The method's schedule, produced lazily as a run goes; ``print(pipe.schedule)``
        shows the stage x time table of a window of it."""
        return self._schedule

    @property
    def peak_versions(self) -> List[Optional[int]]:
        """Per stage, the most weight versions held at once (live + stashed + predicted buffers)."""
        return [None if s is None else s.peak_versions for s in self._stages]

    @property
    def peak_in_flight(self) -> List[Optional[int]]:
        """Per stage, the most micro-batches forwarded and not yet backwarded (activations held)."""
        return [None if s is None else s.peak_in_flight for s in self._stages]

    @property
    def prediction_errors(self) -> List[Optional[List[float]]]:
        """Per stage, ``||W_hat - W_B|| / ||W_B - W_F||`` at every backward with ``s > 0``, in
        order (``track_error=True``). The forward's weights ``W_hat`` (the prediction, or the
        live ``W_F`` for non-predicting methods, where the error is 1) against the weights
        ``W_B`` current at the backward. Read from the device here, once."""
        out: List[Optional[List[float]]] = []
        for s in self._stages:
            if s is None:
                out.append(None)
            else:
                out.append(torch.stack(s.errors).tolist() if s.errors else [])
        return out


def _progress_bar(batches: Any, epochs: int, max_steps: Optional[int], done: int) -> Any:
    from tqdm.auto import tqdm  # type: ignore[import-untyped]
    try:
        total: Optional[int] = len(batches) * epochs
    except TypeError:
        total = None
    if max_steps is not None:
        total = max_steps if total is None else min(total, max_steps)
    return tqdm(total=total, initial=done, unit="minibatch", dynamic_ncols=True)
