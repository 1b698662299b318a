"""What the data fingerprint of a checkpointing run costs per minibatch, against the step.

A run that checkpoints or resumes folds every minibatch it pulls into its fingerprint: exact
sums of the bytes of its CPU tensors, hashed (:mod:`pipeline_rt.feed`). Measured side by side
in one process, per minibatch: that fingerprint (``Feed``'s own ``_digest``), a BLAKE2b hash
of every byte, the sampled fingerprint it replaced (64 values per tensor), and one training
step (forward, backward, Adam step) of the examples' model on the same minibatch, on one CPU
stage:

* images: 64 x 3 x 32 x 32 float32 and int64 labels, the ResNet of ``examples/train_cnn.py``
  at its ``small`` size (width 32, blocks 2-2-2);
* tokens: 16 x 64 int64 windows and targets, the GPT of ``examples/train_lm.py`` at its
  ``tiny`` size;
* and the hash alone of a 256 x 3 x 224 x 224 float32 minibatch (ImageNet-sized, 154 MB).

Medians of ``--rounds`` rounds.
"""
from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable, List

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "examples")]

from benchmarks._sections import provenance, write_section  # noqa: E402
from pipeline_rt.feed import _digest  # noqa: E402
from train_cnn import resnet  # noqa: E402
from train_lm import gpt, lm_loss  # noqa: E402


def sampled(h: Any, x: Any) -> None:
    """The fingerprint before: dtype, shape and 64 evenly spaced values per tensor."""
    if isinstance(x, torch.Tensor):
        h.update(f"{x.dtype}{tuple(x.shape)}".encode())
        flat = x.detach().reshape(-1)
        h.update(flat[::max(1, flat.numel() // 64)][:64].contiguous().view(torch.uint8).numpy().tobytes())
    else:
        for t in x:
            sampled(h, t)


def median_ms(fn: Callable[[], Any], rounds: int) -> float:
    times: List[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def every_byte(h: Any, x: Any) -> None:
    """BLAKE2b over every byte (for comparison)."""
    for t in x:
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())


def hash_with(fold: Callable[[Any, Any], None], batch: Any) -> Callable[[], None]:
    return lambda: fold(hashlib.blake2b(digest_size=16), batch)


def step_of(model: nn.Module, loss: Callable[..., torch.Tensor], batch: Any) -> Callable[[], None]:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def step() -> None:
        opt.zero_grad()
        loss(model(batch[0]), batch[1]).backward()
        opt.step()
    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--write", action="store_true", help="write the table into benchmarks/RESULTS.md")
    args = parser.parse_args()
    torch.manual_seed(0)
    images = (torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,)))
    tokens = (torch.randint(0, 256, (16, 64)), torch.randint(0, 256, (16, 64)))
    large = (torch.randn(256, 3, 224, 224), torch.randint(0, 1000, (256,)))
    cases = [("images 64x3x32x32 f32, ResNet small", images,
              step_of(resnet(32, (2, 2, 2)), nn.functional.cross_entropy, images)),
             ("tokens 16x64 int64, GPT tiny", tokens, step_of(gpt(2, 64, 4, 64), lm_loss, tokens)),
             ("images 256x3x224x224 f32 (hash only)", large, None)]
    rows = ["| minibatch, model | MB | fingerprint (ms) | BLAKE2b of every byte (ms) | sampled, before (ms) | "
            "step (ms) | fingerprint / step |", "|---|---|---|---|---|---|---|"]
    for name, batch, step in cases:
        mb = sum(t.numel() * t.element_size() for t in batch) / 1e6
        full = median_ms(hash_with(_digest, batch), args.rounds)
        whole = median_ms(hash_with(every_byte, batch), args.rounds)
        old = median_ms(hash_with(sampled, batch), args.rounds)
        stepped = f"{median_ms(step, args.rounds):.1f}" if step is not None else "-"
        ratio = f"{full / float(stepped):.2%}" if step is not None else "-"
        rows.append(f"| {name} | {mb:.2f} | {full:.3f} | {whole:.3f} | {old:.3f} | {stepped} | {ratio} |")
        print(rows[-1], flush=True)
    text = (f"## Data fingerprint: cost per minibatch\n\n{provenance('cpu')}\n" + "\n".join(rows) + "\n\n"
            f"The fingerprint reads {mb / full:.2f} GB/s on the large minibatch ({torch.get_num_threads()} torch "
            f"thread(s); BLAKE2b {mb / whole:.2f} GB/s). It is paid once per minibatch pulled, by a run that "
            f"checkpoints or resumes only. The ImageNet-sized minibatch has no step beside it here (a CPU "
            f"step at that size takes minutes); against a GPU step of a few hundred ms its fingerprint on one "
            f"core would be a visible share of the step, the sampled one it replaced missed most one-element "
            f"changes, and every-byte BLAKE2b would cost about {whole / full:.0f}x more.\n")
    if args.write:
        write_section(ROOT / "benchmarks" / "RESULTS.md", "ckpt", text)
    print(text)


if __name__ == "__main__":
    main()
