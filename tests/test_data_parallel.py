"""Data-parallel replicas (issue 26, DESIGN §9): 2 stages x 2 replicas = 4 gloo ranks, float64.

The oracle is the local single pipeline trained on the concatenated minibatches (the
replicas' ``j``-th, in replica order, micro-batch by micro-batch: :func:`dp_worker.concatenated`);
the replicas are given minibatches of different sizes (8 and 6 rows), so the rows weighting
is exercised by every case. Replicas must stay bit-identical; losses and evaluation are the
global ones on every rank.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from dist_worker import launch, step_lr
from dp_worker import Case, DPSpec, oracle, worker
from pipeline_rt import METHODS, Pipeline
from pipeline_rt.checkpoint import FORMAT, CheckpointError, resume
from pipeline_rt.layout import Layout

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")

CASES = tuple(Case(m) for m in METHODS) + (
    Case("sync", (("clip_grad_norm", 0.5), ("clip_grad_scope", "global"), ("lr_scheduler", step_lr))),
    Case("pipeoptim", (("clip_grad_norm", 0.5), ("lr_scheduler", step_lr)), stop_at=3),
    Case("pipeoptim", checkpoint=True),
    Case("2bw", checkpoint=True),
    Case("pipeoptim", (("rank_layout", "replica"),)),  # rank = stage * D + replica
    Case("pipeoptim", (("recompute", True),)),  # the re-run backward still feeds the bucketed all-reduce
    Case("pipedream", (("recompute", [0]),)),
)


def test_every_method_equals_the_single_pipeline_on_the_concatenation(tmp_path: Path) -> None:
    """Every method of METHODS, clipping (per stage and global: after the reduction), a
    scheduler, a callback's stop (replica 0's, agreed by all), evaluation on sharded data,
    inference, and checkpoint + resume: one launch."""
    spec = DPSpec(cases=CASES, evaluate=True)
    out = launch(spec, tmp_path, deadline=120.0, target=worker)
    assert out.exitcodes == [0] * spec.world, out.errors
    for case in spec.cases:
        ref = oracle(spec, case)
        results = [r[case.label] for r in out.results]  # type: ignore[index]
        layout = Layout(spec.stages, spec.replicas, dict(case.pipe).get("rank_layout", "pipeline"))
        for rank, got in enumerate(results):
            assert (got["replica"], got["stage"]) == layout.coords(rank)
            assert got["losses"] == results[0]["losses"], f"{case.label}: rank {rank}'s losses differ from rank 0's"
            torch.testing.assert_close(got["losses"], ref["losses"], msg=lambda m: f"{case.label}: {m}")
            for name, w in ref["weights"][got["stage"]].items():
                torch.testing.assert_close(got["weights"][name], w, msg=lambda m: f"{case.label} {name}: {m}")
            assert got["eval"] == results[0]["eval"], f"{case.label}: rank {rank} evaluates differently"
            torch.testing.assert_close(got["eval"], ref["eval"])
            if got["stage"] == spec.stages - 1:  # inference: each replica's output on its last stage
                torch.testing.assert_close(got["forward"], ref["forward"][got["replica"]])
            else:
                assert got["forward"] is None
            if case.checkpoint:
                assert got["resumed"] == got["losses"], f"{case.label}: resumed losses differ"
                for name, w in got["weights"].items():
                    assert torch.equal(got["resumed_weights"][name], w), f"{case.label}: resumed {name} differs"
        if case.checkpoint:  # the shared state written once, by replica 0; replica 1's own files beside it
            folder = tmp_path / f"ckpt-{spec.cases.index(case)}" / "mb000004"
            for k in range(spec.stages):
                assert "module" in torch.load(folder / f"stage{k}.pt", weights_only=False)["stage"]
                own = torch.load(folder / f"stage{k}.replica1.pt", weights_only=False)
                assert not {"module", "optimizer", "stash"} & set(own["stage"]) and "replays" in own["stage"]
        for k in range(spec.stages):  # the replicas of a stage: bit-identical
            mine = [got for got in results if got["stage"] == k]
            for other in mine[1:]:
                for name, w in mine[0]["weights"].items():
                    assert torch.equal(other["weights"][name], w), f"{case.label}: stage {k} replicas differ in {name}"


def test_replicas_with_unequal_data_lengths_fail_clearly(tmp_path: Path) -> None:
    timeout = 5.0
    spec = DPSpec(cases=(Case("pipedream"),), counts={1: 4}, timeout=timeout)
    out = launch(spec, tmp_path, deadline=6 * timeout, target=worker)
    assert all(c not in (0, None) for c in out.exitcodes), (out.exitcodes, out.errors)
    assert out.seconds < 4 * timeout
    for rank in (0, 2):  # the first stages: the agreement names the replicas
        err = out.errors[rank]
        assert "DataMismatch" in err and "the replicas' data end at different minibatches" in err, err
        assert "replica 0 has minibatch 4" in err and "replica 1 has no minibatch 4" in err, err


def test_a_killed_replica_fails_every_rank_within_the_timeout(tmp_path: Path) -> None:
    timeout = 5.0
    spec = DPSpec(cases=(Case("pipeoptim"),), faults={3: {"at": 3, "kill": True}}, timeout=timeout)
    out = launch(spec, tmp_path, deadline=6 * timeout, target=worker)
    assert out.exitcodes[3] == -9
    for rank in (0, 1, 2):
        assert out.exitcodes[rank] not in (0, None), f"rank {rank} exited with {out.exitcodes[rank]}"
    assert out.seconds < 4 * timeout
    # stage 1 of replica 0 (rank 1) all-reduces with the dead rank 3 at its STEP
    err = out.errors[1]
    assert "pipeline stage 1 (rank 1, replica 0) failed at the STEP of minibatch" in err, err
    assert "with the replicas of stage 1 (ranks 1, 3)" in err, err
    # stage 0 of replica 1 (rank 2) exchanges with the dead rank 3 point to point
    assert re.search(r"pipeline stage 0 \(rank 2, replica 1\) failed at .*with stage 1 \(rank 3\)", out.errors[2]), \
        out.errors[2]


def test_a_stalled_replica_times_out_every_other_rank(tmp_path: Path) -> None:
    timeout = 2.0
    spec = DPSpec(cases=(Case("pipeoptim"),), faults={3: {"at": 3, "stall": 60.0}}, timeout=timeout)
    out = launch(spec, tmp_path, deadline=60.0, target=worker, wait_for=[0, 1, 2])
    assert out.exitcodes[3] is None, "the stalled rank is still asleep (killed by the test)"
    assert all(c not in (0, None) for c in out.exitcodes[:3]), (out.exitcodes, out.errors)
    for rank in (0, 1, 2):  # each within two deadlines of training (one waits for the other to give up)
        seconds = float(re.findall(r"failed after ([0-9.]+) s", out.errors[rank])[-1])
        assert seconds < 3 * timeout, f"rank {rank} failed after {seconds} s"
    # stage 1 of replica 0 waits for its replica at the STEP's all-reduce, and gives up at the deadline
    err = out.errors[1]
    assert "pipeline stage 1 (rank 1, replica 0) failed at the STEP of minibatch 2" in err, err
    assert "with the replicas of stage 1 (ranks 1, 3)" in err and "[timeout 2 s]" in err, err


@pytest.mark.parametrize("order,ranks", [("pipeline", [[0, 1], [2, 3], [4, 5]]), ("replica", [[0, 3], [1, 4], [2, 5]])])
def test_layout(order: str, ranks: list) -> None:
    layout = Layout(num_stages=2, data_parallel=3, order=order)
    assert [layout.pipeline_ranks(r) for r in range(3)] == ranks
    assert [layout.replica_ranks(k) for k in range(2)] == [list(x) for x in zip(*ranks)]
    assert all(layout.coords(layout.rank(r, k)) == (r, k) for r in range(3) for k in range(2))
    assert len(layout.table().splitlines()) == 7
    with pytest.raises(ValueError, match="rank_layout must be one of"):
        Layout(2, 2, "diagonal")


@pytest.mark.parametrize("options,match", [({"data_parallel": 2}, "backend='dist'"),
                                           ({"data_parallel": 0}, "data_parallel must be a positive int"),
                                           ({"rank_layout": "stage"}, "rank_layout must be one of")])
def test_data_parallel_options_are_checked(options: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Pipeline([torch.nn.Linear(2, 2)], ["cpu"], lambda ps: torch.optim.SGD(ps, lr=0.1),
                 torch.nn.functional.mse_loss, **options)


def test_resume_with_another_number_of_replicas_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "mb000004"
    folder.mkdir()
    describe = {"method": "pipeoptim", "shape": "async-1f1b", "num_stages": 1, "chunks": 1}
    torch.save({**describe, "data_parallel": 2, "format": FORMAT, "minibatch": 3, "final": False, "losses": [0.0] * 4},
               folder / "meta.pt")
    for name in ("stage0.pt", "stage0.replica1.pt"):
        torch.save({}, folder / name)
    with pytest.raises(CheckpointError, match=r"saved by 2 data-parallel replica\(s\), but this pipeline has 1"):
        resume(folder, None, None, describe)  # type: ignore[arg-type]


def test_example_with_replicas_exits_cleanly_under_torchrun() -> None:
    """``torchrun --nproc-per-node 4 examples/torchrun_pipeline.py --data-parallel 2``: every
    rank exits 0 with no gloo thread left after the example's shutdown() (the replicas'
    process groups are torn down too), and prints one stage of one replica."""
    from test_torchrun_exit import SMALL, failure, torchrun
    run = torchrun(Path(__file__).with_name("exit_worker.py"), 4, [*SMALL, "--data-parallel", "2"])
    assert not failure(run), failure(run)
    for r, k in ((0, 0), (0, 1), (1, 0), (1, 1)):
        assert f"stage {k} of replica {r}" in run.stdout, run.stdout


def test_batch_statistics_are_refused_under_replicas() -> None:
    """The oracle is the single pipeline on the concatenation: a batch norm would normalise over
    one replica's rows and keep per-replica statistics, so it is refused (per-row layers pass)."""
    from pipeline_rt.batchnorm import DeferredBatchNorm
    from pipeline_rt.reduce import check_replicable
    check_replicable(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.LayerNorm(2), torch.nn.GroupNorm(1, 2)), 0)
    for module, name in ((torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.BatchNorm1d(2)), "1 (BatchNorm1d)"),
                         (DeferredBatchNorm(2, chunks=2), "(the stage) (DeferredBatchNorm)")):
        with pytest.raises(ValueError, match=re.escape(name) + r"(.|\n)*nn.GroupNorm"):
            check_replicable(module, 1)


