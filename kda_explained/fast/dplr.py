"""General DPLR on the GPU: the chunkwise forward of :mod:`kda_explained.chunked.dplr` as Triton kernels.

The recurrence (one value head, state ``S_t: [K, V]``)::

    S_t = (Diag(exp(g_t)) - a_t b_t^T) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)

This module exists to put general DPLR beside KDA on the same GPU (the Kimi Linear report's
Fig. 2 compares the two chunkwise kernels; ``benchmarks/gpu_dplr_bench.py`` times them).
It is a forward for inference: there is no backward, and :func:`dplr` refuses inputs that
require grad (:func:`kda_explained.chunked.dplr.dplr` is the differentiable version).

Stage by stage, each kernel has a PyTorch twin of the same name and the same positional
arguments; only keyword-only options (``meta``, ``config``, ``out_dtype``) are added here:

=====  =====================================================  ======================================================
stage  here                                                   twin
=====  =====================================================  ======================================================
1      :func:`kda_explained.fast.prepare.chunk_local_cumsum`  :func:`kda_explained.chunked.stages.chunk_local_cumsum`
2      :func:`dplr_intra_chunk_matrices`                      :func:`kda_explained.chunked.dplr.dplr_intra_chunk_matrices`
3      :func:`ut_transform`                                   :func:`kda_explained.chunked.stages.ut_transform`
4      :func:`dplr_wy_representation`                         :func:`kda_explained.chunked.dplr.dplr_wy_representation`
5      :func:`dplr_state_passing`                             :func:`kda_explained.chunked.dplr.dplr_state_passing`
6      :func:`dplr_chunk_output`                              :func:`kda_explained.chunked.dplr.dplr_chunk_output`
=====  =====================================================  ======================================================

Glossary (one chunk of ``BT`` tokens, local index ``t``, one value head)
-------------------------------------------------------------------------
As in :mod:`kda_explained.chunked.dplr`.

=============  ===========================================================================
``BT``         chunk length (16, 32 or 64); ``BC = 16`` tokens per sub-chunk, ``NS = BT / BC``
``G``          in-chunk cumulative log decay ``G_t = sum_{i<=t} g_i`` (stage 1), float32
``G_prev``     ``G`` one token earlier inside the chunk (0 at its first token)
``A_ba``       ``b_t^T Diag(exp(G_{t-1} - G_j)) a_j`` for ``j < t``; ``A_bk`` the same with ``k_j``
``A_qa``       ``scale q_t^T Diag(exp(G_t - G_j)) a_j`` for ``j <= t``; ``A_qk`` the same with ``k_j``
``M``          the UT transform ``(I + A_ba)^{-1}``
``W, U``       the WY factors: the rank-1 writes are ``x = U - W S_0``
``x``          what each token's rank-1 term writes, under key ``a_t``
``h``          the state entering every chunk, ``[NC, HV, K, V]`` float32
=============  ===========================================================================

Layout: every kernel sees the batch as one packed row of ``TT = B * T`` tokens
(``kda_explained.fast._meta``), tensors in the token layout ``[TT, heads, width]``;
a per-chunk matrix is stored by rows, ``[TT, HV, BT]``: row ``t`` holds the entries
against the ``BT`` tokens of ``t``'s own chunk (the chunked layer's layout too). Every
grid puts the chunks (in stage 5, the sequences) on its first axis, the one CUDA does
not cap at 65535.

Numerics: as in the chunked stages, every exponent is ``<= 0``. Decays enter only as
``exp(G_left_r - G_j)`` with the row's log decay at or after the column's, split through
a reference point inside the chunk where a tensor-core product needs the split (stage 2),
or read towards the chunk's end (stages 5, 6). Each exponent that is ``<= 0`` in exact
arithmetic is also clamped at 0 (``tl.minimum(., 0)``): that changes nothing for real
tokens, and keeps the zero padding of a short chunk (where ``G`` reads as 0) from forming
``exp`` of a positive number. Products run on ``tl.dot`` with float32 operands: full
float32 for float32 inputs, tf32 for bf16/fp16 inputs (``dot_precision``),
and always full float32 for the UT transform, whose ``M`` feeds every later stage.
``A_ba`` and ``M`` are kept in float32; the other intermediates in
:func:`kda_explained.fast.local.intermediate_dtype` of the inputs, the storage policy of
the KDA stages, so that the two pipelines move the same kinds of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..chunked.kda import as_tensor_cu_seqlens, require_tensors
from ..validation import check_chunk_size, check_floating, check_kda_inputs, check_shape
from ._meta import SeqMeta, dot_precision, seq_meta, tile
from .config import KernelLaunch
from .inputs import FAST_CHUNK_SIZES, check_fast_device, check_fast_dtypes
from .local import intermediate_dtype
from .prepare import chunk_local_cumsum

__all__ = [
    "dplr",
    "dplr_intra_chunk_matrices",
    "ut_transform",
    "dplr_wy_representation",
    "dplr_state_passing",
    "dplr_chunk_output",
    "DPLRConfig",
    "DPLR_MAX_HEAD_DIM",
]

#: Largest ``K`` and ``V``: the state pass keeps a whole ``[K, BV]`` state tile in registers.
DPLR_MAX_HEAD_DIM = 128
#: Sub-chunk width: the tensor-core tile side of the intra-chunk products and of the UT blocks.
_BC = 16


@dataclass(frozen=True)
class DPLRConfig:
    """Launch settings of the DPLR kernels, one :class:`~kda_explained.fast.config.KernelLaunch` each.

    Starting points taken from the KDA kernels of the same shape (not tuned for DPLR):
    ``intra.BK`` is the ``K`` tile of stage 2, whose diagonal blocks hold ``[16, 16, BK]``
    ratio tiles; ``state.BV`` the value columns of one state program (the whole ``K`` is one
    tile there); ``state_f32``: the state pass on float32 intermediates, one stage (two would
    take 221 KB of shared memory at ``C = 64``, ``K = 128``, more than most GPUs have).
    ``ut_precision``: the UT transform's products ("ieee": full float32).
    """

    intra: KernelLaunch = KernelLaunch(warps=4, stages=1, BK=32)
    ut: KernelLaunch = KernelLaunch(warps=4)
    wy: KernelLaunch = KernelLaunch(warps=4, BK=64, BV=64)
    state: KernelLaunch = KernelLaunch(warps=4, stages=2, BV=32)
    state_f32: KernelLaunch = KernelLaunch(warps=4, stages=1, BV=32)
    output: KernelLaunch = KernelLaunch(warps=4, stages=2, BK=64, BV=64)
    ut_precision: str = "ieee"


# ----------------------------------------------------------------------------------------------
# Tiles of the packed token layout
# ----------------------------------------------------------------------------------------------
@triton.jit
def _load_tile(x, t0, eos, stride_t, c0, NCOL: tl.constexpr, BR: tl.constexpr, BX: tl.constexpr):
    """``[BR, BX]`` float32: token rows ``t0 ..`` (``stride_t`` apart), columns ``c0 ..``; zeros past
    ``eos`` (the sequence's end) and past ``NCOL`` columns."""
    o_r = tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BX)
    m = (t0 + o_r < eos)[:, None] & (o_c < NCOL)[None, :]
    return tl.load(x + (t0 + o_r[:, None]) * stride_t + o_c[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _load_prev_tile(G, t0, bos, eos, stride_t, c0, NCOL: tl.constexpr, BR: tl.constexpr, BX: tl.constexpr):
    """``G_prev`` on rows ``t0 ..``: ``G`` one token earlier, 0 at the chunk's first token ``bos``
    (a shift of the chunk grid, as :func:`kda_explained.chunked.dplr._chunk_G_prev`: exact)."""
    o_r = tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BX)
    t = t0 + o_r
    m = ((t > bos) & (t < eos))[:, None] & (o_c < NCOL)[None, :]
    return tl.load(G + (t[:, None] - 1) * stride_t + o_c[None, :], mask=m, other=0).to(tl.float32)


@triton.jit
def _store_tile(x, b, t0, eos, stride_t, c0, NCOL: tl.constexpr, BR: tl.constexpr, BX: tl.constexpr):
    """Write ``b: [BR, BX]`` where :func:`_load_tile` would read, in ``x``'s dtype."""
    o_r = tl.arange(0, BR)
    o_c = c0 + tl.arange(0, BX)
    m = (t0 + o_r < eos)[:, None] & (o_c < NCOL)[None, :]
    tl.store(x + (t0 + o_r[:, None]) * stride_t + o_c[None, :], b.to(x.dtype.element_ty), mask=m)


# ----------------------------------------------------------------------------------------------
# Stage 2: the four intra-chunk interaction matrices
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dplr_intra_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    a,  # [TT, HV, K]
    b,  # [TT, HV, K]
    G,  # [TT, HV, K] in-chunk cumulative log decay
    A_ba,  # [TT, HV, BT] out (float32)
    A_bk,  # [TT, HV, BT] out
    A_qa,  # [TT, HV, BT] out
    A_qk,  # [TT, HV, BT] out
    cu,  # [N + 1] sequence offsets
    chunk_seq,  # [NC] sequence of each chunk
    chunk_bos,  # [NC] first token of each chunk
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
    # one program: the BC rows of sub-chunk i_s of chunk i_c, value head i_hv, in all four matrices
    i_c, i_s, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NS: tl.constexpr = BT // BC
    i_h = i_hv // (HV // H)  # GVA: the q/k head this value head reads
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    ti = bos + i_s * BC  # the row block's first token
    if ti >= eos:
        return  # a sub-chunk of padding: no rows to write
    # each tensor seen from this head: token rows `stride` apart
    q_h, k_h, SQ = q + i_h * K, k + i_h * K, H * K
    a_h, b_h, G_h, SG = a + i_hv * K, b + i_hv * K, G + i_hv * K, HV * K
    SA = HV * BT
    o_r = tl.arange(0, BC)

    # ==== 1. the blocks left of the diagonal, column block j < i_s: one tensor-core product each.
    # The ratio splits through G_ref, G at the last token of column block j (the chunked stage's
    # reference point): exp(G_left_r - G_j) = exp(G_left_r - G_ref) exp(G_ref - G_j). Both
    # exponents are <= 0: j <= ref, and every row r is after block j, so r - 1 >= ref
    # (G_left = G_prev for the b rows, G for the q rows).
    for j in range(0, i_s):
        tj = bos + j * BC
        t_ref = tj + BC - 1  # a real token: the row block after it has one
        P_ba = tl.zeros([BC, BC], dtype=tl.float32)
        P_bk = tl.zeros([BC, BC], dtype=tl.float32)
        P_qa = tl.zeros([BC, BC], dtype=tl.float32)
        P_qk = tl.zeros([BC, BC], dtype=tl.float32)
        for i_k in range(0, tl.cdiv(K, BK)):
            c0 = i_k * BK
            o_k = c0 + tl.arange(0, BK)
            G_ref = tl.load(G_h + t_ref * SG + o_k, mask=o_k < K, other=0).to(tl.float32)[None, :]
            # right factors of column block j: x_j exp(G_ref - G_j)
            r_dec = tl.exp(tl.minimum(G_ref - _load_tile(G_h, tj, eos, SG, c0, K, BC, BK), 0.0))
            ra = _load_tile(a_h, tj, eos, SG, c0, K, BC, BK) * r_dec
            rk = _load_tile(k_h, tj, eos, SQ, c0, K, BC, BK) * r_dec
            # left factors of the row block: b_r exp(G_prev_r - G_ref), q_r exp(G_r - G_ref)
            lb = _load_tile(b_h, ti, eos, SG, c0, K, BC, BK) * tl.exp(
                tl.minimum(_load_prev_tile(G_h, ti, bos, eos, SG, c0, K, BC, BK) - G_ref, 0.0))
            lq = _load_tile(q_h, ti, eos, SQ, c0, K, BC, BK) * tl.exp(
                tl.minimum(_load_tile(G_h, ti, eos, SG, c0, K, BC, BK) - G_ref, 0.0))
            P_ba = tl.dot(lb, tl.trans(ra), P_ba, input_precision=PRECISION)
            P_bk = tl.dot(lb, tl.trans(rk), P_bk, input_precision=PRECISION)
            P_qa = tl.dot(lq, tl.trans(ra), P_qa, input_precision=PRECISION)
            P_qk = tl.dot(lq, tl.trans(rk), P_qk, input_precision=PRECISION)
        _store_tile(A_ba + i_hv * BT, P_ba, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_bk + i_hv * BT, P_bk, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_qa + i_hv * BT, P_qa * scale, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_qk + i_hv * BT, P_qk * scale, ti, eos, SA, j * BC, BT, BC, BC)

    # ==== 2. the diagonal block, element by element: the ratios on a [BC(r), BC(j), BK] tile, each
    # exponent masked to -inf *before* the exp where j > r (j >= r for the strict b rows) or where
    # a row or column is padding, so that no exponent is ever positive
    real = ti + o_r < eos
    both = real[:, None] & real[None, :]
    causal = (o_r[None, :] <= o_r[:, None]) & both  # j <= r: A_qa, A_qk
    strict = (o_r[None, :] < o_r[:, None]) & both  # j < r: A_ba, A_bk
    D_ba = tl.zeros([BC, BC], dtype=tl.float32)
    D_bk = tl.zeros([BC, BC], dtype=tl.float32)
    D_qa = tl.zeros([BC, BC], dtype=tl.float32)
    D_qk = tl.zeros([BC, BC], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        G_i = _load_tile(G_h, ti, eos, SG, c0, K, BC, BK)
        Gp_i = _load_prev_tile(G_h, ti, bos, eos, SG, c0, K, BC, BK)
        a_i = _load_tile(a_h, ti, eos, SG, c0, K, BC, BK)[None, :, :]  # [1, BC(j), BK]
        k_i = _load_tile(k_h, ti, eos, SQ, c0, K, BC, BK)[None, :, :]
        b_i = _load_tile(b_h, ti, eos, SG, c0, K, BC, BK)[:, None, :]  # [BC(r), 1, BK]
        q_i = _load_tile(q_h, ti, eos, SQ, c0, K, BC, BK)[:, None, :]
        E_q = tl.exp(tl.where(causal[:, :, None], G_i[:, None, :] - G_i[None, :, :], float("-inf")))
        E_b = tl.exp(tl.where(strict[:, :, None], Gp_i[:, None, :] - G_i[None, :, :], float("-inf")))
        D_qa += tl.sum(q_i * E_q * a_i, axis=2)
        D_qk += tl.sum(q_i * E_q * k_i, axis=2)
        D_ba += tl.sum(b_i * E_b * a_i, axis=2)
        D_bk += tl.sum(b_i * E_b * k_i, axis=2)
    c_diag = i_s * BC
    _store_tile(A_ba + i_hv * BT, D_ba, ti, eos, SA, c_diag, BT, BC, BC)
    _store_tile(A_bk + i_hv * BT, D_bk, ti, eos, SA, c_diag, BT, BC, BC)
    _store_tile(A_qa + i_hv * BT, D_qa * scale, ti, eos, SA, c_diag, BT, BC, BC)
    _store_tile(A_qk + i_hv * BT, D_qk * scale, ti, eos, SA, c_diag, BT, BC, BC)

    # ==== 3. the blocks right of the diagonal are zeros (causality)
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    for j in range(i_s + 1, NS):
        _store_tile(A_ba + i_hv * BT, Z, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_bk + i_hv * BT, Z, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_qa + i_hv * BT, Z, ti, eos, SA, j * BC, BT, BC, BC)
        _store_tile(A_qk + i_hv * BT, Z, ti, eos, SA, j * BC, BT, BC, BC)


def _check_fast_chunk(chunk_size: int) -> int:
    if chunk_size not in FAST_CHUNK_SIZES:
        raise ValueError(f"chunk_size: expected one of {list(FAST_CHUNK_SIZES)} for the fast layer, got {chunk_size}")
    return chunk_size


def dplr_intra_chunk_matrices(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
    config: Optional[DPLRConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A_ba, A_bk`` (strict, rows decayed from ``G_prev``) and ``A_qa, A_qk`` (causal, scaled) of every chunk.

    The twin of :func:`kda_explained.chunked.dplr.dplr_intra_chunk_matrices`. ``q, k: [B, T, H, K]``;
    ``a, b, G: [B, T, HV, K]`` -> four ``[B, T, HV, C]``: ``A_ba`` in float32 (the UT transform's
    input), the others in ``out_dtype`` (default :func:`kda_explained.fast.local.intermediate_dtype`
    of ``q``).

    Program layout: grid ``(NC, C / 16, HV)``; one program writes the 16 rows of one sub-chunk
    of one chunk and value head, in all four matrices (they share every decay factor). Left of
    the diagonal, one ``[16, BK] @ [BK, 16]`` tensor-core product per column sub-chunk, matrix
    and ``K`` tile, through a reference point at the end of the column sub-chunk; on the
    diagonal, the exact ratios of a ``[16, 16, BK]`` tile, masked before the ``exp``; right of
    it, zeros.
    """
    B, T, H, K = q.shape
    HV = G.shape[2]
    C = _check_fast_chunk(chunk_size)
    meta = meta or seq_meta(B, T, C, cu_seqlens, q.device)
    launch = (config or DPLRConfig()).intra
    dt = out_dtype or intermediate_dtype(q.dtype)
    A_ba = torch.empty(B, T, HV, C, dtype=torch.float32, device=q.device)
    A_bk, A_qa, A_qk = (torch.empty(B, T, HV, C, dtype=dt, device=q.device) for _ in range(3))
    if meta.NC > 0:
        _dplr_intra_kernel[(meta.NC, C // _BC, HV)](
            q.contiguous(), k.contiguous(), a.contiguous(), b.contiguous(), G.contiguous(),
            A_ba, A_bk, A_qa, A_qk, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, BT=C, BC=_BC, BK=tile(K, launch.BK), PRECISION=dot_precision(q.dtype),
            num_warps=launch.warps, num_stages=launch.stages,
        )
    return A_ba, A_bk, A_qa, A_qk


# ----------------------------------------------------------------------------------------------
# Stage 3: the UT transform M = (I + A)^{-1}, by blocks
# ----------------------------------------------------------------------------------------------
@triton.jit
def _unit_lower_inverse(A, BC: tl.constexpr):
    """``(I + StrictTril(A))^{-1}`` of one ``[BC, BC]`` block, by forward substitution:
    row ``i`` of the inverse ``D`` is ``e_i - sum_{c < i} A_ic D_c``, which needs only the rows above it."""
    o_i = tl.arange(0, BC)
    D = tl.where(o_i[:, None] == o_i[None, :], 1.0, 0.0)
    for i in range(1, BC):
        row = o_i[:, None] == i
        a_i = tl.sum(tl.where(row & (o_i[None, :] < i), A, 0.0), axis=0)  # [BC]: A_ic, c < i
        D = tl.where(row, D - tl.sum(a_i[:, None] * D, axis=0)[None, :], D)
    return D


@triton.jit
def _ut_transform_kernel(
    # pointers
    A,  # [TT, HV, BT] strictly lower-triangular per chunk
    M,  # [TT, HV, BT] float32 out: (I + A)^{-1}
    cu,
    chunk_seq,
    chunk_bos,
    # sizes
    HV: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BC: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program: the [BT, BT] block of one chunk and value head, as NS x NS sub-blocks of [BC, BC]
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    NS: tl.constexpr = BT // BC
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    A_h, M_h, S = A + i_hv * BT, M + i_hv * BT, HV * BT
    t0, t1, t2, t3 = bos, bos + BC, bos + 2 * BC, bos + 3 * BC  # first token of each sub-chunk

    # Block forward substitution: with D_i = (I + A_ii)^{-1} (the diagonal blocks, independent),
    # every block below the diagonal follows from the blocks above it:
    #     M_ii = D_i,   M_ij = -D_i sum_{j <= c < i} A_ic M_cj
    # (blocks a shorter chunk lacks are skipped at compile time)
    M00 = _unit_lower_inverse(_load_tile(A_h, t0, eos, S, 0, BT, BC, BC), BC)
    _store_tile(M_h, M00, t0, eos, S, 0, BT, BC, BC)
    if NS > 1:
        M11 = _unit_lower_inverse(_load_tile(A_h, t1, eos, S, BC, BT, BC, BC), BC)
        A10 = _load_tile(A_h, t1, eos, S, 0, BT, BC, BC)
        M10 = -tl.dot(M11, tl.dot(A10, M00, input_precision=PRECISION), input_precision=PRECISION)
        _store_tile(M_h, M10, t1, eos, S, 0, BT, BC, BC)
        _store_tile(M_h, M11, t1, eos, S, BC, BT, BC, BC)
    if NS > 2:
        M22 = _unit_lower_inverse(_load_tile(A_h, t2, eos, S, 2 * BC, BT, BC, BC), BC)
        A20 = _load_tile(A_h, t2, eos, S, 0, BT, BC, BC)
        A21 = _load_tile(A_h, t2, eos, S, BC, BT, BC, BC)
        M21 = -tl.dot(M22, tl.dot(A21, M11, input_precision=PRECISION), input_precision=PRECISION)
        M20 = -tl.dot(M22, tl.dot(A20, M00, input_precision=PRECISION) + tl.dot(A21, M10, input_precision=PRECISION),
                      input_precision=PRECISION)
        _store_tile(M_h, M20, t2, eos, S, 0, BT, BC, BC)
        _store_tile(M_h, M21, t2, eos, S, BC, BT, BC, BC)
        _store_tile(M_h, M22, t2, eos, S, 2 * BC, BT, BC, BC)
    if NS > 3:
        M33 = _unit_lower_inverse(_load_tile(A_h, t3, eos, S, 3 * BC, BT, BC, BC), BC)
        A30 = _load_tile(A_h, t3, eos, S, 0, BT, BC, BC)
        A31 = _load_tile(A_h, t3, eos, S, BC, BT, BC, BC)
        A32 = _load_tile(A_h, t3, eos, S, 2 * BC, BT, BC, BC)
        M32 = -tl.dot(M33, tl.dot(A32, M22, input_precision=PRECISION), input_precision=PRECISION)
        M31 = -tl.dot(M33, tl.dot(A31, M11, input_precision=PRECISION) + tl.dot(A32, M21, input_precision=PRECISION),
                      input_precision=PRECISION)
        M30 = -tl.dot(M33, tl.dot(A30, M00, input_precision=PRECISION) + tl.dot(A31, M10, input_precision=PRECISION)
                      + tl.dot(A32, M20, input_precision=PRECISION), input_precision=PRECISION)
        _store_tile(M_h, M30, t3, eos, S, 0, BT, BC, BC)
        _store_tile(M_h, M31, t3, eos, S, BC, BT, BC, BC)
        _store_tile(M_h, M32, t3, eos, S, 2 * BC, BT, BC, BC)
        _store_tile(M_h, M33, t3, eos, S, 3 * BC, BT, BC, BC)
    # the blocks above the diagonal are zeros
    Z = tl.zeros([BC, BC], dtype=tl.float32)
    for i_s in tl.static_range(NS):
        for j_s in tl.static_range(i_s + 1, NS):
            _store_tile(M_h, Z, bos + i_s * BC, eos, S, j_s * BC, BT, BC, BC)


def ut_transform(
    A_kk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    meta: Optional[SeqMeta] = None,
    config: Optional[DPLRConfig] = None,
) -> torch.Tensor:
    """``M = (I + A_kk)^{-1}`` per chunk: strictly lower ``A_kk: [B, T, HV, C]`` -> ``M: [B, T, HV, C]`` float32.

    The twin of :func:`kda_explained.chunked.stages.ut_transform`, with its argument's name:
    KDA applies it to ``A_kk``, DPLR to ``A_ba``. Entries on or above the diagonal are not read.

    Program layout: grid ``(NC, HV)``; one program inverts one chunk's ``[C, C]`` block: the
    ``C / 16`` diagonal ``[16, 16]`` blocks by forward substitution, row by row, then each block
    below the diagonal by block forward substitution, ``[16, 16]`` tensor-core products in full
    float32 (``config.ut_precision``).
    """
    B, T, HV, C = A_kk.shape
    _check_fast_chunk(chunk_size)
    if C != chunk_size:
        raise ValueError(f"A_kk: expected shape [B, T, HV, C] with C = chunk_size = {chunk_size}, "
                         f"got {list(A_kk.shape)}")
    meta = meta or seq_meta(B, T, C, cu_seqlens, A_kk.device)
    config = config or DPLRConfig()
    M = torch.empty(B, T, HV, C, dtype=torch.float32, device=A_kk.device)
    if meta.NC > 0:
        _ut_transform_kernel[(meta.NC, HV)](
            A_kk.contiguous(), M, meta.cu, meta.chunk_seq, meta.chunk_bos,
            HV=HV, BT=C, BC=_BC, PRECISION=config.ut_precision, num_warps=config.ut.warps,
        )
    return M


# ----------------------------------------------------------------------------------------------
# Stage 4: the WY factors, x = U - W S_0
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dplr_wy_kernel(
    # pointers
    b,  # [TT, HV, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K]
    M,  # [TT, HV, BT] (I + A_ba)^{-1}
    A_bk,  # [TT, HV, BT]
    W,  # [TT, HV, K] out
    U,  # [TT, HV, V] out
    cu,
    chunk_seq,
    chunk_bos,
    # sizes
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program: one chunk of one value head, all of K and V, a tile at a time
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    SG, SV, SA = HV * K, HV * V, HV * BT
    b_M = _load_tile(M + i_hv * BT, bos, eos, SA, 0, BT, BT, BT)  # [BT, BT]
    b_A = _load_tile(A_bk + i_hv * BT, bos, eos, SA, 0, BT, BT, BT)  # [BT, BT]
    # W = M (B * exp(G_prev)), exponents <= 0
    for i_k in range(0, tl.cdiv(K, BK)):
        c0 = i_k * BK
        b_bg = _load_tile(b + i_hv * K, bos, eos, SG, c0, K, BT, BK) * tl.exp(
            tl.minimum(_load_prev_tile(G + i_hv * K, bos, bos, eos, SG, c0, K, BT, BK), 0.0))
        _store_tile(W + i_hv * K, tl.dot(b_M, b_bg, input_precision=PRECISION), bos, eos, SG, c0, K, BT, BK)
    # U = -M (A_bk V)
    for i_v in range(0, tl.cdiv(V, BV)):
        c0 = i_v * BV
        b_Av = tl.dot(b_A, _load_tile(v + i_hv * V, bos, eos, SV, c0, V, BT, BV), input_precision=PRECISION)
        _store_tile(U + i_hv * V, -tl.dot(b_M, b_Av, input_precision=PRECISION), bos, eos, SV, c0, V, BT, BV)


def dplr_wy_representation(
    b: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    M: torch.Tensor,
    A_bk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
    config: Optional[DPLRConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W = M (B * exp(G_prev))`` and ``U = -M (A_bk V)``, so that ``x = U - W S_0``.

    The twin of :func:`kda_explained.chunked.dplr.dplr_wy_representation`. ``b, G: [B, T, HV, K]``,
    ``v: [B, T, HV, V]``, ``M, A_bk: [B, T, HV, C]`` -> ``W: [B, T, HV, K]``, ``U: [B, T, HV, V]``
    in ``out_dtype`` (default :func:`kda_explained.fast.local.intermediate_dtype` of ``b``).

    Program layout: grid ``(NC, HV)``; one program holds its chunk's ``M`` and ``A_bk``
    (``[C, C]`` each) and makes ``W`` tile by tile of ``K`` and ``U`` tile by tile of ``V``.
    """
    B, T, HV, K = b.shape
    V = v.shape[3]
    C = _check_fast_chunk(chunk_size)
    meta = meta or seq_meta(B, T, C, cu_seqlens, b.device)
    launch = (config or DPLRConfig()).wy
    dt = out_dtype or intermediate_dtype(b.dtype)
    W = torch.empty(B, T, HV, K, dtype=dt, device=b.device)
    U = torch.empty(B, T, HV, V, dtype=dt, device=b.device)
    if meta.NC > 0:
        _dplr_wy_kernel[(meta.NC, HV)](
            b.contiguous(), v.contiguous(), G.contiguous(), M.contiguous(), A_bk.contiguous(), W, U,
            meta.cu, meta.chunk_seq, meta.chunk_bos,
            HV=HV, K=K, V=V, BT=C, BK=tile(K, launch.BK), BV=tile(V, launch.BV), PRECISION=dot_precision(b.dtype),
            num_warps=launch.warps, num_stages=launch.stages,
        )
    return W, U


# ----------------------------------------------------------------------------------------------
# Stage 5: inter-chunk state passing
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dplr_state_kernel(
    # pointers
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    a,  # [TT, HV, K]
    W,  # [TT, HV, K]
    U,  # [TT, HV, V]
    G,  # [TT, HV, K]
    h0,  # [N, HV, K, V] initial states (HAS_H0)
    h,  # [NC, HV, K, V] float32 out: the state entering each chunk
    x,  # [TT, HV, V] out: the rank-1 writes
    ht,  # [N, HV, K, V] float32 out: final states
    cu,
    chunk_off,  # [N + 1] index of each sequence's first chunk
    # sizes
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BK: tl.constexpr,  # >= K: the whole state's rows in one tile
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
    PRECISION: tl.constexpr,
):
    # one program: the [K, BV] columns of the state of one sequence and value head, walked through
    # the sequence's chunks in order (value columns never mix: the V axis splits across programs)
    i_n, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c_first = tl.load(chunk_off + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
    o_S = o_k[:, None] * V + o_v[None, :]  # a [K, BV] tile inside one [K, V] state
    k_h, SQ = k + i_h * K, H * K
    a_h, W_h, G_h, SG = a + i_hv * K, W + i_hv * K, G + i_hv * K, HV * K
    v_h, U_h, x_h, SV = v + i_hv * V, U + i_hv * V, x + i_hv * V, HV * V
    c0 = i_v * BV

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S += tl.load(h0 + (i_n * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        tl.store(h + ((c_first + i_t) * HV + i_hv) * K * V + o_S, b_S, mask=m_kv)
        # x = U - W S: what each token's rank-1 term writes
        b_W = _load_tile(W_h, t0, eos, SG, 0, K, BT, BK)
        b_x = _load_tile(U_h, t0, eos, SV, c0, V, BT, BV) - tl.dot(b_W, b_S, input_precision=PRECISION)
        _store_tile(x_h, b_x, t0, eos, SV, c0, V, BT, BV)
        # S <- Diag(exp(G_C)) S + (A * exp(G_C - G))^T x + (K * exp(G_C - G))^T V, exponents <= 0
        t_last = tl.minimum(t0 + BT, eos) - 1
        b_Glast = tl.load(G_h + t_last * SG + o_k, mask=o_k < K, other=0).to(tl.float32)  # [BK]: G_C
        to_end = tl.exp(tl.minimum(b_Glast[None, :] - _load_tile(G_h, t0, eos, SG, 0, K, BT, BK), 0.0))
        a_dec = _load_tile(a_h, t0, eos, SG, 0, K, BT, BK) * to_end
        k_dec = _load_tile(k_h, t0, eos, SQ, 0, K, BT, BK) * to_end
        b_v = _load_tile(v_h, t0, eos, SV, c0, V, BT, BV)
        b_S = b_S * tl.exp(tl.minimum(b_Glast, 0.0))[:, None]
        b_S = tl.dot(tl.trans(a_dec), b_x, b_S, input_precision=PRECISION)
        b_S = tl.dot(tl.trans(k_dec), b_v, b_S, input_precision=PRECISION)
    tl.store(ht + (i_n * HV + i_hv) * K * V + o_S, b_S, mask=m_kv)


def dplr_state_passing(
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
    config: Optional[DPLRConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry the state across chunks, sequentially. For each chunk, with ``S`` the state entering it::

        x  = U - W S
        S <- Diag(exp(G_C)) S + (A * exp(G_C - G))^T x + (K * exp(G_C - G))^T V

    The twin of :func:`kda_explained.chunked.dplr.dplr_state_passing`. ``k: [B, T, H, K]``,
    ``v: [B, T, HV, V]``, ``a, W, G: [B, T, HV, K]``, ``U: [B, T, HV, V]``, ``initial_state:
    [N, HV, K, V]`` or ``None`` -> ``h: [NC, HV, K, V]`` float32 (the state entering every chunk),
    ``x: [B, T, HV, V]`` (``out_dtype``, default :func:`kda_explained.fast.local.intermediate_dtype`
    of ``W``), ``final_state: [N, HV, K, V]`` float32.

    Program layout: grid ``(N, V / BV, HV)``; one program keeps the ``[K, BV]`` columns of one
    sequence's state in float32 registers and walks its chunks in order: per chunk one
    ``[C, K] @ [K, BV]`` product for ``x`` and two ``[K, C] @ [C, BV]`` products for the new state.
    """
    B, T, HV, K = a.shape
    V = v.shape[3]
    C = _check_fast_chunk(chunk_size)
    meta = meta or seq_meta(B, T, C, cu_seqlens, a.device)
    config = config or DPLRConfig()
    launch = config.state_f32 if W.dtype == torch.float32 else config.state
    h = torch.empty(meta.NC, HV, K, V, dtype=torch.float32, device=a.device)
    ht = torch.empty(meta.N, HV, K, V, dtype=torch.float32, device=a.device)
    x = torch.empty(B, T, HV, V, dtype=out_dtype or intermediate_dtype(W.dtype), device=a.device)
    BV = tile(V, launch.BV)
    if meta.N > 0:
        _dplr_state_kernel[(meta.N, triton.cdiv(V, BV), HV)](
            k.contiguous(), v.contiguous(), a.contiguous(), W.contiguous(), U.contiguous(), G.contiguous(),
            initial_state.contiguous() if initial_state is not None else ht, h, x, ht, meta.cu, meta.chunk_off,
            H=k.shape[2], HV=HV, K=K, V=V, BT=C, BK=tile(K), BV=BV, HAS_H0=initial_state is not None,
            PRECISION=dot_precision(k.dtype), num_warps=launch.warps, num_stages=launch.stages,
        )
    return h, x, ht


# ----------------------------------------------------------------------------------------------
# Stage 6: the output
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dplr_output_kernel(
    # pointers
    q,  # [TT, H, K]
    h,  # [NC, HV, K, V] the state entering each chunk
    x,  # [TT, HV, V]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K]
    A_qa,  # [TT, HV, BT]
    A_qk,  # [TT, HV, BT]
    o,  # [TT, HV, V] out
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
    # one program: BV output columns of one chunk of one value head
    i_c, i_v, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_h = i_hv // (HV // H)
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    SQ, SG, SV, SA = H * K, HV * K, HV * V, HV * BT
    c0 = i_v * BV
    o_v = c0 + tl.arange(0, BV)
    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    # what the entering state recalls: scale (Q * exp(G)) S_0, one K tile at a time (exp(G) <= 1)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        b_qg = _load_tile(q + i_h * K, bos, eos, SQ, i_k * BK, K, BT, BK) * tl.exp(
            tl.minimum(_load_tile(G + i_hv * K, bos, eos, SG, i_k * BK, K, BT, BK), 0.0)) * scale
        m_kv = (o_k < K)[:, None] & (o_v < V)[None, :]
        b_S = tl.load(h + (i_c.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :], mask=m_kv,
                      other=0)
        b_o = tl.dot(b_qg, b_S, b_o, input_precision=PRECISION)
    # what the chunk wrote: the rank-1 writes x under a (A_qa x) and the direct writes v under k (A_qk V)
    b_o = tl.dot(_load_tile(A_qa + i_hv * BT, bos, eos, SA, 0, BT, BT, BT),
                 _load_tile(x + i_hv * V, bos, eos, SV, c0, V, BT, BV), b_o, input_precision=PRECISION)
    b_o = tl.dot(_load_tile(A_qk + i_hv * BT, bos, eos, SA, 0, BT, BT, BT),
                 _load_tile(v + i_hv * V, bos, eos, SV, c0, V, BT, BV), b_o, input_precision=PRECISION)
    _store_tile(o + i_hv * V, b_o, bos, eos, SV, c0, V, BT, BV)


def dplr_chunk_output(
    q: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    A_qa: torch.Tensor,
    A_qk: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
    config: Optional[DPLRConfig] = None,
) -> torch.Tensor:
    """``O = scale (Q * exp(G)) S_0 + A_qa x + A_qk V``.

    The twin of :func:`kda_explained.chunked.dplr.dplr_chunk_output`. ``q: [B, T, H, K]``,
    ``h: [NC, HV, K, V]``, ``x, v: [B, T, HV, V]``, ``G: [B, T, HV, K]``, ``A_qa, A_qk:
    [B, T, HV, C]`` -> ``o: [B, T, HV, V]`` in ``out_dtype`` (default float32).

    Program layout: grid ``(NC, V / BV, HV)``; one program writes ``BV`` output columns of one
    chunk: ``[C, BK] @ [BK, BV]`` products over the tiles of ``K`` (the state's recall), then
    two ``[C, C] @ [C, BV]`` (the chunk's own writes).
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    C = _check_fast_chunk(chunk_size)
    meta = meta or seq_meta(B, T, C, cu_seqlens, q.device)
    launch = (config or DPLRConfig()).output
    o = torch.empty(B, T, HV, V, dtype=out_dtype or torch.float32, device=q.device)
    BV = tile(V, launch.BV)
    if meta.NC > 0:
        _dplr_output_kernel[(meta.NC, triton.cdiv(V, BV), HV)](
            q.contiguous(), h.contiguous(), x.contiguous(), v.contiguous(), G.contiguous(), A_qa.contiguous(),
            A_qk.contiguous(), o, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, V=V, BT=C, BK=tile(K, launch.BK), BV=BV, PRECISION=dot_precision(q.dtype),
            num_warps=launch.warps, num_stages=launch.stages,
        )
    return o


# ----------------------------------------------------------------------------------------------
# The stages composed
# ----------------------------------------------------------------------------------------------
def _check_inputs(q, k, v, a, b, g, scale, initial_state, cu_seqlens):
    """The contract's checks (as :func:`kda_explained.chunked.dplr.dplr` makes them) and the kernels':
    device, dtypes, head dims, no gradients. Returns the problem's sizes and the offsets as a tuple."""
    require_tensors(q=q, k=k, v=v, a=a, b=b, g=g, initial_state=initial_state)
    offsets = None
    if cu_seqlens is not None:
        offsets = tuple(int(x) for x in as_tensor_cu_seqlens(cu_seqlens, "cpu").tolist())
    p = check_kda_inputs(q, k, v, g, None, scale=scale, initial_state=initial_state, cu_seqlens=offsets)
    for name, x in (("a", a), ("b", b)):
        check_floating(name, x)
        check_shape(name, x, g.shape, "B, T, HV, K", "like g")
        if x.device != g.device:
            raise ValueError(f"{name}: expected on device {g.device} like g, got {x.device}")
    check_fast_device(q)
    check_fast_dtypes(q=q, k=k, v=v, a=a, b=b)
    if p.K > DPLR_MAX_HEAD_DIM or p.V > DPLR_MAX_HEAD_DIM:
        raise ValueError(f"q, v: expected head dims K, V <= {DPLR_MAX_HEAD_DIM}, got K = {p.K}, V = {p.V}")
    if torch.is_grad_enabled():
        for name, x in (("q", q), ("k", k), ("v", v), ("a", a), ("b", b), ("g", g), ("initial_state", initial_state)):
            if x is not None and x.requires_grad:
                raise ValueError(
                    f"{name}: kda_explained.fast.dplr.dplr is forward only (no backward), got a tensor that requires "
                    "grad under grad mode; run it under torch.no_grad() or torch.inference_mode(), or use "
                    "kda_explained.chunked.dplr.dplr, which is differentiable")
    return p, offsets


def dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """General DPLR ``S_t = (Diag(exp(g_t)) - a_t b_t^T) S_{t-1} + k_t v_t^T`` chunk by chunk, on the Triton kernels.

    The signature of :func:`kda_explained.chunked.dplr.dplr`: ``q, k: [B, T, H, K]``,
    ``v: [B, T, HV, V]``, ``a, b, g: [B, T, HV, K]`` (per value head; ``HV`` a multiple of ``H``),
    ``initial_state: [N, HV, K, V]``, ``cu_seqlens: [N + 1]`` (a packed batch, ``B == 1``),
    ``chunk_size`` 16, 32 or 64. ``q, k, v, a, b`` in float32, bfloat16 or float16; ``K, V <= 128``.
    Computes in float32. Returns ``o: [B, T, HV, V]`` in ``v``'s dtype and the final state
    ``[N, HV, K, V]`` float32 (or ``None``). Forward only: inputs that require grad (under grad
    mode) raise :class:`ValueError`.

    >>> import torch
    >>> from kda_explained import chunked
    >>> from kda_explained.testing import rel_rms_error
    >>> torch.manual_seed(0) and None
    >>> dev = "cuda" if torch.cuda.is_available() else "cpu"
    >>> B, T, H, K, V = 1, 37, 2, 16, 16
    >>> q, k, a, b = (torch.randn(B, T, H, K, device=dev) * K ** -0.5 for _ in range(4))
    >>> v = torch.randn(B, T, H, V, device=dev); g = -torch.rand(B, T, H, K, device=dev)
    >>> o, S = dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=16)
    >>> o_ref, S_ref = chunked.dplr(*(x.double() for x in (q, k, v, a, b, g)), output_final_state=True)
    >>> rel_rms_error(o, o_ref) < 1e-4 and rel_rms_error(S, S_ref) < 1e-4
    True
    """
    p, offsets = _check_inputs(q, k, v, a, b, g, scale, initial_state, cu_seqlens)
    C = _check_fast_chunk(check_chunk_size(chunk_size, FAST_CHUNK_SIZES))
    B, T = q.shape[:2]
    meta = seq_meta(B, T, C, offsets, q.device)  # the offsets read once, here
    kw = dict(meta=meta)

    G = chunk_local_cumsum(g, C, offsets, meta=meta)  # 1. G in log space, float32       [B, T, HV, K]
    A_ba, A_bk, A_qa, A_qk = dplr_intra_chunk_matrices(q, k, a, b, G, p.scale, C, offsets, **kw)  # 2. [B, T, HV, C]
    M = ut_transform(A_ba, C, offsets, **kw)  # 3. M = (I + A_ba)^{-1}                     [B, T, HV, C]
    W, U = dplr_wy_representation(b, v, G, M, A_bk, C, offsets, **kw)  # 4. x = U - W S_0  [B, T, HV, K], [.., V]
    h, x, S = dplr_state_passing(k, v, a, W, U, G, initial_state, C, offsets, **kw)  # 5.  [NC, HV, K, V], ...
    o = dplr_chunk_output(q, h, x, v, G, A_qa, A_qk, p.scale, C, offsets, out_dtype=v.dtype, **kw)  # 6. [B, T, HV, V]
    return o, (S if output_final_state else None)
