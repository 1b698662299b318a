"""`may_draw`: which stages skip the RNG-stream swap, and that skipping it changes nothing."""
from __future__ import annotations

import functools

import pytest
import torch
from torch import nn
from torch.nn import functional as Fn

from pipeline_rt import Pipeline
from pipeline_rt.batchnorm import DeferredBatchNorm, GhostBatchNorm
from pipeline_rt.randomness import QUIET_LOSSES, QUIET_MODULES, may_draw
from pipeline_rt.stage import Stage

X1, X2, X3 = (4, 6, 8), (2, 4, 6, 6), (2, 4, 4, 4, 4)  # shapes for 1d, 2d, 3d layers (batch, channels, ...)
#: every class of QUIET_MODULES (and the Lazy layers, which are not quiet): (constructor, input shape or
#: inputs); a class added there needs a row here
CASES = {
    "Sequential": (lambda: nn.Sequential(nn.Linear(8, 8)), X1), "Identity": (nn.Identity, X1),
    "Flatten": (nn.Flatten, X2), "Unflatten": (lambda: nn.Unflatten(1, (2, 2)), X2),
    "Linear": (lambda: nn.Linear(8, 3), X1), "LazyLinear": (lambda: nn.LazyLinear(3), X1),
    "Bilinear": (lambda: nn.Bilinear(8, 8, 3), (X1, X1)),
    "Embedding": (lambda: nn.Embedding(10, 3), torch.tensor([[1, 2], [3, 4]])),
    "EmbeddingBag": (lambda: nn.EmbeddingBag(10, 3), torch.tensor([[1, 2], [3, 4]])),
    "Conv1d": (lambda: nn.Conv1d(6, 3, 3), X1), "Conv2d": (lambda: nn.Conv2d(4, 3, 3), X2),
    "Conv3d": (lambda: nn.Conv3d(4, 3, 3), X3), "ConvTranspose1d": (lambda: nn.ConvTranspose1d(6, 3, 3), X1),
    "ConvTranspose2d": (lambda: nn.ConvTranspose2d(4, 3, 3), X2),
    "ConvTranspose3d": (lambda: nn.ConvTranspose3d(4, 3, 3), X3),
    "LazyConv1d": (lambda: nn.LazyConv1d(3, 3), X1), "LazyConv2d": (lambda: nn.LazyConv2d(3, 3), X2),
    "LazyConv3d": (lambda: nn.LazyConv3d(3, 3), X3), "LazyConvTranspose1d": (lambda: nn.LazyConvTranspose1d(3, 3), X1),
    "LazyConvTranspose2d": (lambda: nn.LazyConvTranspose2d(3, 3), X2),
    "LazyConvTranspose3d": (lambda: nn.LazyConvTranspose3d(3, 3), X3),
    "LayerNorm": (lambda: nn.LayerNorm(8), X1), "GroupNorm": (lambda: nn.GroupNorm(2, 4), X2),
    "RMSNorm": (lambda: nn.RMSNorm(8), X1), "LocalResponseNorm": (lambda: nn.LocalResponseNorm(2), X2),
    "BatchNorm1d": (lambda: nn.BatchNorm1d(6), X1), "BatchNorm2d": (lambda: nn.BatchNorm2d(4), X2),
    "BatchNorm3d": (lambda: nn.BatchNorm3d(4), X3), "LazyBatchNorm1d": (nn.LazyBatchNorm1d, X1),
    "LazyBatchNorm2d": (nn.LazyBatchNorm2d, X2), "LazyBatchNorm3d": (nn.LazyBatchNorm3d, X3),
    "InstanceNorm1d": (lambda: nn.InstanceNorm1d(6), X1), "InstanceNorm2d": (lambda: nn.InstanceNorm2d(4), X2),
    "InstanceNorm3d": (lambda: nn.InstanceNorm3d(4), X3),
    **{n: (getattr(nn, n), X1) for n in (
        "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "GLU", "Sigmoid",
        "Tanh", "Softplus", "Softsign", "Softmax", "LogSoftmax", "Softmin", "LogSigmoid", "Hardtanh", "Hardswish",
        "Hardsigmoid", "Hardshrink", "Softshrink", "Tanhshrink")},
    "Softmax2d": (nn.Softmax2d, X2), "Threshold": (lambda: nn.Threshold(0.1, 0.0), X1),
    "ChannelShuffle": (lambda: nn.ChannelShuffle(2), X1),
    "MaxPool1d": (lambda: nn.MaxPool1d(2), X1), "MaxPool2d": (lambda: nn.MaxPool2d(2), X2),
    "MaxPool3d": (lambda: nn.MaxPool3d(2), X3), "AvgPool1d": (lambda: nn.AvgPool1d(2), X1),
    "AvgPool2d": (lambda: nn.AvgPool2d(2), X2), "AvgPool3d": (lambda: nn.AvgPool3d(2), X3),
    "LPPool1d": (lambda: nn.LPPool1d(2, 2), X1), "LPPool2d": (lambda: nn.LPPool2d(2, 2), X2),
    "AdaptiveAvgPool1d": (lambda: nn.AdaptiveAvgPool1d(2), X1), "AdaptiveAvgPool2d": (lambda: nn.AdaptiveAvgPool2d(2), X2),
    "AdaptiveAvgPool3d": (lambda: nn.AdaptiveAvgPool3d(2), X3), "AdaptiveMaxPool1d": (lambda: nn.AdaptiveMaxPool1d(2), X1),
    "AdaptiveMaxPool2d": (lambda: nn.AdaptiveMaxPool2d(2), X2), "AdaptiveMaxPool3d": (lambda: nn.AdaptiveMaxPool3d(2), X3),
    "Upsample": (lambda: nn.Upsample(scale_factor=2), X2),
    "UpsamplingNearest2d": (lambda: nn.UpsamplingNearest2d(scale_factor=2), X2),
    "UpsamplingBilinear2d": (lambda: nn.UpsamplingBilinear2d(scale_factor=2), X2),
    "PixelShuffle": (lambda: nn.PixelShuffle(2), X2), "PixelUnshuffle": (lambda: nn.PixelUnshuffle(2), X2),
    **{f"{kind}Pad{d}d": ((lambda k=kind, d=d: getattr(nn, f"{k}Pad{d}d")(1, 0.5) if k == "Constant"
                           else getattr(nn, f"{k}Pad{d}d")(1)), (X1, X2, X3)[d - 1])
       for kind in ("Zero", "Constant", "Reflection", "Replication") for d in (1, 2, 3)},
    "CosineSimilarity": (nn.CosineSimilarity, (X1, X1)), "PairwiseDistance": (nn.PairwiseDistance, ((4, 8), (4, 8))),
    "Fold": (lambda: nn.Fold((3, 3), 2), (2, 8, 4)), "Unfold": (lambda: nn.Unfold(2), X2),
    **{n: (getattr(nn, n), (X1, X1)) for n in ("MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "SoftMarginLoss",
                                               "MultiLabelSoftMarginLoss", "HingeEmbeddingLoss", "PoissonNLLLoss")},
    "CrossEntropyLoss": (nn.CrossEntropyLoss, ((4, 5), torch.tensor([0, 1, 2, 3]))),
    "NLLLoss": (nn.NLLLoss, ((4, 5), torch.tensor([0, 1, 2, 3]))),
    "MultiMarginLoss": (nn.MultiMarginLoss, ((4, 5), torch.tensor([0, 1, 2, 3]))),
    "MultiLabelMarginLoss": (nn.MultiLabelMarginLoss, ((4, 5), torch.tensor([[0, 1, -1, 0, 0]] * 4))),
    "BCELoss": (nn.BCELoss, (torch.rand(4, 3), torch.rand(4, 3))), "BCEWithLogitsLoss": (nn.BCEWithLogitsLoss, (X1, X1)),
    "KLDivLoss": (lambda: nn.KLDivLoss(reduction="batchmean"), (X1, X1)),
    "GaussianNLLLoss": (nn.GaussianNLLLoss, ((4, 3), (4, 3), torch.ones(4, 3))),
    "CosineEmbeddingLoss": (nn.CosineEmbeddingLoss, ((4, 3), (4, 3), torch.tensor([1, -1, 1, -1]))),
    "MarginRankingLoss": (nn.MarginRankingLoss, ((4,), (4,), torch.tensor([1, -1, 1, -1]))),
    "TripletMarginLoss": (nn.TripletMarginLoss, ((4, 3), (4, 3), (4, 3))),
    "DeferredBatchNorm": (lambda: DeferredBatchNorm(6, chunks=1), X1),
    "GhostBatchNorm": (lambda: GhostBatchNorm(6, 2, chunks=1), X1),
}
NOT_CALLED = {nn.ModuleList, nn.ModuleDict}  # containers, never called themselves
REAL_RNG_STATE = Stage.rng_state