def test_grad_reducer_posts_complete_buckets_during_the_backward_in_order() -> None:
    """One process (a world of one: the all-reduce is the identity), the mechanics: a bucket is
    posted once its parameters have had the minibatch's last micro-batch, during the backward,
    in bucket order; the STEP posts the rest; a parameter without a gradient keeps None; no
    counting outside a run."""
    import torch.distributed as dist

    from pipeline_rt.reduce import GradReducer, Replicas
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        unused = torch.nn.Linear(2, 2).double()  # registered first: its bucket is the last
        body = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Tanh(), torch.nn.Linear(3, 1)).double()
        params = list(unused.parameters()) + list(body.parameters())
        reducer = GradReducer(params, Replicas(Layout(1, 1), 0, torch.device("cpu"), 10.0), micro_batches=2,
                              bucket_bytes=1)  # one parameter per bucket
        assert len(reducer._buckets) == 6
        reducer.reset()  # a run starts
        x = torch.randn(4, 3, dtype=torch.float64)
        body(x).sum().backward()
        assert reducer._next == 0, "nothing is complete after the first of two micro-batches"
        body(x).sum().backward()
        assert reducer._next == 4, "the body's four buckets were posted during the backward; the unused one waits"
        expected = [p.grad.clone() for p in body.parameters()]
        reducer.reduce()
        assert all(p.grad is None for p in unused.parameters())
        assert all(torch.equal(p.grad, e) for p, e in zip(body.parameters(), expected))
        reducer.stop()
        body(x).sum().backward()
        assert reducer._counts == [0] * 6
    finally:
        dist.destroy_process_group()
