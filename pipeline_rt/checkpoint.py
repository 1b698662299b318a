"""Checkpoints in the middle of a pipelined run, and exact resume (both executors).

Where. A run is the global order of its plan's actions (:attr:`Plan.order`). The checkpoint
after minibatch ``j`` is taken at the first position after the last ``STEP`` of minibatch
``j`` (the latest over the stages) at which the last stage has forwarded all or none of the
micro-batches of every minibatch (so no minibatch's loss is split between two ranges). With
one micro-batch per minibatch that is right after the ``STEP``. All executors and ranks cut
the same order at the same position, so the saved states form one consistent cut.

What. Per stage (one file each, written by the process that runs it): the module, the
optimizer with the predictor's state, the ``STEP`` count, stashed weight versions, the
accumulated gradients, the tensors in transit to the stage or received and not yet used,
and the process's RNG state. Plus ``meta.pt``: the position, the losses so far, and what
the run was (method, stages, minibatches, chunks), checked at resume.

In-flight micro-batches. Async 1F1B keeps up to ``N-1-k`` micro-batches in flight at stage
``k``; their autograd graphs cannot be saved. Which ones are in flight at each planned
checkpoint is known from the schedule before the run, so their forwards are told to keep a
:class:`~pipeline_rt.stage.Replay` (the inputs, a copy of the weights the forward ran on:
live, stashed or predicted, and the RNG state at the forward; see :attr:`Stage.retain`).
Resuming re-runs exactly those forwards with those weights and RNG state, which rebuilds the
same graphs with the same redirected saved weights, and then continues from the position:
the remaining losses and the final weights are identical to an uninterrupted run's.
Memory: one weight copy per retained micro-batch, only for those in flight at a checkpoint.

Layout: ``checkpoint_dir/mb000004/{meta.pt, stage0.pt, ...}`` (named by the minibatches
done); a checkpoint counts once every file is there (each is written atomically), and
:func:`latest` picks the newest complete one.
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Dict, List, Optional, Protocol, Sequence, Set, Tuple, Union

import torch
from torch import Tensor

from .executor import Plan
from .schedule import B, F, STEP
from .stage import Stage

__all__ = ["positions", "in_flight", "save", "latest", "train", "Transit", "CheckpointError"]

Unit = Tuple[int, int]
Key = Tuple[str, int, Unit]
Tensors = Tuple[Optional[Tensor], ...]
PathLike = Union[str, "os.PathLike[str]"]
FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, incomplete or from a different run."""


class Transit(Protocol):
    """What an executor gives a checkpoint: the tensors between its stages."""

    def run(self, plan: Plan, start: int = 0, stop: Optional[int] = None) -> Tensor: ...

    def transit(self) -> Dict[Key, Tensors]:
        """``{(kind, receiving stage, unit): tensors}`` in transit or received and unused,
        for this process's stages, at the end of the last range run."""

    def resume(self, plan: Plan, transit: Dict[Key, Tensors]) -> None:
        """Continue ``plan`` with a ``run(plan, start=position)``, these tensors in transit."""


def positions(plan: Plan, every: int) -> List[int]:
    """The checkpoint positions after minibatches ``every-1, 2*every-1, ...`` (see above)."""
    if not isinstance(every, int) or every < 1:
        raise ValueError(f"checkpoint_every must be a positive int (minibatches), got {every!r}")
    sched, order = plan.schedule, plan.order
    last_step: Dict[int, int] = {}
    steps = [0] * sched.num_stages
    forwarded = [0] * sched.num_minibatches
    clean = []  # positions where no minibatch is partly forwarded at the last stage
    partial = 0
    for i, a in enumerate(order):
        if a.kind == STEP:
            last_step[steps[a.stage]] = i
            steps[a.stage] += 1
        elif a.kind == F and a.stage == sched.num_stages - 1:
            forwarded[a.mb] += 1
            partial += 1 if forwarded[a.mb] == 1 else 0
            partial -= 1 if forwarded[a.mb] == sched.chunks else 0
        clean.append(partial == 0)
    out = []
    for j in range(every - 1, sched.num_minibatches, every):
        p = last_step[j] + 1
        while p < len(order) and not clean[p - 1]:
            p += 1
        out.append(p)
    return out


def in_flight(plan: Plan, position: int) -> List[Set[Unit]]:
    """Per stage, the micro-batches forwarded before ``position`` and backwarded after it."""
    out: List[Set[Unit]] = [set() for _ in range(plan.schedule.num_stages)]
    for a in plan.order[:position]:
        if a.kind == F:
            out[a.stage].add(a.unit)
        elif a.kind == B:
            out[a.stage].discard(a.unit)
    return out


