"""Who holds which tokens: the plan of a context-parallel call, the same on every rank.

Each rank of the group holds a contiguous slice ``[a_r, b_r)`` of the time axis; the
slices follow each other in rank order and may differ in length. A packed batch
(``cu_seqlens``, global offsets) cuts that axis into sequences, so a rank's slice is
cut into *pieces*: the non-empty intersections of its slice with the sequences. A
sequence may start, end or lie wholly inside any slice, or pass through several.

Every rank computes the plan from the same inputs (the gathered slice lengths and
the global offsets), so every rank knows every other rank's flags without asking.

Glossary
--------
==============  ====================================================================
``R``           ranks in the group
``r``           this rank, ``0 <= r < R``
``a_r, b_r``    rank ``r``'s slice of the global time axis, ``bounds[r]:bounds[r + 1]``
piece           a non-empty intersection of one sequence with one slice; a rank holds
                pieces ``0 .. L - 1``, described by its local offsets ``local_cu``
lane            one chain of states across ranks: a batch row of a plain batch (``B``
                lanes), or the packed row (one lane, the sequence crossing each border)
``cont_in``     per rank: its first piece continues a sequence begun on an earlier rank
``cont_out``    per rank: its last piece's sequence goes on into the next rank
``passes``      per rank: its only piece continues (the sequence passes through it)
==============  ====================================================================

Only the first piece of a rank can take a state from other ranks (``cont_in``) and
only the last can hand one on (``cont_out``); a rank that ``passes`` has a single
piece that does both.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

__all__ = ["SlicePlan", "plan_slices"]


@dataclass(frozen=True)
class SlicePlan:
    """The slices of all ranks and the pieces of one rank (see the module's glossary).

    ``piece_seq[p]`` is the global sequence of local piece ``p``; ``piece_starts[p]``
    (``piece_ends[p]``) says whether the piece holds that sequence's first (last) token.
    For a plain batch (no ``cu_seqlens``) every row is one sequence spanning all
    slices: one piece per rank, which stands for all ``B`` rows (lanes).
    """

    rank: int
    bounds: Tuple[int, ...]
    cu_seqlens: Optional[Tuple[int, ...]]
    local_cu: Tuple[int, ...]
    piece_seq: Tuple[int, ...]
    piece_starts: Tuple[bool, ...]
    piece_ends: Tuple[bool, ...]
    cont_in: Tuple[bool, ...]
    cont_out: Tuple[bool, ...]
    passes: Tuple[bool, ...]

    @property
    def world_size(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_pieces(self) -> int:
        return len(self.piece_seq)

    def chain_start(self, r: int) -> int:
        """The rank whose last piece began the sequence that enters rank ``r`` (``r`` itself without ``cont_in``).

        The state entering rank ``r`` is the chain of the last-piece summaries of ranks
        ``chain_start(r) .. r - 1``, from the state that rank ``chain_start(r)`` started with.
        """
        s = r
        if self.cont_in[r]:
            s = r - 1
            while self.passes[s]:
                s -= 1
        return s

    def chain_end(self, r: int) -> int:
        """The last rank that receives rank ``r``'s last-piece state (``r`` itself without ``cont_out``)."""
        e = r
        if self.cont_out[r]:
            e = r + 1
            while self.passes[e] and self.cont_out[e]:
                e += 1
        return e


def plan_slices(lengths: Sequence[int], cu_seqlens: Optional[Sequence[int]], rank: int) -> "SlicePlan":
    """The plan for slices of ``lengths[r]`` tokens on ranks ``r = 0 .. R - 1``, seen from ``rank``.

    ``cu_seqlens``: the global offsets of a packed batch (``None`` for a plain batch,
    every row one sequence). Offsets are checked by the caller.

    >>> plan = plan_slices([5, 2, 4], [0, 3, 9, 11], rank=1)   # rank 1 holds tokens 5, 6 of sequence 1
    >>> plan.bounds, plan.local_cu, plan.piece_seq
    ((0, 5, 7, 11), (0, 2), (1,))
    >>> plan.cont_in, plan.cont_out, plan.passes
    ((False, True, True), (True, True, False), (False, True, False))
    >>> plan.chain_start(2), plan.chain_end(0)      # sequence 1 starts on rank 0, ends on rank 2
    (0, 2)
    """
    bounds = [0]
    for n in lengths:
        bounds.append(bounds[-1] + int(n))
    T = bounds[-1]
    cu = [0, T] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    R = len(lengths)

    def pieces(j: int):
        a, b = bounds[j], bounds[j + 1]
        out = []
        # the sequences ending after a, up to the last one starting before b (offsets are sorted)
        for n in range(bisect.bisect_right(cu, a) - 1, bisect.bisect_left(cu, b)):
            bos, eos = cu[n], cu[n + 1]
            if bos < b and eos > a and eos > bos:  # a non-empty intersection with the slice
                out.append((n, max(bos, a) - a, min(eos, b) - a, bos >= a, eos <= b))
        return out

    all_pieces = [pieces(j) for j in range(R)]
    cont_in = tuple(not ps[0][3] for ps in all_pieces)
    cont_out = tuple(not ps[-1][4] for ps in all_pieces)
    mine = all_pieces[rank]
    local_cu = (0, *(e for _, _, e, _, _ in mine))
    return SlicePlan(
        rank=rank,
        bounds=tuple(bounds),
        cu_seqlens=None if cu_seqlens is None else tuple(cu),
        local_cu=local_cu,
        piece_seq=tuple(n for n, *_ in mine),
        piece_starts=tuple(s for *_, s, _ in mine),
        piece_ends=tuple(e for *_, e in mine),
        cont_in=cont_in,
        cont_out=cont_out,
        passes=tuple(len(ps) == 1 and c for ps, c in zip(all_pieces, cont_in)),
    )
