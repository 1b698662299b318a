"""The local executor: every stage in this process, on CUDA streams (or CPU placeholders).

:class:`LocalExecutor` walks :attr:`Plan.order` (one global, dependency-respecting order
of every stage's actions) on the host, in a single thread, and enqueues each action's
work on the right stream; nothing waits on the host inside the loop.

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

Losses. The last stage adds each micro-batch's weighted loss into a device tensor of
per-minibatch losses, returned at the end; reading it is the caller's single host sync.

Mixed pipelines. A CPU stage fed by a GPU stage has no stream to wait on: the host waits
for the copy's event there (the only host synchronisation in the loop, and only then).

Errors. The loop is plain single-threaded Python: an exception in any stage propagates
at once (no worker thread, no peer waiting on a message), so it cannot hang.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .executor import Executor, Plan, add_loss
from .schedule import B, F, RECV_F, SEND_B, SEND_F, STEP, Action, Schedule
from .stage import Stage, as_leaf
from .streams import AnyEvent, AnyStream, CPUEvent, new_stream, record, use_streams, wait

__all__ = ["LocalExecutor"]

Unit = Tuple[int, int]
Device = Union[torch.device, str, int]
Tensors = Tuple[Optional[Tensor], ...]
_Key = Tuple[str, int, Unit]  # (kind "F"/"B", stage, unit): a parcel's key


@dataclass
class _Parcel:
    """Tensors in transit to a stage, usable on its compute stream once ``ready`` completes."""

    tensors: Tensors
    ready: AnyEvent


@dataclass
class _RunState:
    """What one plan's run keeps between actions (and between ``run`` calls over it)."""

    plan: Plan
    losses: Optional[Tensor] = None
    parcels: Dict[Tuple[str, int, Unit], _Parcel] = field(default_factory=dict)
    produced: Dict[Tuple[str, int, Unit], _Parcel] = field(default_factory=dict)
    held: Dict[Tuple[int, Unit], List[Tensor]] = field(default_factory=dict)


