"""Minibatches pulled from the user's iterable just in time, split into micro-batches.

A :class:`Feed` reads ``batches`` (any iterable of ``(input, target)`` pairs: a list, a
generator, a ``DataLoader`` with workers, an infinite iterator) only when the schedule asks
for a minibatch, and holds a minibatch only until its last micro-batch's input has gone into
the first stage and its last target into the loss: at most the minibatches in flight plus
one looked ahead (the schedule asks whether minibatch ``j + 1`` exists when minibatch ``j``'s
last micro-batch enters the first stage).

Epochs. ``epochs=E`` iterates ``batches`` ``E`` times back to back, as one run over the
concatenation (no drain between epochs); ``batches`` must then be re-iterable (a list, a
``DataLoader``), not an iterator.

Fingerprint. In a run that checkpoints or resumes, every minibatch pulled is folded into a
running BLAKE2b hash of its structure (tuples, lists, ``None``), its tensors' dtypes and
shapes and, for CPU tensors, their values' bytes (:func:`_sums`: up to 32 KiB as they are,
beyond as the wrapping int64 sums of every 512-byte row and of every column of 8-byte words;
torch reductions, in torch's threads). A checkpoint stores the hash of the minibatches it
consumed and a resume that skips them recomputes it, so resuming with data that differs in
any one element of a CPU tensor (of any real dtype) is refused, as is data with two values
exchanged or anything else changed, bar changes that cancel in every sum. Of a tensor on
another device (CUDA: its values would need a device sync) or a sparse one only the dtype
and shape count, of a target that is not a tensor only its type name. Cost: ``benchmarks/RESULTS.md`` (section ``ckpt``); a run
that neither checkpoints nor resumes skips it.
"""
from __future__ import annotations

import hashlib
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional, Tuple

import torch
from torch import Tensor

from .stage import as_tuple

__all__ = ["Feed", "MicroBatch", "DataMismatch", "split_batch", "rows", "as_pair", "to_device"]

_COLUMNS = 64  # the fingerprint's grid of words: 512-byte rows
_DIRECT = 32768  # bytes hashed as they are (fewer torch calls)
_KEEP_HASHES = 256  # running hashes kept for checkpoints (a cut asks for one a few minibatches back)


class DataMismatch(ValueError):
    """The data differs from what the run needs: another iterable on another rank, or other
    data than the checkpoint's."""


@dataclass
class MicroBatch:
    """One micro-batch: the first stage's inputs, the last stage's target, and its share
    ``weight`` of the minibatch's loss (``rows / minibatch rows`` for a mean-reduced loss)."""

    inputs: Optional[Tuple[Optional[Tensor], ...]]
    target: Any
    weight: float = 1.0
    rows: int = 0


def rows(x: Any) -> int:
    """Dim-0 size of a tensor or of the first tensor of a tuple (0 for a scalar)."""
    t = x if isinstance(x, Tensor) else next(t for t in as_tuple(x) if t is not None)
    return t.shape[0] if t.dim() else 0


def split_batch(x: Any, chunks: int) -> List[Any]:
    """Split a tensor, or a tuple/list of tensors (``None`` entries kept), into ``chunks``
    pieces along dim 0 (sizes differing by at most one, :func:`torch.tensor_split`)."""
    if isinstance(x, Tensor):
        return list(torch.tensor_split(x, chunks))
    parts = [None if t is None else torch.tensor_split(t, chunks) for t in as_tuple(x)]
    return [tuple(None if p is None else p[i] for p in parts) for i in range(chunks)]


def as_pair(j: int, pair: Any) -> Tuple[Any, Any]:
    """Minibatch ``j`` as ``(input, target)``, or a TypeError naming it."""
    if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
        raise TypeError(f"minibatch {j} must be an (input, target) pair, got {type(pair).__name__}")
    return pair[0], pair[1]


def to_device(x: Any, device: torch.device) -> Any:
    """A target (a tensor, a tuple/list of them, or anything else as is) on ``device``."""
    if isinstance(x, Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)) and all(isinstance(t, Tensor) for t in x):
        return type(x)(t.to(device) for t in x)
    return x


def _sums(x: Tensor) -> Tuple[Tensor, ...]:
    """Every byte of a CPU tensor's values: as they are, up to :data:`_DIRECT` bytes; else in
    a few sums: the bytes as int64 words in a grid of :data:`_COLUMNS` columns, the wrapping
    (mod 2**64) sums of each row and of each column, and the bytes past the grid as they are.

    Exact for a change of one element of up to 8 bytes (every real dtype): the element lies
    in one word, and a word that changes changes its row's sum (mod 2**64). Two words
    exchanged (distinct values) change two rows' sums, or two columns' within one row."""
    flat = x.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    if flat.numel() <= _DIRECT:
        return (flat,)
    if flat.storage_offset() % 8:  # a slice of a byte tensor: its words start elsewhere
        flat = flat.clone()
    full = flat.numel() // (8 * _COLUMNS) * _COLUMNS
    grid = flat[:8 * full].view(torch.int64).view(-1, _COLUMNS)
    return grid.sum(1), grid.sum(0), flat[8 * full:]


