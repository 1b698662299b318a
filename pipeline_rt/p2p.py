"""Point-to-point messages between neighbouring pipeline ranks (``torch.distributed``).

A :class:`Channel` is one direction of one stage boundary (activations ``k -> k+1`` or
gradients ``k+1 -> k``). Its messages go in the order the global plan gives, which both
ends derive from the same schedule, so they can never be out of order. The first message
carries a small header (count, dtype and shape of every tensor, or "absent" for a ``None``
gradient); later messages are checked against it on the sending side, so a shape change is
a clear error instead of a hang or a garbled tensor.

A :class:`Transport` posts the operations:

* gloo: plain ``isend``/``irecv``, in order, each with its own tag (batched P2P has hung on
  gloo elsewhere). Sends are posted at once and waited for lazily.
* NCCL: ``batch_isend_irecv``. A NCCL send blocks its stream until the peer receives, so
  sends are held back and posted in one batch with the next receive (or at :meth:`flush`),
  and the whole batch is waited for: in 1F1B, stage ``k`` sends ``F(j+w_k)`` and receives
  ``B(j)`` while stage ``k+1`` sends ``B(j)`` and receives ``F(j+w_k)``, so neighbours meet
  in matching groups (torch.distributed.pipelining pairs its operations the same way).

Every wait has a deadline (``work.wait(timeout)``); a failure or timeout is raised as
:class:`CommError`, which the executor turns into an error naming the action and the peer.

A clean exit (:func:`shutdown`). A rank that simply returns from its script can abort in the
interpreter's teardown with ``terminate called without an active exception`` (SIGABRT, so
``torchrun`` reports the job FAILED), about one run in ten on a loaded machine. The chain:

1. gloo runs collectives (the executor's loss broadcast, its ``all_gather`` for clipping) on
   the process group's worker threads. A worker releases a finished work, and with it the
   tensors it was given, *after* ``wait()`` has returned on the main thread. If that release
   is the tensor's last reference, it needs the GIL to free the tensor's Python object.
2. ``torch.distributed.nn.functional`` takes ``group=group.WORLD`` as a default argument,
   evaluated when it is imported; imported after ``init_process_group`` (``torch.optim``'s
   first optimizer imports it, through ``torch._dynamo``) it keeps the default group alive, so
   ``destroy_process_group()`` no longer joins gloo's worker threads: they live until exit.
3. If the main thread reaches ``Py_Finalize`` before a worker released its last work, the
   worker's GIL request during finalisation ends the thread inside a ``noexcept`` destructor:
   ``std::terminate``.

Hence (all in this module): ``torch.distributed.nn`` is imported here, before any process
group exists (``pipeline_rt.dist`` imports this module before it initialises one), so that
nothing pins the group; :meth:`Transport.collective` keeps the last collectives' tensors
referenced from Python until :func:`shutdown` (a worker's release is then not the last one,
even where something else pins the group); :func:`shutdown` closes the transports (every posted operation waited for, with
the deadline), destroys the process group (which then joins gloo's threads) and checks that it
is gone, warning with the cause if something still holds it.
"""
from __future__ import annotations

import gc
import warnings
import weakref
from collections import deque
from datetime import timedelta
from typing import Any, Callable, Deque, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

try:  # before any process group exists: see the module docs (a clean exit, 2.)
    import torch.distributed.nn.functional  # noqa: F401
except ImportError:  # pragma: no cover - a torch build without torch.distributed.nn
    pass

__all__ = ["Channel", "CommError", "ShapeMismatch", "Transport", "Meta", "describe", "shutdown"]

Tensors = Tuple[Optional[Tensor], ...]
TensorMeta = Tuple[torch.dtype, Tuple[int, ...]]
#: per tensor of a message: (dtype, shape), or None for an absent (``None``) tensor
Meta = Tuple[Optional[TensorMeta], ...]

_DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
           torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool]
_ABSENT = -1


class CommError(RuntimeError):
    """A point-to-point operation failed or did not complete before its deadline."""


class ShapeMismatch(ValueError):
    """A message whose tensors differ from the first message on its channel."""


def describe(tensors: Sequence[Optional[Tensor]]) -> Meta:
    """The header of a message: dtype and shape of each tensor (None when absent)."""
    return tuple(None if t is None else (t.dtype, tuple(t.shape)) for t in tensors)


def format_meta(meta: Meta) -> str:
    """``[(4, 8):float64, None]``-style text for error messages."""
    parts = ["None" if m is None else f"{m[1]}:{str(m[0]).replace('torch.', '')}" for m in meta]
    return "[" + ", ".join(parts) + "]"


def _encode(meta: Meta) -> List[int]:
    out = [len(meta)]
    for m in meta:
        if m is None:
            out.append(_ABSENT)
            continue
        dtype, shape = m
        if dtype not in _DTYPES:
            raise TypeError(f"cannot send tensors of dtype {dtype} between stages")
        out += [_DTYPES.index(dtype), len(shape), *shape]
    return out


