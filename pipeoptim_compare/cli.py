"""``pipeoptim compare``: train one task with every method and optimizer, side by side.

With no arguments it trains the built-in ``teacher`` task on an 8-stage CPU pipeline with
``sync`` (the reference: sequential training), the recommended method
(:data:`pipeline_rt.RECOMMENDED`), the paper's ``pipeoptim`` and ``pipedream`` for
SGD-momentum, Adam and AdamW (``--methods`` takes any of ``METHODS``), prints a table and the
verdict (:mod:`pipeoptim_compare.verdict`: each method's gap to ``sync`` and its minibatches
and simulated time to a target loss) and writes ``results.md``, ``results.csv``, ``losses.csv``
and ``loss_curves.png`` into ``./runs/compare-<time>``. ``--readme README.md`` also rewrites
the block of ``README.md`` between :data:`README_BEGIN` and :data:`README_END` with that table
and verdict, the command line, the date, the device, the load and the run's times
(:func:`readme_block`).

Time: one process runs every stage in turn, so its wall time is not a pipeline's. The table's
``sim ms`` (per minibatch) is a pipeline of ``depth`` devices instead: the method's schedule on
the clock of :mod:`pipeline_rt.clock`, with each stage's F, B and STEP costs measured here in a short
separate run of the same pipeline (:func:`pipeline_rt.clock.measure_costs`).

Every run starts from the same initial weights and sees the same minibatches in the same
order (the task is built once from ``--seed`` and copied for every run, which is also seeded),
so the columns differ only by method.
"""
from __future__ import annotations

import argparse
import copy
import csv
import math
import os
import platform
import shlex
import sys
import textwrap
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from pipeline_rt import Pipeline
from pipeline_rt.clock import StageCosts, measure_costs
from pipeline_rt.methods import METHODS, RECOMMENDED, get_method

from .batchnorm import MODES as BATCH_NORM_MODES
from .batchnorm import BatchNormError, prepare_batch_norm
from .tasks import TASKS, EntryPointError, Task, entry_parts, evaluate, get_task, set_bn_chunks
from .verdict import FACTOR, closest_lines, verdict, verdict_rows

__all__ = ["main", "compare", "load_task", "run_one", "RunResult", "OPTIMIZERS", "METHOD_NAMES", "readme_block",
           "replace_block", "describe_devices", "ReadmeError", "README_BEGIN", "README_END"]

