"""What a :class:`~kda_explained.layers.kda_layer.KimiDeltaAttention` layer needs to run on one rank's slice.

Two things in the layer look across tokens, and both cross rank borders:

- the short convolutions (``W`` taps) read the ``W - 1`` inputs before each token. A
  rank's first tokens need the last ``W - 1`` inputs of the ranks before it: each rank
  all-gathers its last ``W - 1`` inputs (``[B, W - 1, C]``, whatever the length) and
  builds its *halo* from the ranks before it, as far back as the sequence goes (a
  slice shorter than ``W - 1`` tokens makes the halo reach over more than one rank);
- the KDA core: :func:`~kda_explained.distributed.context_parallel.context_parallel_kda`'s steps.

Everything else (projections, gates, norms) is per token. The layer builds one
:class:`ContextParallelSlice` per call and asks it for the convolutions' initial
states and for the core.
"""

from __future__ import annotations

import bisect
from typing import Iterable, List, Optional, Sequence

import torch

from ..validation import format_shape
from . import comm
from .context_parallel import context_parallel_on_plan, dtype_code, exchange_plan, summary_function
from .plan import SlicePlan

__all__ = ["ContextParallelSlice", "conv_halo"]


def conv_halo(x: torch.Tensor, conv_size: int, plan: SlicePlan, group) -> torch.Tensor:
    """The ``W - 1`` inputs before this rank's first token, from the ranks that hold them: ``[B, C, W - 1]``.

    ``x: [B, T_r, C]`` are this rank's convolution inputs. Positions before the start of
    the first piece's sequence are zeros (as a sequence's conv state starts), so a rank
    whose first piece starts its sequence gets zeros. Differentiable (the gradient of
    each halo entry goes back to the rank that sent it); every rank must run the backward.
    """
    B, T, C = x.shape
    W1 = conv_size - 1
    tail = x[:, -W1:]  # [B, min(T, W - 1), C]
    if tail.shape[1] < W1:  # a slice shorter than the halo: pad in front
        tail = torch.cat([tail.new_zeros(B, W1 - tail.shape[1], C), tail], dim=1)
    gathered = comm.all_gather_with_grad(tail, group)  # [R, B, W - 1, C]
    R = gathered.shape[0]
    r, bounds = plan.rank, plan.bounds
    seq_start = 0 if plan.cu_seqlens is None else plan.cu_seqlens[plan.piece_seq[0]]
    index: List[int] = []
    valid: List[bool] = []
    for i in range(W1):
        pos = bounds[r] - W1 + i  # the global position halo entry i stands for
        ok = plan.cont_in[r] and pos >= seq_start
        j = bisect.bisect_right(bounds, pos) - 1 if ok else 0  # the rank holding it
        index.append(j * W1 + pos - (bounds[j + 1] - W1) if ok else 0)  # its place in rank j's tail
        valid.append(ok)
    flat = gathered.transpose(0, 1).reshape(B, R * W1, C)  # [B, R (W - 1), C]
    pick = torch.tensor(index, dtype=torch.int64, device=x.device)
    keep = torch.tensor(valid, dtype=x.dtype, device=x.device)
    halo = flat[:, pick] * keep[None, :, None]  # [B, W - 1, C]; multiplied, not dropped: the backward still runs
    return halo.transpose(1, 2)  # [B, C, W - 1]


class ContextParallelSlice:
    """One call of the layer on one rank's slice: the plan, the group and the sizes of the whole batch."""

    def __init__(self, plan: SlicePlan, group, N: int, B: int):
        self.plan, self.group, self.N, self.B = plan, group, N, B

    @classmethod
    def build(cls, hidden_states: torch.Tensor, *, cu_seqlens, attention_mask, cache, group, hidden_size: int,
              parameters: Iterable[torch.Tensor]) -> "ContextParallelSlice":
        """Check a context-parallel call of the layer and exchange the slice lengths.

        ``cu_seqlens`` are the whole batch's offsets (the same on every rank); padding
        masks and caches are not supported across ranks. ``parameters``: the layer's,
        to tell whether a backward will follow (every rank must agree).
        """
        if not isinstance(hidden_states, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(hidden_states).__name__}")
        if hidden_states.dim() != 3 or hidden_states.shape[-1] != hidden_size or hidden_states.shape[1] < 1:
            raise ValueError(f"hidden_states: expected shape [B, T_r, hidden_size] with T_r >= 1 and hidden_size = "
                             f"{hidden_size}, got {format_shape(hidden_states.shape)}")
        if attention_mask is not None:
            raise ValueError("attention_mask: expected None with cp_group (pack the batch and give the whole "
                             "batch's cu_seqlens instead), got a mask")
        if cache is not None:
            raise ValueError("cache: expected None with cp_group (context parallelism is for training and "
                             "prefill without a cache), got a cache")
        group = comm.resolve_group(group)
        B, T, _ = hidden_states.shape
        needs_grad = torch.is_grad_enabled() and (
            hidden_states.requires_grad or any(p.requires_grad for p in parameters))
        cu = None
        if cu_seqlens is not None:
            cu = (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else [int(c) for c in cu_seqlens])
            if B != 1:
                raise ValueError(f"cu_seqlens: expected a packed batch with B = 1, got hidden_states "
                                 f"{format_shape(hidden_states.shape)}")
            if len(cu) < 2 or cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0, got {cu}")
        agree = [("hidden_states", "B", B), ("hidden_states", "dtype", dtype_code(hidden_states.dtype)),
                 ("hidden_states", "requires_grad", needs_grad)]
        plan = exchange_plan(T, agree, cu, group, hidden_states.device)
        return cls(plan, group, N=B if cu is None else len(cu) - 1, B=B)

    @property
    def local_cu_seqlens(self) -> Optional[torch.Tensor]:
        """This rank's pieces as local offsets (``None`` for a plain batch)."""
        if self.plan.cu_seqlens is None:
            return None
        return torch.tensor(self.plan.local_cu, dtype=torch.int64)

    def conv_states(self, xs: Sequence[torch.Tensor], conv_size: int) -> List[torch.Tensor]:
        """Initial states ``[B or L, C, W - 1]`` of the convolutions of inputs ``xs`` (each ``[B, T_r, C]``).

        One all-gather carries all of them; the first piece gets the halo, other pieces zeros.
        """
        widths = [x.shape[-1] for x in xs]
        halo = conv_halo(torch.cat(list(xs), dim=-1), conv_size, self.plan, self.group)  # [B, sum C, W - 1]
        L = self.plan.num_pieces
        if self.plan.cu_seqlens is not None and L > 1:
            halo = torch.cat([halo, halo.new_zeros(L - 1, *halo.shape[1:])])  # [L, sum C, W - 1]
        return list(torch.split(halo, widths, dim=1))

    def kda(self, q, k, v, g, beta, backend: str) -> torch.Tensor:
        """The KDA core over the whole batch, this rank's outputs (``v``'s dtype)."""
        o, _ = context_parallel_on_plan(q, k, v, g, beta, k.shape[-1] ** -0.5, None, self.plan, self.N, False,
                                        self.group, summary_function(backend, q.device))
        return o
