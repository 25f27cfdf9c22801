"""Stage 4 on the GPU: the WY factors ``W = M Diag(beta)(Gamma * K)`` and ``U = M Diag(beta) V`` (report Eq. 7).

Mirrors :func:`kda_explained.chunked.stages.wy_representation`. One program takes one
chunk of one value head: it loads ``M [BT, BT]`` once and multiplies it into the
decayed, beta-weighted keys (``[BT, K]``) and values (``[BT, V]``, tile by tile).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import dot_precision, seq_meta

__all__ = ["wy_representation"]


@triton.jit
def _wy_kernel(
    # pointers
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32
    beta,  # [TT, HV]
    M,  # [TT, HV, BT] float32
    W,  # [TT, HV, K] float32 out
    U,  # [TT, HV, V] float32 out
    cu,
    chunk_seq,
    chunk_bos,
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
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    m_t = bos + o_t < eos

    b_M = tl.load(M + ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :],
                  mask=m_t[:, None] & m_t[None, :], other=0)  # [BT, BT]
    b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)  # [BT]

    # W = M (beta * exp(G) * K), one K tile at a time
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k[None, :] < K)
        b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_G = tl.load(G + ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        b_kb = b_k * tl.exp(b_G) * b_beta[:, None]  # Diag(beta)(Gamma * K)
        b_W = tl.dot(b_M, b_kb, input_precision=PRECISION)
        tl.store(W + ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], b_W, mask=m_tk)
    # U = M (beta * V), one V tile at a time
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v[None, :] < V)
        b_v = tl.load(v + ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        b_U = tl.dot(b_M, b_v * b_beta[:, None], input_precision=PRECISION)
        tl.store(U + ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_U, mask=m_tv)


def wy_representation(
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W: [B, T, HV, K]``, ``U: [B, T, HV, V]`` (float32) from ``k: [B, T, H, K]``, ``v``, ``G``, ``beta``, ``M``."""
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    meta = seq_meta(B, T, chunk_size, cu_seqlens, k.device)
    W = torch.empty(B, T, HV, K, dtype=torch.float32, device=k.device)
    U = torch.empty(B, T, HV, V, dtype=torch.float32, device=k.device)
    if meta.NC > 0:
        _wy_kernel[(meta.NC, HV)](
            k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous(), M.contiguous(), W, U,
            meta.cu, meta.chunk_seq, meta.chunk_bos,
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=min(64, max(16, triton.next_power_of_2(K))),
            BV=min(64, max(16, triton.next_power_of_2(V))), PRECISION=dot_precision(k.dtype), num_stages=2,
        )
    return W, U