#: run by default: the reference, the recommended method, the paper's and PipeDream; ``--methods`` takes any of
#: ``METHODS``
METHOD_NAMES = ("sync", RECOMMENDED, "pipeoptim", "pipedream")

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
        ms_per_minibatch: wall time of ``train`` divided by the number of minibatches (host
            time of this one process running every stage in turn, not a pipeline's).
        weight_mb: per stage, peak weight memory (versions held x the stage's parameter bytes), MB.
        pred_error: per stage, mean relative prediction error
            ``||W_hat - W_B|| / ||W_B - W_F||`` (``None`` where the method does not predict).
        costs: the per-stage action costs measured for the simulated pipeline clock
            (:func:`measure_all`), ``None`` when not measured; ``clock_s``: the seconds that
            measurement took.
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
    costs: Optional[StageCosts] = None
    clock_s: float = 0.0

    @property
    def sim_ms_per_minibatch(self) -> Optional[float]:
        """Milliseconds per minibatch of the simulated N-device pipeline, steady state
        (:meth:`StageCosts.period`); ``None`` without measured costs."""
        return None if self.costs is None else 1000 * self.costs.period()


def _devices(spec: str, depth: int) -> List[str]:
    devs = [d.strip() for d in spec.split(",") if d.strip()]
    if len(devs) == 1:
        return devs * depth
    if len(devs) != depth:
        raise SystemExit(f"--devices: give one device or exactly {depth} (one per stage), got {len(devs)}")
    return devs


def _pipeline(task: Task, method: str, optimizer: str, lr: float, depth: int, devices: List[str],
              track_error: bool) -> Pipeline:
    """A pipeline of a copy of ``task``'s stages (the task is left as it was)."""
    stages = copy.deepcopy(task.split(depth))
    for st, dev in zip(stages, devices):
        st.to(dev)
    make = OPTIMIZERS[optimizer]
    set_bn_chunks(stages, get_method(method).num_chunks(depth))  # a task's DeferredBatchNorms commit once per minibatch
    return Pipeline(stages, devices, lambda ps: make(list(ps), lr), task.loss_fn, method=method,
                    track_error=track_error)


def run_one(task: Task, method: str, optimizer: str, lr: float, depth: int, devices: List[str],
            epochs: int, seed: int = 0, minibatches: Optional[int] = None) -> RunResult:
    """Train a copy of ``task``'s model with one method and optimizer, measure.

    The task is not changed, so every run on it starts from the same weights; the run seeds
    torch from ``seed`` (dropout and other randomness in training repeat across methods).
    ``minibatches`` keeps only the first that many minibatches of each epoch. The stage costs
    (:attr:`RunResult.costs`) are left to :func:`measure_all`.
    """
    predicts = get_method(method).predicts
    pipe = _pipeline(task, method, optimizer, lr, depth, devices, track_error=predicts)
    epoch = list(task.batches)[:minibatches]
    batches = epoch * epochs
    torch.manual_seed(seed)
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


#: rounds of stage-cost measurements per run (:func:`measure_all`)
COST_ROUNDS = 3


def measure_all(task: Task, results: Sequence[RunResult], depth: int, devices: List[str],
                minibatches: Optional[int] = None, rounds: int = COST_ROUNDS, progress: bool = False) -> None:
    """Set every run's :attr:`RunResult.costs`: per run, a pipeline like its own (a fresh copy of
    ``task``'s stages, no prediction-error measurement) whose F, B and STEP are timed by
    :func:`pipeline_rt.clock.measure_costs` (``2N + max(8, N)`` minibatches of one epoch, cycled),
    in ``rounds`` rounds that each measure every run once in turn; per action the least of the
    rounds' medians. Interleaving spreads each run's rounds over the whole measurement, so that a
    burst of other work on the machine rarely hits all of them."""
    from tqdm import tqdm

    epoch = list(task.batches)[:minibatches]
    pipes = [_pipeline(task, r.method, r.optimizer, r.lr, depth, devices, track_error=False) for r in results]
    for r in results:
        r.costs, r.clock_s = None, 0.0
    bar = tqdm(total=rounds * len(results), desc="stage costs", unit="run", disable=not progress, file=sys.stderr)
    for _ in range(rounds):
        for r, pipe in zip(results, pipes):
            t0 = time.perf_counter()
            c = measure_costs(pipe, epoch, repeat=max(8, depth))
            r.costs = c if r.costs is None else r.costs.least(c)
            r.clock_s += time.perf_counter() - t0
            bar.update()
    bar.close()


#: columns of the printed table and notes (the full table goes to results.md)
WIDTH = 100

#: under the table in results.md and the README: what its time columns are
TIMING_NOTE = ("sim ms (sim ms/mb in results.md): milliseconds per minibatch of a pipeline of one device per "
               "stage, simulated (pipeline_rt.clock): the method's schedule, steady state, transfers free, each "
               "F, B and STEP taking that stage's cost measured here in a short separate run of the same pipeline "
               "(median over the steady-state minibatches; the least of 3 rounds, each measuring every run in "
               "turn; CPU time on one CPU thread, so that other jobs count less). host ms/mb (results.md only): "
               "the wall time of train() in this one process, which runs every stage in turn (and, for the "
               "predicting methods, measures the prediction error): the runtime's work, not a pipeline's time.")


def columns_line(depth: int) -> str:
    """The one line printed under the terminal table: what its time column is."""
    return f"sim ms: ms per minibatch on {depth} devices, simulated from stage costs measured here; not wall time"


def wrap(text: str, **options: Any) -> str:
    """``text`` in lines of at most :data:`WIDTH` characters (terminal, results.md, README);
    ``options`` go to :func:`textwrap.fill`."""
    return textwrap.fill(text, WIDTH, break_on_hyphens=False, break_long_words=False, **options)


def _fmt(x: Optional[float], spec: str = ".3f") -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def _per_stage(xs: Sequence[Optional[float]], spec: str) -> str:
    return "-" if all(x is None for x in xs) else " ".join(_fmt(x, spec) for x in xs)


def table_rows(results: Sequence[RunResult], metric_name: str) -> List[List[str]]:
    """Header plus one row per run (strings), in the order of ``results``: every column,
    per stage ones included (``results.md`` and ``results.csv``)."""
    rows = [["optimizer", "method", "lr", "train loss", "eval loss", metric_name, "sim ms/mb",
             "host ms/mb", "weight MB per stage", "pred. error per stage"]]
    for r in results:
        rows.append([r.optimizer, r.method, f"{r.lr:g}", _fmt(r.final_loss), _fmt(r.eval_loss), _fmt(r.metric),
                     _short(r.sim_ms_per_minibatch), _short(r.ms_per_minibatch), _per_stage(r.weight_mb, ".2f"),
                     _per_stage(r.pred_error, ".2f")])
    return rows


def _mean(xs: Sequence[Optional[float]]) -> Optional[float]:
    known = [x for x in xs if x is not None]
    return sum(known) / len(known) if known else None


def _short(x: Optional[float]) -> str:
    """Three significant digits, at most two decimals (``0.52``, ``12.3``, ``12346``)."""
    return _fmt(x, ".2f" if x is None or abs(x) < 10 else ".1f" if abs(x) < 100 else ".0f")


def terminal_rows(results: Sequence[RunResult], metric_name: str) -> List[List[str]]:
    """The printed table: :func:`table_rows` with the per-stage columns summed (weight MB of
    all stages) or averaged (prediction error over the stages that predict), so that it fits in
    :data:`WIDTH` columns at any depth; the host wall time left out (it is not a pipeline's)."""
    rows = [["opt", "method", "lr", "train loss", "eval loss", metric_name, "sim ms", "weight MB", "pred. err"]]
    for r in results:
        rows.append([r.optimizer, r.method, f"{r.lr:g}", _fmt(r.final_loss), _fmt(r.eval_loss), _fmt(r.metric),
                     _short(r.sim_ms_per_minibatch), _short(sum(r.weight_mb) if r.weight_mb else None),
                     _fmt(_mean(r.pred_error), ".2f")])
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


#: colour and line style per method in the plot (others: matplotlib's colour cycle, solid)
STYLES = {"sync": ("k", "-"), "1f1b-flush": ("0.55", "--"), "async": ("tab:orange", ":"),
          "pipedream": ("tab:red", "-"), "2bw": ("tab:purple", "-."), "spectrain": ("tab:green", "--"),
          "pipeoptim": ("tab:blue", "-"), "pipeoptim-cal": ("tab:cyan", "--"),
          "pipeoptim-rollout": ("tab:pink", "-."), "pipeoptim-calroll": ("tab:brown", "-"),
          "2bw-dm": ("tab:olive", "-")}


def figure(results: Sequence[RunResult], title: str, metric_name: str) -> Any:
    """The comparison figure: per optimizer, a column of two panels: the training-loss curves
    (one line per method) and the held-out metric per method (the held-out loss where the task
    has no metric; the panel is left out without held-out data). Returns the matplotlib figure."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    opts = list(dict.fromkeys(r.optimizer for r in results))
    methods = list(dict.fromkeys(r.method for r in results))
    use_metric = any(r.metric is not None for r in results)
    held = use_metric or any(r.eval_loss is not None for r in results)
    fig, axes = plt.subplots(2 if held else 1, len(opts), figsize=(max(6.4, 4.2 * len(opts)), 6.4 if held else 3.8),
                             squeeze=False, sharey="row", layout="constrained")
    colors = {m: STYLES.get(m, (f"C{i % 10}", "-")) for i, m in enumerate(methods)}
    for j, opt in enumerate(opts):
        mine = [r for r in results if r.optimizer == opt]
        ax = axes[0][j]
        for r in mine:
            color, ls = colors[r.method]
            k = max(1, len(r.losses) // 25)
            ax.plot(_smooth(r.losses, k), label=r.method, color=color, linestyle=ls, linewidth=1.4)
        ax.set_title(opt)
        ax.set_xlabel("minibatch")
        ax.grid(alpha=0.3)
        if held:
            bars = axes[1][j]
            values = [(r.metric if use_metric else r.eval_loss) for r in mine]
            drawn = bars.bar(range(len(mine)), [v if v is not None else 0.0 for v in values],
                             color=[colors[r.method][0] for r in mine])
            bars.bar_label(drawn, labels=[_fmt(v, ".3g") for v in values], fontsize=7, padding=1)
            bars.margins(y=0.12)  # room above the tallest bar for its value
            bars.set_xticks(range(len(mine)), [r.method for r in mine], rotation=45, ha="right", fontsize=8)
            bars.grid(alpha=0.3, axis="y")
    axes[0][0].set_ylabel("training loss (moving average)")
    if held:
        axes[1][0].set_ylabel(f"held-out {metric_name if use_metric else 'loss'}")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncols=min(len(labels), 5), fontsize=8)
    fig.suptitle("\n".join(textwrap.wrap(title, width=int(11 * fig.get_figwidth()))), fontsize=10)
    return fig


def plot(results: Sequence[RunResult], path: Path, title: str, metric_name: str = "metric") -> None:
    """:func:`figure`, saved as a PNG."""
    import matplotlib.pyplot as plt

    fig = figure(results, title, metric_name)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _run_all(task: Task, depth: int, methods: Sequence[str], optimizers: Sequence[str], epochs: int,
             lr: Optional[float], devs: List[str], seed: int, progress: bool,
             minibatches: Optional[int]) -> List[RunResult]:
    from tqdm import tqdm

    jobs = [(o, m) for o in optimizers for m in methods]
    results: List[RunResult] = []
    bar = tqdm(jobs, desc="compare", unit="run", disable=not progress, file=sys.stderr)
    for o, m in bar:
        bar.set_postfix_str(f"{o} {m}")
        rate = lr if lr is not None else task.lr.get(o, 1e-3)
        results.append(run_one(task, m, o, rate, depth, devs, epochs, seed, minibatches))
    bar.close()
    measure_all(task, results, depth, devs, minibatches, progress=progress)
    return results


#: the markers of the block of a README that ``--readme`` rewrites (everything between them)
README_BEGIN = "<!-- BEGIN compare -->"
README_END = "<!-- END compare -->"


class ReadmeError(ValueError):
    """A ``--readme`` file without exactly one :data:`README_BEGIN` ... :data:`README_END` block."""


def _block_span(text: str, name: str) -> Tuple[int, int]:
    """Where the text between the markers starts and ends in ``text`` (``name``: where it is
    from, for the error)."""
    begins, ends = text.count(README_BEGIN), text.count(README_END)
    start, end = text.find(README_BEGIN), text.find(README_END)
    if begins != 1 or ends != 1 or end < start:
        raise ReadmeError(f"--readme {name}: needs one line {README_BEGIN} and, after it, one line {README_END} "
                          f"(found {begins} and {ends}); the text between them is replaced")
    return start + len(README_BEGIN), end


def _read(readme: Path) -> str:
    try:
        return readme.read_text(encoding="utf-8")
    except OSError as e:
        raise ReadmeError(f"--readme {readme}: cannot read it ({e.strerror})") from None


def replace_block(text: str, block: str, name: str = "the text") -> str:
    """``text`` with everything between :data:`README_BEGIN` and :data:`README_END` replaced
    by ``block`` (on lines of its own); raises :class:`ReadmeError` without one such pair."""
    start, end = _block_span(text, name)
    return text[:start] + "\n" + block.strip("\n") + "\n" + text[end:]


def _duration(seconds: float) -> str:
    """``"38 s"``, ``"1 min 38 s"``."""
    m, s = divmod(round(seconds), 60)
    return f"{m} min {s} s" if m else f"{s} s"


def describe_devices(devices: Sequence[str], threads: int, load: bool = True) -> str:
    """The hardware a run used, in words: CUDA devices by name; the CPU by architecture,
    core count and (``load``) load average at the time of the call (other jobs slow a CPU run
    down)."""
    names = []
    for d in dict.fromkeys(devices):
        dev = torch.device(d)
        if dev.type == "cuda":
            names.append(f"{d} ({torch.cuda.get_device_name(dev)})")
        else:
            now = f", 1-minute load average {os.getloadavg()[0]:.1f}" if load and hasattr(os, "getloadavg") else ""
            names.append(f"{d} ({platform.machine()}, {os.cpu_count()} cores{now})")
    return f"{', '.join(names)}, torch {torch.__version__}, {threads} thread{'s' * (threads != 1)}"


def verdict_text(results: Sequence[RunResult], metric_name: str, unit: str, factor: float = FACTOR,
                 md: bool = True) -> str:
    """The verdict (:func:`pipeoptim_compare.verdict.verdict`) in words and a table, as markdown
    (``md``: results.md, the README) or for the terminal; every line at most :data:`WIDTH`
    characters, except the markdown table's rows."""
    verdicts = verdict(results, factor, metric_name=metric_name)
    if not verdicts:
        return wrap("No verdict: it compares every method with sync; add sync to --methods.")
    v0 = verdicts[0]
    metric = any(r.metric is not None for r in results)
    intro = (f"Verdict (computed from this run): each method against sync with the same optimizer: the gap on "
             f"{'held-out' if v0.by != 'training loss' else 'training'} data (loss as a ratio and difference"
             + (f", {metric_name} in {unit or 'its own unit'}" if metric else "") + "), the closest method, "
             f"and the minibatches (mb, of {v0.minibatches}) each needs until its training loss (averaged over bins "
             f"of {v0.bin} minibatches) reaches {factor:g}x sync's final training loss (its mean over the last "
             f"10%), with the simulated time that takes on the sim ms clock; never: not within the run.")
    bullets = [wrap(line, initial_indent="* " if md else "", subsequent_indent="  ")
               for line in closest_lines(verdicts, unit)]
    rows = verdict_rows(verdicts, metric_name, unit)
    return "\n\n".join([wrap(intro), "\n".join(bullets), markdown(rows) if md else plain(rows)])


def readme_block(rows: List[List[str]], verdict_md: str, command: str, device: str, wall_s: float,
                 train_s: float, clock_s: float, load_before: Optional[float]) -> str:
    """What ``--readme`` writes between the markers: the command line, the date, the device, the
    load average before the run (``None``: unknown) and after it, the wall time of the command and its parts
    (training, measuring stage costs), its printed table (:func:`terminal_rows`) as markdown with
    :data:`TIMING_NOTE`, and the verdict (:func:`verdict_text`)."""
    load = "" if load_before is None else \
        f"; 1-minute load average {load_before:.1f} before the run, {os.getloadavg()[0]:.1f} after it"
    return (f"<!-- written by the command below; rerun it to refresh this block -->\n`{command}`\n"
            + wrap(f"on {datetime.now():%Y-%m-%d}, {device}{load}: {_duration(wall_s)} wall time "
                   f"(training {_duration(train_s)}, measuring stage costs {_duration(clock_s)}).")
            + f"\n\n{markdown(rows)}\n\n{wrap(TIMING_NOTE)}\n\n{verdict_md}")


#: pipeline depth when neither ``--depth`` nor a list of stages gives one
DEFAULT_DEPTH = 8


def load_task(name: str, depth: Optional[int] = None, seed: int = 0) -> Tuple[Task, int]:
    """The task ``name`` (built-in, or an entry point ``module:function``) built from ``seed``,
    and the pipeline depth: ``depth``, else the number of stages an entry point returned, else
    :data:`DEFAULT_DEPTH`. Raises :class:`EntryPointError` when they cannot agree."""
    task = get_task(name, depth=depth or DEFAULT_DEPTH, seed=seed)
    if task.stages is not None:
        if depth not in (None, len(task.stages)):
            raise EntryPointError(f"--depth {depth}, but {name} returned {len(task.stages)} stages; drop --depth "
                                  f"(a list of stages sets the depth) or return {depth} stages")
        return task, len(task.stages)
    depth = depth or DEFAULT_DEPTH
    if depth > len(task.model):
        raise EntryPointError(f"--depth {depth}, but the nn.Sequential of {name} has {len(task.model)} children "
                              f"(stages are cut between children); give --depth {len(task.model)} or less")
    return task, depth


def compare(task: str = "teacher", depth: Optional[int] = None, methods: Sequence[str] = METHOD_NAMES,
            optimizers: Sequence[str] = tuple(OPTIMIZERS), epochs: Optional[int] = None,
            lr: Optional[float] = None, devices: str = "cpu", out: Optional[Path] = None,
            seed: int = 0, progress: bool = True, threads: Optional[int] = None,
            minibatches: Optional[int] = None, readme: Optional[Path] = None,
            command: str = "pipeoptim compare", target: float = FACTOR,
            batch_norm: str = "refuse") -> List[RunResult]:
    """Run every (optimizer, method) pair on one build of ``task`` (see :func:`load_task` for
    ``depth``) and write the table, the plot and the losses into ``out``.

    ``threads`` sets ``torch.set_num_threads`` for the run (default: 1 when every stage is
    on the CPU: the built-in models are small, and one process runs the stages one after
    another, so intra-op threads only add overhead and contention); the previous setting
    is restored on return. ``minibatches`` keeps the first that many of each epoch.

    ``readme``: a file whose :data:`README_BEGIN` ... :data:`README_END` block is replaced by
    :func:`readme_block`, with ``command`` as the command line recorded there (checked before
    training: :class:`ReadmeError`). ``target``: the verdict's target is this times sync's
    final training loss (:mod:`pipeoptim_compare.verdict`).

    ``batch_norm``: what to do with the model's batch norms where a method splits minibatches
    (``"refuse"``, ``"ghost"``, ``"deferred"``: :mod:`pipeoptim_compare.batchnorm`; checked
    before training: :class:`~pipeoptim_compare.batchnorm.BatchNormError`).
    """
    t0 = time.perf_counter()
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    if readme is not None:
        readme = Path(readme)
        _block_span(_read(readme), str(readme))
    probe, depth = load_task(task, depth, seed)
    bn_note = prepare_batch_norm(probe, depth, methods, batch_norm)
    if bn_note:
        print(bn_note)
    epochs = epochs or probe.epochs
    devs = _devices(devices, depth)
    out = Path(out) if out else Path("runs") / f"compare-{datetime.now():%Y%m%d-%H%M%S}"
    out.mkdir(parents=True, exist_ok=True)
    if threads is None and all(torch.device(d).type == "cpu" for d in devs):
        threads = 1
    old_threads = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    used_threads = torch.get_num_threads()
    try:
        results = _run_all(probe, depth, methods, optimizers, epochs, lr, devs, seed, progress, minibatches)
    finally:
        torch.set_num_threads(old_threads)
    metric_name = probe.metric_name if probe.metric else "metric"
    rows = table_rows(results, metric_name)
    verdict_md = verdict_text(results, metric_name, probe.metric_unit, target)
    written = [out / "results.md", out / "results.csv", out / "losses.csv", out / "loss_curves.png"]
    written[0].write_text(
        wrap(f"# pipeoptim compare: task {task}, depth {depth}, {epochs} epoch(s) of "
             f"{len(probe.batches[:minibatches])} minibatches, devices {devices}, seed {seed}")
        + "\n\n" + markdown(rows) + "\n\n" + wrap(TIMING_NOTE) + "\n\n" + verdict_md + "\n", encoding="utf-8")
    with open(written[1], "w", newline="", encoding="utf-8") as f:
        csv.writer(f).writerows(rows)
    with open(written[2], "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["optimizer", "method", "minibatch", "loss"])
        for r in results:
            w.writerows([r.optimizer, r.method, i, f"{x:.6g}"] for i, x in enumerate(r.losses))
    plot(results, written[3], f"task {task}, {depth} stages, {epochs} epoch(s), seed {seed}; same data and "
         f"initial weights for every method", metric_name)
    short = terminal_rows(results, metric_name)
    if readme is not None:
        train_s = sum(r.ms_per_minibatch * len(r.losses) for r in results) / 1000
        block = readme_block(short, verdict_md, command, describe_devices(devs, used_threads, load=False),
                             time.perf_counter() - t0, train_s, sum(r.clock_s for r in results), load_before)
        readme.write_text(replace_block(_read(readme), block, str(readme)), encoding="utf-8")
        written.append(readme)
    print(plain(short))
    print(columns_line(depth) + "\n")
    print(verdict_text(results, metric_name, probe.metric_unit, target, md=False))
    print("\nper-stage columns, host wall time and what the time columns are: results.md")
    print("wrote:\n" + "\n".join(f"  {p}" for p in written))
    return results


def _csv_list(choices: Sequence[str]) -> Callable[[str], List[str]]:
    def parse(s: str) -> List[str]:
        items = [x.strip() for x in s.split(",") if x.strip()]
        bad = [x for x in items if x not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"unknown {bad or s!r}; choose from {', '.join(choices)}")
        return items
    return parse


DESCRIPTION = ("Train one task with every pipeline method and optimizer, side by side: a table, "
               "loss curves and the held-out metric.")
EPILOG = ("Every run starts from the same initial weights and data (built once from --seed). It prints the "
          "table and a verdict (each method against sync, from this run) and writes results.md, results.csv, "
          "losses.csv and loss_curves.png in --out.")


def _positive(s: str) -> int:
    n = int(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return n


def _positive_float(s: str) -> float:
    x = float(s)
    if not x > 0 or not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {s}")
    return x


def _entry(spec: str) -> str:
    try:
        entry_parts(spec)
    except EntryPointError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("--entry ")) from None
    return spec


def build_parser() -> argparse.ArgumentParser:
    """The ``pipeoptim`` argument parser."""
    p = argparse.ArgumentParser(prog="pipeoptim", description=DESCRIPTION)
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("compare", help="train a task with every method and optimizer; table + plot",
                       description=DESCRIPTION, epilog=EPILOG)
    which = c.add_mutually_exclusive_group()
    which.add_argument("--task", choices=sorted(TASKS), help="built-in task [teacher]")
    which.add_argument("--entry", metavar="MODULE:FUNCTION", type=_entry,
                       help="your own task: a function in MODULE (in the current folder or on PYTHONPATH) "
                            "returning (model, batches[, loss_fn[, eval_batches]]) or a dict with those keys")
    c.add_argument("--depth", type=_positive, default=None,
                   help=f"pipeline stages [{DEFAULT_DEPTH}; a list of stages from --entry sets it]")
    c.add_argument("--methods", type=_csv_list(tuple(METHODS)), default=list(METHOD_NAMES),
                   help=f"comma-separated, from {', '.join(METHODS)} [{','.join(METHOD_NAMES)}]")
    c.add_argument("--optimizers", type=_csv_list(tuple(OPTIMIZERS)), default=list(OPTIMIZERS),
                   help="comma-separated optimizers [sgd,adam,adamw]")
    c.add_argument("--epochs", type=_positive, default=None, help="epochs [the task's default]")
    c.add_argument("--minibatches", type=_positive, default=None, help="use only the first N minibatches of each epoch")
    c.add_argument("--lr", type=float, default=None, help="learning rate for every optimizer [the task's per optimizer]")
    c.add_argument("--devices", default="cpu", help="one device for all stages, or one per stage, comma-separated [cpu]")
    c.add_argument("--out", type=Path, default=None, help="output folder [runs/compare-<time>]")
    c.add_argument("--seed", type=int, default=0, help="seed of data, initial weights and training (every task, --entry included) [0]")
    c.add_argument("--threads", type=int, default=None, help="torch intra-op threads [1 on CPU]")
    c.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    c.add_argument("--target", type=_positive_float, default=FACTOR, metavar="FACTOR",
                   help=f"the verdict's target training loss: FACTOR times sync's final one [{FACTOR:g}]")
    c.add_argument("--readme", type=Path, default=None, metavar="FILE",
                   help=f"also replace the block between {README_BEGIN} and {README_END} in FILE with the "
                        "table, the verdict, the command line, the date, the device, the load and the times")
    c.add_argument("--batch-norm", choices=BATCH_NORM_MODES, default="refuse",
                   help="batch norms where a method splits minibatches into micro-batches: refuse (stop with the "
                        "fixes), ghost (exact: ghost batch norm over groups of rows dividing every micro-batch) or "
                        "deferred (running statistics once per minibatch, normalisation per micro-batch) [refuse]")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Console entry point (``pipeoptim`` and ``python -m pipeoptim_compare``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.command == "compare":
        try:
            compare(task=args.entry or args.task or "teacher", depth=args.depth, methods=args.methods,
                    optimizers=args.optimizers, epochs=args.epochs, lr=args.lr, devices=args.devices,
                    out=args.out, seed=args.seed, progress=not args.no_progress,
                    threads=args.threads, minibatches=args.minibatches, readme=args.readme,
                    command=shlex.join(["pipeoptim", *argv]), target=args.target, batch_norm=args.batch_norm)
        except (EntryPointError, ReadmeError, BatchNormError) as e:
            msg = str(e)
            sep = "\n" if "\n" in msg else " "  # a message of several lines starts on its own line
            print(f"pipeoptim compare: error:{sep}{msg}", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
