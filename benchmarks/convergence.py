"""Convergence of every method, per optimizer, per pipeline depth, on the built-in tasks.

For each task (default ``teacher`` and the ``charlm`` transformer), depth (4 and 8) and
optimizer (SGD-momentum, Adam, AdamW) it trains every method from the same initial weights
on the same minibatches (``pipeoptim_compare.cli.run_one``) and prints, side by side, each method's
held-out loss and metric and their ratios to ``sync`` (loss ratio > 1 and metric ratio < 1 are
worse than synchronous training). Writes ``benchmarks/convergence.png`` and the
``convergence`` section of ``benchmarks/RESULTS.md``::

    python benchmarks/convergence.py                       # full grid (tens of CPU-minutes)
    python benchmarks/convergence.py --tasks teacher --depths 4 --minibatches 32   # quick look
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _sections import provenance, write_section  # noqa: E402
from pipeoptim_compare.cli import METHOD_NAMES, OPTIMIZERS, RunResult, run_one  # noqa: E402
from pipeoptim_compare.tasks import get_task  # noqa: E402

Key = Tuple[str, int, str]  # task, depth, optimizer


def _ratio(a: Optional[float], b: Optional[float]) -> str:
    return "-" if a is None or not b else f"{a / b:.2f}"


def table(results: Dict[Key, Dict[str, RunResult]], methods: Sequence[str], metric: Dict[str, str]) -> str:
    """Markdown: one row per (task, depth, optimizer); per method ``eval loss / metric (ratios to sync)``."""
    head = ["task", "depth", "optimizer"] + list(methods)
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (task, depth, opt), by in results.items():
        ref = by.get("sync")
        cells = []
        for m in methods:
            r = by[m]
            s = f"{r.eval_loss:.3f}" + (f" / {r.metric:.3f}" if r.metric is not None else "")
            if ref is not None and m != "sync":
                s += f" ({_ratio(r.eval_loss, ref.eval_loss)}, {_ratio(r.metric, ref.metric)})"
            cells.append(s)
        lines.append(f"| {task} | {depth} | {opt} | " + " | ".join(cells) + " |")
    names = ", ".join(f"{t}: {m}" for t, m in metric.items())
    lines.append(f"\nCells: held-out loss / metric ({names}); in parentheses the ratios to `sync` "
                 "(loss ratio above 1 and metric ratio below 1 are worse than synchronous training).")
    return "\n".join(lines)


def plot(results: Dict[Key, Dict[str, RunResult]], methods: Sequence[str], path: Path) -> None:
    """One panel per (task, depth): held-out loss ratio to sync, bars per optimizer per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = list(dict.fromkeys((t, d) for t, d, _ in results))
    opts = list(dict.fromkeys(o for _, _, o in results))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.6 * len(panels), 3.6), squeeze=False, sharey=True)
    width = 0.8 / len(opts)
    for ax, (task, depth) in zip(axes[0], panels):
        for i, opt in enumerate(opts):
            by = results.get((task, depth, opt))
            if not by or "sync" not in by:
                continue
            ys = [by[m].eval_loss / by["sync"].eval_loss for m in methods]
            ax.bar([j + (i - (len(opts) - 1) / 2) * width for j in range(len(methods))], ys, width, label=opt)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(methods)))
        ax.set_xticklabels(methods, rotation=40, ha="right", fontsize=8)
        ax.set_title(f"{task}, depth {depth}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("held-out loss / sync's")
    axes[0][-1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="teacher,charlm")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--methods", default=",".join(METHOD_NAMES))
    ap.add_argument("--optimizers", default=",".join(OPTIMIZERS))
    ap.add_argument("--epochs", type=int, default=None, help="default: each task's own")
    ap.add_argument("--minibatches", type=int, default=None, help="first N minibatches of each epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu", help="device of every stage")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("convergence.png"))
    ap.add_argument("--write", default=str(Path(__file__).with_name("RESULTS.md")),
                    help="markdown file whose 'convergence' section is replaced ('' to skip)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    methods = args.methods.split(",")
    results: Dict[Key, Dict[str, RunResult]] = {}
    metric: Dict[str, str] = {}
    t0 = time.perf_counter()
    for task in args.tasks.split(","):
        for depth in map(int, args.depths.split(",")):
            probe = get_task(task, depth=depth, seed=args.seed)
            metric[task] = probe.metric_name
            epochs = args.epochs or probe.epochs
            for opt in args.optimizers.split(","):
                by = results.setdefault((task, depth, opt), {})
                for m in methods:
                    r = run_one(probe, m, opt, probe.lr[opt], depth, [args.device] * depth, epochs, args.seed,
                                args.minibatches)
                    by[m] = r
                    print(f"{task:8s} depth {depth} {opt:6s} {m:11s} eval loss {r.eval_loss:.3f} "
                          f"{probe.metric_name} {r.metric:.3f}  ({r.ms_per_minibatch:.0f} ms/minibatch)", flush=True)
    text = table(results, methods, metric)
    print("\n" + text)
    plot(results, methods, args.plot)
    print(f"\nwrote {args.plot} ({time.perf_counter() - t0:.0f} s)")
    if args.write:
        lr = {t: get_task(t, depth=4).lr for t in args.tasks.split(",")}
        section = (f"## Convergence: methods x optimizers x depths\n\n{provenance(args.device)}"
                   f"* settings: epochs {args.epochs or 'task default'}, minibatches per epoch "
                   f"{args.minibatches or 'all'}, seed {args.seed}, learning rates {lr}\n\n"
                   f"{text}\n\n![convergence]({args.plot.name})\n")
        write_section(Path(args.write), "convergence", section)
        print(f"updated {args.write}")


if __name__ == "__main__":
    main()
