"""Backward kernels of the fast layer (issue 5, in progress): the reverse-time state recurrence.

Mirrors :func:`kda_explained.chunked.backward_inter.state_passing_bwd_recurrence`, the
one sequential part of the backward. One program owns the gradient ``dS [K, BV]``
of one sequence's state (one value head, one tile of ``BV`` value columns) in
float32 registers and walks the chunks from last to first::

    dS_out[chunk] = dS                                   # dL/dS' of the state leaving the chunk
    dv_tot        = dv_new + kg dS                        # S' = Diag(Gamma_C) S + kg^T v_new
    dS           <- Diag(Gamma_C) dS + dh - W^T dv_tot    # dL/dS of the state entering it

Value columns are independent in all three lines, as in the forward state pass.
What the rest of the stage's backward needs (``dk``, ``dW``, ``dG``) are per-chunk
products of ``dS_out``, ``dv_tot`` and the forward's ``h`` and ``v_new``, with no
order between chunks.

Not yet wired into :func:`~kda_explained.fast.chunk.chunk_kda`'s backward: the kernel
is checked under the Triton interpreter only, and waits for its first compiled run
on the GPU.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, seq_meta

__all__ = ["state_passing_bwd_recurrence"]


@triton.jit
def _state_bwd_recurrence_kernel(
    # pointers
    kg,  # [TT, HV, K] decayed keys k * exp(G_last - G)
    W,  # [TT, HV, K]
    G,  # [TT, HV, K] float32 (read at each chunk's last token)
    dh,  # [NC, HV, K, V] gradient reaching each chunk's entering state from the output (HAS_DH)
    dv_new,  # [TT, HV, V] gradient of v_new from the output (HAS_DVN)
    dS_final,  # [N, HV, K, V] gradient of the final states (HAS_DSF)
    dS_out,  # [NC, HV, K, V] float32 out: dL/dS' of the state leaving each chunk
    dv_tot,  # [TT, HV, V] float32 out
    dS0,  # [N, HV, K, V] float32 out: gradient of the initial states
    cu,
    chunk_off,
    # sizes
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    HAS_DH: tl.constexpr,
    HAS_DVN: tl.constexpr,
    HAS_DSF: tl.constexpr,
    PRECISION: tl.constexpr,
):
    i_v, i_n, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    c0 = tl.load(chunk_off + i_n).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_S = o_k[:, None] * V + o_v[None, :]  # a [K, BV] tile of one [K, V] state

    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DSF:
        b_dS += tl.load(dS_final + (i_n * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)

    n_chunks = tl.cdiv(eos - bos, BT)
    for i_r in range(0, n_chunks):
        i_t = n_chunks - 1 - i_r  # last chunk first
        t0 = bos + i_t * BT
        m_t = t0 + o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_S = ((c0 + i_t) * HV + i_hv) * K * V + o_S
        tl.store(dS_out + p_S, b_dS, mask=m_kv)
        # dv_tot = dv_new + kg dS
        b_kg = tl.load(kg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_dv = tl.dot(b_kg, b_dS, input_precision=PRECISION)  # [BT, BV]
        if HAS_DVN:
            b_dv += tl.load(dv_new + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv,
                            other=0).to(tl.float32)
        tl.store(dv_tot + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_dv, mask=m_tv)
        # dS <- Diag(Gamma_C) dS + dh - W^T dv_tot
        t_last = tl.minimum(t0 + BT, eos) - 1
        b_Glast = tl.load(G + (t_last * HV + i_hv) * K + o_k, mask=m_k, other=0)  # [BK]
        b_W = tl.load(W + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_dS = b_dS * tl.exp(b_Glast)[:, None] - tl.dot(tl.trans(b_W), b_dv, input_precision=PRECISION)
        if HAS_DH:
            b_dS += tl.load(dh + p_S, mask=m_kv, other=0).to(tl.float32)

    tl.store(dS0 + (i_n * HV + i_hv) * K * V + o_S, b_dS, mask=m_kv)


def state_passing_bwd_recurrence(
    kg: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    dh: Optional[torch.Tensor],
    dv_new: Optional[torch.Tensor],
    dS_final: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    meta: Optional[SeqMeta] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dS_out: [NC, HV, K, V]``, ``dv_tot: [B, T, HV, V]``, ``dS0: [N, HV, K, V]``, all float32.

    Arguments as :func:`kda_explained.chunked.backward_inter.state_passing_bwd_recurrence`
    (``h`` is read for its shape only: the recurrence does not need the states).
    """
    B, T, HV, K = kg.shape
    V = h.shape[-1]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    f32 = dict(dtype=torch.float32, device=kg.device)
    dS_out = torch.empty(meta.NC, HV, K, V, **f32)
    dv_tot = torch.empty(B, T, HV, V, **f32)
    dS0 = torch.empty(meta.N, HV, K, V, **f32)
    # untuned: 8 warps x 32 value columns spill least when compiled for sm_90 on a CPU machine
    # (ptxas: 92 bytes against 2.9 KB at 4 warps x 64); to be measured on the GPU
    BV = min(32, max(16, triton.next_power_of_2(V)))
    if meta.N > 0:
        _state_bwd_recurrence_kernel[(triton.cdiv(V, BV), meta.N, HV)](
            kg.contiguous(), W.contiguous(), G.contiguous(),
            dh.contiguous() if dh is not None else dS_out, dv_new.contiguous() if dv_new is not None else dv_tot,
            dS_final.contiguous() if dS_final is not None else dS0, dS_out, dv_tot, dS0, meta.cu, meta.chunk_off,
            HV=HV, K=K, V=V, BT=chunk_size, BK=max(16, triton.next_power_of_2(K)), BV=BV,
            HAS_DH=dh is not None, HAS_DVN=dv_new is not None, HAS_DSF=dS_final is not None,
            PRECISION=dot_precision(W.dtype), num_warps=8,
        )
    return dS_out, dv_tot, dS0
