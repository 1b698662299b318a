"""split_model (pipeline_rt.split) and declared skips (pipeline_rt.skip), float64 on CPU.

Oracles: single-device training of the same model on the same data (the flush methods),
and, for the asynchronous methods, the same pipeline split by hand with the skipped
tensor passed explicitly along the chain (an exact oracle: the feature under test is
the routing, the hand-written chain has none). The transformers GPT-2 is built from a
tiny config (random weights, nothing downloaded; tests/gpt2_worker.py), untied and tied
(tie_word_embeddings=True: the first and last stages share one Parameter), and traced once
per module; each test starts from the same saved weights.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Dict, List, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline_rt
from pipeline_rt import METHODS, Pipeline, split_model
from pipeline_rt.randomness import may_draw
from pipeline_rt.ties import TieError
from split_worker import (DIST_CASES, DIST_ROWS, WIDTH, First, Last, Middle, SkipNet, adam, dist_worker, run_skip,
                          skip_data, skip_stages, skip_stages_cached)

transformers = pytest.importorskip("transformers")
from gpt2_worker import DIST_ROWS as DIST_ROWS_GPT, GPT_SPLITS, SEQ, TiedRuns, gpt2, lm_loss, sgd, split_tied, tokens  # noqa: E402


def single_device(model: nn.Module, data: Sequence[Tuple[Any, Tensor]], loss_fn: Any,
                  make_opt: Any = sgd) -> List[float]:
    opt = make_opt(model.parameters())
    losses = []
    for x, y in data:
        opt.zero_grad()
        loss = loss_fn(model(*(x if isinstance(x, tuple) else (x,))), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def traced(layers: int, dropout: float) -> Tuple[nn.Module, pipeline_rt.SplitModel, Dict[str, Tensor]]:
    """GPT-2 split into ``layers`` stages (one block each), and its initial state."""
    model = gpt2(layers, dropout)
    stages = split_model(model, GPT_SPLITS[:layers - 1], (torch.zeros(4, SEQ, dtype=torch.long),))
    return model, stages, copy.deepcopy(model.state_dict())


@pytest.fixture(scope="module")
def gpt() -> Tuple[nn.Module, pipeline_rt.SplitModel, Dict[str, Tensor]]:
    """GPT-2, 4 layers, untied, dropout off, in 4 stages (traced once for the module)."""
    return traced(4, 0.0)


def fresh(gpt: Any) -> Tuple[nn.Module, pipeline_rt.SplitModel, nn.Module]:
    """The split GPT-2 at its initial weights, and an unsplit copy."""
    model, stages, init = gpt
    model.load_state_dict(init)
    return model, stages, copy.deepcopy(model)


def test_gpt2_sync_equals_single_device(gpt):
    """Uneven micro-batches (7 rows in 4) and a short last minibatch (5 rows); the weights come back into the model."""
    model, stages, ref = fresh(gpt)
    data = tokens([7, 7, 5])
    assert len(stages) == 4 and not any(n.startswith("_") for s in stages for n, _ in s.named_parameters())
    pipe = Pipeline(stages, ["cpu"] * 4, sgd, lm_loss, method="sync")
    assert pipe.chunks == 4
    losses = pipe.train(data)
    torch.testing.assert_close(losses, single_device(ref, data, lm_loss))
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.zero_()
    stages.load_into(other)
    names = {n for s in stages for n in s.state_dict()}
    assert names == set(model.state_dict())  # the names are the model's
    for (name, p), q in zip(ref.named_parameters(), other.parameters()):
        torch.testing.assert_close(q, p, msg=name)


@pytest.mark.parametrize("method", list(METHODS))
def test_gpt2_every_method_trains(gpt, method):
    model, stages, _ = fresh(gpt)
    before = [p.detach().clone() for p in model.parameters()]
    pipe = Pipeline(stages, ["cpu"] * 4, sgd, lm_loss, method=method)
    losses = pipe.train(tokens([6] * 4))
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses)
    assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_gpt2_eval_and_forward_run_the_eval_graph():
    """Dropout on: training draws, evaluate/forward equal the unsplit model in eval mode."""
    model, stages, ref = fresh(traced(2, 0.1))
    # the graphs say which stages draw (each gets its own RNG stream): these do, SkipNet's do not
    assert [may_draw(s) for s in stages] == [True, True]
    assert not any(may_draw(s) for s in skip_stages_cached("split"))
    data = tokens([6, 6, 3], seed=5)
    pipe = Pipeline(stages, ["cpu"] * 2, sgd, lm_loss, method="pipeoptim")
    ref.eval()
    with torch.no_grad():
        expect = sum(lm_loss(ref(x), y).item() * len(x) for x, y in data) / sum(len(x) for x, _ in data)
        logits = ref(data[0][0]).logits
    assert pipe.evaluate(data)["loss"] == pytest.approx(expect, rel=1e-12)
    torch.testing.assert_close(pipe.forward(data[0][0]).logits, logits)
    torch.manual_seed(0)
    train_mode = pipe.train(data[:1])[0]  # dropout draws in training
    assert abs(train_mode - lm_loss(ref(data[0][0]), data[0][1]).item()) > 1e-6


def test_gpt2_pipe_of_torch_pipeline_accepted_and_its_submodules_refused(gpt):
    from torch.distributed.pipelining import SplitPoint, pipeline
    _, _, ref = fresh(gpt)
    model = copy.deepcopy(ref)
    x = tokens([4])[0][0]
    pipe_ir = pipeline(model, (x,), split_spec={n: SplitPoint.BEGINNING for n in GPT_SPLITS})
    with pytest.raises(ValueError, match="split_model"):
        Pipeline([pipe_ir.get_stage_module(k) for k in range(4)], ["cpu"] * 4, sgd, lm_loss, method="sync")

    def flat(out: Tensor, y: Tensor) -> Tensor:  # torch's Pipe returns the output's tensors: the logits
        return F.cross_entropy(out.flatten(0, 1), y.flatten())

    pipe = Pipeline(pipe_ir, ["cpu"] * 4, sgd, flat, method="sync", chunks=1)
    data = tokens([4] * 3)
    torch.testing.assert_close(pipe.train(data), single_device(ref, data, lm_loss))
    with pytest.raises(RuntimeError, match="eval mode"):  # one graph, dropout baked in training mode
        pipe.evaluate(data)
    with pytest.raises(pipeline_rt.StageError, match="traced for shapes"):  # static shapes: the example's only
        pipe.train(tokens([3]))


# ---------------------------------------------------------------------- tied embeddings

_TIED: Dict[int, Any] = {}


def tied(layers: int) -> Tuple[nn.Module, pipeline_rt.SplitModel, nn.Module]:
    """A tied GPT-2 of ``layers`` blocks in as many stages (traced once per module) at its
    initial weights, and an unsplit copy."""
    if layers not in _TIED:
        model, stages = split_tied(layers)
        _TIED[layers] = (model, stages, copy.deepcopy(model.state_dict()))
    model, stages, init = _TIED[layers]
    model.load_state_dict(init)
    return model, stages, copy.deepcopy(model)


@pytest.mark.parametrize("layers,method", [(2, "sync"), (3, "sync"), (3, "1f1b-flush")])
def test_gpt2_tied_flush_equals_single_device(layers, method):
    """tie_word_embeddings=True: the first and the last stage hold the model's one embedding
    Parameter; training equals single-device training, evaluation uses the trained tie, and
    the tie maps back under both of the model's names."""
    model, stages, ref = tied(layers)
    tie = model.transformer.wte.weight
    assert model.lm_head.weight is tie
    assert [k for k, s in enumerate(stages) if any(p is tie for p in s.parameters())] == [0, layers - 1]
    pipe = Pipeline(stages, ["cpu"] * layers, sgd, lm_loss, method=method)
    assert pipe.ties == [{0: "transformer.wte.weight", layers - 1: "lm_head.weight"}]
    data = tokens([7, 7, 5])
    torch.testing.assert_close(pipe.train(data), single_device(ref, data, lm_loss))
    for (name, p), q in zip(ref.named_parameters(), model.parameters()):
        torch.testing.assert_close(q, p, msg=name)
    ref.eval()
    with torch.no_grad():
        expect = sum(lm_loss(ref(x), y).item() * len(x) for x, y in data) / sum(len(x) for x, _ in data)
    assert pipe.evaluate(data)["loss"] == pytest.approx(expect, rel=1e-12)
    assert set(stages.state_dict()) == set(model.state_dict())
    other = gpt2(layers, tie=True)
    with torch.no_grad():
        other.transformer.wte.weight.zero_()
    stages.load_into(other)
    torch.testing.assert_close(other.lm_head.weight, ref.lm_head.weight)


