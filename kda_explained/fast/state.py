"""Stage 5 on the GPU: inter-chunk state passing (report Eq. 8).

Mirrors :func:`kda_explained.chunked.stages.state_passing`. One program owns the state
``S [K, BV]`` of one sequence, one value head and one tile of ``BV`` value
columns, in float32 registers, and walks the sequence's chunks in order::

    h[chunk] = S                                  # the state entering the chunk
    v_new    = U - W S                            # what each token really writes
    S        = Diag(Gamma_C) S + kg^T v_new       # kg = K * Gamma_C / Gamma, made by stage 2-4

The decayed keys ``kg = k * exp(G_last - G)`` come ready from
:func:`~kda_explained.fast.local.chunk_local_factors`, so this sequential loop
does no ``exp`` but one ``[K]`` vector per chunk and reads ``G`` only at each
chunk's last token.

Value columns are independent in all three lines, which is what lets the
``V`` axis split across programs. ``STATE_V_FIRST`` reads and writes the
initial, final and chunk states as ``[V, K]`` (serving engines that store the
state transposed) through strides alone: the registers keep ``[K, BV]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, interpreting, seq_meta

__all__ = ["state_passing", "state_passing_output", "output_fused"]

#: Software-pipelining depth of the chunk loop (loads of chunk i + 1 overlap the math of chunk i).
STATE_STAGES = 2
#: For bf16/fp16 intermediates, feed the two products in that dtype instead of float32 operands in
#: tf32 (the state itself stays float32 in registers).
STATE_LOW_PRECISION_DOTS = True  # H100: chunk_kda 5.31 -> 4.93 ms, error unchanged (docs: kernel notes)
#: Warps per program for K > 64, and value columns per program (None: 64, or fewer when that
#: leaves SMs idle: one long sequence has only HV * V / BV programs to spread over the GPU).
STATE_WARPS = 4
STATE_BV = None


@triton.jit
def _state_passing_kernel(
    # pointers
    kg,  # [TT, HV, K] decayed keys k * exp(G_last - G)
    W,  # [TT, HV, K]
    U,  # [TT, HV, V]
    G,  # [TT, HV, K] float32 (read at each chunk's last token)
    h0,  # [N, HV, K, V] initial states (or [V, K] each with STATE_V_FIRST)
    h,  # [NC, HV, K, V] out: state entering each chunk (float32, or W's dtype); not with OUTPUT
    v_new,  # [TT, HV, V] out, W's dtype; not with OUTPUT
    ht,  # [N, HV, K, V] float32 out: final states
    qg,  # [TT, HV, K] scale * q * exp(G) (OUTPUT)
    A_qk,  # [TT, HV, BT] (OUTPUT)
    o,  # [TT, HV, V] out, v's dtype (OUTPUT)
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
    HAS_H0: tl.constexpr,
    STATE_V_FIRST: tl.constexpr,
    PRECISION: tl.constexpr,
    LOWP: tl.constexpr,
    OUTPUT: tl.constexpr,  # stage 6 in the same loop: o written, h and v_new never leave the registers
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
    # offsets of a [K, BV] state tile inside one [K, V] (or [V, K]) state
    if STATE_V_FIRST:
        o_S = o_v[None, :] * K + o_k[:, None]
    else:
        o_S = o_k[:, None] * V + o_v[None, :]

    b_S = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_H0:
        b_S += tl.load(h0 + (i_n * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)

    n_chunks = tl.cdiv(eos - bos, BT)
    for i_t in range(0, n_chunks):
        t0 = bos + i_t * BT
        m_t = t0 + o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        if not OUTPUT:  # h[chunk] = S, for the output kernel
            tl.store(h + ((c0 + i_t) * HV + i_hv) * K * V + o_S, b_S.to(h.dtype.element_ty), mask=m_kv)
        # v_new = U - W S
        b_W = tl.load(W + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        b_U = tl.load(U + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv, other=0).to(tl.float32)
        if LOWP:
            b_v = b_U - tl.dot(b_W, b_S.to(W.dtype.element_ty))  # [BT, BV]
        else:
            b_v = b_U - tl.dot(b_W.to(tl.float32), b_S, input_precision=PRECISION)  # [BT, BV]
        if OUTPUT:  # o = qg S + A_qk v_new (stage 6), with S still the state entering the chunk
            b_qg = tl.load(qg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
            b_A = tl.load(A_qk + ((t0 + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :],
                          mask=m_t[:, None] & m_t[None, :], other=0)
            if LOWP:  # operands rounded as the output kernel reads them from memory: identical sums
                b_o = tl.dot(b_qg, b_S.to(qg.dtype.element_ty))
                b_o = tl.dot(b_A, b_v.to(qg.dtype.element_ty), b_o)
            else:
                b_o = tl.dot(b_qg.to(tl.float32), b_S, input_precision=PRECISION)
                b_o = tl.dot(b_A.to(tl.float32), b_v, b_o, input_precision=PRECISION)
            tl.store(o + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_o.to(o.dtype.element_ty),
                     mask=m_tv)
        else:
            tl.store(v_new + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_v.to(v_new.dtype.element_ty),
                     mask=m_tv)
        # S = Diag(Gamma_C) S + kg^T v_new
        t_last = tl.minimum(t0 + BT, eos) - 1
        b_Glast = tl.load(G + (t_last * HV + i_hv) * K + o_k, mask=m_k, other=0)  # [BK]
        b_kg = tl.load(kg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        if LOWP:
            b_dS = tl.dot(tl.trans(b_kg), b_v.to(kg.dtype.element_ty))
        else:
            b_dS = tl.dot(tl.trans(b_kg.to(tl.float32)), b_v, input_precision=PRECISION)
        b_S = b_S * tl.exp(b_Glast)[:, None] + b_dS

    tl.store(ht + (i_n * HV + i_hv) * K * V + o_S, b_S, mask=m_kv)


def state_value_tile(sequences_x_heads: int, V: int, device) -> int:
    """64 value columns per program, halved (down to 16) while that leaves SMs without a program."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    BV = min(64, max(16, triton.next_power_of_2(V)))
    while BV > 16 and sequences_x_heads * triton.cdiv(V, BV) < sms:
        BV //= 2
    return BV


