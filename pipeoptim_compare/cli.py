"""``pipeoptim compare``: train one task with every method and optimizer, side by side.

With no arguments it trains the built-in ``teacher`` task on an 8-stage CPU pipeline with
the seven methods (``sync``, ``1f1b-flush``, ``async``, ``pipedream``, ``2bw``,
``spectrain``, ``pipeoptim``) for SGD-momentum, Adam and AdamW, prints a table and writes
``loss_curves.png``, ``results.md`` and ``results.csv`` into ``./runs/compare-<time>``.

Every run starts from the same initial weights and sees the same minibatches in the same
order (the task is rebuilt from its seed), so the columns differ only by method.
"""
from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch
from torch import nn

from pipeline_rt import Pipeline
from pipeline_rt.methods import METHODS, get_method

from .tasks import TASKS, Task, evaluate, get_task

__all__ = ["main", "compare", "RunResult", "OPTIMIZERS", "METHOD_NAMES"]

#: the methods of the docs' method table (:doc:`methods`), run by default; ``--methods`` accepts any name in ``METHODS``
METHOD_NAMES = ("sync", "1f1b-flush", "async", "pipedream", "2bw", "spectrain", "pipeoptim")

OptFactory = Callable[[Sequence[nn.Parameter], float], torch.optim.Optimizer]
#: optimizer name -> ``factory(params, lr)``; SGD with momentum 0.9, AdamW with decay 0.01
OPTIMIZERS: Dict[str, OptFactory] = {
    "sgd": lambda ps, lr: torch.optim.SGD(ps, lr=lr, momentum=0.9),
    "adam": lambda ps, lr: torch.optim.Adam(ps, lr=lr),
    "adamw": lambda ps, lr: torch.optim.AdamW(ps, lr=lr, weight_decay=0.01),
}


@dataclass
class RunResult:
    """One (method, optimizer) run.

    Attributes:
        losses: training loss of every minibatch, in order.
        final_loss: mean training loss over the last 10% of minibatches.
        eval_loss, metric: on the task's held-out data (``None`` without any).
        ms_per_minibatch: wall time of ``train`` divided by the number of minibatches.
        weight_mb: per stage, peak weight memory (versions held x the stage's parameter bytes), MB.
        pred_error: per stage, mean relative prediction error
            ``||W_hat - W_B|| / ||W_B - W_F||`` (``None`` where the method does not predict).
    """

    method: str
    optimizer: str
    lr: float
    losses: List[float]
    final_loss: float
    eval_loss: Optional[float]
    metric: Optional[float]
    ms_per_minibatch: float
    weight_mb: List[float] = field(default_factory=list)
    pred_error: List[Optional[float]] = field(default_factory=list)


def _devices(spec: str, depth: int) -> List[str]:
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    if len(devs) == 1:
        return devs * depth
    if len(devs) != depth:
        raise SystemExit(f"--devices: give one device or exactly {depth} (one per stage), got {len(devs)}")
    return devs