def _decode(code: Sequence[int]) -> Meta:
    it = iter(code)
    meta: List[Optional[TensorMeta]] = []
    for _ in range(next(it)):
        dtype = next(it)
        if dtype == _ABSENT:
            meta.append(None)
            continue
        ndim = next(it)
        meta.append((_DTYPES[dtype], tuple(next(it) for _ in range(ndim))))
    return tuple(meta)


def _posted(post: Callable[[], Any], what: str) -> Any:
    """Post a point-to-point operation; a peer already gone makes posting itself raise
    (gloo: "Connection closed by peer"), which becomes :class:`CommError` like a failed wait."""
    try:
        return post()
    except RuntimeError as e:
        raise CommError(f"{what} failed: {e}") from e


class Transport:
    """Posts point-to-point operations and waits for them with a deadline.

    Args:
        device: where received tensors are allocated (CUDA for NCCL).
        timeout: seconds any single wait may take before :class:`CommError`.
        group: the process group (default: the default group).
    """

    def __init__(self, device: torch.device, timeout: float, group: Optional[dist.ProcessGroup] = None) -> None:
        self.device, self.timeout, self.group = device, timeout, group
        self.batched = dist.get_backend(group) == "nccl"
        self._held: List[dist.P2POp] = []                         # NCCL sends not yet posted
        self._sending: List[Tuple[dist.Work, Tensor, str]] = []   # gloo sends posted, kept alive
        #: the tensors of the last collectives posted here, kept until shutdown() (module docs)
        self._retained: Deque[Tuple[Tensor, ...]] = deque(maxlen=RETAINED_COLLECTIVES)
        self.closed = False
        _OPEN.add(self)

    def _check_open(self, what: str) -> None:
        if self.closed:
            raise CommError(f"{what}: the transport is closed (pipeline_rt.p2p.shutdown() ran); "
                            "build a new Pipeline (and process group) to communicate again")

    def send(self, tensors: Sequence[Tensor], peer: int, tag: int, what: str) -> None:
        """Send ``tensors`` (in order, tags ``tag, tag+1, ...``) to rank ``peer``."""
        self._check_open(what)
        for i, t in enumerate(tensors):
            t = t.contiguous()
            if self.batched:
                self._held.append(dist.P2POp(dist.isend, t, peer, self.group, tag + i))
            else:
                work = _posted(lambda: dist.isend(t, peer, self.group, tag + i), what)
                self._sending.append((work, t, what))
        self._collect()

    def recv(self, tensors: Sequence[Tensor], peer: int, tag: int, what: str) -> None:
        """Receive into ``tensors`` from rank ``peer`` and wait for them (deadline: timeout)."""
        self._check_open(what)
        if self.batched:
            ops = self._held + [dist.P2POp(dist.irecv, t, peer, self.group, tag + i) for i, t in enumerate(tensors)]
            self._held = []
            works = _posted(lambda: dist.batch_isend_irecv(ops), what)  # one coalesced work or one per op
        else:
            works = [_posted(lambda: dist.irecv(t, peer, self.group, tag + i), what) for i, t in enumerate(tensors)]
        for w in works:
            self.wait(w, what)

    def flush(self) -> None:
        """Post the held sends and wait until every posted send has completed."""
        if self._held:
            ops, self._held = self._held, []
            for w in _posted(lambda: dist.batch_isend_irecv(ops), "the held sends"):
                self.wait(w, "the held sends")
        sending, self._sending = self._sending, []
        for w, _, what in sending:
            self.wait(w, what)

    def collective(self, post: Callable[[], dist.Work], tensors: Sequence[Tensor], what: str) -> None:
        """Post a collective (``post()`` returns its work, e.g.
        ``lambda: dist.broadcast(t, src, group=g, async_op=True)``) and wait for it (deadline:
        timeout). ``tensors``, those the collective reads or writes, stay referenced (those of
        the last :data:`RETAINED_COLLECTIVES` collectives) until :func:`shutdown`: gloo's
        worker thread releases its own references after the wait returns, and must not be the
        one to free them while the interpreter exits (see the module docs)."""
        self._check_open(what)
        self._retained.append(tuple(tensors))
        self.wait(_posted(post, what), what)

    def close(self) -> None:
        """Post the held sends, wait for every posted operation (deadline: timeout each),
        drop the reference to the process group and refuse further operations. The collectives' tensors are released by :func:`shutdown` once
        the process group is gone (here, if none is initialised any more). Idempotent."""
        if self.closed:
            return
        self.flush()
        self.closed = True
        self.group = None  # let the process group go (its gloo threads are joined when it is destroyed)
        _OPEN.discard(self)
        if not dist.is_initialized():
            self._retained.clear()

    def _collect(self) -> None:
        """Drop the sends that have completed (polls; never blocks)."""
        self._sending = [s for s in self._sending if not s[0].is_completed()]

    def wait(self, work: dist.Work, what: str) -> None:
        """Wait for ``work`` until the deadline; :class:`CommError` on failure or timeout."""
        try:
            done = work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as e:
            raise CommError(f"{what} failed: {e}") from e
        if done is False:
            raise CommError(f"{what} did not complete within {self.timeout:g} s")


