"""``pipeoptim compare`` end to end on tiny settings."""
from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeoptim_compare import cli
from pipeoptim_compare.tasks import TASKS, Task, register_task

PNG = b"\x89PNG\r\n\x1a\n"
ROOT = Path(__file__).resolve().parents[1]
QUIET = ["--no-progress", "--optimizers", "sgd"]
#: methods with one micro-batch per minibatch: their first loss is the initial model's, bit for bit
UNSPLIT = "async,pipedream,spectrain,pipeoptim"

#: an entry point that draws its weights, data and dropout from torch's global generator, unseeded
ENTRY = """
    import torch
    from torch import nn

    def _data(n):
        x = torch.randn(n, 4)
        return [(x[i:i + 8], (x[i:i + 8, 0] > 0).long()) for i in range(0, n, 8)]

    def build():
        return nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 2)), _data(48)

    def staged():
        return [nn.Sequential(nn.Linear(4, 8), nn.Tanh()), nn.Linear(8, 8), nn.Linear(8, 2)], _data(32)

    def held_out():
        return build()[0], _data(32), nn.functional.cross_entropy, _data(16)

    def accuracy(out, y):
        return float((out.argmax(-1) == y).float().mean())

    def as_dict():
        return {"model": build()[0], "batches": _data(32), "eval_batches": _data(16), "metric": accuracy}

    def returns_int():
        return 3

    def five():
        return 1, 2, 3, 4, 5

    def no_batches():
        return {"model": build()[0]}

    def not_sequential():
        return nn.Linear(4, 2), _data(8)

    value = 3
"""


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


@pytest.fixture
def entry(user_module):
    user_module("cli_user_mod", ENTRY)
    return "cli_user_mod"


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


