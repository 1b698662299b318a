"""Tied parameters across stages (pipeline_rt.ties): the flush methods against single-device
training, locally and across gloo ranks; the asynchronous methods refused.

The model (tests/ties_worker.py): a 4-stage token model whose output projection is its input
embedding (GPT-2's tie). The oracle: the same modules as one model, one AdamW over its
(deduplicated) parameters, one step per minibatch on the whole minibatch's mean loss.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import List, Sequence, Tuple

import pytest
import torch
from torch import Tensor, nn

from pipeline_rt import Pipeline
from pipeline_rt.methods import METHODS
from pipeline_rt.ties import TieError, Ties

from dist_worker import launch
from ties_worker import N, TIE, TieRuns, adamw, data, modules

pytestmark = pytest.mark.usefixtures("float64")

FLUSH = ("sync", "1f1b-flush")


def single_device(stages: Sequence[nn.Module], batches: Sequence[Tuple[Tensor, Tensor]]) -> Tuple[List[float], nn.Module]:
    """The oracle: the stages as one model (the tie one parameter), trained on one device."""
    model = copy.deepcopy(nn.Sequential(*stages))  # deepcopy keeps the tie: one parameter
    opt = adamw(model.parameters())
    losses = []
    for x, y in batches:
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, model


def assert_trained_as(oracle: nn.Module, stage_modules: Sequence[nn.Module]) -> None:
    for k, (want, got) in enumerate(zip(oracle, stage_modules)):
        for (name, w), (_, p) in zip(want.named_parameters(), got.named_parameters()):
            torch.testing.assert_close(p, w, msg=lambda m: f"stage {k} {name}: {m}")


@pytest.mark.parametrize("method", FLUSH)
def test_shared_parameter_equals_single_device(method):
    stages = modules()
    want_losses, oracle = single_device(stages, data())
    pipe = Pipeline(stages, ["cpu"] * N, adamw, nn.functional.cross_entropy, method=method)
    assert pipe.ties == [{0: "weight", 3: "weight"}]
    losses = pipe.train(data())
    torch.testing.assert_close(losses, want_losses)
    assert_trained_as(oracle, pipe.stages)
    assert pipe.stages[3].weight is pipe.stages[0].weight, "the user's tie is kept"


def test_declared_tie_of_separate_copies_equals_single_device():
    """Stages built apart (factories, each its own copy): the declared tie takes the owner's value."""
    tied = modules()
    want_losses, oracle = single_device(tied, data())
    apart = modules(tied=False)
    factories = [lambda m=m: m for m in apart]
    pipe = Pipeline(factories, ["cpu"] * N, adamw, nn.functional.cross_entropy, method="1f1b-flush",
                    ties=[TIE])
    torch.testing.assert_close(pipe.train(data()), want_losses)
    assert_trained_as(oracle, pipe.stages)


@pytest.mark.parametrize("method", sorted(set(METHODS) - set(FLUSH)))
def test_asynchronous_methods_refuse_a_tie(method):
    with pytest.raises(TieError) as e:
        Pipeline(modules(), ["cpu"] * N, adamw, nn.functional.cross_entropy, method=method)
    text = str(e.value)
    assert f"method {method!r}" in text and "method='sync'" in text and "untie" in text
    assert "stage 0: 'weight'" in text and "stage 3: 'weight'" in text
    assert max(len(line) for line in text.splitlines()) < 120


def test_holders_on_different_devices_are_refused():
    ties = Ties(None, modules(), METHODS["sync"], "local", clip=False)
    stages = modules()
    ties.params_of(0, stages[0], torch.device("cpu"))
    with pytest.raises(TieError, match=r"stages 0 and 3 hold the same parameter .* different devices \(cpu and cuda:1\)"):
        ties.params_of(3, stages[3], torch.device("cuda", 1))


def test_resume_with_a_tie_is_exact(tmp_path: Path):
    """A checkpoint cut of the last stage precedes the owner's STEP: the shared tensor's value
    is the owner's at resume."""
    whole = Pipeline(modules(), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync")
    want = whole.train(data())
    first = Pipeline(modules(), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync")
    first.train(data(3), checkpoint_every=1, checkpoint_dir=tmp_path)
    again = Pipeline(modules(seed=1), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync")
    assert again.train(data(), resume_from=tmp_path / "mb000002") == want
    for a, b in zip(again.stages, whole.stages):
        for p, q in zip(a.parameters(), b.parameters()):
            assert torch.equal(p, q)


def test_dist_equals_single_device(tmp_path: Path):
    """One launch of 4 gloo ranks: a declared tie of copies built apart (the owner's value
    broadcast), a tie found among modules, and a resume; copies bit-identical across ranks."""
    want_losses, oracle = single_device(modules(), data())
    out = launch(TieRuns(str(tmp_path / "ckpt")), tmp_path, deadline=120.0)
    assert out.exitcodes == [0] * N, out.errors
    for case in ("declared", "found", "resumed"):
        for rank, result in enumerate(out.results):
            losses, weights = result[case]
            torch.testing.assert_close(losses, want_losses, msg=lambda m: f"{case}, rank {rank}: {m}")
            for (name, w), (got_name, p) in zip(oracle[rank].named_parameters(), weights.items()):
                torch.testing.assert_close(p, w, msg=lambda m: f"{case}, stage {rank} {name}: {m}")
        assert torch.equal(out.results[0][case][1]["weight"], out.results[N - 1][case][1]["weight"]), case
    for result in out.results:  # a resume is the uninterrupted run, bit for bit
        assert result["resumed"][0] == result["declared"][0]
        assert all(torch.equal(result["resumed"][1][n], w) for n, w in result["declared"][1].items())
    assert out.results[0]["found_ties"] == [TIE]


def test_dist_refuses_clipping_a_tie():
    with pytest.raises(TieError, match="clip_grad_norm with tied parameters and backend='dist'"):
        Pipeline(modules(), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync", backend="dist",
                 clip_grad_norm=1.0)
