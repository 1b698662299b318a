"""``pipeoptim compare`` end to end on tiny settings."""
from __future__ import annotations

import csv
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeoptim_compare import cli
from pipeoptim_compare.tasks import TASKS, Task, register_task

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def tiny_task():
    @register_task("_cli_tiny")
    def tiny(depth: int = 2, seed: int = 0) -> Task:
        g = torch.Generator().manual_seed(seed)
        x = torch.randn(96, 6, generator=g)
        y = (x[:, 0] > 0).long()
        torch.manual_seed(seed)
        model = nn.Sequential(*[nn.Sequential(nn.Linear(6, 6), nn.Tanh()) for _ in range(max(depth, 2) - 1)],
                              nn.Linear(6, 2))
        batches = [(x[i:i + 8], y[i:i + 8]) for i in range(0, 64, 8)]
        return Task("_cli_tiny", model, batches, nn.functional.cross_entropy, (x[64:], y[64:]),
                    lambda o, t: float((o.argmax(-1) == t).float().mean()))
    yield "_cli_tiny"
    TASKS.pop("_cli_tiny")


def _check_outputs(out: Path, methods, optimizers):
    assert (out / "loss_curves.png").read_bytes()[:8] == PNG
    md = (out / "results.md").read_text()
    for m in methods:
        assert f"| {m} |" in md
    rows = list(csv.reader(open(out / "results.csv")))
    assert rows[0][:2] == ["optimizer", "method"]
    assert {(r[0], r[1]) for r in rows[1:]} == {(o, m) for o in optimizers for m in methods}
    losses = list(csv.reader(open(out / "losses.csv")))
    assert len(losses) > 1


def test_compare_tiny(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["compare", "--task", tiny_task, "--depth", "2", "--methods", "sync,pipedream,pipeoptim",
                   "--optimizers", "sgd,adam", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    _check_outputs(out, ["sync", "pipedream", "pipeoptim"], ["sgd", "adam"])
    printed = capsys.readouterr().out
    assert "pred. error per stage" in printed and "pipeoptim" in printed
    assert cli.TIMING_NOTE in printed and cli.TIMING_NOTE in (out / "results.md").read_text()


def test_compare_results(tiny_task, tmp_path):
    res = cli.compare(task=tiny_task, depth=3, methods=["sync", "pipedream", "pipeoptim"], optimizers=["sgd"],
                      epochs=2, lr=0.05, out=tmp_path, progress=False)
    by = {r.method: r for r in res}
    assert all(len(r.losses) == 16 and all(map(lambda v: v == v, r.losses)) for r in res)
    # pipedream stashes versions at the first stage; sync holds one version
    assert by["pipedream"].weight_mb[0] > by["sync"].weight_mb[0]
    # only predicting methods report a prediction error; the last stage never predicts
    assert by["sync"].pred_error == [] and by["pipeoptim"].pred_error[-1] is None
    assert by["pipeoptim"].pred_error[0] is not None and by["pipeoptim"].pred_error[0] >= 0
    assert 0.0 <= by["sync"].metric <= 1.0


def test_compare_default_task_small(tmp_path):
    cli.main(["compare", "--depth", "2", "--methods", "sync,pipeoptim", "--optimizers", "adamw",
              "--epochs", "1", "--minibatches", "16", "--out", str(tmp_path), "--no-progress"])
    _check_outputs(tmp_path, ["sync", "pipeoptim"], ["adamw"])


def test_compare_entry_point(tmp_path, monkeypatch):
    (tmp_path / "cli_user_mod.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def build():
            torch.manual_seed(0)
            x = torch.randn(32, 4)
            return nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 1)), [(x[i:i+8], x[i:i+8, :1]) for i in range(0, 32, 8)], nn.functional.mse_loss
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "out"
    cli.main(["compare", "--entry", "cli_user_mod:build", "--depth", "2", "--methods", "async,pipeoptim",
              "--optimizers", "sgd", "--out", str(out), "--no-progress"])
    _check_outputs(out, ["async", "pipeoptim"], ["sgd"])


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--methods", "sync,nope"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--optimizers", "lbfgs"])
    with pytest.raises(SystemExit, match="one per stage"):
        cli._devices("cpu,cpu,cpu", 2)


def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "pipeoptim_compare", "compare", "--help"], capture_output=True, text=True,
                       cwd=Path(__file__).resolve().parents[1], timeout=120)
    assert r.returncode == 0 and "--entry" in r.stdout and "--depth" in r.stdout
