"""A clean exit under torchrun (issue 13, item 6).

``torchrun --nproc-per-node 4 examples/torchrun_pipeline.py`` used to end, about one run in
ten, with a rank aborting in the interpreter's teardown (``terminate called without an active
exception``, SIGABRT) and torchrun reporting the job FAILED: a gloo worker thread of a process
group that ``destroy_process_group()`` could not tear down was still releasing the loss
broadcast's tensor while the interpreter finalised (the chain: ``pipeline_rt/p2p.py`` module
docs). The fast tests check the mechanism (after :func:`pipeline_rt.p2p.shutdown` no gloo
thread is left; what the transport keeps and refuses); the slow one runs the example many
times and asserts every run exits 0. Also under torchrun: a second pipeline after ``close()``
joins a new process group.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import List, Sequence

import pytest
import torch
import torch.distributed as dist

from pipeline_rt import p2p

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torchrun_pipeline.py"
SMALL = ["--minibatches", "8", "--rows", "8", "--width", "8", "--timeout", "60"]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def torchrun(script: Path, ranks: int, args: Sequence[str], timeout: float = 120.0) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node ranks script args`` (a free port each time),
    output captured; the tree's packages first on the path."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
               OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           str(script), *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def failure(run: subprocess.CompletedProcess) -> str:
    """'' for a clean run (status 0, no abort), else what went wrong with the output's tail."""
    out = run.stdout + run.stderr
    if run.returncode == 0 and "terminate called" not in out:
        return ""
    return f"exit status {run.returncode}:\n" + "\n".join(out.splitlines()[-25:])


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="reads the thread names from /proc")
def test_example_leaves_no_gloo_thread_after_shutdown():
    """Deterministic: each rank's gloo threads are joined by the example's shutdown() (without
    the fix, an optimizer built after init_process_group pins the group through
    torch.distributed.nn and the threads live until the interpreter exits)."""
    run = torchrun(Path(__file__).with_name("exit_worker.py"), 2, SMALL)
    assert not failure(run), failure(run)


@pytest.fixture
def one_rank_group():
    """A gloo process group of this process alone (world size 1), destroyed afterwards."""
    store = dist.HashStore()
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_collective_tensors_are_kept_until_shutdown_and_a_closed_transport_refuses(one_rank_group):
    t = p2p.Transport(torch.device("cpu"), timeout=10.0)
    x = torch.arange(3.0)
    for _ in range(p2p.RETAINED_COLLECTIVES + 2):
        t.collective(lambda: dist.broadcast(x, 0, async_op=True), [x], "a broadcast")
    assert len(t._retained) == p2p.RETAINED_COLLECTIVES  # bounded: a long run does not grow it
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)  # the group is torn down: no warning
        p2p.shutdown()
    assert not dist.is_initialized() and t.closed and not t._retained and t not in p2p._OPEN
    with pytest.raises(p2p.CommError, match="transport is closed.*shutdown"):
        t.send([x], 0, 0, "a send")
    with pytest.raises(p2p.CommError, match="transport is closed"):
        t.recv([x], 0, 0, "a receive")
    p2p.shutdown()  # twice: harmless


def test_shutdown_warns_when_the_group_cannot_be_torn_down(one_rank_group):
    """Something else holding the group (here: the test) keeps gloo's threads alive: shutdown
    says so, and keeps the collectives' tensors referenced until the interpreter exits."""
    t = p2p.Transport(torch.device("cpu"), timeout=10.0)
    x = torch.ones(2)
    t.collective(lambda: dist.broadcast(x, 0, async_op=True), [x], "a broadcast")
    pinned = dist.distributed_c10d._get_default_group()
    kept = len(p2p._KEPT)
    with pytest.warns(RuntimeWarning, match="still referenced.*torch.distributed.nn"):
        p2p.shutdown()
    assert any(k[0] is x for k in p2p._KEPT[kept:])
    del p2p._KEPT[kept:], pinned


def test_a_pipeline_after_close_joins_a_new_group():
    """Under torchrun the store outlives the process group: a second ``backend="dist"``
    pipeline built after ``close()`` must not read the first group's keys (gloo then failed
    to connect to the addresses of the group before). Both runs return the same losses."""
    run = torchrun(Path(__file__).with_name("rejoin_worker.py"), 3, [])
    assert not failure(run), failure(run)
    assert run.stdout.count("two groups") == 3, run.stdout + run.stderr


RUNS, RANKS, AT_ONCE = 20, 4, 2


@pytest.mark.slow
def test_example_exits_cleanly_every_time():
    """The symptom, end to end: ``RUNS`` runs of the example with ``RANKS`` ranks (``AT_ONCE``
    at a time: a loaded machine makes the race likelier), every one exits 0 with no abort.
    About 80-150 s on 2 cores, hence ``slow``."""
    with ThreadPoolExecutor(AT_ONCE) as pool:
        runs: List[subprocess.CompletedProcess] = list(pool.map(lambda _: torchrun(EXAMPLE, RANKS, SMALL), range(RUNS)))
    bad = [f"run {i}: {failure(r)}" for i, r in enumerate(runs) if failure(r)]
    assert not bad, f"{len(bad)} of {RUNS} runs did not exit cleanly:\n" + "\n\n".join(bad)
