"""Tied parameters across stages (pipeline_rt.ties): the flush methods against single-device
training, locally and across gloo ranks; the asynchronous methods refused.

The model (tests/ties_worker.py): a 4-stage token model whose output projection is its input
embedding (GPT-2's tie). The oracle: the same modules as one model, one AdamW over its
(deduplicated) parameters, one step per minibatch on the whole minibatch's mean loss.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, List, Optional, Sequence, Tuple

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


def single_device(stages: Sequence[nn.Module], batches: Sequence[Tuple[Tensor, Tensor]],
                  loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
                  clip: Optional[float] = None) -> Tuple[List[float], nn.Module]:
    """The oracle: the stages as one model (the tie one parameter), trained on one device
    (gradients clipped to the total norm ``clip``)."""
    model = copy.deepcopy(nn.Sequential(*stages))  # deepcopy keeps the tie: one parameter
    opt = adamw(model.parameters())
    losses = []
    for x, y in batches:
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        if clip is not None:
            nn.utils.clip_grad_norm_(model.parameters(), clip)
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


def test_global_clipping_counts_a_tie_once():
    stages = modules()
    want_losses, oracle = single_device(stages, data(), clip=0.3)
    pipe = Pipeline(stages, ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync", clip_grad_norm=0.3,
                    clip_grad_scope="global")
    torch.testing.assert_close(pipe.train(data()), want_losses)
    assert_trained_as(oracle, pipe.stages)


def _hidden(out: Any) -> Tensor:
    return out[0] if isinstance(out, tuple) else out  # a GPT2Block returns a tuple in older transformers


class GPT2Embed(nn.Module):
    """GPT-2's embeddings and first block."""

    def __init__(self, t: nn.Module) -> None:
        super().__init__()
        self.wte, self.wpe, self.block = t.wte, t.wpe, t.h[0]

    def forward(self, ids: Tensor) -> Tensor:
        return _hidden(self.block(self.wte(ids) + self.wpe(torch.arange(ids.shape[1]))))


class GPT2Block(nn.Module):
    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.block = block

    def forward(self, h: Tensor) -> Tensor:
        return _hidden(self.block(h))


class GPT2Head(nn.Module):
    """The final norm and the output projection (tied to ``wte``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.ln_f, self.lm_head = model.transformer.ln_f, model.lm_head

    def forward(self, h: Tensor) -> Tensor:
        return self.lm_head(self.ln_f(h))


def token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())


@pytest.mark.parametrize("method", FLUSH)
def test_transformers_gpt2_split_by_hand_equals_single_device(method):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(vocab_size=13, n_positions=8, n_embd=8, n_layer=2, n_head=2, resid_pdrop=0.0,
                                     embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    stages = [GPT2Embed(model.transformer), GPT2Block(model.transformer.h[1]), GPT2Head(model)]
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randint(13, (4, 6), generator=g), torch.randint(13, (4, 6), generator=g)) for _ in range(4)]
    want_losses, oracle = single_device(stages, batches, token_loss)
    pipe = Pipeline(stages, ["cpu"] * 3, adamw, token_loss, method=method)
    assert pipe.ties == [{0: "wte.weight", 2: "lm_head.weight"}]
    torch.testing.assert_close(pipe.train(batches), want_losses)
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


@pytest.mark.parametrize("ties, error", [
    ([{0: "weight"}], r"each tie must map two or more stage indices \(0\.\.3\)"),
    ([{0: "weight", 4: "weight"}], r"each tie must map two or more stage indices"),
    ([{0: "weight", 3: "head.weight"}], r"stage 3 has no parameter 'head.weight'\nits parameters: weight"),
    ([{0: "weight", 1: "0.weight"}], r"stage 1's '0.weight' \(6, 6\):torch.float64 cannot be tied .* \(11, 6\)"),
])
def test_a_wrong_declaration_is_refused(ties, error):
    with pytest.raises(TieError, match=error):
        Pipeline(modules(tied=False), ["cpu"] * N, adamw, nn.functional.cross_entropy, method="sync", ties=ties)


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


def test_dist_tie_under_data_parallel_replicas_equals_single_device(tmp_path: Path):
    """2 stages x 2 data-parallel replicas (4 gloo ranks), a declared tie between the stages:
    one group per replica sums the tie's copies, the replicas' reduction sums the replicas;
    every update is single-device training's on the concatenated minibatches."""
    from ties_worker import TieReplicas, shard, two_stages
    shards = [shard(r) for r in range(2)]
    glued = [(torch.cat([s[j][0] for s in shards]), torch.cat([s[j][1] for s in shards]))
             for j in range(len(shards[0]))]
    want_losses, oracle = single_device(two_stages(), glued)
    out = launch(TieReplicas(), tmp_path, deadline=120.0)
    assert out.exitcodes == [0] * 4, out.errors
    for result in out.results:
        torch.testing.assert_close(result["losses"], want_losses)
        for (name, w), p in zip(oracle[result["stage"]].named_parameters(), result["weights"].values()):
            torch.testing.assert_close(p, w, msg=lambda m: f"replica {result['replica']} stage "
                                                           f"{result['stage']} {name}: {m}")
