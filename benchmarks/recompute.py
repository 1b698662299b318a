"""Activation recomputation (``Pipeline(recompute=True)``): peak activation memory per stage and
time per minibatch, with and without it, for every method, at depth 8 on CPU.

Model: 8 stages of ``Linear(d, 4d), GELU, Dropout(0.1), Linear(4d, d)`` (the last with a linear
head), ``d = 128``, minibatches of 32 rows, Adam, each method with its own micro-batches.

Weights: ``Pipeline.peak_versions`` per stage (live + stashed + predicted copies held at once,
each a copy of the stage's parameters), what the re-run at the forward's weights costs.

Memory, per stage: the peak over the run of the bytes of the tensors held for backwards:
what autograd saves in the stage's forwards (parameters and the weights the runtime swaps in
excluded) together with the inputs the in-flight micro-batches keep, counted once per storage
(a meter's saved-tensor hooks inside each stage module, composed with the runtime's own
redirection, and a finaliser per input). It includes the transient graph of the micro-batch
being recomputed. Time: CPU seconds per minibatch of ``Pipeline.train`` over ``--minibatches``
minibatches, the runs with and without recomputation interleaved, median of ``--rounds``.
"""
from __future__ import annotations

import argparse
import sys
import time
import weakref
from pathlib import Path
from typing import Any, Dict, List, Tuple

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks._sections import provenance, write_section  # noqa: E402
from pipeline_rt import METHODS, Pipeline  # noqa: E402

DEPTH, D, ROWS = 8, 128, 32


class Meter:
    """Bytes held per storage (counted once however many times it is held), current and peak."""

    def __init__(self) -> None:
        self.live: Dict[int, List[int]] = {}
        self.current = self.peak = 0

    def add(self, t: Tensor) -> int:
        key = t.untyped_storage().data_ptr()
        entry = self.live.get(key)
        if entry is None:
            self.live[key] = [t.untyped_storage().nbytes(), 1]
            self.current += self.live[key][0]
            self.peak = max(self.peak, self.current)
        else:
            entry[1] += 1
        return key

    def remove(self, key: int) -> None:
        entry = self.live[key]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[key]


class Measured(nn.Module):
    """``inner``, with what its forward saves for the backward and its inputs counted by ``meter``."""

    def __init__(self, inner: nn.Module, meter: Meter) -> None:
        super().__init__()
        self.inner, self.meter = inner, meter

    def forward(self, *xs: Tensor) -> Any:
        meter = self.meter
        for x in xs:  # held by the micro-batch's record until it is dropped
            weakref.finalize(x, meter.remove, meter.add(x))
        if not torch.is_grad_enabled():
            return self.inner(*xs)
        weights = {p.untyped_storage().data_ptr() for p in self.inner.parameters()}  # (as swapped in now)
        below = torch._C._autograd._top_saved_tensors_default_hooks(False)  # the runtime's redirection

        def pack(t: Tensor) -> Tuple[int, Any]:
            key = -1 if t.untyped_storage().data_ptr() in weights else meter.add(t)
            return key, (below[0](t) if below is not None else t)

        def unpack(packed: Tuple[int, Any]) -> Tensor:
            key, inner = packed
            if key != -1:
                meter.remove(key)
            return below[1](inner) if below is not None else inner

        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            return self.inner(*xs)


def block(last: bool) -> nn.Module:
    layers: List[nn.Module] = [nn.Linear(D, 4 * D), nn.GELU(), nn.Dropout(0.1), nn.Linear(4 * D, D)]
    return nn.Sequential(*layers, *([nn.Linear(D, 10)] if last else []))


def run(method: str, recompute: bool, minibatches: int) -> Tuple[float, List[int], List[float], List[int]]:
    """CPU seconds per minibatch, peak bytes per stage, losses, peak weight versions per stage."""
    torch.manual_seed(0)
    meters = [Meter() for _ in range(DEPTH)]
    stages = [Measured(block(k == DEPTH - 1), meters[k]) for k in range(DEPTH)]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(ROWS, D, generator=g), torch.randint(0, 10, (ROWS,), generator=g))
            for _ in range(minibatches)]
    pipe = Pipeline(stages, ["cpu"] * DEPTH, lambda ps: torch.optim.Adam(ps, lr=1e-3), nn.functional.cross_entropy,
                    method=method, recompute=recompute)
    t = time.process_time()
    losses = pipe.train(data)
    seconds = (time.process_time() - t) / minibatches
    return seconds, [m.peak for m in meters], losses, [v or 0 for v in pipe.peak_versions]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minibatches", type=int, default=24)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--write", action="store_true", help="write the section 'recompute' of RESULTS.md")
    args = ap.parse_args()
    torch.set_num_threads(1)
    rows = []
    for method in args.methods.split(","):
        times: Dict[bool, List[float]] = {False: [], True: []}
        peaks: Dict[bool, List[int]] = {}
        losses: Dict[bool, List[float]] = {}
        versions: Dict[bool, List[int]] = {}
        for _ in range(args.rounds):
            for rc in (False, True):
                sec, peaks[rc], losses[rc], versions[rc] = run(method, rc, args.minibatches)
                times[rc].append(sec)
        assert losses[True] == losses[False], f"{method}: recompute changed the losses"
        off, on = (sorted(times[rc])[len(times[rc]) // 2] * 1e3 for rc in (False, True))
        kib = {rc: [round(b / 1024) for b in peaks[rc]] for rc in (False, True)}
        rows.append(f"| {method} | {kib[False]} | {kib[True]} | {sum(peaks[True]) / sum(peaks[False]):.2f} | "
                    f"{versions[False]} | {versions[True]} | {off:.1f} | {on:.1f} | {on / off:.2f} |")
        print(rows[-1], flush=True)
    text = ("## Activation recomputation: memory and time, depth 8 (CPU)\n\n" + provenance("cpu") +
            f"* model: {DEPTH} stages of Linear({D}, {4 * D}), GELU, Dropout(0.1), Linear({4 * D}, {D}) (a head of 10 "
            f"classes on the last), {ROWS} rows per minibatch, Adam, each method's own micro-batches; "
            f"{args.minibatches} minibatches per run, median of {args.rounds} interleaved rounds; losses with and "
            f"without recomputation checked equal\n\n"
            "| method | peak activation KiB per stage 0..7, without | with recompute | sum ratio | "
            "weight versions held per stage, without | with | ms/minibatch without | with | ratio |\n"
            "|---|---|---|---|---|---|---|---|---|\n" + "\n".join(rows) + "\n")
    print(text)
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", "recompute", text)


if __name__ == "__main__":
    main()
