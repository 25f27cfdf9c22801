"""Helpers the backward kernels share: where a gradient is written, GVA sums, a chunk's span."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

__all__ = ["accumulator", "per_key_head", "chunk_span"]


def per_key_head(x: torch.Tensor, H: int, per_value_head: bool = False) -> torch.Tensor:
    """A gradient kept per value head ``[B, T, HV, K]``, summed over each group of ``HV // H`` value
    heads that read one q/k head (GVA); returned as it is when ``HV == H`` or ``per_value_head``."""
    B, T, HV, K = x.shape
    return x if per_value_head or HV == H else x.view(B, T, H, HV // H, K).sum(3)


def accumulator(acc: Optional[torch.Tensor], like: torch.Tensor, shape) -> torch.Tensor:
    """Where a kernel writes a float32 gradient: ``acc`` (it adds into it, saving a pass over memory
    for the sum) or a new tensor it fills (every token is in one chunk: no zero fill)."""
    if acc is None:
        return torch.empty(*shape, dtype=torch.float32, device=like.device)
    if tuple(acc.shape) != tuple(shape) or acc.dtype != torch.float32 or not acc.is_contiguous():
        raise ValueError(f"accumulator: expected a contiguous float32 tensor of shape {tuple(shape)}, "
                         f"got {acc.dtype} {tuple(acc.shape)}")
    return acc


@triton.jit
def chunk_span(cu, chunk_seq, chunk_bos, i_c):
    """Chunk ``i_c``'s first token and its sequence's end, as packed positions (int64)."""
    i_n = tl.load(chunk_seq + i_c)
    return tl.load(chunk_bos + i_c).to(tl.int64), tl.load(cu + i_n + 1).to(tl.int64)
