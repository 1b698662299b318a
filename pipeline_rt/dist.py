"""The distributed executor: one stage per process, launched by ``torchrun``.

Rank ``k`` builds and runs stage ``k`` only: it walks its own stage's actions of the
:class:`~pipeline_rt.schedule.LazySchedule`, produced as it goes; every send and receive
is one of the schedule's ``SEND_*``/``RECV_*`` actions, so both ends of a transfer meet in
the same order by construction. Transfers go through :mod:`pipeline_rt.p2p` (gloo on CPUs,
NCCL on GPUs). It is the transport of :class:`~pipeline_rt.executor.Executor`, which owns
the loop and F/B/STEP: every message carries two more integers (the control of
:mod:`pipeline_rt.executor`: whether the next minibatch exists, a stop, a forward count),
read on the host once per minibatch per boundary.

Failures. Every wait has a deadline (``timeout`` seconds, default ``$PIPELINE_RT_TIMEOUT``
or 300). When a peer dies (its connection drops) or stalls past the deadline, the rank
raises :class:`PipelineCommError` naming its stage, the action, the peer and the schedule
table with the failing action marked; the exception ends the process with a non-zero status,
which makes ``torchrun`` stop the others.

Data. Only the first rank reads the inputs and only the last the targets of ``batches``;
the end of the data travels from the first rank with the activations, so no rank waits
for a minibatch that does not come, and the last rank checks that its own data ends there
too (:class:`~pipeline_rt.feed.DataMismatch` otherwise).

Losses. The last rank keeps the per-minibatch losses; at the end of a run they are
broadcast, so every rank returns the same floats.

Data-parallel replicas (``data_parallel=D``): the world is ``D x N`` ranks, laid out by
:class:`~pipeline_rt.layout.Layout`; each replica's stages exchange tensors in their own
process group, and :mod:`pipeline_rt.reduce` sums each stage's gradients over its replicas
before every STEP (one hook of the executor core). The first stages agree on the end of the
data, the last stages sum the losses, a callback's loss and the evaluation sums over the
replicas; the callback and the progress bar run on replica 0.
"""
from __future__ import annotations

import itertools
import os
import re
from datetime import timedelta
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.distributed as dist
from torch import Tensor

from .executor import Evaluation, Executor, Info, Run, StageRun, eval_mode
from .feed import as_pair, rows, to_device
from .layout import Layout
from .p2p import Channel, CommError, ShapeMismatch, Tensors, Transport
from .reduce import GradReducer, Replicas, check_replicable
from .schedule import B, F, RECV_B, RECV_F, SEND_B, SEND_F, Action, LazySchedule
from .stage import Stage, as_leaf, as_tuple

__all__ = ["DistExecutor", "PipelineCommError", "init_distributed", "rank_device", "DEFAULT_TIMEOUT"]

Unit = Tuple[int, int]
Device = Union[torch.device, str, int]
#: an in-transit or received message: (``"F"`` or ``"B"``, the receiving stage, unit)
Key = Tuple[str, int, Unit]
DEFAULT_TIMEOUT = 300.0
_TABLE_WIDTH = 200
_GROUPS = itertools.count()  # numbers the default process groups this process joins (init_distributed)


class PipelineCommError(RuntimeError):
    """A transfer between pipeline ranks failed or timed out.

    Attributes:
        stage: the stage that raised.
        action: the schedule action it was running (None for the final loss broadcast).
        peer: the other stage of the transfer (None for the broadcast and the replicas' collectives).
        replica: the replica of the rank that raised (0 without data parallelism).
    """

    def __init__(self, message: str, stage: int, action: Optional[Action], peer: Optional[int],
                 replica: int = 0) -> None:
        super().__init__(message)
        self.stage, self.action, self.peer, self.replica = stage, action, peer, replica


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
    # torchrun's store outlives the process groups, and a default group made again after
    # close() gets the name of the one before it: its keys there are the old group's (gloo
    # then connects to addresses that are gone). Each group this process joins gets its own
    # prefix (every rank joins and closes in the same order, so the counts agree).
    store, rank, world_size = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout)))
    store = dist.PrefixStore(f"pipeline_rt/{next(_GROUPS)}/", store)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=rank,
                            world_size=world_size, timeout=timedelta(seconds=timeout))


