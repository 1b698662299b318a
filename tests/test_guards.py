"""pipeline_rt.guards: each check raises when it must, names the problem, the place and the fix,
and lets through what is fine."""
import contextlib
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pipeline_rt.batchnorm import convert_deferred_batch_norm
from pipeline_rt.guards import (as_message, batch_dependent, check_batch_dependent, check_device, loss_reduction,
                                micro_batch_weight)


def _flat(e):
    """An error's message with its lines joined (messages are wrapped at guards.WIDTH)."""
    return " ".join(line.strip() for line in str(e.value if hasattr(e, "value") else e).splitlines())


@contextlib.contextmanager
def raises(exc, pattern):
    """pytest.raises(exc) matching ``pattern`` against the message with its lines joined."""
    with pytest.raises(exc) as e:
        yield e
    assert re.search(pattern, _flat(e)), _flat(e)


class RowMixer(nn.Module):
    """A user's module whose forward mixes rows, marked by its author."""

    batch_dependent = True

    def forward(self, x):
        return x - x.mean(0)


# ---------------------------------------------------------------------- batch_dependent

def test_batch_dependent_reports_the_batch_norm_family_and_marked_modules():
    accepted = nn.BatchNorm1d(2)
    accepted.batch_dependent = False
    model = nn.Sequential(
        nn.BatchNorm1d(2), nn.BatchNorm2d(2), nn.BatchNorm3d(2), nn.SyncBatchNorm(2), nn.LazyBatchNorm1d(),
        nn.BatchNorm2d(2, track_running_stats=False), nn.InstanceNorm2d(2, track_running_stats=True),
        nn.Sequential(RowMixer()),
        # not batch dependent:
        nn.InstanceNorm2d(2), nn.GroupNorm(1, 2), nn.LayerNorm(2), nn.Linear(2, 2), accepted,
        convert_deferred_batch_norm(nn.BatchNorm1d(2), 2),
    )
    found = batch_dependent(model)
    assert [name for name, _ in found] == ["0", "1", "2", "3", "4", "5", "6", "7.0"]
    assert all(m is model.get_submodule(name) for name, m in found)


def test_batch_dependent_names_the_root_and_honours_marks_on_containers_only_for_themselves():
    assert batch_dependent(nn.BatchNorm1d(2))[0][0] == ""
    block = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    block.batch_dependent = False  # the mark is for the container itself; its BatchNorm is still reported
    assert [n for n, _ in batch_dependent(block)] == ["1"]
    marked = nn.Linear(2, 2)
    marked.batch_dependent = True
    assert [n for n, _ in batch_dependent(nn.Sequential(marked))] == ["0"]


# ---------------------------------------------------------------------- check_batch_dependent

def _stages():
    return [nn.Sequential(nn.Linear(4, 4), nn.ReLU()),
            nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.BatchNorm1d(4)), nn.Linear(4, 2))]


def test_check_batch_dependent_names_module_stage_and_fixes():
    with pytest.raises(ValueError) as e:
        check_batch_dependent(_stages(), 4, "sync")
    msg = str(e.value)
    flat = " ".join(line.strip() for line in msg.splitlines())
    for part in ("Where: - stage 1 holds module '1.0' (BatchNorm1d) Fixes (any one):", "'sync'",
                 "4 micro-batches", "chunks=1", "equals single-device training exactly",
                 "for k in [1]: stages[k] = pipeline_rt.batchnorm.GhostBatchNorm.convert(stages[k], group_rows=R)",
                 "for k in [1]: stages[k] = pipeline_rt.batchnorm.convert_deferred_batch_norm(stages[k])",
                 "batch_dependent = False", "See docs/batch_dependent.rst."):
        assert part in flat, (part, msg)
    assert "stage 0" not in msg


def test_check_batch_dependent_names_every_stage():
    stages = _stages() + [nn.Sequential(nn.Linear(2, 2), RowMixer()), nn.BatchNorm1d(2)]
    with pytest.raises(ValueError) as e:
        check_batch_dependent(stages, 2, "1f1b-flush")
    msg = str(e.value)
    flat = _flat(e)
    assert ("Where:\n  - stage 1 holds module '1.0' (BatchNorm1d)\n  - stage 2 holds module '1' (RowMixer)\n"
            "  - stage 3 holds the stage module itself (BatchNorm1d)\n") in msg
    assert "for k in [1, 3]: stages[k] = pipeline_rt.batchnorm.GhostBatchNorm.convert" in flat


