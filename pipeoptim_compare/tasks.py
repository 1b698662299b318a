"""Built-in training tasks for comparing pipeline methods; no download needed.

A task is a model already cut into stage-sized blocks (an :class:`torch.nn.Sequential`
whose children are balanced, so that a pipeline of ``depth`` stages takes
``len(model) // depth`` consecutive children per stage), one epoch of training
minibatches, held-out data, a loss and (where it applies) an accuracy.

Built-in tasks (see :data:`TASKS`):

* ``"teacher"``: synthetic classification. Gaussian inputs labelled by a fixed random
  teacher network; the student is a deep residual MLP. With the default learning rates,
  stale gradients (PipeDream at depth 8) measurably slow it down against synchronous
  training.
* ``"charlm"``: a small causal transformer language model over characters of the English
  text shipped in ``pipeoptim_compare/data/tiny_corpus.txt``.
* ``"denoise"``: image denoising (regression, mean squared error) with a residual
  convolutional network at full resolution; clean images of shapes are rendered in code.
* ``"cnnbn"``: image classification (which shape) with a residual convolutional network
  with batch normalisation over fixed ghost batches (exact under micro-batches; see
  :func:`cnnbn_task` and :func:`set_bn_chunks`).

Users register their own with :func:`register_task`, or point the command line at an entry
point ``module:function`` (see :func:`from_entry_point`) that returns
``(model_or_stages, batches[, loss_fn[, eval_batches]])`` or a dict with those keys.
"""
from __future__ import annotations

import importlib
import math
import os
import random
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from pipeline_rt.batchnorm import DeferredBatchNorm, GhostBatchNorm
from pipeline_rt.partition import split_by_balance

__all__ = [
    "Task", "TASKS", "register_task", "get_task", "from_entry_point", "EntryPointError", "evaluate",
    "corpus_text", "CharTransformerBlock", "render_shapes", "SHAPES", "set_bn_chunks",
]

Batch = Tuple[Tensor, Tensor]
#: held-out data: one ``(inputs, targets)`` pair (evaluated in chunks) or a list of minibatches
EvalData = Union[Batch, List[Batch]]
LossFn = Callable[[Tensor, Tensor], Tensor]

DATA = Path(__file__).with_name("data")


@dataclass
class Task:
    """Everything a comparison run needs.

    Attributes:
        name: the task's registry name.
        model: the full model; its children are the units that stages are made of.
        batches: one epoch of training minibatches ``(input, target)``.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``.
        eval_data: held-out ``(inputs, targets)``, a list of such minibatches, or ``None``.
        metric: ``metric(output, target) -> float`` on held-out data (e.g. accuracy), or ``None``.
        metric_name: how to label the metric in tables.
        metric_unit: how a difference of the metric is reported: ``"points"`` (a fraction such
            as accuracy: the difference times 100, percentage points), a unit (``"dB"``: the
            difference as it is) or ``""`` (the difference as it is, no unit).
        lr: default learning rate per optimizer name (``"sgd"``, ``"adam"``, ``"adamw"``).
        epochs: default number of epochs.
        stages: an explicit list of stage modules, when the task was given as stages
            (then ``model`` is ``nn.Sequential(*stages)`` and depth is fixed).
    """

    name: str
    model: nn.Sequential
    batches: List[Batch]
    loss_fn: LossFn
    eval_data: Optional[EvalData] = None
    metric: Optional[Callable[[Tensor, Tensor], float]] = None
    metric_name: str = "accuracy"
    metric_unit: str = "points"
    lr: Dict[str, float] = field(default_factory=lambda: {"sgd": 0.05, "adam": 1e-3, "adamw": 1e-3})
    epochs: int = 1
    stages: Optional[List[nn.Module]] = None

    def split(self, depth: int) -> List[nn.Module]:
        """The model cut into ``depth`` contiguous stages of (nearly) equal child counts.

        When the task came as explicit stages, ``depth`` must equal their number.
        """
        if self.stages is not None:
            if depth != len(self.stages):
                raise ValueError(f"task {self.name!r} has {len(self.stages)} fixed stages, not depth {depth}")
            return list(self.stages)
        children = list(self.model.children())
        if not 1 <= depth <= len(children):
            raise ValueError(f"task {self.name!r}: depth {depth} not in 1..{len(children)} (its number of blocks)")
        bounds = [round(i * len(children) / depth) for i in range(depth + 1)]
        return list(split_by_balance(self.model, [b - a for a, b in zip(bounds[:-1], bounds[1:])]))


