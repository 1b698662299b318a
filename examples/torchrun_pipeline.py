"""Train a small MLP as a pipeline with one stage per process (``backend="dist"``).

One machine, four processes (gloo on CPU; NCCL with ``--device cuda``)::

    torchrun --nproc-per-node 4 examples/torchrun_pipeline.py --method pipeoptim

Two machines with two processes each (run the same command on both)::

    torchrun --nnodes 2 --nproc-per-node 2 --rdzv-backend c10d \\
        --rdzv-endpoint HOST0:29500 --rdzv-id mlp-demo examples/torchrun_pipeline.py

Data-parallel replicas of the pipeline (``D x N`` processes; ``--data-parallel D``)::

    torchrun --nproc-per-node 4 examples/torchrun_pipeline.py --data-parallel 2

Then rank ``r * N + k`` runs stage ``k`` of replica ``r``, and each replica reads its own shard
of the data: a ``DataLoader`` over a ``DistributedSampler`` with ``num_replicas=D`` and
``rank=pipe.replica`` (the same shard on the ranks of one replica). The losses printed are the
global minibatches' (the replicas' minibatches together), the same on every rank.

Every rank builds the same ``Pipeline`` with stage factories, so rank ``k`` constructs only
stage ``k``. Every rank prints one line about its stage; ``train`` returns the same losses on
every rank, and rank 0 prints them. With ``--checkpoint-dir`` the run is checkpointed every
``--checkpoint-every`` minibatches; rerun with ``--resume`` to continue from the latest one.

Every rank ends with :func:`pipeline_rt.p2p.shutdown`: it waits for every posted transfer and
destroys the process group, so that no gloo worker thread is still busy while the interpreter
exits (which aborts the process: ``terminate called without an active exception``, and
``torchrun`` reports the job FAILED). ``tests/test_torchrun_exit.py`` runs this script many
times and checks that every run exits with status 0.
"""
from __future__ import annotations

import argparse
import os
from typing import Callable, List, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

from pipeline_rt import Pipeline
from pipeline_rt.p2p import shutdown


def stage_factory(k: int, num_stages: int, width: int) -> Callable[[], nn.Module]:
    """A zero-argument factory of stage ``k``: only the rank that runs it calls it."""
    def build() -> nn.Module:
        torch.manual_seed(k)  # the same weights whichever process builds the stage
        if k == num_stages - 1:
            return nn.Linear(width, 1)
        return nn.Sequential(nn.Linear(width, width), nn.GELU())
    return build


def make_batches(count: int, rows: int, width: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The same synthetic regression data on every rank (fixed seed)."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(width, 1, generator=g)
    out = []
    for _ in range(count):
        x = torch.randn(rows, width, generator=g)
        out.append((x, torch.tanh(x @ w) + 0.05 * torch.randn(rows, 1, generator=g)))
    return out


def replica_loader(batches: List[Tuple[torch.Tensor, torch.Tensor]], rows: int, replicas: int,
                   replica: int) -> DataLoader:
    """Replica ``replica``'s shard of ``batches``' rows, in minibatches of ``rows`` rows: a
    ``DistributedSampler`` over the replicas (every replica the same number of minibatches)."""
    data = TensorDataset(torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches]))
    sampler = DistributedSampler(data, num_replicas=replicas, rank=replica, shuffle=True, seed=0, drop_last=True)
    return DataLoader(data, batch_size=rows, sampler=sampler, drop_last=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="pipeoptim")
    parser.add_argument("--minibatches", type=int, default=32)
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--device", default="cpu", help="'cpu' (gloo) or 'cuda' (NCCL, cuda:$LOCAL_RANK)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds a rank waits for a peer")
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--checkpoint-every", type=int, default=8)
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    parser.add_argument("--data-parallel", type=int, default=1, help="replicas of the pipeline (world size D x N)")
    args = parser.parse_args()

    d = args.data_parallel
    n = int(os.environ.get("WORLD_SIZE", 1)) // d
    stages = [stage_factory(k, n, args.width) for k in range(n)]
    pipe = Pipeline(stages, [args.device] * n, lambda ps: torch.optim.AdamW(ps, lr=args.lr),
                    nn.functional.mse_loss, method=args.method, backend="dist", timeout=args.timeout,
                    data_parallel=d)
    rank = dist.get_rank()
    k = next(i for i, m in enumerate(pipe.stages) if m is not None)
    module = pipe.stages[k]
    print(f"rank {rank}/{n * d} (host {os.uname().nodename}): stage {k} of replica {pipe.replica}, "
          f"{sum(p.numel() for p in module.parameters())} parameters on {next(module.parameters()).device}",
          flush=True)

    checkpoints = {}
    if args.checkpoint_dir:
        checkpoints = {"checkpoint_every": args.checkpoint_every, "checkpoint_dir": args.checkpoint_dir}
        if args.resume:
            checkpoints["resume_from"] = args.checkpoint_dir
    batches = make_batches(args.minibatches, args.rows, args.width)
    data = batches if d == 1 else replica_loader(batches, args.rows, d, pipe.replica)
    losses = pipe.train(data, **checkpoints)

    if rank == 0:
        print(f"method {args.method}: loss {losses[0]:.4f} -> {losses[-1]:.4f} over {len(losses)} minibatches")
        print("losses:", " ".join(f"{x:.4f}" for x in losses), flush=True)
    shutdown()  # every transfer waited for, the process group destroyed: a clean exit


if __name__ == "__main__":
    main()
