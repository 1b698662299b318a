"""Prediction error on a model with a branch taken one minibatch in three (docs/prediction.rst,
"Parameters without a gradient").

Stage 0 of a 4-stage pipeline is :class:`Branch`: ``h = tanh(A x)``, plus ``tanh(B h)`` for the
minibatches whose flag is set (every third one). In the others ``B`` gets no gradient and the
optimizer skips it. The metric is the runtime's (``Pipeline(track_error=True)``): per stage,

.. math::  e = \\lVert \\hat W - W_B \\rVert / \\lVert W_B - W_F \\rVert

at every backward with ``s > 0`` (``W_F`` the live weights at the forward, ``\\hat W`` the
weights it ran on, ``W_B`` those at the backward; ``e = 1`` for PipeDream, which runs on
``W_F``), averaged over the minibatches after the first ``--skip``.

``--baseline REV`` measures the code of git revision ``REV`` (before the rule for skipped
parameters) on the same data in the same process, next to the working tree's; ``--write``
puts the table into ``benchmarks/RESULTS.md``.
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import pipeline_rt  # noqa: E402
from benchmarks._sections import provenance, write_section  # noqa: E402
from benchmarks.host_overhead import baseline  # noqa: E402

OPTIMIZERS: Dict[str, Callable] = {
    "sgdm": lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
}
METHODS = ["pipedream", "pipeoptim", "spectrain", "pipeoptim-cal", "pipeoptim-rollout", "pipeoptim-calroll"]


class Branch(nn.Module):
    """``h = tanh(A x)``, and ``h + tanh(B h)`` when the input's flag column (the last one) is
    positive: ``B`` gets a gradient only in the minibatches that take the branch."""

    def __init__(self, d_in: int, width: int) -> None:
        super().__init__()
        self.main = nn.Linear(d_in, width)
        self.side = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.main(x[:, :-1]))
        if bool(x[0, -1] > 0):  # one flag per minibatch (a host read: fine for a benchmark)
            h = h + torch.tanh(self.side(h))
        return h


def stages(width: int, d_in: int, d_out: int) -> List[nn.Module]:
    torch.manual_seed(0)
    return [Branch(d_in, width),
            nn.Sequential(nn.Linear(width, width), nn.Tanh()),
            nn.Sequential(nn.Linear(width, width), nn.Tanh()),
            nn.Linear(width, d_out)]


def batches(n: int, rows: int, d_in: int, d_out: int, every: int) -> List[Tuple[Tensor, Tensor]]:
    """``n`` minibatches of a fixed random regression; minibatch ``j`` takes the branch iff
    ``j % every == 0``."""
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(d_in, d_out, generator=g) / d_in ** 0.5
    out = []
    for j in range(n):
        x = torch.randn(rows, d_in, generator=g)
        flag = torch.full((rows, 1), 1.0 if j % every == 0 else -1.0)
        out.append((torch.cat([x, flag], 1), torch.sin(x @ teacher)))
    return out


def errors(pkg, method: str, opt: Callable, mods: Sequence[nn.Module], data, skip: int) -> List[float]:
    """Mean prediction error per stage with ``s > 0`` (stages 0-2) of ``pkg``'s Pipeline."""
    pipe = pkg.Pipeline(copy.deepcopy(list(mods)), ["cpu"] * len(mods), opt, nn.functional.mse_loss,
                        method=method, track_error=True)
    pipe.train(data)
    return [sum(e[skip:]) / len(e[skip:]) for e in pipe.prediction_errors[:-1]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minibatches", type=int, default=120)
    ap.add_argument("--rows", type=int, default=32)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--skip", type=int, default=12, help="minibatches left out of the means (warm-up)")
    ap.add_argument("--baseline", default=None, help="also measure this git revision (the code before)")
    ap.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = ap.parse_args()
    torch.set_default_dtype(torch.float64)
    d_in, d_out = 16, 4
    mods = stages(args.width, d_in, d_out)
    pkgs = {"now": pipeline_rt}
    tmp = None
    if args.baseline:
        tmp = tempfile.TemporaryDirectory()
        pkgs = {"before": baseline(args.baseline, Path(tmp.name))[1], **pkgs}
    lines = ["| optimizer | branch taken | method | code | error stage 0 (branch) | stage 1 | stage 2 |",
             "|---|---|---|---|---|---|---|"]
    for oname, opt in OPTIMIZERS.items():
        for every, label in ((1, "always"), (3, "1 in 3")):
            data = batches(args.minibatches, args.rows, d_in, d_out, every)
            for method in METHODS:
                for code, pkg in pkgs.items():
                    if method == "pipedream" and code == "before":
                        continue  # no prediction: nothing changed
                    e = errors(pkg, method, opt, mods, data, args.skip)
                    lines.append(f"| {oname} | {label} | {method} | {code} | " + " | ".join(f"{x:.3f}" for x in e) + " |")
                    print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.write:
        text = ("## no_grad_branch: prediction error with a branch taken one minibatch in three\n\n"
                + provenance("cpu")
                + f"* 4 stages (stage 0 a branch: `Linear({d_in}, {args.width})`, then `Linear({args.width}, "
                  f"{args.width})` only in the minibatches that take it), {args.minibatches} minibatches of "
                  f"{args.rows} rows, float64; mean of `Pipeline(track_error=True).prediction_errors` "
                  f"after the first {args.skip} minibatches; `before` = revision {args.baseline}, `now` = "
                  "this tree (a parameter the last step skipped is predicted in place)\n\n" + table)
        write_section(ROOT / "benchmarks" / "RESULTS.md", "no_grad_branch", text)
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
