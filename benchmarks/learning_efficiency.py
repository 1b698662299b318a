"""Learning efficiency of the improved prediction (issue 6): methods x optimizers x depth x lr.

For every task, optimizer (SGD-momentum, Adam, AdamW), pipeline depth and learning rate
(the task's default times each ``--lr-mults`` factor, a decade by default: 0.3, 1, 3) it
trains the same model with ``sync`` (sequential semantics, one micro-batch), ``pipedream``,
``pipeoptim`` (the paper), ``pipeoptim-cal`` (:class:`lookahead_opt.calibrated.
CalibratedPredictor`), ``pipeoptim-rollout`` (:class:`lookahead_opt.rollout.RolloutPredictor`)
and ``pipeoptim-calroll`` (the roll-out with the calibrated scale, the recommended one)
with the real runtime (:class:`pipeline_rt.Pipeline`, CPU stages) and
reports the mean training loss of the last epoch (as the pipeline computes it: at each
method's forward weights) and the held-out loss of the final weights. ``div`` marks a
non-finite or exploded run (last-epoch loss above 10x the first minibatch's).

Checks of the issue's goal, per row, for the improved method (``pipeoptim-calroll`` where it
was run, else ``pipeoptim-cal``): ``<= pd`` (its last-epoch loss is not above PipeDream's) and
``/sync`` (goal: <= 1.2); then counts per method (:func:`summary`).

Seeds: ``--seeds 0,1,2`` runs every cell once per seed (the task's data, initial weights and
minibatch order). The table then gives each method's mean over the seeds (a method's cell is
``div`` if any seed diverged, ``div k/n`` when k of the n did) and the goal columns on those
means, with the number of seeds where the check holds; the summary counts on the seed means,
per seed, and lists the improved method's failures that hold in every seed vs in some only.
``--json`` dumps are keyed by seed (an older single-seed dump loads as seed 0); ``--load A B``
merges dumps (e.g. of different seeds) and, with ``--json``, writes the merged one.

Other methods (issue 14): ``--methods`` takes any library method (e.g. ``2bw``, ``1f1b-flush``: the
delay-1 and flush competitors; ``1f1b-flush`` runs its default ``chunks`` = depth, the same math as
``sync``'s one micro-batch up to float rounding), a name of :data:`CANDIDATES` (candidate methods
defined in this file) or ``NAME=EXPR`` (a :class:`pipeline_rt.methods.Method` built on the command
line, e.g. ``'pd2=replace(METHODS["pipedream"], name="pd2", chunks=2)'``). Every record keeps the
run's training-loss curve (``curve``: the mean of each 1/20 of an epoch, ``bin`` minibatches a
point), which ``benchmarks/time_to_target.py`` puts on a simulated pipeline's clock. ``--resume``
(with ``--json``) skips the seed-cell-methods the dump already holds, so a killed run restarts where it
stopped. Depth 16: the tasks have ``max(8, depth)`` blocks, so at depth 16 the model has 16 blocks
(about twice the parameters of the depth-4 and depth-8 model, which is the same model).

    python benchmarks/learning_efficiency.py              # full table (~50 min on one core with all six methods)
    python benchmarks/learning_efficiency.py --quick      # teacher, depth 8, default lr only
    python benchmarks/learning_efficiency.py --tasks teacher --depths 4 --seeds 1,2 --json s12_teacher_d4.json
    python benchmarks/learning_efficiency.py --load seed0.json s12_*.json --json all.json --write benchmarks/RESULTS.md
    python benchmarks/learning_efficiency.py --seeds 0,1,2 --methods 2bw,1f1b-flush --json benchmarks/le_2bw_flush.json --resume
    python benchmarks/learning_efficiency.py --load benchmarks/learning_efficiency_seeds012.json benchmarks/le_2bw_flush.json \
        --methods sync,1f1b-flush,2bw,pipedream,pipeoptim,pipeoptim-calroll --plot none
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline_rt import Pipeline  # noqa: E402
from pipeoptim_compare.tasks import evaluate, get_task, set_bn_chunks  # noqa: E402

METHODS = ("sync", "pipedream", "pipeoptim", "pipeoptim-cal", "pipeoptim-rollout", "pipeoptim-calroll")
SHORT = {"sync": "sync", "pipedream": "pd", "pipeoptim": "po", "pipeoptim-cal": "cal", "pipeoptim-rollout": "roll",
         "pipeoptim-calroll": "calroll"}
OPTIMIZERS = {
    "sgdm": ("sgd", lambda lr: (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))),
    "adam": ("adam", lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr))),
    "adamw": ("adamw", lambda lr: (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.05))),
}
Key = Tuple[str, str, int, float]


#: Candidate methods of this benchmark, by name: a :class:`pipeline_rt.methods.Method` (or a
#: zero-argument factory of one) that ``--methods NAME`` runs like a library method. Add new
#: candidates (e.g. update compensations) here; ``--methods NAME=EXPR`` defines one on the command
#: line instead (``EXPR`` is evaluated with the names of :mod:`pipeline_rt.methods` and
#: ``dataclasses.replace`` in scope).
CANDIDATES: Dict[str, object] = {}

#: The table's training length: epochs per task, and the first N minibatches of an epoch.
EPOCHS, MINIBATCHES = "teacher=2,charlm=1,denoise=2,cnnbn=2", "charlm=60"


def per_task(text: str) -> Dict[str, int]:
    """``"task=N,..."`` as a dict."""
    return {k: int(v) for k, v in (kv.split("=") for kv in text.split(",") if kv)}


#: Curve resolution: the training loss is kept as the mean of each 1/CURVE_BINS of an epoch.
CURVE_BINS = 20


def resolve_method(spec: str):
    """``(name, method)`` for a ``--methods`` entry: ``NAME`` (a :data:`CANDIDATES` key or a library
    method name) or ``NAME=EXPR`` (a Python expression giving a Method or a method name)."""
    import dataclasses

    import pipeline_rt.methods as pm
    if "=" in spec:
        name, expr = spec.split("=", 1)
        scope = {k: getattr(pm, k) for k in dir(pm) if not k.startswith("_")}
        scope.update(replace=dataclasses.replace, CANDIDATES=CANDIDATES)
        method = eval(expr, scope)  # noqa: S307 (a benchmark's own command line)
    elif spec in CANDIDATES:
        name, method = spec, CANDIDATES[spec]
    else:
        name, method = spec, spec
    if callable(method) and not isinstance(method, (str, pm.Method)):
        method = method()
    return name.strip(), pm.get_method(method)


def split_methods(text: str) -> List[str]:
    """``--methods`` entries: split at the commas outside brackets (an ``EXPR`` may hold commas)."""
    out, level, cur = [], 0, ""
    for ch in text:
        level += 1 if ch in "([{" else -1 if ch in ")]}" else 0
        if ch == "," and level == 0:
            out.append(cur.strip())
            cur = ""
        else:
            cur += ch
    return [m for m in out + [cur.strip()] if m]


def method_name(spec: str) -> str:
    return spec.split("=", 1)[0].strip()


def curve_of(losses: Sequence[float], per_epoch: int, bins: int = CURVE_BINS) -> Tuple[List[float], int]:
    """The compact training-loss curve of a run: the mean of each run of ``bin`` consecutive
    minibatches, ``bin = ceil(per_epoch / bins)`` (the last bin may be shorter); and ``bin``."""
    size = max(1, -(-per_epoch // bins))
    out = []
    for i in range(0, len(losses), size):
        chunk = losses[i:i + size]
        v = sum(chunk) / len(chunk)
        out.append(float(f"{v:.6g}") if math.isfinite(v) else None)
    return out, size


def make_pipeline(task_name: str, opt: str, depth: int, mult: float, method: str, minibatches: Optional[int],
                  seed: int):
    """``(pipe, task, batches, lr)``: the pipeline a table cell trains with ``method`` (``sync`` with one
    micro-batch per minibatch, every other method with its own ``chunks``)."""
    task = get_task(task_name, depth=depth, seed=seed)
    key, make = OPTIMIZERS[opt]
    lr = task.lr[key] * mult
    batches = task.batches[:minibatches] if minibatches else task.batches
    name, meth = resolve_method(method)
    stages = task.split(depth)
    # a task's DeferredBatchNorm layers (cnnbn's GhostBatchNorm2d) commit running statistics once per
    # minibatch: tell them the micro-batches per minibatch (the pipeline refuses a mismatch)
    chunks = 1 if name == "sync" else meth.num_chunks(depth)
    set_bn_chunks(stages, chunks)
    pipe = Pipeline(stages, ["cpu"] * depth, make(lr), task.loss_fn, method=meth, chunks=chunks)
    return pipe, task, batches, lr


def run_one(task_name: str, opt: str, depth: int, mult: float, method: str, epochs: int,
            minibatches: Optional[int], seed: int) -> Dict[str, float]:
    pipe, task, batches, lr = make_pipeline(task_name, opt, depth, mult, method, minibatches, seed)
    losses: List[float] = []
    t0 = time.perf_counter()
    for _ in range(epochs):
        losses += pipe.train(batches)
        if not math.isfinite(losses[-1]):
            break
    last = sum(losses[-len(batches):]) / len(batches)
    diverged = not math.isfinite(last) or last > 10 * losses[0]
    ev = float("nan")
    if not diverged and task.eval_data is not None:
        ev = evaluate(pipe.stages, task.eval_data, task.loss_fn)[0]
    curve, size = curve_of(losses, len(batches))
    return {"lr": lr, "last": float("nan") if diverged else last, "eval": ev, "diverged": diverged,
            "seconds": time.perf_counter() - t0, "chunks": pipe.chunks, "rows": len(batches[0][0]),
            "per_epoch": len(batches), "minibatches": len(losses), "first": losses[0], "bin": size,
            "curve": curve}


Runs = Dict[int, Dict[Key, Dict[str, Dict[str, float]]]]  # seed -> cell -> method -> record


def key_str(k: Key) -> str:
    return "|".join(map(str, k))


def parse_key(s: str) -> Key:
    t, o, d, m = s.split("|")
    return (t, o, int(d), float(m))


def load_dump(path: Path) -> Runs:
    """A ``--json`` dump: ``{"seeds": {seed: {cell: {method: record}}}}``; the older single-seed
    form ``{cell: {method: record}}`` (no seed recorded: those runs used ``--seed 0``) loads as seed 0."""
    raw = json.loads(Path(path).read_text())
    per_seed = raw["seeds"] if "seeds" in raw else {"0": raw}
    return {int(s): {parse_key(k): v for k, v in cells.items()} for s, cells in per_seed.items()}


def dump(runs: Runs, path: Path) -> None:
    path.write_text(json.dumps({"seeds": {str(s): {key_str(k): v for k, v in cells.items()}
                                          for s, cells in sorted(runs.items())}}, indent=1))


def merge(*all_runs: Runs) -> Runs:
    """Union of dumps; where two hold the same seed, cell and method the later one wins."""
    out: Runs = {}
    for runs in all_runs:
        for s, cells in runs.items():
            for k, res in cells.items():
                out.setdefault(s, {}).setdefault(k, {}).update(res)
    return out


def common_methods(runs: Runs) -> List[str]:
    """The methods run in every seed of every cell (a table column needs all seeds), in ``METHODS`` order."""
    recs = [set(res) for cells in runs.values() for res in cells.values()]
    common = set.intersection(*recs) if recs else set()
    return [m for m in METHODS if m in common] + sorted(common - set(METHODS))


def complete(runs: Runs, methods: Sequence[str]) -> Tuple[Runs, int]:
    """``runs`` restricted to the seed-cells that hold every one of ``methods``; and how many were left out."""
    out: Runs = {}
    dropped = 0
    for s, cells in runs.items():
        for k, res in cells.items():
            if all(m in res for m in methods):
                out.setdefault(s, {})[k] = res
            else:
                dropped += 1
    return out, dropped


def cells_in_order(runs: Runs) -> List[Key]:
    order = {(t, o, d, m): None for s in sorted(runs) for (t, o, d, m) in runs[s]}
    tasks = list(dict.fromkeys(k[0] for k in order))  # tasks in the order first run, the rest sorted
    opts = list(OPTIMIZERS) + sorted({k[1] for k in order} - set(OPTIMIZERS))
    return sorted(order, key=lambda k: (tasks.index(k[0]), opts.index(k[1]), k[2], k[3]))


def aggregate(runs: Runs, methods: Sequence[str]) -> Dict[Key, Dict[str, Dict[str, float]]]:
    """Per cell and method, over the seeds that ran the cell: the mean last-epoch (and held-out) loss.
    A cell-method counts as diverged if **any** seed diverged (``ndiv`` of ``n``); ``lo``/``hi``: the
    range of the finite seeds' last-epoch losses."""
    out: Dict[Key, Dict[str, Dict[str, float]]] = {}
    for k in cells_in_order(runs):
        recs = [runs[s][k] for s in sorted(runs) if k in runs[s]]
        out[k] = {}
        for m in methods:
            rs = [r[m] for r in recs if m in r]
            fin = [r["last"] for r in rs if not r["diverged"]]
            ndiv = sum(bool(r["diverged"]) for r in rs)
            out[k][m] = {"lr": rs[0]["lr"], "n": len(rs), "ndiv": ndiv, "diverged": ndiv > 0,
                         "last": float("nan") if ndiv else sum(fin) / len(fin),
                         "eval": float("nan") if ndiv else sum(r["eval"] for r in rs) / len(rs),
                         "lo": min(fin, default=float("nan")), "hi": max(fin, default=float("nan"))}
    return out


