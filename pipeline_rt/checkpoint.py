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
minibatches done); a checkpoint counts once every file is there (each is written
atomically), and :func:`latest` picks the newest complete one. Every process must see the
same ``checkpoint_dir`` (a shared file system across machines).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union

import torch

from .executor import ENDED, EXISTS, STOPPED, LossLog, Run
from .schedule import RECV_F, Cursor

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["Checkpointer", "CheckpointError", "latest", "resume"]

PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 2
#: the parts of a stage's state that are the same on every data-parallel replica (written once)
SHARED = ("module", "optimizer", "version", "stash", "predictor", "observed", "scheduler")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or from a different run."""


def _write(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


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
        folder.mkdir(parents=True, exist_ok=True)
        n, c = self.num_stages, self.chunks
        mine = _suffix(ex.replica)
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
        losses = run.losses.upto(j + 1) if k == n - 1 else []
        if k == n - 1 and ex.data_parallel > 1:  # this replica's shares; meta.pt gets their sums
            saved["losses"] = list(losses)
            losses = ex._over_replicas(torch.tensor(losses, dtype=torch.float64),
                                       "all-reduce of the losses over the replicas (checkpoint)").tolist()
        if ex.replica > 0:
            saved["stage"] = {key: v for key, v in saved["stage"].items() if key not in SHARED}
        _write(saved, folder / f"stage{k}{mine}.pt")
        if k == n - 1 and ex.replica == 0:
            _write({**self.describe, "format": FORMAT, "minibatch": j, "final": final, "losses": losses},
                   folder / "meta.pt")


def _complete(folder: Path) -> bool:
    if not (folder / "meta.pt").is_file():
        return False
    meta = torch.load(folder / "meta.pt", weights_only=False)
    n, suffixes = meta["num_stages"], [_suffix(r) for r in range(meta.get("data_parallel", 1))]
    return all((folder / f"stage{k}{x}.pt").is_file() for k in range(n) for x in suffixes) and \
        all((folder / f"transit{k}{x}.pt").is_file() for k in range(1, n) for x in suffixes)


def latest(path: PathLike) -> Path:
    """``path`` itself if it is a complete checkpoint, else its newest complete one."""
    path = Path(path)
    if _complete(path):
        return path
    found = sorted((p for p in path.glob("mb*") if re.fullmatch(r"mb\d+", p.name) and _complete(p)),
                   key=lambda p: p.name)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path} (a checkpoint is complete once meta.pt and "
                              f"every stage's files are there)")
    return found[-1]


def resume(path: PathLike, ex: "Executor", run: Run, describe: Dict[str, Any], *, skip_consumed: bool = True) -> int:
    """Load the checkpoint at ``path`` into this process's stages, ``run`` and ``ex``;
    returns the minibatches done."""
    folder = latest(path)
    meta = torch.load(folder / "meta.pt", weights_only=False)
    saved_d, now_d = meta.get("data_parallel", 1), describe.get("data_parallel", 1)
    if saved_d != now_d:
        raise CheckpointError(
            f"checkpoint {folder} was saved by {saved_d} data-parallel replica(s), but this pipeline has {now_d}.\n"
            f"Each replica's in-flight micro-batches and data position are saved per replica, so a checkpoint\n"
            f"resumes with the number of replicas that saved it: build the Pipeline with data_parallel={saved_d}.")
    diff = {key: (meta.get(key), v) for key, v in describe.items() if meta.get(key) != v}
    if meta.get("format") != FORMAT:
        diff["format"] = (meta.get("format"), FORMAT)
    if diff:
        raise CheckpointError(f"checkpoint {folder} is from a different run; (saved, now): {diff}. Resume with the "
                              f"same method, stages and chunks as the run that saved it")
    j, n = meta["minibatch"], describe["num_stages"]
    feed_state = None
    mine = _suffix(ex.replica)
    for k, view in run.views.items():
        saved = torch.load(folder / f"stage{k}.pt", weights_only=False)
        if mine:  # a replica's own state over the shared one
            own = torch.load(folder / f"stage{k}{mine}.pt", weights_only=False)
            saved = {**own, "stage": {**{key: saved["stage"][key] for key in SHARED}, **own["stage"]}}
        stage = ex.stages[k]
        assert stage is not None
        stage.load_state_dict(saved["stage"])
        view.actions.restart(Cursor(*saved["cursor"]))
        view.known, view.stop_at = dict(saved["known"]), saved["stop_at"]
        if k > 0:
            for u, (tensors, flag) in torch.load(folder / f"transit{k}{mine}.pt", weights_only=False).items():
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