def test_check_batch_dependent_fix_depends_on_method_and_module():
    with raises(ValueError, "changes the method"):
        check_batch_dependent(_stages(), 4, "2bw")
    with raises(ValueError, "the default of method 'pipedream'"):
        check_batch_dependent(_stages(), 4, "pipedream")
    with pytest.raises(ValueError) as e:  # convert does not handle these: not offered
        check_batch_dependent([nn.Sequential(nn.InstanceNorm1d(4, track_running_stats=True), RowMixer())], 2, "sync")
    msg = str(e.value)
    assert "stage 0" in msg and "(InstanceNorm1d)" in msg and "(RowMixer)" in msg
    assert "convert_deferred_batch_norm" not in msg and "GhostBatchNorm" not in msg


def test_check_batch_dependent_lets_through_what_is_fine():
    check_batch_dependent(_stages(), 1, "sync")                      # one micro-batch: exact
    stages = _stages()
    stages[1] = convert_deferred_batch_norm(stages[1], 4)
    check_batch_dependent(stages, 4, "sync")                         # converted
    accepted = _stages()
    accepted[1][1][0].batch_dependent = False
    check_batch_dependent(accepted, 4, "sync")                       # accepted by the user
    check_batch_dependent([None, _stages()[0]], 4, "sync")           # another rank's stage


def test_check_batch_dependent_refuses_a_deferred_batch_norm_for_other_chunks():
    stages = _stages()
    stages[1] = convert_deferred_batch_norm(stages[1], 4)
    for chunks in (1, 2):
        with raises(ValueError, rf"(?s)A DeferredBatchNorm built for chunks=4 .* into {chunks} "
                                             rf"micro-batches.*Where: - stage 1: module '1.0' Fixes"):
            check_batch_dependent(stages, chunks, "sync")


# ---------------------------------------------------------------------- loss_reduction

def _summing(out, y):
    return F.mse_loss(out, y, reduction="sum")


def _defaults_to_sum(out, y, reduction="sum"):
    return F.mse_loss(out, y, reduction=reduction)


def test_loss_reduction_reads_what_it_can_see():
    summing = functools.partial(_summing)
    summing.reduction = "sum"
    cases = [
        (nn.CrossEntropyLoss(), "mean"), (nn.CrossEntropyLoss(reduction="sum"), "sum"),
        (nn.MSELoss(reduction="sum"), "sum"), (nn.KLDivLoss(reduction="batchmean"), "mean"),
        (functools.partial(F.cross_entropy, reduction="sum"), "sum"),
        (functools.partial(F.cross_entropy, label_smoothing=0.1), "mean"),
        (functools.partial(functools.partial(F.mse_loss, reduction="sum")), "sum"),
        (F.cross_entropy, "mean"), (_defaults_to_sum, "sum"), (functools.partial(_defaults_to_sum), "sum"),
        (lambda out, y: (out - y).abs().mean(), "mean"),   # invisible: assumed mean
        (summing, "sum"),                                  # an attribute on any callable is honoured
    ]
    for fn, expected in cases:
        assert loss_reduction(fn) == expected, fn


def test_loss_reduction_refuses_per_row_and_unknown_reductions():
    for fn in (nn.CrossEntropyLoss(reduction="none"), functools.partial(F.mse_loss, reduction="none")):
        with raises(ValueError, "reduction='none': it returns per-row losses.*Fixes"):
            loss_reduction(fn)
    odd = nn.MSELoss()
    odd.reduction = "median"
    with raises(ValueError, "reduction='median'"):
        loss_reduction(odd)


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("chunks", [1, 3, 4])
def test_micro_batch_weight_gives_the_whole_minibatch_loss_and_gradient(reduction, chunks):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(10, 3, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    loss_fn = nn.MSELoss(reduction=reduction)
    red = loss_reduction(loss_fn)
    whole = loss_fn(model(x), y)
    grads_whole = torch.autograd.grad(whole, list(model.parameters()))
    total = 0
    for xm, ym in zip(torch.tensor_split(x, chunks), torch.tensor_split(y, chunks)):
        total = total + micro_batch_weight(red, len(xm), len(x)) * loss_fn(model(xm), ym)
    torch.testing.assert_close(total, whole)
    for g, gw in zip(torch.autograd.grad(total, list(model.parameters())), grads_whole):
        torch.testing.assert_close(g, gw)


def test_micro_batch_weight_values_and_errors():
    assert micro_batch_weight("mean", 3, 10) == 0.3 and micro_batch_weight("sum", 3, 10) == 1.0
    with raises(ValueError, "reduction must be one of"):
        micro_batch_weight("none", 3, 10)
    with raises(ValueError, "rows=11, total=10"):
        micro_batch_weight("mean", 11, 10)


# ---------------------------------------------------------------------- check_device

def test_check_device_refuses_cuda_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError) as e:
        check_device(torch.device("cuda:1"), 2)
    msg = _flat(e)
    for part in ("stage 2 is placed on cuda:1", "no CUDA device", "torch.cuda.is_available() is False",
                 "devices=['cpu', ...]", "install a CUDA build of torch"):
        assert part in msg, (part, msg)
    with raises(ValueError, "stage 0 is placed on cuda but"):
        check_device("cuda", 0)


