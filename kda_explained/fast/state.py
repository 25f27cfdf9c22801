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
``V`` axis split across programs.

The loop's loads of ``W``, ``U``, ``kg`` are software-pipelined by the compiler
(``num_stages``); the row of ``G`` at each chunk's end is loaded one chunk ahead by hand
(``STATE_PREFETCH``), since the pipeliner takes only the loads that feed products and each
step would otherwise wait for that one.

After the one-pass kernel (short chunks) the loop applies the UT transform itself: given
``Mb = M Diag(beta)`` and ``kG = Gamma * K`` of each chunk, and the values ``v``, it forms
``v_new = Mb (v - kG S)``, the same as ``U - W S`` with ``W = Mb kG`` and ``U = Mb v``.

:func:`state_passing_output` runs stage 6 (the output) inside the same loop, while
each chunk's entering state and ``v_new`` are in registers, so neither goes to
memory; :func:`~kda_explained.fast.chunk.chunk_kda` uses it where the grid is large
enough (:func:`output_fused`). :func:`state_passing_output_segmented` cuts long
sequences into segments that run side by side and chains their states afterwards
(measured slower on the H100, off by default: ``STATE_SEGMENTS``).

``STATE_V_FIRST`` reads and writes the initial, final and chunk states as ``[V, K]``
(serving engines that store the state transposed) through strides alone: the
registers keep ``[K, BV]``.
"""

from __future__ import annotations

import functools
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import (SeqMeta, build_seq_meta, dot_precision, interpreting, max_chunks, packed_offsets, seq_meta,
                    sm_count)

__all__ = ["state_passing", "state_passing_output", "state_passing_output_segmented", "output_fused", "state_segments"]

#: Software-pipelining depth of the chunk loop (loads of the next chunks overlap the math of this
#: one): ``STATE_STAGES_LOWP`` for bf16/fp16 intermediates, ``STATE_STAGES`` for float32 ones (their
#: buffers are twice as large: at 3 stages and 64-token chunks the fused kernel needs 288 KB of
#: shared memory, more than an H100 has). H100, bf16 (``benchmarks/probe/variants.py``), 3 stages
#: against 2: B=8, T=4096, H=16 1.230 vs 1.365 ms; T=8192, H=96 2.061 vs 2.333; T=65536 4.643 vs
#: 5.109; varlen 1.416 vs 1.624.
STATE_STAGES = 2
STATE_STAGES_LOWP = 3
#: For bf16/fp16 intermediates, feed the two products in that dtype instead of float32 operands in
#: tf32 (the state itself stays float32 in registers).
STATE_LOW_PRECISION_DOTS = True  # H100: chunk_kda 5.31 -> 4.93 ms, error unchanged (docs: kernel notes)
#: Load ``G`` at each chunk's last token (and ``A_qk`` in the fused kernel) one chunk ahead, by hand:
#: Triton's software pipeliner takes only the loads that feed products, and leaves these two as
#: loads that every step of the sequential loop waits for (H100, T=65536: 4.540 -> 3.927 ms).
STATE_PREFETCH = True
#: Warps per program for K > 64, and value columns per program (None: 64, or fewer when that
#: leaves SMs idle: one long sequence has only HV * V / BV programs to spread over the GPU).
STATE_WARPS = 4
STATE_BV = None
#: The fused state + output kernel's value tile is halved while its grid has fewer programs than this
#: per SM (the two-kernel path and the backward keep 1). H100, 16-token chunks: at T=8192, H=96 (192
#: programs of 64 columns on 132 SMs) 32 columns took 1.631 against 1.654 ms (and 1.937 against 1.980
#: in an earlier run); at B=8, T=4096, H=16 (256 programs) 1.354 against 0.954.
STATE_PROGRAMS_PER_SM = 1.5
#: Split long sequences into segments when the state pass's grid would leave SMs idle
#: (:func:`state_segments`); ``SEGMENT_PROGRAMS_PER_SM``: how many programs per SM the first
#: pass over the segments should have (it sets the number of segments). Off: on the H100 at
#: T=65536, H=16 the forward took 5.52 ms with segments (9 a sequence; 5.71 with 5, 5.79 with 17,
#: 6.91 with 33) against 5.09 without (``benchmarks/probe/variants.py``): the first pass, on
#: ``V + K`` columns, costs more than the parallelism returns. Correct (tested), kept for study.
STATE_SEGMENTS = False
SEGMENT_PROGRAMS_PER_SM = 2
#: Shortest segment, in chunks: below it the passes' extra work outweighs the parallelism.
SEGMENT_MIN_CHUNKS = 8


@triton.jit
def _pseudo_values(b_S, b_W, b_U, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """``v_new = U - W S`` for one chunk, ``[BT, BV]`` float32 (``b_U`` float32, ``b_W`` as stored)."""
    if LOWP:  # bf16/fp16 intermediates: the state rounded to their dtype for the product
        return b_U - tl.dot(b_W, b_S.to(b_W.dtype))
    else:
        return b_U - tl.dot(b_W.to(tl.float32), b_S, input_precision=PRECISION)


@triton.jit
def _next_state(b_S, b_kg, b_v, b_Glast, LOWP: tl.constexpr, PRECISION: tl.constexpr):
    """``S = Diag(Gamma_C) S + kg^T v_new``: the state leaving the chunk (``b_Glast``: ``G`` at its last token)."""
    if LOWP:
        b_dS = tl.dot(tl.trans(b_kg), b_v.to(b_kg.dtype))
    else:
        b_dS = tl.dot(tl.trans(b_kg.to(tl.float32)), b_v, input_precision=PRECISION)
    return b_S * tl.exp(b_Glast)[:, None] + b_dS


@triton.jit
def _chunk_gate_end(G, bos, eos, c0, i_t, i_hv, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
                    BK: tl.constexpr, G_ENDS: tl.constexpr):
    """``G`` at the last token of chunk ``i_t`` of the sequence ``[bos, eos)``, ``[BK]`` float32
    (zeros for a chunk index outside the sequence): from the whole ``G``, or from its chunk-end
    rows (``G_ENDS``)."""
    o_k = tl.arange(0, BK)
    t0 = bos + i_t * BT
    m = (o_k < K) & (t0 + 0 * o_k < eos) & (t0 + 0 * o_k >= bos)
    if G_ENDS:
        return tl.load(G + ((c0 + i_t) * HV + i_hv) * K + o_k, mask=m, other=0)
    else:
        t_last = tl.minimum(t0 + BT, eos) - 1
        return tl.load(G + (t_last * HV + i_hv) * K + o_k, mask=m, other=0)


@triton.jit
def _chunk_square(A, bos, eos, i_t, i_hv, HV: tl.constexpr, BT: tl.constexpr):
    """Chunk ``i_t``'s ``[BT, BT]`` block of a per-chunk matrix stored by rows ``[TT, HV, BT]``
    (``A_qk``, ``Mb``); zeros for padding and past the last chunk."""
    o_t = tl.arange(0, BT)
    t0 = bos + i_t * BT
    m_t = o_t < (eos - t0).to(tl.int32)
    return tl.load(A + ((t0 + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :], mask=m_t[:, None] & m_t[None, :],
                   other=0)


@triton.jit
def _state_passing_kernel(
    # pointers
    kg,  # [TT, HV, K] decayed keys k * exp(G_last - G)
    W,  # [TT, HV, K] (FOLD 0, 1), or kG = Gamma * K (FOLD 2)
    U,  # [TT, HV, V] (FOLD 0), or the values v (FOLD 1, 2)
    Mb,  # [TT, HV, BT] float32 Mb = M Diag(beta) (FOLD 1, 2)
    G,  # [TT, HV, K] float32 (read at each chunk's last token), or [NC, HV, K] those rows alone (G_ENDS)
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
    G_ENDS: tl.constexpr,
    FOLD: tl.constexpr,  # 0: W, U given; 1: U = Mb v formed here; 2: v_new = Mb (v - kG S) formed here
    PREFETCH: tl.constexpr,  # G's chunk-end row and A_qk loaded one chunk ahead (STATE_PREFETCH)
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
    # The loads that feed products are software-pipelined by the compiler (num_stages); the two that
    # do not, G at each chunk's last token and A_qk, are issued here one chunk ahead by hand, so that
    # no step waits for memory (Triton 3.6 on an H100 left them as plain loads inside the loop).
    if PREFETCH:
        b_Gnext = _chunk_gate_end(G, bos, eos, c0, 0, i_hv, HV, K, BT, BK, G_ENDS)
        if OUTPUT:
            b_Anext = _chunk_square(A_qk, bos, eos, 0, i_hv, HV, BT)
    for i_t in range(0, n_chunks):
        t0 = bos + i_t * BT
        if PREFETCH:
            b_Glast = b_Gnext
            b_Gnext = _chunk_gate_end(G, bos, eos, c0, i_t + 1, i_hv, HV, K, BT, BK, G_ENDS)
            if OUTPUT:
                b_A = b_Anext
                b_Anext = _chunk_square(A_qk, bos, eos, i_t + 1, i_hv, HV, BT)
        else:
            b_Glast = _chunk_gate_end(G, bos, eos, c0, i_t, i_hv, HV, K, BT, BK, G_ENDS)
            if OUTPUT:
                b_A = _chunk_square(A_qk, bos, eos, i_t, i_hv, HV, BT)
        m_t = o_t < (eos - t0).to(tl.int32)  # an int32 compare (int64 ones cost registers: spills)
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        o_tk = ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        o_tv = ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        if not OUTPUT:  # h[chunk] = S, for the output kernel
            tl.store(h + ((c0 + i_t) * HV + i_hv) * K * V + o_S, b_S.to(h.dtype.element_ty), mask=m_kv)
        # v_new = U - W S
        b_W = tl.load(W + o_tk, mask=m_tk, other=0)
        b_U = tl.load(U + o_tv, mask=m_tv, other=0).to(tl.float32)
        if FOLD == 0:
            b_v = _pseudo_values(b_S, b_W, b_U, LOWP, PRECISION)  # [BT, BV]
        else:  # the UT transform applied here: Mb = M Diag(beta) of the chunk, b_U holding v
            b_Mb = _chunk_square(Mb, bos, eos, i_t, i_hv, HV, BT)
            if FOLD == 1:  # U = Mb v (off the chain from one state to the next), then as above
                b_v = _pseudo_values(b_S, b_W, tl.dot(b_Mb, b_U, input_precision=PRECISION), LOWP, PRECISION)
            else:  # W S = Mb (kG S): v_new = Mb (v - kG S)
                b_v = tl.dot(b_Mb, _pseudo_values(b_S, b_W, b_U, LOWP, PRECISION), input_precision=PRECISION)
        if OUTPUT:  # o = qg S + A_qk v_new (stage 6), with S still the state entering the chunk
            b_qg = tl.load(qg + o_tk, mask=m_tk, other=0)
            if LOWP:  # operands rounded as the output kernel reads them from memory: identical sums
                b_o = tl.dot(b_qg, b_S.to(qg.dtype.element_ty))
                b_o = tl.dot(b_A, b_v.to(qg.dtype.element_ty), b_o)
            else:
                b_o = tl.dot(b_qg.to(tl.float32), b_S, input_precision=PRECISION)
                b_o = tl.dot(b_A.to(tl.float32), b_v, b_o, input_precision=PRECISION)
            tl.store(o + o_tv, b_o.to(o.dtype.element_ty), mask=m_tv)
        else:
            tl.store(v_new + o_tv, b_v.to(v_new.dtype.element_ty), mask=m_tv)
        # S = Diag(Gamma_C) S + kg^T v_new
        b_kg = tl.load(kg + o_tk, mask=m_tk, other=0)
        b_S = _next_state(b_S, b_kg, b_v, b_Glast, LOWP, PRECISION)

    tl.store(ht + (i_n * HV + i_hv) * K * V + o_S, b_S, mask=m_kv)


@triton.jit
def _segment_kernel(
    # pointers
    kg,  # [TT, HV, K]
    W,  # [TT, HV, K]
    U,  # [TT, HV, V]
    G,  # [TT, HV, K] float32 (read at each chunk's last token)
    ends,  # [NSEG, HV, K, V + K] float32 out: [S_loc | P] of each segment
    cu,  # [NSEG + 1] segment offsets
    # sizes
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BK: tl.constexpr,
    BV: tl.constexpr,
    PRECISION: tl.constexpr,
    LOWP: tl.constexpr,
):
    """Pass 1 of the segmented state pass: one segment, one value head, ``BV`` columns of the
    extended state ``[K, V + K]``, which enters the segment as ``[0 | I]`` and leaves it as ``[S_loc | P]``.

    Each chunk maps the state affinely, ``S -> (Diag(Gamma_C) - kg^T W) S + kg^T U``; columns
    ``< V`` run that map from zero (``S_loc``: what the segment writes), columns ``>= V`` run its
    linear part on the identity (``P``: how the segment transforms the state it is given, ``U``
    read as zero there). Then the state leaving the segment is ``P S_in + S_loc``.
    """
    i_v, i_n, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos = tl.load(cu + i_n).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)
    VS: tl.constexpr = V + K
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)  # extended column index: value column, or V + j for P's column j
    o_t = tl.arange(0, BT)
    m_k = o_k < K
    m_u = o_v < V  # columns that read U
    b_S = tl.where(o_v[None, :] - V == o_k[:, None], 1.0, 0.0)  # [0 | I]
    for i_t in range(0, tl.cdiv(eos - bos, BT)):
        t0 = bos + i_t * BT
        m_t = t0 + o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        b_W = tl.load(W + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        b_U = tl.load(U + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_t[:, None] & m_u[None, :],
                      other=0).to(tl.float32)
        b_v = _pseudo_values(b_S, b_W, b_U, LOWP, PRECISION)
        t_last = tl.minimum(t0 + BT, eos) - 1
        b_Glast = tl.load(G + (t_last * HV + i_hv) * K + o_k, mask=m_k, other=0)
        b_kg = tl.load(kg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0)
        b_S = _next_state(b_S, b_kg, b_v, b_Glast, LOWP, PRECISION)
    tl.store(ends + ((i_n * HV + i_hv) * K + o_k[:, None]) * VS + o_v[None, :], b_S,
             mask=m_k[:, None] & (o_v < VS)[None, :])


def state_value_tile(sequences_x_heads: int, V: int, device, programs_per_sm: float = 1.0) -> int:
    """64 value columns per program, halved (down to 16) while the grid has fewer than
    ``programs_per_sm`` programs per SM (the fused forward kernel asks ``STATE_PROGRAMS_PER_SM``)."""
    sms = sm_count(device)
    BV = min(64, max(16, triton.next_power_of_2(V)))
    while BV > 16 and sequences_x_heads * triton.cdiv(V, BV) < programs_per_sm * sms:
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
    sms = sm_count(device)
    return sequences_x_heads * triton.cdiv(V, 64) >= 1.5 * sms


def _chunk_loop_options(W: torch.Tensor, K: int) -> dict:
    """Launch options shared by the kernels that walk a sequence's chunks with a ``[K, BV]`` state."""
    return dict(
        BK=max(16, triton.next_power_of_2(K)), PRECISION=dot_precision(W.dtype),
        LOWP=STATE_LOW_PRECISION_DOTS and W.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
        num_warps=STATE_WARPS if K > 64 else 4,
        num_stages=1 if K > 128 else STATE_STAGES_LOWP if W.dtype in (torch.bfloat16, torch.float16) else STATE_STAGES,
    )


