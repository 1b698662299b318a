"""Train a GPT-style byte-level language model as a pipeline, on the Python standard library.

The text is the standard library's own ``.py`` sources, found at run time
(``sysconfig.get_paths()["stdlib"]``; ``site-packages`` excluded), read in sorted order up
to the preset's byte budget; the last tenth is held out. Tokens are bytes (256 symbols).
The model is an ``nn.Sequential`` of (token + position embedding, pre-LN transformer blocks
with causal self-attention and an MLP, final LayerNorm + linear head), split into
``--stages`` stages by parameter count. Each method of ``--method`` trains the same model on
the same data (AdamW, warm-up + cosine schedule, clipping, a shuffled ``DataLoader`` of
windows streamed into ``Pipeline.train``), evaluated after every epoch (loss, and bits per
byte as the metric = loss / ln 2). Outputs in ``--out``: plot.png, results.md, results.json,
ckpt/ (see ``examples/_common.py``).

CPU, a few minutes on 2 cores::

    python examples/train_lm.py --tiny --method sync,pipedream,pipeoptim,pipeoptim-calroll

GPT-2-small size (12 layers, d=768, 12 heads, context 1024) on one GPU shared by 4 stages::

    python examples/train_lm.py --size gpt2-small --devices cuda:0,cuda:0,cuda:0,cuda:0 \\
        --method pipedream,pipeoptim,pipeoptim-calroll --max-steps 200
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
from pathlib import Path
from typing import Any, Dict, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Task, main  # noqa: E402

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(layers=2, dim=64, heads=4, seq=64, data_bytes=80_000, val_batches=4,
                 epochs=2, batch_size=16, lr=3e-3),
    "small": dict(layers=4, dim=256, heads=8, seq=256, data_bytes=4_000_000, val_batches=32,
                  epochs=1, batch_size=16, lr=1e-3),
    "gpt2-small": dict(layers=12, dim=768, heads=12, seq=1024, data_bytes=None, val_batches=64,
                       epochs=1, batch_size=16, lr=3e-4),
}


def stdlib_bytes(limit: int | None) -> bytes:
    """The standard library's ``.py`` files in sorted order, concatenated, up to ``limit`` bytes."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages", "__pycache__"} & set(p.relative_to(root).parts))
    chunks, size = [], 0
    for p in files:
        text = p.read_bytes()
        chunks.append(text)
        size += len(text)
        if limit is not None and size >= limit:
            break
    data = b"".join(chunks)
    return data if limit is None else data[:limit]


class Windows(Dataset):
    """Consecutive non-overlapping windows of ``seq`` bytes: (input, the next bytes)."""

    def __init__(self, data: Tensor, seq: int) -> None:
        self.data, self.seq = data, seq

    def __len__(self) -> int:
        return (len(self.data) - 1) // self.seq

    def __getitem__(self, i: int) -> Tuple[Tensor, Tensor]:
        w = self.data[i * self.seq: (i + 1) * self.seq + 1].long()
        return w[:-1], w[1:]


class Embedding(nn.Module):
    """Token + learned position embedding."""

    def __init__(self, vocab: int, dim: int, seq: int) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(vocab, dim), nn.Embedding(seq, dim)

    def forward(self, idx: Tensor) -> Tensor:
        return self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))


class Block(nn.Module):
    """Pre-LN transformer block: causal multi-head self-attention, then a 4x GELU MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(att.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.ln2(x))


class Head(nn.Module):
    """Final LayerNorm and the linear map to the vocabulary's logits."""

    def __init__(self, dim: int, vocab: int) -> None:
        super().__init__()
        self.ln, self.out = nn.LayerNorm(dim), nn.Linear(dim, vocab)

    def forward(self, x: Tensor) -> Tensor:
        return self.out(self.ln(x))


def gpt(layers: int, dim: int, heads: int, seq: int, vocab: int = 256) -> nn.Sequential:
    """The model as (embedding, blocks..., head), GPT-2's initialisation (normal, std 0.02)."""
    model = nn.Sequential(Embedding(vocab, dim, seq), *[Block(dim, heads) for _ in range(layers)], Head(dim, vocab))
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)
    return model


def lm_loss(logits: Tensor, targets: Tensor) -> Tensor:
    """Next-byte cross-entropy, the mean over every position of the minibatch."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def bits_per_byte(logits: Tensor, targets: Tensor) -> Tensor:
    """The loss in bits: bits per byte of held-out text."""
    return lm_loss(logits, targets) / math.log(2)


def text_task(args: argparse.Namespace, p: Dict[str, Any], title: str, build_model: Any, loss_fn: Any,
              metric: Any, **task: Any) -> Task:
    """The stdlib text of preset ``p``, its loaders, and the language model ``build_model()``
    on it (``task``: more :class:`Task` fields)."""
    data = torch.frombuffer(bytearray(stdlib_bytes(p["data_bytes"])), dtype=torch.uint8)
    split = int(0.9 * len(data))
    train, val = Windows(data[:split], p["seq"]), Windows(data[split:], p["seq"])
    val_rows = min(len(val), p["val_batches"] * args.batch_size)

    def train_loader(epoch: int) -> DataLoader:
        sampler = RandomSampler(train, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        return DataLoader(train, batch_size=args.batch_size, sampler=sampler, drop_last=True)

    print(f"text: {len(data)} bytes of {sysconfig.get_paths()['stdlib']}/**.py ({len(train)} training windows)")
    return Task(title=f"{title} ({p['layers']} layers, d={p['dim']}, context {p['seq']})",
                build_model=build_model, loss_fn=loss_fn, metric=metric, metric_name="bits/byte",
                train_loader=train_loader,
                val_loader=DataLoader(torch.utils.data.Subset(val, range(val_rows)), batch_size=args.batch_size),
                units_per_minibatch=args.batch_size * p["seq"], unit="tokens", **task)


def build_task(args: argparse.Namespace, p: Dict[str, Any]) -> Task:
    """The stdlib text, its loaders and the model of preset ``p``."""
    return text_task(args, p, "byte-level GPT", lambda: gpt(p["layers"], p["dim"], p["heads"], p["seq"]), lm_loss,
                     bits_per_byte)


if __name__ == "__main__":
    main(build_task, PRESETS, "small", __doc__)