def fmt(r: Dict[str, float], field: str = "last") -> str:
    """Three decimals; four for losses below 0.1 (``denoise``'s mean squared errors are about 0.02).
    ``div``: diverged (``div k/n``: in k of the n seeds)."""
    if r["diverged"]:
        n, k = r.get("n", 1), r.get("ndiv", 1)
        return "div" if k == n else f"div {k}/{n}"
    v = r[field]
    return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"


def improved(methods: Sequence[str]) -> str:
    """The method the goal columns check: ``pipeoptim-calroll`` (recommended) where run, else ``pipeoptim-cal``."""
    return next((m for m in ("pipeoptim-calroll", "pipeoptim-cal") if m in methods), methods[-1])


def le_pd(r: Dict[str, float], pd: Optional[Dict[str, float]]) -> bool:
    """Not above PipeDream (a diverged PipeDream is beaten by any finite run)."""
    return pd is not None and not r["diverged"] and (pd["diverged"] or r["last"] <= pd["last"])


def within(r: Dict[str, float], sy: Optional[Dict[str, float]], factor: float = 1.2) -> bool:
    return sy is not None and not r["diverged"] and not sy["diverged"] and r["last"] <= factor * sy["last"]


def label(k: Key, r: Dict[str, float]) -> str:
    return f"{k[0]} {k[1]} d{k[2]} lr {r['lr']:.3g}"


