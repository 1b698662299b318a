"""The training examples (examples/train_lm.py, examples/train_cnn.py, examples/train_gpt2_hf.py)
run end to end with ``--tiny``, each in a fresh interpreter: exit 0, the plot, table and results are written,
the loss goes down, and a run resumed from a mid-run checkpoint ends exactly where the
uninterrupted run ended."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List

import pytest

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, out: Path, *options: str) -> Dict[str, Any]:
    """Run ``examples/<script> --tiny --out out options...``; its results.json."""
    cmd = [sys.executable, str(ROOT / "examples" / script), "--tiny", "--out", str(out), "--no-progress", "--threads", "1",
           *options]
    proc = subprocess.run(cmd, cwd=out.parent, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    for name in ("plot.png", "results.md", "results.json"):
        assert (out / name).stat().st_size > 0, f"{name} missing from {out}"
    return json.loads((out / "results.json").read_text())


def mean(values: List[float]) -> float:
    return sum(values) / len(values)


@pytest.mark.slow
@pytest.mark.parametrize("script, methods", [("train_lm.py", "sync,pipeoptim"), ("train_cnn.py", "sync,pipeoptim"),
                                             ("train_gpt2_hf.py", "sync,pipeoptim")])
def test_tiny_run_learns(tmp_path: Path, script: str, methods: str) -> None:
    res = run_example(script, tmp_path / "out", "--method", methods)
    table = (tmp_path / "out" / "results.md").read_text()
    assert [m["method"] for m in res["methods"]] == methods.split(",")
    for m in res["methods"]:
        assert f"| {m['method']} |" in table
        losses = m["losses"]
        assert mean(losses[-10:]) < 0.9 * mean(losses[:10]), (m["method"], losses[:10], losses[-10:])
        evals = m["evals"]
        assert evals == json.loads((tmp_path / "out" / "ckpt" / m["method"] / "history.json").read_text())
        assert evals[-1]["loss"] < evals[0]["loss"] or len(evals) == 1
        assert m["throughput"] > 0
    if script == "train_cnn.py":
        # sync splits minibatches into micro-batches: the BatchNorms were converted, the
        # asynchronous method kept whole minibatches
        assert {m["method"]: m["chunks"] for m in res["methods"]} == {"sync": 4, "pipeoptim": 1}
        assert all(m["evals"][-1]["metric"] > 0.3 for m in res["methods"])  # accuracy, chance is 0.1


@pytest.mark.slow
def test_resume_from_mid_run_checkpoint_is_exact(tmp_path: Path) -> None:
    options = ("--method", "pipeoptim", "--epochs", "2", "--checkpoint-every", "10")
    full = run_example("train_cnn.py", tmp_path / "full", *options)["methods"][0]
    per_epoch = full["evals"][0]["step"]
    cut = 10 * (per_epoch // 10 + 1)  # the first checkpoint inside the second epoch
    assert per_epoch < cut < len(full["losses"])
    # the state a crash right after checkpoint `cut` leaves: later checkpoints gone, no outputs
    (tmp_path / "crashed").mkdir()
    shutil.copytree(tmp_path / "full" / "ckpt", tmp_path / "crashed" / "ckpt")
    for folder in (tmp_path / "crashed" / "ckpt" / "pipeoptim").glob("mb*"):
        if int(folder.name[2:]) > cut:
            shutil.rmtree(folder)
    resumed = run_example("train_cnn.py", tmp_path / "crashed", *options, "--resume")["methods"][0]
    assert resumed["trained"] == len(full["losses"]) - cut
    assert resumed["losses"] == full["losses"]
    assert resumed["evals"] == full["evals"]  # the final eval loss and accuracy, bit for bit


def test_resume_refuses_a_folder_of_unusable_checkpoints(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """``--resume`` starts from 0 only where no checkpoint exists yet; a folder whose
    checkpoints cannot be used (here: a damaged meta.pt) is an error naming it, not a silent
    fresh start."""
    from pipeline_rt import CheckpointError
    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "examples"))
    from _common import _latest_done
    assert _latest_done(tmp_path) == 0
    (tmp_path / "mb000004").mkdir()
    (tmp_path / "mb000004" / "meta.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="meta.pt"):
        _latest_done(tmp_path)
