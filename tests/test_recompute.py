"""Activation recomputation (:mod:`pipeline_rt.recompute`).

The oracle is the same method without recomputation, on the same data, with dropout on:
``recompute=True`` (or a list of stages) re-runs each forward at the forward's weights and
RNG state and redirects what it saves to the backward's weights, so every loss and every
final weight is bit for bit the method's own. ``torch.utils.checkpoint`` inside a stage: the
same oracle where the runtime can make it exact, else a :class:`StageError` naming the fix.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import pytest
import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from pipeline_rt import METHODS, Pipeline, StageError
from pipeline_rt.batchnorm import DeferredBatchNorm

pytestmark = pytest.mark.usefixtures("float64")

N = 4
MINIBATCHES = 6


class Block(nn.Module):
    """Linear, tanh, dropout; through ``torch.utils.checkpoint`` when ``reentrant`` is a bool."""

    def __init__(self, i: int, o: int, reentrant: Optional[bool] = None, norm: bool = False) -> None:
        super().__init__()
        self.reentrant = reentrant
        self.body = nn.Sequential(nn.Linear(i, o), *([DeferredBatchNorm(o, chunks=1)] if norm else []),
                                  nn.Tanh(), nn.Dropout(0.3))

    def forward(self, x: Tensor) -> Tensor:
        if self.reentrant is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.reentrant)


def stages(reentrant: Optional[bool] = None, norm: bool = False) -> List[nn.Module]:
    torch.manual_seed(0)
    # the checkpoint sits in stage 1, where an asynchronous method's forward and backward see
    # different weights, and in the last stage, where they never do
    return [Block(5, 6), Block(6, 6, reentrant, norm), Block(6, 6), nn.Sequential(Block(6, 6, reentrant),
                                                                                   nn.Linear(6, 2))]


def data() -> List[Tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 2, generator=g)) for _ in range(MINIBATCHES)]


def train(method: str, modules: List[nn.Module], fit: Optional[dict] = None,
          **kw) -> Tuple[List[float], List[Tensor], Pipeline]:
    """Train ``modules`` with ``method`` (``Pipeline`` keywords ``kw``, ``train`` keywords ``fit``)."""
    if "norm" in kw:  # DeferredBatchNorm counts the pipeline's micro-batches
        kw.pop("norm")
        chunks = METHODS[method].num_chunks(N)
        for m in modules[1].modules():
            if isinstance(m, DeferredBatchNorm):
                m.chunks = chunks
    torch.manual_seed(3)  # each stage's RNG stream starts from here
    pipe = Pipeline(modules, ["cpu"] * N, lambda ps: torch.optim.Adam(ps, lr=1e-2), nn.functional.mse_loss,
                    method=method, **kw)
    losses = pipe.train(data(), **(fit or {}))
    return losses, [t.detach().clone() for m in pipe.stages for t in m.state_dict().values()], pipe


def assert_same(got, want, what: str) -> None:
    assert got[0] == want[0], f"{what}: losses differ"
    assert len(got[1]) == len(want[1])
    for i, (a, b) in enumerate(zip(got[1], want[1])):
        assert torch.equal(a, b), f"{what}: state tensor {i} differs by {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("method", sorted(METHODS))
def test_recompute_equals_the_method_without_it(method):
    want = train(method, stages())
    for recompute in (True, [0, 2]):
        assert_same(train(method, stages(), recompute=recompute), want, f"{method} recompute={recompute}")


def exact_with_torch_checkpoint(method: str, recompute: bool, reentrant: bool) -> bool:
    """Where the runtime makes a module's own recomputation exact (pipeline_rt.recompute)."""
    m = METHODS[method]
    return m.shape != "async-1f1b" or m.backward == "forward" or (recompute and reentrant)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_torch_checkpoint_inside_a_stage_is_exact_or_refused(method):
    want = train(method, stages())
    for reentrant in (True, False):
        for recompute in (False, True):
            what = f"{method}, use_reentrant={reentrant}, recompute={recompute}"
            if exact_with_torch_checkpoint(method, recompute, reentrant):
                assert_same(train(method, stages(reentrant), recompute=recompute), want, what)
                continue
            fix = "use_reentrant=True" if recompute else r"recompute=\[1\]"
            with pytest.raises(StageError, match=f"(?s)stage 1: its module recomputes.*{fix}"):
                train(method, stages(reentrant), recompute=recompute)


class Functional(nn.Module):
    """A checkpoint of a plain function (no module call inside it)."""

    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        self.reentrant, self.lin = reentrant, nn.Linear(6, 6)

    def forward(self, x: Tensor) -> Tensor:
        w, b = self.lin.weight, self.lin.bias
        return checkpoint(lambda t: torch.tanh(nn.functional.linear(t, w, b)), x, use_reentrant=self.reentrant)


@pytest.mark.parametrize("reentrant", [True, False])
def test_a_checkpointed_plain_function_is_exact_or_refused(reentrant):
    def modules(inner: bool) -> List[nn.Module]:
        ms = stages()
        torch.manual_seed(5)
        ms[1] = Functional(reentrant) if inner else nn.Sequential(nn.Linear(6, 6), nn.Tanh())
        return ms

    for method in ("pipedream", "pipeoptim"):
        want = train(method, modules(False))
        if method == "pipedream":
            assert_same(train(method, modules(True)), want, method)
            continue
        with pytest.raises(StageError, match=r"(?s)stage 1: its module recomputes.*recompute=\[1\]"):
            train(method, modules(True))
        if reentrant:
            assert_same(train(method, modules(True), recompute=[1]), want, f"{method}, recompute")


