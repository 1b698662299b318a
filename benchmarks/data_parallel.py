"""Data-parallel replicas: time per minibatch with D replicas against 1, on the same
per-replica work, and how much of the gradient all-reduce the backward hides.

Each configuration is launched as ``D x N`` gloo processes on this machine (CPU), every one
training the same MLP stage(s) on its own minibatches of ``--rows`` rows; the time per
minibatch is the slowest rank's, the median of ``--rounds`` trains of ``--minibatches``
(after one warm-up train). With ``D`` replicas the rounds alternate, in the same processes,
between buckets posted as their gradients become ready (``overlap``, the default) and all
posted at the STEP (``GradReducer.overlap = False``): the wait at STEP of the latter is the
all-reduce's full cost, of the former what the backward did not hide. The 1-replica
configuration is launched before and after the ``D``-replica one (a drifting machine shows)::

    python benchmarks/data_parallel.py                  # 1 stage: 1 process vs 2
    python benchmarks/data_parallel.py --stages 2       # 2 stages: 2 processes vs 4

Processes are pinned to nothing: with more processes than cores the ratio measures the
machine, not the runtime (say so when reporting).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import time
from typing import Any, Dict, List

import torch
from torch import nn


def stage(k: int, n: int, width: int, layers: int) -> nn.Module:
    torch.manual_seed(k)
    blocks: List[nn.Module] = []
    for _ in range(layers):
        blocks += [nn.Linear(width, width), nn.Tanh()]
    if k == n - 1:
        blocks.append(nn.Linear(width, 1))
    return nn.Sequential(*blocks)


def worker(rank: int, cfg: Dict[str, Any], port: int, queue: Any) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(cfg["world"]), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    import pipeline_rt.dist  # noqa: F401  (before any optimizer: a clean exit, see pipeline_rt.p2p)
    from pipeline_rt import Pipeline
    from pipeline_rt.p2p import shutdown

    n, d = cfg["stages"], cfg["replicas"]
    pipe = Pipeline([lambda k=k: stage(k, n, cfg["width"], cfg["layers"]) for k in range(n)], ["cpu"] * n,
                    lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9), nn.functional.mse_loss,
                    method=cfg["method"], backend="dist", data_parallel=d, timeout=120)
    reducer = pipe.executor.replicas.reducer if d > 1 else None  # type: ignore[attr-defined]
    if reducer is not None:
        reducer.bucket_bytes = cfg["bucket_kb"] * 1024
    g = torch.Generator().manual_seed(rank)
    data = [(torch.randn(cfg["rows"], cfg["width"], generator=g), torch.randn(cfg["rows"], 1, generator=g))
            for _ in range(cfg["minibatches"])]
    modes = (True, False) if reducer is not None else (True,)
    times: Dict[bool, List[float]] = {m: [] for m in modes}
    waits: Dict[bool, List[float]] = {m: [] for m in modes}
    for i in range(cfg["rounds"] * len(modes) + 1):
        overlap = modes[i % len(modes)]
        if reducer is not None:
            reducer.overlap = overlap
        t0 = time.perf_counter()
        pipe.train(data)
        if i:  # the first: warm-up
            times[overlap].append((time.perf_counter() - t0) / cfg["minibatches"])
            waits[overlap].append(reducer.waited / max(reducer.steps, 1) if reducer is not None else 0.0)
    queue.put((rank, times, waits))
    shutdown()


def run(cfg: Dict[str, Any]) -> Dict[bool, Dict[str, float]]:
    """``{overlap: {"minibatch_ms", "wait_ms"}}`` of one launch."""
    ctx = mp.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    queue = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(r, cfg, port, queue)) for r in range(cfg["world"])]
    for p in procs:
        p.start()
    results = [queue.get(timeout=600) for _ in procs]
    for p in procs:
        p.join()
        if p.exitcode != 0:
            raise RuntimeError(f"a rank exited with {p.exitcode}")
    out = {}
    for mode in results[0][1]:
        per_round = [max(r[1][mode][i] for r in results) for i in range(cfg["rounds"])]  # the slowest rank
        out[mode] = {"minibatch_ms": 1e3 * statistics.median(per_round),
                     "wait_ms": 1e3 * statistics.median([w for r in results for w in r[2][mode]])}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, default=1)
    parser.add_argument("--replicas", type=int, default=2)
    parser.add_argument("--method", default="pipeoptim")
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--layers", type=int, default=8, help="Linear+Tanh blocks per stage")
    parser.add_argument("--rows", type=int, default=256, help="rows per minibatch per replica")
    parser.add_argument("--minibatches", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--bucket-kb", type=int, default=1024)
    args = parser.parse_args()
    base = {k: getattr(args, k) for k in ("stages", "method", "width", "layers", "rows", "minibatches", "rounds",
                                          "bucket_kb")}
    params = args.layers * (args.width * args.width + args.width)
    print(f"{args.stages} stage(s), {params * 4 / 2**20:.1f} MiB of float32 gradients per stage, buckets of "
          f"{args.bucket_kb} KiB, {args.rows} rows per replica per minibatch, method {args.method}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}")
    before = run({**base, "replicas": 1, "world": args.stages})[True]
    many = run({**base, "replicas": args.replicas, "world": args.stages * args.replicas})
    after = run({**base, "replicas": 1, "world": args.stages})[True]
    one = statistics.mean([before["minibatch_ms"], after["minibatch_ms"]])
    rows = [("1 replica (launched before)", before), (f"{args.replicas} replicas, overlapped", many[True]),
            (f"{args.replicas} replicas, all-reduce at STEP", many[False]), ("1 replica (launched after)", after)]
    print(f"{'configuration':<36} {'ms/minibatch':>12} {'vs 1 replica':>12} {'wait at STEP ms':>16}")
    for name, got in rows:
        print(f"{name:<36} {got['minibatch_ms']:>12.2f} {got['minibatch_ms'] / one:>11.2f}x {got['wait_ms']:>16.2f}")
    on, off = many[True]["wait_ms"], many[False]["wait_ms"]
    if off > 0:
        print(f"hidden by the backward: {100 * (1 - on / off):.0f}% of the all-reduce wait "
              f"({off:.2f} ms at STEP when posted there, {on:.2f} ms when overlapped)")


if __name__ == "__main__":
    main()
