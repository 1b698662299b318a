"""Per-minibatch time and weight memory of every pipeline method, measured in one run.

Each method trains the same MLP (``--stages`` stages of ``--layers`` Linear+ReLU of
``--width``) with the local executor; after one untimed warm-up ``train()``, every repeat
times one ``train()`` over ``--minibatches`` minibatches per method, the methods taking
turns (round robin, the order reversed every other round) so that drifts of the machine hit
them alike. Reported: the median time per minibatch, the ratio to ``pipedream`` (PipeOptim's
target: at most 1.03; also as the median of per-round ratios, which a drift between rounds
affects less), and per stage the peak number of weight versions held and their bytes.

    python benchmarks/pipeline_step.py [--device cuda] [--optimizer adam] [--write benchmarks/RESULTS.md]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Tuple

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import append_section  # noqa: E402
from pipeline_rt import METHODS, Pipeline  # noqa: E402

RUNS: List[Tuple[str, Dict[str, str]]] = [(m, {}) for m in METHODS] + [("pipeoptim", {"backward": "predicted"})]
OPTIMIZERS = {
    "sgdm": lambda ps: torch.optim.SGD(ps, lr=1e-3, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-4),
}


def label(method: str, kw: Dict[str, str]) -> str:
    return method + "".join(f" ({k}={v})" for k, v in kw.items())


def build_stages(args: argparse.Namespace) -> List[nn.Sequential]:
    torch.manual_seed(0)
    stages = []
    for _ in range(args.stages):
        layers: List[nn.Module] = []
        for _ in range(args.layers):
            layers += [nn.Linear(args.width, args.width), nn.ReLU()]
        stages.append(nn.Sequential(*layers))
    return stages


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stages", type=int, default=4)
    ap.add_argument("--layers", type=int, default=2, help="Linear+ReLU layers per stage")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--batch", type=int, default=64, help="rows per minibatch")
    ap.add_argument("--minibatches", type=int, default=16, help="minibatches per timed train() call")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--optimizer", choices=sorted(OPTIMIZERS), default="sgdm")
    ap.add_argument("--methods", default=None,
                    help="comma-separated method names to run (default: all; pipedream and pipeoptim always run)")
    ap.add_argument("--write", type=Path, default=None, help="append a section to this markdown file")
    args = ap.parse_args()
    wanted = None if args.methods is None else set(args.methods.split(",")) | {"pipedream", "pipeoptim"}
    device = torch.device(args.device)
    base = build_stages(args)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(args.batch, args.width, generator=g).to(device),
                torch.randn(args.batch, args.width, generator=g).to(device)) for _ in range(args.minibatches)]
    pipes = {}
    for method, kw in RUNS:
        if wanted is not None and (method not in wanted or kw):
            continue
        pipe = Pipeline(copy.deepcopy(base), [device] * args.stages, OPTIMIZERS[args.optimizer],
                        nn.functional.mse_loss, method=method, **kw)
        pipe.train(batches[:max(2, args.stages)])  # warm-up: allocator, kernels, optimizer state
        pipes[label(method, kw)] = pipe
    times: Dict[str, List[float]] = {name: [] for name in pipes}
    for r in range(args.repeats):
        order = list(pipes.items())
        for name, pipe in order if r % 2 == 0 else reversed(order):  # alternate who runs after whom
            sync(device)
            t0 = time.perf_counter()
            pipe.train(batches)
            sync(device)
            times[name].append((time.perf_counter() - t0) / args.minibatches)

    stage_bytes = [sum(p.numel() * p.element_size() for p in s.parameters()) for s in base]
    med = {name: statistics.median(t) for name, t in times.items()}
    ref = med["pipedream"]
    lines = [
        "| method | ms / minibatch | vs pipedream | weight versions per stage | weight MiB per stage |",
        "|---|---|---|---|---|",
    ]
    for name, pipe in pipes.items():
        versions = pipe.peak_versions
        mib = [v * b / 2**20 for v, b in zip(versions, stage_bytes)]
        lines.append(f"| {name} | {med[name] * 1e3:.2f} | {med[name] / ref:.3f} | {versions} | "
                     f"{[round(x, 1) for x in mib]} |")
    ratio = med["pipeoptim"] / ref
    rounds = sorted(a / b for a, b in zip(times["pipeoptim"], times["pipedream"]))
    paired = statistics.median(rounds)
    quartiles = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else [paired] * 3
    dev_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    text = "\n".join([
        "## pipeline_step: per-minibatch time and weight memory per method",
        "",
        f"* command: `python {' '.join(shlex.quote(a) for a in sys.argv)}`",
        f"* date: {datetime.datetime.now().isoformat(timespec='seconds')}; device: {args.device} ({dev_name}); "
        f"torch {torch.__version__}; {torch.get_num_threads()} CPU threads",
        f"* model: {args.stages} stages x {args.layers} x Linear({args.width}, {args.width})+ReLU, "
        f"{args.batch} rows per minibatch, {args.minibatches} minibatches per train(), optimizer {args.optimizer}; "
        f"median of {args.repeats} round-robin repeats",
        f"* **pipeoptim / pipedream = {ratio:.3f}** (target <= 1.03); median of the per-round ratios "
        f"(each round times both): {paired:.3f}, quartiles {quartiles[0]:.3f}-{quartiles[2]:.3f}",
        "",
        *lines,
        "",
    ])
    print(text)
    if args.write is not None:
        append_section(args.write, text)


if __name__ == "__main__":
    main()
