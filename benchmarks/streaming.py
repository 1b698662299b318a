"""Streaming a long run through the local runtime: memory and start-up against the run's length.

Each size runs in a fresh process (peak RSS is a process's high-water mark): ``Pipeline.train``
of 8 stages of one ``Linear(2, 2)`` each (``--method``, default ``pipeoptim``) on CPU, over a
generator of ``count`` minibatches of 2 rows, made on the fly. Reported per size: time from
``train()`` to the first forward, resident memory (RSS) sampled by a callback at 10%, 50% and
the end of the run, the peak RSS of the process, the size of the returned list of losses (the one
thing that must grow: ~32 bytes a minibatch), and host time per minibatch.

    python benchmarks/streaming.py --sizes 10000,1000000 --write
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mb(field: str = "VmRSS") -> float:
    """This process's resident memory (or its high-water mark, ``VmHWM``) in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(count: int, method: str) -> dict:
    import torch
    from torch import nn

    from pipeline_rt import Pipeline

    torch.set_num_threads(1)
    torch.manual_seed(0)
    first = []

    class First(nn.Module):
        def forward(self, x):
            if not first:
                first.append(time.perf_counter())
            return x

    stages = [nn.Linear(2, 2) for _ in range(8)]
    stages[0] = nn.Sequential(First(), stages[0])
    pipe = Pipeline(stages, ["cpu"] * 8, lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
                    nn.functional.mse_loss, method=method)
    x, y = torch.randn(2, 2), torch.randn(2, 2)
    data = ((x, y) for _ in range(count))
    marks = {count // 10: "10%", count // 2: "50%"}
    samples = {}

    def callback(info) -> None:
        if info.step in marks:
            samples[marks[info.step]] = rss_mb()

    before = rss_mb()
    t0 = time.perf_counter()
    losses = pipe.train(data, callback=callback)
    seconds = time.perf_counter() - t0
    samples["end"] = rss_mb()
    listed = (sys.getsizeof(losses) + sum(sys.getsizeof(v) for v in losses)) / 2 ** 20
    return {"count": count, "first_forward_ms": (first[0] - t0) * 1e3, "rss_before": before, "rss": samples,
            "peak": rss_mb("VmHWM"), "losses_mb": listed, "us_per_minibatch": seconds / count * 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="10000,1000000")
    ap.add_argument("--method", default="pipeoptim")
    ap.add_argument("--one", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help="write the section 'streaming' of RESULTS.md")
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(one(args.one, args.method)))
        return
    rows = []
    for count in (int(c) for c in args.sizes.split(",")):
        out = subprocess.run([sys.executable, __file__, "--one", str(count), "--method", args.method],
                             check=True, capture_output=True, text=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        rows.append(r)
        print(r, flush=True)
    table = ("| minibatches | first forward (ms) | RSS before train (MB) | RSS at 10% / 50% / end (MB) | peak RSS (MB) "
             "| returned losses (MB) | host us per minibatch |\n|---|---|---|---|---|---|---|\n")
    for r in rows:
        s = r["rss"]
        table += (f"| {r['count']:,} | {r['first_forward_ms']:.2f} | {r['rss_before']:.0f} | "
                  f"{s.get('10%', float('nan')):.0f} / {s.get('50%', float('nan')):.0f} / {s['end']:.0f} | "
                  f"{r['peak']:.0f} | {r['losses_mb']:.1f} | {r['us_per_minibatch']:.0f} |\n")
    print(table)
    if args.write:
        from benchmarks._sections import provenance, write_section
        text = (f"## streaming: memory and start-up against the run's length ({args.method}, 8 stages, CPU)\n\n"
                + provenance("cpu") + "\n" + table
                + "\nEach size in a fresh process. The schedule is produced as the run goes and minibatches are "
                  "pulled just in time, so memory stays flat; what grows is the returned list of float losses "
                  "(column 'returned losses').\n")
        write_section(ROOT / "benchmarks" / "RESULTS.md", "streaming", text)


if __name__ == "__main__":
    main()
