"""Host-side bookkeeping shared by the Triton launchers: where the sequences and chunks are.

Every kernel sees the batch as one packed row of ``TT = B * T`` tokens (a
``[B, T, ...]`` tensor is contiguous, so token ``t`` of row ``b`` sits at
``b * T + t``): a plain batch is a varlen batch whose ``cu_seqlens`` is
``[0, T, 2T, ..., BT]``. One code path serves both.

Glossary
--------
=============  =================================================================
``cu``         ``[N + 1]`` int32 sequence offsets into the packed row
``chunk_seq``  ``[NC]`` int32: the sequence each chunk belongs to
``chunk_bos``  ``[NC]`` int32: the packed position of each chunk's first token
``chunk_off``  ``[N + 1]`` int32: index of each sequence's first chunk (chunks are numbered sequence by sequence)
=============  =================================================================
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch
import triton

__all__ = ["SeqMeta", "seq_meta", "build_seq_meta", "packed_offsets", "max_chunks", "host_offsets", "device_offsets",
           "dot_precision", "tile", "interpreting", "interpreter_set_too_late", "sm_count"]


@dataclass(frozen=True)
class SeqMeta:
    N: int
    NC: int
    cu: torch.Tensor
    chunk_seq: torch.Tensor
    chunk_bos: torch.Tensor
    chunk_off: torch.Tensor


def packed_offsets(B: int, T: int, cu_seqlens) -> List[int]:
    """Sequence offsets into the packed row: ``[0, T, ..., B T]``, or the values of ``cu_seqlens``."""
    if cu_seqlens is None:
        return [b * T for b in range(B + 1)]
    return host_offsets(cu_seqlens)


def host_offsets(cu_seqlens) -> Optional[List[int]]:
    """``cu_seqlens`` as a list of ints: a list or tuple as it is, a tensor's values read.

    Nothing is cached by tensor identity (an offsets tensor can be edited in ways no
    version counter sees, and inference tensors have none), so the values are always
    the tensor's own. Reading a GPU tensor waits for the GPU: the public functions read
    it once per call (or take ``cu_seqlens_cpu``) and hand the values down as a tuple.
    """
    if cu_seqlens is None:
        return None
    if isinstance(cu_seqlens, (list, tuple)):
        return [int(x) for x in cu_seqlens]
    return [int(x) for x in cu_seqlens.tolist()]


def seq_meta(B: int, T: int, chunk_size: int, cu_seqlens, device) -> SeqMeta:
    """Sequence and chunk tables for ``B`` rows of ``T`` tokens, or the packed batch of ``cu_seqlens``.

    The tables are cached by the offsets' *values* (and chunk size and device), so a
    training loop or benchmark that packs the same lengths again builds and copies
    nothing: pass the offsets as a tuple of ints (as the public functions do inside)
    and no device is read either.
    """
    offsets = tuple(packed_offsets(B, T, cu_seqlens))
    return _tables(offsets, chunk_size, torch.device(device))


def device_offsets(cu_seqlens, device) -> torch.Tensor:
    """``cu_seqlens`` as an int32 tensor on ``device``, cached by its values."""
    return _device_offsets(tuple(host_offsets(cu_seqlens)), torch.device(device))


@functools.lru_cache(maxsize=256)
def _device_offsets(offsets: Tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(offsets, dtype=torch.int32, device=device)


def max_chunks(B: int, T: int, chunk_size: int, cu_seqlens) -> int:
    """Chunks in the longest sequence."""
    o = packed_offsets(B, T, cu_seqlens)
    return max(((e - b + chunk_size - 1) // chunk_size for b, e in zip(o[:-1], o[1:])), default=0)


@functools.lru_cache(maxsize=256)
def _tables(offsets: Tuple[int, ...], chunk_size: int, device: torch.device) -> SeqMeta:
    return build_seq_meta(list(offsets), chunk_size, device)


def build_seq_meta(cu: List[int], chunk_size: int, device) -> SeqMeta:
    """The tables of :class:`SeqMeta` for host offsets ``cu`` (uncached: :func:`seq_meta` caches)."""
    chunk_seq, chunk_bos, chunk_off = [], [], [0]
    for n in range(len(cu) - 1):
        for bos in range(cu[n], cu[n + 1], chunk_size):
            chunk_seq.append(n)
            chunk_bos.append(bos)
        chunk_off.append(len(chunk_seq))

    def i32(values):
        return torch.tensor(values, dtype=torch.int32, device=device)

    return SeqMeta(N=len(cu) - 1, NC=len(chunk_seq), cu=i32(cu), chunk_seq=i32(chunk_seq),
                   chunk_bos=i32(chunk_bos), chunk_off=i32(chunk_off))


def tile(n: int, cap: Optional[int] = None) -> int:
    """A power-of-two tile for a dimension of size ``n``: at least 16 (a tensor-core side), at most ``cap``.

    >>> tile(12), tile(100), tile(100, 64), tile(256, 32)
    (16, 128, 64, 32)
    """
    t = max(16, triton.next_power_of_2(n))
    return t if cap is None else min(cap, t)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for inputs of ``dtype``: full float32 for float32 inputs, tf32 otherwise.

    The intermediates are float32 either way; bf16/fp16 inputs carry less than
    tf32's 10-bit mantissa, so tf32 products cost them no accuracy that matters
    against their 5e-3 bound, while float32 inputs keep their 1e-4 bound.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


#: Whether ``TRITON_INTERPRET=1`` was set when this package was imported: Triton decides when it
#: defines a kernel (at import) whether it will run compiled or interpreted, so that moment counts.
INTERPRETED_AT_IMPORT = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (``TRITON_INTERPRET=1`` set before
    the import of :mod:`kda_explained.fast`, on the CPU).

    The interpreter computes ``tl.dot`` on bf16/fp16 operands wrongly (NumPy has no bf16
    matmul), so kernels keep their float32 operands there.
    """
    return INTERPRETED_AT_IMPORT


def interpreter_set_too_late() -> bool:
    """True when ``TRITON_INTERPRET=1`` is set now but was not when the kernels were defined."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1" and not INTERPRETED_AT_IMPORT


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): what the launch rules size grids against."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
