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
(:class:`~kda_explained.fast.config.StateConfig`'s ``prefetch``), since the pipeliner
takes only the loads that feed products and each
step would otherwise wait for that one.

After the one-pass kernel (short chunks) the loop applies the UT transform itself: given
``Mb = M Diag(beta)`` and ``k_gamma = Gamma * K`` of each chunk, and the values ``v``, it forms
``v_new = Mb (v - k_gamma S)``, the same as ``U - W S`` with ``W = Mb k_gamma`` and ``U = Mb v``.

:func:`state_passing_output` runs stage 6 (the output) inside the same loop, while
each chunk's entering state and ``v_new`` are in registers, so neither goes to
memory; :func:`~kda_explained.fast.api.chunk_kda` uses it where the grid is large
enough (:func:`output_fused`).

``STATE_V_FIRST`` reads and writes the initial, final and chunk states as ``[V, K]``
(serving engines that store the state transposed) through strides alone: the
registers keep ``[K, BV]``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import SeqMeta, dot_precision, interpreting, seq_meta, sm_count, tile
from .config import StateConfig, plan_for

__all__ = ["state_passing", "state_passing_output", "output_fused", "chunk_gate_end", "state_value_tile",
           "chunk_loop_options"]

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
def chunk_gate_end(G, bos, eos, c0, i_t, i_hv, HV: tl.constexpr, K: tl.constexpr, BT: tl.constexpr,
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
    W,  # [TT, HV, K] (FOLD 0), or k_gamma = Gamma * K (FOLD 2)
    U,  # [TT, HV, V] (FOLD 0), or the values v (FOLD 2)
    Mb,  # [TT, HV, BT] float32 Mb = M Diag(beta) (FOLD 2)
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
    FOLD: tl.constexpr,  # 0: W, U given; 2: v_new = Mb (v - k_gamma S) formed here
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
        b_Gnext = chunk_gate_end(G, bos, eos, c0, 0, i_hv, HV, K, BT, BK, G_ENDS)
        if OUTPUT:
            b_Anext = _chunk_square(A_qk, bos, eos, 0, i_hv, HV, BT)
    for i_t in range(0, n_chunks):
        t0 = bos + i_t * BT
        if PREFETCH:
            b_Glast = b_Gnext
            b_Gnext = chunk_gate_end(G, bos, eos, c0, i_t + 1, i_hv, HV, K, BT, BK, G_ENDS)
            if OUTPUT:
                b_A = b_Anext
                b_Anext = _chunk_square(A_qk, bos, eos, i_t + 1, i_hv, HV, BT)
        else:
            b_Glast = chunk_gate_end(G, bos, eos, c0, i_t, i_hv, HV, K, BT, BK, G_ENDS)
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
        else:  # the UT transform applied here: Mb = M Diag(beta) of the chunk, b_U holding v, b_W k_gamma:
            # W S = Mb (k_gamma S), so v_new = Mb (v - k_gamma S)
            b_Mb = _chunk_square(Mb, bos, eos, i_t, i_hv, HV, BT)
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


def state_value_tile(sequences_x_heads: int, V: int, device, programs_per_sm: float = 1.0, widest: int = 64) -> int:
    """``widest`` value columns per program (at most ``V``'s tile), halved (down to 16) while the grid
    has fewer than ``programs_per_sm`` programs per SM: a kernel that keeps a ``[K, BV]`` state per
    program spreads a few sequences over the GPU this way (the fused forward kernel asks its config's
    ``fused_programs_per_sm``, the recurrent kernel its ``DecodeConfig``'s ``min_programs_per_sm``)."""
    sms = sm_count(device)
    BV = tile(V, widest)
    while BV > 16 and sequences_x_heads * triton.cdiv(V, BV) < programs_per_sm * sms:
        BV //= 2
    return BV


def output_fused(sequences_x_heads: int, V: int, device, min_programs_per_sm: float) -> bool:
    """Whether stage 6 should run inside the state kernel: only while its grid, at 64 value columns a
    program, holds at least ``min_programs_per_sm`` programs per SM.

    The fused kernel saves ``h`` and ``v_new``'s round trips through memory but puts the output's
    products into the sequential chunk loop, which pays where the grid fills the GPU and costs where
    one long sequence leaves it idle (the kernel page has the measurements).
    """
    return sequences_x_heads * triton.cdiv(V, 64) >= min_programs_per_sm * sm_count(device)


def chunk_loop_options(W: torch.Tensor, K: int, config: StateConfig) -> dict:
    """Launch options shared by the kernels that walk a sequence's chunks with a ``[K, BV]`` state."""
    return dict(
        BK=tile(K), PRECISION=dot_precision(W.dtype),
        LOWP=config.lowp and W.dtype in (torch.bfloat16, torch.float16) and not interpreting(),
        num_warps=config.warps if K > 64 else 4,
        num_stages=1 if K > 128 else config.stages_lowp if W.dtype in (torch.bfloat16, torch.float16)
        else config.stages,
    )


def _wy_operands(W, U, Mb, v, k_gamma):
    """``(FOLD, W-slot, U-slot)`` of the state kernel from the WY factors it is given: ``W, U``
    (0), or ``Mb`` with the values ``v`` and ``k_gamma`` (2); wrong mixes refused by name."""
    if Mb is None:
        if W is None or U is None:
            raise ValueError("W, U: both required unless Mb (with v and k_gamma) is given")
        if v is not None or k_gamma is not None:
            raise ValueError("v, k_gamma: only with Mb")
        return 0, W, U
    if v is None or U is not None:
        raise ValueError("v, U: with Mb give the values v (U = Mb v is formed in the kernel), not U")
    if W is not None or k_gamma is None:
        raise ValueError("W, k_gamma: with Mb give k_gamma (W = Mb k_gamma is formed in the kernel), not W")
    return 2, k_gamma, v


def _launch(kg, W, U, G, initial_state, h, v_new, ht, output, chunk_size, state_v_first, meta, config, Mb=None,
            fold=0):
    """Run the state kernel: ``output = (qg, A_qk, o)`` fuses stage 6 (``h``, ``v_new`` unused then);
    ``W``, ``U``, ``Mb``, ``fold`` as :func:`_wy_operands` resolved them (``U`` holds ``v`` with ``fold``)."""
    HV, K, V = kg.shape[2], kg.shape[3], U.shape[3]
    if G.dim() == 3 and G.shape != (meta.NC, HV, K):
        raise ValueError(f"G: expected [B, T, HV, K] or, at chunk ends, [NC, HV, K] = {(meta.NC, HV, K)}, "
                         f"got {tuple(G.shape)}")
    qg, A_qk, o = output if output is not None else (ht, ht, ht)  # unread placeholders without OUTPUT
    # the fused kernel (output) asks for more programs per SM; the two-kernel path keeps 1
    BV = config.BV or state_value_tile(meta.N * HV, V, kg.device,
                                       config.fused_programs_per_sm if output is not None else 1.0)
    if meta.N > 0:
        _state_passing_kernel[(triton.cdiv(V, BV), meta.N, HV)](
            kg.contiguous(), W.contiguous(), U.contiguous(), ht if Mb is None else Mb.contiguous(), G.contiguous(),
            initial_state.contiguous() if initial_state is not None else ht, h, v_new, ht,
            qg.contiguous(), A_qk.contiguous(), o, meta.cu, meta.chunk_off,
            HV=HV, K=K, V=V, BT=chunk_size, BV=BV, HAS_H0=initial_state is not None, STATE_V_FIRST=state_v_first,
            OUTPUT=output is not None, G_ENDS=G.dim() == 3, FOLD=fold, PREFETCH=config.prefetch,
            **chunk_loop_options(W, K, config),
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
    config: Optional[StateConfig] = None,
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
    _launch(kg, W, U, G, initial_state, h, v_new, ht, None, chunk_size, state_v_first, meta,
            config or plan_for(kg.device).state)
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
    k_gamma: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    state_v_first: bool = False,
    meta: Optional[SeqMeta] = None,
    config: Optional[StateConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Stages 5 and 6 in one kernel: ``o: [B, T, HV, V]`` (``out_dtype``, default float32) and
    ``final_state: [N, HV, K, V]`` float32.

    The same function as :func:`state_passing` followed by
    :func:`~kda_explained.fast.output.chunk_output` (with ``h`` in ``W``'s dtype, as
    :func:`~kda_explained.fast.forward.chunk_kda_fwd` keeps it), but each chunk's output is formed
    while its entering state and pseudo-values are still in registers: ``h`` and ``v_new`` never go
    to memory. Each program also reads its chunk's ``qg`` and ``A_qk``, which the separate output
    kernel reads once per value tile as well. ``G`` as in :func:`state_passing` (whole, or its rows
    at the chunk ends).

    The kernel can also apply the UT transform itself (the factors of
    :func:`~kda_explained.fast.local.chunk_local_factors_one_pass` with ``fold``): given
    ``Mb = M Diag(beta)`` (``[B, T, HV, C]`` float32) and the values ``v`` instead of ``U = Mb v``
    (pass ``U=None``) and ``k_gamma = Gamma * K`` instead of ``W = Mb k_gamma`` (pass ``W=None``), it forms
    the pseudo-values per chunk as ``v_new = Mb (v - k_gamma S)``.
    """
    B, T, HV, K = kg.shape
    fold, W, U = _wy_operands(W, U, Mb, v, k_gamma)  # the kernel's W and U slots (k_gamma, v with fold)
    V = U.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    state_shape = (HV, V, K) if state_v_first else (HV, K, V)
    ht = torch.empty(meta.N, *state_shape, dtype=torch.float32, device=kg.device)
    o = torch.empty(B, T, HV, V, dtype=out_dtype or torch.float32, device=kg.device)
    _launch(kg, W, U, G, initial_state, ht, ht, ht, (qg, A_qk, o), chunk_size, state_v_first, meta,
            config or plan_for(kg.device).state, Mb, fold)
    return o, ht