@pytest.mark.parametrize("method", [m for m, spec in METHODS.items() if spec.shape == "async-1f1b"])
def test_gpt2_tied_asynchronous_methods_refused(method):
    _, stages, _ = tied(2)
    with pytest.raises(TieError, match="cannot train tied parameters exactly"):
        Pipeline(stages, ["cpu"] * 2, sgd, lm_loss, method=method)


def test_gpt2_tied_dist_equals_single_device(tmp_path):
    """4 gloo ranks each split the tied GPT-2 alike (the tie found among the stages given as
    modules: broadcast, gradient all-reduce before STEP; stages 1 and 2 hold none of it);
    sync equals single-device training."""
    from dist_worker import launch
    out = launch(TiedRuns(world=4), tmp_path, deadline=120.0)
    assert out.exitcodes == [0] * 4, out.errors
    ref = gpt2(4, tie=True)
    losses = single_device(ref, tokens(DIST_ROWS_GPT), lm_loss)
    expect = ref.state_dict()
    for rank, result in enumerate(out.results):
        assert result["ties"] == [{0: "transformer.wte.weight", 3: "lm_head.weight"}]
        torch.testing.assert_close(result["losses"], losses, msg=f"rank {rank}")
        for name, t in result["state"].items():
            torch.testing.assert_close(t, expect[name], msg=f"rank {rank}: {name}")
    assert {"transformer.wte.weight", "lm_head.weight"} <= set(out.results[0]["state"])  # both names
    assert "lm_head.weight" in out.results[3]["state"]


