"""The verdict of a comparison: how far each method ends from ``sync``, and how soon it gets there.

Computed from the runs themselves (:func:`verdict`), never written by hand; ``pipeoptim
compare`` prints it, writes it into ``results.md`` and, with ``--readme``, into the README.
Per optimizer, against ``sync`` (sequential training, the reference) of the same optimizer:

* the gap on held-out data: the held-out loss as a ratio ``L / L_sync`` (and the difference),
  the metric as a difference (in points, i.e. percentage points, for a fraction such as
  accuracy; in the metric's unit otherwise, e.g. dB);
* the closest method: the smallest gap on the metric (``|M - M_sync|``), else on the held-out
  loss, else on the final training loss (``|log(L / L_sync)|``);
* the minibatches each method needs to reach a target training loss, ``target = L_T + (f - 1)
  |L_T|`` (``f`` times sync's final training loss ``L_T``, the mean of the last 10% of
  minibatches, for a positive loss; ``f = 1.1`` by default), read off the smoothed curve
  (:func:`binned`: means of bins of consecutive minibatches, their points at the bins' centres,
  interpolated linearly by :func:`reach`), ``never`` where it does not reach it; and the time
  that takes on the clock of an N-device pipeline simulated from the run's measured per-stage
  costs (:mod:`pipeline_rt.clock`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple

from pipeline_rt.clock import at

if TYPE_CHECKING:  # pragma: no cover
    from .cli import RunResult

__all__ = ["binned", "reach", "MethodGap", "OptimizerVerdict", "verdict", "verdict_rows", "closest_lines",
           "REFERENCE", "FACTOR", "BINS"]

#: the reference every method is compared with
REFERENCE = "sync"
#: default target: this times the reference's final training loss
FACTOR = 1.1
#: the training-loss curve is averaged over this many bins of consecutive minibatches
BINS = 20


def binned(losses: Sequence[float], bins: int = BINS) -> Tuple[List[float], int]:
    """``(curve, size)``: the means of consecutive bins of ``size = ceil(len / bins)`` losses
    (the last bin may be shorter)."""
    size = max(1, -(-len(losses) // bins))
    return [sum(losses[i:i + size]) / len(losses[i:i + size]) for i in range(0, len(losses), size)], size


def reach(curve: Sequence[Optional[float]], size: int, total: int, target: float) -> Optional[float]:
    """The fractional minibatch index where the binned curve (bin ``i``: the mean of minibatches
    ``i*size .. i*size+size-1``, the last bin cut at ``total``) first reaches ``target``: its points
    sit at their bins' centres, interpolated linearly between the first point at or below the target
    and the point before it. ``None``: never (a non-finite point ends the curve)."""
    prev = None
    for i, y in enumerate(curve):
        if y is None or not math.isfinite(y):
            return None
        n_i = min(size, total - i * size) if total else size
        x = i * size + (n_i - 1) / 2
        if y <= target:
            if prev is None:
                return x
            px, py = prev
            return px + (py - target) / (py - y) * (x - px)
        prev = (x, y)
    return None


@dataclass
class MethodGap:
    """One method against the reference, for one optimizer.

    Attributes:
        loss_ratio, loss_diff: held-out loss (training loss where the task has no held-out
            data) over / minus the reference's.
        metric_diff: held-out metric minus the reference's, in the metric's own unit.
        reached: fractional minibatch index at which the smoothed training-loss curve reaches
            the target (0-based; ``reached + 1`` minibatches); ``None``: never.
        seconds: simulated time to the target on the method's own N-device clock; ``None``:
            never, or no measured costs.
    """

    method: str
    loss_ratio: Optional[float]
    loss_diff: Optional[float]
    metric_diff: Optional[float]
    reached: Optional[float]
    seconds: Optional[float]


@dataclass
class OptimizerVerdict:
    """Every method of one optimizer against its ``sync`` run.

    Attributes:
        final: the reference's final training loss; ``target``: the loss to reach, ``factor``
            times ``final`` (for a positive loss).
        bin: minibatches per bin of the smoothed curves; ``minibatches``: the run's total.
        closest: the method closest to the reference (``None`` with no other method), and
            ``by``: what it was ranked on (the metric's name, ``held-out loss`` or
            ``training loss``).
        reference: the reference's own held-out loss (or training loss) and metric.
        gaps: one per method, the reference first.
    """

    optimizer: str
    final: float
    factor: float
    target: float
    bin: int
    minibatches: int
    closest: Optional[str]
    by: str
    reference: Tuple[Optional[float], Optional[float]]
    gaps: List[MethodGap]


def _finite(x: Optional[float]) -> bool:
    return x is not None and math.isfinite(x)


def _ratio(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a / b if _finite(a) and _finite(b) and b != 0 else None  # type: ignore[operator]


def _diff(a: Optional[float], b: Optional[float]) -> Optional[float]:
    return a - b if _finite(a) and _finite(b) else None  # type: ignore[operator]


def verdict(results: Sequence["RunResult"], factor: float = FACTOR, bins: int = BINS,
            metric_name: str = "metric") -> List[OptimizerVerdict]:
    """Per optimizer that has a :data:`REFERENCE` run (in the order of ``results``), every
    method's gap to it and its minibatches and simulated time to the target (see the module's
    docstring for the definitions)."""
    out = []
    for opt in dict.fromkeys(r.optimizer for r in results):
        mine = [r for r in results if r.optimizer == opt]
        ref = next((r for r in mine if r.method == REFERENCE), None)
        if ref is None:
            continue
        held = any(r.eval_loss is not None for r in mine)
        metric = any(r.metric is not None for r in mine)

        def loss(r: "RunResult") -> Optional[float]:
            return r.eval_loss if held else r.final_loss

        target = ref.final_loss + (factor - 1) * abs(ref.final_loss)
        gaps = []
        size = 1
        for r in [ref] + [r for r in mine if r is not ref]:
            curve, size = binned(r.losses, bins)
            x = reach(curve, size, len(r.losses), target) if math.isfinite(target) else None
            secs = at(r.costs.minibatch_times(len(r.losses)), x) if x is not None and r.costs is not None else None
            gaps.append(MethodGap(r.method, _ratio(loss(r), loss(ref)), _diff(loss(r), loss(ref)),
                                  _diff(r.metric, ref.metric), x, secs))
        by = metric_name if metric else "held-out loss" if held else "training loss"

        def distance(g: MethodGap) -> float:
            if metric:
                return abs(g.metric_diff) if g.metric_diff is not None else math.inf
            return abs(math.log(g.loss_ratio)) if g.loss_ratio is not None and g.loss_ratio > 0 else math.inf

        others = [g for g in gaps[1:] if math.isfinite(distance(g))]
        closest = min(others, key=distance).method if others else None
        out.append(OptimizerVerdict(opt, ref.final_loss, factor, target, size, len(ref.losses), closest, by,
                                    (loss(ref), ref.metric), gaps))
    return out


def _points(d: Optional[float], unit: str) -> str:
    """A metric difference: ``+1.2 pts`` (``unit`` "points": a fraction, times 100), ``-0.31 dB``
    (another unit), ``+0.012`` (none)."""
    if d is None:
        return "-"
    if unit == "points":
        return f"{100 * d:+.1f} pts"
    return f"{d:+.3g}" + (f" {unit}" if unit else "")


def seconds(s: Optional[float]) -> str:
    """``"never"``, ``"412 ms"``, ``"3.14 s"``, ``"123 s"``."""
    if s is None:
        return "never"
    if s < 1:
        return f"{1000 * s:.3g} ms"
    return f"{s:.3g} s" if s < 100 else f"{s:.0f} s"


def verdict_rows(verdicts: Sequence[OptimizerVerdict], metric_name: str, unit: str = "points") -> List[List[str]]:
    """Header plus one row per optimizer and method: the gaps, the minibatches to the target
    and the simulated time to it (the reference's row shows its own values)."""
    held = verdicts[0].by != "training loss" if verdicts else True
    metric = any(g.metric_diff is not None for v in verdicts for g in v.gaps) or \
        any(v.reference[1] is not None for v in verdicts)
    what = "eval loss" if held else "train loss"
    head = ["opt", "method", f"{what} vs sync"] + ([f"{metric_name} vs sync"] if metric else []) + \
        ["mb to target", "sim. time to target"]
    rows = [head]
    for v in verdicts:
        for i, g in enumerate(v.gaps):
            if i == 0:
                loss = f"{v.reference[0]:.3f} (ref.)" if _finite(v.reference[0]) else "- (ref.)"
                gap = [f"{v.reference[1]:.3g} (ref.)" if _finite(v.reference[1]) else "- (ref.)"]
            else:
                loss = "-" if g.loss_ratio is None else f"{g.loss_ratio:.2f}x ({g.loss_diff:+.3f})"
                gap = [_points(g.metric_diff, unit)]
            mbs = "never" if g.reached is None else f"{g.reached + 1:.0f}"
            rows.append([v.optimizer, g.method, loss] + (gap if metric else []) + [mbs, seconds(g.seconds)])
    return rows


def closest_lines(verdicts: Sequence[OptimizerVerdict], unit: str = "points") -> List[str]:
    """One sentence per optimizer: the closest method and its gap, and the target."""
    lines = []
    for v in verdicts:
        g = next((g for g in v.gaps if g.method == v.closest), None)
        if g is None:
            head = f"{v.optimizer}: no other method to compare with {REFERENCE}"
        else:
            gap = _points(g.metric_diff, unit) if v.by not in ("held-out loss", "training loss") else \
                f"{g.loss_ratio:.2f}x"
            head = f"{v.optimizer}: closest to {REFERENCE} by {v.by}: {g.method} ({gap})"
        lines.append(f"{head}; target: training loss {v.target:.3g} ({v.factor:g}x {REFERENCE}'s final "
                     f"{v.final:.3g})")
    return lines
