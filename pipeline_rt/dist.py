"""The distributed executor: one stage per process, launched by ``torchrun``.

Rank ``k`` builds and runs stage ``k`` only. Every rank walks the same global order
(:attr:`Plan.order`) and runs its own stage's actions; every send and receive is one of
the plan's ``SEND_*``/``RECV_*`` actions, so both ends of a transfer meet in the same order
by construction. Transfers go through :mod:`pipeline_rt.p2p` (gloo on CPUs, NCCL on GPUs).

Failures. Every wait has a deadline (``timeout`` seconds, default ``$PIPELINE_RT_TIMEOUT``
or 300). When a peer dies (its connection drops) or stalls past the deadline, the rank
raises :class:`PipelineCommError` naming its stage, the action, the peer and the schedule
table with the failing action marked; the exception ends the process with a non-zero status,
which makes ``torchrun`` stop the others.

Losses. The last rank adds every micro-batch's weighted loss into its per-minibatch tensor;
at the end of :meth:`DistExecutor.run` it is broadcast, so every rank returns the same
tensor (float64).
"""
from __future__ import annotations

import os
import re
from datetime import timedelta
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .executor import Executor, Plan, add_loss
from .p2p import Channel, CommError, ShapeMismatch, Tensors, Transport
from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, Schedule
from .stage import Stage, as_leaf

__all__ = ["DistExecutor", "PipelineCommError", "init_distributed", "rank_device", "DEFAULT_TIMEOUT"]

Unit = Tuple[int, int]
Device = Union[torch.device, str, int]
#: an in-transit or received message: (``"F"`` or ``"B"``, the receiving stage, unit)
Key = Tuple[str, int, Unit]
DEFAULT_TIMEOUT = 300.0
_TABLE_WIDTH = 200


class PipelineCommError(RuntimeError):
    """A transfer between pipeline ranks failed or timed out.

    Attributes:
        stage: the stage (= rank) that raised.
        action: the schedule action it was running (None for the final loss broadcast).
        peer: the other stage of the transfer (None for the broadcast).
    """

    def __init__(self, message: str, stage: int, action: Optional[Action], peer: Optional[int]) -> None:
        super().__init__(message)
        self.stage, self.action, self.peer = stage, action, peer


def default_timeout() -> float:
    """``$PIPELINE_RT_TIMEOUT`` seconds, else :data:`DEFAULT_TIMEOUT`."""
    return float(os.environ.get("PIPELINE_RT_TIMEOUT", DEFAULT_TIMEOUT))


def rank_device(device: Device) -> torch.device:
    """``device`` for this process: a CUDA device without an index becomes ``cuda:$LOCAL_RANK``."""
    d = torch.device(device)
    if d.type == "cuda" and d.index is None:
        d = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return d


