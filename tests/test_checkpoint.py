"""Checkpoint and exact resume, for the local and the distributed executor.

The oracle is the uninterrupted run: resuming from a checkpoint taken mid-run must give the
same losses (all of them: those before the checkpoint come from it) and the same final
weights, bit for bit. Dropout makes every run depend on the RNG streams as well.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from dist_worker import Spec, batches, launch, pipeline, weights
from pipeline_rt import checkpoint
from pipeline_rt.schedule import F, STEP

MINIBATCHES = 7


def _run(spec: Spec, method: str, **train):
    pipe = pipeline(spec, method, "local")
    losses = pipe.train(batches(MINIBATCHES), **train)
    return losses, [weights(m) for m in pipe.stages]


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _assert_same(got, want, what: str) -> None:
    assert got[0] == want[0], f"{what}: losses differ"
    for k, (a, b) in enumerate(zip(got[1], want[1])):
        for name in b:
            assert torch.equal(a[name], b[name]), f"{what}: stage {k} {name} differs"


@pytest.mark.parametrize("method", ["sync", "pipedream", "pipeoptim", "2bw", "spectrain", "pipeoptim-cal",
                                    "pipeoptim-rollout", "pipeoptim-calroll"])
def test_local_resume_is_exact(method, tmp_path):
    spec = Spec(world=4, minibatches=MINIBATCHES, dropout=0.2)
    torch.manual_seed(0)
    want = _run(spec, method)
    torch.manual_seed(0)
    _assert_same(_run(spec, method, checkpoint_every=2, checkpoint_dir=tmp_path), want, "checkpointing run")
    saved = sorted(p.name for p in tmp_path.iterdir())
    assert saved == ["mb000002", "mb000004", "mb000006"]
    for name in saved:
        torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process has
        _assert_same(_run(spec, method, resume_from=tmp_path / name), want, f"resumed from {name}")


def test_positions_are_after_the_minibatch_steps():
    spec = Spec(world=4)
    for method in ("pipedream", "2bw"):
        plan = pipeline(spec, method, "local").plan(batches(MINIBATCHES))
        chunks = plan.schedule.chunks
        for j, p in zip((1, 3, 5), checkpoint.positions(plan, 2)):
            done = plan.order[:p]
            assert all(sum(a.kind == STEP and a.stage == k for a in done) >= j + 1 for k in range(4))
            last = [a.mb for a in done if a.kind == F and a.stage == 3]
            assert all(last.count(mb) in (0, chunks) for mb in set(last)), "no minibatch's loss is split"
            flying = checkpoint.in_flight(plan, p)
            if method == "pipedream":  # async 1F1B: at most N-1-k waiting at stage k, plus the one at hand
                assert [len(u) <= 4 - k for k, u in enumerate(flying)] == [True] * 4


def test_resume_refuses_another_run_and_skips_incomplete(tmp_path):
    spec = Spec(world=2)
    _run(spec, "pipedream", checkpoint_every=3, checkpoint_dir=tmp_path)
    (tmp_path / "mb000006" / "stage0.pt").unlink()  # as if rank 0 died while saving
    assert checkpoint.latest(tmp_path).name == "mb000003"
    pipe = pipeline(spec, "pipedream", "local")
    with pytest.raises(checkpoint.CheckpointError, match="different run"):
        pipe.train(batches(MINIBATCHES + 1), resume_from=tmp_path)
    with pytest.raises(checkpoint.CheckpointError, match="no complete checkpoint"):
        pipe.train(batches(MINIBATCHES), resume_from=tmp_path / "nowhere")


def test_dist_resume_is_exact(tmp_path):
    methods = ("pipedream", "pipeoptim")
    ckpt = str(tmp_path / "ckpt" / "{method}")
    first = Spec(world=3, methods=methods, minibatches=MINIBATCHES, dropout=0.2,
                 train={"checkpoint_every": 2, "checkpoint_dir": ckpt})
    full = launch(first, _mkdir(tmp_path / "a"))
    assert full.exitcodes == [0] * 3, full.errors
    resumed_spec = Spec(world=3, methods=methods, minibatches=MINIBATCHES, dropout=0.2,
                        train={"resume_from": str(Path(ckpt) / "mb000002")})
    resumed = launch(resumed_spec, _mkdir(tmp_path / "b"))
    assert resumed.exitcodes == [0] * 3, resumed.errors
    for method in methods:
        for rank in range(3):
            got, want = resumed.results[rank][method], full.results[rank][method]
            assert got[0] == want[0], f"{method}: rank {rank} losses differ after resume"
            for name, w in want[1].items():
                assert torch.equal(got[1][name], w), f"{method}: stage {rank} {name} differs after resume"