def _inputs(spec):
    g = torch.Generator().manual_seed(0)
    if isinstance(spec, torch.Tensor):
        return (spec,)
    if isinstance(spec, tuple) and all(isinstance(d, int) for d in spec):
        return (torch.randn(spec, generator=g),)
    return tuple(x for s in spec for x in _inputs(s))


def _draws(fn) -> bool:
    before = torch.default_generator.get_state()
    fn()
    return not torch.equal(before, torch.default_generator.get_state())


def test_every_quiet_class_has_a_case():
    names = {c.__name__ for c in QUIET_MODULES - NOT_CALLED}
    assert names <= set(CASES), sorted(names - set(CASES))


@pytest.mark.parametrize("name", sorted(CASES))
def test_quiet_classes_do_not_draw_in_training_mode(name):
    """Every quiet class's forward leaves the generator alone; a ``Lazy*`` layer is not quiet
    (its first forward draws its initial weights) and is taken to draw."""
    make, spec = CASES[name]
    module = make().train()
    lazy = name.startswith("Lazy")
    assert (type(module) in QUIET_MODULES) != lazy and may_draw(module) == lazy
    drew = _draws(lambda: module(*_inputs(spec)))
    assert not drew or lazy
    if name in ("LazyLinear", "LazyConv2d"):
        assert drew


