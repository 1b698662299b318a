"""Shared parts of ``train_lm.py`` and ``train_cnn.py``: options, one training run per
method with per-epoch evaluation, checkpoints and exact resume, timing, the plot and the table.

An example describes its model and data as a :class:`Task`; :func:`main` parses the common
options, trains every method of ``--method`` on the same seeded model and data, one after
the other, and writes into ``--out``:

* ``plot.png``: training loss per minibatch (smoothed) and the held-out metric per epoch,
  one line per method;
* ``results.md``: a markdown table per method (final train loss, eval loss and metric,
  throughput, peak GPU memory);
* ``results.json``: the same numbers plus every loss, for scripts and tests;
* ``ckpt/<method>/mb00000K`` (or under ``--ckpt-dir``): the runtime's checkpoints, and
  ``history.json``, the evaluations so far.

Epochs and checkpoints. All epochs of a method form one run of the runtime over the
concatenation of the epochs' minibatches: epoch ``e`` extends the run from its final
checkpoint (``resume_from``) with the data of epochs ``0..e`` (the consumed ones are read
again, checked against the checkpoint's fingerprint and dropped), and ``evaluate`` runs
between epochs. ``--resume`` takes the latest complete checkpoint instead, mid-epoch or not,
and continues the same way; the runtime's resume is exact, so the losses, evaluations and
final weights equal those of an uninterrupted run.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

import pipeline_rt
from pipeline_rt import Pipeline, get_method, split_by_size
from pipeline_rt.batchnorm import convert_deferred_batch_norm
from pipeline_rt.checkpoint import latest

Metric = Callable[[Any, Any], Tensor]


@dataclass
class Task:
    """What an example trains.

    Attributes:
        title: a name for the plot and the table.
        build_model: a new model, as an ``nn.Sequential`` of at least ``--stages`` layers
            (called once per method after seeding, so every method starts from the same weights).
        loss_fn: ``loss_fn(output, target)``, a mean over rows.
        metric: ``metric(output, target)``, a mean over rows (e.g. accuracy).
        metric_name: what ``metric`` is, for the plot and the table.
        train_loader: ``train_loader(epoch)``: that epoch's minibatches (seeded by the epoch,
            so any epoch can be produced again, in any process; ``drop_last``).
        val_loader: the held-out minibatches.
        units_per_minibatch: tokens or images in one minibatch (throughput).
        unit: what those units are (``"tokens"``, ``"images"``).
        split: ``split(model, stages)``: the stage modules (default: an ``nn.Sequential``
            split by parameter count); e.g. :func:`pipeline_rt.split_model` for any model.
    """

    title: str
    build_model: Callable[[], nn.Module]
    loss_fn: Callable[[Any, Any], Tensor]
    metric: Metric
    metric_name: str
    train_loader: Callable[[int], DataLoader]
    val_loader: DataLoader
    units_per_minibatch: int
    unit: str
    split: Callable[[nn.Module, int], List[nn.Module]] = split_by_size


@dataclass
class MethodResult:
    """One method's run: per-minibatch losses, evaluation after every epoch, throughput."""

    method: str
    chunks: int
    losses: List[float]
    evals: List[Dict[str, float]]  # {"epoch", "step", "loss", "metric"} after each epoch
    train_seconds: float = 0.0     # host time in train() of this process (resumed part only)
    trained: int = 0               # minibatches trained by this process
    peak_mib: Optional[float] = None
    extra: Dict[str, Any] = field(default_factory=dict)

    def throughput(self, units_per_minibatch: int) -> float:
        """Units (tokens, images) per second of this process's training."""
        return self.trained * units_per_minibatch / self.train_seconds if self.train_seconds else float("nan")

    def final_train_loss(self) -> float:
        """Mean of the last tenth of the minibatch losses (at least one)."""
        tail = self.losses[-max(1, len(self.losses) // 10):]
        return sum(tail) / len(tail)


class Concat:
    """Epochs ``0..last`` of ``loader_of`` back to back: the data of a run extended epoch
    by epoch (a sized iterable, so the progress bar knows its total)."""

    def __init__(self, loader_of: Callable[[int], DataLoader], last: int) -> None:
        self.loader_of, self.last = loader_of, last

    def __len__(self) -> int:
        return sum(len(self.loader_of(e)) for e in range(self.last + 1))

    def __iter__(self) -> Iterator[Tuple[Any, Any]]:
        for e in range(self.last + 1):
            yield from self.loader_of(e)


def add_arguments(parser: argparse.ArgumentParser, sizes: Sequence[str]) -> None:
    """The options both examples share (``None`` defaults come from the ``--size`` preset)."""
    methods = ", ".join(pipeline_rt.METHODS)
    parser.add_argument("--method", default="sync,pipedream,pipeoptim,pipeoptim-calroll",
                        help=f"one or several comma-separated methods, run one after the other ({methods})")
    parser.add_argument("--size", choices=list(sizes), default=None, help="model and data preset")
    parser.add_argument("--tiny", action="store_true", help="same as --size tiny: a few minutes on 2 CPU cores")
    parser.add_argument("--devices", default="cpu",
                        help="comma-separated, one per stage (e.g. cuda:0,cuda:0,cuda:0,cuda:0: stages may share "
                             "a device); a single device is used for every stage")
    parser.add_argument("--stages", type=int, default=None, help="pipeline stages (default: number of devices "
                        "given, or 4 with a single device)")
    parser.add_argument("--epochs", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None, help="rows per minibatch")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (AdamW)")
    parser.add_argument("--weight-decay", type=float, default=0.01)
    parser.add_argument("--warmup", type=float, default=0.05, help="warm-up, as a fraction of the steps")
    parser.add_argument("--clip", type=float, default=1.0, help="gradient clipping (2-norm per stage)")
    parser.add_argument("--max-steps", type=int, default=None,
                        help="stop after this many minibatches in all (the lr schedule ends there)")
    parser.add_argument("--checkpoint-every", type=int, default=None, help="minibatches between checkpoints "
                        "(default: at the end of each epoch only)")
    parser.add_argument("--resume", action="store_true",
                        help="continue each method from its latest checkpoint in --out/ckpt")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="out", help="folder for the plot, table, results and checkpoints")
    parser.add_argument("--ckpt-dir", default=None, help="checkpoints go to CKPT_DIR/<method> (default: --out/ckpt)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bar")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op CPU threads (default: torch's)")


def resolve(args: argparse.Namespace, presets: Dict[str, Dict[str, Any]], default: str) -> Dict[str, Any]:
    """The preset of ``--size`` (``--tiny``: ``tiny``) with the options given on the command
    line filled in over it; ``args.stages`` and ``args.devices`` resolved."""
    size = "tiny" if args.tiny else (args.size or default)
    preset = dict(presets[size], size=size)
    for key in ("epochs", "batch_size", "lr"):
        if getattr(args, key) is not None:
            preset[key] = getattr(args, key)
        setattr(args, key, preset[key])
    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    if args.stages is None:
        args.stages = len(devices) if len(devices) > 1 else 4
    if len(devices) == 1:
        devices = devices * args.stages
    if len(devices) != args.stages:
        raise SystemExit(f"--devices names {len(devices)} devices for {args.stages} stages; give one per stage "
                         f"or a single one")
    args.devices = devices
    args.methods = [m.strip() for m in args.method.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in pipeline_rt.METHODS]
    if unknown:
        raise SystemExit(f"unknown method(s) {unknown}; choose from {', '.join(pipeline_rt.METHODS)}")
    return preset


def warmup_cosine(total: int, warmup: int) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    """A scheduler factory: linear warm-up over ``warmup`` steps to the optimizer's lr, then
    a cosine decay to a tenth of it at step ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, factor)


def _cuda_devices(devices: Sequence[str]) -> List[torch.device]:
    return sorted({torch.device(d) for d in devices if torch.device(d).type == "cuda"}, key=str)


def _sync(devices: Sequence[torch.device]) -> None:
    for d in devices:
        torch.cuda.synchronize(d)


def _latest_done(folder: Path) -> int:
    """Minibatches done at the latest usable checkpoint in ``folder`` (0: no checkpoint there
    yet). Checkpoints there of which none can be used raise :class:`CheckpointError` (naming
    why) rather than silently starting over."""
    if not any(folder.glob("mb*")):
        return 0
    return int(latest(folder).name[2:])


def train_method(task: Task, method: str, args: argparse.Namespace) -> MethodResult:
    """Train ``method`` epoch by epoch (evaluating after each), checkpointing into
    ``args.ckpt_dir/method``; with ``args.resume`` continue from the latest checkpoint there."""
    folder = Path(args.ckpt_dir or Path(args.out) / "ckpt") / method
    history = folder / "history.json"
    if not args.resume:
        shutil.rmtree(folder, ignore_errors=True)
    per_epoch = len(task.train_loader(0))
    total = per_epoch * args.epochs if args.max_steps is None else min(per_epoch * args.epochs, args.max_steps)
    chunks = get_method(method).num_chunks(args.stages)

    torch.manual_seed(args.seed)
    stages = task.split(task.build_model(), args.stages)
    if chunks > 1:  # running statistics once per minibatch (see pipeline_rt.batchnorm); a no-op without BatchNorm
        stages = [convert_deferred_batch_norm(s, chunks) for s in stages]
    pipe = Pipeline(stages, args.devices,
                    lambda ps: torch.optim.AdamW(ps, lr=args.lr, weight_decay=args.weight_decay),
                    task.loss_fn, method=method, lr_scheduler=warmup_cosine(total, max(1, int(args.warmup * total))),
                    clip_grad_norm=args.clip)

    done = _latest_done(folder) if args.resume else 0
    evals: List[Dict[str, float]] = json.loads(history.read_text()) if done and history.is_file() else []
    evals = [e for e in evals if e["step"] <= done]
    result = MethodResult(method, chunks, [], evals)
    cuda = _cuda_devices(args.devices)
    for d in cuda:
        torch.cuda.reset_peak_memory_stats(d)
    for epoch in range(done // per_epoch, args.epochs):
        if done >= total:
            break
        _sync(cuda)
        t0 = time.perf_counter()
        result.losses = pipe.train(Concat(task.train_loader, epoch), max_steps=total, progress=not args.no_progress,
                                   checkpoint_every=args.checkpoint_every, checkpoint_dir=folder,
                                   resume_from=folder if done else None)
        _sync(cuda)
        result.train_seconds += time.perf_counter() - t0
        result.trained += len(result.losses) - done
        done = len(result.losses)
        ev = pipe.evaluate(task.val_loader, metric=task.metric)
        result.evals.append({"epoch": epoch, "step": done, "loss": float(ev["loss"] or 0.0),
                             "metric": float(ev["metric"] or 0.0)})
        history.write_text(json.dumps(result.evals))
        print(f"{method} epoch {epoch}: train loss {result.losses[-1]:.4f}, eval loss {ev['loss']:.4f}, "
              f"{task.metric_name} {ev['metric']:.4f}", flush=True)
    if cuda:
        result.peak_mib = sum(torch.cuda.max_memory_allocated(d) for d in cuda) / 2 ** 20
    result.extra["peak_versions"] = pipe.peak_versions
    return result


def _smooth(values: Sequence[float], alpha: float = 0.05) -> List[float]:
    out, avg = [], values[0]
    for v in values:
        avg = (1 - alpha) * avg + alpha * v
        out.append(avg)
    return out


def write_plot(task: Task, results: Sequence[MethodResult], path: Path) -> None:
    """Training loss per minibatch (exponentially smoothed) with the eval loss at each
    epoch's end, and the held-out metric per epoch, one colour per method."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(11, 4))
    for r, colour in zip(results, plt.rcParams["axes.prop_cycle"].by_key()["color"] * len(results)):
        if r.losses:
            ax_loss.plot(range(1, len(r.losses) + 1), _smooth(r.losses), color=colour, label=f"{r.method} (train)")
        steps = [e["step"] for e in r.evals]
        ax_loss.plot(steps, [e["loss"] for e in r.evals], "o--", color=colour, label=f"{r.method} (eval)")
        ax_metric.plot([e["epoch"] + 1 for e in r.evals], [e["metric"] for e in r.evals], "o-", color=colour,
                       label=r.method)
    ax_loss.set(xlabel="minibatch", ylabel="loss", title=f"{task.title}: loss")
    ax_metric.set(xlabel="epoch", ylabel=task.metric_name, title=f"{task.title}: held-out {task.metric_name}")
    ax_loss.legend(fontsize=7)
    ax_metric.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(task: Task, results: Sequence[MethodResult]) -> str:
    """The markdown table of the methods side by side."""
    lines = [f"| method | chunks | minibatches | final train loss | eval loss | eval {task.metric_name} "
             f"| {task.unit}/s | peak GPU memory (MiB) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        last = r.evals[-1] if r.evals else {"loss": float("nan"), "metric": float("nan")}
        mem = "-" if r.peak_mib is None else f"{r.peak_mib:.0f}"
        lines.append(f"| {r.method} | {r.chunks} | {len(r.losses)} | {r.final_train_loss():.4f} | {last['loss']:.4f} "
                     f"| {last['metric']:.4f} | {r.throughput(task.units_per_minibatch):.0f} | {mem} |")
    return "\n".join(lines)


def main(task_of: Callable[[argparse.Namespace, Dict[str, Any]], Task], presets: Dict[str, Dict[str, Any]],
         default: str, description: Optional[str]) -> List[MethodResult]:
    """Parse the options, build the task, train every method and write the outputs."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, list(presets))
    args = parser.parse_args()
    preset = resolve(args, presets, default)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if any(torch.device(d).type == "cuda" for d in args.devices):
        torch.set_float32_matmul_precision("high")  # TF32 matmuls
    task = task_of(args, preset)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"{task.title}: size {preset['size']}, {args.stages} stages on {','.join(args.devices)}, "
          f"{len(task.train_loader(0))} minibatches per epoch x {args.epochs} epochs, batch {args.batch_size}",
          flush=True)
    results = [train_method(task, m, args) for m in args.methods]
    write_plot(task, results, out / "plot.png")
    text = table(task, results)
    (out / "results.md").write_text(text + "\n")
    (out / "results.json").write_text(json.dumps({
        "task": task.title, "size": preset["size"], "devices": args.devices, "unit": task.unit,
        "metric": task.metric_name,
        "methods": [{**asdict(r), "throughput": r.throughput(task.units_per_minibatch),
                     "final_train_loss": r.final_train_loss()} for r in results]}, indent=1))
    print(text)
    print(f"wrote {out / 'plot.png'}, {out / 'results.md'}, {out / 'results.json'}")
    return results