def output_fused(sequences_x_heads: int, V: int, device) -> bool:
    """Whether stage 6 should run inside the state kernel: only while its grid, at 64 value columns a
    program, holds at least 1.5 programs per SM.

    The fused kernel saves ``h`` and ``v_new``'s round trips through memory but puts the output's
    products into the sequential chunk loop. H100, bf16 (``benchmarks/probe/variants.py``): fused
    against the two kernels, 1.85 vs 1.90 ms at B=8, T=4096, H=16 (256 programs on 132 SMs) and
    1.98 vs 2.00 on the varlen batch (768), but 3.03 vs 2.98 at T=8192, H=96 (192) and 5.94 vs 5.10
    at T=65536, H=16 (where the value tile shrinks to 16 to fill the SMs).
    """
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return sequences_x_heads * triton.cdiv(V, 64) >= 1.5 * sms


def _launch(kg, W, U, G, initial_state, h, v_new, ht, output, chunk_size, state_v_first, meta):
    """Run the state kernel: ``output = (qg, A_qk, o)`` fuses stage 6 (``h``, ``v_new`` unused then)."""
    HV, K, V = kg.shape[2], kg.shape[3], U.shape[3]
    qg, A_qk, o = output if output is not None else (ht, ht, ht)  # unread placeholders without OUTPUT
    BV = STATE_BV or state_value_tile(meta.N * HV, V, kg.device)
    if meta.N > 0:
        _state_passing_kernel[(triton.cdiv(V, BV), meta.N, HV)](
            kg.contiguous(), W.contiguous(), U.contiguous(), G.contiguous(),
            initial_state.contiguous() if initial_state is not None else ht, h, v_new, ht,
            qg.contiguous(), A_qk.contiguous(), o, meta.cu, meta.chunk_off,
            HV=HV, K=K, V=V, BT=chunk_size, BK=max(16, triton.next_power_of_2(K)), BV=BV,
            HAS_H0=initial_state is not None, STATE_V_FIRST=state_v_first, PRECISION=dot_precision(W.dtype),
            LOWP=STATE_LOW_PRECISION_DOTS and W.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
            OUTPUT=output is not None,
            num_warps=STATE_WARPS if K > 64 else 4, num_stages=STATE_STAGES if K <= 128 else 1,
        )


def state_passing(
    kg: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    state_v_first: bool = False,
    h_dtype: Optional[torch.dtype] = None,
    meta: Optional[SeqMeta] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``h: [NC, HV, K, V]``, ``v_new: [B, T, HV, V]``, ``final_state: [N, HV, K, V]`` float32.

    ``kg = k * exp(G_last - G)`` (``[B, T, HV, K]``) are the decayed keys of
    :func:`~kda_explained.fast.local.chunk_local_factors`; ``v_new`` has ``W``'s dtype and
    ``h`` has ``h_dtype`` (default float32). With ``state_v_first``, ``initial_state``,
    ``h`` and the final state are ``[..., V, K]``.
    """
    B, T, HV, K = kg.shape
    V = U.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    h = torch.empty(meta.NC, *state_shape, dtype=h_dtype or torch.float32, device=kg.device)
    ht = torch.empty(meta.N, *state_shape, dtype=torch.float32, device=kg.device)
    v_new = torch.empty(B, T, HV, V, dtype=W.dtype, device=kg.device)
    _launch(kg, W, U, G, initial_state, h, v_new, ht, None, chunk_size, state_v_first, meta)
    return h, v_new, ht


def state_passing_output(
    kg: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    qg: torch.Tensor,
    A_qk: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    out_dtype: Optional[torch.dtype] = None,
    state_v_first: bool = False,
    meta: Optional[SeqMeta] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stages 5 and 6 in one kernel: ``o: [B, T, HV, V]`` (``out_dtype``, default float32) and
    ``final_state: [N, HV, K, V]`` float32.

    The same function as :func:`state_passing` followed by
    :func:`~kda_explained.fast.output.chunk_output` (with ``h`` in ``W``'s dtype, as
    :func:`~kda_explained.fast.chunk.chunk_kda_fwd` keeps it), but each chunk's output is formed
    while its entering state and pseudo-values are still in registers: ``h`` and ``v_new`` never go
    to memory. Each program also reads its chunk's ``qg`` and ``A_qk``, which the separate output
    kernel reads once per value tile as well.
    """
    B, T, HV, K = kg.shape
    V = U.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    ht = torch.empty(meta.N, *state_shape, dtype=torch.float32, device=kg.device)
    o = torch.empty(B, T, HV, V, dtype=out_dtype or torch.float32, device=kg.device)
    _launch(kg, W, U, G, initial_state, ht, ht, ht, (qg, A_qk, o), chunk_size, state_v_first, meta)
    return o, ht
