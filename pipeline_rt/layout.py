"""Which rank runs which (replica, stage): the rank layout of a data-parallel pipeline.

A ``backend="dist"`` pipeline of ``N`` stages with ``data_parallel=D`` runs on ``D x N``
ranks. Each rank is one stage ``k`` of one replica ``r``: it exchanges activations and
gradients (point to point) with stages ``k-1`` and ``k+1`` of replica ``r`` only, and
all-reduces its gradients with stage ``k`` of the other replicas only. Two orders:

``"pipeline"`` (default): ``rank = r * N + k``. A replica's stages have consecutive ranks,
so with ``torchrun --nproc-per-node N`` (a multiple of ``N``) every pipeline's P2P stays
inside a node and the gradient all-reduce crosses nodes. Best where activations are large
and the all-reduce overlaps the backward.

``"replica"``: ``rank = k * D + r``. The replicas of a stage have consecutive ranks, so with
``--nproc-per-node D`` the all-reduce stays inside a node and the P2P crosses nodes.

Example, ``N = 2`` stages and ``D = 2`` replicas, ``"pipeline"``:

====  =======  =====  ==========================  ===========================
rank  replica  stage  P2P with (same replica)     all-reduce with (same stage)
====  =======  =====  ==========================  ===========================
0     0        0      1                           2
1     0        1      0                           3
2     1        0      3                           0
3     1        1      2                           1
====  =======  =====  ==========================  ===========================

:class:`Layout` is the only place that knows this mapping; :meth:`Layout.table` prints it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Tuple

__all__ = ["Layout", "ORDERS"]

ORDERS = ("pipeline", "replica")


@dataclass(frozen=True)
class Layout:
    """The ranks of ``data_parallel`` replicas of an ``num_stages``-stage pipeline.

    Args:
        num_stages: N, stages per replica.
        data_parallel: D, replicas.
        order: ``"pipeline"`` (a replica's stages on consecutive ranks) or ``"replica"`` (a
            stage's replicas on consecutive ranks); see the module docs.
    """

    num_stages: int
    data_parallel: int = 1
    order: str = "pipeline"

    def __post_init__(self) -> None:
        if self.order not in ORDERS:
            raise ValueError(f"rank_layout must be one of {ORDERS}, got {self.order!r}")
        for name in ("num_stages", "data_parallel"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{'data_parallel' if name == 'data_parallel' else 'the number of stages'} must be "
                                 f"a positive int, got {v!r}")

    @property
    def world(self) -> int:
        """The number of ranks, ``D * N``."""
        return self.num_stages * self.data_parallel

    def rank(self, replica: int, stage: int) -> int:
        """The rank that runs ``stage`` of ``replica``."""
        if self.order == "pipeline":
            return replica * self.num_stages + stage
        return stage * self.data_parallel + replica

    def coords(self, rank: int) -> Tuple[int, int]:
        """``(replica, stage)`` of ``rank``."""
        if self.order == "pipeline":
            return divmod(rank, self.num_stages)
        stage, replica = divmod(rank, self.data_parallel)
        return replica, stage

    def pipeline_ranks(self, replica: int) -> List[int]:
        """The ranks of ``replica``'s stages, in stage order (its P2P group)."""
        return [self.rank(replica, k) for k in range(self.num_stages)]

    def replica_ranks(self, stage: int) -> List[int]:
        """The ranks of ``stage`` in every replica, in replica order (its all-reduce group)."""
        return [self.rank(r, stage) for r in range(self.data_parallel)]

    def table(self) -> str:
        """The layout as a text table: one line per rank."""
        lines = ["rank  replica  stage  P2P with  all-reduce with"]
        for rank in range(self.world):
            r, k = self.coords(rank)
            p2p = [self.rank(r, i) for i in (k - 1, k + 1) if 0 <= i < self.num_stages]
            peers = [x for x in self.replica_ranks(k) if x != rank]
            lines.append(f"{rank:<4}  {r:<7}  {k:<5}  {','.join(map(str, p2p)) or '-':<8}  "
                         f"{','.join(map(str, peers)) or '-'}")
        return "\n".join(lines)
