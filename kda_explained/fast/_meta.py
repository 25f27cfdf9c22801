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
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional

import torch

__all__ = ["SeqMeta", "seq_meta", "packed_offsets", "max_chunks", "host_offsets", "device_offsets", "dot_precision",
           "interpreting", "sm_count"]


@dataclass(frozen=True)
class SeqMeta:
    N: int
    NC: int
    cu: torch.Tensor
    chunk_seq: torch.Tensor
    chunk_bos: torch.Tensor
    chunk_off: torch.Tensor


def packed_offsets(B: int, T: int, cu_seqlens: Optional[torch.Tensor]) -> List[int]:
    """Sequence offsets into the packed row: ``[0, T, ..., B T]``, or ``cu_seqlens`` itself."""
    if cu_seqlens is None:
        return [b * T for b in range(B + 1)]
    return host_offsets(cu_seqlens)


def seq_meta(B: int, T: int, chunk_size: int, cu_seqlens: Optional[torch.Tensor], device) -> SeqMeta:
    """Sequence and chunk tables for ``B`` rows of ``T`` tokens, or the packed batch of ``cu_seqlens``.

    The tables are cached: a plain batch's by ``(B, T, chunk_size, device)``, a packed
    batch's with its ``cu_seqlens`` tensor (see :func:`host_offsets`), so a training loop
    or benchmark that passes the same offsets again copies nothing to the device and
    never waits for it.
    """
    if cu_seqlens is None:
        return _plain_seq_meta(B, T, chunk_size, torch.device(device))
    entry = _offsets_entry(cu_seqlens)
    key = (chunk_size, str(device))
    if entry is None:  # a list or tuple: nothing to cache by
        return _build_seq_meta(packed_offsets(B, T, cu_seqlens), chunk_size, device)
    if key not in entry.tables:
        entry.tables[key] = _build_seq_meta(entry.values, chunk_size, device)
    return entry.tables[key]


@dataclass
class _Offsets:
    tensor: torch.Tensor  # held, so its id cannot be reused by another tensor while cached
    version: int  # torch's in-place modification counter at the time of the read-back
    values: List[int]
    tables: dict


_OFFSETS: "OrderedDict[int, _Offsets]" = OrderedDict()
_OFFSETS_KEEP = 16


def _offsets_entry(cu_seqlens) -> Optional[_Offsets]:
    if not isinstance(cu_seqlens, torch.Tensor):
        return None
    entry = _OFFSETS.get(id(cu_seqlens))
    if entry is not None and entry.tensor is cu_seqlens and entry.version == cu_seqlens._version:
        _OFFSETS.move_to_end(id(cu_seqlens))
        return entry
    entry = _Offsets(cu_seqlens, cu_seqlens._version, [int(x) for x in cu_seqlens.tolist()], {})
    _OFFSETS[id(cu_seqlens)] = entry
    while len(_OFFSETS) > _OFFSETS_KEEP:
        _OFFSETS.popitem(last=False)
    return entry


def device_offsets(cu_seqlens, device) -> torch.Tensor:
    """``cu_seqlens`` as an int32 tensor on ``device``, copied once per offsets tensor (cached with it)."""
    entry = _offsets_entry(cu_seqlens)
    if entry is None:
        return torch.tensor(packed_offsets(0, 0, cu_seqlens), dtype=torch.int32, device=device)
    key = ("offsets", str(device))
    if key not in entry.tables:
        entry.tables[key] = torch.tensor(entry.values, dtype=torch.int32, device=device)
    return entry.tables[key]


def max_chunks(B: int, T: int, chunk_size: int, cu_seqlens) -> int:
    """Chunks in the longest sequence (host values: no device read once the offsets are cached)."""
    o = packed_offsets(B, T, cu_seqlens)
    return max(((e - b + chunk_size - 1) // chunk_size for b, e in zip(o[:-1], o[1:])), default=0)


def host_offsets(cu_seqlens) -> Optional[List[int]]:
    """``cu_seqlens`` as a list of ints, read from the device once per tensor.

    The values are kept with the tensor (and read again after an in-place change,
    which bumps its version counter), so calls that reuse one offsets tensor pay
    for the device-to-host read, a synchronisation, only once.
    """
    if cu_seqlens is None:
        return None
    entry = _offsets_entry(cu_seqlens)
    return entry.values if entry is not None else [int(x) for x in cu_seqlens]


@functools.lru_cache(maxsize=64)
def _plain_seq_meta(B: int, T: int, chunk_size: int, device: torch.device) -> SeqMeta:
    return _build_seq_meta(packed_offsets(B, T, None), chunk_size, device)


def _build_seq_meta(cu: List[int], chunk_size: int, device) -> SeqMeta:
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


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for inputs of ``dtype``: full float32 for float32 inputs, tf32 otherwise.

    The intermediates are float32 either way; bf16/fp16 inputs carry less than
    tf32's 10-bit mantissa, so tf32 products cost them no accuracy that matters
    against their 5e-3 bound, while float32 inputs keep their 1e-4 bound.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def interpreting() -> bool:
    """True when the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``, on the CPU).

    The interpreter computes ``tl.dot`` on bf16/fp16 operands wrongly (NumPy has no bf16
    matmul), so kernels keep their float32 operands there.
    """
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def sm_count(device) -> int:
    """Streaming multiprocessors of ``device`` (1 off the GPU): what the launch rules size grids against."""
    device = torch.device(device)
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