TaskFn = Callable[..., Task]
#: name -> factory ``fn(depth=..., seed=..., **options) -> Task``
TASKS: Dict[str, TaskFn] = {}


def register_task(name: str) -> Callable[[TaskFn], TaskFn]:
    """Decorator registering a task factory under ``name``.

    The factory is called as ``fn(depth=depth, seed=seed)`` and returns a :class:`Task`.
    """
    def deco(fn: TaskFn) -> TaskFn:
        TASKS[name] = fn
        return fn
    return deco


def get_task(name: str, depth: int = 8, seed: int = 0, **options: Any) -> Task:
    """Build a registered task (or an entry point ``module:function``)."""
    if ":" in name:
        return from_entry_point(name, seed=seed)
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; choose one of {sorted(TASKS)} or give module:function")
    return TASKS[name](depth=depth, seed=seed, **options)


def accuracy(output: Tensor, target: Tensor) -> float:
    """Fraction of argmax predictions equal to the target (any leading shape)."""
    return float((output.argmax(-1) == target).float().mean())


def _cross_entropy(output: Tensor, target: Tensor) -> Tensor:
    return F.cross_entropy(output.reshape(-1, output.shape[-1]), target.reshape(-1))


def _stack(blocks: int, seed: int, block: Callable[[], nn.Module], first: Callable[[], List[nn.Module]],
           last: Callable[[], List[nn.Module]]) -> nn.Sequential:
    """``blocks`` units of equal work: ``block()`` each, the first preceded by ``first()`` and
    the last followed by ``last()``. Initialised from ``seed + 1`` without touching the
    global random state."""
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        units: List[nn.Module] = []
        for b in range(blocks):
            parts = (first() if b == 0 else []) + [block()] + (last() if b == blocks - 1 else [])
            units.append(nn.Sequential(*parts) if len(parts) > 1 else parts[0])
    return nn.Sequential(*units)


# ----------------------------------------------------------------------------- teacher


def _minibatches(x: Tensor, y: Tensor, batch_size: int) -> List[Batch]:
    """``(x, y)`` cut into consecutive minibatches of ``batch_size`` rows (a short rest dropped)."""
    return [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x) - batch_size + 1, batch_size)]


def _noisy_shapes(n: int, g: torch.Generator, size: int, rotate: float, clutter: float,
                  noise: float) -> Tuple[Tensor, Tensor, Tensor]:
    """:func:`render_shapes` images plus Gaussian pixel noise of standard deviation ``noise``:
    ``(noisy, clean, shape index)``."""
    clean, kind = render_shapes(n, g, size, rotate, clutter)
    return clean + noise * torch.randn(clean.shape, generator=g), clean, kind