@pytest.mark.parametrize("loss", sorted(QUIET_LOSSES, key=lambda f: f.__name__), ids=lambda f: f.__name__)
def test_quiet_losses_do_not_draw(loss):
    cls = {Fn.cross_entropy: "CrossEntropyLoss", Fn.nll_loss: "NLLLoss", Fn.binary_cross_entropy: "BCELoss",
           Fn.multi_margin_loss: "MultiMarginLoss", Fn.multilabel_margin_loss: "MultiLabelMarginLoss",
           Fn.kl_div: "KLDivLoss", Fn.gaussian_nll_loss: "GaussianNLLLoss",
           Fn.cosine_embedding_loss: "CosineEmbeddingLoss", Fn.margin_ranking_loss: "MarginRankingLoss",
           Fn.triplet_margin_loss: "TripletMarginLoss"}.get(loss, "MSELoss")
    assert not may_draw(nn.Identity(), loss)
    assert not _draws(lambda: loss(*_inputs(CASES[cls][1])))


class Noisy(nn.Module):
    def forward(self, x):
        return x + torch.randn_like(x)


class Plain(nn.Module):
    draws_random = False

    def forward(self, x):
        return 2 * x


def test_what_may_draw():
    quiet = nn.Sequential(nn.Linear(3, 3), nn.ReLU(), nn.Dropout(0.0), nn.LayerNorm(3))
    assert not may_draw(quiet) and not may_draw(quiet, Fn.mse_loss) and not may_draw(quiet, nn.CrossEntropyLoss())
    assert not may_draw(quiet, functools.partial(Fn.cross_entropy, label_smoothing=0.1))
    assert may_draw(quiet, lambda out, y: Fn.mse_loss(out, y))  # a function of the user's: taken to draw
    assert may_draw(nn.Sequential(nn.Linear(3, 3), nn.Dropout(0.1)))
    assert may_draw(nn.Sequential(nn.Linear(3, 3), nn.RReLU()))
    assert may_draw(nn.Sequential(nn.Linear(3, 3), Noisy()))
    assert not may_draw(nn.Sequential(nn.Linear(3, 3), Plain()))
    lin = nn.Linear(3, 3)
    lin.draws_random = True
    assert may_draw(lin)
    hooked = nn.Linear(3, 3)
    hooked.register_forward_pre_hook(lambda m, args: None)
    assert may_draw(nn.Sequential(hooked))
    patched = nn.Linear(3, 3)
    patched.forward = lambda x: x
    assert may_draw(patched)
    handle = nn.modules.module.register_module_forward_hook(lambda m, args, out: None)
    try:
        assert may_draw(quiet)
    finally:
        handle.remove()
    assert not may_draw(quiet)
    marked = lambda out, y: Fn.mse_loss(out, y)  # noqa: E731
    marked.draws_random = False
    assert not may_draw(quiet, marked)


def _run(mark_quiet_stage: bool, monkeypatch):
    """Three stages, dropout in the middle one only; returns losses, weights and the number
    of RNG-state reads."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Linear(4, 6, dtype=torch.float64), nn.Tanh()),
              nn.Sequential(nn.Linear(6, 6, dtype=torch.float64), nn.Dropout(0.3)),
              nn.Linear(6, 2, dtype=torch.float64)]
    if mark_quiet_stage:  # the swap forced on the stages that cannot draw
        stages[0].draws_random = True
        stages[2].draws_random = True
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 4, generator=g, dtype=torch.float64), torch.randn(8, 2, generator=g, dtype=torch.float64))
               for _ in range(12)]
    reads = []
    monkeypatch.setattr(Stage, "rng_state", lambda self: reads.append(self.index) or REAL_RNG_STATE(self))
    pipe = Pipeline(stages, ["cpu"] * 3, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), Fn.mse_loss,
                    method="pipeoptim")
    losses = pipe.train(batches)
    torch.manual_seed(5)  # the process's stream after the run is its own, whatever the stages drew
    after = torch.rand(3)
    return losses, [p.detach().clone() for s in pipe.stages for p in s.parameters()], reads, after


def test_skipping_the_swap_changes_nothing(monkeypatch):
    losses, weights, reads, after = _run(False, monkeypatch)
    losses2, weights2, reads2, after2 = _run(True, monkeypatch)
    assert losses == losses2 and all(torch.equal(a, b) for a, b in zip(weights, weights2))
    assert torch.equal(after, after2)
    # the quiet stages read the process's state once (their stream's start); the noisy one twice a forward
    assert reads.count(0) == reads.count(2) == 1 and reads.count(1) == 2 * 12 + 1
    assert reads2.count(0) == reads2.count(2) == 2 * 12 + 1
