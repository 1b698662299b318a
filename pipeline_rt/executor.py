"""The executor core: one action loop and F/B/STEP for every executor.

An executor walks the actions of a :class:`~pipeline_rt.schedule.LazySchedule` (the local
executor: every stage's, in the schedule's tick order; a distributed rank: its own stage's)
and calls :class:`~pipeline_rt.stage.Stage` for F, B and STEP. Everything that is the same
for every executor lives here: where a micro-batch's inputs and targets come from (the
:class:`~pipeline_rt.feed.Feed`), the prediction distance (counted on the schedule), the
losses, the callback, the end of the data and the checkpoint cuts. A subclass supplies the
transport only: how the tensors of a ``SEND_*`` reach the matching ``RECV_*`` (and the few
integers of control that ride with a minibatch's last micro-batch), on which stream a stage
computes, and what happens at the start and the end of a run.

Control. Whether minibatch ``j + 1`` exists is decided by the first stage when minibatch
``j``'s last micro-batch enters it (the feed looks one minibatch ahead; a stop requested by
the callback or ``max_steps`` count there) and travels with that micro-batch's activations,
so every stage learns it before it could forward ``j + 1``. A stop requested by the callback
of minibatch ``j`` (on the last stage) travels back with minibatch ``j``'s last gradient and
takes effect at the first stage's next decision: the same minibatches are run whatever the
executor. The gradient also carries the sender's forward count, which the checkpoint needs.
"""
from __future__ import annotations

import abc
import numbers
from collections import deque
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Deque, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from .feed import DataMismatch, Feed
from .precision import LossScaling
from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, Cursor, LazySchedule, StageActions
from .stage import Stage

__all__ = ["Executor", "Run", "StageRun", "Info", "LossLog", "Evaluation", "eval_mode", "EXISTS", "ENDED", "STOPPED"]

Unit = Tuple[int, int]
Tensors = Tuple[Optional[Tensor], ...]
#: what the first stage decided about a minibatch: it exists / the data ended / the run was stopped
EXISTS, ENDED, STOPPED = 1, 0, 2
_NO_CONTEXT = nullcontext()


@dataclass
class Info:
    """What the callback gets, once per minibatch, in order.

    Attributes:
        step: the minibatch's index over the whole run (0-based, epochs included).
        epoch: the epoch it belongs to.
    """

    step: int
    epoch: int
    _loss: Tensor = field(repr=False)

    @property
    def loss(self) -> float:
        """The minibatch's loss (reading it waits for the device: one host sync)."""
        return float(self._loss)