class ResidualBlock(nn.Module):
    """``x + W2 tanh(W1 LN(x))``: the unit of the ``teacher`` task's student."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.tanh(self.fc1(self.norm(x))))


@register_task("teacher")
def teacher_task(depth: int = 8, seed: int = 0, *, blocks: int = 8, width: int = 64, hidden: int = 128,
                 in_dim: int = 32, classes: int = 4, batch_size: int = 32, train_size: int = 4096,
                 eval_size: int = 2048, noise: float = 0.0, sharpness: float = 1.0) -> Task:
    """Synthetic classification: a deep residual MLP student learns a random teacher.

    Inputs are standard Gaussian vectors; labels are the argmax of a fixed random
    two-layer tanh teacher (optionally with label noise). The student is
    ``blocks`` (at least ``depth``) residual blocks; the first also embeds the input,
    the last also holds the classifier head, so every stage has the same shape of work.

    Args:
        depth: pipeline depth the model will be cut into (sets the minimum block count).
        seed: seeds data, teacher and student initialisation (deterministic).
    """
    g = torch.Generator().manual_seed(seed)
    blocks = max(blocks, depth)
    # teacher
    t1 = torch.randn(in_dim, 4 * in_dim, generator=g) / math.sqrt(in_dim)
    t2 = torch.randn(4 * in_dim, classes, generator=g) / math.sqrt(in_dim)

    def label(x: Tensor) -> Tensor:
        y = (torch.tanh(x @ t1 * sharpness) @ t2).argmax(-1)
        if noise > 0:
            flip = torch.rand(len(y), generator=g) < noise
            y = torch.where(flip, torch.randint(0, classes, y.shape, generator=g), y)
        return y

    x_train = torch.randn(train_size, in_dim, generator=g)
    x_eval = torch.randn(eval_size, in_dim, generator=g)
    y_train, y_eval = label(x_train), label(x_eval)
    batches = _minibatches(x_train, y_train, batch_size)

    model = _stack(blocks, seed, lambda: ResidualBlock(width, hidden), first=lambda: [nn.Linear(in_dim, width)],
                   last=lambda: [nn.LayerNorm(width), nn.Linear(width, classes)])
    return Task("teacher", model, batches, F.cross_entropy, (x_eval, y_eval), accuracy,
                lr={"sgd": 0.08, "adam": 2e-3, "adamw": 2e-3}, epochs=1)


# ----------------------------------------------------------------------------- charlm


def corpus_text() -> str:
    """The English text shipped with the package (written for it; public domain)."""
    return (DATA / "tiny_corpus.txt").read_text(encoding="utf-8")


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention (``scaled_dot_product_attention``)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.proj(y.transpose(1, 2).reshape(b, t, c))


class CharTransformerBlock(nn.Module):
    """Pre-norm transformer block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))``."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = CausalSelfAttention(width, heads)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class Embed(nn.Module):
    """Token plus learned position embedding."""

    def __init__(self, vocab: int, width: int, context: int) -> None:
        super().__init__()
        self.tok = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(torch.zeros(context, width))
        nn.init.normal_(self.pos, std=0.02)

    def forward(self, idx: Tensor) -> Tensor:
        return self.tok(idx) + self.pos[: idx.shape[1]]


