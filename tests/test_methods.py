"""The method table (docs/methods.rst, "The seven methods") as data."""
from __future__ import annotations

import pytest

from pipeline_rt.methods import METHODS, Method, get_method

PINNED = {"sync", "1f1b-flush", "async", "pipedream", "2bw", "spectrain", "pipeoptim"}


EXTRA = {"pipeoptim-cal", "pipeoptim-rollout", "pipeoptim-calroll"}  # issue 6; tested in tests/test_calibrated.py,
# tests/test_rollout.py, tests/test_calroll.py


def test_pinned_names():
    assert set(METHODS) == PINNED | EXTRA


@pytest.mark.parametrize("name,shape,forward,backward,chunks", [
    ("sync", "gpipe", "live", "live", None),
    ("1f1b-flush", "1f1b-flush", "live", "live", None),
    ("async", "async-1f1b", "live", "live", 1),
    ("pipedream", "async-1f1b", "live", "forward", 1),
    ("2bw", "async-1f1b", "live", "forward", None),
    ("spectrain", "async-1f1b", "predict", "predict", 1),
    ("pipeoptim", "async-1f1b", "predict", "live", 1),
])
def test_policies(name, shape, forward, backward, chunks):
    m = get_method(name)
    assert (m.shape, m.forward, m.backward, m.chunks) == (shape, forward, backward, chunks)
    assert m.predicts == (forward == "predict")
    assert m.num_chunks(4) == (4 if chunks is None else chunks)


def test_spectrain_half_stage_lookahead_and_rule():
    m = get_method("spectrain")
    assert [m.extra(k) for k in range(6)] == [0, 0, 1, 1, 2, 2]
    assert m.rule == "smoothed_gradient"
    p = get_method("pipeoptim")
    assert [p.extra(k) for k in range(4)] == [0] * 4 and p.rule is None


def test_overrides():
    m = get_method("pipeoptim", backward="predicted")
    assert m.backward == "forward" and m.forward == "predict" and m.name == "pipeoptim"
    assert get_method("pipeoptim", backward="live") == METHODS["pipeoptim"]
    assert get_method("async", chunks=3).num_chunks(8) == 3
    custom = Method("mine", "async-1f1b", forward="predict")
    assert get_method(custom) is custom


def test_errors():
    with pytest.raises(ValueError, match=r"unknown method 'gpipe'; choose one of \['1f1b-flush', '2bw'"):
        get_method("gpipe")
    with pytest.raises(ValueError, match="backward must be 'live' or 'predicted'"):
        get_method("pipeoptim", backward="stashed")
    with pytest.raises(ValueError, match="needs a predicting method"):
        get_method("pipedream", backward="predicted")
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="chunks must be a positive int"):
            get_method("async", chunks=bad)