#: one action of a compiled program: (handler, action, what the handler looks up)
_Entry = Tuple[Callable[[_RunState, Action, Any], None], Action, Any]


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
    """Runs all stages of a plan in this process, one compute stream per stage.

    Args:
        stages: the :class:`Stage` objects, stage ``k`` at index ``k``, modules already on
            their devices.
        devices: one device per stage; several stages may share one (each still gets its
            own compute stream). Non-CUDA devices use no-op placeholder streams.
    """

    def __init__(self, stages: Sequence[Stage], devices: Sequence[Device]) -> None:
        if len(stages) != len(devices):
            raise ValueError(f"{len(stages)} stages but {len(devices)} devices; give one device per stage")
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        self.stages = list(stages)
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
        self._state: Optional[_RunState] = None
        self._compiled: Optional[Tuple[Schedule, List[_Entry]]] = None

    # ------------------------------------------------------------------ the loop

    def run(self, plan: Plan, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Run ``plan.order[start:stop]``; see :meth:`Executor.run`.

        A run split over several calls (same plan, consecutive ranges) keeps its in-flight
        tensors between them; ``start == 0`` starts afresh. Returns the losses added by the
        actions in the range, on the last stage's device.
        """
        if plan.schedule.num_stages != len(self.stages):
            raise ValueError(f"plan has {plan.schedule.num_stages} stages, executor {len(self.stages)}")
        if start == 0 or self._state is None or self._state.plan is not plan:
            self._state = _RunState(plan)
        st = self._state
        st.losses = None
        program = self._program(plan)
        collect = self.lifetimes.collect
        self._join_current()  # compute streams see the weights/inputs made on current streams
        try:
            for handler, a, arg in program[start:stop]:
                handler(st, a, arg)
                collect()
        finally:
            self._join_back()  # also after an error: later work on the current streams stays ordered
        if st.losses is None:
            return torch.zeros(plan.schedule.num_minibatches, device=self.devices[-1])
        return st.losses

    def _program(self, plan: Plan) -> List[_Entry]:
        """``plan.order`` as (handler, action, what the handler looks up: stage, unit, dict keys,
        ``s``), built once per schedule (kept for the last one) and shared by its plans."""
        if self._compiled is not None and self._compiled[0] is plan.schedule:
            return self._compiled[1]
        program: List[_Entry] = []
        for a in plan.order:
            k, u = a.stage, a.unit
            if a.kind == F:
                program.append((self._forward, a, (k, u, ("F", k, u), (k, u), plan.s(k, u))))
            elif a.kind == B:
                program.append((self._backward, a, (k, u, ("B", k, u), (k, u))))
            elif a.kind == STEP:
                program.append((self._step, a, k))
            elif a.kind in (SEND_F, SEND_B):
                kind = "F" if a.kind == SEND_F else "B"
                dst = k + 1 if kind == "F" else k - 1
                program.append((self._send, a, (kind, k, dst, (kind, k, u), (kind, dst, u), (dst, u))))
            else:
                kind = "F" if a.kind == RECV_F else "B"
                program.append((self._receive, a, (kind, (kind, k, u))))
        self._compiled = (plan.schedule, program)
        return program

    # ------------------------------------------------------------------ checkpoints

    def transit(self) -> Dict[Tuple[str, int, Unit], Tensors]:
        """The tensors between stages at the end of the last range (in transit, or received
        and not yet used), keyed ``(kind, receiving stage, unit)``; waits for their copies.
        See :mod:`pipeline_rt.checkpoint`."""
        st = self._state
        if st is None:
            return {}
        if st.produced:
            raise RuntimeError(f"{sorted(st.produced)} produced but not sent at the end of the range")
        for parcel in st.parcels.values():
            parcel.ready.synchronize()
        return {key: parcel.tensors for key, parcel in st.parcels.items()}

    def resume(self, plan: Plan, transit: Dict[Tuple[str, int, Unit], Tensors]) -> None:
        """Continue ``plan`` from a checkpoint with ``run(plan, start=position)``: the
        tensors of :meth:`transit` are put back, on the receiving stages' devices."""
        self._state = st = _RunState(plan)
        for key, tensors in transit.items():
            device = self.devices[key[1]]
            moved = tuple(None if t is None else t.to(device) for t in tensors)
            if key[0] == "F":
                moved = tuple(as_leaf(t) for t in moved)
            st.parcels[key] = _Parcel(moved, self._current_event(device))

    # ------------------------------------------------------------------ actions

    def _forward(self, st: _RunState, a: Action, arg: Tuple[int, Unit, _Key, Tuple[int, Unit], int]) -> None:
        k, u, key, held_key, s = arg
        stage, stream, micro = self.stages[k], self.compute[k], st.plan.micro[u]
        held = st.held.get(held_key)
        if held is None:
            held = st.held[held_key] = []
        if k == 0:
            parcel = self._move_in(micro.inputs, self.devices[0])
            held.extend(t for t in parcel.tensors if t is not None)
            wait(stream, parcel.ready)
            inputs = parcel.tensors
        else:
            inputs = st.parcels.pop(key).tensors
        last = stage.is_last
        target = self._move_target(micro.target, self.devices[k], held, stream) if last else None
        with use_streams(stream):
            outs = stage.forward(u, inputs, s, target=target, weight=micro.weight)
            if last:
                st.losses = add_loss(st.losses, outs[0].detach(), a.mb, st.plan.schedule.num_minibatches)
                return
        st.produced[key] = _Parcel(outs, record(stream))

    def _backward(self, st: _RunState, a: Action, arg: Tuple[int, Unit, _Key, Tuple[int, Unit]]) -> None:
        k, u, key, held_key = arg
        stream, stage = self.compute[k], self.stages[k]
        grads = None if stage.is_last else st.parcels.pop(key).tensors
        with use_streams(stream):
            grads_in = stage.backward(u, grads)
        done = record(stream)
        self.lifetimes.keep(done, st.held.pop(held_key, ()))
        if k > 0:
            st.produced[key] = _Parcel(grads_in, done)

    def _step(self, st: _RunState, a: Action, k: int) -> None:
        with use_streams(self.compute[k]):
            self.stages[k].step()

    def _send(self, st: _RunState, a: Action, arg: Tuple[str, int, int, _Key, _Key, Tuple[int, Unit]]) -> None:
        """Move a produced activation (to stage k+1) or input gradient (to stage k-1)."""
        kind, k, dst, src_key, dst_key, held_key = arg
        src_dev, dst_dev = self.devices[k], self.devices[dst]
        parcel = st.produced.pop(src_key)
        tensors = tuple([None if t is None else t.detach() for t in parcel.tensors])
        if src_dev != dst_dev:
            copy = self.copy_f if kind == "F" else self.copy_b
            src_s, dst_s = copy[src_dev], copy[dst_dev]
            wait(src_s, parcel.ready)
            with use_streams(src_s, dst_s):
                moved = tuple(None if t is None else t.to(dst_dev, non_blocking=True) for t in tensors)
            # the copy is ordered before this on the destination's copy stream (or, into host
            # memory, on the source's)
            ready = record(dst_s if dst_dev.type == "cuda" else src_s)
            self.lifetimes.keep(ready, tensors)
            parcel = _Parcel(moved, ready)
        else:
            parcel = _Parcel(tensors, parcel.ready)
        held = st.held.get(held_key)
        if held is None:
            held = st.held[held_key] = []
        held.extend([t for t in parcel.tensors if t is not None])
        st.parcels[dst_key] = parcel

    def _receive(self, st: _RunState, a: Action, arg: Tuple[str, _Key]) -> None:
        """Order the parcel before the stage's compute; activations become leaf tensors."""
        kind, key = arg
        parcel = st.parcels[key]
        wait(self.compute[a.stage], parcel.ready)
        if kind == "F":
            st.parcels[key] = _Parcel(tuple([as_leaf(t) for t in parcel.tensors]), parcel.ready)

    # ------------------------------------------------------------------ helpers

    def _move_in(self, tensors: Sequence[Tensor], device: torch.device) -> _Parcel:
        """The micro-batch's tensors on ``device``, copied on its activation copy stream."""
        if all(t.device == device for t in tensors):
            return _Parcel(tuple(tensors), self._current_event(device))
        stream = self.copy_f[device]
        for t in tensors:
            if t.device != device:
                wait(stream, self._current_event(t.device))
        with use_streams(stream):
            # into host memory: a plain blocking copy (a CPU stage has no stream to order it on)
            moved = tuple(t.to(device, non_blocking=device.type == "cuda") for t in tensors)
        return _Parcel(moved, record(stream))

    def _move_target(self, target: Any, device: torch.device, held: List[Tensor], stream: AnyStream) -> Any:
        """The target (a tensor, a tuple/list of them, or anything else as is) on ``device``."""
        if isinstance(target, Tensor):
            tensors, rebuild = (target,), (lambda ts: ts[0])
        elif isinstance(target, (tuple, list)) and target and all(isinstance(t, Tensor) for t in target):
            tensors, rebuild = tuple(target), type(target)
        else:
            return target
        parcel = self._move_in(tensors, device)
        held.extend(parcel.tensors)
        wait(stream, parcel.ready)
        return rebuild(parcel.tensors)

    @staticmethod
    def _current_event(device: torch.device) -> AnyEvent:
        if device.type != "cuda":
            return CPUEvent()
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

