"""Stage 2 on the GPU: the intra-chunk matrices ``A_kk`` and ``A_qk`` (report Eq. 5 and Eq. 9).

Mirrors :func:`kda_explained.chunked.intra_chunk_matrices`. A chunk of ``BT``
tokens is cut into sub-chunks of ``BC = 16``; one program computes one
``[BC, BC]`` block ``(a, b)`` of both matrices for one chunk and value head:

- ``a > b`` (below the diagonal): one tensor-core product through the
  reference point ``G_ref = G`` at the last token of sub-chunk ``b``::

      A[a, b] = (k_a * exp(G_a - G_ref)) @ (k_b * exp(G_ref - G_b))^T

  Both exponents are ``<= 0`` because ``j <= ref <= r``, whatever the gate.
- ``a == b`` (the diagonal): the ratio ``exp(G_r - G_j)`` is exact, one column
  ``j`` at a time (``BC`` steps of ``[BC, K]`` work), masked *before* the
  ``exp`` so no exponent is ever positive.
- ``a < b``: zeros (both matrices are lower triangular), written by the
  diagonal program of the same rows, so the grid holds only the
  ``NS (NS + 1) / 2`` blocks on or below the diagonal.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import dot_precision, seq_meta

__all__ = ["intra_chunk_matrices"]


@triton.jit
def _intra_chunk_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    G,  # [TT, HV, K] float32, in-chunk cumulative log decay
    beta,  # [TT, HV]
    A_kk,  # [TT, HV, BT] float32 out
    A_qk,  # [TT, HV, BT] float32 out
    cu,
    chunk_seq,
    chunk_bos,
    # scalars
    scale,
    # sizes
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_ab, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    # the grid holds only the NS (NS + 1) / 2 blocks on or below the diagonal (NS <= 4):
    # i_ab = a (a + 1) / 2 + b  ->  row sub-chunk a, column sub-chunk b <= a
    i_a = (i_ab >= 1).to(tl.int32) + (i_ab >= 3).to(tl.int32) + (i_ab >= 6).to(tl.int32)
    i_b = i_ab - i_a * (i_a + 1) // 2
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)

    o_r = i_a * BC + tl.arange(0, BC)  # rows of this block (chunk-local)
    o_j = i_b * BC + tl.arange(0, BC)  # columns of this block (chunk-local)
    o_k = tl.arange(0, BK)
    m_r = bos + o_r < eos
    m_j = bos + o_j < eos
    m_k = o_k < K
    p_Akk = A_kk + ((bos + o_r[:, None]) * HV + i_hv) * BT + o_j[None, :]
    p_Aqk = A_qk + ((bos + o_r[:, None]) * HV + i_hv) * BT + o_j[None, :]
    m_store = m_r[:, None] & (o_j[None, :] < BT)

    # rows of the block: k_r, q_r, G_r                                     [BC, BK]
    m_rk = m_r[:, None] & m_k[None, :]
    b_kr = tl.load(k + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
    b_qr = tl.load(q + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
    b_Gr = tl.load(G + ((bos + o_r[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
    if i_a > i_b:
        # ---- below the diagonal: one product through G_ref = G[last token of sub-chunk b]
        m_jk = m_j[:, None] & m_k[None, :]
        b_kj = tl.load(k + ((bos + o_j[:, None]) * H + i_h) * K + o_k[None, :], mask=m_jk, other=0).to(tl.float32)
        b_Gj = tl.load(G + ((bos + o_j[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_jk, other=0)
        # sub-chunk b is full whenever a later row is real; if its last token is padding, so is every row here
        t_ref = bos + i_b * BC + BC - 1
        b_Gref = tl.load(G + (t_ref * HV + i_hv) * K + o_k, mask=m_k & (t_ref + 0 * o_k < eos), other=0)
        b_left = tl.exp(tl.where(m_rk, b_Gr - b_Gref[None, :], float("-inf")))  # exp(<= 0); padding -> 0
        b_right = b_kj * tl.exp(b_Gref[None, :] - b_Gj)  # exp(<= 0)
        b_Akk = tl.dot(b_kr * b_left, tl.trans(b_right), input_precision=PRECISION)
        b_Aqk = tl.dot(b_qr * b_left, tl.trans(b_right), input_precision=PRECISION)
    else:
        # ---- the diagonal block: exact ratios, one column j at a time
        b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
        b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
        o_c = tl.arange(0, BC)
        for jj in range(0, BC):
            j = i_b * BC + jj
            m_jk = m_k & (bos + j + 0 * o_k < eos)  # [BK]: column j is a real token
            b_kj = tl.load(k + ((bos + j) * H + i_h) * K + o_k, mask=m_jk, other=0).to(tl.float32)
            b_Gj = tl.load(G + ((bos + j) * HV + i_hv) * K + o_k, mask=m_jk, other=0)
            # exponent G_r - G_j only where r >= j (else -inf -> ratio 0)
            b_diff = tl.where(o_r[:, None] >= j, b_Gr - b_Gj[None, :], float("-inf"))
            b_ratio = tl.exp(b_diff) * b_kj[None, :]  # [BC, BK]
            b_col_kk = tl.sum(tl.where(o_r[:, None] > j, b_kr * b_ratio, 0.0), axis=1)  # [BC]: j < r
            b_col_qk = tl.sum(b_qr * b_ratio, axis=1)  # [BC]: j <= r
            b_Akk = tl.where(o_c[None, :] == jj, b_col_kk[:, None], b_Akk)
            b_Aqk = tl.where(o_c[None, :] == jj, b_col_qk[:, None], b_Aqk)
    b_beta = tl.load(beta + (bos + o_r) * HV + i_hv, mask=m_r, other=0).to(tl.float32)
    b_Akk = b_Akk * b_beta[:, None]  # Diag(beta) on the rows (Eq. 5)
    b_Aqk = b_Aqk * scale
    m_valid = m_r[:, None] & m_j[None, :]
    b_Akk = tl.where(m_valid, b_Akk, 0.0)
    b_Aqk = tl.where(m_valid, b_Aqk, 0.0)
    tl.store(p_Akk, b_Akk, mask=m_store)
    tl.store(p_Aqk, b_Aqk, mask=m_store)
    if i_a == i_b:
        # the diagonal program also writes the zeros right of it, so consumers can read whole rows
        for i_z in range(i_a + 1, BT // BC):
            o_z = i_z * BC + tl.arange(0, BC)
            p_z = ((bos + o_r[:, None]) * HV + i_hv) * BT + o_z[None, :]
            tl.store(A_kk + p_z, tl.zeros([BC, BC], dtype=tl.float32), mask=m_store)
            tl.store(A_qk + p_z, tl.zeros([BC, BC], dtype=tl.float32), mask=m_store)


def intra_chunk_matrices(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``A_kk, A_qk: [B, T, HV, C]`` float32 from ``q, k: [B, T, H, K]``, ``G: [B, T, HV, K]``, ``beta: [B, T, HV]``.

    ``A_kk[r, j] = beta_r sum_c k_rc k_jc exp(G_rc - G_jc)`` (``j < r``),
    ``A_qk[r, j] = scale sum_c q_rc k_jc exp(G_rc - G_jc)`` (``j <= r``), within each chunk.
    """
    B, T, H, K = q.shape
    HV = G.shape[2]
    BC = 16
    if chunk_size % BC != 0:
        raise ValueError(f"chunk_size: expected a multiple of {BC} for the fast layer, got {chunk_size}")
    meta = seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    A_kk = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=q.device)
    A_qk = torch.empty_like(A_kk)
    NS = chunk_size // BC
    if NS > 4:
        raise ValueError(f"chunk_size: expected at most {4 * BC} for the fast layer, got {chunk_size}")
    if meta.NC > 0:
        _intra_chunk_kernel[(meta.NC, NS * (NS + 1) // 2, HV)](
            q.contiguous(), k.contiguous(), G.contiguous(), beta.contiguous(), A_kk, A_qk,
            meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, BT=chunk_size, BC=BC, BK=max(16, triton.next_power_of_2(K)),
            PRECISION=dot_precision(q.dtype),
        )
    return A_kk, A_qk