def _digest(h: Any, x: Any) -> None:
    """Fold ``x`` (a tensor, a tuple or list of them, anything else by its type name) into
    the hash ``h``: dtype, shape and, on the CPU, the :func:`_sums` of the values."""
    if isinstance(x, Tensor):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        if x.device.type == "cpu" and x.layout == torch.strided and x.numel():
            for part in _sums(x):
                h.update(part.numpy())
    elif isinstance(x, (tuple, list)):
        h.update(b"(")
        for t in x:
            _digest(h, t)
        h.update(b")")
    else:
        h.update(type(x).__name__.encode())


class Feed:
    """The minibatches of a run, pulled on demand.

    Args:
        batches: the iterable of ``(input, target)`` pairs.
        chunks: micro-batches per minibatch.
        epochs: passes over ``batches``.
        weight: ``weight(rows, total_rows) -> float``, a micro-batch's share of the loss.
        fingerprint: fold every minibatch into the running hash (needed by a run that
            checkpoints or resumes; ``False`` saves the hashing, and :meth:`fingerprint` then
            refuses).
        total: ``total(rows) -> rows``: the rows a minibatch's loss is shared over, given its
            own (data-parallel replicas: the global minibatch's); called once per minibatch,
            at its first target taken, so ``weight(rows_m, total(rows))`` weighs the targets.
    """

    def __init__(self, batches: Iterable[Tuple[Any, Any]], chunks: int, *, epochs: int = 1,
                 weight: Callable[[int, int], float] = lambda n, total: n / total, fingerprint: bool = True,
                 total: Optional[Callable[[int], int]] = None) -> None:
        if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
            raise ValueError(f"epochs must be a positive int, got {epochs!r}")
        try:
            first = iter(batches)
        except TypeError as e:
            raise TypeError(f"batches must be an iterable of (input, target) minibatches, got "
                            f"{type(batches).__name__}") from e
        if epochs > 1 and first is batches:
            raise TypeError(f"epochs={epochs} re-iterates batches, but {type(batches).__name__} is an iterator that "
                            f"runs out after one pass; pass a re-iterable (a list, a DataLoader) or epochs=1")
        self.batches, self.chunks, self.epochs, self.weight, self.total = batches, chunks, epochs, weight, total
        self._totals: Dict[int, int] = {}  # minibatch -> total(rows), while held
        self._hashing = fingerprint
        self._it: Optional[Iterator[Any]] = first
        self._epoch, self._in_epoch = 0, 0
        self.pulled = 0                    # minibatches read from the iterable so far
        self._ended = False
        self._held: Dict[int, List[Optional[MicroBatch]]] = {}
        self._left: Dict[int, int] = {}     # inputs and targets of a held minibatch not yet taken
        self._epochs: Dict[int, int] = {}
        self._hash = hashlib.blake2b(digest_size=16)
        self._hashes: Deque[Tuple[int, bytes]] = deque(maxlen=_KEEP_HASHES)
        self._hashes.append((0, self._hash.digest()))
        self._inputs_from = 0  # units below this have given their inputs (a resumed first stage)
        self._positioned = False

    # ------------------------------------------------------------------ reading

    def has(self, j: int) -> bool:
        """Whether minibatch ``j`` exists (reads the iterable up to it)."""
        while self.pulled <= j and not self._ended:
            self._pull()
        return j < self.pulled

    def _next(self) -> Optional[Any]:
        while True:
            assert self._it is not None
            try:
                pair = next(self._it)
            except StopIteration:
                if self._in_epoch == 0:
                    raise ValueError(f"epoch {self._epoch} of batches has no minibatches; train() needs at least one "
                                     f"(input, target) minibatch per epoch") from None
                self._epoch += 1
                if self._epoch == self.epochs:
                    self._ended, self._it = True, None
                    return None
                self._it, self._in_epoch = iter(self.batches), 0
                continue
            self._in_epoch += 1
            return pair

    def _pull(self) -> None:
        j = self.pulled
        pair = self._next()
        if pair is None:
            return
        x, y = as_pair(j, pair)
        xs = (x,) if isinstance(x, Tensor) else as_tuple(x, f"minibatch {j}'s input")
        n = rows(x)
        for name, v in (("input", x), ("target", y)):
            if isinstance(v, Tensor):
                sizes = {rows(v)}
            elif isinstance(v, (tuple, list)) and v and all(t is None or isinstance(t, Tensor) for t in v):
                sizes = {rows(t) for t in v if t is not None}
            else:
                continue
            if sizes != {n}:
                raise ValueError(f"minibatch {j}: every {name} tensor must have {n} rows (dim 0), got {sorted(sizes)}")
        if n < self.chunks:
            raise ValueError(f"minibatch {j} has {n} rows, fewer than the {self.chunks} micro-batches it is split "
                             f"into; pass chunks= or larger batches (or drop the smaller last batch: "
                             f"DataLoader(drop_last=True))")
        self._fold(xs, y)
        micro: List[Optional[MicroBatch]]
        if self.chunks == 1:  # the minibatch is its one micro-batch (a target tuple or list as a tuple)
            micro = [MicroBatch(xs, as_tuple(y) if isinstance(y, (tuple, list)) else y, self.weight(n, n), n)]
        else:
            parts_x = split_batch(x, self.chunks)
            parts_y = split_batch(y, self.chunks) if isinstance(y, (Tensor, tuple, list)) else [y] * self.chunks
            micro = [MicroBatch(as_tuple(xm), ym, self.weight(rows(xm), n), rows(xm)) for xm, ym in zip(parts_x, parts_y)]
        self._held[j] = micro
        self._left[j] = 2 * self.chunks
        self._epochs[j] = self._epoch
        first = j * self.chunks
        for m in range(self.chunks):  # a resumed first stage already gave these units' inputs
            if first + m < self._inputs_from:
                self._take(j, m, "inputs")

    def micro(self, j: int, m: int) -> MicroBatch:
        """Micro-batch ``m`` of minibatch ``j`` (reads up to it)."""
        if not self.has(j):
            raise DataMismatch(f"minibatch {j} was asked for, but batches ended after {self.pulled} minibatches")
        mb = self._held[j][m]
        assert mb is not None
        return mb

    def epoch(self, j: int) -> int:
        """The epoch minibatch ``j`` belongs to (reads up to it; while it is held)."""
        self.micro(j, 0)
        return self._epochs[j]

    def take_input(self, j: int, m: int) -> Tuple[Optional[Tensor], ...]:
        """The inputs of micro-batch ``(j, m)``, released by the feed."""
        inputs = self.micro(j, m).inputs
        self._take(j, m, "inputs")
        assert inputs is not None
        return inputs

    def take_target(self, j: int, m: int) -> Tuple[Any, float]:
        """The target and loss weight of micro-batch ``(j, m)``, released by the feed."""
        mb = self.micro(j, m)
        weight = mb.weight
        if self.total is not None:
            if j not in self._totals:
                self._totals[j] = self.total(sum(x.rows for x in self._held[j] if x is not None))
            weight = self.weight(mb.rows, self._totals[j])
        out = mb.target, weight
        self._take(j, m, "target")
        return out

    def _take(self, j: int, m: int, what: str) -> None:
        mb = self._held[j][m]
        assert mb is not None
        setattr(mb, what, None)
        self._left[j] -= 1
        if self._left[j] == 0:
            del self._held[j], self._left[j], self._epochs[j]
            self._totals.pop(j, None)

    @property
    def held(self) -> int:
        """Minibatches read and not yet fully used."""
        return len(self._held)

    # ------------------------------------------------------------------ checkpoints

    def fingerprint(self, count: int) -> Optional[str]:
        """The running hash of the first ``count`` minibatches read (``None`` after a resume
        from a positioned iterable: the skipped minibatches were never seen)."""
        if self._positioned:
            return None
        if not self._hashing:
            raise RuntimeError("this feed was made with fingerprint=False (a run that neither checkpoints nor "
                               "resumes): it keeps no fingerprint")
        for n, h in self._hashes:
            if n == count:
                return h.hex()
        raise RuntimeError(f"the fingerprint of the first {count} minibatches is no longer kept "
                           f"(kept: {self._hashes[0][0]}..{self._hashes[-1][0]})")

    def skip(self, count: int, fingerprint: Optional[str], *, positioned: bool = False,
             inputs_from: int = 0) -> None:
        """Resume: read and drop the first ``count`` minibatches, refusing them unless their
        hash is ``fingerprint`` (``None``: not known, not checked); with ``positioned``, take
        the iterable as already positioned after them. Units (flat) below ``inputs_from``
        have given their inputs."""
        self._inputs_from = inputs_from
        if positioned:
            self.pulled, self._positioned = count, True
            return
        while self.pulled < count:
            if self._next_dropped() is None:
                raise DataMismatch(f"the checkpoint consumed {count} minibatches, but batches has only {self.pulled}; "
                                   f"resume with the data of the run that saved it")
        got = self.fingerprint(count)
        if fingerprint is not None and got != fingerprint:
            raise DataMismatch(f"the first {count} minibatches differ from those of the run that saved the checkpoint\n"
                               f"(fingerprint {got} != {fingerprint}: exact sums of the bytes of their CPU tensors, their\n"
                               f"tensors' dtypes and shapes and the types of non-tensor targets; see pipeline_rt.feed).\n"
                               f"Resume with the same batches, in the same order (a DataLoader with shuffle needs the\n"
                               f"same generator seed), or pass skip_consumed=False with an iterable already positioned\n"
                               f"after them")

    def _next_dropped(self) -> Optional[Any]:
        pair = self._next()
        if pair is None:
            return None
        x, y = as_pair(self.pulled, pair)
        self._fold(as_tuple(x, f"minibatch {self.pulled}'s input"), y)
        return pair

    def _fold(self, inputs: Tuple[Optional[Tensor], ...], target: Any) -> None:
        """Count one more minibatch read, folding it into the running hash."""
        self.pulled += 1
        if self._hashing:
            self._hash.update(b"|")
            _digest(self._hash, (inputs, target))
            self._hashes.append((self.pulled, self._hash.digest()))
