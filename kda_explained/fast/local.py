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

**Short chunks in one pass.** :func:`chunk_local_factors_one_pass` does all of the
above, and stage 1, for chunks of 16 or 32 tokens (the inference forward's choice
where the batch fills the GPU): with at most three blocks each of ``A_kk`` and
``A_qk`` one program holds both, so ``q``, ``k``, ``v`` and ``g`` are read once; ``G``
is summed from ``g`` on the fly (``_gate_block``) and only its row at each chunk's
last token is written, ``G_end``, which is all the state pass reads of it. With ``fold``
(the inference forward's default) it leaves the UT transform's last products to the state
pass: it writes ``Mb = M Diag(beta)`` and ``k_gamma = Gamma * K`` instead of ``W = Mb k_gamma`` and
``U = Mb V``, so it never reads ``v`` and needs no second sweep over ``k`` and ``g``.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ._grad import chunk_span
from ._meta import SeqMeta, dot_precision, interpreting, seq_meta, tile
from .config import LocalConfig, OnePassConfig, WYFactorsConfig, plan_for
from .prepare import G_FLOOR

__all__ = ["chunk_local_factors", "chunk_local_factors_one_pass", "chunk_wy_factors", "LocalFactors",
           "intermediate_dtype"]

@triton.jit
def _load_block(x, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    """``[BC, BX]`` float32: tokens ``t0 ..`` (rows ``stride_t`` apart), columns ``c0 ..``; zeros outside."""
    o_r = tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_r < (eos - t0).to(tl.int32))[:, None]
    if NCOL % BX != 0:
        m = m & (o_c < NCOL)[None, :]
    return tl.load(x + (t0 + o_r[:, None]) * stride_t + o_c[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _store_block(x, b, t0, eos, stride_t, c0, NCOL: tl.constexpr, BC: tl.constexpr, BX: tl.constexpr):
    o_r = tl.arange(0, BC)
    o_c = c0 + tl.arange(0, BX)
    m = (o_r < (eos - t0).to(tl.int32))[:, None]
    if NCOL % BX != 0:
        m = m & (o_c < NCOL)[None, :]
    tl.store(x + (t0 + o_r[:, None]) * stride_t + o_c[None, :], b.to(x.dtype.element_ty), mask=m)


@triton.jit
def _row_block(x_h, k_h, G_h, ti, eos, SK, SG, c0, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """Row block starting at token ``ti``, one ``K`` tile, for the left operand ``x`` (``k`` or ``q``).

    Returns ``k``, ``G``, ``G_ref`` (``G`` at ``ti``, ``[1, BK]``), the decayed left factor
    ``x exp(G - G_ref)`` (exponents ``<= 0``), ``x`` itself, and the block's decay span per
    channel, ``G_ref - G`` at its last real token (0 for a block of padding).
    """
    o_k = c0 + tl.arange(0, BK)
    m_k = o_k < K
    k_i = _load_block(k_h, ti, eos, SK, c0, K, BC, BK)
    x_i = _load_block(x_h, ti, eos, SK, c0, K, BC, BK)
    G_i = _load_block(G_h, ti, eos, SG, c0, K, BC, BK)
    G_ref = tl.load(G_h + ti * SG + o_k, mask=m_k & (ti + 0 * o_k < eos), other=0)
    t_end = tl.minimum(ti + BC, eos) - 1
    G_end = tl.load(G_h + t_end * SG + o_k, mask=m_k & (t_end + 0 * o_k >= ti), other=0)
    span = tl.where(t_end >= ti, G_ref - G_end, 0.0)
    lx = x_i * tl.exp(tl.minimum(G_i - G_ref[None, :], 0.0))
    return k_i, G_i, G_ref[None, :], lx, x_i, span


@triton.jit
def _accumulate(A, lx, k_j, G_j, G_ref, HI: tl.constexpr, PRECISION: tl.constexpr):
    """One block of step 1, one ``K`` tile: ``A + lx (k_j exp(G_ref - G_j))^T``.

    The right exponent is clamped at ``HI``: 0 below the diagonal (where it is never
    positive anyway), ``SAFE_SPAN`` on it.
    """
    return tl.dot(lx, tl.trans(k_j * tl.exp(tl.minimum(G_ref - G_j, HI))), A, input_precision=PRECISION)


@triton.jit
def _diag_exact(x_h, k_h, G_h, t0, eos, SK, SG, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr):
    """The diagonal block of rows ``t0 ..`` without the reference split: column by column, exact."""
    o_i = tl.arange(0, BC)
    b_A = tl.zeros([BC, BC], dtype=tl.float32)
    for jj in range(0, BC):
        b_col = tl.zeros([BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            m_k1 = (o_k < K) & (t0 + jj + 0 * o_k < eos)  # column jj is a real token
            b_x = _load_block(x_h, t0, eos, SK, i_k * BK, K, BC, BK)
            b_G = _load_block(G_h, t0, eos, SG, i_k * BK, K, BC, BK)
            b_k1 = tl.load(k_h + (t0 + jj) * SK + o_k, mask=m_k1, other=0).to(tl.float32)
            b_G1 = tl.load(G_h + (t0 + jj) * SG + o_k, mask=m_k1, other=0)
            # exponent G_r - G_j only where r >= j and row r is a real token (else -inf -> ratio 0):
            # never positive, and a padding row (G = 0) never forms exp(-G_j)
            m_rj = ((o_i >= jj) & (t0 + o_i < eos))[:, None] & m_k1[None, :]
            b_col += tl.sum(b_x * tl.exp(tl.where(m_rj, b_G - b_G1[None, :], float("-inf"))) * b_k1[None, :], axis=1)
        b_A = tl.where(o_i[None, :] == jj, b_col[:, None], b_A)
    return b_A


@triton.jit
def _store_lower(x_h, X00, X10, X11, X20, X21, X22, X30, X31, X32, X33, bos, eos, SA, NS: tl.constexpr,
                 BT: tl.constexpr, BC: tl.constexpr):
    """Whole rows ``[BT]`` of a lower block-triangular chunk matrix (``A`` or ``M``) from its ten
    ``[BC, BC]`` blocks: the blocks above the diagonal are written as zeros."""
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    for i_s in tl.static_range(NS):
        for j_s in tl.static_range(i_s + 1, NS):
            _store_block(x_h, Z, bos + i_s * BC, eos, SA, j_s * BC, BT, BC, BC)
    t0, t1, t2, t3 = bos, bos + BC, bos + 2 * BC, bos + 3 * BC
    _store_block(x_h, X00, t0, eos, SA, 0, BT, BC, BC)
    if NS > 1:
        _store_block(x_h, X10, t1, eos, SA, 0, BT, BC, BC)
        _store_block(x_h, X11, t1, eos, SA, BC, BT, BC, BC)
    if NS > 2:
        _store_block(x_h, X20, t2, eos, SA, 0, BT, BC, BC)
        _store_block(x_h, X21, t2, eos, SA, BC, BT, BC, BC)
        _store_block(x_h, X22, t2, eos, SA, 2 * BC, BT, BC, BC)
    if NS > 3:
        _store_block(x_h, X30, t3, eos, SA, 0, BT, BC, BC)
        _store_block(x_h, X31, t3, eos, SA, BC, BT, BC, BC)
        _store_block(x_h, X32, t3, eos, SA, 2 * BC, BT, BC, BC)
        _store_block(x_h, X33, t3, eos, SA, 3 * BC, BT, BC, BC)


@triton.jit
def _finish(A, w, ti, tj, eos, BC: tl.constexpr, DIAG: tl.constexpr, STRICT: tl.constexpr):
    """Rows of block ``(ti, tj)`` times ``w``; zeros for padding and, on the diagonal, above it."""
    o_i = tl.arange(0, BC)
    m = ((ti + o_i) < eos)[:, None] & ((tj + o_i) < eos)[None, :]
    if DIAG:
        if STRICT:
            m = m & (o_i[None, :] < o_i[:, None])
        else:
            m = m & (o_i[None, :] <= o_i[:, None])
    return tl.where(m, A * w, 0.0)


@triton.jit
def _unit_lower_inverse4(A0, A1, A2, A3, BC: tl.constexpr, NS: tl.constexpr):
    """``(I + A)^{-1}`` of the first ``NS`` of four strictly lower ``[BC, BC]`` blocks, by forward substitution.

    Row ``i`` of the inverse ``D`` is ``e_i - sum_{c<i} A_ic D_c``. The four blocks are
    independent, so one loop of ``BC - 1`` steps serves them all (four reductions in
    flight per step instead of one). Blocks past ``NS`` come back as the identity.
    """
    o_i = tl.arange(0, BC)
    eye = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    D0, D1, D2, D3 = eye, eye, eye, eye
    for i in range(1, BC):
        row = o_i[:, None] == i
        # sum_{c<i} A_ic D_c: row i of A against D (rows c >= i of D meet zeros of A)
        D0 = tl.where(row, D0 - tl.sum(tl.sum(tl.where(row, A0, 0.0), axis=0)[:, None] * D0, axis=0)[None, :], D0)
        if NS > 1:
            D1 = tl.where(row, D1 - tl.sum(tl.sum(tl.where(row, A1, 0.0), axis=0)[:, None] * D1, axis=0)[None, :], D1)
        if NS > 2:
            D2 = tl.where(row, D2 - tl.sum(tl.sum(tl.where(row, A2, 0.0), axis=0)[:, None] * D2, axis=0)[None, :], D2)
        if NS > 3:
            D3 = tl.where(row, D3 - tl.sum(tl.sum(tl.where(row, A3, 0.0), axis=0)[:, None] * D3, axis=0)[None, :], D3)
    return D0, D1, D2, D3


@triton.jit
def _u_factors(v_h, U_h, t0, eos, SV, w0, w1, w2, w3, M00, M10, M11, M20, M21, M22, M30, M31, M32, M33,
               V: tl.constexpr, NS: tl.constexpr, BC: tl.constexpr, BV: tl.constexpr, PRECISION: tl.constexpr):
    """``U = M Diag(beta) V`` for the ``NS`` sub-chunks from token ``t0``, tile by tile of ``V``
    (``w_i``: the sub-chunks' ``beta`` rows; blocks past ``NS`` are not read)."""
    t1, t2, t3 = t0 + BC, t0 + 2 * BC, t0 + 3 * BC
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        vb0 = _load_block(v_h, t0, eos, SV, c0, V, BC, BV) * w0
        _store_block(U_h, tl.dot(M00, vb0, input_precision=PRECISION), t0, eos, SV, c0, V, BC, BV)
        if NS > 1:
            vb1 = _load_block(v_h, t1, eos, SV, c0, V, BC, BV) * w1
            b_U = tl.dot(M10, vb0, input_precision=PRECISION)
            b_U = tl.dot(M11, vb1, b_U, input_precision=PRECISION)
            _store_block(U_h, b_U, t1, eos, SV, c0, V, BC, BV)
        if NS > 2:
            vb2 = _load_block(v_h, t2, eos, SV, c0, V, BC, BV) * w2
            b_U = tl.dot(M20, vb0, input_precision=PRECISION)
            b_U = tl.dot(M21, vb1, b_U, input_precision=PRECISION)
            b_U = tl.dot(M22, vb2, b_U, input_precision=PRECISION)
            _store_block(U_h, b_U, t2, eos, SV, c0, V, BC, BV)
        if NS > 3:
            vb3 = _load_block(v_h, t3, eos, SV, c0, V, BC, BV) * w3
            b_U = tl.dot(M30, vb0, input_precision=PRECISION)
            b_U = tl.dot(M31, vb1, b_U, input_precision=PRECISION)
            b_U = tl.dot(M32, vb2, b_U, input_precision=PRECISION)
            b_U = tl.dot(M33, vb3, b_U, input_precision=PRECISION)
            _store_block(U_h, b_U, t3, eos, SV, c0, V, BC, BV)


@triton.jit
def _chunk_local_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32, in-chunk cumulative log decay
    beta,  # [TT, HV] float32
    A_out,  # [TT, HV, BT] out: A_qk (QK), or A_kk (STORE_A, float32)
    W,  # [TT, HV, K] out
    U,  # [TT, HV, V] out
    qg,  # [TT, HV, K] out (QK): scale * q * exp(G)
    kg,  # [TT, HV, K] out: k * exp(G_last - G)
    M_out,  # [TT, HV, BT] float32 out (STORE_M): rows of M = (I + A_kk)^{-1}, for the backward
    flags,  # [NC, HV] int32: 1 where a sub-chunk's span exceeds SPAN (keys' first pass writes, EXACT_DIAG reads)
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
    UT_PREC: tl.constexpr,
    QK: tl.constexpr,  # the queries' pass (A_qk, qg) instead of the keys' pass (A_kk -> M -> W, U, kg)
    EXACT_DIAG: tl.constexpr,  # the second launch: flagged chunks again, with exact diagonal blocks
    STORE_A: tl.constexpr,
    STORE_M: tl.constexpr,
):
    # a 1-D grid, the heads of one chunk side by side: programs running together read whole token rows
    i_c, i_hv = tl.program_id(0) // HV, tl.program_id(0) % HV
    if EXACT_DIAG:
        if tl.load(flags + i_c * HV + i_hv) == 0:
            return  # the first launch's tensor-core diagonal was exact enough
    NS: tl.constexpr = BT // BC
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    # each tensor seen from this head: token rows `stride` apart
    k_h, SK = k + i_h * K, H * K
    if QK:
        x_h = q + i_h * K  # left operand of A: q for A_qk, k for A_kk
    else:
        x_h = k_h
    G_h, SG = G + i_hv * K, HV * K
    t0, t1, t2, t3 = bos, bos + BC, bos + 2 * BC, bos + 3 * BC  # first token of each sub-chunk
    o_i = tl.arange(0, BC)

    # ==== 1. the blocks of A (A_kk, or A_qk in the queries' pass), summed over tiles of K
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    A00, A10, A11, A20, A21, A22, A30, A31, A32, A33 = Z, Z, Z, Z, Z, Z, Z, Z, Z, Z
    z = tl.zeros([BK], dtype=tl.float32)
    d0, d1, d2, d3 = z, z, z, z  # per-channel decay span of each sub-chunk, max over K tiles
    zr = tl.zeros([BC], dtype=tl.float32)
    s0, s1, s2, s3 = zr, zr, zr, zr  # EXACT_DIAG: each row's own span G_ref - G_r, max over K
    qg_h = qg + i_hv * K
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        k0, G0, Gr, lx, x0, sp = _row_block(x_h, k_h, G_h, t0, eos, SK, SG, c0, K, BC, BK)
        d0 = tl.maximum(d0, sp)
        A00 = _accumulate(A00, lx, k0, G0, Gr, SPAN, PRECISION)
        if EXACT_DIAG:
            s0 = tl.maximum(s0, tl.max(Gr - G0, axis=1))
        if QK:
            _store_block(qg_h, x0 * tl.exp(G0) * scale, t0, eos, SG, c0, K, BC, BK)
        if NS > 1:
            k1, G1, Gr, lx, x1, sp = _row_block(x_h, k_h, G_h, t1, eos, SK, SG, c0, K, BC, BK)
            d1 = tl.maximum(d1, sp)
            A10 = _accumulate(A10, lx, k0, G0, Gr, 0.0, PRECISION)
            A11 = _accumulate(A11, lx, k1, G1, Gr, SPAN, PRECISION)
            if EXACT_DIAG:
                s1 = tl.maximum(s1, tl.max(Gr - G1, axis=1))
            if QK:
                _store_block(qg_h, x1 * tl.exp(G1) * scale, t1, eos, SG, c0, K, BC, BK)
        if NS > 2:
            k2, G2, Gr, lx, x2, sp = _row_block(x_h, k_h, G_h, t2, eos, SK, SG, c0, K, BC, BK)
            d2 = tl.maximum(d2, sp)
            A20 = _accumulate(A20, lx, k0, G0, Gr, 0.0, PRECISION)
            A21 = _accumulate(A21, lx, k1, G1, Gr, 0.0, PRECISION)
            A22 = _accumulate(A22, lx, k2, G2, Gr, SPAN, PRECISION)
            if EXACT_DIAG:
                s2 = tl.maximum(s2, tl.max(Gr - G2, axis=1))
            if QK:
                _store_block(qg_h, x2 * tl.exp(G2) * scale, t2, eos, SG, c0, K, BC, BK)
        if NS > 3:
            k3, G3, Gr, lx, x3, sp = _row_block(x_h, k_h, G_h, t3, eos, SK, SG, c0, K, BC, BK)
            d3 = tl.maximum(d3, sp)
            A30 = _accumulate(A30, lx, k0, G0, Gr, 0.0, PRECISION)
            A31 = _accumulate(A31, lx, k1, G1, Gr, 0.0, PRECISION)
            A32 = _accumulate(A32, lx, k2, G2, Gr, 0.0, PRECISION)
            A33 = _accumulate(A33, lx, k3, G3, Gr, SPAN, PRECISION)
            if EXACT_DIAG:
                s3 = tl.maximum(s3, tl.max(Gr - G3, axis=1))
            if QK:
                _store_block(qg_h, x3 * tl.exp(G3) * scale, t3, eos, SG, c0, K, BC, BK)

    if EXACT_DIAG:
        # this chunk's gate is too strong for the split: the rows of its diagonal blocks whose own
        # span passed SPAN exactly, column by column. The other rows keep the tensor-core value
        # the first launch computed, bit for bit, so a strong gate never changes an earlier row
        A00 = tl.where((s0 > SPAN)[:, None], _diag_exact(x_h, k_h, G_h, t0, eos, SK, SG, K, BC, BK), A00)
        if NS > 1:
            A11 = tl.where((s1 > SPAN)[:, None], _diag_exact(x_h, k_h, G_h, t1, eos, SK, SG, K, BC, BK), A11)
        if NS > 2:
            A22 = tl.where((s2 > SPAN)[:, None], _diag_exact(x_h, k_h, G_h, t2, eos, SK, SG, K, BC, BK), A22)
        if NS > 3:
            A33 = tl.where((s3 > SPAN)[:, None], _diag_exact(x_h, k_h, G_h, t3, eos, SK, SG, K, BC, BK), A33)
    elif not QK:
        # flag the chunk for the second launches if any sub-chunk's span passed SAFE_SPAN
        span = tl.maximum(tl.maximum(tl.max(d0, axis=0), tl.max(d1, axis=0)),
                          tl.maximum(tl.max(d2, axis=0), tl.max(d3, axis=0)))
        tl.store(flags + i_c * HV + i_hv, (span > SPAN).to(tl.int32))

    # rows times beta and strictly lower (A_kk, Eq. 5), or times scale and lower (A_qk); padding zeroed
    if QK:
        w0, w1, w2, w3 = scale, scale, scale, scale
    else:
        w0 = tl.load(beta + (t0 + o_i) * HV + i_hv, mask=t0 + o_i < eos, other=0)[:, None]
        w1 = tl.load(beta + (t1 + o_i) * HV + i_hv, mask=t1 + o_i < eos, other=0)[:, None]
        w2 = tl.load(beta + (t2 + o_i) * HV + i_hv, mask=t2 + o_i < eos, other=0)[:, None]
        w3 = tl.load(beta + (t3 + o_i) * HV + i_hv, mask=t3 + o_i < eos, other=0)[:, None]
    STRICT: tl.constexpr = not QK
    A00 = _finish(A00, w0, t0, t0, eos, BC, True, STRICT)
    A10 = _finish(A10, w1, t1, t0, eos, BC, False, STRICT)
    A11 = _finish(A11, w1, t1, t1, eos, BC, True, STRICT)
    A20 = _finish(A20, w2, t2, t0, eos, BC, False, STRICT)
    A21 = _finish(A21, w2, t2, t1, eos, BC, False, STRICT)
    A22 = _finish(A22, w2, t2, t2, eos, BC, True, STRICT)
    A30 = _finish(A30, w3, t3, t0, eos, BC, False, STRICT)
    A31 = _finish(A31, w3, t3, t1, eos, BC, False, STRICT)
    A32 = _finish(A32, w3, t3, t2, eos, BC, False, STRICT)
    A33 = _finish(A33, w3, t3, t3, eos, BC, True, STRICT)

    if QK or STORE_A:
        # whole rows of A: the blocks above the diagonal are zeros
        _store_lower(A_out + i_hv * BT, A00, A10, A11, A20, A21, A22, A30, A31, A32, A33, bos, eos, HV * BT,
                     NS, BT, BC)

    if not QK:
        # ==== 2. M = (I + A_kk)^{-1} by blocks: M_ij = -D_i sum_{j <= c < i} A_ic M_cj, in full float32
        M00, M11, M22, M33 = _unit_lower_inverse4(A00, A11, A22, A33, BC, NS)
        M10 = -tl.dot(M11, tl.dot(A10, M00, input_precision=UT_PREC), input_precision=UT_PREC)
        M21 = -tl.dot(M22, tl.dot(A21, M11, input_precision=UT_PREC), input_precision=UT_PREC)
        M20 = -tl.dot(M22, tl.dot(A20, M00, input_precision=UT_PREC) + tl.dot(A21, M10, input_precision=UT_PREC),
                      input_precision=UT_PREC)
        M32 = -tl.dot(M33, tl.dot(A32, M22, input_precision=UT_PREC), input_precision=UT_PREC)
        M31 = -tl.dot(M33, tl.dot(A31, M11, input_precision=UT_PREC) + tl.dot(A32, M21, input_precision=UT_PREC),
                      input_precision=UT_PREC)
        M30 = -tl.dot(M33, tl.dot(A30, M00, input_precision=UT_PREC) + tl.dot(A31, M10, input_precision=UT_PREC)
                      + tl.dot(A32, M20, input_precision=UT_PREC), input_precision=UT_PREC)
        if STORE_M:
            # whole rows of M for the backward
            _store_lower(M_out + i_hv * BT, M00, M10, M11, M20, M21, M22, M30, M31, M32, M33, bos, eos, HV * BT,
                         NS, BT, BC)

        # ==== 3. W = M Diag(beta)(Gamma * K) and kg, tile by tile of K; then U = M Diag(beta) V
        t_last = tl.minimum(bos + BT, eos) - 1
        W_h, kg_h = W + i_hv * K, kg + i_hv * K
        for i_k in range(0, tl.cdiv(K, BK)):
            o_k = i_k * BK + tl.arange(0, BK)
            c0 = i_k * BK
            G_last = tl.load(G_h + t_last * SG + o_k, mask=o_k < K, other=0)[None, :]
            G0 = _load_block(G_h, t0, eos, SG, c0, K, BC, BK)
            k0 = _load_block(k_h, t0, eos, SK, c0, K, BC, BK)
            kb0 = k0 * tl.exp(G0) * w0
            _store_block(W_h, tl.dot(M00, kb0, input_precision=PRECISION), t0, eos, SG, c0, K, BC, BK)
            _store_block(kg_h, k0 * tl.exp(tl.minimum(G_last - G0, 0.0)), t0, eos, SG, c0, K, BC, BK)
            if NS > 1:
                G1 = _load_block(G_h, t1, eos, SG, c0, K, BC, BK)
                k1 = _load_block(k_h, t1, eos, SK, c0, K, BC, BK)
                kb1 = k1 * tl.exp(G1) * w1
                b_W = tl.dot(M10, kb0, input_precision=PRECISION)
                b_W = tl.dot(M11, kb1, b_W, input_precision=PRECISION)
                _store_block(W_h, b_W, t1, eos, SG, c0, K, BC, BK)
                _store_block(kg_h, k1 * tl.exp(tl.minimum(G_last - G1, 0.0)), t1, eos, SG, c0, K, BC, BK)
            if NS > 2:
                G2 = _load_block(G_h, t2, eos, SG, c0, K, BC, BK)
                k2 = _load_block(k_h, t2, eos, SK, c0, K, BC, BK)
                kb2 = k2 * tl.exp(G2) * w2
                b_W = tl.dot(M20, kb0, input_precision=PRECISION)
                b_W = tl.dot(M21, kb1, b_W, input_precision=PRECISION)
                b_W = tl.dot(M22, kb2, b_W, input_precision=PRECISION)
                _store_block(W_h, b_W, t2, eos, SG, c0, K, BC, BK)
                _store_block(kg_h, k2 * tl.exp(tl.minimum(G_last - G2, 0.0)), t2, eos, SG, c0, K, BC, BK)
            if NS > 3:
                G3 = _load_block(G_h, t3, eos, SG, c0, K, BC, BK)
                k3 = _load_block(k_h, t3, eos, SK, c0, K, BC, BK)
                kb3 = k3 * tl.exp(G3) * w3
                b_W = tl.dot(M30, kb0, input_precision=PRECISION)
                b_W = tl.dot(M31, kb1, b_W, input_precision=PRECISION)
                b_W = tl.dot(M32, kb2, b_W, input_precision=PRECISION)
                b_W = tl.dot(M33, kb3, b_W, input_precision=PRECISION)
                _store_block(W_h, b_W, t3, eos, SG, c0, K, BC, BK)
                _store_block(kg_h, k3 * tl.exp(tl.minimum(G_last - G3, 0.0)), t3, eos, SG, c0, K, BC, BK)
        _u_factors(v + i_hv * V, U + i_hv * V, t0, eos, HV * V, w0, w1, w2, w3, M00, M10, M11, M20, M21, M22, M30,
                   M31, M32, M33, V, NS, BC, BV, PRECISION)


@triton.jit
def _gate_block(g_h, ti, eos, SG, c0, carry, K: tl.constexpr, BC: tl.constexpr, BK: tl.constexpr,
                CUMSUM: tl.constexpr):
    """``G`` on the sub-chunk starting at token ``ti`` (``[BC, BK]``), ``G_ref`` (``G`` at ``ti``) and
    ``G_end`` (``G`` at its last real token), both ``[BK]``.

    With ``CUMSUM`` the pointer holds the per-token log decay ``g`` and ``G`` is its running sum on
    from ``carry`` (``G`` where the previous sub-chunk ended, 0 at the chunk's start): stage 1 done
    on the fly. Otherwise it holds ``G`` already. A sub-chunk of padding gets
    ``G_ref = G_end = carry`` either way (span 0, and ``carry`` passes on unchanged).
    """
    o_k = c0 + tl.arange(0, BK)
    m_k = o_k < K
    real = ti + 0 * o_k < eos  # the sub-chunk has a first real token
    if CUMSUM:
        # zeros past eos (padding decays nothing); each g raised to the floor as stage 1 does
        b_g = tl.maximum(_load_block(g_h, ti, eos, SG, c0, K, BC, BK), G_FLOOR)
        G_i = carry[None, :] + tl.cumsum(b_g, axis=0)
        G_ref = carry + tl.maximum(tl.load(g_h + ti * SG + o_k, mask=m_k & real, other=0).to(tl.float32), G_FLOOR)
        G_end = carry + tl.sum(b_g, axis=0)
    else:
        G_i = _load_block(g_h, ti, eos, SG, c0, K, BC, BK)
        t_end = tl.minimum(ti + BC, eos) - 1
        G_ref = tl.where(real, tl.load(g_h + ti * SG + o_k, mask=m_k & real, other=0), carry)
        G_end = tl.where(real, tl.load(g_h + t_end * SG + o_k, mask=m_k & real, other=0), carry)
    return G_i, G_ref, G_end


@triton.jit
def _diag_exact_pair(Ak, Aq, k_i, q_i, G_i, n_real, BC: tl.constexpr):
    """One ``K`` tile's share of a diagonal block of ``A_kk`` and of ``A_qk`` without the reference
    split, from the sub-chunk's ``k, q, G`` in registers: column ``j`` at a time, every exponent
    ``G_r - G_j`` masked to ``-inf`` *before* the ``exp`` where ``j > r`` or row ``r`` is padding
    (its first ``n_real`` rows are tokens): never positive."""
    o_i = tl.arange(0, BC)
    for jj in range(0, BC):
        sel = (o_i == jj)[:, None]
        k_j = tl.sum(tl.where(sel, k_i, 0.0), axis=0)  # row jj, [BK]
        G_j = tl.sum(tl.where(sel, G_i, 0.0), axis=0)
        m_rj = (o_i >= jj) & (o_i < n_real)
        E = tl.exp(tl.where(m_rj[:, None], G_i - G_j[None, :], float("-inf"))) * k_j[None, :]
        col = o_i[None, :] == jj
        Ak = tl.where(col, Ak + tl.sum(k_i * E, axis=1)[:, None], Ak)
        Aq = tl.where(col, Aq + tl.sum(q_i * E, axis=1)[:, None], Aq)
    return Ak, Aq


@triton.jit
def _one_pass_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    g,  # [TT, HV, K] per-token log decay (CUMSUM), or stage 1's in-chunk cumulative G (float32)
    beta,  # [TT, HV]
    A_qk,  # [TT, HV, BT] out
    A_kk,  # [TT, HV, BT] float32 out (STORE_AKK)
    W,  # [TT, HV, K] out
    U,  # [TT, HV, V] out (FOLD 0)
    Mb,  # [TT, HV, BT] float32 out: Mb = M Diag(beta) (FOLD 2)
    qg,  # [TT, HV, K] out: scale * q * exp(G)
    kg,  # [TT, HV, K] out: k * exp(G_last - G)
    G_end,  # [NC, HV, K] float32 out: G at each chunk's last token (all the state pass reads of G)
    flags,  # [NC, HV] int32: 1 where a sub-chunk's span exceeds SPAN (first launch writes, EXACT_DIAG reads)
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
    BT: tl.constexpr,  # 16 or 32: one or two sub-chunks
    BC: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    SPAN: tl.constexpr,
    PRECISION: tl.constexpr,
    UT_PREC: tl.constexpr,
    CUMSUM: tl.constexpr,
    EXACT_DIAG: tl.constexpr,
    STORE_AKK: tl.constexpr,
    FOLD: tl.constexpr,  # 0: W and U; 2: k_gamma and Mb (W = Mb k_gamma and U = Mb v left to the state pass)
):
    # a 1-D grid, the heads of one chunk side by side: programs running together read whole token rows
    i_c, i_hv = tl.program_id(0) // HV, tl.program_id(0) % HV
    if EXACT_DIAG:
        if tl.load(flags + i_c * HV + i_hv) == 0:
            return
    NS: tl.constexpr = BT // BC
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    q_h, k_h, SK = q + i_h * K, k + i_h * K, H * K
    g_h, SG = g + i_hv * K, HV * K
    qg_h, kg_h, W_h = qg + i_hv * K, kg + i_hv * K, W + i_hv * K
    t0, t1 = bos, bos + BC
    o_i = tl.arange(0, BC)

    # ==== 1. the blocks of A_kk and A_qk, summed over tiles of K. Both share their right
    # operand k_j exp(G_ref - G_j) and their left decay exp(G_r - G_ref); qg, kg and G_end are
    # written on the way (G at the chunk's last token is known once a tile's sub-chunks are summed)
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    Ak00, Ak10, Ak11, Aq00, Aq10, Aq11 = Z, Z, Z, Z, Z, Z
    z = tl.zeros([BK], dtype=tl.float32)
    d0, d1 = z, z  # decay span of each sub-chunk, per channel
    zr = tl.zeros([BC], dtype=tl.float32)
    s0, s1 = zr, zr  # EXACT_DIAG: each row's own span G_ref - G_r, max over K
    Ek00, Ek11, Eq00, Eq11 = Z, Z, Z, Z  # EXACT_DIAG: the diagonal blocks without the split
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        o_k = c0 + tl.arange(0, BK)
        G0, Gr0, Ge0 = _gate_block(g_h, t0, eos, SG, c0, z, K, BC, BK, CUMSUM)
        k0 = _load_block(k_h, t0, eos, SK, c0, K, BC, BK)
        q0 = _load_block(q_h, t0, eos, SK, c0, K, BC, BK)
        d0 = tl.maximum(d0, Gr0 - Ge0)
        e0 = tl.exp(tl.minimum(G0 - Gr0[None, :], 0.0))
        r0 = k0 * tl.exp(tl.minimum(Gr0[None, :] - G0, SPAN))
        Ak00 = tl.dot(k0 * e0, tl.trans(r0), Ak00, input_precision=PRECISION)
        Aq00 = tl.dot(q0 * e0, tl.trans(r0), Aq00, input_precision=PRECISION)
        if EXACT_DIAG:
            s0 = tl.maximum(s0, tl.max(Gr0[None, :] - G0, axis=1))
            Ek00, Eq00 = _diag_exact_pair(Ek00, Eq00, k0, q0, G0, eos - t0, BC)
        G_last = Ge0
        if NS > 1:
            G1, Gr1, Ge1 = _gate_block(g_h, t1, eos, SG, c0, Ge0, K, BC, BK, CUMSUM)
            k1 = _load_block(k_h, t1, eos, SK, c0, K, BC, BK)
            q1 = _load_block(q_h, t1, eos, SK, c0, K, BC, BK)
            d1 = tl.maximum(d1, Gr1 - Ge1)
            e1 = tl.exp(tl.minimum(G1 - Gr1[None, :], 0.0))
            r10 = k0 * tl.exp(tl.minimum(Gr1[None, :] - G0, 0.0))
            Ak10 = tl.dot(k1 * e1, tl.trans(r10), Ak10, input_precision=PRECISION)
            Aq10 = tl.dot(q1 * e1, tl.trans(r10), Aq10, input_precision=PRECISION)
            r1 = k1 * tl.exp(tl.minimum(Gr1[None, :] - G1, SPAN))
            Ak11 = tl.dot(k1 * e1, tl.trans(r1), Ak11, input_precision=PRECISION)
            Aq11 = tl.dot(q1 * e1, tl.trans(r1), Aq11, input_precision=PRECISION)
            if EXACT_DIAG:
                s1 = tl.maximum(s1, tl.max(Gr1[None, :] - G1, axis=1))
                Ek11, Eq11 = _diag_exact_pair(Ek11, Eq11, k1, q1, G1, eos - t1, BC)
            G_last = Ge1
            x1 = tl.exp(G1)  # Gamma of the sub-chunk, shared by qg and (FOLD 2) k_gamma
            _store_block(qg_h, q1 * x1 * scale, t1, eos, SG, c0, K, BC, BK)
            _store_block(kg_h, k1 * tl.exp(tl.minimum(G_last[None, :] - G1, 0.0)), t1, eos, SG, c0, K, BC, BK)
            if FOLD == 2:
                _store_block(W_h, k1 * x1, t1, eos, SG, c0, K, BC, BK)
        x0 = tl.exp(G0)
        _store_block(qg_h, q0 * x0 * scale, t0, eos, SG, c0, K, BC, BK)
        _store_block(kg_h, k0 * tl.exp(tl.minimum(G_last[None, :] - G0, 0.0)), t0, eos, SG, c0, K, BC, BK)
        if FOLD == 2:  # k_gamma = Gamma * K, W's right factor: the state pass applies Mb to it
            _store_block(W_h, k0 * x0, t0, eos, SG, c0, K, BC, BK)
        tl.store(G_end + (i_c * HV + i_hv) * K + o_k, G_last, mask=o_k < K)

    if EXACT_DIAG:
        # the rows whose own span passed SPAN take the exact diagonal; the others keep the
        # tensor-core value of the first launch, bit for bit (no later gate changes them)
        Ak00 = tl.where((s0 > SPAN)[:, None], Ek00, Ak00)
        Aq00 = tl.where((s0 > SPAN)[:, None], Eq00, Aq00)
        Ak11 = tl.where((s1 > SPAN)[:, None], Ek11, Ak11)
        Aq11 = tl.where((s1 > SPAN)[:, None], Eq11, Aq11)
    else:
        # flag the chunk for the second launch if a sub-chunk's span passed SAFE_SPAN
        tl.store(flags + i_c * HV + i_hv, (tl.maximum(tl.max(d0, axis=0), tl.max(d1, axis=0)) > SPAN).to(tl.int32))

    # rows times beta and strictly lower (A_kk, Eq. 5), times scale and lower (A_qk); padding zeroed
    w0 = tl.load(beta + (t0 + o_i) * HV + i_hv, mask=t0 + o_i < eos, other=0).to(tl.float32)[:, None]
    w1 = tl.load(beta + (t1 + o_i) * HV + i_hv, mask=t1 + o_i < eos, other=0).to(tl.float32)[:, None]
    Ak00 = _finish(Ak00, w0, t0, t0, eos, BC, True, True)
    Ak10 = _finish(Ak10, w1, t1, t0, eos, BC, False, True)
    Ak11 = _finish(Ak11, w1, t1, t1, eos, BC, True, True)
    Aq00 = _finish(Aq00, scale, t0, t0, eos, BC, True, False)
    Aq10 = _finish(Aq10, scale, t1, t0, eos, BC, False, False)
    Aq11 = _finish(Aq11, scale, t1, t1, eos, BC, True, False)
    _store_lower(A_qk + i_hv * BT, Aq00, Aq10, Aq11, Z, Z, Z, Z, Z, Z, Z, bos, eos, HV * BT, NS, BT, BC)
    if STORE_AKK:
        _store_lower(A_kk + i_hv * BT, Ak00, Ak10, Ak11, Z, Z, Z, Z, Z, Z, Z, bos, eos, HV * BT, NS, BT, BC)

    # ==== 2. M = (I + A_kk)^{-1}: the diagonal inverses, and M_10 = -D_1 A_10 D_0
    M00, M11, M22, M33 = _unit_lower_inverse4(Ak00, Ak11, Z, Z, BC, NS)  # M22, M33: unused identities
    M10 = -tl.dot(M11, tl.dot(Ak10, M00, input_precision=UT_PREC), input_precision=UT_PREC)

    if FOLD > 0:  # Mb = M Diag(beta), for the state pass to apply to the values (and, FOLD 2, to k_gamma)
        b0 = tl.load(beta + (t0 + o_i) * HV + i_hv, mask=t0 + o_i < eos, other=0).to(tl.float32)[None, :]
        b1 = tl.load(beta + (t1 + o_i) * HV + i_hv, mask=t1 + o_i < eos, other=0).to(tl.float32)[None, :]
        _store_lower(Mb + i_hv * BT, M00 * b0, M10 * b0, M11 * b1, Z, Z, Z, Z, Z, Z, Z, bos, eos, HV * BT, NS, BT, BC)
    if FOLD == 2:
        return

    # ==== 3. W = M Diag(beta)(Gamma * K), tile by tile of K (G made again from g); U = M Diag(beta) V
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        G0, Gr0, Ge0 = _gate_block(g_h, t0, eos, SG, c0, z, K, BC, BK, CUMSUM)
        kb0 = _load_block(k_h, t0, eos, SK, c0, K, BC, BK) * tl.exp(G0) * w0
        _store_block(W_h, tl.dot(M00, kb0, input_precision=PRECISION), t0, eos, SG, c0, K, BC, BK)
        if NS > 1:
            G1, Gr1, Ge1 = _gate_block(g_h, t1, eos, SG, c0, Ge0, K, BC, BK, CUMSUM)
            kb1 = _load_block(k_h, t1, eos, SK, c0, K, BC, BK) * tl.exp(G1) * w1
            b_W = tl.dot(M10, kb0, input_precision=PRECISION)
            b_W = tl.dot(M11, kb1, b_W, input_precision=PRECISION)
            _store_block(W_h, b_W, t1, eos, SG, c0, K, BC, BK)
    if FOLD == 0:
        _u_factors(v + i_hv * V, U + i_hv * V, t0, eos, HV * V, w0, w1, w1, w1, M00, M10, M11, Z, Z, Z, Z, Z, Z, Z,
                   V, NS, BC, BV, PRECISION)


class LocalFactors(NamedTuple):
    """What :func:`chunk_local_factors` returns (token layout ``[B, T, HV, ...]``)."""

    A_qk: torch.Tensor  #: ``[B, T, HV, C]``: ``scale q_r (k_j exp(G_r - G_j))``, ``j <= r``
    W: torch.Tensor  #: ``[B, T, HV, K]``: ``M Diag(beta)(Gamma * K)`` (Eq. 7)
    U: torch.Tensor  #: ``[B, T, HV, V]``: ``M Diag(beta) V`` (Eq. 7)
    qg: torch.Tensor  #: ``[B, T, HV, K]``: ``scale * q * exp(G)``
    kg: torch.Tensor  #: ``[B, T, HV, K]``: ``k * exp(G_last - G)``
    A_kk: Optional[torch.Tensor]  #: ``[B, T, HV, C]`` float32, only with ``store_akk``
    M: Optional[torch.Tensor] = None  #: ``[B, T, HV, C]`` float32 ``(I + A_kk)^{-1}``, only with ``store_m``
    #: ``[NC, HV, K]`` float32: ``G`` at each chunk's last token (:func:`chunk_local_factors_one_pass`)
    G_end: Optional[torch.Tensor] = None
    #: ``[B, T, HV, C]`` float32 ``Mb = M Diag(beta)``, the UT transform the state pass applies itself
    #: (:func:`chunk_local_factors_one_pass` with ``fold``; ``U = Mb V`` is then ``None``)
    Mb: Optional[torch.Tensor] = None
    #: ``[B, T, HV, K]``: ``Gamma * K``, ``W``'s right factor (``fold=2``; ``W = Mb k_gamma`` is then ``None``)
    k_gamma: Optional[torch.Tensor] = None


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
    store_m: bool = False,
    meta: Optional[SeqMeta] = None,
    config: Optional[LocalConfig] = None,
) -> LocalFactors:
    """Everything stages 5 and 6 need from one chunk, in one launch.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; G: ``[B, T, HV, K]`` float32 in-chunk
            cumulative log decay; beta: ``[B, T, HV]`` float32.
        store_akk: also return ``A_kk`` (for tests; the pipeline never reads it).
        store_m: also return ``M = (I + A_kk)^{-1}`` (the backward reads it).
        config: the launch of each pass (default: :func:`~kda_explained.fast.config.plan_for` the device).

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
    config = config or plan_for(q.device).local
    dt = intermediate_dtype(q.dtype)
    dev = q.device
    A_qk = torch.empty(B, T, HV, chunk_size, dtype=dt, device=dev)
    A_kk = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=dev) if store_akk else None
    M = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=dev) if store_m else None
    W = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    U = torch.empty(B, T, HV, V, dtype=dt, device=dev)
    qg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    kg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    if meta.NC > 0:
        flags = torch.empty(meta.NC, HV, dtype=torch.int32, device=dev)
        inputs = (q.contiguous(), k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous().float())
        consts = dict(H=H, HV=HV, K=K, V=V, BT=chunk_size, BC=BC, BV=tile(V, 64),
                      SPAN=config.span, PRECISION=dot_precision(q.dtype),
                      UT_PREC=config.ut_precision if dot_precision(q.dtype) == "tf32" else "ieee")
        tables = (flags, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale))
        # the keys' pass (A_kk -> M -> W, U, kg), then the queries' pass (A_qk, qg); each launched
        # twice: every chunk with the tensor-core diagonal, then the chunks the first keys' pass
        # flagged, exactly (the other programs read their flag and exit: typical gates never pay)
        for qk, out in ((False, A_kk if store_akk else A_qk), (True, A_qk)):
            launch = config.queries if qk else config.keys
            for exact in (False, True):
                _chunk_local_kernel[(meta.NC * HV,)](
                    *inputs, out, W, U, qg, kg, M if store_m else out, *tables, **consts,
                    BK=tile(K, launch.BK), QK=qk, EXACT_DIAG=exact,
                    STORE_A=qk or store_akk, STORE_M=store_m and not qk, num_warps=launch.warps,
                    num_stages=launch.stages)
    return LocalFactors(A_qk, W, U, qg, kg, A_kk, M)



def chunk_local_factors_one_pass(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    cumulative: bool = False,
    store_akk: bool = False,
    fold: int = 0,
    meta: Optional[SeqMeta] = None,
    config: Optional[OnePassConfig] = None,
) -> LocalFactors:
    """Stages 1-4 for chunks of 16 or 32 tokens in one pass: ``g``, ``q``, ``k``, ``v`` read once.

    What :func:`~kda_explained.fast.prepare.chunk_local_cumsum` and :func:`chunk_local_factors`
    compute together, for short chunks: a chunk of at most 32 tokens has three ``[16, 16]``
    blocks each of ``A_kk`` and ``A_qk``, few enough for one program (the keys' and queries'
    passes exist because 64-token chunks have twenty). The in-chunk cumulative decay ``G`` is
    made on the fly from ``g`` and never written: the state pass reads ``G`` only at each
    chunk's last token, returned as ``G_end``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` per-token log decay
            (any float dtype), or with ``cumulative`` stage 1's in-chunk cumulative ``G``
            (float32; what the gate options' path computes); beta: ``[B, T, HV]``.
        chunk_size: 16 or 32.
        store_akk: also return ``A_kk`` (float32, for tests).
        fold: how much of the WY representation is left to the state pass, which applies
            ``Mb = M Diag(beta)`` (returned, float32) to each chunk itself: 0 none (``W`` and ``U``
            returned), 1 the values (``U = Mb V`` is not formed: ``v`` is never read here),
            2 the values and the keys (neither ``U`` nor ``W = Mb k_gamma``: ``k_gamma = Gamma * K`` is
            returned instead, and the second sweep over ``k`` and ``g`` that ``W`` needs is gone).

    Returns:
        :class:`LocalFactors` with ``A_qk``, ``W``, ``U``, ``qg``, ``kg`` (in
        :func:`intermediate_dtype` of ``q``), ``G_end: [NC, HV, K]`` float32 and, with
        ``store_akk``, ``A_kk``; ``M`` is ``None``. With ``fold``: ``Mb``, and ``U`` is ``None``
        (and for ``fold=2`` ``k_gamma``, with ``W`` ``None``).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    BC = 16
    if chunk_size not in (16, 32):
        raise ValueError(f"chunk_size: expected 16 or 32 for the one-pass kernel, got {chunk_size}")
    if fold not in (0, 2):
        raise ValueError(f"fold: expected 0 or 2, got {fold!r}")
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    config = config or plan_for(q.device).one_pass
    dt = intermediate_dtype(q.dtype)
    dev = q.device
    A_qk = torch.empty(B, T, HV, chunk_size, dtype=dt, device=dev)
    A_kk = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=dev) if store_akk else None
    W = torch.empty(B, T, HV, K, dtype=dt, device=dev)  # k_gamma with fold=2
    U = torch.empty(B, T, HV, V, dtype=dt, device=dev) if fold == 0 else None
    Mb = torch.empty(B, T, HV, chunk_size, dtype=torch.float32, device=dev) if fold else None
    qg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    kg = torch.empty(B, T, HV, K, dtype=dt, device=dev)
    G_end = torch.empty(meta.NC, HV, K, dtype=torch.float32, device=dev)
    if meta.NC > 0:
        flags = torch.empty(meta.NC, HV, dtype=torch.int32, device=dev)
        launch = config.launch
        cap = {} if launch.maxnreg is None or interpreting() else {"maxnreg": launch.maxnreg}
        for exact in (False, True):  # every chunk, then the flagged ones with exact diagonal blocks
            _one_pass_kernel[(meta.NC * HV,)](
                q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
                A_qk, A_kk if store_akk else A_qk, W, W if U is None else U, A_qk if Mb is None else Mb, qg, kg,
                G_end, flags,
                meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
                H=H, HV=HV, K=K, V=V, BT=chunk_size, BC=BC, BK=tile(K, launch.BK),
                BV=tile(V, 64), SPAN=config.span,
                PRECISION=dot_precision(q.dtype),
                UT_PREC=config.ut_precision if dot_precision(q.dtype) == "tf32" else "ieee",
                CUMSUM=not cumulative, EXACT_DIAG=exact, STORE_AKK=store_akk, FOLD=fold,
                num_warps=launch.warps, num_stages=launch.stages, **cap,
            )
    if fold == 2:
        return LocalFactors(A_qk, None, None, qg, kg, A_kk, None, G_end, Mb, W)
    return LocalFactors(A_qk, W, U, qg, kg, A_kk, None, G_end, Mb)


@triton.jit
def _wy_factors_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32
    beta,  # [TT, HV] float32
    M,  # [TT, HV, BT] (I + A_kk)^{-1}, whole chunk rows (the keys' pass's store_m)
    W,  # [TT, HV, K] out
    U,  # [TT, HV, V] out
    qg,  # [TT, HV, K] out
    kg,  # [TT, HV, K] out
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
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos = chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    m_t = bos + o_t < eos
    b_M = tl.load(M + ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :], mask=m_t[:, None] & m_t[None, :],
                  other=0).to(tl.float32)  # [BT, BT]
    b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0)  # [BT]
    t_last = tl.minimum(bos + BT, eos) - 1
    # W = M Diag(beta)(Gamma * K), kg = k exp(G_last - G), qg = scale q exp(G), tile by tile of K
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        p_in = ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :]
        p_out = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        b_k = tl.load(k + p_in, mask=m_tk, other=0).to(tl.float32)
        b_q = tl.load(q + p_in, mask=m_tk, other=0).to(tl.float32)
        b_G = tl.load(G + p_out, mask=m_tk, other=0)
        b_Glast = tl.load(G + (t_last * HV + i_hv) * K + o_k, mask=m_k, other=0)
        b_kb = b_k * tl.exp(b_G) * b_beta[:, None]
        tl.store(W + p_out, tl.dot(b_M, b_kb, input_precision=PRECISION).to(W.dtype.element_ty), mask=m_tk)
        tl.store(kg + p_out, (b_k * tl.exp(tl.minimum(b_Glast[None, :] - b_G, 0.0))).to(kg.dtype.element_ty),
                 mask=m_tk)
        tl.store(qg + p_out, (b_q * tl.exp(b_G) * scale).to(qg.dtype.element_ty), mask=m_tk)
    # U = M Diag(beta) V, tile by tile of V
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_v = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_vb = tl.load(v + p_v, mask=m_tv, other=0).to(tl.float32) * b_beta[:, None]
        tl.store(U + p_v, tl.dot(b_M, b_vb, input_precision=PRECISION).to(U.dtype.element_ty), mask=m_tv)