def table(runs: Runs, methods: Sequence[str]) -> str:
    """One row per cell: each method's seed-mean last-epoch loss (held-out loss); the goal columns on
    the seed means, with the number of seeds where the check holds in parentheses when there are several."""
    agg = aggregate(runs, methods)
    imp = improved(methods)
    short = SHORT.get(imp, imp)
    head = ("| task | optimizer | depth | lr | " + " | ".join(methods)
            + f" | {short} <= pd | {short}/sync |\n|" + "---|" * (len(methods) + 6) + "\n")
    rows = []
    for k, res in agg.items():
        cells = [f"{fmt(res[m])} ({fmt(res[m], 'eval')})" for m in methods]
        cal, pd, sy = res.get(imp), res.get("pipedream"), res.get("sync")
        per = [runs[s][k] for s in sorted(runs) if k in runs[s]]
        ok = ratio = "-"
        if cal and pd:
            ok = "yes" if le_pd(cal, pd) else "**no**"
            if len(per) > 1:
                ok += f" ({sum(le_pd(r[imp], r['pipedream']) for r in per)}/{len(per)})"
        if cal and sy:
            ratio = f"{cal['last'] / sy['last']:.2f}" if not cal["diverged"] and not sy["diverged"] else "-"
            if len(per) > 1:
                ratio += f" ({sum(within(r[imp], r['sync']) for r in per)}/{len(per)})"
        rows.append(f"| {k[0]} | {k[1]} | {k[2]} | {res[methods[0]]['lr']:.3g} | " + " | ".join(cells)
                    + f" | {ok} | {ratio} |")
    return head + "\n".join(rows) + "\n"


