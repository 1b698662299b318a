"""Data-parallel replicas of a stage: the gradient all-reduce, beside the P2P transport.

With ``Pipeline(..., backend="dist", data_parallel=D)`` every stage runs in ``D`` replicas
(:mod:`pipeline_rt.layout` says which rank is which), each on its own minibatches. The
global minibatch ``j`` is the concatenation of the replicas' minibatches ``j``, of
:math:`n_r` rows each, :math:`n = \\sum_r n_r`. Exactness comes from two pieces:

* **Rows weighting in the loss.** A replica's last stage weighs micro-batch ``m`` of its
  minibatch by ``n_m / n`` (a mean-reduced loss; ``1`` for a sum), with ``n`` the *global*
  rows (one all-reduce of :math:`n_r` per minibatch, :meth:`Replicas.global_rows`). So each
  replica's gradient is its share of the global minibatch's gradient, exactly also when the
  replicas' minibatches differ in size, and the replicas' losses add up to the global loss.
* **A sum of the replicas' gradients before every STEP** (:class:`GradReducer`): then every
  replica applies :math:`\\sum_r \\nabla L_r = \\nabla L` of the global minibatch, the update
  of a single pipeline on the concatenation (up to the order of floating-point sums). The
  replicas' weights, optimizer states, predictions and stashes stay bit-identical (every
  rank receives the same sums).

Overlap. :class:`GradReducer` groups the stage's parameters into buckets (reverse order of
registration, as DDP does: the last layers' gradients are ready first, ``bucket_bytes`` each)
and counts, with ``register_post_accumulate_grad_hook``, the backward passes that reached each
parameter since the last STEP. When every parameter of a bucket has had its last micro-batch
of the minibatch (``micro_batches`` backwards), the bucket is copied into a flat buffer and
``all_reduce(async_op=True)`` is posted, while the backward goes on; buckets are posted in
index order on every replica (as DDP's reducer does), so the collectives match whatever the
timing. The STEP posts what is left (e.g. a parameter that got no gradient on this replica)
and waits for all, with the deadline. A parameter without a gradient on any replica keeps
``grad = None`` (each bucket carries one presence count per parameter).

Why not DDP's reducer: the asynchronous schedules forward later minibatches between a
minibatch's forward and its backward, and run forwards on predicted or stashed weights
swapped into the parameters; DDP ties one reduction to each forward (``prepare_for_backward``)
and checks for parameters modified in between. The collective and its bucketing are
torch.distributed's; only the trigger is ours.

The other collectives (all among the replicas of one stage, :class:`Replicas`): the end of the
data agreed by the first stages, the global rows at the last stages, the losses, evaluation
sums and a callback's loss summed at the last stages. Every one has the transport's deadline.
"""
from __future__ import annotations

import time
from datetime import timedelta
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .executor import ENDED, EXISTS, STOPPED
from .feed import DataMismatch
from .guards import batch_dependent
from .layout import Layout
from .p2p import CommError, Transport

__all__ = ["Replicas", "GradReducer", "BUCKET_BYTES", "check_replicable"]

#: bytes of gradients per bucket (DDP's default ``bucket_cap_mb=25``)
BUCKET_BYTES = 25 * 1024 * 1024
_WORDS = {EXISTS: "has", ENDED: "has no", STOPPED: "stopped before"}


def check_replicable(module: nn.Module, stage: int) -> None:
    """Refuse a stage whose forward depends on the other rows of the batch or keeps batch
    statistics (the batch-norm family, :class:`~pipeline_rt.batchnorm.DeferredBatchNorm`
    included: :func:`pipeline_rt.guards.batch_dependent`): under replicas each would see one
    replica's rows only, and the replicas' running statistics would drift apart."""
    found = [(path, m) for path, m in batch_dependent(module)]
    found += [(path, m) for path, m in module.named_modules() if isinstance(m, _BatchNorm)
              and m.track_running_stats and all(m is not f for _, f in found)]
    if found:
        names = ", ".join(f"{path or '(the stage)'} ({type(m).__name__})" for path, m in found)
        raise ValueError(
            f"stage {stage}: data_parallel > 1 with modules that depend on the other rows of the batch or keep\n"
            f"batch statistics: {names}.\n"
            f"Each replica would normalise over its own rows only and the replicas' running statistics would\n"
            f"differ, so the result would not be the global minibatch's. Use a per-row normalisation\n"
            f"(nn.GroupNorm, nn.LayerNorm), or train without data_parallel.")