@pytest.mark.parametrize("method", ["sync", "pipedream", "pipeoptim"])
def test_deferred_batch_norm_counts_a_recomputed_forward_once(method):
    want = train(method, stages(norm=True), norm=True)
    assert_same(train(method, stages(norm=True), norm=True, recompute=True), want, f"{method} recompute")
    if METHODS[method].backward == "live" and METHODS[method].shape == "async-1f1b":
        return  # torch's own checkpoint is refused there (test above)
    assert_same(train(method, stages(reentrant=False, norm=True), norm=True), want, f"{method} torch checkpoint")


def test_a_torch_batch_norm_in_a_recomputed_stage_is_refused():
    modules = stages()
    modules[2] = nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6))
    with pytest.raises(ValueError, match="(?s)stage 2 has batch norms.*convert_deferred_batch_norm"):
        Pipeline(modules, ["cpu"] * N, lambda ps: torch.optim.SGD(ps, lr=0.1), nn.functional.mse_loss,
                 method="pipedream", recompute=[2])
    Pipeline(modules, ["cpu"] * N, lambda ps: torch.optim.SGD(ps, lr=0.1), nn.functional.mse_loss,
             method="pipedream", recompute=[0, 1, 3])  # stage 2 not recomputed: fine


@pytest.mark.parametrize("bad, error", [([4], ValueError), ([True], ValueError), ("all", TypeError)])
def test_recompute_argument_is_checked(bad, error):
    with pytest.raises(error, match="recompute"):
        Pipeline(stages(), ["cpu"] * N, lambda ps: torch.optim.SGD(ps, lr=0.1), nn.functional.mse_loss,
                 recompute=bad)


@pytest.mark.parametrize("method", ["pipedream", "pipeoptim"])
def test_in_flight_records_hold_only_their_inputs(method):
    """While micro-batches are in flight, a recomputed stage holds no autograd graph: each
    record has its inputs and its replay, no outputs, and a loss without a graph."""
    seen = []

    def inspect(info) -> None:
        for st in pipe.stage_runtimes:
            for rec in st._records.values():
                assert rec.replay is not None and rec.replay.inputs is rec.inputs
                assert rec.outputs == ()
                assert rec.loss is None or rec.loss.grad_fn is None
                seen.append(rec)

    torch.manual_seed(3)
    pipe = Pipeline(stages(), ["cpu"] * N, lambda ps: torch.optim.SGD(ps, lr=0.1), nn.functional.mse_loss,
                    method=method, recompute=True)
    pipe.train(data(), callback=inspect)
    assert len(seen) >= N - 1  # stages 0..N-2 have micro-batches in flight at the callbacks
    assert pipe.peak_in_flight == [N, N - 1, N - 2, 1]  # the schedule is the method's


@pytest.mark.parametrize("method", ["pipedream", "pipeoptim"])
def test_resume_from_a_checkpoint_with_recompute(method, tmp_path):
    """A checkpoint holds a replay of each micro-batch in flight, recomputed or not: resuming
    gives the uninterrupted run's losses and weights."""
    want = train(method, stages(), recompute=True)
    assert_same(train(method, stages(), recompute=True, fit={"checkpoint_every": 2, "checkpoint_dir": tmp_path}),
                want, "checkpointing")
    torch.manual_seed(123)  # the checkpoint's RNG streams must win
    assert_same(train(method, stages(), recompute=True, fit={"resume_from": tmp_path / "mb000002"}), want,
                "resumed")


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_dist_recompute_equals_local_without_it(tmp_path):
    """One launch of 3 gloo ranks, each recomputing its stage: the losses and weights of the
    local executor without recomputation, bit for bit (dropout on)."""
    from dist_worker import Spec, launch, oracle
    spec = Spec(world=3, methods=("pipedream", "pipeoptim", "async"), dropout=0.2, pipe={"recompute": True})
    out = launch(spec, tmp_path)
    assert out.exitcodes == [0] * spec.world, out.errors
    plain = Spec(world=3, methods=spec.methods, dropout=0.2)
    for method in spec.methods:
        losses, weights = oracle(plain, method)
        for rank, result in enumerate(out.results):
            got_losses, got_weights, _ = result[method]
            assert got_losses == losses, f"{method}: rank {rank}'s losses differ"
            for name, w in weights[rank].items():
                assert torch.equal(got_weights[name], w), f"{method}: stage {rank} {name} differs"


@pytest.mark.parametrize("method", ["sync", "pipedream", "pipeoptim", "2bw"])
def test_recompute_under_autocast_equals_autocast_without_it(method):
    """Recomputation re-enters the stage's autocast: under ``autocast=torch.bfloat16`` (float32
    master weights; autocast does not cast float64) the losses and weights are bit for bit
    those without recomputation."""
    def float32_stages() -> List[nn.Module]:
        return [m.float() for m in stages()]

    def run(**kw):
        torch.manual_seed(3)
        pipe = Pipeline(float32_stages(), ["cpu"] * N, lambda ps: torch.optim.Adam(ps, lr=1e-2),
                        nn.functional.mse_loss, method=method, autocast=torch.bfloat16, **kw)
        losses = pipe.train([(x.float(), y.float()) for x, y in data()])
        return losses, [t.detach().clone() for m in pipe.stages for t in m.state_dict().values()]

    assert_same(run(recompute=True), run(), f"{method} under bfloat16 autocast")
