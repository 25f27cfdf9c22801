"""Stage 3 on the GPU: the UT transform ``M = (I + A_kk)^{-1}`` (report Eq. 6).

Mirrors :func:`kda_explained.chunked.stages.ut_transform`. One program inverts one
chunk's unit lower-triangular ``[BT, BT]`` matrix for one value head, by blocks
of ``BC = 16``:

1. each diagonal block ``M_aa = (I + A_aa)^{-1}`` by forward substitution in
   registers (row ``i`` of ``M`` is ``e_i - sum_{j<i} A_ij M_j``: ``BC`` steps);
2. each block below it from the blocks already found (block forward substitution)::

       M_ab = -M_aa  sum_{b <= c < a}  A_ac M_cb

   as ``[BC, BC]`` tensor-core products, in full float32 (the inverse feeds
   every later stage, so it gets no tf32 rounding).

Blocks found earlier are read back from ``M`` in global memory (they are
still in cache); a barrier after each store makes them visible to all threads.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._meta import seq_meta

__all__ = ["ut_transform"]

#: Warps per program; the blocks are 16 x 16, so a few warps suffice (see docs: kernel notes).
UT_WARPS = 1


@triton.jit
def _ut_transform_kernel(
    # pointers
    A,  # [TT, HV, BT] float32: strictly lower A_kk
    M,  # [TT, HV, BT] float32 out: (I + A_kk)^{-1}
    cu,
    chunk_seq,
    chunk_bos,
    # sizes
    HV: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BC: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    NS: tl.constexpr = BT // BC
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    o_i = tl.arange(0, BC)
    eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)  # [BC, BC]

    for a in tl.static_range(NS):
        o_r = a * BC + o_i  # rows of block row a
        m_r = bos + o_r < eos
        # ---- 1. diagonal block: forward substitution
        m_aa = m_r[:, None] & (bos + a * BC + o_i[None, :] < eos)
        b_A = tl.load(A + ((bos + o_r[:, None]) * HV + i_hv) * BT + a * BC + o_i[None, :], mask=m_aa, other=0)
        b_Maa = eye
        for i in range(1, BC):
            b_a = tl.sum(tl.where(o_i[:, None] == i, b_A, 0.0), axis=0)  # row i of A_aa     [BC]
            b_m = tl.sum(b_a[:, None] * b_Maa, axis=0)  # sum_{j<i} A_ij M_j                     [BC]
            b_Maa = tl.where(o_i[:, None] == i, b_Maa - b_m[None, :], b_Maa)
        tl.store(M + ((bos + o_r[:, None]) * HV + i_hv) * BT + a * BC + o_i[None, :], b_Maa, mask=m_r[:, None])
        # ---- 2. blocks left of the diagonal: M_ab = -M_aa sum_c A_ac M_cb
        for b in tl.static_range(a):
            b_acc = tl.zeros([BC, BC], dtype=tl.float32)
            for c in tl.static_range(b, a):
                o_rc = c * BC + o_i  # rows of block row c (all real: a later row is real)
                b_Aac = tl.load(A + ((bos + o_r[:, None]) * HV + i_hv) * BT + c * BC + o_i[None, :],
                                mask=m_r[:, None], other=0)
                b_Mcb = tl.load(M + ((bos + o_rc[:, None]) * HV + i_hv) * BT + b * BC + o_i[None, :],
                                mask=(bos + o_rc[:, None] < eos), other=0)
                b_acc += tl.dot(b_Aac, b_Mcb, input_precision="ieee")
            b_Mab = -tl.dot(b_Maa, b_acc, input_precision="ieee")
            tl.store(M + ((bos + o_r[:, None]) * HV + i_hv) * BT + b * BC + o_i[None, :], b_Mab, mask=m_r[:, None])
        # ---- 3. zeros right of the diagonal, so consumers can read whole rows
        for b in tl.static_range(a + 1, NS):
            tl.store(M + ((bos + o_r[:, None]) * HV + i_hv) * BT + b * BC + o_i[None, :],
                     tl.zeros([BC, BC], dtype=tl.float32), mask=m_r[:, None])
        tl.debug_barrier()  # the blocks of row a are read by the rows below


def ut_transform(A_kk: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``M = (I + A_kk)^{-1}`` per chunk: ``A_kk: [B, T, HV, C]`` -> ``M: [B, T, HV, C]`` float32."""
    B, T, HV, C = A_kk.shape
    BC = 16
    if C != chunk_size or chunk_size % BC != 0:
        raise ValueError(f"A_kk: expected last dimension chunk_size = {chunk_size} (a multiple of {BC}), got {C}")
    meta = seq_meta(B, T, chunk_size, cu_seqlens, A_kk.device)
    M = torch.empty(B, T, HV, C, dtype=torch.float32, device=A_kk.device)
    if meta.NC > 0:
        _ut_transform_kernel[(meta.NC, HV)](
            A_kk.contiguous().float(), M, meta.cu, meta.chunk_seq, meta.chunk_bos, HV=HV, BT=chunk_size, BC=BC,
            num_warps=UT_WARPS,
        )
    return M