class Replicas:
    """This rank's place among the replicas, and the collectives among its stage's replicas.

    Every rank of the job must build it at the same point (it creates the process groups:
    one per replica for the P2P, one per stage for the all-reduce).

    Args:
        layout: the :class:`~pipeline_rt.layout.Layout`.
        rank: this process's rank in the job.
        device: where the collectives' tensors live.
        timeout: seconds any collective may wait (:class:`~pipeline_rt.p2p.CommError` after).

    Attributes:
        replica, stage: this rank's coordinates.
        pipeline: the :class:`~pipeline_rt.p2p.Transport` over this replica's stages (its
            process group: their ranks in stage order), for the executor's P2P.
        transport: the :class:`~pipeline_rt.p2p.Transport` over this stage's replicas (in
            replica order), for the collectives here.
        peers: their ranks.

    The process groups are held by the transports only: :func:`~pipeline_rt.p2p.shutdown`
    closes them, which lets the groups go, so that their gloo threads are joined.
    """

    def __init__(self, layout: Layout, rank: int, device: torch.device, timeout: float) -> None:
        self.layout = layout
        self.replica, self.stage = layout.coords(rank)
        self.device = device
        td = timedelta(seconds=timeout)
        # every rank creates every group, in the same order (torch.distributed.new_group's rule)
        pipelines = [dist.new_group(layout.pipeline_ranks(r), timeout=td) for r in range(layout.data_parallel)]
        stages = [dist.new_group(layout.replica_ranks(k), timeout=td) for k in range(layout.num_stages)]
        self.pipeline = Transport(device, timeout, pipelines[self.replica])
        self.transport = Transport(device, timeout, stages[self.stage])
        self.peers = layout.replica_ranks(self.stage)
        self.reducer: Optional[GradReducer] = None

    @property
    def group(self) -> Optional[dist.ProcessGroup]:
        """The process group of this stage's replicas."""
        return self.transport.group

    @property
    def size(self) -> int:
        """D, the number of replicas."""
        return self.layout.data_parallel

    def describe(self) -> str:
        """``"the replicas of stage k (ranks a, b)"``, for errors."""
        return f"the replicas of stage {self.stage} (ranks {', '.join(map(str, self.peers))})"

    # ------------------------------------------------------------------ collectives

    def all_reduce(self, t: Tensor, what: str) -> Tensor:
        """Sum ``t`` over the replicas, in place (deadline: the timeout); returns it."""
        self.transport.collective(lambda: dist.all_reduce(t, group=self.group, async_op=True), [t], what)
        return t

    def gather(self, values: Sequence[int], what: str) -> List[List[int]]:
        """Every replica's ``values`` (int64, the same count everywhere), in replica order."""
        mine = torch.tensor(list(values), dtype=torch.int64, device=self.device)
        out = [torch.empty_like(mine) for _ in range(self.size)]
        self.transport.collective(lambda: dist.all_gather(out, mine, group=self.group, async_op=True),
                                  [mine, *out], what)
        return [o.tolist() for o in out]

    def agree(self, j: int, decision: int) -> int:
        """The first stages' common decision about minibatch ``j`` (EXISTS / ENDED /
        STOPPED): a stop on any replica (its callback, ``max_steps``) stops all; data that
        ends on some replicas and not on others is a :class:`~pipeline_rt.feed.DataMismatch`."""
        got = [d[0] for d in self.gather([decision], f"all-gather of whether minibatch {j} exists (end of the data)")]
        if STOPPED in got:
            return STOPPED
        if len(set(got)) > 1:
            lines = [f"  replica {r} {_WORDS[d]} minibatch {j}" for r, d in enumerate(got)]
            raise DataMismatch(
                f"stage {self.stage} of replica {self.replica}: the replicas' data end at different minibatches:\n"
                + "\n".join(lines) + "\nevery replica must be given the same number of minibatches "
                "(e.g. a DistributedSampler over the replicas with drop_last=True and a DataLoader with drop_last=True)")
        return got[0]

    def global_rows(self, rows: int) -> int:
        """The rows of the global minibatch, given this replica's (its last stage, once per minibatch)."""
        t = torch.tensor([rows], dtype=torch.int64, device=self.device)
        return int(self.all_reduce(t, "all-reduce of the minibatch's rows over the replicas").item())


