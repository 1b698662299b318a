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

    python benchmarks/learning_efficiency.py              # full table (~50 min on one core with all six methods)
    python benchmarks/learning_efficiency.py --quick      # teacher, depth 8, default lr only
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
from pipeline_rt.tasks import evaluate, get_task  # noqa: E402

METHODS = ("sync", "pipedream", "pipeoptim", "pipeoptim-cal", "pipeoptim-rollout", "pipeoptim-calroll")
SHORT = {"sync": "sync", "pipedream": "pd", "pipeoptim": "po", "pipeoptim-cal": "cal", "pipeoptim-rollout": "roll",
         "pipeoptim-calroll": "calroll"}
OPTIMIZERS = {
    "sgdm": ("sgd", lambda lr: (lambda ps: torch.optim.SGD(ps, lr=lr, momentum=0.9))),
    "adam": ("adam", lambda lr: (lambda ps: torch.optim.Adam(ps, lr=lr))),
    "adamw": ("adamw", lambda lr: (lambda ps: torch.optim.AdamW(ps, lr=lr, weight_decay=0.05))),
}
Key = Tuple[str, str, int, float]


def run_one(task_name: str, opt: str, depth: int, mult: float, method: str, epochs: int,
            minibatches: Optional[int], seed: int) -> Dict[str, float]:
    task = get_task(task_name, depth=depth, seed=seed)
    key, make = OPTIMIZERS[opt]
    lr = task.lr[key] * mult
    batches = task.batches[:minibatches] if minibatches else task.batches
    pipe = Pipeline(task.split(depth), ["cpu"] * depth, make(lr), task.loss_fn, method=method,
                    chunks=1 if method == "sync" else None)
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
    return {"lr": lr, "last": float("nan") if diverged else last, "eval": ev, "diverged": diverged,
            "seconds": time.perf_counter() - t0}


def fmt(r: Dict[str, float], field: str = "last") -> str:
    """Three decimals; four for losses below 0.1 (``denoise``'s mean squared errors are about 0.02)."""
    if r["diverged"]:
        return "div"
    v = r[field]
    return f"{v:.4f}" if abs(v) < 0.1 else f"{v:.3f}"


def improved(methods: Sequence[str]) -> str:
    """The method the goal columns check: ``pipeoptim-calroll`` (recommended) where run, else ``pipeoptim-cal``."""
    return next((m for m in ("pipeoptim-calroll", "pipeoptim-cal") if m in methods), methods[-1])


def table(results: Dict[Key, Dict[str, Dict[str, float]]], methods: Sequence[str]) -> str:
    imp = improved(methods)
    short = SHORT.get(imp, imp)
    head = ("| task | optimizer | depth | lr | " + " | ".join(methods)
            + f" | {short} <= pd | {short}/sync |\n|" + "---|" * (len(methods) + 6) + "\n")
    rows = []
    for (task, opt, depth, mult), res in results.items():
        cells = [f"{fmt(res[m])} ({fmt(res[m], 'eval')})" for m in methods]
        cal, pd, sy = res.get(imp), res.get("pipedream"), res.get("sync")
        ok = ratio = "-"
        if cal and pd:
            ok = "yes" if (not cal["diverged"] and (pd["diverged"] or cal["last"] <= pd["last"])) else "**no**"
        if cal and sy and not cal["diverged"] and not sy["diverged"]:
            ratio = f"{cal['last'] / sy['last']:.2f}"
        rows.append(f"| {task} | {opt} | {depth} | {res[methods[0]]['lr']:.3g} | " + " | ".join(cells)
                    + f" | {ok} | {ratio} |")
    return head + "\n".join(rows) + "\n"


def summary(results: Dict[Key, Dict[str, Dict[str, float]]], methods: Sequence[str]) -> str:
    """Per predicting method: cells not above PipeDream, within 1.2x of sync, diverged (PipeDream's too)."""
    lines = [f"{len(results)} cells; per method: cells where its last-epoch loss <= pipedream's (a diverged "
             "pipedream counts as beaten by any finite run) / within 1.2x of sync's / diverged "
             "(of those where pipedream did not)"]
    for m in methods:
        if m == "sync":
            continue
        le = w12 = div = div_pd_ok = 0
        for res in results.values():
            r, pd, sy = res[m], res.get("pipedream"), res.get("sync")
            div += r["diverged"]
            div_pd_ok += r["diverged"] and pd is not None and not pd["diverged"]
            if pd is not None and not r["diverged"] and (pd["diverged"] or r["last"] <= pd["last"]):
                le += 1
            if sy is not None and not r["diverged"] and not sy["diverged"] and r["last"] <= 1.2 * sy["last"]:
                w12 += 1
        lines.append(f"* {m}: <= pipedream {le}/{len(results)}, within 1.2x sync {w12}/{len(results)}, "
                     f"diverged {div} ({div_pd_ok} where pipedream did not)")
    return "\n".join(lines) + "\n"


