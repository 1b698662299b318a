"""The distributed executor against the local one: gloo processes on CPU, float64.

Every test launches real ranks (see :func:`dist_worker.launch`) and compares with the oracle,
the local executor run in this process on the same stages, data and seeds: losses and final
weights must be identical, not close.
"""
from __future__ import annotations

import re

import pytest
import torch

from dist_worker import Outcome, Spec, launch, oracle, oracle_eval, step_lr

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")


def assert_matches_local(spec: Spec, out: Outcome) -> None:
    assert out.exitcodes == [0] * spec.world, out.errors
    for method in spec.methods:
        losses, weights = oracle(spec, method)
        evaluated = oracle_eval(spec, method) if spec.evaluate else None
        for rank, result in enumerate(out.results):
            got_losses, got_weights, got_eval = result[method]
            assert got_eval == evaluated, f"{method}: rank {rank} evaluates differently from the local executor"
            assert got_losses == losses, f"{method}: rank {rank} losses differ from the local executor's"
            for name, w in weights[rank].items():
                assert torch.equal(got_weights[name], w), f"{method}: stage {rank} {name} differs"


@pytest.mark.parametrize("world", [2, 4])
def test_same_losses_and_weights_as_local(world, tmp_path):
    spec = Spec(world=world, tuples=world == 2)  # 2 ranks: (float64, int64) tuples between stages
    assert_matches_local(spec, launch(spec, tmp_path))


def test_slow_stage_changes_nothing(tmp_path):
    spec = Spec(world=4, faults={1: {"seconds": 0.02}})
    assert_matches_local(spec, launch(spec, tmp_path))


def _assert_names_failure(err: str, stage: int) -> None:
    assert f"pipeline stage {stage} (rank {stage}) failed at action" in err, err
    assert re.search(r"with stage \d \(rank \d\)", err), err
    assert ">>" in err and "<<" in err and f"stage {stage}:" in err, "the schedule table with the mark"


def test_killed_rank_makes_the_others_exit_nonzero(tmp_path):
    timeout = 5.0
    spec = Spec(world=4, methods=("pipeoptim",), timeout=timeout, faults={2: {"at": 3, "kill": True}})
    out = launch(spec, tmp_path, deadline=4 * timeout)
    assert out.exitcodes[2] == -9
    for rank in (0, 1, 3):
        assert out.exitcodes[rank] not in (0, None), f"rank {rank} exited with {out.exitcodes[rank]}"
    # neighbours of the dead rank see the connection drop and name it as the peer
    for rank in (1, 3):
        _assert_names_failure(out.errors[rank], rank)
        assert "with stage 2 (rank 2)" in out.errors[rank]


def test_stalled_rank_times_out_the_others(tmp_path):
    timeout = 1.5
    spec = Spec(world=2, methods=("pipedream",), timeout=timeout, faults={0: {"at": 3, "stall": 30.0}})
    out = launch(spec, tmp_path, deadline=8 * timeout, wait_for=[1])
    assert out.seconds < 4 * timeout
    assert out.exitcodes[1] == 1, "the waiting rank fails by itself within the timeout"
    assert out.exitcodes[0] is None, "the stalled rank is still asleep (killed by the test)"
    _assert_names_failure(out.errors[1], 1)
    assert "with stage 0 (rank 0)" in out.errors[1] and "1.5 s" in out.errors[1]


def test_shape_change_is_a_clear_error(tmp_path):
    spec = Spec(world=2, methods=("pipedream",), ragged=True, timeout=5.0)
    out = launch(spec, tmp_path, deadline=20.0)
    assert out.exitcodes[0] == 1 and out.exitcodes[1] not in (0, None)
    assert "ShapeMismatch: stage 0, SEND_F of micro-batch (5, 0)" in out.errors[0], out.errors[0]
    assert "(6, 4):float64, (2,):int64] but were [(8, 4):float64, (2,):int64]" in out.errors[0]


def test_training_loop_hooks_equal_local(tmp_path):
    """Epochs, an early stop by the callback, a scheduler, global clipping and evaluation
    (uneven last batch): every rank returns what the local executor returns."""
    spec = Spec(world=3, methods=("sync", "pipeoptim"), stop_at=5, evaluate=True, train={"epochs": 2}, dropout=0.1,
                pipe={"lr_scheduler": step_lr})
    assert_matches_local(spec, launch(spec, tmp_path))
    clipped = Spec(world=3, methods=("sync",), pipe={"clip_grad_norm": 0.1, "clip_grad_scope": "global"})
    (tmp_path / "clip").mkdir()
    assert_matches_local(clipped, launch(clipped, tmp_path / "clip"))


@pytest.mark.parametrize("count,word", [(4, "ran out before the first stage's"), (8, "this rank's have more")])
def test_unequal_iterables_fail_clearly(count, word, tmp_path):
    spec = Spec(world=3, methods=("pipedream",), timeout=5.0, rank_minibatches={2: count})
    out = launch(spec, tmp_path, deadline=30.0)
    assert out.exitcodes[2] == 1, out.errors
    assert "DataMismatch" in out.errors[2] and word in out.errors[2] and "same batches" in out.errors[2], out.errors[2]
    assert all(c not in (0, None) for c in out.exitcodes), "the others fail too, within the timeout"