def test_compare_tiny_lists_every_file_written(tiny_task, tmp_path, capsys):
    out = tmp_path / "run"
    rc = cli.main(["compare", "--task", tiny_task, "--depth", "2", "--methods", "sync,pipedream,pipeoptim",
                   "--optimizers", "sgd,adam", "--epochs", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    _check_outputs(out, ["sync", "pipedream", "pipeoptim"], ["sgd", "adam"])
    printed = capsys.readouterr().out
    assert "pred. err" in printed and "pipeoptim" in printed
    assert cli.wrap(cli.TIMING_NOTE) in (out / "results.md").read_text()
    assert cli.columns_line(2) in printed.splitlines()  # what the time column is, in one line
    listed = printed.split("wrote:\n")[1].split()
    assert sorted(listed) == sorted(str(p) for p in out.iterdir())


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


def test_entry_same_initial_weights_data_and_dropout_for_every_method(entry, tmp_path):
    res = cli.compare(task=f"{entry}:build", depth=2, methods=UNSPLIT.split(","), optimizers=["sgd"],
                      out=tmp_path, progress=False)
    first = {r.method: r.losses[0] for r in res}
    assert len(set(first.values())) == 1, first
    _check_outputs(tmp_path, UNSPLIT.split(","), ["sgd"])


def test_entry_follows_the_seed(entry, tmp_path):
    def losses(seed):
        return cli.compare(task=f"{entry}:build", depth=2, methods=["pipeoptim"], optimizers=["sgd"],
                           out=tmp_path, progress=False, seed=seed)[0].losses
    assert losses(0) == losses(0)
    assert losses(1) != losses(0)


@pytest.mark.parametrize("fn,metric", [("held_out", None), ("as_dict", "accuracy")])
def test_entry_held_out_data(entry, tmp_path, fn, metric):
    (r,) = cli.compare(task=f"{entry}:{fn}", depth=2, methods=["pipedream"], optimizers=["sgd"], out=tmp_path,
                       progress=False)
    assert r.eval_loss is not None and r.eval_loss > 0
    assert (r.metric is None) == (metric is None)
    if metric:
        assert 0 <= r.metric <= 1 and f"| {metric} |" in (tmp_path / "results.md").read_text()


def test_entry_list_of_stages_sets_the_depth(entry, tmp_path, capsys):
    (r,) = cli.compare(task=f"{entry}:staged", methods=["pipedream"], optimizers=["sgd"], out=tmp_path,
                       progress=False)
    assert len(r.weight_mb) == 3 and "depth 3" in (tmp_path / "results.md").read_text()
    assert cli.main(["compare", "--entry", f"{entry}:staged", "--depth", "2", "--out", str(tmp_path)] + QUIET) == 2
    assert "--depth 2, but cli_user_mod:staged returned 3 stages" in capsys.readouterr().err


@pytest.mark.parametrize("spec,message", [
    ("no_such_mod_xyz:build", "no module 'no_such_mod_xyz' in the current folder"),
    ("cli_user_mod:nope", "cli_user_mod.nope does not exist; functions defined in"),
    ("cli_user_mod:value", "cli_user_mod.value is not a function"),
    ("cli_user_mod:returns_int", "returned int; return (model, batches"),
    ("cli_user_mod:five", "returned a tuple of 5"),
    ("cli_user_mod:no_batches", "missing keys ['batches']"),
    ("cli_user_mod:not_sequential", "model must be an nn.Sequential"),
    ("cli_user_mod:build", "--depth 9, but the nn.Sequential of cli_user_mod:build has 4 children"),
])
def test_entry_mistakes_are_one_clear_line(entry, tmp_path, capsys, spec, message):
    depth = ["--depth", "9"] if spec.endswith(":build") else []
    assert cli.main(["compare", "--entry", spec, "--out", str(tmp_path)] + depth + QUIET) == 2
    err = capsys.readouterr().err
    assert err.startswith("pipeoptim compare: error: ") and message in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_entry_in_the_current_folder_without_pythonpath(entry, tmp_path):
    """As a user runs it: from the folder holding the module, which is not on PYTHONPATH; a
    mistake prints one line, no traceback."""
    env = dict(os.environ)
    assert str(tmp_path) not in env.get("PYTHONPATH", "")
    run = [sys.executable, "-m", "pipeoptim_compare", "compare", "--methods", "pipedream", "--out", "o"] + QUIET
    ok = subprocess.run(run + ["--entry", f"{entry}:staged"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=300)
    assert ok.returncode == 0, ok.stderr
    bad = subprocess.run(run + ["--entry", f"{entry}:returns_int"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and "returned int" in bad.stderr


def _result(method: str, depth: int) -> cli.RunResult:
    return cli.RunResult(method, "adamw", 0.0003, [1.0], 12.3456, 1234.5678, 0.98765, 12345.6,
                         [1234.56] * depth, [0.123] * (depth - 1) + [None])


def test_printed_table_fits_100_columns_at_any_depth(tiny_task, tmp_path, capsys):
    longest = max(cli.METHODS, key=len)
    rows = cli.terminal_rows([_result(longest, 64), _result("sync", 64)], "next-char acc")
    assert max(map(len, cli.plain(rows).splitlines())) <= cli.WIDTH
    cli.main(["compare", "--task", tiny_task, "--depth", "7", "--methods", f"sync,{longest}", "--epochs", "1",
              "--out", str(tmp_path)] + QUIET)
    printed = capsys.readouterr().out
    assert max(map(len, printed.splitlines())) <= cli.WIDTH
    md = (tmp_path / "results.md").read_text()
    assert "weight MB per stage" in md and "pred. error per stage" in md  # the wide columns stay there


@pytest.mark.parametrize("n_opt", [1, 3])
def test_plot_readable_for_any_number_of_optimizers(n_opt):
    results = [cli.RunResult(m, o, 0.1, [2.0, 1.5, 1.0], 1.0, 0.9, 0.5 + i / 10, 1.0)
               for o in ["sgd", "adam", "adamw"][:n_opt] for i, m in enumerate(cli.METHODS)]
    title = ("task my_project.experiments.tasks:build_model, 8 stages, 1 epoch(s), seed 0; same data and "
             "initial weights for every method")
    fig = cli.figure(results, title, "accuracy")
    fig.canvas.draw()
    frame = fig.bbox
    box = fig._suptitle.get_window_extent()
    assert frame.x0 <= box.x0 and box.x1 <= frame.x1 and box.y1 <= frame.y1, "title cut"
    assert "".join(fig._suptitle.get_text().split()) == "".join(title.split())
    losses, bars = fig.axes[:n_opt], fig.axes[n_opt:2 * n_opt]
    assert all(len(ax.lines) == len(cli.METHODS) for ax in losses)
    assert all(len(ax.patches) == len(cli.METHODS) for ax in bars)
    assert bars[0].get_ylabel() == "held-out accuracy"
    # every bar carries its value
    assert [t.get_text() for t in bars[0].texts] == [f"{0.5 + i / 10:.3g}" for i in range(len(cli.METHODS))]
    labels = [t.get_text() for t in fig.legends[0].get_texts()]
    assert labels == list(cli.METHODS)
    colors = [line.get_color() for line in losses[0].lines]
    assert len(set(map(str, colors))) == len(colors), "two methods share a colour"


def test_bad_arguments(capsys):
    with pytest.raises(SystemExit):
        cli.main(["compare", "--methods", "sync,nope"])
    assert "nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--optimizers", "lbfgs"])
    with pytest.raises(SystemExit):
        cli.main(["compare", "--depth", "0"])
    assert "positive" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--task", "teacher", "--entry", "m:f"])
    assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["compare", "--entry", "cli_user_mod"])
    assert "argument --entry: must look like 'module:function'" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="one per stage"):
        cli._devices("cpu,cpu,cpu", 2)


def test_help_is_plain_text(capsys):
    for argv in (["--help"], ["compare", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "--" in text and "``" not in text and ":func:" not in text and ":mod:" not in text


@pytest.mark.slow
def test_python_m_entry_point():
    r = subprocess.run([sys.executable, "-m", "pipeoptim_compare", "compare", "--help"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert r.returncode == 0 and "--entry" in r.stdout and "--depth" in r.stdout


README_LIKE = f"""# a project

Intro text.

{cli.README_BEGIN}
an old table, written by hand
{cli.README_END}

Text after the block.
"""


def _block(text: str) -> str:
    return text.split(cli.README_BEGIN)[1].split(cli.README_END)[0]


def _first_table(text: str) -> list:
    """The lines of the first markdown table of ``text`` (the run's table; the verdict's follows)."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[start:end]


def test_readme_block_is_rewritten_by_the_run(tiny_task, tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(README_LIKE, encoding="utf-8")
    argv = ["compare", "--task", tiny_task, "--depth", "2", "--methods", "sync,pipeoptim", "--epochs", "1",
            "--minibatches", "4", "--out", str(tmp_path / "run"), "--readme", str(readme)] + QUIET
    assert cli.main(argv) == 0
    text = readme.read_text(encoding="utf-8")
    before, after = README_LIKE.split(cli.README_BEGIN)[0], README_LIKE.split(cli.README_END)[1]
    assert text.startswith(before + cli.README_BEGIN + "\n") and text.endswith("\n" + cli.README_END + after)
    block = _block(text)
    assert "old table" not in block
    assert f"`pipeoptim {' '.join(argv)}`\non " in block  # the command line, as typed
    assert "cpu (" in block and "torch " + torch.__version__ in block and " wall time (training " in block
    assert re.search(r"1-minute load average \d+\.\d before the run, \d+\.\d after it: ", " ".join(block.split()))
    printed = capsys.readouterr().out
    table = _first_table(block)
    assert [c.strip() for c in table[0].strip("|").split("|")] == cli.terminal_rows([], "accuracy")[0]
    assert [row.split("|")[2].strip() for row in table[2:]] == ["sync", "pipeoptim"]
    assert cli.wrap(cli.TIMING_NOTE) in block and str(readme) in printed.split("wrote:\n")[1]
    # the verdict: the same text in the README block and in results.md, as the terminal prints it
    md = (tmp_path / "run" / "results.md").read_text(encoding="utf-8")
    verdict = block.split(cli.wrap(cli.TIMING_NOTE))[1].strip()
    assert verdict.startswith("Verdict (computed from this run)") and verdict in md
    assert verdict.splitlines()[-1].startswith("| sgd | pipeoptim | ")
    printed_verdict = printed.split("Verdict (computed from this run)")[1].split("\nper-stage columns")[0]
    assert "sgd: closest to sync by accuracy: pipeoptim" in " ".join(printed_verdict.split())
    # writing again replaces the block, it does not add one
    again = cli.replace_block(text, "new", str(readme))
    assert again.count(cli.README_BEGIN) == 1 and _block(again) == "\nnew\n" and again.endswith(after)


@pytest.mark.parametrize("text", ["no markers\n", f"{cli.README_END}\n{cli.README_BEGIN}\n",
                                  README_LIKE + cli.README_BEGIN + "\n", None])
def test_readme_without_one_block_is_refused_before_training(tiny_task, tmp_path, capsys, monkeypatch, text):
    readme = tmp_path / "README.md"
    if text is not None:
        readme.write_text(text, encoding="utf-8")
    monkeypatch.setattr(cli, "_run_all", lambda *a, **k: pytest.fail("trained before checking --readme"))
    assert cli.main(["compare", "--task", tiny_task, "--out", str(tmp_path), "--readme", str(readme)] + QUIET) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pipeoptim compare: error: --readme {readme}: ") and len(err.splitlines()) == 1
    assert text is None or readme.read_text(encoding="utf-8") == text


def test_readme_block_holds_the_default_run_of_the_make_target():
    """README.md's block is what ``make readme`` writes: the recorded command is the target's,
    which is the default comparison (``make compare``'s command) plus ``--readme README.md``,
    and the table has a row per optimizer and method of that default."""
    make = (ROOT / "Makefile").read_text(encoding="utf-8")
    target = make.split("\nreadme:")[1].split("\n")[1].strip()
    assert target == "$(BIN)/pipeoptim compare --readme README.md"
    assert make.split("\ncompare:")[1].split("\n")[1].strip() == "$(BIN)/pipeoptim compare"
    block = _block((ROOT / "README.md").read_text(encoding="utf-8"))
    assert block.startswith("\n") and block.endswith("\n")
    assert "`pipeoptim compare --readme README.md`\non " in block and " wall time (training " in block
    table = _first_table(block)
    header = cli.terminal_rows([], "accuracy")[0]
    assert table[0] == cli.markdown([header]).splitlines()[0]
    rows = [tuple(c.strip() for c in row.strip("|").split("|")[:2]) for row in table[2:]]
    assert rows == [(o, m) for o in cli.OPTIMIZERS for m in cli.METHOD_NAMES]
    # its verdict agrees with its table (both written by the run, neither edited by hand)
    cells = {tuple(r[:2]): r for r in ([c.strip() for c in row.strip("|").split("|")] for row in table[2:])}
    verdict = _first_table(block.split("Verdict (computed from this run)")[1])
    for row in verdict[2:]:
        opt, method, loss, acc = [c.strip() for c in row.strip("|").split("|")][:4]
        mine, ref = cells[(opt, method)], cells[(opt, "sync")]
        if method == "sync":
            assert (loss, acc) == (f"{ref[4]} (ref.)", f"{float(ref[5]):.3g} (ref.)")
            continue
        assert float(loss.split("x")[0]) == pytest.approx(float(mine[4]) / float(ref[4]), abs=0.01)
        assert float(acc.removesuffix(" pts")) == pytest.approx(100 * (float(mine[5]) - float(ref[5])), abs=0.11)