def run_one(task_name: str, method: str, optimizer: str, lr: float, depth: int, devices: List[str],
            epochs: int, seed: int = 0, minibatches: Optional[int] = None) -> RunResult:
    """Build the task from its seed, train it with one method and optimizer, measure.

    ``minibatches`` keeps only the first that many minibatches of each epoch.
    """
    task = get_task(task_name, depth=depth, seed=seed)
    stages = task.split(depth)
    for st, dev in zip(stages, devices):
        st.to(dev)
    make = OPTIMIZERS[optimizer]
    predicts = get_method(method).predicts
    pipe = Pipeline(stages, devices, lambda ps: make(list(ps), lr), task.loss_fn, method=method,
                    track_error=predicts)
    batches = list(task.batches)[:minibatches] * epochs
    t0 = time.perf_counter()
    losses = [float(x) for x in pipe.train(batches)]
    elapsed = time.perf_counter() - t0
    tail = max(1, len(losses) // 10)
    final = sum(losses[-tail:]) / tail
    ev_loss = ev_metric = None
    if task.eval_data is not None:
        ev_loss, ev_metric = evaluate(pipe.stages, task.eval_data, task.loss_fn, task.metric, devices)
    mb = [(v or 1) * sum(p.numel() * p.element_size() for p in st.parameters()) / 2**20
          for v, st in zip(pipe.peak_versions, pipe.stages)]
    errors = [sum(e) / len(e) if e else None for e in pipe.prediction_errors] if predicts else []
    return RunResult(method, optimizer, lr, losses, final, ev_loss, ev_metric,
                     1000 * elapsed / len(batches), mb, errors)


#: printed under the table: what its time column includes
TIMING_NOTE = ("ms/minibatch: wall time of train() here. For the predicting methods it includes measuring the "
               "prediction error (copies of the stage's weights at each forward, two norms at each backward); "
               "benchmarks/pipeline_step.py times the methods without it.")


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _per_stage(xs: Sequence[Optional[float]], spec: str) -> str:
    return "-" if all(x is None for x in xs) else " ".join(_fmt(x, spec) for x in xs)


def table_rows(results: Sequence[RunResult], metric_name: str) -> List[List[str]]:
    """Header plus one row per run (strings), in the order of ``results``."""
    rows = [["optimizer", "method", "lr", "train loss", "eval loss", metric_name, "ms/minibatch",
             "weight MB per stage", "pred. error per stage"]]
    for r in results:
        rows.append([r.optimizer, r.method, f"{r.lr:g}", _fmt(r.final_loss), _fmt(r.eval_loss), _fmt(r.metric),
                     _fmt(r.ms_per_minibatch, ".1f"), _per_stage(r.weight_mb, ".2f"),
                     _per_stage(r.pred_error, ".2f")])
    return rows


def markdown(rows: List[List[str]]) -> str:
    """A GitHub-flavoured markdown table."""
    head, body = rows[0], rows[1:]
    out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    out += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(out)


def plain(rows: List[List[str]]) -> str:
    """A fixed-width text table for the terminal."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _smooth(xs: Sequence[float], k: int) -> List[float]:
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= k:
            acc -= xs[i - k]
        out.append(acc / min(i + 1, k))
    return out


def plot(results: Sequence[RunResult], path: Path, title: str) -> None:
    """Training-loss curves, one panel per optimizer, one line per method (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(dict.fromkeys(r.optimizer for r in results))
    fig, axes = plt.subplots(1, len(opts), figsize=(4.2 * len(opts), 3.4), squeeze=False, sharey=True)
    styles = {"sync": ("k", "-"), "1f1b-flush": ("0.55", "--"), "async": ("tab:orange", ":"),
              "pipedream": ("tab:red", "-"), "2bw": ("tab:purple", "-."), "spectrain": ("tab:green", "--"),
              "pipeoptim": ("tab:blue", "-"), "pipeoptim-cal": ("tab:cyan", "--")}
    for ax, opt in zip(axes[0], opts):
        for r in results:
            if r.optimizer != opt:
                continue
            color, ls = styles.get(r.method, (None, "-"))
            k = max(1, len(r.losses) // 25)
            ax.plot(_smooth(r.losses, k), label=r.method, color=color, linestyle=ls, linewidth=1.4)
        ax.set_title(f"{opt}")
        ax.set_xlabel("minibatch")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("training loss (moving average)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_all(task: str, depth: int, methods: Sequence[str], optimizers: Sequence[str], epochs: int,
             lr: Optional[float], devs: List[str], seed: int, progress: bool, probe: Task,
             minibatches: Optional[int]) -> List[RunResult]:
    from tqdm import tqdm

    jobs = [(o, m) for o in optimizers for m in methods]
    results: List[RunResult] = []
    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress, file=sys.stderr)
    for o, m in bar:
        bar.set_postfix_str(f"{o} {m}")
        rate = lr if lr is not None else probe.lr.get(o, 1e-3)
        results.append(run_one(task, m, o, rate, depth, devs, epochs, seed, minibatches))
    bar.close()
    return results


def compare(task: str = "teacher", depth: int = 8, methods: Sequence[str] = METHOD_NAMES,
            optimizers: Sequence[str] = tuple(OPTIMIZERS), epochs: Optional[int] = None,
            lr: Optional[float] = None, devices: str = "cpu", out: Optional[Path] = None,
            seed: int = 0, progress: bool = True, threads: Optional[int] = None,
            minibatches: Optional[int] = None) -> List[RunResult]:
    """Run every (optimizer, method) pair and write the table and plot into ``out``.

    ``threads`` sets ``torch.set_num_threads`` for the run (default: 1 when every stage is
    on the CPU: the built-in models are small, and one process runs the stages one after
    another, so intra-op threads only add overhead and contention); the previous setting
    is restored on return. ``minibatches`` keeps the first that many of each epoch.
    """
    probe = get_task(task, depth=depth, seed=seed)
    epochs = epochs or probe.epochs
    devs = _devices(devices, depth)
    out = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    if threads is None and all(torch.device(d).type == "cpu" for d in devs):
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        results = _run_all(task, depth, methods, optimizers, epochs, lr, devs, seed, progress, probe, minibatches)
    finally:
        torch.set_num_threads(old_threads)
    rows = table_rows(results, probe.metric_name if probe.metric else "metric")
    (out / "results.md").write_text(
        f"# pipeoptim compare: task {task}, depth {depth}, {epochs} epoch(s) of "
        f"{len(probe.batches[:minibatches])} minibatches, "
        f"devices {devices}\n\n" + markdown(rows) + "\n\n" + TIMING_NOTE + "\n", encoding="utf-8")
    with open(out / "results.csv", "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with open(out / "losses.csv", "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "method", "minibatch", "loss"])
        for r in results:
            w.writerows([r.optimizer, r.method, i, f"{x:.6g}"] for i, x in enumerate(r.losses))
    plot(results, out / "loss_curves.png",
         f"task {task}, {depth} stages, {epochs} epoch(s); same data and initial weights for every method")
    print(plain(rows))
    print("\n" + TIMING_NOTE)
    print(f"\nwrote {out / 'loss_curves.png'}, {out / 'results.md'}, {out / 'results.csv'}")
    return results


def _csv_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(s: str) -> List[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(choices)}")
        return items
    return parse


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeoptim`` argument parser."""
    p = argparse.ArgumentParser(prog="pipeoptim", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train a task with every method and optimizer; table + plot")
    c.add_argument("--task", default="teacher", help=f"built-in task ({', '.join(TASKS)}) [teacher]")
    c.add_argument("--entry", metavar="MODULE:FUNCTION",
                   help="your own task: a function returning (model_or_stages, batches[, loss_fn])")
    c.add_argument("--depth", type=int, default=8, help="pipeline stages [8]")
    c.add_argument("--methods", type=_csv_list(tuple(METHODS)), default=list(METHOD_NAMES),
                   help=f"comma-separated, from {', '.join(METHODS)} [the first seven]")
    c.add_argument("--optimizers", type=_csv_list(tuple(OPTIMIZERS)), default=list(OPTIMIZERS),
                   help="comma-separated optimizers [sgd,adam,adamw]")
    c.add_argument("--epochs", type=int, default=None, help="epochs [the task's default]")
    c.add_argument("--minibatches", type=int, default=None, help="use only the first N minibatches of each epoch")
    c.add_argument("--lr", type=float, default=None, help="learning rate for every optimizer [the task's per optimizer]")
    c.add_argument("--devices", default="cpu", help="one device for all stages, or one per stage, comma-separated [cpu]")
    c.add_argument("--out", type=Path, default=None, help="output folder [runs/compare-<time>]")
    c.add_argument("--seed", type=int, default=0, help="seed of data and initial weights [0]")
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads [1 on CPU]")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``pipeoptim`` and ``python -m pipeoptim_compare``)."""
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        compare(task=args.entry or args.task, depth=args.depth, methods=args.methods,
                optimizers=args.optimizers, epochs=args.epochs, lr=args.lr, devices=args.devices,
                out=args.out, seed=args.seed, progress=not args.no_progress,
                threads=args.threads, minibatches=args.minibatches)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