def counts(cells: Dict[Key, Dict[str, Dict[str, float]]], m: str) -> str:
    le = w12 = div = div_pd_ok = 0
    for res in cells.values():
        r, pd, sy = res[m], res.get("pipedream"), res.get("sync")
        div += bool(r["diverged"])
        div_pd_ok += bool(r["diverged"]) and pd is not None and not pd["diverged"]
        le += le_pd(r, pd)
        w12 += within(r, sy)
    n = len(cells)
    return (f"<= pipedream {le}/{n}, within 1.2x sync {w12}/{n}, diverged {div} "
            f"({div_pd_ok} where pipedream did not)")


def summary(runs: Runs, methods: Sequence[str]) -> str:
    """Per predicting method: cells not above PipeDream, within 1.2x of sync, diverged (PipeDream's too);
    with several seeds on the seed means, per seed, and which of the improved method's failures hold in
    every seed that ran the cell."""
    seeds = sorted(runs)
    agg = aggregate(runs, methods)
    what = ("cells where its last-epoch loss <= pipedream's (a diverged pipedream counts as beaten by any "
            "finite run) / within 1.2x of sync's / diverged (of those where pipedream did not)")
    if len(seeds) == 1:
        lines = [f"{len(agg)} cells; per method: {what}"]
        lines += [f"* {m}: {counts(agg, m)}" for m in methods if m != "sync"]
        return "\n".join(lines) + "\n"
    lines = [f"{len(agg)} cells, seeds {', '.join(map(str, seeds))}; per method: {what}. **On the seed means** "
             "(a method's cell counts as diverged if any seed diverged):"]
    lines += [f"* {m}: {counts(agg, m)}" for m in methods if m != "sync"]
    lines.append("\n**Per seed** (each seed's cells on their own):")
    per_seed_methods = sorted({m for cells in runs.values() for res in cells.values() for m in res},
                              key=lambda m: METHODS.index(m) if m in METHODS else len(METHODS))
    for m in per_seed_methods:
        if m == "sync":
            continue
        parts = [f"seed {s}: {counts(runs[s], m)}" for s in seeds
                 if runs[s] and all(m in res for res in runs[s].values())]
        lines.append(f"* {m}: " + "; ".join(parts))
    imp = improved(methods)
    lines.append(f"\n**{imp}, per cell over the seeds**: cells where a check holds in every seed / in most "
                 "seeds; its failures in every seed vs in some seeds only (cell: seeds where it fails / seeds "
                 "that ran it):")
    for good, name, check, other in (("<= pipedream", "above pipedream", le_pd, "pipedream"),
                                     ("within 1.2x sync", "not within 1.2x sync", within, "sync")):
        every, some = [], []
        held_all = held_most = 0
        for k, res in agg.items():
            per = [runs[s][k] for s in seeds if k in runs[s]]
            bad = sum(not check(r[imp], r.get(other)) for r in per)
            held_all += bad == 0
            held_most += 2 * bad < len(per)
            if bad:
                (every if bad == len(per) else some).append(f"{label(k, res[imp])} ({bad}/{len(per)})")
        lines.append(f"* {good}: in every seed in {held_all}/{len(agg)} cells, in most seeds in "
                     f"{held_most}/{len(agg)}")
        lines.append(f"* {name}, every seed ({len(every)}): " + ("; ".join(every) or "none"))
        lines.append(f"* {name}, some seeds only ({len(some)}): " + ("; ".join(some) or "none"))
    return "\n".join(lines) + "\n"


