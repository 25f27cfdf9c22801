"""The cost model of context parallelism: what each rank computes and sends, against one device.

FLOPs come from :func:`kda_explained.chunked.flops.chunk_costs` (matrix products of one
chunk of one head, as the chunked layer implements them); a rank runs the chunk
pipeline over ``V + K`` value columns on its ``T / R`` tokens (the segment map,
:mod:`kda_explained.distributed.segment`) plus the first piece's correction, where one
device runs it over ``V`` columns on all ``T`` tokens. Bytes are what a rank puts into
the collectives of :mod:`kda_explained.distributed.comm`: none of them depends on ``T``.

Glossary
--------
=========  =============================================================
``T``      tokens of the whole batch (per lane)
``R``      ranks
``HV``     value heads; ``K, V`` key and value widths
``lanes``  chains of states: batch rows of a plain batch, 1 for a packed one
``N``      sequences whose final state is asked for (0: none)
=========  =============================================================
"""

from __future__ import annotations

from dataclasses import dataclass

from ..chunked.flops import chunk_costs

__all__ = ["ContextParallelCosts", "context_parallel_costs"]


@dataclass(frozen=True)
class ContextParallelCosts:
    """Forward FLOPs (matrix products) and bytes sent per rank; see :func:`context_parallel_costs`."""

    one_device_flops: float  # the chunk pipeline over all T tokens, V columns
    rank_flops: float  # the chunk pipeline over T / R tokens, V + K columns, + the correction
    forward_bytes: int  # all-gather of [P | R]: lanes x HV x K x (K + V)
    backward_bytes: int  # all-gather of dS_in: lanes x HV x K x V
    final_bytes: int  # all-reduce of the final states, forward and backward: 2 x N x HV x K x V

    @property
    def compute_speedup(self) -> float:
        """One device's FLOPs divided by one rank's; at most ``R``, less the price of the ``K`` extra columns."""
        return self.one_device_flops / self.rank_flops

    @property
    def bytes_per_rank(self) -> int:
        return self.forward_bytes + self.backward_bytes + self.final_bytes


def context_parallel_costs(T: int, R: int, HV: int, K: int, V: int, *, lanes: int = 1, N: int = 0,
                           chunk_size: int = 64, state_bytes: int = 4) -> ContextParallelCosts:
    """The cost model for ``T`` tokens per lane over ``R`` ranks (``state_bytes``: 4 for float32 states).

    >>> c = context_parallel_costs(T=2**20, R=8, HV=32, K=128, V=128)   # Kimi Linear's heads, 1M tokens
    >>> round(c.compute_speedup, 2), c.forward_bytes // 2**20, c.backward_bytes // 2**20   # MiB
    (4.07, 4, 2)
    >>> context_parallel_costs(T=2**10, R=8, HV=32, K=128, V=128).bytes_per_rank == c.bytes_per_rank
    True
    """
    C = chunk_size
    one = chunk_costs("kda", C, K, V).total * (T / C) * HV * lanes
    augmented = chunk_costs("kda", C, K, V + K).total * (T / R / C) * HV * lanes
    correction = 2 * (T / R) * K * V * HV * lanes  # q_read S_in on (at most) the whole slice
    return ContextParallelCosts(
        one_device_flops=one,
        rank_flops=augmented + correction,
        forward_bytes=lanes * HV * K * (K + V) * state_bytes,
        backward_bytes=lanes * HV * K * V * state_bytes,
        final_bytes=2 * N * HV * K * V * state_bytes,
    )
