"""Train a transformers GPT-2 as a pipeline: ``split_model`` cuts it into stages, no glue.

The model is ``transformers.GPT2LMHeadModel`` built from a ``GPT2Config`` (random weights,
nothing downloaded; dropout 0.1; byte-level, 256 tokens), cut by
:func:`pipeline_rt.split_model` into ``--stages`` stages of consecutive blocks (torch's
tracer; the causal mask made in stage 0 reaches every later stage, every micro-batch size
works, ``evaluate`` runs the eval graph: no dropout). The data are those of
``train_lm.py``: the Python standard library's own sources as bytes, the last tenth held
out. Each method of ``--method`` trains the same model on the same data (AdamW, warm-up +
cosine schedule, clipping), evaluated after every epoch (loss, and bits per byte). Outputs
in ``--out``: plot.png, results.md, results.json, ckpt/ (see ``examples/_common.py``).

Tied embeddings. GPT-2 ties its input embedding (stage 0) to its output projection (the
last stage). ``split_model`` keeps the tie (both stages hold the model's one parameter) and
``Pipeline`` trains it exactly under the flush methods (``sync``, ``1f1b-flush``: one step on
the sum of both stages' gradients, as single-device training). The asynchronous methods
refuse a tie: their first and last stages update at different times (or on predicted
weights), so the two uses would see different versions of one parameter. Every method of
``--method`` trains the same model, so the embeddings are tied (``tie_word_embeddings=True``)
when every method is a flush method, and untied otherwise.

CPU, about a minute on 2 cores (untied; ``--method sync,1f1b-flush``: tied)::

    python examples/train_gpt2_hf.py --tiny --method sync,pipeoptim

GPT-2 small (12 layers, d=768, 12 heads, context 1024) on one GPU shared by 4 stages::

    python examples/train_gpt2_hf.py --size gpt2-small --devices cuda:0,cuda:0,cuda:0,cuda:0 \\
        --method pipedream,pipeoptim --max-steps 200
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Dict, List

import torch
import torch.nn.functional as F
from torch import Tensor, nn

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import Task, main  # noqa: E402
from train_lm import bits_per_byte, text_task  # noqa: E402

from pipeline_rt import get_method, split_model  # noqa: E402

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(layers=4, dim=32, heads=4, seq=32, data_bytes=16_000, val_batches=2,
                 epochs=2, batch_size=16, lr=3e-3),
    "small": dict(layers=4, dim=256, heads=8, seq=256, data_bytes=4_000_000, val_batches=32,
                  epochs=1, batch_size=16, lr=1e-3),
    "gpt2-small": dict(layers=12, dim=768, heads=12, seq=1024, data_bytes=None, val_batches=64,
                       epochs=1, batch_size=16, lr=3e-4),
}


def gpt2(layers: int, dim: int, heads: int, seq: int, tie: bool) -> nn.Module:
    """A byte-level GPT-2 from a config: random weights, dropout 0.1, embeddings tied or not."""
    from transformers import GPT2Config, GPT2LMHeadModel
    config = GPT2Config(vocab_size=256, n_positions=seq, n_embd=dim, n_layer=layers, n_head=heads,
                        resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1, use_cache=False,
                        tie_word_embeddings=tie, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config)


def flush_only(methods: List[str]) -> bool:
    """Whether every method is a flush method (``sync``, ``1f1b-flush``), which trains a tie exactly."""
    return all(get_method(m).shape != "async-1f1b" for m in methods)


def split_blocks(seq: int) -> Any:
    """``split(model, stages)``: stage ``k`` begins with block ``k * layers // stages``."""
    def split(model: nn.Module, stages: int) -> List[nn.Module]:
        layers = model.config.n_layer
        if stages > layers:
            raise SystemExit(f"--stages {stages} needs at least as many layers; the model has {layers}")
        points = [f"transformer.h.{k * layers // stages}" for k in range(1, stages)]
        return list(split_model(model, points, (torch.zeros(2, seq, dtype=torch.long),)))
    return split


def lm_loss(out: Any, targets: Tensor) -> Tensor:
    """Next-byte cross-entropy over every position (``out`` is the model's ``CausalLMOutput``)."""
    return F.cross_entropy(out.logits.flatten(0, 1), targets.flatten())


def metric(out: Any, targets: Tensor) -> Tensor:
    """Bits per byte of held-out text."""
    return bits_per_byte(out.logits, targets)


def build_task(args: argparse.Namespace, p: Dict[str, Any]) -> Task:
    """The stdlib text, its loaders and the GPT-2 of preset ``p``."""
    tie = flush_only(args.methods)
    print(f"embeddings {'tied' if tie else 'untied (an asynchronous method cannot train a tie)'}")
    return text_task(args, p, f"transformers GPT-2, {'tied' if tie else 'untied'} embeddings",
                     lambda: gpt2(p["layers"], p["dim"], p["heads"], p["seq"], tie), lm_loss, metric,
                     split=split_blocks(p["seq"]))


if __name__ == "__main__":
    main(build_task, PRESETS, "small", __doc__)
