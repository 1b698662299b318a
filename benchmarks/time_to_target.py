"""Time to target (issue 14): each method's simulated wall-clock to reach 1.1x sync's final loss.

For every default-lr cell of the learning-efficiency table (``benchmarks/learning_efficiency.py``,
whose dumps keep each run's training-loss curve: the mean of each 1/20 of an epoch) it puts each
method's curve on the clock of a simulated N-device pipeline and reports the simulated time at
which the curve first reaches ``--factor`` (1.1) times sync's last-epoch loss of the same seed.

The clock (:mod:`pipeline_rt.clock`): the method's schedule (:func:`pipeline_rt.schedule.build` with
its shape and ``chunks``, over the run's whole number of minibatches: warm-up, steady state and
drain) run on N ideal devices where stage k's F, B and STEP take that stage's measured costs,
transfers are free and every stage runs its actions in order, each as soon as its inputs are
there (the same rule as ``ideal_time``, with per-stage costs). Minibatch j is done
when its STEP has run at every stage; between minibatches the time is interpolated linearly.

The costs (:func:`measure`, :func:`pipeline_rt.clock.measure_costs`): a real training run of
the cell's pipeline (the task's stage modules, optimizer and lr, the method's micro-batch size: rows per micro-batch = minibatch rows / chunks;
``sync`` with one micro-batch) on this machine's CPU, one thread, with every F, B and STEP action
of the runtime's executor timed (``Executor._handlers``: the stage's forward/backward/step and
the host work around it on that stage: the micro-batch's slicing, the loss log, the method's own
extra work: prediction and weight swap, calibration, roll-out, PipeDream's stashed copies). The
per-stage cost of an action is the median over the steady-state minibatches (warm-up and drain
left out) of ``--repeat`` minibatches. Sends and receives are not timed (free in the simulation;
on one CPU they are aliasing).

Time to target (:func:`time_to_target`, :func:`pipeoptim_compare.verdict.reach`): the curve's
points are at the centres of their bins (in minibatches); the first point at or below the target and the one before it are interpolated
linearly, and that fractional minibatch count is put on the clock. ``never``: the curve does not
reach the target. Per cell the time is the mean over the seeds (``never k/n`` when k of n seeds
never reach it; ranked as infinite); ``fastest or within 5%``: a method's time is at most 1.05x
the fastest among ``--field`` (sync, 1f1b-flush, 2bw, pipedream, pipeoptim) and itself.

    python benchmarks/time_to_target.py --load benchmarks/le_curves_lr1.json benchmarks/le_2bw_flush.json --measure
    python benchmarks/time_to_target.py --load benchmarks/le_*.json               # table from measured costs
    python benchmarks/time_to_target.py --load benchmarks/le_*.json --compute-bound  # and on compute_bound() costs
    # a new candidate (a CANDIDATES name of learning_efficiency.py, or NAME=EXPR): its curves, costs, the table
    python benchmarks/time_to_target.py --load benchmarks/le_curves_lr1.json benchmarks/le_2bw_flush.json \
        --methods +mynew --run benchmarks/le_candidates.json --measure
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

import learning_efficiency as le  # noqa: E402
from pipeline_rt.clock import at, measure_costs, minibatch_times, steady_period  # noqa: E402,F401  (at: tests)
from pipeoptim_compare.verdict import reach  # noqa: E402

FIELD = ("sync", "1f1b-flush", "2bw", "pipedream", "pipeoptim")
RECOMMENDED = "pipeoptim-calroll"
COSTS = Path(__file__).with_name("le_stage_costs.json")
INF = float("inf")

Costs = Dict[str, object]  # {"t_f": [per stage], "t_b": [...], "t_step": [...], "shape", "chunks", "rows", ...}


def time_to_target(rec: Dict[str, object], ts: Sequence[float], target: float) -> Optional[float]:
    """Simulated time for the run ``rec`` (a dump record with ``curve`` and ``bin``) to reach ``target``
    on the clock ``ts`` (:func:`minibatch_times`); ``None``: never."""
    if rec.get("diverged") and not rec.get("curve"):
        return None
    x = reach(rec["curve"], int(rec["bin"]), len(ts), target)
    return None if x is None else at(ts, x)


# ----------------------------------------------------------------------------- the costs

def measure(task: str, opt: str, depth: int, method: str, *, repeat: int = 24, rounds: int = 3, seed: int = 0,
            mult: float = 1.0) -> Costs:
    """Per-stage costs of the F, B and STEP actions of ``method`` on the cell's pipeline
    (:func:`pipeline_rt.clock.measure_costs`: in each of ``rounds`` real training runs of
    ``depth + repeat + depth`` minibatches, the task's data cycled, the median over the ``repeat``
    steady-state minibatches; then the least of the rounds' medians)."""
    pipe, tk, batches, lr = le.make_pipeline(task, opt, depth, mult, method, None, seed)
    c = measure_costs(pipe, batches, repeat=repeat, rounds=rounds)
    return {"t_f": c.t_f, "t_b": c.t_b, "t_step": c.t_step, "shape": c.shape, "chunks": c.chunks,
            "rows": len(batches[0][0]) / c.chunks, "samples": repeat, "rounds": rounds, "device": device_name(),
            "threads": torch.get_num_threads()}


def device_name() -> str:
    import platform
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu ({name}), {torch.get_num_threads()} thread(s)"


def load_costs(path: Path) -> Dict[str, Dict[str, Costs]]:
    return json.loads(path.read_text()) if path.exists() else {}


def compute_bound(costs_all: Dict[str, Dict[str, Costs]]) -> Dict[str, Dict[str, Costs]]:
    """The costs a compute-bound device would have: in every cell, each method's F and B of a
    micro-batch at stage k cost ``sync``'s measured F and B of a whole minibatch there times the
    micro-batch's share of its rows (``rows / sync's rows``); STEP keeps the method's own measured
    cost. A method's own extra host work in F and B (prediction, weight swaps) is left out: the
    counterfactual of a device where a micro-batch costs its share. Cells without ``sync`` are
    dropped."""
    out: Dict[str, Dict[str, Costs]] = {}
    for cell, per in costs_all.items():
        if "sync" not in per:
            continue
        sy = per["sync"]
        out[cell] = {m: dict(c, t_f=[t * c["rows"] / sy["rows"] for t in sy["t_f"]],
                             t_b=[t * c["rows"] / sy["rows"] for t in sy["t_b"]]) for m, c in per.items()}
    return out


def cell_key(k: le.Key) -> str:
    return f"{k[0]}|{k[1]}|{k[2]}"


# ----------------------------------------------------------------------------- the table

def cell_times(runs: le.Runs, k: le.Key, methods: Sequence[str], costs: Dict[str, Costs],
               factor: float = 1.1) -> Dict[str, Dict[str, object]]:
    """Per method: per seed its time to target (``None``: never), and the mean (``INF`` if any seed never)."""
    out: Dict[str, Dict[str, object]] = {}
    clocks: Dict[Tuple[str, int], List[float]] = {}
    for m in methods:
        per: Dict[int, Optional[float]] = {}
        for s in sorted(runs):
            res = runs[s].get(k, {})
            if m not in res or "sync" not in res or "curve" not in res[m] or m not in costs:
                continue
            r, sy = res[m], res["sync"]
            if sy["diverged"]:
                continue
            c = costs[m]
            total = int(r["minibatches"]) if "minibatches" in r and not r["diverged"] else \
                int(r["per_epoch"]) * le_epochs(r)
            key = (m, total)
            if key not in clocks:
                clocks[key] = minibatch_times(c["shape"], k[2], total, c["chunks"], c["t_f"], c["t_b"], c["t_step"])
            per[s] = None if r["diverged"] else time_to_target(r, clocks[key], factor * sy["last"])
        if per:
            never = sum(v is None for v in per.values())
            mean = INF if never else sum(per.values()) / len(per)
            out[m] = {"per": per, "never": never, "n": len(per), "mean": mean}
    return out


def le_epochs(r: Dict[str, object]) -> int:
    """Epochs a run's curve covers (its bins over the bins of one epoch)."""
    per, size = int(r["per_epoch"]), int(r["bin"])
    per_bins = -(-per // size)
    return max(1, -(-len(r["curve"]) // per_bins))


def fmt_t(v: Dict[str, object]) -> str:
    if v["never"]:
        return "never" if v["never"] == v["n"] else f"never {v['never']}/{v['n']}"
    return f"{1e3 * v['mean']:.1f}"


def report(runs: le.Runs, costs_all: Dict[str, Dict[str, Costs]], methods: Sequence[str],
           field: Sequence[str] = FIELD, factor: float = 1.1, slack: float = 1.05, mult: float = 1.0) -> str:
    cells = [k for k in le.cells_in_order(runs) if k[3] == mult and cell_key(k) in costs_all]
    head = ("| task | optimizer | depth | " + " | ".join(methods) + " |\n|" + "---|" * (len(methods) + 3) + "\n")
    rows, good, seen = [], {m: 0 for m in methods}, {m: 0 for m in methods}
    good_seed = {m: [0, 0] for m in methods}
    for k in cells:
        t = cell_times(runs, k, methods, costs_all[cell_key(k)], factor)
        row = []
        for m in methods:
            if m not in t:
                row.append("-")
                continue
            pool = [t[x]["mean"] for x in set(field) | {m} if x in t]
            best = min(pool)
            ok = t[m]["mean"] <= slack * best and math.isfinite(t[m]["mean"])
            good[m] += ok
            seen[m] += 1
            ratio = t[m]["mean"] / best if math.isfinite(best) and best > 0 else INF
            row.append(fmt_t(t[m]) + ("" if not math.isfinite(ratio) else f" ({ratio:.2f})") + (" *" if ok else ""))
            for s, v in t[m]["per"].items():  # per seed: against the field's times of that seed
                ps = [t[x]["per"].get(s) for x in set(field) | {m} if x in t]
                ps = [INF if p is None else p for p in ps]
                me = INF if v is None else v
                good_seed[m][0] += math.isfinite(me) and me <= slack * min(ps)
                good_seed[m][1] += 1
        rows.append(f"| {k[0]} | {k[1]} | {k[2]} | " + " | ".join(row) + " |")
    n = len(cells)
    lines = [head + "\n".join(rows), "",
             f"Simulated ms to reach {factor}x sync's last-epoch loss (mean over seeds); in brackets the ratio to the "
             f"fastest of {', '.join(field)} and the method itself; `*`: fastest or within {round((slack - 1) * 100)}% "
             f"of it.", "",
             f"Fastest or within {round((slack - 1) * 100)}% of the fastest (among {', '.join(field)} and itself), "
             f"of the {n} cells where it ran (on the seed means; per seed: of the seed-cells):"]
    for m in methods:
        if seen[m]:
            lines.append(f"* {m}: {good[m]}/{seen[m]} (per seed {good_seed[m][0]}/{good_seed[m][1]})")
    return "\n".join(lines) + "\n"


def cost_table(costs_all: Dict[str, Dict[str, Costs]], methods: Sequence[str]) -> str:
    """Per cell and method: rows per micro-batch, the mean over stages of t_f, t_b (per micro-batch),
    t_step, in microseconds, and the simulated steady-state ms per minibatch."""
    lines = ["| cell | method | rows/micro | chunks | t_f us | t_b us | t_step us | F+B per minibatch us | "
             "simulated ms/minibatch (steady) |", "|" + "---|" * 9]
    for ck, per in costs_all.items():
        depth = int(ck.split("|")[2])
        for m in methods:
            if m not in per:
                continue
            c = per[m]
            n = len(c["t_f"])
            tf, tb, ts = (1e6 * sum(c[x]) / n for x in ("t_f", "t_b", "t_step"))
            steady = steady_period(c["shape"], depth, c["chunks"], c["t_f"], c["t_b"], c["t_step"])
            lines.append(f"| {ck} | {m} | {c['rows']:g} | {c['chunks']} | {tf:.0f} | {tb:.0f} | {ts:.0f} | "
                         f"{c['chunks'] * (tf + tb):.0f} | {1e3 * steady:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load", type=Path, nargs="+", required=True, help="learning_efficiency --json dumps (merged)")
    ap.add_argument("--methods", default=None,
                    help="comma-separated (NAME or NAME=EXPR as in learning_efficiency); '+a,b': the defaults and a, b; "
                         f"default: {', '.join(FIELD + (RECOMMENDED,))} and the others in the dumps")
    ap.add_argument("--costs", type=Path, default=COSTS, help="per-stage costs (read; with --measure, extended)")
    ap.add_argument("--measure", action="store_true", help="measure the costs the table needs and lacks")
    ap.add_argument("--remeasure", action="store_true", help="measure again even where the costs file has them")
    ap.add_argument("--repeat", type=int, default=24, help="steady-state minibatches timed per measurement")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per measurement (the least median wins)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--factor", type=float, default=1.1, help="target: this times sync's last-epoch loss")
    ap.add_argument("--mult", type=float, default=1.0, help="the lr factor of the cells (the default lr)")
    ap.add_argument("--costs-table", action="store_true", help="also print the per-stage costs")
    ap.add_argument("--compute-bound", action="store_true",
                    help="also the table on the costs of a compute-bound device (compute_bound: a micro-batch's F and "
                         "B cost its share of sync's measured minibatch)")
    ap.add_argument("--run", type=Path, default=None,
                    help="first train the --methods the loaded dumps lack, on their cells at --mult and every seed "
                         "there, into this dump (rewritten after every run; what it holds is skipped)")
    ap.add_argument("--seeds", default=None, help="with --run: only these seeds (default: those of the dumps)")
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    runs = le.merge(*(le.load_dump(p) for p in a.load))
    present = sorted({m for cells in runs.values() for res in cells.values() for m in res},
                     key=lambda m: (le.METHODS + FIELD).index(m) if m in le.METHODS + FIELD else 99)
    default = [m for m in FIELD + (RECOMMENDED,)] + [m for m in present if m not in FIELD + (RECOMMENDED,)]
    if a.methods and a.methods.startswith("+"):
        specs = default + le.split_methods(a.methods[1:])
    else:
        specs = le.split_methods(a.methods) if a.methods else default
    methods = [le.method_name(s) for s in specs]
    costs_all = load_costs(a.costs)
    cells = [k for k in le.cells_in_order(runs) if k[3] == a.mult]
    if a.run:
        mine: le.Runs = le.load_dump(a.run) if a.run.exists() else {}
        runs = le.merge(runs, mine)
        epochs, mbs = le.per_task(le.EPOCHS), le.per_task(le.MINIBATCHES)
        seeds = [int(x) for x in a.seeds.split(",")] if a.seeds else sorted(runs)
        for k in cells:
            for s in seeds:
                for spec, m in zip(specs, methods):
                    if m in runs.get(s, {}).get(k, {}):
                        continue
                    r = le.run_one(k[0], k[1], k[2], k[3], spec, epochs.get(k[0], 1), mbs.get(k[0]), s)
                    for d in (runs, mine):
                        d.setdefault(s, {}).setdefault(k, {})[m] = r
                    le.dump(mine, a.run)
                    print(f"s{s} {k[0]} {k[1]} d{k[2]} {m}: {le.fmt(r)}  [{r['seconds']:.0f}s]", flush=True)
    if a.measure:
        for k in cells:
            for spec, m in zip(specs, methods):
                have = costs_all.get(cell_key(k), {})
                if m in have and not a.remeasure:
                    continue
                if not any(m in runs[s].get(k, {}) for s in runs):
                    continue
                t0 = time.perf_counter()
                c = measure(k[0], k[1], k[2], spec, repeat=a.repeat, rounds=a.rounds, mult=k[3])
                costs_all.setdefault(cell_key(k), {})[m] = c
                a.costs.write_text(json.dumps(costs_all, indent=1))
                print(f"costs {cell_key(k)} {m}: t_f {1e6 * sum(c['t_f']) / k[2]:.0f} us, t_b "
                      f"{1e6 * sum(c['t_b']) / k[2]:.0f} us, t_step {1e6 * sum(c['t_step']) / k[2]:.0f} us (stage mean), "
                      f"{c['rows']:g} rows/micro  [{time.perf_counter() - t0:.1f}s]", flush=True)
    if a.costs_table:
        print(cost_table({ck: v for ck, v in costs_all.items()
                          if any(cell_key(k) == ck for k in cells)}, methods))
    print(report(runs, costs_all, methods, factor=a.factor, mult=a.mult))
    if a.compute_bound:
        print("On a compute-bound device (a micro-batch's F and B cost its share of sync's measured minibatch):\n")
        print(report(runs, compute_bound(costs_all), methods, factor=a.factor, mult=a.mult))


if __name__ == "__main__":
    main()
