"""Checkpoints of a streaming run, and exact resume (every executor).

Where. The checkpoint after minibatch ``j`` is a cut of every stage right after its own
STEP of minibatch ``j`` (taken after minibatches ``every-1, 2*every-1, ...`` and, so that a
finished run can be extended, after the last one). The cut is consistent: every message a
stage received before its cut was sent before the sender's; the messages sent before the
sender's cut and received after the receiver's (activations of the micro-batches between
the two stages' forward counts) are saved by the sender, from the outputs it still holds.
Each stage is cut by the process that runs it, whenever it gets there, so the local and the
distributed executors cut alike and nobody waits for anybody.

What. Per stage (``stage{k}.pt``, written by its process): the module, the optimizer with
the predictor's state, the learning-rate scheduler, the STEP count, stashed weight versions,
the accumulated gradients, a :class:`~pipeline_rt.stage.Replay` per micro-batch in flight,
the stage's RNG stream, its place in the schedule (:class:`~pipeline_rt.schedule.Cursor`),
what it knows about the minibatches ahead and about a requested stop. ``transit{k}.pt``: the
activations in flight to stage ``k``. Where a stage reads the data: how many minibatches
its feed consumed and their fingerprint. ``meta.pt`` (by the last stage): what the run was
(method, shape, stages, chunks), the minibatch, whether it was the end of the data, and the
losses so far.

In-flight micro-batches. An autograd graph cannot be saved. At stage ``k``'s cut after
minibatch ``j`` the micro-batches in flight are at most the ``N-1`` after minibatch ``j``'s,
so the forwards of those (and only those, near each checkpoint) keep a
:class:`~pipeline_rt.stage.Replay` (:attr:`Stage.retain`); resuming re-runs them with the
same weights and RNG state, rebuilding the same graphs: the remaining losses and the final
weights are identical to an uninterrupted run's.

Resume. ``resume_from`` (a checkpoint folder, or a ``checkpoint_dir``: its latest complete
checkpoint) continues the run. ``batches`` is the same iterable as the run's: the consumed
minibatches are read again, checked against the fingerprint and dropped
(``skip_consumed=True``), or the iterable is already positioned after them
(``skip_consumed=False``: e.g. a sampler fast-forwarded by the user; nothing can be checked).
After the end of a run's data, a resume with more data or more epochs extends the run.

Data-parallel replicas. The replicas' weights, optimizer and scheduler states are identical:
``stage{k}.pt`` is written once, by replica 0. What differs between replicas (their in-flight
micro-batches' replays, the activations in transit, the data consumed and its fingerprint,
their shares of the losses, the RNG stream) goes to ``stage{k}.replica{r}.pt`` and
``transit{k}.replica{r}.pt`` for replica ``r > 0``; ``meta.pt`` holds the global losses
and the number of replicas, and a resume with another number is refused.

Layout: ``checkpoint_dir/mb000004/{meta.pt, stage0.pt, transit1.pt, ...}`` (named by the
minibatches done). Every process must see the same ``checkpoint_dir`` (a shared file system
across machines).

Safety. A checkpoint is data: tensors, numbers, strings and the lists, tuples and dicts of
them (the stage's own records are saved as dicts and tuples). Every file is read back with
``torch.load(weights_only=True)``, which builds no object of any other class and calls no
function named in the file, so resuming runs nothing a checkpoint contains; a file that names
anything else is refused with a :class:`CheckpointError` naming it. Saving refuses state that
would not load so (a scheduler or optimizer holding an object of its own class), naming where
it is; ``torch.serialization.add_safe_globals([cls])`` in the saving and the resuming
process lets such a class through (you then trust every checkpoint you load to build it).

Atomic writes. Each file is written to a hidden temporary name, flushed to disk
(``fsync``) and renamed; ``meta.pt`` comes after every other file its process writes (with
the local executor: after all of them), and a rewritten folder loses its old ``meta.pt``
first. A checkpoint counts once every file is there and intact (:func:`latest` checks each
file's zip CRCs), so a process killed while writing one leaves the previous one the latest.
Limit: with several processes, a folder that a run writes again (resumed into the same
``checkpoint_dir``) can be left with new and old files by a kill midway, a consistent
checkpoint only if the new run continues the old one exactly.
"""
from __future__ import annotations