class LossLog:
    """Per-minibatch losses, kept on the device and read back a block at a time.

    The last stage hands every micro-batch's weighted loss (a one-element tensor) to
    :meth:`add`, in order, and nothing is computed then. Once ``block`` of them are held, at
    the next minibatch's first, they are stacked, converted to float64 and copied to the host
    without waiting (pinned memory and an event on CUDA), and summed per minibatch there in
    arrival order once the copy is done: minibatch ``j``'s loss is
    :math:`(\\ldots((0 + l_{j,0}) + l_{j,1}) + \\ldots)` in float64. No host sync per minibatch.
    """

    def __init__(self, values: Sequence[float] = (), block: int = 1024) -> None:
        self.values: List[float] = list(values)
        self.block = block
        self._parts: List[Tensor] = []    # the losses not yet retired, in order ...
        self._owners: List[int] = []      # ... and the minibatch of each
        self._pending: Deque[Tuple[Any, Tensor, List[int]]] = deque()

    def add(self, j: int, loss: Tensor) -> None:
        """A micro-batch's loss of minibatch ``j`` (call on the last stage's stream)."""
        if loss.numel() != 1:
            raise ValueError(f"loss_fn must return a scalar (reduce the loss), got shape {tuple(loss.shape)}")
        owners = self._owners
        if len(owners) >= self.block and owners[-1] != j:  # a minibatch's losses are retired together
            self._retire()
            owners = self._owners
        self._parts.append(loss)
        owners.append(j)

    def current(self, j: int) -> Tensor:
        """Minibatch ``j``'s loss so far, on the device (``j``: the last minibatch added)."""
        i = len(self._owners)
        while i > 0 and self._owners[i - 1] == j:
            i -= 1
        total = torch.zeros((), dtype=torch.float64, device=self._parts[-1].device)
        for part in self._parts[i:]:
            total = total + part.reshape(())
        return total

    def _flat(self) -> Tensor:
        """The held losses as one float64 vector (on their device)."""
        return torch.stack(self._parts).reshape(-1).to(torch.float64)

    def _retire(self) -> None:
        flat = self._flat()
        owners = self._owners
        self._parts, self._owners = [], []
        if flat.device.type == "cuda":
            host = torch.empty(flat.shape, dtype=flat.dtype, pin_memory=True)
            host.copy_(flat, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending.append((event, host, owners))
            self._collect(wait=False)
        else:
            _sum_into(self.values, flat.tolist(), owners)

    def _collect(self, wait: bool) -> None:
        while self._pending and (wait or self._pending[0][0].query()):
            event, host, owners = self._pending.popleft()
            event.synchronize()
            _sum_into(self.values, host.tolist(), owners)

    def upto(self, count: int) -> List[float]:
        """The losses of minibatches ``0 .. count-1`` as floats, a copy (waits for the device)."""
        self._collect(wait=True)
        out = list(self.values)
        if len(out) < count and self._parts:
            _sum_into(out, self._flat().tolist(), self._owners)
        return out[:count]

    def finish(self, count: int) -> List[float]:
        """All ``count`` losses, the run being over: the list itself (no copy)."""
        if self._parts:
            self._retire()
        self._collect(wait=True)
        del self.values[count:]
        return self.values


def _sum_into(values: List[float], losses: List[float], owners: List[int]) -> None:
    """Add each loss into its minibatch's entry of ``values`` (appended at its first loss;
    minibatches in order), in order: Python floats add as float64 tensors do."""
    for j, loss in zip(owners, losses):
        if j < len(values):
            values[j] += loss
        else:
            values.append(0.0 + loss)


class StageRun:
    """One stage's view of a run: where it is, what it knows about the minibatches ahead.

    Attributes:
        actions: the stage's :class:`StageActions` (its cursor is where it is).
        known: minibatch -> EXISTS / ENDED / STOPPED, as decided by the first stage (only
            the few minibatches around the stage's position).
        stop_at: the earliest minibatch whose callback asked to stop, as far as this stage knows.
        peer_nf: the next stage's forward count at its STEP of minibatch ``j`` (kept for checkpoints only).
    """

    def __init__(self, schedule: LazySchedule, k: int) -> None:
        self.actions: StageActions = schedule.actions(k, self.exists)
        self.known: Dict[int, int] = {}
        self.stop_at: Optional[int] = None
        self.peer_nf: Dict[int, int] = {}

    @property
    def cursor(self) -> Cursor:
        """Where the stage is (its actions' cursor)."""
        return self.actions.cursor

    def exists(self, j: int) -> bool:
        try:
            return self.known[j] == EXISTS
        except KeyError:  # pragma: no cover - the control protocol guarantees the decision is known
            raise RuntimeError(f"stage {self.actions.k} asked about minibatch {j} before the first stage decided it") \
                from None


@dataclass
class Run:
    """One :meth:`Pipeline.train` call as the executor sees it.

    Attributes:
        feed: where this process's first-stage inputs and last-stage targets come from
            (``None`` on a rank that runs neither).
        views: this process's stages' :class:`StageRun`, by stage index.
        max_steps: minibatches after which the first stage stops feeding.
        callback: ``callback(Info) -> Optional[bool]`` on the last stage; ``False`` stops.
        progress: a tqdm-like bar updated once per minibatch on the last stage, or None.
        checkpoint: decides and writes the checkpoint cuts (:mod:`pipeline_rt.checkpoint`).
        clip_global: clip the total gradient norm over all stages (flush methods).
        scaling: float16 loss scaling (flush methods): the STEPs wait for one another, unscale,
            and all skip when any stage's gradients are not finite (:mod:`pipeline_rt.precision`).
        losses: the per-minibatch losses (on the last stage).
        ready: messages already in transit when the run starts (a resume), as
            ``(kind of the receive, receiving stage, minibatch, micro)``.
        agree: ``agree(j, decision) -> decision``: the first stages' common decision
            (data-parallel replicas, :class:`~pipeline_rt.reduce.Replicas`), or None.
    """

    feed: Optional[Feed]
    views: Dict[int, StageRun]
    max_steps: Optional[int] = None
    callback: Optional[Callable[[Info], Optional[bool]]] = None
    progress: Any = None
    checkpoint: Any = None
    clip_global: Optional[float] = None
    scaling: Optional[LossScaling] = None
    losses: LossLog = field(default_factory=LossLog)
    ready: List[Tuple[str, int, int, int]] = field(default_factory=list)
    agree: Optional[Callable[[int, int], int]] = None

    def decide(self, j: int, first: StageRun) -> int:
        """The first stage's decision about minibatch ``j`` (through ``agree(j, decision)``,
        the decision common to every data-parallel replica, when set)."""
        if first.stop_at is not None or (self.max_steps is not None and j >= self.max_steps):
            decision = STOPPED
        else:
            assert self.feed is not None
            decision = EXISTS if self.feed.has(j) else ENDED
        return decision if self.agree is None else self.agree(j, decision)


class Executor(abc.ABC):
    """Runs this process's stages of a run: the action loop and F/B/STEP.

    Attributes:
        stages: one entry per stage, the :class:`Stage` where this process runs it, else None.
        schedule: the :class:`LazySchedule` it runs.
    """

    def __init__(self, stages: Sequence[Optional[Stage]], schedule: LazySchedule) -> None:
        self.stages = list(stages)
        self.schedule = schedule
        self.num_stages, self.chunks = schedule.num_stages, schedule.chunks
        self._handlers: Dict[str, Callable[[Run, Action], None]] = {
            F: self._forward, B: self._backward, STEP: self._step,
            SEND_F: self._send_action, SEND_B: self._send_action, RECV_F: self._recv_action, RECV_B: self._recv_action}
        self._deferred: List[int] = []
        #: the context each stage computes in (its stream), entered around its F, B and STEP
        self._contexts: List[ContextManager[Any]] = [_NO_CONTEXT] * self.num_stages
        #: ``hook(run, k)`` run in order before stage ``k``'s STEP (and before any clipping or
        #: unscaling): the gradient reductions (data-parallel replicas, :mod:`pipeline_rt.reduce`;
        #: tied parameters, :mod:`pipeline_rt.ties`) append theirs
        self.before_step: List[Callable[[Run, int], None]] = []

    # ------------------------------------------------------------------ transport (subclasses)

    @abc.abstractmethod
    def _actions(self, run: Run) -> Iterator[Action]:
        """This process's actions, in the order to run them."""

    @abc.abstractmethod
    def _input(self, k: int, unit: Unit, tensors: Tensors) -> Tensors:
        """A micro-batch's inputs, usable by stage ``k``'s forward (on its device and stream)."""

    @abc.abstractmethod
    def _target(self, k: int, unit: Unit, target: Any) -> Any:
        """A micro-batch's target, usable by stage ``k``'s loss."""

    @abc.abstractmethod
    def _put(self, k: int, unit: Unit, tensors: Tensors) -> None:
        """A checkpoint's activation of ``unit`` in flight to stage ``k`` (a resume)."""

    @abc.abstractmethod
    def _produced(self, kind: str, k: int, unit: Unit, tensors: Tensors) -> None:
        """Stage ``k``'s outputs (``kind`` F) or input gradients (B) of ``unit``, for the next send."""

    @abc.abstractmethod
    def _send(self, a: Action, control: Optional[Tuple[int, int]]) -> None:
        """Run a ``SEND_*`` action (with ``control`` for the minibatch's last micro-batch)."""

    @abc.abstractmethod
    def _recv(self, a: Action, control: bool) -> Optional[Tuple[int, int]]:
        """Run a ``RECV_*`` action; returns the control integers when ``control``."""

    @abc.abstractmethod
    def _take(self, kind: str, k: int, unit: Unit) -> Tensors:
        """The received tensors stage ``k``'s F or B of ``unit`` uses."""

    #: called after every action when not None (it runs once per action: keep it cheap)
    _after_action: Optional[Callable[[], None]] = None
    #: ``(k, unit)``: stage ``k`` is done with ``unit`` (the tensors it held may go); called
    #: after every backward when not None
    _after_backward: Optional[Callable[[int, Unit], None]] = None

    #: data-parallel replicas (``backend="dist"``, :mod:`pipeline_rt.reduce`): this process's
    #: replica and their number; the first stages' common decision (:attr:`Run.agree`); the
    #: global minibatch's rows given this replica's (the last stage's loss weights)
    replica, data_parallel = 0, 1
    agree: Optional[Callable[[int, int], int]] = None
    global_rows: Optional[Callable[[int], int]] = None

    def _over_replicas(self, t: Tensor, what: str) -> Tensor:
        """``t`` summed over the data-parallel replicas (``t`` itself without them)."""
        return t

    def _begin(self, run: Run) -> None:
        """Before the first action of a run."""

    def _end(self, run: Run, ok: bool) -> List[float]:
        """After the last action (``ok``) or an error: the run's losses as floats."""
        return run.losses.finish(run.views[self.num_stages - 1].cursor.steps) if ok else []

    @abc.abstractmethod
    def _total_norm(self, run: Run, k: int, norms: Tensor) -> Tensor:
        """The 2-norm over every stage's per-tensor gradient norms (global clipping), given
        this process's, in stage order."""

    @abc.abstractmethod
    def evaluate(self, batches: Iterable[Tuple[Any, Any]], loss_fn: Callable[[Any, Any], Tensor],
                 metric: Optional[Callable[[Any, Any], Tensor]], reduction: str = "mean") -> Dict[str, Optional[float]]:
        """See :meth:`Pipeline.evaluate` (``reduction``: the loss's, for the per-row mean)."""

    @abc.abstractmethod
    def infer(self, inputs: Any) -> Any:
        """See :meth:`Pipeline.forward`."""

    # ------------------------------------------------------------------ the loop

    def train(self, run: Run) -> List[float]:
        """Run the whole run; returns the per-minibatch losses (every process the same)."""
        self._deferred = []
        self._begin(run)
        ok = False
        try:
            handlers, after = self._handlers, self._after_action
            if after is None:
                for a in self._actions(run):
                    handlers[a.kind](run, a)
            else:
                for a in self._actions(run):
                    handlers[a.kind](run, a)
                    after()
            ok = True
        finally:
            losses = self._end(run, ok)
        return losses

    # ------------------------------------------------------------------ actions

    def _forward(self, run: Run, a: Action) -> None:
        k, u = a.stage, (a.mb, a.micro)
        st, stage = run.views[k], self.stages[k]
        assert stage is not None
        s = self.schedule.distance(k, st.actions.cursor)
        if a.micro == 0:
            st.known.pop(a.mb, None)
        inputs = self._input(k, u, run.feed.take_input(*u)) if k == 0 else self._take(F, k, u)  # type: ignore[union-attr]
        last = stage.is_last
        target, weight, epoch = None, 1.0, 0
        if last:
            assert run.feed is not None
            try:
                epoch = run.feed.epoch(a.mb)  # reads the minibatch (a rank with too few fails here)
                target, weight = run.feed.take_target(*u)
            except DataMismatch as e:
                raise DataMismatch(f"stage {k}: {e}; every rank must be given the same batches (this rank's ran out "
                                   f"before the first stage's)") from None
            target = self._target(k, u, target)
        with self._contexts[k]:
            outs = stage.forward(u, inputs, s, target=target, weight=weight)
            if last:
                loss = outs[0]  # the last stage's output is its weighted loss
                assert loss is not None
                run.losses.add(a.mb, loss.detach())
                if a.micro == self.chunks - 1:  # on the stage's stream: the loss is read after its work
                    self._minibatch_done(run, st, a.mb, epoch)
        if not last:
            self._produced(F, k, u, outs)
        if k == 0 and a.micro == self.chunks - 1:
            st.known[a.mb + 1] = run.decide(a.mb + 1, st)

    def _minibatch_done(self, run: Run, st: StageRun, j: int, epoch: int) -> None:
        if run.progress is not None:
            run.progress.update(1)
        if run.callback is not None:
            if run.callback(Info(j, epoch, run.losses.current(j))) is False and st.stop_at is None:
                st.stop_at = j

    def _backward(self, run: Run, a: Action) -> None:
        k, u = a.stage, (a.mb, a.micro)
        stage = self.stages[k]
        assert stage is not None
        grads = None if stage.is_last else self._take(B, k, u)
        with self._contexts[k]:
            grads_in = stage.backward(u, grads)
        if self._after_backward is not None:
            self._after_backward(k, u)
        if k > 0:
            self._produced(B, k, u, grads_in)

    def _step(self, run: Run, a: Action) -> None:
        k = a.stage
        for hook in self.before_step:
            hook(run, k)
        if run.clip_global is not None or run.scaling is not None:
            self._global_step(run, k, run.views[k].actions.cursor.steps)
            return
        stage = self.stages[k]
        assert stage is not None
        with self._contexts[k]:
            stage.step()
        if run.checkpoint is not None:
            self._stepped(run, k, run.views[k].actions.cursor.steps)  # (the cursor counts this STEP after it)

    def _global_step(self, run: Run, k: int, j: int) -> None:
        """Unscale (float16: every stage skips if any gradient is not finite), clip by the
        norm over every stage's gradients, then step (flush methods only: each stage's STEP
        waits for the last one, the first stage's, when nothing else can run in between)."""
        self._deferred.append(k)
        mine = [i for i, s in enumerate(self.stages) if s is not None]
        if len(self._deferred) < len(mine):
            return
        ks, self._deferred = sorted(self._deferred), []
        if run.scaling is not None:
            run.scaling.unscale([self.stages[i].optimizer for i in ks],  # type: ignore[union-attr]
                                [self._contexts[i] for i in ks])
        total = None
        if run.clip_global is not None:
            norms = []
            for i in ks:
                grads = self.stages[i].grads()  # type: ignore[union-attr]
                norms.append(torch.stack(torch._foreach_norm(grads)) if grads else None)
            total = self._total_norm(run, k, _concat(norms))
        for i, stage in ((i, self.stages[i]) for i in ks):
            assert stage is not None
            grads = stage.grads()
            if grads and run.clip_global is not None:
                assert total is not None
                coef = torch.clamp(run.clip_global / (total.to(grads[0].device) + 1e-6), max=1.0)
                torch._foreach_mul_(grads, coef)
            with self._contexts[i]:
                stage.step()
            if run.checkpoint is not None:
                self._stepped(run, i, j)
        if run.scaling is not None:
            run.scaling.update()

    def _stepped(self, run: Run, k: int, j: int) -> None:
        """Stage ``k`` has run its STEP of minibatch ``j``: the checkpoint's cut (a run that
        checkpoints)."""
        with self._contexts[k]:  # the cut reads the stage's tensors in order after its work (its stream)
            run.checkpoint.after_step(self, run, k, j)
        run.views[k].peer_nf.pop(j, None)

    # ------------------------------------------------------------------ transfers and control

    def _send_action(self, run: Run, a: Action) -> None:
        if a.micro != self.chunks - 1:
            self._send(a, None)
            return
        st = run.views[a.stage]  # the control that rides with a minibatch's last micro-batch
        if a.kind == SEND_F:
            self._send(a, (st.known[a.mb + 1], 0))
        else:
            self._send(a, (int(st.stop_at is not None and st.stop_at <= a.mb), st.actions.cursor.nf))

    def _recv_action(self, run: Run, a: Action) -> None:
        if a.micro != self.chunks - 1:
            self._recv(a, False)
            return
        control = self._recv(a, True)  # the control that rides with a minibatch's last micro-batch
        if control is None:
            return
        st = run.views[a.stage]
        if a.kind == RECV_F:
            st.known[a.mb + 1] = control[0]
            stage = self.stages[a.stage] if control[0] == ENDED else None
            if stage is not None and stage.is_last and run.feed is not None and run.feed.has(a.mb + 1):
                raise DataMismatch(f"stage {a.stage}: the first stage's batches ended after {a.mb + 1} minibatches, but "
                                   f"this rank's have more; every rank must be given the same batches")
        else:
            if control[0] and (st.stop_at is None or a.mb < st.stop_at):
                st.stop_at = a.mb
            if run.checkpoint is not None:
                st.peer_nf[a.mb] = control[1]


class Evaluation:
    """Rows-weighted sums of the loss and a metric over evaluation minibatches, on the device."""

    def __init__(self, loss_fn: Callable[[Any, Any], Tensor], metric: Optional[Callable[[Any, Any], Tensor]],
                 reduction: str = "mean") -> None:
        self.loss_fn, self.metric, self.reduction = loss_fn, metric, reduction
        self.sums: Optional[Tensor] = None
        self.rows = 0

    def add(self, out: Any, target: Any, rows: int) -> None:
        """One minibatch: ``rows * loss_fn(out, target)`` (a sum-reduced loss as it is) and
        ``rows * metric(out, target)`` into the sums. The loss is a one-element tensor; the
        metric one too, or a number (a Python ``float``/``int``/``bool``, a NumPy scalar)."""
        loss = self.loss_fn(out, target)
        vals = [loss] + ([_scalar(self.metric(out, target), loss)] if self.metric is not None else [])
        for v in vals:
            if not isinstance(v, Tensor) or v.numel() != 1:
                raise ValueError("evaluate(): loss_fn must return a one-element tensor and metric a one-element "
                                 f"tensor or a number per minibatch; got "
                                 f"{type(v).__name__}{'' if not isinstance(v, Tensor) else tuple(v.shape)}")
        scale = torch.tensor([1.0 if self.reduction == "sum" else rows] + [rows] * (len(vals) - 1),
                             dtype=torch.float64, device=vals[0].device)
        row = torch.stack([v.detach().reshape(()).to(torch.float64) for v in vals]) * scale
        self.sums = row if self.sums is None else self.sums + row
        self.rows += rows

    def totals(self, device: torch.device) -> Tensor:
        """``[rows, loss sum, metric sum]`` (float64, on ``device``)."""
        out = torch.zeros(3, dtype=torch.float64, device=device)
        out[0] = self.rows
        if self.sums is not None:
            out[1:1 + self.sums.numel()] = self.sums.to(device)
        return out

    def result(self, totals: Tensor) -> Dict[str, Optional[float]]:
        rows, loss, metric = totals.tolist()
        if rows == 0:
            raise ValueError("evaluate() needs at least one (input, target) minibatch; got none")
        return {"loss": loss / rows, "metric": metric / rows if self.metric is not None else None}


def _scalar(value: Any, like: Any) -> Any:
    """A metric's value as a tensor on ``like``'s device where it is a real number (a Python
    or NumPy scalar, a 0-d NumPy array); anything else as it is (refused by the caller)."""
    if not isinstance(value, Tensor) and (isinstance(value, numbers.Real) or getattr(value, "shape", None) == ()):
        device = like.device if isinstance(like, Tensor) else None
        return torch.tensor(float(value), dtype=torch.float64, device=device)
    return value


@contextmanager
def eval_mode(modules: Sequence[torch.nn.Module]) -> Iterator[None]:
    """Every submodule in eval mode inside the block, each one's mode restored after."""
    modes = [(m, m.training) for module in modules for m in module.modules()]
    for m, _ in modes:
        m.training = False
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


def _concat(norms: List[Optional[Tensor]]) -> Tensor:
    parts = [n for n in norms if n is not None]
    if not parts:
        return torch.zeros(0, dtype=torch.float64)
    device = parts[0].device
    return torch.cat([n.to(device) for n in parts])
