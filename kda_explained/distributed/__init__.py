"""Context parallelism for KDA: each rank of a ``torch.distributed`` group holds a slice of the time axis.

- :func:`~kda_explained.distributed.context_parallel.context_parallel_kda`: KDA over the
  whole batch, each rank passing its slice and getting its outputs (and the final state);
  differentiable, with the chunked or the fast backend;
- :func:`~kda_explained.distributed.segment.segment_summary`: the segment map ``(P, R)``
  of a stretch of tokens, the one thing ranks exchange (the fast layer has
  :func:`kda_explained.fast.segment.segment_summary`, the same on the Triton kernels);
- :mod:`~kda_explained.distributed.plan`, :mod:`~kda_explained.distributed.chain`: who
  holds which tokens, and how the maps chain forward and backward;
- :mod:`~kda_explained.distributed.layer`: what ``KimiDeltaAttention(cp_group=...)`` uses
  (the short convolution's halo);
- :func:`~kda_explained.distributed.launch.spawn`: a few local gloo processes, for tests
  and notebooks; :func:`~kda_explained.distributed.comm.count_bytes`: what a rank sends.

The page ``docs/context_parallel.md`` derives the method and sets it beside
flash-linear-attention's.
"""

from .chain import incoming_state, outgoing_adjoint
from .comm import count_bytes
from .context_parallel import context_parallel_kda
from .layer import ContextParallelSlice, conv_halo
from .plan import SlicePlan, plan_slices
from .segment import segment_summary

__all__ = [
    "context_parallel_kda",
    "segment_summary",
    "plan_slices",
    "SlicePlan",
    "incoming_state",
    "outgoing_adjoint",
    "conv_halo",
    "ContextParallelSlice",
    "count_bytes",
]
