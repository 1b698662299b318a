"""Pipeline utilisation of balanced stages against the schedule's ideal.

Every stage is the same fixed amount of work: a forward of ``--fwd-ms`` and a backward of
``--bwd-ms`` per minibatch (proportional to a micro-batch's rows, so micro-batching does not
change the work), done by busy-waiting on the CPU or by ``torch.cuda._sleep`` kernels on the
stage's stream on CUDA; each stage has one scalar parameter, so ``STEP`` is nearly free. For
each method the script measures ``Pipeline.train`` time per minibatch and compares it with
the *ideal*: the schedule itself (``pipeline_rt.schedule.build``) run on an ideal machine
where each F and B takes its time, STEP and transfers none, and each stage waits only for
its inputs (``pipeline_rt.clock.ideal_time``).

* ``ideal util`` = work / (N x ideal time): what the schedule's bubbles (fill, drain,
  flushes) leave.
* ``measured util`` = work / (N x measured time).
* ``measured / ideal`` time: 1.0 means the runtime reaches the schedule's bound.

On the CPU one process runs the stages one after another on one thread: measured time is
at least the sum of all stages' work, so measured utilisation is at most 1/N there, and
``measured / sequential`` (measured time over the total work) is the runtime's overhead.
Only with ``--device cuda`` (stages on one GPU, one stream each; or ``--devices`` with one per
stage) can stages overlap and the measured utilisation approach the ideal::

    python benchmarks/utilisation.py                      # CPU: bubbles and overhead
    python benchmarks/utilisation.py --device cuda        # GPU: overlap against the ideal
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import provenance, write_section  # noqa: E402
from pipeline_rt import Pipeline  # noqa: E402
from pipeoptim_compare.cli import METHOD_NAMES  # noqa: E402
from pipeline_rt.methods import get_method  # noqa: E402
from pipeline_rt.clock import ideal_time  # noqa: E402
from pipeline_rt.schedule import build  # noqa: E402

_CYCLES_PER_S: Dict[int, float] = {}


def _spin(seconds: float, device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda._sleep(max(1, int(seconds * _CYCLES_PER_S[device.index or 0])))
    else:
        end = time.perf_counter() + seconds
        while time.perf_counter() < end:
            pass


def calibrate(device: torch.device) -> None:
    """Cycles per second of ``torch.cuda._sleep`` on ``device`` (timed with CUDA events)."""
    if device.type != "cuda":
        return
    with torch.cuda.device(device):
        torch.cuda._sleep(1_000_000)  # warm-up
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        cycles = 50_000_000
        start.record()
        torch.cuda._sleep(cycles)
        stop.record()
        stop.synchronize()
        _CYCLES_PER_S[device.index or 0] = cycles / (start.elapsed_time(stop) / 1000)


class _Busy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, scale: Tensor, fwd_s: float, bwd_s: float) -> Tensor:  # type: ignore[override]
        ctx.bwd_s = bwd_s
        ctx.save_for_backward(x, scale)
        _spin(fwd_s, x.device)
        return x * scale

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, scale = ctx.saved_tensors
        _spin(ctx.bwd_s, grad.device)
        return grad * scale, (grad * x).sum().reshape(scale.shape), None, None


class BusyStage(nn.Module):
    """A stage of fixed cost: ``fwd_s`` / ``bwd_s`` seconds per row of its input."""

    def __init__(self, fwd_s_per_row: float, bwd_s_per_row: float) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.fwd, self.bwd = fwd_s_per_row, bwd_s_per_row

    def forward(self, x: Tensor) -> Tensor:
        rows = x.shape[0]
        return _Busy.apply(x, self.scale, self.fwd * rows, self.bwd * rows)


def measure(method: str, depth: int, devices: List[str], minibatches: int, rows: int, fwd_s: float, bwd_s: float,
            repeats: int) -> Dict[str, float]:
    """Best-of-``repeats`` measured and ideal seconds per minibatch of one method."""
    stages = [BusyStage(fwd_s / rows, bwd_s / rows) for _ in range(depth)]
    pipe = Pipeline(stages, devices, lambda ps: torch.optim.SGD(ps, lr=1e-6), lambda out, y: (out - y).pow(2).mean(),
                    method=method)
    batches = [(torch.randn(rows, 1), torch.zeros(rows, 1)) for _ in range(minibatches)]
    pipe.train(batches[: depth + 1])  # warm-up (allocations, streams)
    best = float("inf")
    for _ in range(repeats):
        for d in set(devices):
            if torch.device(d).type == "cuda":
                torch.cuda.synchronize(d)
        t0 = time.perf_counter()
        pipe.train(batches)  # ends with one host sync (the losses)
        best = min(best, time.perf_counter() - t0)
    m = get_method(method)
    chunks = m.num_chunks(depth)
    sched = build(m.shape, depth, minibatches, chunks)
    ideal = ideal_time(sched, fwd_s / chunks, bwd_s / chunks)
    work = depth * (fwd_s + bwd_s) * minibatches  # stage-seconds of work
    return {"measured": best / minibatches, "ideal": ideal / minibatches, "work": work / minibatches,
            "ideal_util": work / (depth * ideal), "measured_util": work / (depth * best)}


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu", help="device of every stage (cpu, cuda, cuda:0)")
    ap.add_argument("--devices", default=None, help="comma-separated, one per stage (overrides --device)")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--minibatches", type=int, default=32)
    ap.add_argument("--rows", type=int, default=32, help="rows per minibatch (divisible by the depth)")
    ap.add_argument("--fwd-ms", type=float, default=2.0, help="forward work per stage per minibatch")
    ap.add_argument("--bwd-ms", type=float, default=4.0, help="backward work per stage per minibatch")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", default=str(Path(__file__).with_name("RESULTS.md")),
                    help="markdown file whose 'utilisation' section is replaced ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    dev0 = torch.device(args.devices.split(",")[0] if args.devices else args.device)
    if dev0.type == "cuda" and dev0.index is None:
        dev0 = torch.device("cuda", 0)
    for d in ([torch.device(x) for x in args.devices.split(",")] if args.devices else [dev0]):
        calibrate(d if d.index is not None or d.type != "cuda" else torch.device("cuda", 0))
    fwd, bwd = args.fwd_ms / 1000, args.bwd_ms / 1000
    lines = ["| depth | method | ideal ms/mb | measured ms/mb | sequential work ms/mb | ideal util | "
             "measured util | measured / ideal | measured / sequential |", "|" + "---|" * 9]
    for depth in map(int, args.depths.split(",")):
        devices = args.devices.split(",") if args.devices else [str(dev0)] * depth
        if len(devices) != depth:
            raise SystemExit(f"--devices needs {depth} entries for depth {depth}")
        for method in args.methods.split(","):
            r = measure(method, depth, devices, args.minibatches, args.rows, fwd, bwd, args.repeats)
            row = (f"| {depth} | {method} | {1000 * r['ideal']:.2f} | {1000 * r['measured']:.2f} | "
                   f"{1000 * r['work']:.2f} | {r['ideal_util']:.2f} | {r['measured_util']:.2f} | "
                   f"{r['measured'] / r['ideal']:.2f} | {r['measured'] / r['work']:.2f} |")
            lines.append(row)
            print(row, flush=True)
    text = "\n".join(lines)
    note = ("On the CPU one process runs the stages one after another, so measured time is at least the "
            "sequential work (measured util <= 1/depth); the ideal columns are the schedule's bubbles, and "
            "`measured / sequential` - 1 is the runtime's overhead." if dev0.type != "cuda" else
            "Stages overlap on their CUDA streams; `measured / ideal` near 1 means the runtime reaches the "
            "schedule's bound.")
    print("\n" + note)
    if args.write:
        section = (f"## Pipeline utilisation of balanced stages\n\n{provenance(str(dev0))}"
                   f"* settings: {args.minibatches} minibatches of {args.rows} rows, per stage forward "
                   f"{args.fwd_ms} ms and backward {args.bwd_ms} ms per minibatch, best of {args.repeats}\n\n"
                   f"{text}\n\n{note}\n")
        write_section(Path(args.write), "utilisation" + ("" if dev0.type != "cuda" else "-cuda"), section)
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
