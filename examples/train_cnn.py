"""Train a ResNet-style CNN with BatchNorm as a pipeline, on generated 10-class images.

Data: a seeded synthetic set of 32x32 RGB images. Class ``c`` is a sinusoidal grating with
its own orientation, frequency and colour, at a random phase, contrast and offset per image,
under Gaussian noise: learnable by a CNN, not by a linear model on pixels. Training and
held-out images are drawn from the same distribution with different seeds.

Model: an ``nn.Sequential`` of (stem conv + BatchNorm + ReLU, residual blocks of two 3x3
convs with BatchNorm, the widening ones with stride 2 and a 1x1 projection, then global
average pooling + linear head), split into ``--stages`` stages by parameter count. Each
method of ``--method`` trains the same model on the same data (AdamW, warm-up + cosine
schedule, clipping, a shuffled ``DataLoader``), evaluated after every epoch with accuracy as
the metric. Outputs in ``--out``: plot.png, results.md, results.json, ckpt/ (see
``examples/_common.py``).

BatchNorm and micro-batches. Methods that split each minibatch into micro-batches (``sync``,
``1f1b-flush`` and ``2bw``: one micro-batch per stage) would make a plain BatchNorm
normalise over a micro-batch and update its running statistics once per micro-batch, so the
pipeline refuses plain BatchNorm there. For those methods this script converts every
BatchNorm with :func:`pipeline_rt.batchnorm.convert_deferred_batch_norm`: the running
statistics (used by ``evaluate``) are then committed once per minibatch, from all the rows
each layer received (single-device training's for the first BatchNorm only: later ones
receive inputs normalised per micro-batch); the training-mode normalisation uses each
micro-batch's own statistics (rows / chunks per micro-batch), so those methods' losses and
gradients are not those of single-device training with whole-minibatch BatchNorm
(``pipeline_rt.batchnorm.GhostBatchNorm`` is the exact alternative). The
asynchronous methods (``pipedream``, ``pipeoptim`` and its variants) forward whole minibatches
(``chunks=1``) and use plain BatchNorm, as on one device. See docs/batch_dependent.rst.

CPU, a few minutes on 2 cores::

    python examples/train_cnn.py --tiny --method sync,pipedream,pipeoptim,pipeoptim-calroll

A wider network on one GPU shared by 4 stages::

    python examples/train_cnn.py --size large --devices cuda:0,cuda:0,cuda:0,cuda:0 --method pipedream,pipeoptim
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Any, Dict

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, RandomSampler, TensorDataset

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Task, main  # noqa: E402

CLASSES = 10
PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(width=8, blocks=(1, 1, 1), train=1536, val=512, epochs=2, batch_size=32, lr=3e-3),
    "small": dict(width=32, blocks=(2, 2, 2), train=10_000, val=2_000, epochs=5, batch_size=64, lr=2e-3),
    "large": dict(width=128, blocks=(3, 4, 6), train=50_000, val=10_000, epochs=5, batch_size=256, lr=2e-3),
}


def gratings(count: int, seed: int) -> TensorDataset:
    """``count`` images (3x32x32, float) with their labels; class ``c`` sets the grating's
    orientation, spatial frequency and colour, each image draws phase, contrast, a colour
    offset and pixel noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, CLASSES, (count,), generator=g)
    angle = labels.float() * math.pi / CLASSES
    freq = 2.0 + (labels % 3).float()
    colour = torch.tensor([[math.cos(2 * math.pi * c / CLASSES + s) for s in (0.0, 2.1, 4.2)]
                           for c in range(CLASSES)])[labels]
    yy, xx = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    phase = 2 * math.pi * torch.rand(count, generator=g)
    wave = torch.sin(2 * math.pi * freq[:, None, None] / 32 * (xx * torch.cos(angle)[:, None, None]
                                                                + yy * torch.sin(angle)[:, None, None])
                     + phase[:, None, None])
    contrast = 0.5 + torch.rand(count, 1, 1, 1, generator=g)
    offset = 0.3 * torch.randn(count, 3, 1, 1, generator=g)
    images = contrast * colour[:, :, None, None] * wave[:, None] + offset + 1.5 * torch.randn(count, 3, 32, 32,
                                                                                              generator=g)
    return TensorDataset(images, labels)


class Residual(nn.Module):
    """Two 3x3 conv + BatchNorm layers with a skip connection (a strided 1x1 projection
    where the shape changes)."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.skip = nn.Identity() if stride == 1 and cin == cout else \
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: Tensor) -> Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.skip(x))


def resnet(width: int, blocks: tuple[int, ...]) -> nn.Sequential:
    """Stem, then ``blocks[i]`` residual blocks at width ``width * 2**i`` (stride 2 at each
    widening), then pooling and a linear head; every block is its own layer of the Sequential."""
    layers: list[nn.Module] = [nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width),
                                             nn.ReLU())]
    cin = width
    for i, count in enumerate(blocks):
        cout = width * 2 ** i
        for b in range(count):
            layers.append(Residual(cin, cout, 2 if b == 0 and i > 0 else 1))
            cin = cout
    layers.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, CLASSES)))
    return nn.Sequential(*layers)


def accuracy(logits: Tensor, labels: Tensor) -> Tensor:
    """The fraction of rows whose largest logit is the label."""
    return (logits.argmax(dim=1) == labels).float().mean()


def build_task(args: argparse.Namespace, p: Dict[str, Any]) -> Task:
    """The generated images, their loaders and the network of preset ``p``."""
    train, val = gratings(p["train"], args.seed), gratings(p["val"], args.seed + 1)

    def train_loader(epoch: int) -> DataLoader:
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        return DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    return Task(title=f"ResNet (width {p['width']}, blocks {list(p['blocks'])}) on gratings",
                build_model=lambda: resnet(p["width"], p["blocks"]), loss_fn=nn.CrossEntropyLoss(),
                metric=accuracy, metric_name="accuracy", train_loader=train_loader,
                val_loader=DataLoader(val, batch_size=args.batch_size),
                units_per_minibatch=args.batch_size, unit="images")


if __name__ == "__main__":
    main(build_task, PRESETS, "small", __doc__)