def chunk_wy_factors(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    meta: Optional[SeqMeta] = None,
    config: Optional[WYFactorsConfig] = None,
) -> LocalFactors:
    """Stage 4 alone, given ``M``: the WY factors and the decayed operands, without ``A_kk`` or the UT solve.

    The backward's recompute of the forward when the forward kept ``M = (I + A_kk)^{-1}`` and
    ``A_qk`` (what :func:`chunk_local_factors` computes with ``store_m``): ``W = M Diag(beta)
    (Gamma * K)``, ``U = M Diag(beta) V`` (:func:`kda_explained.chunked.stages.wy_representation`),
    ``qg = scale q exp(G)`` and ``kg = k exp(G_last - G)``
    (:func:`kda_explained.chunked.stages.decayed_operands`). Two ``[C, C] @ [C, 64]`` products per
    tile and element-wise work, where :func:`chunk_local_factors` also builds ``A_kk`` and ``A_qk``
    from ``[16, K]`` blocks and inverts ``I + A_kk``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; G: ``[B, T, HV, K]`` float32; beta:
            ``[B, T, HV]`` float32; M: ``[B, T, HV, C]`` (whole chunk rows).

    Returns:
        :class:`LocalFactors` with ``W``, ``U``, ``qg``, ``kg`` (in :func:`intermediate_dtype` of
        ``q``); its ``A_qk``, ``A_kk`` are ``None`` and its ``M`` is the one given.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    dt = intermediate_dtype(q.dtype)
    W = torch.empty(B, T, HV, K, dtype=dt, device=q.device)
    U = torch.empty(B, T, HV, V, dtype=dt, device=q.device)
    qg, kg = torch.empty_like(W), torch.empty_like(W)
    launch = (config or plan_for(q.device).wy_factors).launch
    if meta.NC > 0:
        _wy_factors_kernel[(meta.NC, HV)](
            q.contiguous(), k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous().float(), M.contiguous(),
            W, U, qg, kg, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K, launch.BK),
            BV=tile(V, launch.BV), PRECISION=dot_precision(q.dtype),
            num_warps=launch.warps, num_stages=launch.stages,
        )
    return LocalFactors(None, W, U, qg, kg, None, M)