class GradReducer:
    """Sums a stage's gradients over its replicas, overlapped with the backward (module docs).

    Args:
        params: the stage's parameters (those its optimizer steps).
        replicas: the :class:`Replicas` whose ``group`` to all-reduce over.
        micro_batches: backwards per STEP (``chunks``): a parameter's gradient of the
            minibatch is complete after that many.
        bucket_bytes: gradient bytes per bucket.

    Attributes:
        active: the hooks count only while a run is on (:meth:`reset` to :meth:`stop`: a
            module also trained elsewhere does not post this pipeline's collectives).
        overlap: post buckets as they become ready (``False``: all at the STEP; for
            measuring what the overlap hides).
        waited: seconds spent waiting for the all-reduce at STEPs (summed), and ``steps``
            their count, since :meth:`reset`.
    """

    def __init__(self, params: Sequence[Tensor], replicas: Replicas, micro_batches: int,
                 bucket_bytes: int = BUCKET_BYTES) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.replicas, self.micro_batches, self.bucket_bytes = replicas, micro_batches, bucket_bytes
        self.overlap, self.active = True, False
        self.waited, self.steps = 0.0, 0
        self._buckets: List[List[int]] = []
        self._bucket_of: List[int] = []
        self._buffers: List[Tensor] = []
        self._views: List[List[Tensor]] = []
        self._works: List[Optional[dist.Work]] = []
        for i, p in enumerate(self.params):
            p.register_post_accumulate_grad_hook(self._hook(i))
        self.reset()
        self.active = False

    def reset(self) -> None:
        """Start counting afresh (a run's start; an interrupted run's counts are dropped),
        building the buckets of ``bucket_bytes``."""
        self.active = True
        self._counts = [0] * len(self.params)
        if not self._buckets or self._built_for != self.bucket_bytes:
            self._build()
        self._left = [len(b) for b in self._buckets]
        self._works = [None] * len(self._buckets)
        self._next = 0  # buckets are posted in index order
        self.waited, self.steps = 0.0, 0

    def _build(self) -> None:
        buckets: List[List[int]] = []
        sizes: Dict[Tuple[torch.device, torch.dtype], Tuple[int, int]] = {}  # open bucket per kind: (index, bytes)
        for i in reversed(range(len(self.params))):
            p = self.params[i]
            kind, nbytes = (p.device, p.dtype), p.numel() * p.element_size()
            open_ = sizes.get(kind)
            if open_ is None or open_[1] + nbytes > self.bucket_bytes and buckets[open_[0]]:
                buckets.append([])
                open_ = (len(buckets) - 1, 0)
            buckets[open_[0]].append(i)
            sizes[kind] = (open_[0], open_[1] + nbytes)
        self._buckets, self._built_for = buckets, self.bucket_bytes
        self._bucket_of = [0] * len(self.params)
        self._buffers, self._views = [], []
        for b, idx in enumerate(buckets):
            p0 = self.params[idx[0]]
            total = sum(self.params[i].numel() for i in idx)
            buf = torch.zeros(total + len(idx), dtype=p0.dtype, device=p0.device)  # + one presence count each
            views, off = [], 0
            for i in idx:
                self._bucket_of[i] = b
                n = self.params[i].numel()
                views.append(buf[off:off + n].view_as(self.params[i]))
                off += n
            self._buffers.append(buf)
            self._views.append(views)

    def _hook(self, i: int) -> Callable[[Tensor], None]:
        def ready(_: Tensor) -> None:
            if not self.active:
                return
            self._counts[i] += 1
            if self._counts[i] == self.micro_batches and self.overlap:
                b = self._bucket_of[i]
                self._left[b] -= 1
                if self._left[b] == 0:
                    self._post_ready()
        return ready

    def _post_ready(self) -> None:
        while self._next < len(self._buckets) and self._left[self._next] == 0:
            self._post(self._next)

    def _post(self, b: int) -> None:
        """Copy bucket ``b``'s gradients (zeros where absent) and their presence into its
        buffer and post the all-reduce."""
        idx, buf, views = self._buckets[b], self._buffers[b], self._views[b]
        grads = [self.params[i].grad for i in idx]
        present = [(v, g) for v, g in zip(views, grads) if g is not None]
        if len(present) < len(grads):
            buf.zero_()
        if present:
            torch._foreach_copy_([v for v, _ in present], [g for _, g in present])
        flags = buf[len(buf) - len(idx):]
        if len(present) == len(grads):
            flags.fill_(1)
        else:
            flags.copy_(torch.tensor([float(g is not None) for g in grads], dtype=buf.dtype))
        group = self.replicas.group
        try:
            self._works[b] = dist.all_reduce(buf, group=group, async_op=True)
        except RuntimeError as e:  # a replica already gone
            raise CommError(f"all-reduce of gradient bucket {b} failed: {e}") from e
        self._next = b + 1

    def reduce(self) -> None:
        """Before a STEP: post the buckets not yet posted, wait for every one (deadline:
        the timeout) and put the sums into the parameters' ``grad``."""
        t0 = time.perf_counter()
        while self._next < len(self._buckets):
            self._post(self._next)
        transport = self.replicas.transport
        for b, (idx, buf, views) in enumerate(zip(self._buckets, self._buffers, self._views)):
            work = self._works[b]
            assert work is not None
            transport.wait(work, f"all-reduce of the gradients (bucket {b} of {len(self._buckets)})")
            self._works[b] = None
            flags: Optional[List[float]] = None
            for j, (i, v) in enumerate(zip(idx, views)):
                p = self.params[i]
                if p.grad is not None:
                    p.grad.copy_(v)
                    continue
                if flags is None:  # a gradient absent here: did any replica have one? (a host read)
                    flags = buf[len(buf) - len(idx):].tolist()
                if flags[j] > 0:
                    p.grad = v.clone()
        self.waited += time.perf_counter() - t0
        self.steps += 1
        self._counts = [0] * len(self.params)
        self._left = [len(b) for b in self._buckets]
        self._next = 0

    def stop(self) -> None:
        """The run is over: the hooks stop counting."""
        self.active = False
