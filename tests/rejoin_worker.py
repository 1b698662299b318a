"""One rank of ``tests/test_torchrun_exit.py::test_a_pipeline_after_close_joins_a_new_group``:
under torchrun, builds a ``backend="dist"`` pipeline, trains, closes it, and does it all again
(the second process group is made on the same torchrun store as the first). Both runs start
from the same weights and data, so they must return the same losses; prints them and exits 0."""
from __future__ import annotations

import os
import time

import torch
from torch import nn

from pipeline_rt import Pipeline


def run(late: float) -> list:
    """Train once; rank 0 joins ``late`` seconds after the others (an injected delay: they
    look up its address in the store before it has written the new group's)."""
    if os.environ["RANK"] == "0":
        time.sleep(late)
    torch.manual_seed(0)
    n = int(os.environ["WORLD_SIZE"])
    stages = [(lambda: nn.Linear(4, 4)) for _ in range(n)]
    g = torch.Generator().manual_seed(1)
    data = [(torch.randn(8, 4, generator=g), torch.randn(8, 4, generator=g)) for _ in range(6)]
    pipe = Pipeline(stages, ["cpu"] * n, lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9),
                    nn.functional.mse_loss, method="pipeoptim", backend="dist", timeout=30)
    losses = pipe.train(data)
    pipe.close()
    return losses


if __name__ == "__main__":
    first, second = run(0.0), run(3.0)
    assert first == second, (first, second)
    print(f"rank {os.environ['RANK']}: two groups, losses {second}", flush=True)
