"""Candidate methods of the second learning-efficiency round (issue 14), as compositions.

Each candidate is a :class:`pipeline_rt.methods.Method` built from the library's pieces (a
schedule shape and micro-batch count, a weight-version policy, a forward predictor of
:mod:`lookahead_opt.predictors`, an update compensation of :mod:`lookahead_opt.compensation`),
with hyper-parameters fixed for every task, optimizer, depth, lr and seed. Running this file
runs ``benchmarks/learning_efficiency.py`` with these names known to ``--methods``:

    python benchmarks/candidates.py --depths 8 --seeds 0 --methods 2bw-calroll,pd-sc --json le_screen.json --resume
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from lookahead_opt.compensation import Chain, DCASGD, DelayMomentum, PipeMareLR, SpikeCompensation  # noqa: E402
from lookahead_opt.predictors import Calibrated, Rollout  # noqa: E402
from pipeline_rt.methods import Method  # noqa: E402

#: a PipeMare warm-up that never ends: the lr stays divided by the delay
FOREVER = 10 ** 12


def _predicting(name: str, **kw: object) -> Method:
    """A method with calroll's forward (calibrated roll-out) and a consistent backward."""
    return Method(name, "async-1f1b", forward="predict", backward="forward", predictor=Calibrated(Rollout()),
                  **kw)  # type: ignore[arg-type]


CANDIDATES: Dict[str, Method] = {m.name: m for m in (
    # the delay shrinks: micro-batches, one update per minibatch (2BW's schedule), predicted forward
    _predicting("2bw-calroll", chunks=None),
    # local accumulation a = 2: versions crossed about halved
    _predicting("la2-calroll", chunks=2),
    # the update compensated, PipeDream's stash
    Method("pd-sc", "async-1f1b", backward="forward", compensation=SpikeCompensation()),
    Method("pd-dm", "async-1f1b", backward="forward", compensation=DelayMomentum()),
    Method("pd-dc", "async-1f1b", backward="forward", compensation=DCASGD()),
    Method("pd-lr", "async-1f1b", backward="forward", compensation=PipeMareLR(FOREVER)),
    # the momentum lowered by the delay, on a shrunk delay (2BW's: the library's 2bw-dm)
    Method("2bw-sc", "async-1f1b", chunks=None, backward="forward", compensation=SpikeCompensation()),
    Method("la2-dm", "async-1f1b", chunks=2, backward="forward", compensation=DelayMomentum()),
    # the update compensated on top of calroll's prediction
    _predicting("calroll-dm", compensation=DelayMomentum()),
    _predicting("calroll-lr", compensation=PipeMareLR(FOREVER)),
    _predicting("calroll-dm-sc", compensation=Chain(DelayMomentum(), SpikeCompensation())),
)}

if __name__ == "__main__":
    import learning_efficiency as le

    le.CANDIDATES.update(CANDIDATES)
    le.main(sys.argv[1:])