def _describe(plan: Plan, stages: Sequence[Optional[Stage]]) -> Dict[str, Any]:
    sched = plan.schedule
    method = next(s for s in stages if s is not None).method.name
    return {"format": FORMAT, "method": method, "shape": sched.shape, "num_stages": sched.num_stages,
            "num_minibatches": sched.num_minibatches, "chunks": sched.chunks, "actions": len(plan.order)}


def _write(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(directory: PathLike, plan: Plan, position: int, stages: Sequence[Optional[Stage]],
         transit: Dict[Key, Tensors], losses: Tensor) -> Path:
    """Write this process's stages (and, where the last stage runs, ``meta.pt``) for
    ``position``; returns the checkpoint's folder."""
    done = sum(1 for a in plan.order[:position] if a.kind == STEP and a.stage == 0)
    folder = Path(directory) / f"mb{done:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        if stage is None:
            continue
        mine = {key: tuple(None if t is None else t.detach() for t in ts)
                for key, ts in transit.items() if key[1] == stage.index}
        _write({"position": position, "stage": stage.state_dict(), "transit": mine,
                "rng": stage.rng_state()}, folder / f"stage{stage.index}.pt")
    if stages[-1] is not None:
        _write({**_describe(plan, stages), "position": position, "losses": losses.detach().cpu()},
               folder / "meta.pt")
    return folder


def _complete(folder: Path) -> bool:
    if not (folder / "meta.pt").is_file():
        return False
    n = torch.load(folder / "meta.pt", weights_only=False)["num_stages"]
    return all((folder / f"stage{k}.pt").is_file() for k in range(n))


def latest(path: PathLike) -> Path:
    """``path`` itself if it is a complete checkpoint, else its newest complete one."""
    path = Path(path)
    if _complete(path):
        return path
    found = sorted((p for p in path.glob("mb*") if re.fullmatch(r"mb\d+", p.name) and _complete(p)),
                   key=lambda p: p.name)
    if not found:
        raise CheckpointError(f"no complete checkpoint in {path} (a checkpoint is complete once meta.pt and "
                              f"every stage's file are there)")
    return found[-1]


def _restore(path: PathLike, plan: Plan, stages: Sequence[Optional[Stage]], executor: Transit) -> Tuple[int, Tensor]:
    """Load a checkpoint into this process's stages and executor: (position, losses)."""
    folder = latest(path)
    meta = torch.load(folder / "meta.pt", weights_only=False)
    want = _describe(plan, stages)
    diff = {k: (meta.get(k), v) for k, v in want.items() if meta.get(k) != v}
    if diff:
        raise CheckpointError(f"checkpoint {folder} is from a different run; (saved, now): {diff}. Resume with the "
                              f"same method, stages, chunks and the same list of batches as the run that saved it")
    transit: Dict[Key, Tensors] = {}
    rng: Optional[Tuple[Stage, Any]] = None
    for stage in stages:
        if stage is None:
            continue
        saved = torch.load(folder / f"stage{stage.index}.pt", weights_only=False)
        if saved["position"] != meta["position"]:
            raise CheckpointError(f"{folder}: stage {stage.index}'s file is from another position")
        k = stage.index
        stage.load_state_dict(saved["stage"], lambda u, k=k: plan.s(k, u))
        transit.update(saved["transit"])
        rng = (stage, saved["rng"]) if rng is None else rng
    rng[0].set_rng_state(rng[1])  # one process: its first stage's file has its RNG state
    executor.resume(plan, transit)
    return meta["position"], meta["losses"].to(torch.float64)


def train(executor: Transit, plan: Plan, stages: Sequence[Optional[Stage]], *,
          checkpoint_every: Optional[int] = None, checkpoint_dir: Optional[PathLike] = None,
          resume_from: Optional[PathLike] = None) -> Tensor:
    """Run ``plan`` to the end, checkpointing every ``checkpoint_every`` minibatches into
    ``checkpoint_dir`` and/or resuming from ``resume_from`` first; returns the float64
    per-minibatch losses of the whole run (those before the checkpoint from the checkpoint)."""
    if (checkpoint_every is None) != (checkpoint_dir is None):
        raise ValueError("give checkpoint_every and checkpoint_dir together")
    start, losses = 0, torch.zeros(plan.schedule.num_minibatches, dtype=torch.float64)
    if resume_from is not None:
        start, losses = _restore(resume_from, plan, stages, executor)
    cuts = [p for p in positions(plan, checkpoint_every) if p > start] if checkpoint_every else []
    mine = [s for s in stages if s is not None]
    for p in cuts:
        for stage, units in zip(stages, in_flight(plan, p)):
            if stage is not None:
                stage.retain |= units
    try:
        for stop in sorted(set(cuts) | {len(plan.order)}):
            losses += executor.run(plan, start, stop).detach().to("cpu", torch.float64)
            if stop in cuts:
                save(checkpoint_dir, plan, stop, stages, executor.transit(), losses)
            start = stop
    finally:
        for stage in mine:
            stage.retain.clear()
    return losses