def plot(results: Dict[Key, Dict[str, Dict[str, float]]], methods: Sequence[str], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
    panels = sorted({(t, o) for t, o, _, _ in results})
    depths = sorted({d for _, _, d, _ in results})
    fig, axes = plt.subplots(len(depths), len(panels), figsize=(3.2 * len(panels), 2.8 * len(depths)),
                             squeeze=False)
    colors = {"sync": "k", "pipedream": "tab:blue", "pipeoptim": "tab:orange", "pipeoptim-cal": "tab:green",
              "pipeoptim-rollout": "tab:red", "pipeoptim-calroll": "tab:purple"}
    for r, depth in enumerate(depths):
        for c, (task, opt) in enumerate(panels):
            ax = axes[r][c]
            keys = sorted(k for k in results if k[:3] == (task, opt, depth))
            for m in methods:
                xs = [results[k][m]["lr"] for k in keys]
                ys = [results[k][m]["last"] if not results[k][m]["diverged"] else float("nan") for k in keys]
                if any(math.isfinite(y) for y in ys):  # an all-diverged series has nothing to draw
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
                ax.set_ylabel("last-epoch train loss", fontsize=7)
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="teacher,charlm,denoise")
    ap.add_argument("--optimizers", default="sgdm,adam,adamw")
    ap.add_argument("--depths", default="4,8")
    ap.add_argument("--lr-mults", default="0.3,1,3", help="factors of each task's default lr")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--epochs", default="teacher=2,charlm=1,denoise=2", help="task=epochs,...")
    ap.add_argument("--minibatches", default="charlm=60", help="task=N: first N minibatches per epoch")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="teacher, sgdm+adam, depth 8, default lr, 1 epoch")
    ap.add_argument("--plot", type=Path, default=Path(__file__).with_name("learning_efficiency.png"))
    ap.add_argument("--json", type=Path, default=None, help="also dump the raw results here")
    ap.add_argument("--write", type=Path, default=None, help="write the table into this RESULTS.md section")
    ap.add_argument("--note", default="", help="a summary paragraph for the RESULTS.md section")
    ap.add_argument("--merge", action="store_true", help="add this run's cells to an existing --json dump")
    ap.add_argument("--load", type=Path, default=None, help="rebuild table/plot/section from a --json dump")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.quick:
        a.tasks, a.optimizers, a.depths, a.lr_mults, a.epochs = "teacher", "sgdm,adam", "8", "1", "teacher=1"
    methods = a.methods.split(",")
    epochs = {k: int(v) for k, v in (kv.split("=") for kv in a.epochs.split(",") if kv)}
    mbs = {k: int(v) for k, v in (kv.split("=") for kv in a.minibatches.split(",") if kv)}
    results: Dict[Key, Dict[str, Dict[str, float]]] = {}
    t0 = time.perf_counter()
    if a.load:
        raw = json.loads(a.load.read_text())
        results = {(t, o, int(d), float(m)): v for (t, o, d, m), v in ((k.split("|"), v) for k, v in raw.items())}
        methods = list(next(iter(results.values())))
    for task in ([] if a.load else a.tasks.split(",")):
        for opt in a.optimizers.split(","):
            for depth in (int(d) for d in a.depths.split(",")):
                for mult in (float(x) for x in a.lr_mults.split(",")):
                    res = {m: run_one(task, opt, depth, mult, m, epochs.get(task, 1), mbs.get(task), a.seed)
                           for m in methods}
                    results[(task, opt, depth, mult)] = res
                    print(f"{task:8s} {opt:5s} d{depth} lr {res[methods[0]]['lr']:.3g}: "
                          + "  ".join(f"{SHORT.get(m, m)} {fmt(res[m])}/{fmt(res[m], 'eval')}" for m in methods)
                          + f"   [{time.perf_counter() - t0:.0f}s]", flush=True)
    text = table(results, methods) + "\n" + summary(results, methods)
    print(text)
    if a.json:
        if a.merge:  # earlier partial runs first, this one's cells win
            old = json.loads(a.json.read_text()) if a.json.exists() else {}
            results = {**{(t, o, int(d), float(m)): v for (t, o, d, m), v in ((k.split("|"), v) for k, v in old.items())},
                       **results}
        a.json.write_text(json.dumps({"|".join(map(str, k)): v for k, v in results.items()}, indent=1))
    if a.plot and not a.quick and results:
        plot(results, methods, a.plot)
    if a.write:
        from _sections import provenance, write_section
        body = (f"## learning_efficiency: improved prediction ({improved(methods)}) vs PipeDream, PipeOptim, sync\n\n"
                + provenance("cpu")
                + (f"* rebuilt from {a.load}\n" if a.load else f"* total time {time.perf_counter() - t0:.0f} s\n")
                + "* cells: last-epoch mean train loss (held-out "
                  "loss of the final weights); `div`: diverged\n\n" + (a.note + "\n\n" if a.note else "") + text
                + "\n![learning efficiency](learning_efficiency.png)\n")
        write_section(a.write, "learning_efficiency", body)


if __name__ == "__main__":
    main()
