"""Whether a stage's forward can draw random numbers.

Each stage draws from its own RNG stream (:class:`~pipeline_rt.stage.Stage`, "Randomness"):
its state is swapped into the process's generator around every forward and the process's
put back after, two reads and two writes of the CPU generator's 5 KB state (and the CUDA
device's), about 3 us a forward. A forward that cannot draw leaves every stream as it was,
so the swap changes nothing there and is skipped: the result is the same bit for bit.

:func:`may_draw` decides it from what the module is, conservatively: a module tree whose
every module is a stock ``torch.nn`` layer known not to draw (the exact class, no forward
hooks, no instance-level ``forward``; a ``Lazy*`` layer, which draws its initial weights at
its first forward, is not one), with dropout layers at ``p == 0``, and a last stage
whose loss is a stock loss, cannot draw; anything else (your own module class, a hook, a
lambda loss, a global forward hook) is taken to draw. A module of your own says otherwise
with an attribute ``draws_random`` (a bool, on the class or the instance), which applies to
that module only (its children are checked on their own), as ``batch_dependent`` does for
:mod:`pipeline_rt.guards`. Marking a module that does draw ``False`` makes its draws come
from the process's stream: the run is then no longer independent of the executor's
interleaving (local and ``backend="dist"`` may differ).
"""
from __future__ import annotations

import functools
from typing import Any, Callable, FrozenSet, Optional

from torch import nn
from torch.nn import functional as Fn
from torch.nn.modules import module as _module

from .batchnorm import DeferredBatchNorm, GhostBatchNorm

__all__ = ["may_draw", "QUIET_MODULES", "QUIET_LOSSES"]


def _nn(*names: str) -> FrozenSet[type]:
    """The ``torch.nn`` classes of these names that this torch has."""
    return frozenset(t for t in (getattr(nn, n, None) for n in names) if isinstance(t, type))


#: stock classes whose training-mode forward never draws (their children are checked on their own)
QUIET_MODULES: FrozenSet[type] = _nn(
    "Sequential", "ModuleList", "ModuleDict", "Identity", "Flatten", "Unflatten",
    "Linear", "Bilinear", "Embedding", "EmbeddingBag",
    "Conv1d", "Conv2d", "Conv3d", "ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d",
    "LayerNorm", "GroupNorm", "RMSNorm", "LocalResponseNorm",
    "BatchNorm1d", "BatchNorm2d", "BatchNorm3d",
    "InstanceNorm1d", "InstanceNorm2d", "InstanceNorm3d",
    "ReLU", "ReLU6", "LeakyReLU", "PReLU", "ELU", "SELU", "CELU", "GELU", "SiLU", "Mish", "GLU",
    "Sigmoid", "Tanh", "Softplus", "Softsign", "Softmax", "Softmax2d", "LogSoftmax", "Softmin", "LogSigmoid",
    "Hardtanh", "Hardswish", "Hardsigmoid", "Hardshrink", "Softshrink", "Tanhshrink", "Threshold",
    "MaxPool1d", "MaxPool2d", "MaxPool3d", "AvgPool1d", "AvgPool2d", "AvgPool3d", "LPPool1d", "LPPool2d",
    "AdaptiveAvgPool1d", "AdaptiveAvgPool2d", "AdaptiveAvgPool3d",
    "AdaptiveMaxPool1d", "AdaptiveMaxPool2d", "AdaptiveMaxPool3d",
    "Upsample", "UpsamplingNearest2d", "UpsamplingBilinear2d", "PixelShuffle", "PixelUnshuffle",
    "ZeroPad1d", "ZeroPad2d", "ZeroPad3d", "ConstantPad1d", "ConstantPad2d", "ConstantPad3d",
    "ReflectionPad1d", "ReflectionPad2d", "ReflectionPad3d", "ReplicationPad1d", "ReplicationPad2d",
    "ReplicationPad3d", "CosineSimilarity", "PairwiseDistance", "Fold", "Unfold", "ChannelShuffle",
    "MSELoss", "L1Loss", "SmoothL1Loss", "HuberLoss", "CrossEntropyLoss", "NLLLoss", "BCELoss",
    "BCEWithLogitsLoss", "KLDivLoss", "PoissonNLLLoss", "GaussianNLLLoss", "SoftMarginLoss",
    "MultiLabelSoftMarginLoss", "MultiLabelMarginLoss", "MultiMarginLoss", "HingeEmbeddingLoss",
    "CosineEmbeddingLoss", "MarginRankingLoss", "TripletMarginLoss",
) | {DeferredBatchNorm, GhostBatchNorm}
#: stock dropout classes: quiet at ``p == 0`` (ATen returns the input then, drawing nothing)
_DROPOUTS: FrozenSet[type] = _nn("Dropout", "Dropout1d", "Dropout2d", "Dropout3d", "AlphaDropout",
                                 "FeatureAlphaDropout")
#: stock loss functions that never draw (the loss classes are in :data:`QUIET_MODULES`)
QUIET_LOSSES: FrozenSet[Callable[..., Any]] = frozenset(
    f for f in (getattr(Fn, n, None) for n in (
        "mse_loss", "l1_loss", "smooth_l1_loss", "huber_loss", "cross_entropy", "nll_loss", "binary_cross_entropy",
        "binary_cross_entropy_with_logits", "kl_div", "poisson_nll_loss", "gaussian_nll_loss", "soft_margin_loss",
        "multilabel_soft_margin_loss", "multilabel_margin_loss", "multi_margin_loss", "hinge_embedding_loss",
        "cosine_embedding_loss", "margin_ranking_loss", "triplet_margin_loss")) if f is not None)


def _module_draws(m: nn.Module) -> bool:
    mark = getattr(m, "draws_random", None)
    if isinstance(mark, bool):
        return mark
    if m._forward_hooks or m._forward_pre_hooks or "forward" in m.__dict__:
        return True
    cls = type(m)
    if cls in _DROPOUTS:
        return bool(m.p != 0)
    return cls not in QUIET_MODULES


def may_draw(module: nn.Module, loss_fn: Optional[Callable[..., Any]] = None) -> bool:
    """Whether a training-mode forward of ``module`` (then ``loss_fn`` on its output, for
    the last stage) may draw random numbers; ``False`` only where it provably cannot (see
    the module docstring)."""
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return True
    if any(_module_draws(m) for m in module.modules()):
        return True
    if loss_fn is None:
        return False
    while isinstance(loss_fn, functools.partial):
        loss_fn = loss_fn.func
    if isinstance(loss_fn, nn.Module):
        return any(_module_draws(m) for m in loss_fn.modules())
    mark = getattr(loss_fn, "draws_random", None)
    if isinstance(mark, bool):
        return mark
    return not any(loss_fn is f for f in QUIET_LOSSES)