def test_check_device_refuses_a_cuda_index_beyond_device_count(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    check_device(torch.device("cuda:1"), 3)
    check_device(torch.device("cuda"), 3)
    with raises(ValueError, r"stage 3 is placed on cuda:2 but this machine has 2 CUDA device\(s\) "
                                         r"\(torch.cuda.device_count\(\) is 2, indices 0..1\)"):
        check_device(torch.device("cuda:2"), 3)


def test_check_device_refuses_mps_without_mps_and_passes_cpu(monkeypatch):
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with raises(ValueError, r"stage 1 is placed on mps but .*torch.backends.mps.is_available\(\) "
                                         r"is False"):
        check_device(torch.device("mps"), 1)
    check_device(torch.device("cpu"), 0)
    check_device("meta", 0)


# ---------------------------------------------------------------------- as_message

def test_as_message_passes_tensors_and_none_entries_unchanged():
    h, g = torch.ones(2, 3), torch.zeros(2)
    assert as_message(h, "stage 0's output")[0] is h and len(as_message(h, "x")) == 1
    out = as_message((h, None, g), "stage 0's output")
    assert isinstance(out, tuple) and out[0] is h and out[1] is None and out[2] is g
    assert as_message([h, None], "minibatch 0's input") == (h, None)


@pytest.mark.parametrize("bad, what", [
    ({"h": torch.ones(2)}, "a dict with keys \\['h'\\]"),
    ([[torch.ones(2)], torch.ones(2)], "a list whose entry 0 is a list of length 1"),
    ((torch.ones(2), 3.0), "a tuple whose entry 1 is a Python float"),
    (3, "a Python int"),
    ("text", "a str"),
    ((), "an empty tuple"),
    ((None, None), "with at least one Tensor"),
])
def test_as_message_refuses_what_cannot_pass_naming_where(bad, what):
    for where in ("stage 1's output", "minibatch 3's input"):
        with raises(TypeError, rf"^{where} must be a Tensor, or a tuple/list of Tensors "
                                            rf"\(None entries pass through unchanged\).*{what}"):
            as_message(bad, where)


# ---------------------------------------------------------------------- readable messages

def test_long_messages_are_short_lines_grouped(monkeypatch):
    """Every long message the guards raise: problem, ``Where:``, ``Fix(es)``, lines of at most
    guards.WIDTH columns (the batch-dependent one was one line of 1,700 characters)."""
    from pipeline_rt import guards
    from pipeline_rt.lossprobe import ReductionProbe

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mismatch = _stages()
    mismatch[1] = convert_deferred_batch_norm(mismatch[1], 4)
    many = _stages() + [nn.Sequential(nn.Linear(2, 2), RowMixer()), nn.BatchNorm1d(2)]
    calls = {
        "batch-dependent": lambda: check_batch_dependent(many, 4, "2bw"),
        "chunks mismatch": lambda: check_batch_dependent(mismatch, 2, "1f1b-flush"),
        "device": lambda: check_device("cuda:3", 7),
        "message": lambda: as_message({"hidden_states": 1, "attention_mask": 2}, "stage 3's output"),
        "reduction none": lambda: loss_reduction(nn.CrossEntropyLoss(reduction="none")),
        "loss probe": lambda: ReductionProbe(lambda o, t: o.sum() ** 2, strict=True)(torch.ones(4, 2), torch.ones(4)),
    }
    for name, call in calls.items():
        with pytest.raises((ValueError, TypeError)) as e:
            call()
        lines = str(e.value).splitlines()
        assert max(len(line) for line in lines) <= 100 == guards.WIDTH, (name, str(e.value))
        if name != "message":
            assert lines[-1].startswith(("Fix", "  ", "See ")), (name, lines)
    text = str(pytest.raises(ValueError, calls["batch-dependent"]).value)
    assert len(text.splitlines()) >= 10 and "\nWhere:\n" in text and "\nFixes (any one):\n  1. " in text