class Head(nn.Module):
    """Final layer norm and the vocabulary projection."""

    def __init__(self, width: int, vocab: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.out = nn.Linear(width, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


@register_task("charlm")
def charlm_task(depth: int = 8, seed: int = 0, *, blocks: int = 8, width: int = 64, heads: int = 4,
                context: int = 32, batch_size: int = 16, num_batches: int = 120,
                eval_fraction: float = 0.1) -> Task:
    """A character-level causal transformer language model on the shipped text.

    The text (about 10 KB) is split into a training part and a held-out tail
    (``eval_fraction``). An epoch is ``num_batches`` minibatches of ``batch_size``
    windows of ``context`` characters at seeded random offsets of the training part; the
    target is the window shifted by one character. The metric is next-character accuracy
    on non-overlapping windows of the held-out tail.
    """
    text = corpus_text()
    chars = sorted(set(text))
    stoi = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([stoi[c] for c in text], dtype=torch.long)
    split = int(len(data) * (1 - eval_fraction))
    train, held = data[:split], data[split:]
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(train) - context - 1, (num_batches, batch_size), generator=g)
    offs = torch.arange(context)
    batches = [(train[s[:, None] + offs], train[s[:, None] + offs + 1]) for s in starts]
    n = (len(held) - 1) // context
    eval_data = (held[: n * context].view(n, context), held[1: n * context + 1].view(n, context))
    blocks = max(blocks, depth)
    model = _stack(blocks, seed, lambda: CharTransformerBlock(width, heads),
                   first=lambda: [Embed(len(chars), width, context)], last=lambda: [Head(width, len(chars))])
    return Task("charlm", model, batches, _cross_entropy, eval_data, accuracy,
                metric_name="next-char acc", lr={"sgd": 0.1, "adam": 3e-3, "adamw": 3e-3}, epochs=1)


# ----------------------------------------------------------------------------- denoise

#: the shapes drawn by :func:`render_shapes`
SHAPES = ("disk", "square", "ring", "cross", "triangle", "bar")


def _shape_sdf(kind: Tensor, u: Tensor, v: Tensor) -> Tensor:
    """Signed distance-like field (negative inside) of shape ``kind[n]`` (an index into
    :data:`SHAPES`) at coordinates ``u, v`` of shape ``(n, H, W)`` in the shape's own frame."""
    r = torch.sqrt(u * u + v * v)
    au, av = u.abs(), v.abs()
    tri = torch.stack([math.cos(a) * u + math.sin(a) * v for a in
                       (math.pi / 2, math.pi / 2 + 2 * math.pi / 3, math.pi / 2 + 4 * math.pi / 3)]).amax(0)
    fields = torch.stack([
        r - 0.9,                                                                                # disk
        torch.maximum(au, av) - 0.75,                                                           # square
        (r - 0.75).abs() - 0.22,                                                                # ring
        torch.minimum(torch.maximum(au - 1.0, av - 0.28), torch.maximum(au - 0.28, av - 1.0)),  # cross
        tri - 0.5,                                                                              # triangle
        torch.maximum(au - 1.0, av - 0.3),                                                      # bar
    ])  # (shapes, n, H, W)
    return fields.gather(0, kind.view(1, -1, 1, 1).expand(1, *u.shape)).squeeze(0)


def render_shapes(n: int, g: torch.Generator, size: int = 16, rotate: float = 1.0,
                  clutter: float = 0.5) -> Tuple[Tensor, Tensor]:
    """``n`` clean grey-scale images ``(n, 1, size, size)`` of one shape each, and its index.

    Each image draws one of :data:`SHAPES` at a random position, scale, rotation (a uniform
    angle in ``[0, 2 pi rotate)``) and contrast, anti-aliased over one pixel, on a random
    linear background gradient, plus a smaller shape of lower contrast (``clutter``).
    Deterministic given the generator's state.
    """
    kind = torch.randint(0, len(SHAPES), (n,), generator=g)
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")

    def draw(which: Tensor, lo: float, hi: float, spread: float) -> Tensor:
        cx, cy = [(torch.rand(n, 1, 1, generator=g) * 2 - 1) * spread for _ in range(2)]
        scale = lo + (hi - lo) * torch.rand(n, 1, 1, generator=g)
        th = torch.rand(n, 1, 1, generator=g) * 2 * math.pi * rotate
        dx, dy = xx - cx, yy - cy
        u = (torch.cos(th) * dx + torch.sin(th) * dy) / scale
        v = (-torch.sin(th) * dx + torch.cos(th) * dy) / scale
        pixel = 2.0 / size / scale  # one pixel, in the shape's frame
        return torch.sigmoid(-_shape_sdf(which, u, v) / pixel)

    img = (0.6 + 0.8 * torch.rand(n, 1, 1, generator=g)) * draw(kind, 0.45, 0.75, 0.3)
    img = img + clutter * torch.rand(n, 1, 1, generator=g) * draw(torch.randint(0, len(SHAPES), (n,), generator=g),
                                                                   0.2, 0.3, 0.7)
    slope = torch.randn(n, 2, 1, 1, generator=g) * 0.2
    img = img + slope[:, 0] * xx + slope[:, 1] * yy
    return (img - 0.3).unsqueeze(1), kind


class ConvBlock(nn.Module):
    """``x + conv(GELU(conv(GroupNorm(x))))``, 3x3 convolutions: the ``denoise`` net's unit."""

    def __init__(self, channels: int, groups: int = 4) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.gelu(self.conv1(self.norm(x))))


def psnr(output: Tensor, target: Tensor) -> float:
    """Peak signal-to-noise ratio in dB, peak 1: ``10 log10(1 / MSE)``."""
    return float(10 * torch.log10(1 / F.mse_loss(output, target)))


