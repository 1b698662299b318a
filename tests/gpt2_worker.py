"""Shared by tests/test_split.py and its gloo ranks: a tiny transformers GPT-2 built from a
config (random weights, nothing downloaded; float64), its next-token data, and the ranks'
run of a tied GPT-2 split by ``split_model`` under ``backend="dist"`` (:class:`TiedRuns`,
launched by :func:`dist_worker.launch`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn

from pipeline_rt import Pipeline, SplitModel, split_model

transformers.logging.set_verbosity_error()

VOCAB, SEQ = 32, 8
GPT_SPLITS = ["transformer.h.1", "transformer.h.2", "transformer.h.3"]
#: the distributed launch's minibatches (one size: the dist transport fixes each micro-batch's shapes)
DIST_ROWS = (7, 7, 7)


def sgd(ps: Any) -> torch.optim.Optimizer:
    return torch.optim.SGD(ps, lr=0.1, momentum=0.9)


def lm_loss(out: Any, y: Tensor) -> Tensor:
    return F.cross_entropy(out.logits.flatten(0, 1), y.flatten())


def gpt2(layers: int = 4, dropout: float = 0.0, tie: bool = False) -> nn.Module:
    cfg = transformers.GPT2Config(n_layer=layers, n_embd=16, n_head=2, vocab_size=VOCAB, n_positions=SEQ,
                                  use_cache=False, tie_word_embeddings=tie, resid_pdrop=dropout, embd_pdrop=dropout,
                                  attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(cfg).double()


def tokens(rows: Sequence[int], seed: int = 1) -> List[Tuple[Tensor, Tensor]]:
    """Next-token minibatches of ``rows`` rows each (uneven micro-batches, a short last one)."""
    g = torch.Generator().manual_seed(seed)
    return [(w[:, :-1], w[:, 1:]) for w in (torch.randint(0, VOCAB, (r, SEQ + 1), generator=g) for r in rows)]


def split_tied(layers: int) -> Tuple[nn.Module, SplitModel]:
    """A tied GPT-2 of ``layers`` blocks split into one stage per block."""
    model = gpt2(layers, tie=True)
    return model, split_model(model, GPT_SPLITS[:layers - 1], (torch.zeros(4, SEQ, dtype=torch.long),))


@dataclass
class TiedRuns:
    """Every rank splits a tied GPT-2 alike (one stage per rank, the stages given as modules:
    the tie is found by identity) and trains it under ``sync``."""

    world: int

    def run(self, rank: int) -> Dict[str, Any]:
        _, stages = split_tied(self.world)
        pipe = Pipeline(stages, ["cpu"] * self.world, sgd, lm_loss, method="sync", backend="dist", timeout=60)
        losses = pipe.train(tokens(DIST_ROWS))
        out = {"losses": losses, "ties": pipe.ties, "state": {n: t.detach().clone()
                                                             for n, t in pipe.stages[rank].state_dict().items()}}
        pipe.close()
        return out