# ---------------------------------------------------------------------- a tensor used three stages later


@pytest.mark.parametrize("kind", ["split", "skip"])
def test_skip_sync_equals_single_device(kind):
    data = skip_data()
    net = SkipNet()
    expect = single_device(net, data, F.mse_loss, adam)
    losses, weights, _ = run_skip(kind, "sync", data=data)
    torch.testing.assert_close(losses, expect)
    torch.testing.assert_close(weights, [p.detach() for p in net.parameters()])
    # the declared skip also runs outside a pipeline: the stages in sequence are the model
    if kind == "skip":
        seq = nn.Sequential(*skip_stages("skip"))
        torch.testing.assert_close(seq(data[0][0]), SkipNet()(data[0][0]))


@pytest.mark.parametrize("kind", ["split", "skip"])
@pytest.mark.parametrize("method", ["pipedream", "pipeoptim", "2bw"])
def test_skip_async_equals_explicit_chain(kind, method):
    expect_losses, expect_weights, _ = run_skip("carry", method)
    losses, weights, _ = run_skip(kind, method)
    assert losses == expect_losses
    for w, e in zip(weights, expect_weights):
        assert torch.equal(w, e)


def test_skip_dist_equals_local(tmp_path):
    """One launch of 4 gloo ranks for every case: the same losses, weights and evaluation
    (held-out data, a short last batch) as the local executor."""
    from dist_worker import Spec, launch
    out = launch(Spec(world=4), tmp_path, deadline=120.0, target=dist_worker)
    assert out.exitcodes == [0] * 4, out.errors
    for case in DIST_CASES:
        losses, weights, evaluated = run_skip(*case, data=skip_data(DIST_ROWS), evaluate=True)
        for rank, result in enumerate(out.results):
            got_losses, got_weights, got_eval = result[case]
            assert got_losses == losses and got_eval == evaluated, (case, rank)
            mine = [w for w in weights[2 * rank:2 * rank + 2]]  # each stage holds one Linear: weight, bias
            assert all(torch.equal(a, b) for a, b in zip(got_weights, mine)) and len(got_weights) == 2, (case, rank)


def test_declared_skip_errors():
    lins = [nn.Linear(2, 2) for _ in range(3)]
    with pytest.raises(ValueError, match="never popped"):
        Pipeline([First(lins[0]), Middle(lins[1])], ["cpu"] * 2, sgd, F.mse_loss)
    with pytest.raises(ValueError, match="no earlier layer stashes"):
        Pipeline([Last(lins[0]), First(lins[1])], ["cpu"] * 2, sgd, F.mse_loss)
    with pytest.raises(ValueError, match="give stage modules"):
        Pipeline([lambda: First(lins[0]), lambda: Last(lins[1])], ["cpu"] * 2, sgd, F.mse_loss).train(skip_data([2]))


# ---------------------------------------------------------------------- traced batch norm


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(4)
        self.a, self.bn, self.b = nn.Linear(WIDTH, 6), nn.BatchNorm1d(6), nn.Linear(6, 1)
        self.double()

    def forward(self, x: Tensor) -> Tensor:
        return self.b(torch.relu(self.bn(self.a(x))))


def test_traced_batch_norm_refused_under_micro_batches_exact_with_one():
    data = skip_data([8, 8, 6])
    net = BNNet()
    ref = copy.deepcopy(net)
    stages = split_model(net, ["bn", "b"], (data[0][0],))
    with pytest.raises(ValueError, match="(?s)Batch-dependent modules.*stage 1 holds module 'bn'"):
        Pipeline(stages, ["cpu"] * 3, sgd, F.mse_loss, method="sync")
    pipe = Pipeline(stages, ["cpu"] * 3, sgd, F.mse_loss, method="sync", chunks=1)
    torch.testing.assert_close(pipe.train(data), single_device(ref, data, F.mse_loss))
    torch.testing.assert_close(net.bn.running_mean, ref.bn.running_mean)
    # eval: the running statistics, left unchanged
    ref.eval()
    stats = net.bn.running_mean.clone()
    with torch.no_grad():
        expect = sum(F.mse_loss(ref(x), y).item() * len(x) for x, y in data) / sum(len(x) for x, _ in data)
    assert pipe.evaluate(data)["loss"] == pytest.approx(expect, rel=1e-12)
    torch.testing.assert_close(pipe.forward(data[0][0]), ref(data[0][0]))
    assert torch.equal(net.bn.running_mean, stats)


def test_split_model_errors():
    net = SkipNet()
    with pytest.raises(ValueError, match="not submodules"):
        split_model(net, ["l9"], (torch.zeros(4, WIDTH, dtype=torch.float64),))
    with pytest.raises(ValueError, match="at least 2 rows"):
        split_model(net, ["l1"], (torch.zeros(1, WIDTH, dtype=torch.float64),))