#: How many collectives' tensors a :class:`Transport` keeps referenced (the last ones: a worker
#: thread may still hold those of a collective that was just waited for; older ones are long
#: released, and while the interpreter runs a worker may free a tensor anyway).
RETAINED_COLLECTIVES = 16

#: the transports of this process not yet closed (weakly: a dropped one is not kept alive)
_OPEN: "weakref.WeakSet[Transport]" = weakref.WeakSet()


def shutdown(group: Optional[dist.ProcessGroup] = None) -> None:
    """End this rank's distributed work cleanly; call it on every rank after the last
    ``train``/``evaluate`` (the example does), instead of ``dist.destroy_process_group()``.

    1. Closes every open :class:`Transport` of this process: every posted send and receive is
       waited for (each with its transport's deadline; a peer that is gone raises
       :class:`CommError`, nothing is left behind silently).
    2. Destroys ``group`` (default: the default group and every other group, as
       ``dist.destroy_process_group``), if one is initialised, and checks that it is gone
       (gloo's worker threads joined): if something still holds it, a ``RuntimeWarning``
       names the likely cause, and the collectives' tensors stay referenced until the
       interpreter exits (so that a worker still releasing one does not free it).
    3. Releases the collectives' tensors of the closed transports.

    A no-op for the parts that do not apply (no transport, no process group); calling it twice
    is harmless.
    """
    transports = list(_OPEN)
    errors: List[CommError] = []
    for t in transports:
        try:
            t.close()
        except CommError as e:  # close the others, destroy the group, then report
            errors.append(e)
    gone = True
    if dist.is_initialized():
        pg = group if group is not None else dist.distributed_c10d._get_default_group()
        ref = weakref.ref(pg)
        del pg
        dist.destroy_process_group(group)
        gc.collect()
        gone = ref() is None
        if not gone:
            warnings.warn(
                "pipeline_rt.p2p.shutdown(): the process group is still referenced after "
                "destroy_process_group(), so gloo's worker threads are not joined and may abort the "
                "interpreter's exit; a usual cause is importing torch.distributed.nn (or torch._dynamo, "
                "which torch.optim imports) after init_process_group: import pipeline_rt.dist first",
                RuntimeWarning, stacklevel=2)
    for t in transports:
        if not gone:
            _KEPT.extend(t._retained)
        t._retained.clear()
    if errors:
        raise errors[0]


#: collectives' tensors of transports closed while their process group could not be destroyed
_KEPT: List[Tuple[Tensor, ...]] = []


class Channel:
    """The ordered messages from one rank to another across one stage boundary.

    Args:
        transport: the :class:`Transport` to post on.
        peer: the other end's rank.
        name: what the messages are, for errors (``"activations of stage 0"``).
    """

    def __init__(self, transport: Transport, peer: int, name: str) -> None:
        self.transport, self.peer, self.name = transport, peer, name
        self.meta: Optional[Meta] = None
        self._tag = 0

    def _tags(self, count: int) -> int:
        tag, self._tag = self._tag, (self._tag + count) % (1 << 30)
        return tag

    def send(self, tensors: Tensors, what: str) -> None:
        """Send one message (the header first, on the channel's first message)."""
        meta = describe(tensors)
        if self.meta is None:
            code = torch.tensor(_encode(meta), dtype=torch.int64, device=self.transport.device)
            size = torch.tensor([code.numel()], dtype=torch.int64, device=self.transport.device)
            self.transport.send([size, code], self.peer, self._tags(2), f"{what} (header)")
            self.meta = meta
        elif meta != self.meta:
            raise ShapeMismatch(
                f"the {self.name} are {format_meta(meta)} but were {format_meta(self.meta)} for the first "
                f"micro-batch; shapes are exchanged once, so every micro-batch must have the same shapes "
                f"(drop or pad a smaller last batch)")
        present = [t for t in tensors if t is not None]
        self.transport.send(present, self.peer, self._tags(len(present)), what)

    def recv(self, what: str) -> Tensors:
        """Receive one message (its header first, on the channel's first message)."""
        dev = self.transport.device
        if self.meta is None:
            size = torch.empty(1, dtype=torch.int64, device=dev)
            tag = self._tags(2)
            self.transport.recv([size], self.peer, tag, f"{what} (header size)")
            code = torch.empty(int(size.item()), dtype=torch.int64, device=dev)
            self.transport.recv([code], self.peer, tag + 1, f"{what} (header)")
            self.meta = _decode(code.tolist())
        out = [None if m is None else torch.empty(m[1], dtype=m[0], device=dev) for m in self.meta]
        present = [t for t in out if t is not None]
        self.transport.recv(present, self.peer, self._tags(len(present)), what)
        return tuple(out)
