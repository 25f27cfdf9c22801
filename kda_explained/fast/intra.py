"""Stage 2 on the GPU: the intra-chunk matrices ``A_kk`` and ``A_qk`` (report Eq. 5 and Eq. 9).

Mirrors :func:`kda_explained.chunked.stages.intra_chunk_matrices`. A chunk of ``BT``
tokens is cut into sub-chunks of ``BC = 16``. Every ``[BC, BC]`` block ``(a, b)``
on or below the diagonal is one tensor-core product through a reference point
``G_ref`` (the decay ratio splits as ``exp(G_r - G_j) = exp(G_r - G_ref) exp(G_ref - G_j)``)::

    A[a, b] = (k_a * exp(G_a - G_ref)) @ (k_b * exp(G_ref - G_b))^T

- ``a > b`` (below the diagonal): ``G_ref = G`` at the last token of sub-chunk
  ``b``. Since ``j <= ref <= r`` both exponents are ``<= 0``, whatever the gate.
- ``a == b`` (the diagonal): ``G_ref = G`` at the middle token of the sub-chunk.
  Now one factor can have a *positive* exponent, up to the sub-chunk's decay
  span ``max |G_r - G_ref|``. While the span is at most ``SAFE_SPAN = 40``,
  every factor and every product of two factors stays below ``exp(80) ~ 5.5e34``,
  inside float32 (the products with ``j > r``, masked away afterwards, included),
  and the result is exact up to rounding: every gate with ``lower_bound >= -5``
  stays within it (8 tokens x 5 on either side of the middle).
  A sub-chunk with a larger span is flagged, and a second kernel,
  ``_intra_diag_exact_kernel``, recomputes just that diagonal block with the
  exact ratio, column by column, each exponent masked to ``-inf`` *before* the
  ``exp`` for ``j > r``. So no gate ever overflows, and typical gates never pay
  for the slow path (the second launch finds no flag and exits).
- ``a < b``: zeros (both matrices are lower triangular), written by the
  diagonal program of the same rows; the grid holds only the ``NS (NS + 1) / 2``
  blocks on or below the diagonal.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import dot_precision, seq_meta

__all__ = ["intra_chunk_matrices", "SAFE_SPAN"]

#: Largest in-sub-chunk decay span ``max |G_r - G_ref|`` the tensor-core diagonal takes.
SAFE_SPAN = 40.0


@triton.jit
def _intra_chunk_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    G,  # [TT, HV, K] float32, in-chunk cumulative log decay
    beta,  # [TT, HV]
    A_kk,  # [TT, HV, BT] float32 out
    A_qk,  # [TT, HV, BT] float32 out
    unsafe,  # [NC, HV, NS] int32 out: 1 where a diagonal block needs the exact kernel
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
    SPAN: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_ab, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NS: tl.constexpr = BT // BC
    # i_ab = a (a + 1) / 2 + b  ->  row sub-chunk a, column sub-chunk b <= a  (NS <= 4)
    i_a = (i_ab >= 1).to(tl.int32) + (i_ab >= 3).to(tl.int32) + (i_ab >= 6).to(tl.int32)
    i_b = i_ab - i_a * (i_a + 1) // 2
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)

    o_r = i_a * BC + tl.arange(0, BC)  # rows of this block (chunk-local)
    o_j = i_b * BC + tl.arange(0, BC)  # columns of this block (chunk-local)
    m_r = bos + o_r < eos
    m_j = bos + o_j < eos
    # the reference token: last of sub-chunk b below the diagonal, middle of the sub-chunk on it.
    # (If it is padding, every row of this block is padding too, and nothing real depends on it.)
    t_ref = tl.where(i_a > i_b, bos + i_b * BC + BC - 1, bos + i_a * BC + BC // 2)
    t_ref = tl.minimum(t_ref, eos - 1)

    b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
    b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
    b_span = tl.zeros([BC, BK], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        m_jk = m_j[:, None] & m_k[None, :]
        b_kr = tl.load(k + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
        b_qr = tl.load(q + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
        b_Gr = tl.load(G + ((bos + o_r[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
        b_kj = tl.load(k + ((bos + o_j[:, None]) * H + i_h) * K + o_k[None, :], mask=m_jk, other=0).to(tl.float32)
        b_Gj = tl.load(G + ((bos + o_j[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_jk, other=0)
        b_Gref = tl.load(G + (t_ref * HV + i_hv) * K + o_k, mask=m_k, other=0)
        # exponents: <= 0 below the diagonal; within +-SPAN on it (clamped, then flagged if larger)
        b_er = tl.where(m_rk, b_Gr - b_Gref[None, :], float("-inf"))
        b_ej = tl.where(m_jk, b_Gref[None, :] - b_Gj, float("-inf"))
        b_span = tl.maximum(b_span, tl.where(m_rk, tl.abs(b_Gr - b_Gref[None, :]), 0.0))
        b_left = tl.exp(tl.minimum(b_er, SPAN))  # [BC, BK]
        b_right = b_kj * tl.exp(tl.minimum(b_ej, SPAN))  # [BC, BK]
        b_Akk += tl.dot(b_kr * b_left, tl.trans(b_right), input_precision=PRECISION)
        b_Aqk += tl.dot(b_qr * b_left, tl.trans(b_right), input_precision=PRECISION)

    b_beta = tl.load(beta + (bos + o_r) * HV + i_hv, mask=m_r, other=0).to(tl.float32)
    m_valid = m_r[:, None] & m_j[None, :]
    m_kk = m_valid & (o_j[None, :] < o_r[:, None])  # j < r
    m_qk = m_valid & (o_j[None, :] <= o_r[:, None])  # j <= r
    b_Akk = tl.where(m_kk, b_Akk * b_beta[:, None], 0.0)  # Diag(beta) on the rows (Eq. 5)
    b_Aqk = tl.where(m_qk, b_Aqk * scale, 0.0)
    m_store = m_r[:, None] & (o_j[None, :] < BT)
    p_A = ((bos + o_r[:, None]) * HV + i_hv) * BT + o_j[None, :]
    tl.store(A_kk + p_A, b_Akk, mask=m_store)
    tl.store(A_qk + p_A, b_Aqk, mask=m_store)
    if i_a == i_b:
        # flag a diagonal block whose span the tensor-core form cannot take
        is_unsafe = (tl.max(tl.max(b_span, axis=1), axis=0) > SPAN).to(tl.int32)
        tl.store(unsafe + (i_c * HV + i_hv) * NS + i_a, is_unsafe)
        # the zeros right of the diagonal, so consumers can read whole rows
        for i_z in range(i_a + 1, NS):
            p_z = ((bos + o_r[:, None]) * HV + i_hv) * BT + i_z * BC + tl.arange(0, BC)[None, :]
            tl.store(A_kk + p_z, tl.zeros([BC, BC], dtype=tl.float32), mask=m_store)
            tl.store(A_qk + p_z, tl.zeros([BC, BC], dtype=tl.float32), mask=m_store)


@triton.jit
def _intra_diag_exact_kernel(
    # pointers
    q,
    k,
    G,
    beta,
    A_kk,
    A_qk,
    unsafe,  # [NC, HV, NS] int32: which diagonal blocks to redo
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
):
    i_c, i_a, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NS: tl.constexpr = BT // BC
    if tl.load(unsafe + (i_c * HV + i_hv) * NS + i_a) != 0:
        i_h = i_hv // (HV // H)
        i_n = tl.load(chunk_seq + i_c)
        bos = tl.load(chunk_bos + i_c).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
        o_r = i_a * BC + tl.arange(0, BC)
        o_c = tl.arange(0, BC)
        o_k = tl.arange(0, BK)
        m_r = bos + o_r < eos
        m_k = o_k < K
        m_rk = m_r[:, None] & m_k[None, :]
        b_kr = tl.load(k + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
        b_qr = tl.load(q + ((bos + o_r[:, None]) * H + i_h) * K + o_k[None, :], mask=m_rk, other=0).to(tl.float32)
        b_Gr = tl.load(G + ((bos + o_r[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_rk, other=0)
        b_Akk = tl.zeros([BC, BC], dtype=tl.float32)
        b_Aqk = tl.zeros([BC, BC], dtype=tl.float32)
        for jj in range(0, BC):
            j = i_a * BC + jj
            m_jk = m_k & (bos + j + 0 * o_k < eos)  # [BK]: column j is a real token
            b_kj = tl.load(k + ((bos + j) * H + i_h) * K + o_k, mask=m_jk, other=0).to(tl.float32)
            b_Gj = tl.load(G + ((bos + j) * HV + i_hv) * K + o_k, mask=m_jk, other=0)
            # exponent G_r - G_j only where r >= j (else -inf -> ratio 0): never positive
            m_rj = m_rk & (o_r[:, None] >= j)  # real rows at or below column j
            b_ratio = tl.exp(tl.where(m_rj, b_Gr - b_Gj[None, :], float("-inf"))) * b_kj[None, :]
            b_col_kk = tl.sum(tl.where(o_r[:, None] > j, b_kr * b_ratio, 0.0), axis=1)  # [BC]: j < r
            b_col_qk = tl.sum(b_qr * b_ratio, axis=1)  # [BC]: j <= r
            b_Akk = tl.where(o_c[None, :] == jj, b_col_kk[:, None], b_Akk)
            b_Aqk = tl.where(o_c[None, :] == jj, b_col_qk[:, None], b_Aqk)
        b_beta = tl.load(beta + (bos + o_r) * HV + i_hv, mask=m_r, other=0).to(tl.float32)
        m_valid = m_r[:, None] & (bos + i_a * BC + o_c[None, :] < eos)
        p_A = ((bos + o_r[:, None]) * HV + i_hv) * BT + i_a * BC + o_c[None, :]
        tl.store(A_kk + p_A, tl.where(m_valid, b_Akk * b_beta[:, None], 0.0), mask=m_r[:, None])
        tl.store(A_qk + p_A, tl.where(m_valid, b_Aqk * scale, 0.0), mask=m_r[:, None])


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
    NS = chunk_size // BC
    if NS > 4:
        raise ValueError(f"chunk_size: expected at most {4 * BC} for the fast layer, got {chunk_size}")
    meta = seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    A_kk = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=q.device)
    A_qk = torch.empty_like(A_kk)
    unsafe = torch.empty(max(meta.NC, 1), HV, NS, dtype=torch.int32, device=q.device)
    if meta.NC > 0:
        q, k, G, beta = q.contiguous(), k.contiguous(), G.contiguous(), beta.contiguous()
        common = (q, k, G, beta, A_kk, A_qk, unsafe, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale))
        _intra_chunk_kernel[(meta.NC, NS * (NS + 1) // 2, HV)](
            *common, H=H, HV=HV, K=K, BT=chunk_size, BC=BC, BK=min(64, max(16, triton.next_power_of_2(K))),
            SPAN=SAFE_SPAN, PRECISION=dot_precision(q.dtype),
        )
        _intra_diag_exact_kernel[(meta.NC, NS, HV)](
            *common, H=H, HV=HV, K=K, BT=chunk_size, BC=BC, BK=max(16, triton.next_power_of_2(K)),
        )
    return A_kk, A_qk