def init_distributed(device: torch.device, timeout: float) -> None:
    """Join the default process group from torchrun's environment, unless one exists.

    NCCL when ``device`` is a CUDA device, gloo otherwise; ``timeout`` also bounds the
    process group's own collectives.
    """
    if dist.is_initialized():
        return
    missing = [v for v in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        raise RuntimeError(
            f"backend='dist' runs one stage per process: launch with `torchrun --nproc-per-node N script.py` "
            f"(or initialise torch.distributed yourself); missing environment variables {missing}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout))


class DistExecutor(Executor):
    """Runs this rank's stage of every plan, exchanging tensors with its neighbours.

    Args:
        build_stage: ``build_stage(k) -> Stage``; called for this rank's ``k`` only.
        devices: one device per stage (the world size must equal their number); this
            rank's is ``devices[rank]`` (``"cuda"`` without an index means
            ``cuda:$LOCAL_RANK``).
        timeout: seconds any transfer may wait (default ``$PIPELINE_RT_TIMEOUT`` or 300).
        group: the process group (default: the default group, created from torchrun's
            environment if not yet initialised).

    Attributes:
        stages: one entry per stage: this rank's :class:`Stage`, ``None`` for the others.
        rank: this process's rank (= its stage).
    """

    def __init__(self, build_stage: Callable[[int], Stage], devices: Sequence[Device], *,
                 timeout: Optional[float] = None, group: Optional[dist.ProcessGroup] = None) -> None:
        self.timeout = default_timeout() if timeout is None else float(timeout)
        if group is None:
            rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
            init_distributed(rank_device(devices[rank % len(devices)]), self.timeout)
        self.group = group
        self.rank, world = dist.get_rank(group), dist.get_world_size(group)
        if world != len(devices):
            raise ValueError(f"{len(devices)} stages need {len(devices)} processes (one stage per rank), "
                             f"but the world size is {world}; launch with --nproc-per-node/--nnodes to match")
        self.num_stages = world
        self.device = rank_device(devices[self.rank])
        stage = build_stage(self.rank)
        if stage.index != self.rank:
            raise ValueError(f"rank {self.rank} was given stage {stage.index}")
        self.stage = stage
        self.stages: List[Optional[Stage]] = [stage if k == self.rank else None for k in range(world)]
        self.transport = Transport(self.device, self.timeout, group)
        k = self.rank
        self._to = {SEND_F: self._channel(k + 1, f"activations of stage {k}"),
                    SEND_B: self._channel(k - 1, f"input gradients of stage {k}")}
        self._from = {RECV_F: self._channel(k - 1, f"activations of stage {k - 1}"),
                      RECV_B: self._channel(k + 1, f"input gradients of stage {k + 1}")}
        #: messages received (or carried over a checkpoint) and not yet used
        self.inbox: Dict[Key, Tensors] = {}
        self._outbox: Dict[Key, Tensors] = {}
        self._losses: Optional[Tensor] = None

    def _channel(self, peer: int, name: str) -> Optional[Channel]:
        if not 0 <= peer < self.num_stages:
            return None
        return Channel(self.transport, dist.get_global_rank(self.group, peer) if self.group else peer, name)

    # ------------------------------------------------------------------ the loop

    def run(self, plan: Plan, start: int = 0, stop: Optional[int] = None) -> Tensor:
        """Run this rank's actions in ``plan.order[start:stop]``; see :meth:`Executor.run`.

        A range that ends mid-run also receives the messages sent inside it for actions
        after it (they stay in :attr:`inbox`), so the next range or a checkpoint has them.
        Returns, on every rank, the float64 losses added by the range's actions.
        """
        sched = plan.schedule
        if sched.num_stages != self.num_stages:
            raise ValueError(f"plan has {sched.num_stages} stages but the world size is {self.num_stages}")
        if start == 0:
            self.inbox.clear()
            self._outbox.clear()
        self._losses = None
        stop = len(plan.order) if stop is None else stop
        handlers = {F: self._forward, B: self._backward, STEP: self._step, SEND_F: self._send,
                    SEND_B: self._send, RECV_F: self._recv, RECV_B: self._recv}
        for a in plan.order[start:stop]:
            if a.stage == self.rank:
                handlers[a.kind](plan, a)
        for a in carried(plan, stop, self.rank):
            self._recv(plan, a)
        self._guard(sched, None, None, self.transport.flush)
        return self._gather_losses(sched)

    # ------------------------------------------------------------------ checkpoints

    def transit(self) -> Dict[Key, Tensors]:
        """The messages received and not yet used at the end of the last range (those sent
        before its end for actions after it included); see :mod:`pipeline_rt.checkpoint`."""
        if self._outbox:
            raise RuntimeError(f"stage {self.rank}: {sorted(self._outbox)} produced but not sent at the end of the range")
        return dict(self.inbox)

    def resume(self, plan: Plan, transit: Dict[Key, Tensors]) -> None:
        """Continue ``plan`` from a checkpoint: ``transit`` becomes the inbox."""
        self._outbox.clear()
        self.inbox = {key: tuple(as_leaf(t) for t in ts) if key[0] == F else ts for key, ts in transit.items()}

    # ------------------------------------------------------------------ actions

    def _forward(self, plan: Plan, a: Action) -> None:
        u, micro, stage = a.unit, plan.micro[a.unit], self.stage
        if stage.index == 0:
            inputs = tuple(t.to(self.device) for t in micro.inputs)
        else:
            inputs = self.inbox.pop((F, stage.index, u))
        target = _to(micro.target, self.device) if stage.is_last else None
        outs = stage.forward(u, inputs, plan.s(stage.index, u), target=target, weight=micro.weight)
        if stage.is_last:
            self._losses = add_loss(self._losses, outs[0].detach(), a.mb, plan.schedule.num_minibatches)
        else:
            self._outbox[(F, stage.index + 1, u)] = tuple(t.detach() for t in outs)

    def _backward(self, plan: Plan, a: Action) -> None:
        k = self.rank
        grads = None if self.stage.is_last else self.inbox.pop((B, k, a.unit))
        grads_in = self.stage.backward(a.unit, grads)
        if k > 0:
            self._outbox[(B, k - 1, a.unit)] = grads_in

    def _step(self, plan: Plan, a: Action) -> None:
        self.stage.step()

    def _send(self, plan: Plan, a: Action) -> None:
        kind, dst = (F, a.stage + 1) if a.kind == SEND_F else (B, a.stage - 1)
        tensors = self._outbox.pop((kind, dst, a.unit))
        channel = self._to[a.kind]
        try:
            self._guard(plan.schedule, a, dst, lambda: channel.send(tensors, f"{a.kind} {a}"))
        except ShapeMismatch as e:
            raise ShapeMismatch(f"stage {self.rank}, {a.kind} of micro-batch {a.unit}: {e}") from e

    def _recv(self, plan: Plan, a: Action) -> None:
        kind, src = (F, a.stage - 1) if a.kind == RECV_F else (B, a.stage + 1)
        key = (kind, a.stage, a.unit)
        if key in self.inbox:  # carried over from the previous range or a checkpoint
            return
        msg = self._guard(plan.schedule, a, src, lambda: self._from[a.kind].recv(f"{a.kind} {a}"))
        self.inbox[key] = tuple(as_leaf(t) for t in msg) if kind == F else msg

    # ------------------------------------------------------------------ helpers

    def _guard(self, sched: Schedule, a: Optional[Action], peer: Optional[int], fn: Callable[[], Any]) -> Any:
        """Run a communication step; turn a failure into :class:`PipelineCommError`."""
        try:
            return fn()
        except CommError as e:
            where = "the end-of-run exchange" if a is None else f"action {a.kind} {a} (micro-batch {a.unit})"
            with_peer = "" if peer is None else f" with stage {peer} (rank {peer})"
            msg = (f"pipeline stage {self.rank} (rank {self.rank}) failed at {where}{with_peer} "
                   f"[timeout {self.timeout:g} s]: {e}\n"
                   f"A peer that died or stalls leaves this rank waiting; check the other ranks' logs.\n"
                   f"schedule (>>X<< = the failing action):\n{_window(sched.table(mark=a))}")
            raise PipelineCommError(msg, self.rank, a, peer) from e

    def _gather_losses(self, sched: Schedule) -> Tensor:
        losses = torch.zeros(sched.num_minibatches, dtype=torch.float64, device=self.device)
        if self._losses is not None:
            losses.copy_(self._losses)
        last = dist.get_global_rank(self.group, self.num_stages - 1) if self.group else self.num_stages - 1

        def broadcast() -> None:
            work = dist.broadcast(losses, last, group=self.group, async_op=True)
            self.transport.wait(work, "broadcast of the losses from the last stage")

        self._guard(sched, None, self.num_stages - 1, broadcast)
        return losses


def carried(plan: Plan, stop: int, stage: int) -> List[Action]:
    """``stage``'s receives after ``stop`` whose message is sent before ``stop``, in order:
    the messages in transit across a split of the run at ``stop``."""
    index = {a: i for i, a in enumerate(plan.order)}
    out = []
    for a in plan.order[stop:]:
        if a.stage == stage and a.kind in (RECV_F, RECV_B):
            send = Action(SEND_F, stage - 1, *a.unit) if a.kind == RECV_F else Action(SEND_B, stage + 1, *a.unit)
            if index[send] < stop:
                out.append(a)
    return out


def _to(x: Any, device: torch.device) -> Any:
    """A target (a tensor, a tuple/list of them, or anything else as is) on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)) and all(isinstance(t, Tensor) for t in x):
        return type(x)(t.to(device) for t in x)
    return x


def _window(table: str, width: int = _TABLE_WIDTH) -> str:
    """The table cut to ``width`` columns around the marked action (long runs are wide)."""
    lines = table.splitlines()
    if max(len(line) for line in lines) <= width:
        return table
    heads = [re.match(r"stage \d+: ", line) for line in lines]
    marks = [line.find(">>") - h.end() for line, h in zip(lines, heads) if h and ">>" in line]
    lo = max(0, (marks[0] if marks else 0) - width // 2)
    return "\n".join(line if h is None else line[:h.end()] + "..." + line[h.end() + lo:h.end() + lo + width] + "..."
                     for line, h in zip(lines, heads))
