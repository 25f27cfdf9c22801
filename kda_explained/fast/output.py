"""Stage 6 on the GPU: the output ``O = scale (Q * Gamma) S + A_qk v_new`` (report Eq. 9).

Mirrors :func:`kda_explained.chunked.stages.chunk_output`. One program writes one
chunk of one value head for one tile of ``BV`` value columns: what the entering
state recalls (``[BT, K] @ [K, BV]``) plus what the chunk itself wrote
(``[BT, BT] @ [BT, BV]``). The decayed, scaled queries ``qg = scale * q * exp(G)``
come ready from :func:`~kda_explained.fast.local.chunk_local_factors`.
"""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, interpreting, seq_meta, tile
from .config import OutputConfig, plan_for

__all__ = ["chunk_output"]


@triton.jit
def _chunk_output_kernel(
    # pointers
    qg,  # [TT, HV, K] scale * q * exp(G)
    h,  # [NC, HV, K, V] (or [V, K] each with STATE_V_FIRST)
    v_new,  # [TT, HV, V]
    A_qk,  # [TT, HV, BT]
    o,  # [TT, HV, V] out, v's dtype
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
    STATE_V_FIRST: tl.constexpr,
    PRECISION: tl.constexpr,
    LOWP: tl.constexpr,
):
    i_v, i_c, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = bos + o_t < eos
    m_v = o_v < V
    m_tv = m_t[:, None] & m_v[None, :]

    b_o = tl.zeros([BT, BV], dtype=tl.float32)
    # inter-chunk: qg @ S, one K tile at a time
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        b_qg = tl.load(qg + ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        if STATE_V_FIRST:
            o_S = o_v[None, :] * K + o_k[:, None]
        else:
            o_S = o_k[:, None] * V + o_v[None, :]
        b_S = tl.load(h + (i_c.to(tl.int64) * HV + i_hv) * K * V + o_S, mask=m_k[:, None] & m_v[None, :], other=0)
        if LOWP:
            b_o += tl.dot(b_qg, b_S.to(qg.dtype.element_ty))
        else:
            b_o += tl.dot(b_qg.to(tl.float32), b_S.to(tl.float32), input_precision=PRECISION)
    # intra-chunk: A_qk @ v_new
    b_A = tl.load(A_qk + ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :], mask=m_t[:, None] & m_t[None, :], other=0)
    b_v = tl.load(v_new + ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0)
    if LOWP:
        b_o += tl.dot(b_A.to(qg.dtype.element_ty), b_v.to(qg.dtype.element_ty))
    else:
        b_o += tl.dot(b_A.to(tl.float32), b_v.to(tl.float32), input_precision=PRECISION)
    tl.store(o + ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_tv)


def chunk_output(
    qg: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    A_qk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    state_v_first: bool = False,
    meta: Optional[SeqMeta] = None,
    config: Optional[OutputConfig] = None,
) -> torch.Tensor:
    """``o: [B, T, HV, V]`` (``out_dtype``, default float32) from the chunk states and pseudo-values.

    ``qg = scale * q * exp(G)`` is ``[B, T, HV, K]``; the products run in ``qg``'s dtype
    when it is bf16/fp16.
    """
    B, T, HV, K = qg.shape
    V = v_new.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, qg.device)
    o = torch.empty(B, T, HV, V, dtype=out_dtype or torch.float32, device=qg.device)
    config = config or plan_for(qg.device).output
    BV = tile(V, config.launch.BV)
    if meta.NC > 0:
        _chunk_output_kernel[(triton.cdiv(V, BV), meta.NC, HV)](
            qg.contiguous(), h.contiguous(), v_new.contiguous(), A_qk.contiguous(), o,
            meta.cu, meta.chunk_seq, meta.chunk_bos,
            HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K, 64), BV=BV,
            STATE_V_FIRST=state_v_first, PRECISION=dot_precision(qg.dtype), num_stages=config.launch.stages,
            LOWP=config.lowp and qg.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
            num_warps=config.launch.warps,
        )
    return o