def _wy_operands(W, U, Mb, v, kG):
    """``(FOLD, W-slot, U-slot)`` of the state kernel from the WY factors it is given: ``W, U``
    (0), or ``Mb`` with the values ``v`` and one of ``W`` (1) or ``kG`` (2); wrong mixes refused by name."""
    if Mb is None:
        if W is None or U is None:
            raise ValueError("W, U: both required unless Mb (with v) is given")
        if v is not None or kG is not None:
            raise ValueError("v, kG: only with Mb")
        return 0, W, U
    if v is None or U is not None:
        raise ValueError("v, U: with Mb give the values v (U = Mb v is formed in the kernel), not U")
    if (W is None) == (kG is None):
        raise ValueError("W, kG: with Mb give exactly one of W or kG")
    return (1, W, v) if kG is None else (2, kG, v)


def _launch(kg, W, U, G, initial_state, h, v_new, ht, output, chunk_size, state_v_first, meta, Mb=None, fold=0):
    """Run the state kernel: ``output = (qg, A_qk, o)`` fuses stage 6 (``h``, ``v_new`` unused then);
    ``W``, ``U``, ``Mb``, ``fold`` as :func:`_wy_operands` resolved them (``U`` holds ``v`` with ``fold``)."""
    HV, K, V = kg.shape[2], kg.shape[3], U.shape[3]
    if G.dim() == 3 and G.shape != (meta.NC, HV, K):
        raise ValueError(f"G: expected [B, T, HV, K] or, at chunk ends, [NC, HV, K] = {(meta.NC, HV, K)}, "
                         f"got {tuple(G.shape)}")
    qg, A_qk, o = output if output is not None else (ht, ht, ht)  # unread placeholders without OUTPUT
    # the fused kernel (output) asks for more programs per SM; the two-kernel path keeps 1 (measured there)
    BV = STATE_BV or state_value_tile(meta.N * HV, V, kg.device, STATE_PROGRAMS_PER_SM if output is not None else 1.0)
    if meta.N > 0:
        _state_passing_kernel[(triton.cdiv(V, BV), meta.N, HV)](
            kg.contiguous(), W.contiguous(), U.contiguous(), ht if Mb is None else Mb.contiguous(), G.contiguous(),
            initial_state.contiguous() if initial_state is not None else ht, h, v_new, ht,
            qg.contiguous(), A_qk.contiguous(), o, meta.cu, meta.chunk_off,
            HV=HV, K=K, V=V, BT=chunk_size, BV=BV, HAS_H0=initial_state is not None, STATE_V_FIRST=state_v_first,
            OUTPUT=output is not None, G_ENDS=G.dim() == 3, FOLD=fold, PREFETCH=STATE_PREFETCH,
            **_chunk_loop_options(W, K),
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
    :func:`~kda_explained.fast.local.chunk_local_factors`. ``G`` is the in-chunk cumulative
    decay ``[B, T, HV, K]`` float32, or only its row at each chunk's last token, ``[NC, HV, K]``
    (the ``G_end`` of :func:`~kda_explained.fast.local.chunk_local_factors_one_pass`): the kernel
    reads nothing else of it. ``v_new`` has ``W``'s dtype and
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
    Mb: Optional[torch.Tensor] = None,
    v: Optional[torch.Tensor] = None,
    kG: Optional[torch.Tensor] = None,
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
    kernel reads once per value tile as well. ``G`` as in :func:`state_passing` (whole, or its rows
    at the chunk ends).

    The kernel can also apply the UT transform itself (the factors of
    :func:`~kda_explained.fast.local.chunk_local_factors_one_pass` with ``fold``): given
    ``Mb = M Diag(beta)`` (``[B, T, HV, C]`` float32) and the values ``v`` instead of ``U = Mb v``
    (pass ``U=None``), it forms ``U`` per chunk; given ``kG = Gamma * K`` as well instead of
    ``W = Mb kG`` (pass ``W=None``), it forms the pseudo-values as ``v_new = Mb (v - kG S)``.
    """
    B, T, HV, K = kg.shape
    fold, W, U = _wy_operands(W, U, Mb, v, kG)  # the kernel's W and U slots (kG, v with fold)
    V = U.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    ht = torch.empty(meta.N, *state_shape, dtype=torch.float32, device=kg.device)
    o = torch.empty(B, T, HV, V, dtype=out_dtype or torch.float32, device=kg.device)
    _launch(kg, W, U, G, initial_state, ht, ht, ht, (qg, A_qk, o), chunk_size, state_v_first, meta, Mb, fold)
    return o, ht


def state_segments(sequences_x_heads: int, V: int, B: int, T: int, chunk_size: int, cu_seqlens, device) -> int:
    """Segments per sequence for the state pass: 1 while ``STATE_SEGMENTS`` is off or the grid at
    64 value columns a program fills the SMs, else enough for ``SEGMENT_PROGRAMS_PER_SM`` programs
    per SM in the first pass (``[K, V + K]`` columns), each at least ``SEGMENT_MIN_CHUNKS`` chunks
    of the longest sequence long."""
    if not STATE_SEGMENTS:
        return 1
    sms = sm_count(device)
    programs = sequences_x_heads * triton.cdiv(V, 64)
    if programs >= sms:
        return 1
    wanted = triton.cdiv(SEGMENT_PROGRAMS_PER_SM * sms, programs)
    return max(1, min(wanted, max_chunks(B, T, chunk_size, cu_seqlens) // SEGMENT_MIN_CHUNKS))


@functools.lru_cache(maxsize=64)
def _segment_tables(offsets: Tuple[int, ...], chunk_size: int, segment_chunks: int, device: str):
    """The segments of every sequence (``segment_chunks`` chunks each, the last one shorter; an
    empty sequence gets one empty segment), as a packed batch of its own: its chunk tables, the
    index of each sequence's first and last segment, and for pass 2 the segments that hand their
    state on, step by step."""
    cu, first, last = [0], [], []
    length = segment_chunks * chunk_size
    for n in range(len(offsets) - 1):
        bos, eos = offsets[n], offsets[n + 1]
        first.append(len(cu) - 1)
        cu.extend(range(bos + length, eos, length))
        cu.append(eos)
        last.append(len(cu) - 2)
    idx = functools.partial(torch.tensor, dtype=torch.long, device=device)
    steps = [idx([fst + step for fst, lst in zip(first, last) if fst + step < lst])
             for step in range(max((lst - fst for fst, lst in zip(first, last)), default=0))]
    return build_seq_meta(cu, chunk_size, device), idx(first), idx(last), steps


def state_passing_output_segmented(
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
    segments: int,
    out_dtype: Optional[torch.dtype] = None,
    state_v_first: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`state_passing_output` with every sequence cut into ``segments`` pieces that run side by side.

    The state pass is sequential along a sequence; one long sequence gives the GPU only
    ``HV * V / BV`` programs (32 at ``HV = 16``, ``V = 128`` on 132 SMs). Each chunk maps the
    state affinely, so a segment of chunks does too: ``S_out = P S_in + S_loc``. Three passes:

    1. every segment at once (``_segment_kernel``): ``S_loc`` (the state it would leave from
       zero) and ``P`` (``K x K``: the same chunks run on the identity), as ``K`` more state columns;
    2. segment after segment, one small product each: ``S_in`` of every segment;
    3. every segment at once again, from its ``S_in``: the output (:func:`state_passing_output`).

    Pass 1 does ``(V + K) / V`` times the state pass's products and pass 3 repeats it, but all of
    it in parallel; the outputs equal the unsegmented pass's up to rounding.
    """
    B, T, HV, K = kg.shape
    V = U.shape[3]
    offsets = tuple(packed_offsets(B, T, cu_seqlens))
    seg_chunks = max(1, triton.cdiv(max_chunks(B, T, chunk_size, cu_seqlens), segments))
    meta, first, last, steps = _segment_tables(offsets, chunk_size, seg_chunks, str(kg.device))
    # 1. [S_loc | P] of every segment
    VS = V + K
    BV = min(64, triton.next_power_of_2(VS))
    ends = torch.empty(meta.N, HV, K, VS, dtype=torch.float32, device=kg.device)
    _segment_kernel[(triton.cdiv(VS, BV), meta.N, HV)](
        kg.contiguous(), W.contiguous(), U.contiguous(), G.contiguous(), ends, meta.cu,
        HV=HV, K=K, V=V, BT=chunk_size, BV=BV, **_chunk_loop_options(W, K),
    )
    # 2. the state entering each segment: S_in[s + 1] = P[s] S_in[s] + S_loc[s]
    S_in = torch.empty(meta.N, HV, K, V, dtype=torch.float32, device=kg.device)
    if initial_state is None:
        S_in[first] = 0.0
    else:
        S_in[first] = (initial_state.transpose(-1, -2) if state_v_first else initial_state).float()
    for cur in steps:
        S_in[cur + 1] = torch.matmul(ends[cur, :, :, V:], S_in[cur]) + ends[cur, :, :, :V]
    # 3. the output (and each segment's final state) from the entering states
    o, S_out = state_passing_output(kg, W, U, G, qg, A_qk, S_in, chunk_size, out_dtype=out_dtype, meta=meta)
    S = S_out[last]
    return o, (S.transpose(-1, -2).contiguous() if state_v_first else S)