import os
import re
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Iterator, List, NamedTuple, Optional, Set, Tuple, Union

import torch

from .executor import ENDED, EXISTS, STOPPED, LossLog, Run
from .schedule import RECV_F, Cursor

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["Checkpointer", "CheckpointError", "latest", "resume"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 3  # 3: the stage's records are plain dicts and tuples, every file loads with weights_only=True
#: the parts of a stage's state that are the same on every data-parallel replica (written once)
SHARED = ("module", "optimizer", "version", "stash", "predictor", "observed", "scheduler")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete, unreadable, carries code, or is from a
    different run."""


class _Problem(NamedTuple):
    """Why a checkpoint folder cannot be used: the file and what is wrong with it."""

    file: Path
    why: str
    code: bool  # the file names classes or functions beyond plain data (else: missing, cut short, corrupt)


def _unsafe(path: Path) -> List[str]:
    """The classes and functions a ``torch.save`` file names that ``weights_only`` would refuse."""
    return sorted(torch.serialization.get_unsafe_globals_in_checkpoint(path))


def _find(obj: Any, names: Set[str], where: str = "", seen: Optional[Set[int]] = None) -> Iterator[str]:
    """Paths (``['stage']['scheduler']['note']``) to the objects in ``obj`` whose class (or
    which, a class or function itself) is one of ``names``."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return
    seen.add(id(obj))
    kind = obj if isinstance(obj, type) or callable(obj) and hasattr(obj, "__qualname__") else type(obj)
    if f"{getattr(kind, '__module__', '')}.{getattr(kind, '__qualname__', '')}" in names:
        yield where or "the whole object"
    elif isinstance(obj, dict):
        for key, value in obj.items():
            yield from _find(value, names, f"{where}[{key!r}]", seen)
    elif isinstance(obj, (list, tuple)):
        for i, value in enumerate(obj):
            yield from _find(value, names, f"{where}[{i}]", seen)
    elif hasattr(obj, "__dict__") and not isinstance(obj, torch.Tensor):
        for key, value in vars(obj).items():
            yield from _find(value, names, f"{where}.{key}", seen)


def _fsync_dir(folder: Path) -> None:
    if hasattr(os, "O_DIRECTORY"):  # POSIX: make the rename itself durable
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _write(obj: Any, path: Path) -> None:
    """Save ``obj`` at ``path`` atomically (temporary name, fsync, rename), refusing what
    would not load with ``weights_only=True``."""
    for left in path.parent.glob(f".{path.name}.*.tmp"):  # a killed writer's (one process writes each file)
        left.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        unsafe = _unsafe(tmp)
        if unsafe:
            at = next(_find(obj, set(unsafe)), "(not found by walking dicts, lists and attributes)")
            raise CheckpointError(
                f"cannot save {path}: it would hold {', '.join(unsafe)} at {at},\n"
                f"which a checkpoint does not load (loading builds tensors and plain Python values only,\n"
                f"so that resuming runs no code from the file). Make that state_dict() return tensors, numbers,\n"
                f"strings, lists, tuples and dicts; or, if you trust every checkpoint you will load, call\n"
                f"torch.serialization.add_safe_globals([...those classes...]) in the saving and the resuming process")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def _folder(directory: PathLike, j: int) -> Path:
    return Path(directory) / f"mb{j + 1:06d}"


def _suffix(replica: int) -> str:
    """The file name suffix of a data-parallel replica's own files (none for replica 0)."""
    return "" if replica == 0 else f".replica{replica}"


class Checkpointer:
    """Takes the checkpoint cuts of a run (see the module docstring).

    Args:
        directory: where the checkpoints go.
        every: minibatches between checkpoints (``None``: only at the end of the data).
        describe: what the run is (method, shape, stages, chunks), checked at resume.
    """

    def __init__(self, directory: PathLike, every: Optional[int], describe: Dict[str, Any]) -> None:
        if every is not None and (not isinstance(every, int) or isinstance(every, bool) or every < 1):
            raise ValueError(f"checkpoint_every must be a positive int (minibatches), got {every!r}")
        self.directory, self.every, self.describe = Path(directory), every, describe
        self.num_stages, self.chunks = describe["num_stages"], describe["chunks"]
        # per cut in progress: this process's stages yet to cut, and the meta to write after them
        self._cuts: Dict[int, Tuple[Set[int], Optional[Dict[str, Any]]]] = {}

    def retain(self, unit: Tuple[int, int]) -> bool:
        """Whether ``unit``'s forward may be in flight at a cut: one of the ``N-1`` units
        after a checkpointed minibatch's last one."""
        if self.every is None:
            return False
        span = self.every * self.chunks
        flat = unit[0] * self.chunks + unit[1]
        i = flat // span
        return i >= 1 and flat - i * span < self.num_stages - 1

    def after_step(self, ex: "Executor", run: Run, k: int, j: int) -> None:
        """Stage ``k`` has just run its STEP of minibatch ``j``: cut it here if due."""
        st = run.views[k]
        final = st.known.get(j + 1, EXISTS) != EXISTS
        if not (final or (self.every is not None and (j + 1) % self.every == 0)):
            return
        stage = ex.stages[k]
        assert stage is not None
        folder = _folder(self.directory, j)
        n, c = self.num_stages, self.chunks
        mine = _suffix(ex.replica)
        if j not in self._cuts:  # this process's first file of the cut: an older meta.pt there goes first
            folder.mkdir(parents=True, exist_ok=True)
            if n - 1 in run.views and ex.replica == 0:
                (folder / "meta.pt").unlink(missing_ok=True)
                _fsync_dir(folder)
            self._cuts[j] = (set(run.views), None)
        if k < n - 1:
            transit = {}
            for flat in range(st.peer_nf[j], st.cursor.nf):
                u = (flat // c, flat % c)
                flag = st.known.get(u[0] + 1) if u[1] == c - 1 else None
                transit[u] = (tuple(None if t is None else t.detach() for t in stage.outputs_of(u)), flag)
            _write(transit, folder / f"transit{k + 1}{mine}.pt")
        saved: Dict[str, Any] = {"minibatch": j, "stage": stage.state_dict(), "known": dict(st.known),
                                 "stop_at": st.stop_at,
                                 "cursor": (st.cursor.nf, st.cursor.nb, j + 1)}  # this STEP counted
        roles = [i for i in run.views if i in (0, n - 1)]
        if run.feed is not None and roles and k == max(roles):
            count = st.cursor.nf // c
            saved["feed"] = {"count": count, "fingerprint": run.feed.fingerprint(count)}
        if k == n - 1:
            losses = run.losses.upto(j + 1)
            if ex.data_parallel > 1:  # this replica's shares; meta.pt gets their sums
                saved["losses"] = list(losses)
                losses = ex._over_replicas(torch.tensor(losses, dtype=torch.float64),
                                           "all-reduce of the losses over the replicas (checkpoint)").tolist()
        if ex.replica > 0:
            saved["stage"] = {key: v for key, v in saved["stage"].items() if key not in SHARED}
        _write(saved, folder / f"stage{k}{mine}.pt")
        left, meta = self._cuts[j]
        left.discard(k)
        if k == n - 1 and ex.replica == 0:
            meta = {**self.describe, "format": FORMAT, "minibatch": j, "final": final, "losses": losses}
        if left:
            self._cuts[j] = (left, meta)
            return
        del self._cuts[j]
        if meta is not None:  # after every file of this process: the checkpoint is complete once it is there
            _write(meta, folder / "meta.pt")


class _Unusable(Exception):
    """Internal: a :class:`_Problem` found while reading a file."""

    def __init__(self, problem: _Problem) -> None:
        super().__init__(problem.why)
        self.problem = problem


def _load(path: Path) -> Any:
    """``torch.load(path, weights_only=True)``; :class:`_Unusable` if it fails."""
    try:
        return torch.load(path, weights_only=True)
    except Exception as e:  # noqa: BLE001 - any failure to read is the same error for the user
        lines = [line.strip() for line in str(e).splitlines() if line.strip()] or [""]
        detail = next((line for line in lines if "WeightsUnpickler error" in line), lines[0])
        code = "Unsupported global" in detail
        why = f"it names {detail.split('GLOBAL ')[-1].split(' ')[0]}, which loading would build or call" if code \
            else f"truncated, corrupt or not written by torch.save ({type(e).__name__}: {detail[:200]})"
        raise _Unusable(_Problem(path, why, code)) from None


def _read(path: Path, folder: Path) -> Any:
    """:func:`_load`, or a :class:`CheckpointError` naming the file and the checkpoint to
    fall back to."""
    try:
        return _load(path)
    except _Unusable as e:
        raise _error(e.problem, folder) from None


def _scan(path: Path) -> Optional[_Problem]:
    """What is wrong with the file at ``path`` without loading it: missing, not a zip, a zip
    record failing its CRC check, or a class or function beyond plain data named in it."""
    if not path.is_file():
        return _Problem(path, "missing (the checkpoint was not finished)", False)
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
        if bad is not None:
            return _Problem(path, f"corrupt: its record {bad} fails its CRC check", False)
        unsafe = _unsafe(path)
    except Exception as e:  # noqa: BLE001 - not a zip, cut short, not a torch.save file
        return _Problem(path, f"truncated, corrupt or not written by torch.save ({type(e).__name__}: {e})", False)
    if unsafe:
        return _Problem(path, f"it names {', '.join(unsafe)}, which loading would build or call", True)
    return None


def _check(folder: Path) -> Optional[_Problem]:
    """What makes ``folder`` unusable as a checkpoint (``None``: every file is there, passes
    :func:`_scan` and ``meta.pt`` loads). Reads every file once, loading only ``meta.pt``."""
    meta_path = folder / "meta.pt"
    problem = _scan(meta_path)
    if problem is not None:
        return problem
    try:
        meta = _load(meta_path)
    except _Unusable as e:
        return e.problem
    n = meta.get("num_stages") if isinstance(meta, dict) else None
    if not isinstance(n, int):
        return _Problem(meta_path, "not a pipeoptim checkpoint's metadata (no num_stages)", False)
    if meta.get("format") != FORMAT:
        return _Problem(meta_path, f"format {meta.get('format')}, and this pipeoptim reads format {FORMAT} (format 2 "
                                   f"and before stored\nthe stage's records as Python objects, which are not loaded: "
                                   f"loading runs no code); resume it with the pipeoptim that wrote it", False)
    suffixes = [_suffix(r) for r in range(meta.get("data_parallel", 1))]
    files = [folder / f"stage{k}{x}.pt" for k in range(n) for x in suffixes] + \
        [folder / f"transit{k}{x}.pt" for k in range(1, n) for x in suffixes]
    return next((p for p in map(_scan, files) if p is not None), None)


def _checkpoints(directory: Path, before: Optional[str] = None) -> List[Path]:
    """The checkpoint folders in ``directory``, newest first (only those before ``before``)."""
    found = [p for p in directory.glob("mb*") if re.fullmatch(r"mb\d+", p.name) and p.is_dir()]
    return sorted((p for p in found if before is None or p.name < before), key=lambda p: p.name, reverse=True)


def _fallback(folder: Path) -> Optional[Path]:
    """The newest usable checkpoint older than ``folder`` in the same directory."""
    return next((p for p in _checkpoints(folder.parent, folder.name) if _check(p) is None), None)


def _error(problem: _Problem, folder: Path) -> CheckpointError:
    if problem.code:
        what = (f"{problem.file} is refused: {problem.why}.\n"
                f"It was not loaded and nothing in it ran. A checkpoint written by pipeoptim holds tensors and plain\n"
                f"Python values only: this file was written by something else or altered; do not resume from it\n"
                f"unless you know who wrote it")
    else:
        what = f"cannot use {problem.file}: {problem.why}"
    back = _fallback(folder)
    hint = f"resume from {back}, the latest usable checkpoint before it" if back is not None else \
        "no earlier usable checkpoint is there to resume from"
    return CheckpointError(f"{what}.\nThe checkpoint {folder} cannot be used; {hint}")


def latest(path: PathLike) -> Path:
    """``path`` itself if it is a checkpoint (it holds ``meta.pt``: it must be usable),
    else the newest usable checkpoint in it; checkpoints that are incomplete or cannot be read
    are skipped, one that carries code is refused (:class:`CheckpointError`)."""
    path = Path(path)
    if (path / "meta.pt").exists():
        problem = _check(path)
        if problem is not None:
            raise _error(problem, path)
        return path
    newest = None
    for folder in _checkpoints(path):
        problem = _check(folder)
        if problem is None:
            return folder
        if problem.code:
            raise _error(problem, folder)
        newest = newest or problem
    why = "" if newest is None else f";\nthe newest is not: {newest.file}: {newest.why}"
    raise CheckpointError(f"no complete checkpoint in {path} (a checkpoint is complete once meta.pt and "
                          f"every stage's files are there and intact){why}")


def resume(path: PathLike, ex: "Executor", run: Run, describe: Dict[str, Any], *, skip_consumed: bool = True) -> int:
    """Load the checkpoint at ``path`` into this process's stages, ``run`` and ``ex``;
    returns the minibatches done."""
    folder = latest(path)
    meta = _read(folder / "meta.pt", folder)
    saved_d, now_d = meta.get("data_parallel", 1), describe.get("data_parallel", 1)
    if saved_d != now_d:
        raise CheckpointError(
            f"checkpoint {folder} was saved by {saved_d} data-parallel replica(s), but this pipeline has {now_d}.\n"
            f"Each replica's in-flight micro-batches and data position are saved per replica, so a checkpoint\n"
            f"resumes with the number of replicas that saved it: build the Pipeline with data_parallel={saved_d}.")
    diff = {key: (meta.get(key), v) for key, v in describe.items() if meta.get(key) != v}
    if diff:
        raise CheckpointError(f"checkpoint {folder} is from a different run; (saved, now): {diff}. Resume with the "
                              f"same method, stages and chunks as the run that saved it")
    j, n = meta["minibatch"], describe["num_stages"]
    feed_state = None
    mine = _suffix(ex.replica)
    for k, view in run.views.items():
        saved = _read(folder / f"stage{k}.pt", folder)
        if mine:  # a replica's own state over the shared one
            own = _read(folder / f"stage{k}{mine}.pt", folder)
            saved = {**own, "stage": {**{key: saved["stage"][key] for key in SHARED}, **own["stage"]}}
        stage = ex.stages[k]
        assert stage is not None
        stage.load_state_dict(saved["stage"])
        view.actions.restart(Cursor(*saved["cursor"]))
        view.known, view.stop_at = dict(saved["known"]), saved["stop_at"]
        if k > 0:
            for u, (tensors, flag) in _read(folder / f"transit{k}{mine}.pt", folder).items():
                ex._put(k, u, tensors)
                run.ready.append((RECV_F, k, u[0], u[1]))
                if flag is not None:
                    view.known[u[0] + 1] = flag
        feed_state = saved.get("feed", feed_state)
        if k == n - 1:
            run.losses = LossLog(saved.get("losses", meta["losses"]))  # a replica's own shares
    if feed_state is not None:
        assert run.feed is not None
        run.feed.skip(feed_state["count"], feed_state["fingerprint"], positioned=not skip_consumed,
                      inputs_from=run.views[0].cursor.nf if 0 in run.views else 0)
    first = run.views.get(0)
    if meta["final"]:  # extend a finished run: what ended it is decided anew
        for k, view in run.views.items():
            view.known = {i: v for i, v in view.known.items() if v not in (ENDED, STOPPED)}
            view.stop_at = None
            view.known[j + 1] = EXISTS if k > 0 else run.decide(j + 1, view)
        if first is not None and first.known[j + 1] != EXISTS:
            raise CheckpointError(f"checkpoint {folder} is the end of its run ({j + 1} minibatches) and batches has "
                                  f"nothing after them; to extend the run give more batches or epochs")
    elif first is not None and run.feed is not None:
        for i, v in first.known.items():
            if v == ENDED and run.feed.has(i):
                raise CheckpointError(f"checkpoint {folder} was taken when the data ended after {i} minibatches, but "
                                      f"batches has more; resume with the same batches (a run is extended from its "
                                      f"final checkpoint)")
    return j + 1
