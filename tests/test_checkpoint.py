"""Checkpoints of a streaming run and exact resume, for the local and the distributed executor.

The oracle is the uninterrupted run: resuming from a checkpoint taken mid-run must give the
same losses (all of them: those before the checkpoint come from it) and the same final
weights, bit for bit. Dropout makes every run depend on the RNG streams as well.
"""
from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import torch

from dist_worker import Spec, batches, launch, pipeline, weights
from pipeline_rt import CheckpointError, DataMismatch, checkpoint
from pipeline_rt.schedule import B, F, SHAPES, STEP, LazySchedule

MINIBATCHES = 7


def _run(spec: Spec, method: str, data=None, **train):
    pipe = pipeline(spec, method, "local")
    losses = pipe.train(batches(MINIBATCHES) if data is None else data, **train)
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
    assert saved == ["mb000002", "mb000004", "mb000006", "mb000007"]  # and the end of the data
    for name in saved[:-1]:
        torch.manual_seed(123)  # the checkpoint's RNG state must win over whatever the process has
        _assert_same(_run(spec, method, resume_from=tmp_path / name), want, f"resumed from {name}")
    with pytest.raises(CheckpointError, match="end of its run"):
        _run(spec, method, resume_from=tmp_path / "mb000007")


@pytest.mark.parametrize("shape", SHAPES)
def test_cuts_are_consistent_and_retain_what_is_in_flight(shape):
    """On the schedule alone: at stage k's cut (right after its STEP of a checkpointed
    minibatch j) every unit in flight is one the checkpointer retains, every activation
    stage k received was sent before stage k-1's cut, and the gradients are all received."""
    for n, chunks, every, length in itertools.product(range(1, 6), range(1, 4), (1, 2, 3), (4, 9)):
        lazy = LazySchedule(shape, n, chunks)
        saver = checkpoint.Checkpointer("unused", every, {"num_stages": n, "chunks": chunks})
        sched = lazy.finite(length)
        cuts = []  # per stage: {j: (forwarded, backwarded) units before the cut}
        for k in range(n):
            fwd, bwd, steps, at = [], [], 0, {}
            for a in sched.compute(k):
                if a.kind == F:
                    fwd.append(a.unit)
                elif a.kind == B:
                    bwd.append(a.unit)
                else:
                    steps += 1
                    if steps % every == 0 or steps == length:
                        at[steps - 1] = (list(fwd), set(bwd))
            cuts.append(at)
        for k, at in enumerate(cuts):
            for j, (fwd, bwd) in at.items():
                flying = [u for u in fwd if u not in bwd]
                assert all(saver.retain(u) for u in flying), (shape, n, chunks, every, k, j, flying)
                assert len(flying) <= n - 1 - k
                if k > 0:
                    before = cuts[k - 1][j][0]
                    assert fwd == before[:len(fwd)], "received before the cut, sent after the sender's"
                if k < n - 1:
                    assert bwd == cuts[k + 1][j][1], "a gradient in flight across the cut"


def test_resume_refuses_another_run_other_data_and_skips_incomplete(tmp_path):
    spec = Spec(world=2)
    _run(spec, "pipedream", checkpoint_every=3, checkpoint_dir=tmp_path)
    (tmp_path / "mb000007" / "stage0.pt").unlink()  # as if rank 0 died while saving
    (tmp_path / "mb000006" / "transit1.pt").unlink()
    assert checkpoint.latest(tmp_path).name == "mb000003"
    with pytest.raises(CheckpointError, match="different run"):
        _run(spec, "pipeoptim", resume_from=tmp_path)
    other = batches(MINIBATCHES)
    other[1] = (other[1][0] + 1, other[1][1])
    with pytest.raises(DataMismatch, match="differ from those of the run that saved"):
        _run(spec, "pipedream", other, resume_from=tmp_path)
    with pytest.raises(DataMismatch, match="has only 2"):
        _run(spec, "pipedream", batches(MINIBATCHES)[:2], resume_from=tmp_path)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        _run(spec, "pipedream", resume_from=tmp_path / "nowhere")


def test_resume_from_a_positioned_iterable(tmp_path):
    spec = Spec(world=3)
    want = _run(spec, "pipeoptim")
    _run(spec, "pipeoptim", checkpoint_every=3, checkpoint_dir=tmp_path)
    rest = iter(batches(MINIBATCHES)[3:])  # the user's loader, fast-forwarded past 3 minibatches
    _assert_same(_run(spec, "pipeoptim", rest, resume_from=tmp_path / "mb000003", skip_consumed=False), want,
                 "positioned")


def test_resume_mid_epoch_with_a_scheduler(tmp_path):
    spec = Spec(world=3, dropout=0.1)
    data = batches(5)
    sched = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)  # noqa: E731

    def run(**train):
        torch.manual_seed(0)
        pipe = pipeline(spec, "pipeoptim", "local", lr_scheduler=sched)
        losses = pipe.train(data, epochs=3, **train)
        return losses, [weights(m) for m in pipe.stages]

    want = run()
    assert len(want[0]) == 15
    run(checkpoint_every=4, checkpoint_dir=tmp_path)  # after 4 (epoch 0) and 8 minibatches (mid epoch 1)
    _assert_same(run(resume_from=tmp_path / "mb000008"), want, "resumed mid-epoch with a scheduler")
    lr = torch.load(tmp_path / "mb000008" / "stage0.pt", weights_only=False)["stage"]["scheduler"]["_last_lr"]
    assert lr == [0.05 * 0.5 ** 4], "the scheduler's state is in the checkpoint"


def test_extend_a_finished_run(tmp_path):
    """The final checkpoint of a run, resumed with more epochs, continues it as a second
    train() call on the same pipeline would (the first run drained at its end)."""
    spec = Spec(world=3, dropout=0.1)
    data = batches(4)
    torch.manual_seed(0)
    pipe = pipeline(spec, "pipeoptim", "local")
    first, second = pipe.train(data), pipe.train(data)
    want = (first + second, [weights(m) for m in pipe.stages])
    torch.manual_seed(0)
    _run(spec, "pipeoptim", data, checkpoint_dir=tmp_path)  # a checkpoint_dir alone: the final one
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mb000004"]
    _assert_same(_run(spec, "pipeoptim", data, epochs=2, resume_from=tmp_path), want, "extended")


@pytest.mark.slow
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