class DistExecutor(Executor):
    """Runs this rank's stage, exchanging tensors with its neighbours.

    Args:
        build_stage: ``build_stage(k) -> Stage``; called for this rank's ``k`` only.
        devices: one device per stage (the world size must equal their number times
            ``data_parallel``); this rank's is ``devices[stage]`` (``"cuda"`` without an
            index means ``cuda:$LOCAL_RANK``).
        schedule: the :class:`~pipeline_rt.schedule.LazySchedule` to run.
        timeout: seconds any transfer may wait (default ``$PIPELINE_RT_TIMEOUT`` or 300).
        group: the process group (default: the default group, created from torchrun's
            environment if not yet initialised); ``data_parallel > 1`` needs the default.
        data_parallel: replicas of the pipeline (:mod:`pipeline_rt.reduce`).
        rank_layout: which rank runs which (replica, stage): ``"pipeline"`` or
            ``"replica"`` (:class:`~pipeline_rt.layout.Layout`).

    Attributes:
        stages: one entry per stage: this rank's :class:`Stage`, ``None`` for the others.
        rank: this process's stage (its rank in its replica's process group).
        global_rank: its rank in the job.
        replica: its replica (0 without data parallelism).
        replicas: the :class:`~pipeline_rt.reduce.Replicas` (None without data parallelism).
    """

    def __init__(self, build_stage: Callable[[int], Stage], devices: Sequence[Device], schedule: LazySchedule, *,
                 timeout: Optional[float] = None, group: Optional[dist.ProcessGroup] = None,
                 data_parallel: int = 1, rank_layout: str = "pipeline") -> None:
        self.timeout = default_timeout() if timeout is None else float(timeout)
        layout = Layout(len(devices), data_parallel, rank_layout)
        if group is None:
            rank = int(os.environ.get("RANK", dist.get_rank() if dist.is_initialized() else 0))
            init_distributed(rank_device(devices[layout.coords(rank % layout.world)[1]]), self.timeout)
        world = dist.get_world_size(group)
        if world != layout.world:
            d = f" x {data_parallel} replicas" if data_parallel > 1 else ""
            raise ValueError(f"{len(devices)} stages{d} need {layout.world} processes (one stage of one replica per "
                             f"rank), but the world size is {world}; launch with --nproc-per-node/--nnodes to match")
        self.replicas: Optional[Replicas] = None
        self.global_rank = dist.get_rank(group)
        if data_parallel > 1:
            if group is not None:
                raise ValueError("data_parallel > 1 builds its process groups from the default group; pass group=None")
            self.replicas = Replicas(layout, self.global_rank, rank_device(devices[layout.coords(self.global_rank)[1]]),
                                     self.timeout)
            group = self.replicas.pipeline.group
            self.replica, self.data_parallel = self.replicas.replica, data_parallel
        self.layout = layout
        self.rank = dist.get_rank(group)
        self.device = rank_device(devices[self.rank])
        stage = build_stage(self.rank)
        if stage.index != self.rank:
            raise ValueError(f"rank {self.rank} was given stage {stage.index}")
        self.stage = stage
        super().__init__([stage if k == self.rank else None for k in range(world)], schedule)
        self.transport = self.replicas.pipeline if self.replicas is not None else Transport(self.device, self.timeout)
        k = self.rank
        if self.replicas is not None:
            check_replicable(stage.module, k)
            self.replicas.reducer = GradReducer(stage.params, self.replicas, self.chunks)
            self.before_step.append(self._reduce)
            if k == 0:
                self.agree = self._agree
            if k == self.num_stages - 1:
                self.global_rows = self._global_rows
        # one channel per direction and micro-batch index: the shapes of micro-batch m are
        # the same in every minibatch (an uneven split differs between micro-batches only)
        self._links: Dict[Tuple[str, int], Optional[Channel]] = {}
        self._peer = {SEND_F: (k + 1, f"activations of stage {k}"), SEND_B: (k - 1, f"input gradients of stage {k}"),
                      RECV_F: (k - 1, f"activations of stage {k - 1}"),
                      RECV_B: (k + 1, f"input gradients of stage {k + 1}")}
        #: messages received (or put back from a checkpoint) and not yet used
        self.inbox: Dict[Tuple[str, Tuple[int, int]], Tensors] = {}
        self._outbox: Dict[Tuple[str, Tuple[int, int]], Tensors] = {}

    def _channel(self, peer: int, name: str, index: int = 0) -> Optional[Channel]:
        if not 0 <= peer < self.num_stages:
            return None
        channel = Channel(self.transport, self._global(peer), name)
        channel._tag = index << 20  # its own range of tags (gloo matches messages by tag)
        return channel

    def _link(self, kind: str, micro: int) -> Channel:
        """The channel of ``kind``'s messages of micro-batch index ``micro``."""
        key = (kind, micro)
        if key not in self._links:
            peer, name = self._peer[kind]
            self._links[key] = self._channel(peer, f"{name} (micro-batch {micro})" if self.chunks > 1 else name,
                                             micro + 1)
        channel = self._links[key]
        assert channel is not None
        return channel

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group of this replica's stages (None: the default group). Held by
        the transport only, which lets it go at :func:`~pipeline_rt.p2p.shutdown`."""
        return self.transport.group

    def _global(self, peer: int) -> int:
        return dist.get_global_rank(self.group, peer) if self.group else peer

    # ------------------------------------------------------------------ data-parallel replicas

    def _reduce(self, run: Run, k: int) -> None:
        """Before STEP: the sum of the replicas' gradients (:class:`~pipeline_rt.reduce.GradReducer`)."""
        assert self.replicas is not None and self.replicas.reducer is not None
        j = run.views[k].actions.cursor.steps
        self._guard(None, None, self.replicas.reducer.reduce, replicas=True,
                    where=f"the STEP of minibatch {j} (the all-reduce of its gradients)")

    def _agree(self, j: int, decision: int) -> int:
        assert self.replicas is not None
        return self._guard(None, None, lambda: self.replicas.agree(j, decision), replicas=True,  # type: ignore[union-attr]
                           where=f"the decision whether minibatch {j} exists")

    def _global_rows(self, n: int) -> int:
        assert self.replicas is not None
        return self._guard(None, None, lambda: self.replicas.global_rows(n), replicas=True,  # type: ignore[union-attr]
                           where="the sum of a minibatch's rows")

    def _over_replicas(self, t: Tensor, what: str) -> Tensor:
        """``t`` summed over the replicas (as is without them)."""
        if self.replicas is None:
            return t
        t = t.to(self.device)
        return self._guard(None, None, lambda: self.replicas.all_reduce(t, what), replicas=True,  # type: ignore[union-attr]
                           where=what)

    def _minibatch_done(self, run: Run, st: StageRun, j: int, epoch: int) -> None:
        if self.replicas is None:
            return super()._minibatch_done(run, st, j, epoch)
        # the callback sees the global minibatch's loss and runs on replica 0 (the same
        # callback is given on every rank: the sum is a collective); its stop reaches the
        # other replicas through the first stages' agreement
        loss = None
        if run.callback is not None:
            loss = self._over_replicas(run.losses.current(j).reshape(1).clone(), f"all-reduce of minibatch {j}'s loss")
        if self.replica != 0:
            return
        if run.progress is not None:
            run.progress.update(1)
        if loss is not None and run.callback is not None:
            if run.callback(Info(j, epoch, loss.reshape(()))) is False and st.stop_at is None:
                st.stop_at = j

    # ------------------------------------------------------------------ the loop

    def _actions(self, run: Run) -> Iterator[Action]:
        return iter(run.views[self.rank].actions)

    def _begin(self, run: Run) -> None:
        if self.replicas is not None and self.replicas.reducer is not None:
            self.replicas.reducer.reset()

    def _end(self, run: Run, ok: bool) -> List[float]:
        if self.replicas is not None and self.replicas.reducer is not None:
            self.replicas.reducer.stop()
        if not ok:
            self.inbox.clear()
            self._outbox.clear()
            return []
        self._guard(None, None, self.transport.flush)
        last = self.num_stages - 1
        values = run.losses.finish(run.views[last].cursor.steps) if self.rank == last else []
        if self.rank == last and self.replicas is not None:  # each replica's losses are its share of the global
            values = self._over_replicas(torch.tensor(values, dtype=torch.float64, device=self.device),
                                         "all-reduce of the losses over the replicas").tolist()
        count = torch.tensor([len(values)], dtype=torch.int64, device=self.device)
        self._broadcast(count, last, "broadcast of the loss count from the last stage")
        losses = torch.tensor(values, dtype=torch.float64, device=self.device) if self.rank == last else \
            torch.empty(int(count.item()), dtype=torch.float64, device=self.device)
        self._broadcast(losses, last, "broadcast of the losses from the last stage")
        return losses.tolist()

    def _broadcast(self, t: Tensor, src: int, what: str) -> None:
        self._guard(None, src, lambda: self.transport.collective(
            lambda: dist.broadcast(t, self._global(src), group=self.group, async_op=True), [t], what))

    def _total_norm(self, run: Run, k: int, norms: Tensor) -> Tensor:
        """The norm over every rank's per-tensor norms, concatenated in stage order (as the
        local executor concatenates them)."""
        self._guard(None, None, self.transport.flush)  # NCCL: held sends must not wait behind the collective
        norms = norms.to(self.device, torch.float64 if norms.numel() == 0 else norms.dtype)
        sizes = [torch.zeros(1, dtype=torch.int64, device=self.device) for _ in range(self.num_stages)]
        mine = torch.tensor([norms.numel()], dtype=torch.int64, device=self.device)

        def gather(out: List[Tensor], t: Tensor, what: str) -> None:
            self._guard(None, None, lambda: self.transport.collective(
                lambda: dist.all_gather(out, t, group=self.group, async_op=True), [t, *out], what))

        gather(sizes, mine, "all-gather of the gradient-norm counts (global clipping)")
        width = max(int(s.item()) for s in sizes)
        padded = torch.zeros(width, dtype=norms.dtype, device=self.device)
        padded[:norms.numel()] = norms
        parts = [torch.empty_like(padded) for _ in range(self.num_stages)]
        gather(parts, padded, "all-gather of the gradient norms (global clipping)")
        return torch.linalg.vector_norm(torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)]))

    # ------------------------------------------------------------------ transport

    def _input(self, k: int, unit: Tuple[int, int], tensors: Tensors) -> Tensors:
        return tuple(None if t is None else t.to(self.device) for t in tensors)

    def _target(self, k: int, unit: Tuple[int, int], target: Any) -> Any:
        return to_device(target, self.device)

    def _produced(self, kind: str, k: int, unit: Tuple[int, int], tensors: Tensors) -> None:
        self._outbox[(kind, unit)] = tuple(None if t is None else t.detach() for t in tensors)

    def _send(self, a: Action, control: Optional[Tuple[int, int]]) -> None:
        kind = F if a.kind == SEND_F else B
        dst = a.stage + 1 if kind == F else a.stage - 1
        ctl = torch.tensor(control or (0, 0), dtype=torch.int64, device=self.device)
        tensors = self._outbox.pop((kind, (a.mb, a.micro))) + (ctl,)
        channel = self._link(a.kind, a.micro)
        try:
            self._guard(a, dst, lambda: channel.send(tensors, f"{a.kind} {a}"))
        except ShapeMismatch as e:
            raise ShapeMismatch(f"stage {self.rank}, {a.kind} of micro-batch {(a.mb, a.micro)}: {e}") from e

    def _recv(self, a: Action, control: bool) -> Optional[Tuple[int, int]]:
        kind, src = (F, a.stage - 1) if a.kind == RECV_F else (B, a.stage + 1)
        key = (kind, (a.mb, a.micro))
        if key in self.inbox:  # put back from a checkpoint (its control is restored with it)
            return None
        channel = self._link(a.kind, a.micro)
        msg = self._guard(a, src, lambda: channel.recv(f"{a.kind} {a}"))
        tensors, ctl = msg[:-1], msg[-1]
        self.inbox[key] = tuple(as_leaf(t) for t in tensors) if kind == F else tensors
        if not control:
            return None
        values = ctl.tolist()
        return int(values[0]), int(values[1])

    def _take(self, kind: str, k: int, unit: Tuple[int, int]) -> Tensors:
        return self.inbox.pop((kind, unit))

    def _put(self, k: int, unit: Tuple[int, int], tensors: Tensors) -> None:
        self.inbox[(F, unit)] = tuple(as_leaf(None if t is None else t.to(self.device)) for t in tensors)

    # ------------------------------------------------------------------ evaluation and inference

    def _pair_of_links(self, what: str) -> Tuple[Optional[Channel], Optional[Channel]]:
        """Channels to the previous and the next rank for a forward-only pass."""
        k = self.rank
        return self._channel(k - 1, f"{what} of stage {k - 1}"), self._channel(k + 1, f"{what} of stage {k}")

    def _chain(self, links: Tuple[Optional[Channel], Optional[Channel]], inputs: Optional[Tensors], more: bool,
               what: str) -> Tuple[bool, Any]:
        """One forward through the ranks: receive from the previous rank (unless first),
        forward, send to the next (unless last). Every message carries its header (the
        shapes may change), after a flag ``more`` (0: the end)."""
        k = self.rank
        prev, nxt = links

        def recv() -> Tensors:
            assert prev is not None
            prev.meta = None
            return self._guard(None, k - 1, lambda: prev.recv(what))

        def send(ts: Tensors) -> None:
            assert nxt is not None
            nxt.meta = None
            self._guard(None, k + 1, lambda: nxt.send(ts, what))

        if prev is not None:
            flag = recv()[0]
            assert flag is not None
            more = bool(flag.item())
        if nxt is not None:
            send((torch.tensor([int(more)], dtype=torch.int64, device=self.device),))
        if not more:
            return False, None
        if prev is not None:
            inputs = recv()
        assert inputs is not None
        out = self.stage.module(*inputs)
        if nxt is not None:
            send(tuple(None if t is None else t.detach() for t in as_tuple(out, f"stage {k}'s output")))
        return True, out

    def infer(self, inputs: Any) -> Any:
        with torch.no_grad():
            mine = tuple(None if t is None else t.to(self.device) for t in as_tuple(inputs, "the input")) \
                if self.rank == 0 else None
            _, out = self._chain(self._pair_of_links("inference activations"), mine, True, "inference activations")
            self._guard(None, None, self.transport.flush)
        return out if self.rank == self.num_stages - 1 else None

    def evaluate(self, batches: Iterable[Tuple[Any, Any]], loss_fn: Callable[[Any, Any], Tensor],
                 metric: Optional[Callable[[Any, Any], Tensor]], reduction: str = "mean") -> Dict[str, Optional[float]]:
        k, last = self.rank, self.num_stages - 1
        acc = Evaluation(loss_fn, metric, reduction)
        it = iter(batches) if k in (0, last) else None
        links = self._pair_of_links("evaluation activations")
        with eval_mode([self.stage.module]), torch.no_grad():
            j = 0
            while True:
                pair = next(it, None) if it is not None else None
                x, y = as_pair(j, pair) if pair is not None else (None, None)
                mine = tuple(None if t is None else t.to(self.device) for t in as_tuple(x, f"minibatch {j}'s input")) \
                    if k == 0 and pair is not None else None
                more, out = self._chain(links, mine, pair is not None, "evaluation activations")
                if k == last and k > 0 and more != (pair is not None):
                    raise ValueError(f"stage {k}: evaluate() got {'fewer' if more else 'more'} minibatches on this rank "
                                     f"than on the first stage's (after {j}); every rank must be given the same batches")
                if not more:
                    break
                if k == last:
                    acc.add(out, to_device(y, self.device), rows(x))
                j += 1
            self._guard(None, None, self.transport.flush)
        totals = acc.totals(self.device)
        if k == last:
            totals = self._over_replicas(totals, "all-reduce of the evaluation sums over the replicas")
        self._broadcast(totals, last, "broadcast of the evaluation results from the last stage")
        return acc.result(totals.cpu())

    # ------------------------------------------------------------------ helpers

    def _guard(self, a: Optional[Action], peer: Optional[int], fn: Callable[[], Any], *, replicas: bool = False,
               where: Optional[str] = None) -> Any:
        """Run a communication step (with stage ``peer`` of this replica, or with
        ``replicas``: this stage's other replicas); turn a failure into
        :class:`PipelineCommError`."""
        try:
            return fn()
        except CommError as e:
            if where is None:
                where = "the end-of-run exchange" if a is None else f"action {a.kind} {a} (micro-batch {(a.mb, a.micro)})"
            with_peer = "" if peer is None else f" with stage {peer} (rank {self._global(peer)})"
            if replicas:
                assert self.replicas is not None
                with_peer = f" with {self.replicas.describe()}"
            me = f"rank {self.global_rank}" + (f", replica {self.replica}" if self.replicas is not None else "")
            table = self.schedule.window(mark=a) if a is not None else self.schedule.window()
            msg = (f"pipeline stage {self.rank} ({me}) failed at {where}{with_peer} "
                   f"[timeout {self.timeout:g} s]: {e}\n"
                   f"A peer that died or stalls leaves this rank waiting; check the other ranks' logs.\n"
                   f"schedule (>>X<< = the failing action):\n{_window(table)}")
            raise PipelineCommError(msg, self.rank, a, peer, self.replica) from e


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
