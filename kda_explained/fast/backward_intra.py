"""The intra-chunk matrices' backward on tensor cores (stage 2's backward, report Eq. 5-6).

The mirror of :func:`kda_explained.chunked.backward_intra.intra_chunk_matrices_bwd`, with
the signature and returns of the exact kernel in :mod:`kda_explained.fast.backward`
(which walks the chunk one column at a time). The forward made, per chunk and value
head, two lower-triangular ``[C, C]`` matrices::

    A_kk[r, j] = beta_r  sum_c k_rc k_jc exp(G_rc - G_jc)      j <  r
    A_qk[r, j] = scale   sum_c q_rc k_jc exp(G_rc - G_jc)      j <= r

and this kernel sends ``dA_kk, dA_qk`` back to ``q, k, G, beta``.

Glossary
--------
================  ===============================================================
``r, j``          row token, column token of one chunk (``j <= r``)
``R[r, j, c]``    the decay ratio ``exp(G_rc - G_jc)``, ``<= 1`` for ``j <= r``
``D_kk, D_qk``    the gradients reaching the un-weighted products: ``beta_r dA_kk[r, j]``
                  (strictly lower) and ``scale dA_qk[r, j]`` (lower, with the diagonal)
``X``             ``X_r = sum_j dA_kk[r, j] k_j R``: the key's row term before ``beta_r``
``BT``            chunk length (16, 32 or 64); ``BC = 16`` tokens per sub-chunk, ``NS = BT / BC``
``I, J``          sub-chunk indices, row block and column block (``J <= I``)
``G_first``       ``G`` at the first token of a sub-chunk (the row terms' reference)
``G_last``        ``G`` at the last real token of a sub-chunk (the column terms' reference)
``span``          ``G_first - G_last``: a sub-chunk's decay, the largest in this ``K`` tile
================  ===============================================================

**The gradients.** Every entry of ``A`` is a sum over channels ``c`` of a product of a
row factor (``k_r`` or ``q_r``), a column factor ``k_j`` and the ratio ``R``, so each
token receives gradient as a *row* (through its ``q_r, k_r``) and as a *column*
(through its ``k_j``)::

    dq_r     = sum_j D_qk[r, j] k_j R[r, j]                     (row of A_qk)
    X_r      = sum_j dA_kk[r, j] k_j R[r, j]                    (row of A_kk, before beta)
    dk_col_j = sum_r (D_kk[r, j] k_r + D_qk[r, j] q_r) R[r, j]  (column of both)
    dk       = beta X + dk_col          dbeta_r = sum_c k_rc X_rc

``G_r`` enters ``R`` as ``+G_r`` in its row and as ``-G_r`` in its column, and the
derivative of ``exp`` is itself, so ``dG`` needs nothing new (elementwise)::

    dG = q * dq + k * (beta X) - k * dk_col

**On tensor cores.** ``R`` is not a matrix product: it depends on the channel. But it
factors through any reference token ``t``: ``R[r, j] = exp(G_r - G_t) exp(G_t - G_j)``,
a row scaling times a column scaling, so for a block of rows ``I`` and columns ``J``::

    dq_I     = exp(G_I - G_first) * (D_qk[I, J] @ (k_J exp(G_first - G_J)))
    dk_col_J = exp(G_last - G_J)  * (D_qk[I, J]^T @ (q_I exp(G_I - G_last))
                                     + D_kk[I, J]^T @ (k_I exp(G_I - G_last)))

with ``G_first`` of row block ``I`` and ``G_last`` of column block ``J``: ``16 x 16`` by
``16 x BK`` products. Below the diagonal (``I > J``) every exponent is ``<= 0`` (``G`` never
grows along the chunk), so no factor exceeds 1 and the product is exact (when a factor
underflows, so does the true ratio). On a diagonal block (``I = J``) the inner factor
exceeds 1 by up to the sub-chunk's ``span``; the kernel clamps its exponent at
``SAFE_SPAN = 80`` (``exp(80) ~ 5.5e34``, float32 holds ``3.4e38``), as the forward
(:mod:`kda_explained.fast.local`) does, which is exact while ``span <= SAFE_SPAN``: every
gate with ``lower_bound >= -5`` (15 steps of 5). A sub-chunk with a larger span takes
the exact form on its diagonal block instead, one column at a time, with every exponent
masked to ``-inf`` *before* the ``exp`` where ``j > r`` (``_diag_exact``). The clamps
also keep the padding (rows past the sequence's end, loaded as ``G = 0``) finite, so
no ``inf * 0 = NaN`` appears on either path.

**The layout.** One program per (chunk, ``K`` tile, value head); it loops over the
sub-chunks ``B`` and finishes each one before the next: ``B``'s row terms take the
column blocks ``J <= B`` (its row of blocks), its column terms the row blocks ``I >= B``
(its column of blocks). The operand blocks are read again from global memory, where
the previous sub-chunk left them in the L2 cache, so only three ``[BC, BK]``
accumulators live in registers.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, seq_meta
from .backward import _chunk_span
from .backward import intra_chunk_matrices_bwd as by_columns
from .local import SAFE_SPAN

__all__ = ["intra_chunk_matrices_bwd", "INTRA_BWD_LAUNCH"]

#: Launch shape ``(BK, num_warps, num_stages)``: ``K`` tiles of 64 (two tiles at ``K = 128``: the
#: ``dA`` rows, read once per tile, cost half of what tiles of 32 would), 4 warps (a ``[16, 64]``
#: accumulator is 8 registers a thread, three of them plus the operand blocks fit without spills),
#: one stage (the loops are unrolled: nothing to pipeline). Compiled for sm_90 (see the report).
INTRA_BWD_LAUNCH = (64, 4, 1)


@triton.jit
def _block(x, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """``[BC, BX]`` float32: tokens ``t0 ..`` (rows ``stride_t`` apart), columns ``c0 ..``; zeros outside."""
    o_t = t0 + tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos)[:, None] & (o_c < NCOL)[None, :]
    return tl.load(x + o_t[:, None] * stride_t + o_c[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _store(x, b, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    o_t = t0 + tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos)[:, None] & (o_c < NCOL)[None, :]
    tl.store(x + o_t[:, None] * stride_t + o_c[None, :], b, mask=m)


@triton.jit
def _dA_block(dA_h, ti, tj, eos, SA, cj, BC: tl.constexpr, DIAG: tl.constexpr, STRICT: tl.constexpr):
    """Block (rows ``ti ..``, columns ``tj ..``) of a ``dA``, float32; zero for padding and,
    on a diagonal block, above the diagonal (``STRICT``: on it too), the entries the forward never made.

    ``cj`` is the column block's offset inside the chunk's row of ``dA``.
    """
    o_i = tl.arange(0, BC)
    m = ((ti + o_i) < eos)[:, None] & ((tj + o_i) < eos)[None, :]
    if DIAG:
        if STRICT:
            m = m & (o_i[None, :] < o_i[:, None])
        else:
            m = m & (o_i[None, :] <= o_i[:, None])
    return tl.load(dA_h + (ti + o_i)[:, None] * SA + cj + o_i[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _diag_exact(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, k_h, G_h, tb, eos, SK, SG, o_k,
                K: tl.constexpr, BC: tl.constexpr):
    """Add the diagonal block's terms to the three accumulators exactly, one column ``jj`` at a time.

    ``ratio[r, c] = exp(G_rc - G_jc)`` with the exponent set to ``-inf`` where ``r < jj`` (or
    either token is padding) before the ``exp``: never positive, whatever the gate.
    """
    o_i = tl.arange(0, BC)
    m_r = (tb + o_i) < eos
    for jj in range(0, BC):
        m_j = (o_k < K) & (tb + jj + 0 * o_k < eos)  # [BK]: column jj is a real token
        b_kj = tl.load(k_h + (tb + jj) * SK + o_k, mask=m_j, other=0).to(tl.float32)  # [BK]
        b_Gj = tl.load(G_h + (tb + jj) * SG + o_k, mask=m_j, other=0)
        m_rj = (m_r & (o_i >= jj))[:, None] & m_j[None, :]
        b_ratio = tl.exp(tl.where(m_rj, b_G - b_Gj[None, :], float("-inf")))  # [BC, BK]
        on_j = o_i[None, :] == jj
        c_qk = tl.sum(tl.where(on_j, b_Dqk, 0.0), axis=1)[:, None]  # [BC, 1]: column jj of D_qk
        c_akk = tl.sum(tl.where(on_j, b_dAkk, 0.0), axis=1)[:, None]
        c_kk = tl.sum(tl.where(on_j, b_Dkk, 0.0), axis=1)[:, None]
        b_kr = b_kj[None, :] * b_ratio
        b_dq += c_qk * b_kr  # row terms: k_j on the right of rows r >= jj
        b_x += c_akk * b_kr
        b_right = tl.sum((c_kk * b_k + c_qk * b_q) * b_ratio, axis=0)  # [BK]: column term of token jj
        b_col += tl.where(o_i[:, None] == jj, b_right[None, :], 0.0)
    return b_dq, b_x, b_col


@triton.jit
def _intra_bwd_tc_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    G,  # [TT, HV, K] float32, in-chunk cumulative log decay
    beta,  # [TT, HV]
    dA_kk,  # [TT, HV, BT]
    dA_qk,  # [TT, HV, BT]
    dq,  # [TT, HV, K] float32 out, per value head
    dk,  # [TT, HV, K] float32 out, per value head
    dG,  # [TT, HV, K] float32 out
    dbeta,  # [NK, TT, HV] float32 out: one partial sum per K tile
    cu,
    chunk_seq,
    chunk_bos,
    # scalars
    scale,
    # sizes
    TT,
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
    NK: tl.constexpr = (K + BK - 1) // BK
    NS: tl.constexpr = BT // BC
    i_ck, i_hv = tl.program_id(0), tl.program_id(1)
    i_c, i_k = i_ck // NK, i_ck % NK  # the K tiles of one chunk run side by side: they share its dA in L2
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    c0 = i_k * BK
    o_i = tl.arange(0, BC)
    o_k = c0 + tl.arange(0, BK)
    m_k = o_k < K
    # each tensor seen from this head: token rows `stride` apart
    q_h, k_h, SK = q + i_h * K, k + i_h * K, H * K
    G_h, SG = G + i_hv * K, HV * K
    Akk_h, Aqk_h, SA = dA_kk + i_hv * BT, dA_qk + i_hv * BT, HV * BT

    for i_b in tl.static_range(NS):  # sub-chunk B: its row of blocks, then its column of blocks
        tb = bos + i_b * BC
        if tb < eos:  # a sub-chunk of padding only has nothing to do
            b_q = _block(q_h, tb, eos, SK, c0, K, BC, BK)
            b_k = _block(k_h, tb, eos, SK, c0, K, BC, BK)
            b_G = _block(G_h, tb, eos, SG, c0, K, BC, BK)
            b_beta = tl.load(beta + (tb + o_i) * HV + i_hv, mask=tb + o_i < eos, other=0).to(tl.float32)
            t_last = tl.minimum(tb + BC, eos) - 1
            G_first = tl.load(G_h + tb * SG + o_k, mask=m_k, other=0)[None, :]  # [1, BK]
            G_last = tl.load(G_h + t_last * SG + o_k, mask=m_k, other=0)[None, :]
            span = tl.max(tl.max(G_first - G_last, axis=1), axis=0)  # this K tile's decay across B

            # ==== row terms: dq_B, X_B = sum_{J < B} dA[B, J] (k_J exp(G_first - G_J)), exponents <= 0
            b_dq = tl.zeros([BC, BK], dtype=tl.float32)
            b_x = tl.zeros([BC, BK], dtype=tl.float32)
            for j_b in tl.static_range(i_b):
                tj = bos + j_b * BC
                b_kd = _block(k_h, tj, eos, SK, c0, K, BC, BK) * tl.exp(
                    tl.minimum(G_first - _block(G_h, tj, eos, SG, c0, K, BC, BK), 0.0))
                b_Dqk = _dA_block(Aqk_h, tb, tj, eos, SA, j_b * BC, BC, False, False) * scale
                b_dAkk = _dA_block(Akk_h, tb, tj, eos, SA, j_b * BC, BC, False, True)
                b_dq = tl.dot(b_Dqk, b_kd, b_dq, input_precision=PRECISION)
                b_x = tl.dot(b_dAkk, b_kd, b_x, input_precision=PRECISION)

            # ==== column terms: sum_{I > B} dA[I, B]^T ((q or k)_I exp(G_I - G_last)), exponents <= 0
            b_col = tl.zeros([BC, BK], dtype=tl.float32)
            for i_i in tl.static_range(i_b + 1, NS):
                ti = bos + i_i * BC
                b_e = tl.exp(tl.minimum(_block(G_h, ti, eos, SG, c0, K, BC, BK) - G_last, 0.0))
                b_qe = _block(q_h, ti, eos, SK, c0, K, BC, BK) * b_e
                b_ke = _block(k_h, ti, eos, SK, c0, K, BC, BK) * b_e
                w_i = tl.load(beta + (ti + o_i) * HV + i_hv, mask=ti + o_i < eos, other=0).to(tl.float32)
                b_Dqk = _dA_block(Aqk_h, ti, tb, eos, SA, i_b * BC, BC, False, False) * scale
                b_Dkk = _dA_block(Akk_h, ti, tb, eos, SA, i_b * BC, BC, False, True) * w_i[:, None]
                b_col = tl.dot(tl.trans(b_Dqk), b_qe, b_col, input_precision=PRECISION)
                b_col = tl.dot(tl.trans(b_Dkk), b_ke, b_col, input_precision=PRECISION)

            # ==== the diagonal block (B, B): the one place where an inner factor exceeds 1
            b_Dqk = _dA_block(Aqk_h, tb, tb, eos, SA, i_b * BC, BC, True, False) * scale
            b_dAkk = _dA_block(Akk_h, tb, tb, eos, SA, i_b * BC, BC, True, True)
            b_Dkk = b_dAkk * b_beta[:, None]
            row_scale = tl.exp(tl.minimum(b_G - G_first, 0.0))  # outer factors, <= 1
            col_scale = tl.exp(tl.minimum(G_last - b_G, 0.0))
            if span > SPAN:
                # too strong a gate for the split: the off-diagonal sums scaled, then the diagonal exactly
                b_dq, b_x, b_col = _diag_exact(b_dq * row_scale, b_x * row_scale, b_col * col_scale, b_q, b_k, b_G,
                                               b_Dqk, b_dAkk, b_Dkk, k_h, G_h, tb, eos, SK, SG, o_k, K, BC)
            else:
                # inner factors <= exp(span) <= exp(SPAN): the clamp only bites on padding, which meets zeros
                b_kdd = b_k * tl.exp(tl.minimum(G_first - b_G, SPAN))
                b_dq = tl.dot(b_Dqk, b_kdd, b_dq, input_precision=PRECISION) * row_scale
                b_x = tl.dot(b_dAkk, b_kdd, b_x, input_precision=PRECISION) * row_scale
                b_ed = tl.exp(tl.minimum(b_G - G_last, SPAN))
                b_col = tl.dot(tl.trans(b_Dqk), b_q * b_ed, b_col, input_precision=PRECISION)
                b_col = tl.dot(tl.trans(b_Dkk), b_k * b_ed, b_col, input_precision=PRECISION) * col_scale

            # ==== sub-chunk B's gradients
            b_krow = b_beta[:, None] * b_x  # dk's row term (A_kk = Diag(beta) P_kk)
            _store(dq + i_hv * K, b_dq, tb, eos, SG, c0, K, BC, BK)
            _store(dk + i_hv * K, b_krow + b_col, tb, eos, SG, c0, K, BC, BK)
            _store(dG + i_hv * K, b_q * b_dq + b_k * b_krow - b_k * b_col, tb, eos, SG, c0, K, BC, BK)
            tl.store(dbeta + i_k * TT * HV + (tb + o_i) * HV + i_hv, tl.sum(b_k * b_x, axis=1),
                     mask=tb + o_i < eos)


def intra_chunk_matrices_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dA_kk: torch.Tensor,
    dA_qk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    meta: Optional[SeqMeta] = None,
):
    """``(dq [B, T, H, K], dk [B, T, H, K], dG [B, T, HV, K], dbeta [B, T, HV])``, float32; as
    :func:`kda_explained.chunked.backward_intra.intra_chunk_matrices_bwd` (entries of ``dA_kk``
    on or above the diagonal, and of ``dA_qk`` above it, are ignored).

    Args:
        q, k: ``[B, T, H, K]``; G: ``[B, T, HV, K]`` float32 in-chunk cumulative log decay;
            beta: ``[B, T, HV]``; dA_kk, dA_qk: ``[B, T, HV, C]`` (``C = chunk_size``: 16, 32 or 64).

    Checked against the chunked layer, and against the exact kernel of
    :mod:`kda_explained.fast.backward`, in ``tests/test_fast_backward_intra.py``.
    """
    B, T, H, K = q.shape
    HV = G.shape[2]
    BC = 16
    if chunk_size % BC != 0:  # too short for a 16 x 16 tensor-core block: the column-by-column kernel
        return by_columns(q, k, G, beta, scale, dA_kk, dA_qk, chunk_size, cu_seqlens, meta=meta)
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    BK_MAX, warps, stages = INTRA_BWD_LAUNCH
    BK = min(BK_MAX, max(16, triton.next_power_of_2(K)))
    NK = triton.cdiv(K, BK)
    # every token lies in one chunk, whose program writes all its rows: no zero fill needed
    f32 = dict(dtype=torch.float32, device=q.device)
    dq, dk, dG = (torch.empty(B, T, HV, K, **f32) for _ in range(3))
    dbeta = torch.empty(NK, B, T, HV, **f32)
    if meta.NC > 0:
        _intra_bwd_tc_kernel[(meta.NC * NK, HV)](
            q.contiguous(), k.contiguous(), G.contiguous(), beta.contiguous(), dA_kk.contiguous(), dA_qk.contiguous(),
            dq, dk, dG, dbeta, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale), B * T,
            H=H, HV=HV, K=K, BT=chunk_size, BC=BC, BK=BK, SPAN=SAFE_SPAN, PRECISION=dot_precision(q.dtype),
            num_warps=warps, num_stages=stages,
        )
    if HV != H:  # GVA: the value heads of a group share one q/k head
        dq = dq.view(B, T, H, HV // H, K).sum(3)
        dk = dk.view(B, T, H, HV // H, K).sum(3)
    return dq, dk, dG, dbeta.sum(0) if NK > 1 else dbeta[0]