@register_task("denoise")
def denoise_task(depth: int = 8, seed: int = 0, *, blocks: int = 8, channels: int = 8, size: int = 16,
                 noise: float = 0.5, batch_size: int = 32, train_size: int = 2048, eval_size: int = 1024,
                 rotate: float = 1.0, clutter: float = 0.5) -> Task:
    """Image denoising (regression) with a small residual convolutional network.

    Clean images of shapes (:func:`render_shapes`: six shapes at random position, scale,
    rotation and contrast, a distractor and a background gradient, ``size`` x ``size``, one
    channel) are generated in code from ``seed``; the input is the image plus Gaussian pixel
    noise of standard deviation ``noise``, the target the clean image, the loss the mean
    squared error (the noisy input itself scores ``noise**2``), the metric the PSNR in dB.
    The network keeps full resolution: a 3x3 stem to ``channels``, ``blocks`` residual conv
    blocks with GroupNorm and a 3x3 head back to one channel (the stem rides with the first
    block and the head with the last, so stages have equal work).

    It differs in kind from ``teacher`` (an MLP classifying Gaussian vectors) and ``charlm``
    (attention over tokens): weights shared over space, a dense regression output, and a
    target with real geometric structure (edges, shapes) that the network must learn as a
    prior to separate from the noise.
    """
    g = torch.Generator().manual_seed(seed)

    def pairs(n: int) -> Batch:
        noisy, clean, _ = _noisy_shapes(n, g, size, rotate, clutter, noise)
        return noisy, clean

    x_train, y_train = pairs(train_size)
    eval_data = pairs(eval_size)
    batches = _minibatches(x_train, y_train, batch_size)
    blocks = max(blocks, depth)
    model = _stack(blocks, seed, lambda: ConvBlock(channels),
                   first=lambda: [nn.Conv2d(1, channels, 3, padding=1)],
                   last=lambda: [nn.GroupNorm(4, channels), nn.Conv2d(channels, 1, 3, padding=1)])
    return Task("denoise", model, batches, F.mse_loss, eval_data, psnr, metric_name="PSNR dB", metric_unit="dB",
                lr={"sgd": 0.01, "adam": 2e-3, "adamw": 2e-3}, epochs=2)


# ----------------------------------------------------------------------------- cnnbn


def set_bn_chunks(modules: Union[nn.Module, Sequence[nn.Module]], chunks: int) -> int:
    """Set ``chunks`` (micro-batches per minibatch) on every
    :class:`~pipeline_rt.batchnorm.DeferredBatchNorm` (so every
    :class:`~pipeline_rt.batchnorm.GhostBatchNorm`) in
    ``modules`` and drop any partial minibatch; return how many were set. Call it with the
    pipeline's ``chunks`` before building the pipeline (which checks it)."""
    if not isinstance(chunks, int) or chunks < 1:
        raise ValueError(f"set_bn_chunks: chunks must be a positive int, got {chunks!r}")
    count = 0
    for module in ([modules] if isinstance(modules, nn.Module) else modules):
        for m in module.modules():
            if isinstance(m, DeferredBatchNorm):
                m.chunks, m.pending = chunks, None
                count += 1
    return count


