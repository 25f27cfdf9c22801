"""Where the chunks are: token layout ``[B, T, ...]`` <-> chunk grid ``[N, NT, HV, C, ...]``.

Every stage of the chunked algorithm takes and returns tensors in the token
layout of the design contract, docs/design.md (``[B, T, HV, D]``), like the
Triton kernels that mirror them. Inside, a stage works on the *chunk grid*: sequence ``n`` is cut
into ``NT`` chunks of ``C`` tokens, padded with zeros at its end (the ragged
last chunk) and after its end (sequences with fewer chunks than the longest).

Zero padding is exact for KDA: a padded token has ``k = q = v = 0``,
``beta = 0`` and ``g = 0`` (no decay), so it writes nothing, erases nothing,
decays nothing, and its output is dropped.

Glossary
--------
=========  ====================================================================
``N``      sequences (``B``, or ``len(cu_seqlens) - 1``)
``NT``     chunks of the longest sequence, ``ceil(max_len / C)``
``C``      chunk size
``NC``     chunks of all sequences together, ``sum_n ceil(len_n / C)``
=========  ====================================================================
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

__all__ = ["ChunkLayout"]


@dataclass
class ChunkLayout:
    """The map between token positions and chunk-grid positions for one call.

    ``index[n, i]`` is the flat token position ``b * T + t`` of token ``i`` of
    sequence ``n``, or ``-1`` past its end; ``i`` runs over ``NT * C``.
    Every size and index is made from host integers (the offsets' values), and the
    maps only gather and scatter along fixed index tensors, never through a mask
    whose count depends on data: ``torch.compile`` traces a stage without a graph
    break when the offsets are host values (a list, or no packing).
    """

    B: int
    T: int
    N: int
    NT: int
    C: int
    index: torch.Tensor  # [N, NT * C] int64, -1 for padding
    lengths: torch.Tensor  # [N] int64
    scatter: torch.Tensor  # [N * NT * C] int64: where each grid row goes in the token layout (past B * T: padding)
    chunk_rows: torch.Tensor  # [NC] int64: the grid positions n * NT + c of the real chunks, in order

    @staticmethod
    def build(B: int, T: int, chunk_size: int, cu_seqlens: Optional[torch.Tensor], device) -> "ChunkLayout":
        """Lay out ``B`` rows of ``T`` tokens (or the packed sequences of ``cu_seqlens``) in chunks of ``chunk_size``."""
        if cu_seqlens is None:
            starts, lengths = [b * T for b in range(B)], [T] * B
        else:
            cu = [int(x) for x in (cu_seqlens.tolist() if isinstance(cu_seqlens, torch.Tensor) else cu_seqlens)]
            starts, lengths = cu[:-1], [e - s for s, e in zip(cu[:-1], cu[1:])]
        N, C = len(lengths), chunk_size
        NT = max(1, -(-max(lengths, default=0) // C))  # ceil division; at least one (possibly all-padding) chunk
        i = torch.arange(NT * C, dtype=torch.int64)
        starts_t, lengths_t = torch.tensor(starts, dtype=torch.int64), torch.tensor(lengths, dtype=torch.int64)
        index = torch.where(i[None, :] < lengths_t[:, None], starts_t[:, None] + i[None, :], torch.full_like(i, -1))
        # a real row to its token, each padding row to a spare row of its own past B * T (no index twice)
        spare = B * T + torch.arange(N * NT * C, dtype=torch.int64).view(N, NT * C)
        scatter = torch.where(index >= 0, index, spare).reshape(-1)
        rows = [n * NT + c for n, length in enumerate(lengths) for c in range(-(-length // C))]
        return ChunkLayout(B=B, T=T, N=N, NT=NT, C=C, index=index.to(device), lengths=lengths_t,
                           scatter=scatter.to(device), chunk_rows=torch.tensor(rows, dtype=torch.int64, device=device))

    @property
    def chunks_per_sequence(self) -> torch.Tensor:
        """``[N]``: ``ceil(len_n / C)``, the chunks each sequence really has."""
        return -(-self.lengths // self.C)

    def to_chunks(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, T, HV, *D]`` -> ``[N, NT, HV, C, *D]``, zeros in the padding."""
        B, T, HV = x.shape[:3]
        rest = x.shape[3:]
        flat = x.reshape(B * T, HV, *rest)  # [B*T, HV, *D]
        safe = self.index.clamp(min=0)  # [N, NT*C]
        gathered = flat[safe]  # [N, NT*C, HV, *D]
        pad = (self.index < 0).view(self.N, -1, *([1] * (1 + len(rest))))
        gathered = gathered.masked_fill(pad, 0)
        gathered = gathered.view(self.N, self.NT, self.C, HV, *rest)  # [N, NT, C, HV, *D]
        return gathered.transpose(2, 3)  # [N, NT, HV, C, *D]

    def from_chunks(self, y: torch.Tensor) -> torch.Tensor:
        """``[N, NT, HV, C, *D]`` -> ``[B, T, HV, *D]``, dropping the padding."""
        N, NT, HV, C = y.shape[:4]
        rest = y.shape[4:]
        y = y.transpose(2, 3).reshape(N * NT * C, HV, *rest)  # [N*NT*C, HV, *D]
        # every real row to its token, the padding rows to spare rows past the end, which are cut off
        out = y.new_zeros(self.B * self.T + N * NT * C, HV, *rest)
        out = out.index_copy(0, self.scatter, y)
        return out[: self.B * self.T].view(self.B, self.T, HV, *rest)

    @property
    def real_chunks(self) -> torch.Tensor:
        """``[N, NT]`` bool: which grid chunks hold at least one real token."""
        return (torch.arange(self.NT)[None, :] < self.chunks_per_sequence[:, None]).to(self.index.device)

    @property
    def real_tokens(self) -> torch.Tensor:
        """``[N, NT]``: how many real tokens each grid chunk holds (``C`` but in a sequence's last chunk)."""
        start = torch.arange(self.NT, device=self.index.device)[None, :] * self.C  # [1, NT]
        return (self.lengths.to(self.index.device)[:, None] - start).clamp(0, self.C)

    def flat_chunks(self, h: torch.Tensor) -> torch.Tensor:
        """``[N, NT, ...]`` -> ``[NC, ...]``: keep each sequence's real chunks, in order."""
        return h.reshape(self.N * self.NT, *h.shape[2:]).index_select(0, self.chunk_rows.to(h.device))

    def grid_chunks(self, h: torch.Tensor) -> torch.Tensor:
        """``[NC, ...]`` -> ``[N, NT, ...]``, zeros for padding chunks: the inverse of :meth:`flat_chunks`."""
        grid = h.new_zeros(self.N * self.NT, *h.shape[1:])
        grid = grid.index_copy(0, self.chunk_rows.to(h.device), h)
        return grid.view(self.N, self.NT, *h.shape[1:])