def plot(runs: Runs, methods: Sequence[str], path: Path) -> None:
    """Seed-mean last-epoch loss against the learning rate; bars: the range over the seeds (a point is
    left out where any seed diverged)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    results = aggregate(runs, methods)
    panels = sorted({(t, o) for t, o, _, _ in results})
    depths = sorted({d for _, _, d, _ in results})
    fig, axes = plt.subplots(len(depths), len(panels), figsize=(3.2 * len(panels), 2.8 * len(depths)),
                             squeeze=False)
    colors = {"sync": "k", "pipedream": "tab:blue", "pipeoptim": "tab:orange", "pipeoptim-cal": "tab:green",
              "pipeoptim-rollout": "tab:red", "pipeoptim-calroll": "tab:purple", "2bw": "tab:green",
              "1f1b-flush": "tab:gray"}
    nseeds = len(runs)
    for r, depth in enumerate(depths):
        for c, (task, opt) in enumerate(panels):
            ax = axes[r][c]
            keys = sorted(k for k in results if k[:3] == (task, opt, depth))
            for m in methods:
                pts = [results[k][m] for k in keys]
                xs = [p["lr"] for p in pts]
                ys = [p["last"] if not p["diverged"] else float("nan") for p in pts]
                if any(math.isfinite(y) for y in ys):  # an all-diverged series has nothing to draw
                    if nseeds > 1:
                        err = [[y - p["lo"] if math.isfinite(y) else 0 for y, p in zip(ys, pts)],
                               [p["hi"] - y if math.isfinite(y) else 0 for y, p in zip(ys, pts)]]
                        ax.errorbar(xs, ys, yerr=err, fmt="o-", color=colors.get(m), label=m, capsize=2,
                                    markersize=4, elinewidth=0.8)
                    else:
                        ax.plot(xs, ys, "o-", color=colors.get(m), label=m)
            ax.set_xscale("log")
            ax.set_yscale("log")
            # label the swept learning rates; y: ticks at 1, 2, 5 x 10^k (default minor labels overlap)
            ax.set_xticks([results[k]["sync" if "sync" in methods else methods[0]]["lr"] for k in keys])
            ax.xaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.yaxis.set_minor_locator(LogLocator(subs=(2.0, 5.0)))
            ax.yaxis.set_major_formatter(FormatStrFormatter("%.3g"))
            ax.yaxis.set_minor_formatter(FormatStrFormatter("%.3g"))
            ax.set_title(f"{task} {opt} depth {depth}", fontsize=8)
            ax.tick_params(labelsize=7)
            if r == len(depths) - 1:
                ax.set_xlabel("learning rate", fontsize=7)
            if c == 0:
                ax.set_ylabel("last-epoch train loss" + (f" (mean of {nseeds} seeds)" if nseeds > 1 else ""),
                              fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="teacher,charlm,denoise", help="also: cnnbn (BatchNorm CNN)")
    ap.add_argument("--optimizers", default="sgdm,adam,adamw")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--lr-mults", default="0.3,1,3", help="factors of each task's default lr")
    ap.add_argument("--methods", default=None,
                    help=f"default: {','.join(METHODS)} (with --load: those run in every seed and cell)")
    ap.add_argument("--epochs", default=EPOCHS, help="task=epochs,...")
    ap.add_argument("--minibatches", default=MINIBATCHES, help="task=N: first N minibatches per epoch")
    ap.add_argument("--seed", type=int, default=0, help="one seed (see --seeds)")
    ap.add_argument("--seeds", default=None, help="comma-separated seeds, e.g. 0,1,2 (overrides --seed)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="teacher, sgdm+adam, depth 8, default lr, 1 epoch")
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("learning_efficiency.png"),
                    help="the figure's path ('none': no figure)")
    ap.add_argument("--json", type=Path, default=None,
                    help="also dump the raw results here (rewritten after every cell, so a partial run survives)")
    ap.add_argument("--write", type=Path, default=None, help="write the table into this RESULTS.md section")
    ap.add_argument("--note", default="", help="a summary paragraph for the RESULTS.md section (@FILE: read it)")
    ap.add_argument("--merge", action="store_true", help="add this run's cells to an existing --json dump")
    ap.add_argument("--resume", action="store_true",
                    help="with --merge: skip the seed-cell-methods already in the --json dump (a killed run "
                         "restarts where it stopped)")
    ap.add_argument("--load", type=Path, nargs="+", default=None,
                    help="rebuild table/plot/section from --json dumps (merged in order, e.g. of different "
                         "seeds; with --json the merged dump is written there)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.tasks, a.optimizers, a.depths, a.lr_mults, a.epochs = "teacher", "sgdm,adam", "8", "1", "teacher=1"
    seeds = [int(s) for s in a.seeds.split(",")] if a.seeds else [a.seed]
    epochs, mbs = per_task(a.epochs), per_task(a.minibatches)
    runs: Runs = {}
    t0 = time.perf_counter()
    if a.load:
        runs = merge(*(load_dump(p) for p in a.load))
        specs = split_methods(a.methods) if a.methods else common_methods(runs)
        runs, dropped = complete(runs, [method_name(m) for m in specs])
        if dropped:
            print(f"(left out {dropped} seed-cells that lack some of {', '.join(map(method_name, specs))})")
    else:
        specs = split_methods(a.methods or ",".join(METHODS))
    methods = [method_name(m) for m in specs]
    if a.resume:
        a.merge = True
    old: Runs = load_dump(a.json) if a.json and a.merge and a.json.exists() else {}
    for task in ([] if a.load else a.tasks.split(",")):
        for opt in a.optimizers.split(","):
            for depth in (int(d) for d in a.depths.split(",")):
                for mult in (float(x) for x in a.lr_mults.split(",")):
                    for seed in seeds:
                        have = old.get(seed, {}).get((task, opt, depth, mult), {})
                        todo = [m for m in specs if not (a.resume and method_name(m) in have)]
                        if not todo:
                            continue
                        res = dict(have)
                        res.update({method_name(m): run_one(task, opt, depth, mult, m, epochs.get(task, 1),
                                                            mbs.get(task), seed) for m in todo})
                        runs.setdefault(seed, {})[(task, opt, depth, mult)] = res
                        print(f"s{seed} {task:8s} {opt:5s} d{depth} lr {res[methods[0]]['lr']:.3g}: "
                              + "  ".join(f"{SHORT.get(m, m)} {fmt(res[m])}/{fmt(res[m], 'eval')}"
                                          for m in methods if m in res)
                              + f"   [{time.perf_counter() - t0:.0f}s]", flush=True)
                        if a.json:  # earlier partial runs first, this one's cells win
                            dump(merge(old, runs), a.json)
    if a.json and a.load:
        dump(runs, a.json)
    if a.json and a.merge:
        runs = merge(old, runs)
    text = table(runs, methods) + "\n" + summary(runs, methods)
    print(text)
    if a.plot and str(a.plot) not in (".", "none") and not a.quick and runs:
        plot(runs, methods, a.plot)
    if a.write:
        from _sections import provenance, write_section
        note = Path(a.note[1:]).read_text().strip() if a.note.startswith("@") else a.note
        src = ", ".join(map(str, a.load)) if a.load else ""
        body = (f"## learning_efficiency: improved prediction ({improved(methods)}) vs PipeDream, PipeOptim, sync\n\n"
                + provenance("cpu")
                + (f"* rebuilt from {src}\n" if a.load else f"* total time {time.perf_counter() - t0:.0f} s\n")
                + f"* seeds: {', '.join(map(str, sorted(runs)))}\n"
                + "* cells: last-epoch mean train loss (held-out loss of the final weights), the mean over the "
                  "seeds; `div`: diverged (`div k/n`: in k of n seeds; the mean is then not given)\n\n"
                + (note + "\n\n" if note else "") + text
                + "\n![learning efficiency](learning_efficiency.png)\n")
        write_section(a.write, "learning_efficiency", body)


if __name__ == "__main__":
    main()