class BNConvBlock(nn.Module):
    """``x + conv2(ReLU(BN(conv1(ReLU(BN(x))))))``, 3x3 convolutions, pre-activation: the
    ``cnnbn`` net's unit (BN: :class:`~pipeline_rt.batchnorm.GhostBatchNorm`)."""

    def __init__(self, channels: int, group: int, momentum: Optional[float] = 0.1) -> None:
        super().__init__()
        self.bn1 = GhostBatchNorm(channels, group, momentum=momentum, chunks=1)
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = GhostBatchNorm(channels, group, momentum=momentum, chunks=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.conv2(F.relu(self.bn2(self.conv1(F.relu(self.bn1(x))))))


@register_task("cnnbn")
def cnnbn_task(depth: int = 8, seed: int = 0, *, blocks: int = 8, channels: int = 8, size: int = 16,
               bn_rows: int = 4, noise: float = 0.1, batch_size: int = 32, train_size: int = 2048,
               eval_size: int = 1024, rotate: float = 0.0, clutter: float = 0.5,
               bn_momentum: float = 0.1) -> Task:
    """Image classification with a residual convolutional network with batch normalisation.

    Images of one of the six :data:`SHAPES` each (:func:`render_shapes`: random position,
    scale and contrast, upright by default (``rotate=0``; with random rotations the net
    learns far less in two epochs), a smaller distractor shape and a background gradient,
    ``size`` x ``size``, one channel, plus Gaussian pixel noise of standard deviation
    ``noise``) are generated in code from ``seed``; the label is the shape, the loss the
    cross-entropy, the metric the accuracy on held-out images. The network keeps full
    resolution: a 3x3 stem to ``channels``, ``blocks`` pre-activation residual blocks of two
    3x3 convolutions each preceded by batch norm and ReLU, then batch norm, ReLU, global
    average pooling and a linear classifier (the stem rides with the first block and the
    head with the last, so stages have equal work).

    Batch norm. Every norm is a :class:`~pipeline_rt.batchnorm.GhostBatchNorm`: training mode
    normalises over fixed groups of ``bn_rows`` consecutive rows (ghost batches) of the
    minibatch, so a method that splits the minibatch into micro-batches of whole groups
    computes exactly the same function as one that forwards it whole; the running statistics
    (eval mode) are the whole minibatch's, committed once per minibatch by the library's
    :class:`~pipeline_rt.batchnorm.DeferredBatchNorm`. The task is built for one forward per
    minibatch (``chunks=1``); for a pipeline with ``chunks`` micro-batches call
    :func:`set_bn_chunks` ``(stages, chunks)`` first (the pipeline refuses a mismatch, and
    a micro-batch that is not a multiple of ``bn_rows`` rows is refused too: with the
    default 32 rows and ``bn_rows=4``, up to 8 micro-batches). ``bn_momentum``: the running
    statistics' momentum (torch's default 0.1). Training never reads the running statistics,
    but the held-out loss does: in these short runs at high learning rates they lag the
    weights (sync, SGD-momentum, seed 2: held-out loss 2.30 with them, 0.65 with statistics
    recomputed at the final weights, 0.80 with ``bn_momentum=0.6``), and more so for methods
    whose forwards use stale weights; compare methods on the training loss.

    Rounding. In float64 ``1f1b-flush`` (any micro-batches of whole groups) and ``sync``
    agree to 1e-9 (tests/test_task_cnnbn.py). In float32 they agree to rounding for the first
    updates, but this net amplifies rounding differences (about tenfold every few updates), so
    after two epochs the two runs of the same mathematics differ as much as runs of two seeds
    (last-epoch loss up to about 15% apart); compare them on means over seeds.

    It differs in kind from ``teacher`` (an MLP on Gaussian vectors), ``charlm`` (attention
    over tokens) and ``denoise`` (per-row GroupNorm, dense regression): a classifier whose
    layers normalise across rows of the batch, the layer that micro-batching can silently
    change.
    """
    if batch_size % bn_rows:
        raise ValueError(f"cnnbn: batch_size {batch_size} is not a multiple of bn_rows {bn_rows}")
    g = torch.Generator().manual_seed(seed)

    def images(n: int) -> Batch:
        noisy, _, kind = _noisy_shapes(n, g, size, rotate, clutter, noise)
        return noisy, kind

    x_train, y_train = images(train_size)
    eval_data = images(eval_size)
    batches = _minibatches(x_train, y_train, batch_size)
    blocks = max(blocks, depth)
    model = _stack(blocks, seed, lambda: BNConvBlock(channels, bn_rows, bn_momentum),
                   first=lambda: [nn.Conv2d(1, channels, 3, padding=1, bias=False)],
                   last=lambda: [GhostBatchNorm(channels, bn_rows, momentum=bn_momentum, chunks=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, len(SHAPES))])
    # default lrs: sync's lowest last-epoch train loss at depth 8, seed 0, on a grid of factors of 2
    # (SGD-momentum 0.02..0.4: 0.1; Adam 1e-3..1.6e-2: 8e-3; AdamW shares Adam's, as in the other tasks)
    return Task("cnnbn", model, batches, F.cross_entropy, eval_data, accuracy,
                lr={"sgd": 0.1, "adam": 8e-3, "adamw": 8e-3}, epochs=2)


# ----------------------------------------------------------------------------- user tasks


class EntryPointError(ValueError):
    """A ``--entry module:function`` that cannot be loaded or returns the wrong thing; the
    message names the problem and the fix (``pipeoptim`` prints it without a traceback)."""


#: what an entry point returns, as a tuple in this order or as a dict with these keys
ENTRY_FIELDS = ("model", "batches", "loss_fn", "eval_batches")
ENTRY_FORM = ("(model, batches[, loss_fn[, eval_batches]]) or a dict with the keys model, batches and "
              "optionally loss_fn, eval_batches, metric")


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's, Python's and NumPy's global generators inside; restore them after."""
    py_state, np_state = random.getstate(), np.random.get_state()
    with torch.random.fork_rng():
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        try:
            yield
        finally:
            random.setstate(py_state)
            np.random.set_state(np_state)


def entry_parts(spec: str) -> Tuple[str, str]:
    """``(module, function)`` of an entry point ``"module:function"``; :class:`EntryPointError` otherwise."""
    mod_name, _, fn_name = spec.partition(":")
    if not mod_name or not fn_name:
        raise EntryPointError(f"--entry must look like 'module:function' (e.g. mytask:build), got {spec!r}")
    return mod_name, fn_name


def _load_entry(spec: str) -> Callable[[], Any]:
    mod_name, fn_name = entry_parts(spec)
    cwd = os.getcwd()
    sys.path.insert(0, cwd)  # as `python -m` does: a module in the current folder is found
    try:
        module = importlib.import_module(mod_name)
    except ModuleNotFoundError as e:
        if e.name is not None and (mod_name == e.name or mod_name.startswith(e.name + ".")):
            raise EntryPointError(
                f"--entry {spec}: no module {mod_name!r} in the current folder ({cwd}) or on PYTHONPATH; "
                f"run from the folder that holds {mod_name.replace('.', '/')}.py or add that folder to "
                f"PYTHONPATH") from None
        raise EntryPointError(f"--entry {spec}: importing {mod_name!r} failed: {e}") from None
    finally:
        sys.path.remove(cwd)
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        found = sorted(n for n, v in vars(module).items() if callable(v) and not n.startswith("_")
                       and getattr(v, "__module__", None) == module.__name__)
        what = "is not a function" if fn is not None else "does not exist"
        raise EntryPointError(f"--entry {spec}: {mod_name}.{fn_name} {what}; functions defined in "
                              f"{module.__file__}: {', '.join(found) or 'none'}")
    return fn


def _entry_fields(spec: str, out: Any) -> Dict[str, Any]:
    if isinstance(out, dict):
        unknown = set(out) - set(ENTRY_FIELDS) - {"metric"}
        if unknown or not {"model", "batches"} <= set(out):
            problem = (f"unknown keys {sorted(unknown)}" if unknown
                       else f"missing keys {sorted({'model', 'batches'} - set(out))}")
            raise EntryPointError(f"--entry {spec} returned a dict with {problem}; return {ENTRY_FORM}")
        return dict(out)
    if isinstance(out, tuple) and 2 <= len(out) <= len(ENTRY_FIELDS):
        return dict(zip(ENTRY_FIELDS, out))
    got = f"a tuple of {len(out)}" if isinstance(out, tuple) else type(out).__name__
    raise EntryPointError(f"--entry {spec} returned {got}; return {ENTRY_FORM}")


def _batch_list(spec: str, key: str, batches: Any) -> List[Batch]:
    try:
        out = list(batches)
    except TypeError:
        raise EntryPointError(f"--entry {spec}: {key} must be an iterable of (input, target) pairs, got "
                              f"{type(batches).__name__}") from None
    bad = next((b for b in out if not (isinstance(b, (tuple, list)) and len(b) == 2)), None)
    if not out or bad is not None:
        got = "nothing" if not out else f"an item of type {type(bad).__name__}"
        raise EntryPointError(f"--entry {spec}: {key} must hold (input, target) pairs, got {got}")
    return [(b[0], b[1]) for b in out]


def from_entry_point(spec: str, seed: int = 0) -> Task:
    """A task from a user function ``"package.module:function"`` (found in the current folder
    or on ``PYTHONPATH``).

    The function is called with no arguments, with torch's, Python's and NumPy's global
    generators seeded from ``seed`` (and restored afterwards), so that initial weights and
    data drawn from them follow ``--seed``. It returns ``(model, batches)``, ``(model, batches, loss_fn)``,
    ``(model, batches, loss_fn, eval_batches)`` or a dict with those keys (``model`` and
    ``batches`` required) and optionally ``metric``:

    * ``model``: an ``nn.Sequential`` (cut into ``depth`` stages by child count) or a list
      of stage modules (the depth is then their number);
    * ``batches``: an iterable of ``(input, target)`` minibatches (one epoch);
    * ``loss_fn``: ``loss_fn(output, target)``; default cross-entropy;
    * ``eval_batches``: held-out ``(input, target)`` minibatches: their loss (and ``metric``)
      is reported after training;
    * ``metric``: ``metric(output, target) -> float`` on held-out minibatches (e.g. accuracy).

    Raises :class:`EntryPointError` naming the mistake: no such module or function, or a
    return value of the wrong form.
    """
    fn = _load_entry(spec)
    with _seeded(seed):
        fields = _entry_fields(spec, fn())
    model = fields["model"]
    stages: Optional[List[nn.Module]] = None
    if isinstance(model, (list, tuple)) and model and all(isinstance(m, nn.Module) for m in model):
        stages = list(model)
        model = nn.Sequential(*stages)
    elif not isinstance(model, nn.Sequential):
        raise EntryPointError(f"--entry {spec}: model must be an nn.Sequential (cut into --depth stages) or a "
                              f"list of stage modules, got {type(model).__name__}")
    batches = _batch_list(spec, "batches", fields["batches"])
    eval_batches = fields.get("eval_batches")
    held = _batch_list(spec, "eval_batches", eval_batches) if eval_batches is not None else None
    metric = fields.get("metric")
    name = getattr(metric, "__name__", "")
    return Task(spec, model, batches, fields.get("loss_fn") or F.cross_entropy, held, metric,
                metric_name=name if name.isidentifier() else "metric", metric_unit="", stages=stages)


def evaluate(stages: Sequence[nn.Module], data: EvalData, loss_fn: LossFn,
             metric: Optional[Callable[[Tensor, Tensor], float]] = None,
             devices: Optional[Sequence[Union[str, torch.device]]] = None,
             batch_size: int = 512) -> Tuple[float, Optional[float]]:
    """Held-out ``(loss, metric)`` of the stages run in sequence (each on its device), means
    weighted by rows. ``data`` is one ``(inputs, targets)`` pair, run in chunks of
    ``batch_size`` rows, or a list of such minibatches."""
    if isinstance(data, tuple) and len(data) == 2 and isinstance(data[0], Tensor):
        x_all, y_all = data
        chunks: List[Batch] = [(x_all[i:i + batch_size], y_all[i:i + batch_size])
                               for i in range(0, len(x_all), batch_size)]
    else:
        chunks = list(data)
    total, count, outs = 0.0, 0, []
    was = [m.training for m in stages]
    for m in stages:
        m.eval()
    try:
        with torch.no_grad():
            for x, y in chunks:
                h: Any = x
                for k, m in enumerate(stages):
                    if devices is not None:
                        h = h.to(torch.device(devices[k]))
                    h = m(h)
                y = y.to(h.device)
                total += float(loss_fn(h, y)) * len(y)
                count += len(y)
                if metric is not None:
                    outs.append(metric(h, y) * len(y))
    finally:
        for m, w in zip(stages, was):
            m.train(w)
    return total / count, (sum(outs) / count if metric is not None else None)
