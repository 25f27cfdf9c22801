"""The collectives of context parallelism, on ``torch.distributed``, and a count of their bytes.

Every exchange between ranks goes through :func:`all_gather` or :func:`all_reduce_sum`
(or :func:`all_gather_with_grad`, which differentiates through one), so
:func:`count_bytes` sees all of it: the tests use it to check that what a rank sends
does not grow with the sequence length. Any backend serves: NCCL for CUDA tensors,
gloo for CPU tensors (the collectives run on the tensors' device).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Dict, Iterator, List, Optional

import torch
import torch.distributed as dist

__all__ = ["ByteCount", "count_bytes", "resolve_group", "all_gather", "all_reduce_sum", "all_gather_with_grad"]


@dataclass
class ByteCount:
    """Bytes this rank contributed to each kind of collective, and how many calls (see :func:`count_bytes`)."""

    bytes: Dict[str, int] = field(default_factory=dict)
    calls: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return sum(self.bytes.values())

    def add(self, kind: str, x: torch.Tensor) -> None:
        self.bytes[kind] = self.bytes.get(kind, 0) + x.numel() * x.element_size()
        self.calls[kind] = self.calls.get(kind, 0) + 1


_COUNTS: List[ByteCount] = []


@contextmanager
def count_bytes() -> Iterator[ByteCount]:
    """Count the bytes this rank puts into the collectives of this module while the block runs.

    An all-gather counts the rank's own tensor (what it sends to each peer), an all-reduce
    the tensor reduced.

    >>> with count_bytes() as c:
    ...     pass
    >>> c.total
    0
    """
    count = ByteCount()
    _COUNTS.append(count)
    try:
        yield count
    finally:
        _COUNTS.remove(count)


def _record(kind: str, x: torch.Tensor) -> None:
    for count in _COUNTS:
        count.add(kind, x)


def resolve_group(group: Optional["dist.ProcessGroup"]) -> "dist.ProcessGroup":
    """``group``, or the default group; :class:`ValueError` if ``torch.distributed`` is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group: expected an initialised torch.distributed process group "
                         "(call torch.distributed.init_process_group first), got none")
    return dist.group.WORLD if group is None else group


def all_gather(x: torch.Tensor, group, kind: str = "all_gather") -> torch.Tensor:
    """``x`` of every rank, stacked in rank order: ``[*S]`` -> ``[R, *S]``. Not differentiable.

    ``kind`` names the exchange in :func:`count_bytes`'s record.
    """
    x = x.detach().contiguous()
    _record(kind, x)
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x, group=group)
    return torch.stack(parts)


def all_reduce_sum(x: torch.Tensor, group) -> torch.Tensor:
    """The sum of ``x`` over the ranks, as a new tensor. Not differentiable."""
    out = x.detach().clone(memory_format=torch.contiguous_format)
    _record("all_reduce", out)
    dist.all_reduce(out, op=dist.ReduceOp.SUM, group=group)
    return out


class _AllGatherWithGrad(torch.autograd.Function):
    """Forward: :func:`all_gather`. Backward: the gradient of this rank's part, summed over the ranks."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return all_gather(x, group)

    @staticmethod
    def backward(ctx, d_gathered):
        # rank j's part was read by every rank: its gradient is the sum of theirs
        d_all = all_reduce_sum(d_gathered, ctx.group)  # [R, *S]
        return d_all[dist.get_rank(ctx.group)], None


def all_gather_with_grad(x: torch.Tensor, group) -> torch.Tensor:
    """:func:`all_gather`, differentiable: every rank must run the backward (it is a collective too)."""
    return _AllGatherWithGrad.apply(x, group)
