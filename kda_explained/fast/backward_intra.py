"""The intra-chunk matrices' backward as block products (stage 2's backward, report Eq. 5-6).

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
``BT``            chunk length (16, 32, 64 or 128); ``BC = 16`` tokens per sub-chunk, ``NS = BT / BC``
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

**As block products.** ``R`` is not a matrix product: it depends on the channel. But it
factors through any reference token ``t``: ``R[r, j] = exp(G_r - G_t) exp(G_t - G_j)``,
a row scaling times a column scaling, so for a block of rows ``I`` and columns ``J``::

    dq_I     = exp(G_I - G_first) * (D_qk[I, J] @ (k_J exp(G_first - G_J)))
    dk_col_J = exp(G_last - G_J)  * (D_qk[I, J]^T @ (q_I exp(G_I - G_last))
                                     + D_kk[I, J]^T @ (k_I exp(G_I - G_last)))

with ``G_first`` of row block ``I`` and ``G_last`` of column block ``J``: ``16 x 16`` by
``16 x BK`` products (``tl.dot``; in full float32 for every input dtype, the
:class:`~kda_explained.fast.config.BackwardConfig`'s ``intra_precision``: the kernel
page says why). Below the diagonal (``I > J``) every exponent is ``<= 0`` (``G`` never
grows along the chunk), so no factor exceeds 1 and the product is exact (when a factor
underflows, so does the true ratio). On a diagonal block (``I = J``) the inner factor
exceeds 1 by up to the sub-chunk's ``span``; the kernel clamps its exponent at
:data:`~kda_explained.fast.config.SAFE_SPAN` ``= 80`` (``exp(80) ~ 5.5e34``, float32 holds
``3.4e38``), as the forward
(:mod:`kda_explained.fast.local`) does, which is exact while ``span <= SAFE_SPAN``: every
gate with ``lower_bound >= -5`` (15 steps of 5). A sub-chunk with a larger span takes
the exact form on its diagonal block instead, one column at a time, with every exponent
masked to ``-inf`` *before* the ``exp`` where ``j > r`` (``_diag_exact``). The clamps
also keep the padding (rows past the sequence's end, loaded as ``G = 0``) finite, so
no ``inf * 0 = NaN`` appears on either path.

**Two launches**, as in the forward: the first runs every program with block-product
diagonals and flags the programs (chunk, ``K`` tile, value head) where some sub-chunk's
span passes ``SAFE_SPAN``; the second (``EXACT_DIAG``) runs the flagged ones again, with
those sub-chunks' diagonal blocks exact, and overwrites their outputs. Every other
program of the second launch reads its flag and exits, so typical gates pay one cheap
launch; and the first launch's code holds no column-by-column form, whose registers it
would otherwise have to reserve (211 a thread instead of 148 on sm_90).

**The layout.** One program per (chunk, ``K`` tile, value head); it loops over the
sub-chunks ``B`` and finishes each one before the next: ``B``'s row terms take the
column blocks ``J < B`` (its row of blocks), its column terms the row blocks ``I > B``
(its column of blocks), then the diagonal block ``(B, B)`` serves both. The operand
blocks are read again from global memory, where the previous sub-chunk left them in
the L2 cache, so only three ``[BC, BK]`` accumulators live in registers. The loops
over blocks are run-time loops: unrolled, the compiler hoists every block's loads
to the top and the registers run out.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._grad import accumulator as _accumulator, chunk_span as _chunk_span, per_key_head
from ._meta import SeqMeta, dot_precision, interpreting, seq_meta, tile
from .config import BackwardConfig, plan_for

__all__ = ["intra_chunk_matrices_bwd"]

@triton.jit
def _block(x, t0, eos, stride_t: tl.constexpr, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """``[BC, BX]`` float32: tokens ``t0 ..`` (rows ``stride_t`` apart), columns ``c0 ..``; zeros outside.

    A scalar base pointer plus small int32 offsets: the offsets stay the same from block to
    block, so the compiler keeps one copy instead of a 64-bit pointer per element and block.
    """
    o_t = tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos - t0)[:, None] & (o_c < NCOL)[None, :]
    return tl.load(x + t0 * stride_t + (o_t[:, None] * stride_t + o_c[None, :]), mask=m, other=0).to(tl.float32)


@triton.jit
def _store(x, b, t0, eos, stride_t: tl.constexpr, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    o_t = tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos - t0)[:, None] & (o_c < NCOL)[None, :]
    tl.store(x + t0 * stride_t + (o_t[:, None] * stride_t + o_c[None, :]), b.to(x.dtype.element_ty), mask=m)


@triton.jit
def _dA_block(dA_h, ti, tj, eos, SA: tl.constexpr, cj, BC: tl.constexpr, DIAG: tl.constexpr, STRICT: tl.constexpr):
    """Block (rows ``ti ..``, columns ``tj ..``) of a ``dA``, float32; zero for padding and,
    on a diagonal block, above the diagonal (``STRICT``: on it too), the entries the forward never made.

    ``cj`` is the column block's offset inside the chunk's row of ``dA``.
    """
    o_i = tl.arange(0, BC)
    m = (o_i < eos - ti)[:, None] & (o_i < eos - tj)[None, :]
    if DIAG:
        if STRICT:
            m = m & (o_i[None, :] < o_i[:, None])
        else:
            m = m & (o_i[None, :] <= o_i[:, None])
    return tl.load(dA_h + ti * SA + cj + (o_i[:, None] * SA + o_i[None, :]), mask=m, other=0).to(tl.float32)


@triton.jit
def _diag_split(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, G_first, G_last, SPAN: tl.constexpr,
                PRECISION: tl.constexpr):
    """Add the diagonal block's terms to the three accumulators as block products and scale them.

    The accumulators hold the off-diagonal sums before their outer factors; the diagonal's
    inner factors reach ``exp(span)``, exact while ``span <= SPAN``. The clamp at ``SPAN``
    then only bites on padding rows (``G = 0`` there), whose ``q, k`` and ``dA`` are zero.
    (Where a span passes ``SPAN`` the first launch's values are wrong, and the second
    launch overwrites them.)
    """
    row_scale = tl.exp(tl.minimum(b_G - G_first, 0.0))  # outer factors, <= 1
    col_scale = tl.exp(tl.minimum(G_last - b_G, 0.0))
    b_kd = b_k * tl.exp(tl.minimum(G_first - b_G, SPAN))
    b_dq = tl.dot(b_Dqk, b_kd, b_dq, input_precision=PRECISION) * row_scale
    b_x = tl.dot(b_dAkk, b_kd, b_x, input_precision=PRECISION) * row_scale
    b_e = tl.exp(tl.minimum(b_G - G_last, SPAN))
    b_col = tl.dot(tl.trans(b_Dqk), b_q * b_e, b_col, input_precision=PRECISION)
    b_col = tl.dot(tl.trans(b_Dkk), b_k * b_e, b_col, input_precision=PRECISION) * col_scale
    return b_dq, b_x, b_col


@triton.jit
def _diag_exact(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, G_first, G_last, k_h, G_h, tb, eos,
                SK: tl.constexpr, SG: tl.constexpr, o_k, K: tl.constexpr, BC: tl.constexpr):
    """Scale the three accumulators, then add the diagonal block's terms exactly, one column ``jj`` at a time.

    ``ratio[r, c] = exp(G_rc - G_jc)`` with the exponent set to ``-inf`` where ``r < jj`` (or
    either token is padding) before the ``exp``: never positive, whatever the gate.
    """
    b_dq *= tl.exp(tl.minimum(b_G - G_first, 0.0))  # the off-diagonal sums' outer factors, <= 1
    b_x *= tl.exp(tl.minimum(b_G - G_first, 0.0))
    b_col *= tl.exp(tl.minimum(G_last - b_G, 0.0))
    o_i = tl.arange(0, BC)
    m_r = (tb + o_i) < eos
    for jj in range(0, tl.minimum(BC, eos - tb)):  # the real columns (a bound known at run time: kept rolled)
        m_j = o_k < K
        b_kj = tl.load(k_h + (tb + jj) * SK + o_k, mask=m_j, other=0).to(tl.float32)  # [BK]
        b_Gj = tl.load(G_h + (tb + jj) * SG + o_k, mask=m_j, other=0)
        m_rj = (m_r & (o_i >= jj))[:, None] & m_j[None, :]  # r >= jj, both real
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
    dq,  # [TT, HV, K] float32 out, per value head (with ACC: also in, the sum so far)
    dk,  # [TT, HV, K] float32 out, per value head (likewise)
    dq_out,  # [TT, HV, K] where dq is written: dq itself, or a tensor of the gradient's dtype
    dk_out,  # [TT, HV, K] likewise for dk
    dG,  # [TT, HV, K] float32 out
    dbeta,  # [NK, TT, HV] float32 out: one partial sum per K tile
    flags,  # [NC * NK, HV] int32: 1 where a sub-chunk's span passes SPAN (first launch writes, EXACT_DIAG reads)
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
    EXACT_DIAG: tl.constexpr,  # the second launch: the flagged programs again, strong sub-chunks exactly
    ACC: tl.constexpr,  # add dq, dk, dG into what the tensors hold
):
    NK: tl.constexpr = (K + BK - 1) // BK
    NS: tl.constexpr = BT // BC
    i_ck, i_hv = tl.program_id(0), tl.program_id(1)
    i_c, i_k = i_ck // NK, i_ck % NK  # the K tiles of one chunk run side by side: they share its dA in L2
    if EXACT_DIAG:
        if tl.load(flags + i_ck * HV + i_hv) == 0:
            return  # the first launch's block-product diagonal was exact
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    c0 = i_k * BK
    o_i = tl.arange(0, BC)
    o_k = c0 + tl.arange(0, BK)
    m_k = o_k < K
    # each tensor seen from this head: token rows `stride` apart
    SK: tl.constexpr = H * K
    SG: tl.constexpr = HV * K
    SA: tl.constexpr = HV * BT
    q_h, k_h = q + i_h * K, k + i_h * K
    G_h, Akk_h, Aqk_h = G + i_hv * K, dA_kk + i_hv * BT, dA_qk + i_hv * BT

    NR = tl.minimum(NS, tl.cdiv(eos - bos, BC))  # sub-chunks holding real tokens (a ragged chunk has fewer)
    if not EXACT_DIAG:
        # flag this program for the second launch if any sub-chunk's span (G_first - G_last) passes SPAN
        o_s = tl.arange(0, NS)
        m_s = (o_s < NR)[:, None] & m_k[None, :]
        t_s = bos + o_s * BC
        G_s = tl.load(G_h + t_s[:, None] * SG + o_k[None, :], mask=m_s, other=0)
        G_e = tl.load(G_h + (tl.minimum(t_s + BC, eos) - 1)[:, None] * SG + o_k[None, :], mask=m_s, other=0)
        flagged = tl.max(tl.max(G_s - G_e, axis=1), axis=0) > SPAN
        tl.store(flags + i_ck * HV + i_hv, flagged.to(tl.int32))
        if flagged:
            return  # the second launch computes (and writes) this program's gradients
    # runtime loops, not unrolled ones: an unrolled chunk hoists every block's loads and spills
    for i_b in range(0, NR):  # sub-chunk B: its row of blocks, then its column of blocks
        tb = bos + i_b * BC
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
        for j_b in range(0, i_b):
            tj = bos + j_b * BC
            b_kd = _block(k_h, tj, eos, SK, c0, K, BC, BK) * tl.exp(
                tl.minimum(G_first - _block(G_h, tj, eos, SG, c0, K, BC, BK), 0.0))
            b_Dqk = _dA_block(Aqk_h, tb, tj, eos, SA, j_b * BC, BC, False, False) * scale
            b_dAkk = _dA_block(Akk_h, tb, tj, eos, SA, j_b * BC, BC, False, True)
            b_dq = tl.dot(b_Dqk, b_kd, b_dq, input_precision=PRECISION)
            b_x = tl.dot(b_dAkk, b_kd, b_x, input_precision=PRECISION)

        # ==== column terms: sum_{I > B} dA[I, B]^T ((q or k)_I exp(G_I - G_last)), exponents <= 0
        b_col = tl.zeros([BC, BK], dtype=tl.float32)
        for i_i in range(i_b + 1, NR):
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
        if EXACT_DIAG:
            if span > SPAN:  # too strong a gate for the split
                b_dq, b_x, b_col = _diag_exact(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, G_first, G_last,
                                               k_h, G_h, tb, eos, SK, SG, o_k, K, BC)
            else:
                b_dq, b_x, b_col = _diag_split(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, G_first, G_last,
                                               SPAN, PRECISION)
        else:
            b_dq, b_x, b_col = _diag_split(b_dq, b_x, b_col, b_q, b_k, b_G, b_Dqk, b_dAkk, b_Dkk, G_first, G_last,
                                           SPAN, PRECISION)

        # ==== sub-chunk B's gradients
        b_krow = b_beta[:, None] * b_x  # dk's row term (A_kk = Diag(beta) P_kk)
        b_dk = b_krow + b_col
        b_dG = b_q * b_dq + b_k * b_krow - b_k * b_col
        if ACC:
            b_dq += _block(dq + i_hv * K, tb, eos, SG, c0, K, BC, BK)
            b_dk += _block(dk + i_hv * K, tb, eos, SG, c0, K, BC, BK)
            b_dG += _block(dG + i_hv * K, tb, eos, SG, c0, K, BC, BK)
        _store(dq_out + i_hv * K, b_dq, tb, eos, SG, c0, K, BC, BK)
        _store(dk_out + i_hv * K, b_dk, tb, eos, SG, c0, K, BC, BK)
        _store(dG + i_hv * K, b_dG, tb, eos, SG, c0, K, BC, BK)
        tl.store(dbeta + (i_k * TT + tb + o_i) * HV + i_hv, tl.sum(b_k * b_x, axis=1),
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
    dq_acc: Optional[torch.Tensor] = None,
    dk_acc: Optional[torch.Tensor] = None,
    dG_acc: Optional[torch.Tensor] = None,
    per_value_head: bool = False,
    out_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
):
    """``(dq [B, T, H, K], dk [B, T, H, K], dG [B, T, HV, K], dbeta [B, T, HV])``, float32; as
    :func:`kda_explained.chunked.backward_intra.intra_chunk_matrices_bwd` (entries of ``dA_kk``
    on or above the diagonal, and of ``dA_qk`` above it, are ignored).

    Args:
        q, k: ``[B, T, H, K]``; G: ``[B, T, HV, K]`` float32 in-chunk cumulative log decay;
            beta: ``[B, T, HV]``; dA_kk, dA_qk: ``[B, T, HV, C]`` (``C = chunk_size``, a power of two
            and at least 16: a block is 16 x 16).

    ``dq_acc``, ``dk_acc``, ``dG_acc``: float32 ``[B, T, HV, K]`` tensors (all or none) that ``dq``,
    ``dk`` (per value head) and ``dG`` are added into (and returned); ``per_value_head``: ``dq`` and
    ``dk`` not summed over GVA groups. ``out_dtype``: ``dq`` and ``dk`` written in that dtype as
    new tensors, the sums done in float32 (no cast pass after; only when no GVA sum follows,
    ``HV == H`` or ``per_value_head``).

    Checked against the chunked layer, and against the exact kernel of
    :mod:`kda_explained.fast.backward`, in ``tests/test_fast_backward_intra.py``.
    """
    B, T, H, K = q.shape
    HV = G.shape[2]
    BC = 16
    if chunk_size % BC != 0:
        raise ValueError(f"chunk_size: expected a multiple of {BC} (16, 32 or 64 in the fast layer), got {chunk_size}")
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    config = config or plan_for(q.device).backward
    launch = config["intra"]
    # a register cap per thread (more programs per SM, spilling what does not fit), when given
    cap = dict(maxnreg=launch.maxnreg) if launch.maxnreg and not interpreting() else {}
    BK = tile(K, launch.BK)
    NK = triton.cdiv(K, BK)
    accs = (dq_acc, dk_acc, dG_acc)
    if any(a is None for a in accs) and any(a is not None for a in accs):
        raise ValueError("dq_acc, dk_acc, dG_acc: give all three accumulators or none")
    # new tensors (no zero fill: the sequences cover the batch, so every row is written) or the given ones
    dq, dk, dG = (_accumulator(a, q, (B, T, HV, K)) for a in accs)
    dq_out, dk_out = dq, dk
    if out_dtype is not None and out_dtype != torch.float32:
        if HV != H and not per_value_head:
            raise ValueError("out_dtype: only without a GVA sum after (HV == H or per_value_head)")
        dq_out, dk_out = (torch.empty(B, T, HV, K, dtype=out_dtype, device=q.device) for _ in range(2))
    dbeta = torch.empty(NK, B, T, HV, dtype=torch.float32, device=q.device)
    if meta.NC > 0:
        flags = torch.empty(meta.NC * NK, HV, dtype=torch.int32, device=q.device)
        inputs = (q.contiguous(), k.contiguous(), G.contiguous(), beta.contiguous(), dA_kk.contiguous(),
                  dA_qk.contiguous())
        # every program with block-product diagonals, then the programs the first launch flagged, again, with their
        # strong sub-chunks' diagonals exact (the others read their flag and exit: typical gates never pay)
        for exact in (False, True):
            _intra_bwd_tc_kernel[(meta.NC * NK, HV)](
                *inputs, dq, dk, dq_out, dk_out, dG, dbeta, flags, meta.cu, meta.chunk_seq, meta.chunk_bos,
                float(scale), B * T,
                H=H, HV=HV, K=K, BT=chunk_size, BC=BC, BK=BK, SPAN=config.span,
                PRECISION=config.intra_precision if dot_precision(q.dtype) == "tf32" else "ieee",
                EXACT_DIAG=exact, ACC=dq_acc is not None, num_warps=launch.warps, num_stages=launch.stages, **cap,
            )
    # GVA: the value heads of a group share one q/k head
    dq, dk = per_key_head(dq_out, H, per_value_head), per_key_head(dk_out, H, per_value_head)
    return dq, dk, dG, dbeta.sum(0) if NK > 1 else dbeta[0]
