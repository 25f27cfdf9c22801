"""Stages 2-4 on the GPU in one kernel: ``A_qk``, the UT transform and the WY factors (report Eq. 5-7).

Mirrors, in one program per chunk and value head, three chunked stages:
:func:`~kda_explained.chunked.stages.intra_chunk_matrices` (``A_kk``, ``A_qk``),
:func:`~kda_explained.chunked.stages.ut_transform` (``M = (I + A_kk)^{-1}``) and
:func:`~kda_explained.chunked.stages.wy_representation` (``W``, ``U``). ``A_kk`` and
``M`` never leave the chip: they exist only to make ``W`` and ``U``, so fusing the
three stages saves writing and reading them (and two launches). The kernel also
writes the two decayed operands the later stages need, so that neither of them
reads the float32 ``G`` again::

    qg = scale * q * exp(G)          # [BT, K]  the output stage's query (Eq. 9)
    kg = k * exp(G_last - G)         # [BT, K]  the state stage's key (Eq. 8), exponent <= 0

Glossary
--------
==========  =================================================================
``BT``      chunk length (16, 32 or 64); ``BC = 16`` tokens per sub-chunk, ``NS = BT / BC``
``i, j``    sub-chunk indices (row block, column block), ``j <= i``
``G_ref``   the reference point of row block ``i``: ``G`` at its first token
``A_ij``    block ``(i, j)`` of ``A_kk``, ``[BC, BC]`` float32 in registers (``Q_ij`` of ``A_qk``)
``D_i``     ``(I + A_ii)^{-1}``, the inverse of a diagonal block
``M_ij``    block ``(i, j)`` of ``M = (I + A_kk)^{-1}``
==========  =================================================================

Every ``[BC, BC]`` block lives in registers as its own variable (``NS <= 4``: ten
blocks below or on the diagonal); blocks a shorter chunk lacks are compile-time
zeros that the compiler removes.

**1. The blocks of A.** The decay ratio splits through ``G_ref``, ``G`` at the
first token of row block ``i``: ``exp(G_r - G_j) = exp(G_r - G_ref) exp(G_ref - G_j)``,
so each block is one tensor-core product ``[BC, K] @ [K, BC]``. The left exponent
is ``<= 0`` (``r`` is at or after the reference), and so is the right one for
every column block ``j < i``. Only on the diagonal is the right exponent
positive, by at most the sub-chunk's decay span ``G_ref - G_r``. While that
span is at most ``SAFE_SPAN = 80`` every factor stays below ``exp(80) ~ 5.5e34``
(float32 holds 3.4e38): every gate with ``lower_bound >= -5`` does (15 steps of
5). A sub-chunk with a larger span is flagged and its diagonal block, the only
one the clamp at ``SAFE_SPAN`` touched, is recomputed exactly, column by
column, with every exponent masked to ``-inf`` *before* the ``exp`` where
``j > r`` (``_diag_exact``): no gate ever overflows.

**2. The UT transform by blocks.** ``D_i = (I + A_ii)^{-1}`` by forward substitution
(``_unit_lower_inverse``), then each block below the diagonal from those above
it (block forward substitution)::

    M_ij = -D_i  sum_{j <= c < i}  A_ic M_cj          (M_jj = D_j)

as ``[BC, BC]`` products in full float32: ``M`` feeds every later stage.

**3. The WY factors.** ``W_i = sum_j M_ij (beta * exp(G) * k)_j`` and
``U_i = sum_j M_ij (beta * v)_j``, tile by tile of ``K`` and ``V``, together with
``qg`` and ``kg``.

Intermediates are stored in the input dtype for bf16/fp16 inputs (the products
that read them run in that dtype, as flash-linear-attention's do) and in float32
for float32 inputs.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, interpreting, seq_meta

__all__ = ["chunk_local_factors", "LocalFactors", "SAFE_SPAN", "intermediate_dtype"]

#: Largest in-sub-chunk decay span ``G_ref - G_r`` the tensor-core diagonal takes.
SAFE_SPAN = 80.0
#: Warps per program (one program holds the ten ``[16, 16]`` blocks and the ``[16, BK]`` row tiles),
#: and the width of the ``K`` tiles of step 1 (register pressure grows with it).
LOCAL_WARPS = 4
LOCAL_BK = 16


@triton.jit
def _load_block(x, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """``[BC, BX]`` float32: tokens ``t0 ..`` (rows ``stride_t`` apart), columns ``c0 ..``; zeros outside."""
    o_t = t0 + tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos)[:, None] & (o_c < NCOL)[None, :]
    return tl.load(x + o_t[:, None] * stride_t + o_c[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _store_block(x, b, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    o_t = t0 + tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_t < eos)[:, None] & (o_c < NCOL)[None, :]
    tl.store(x + o_t[:, None] * stride_t + o_c[None, :], b.to(x.dtype.element_ty), mask=m)


@triton.jit
def _unit_lower_inverse(A, BC: tl.constexpr):
    """``(I + A)^{-1}`` of a strictly lower ``[BC, BC]`` block: row ``i`` is ``e_i - sum_{c<i} A_ic D_c``."""
    o_i = tl.arange(0, BC)
    D = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for i in range(1, BC):
        b_a = tl.sum(tl.where(o_i[:, None] == i, A, 0.0), axis=0)  # row i of A                [BC]
        b_d = tl.sum(b_a[:, None] * D, axis=0)  # sum_{c<i} A_ic D_c (rows c >= i are unit rows times 0)
        D = tl.where(o_i[:, None] == i, D - b_d[None, :], D)
    return D


@triton.jit
def _diag_exact(k_h, q_h, G_h, t0, eos, stride_k, stride_G, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The diagonal block of rows ``t0 ..`` without the reference split: column by column, exact."""
    o_i = tl.arange(0, BC)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    b_Q = tl.zeros([BC, BC], dtype=tl.float32)
    for jj in range(0, BC):
        b_ca = tl.zeros([BC], dtype=tl.float32)
        b_cq = tl.zeros([BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k1 = (o_k < K) & (t0 + jj + 0 * o_k < eos)  # column jj is a real token
            b_k = _load_block(k_h, t0, eos, stride_k, i_k * BK, K, BC, BK)
            b_q = _load_block(q_h, t0, eos, stride_k, i_k * BK, K, BC, BK)
            b_G = _load_block(G_h, t0, eos, stride_G, i_k * BK, K, BC, BK)
            b_k1 = tl.load(k_h + (t0 + jj) * stride_k + o_k, mask=m_k1, other=0).to(tl.float32)
            b_G1 = tl.load(G_h + (t0 + jj) * stride_G + o_k, mask=m_k1, other=0)
            # exponent G_r - G_j only where r >= j (else -inf -> ratio 0): never positive
            m_rj = (o_i >= jj)[:, None] & m_k1[None, :]
            b_ratio = tl.exp(tl.where(m_rj, b_G - b_G1[None, :], float("-inf"))) * b_k1[None, :]
            b_ca += tl.sum(b_k * b_ratio, axis=1)
            b_cq += tl.sum(b_q * b_ratio, axis=1)
        b_A = tl.where(o_i[None, :] == jj, b_ca[:, None], b_A)
        b_Q = tl.where(o_i[None, :] == jj, b_cq[:, None], b_Q)
    return b_A, b_Q


@triton.jit
def _finish_diag(A, Q, beta_i, t0, eos, BC: tl.constexpr, scale):
    """Masks of a diagonal block: ``A`` strictly lower times ``beta`` rows, ``Q`` lower times ``scale``."""
    o_i = tl.arange(0, BC)
    m = ((t0 + o_i) < eos)[:, None] & ((t0 + o_i) < eos)[None, :]
    A = tl.where(m & (o_i[None, :] < o_i[:, None]), A * beta_i[:, None], 0.0)
    Q = tl.where(m & (o_i[None, :] <= o_i[:, None]), Q * scale, 0.0)
    return A, Q


@triton.jit
def _finish_off(A, Q, beta_i, ti, tj, eos, BC: tl.constexpr, scale):
    """Masks of a block below the diagonal: real rows and columns only."""
    o_i = tl.arange(0, BC)
    m = ((ti + o_i) < eos)[:, None] & ((tj + o_i) < eos)[None, :]
    return tl.where(m, A * beta_i[:, None], 0.0), tl.where(m, Q * scale, 0.0)


@triton.jit
def _chunk_local_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32, in-chunk cumulative log decay
    beta,  # [TT, HV] float32
    A_qk,  # [TT, HV, BT] out
    A_kk,  # [TT, HV, BT] float32 out (STORE_AKK)
    W,  # [TT, HV, K] out
    U,  # [TT, HV, V] out
    qg,  # [TT, HV, K] out: scale * q * exp(G)
    kg,  # [TT, HV, K] out: k * exp(G_last - G)
    cu,
    chunk_seq,
    chunk_bos,
    # scalars
    scale,
    # sizes
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    PRECISION: tl.constexpr,
    STORE_AKK: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    NS: tl.constexpr = BT // BC
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    # each tensor seen from this head: token rows `stride` apart
    q_h, k_h, SK = q + i_h * K, k + i_h * K, H * K
    G_h, SG = G + i_hv * K, HV * K
    t0, t1, t2, t3 = bos, bos + BC, bos + 2 * BC, bos + 3 * BC  # first token of each sub-chunk
    o_i = tl.arange(0, BC)

    # ==== 1. the blocks of A_kk (A) and A_qk (Q), summed over tiles of K
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = Z, Z, Z, Z, Z, Z, Z, Z, Z, Z
    Q00, Q10, Q11, Q20, Q21, Q22, Q30, Q31, Q32, Q33 = Z, Z, Z, Z, Z, Z, Z, Z, Z, Z
    span0 = tl.zeros([], dtype=tl.float32)  # the decay span of each sub-chunk, max over channels
    span1, span2, span3 = span0, span0, span0
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        c0 = i_k * BK
        # sub-chunk 0: its diagonal block
        k0 = _load_block(k_h, t0, eos, SK, c0, K, BC, BK)
        G0 = _load_block(G_h, t0, eos, SG, c0, K, BC, BK)
        Gr = tl.load(G_h + t0 * SG + o_k, mask=m_k & (t0 + 0 * o_k < eos), other=0)[None, :]  # G_ref of row block 0
        span0 = tl.maximum(span0, tl.max(tl.max(tl.where(t0 + o_i[:, None] < eos, Gr - G0, 0.0), axis=1), axis=0))
        left = tl.exp(tl.minimum(G0 - Gr, 0.0))
        lk, lq = k0 * left, _load_block(q_h, t0, eos, SK, c0, K, BC, BK) * left
        r = k0 * tl.exp(tl.minimum(Gr - G0, SPAN))
        A00 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
        Q00 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
        if NS > 1:
            k1 = _load_block(k_h, t1, eos, SK, c0, K, BC, BK)
            G1 = _load_block(G_h, t1, eos, SG, c0, K, BC, BK)
            Gr = tl.load(G_h + t1 * SG + o_k, mask=m_k & (t1 + 0 * o_k < eos), other=0)[None, :]
            span1 = tl.maximum(span1, tl.max(tl.max(tl.where(t1 + o_i[:, None] < eos, Gr - G1, 0.0), axis=1), axis=0))
            left = tl.exp(tl.minimum(G1 - Gr, 0.0))
            lk, lq = k1 * left, _load_block(q_h, t1, eos, SK, c0, K, BC, BK) * left
            r = k0 * tl.exp(tl.minimum(Gr - G0, 0.0))
            A10 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q10 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k1 * tl.exp(tl.minimum(Gr - G1, SPAN))
            A11 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q11 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
        if NS > 2:
            k2 = _load_block(k_h, t2, eos, SK, c0, K, BC, BK)
            G2 = _load_block(G_h, t2, eos, SG, c0, K, BC, BK)
            Gr = tl.load(G_h + t2 * SG + o_k, mask=m_k & (t2 + 0 * o_k < eos), other=0)[None, :]
            span2 = tl.maximum(span2, tl.max(tl.max(tl.where(t2 + o_i[:, None] < eos, Gr - G2, 0.0), axis=1), axis=0))
            left = tl.exp(tl.minimum(G2 - Gr, 0.0))
            lk, lq = k2 * left, _load_block(q_h, t2, eos, SK, c0, K, BC, BK) * left
            r = k0 * tl.exp(tl.minimum(Gr - G0, 0.0))
            A20 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q20 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k1 * tl.exp(tl.minimum(Gr - G1, 0.0))
            A21 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q21 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k2 * tl.exp(tl.minimum(Gr - G2, SPAN))
            A22 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q22 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
        if NS > 3:
            k3 = _load_block(k_h, t3, eos, SK, c0, K, BC, BK)
            G3 = _load_block(G_h, t3, eos, SG, c0, K, BC, BK)
            Gr = tl.load(G_h + t3 * SG + o_k, mask=m_k & (t3 + 0 * o_k < eos), other=0)[None, :]
            span3 = tl.maximum(span3, tl.max(tl.max(tl.where(t3 + o_i[:, None] < eos, Gr - G3, 0.0), axis=1), axis=0))
            left = tl.exp(tl.minimum(G3 - Gr, 0.0))
            lk, lq = k3 * left, _load_block(q_h, t3, eos, SK, c0, K, BC, BK) * left
            r = k0 * tl.exp(tl.minimum(Gr - G0, 0.0))
            A30 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q30 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k1 * tl.exp(tl.minimum(Gr - G1, 0.0))
            A31 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q31 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k2 * tl.exp(tl.minimum(Gr - G2, 0.0))
            A32 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q32 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)
            r = k3 * tl.exp(tl.minimum(Gr - G3, SPAN))
            A33 += tl.dot(lk, tl.trans(r), input_precision=PRECISION)
            Q33 += tl.dot(lq, tl.trans(r), input_precision=PRECISION)

    # too strong a gate for the split: redo that diagonal block exactly (rare; skipped at run time)
    if span0 > SPAN:
        A00, Q00 = _diag_exact(k_h, q_h, G_h, t0, eos, SK, SG, K, BC, BK)
    if NS > 1:
        if span1 > SPAN:
            A11, Q11 = _diag_exact(k_h, q_h, G_h, t1, eos, SK, SG, K, BC, BK)
    if NS > 2:
        if span2 > SPAN:
            A22, Q22 = _diag_exact(k_h, q_h, G_h, t2, eos, SK, SG, K, BC, BK)
    if NS > 3:
        if span3 > SPAN:
            A33, Q33 = _diag_exact(k_h, q_h, G_h, t3, eos, SK, SG, K, BC, BK)

    # Diag(beta) on the rows of A_kk (Eq. 5), scale on A_qk, and the causal masks
    be0 = tl.load(beta + (t0 + o_i) * HV + i_hv, mask=t0 + o_i < eos, other=0)
    be1 = tl.load(beta + (t1 + o_i) * HV + i_hv, mask=t1 + o_i < eos, other=0)
    be2 = tl.load(beta + (t2 + o_i) * HV + i_hv, mask=t2 + o_i < eos, other=0)
    be3 = tl.load(beta + (t3 + o_i) * HV + i_hv, mask=t3 + o_i < eos, other=0)
    A00, Q00 = _finish_diag(A00, Q00, be0, t0, eos, BC, scale)
    A11, Q11 = _finish_diag(A11, Q11, be1, t1, eos, BC, scale)
    A22, Q22 = _finish_diag(A22, Q22, be2, t2, eos, BC, scale)
    A33, Q33 = _finish_diag(A33, Q33, be3, t3, eos, BC, scale)
    A10, Q10 = _finish_off(A10, Q10, be1, t1, t0, eos, BC, scale)
    A20, Q20 = _finish_off(A20, Q20, be2, t2, t0, eos, BC, scale)
    A21, Q21 = _finish_off(A21, Q21, be2, t2, t1, eos, BC, scale)
    A30, Q30 = _finish_off(A30, Q30, be3, t3, t0, eos, BC, scale)
    A31, Q31 = _finish_off(A31, Q31, be3, t3, t1, eos, BC, scale)
    A32, Q32 = _finish_off(A32, Q32, be3, t3, t2, eos, BC, scale)

    # A_qk (and A_kk for tests), whole rows: the blocks above the diagonal are zeros
    Aq_h, SA = A_qk + i_hv * BT, HV * BT
    Ak_h = A_kk + i_hv * BT
    for i_s in tl.static_range(NS):
        ti = bos + i_s * BC
        for j_s in tl.static_range(NS):
            if j_s > i_s:
                _store_block(Aq_h, Z, ti, eos, SA, j_s * BC, BT, BC, BC)
                if STORE_AKK:
                    _store_block(Ak_h, Z, ti, eos, SA, j_s * BC, BT, BC, BC)
    _store_block(Aq_h, Q00, t0, eos, SA, 0, BT, BC, BC)
    if NS > 1:
        _store_block(Aq_h, Q10, t1, eos, SA, 0, BT, BC, BC)
        _store_block(Aq_h, Q11, t1, eos, SA, BC, BT, BC, BC)
    if NS > 2:
        _store_block(Aq_h, Q20, t2, eos, SA, 0, BT, BC, BC)
        _store_block(Aq_h, Q21, t2, eos, SA, BC, BT, BC, BC)
        _store_block(Aq_h, Q22, t2, eos, SA, 2 * BC, BT, BC, BC)
    if NS > 3:
        _store_block(Aq_h, Q30, t3, eos, SA, 0, BT, BC, BC)
        _store_block(Aq_h, Q31, t3, eos, SA, BC, BT, BC, BC)
        _store_block(Aq_h, Q32, t3, eos, SA, 2 * BC, BT, BC, BC)
        _store_block(Aq_h, Q33, t3, eos, SA, 3 * BC, BT, BC, BC)
    if STORE_AKK:
        _store_block(Ak_h, A00, t0, eos, SA, 0, BT, BC, BC)
        if NS > 1:
            _store_block(Ak_h, A10, t1, eos, SA, 0, BT, BC, BC)
            _store_block(Ak_h, A11, t1, eos, SA, BC, BT, BC, BC)
        if NS > 2:
            _store_block(Ak_h, A20, t2, eos, SA, 0, BT, BC, BC)
            _store_block(Ak_h, A21, t2, eos, SA, BC, BT, BC, BC)
            _store_block(Ak_h, A22, t2, eos, SA, 2 * BC, BT, BC, BC)
        if NS > 3:
            _store_block(Ak_h, A30, t3, eos, SA, 0, BT, BC, BC)
            _store_block(Ak_h, A31, t3, eos, SA, BC, BT, BC, BC)
            _store_block(Ak_h, A32, t3, eos, SA, 2 * BC, BT, BC, BC)
            _store_block(Ak_h, A33, t3, eos, SA, 3 * BC, BT, BC, BC)

    # ==== 2. M = (I + A_kk)^{-1} by blocks: M_ij = -D_i sum_{j <= c < i} A_ic M_cj, in full float32
    M00 = _unit_lower_inverse(A00, BC)
    M11 = _unit_lower_inverse(A11, BC)
    M22 = _unit_lower_inverse(A22, BC)
    M33 = _unit_lower_inverse(A33, BC)
    M10 = -tl.dot(M11, tl.dot(A10, M00, input_precision="ieee"), input_precision="ieee")
    M21 = -tl.dot(M22, tl.dot(A21, M11, input_precision="ieee"), input_precision="ieee")
    M20 = -tl.dot(M22, tl.dot(A20, M00, input_precision="ieee") + tl.dot(A21, M10, input_precision="ieee"),
                  input_precision="ieee")
    M32 = -tl.dot(M33, tl.dot(A32, M22, input_precision="ieee"), input_precision="ieee")
    M31 = -tl.dot(M33, tl.dot(A31, M11, input_precision="ieee") + tl.dot(A32, M21, input_precision="ieee"),
                  input_precision="ieee")
    M30 = -tl.dot(M33, tl.dot(A30, M00, input_precision="ieee") + tl.dot(A31, M10, input_precision="ieee")
                  + tl.dot(A32, M20, input_precision="ieee"), input_precision="ieee")

    # ==== 3. W = M Diag(beta)(Gamma * K), with qg and kg; then U = M Diag(beta) V
    t_last = tl.minimum(bos + BT, eos) - 1
    W_h, qg_h, kg_h = W + i_hv * K, qg + i_hv * K, kg + i_hv * K
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        c0 = i_k * BK
        G_last = tl.load(G_h + t_last * SG + o_k, mask=o_k < K, other=0)[None, :]
        G0 = _load_block(G_h, t0, eos, SG, c0, K, BC, BK)
        k0 = _load_block(k_h, t0, eos, SK, c0, K, BC, BK)
        kb0 = k0 * tl.exp(G0) * be0[:, None]
        _store_block(W_h, tl.dot(M00, kb0, input_precision=PRECISION), t0, eos, SG, c0, K, BC, BK)
        _store_block(qg_h, _load_block(q_h, t0, eos, SK, c0, K, BC, BK) * tl.exp(G0) * scale, t0, eos, SG, c0, K, BC, BK)
        _store_block(kg_h, k0 * tl.exp(tl.minimum(G_last - G0, 0.0)), t0, eos, SG, c0, K, BC, BK)
        if NS > 1:
            G1 = _load_block(G_h, t1, eos, SG, c0, K, BC, BK)
            k1 = _load_block(k_h, t1, eos, SK, c0, K, BC, BK)
            kb1 = k1 * tl.exp(G1) * be1[:, None]
            b_W = tl.dot(M10, kb0, input_precision=PRECISION) + tl.dot(M11, kb1, input_precision=PRECISION)
            _store_block(W_h, b_W, t1, eos, SG, c0, K, BC, BK)
            _store_block(qg_h, _load_block(q_h, t1, eos, SK, c0, K, BC, BK) * tl.exp(G1) * scale,
                         t1, eos, SG, c0, K, BC, BK)
            _store_block(kg_h, k1 * tl.exp(tl.minimum(G_last - G1, 0.0)), t1, eos, SG, c0, K, BC, BK)
        if NS > 2:
            G2 = _load_block(G_h, t2, eos, SG, c0, K, BC, BK)
            k2 = _load_block(k_h, t2, eos, SK, c0, K, BC, BK)
            kb2 = k2 * tl.exp(G2) * be2[:, None]
            b_W = (tl.dot(M20, kb0, input_precision=PRECISION) + tl.dot(M21, kb1, input_precision=PRECISION)
                   + tl.dot(M22, kb2, input_precision=PRECISION))
            _store_block(W_h, b_W, t2, eos, SG, c0, K, BC, BK)
            _store_block(qg_h, _load_block(q_h, t2, eos, SK, c0, K, BC, BK) * tl.exp(G2) * scale,
                         t2, eos, SG, c0, K, BC, BK)
            _store_block(kg_h, k2 * tl.exp(tl.minimum(G_last - G2, 0.0)), t2, eos, SG, c0, K, BC, BK)
        if NS > 3:
            G3 = _load_block(G_h, t3, eos, SG, c0, K, BC, BK)
            k3 = _load_block(k_h, t3, eos, SK, c0, K, BC, BK)
            kb3 = k3 * tl.exp(G3) * be3[:, None]
            b_W = (tl.dot(M30, kb0, input_precision=PRECISION) + tl.dot(M31, kb1, input_precision=PRECISION)
                   + tl.dot(M32, kb2, input_precision=PRECISION) + tl.dot(M33, kb3, input_precision=PRECISION))
            _store_block(W_h, b_W, t3, eos, SG, c0, K, BC, BK)
            _store_block(qg_h, _load_block(q_h, t3, eos, SK, c0, K, BC, BK) * tl.exp(G3) * scale,
                         t3, eos, SG, c0, K, BC, BK)
            _store_block(kg_h, k3 * tl.exp(tl.minimum(G_last - G3, 0.0)), t3, eos, SG, c0, K, BC, BK)
    v_h, U_h, SV = v + i_hv * V, U + i_hv * V, HV * V
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        vb0 = _load_block(v_h, t0, eos, SV, c0, V, BC, BV) * be0[:, None]
        _store_block(U_h, tl.dot(M00, vb0, input_precision=PRECISION), t0, eos, SV, c0, V, BC, BV)
        if NS > 1:
            vb1 = _load_block(v_h, t1, eos, SV, c0, V, BC, BV) * be1[:, None]
            b_U = tl.dot(M10, vb0, input_precision=PRECISION) + tl.dot(M11, vb1, input_precision=PRECISION)
            _store_block(U_h, b_U, t1, eos, SV, c0, V, BC, BV)
        if NS > 2:
            vb2 = _load_block(v_h, t2, eos, SV, c0, V, BC, BV) * be2[:, None]
            b_U = (tl.dot(M20, vb0, input_precision=PRECISION) + tl.dot(M21, vb1, input_precision=PRECISION)
                   + tl.dot(M22, vb2, input_precision=PRECISION))
            _store_block(U_h, b_U, t2, eos, SV, c0, V, BC, BV)
        if NS > 3:
            vb3 = _load_block(v_h, t3, eos, SV, c0, V, BC, BV) * be3[:, None]
            b_U = (tl.dot(M30, vb0, input_precision=PRECISION) + tl.dot(M31, vb1, input_precision=PRECISION)
                   + tl.dot(M32, vb2, input_precision=PRECISION) + tl.dot(M33, vb3, input_precision=PRECISION))
            _store_block(U_h, b_U, t3, eos, SV, c0, V, BC, BV)


class LocalFactors(NamedTuple):
    """What :func:`chunk_local_factors` returns (token layout ``[B, T, HV, ...]``)."""

    A_qk: torch.Tensor  #: ``[B, T, HV, C]``: ``scale q_r (k_j exp(G_r - G_j))``, ``j <= r``
    W: torch.Tensor  #: ``[B, T, HV, K]``: ``M Diag(beta)(Gamma * K)`` (Eq. 7)
    U: torch.Tensor  #: ``[B, T, HV, V]``: ``M Diag(beta) V`` (Eq. 7)
    qg: torch.Tensor  #: ``[B, T, HV, K]``: ``scale * q * exp(G)``
    kg: torch.Tensor  #: ``[B, T, HV, K]``: ``k * exp(G_last - G)``
    A_kk: Optional[torch.Tensor]  #: ``[B, T, HV, C]`` float32, only with ``store_akk``


def intermediate_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the fast layer keeps its intermediates in: the input's for bf16/fp16, else float32.

    Under the Triton interpreter always float32: its float32 -> bf16 casts truncate
    instead of rounding to nearest, a bias that seven rounded intermediates
    accumulate past the bf16 error bound (the GPU rounds to nearest; the gpu tests
    check that path).
    """
    if interpreting():
        return torch.float32
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.float32


def chunk_local_factors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    store_akk: bool = False,
    meta: Optional[SeqMeta] = None,
) -> LocalFactors:
    """Everything stages 5 and 6 need from one chunk, in one launch.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; G: ``[B, T, HV, K]`` float32 in-chunk
            cumulative log decay; beta: ``[B, T, HV]`` float32.
        store_akk: also return ``A_kk`` (for tests; the pipeline never reads it).

    Returns:
        :class:`LocalFactors`; ``A_qk``, ``W``, ``U``, ``qg``, ``kg`` in
        :func:`intermediate_dtype` of ``q``.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BC = 16
    if chunk_size % BC != 0 or chunk_size > 4 * BC:
        raise ValueError(f"chunk_size: expected 16, 32 or 64 for the fast layer, got {chunk_size}")
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    dt = intermediate_dtype(q.dtype)
    dev = q.device
    A_qk = torch.empty(B, T, HV, chunk_size, dtype=dt, device=dev)
    A_kk = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=dev) if store_akk else None
    W = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    U = torch.empty(B, T, HV, V, dtype=dt, device=dev)
    qg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    kg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    if meta.NC > 0:
        _chunk_local_kernel[(meta.NC, HV)](
            q.contiguous(), k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous().float(),
            A_qk, A_kk if store_akk else A_qk, W, U, qg, kg, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BC=BC, BK=min(LOCAL_BK, max(16, triton.next_power_of_2(K))),
            BV=min(64, max(16, triton.next_power_of_2(V))), SPAN=SAFE_SPAN, PRECISION=dot_precision(q.dtype),
            STORE_AKK=store_akk, num_warps=LOCAL_WARPS,
        )
    return LocalFactors(A_qk, W, U, qg, kg, A_kk)
