"""The local executor: every stage in this process, on CUDA streams (or CPU placeholders).

:class:`LocalExecutor` walks the schedule's tick order of every stage's actions
(:meth:`~pipeline_rt.schedule.LazySchedule.order`, produced as it goes) on the host, in a
single thread, and enqueues each action's work on the right stream; nothing waits on the
host inside the loop. It is the transport of :class:`~pipeline_rt.executor.Executor`, which
owns the loop and F/B/STEP.

Streams. Each stage has its own compute stream (stages sharing a device still overlap).
Each device has two copy streams, one for activations and one for gradients. A transfer
``SEND_F``/``SEND_B`` makes the source device's copy stream wait for the producing compute
stream (an event), copies with the copy streams of *both* devices current (a CUDA copy
between devices synchronises with the current streams of both, so this keeps it off the
compute streams: torchgpipe's trick), and records an event the consumer's compute stream
waits for at ``RECV_F``/``RECV_B``. Between stages on one device nothing is copied: the
consumer waits for the producer's event and aliases the tensor.

Lifetimes, without ``record_stream``. A tensor allocated on one stream and used on another
must not go back to the caching allocator before the other stream is done with it. The
executor keeps such tensors referenced, with an event recorded after their last use, and
drops the reference once that event has completed (``event.query()``, polled after every
action, never waited on). A received activation, a received gradient and a micro-batch's
moved inputs and target are last used by the micro-batch's backward at that stage; a sent
tensor by its copy.

Losses. The last stage adds each micro-batch's weighted loss into a device buffer of
per-minibatch losses (:class:`~pipeline_rt.executor.LossLog`), read back a block at a time.

Mixed pipelines. A CPU stage fed by a GPU stage has no stream to wait on: the host waits
for the copy's event there (the only host synchronisation in the loop, and only then).

Errors. The loop is plain single-threaded Python: an exception in any stage propagates
at once (no worker thread, no peer waiting on a message), so it cannot hang.
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .executor import Evaluation, Executor, Run, eval_mode
from .feed import as_pair, rows, to_device
from .schedule import F, Action, LazySchedule
from .stage import Stage, as_leaf, as_tuple
from .streams import COMPLETE, AnyEvent, AnyStream, CPUEvent, CPUStream, new_stream, record, use_streams, wait

__all__ = ["LocalExecutor"]

Unit = Tuple[int, int]
Device = Union[torch.device, str, int]
Tensors = Tuple[Optional[Tensor], ...]
_Key = Tuple[str, int, Unit]  # (kind "F"/"B", receiving or producing stage, unit): a parcel's key


class _Parcel:
    """Tensors in transit to a stage, usable on its compute stream once ``ready`` completes
    (with the control integers of a minibatch's last micro-batch)."""

    __slots__ = ("tensors", "ready", "control")

    def __init__(self, tensors: Tensors, ready: AnyEvent, control: Optional[Tuple[int, int]] = None) -> None:
        self.tensors, self.ready, self.control = tensors, ready, control


class _Lifetimes:
    """Tensors kept alive until an event recorded after their last use has completed."""

    def __init__(self) -> None:
        self._pending: List[Tuple[AnyEvent, List[Tensor]]] = []

    def keep(self, event: AnyEvent, tensors: Sequence[Optional[Tensor]]) -> None:
        if isinstance(event, CPUEvent):
            return
        ts = [t for t in tensors if t is not None]
        if ts:
            self._pending.append((event, ts))

    def collect(self) -> None:
        """Drop the references whose event has completed (polls; never blocks)."""
        if self._pending:
            self._pending = [(e, ts) for e, ts in self._pending if not e.query()]

    def __len__(self) -> int:
        return len(self._pending)


class LocalExecutor(Executor):
    """Runs all stages in this process, one compute stream per stage.

    Args:
        stages: the :class:`Stage` objects, stage ``k`` at index ``k``, modules already on
            their devices.
        devices: one device per stage; several stages may share one (each still gets its
            own compute stream). Non-CUDA devices use no-op placeholder streams.
        schedule: the :class:`~pipeline_rt.schedule.LazySchedule` to run.
    """

    def __init__(self, stages: Sequence[Stage], devices: Sequence[Device], schedule: LazySchedule) -> None:
        if len(stages) != len(devices):
            raise ValueError(f"{len(stages)} stages but {len(devices)} devices; give one device per stage")
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        if schedule.num_stages != len(stages):
            raise ValueError(f"the schedule has {schedule.num_stages} stages, the executor {len(stages)}")
        super().__init__(stages, schedule)
        self.devices = [torch.device(d) for d in devices]
        self.devices = [torch.device("cuda", torch.cuda.current_device()) if d.type == "cuda" and d.index is None
                        else d for d in self.devices]
        self.compute: List[AnyStream] = [new_stream(d) for d in self.devices]
        self.copy_f: Dict[torch.device, AnyStream] = {}
        self.copy_b: Dict[torch.device, AnyStream] = {}
        for d in self.devices:
            if d not in self.copy_f:
                self.copy_f[d], self.copy_b[d] = new_stream(d), new_stream(d)
        self.lifetimes = _Lifetimes()
        self._parcels: Dict[_Key, _Parcel] = {}
        self._produced_: Dict[_Key, _Parcel] = {}
        self._held: Dict[Tuple[int, Unit], List[Tensor]] = {}
        # each stage computes on its stream (made current once per action; off CUDA a no-op)
        self._contexts = [use_streams(c) if isinstance(c, CPUStream) else torch.cuda.stream(c) for c in self.compute]
        #: whether tensors must be kept alive across streams (CPU events are complete at once)
        self._keeps = any(d.type == "cuda" for d in self.devices)
        if self._keeps:
            self._after_action, self._after_backward = self._collect, self._release

    # ------------------------------------------------------------------ the loop

    def _actions(self, run: Run) -> Iterator[Action]:
        return self.schedule.order([run.views[k].actions for k in range(self.num_stages)], ready=run.ready)

    def _collect(self) -> None:
        if self.lifetimes._pending:
            self.lifetimes.collect()

    def _begin(self, run: Run) -> None:
        self._join_current()  # compute streams see the weights/inputs made on current streams

    def _end(self, run: Run, ok: bool) -> List[float]:
        self._join_back()  # also after an error: later work on the current streams stays ordered
        if not ok:
            self._parcels.clear()
            self._produced_.clear()
            self._held.clear()
        return super()._end(run, ok)

    def _total_norm(self, run: Run, k: int, norms: Tensor) -> Tensor:
        return torch.linalg.vector_norm(norms)

    def _mine(self) -> List[Stage]:
        """Every stage (the local executor runs them all)."""
        return [s for s in self.stages if s is not None]

    # ------------------------------------------------------------------ evaluation and inference

    def infer(self, inputs: Any) -> Any:
        with torch.no_grad():
            x = inputs
            for k, stage in enumerate(self._mine()):
                where = "the input" if k == 0 else f"stage {k - 1}'s output"
                xs = tuple(None if t is None else t.to(self.devices[k]) for t in as_tuple(x, where))
                x = stage.module(*xs)
        return x

    def evaluate(self, batches: Iterable[Tuple[Any, Any]], loss_fn: Callable[[Any, Any], Tensor],
                 metric: Optional[Callable[[Any, Any], Tensor]], reduction: str = "mean") -> Dict[str, Optional[float]]:
        acc = Evaluation(loss_fn, metric, reduction)
        with eval_mode([s.module for s in self._mine()]), torch.no_grad():
            for j, pair in enumerate(batches):
                x, y = as_pair(j, pair)
                out = self.infer(x)
                acc.add(out, to_device(y, self.devices[-1]), rows(x))
        return acc.result(acc.totals(torch.device("cpu")))

    # ------------------------------------------------------------------ transport

    def _input(self, k: int, unit: Unit, tensors: Tensors) -> Tensors:
        parcel = self._move_in(tensors, self.devices[k])
        self._hold(k, unit, parcel.tensors)
        wait(self.compute[k], parcel.ready)
        return parcel.tensors

    def _target(self, k: int, unit: Unit, target: Any) -> Any:
        if isinstance(target, Tensor):
            tensors, rebuild = (target,), (lambda ts: ts[0])
        elif isinstance(target, (tuple, list)) and target and all(isinstance(t, Tensor) for t in target):
            tensors, rebuild = tuple(target), type(target)
        else:
            return target
        parcel = self._move_in(tensors, self.devices[k])
        self._hold(k, unit, parcel.tensors)
        wait(self.compute[k], parcel.ready)
        return rebuild(parcel.tensors)

    def _produced(self, kind: str, k: int, unit: Unit, tensors: Tensors) -> None:
        self._produced_[(kind, k, unit)] = _Parcel(tensors, record(self.compute[k]))

    def _release(self, k: int, unit: Unit) -> None:
        """Stage ``k``'s backward of ``unit`` is enqueued: what it held lives until that is done."""
        held = self._held.pop((k, unit), None)
        if held:
            self.lifetimes.keep(record(self.compute[k]), held)

    def _send(self, a: Action, control: Optional[Tuple[int, int]]) -> None:
        """Move a produced activation (to stage k+1) or input gradient (to stage k-1)."""
        kind = "F" if a.kind == "SEND_F" else "B"
        k, u = a.stage, (a.mb, a.micro)
        dst = k + 1 if kind == "F" else k - 1
        src_dev, dst_dev = self.devices[k], self.devices[dst]
        parcel = self._produced_.pop((kind, k, u))
        if src_dev != dst_dev:
            tensors = tuple([None if t is None else t.detach() for t in parcel.tensors])
            copy = self.copy_f if kind == "F" else self.copy_b
            src_s, dst_s = copy[src_dev], copy[dst_dev]
            wait(src_s, parcel.ready)
            with use_streams(src_s, dst_s):
                moved = tuple(None if t is None else t.to(dst_dev, non_blocking=True) for t in tensors)
            # the copy is ordered before this on the destination's copy stream (or, into host
            # memory, on the source's)
            ready = record(dst_s if dst_dev.type == "cuda" else src_s)
            self.lifetimes.keep(ready, tensors)
            parcel = _Parcel(moved, ready, control)
        else:  # the same tensors (RECV_F detaches activations; input gradients have no graph)
            parcel.control = control
        self._hold(dst, u, parcel.tensors)
        self._parcels[(kind, dst, u)] = parcel

    def _recv(self, a: Action, control: bool) -> Optional[Tuple[int, int]]:
        """Order the parcel before the stage's compute; activations become leaf tensors."""
        kind = "F" if a.kind == "RECV_F" else "B"
        key = (kind, a.stage, (a.mb, a.micro))
        parcel = self._parcels[key]
        wait(self.compute[a.stage], parcel.ready)
        if kind == F:
            parcel.tensors = tuple([as_leaf(t) for t in parcel.tensors])
        return parcel.control if control else None

    def _take(self, kind: str, k: int, unit: Unit) -> Tensors:
        return self._parcels.pop((kind, k, unit)).tensors

    def _put(self, k: int, unit: Unit, tensors: Tensors) -> None:
        """A checkpoint's activation in flight to stage ``k`` (a resume)."""
        device = self.devices[k]
        moved = tuple(None if t is None else t.to(device) for t in tensors)
        self._parcels[("F", k, unit)] = _Parcel(moved, self._current_event(device))

    # ------------------------------------------------------------------ helpers

    def _hold(self, k: int, unit: Unit, tensors: Sequence[Optional[Tensor]]) -> None:
        """Keep ``tensors`` alive until ``unit``'s backward at stage ``k`` (only with CUDA)."""
        if not self._keeps:
            return
        held = self._held.get((k, unit))
        if held is None:
            held = self._held[(k, unit)] = []
        held.extend([t for t in tensors if t is not None])

    def _move_in(self, tensors: Sequence[Optional[Tensor]], device: torch.device) -> _Parcel:
        """Tensors on ``device``, copied on its activation copy stream (kept until the
        micro-batch's backward there)."""
        if all(t is None or t.device == device for t in tensors):
            return _Parcel(tuple(tensors), self._current_event(device))
        stream = self.copy_f[device]
        for t in tensors:
            if t is not None and t.device != device:
                wait(stream, self._current_event(t.device))
        with use_streams(stream):
            # into host memory: a plain blocking copy (a CPU stage has no stream to order it on)
            moved = tuple(None if t is None else t.to(device, non_blocking=device.type == "cuda") for t in tensors)
        done = record(stream)
        self.lifetimes.keep(done, [t for t in tensors if t is not None])
        return _Parcel(moved, done)

    @staticmethod
    def _current_event(device: torch.device) -> AnyEvent:
        if device.type != "cuda":
            return COMPLETE
        return record(torch.cuda.current_stream(device))

    def _streams_on(self, device: torch.device) -> List[AnyStream]:
        return [self.copy_f[device], self.copy_b[device]] + [
            c for c, d in zip(self.compute, self.devices) if d == device]

    def _join_current(self) -> None:
        """Every stage's streams wait for the work already on its device's current stream."""
        for d in set(self.devices):
            if d.type == "cuda":
                ev = self._current_event(d)
                for s in self._streams_on(d):
                    wait(s, ev)

    def _join_back(self) -> None:
        """Each device's current stream waits for all the pipeline's streams on it."""
        for d in set(self.devices):
            if d.type == "cuda":
                current = torch.cuda.current_stream(d)
                for s in self._streams_on(d):
                    wait(current, record(s))
