"""Backward kernels of the fast layer: the gradients of ``chunk_kda``, stage by stage.

Kernels that each mirror a chunked backward function, and :func:`kda_backward`,
their composition (the mirror of :func:`kda_explained.chunked.backward.kda_backward`):

- ``chunk_local_cumsum_bwd`` (:func:`kda_explained.chunked.backward_intra.chunk_local_cumsum_bwd`):
  the reverse in-chunk cumsum ``dg_i = sum_{r >= i} dG_r``;
- ``intra_chunk_matrices_bwd``
  (:func:`kda_explained.chunked.backward_intra.intra_chunk_matrices_bwd`): 16 x 16 blocks on
  tensor cores, in :mod:`kda_explained.fast.backward_intra`; the exact column-by-column form
  ``intra_chunk_matrices_bwd_by_columns`` stays here as its second check;
- ``ut_transform_bwd`` (:func:`kda_explained.chunked.backward_intra.ut_transform_bwd`):
  ``dA_kk = StrictTril(-M^T dM M^T)``, one ``[C, C]`` product pair per chunk;
- ``wy_representation_bwd``
  (:func:`kda_explained.chunked.backward_inter.wy_representation_bwd`): the WY factors'
  backward, every chunk in parallel (``M`` from the forward's keys' pass, ``store_m``);
- ``chunk_output_bwd`` (:func:`kda_explained.chunked.backward_inter.chunk_output_bwd`):
  the output stage's backward, every chunk in parallel;
- ``state_passing_bwd_recurrence``
  (:func:`kda_explained.chunked.backward_inter.state_passing_bwd_recurrence`): the one
  sequential part of the backward;
- ``state_passing_bwd`` (:func:`kda_explained.chunked.backward_inter.state_passing_bwd`):
  the recurrence, then the rest of the state stage's backward, every chunk in parallel;
- ``state_wy_bwd``: the per-chunk backward of stages 6, 5 and 4 (the output, the state stage
  after its recurrence, the WY factors) in one kernel, what :func:`kda_backward` runs
  (the three kernels above run where the plan's ``state_wy_fused`` is off; each is tested
  against its oracle).

**The state recurrence.** One program owns the gradient ``dS [K, BV]``
of one sequence's state (one value head, one tile of ``BV`` value columns) in
float32 registers and walks the chunks from last to first::

    dS_out[chunk] = dS                                   # dL/dS' of the state leaving the chunk
    dv_tot        = dv_new + kg dS                        # S' = Diag(Gamma_C) S + kg^T v_new
    dS           <- Diag(Gamma_C) dS + dh - W^T dv_tot    # dL/dS of the state entering it

``dh = qg^T dO`` and ``dv_new = A_qk^T dO`` are the output stage's terms; in
:func:`kda_backward` the recurrence forms them itself from ``qg``, ``A_qk`` and ``dO``
(``output=``), so neither goes through memory.

Value columns are independent in all three lines, as in the forward state pass.
What the rest of the stage's backward needs (``dk``, ``dW``, ``dG``) are per-chunk
products of ``dS_out``, ``dv_tot`` and the forward's ``h`` and ``v_new``, with no
order between chunks.

**The rest of the state stage**, per chunk and value head, looping over tiles of ``V``
(``S = h`` of the chunk, ``dS = dS_out``)::

    dkg     += v_new dS^T        dW -= dv_tot S^T        d_decay += sum_V(dS * S)
    dk       = dkg exp(G_last - G)                        dG = -dkg * kg  (row by row)
    dG_last += sum_r dkg * kg + exp(G_last) d_decay       (the chunk's last real row)

**The WY factors**, ``W = M kb`` with ``kb = beta exp(G) k`` and ``U = M vb`` with
``vb = beta v``, per chunk and value head, looping over tiles of ``K`` and then ``V``::

    dM  += dW kb^T + dU vb^T      dkb = M^T dW      dvb = M^T dU
    dk   = beta exp(G) dkb        dG = dkb * kb     dv = beta dvb
    dbeta = sum_K(dkb * exp(G) k) + sum_V(dvb * v)

**The output stage**, ``O = qg S + A_qk v_new`` with ``qg = scale q exp(G)``, one
program per chunk and value head, looping over tiles of ``V``::

    dS     = qg^T dO          (per V tile: the ``dh`` the recurrence takes; or formed there)
    dqg   += dO S^T           dA_qk += dO v_new^T      (summed over V tiles)
    dv_new = A_qk^T dO
    dq     = scale exp(G) dqg (per value head; GVA sums the group after)   dG = dqg * qg

``chunk_kda`` differentiates through :func:`kda_backward`
(:mod:`kda_explained.fast.autograd`). Between forward and backward it keeps the inputs and ``A_qk``, ``M`` and
``G`` (``factors=``, ``G=``); the backward recomputes the WY factors from ``M``
(:func:`kda_explained.fast.local.chunk_wy_factors`) and the chunk states.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..validation import check_chunk_size
from ._grad import accumulator as _accumulator, chunk_span as _chunk_span, per_key_head as _per_key_head
from ._meta import SeqMeta, dot_precision, interpreting, seq_meta, tile
from .backward_intra import intra_chunk_matrices_bwd
from .config import BackwardConfig, Plan, plan_for
from .inputs import FAST_CHUNK_SIZES, check_fast_inputs
from .local import chunk_local_factors, chunk_wy_factors
from .prepare import chunk_local_cumsum
from .state import chunk_gate_end, state_passing, state_value_tile

__all__ = ["kda_backward", "core_backward", "checked_backward_inputs",
           "chunk_local_cumsum_bwd", "intra_chunk_matrices_bwd_by_columns", "ut_transform_bwd",
           "wy_representation_bwd", "state_wy_bwd", "state_passing_bwd_recurrence", "state_passing_bwd",
           "state_passing_bwd_chunks", "chunk_output_bwd"]

def _native(*xs: torch.Tensor) -> bool:
    """True when the tensors share one 16-bit dtype: products of them loaded as they are stored run on
    that dtype's tensor cores with float32 sums, exactly as tf32 products of the same values (a bf16
    or fp16 value is a tf32 value), at twice tf32's rate."""
    return xs[0].dtype in (torch.bfloat16, torch.float16) and all(x.dtype == xs[0].dtype for x in xs)



@triton.jit
def _state_bwd_recurrence_kernel(
    # pointers
    kg,  # [TT, HV, K] decayed keys k * exp(G_last - G)
    W,  # [TT, HV, K]
    G,  # [TT, HV, K] float32 (read at each chunk's last token)
    dh,  # [NC, HV, K, V] gradient reaching each chunk's entering state from the output (HAS_DH)
    dv_new,  # [TT, HV, V] gradient of v_new from the output (HAS_DVN)
    qg,  # [TT, HV, K] decayed, scaled queries (FUSED: dh = qg^T dO computed here)
    A_qk,  # [TT, HV, BT] (FUSED: dv_new = A_qk^T dO computed here)
    do,  # [TT, HV, V] gradient of the output (FUSED)
    dS_final,  # [N, HV, K, V] gradient of the final states (HAS_DSF)
    dS_out,  # [NC, HV, K, V] out: dL/dS' of the state leaving each chunk
    dv_tot,  # [TT, HV, V] out
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
    FUSED: tl.constexpr,
    HAS_DSF: tl.constexpr,
    PRECISION: tl.constexpr,
    LOWP: tl.constexpr,
    PREFETCH: tl.constexpr,
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

    # the products' operands: the intermediates' own dtype with LOWP (bf16 tensor cores, float32
    # sums; the state gradient rounded to it for its products, as the forward state pass does), else float32
    if LOWP:
        OP = kg.dtype.element_ty
    else:
        OP = tl.float32
    b_dS = tl.zeros([BK, BV], dtype=tl.float32)
    if HAS_DSF:
        b_dS += tl.load(dS_final + (i_n * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)

    n_chunks = tl.cdiv(eos - bos, BT)
    if PREFETCH:  # G's chunk-end row one chunk ahead (the pipeliner leaves it a load each step waits for)
        b_Gnext = chunk_gate_end(G, bos, eos, c0, n_chunks - 1, i_hv, HV, K, BT, BK, False)
    for i_r in range(0, n_chunks):
        i_t = n_chunks - 1 - i_r  # last chunk first
        if PREFETCH:
            b_Glast = b_Gnext
            b_Gnext = chunk_gate_end(G, bos, eos, c0, i_t - 1, i_hv, HV, K, BT, BK, False)
        else:
            b_Glast = chunk_gate_end(G, bos, eos, c0, i_t, i_hv, HV, K, BT, BK, False)
        t0 = bos + i_t * BT
        m_t = t0 + o_t < eos
        m_tk = m_t[:, None] & m_k[None, :]
        m_tv = m_t[:, None] & m_v[None, :]
        p_S = ((c0 + i_t) * HV + i_hv) * K * V + o_S
        tl.store(dS_out + p_S, b_dS, mask=m_kv)
        # dv_tot = dv_new + kg dS
        b_kg = tl.load(kg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0).to(OP)
        b_dv = tl.dot(b_kg, b_dS.to(OP), input_precision=PRECISION)  # [BT, BV]
        if HAS_DVN:
            b_dv += tl.load(dv_new + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv,
                            other=0).to(tl.float32)
        if FUSED:  # the output stage's terms, from its inputs: dv_new = A_qk^T dO, dh = qg^T dO
            b_do = tl.load(do + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], mask=m_tv,
                           other=0).to(OP)  # [BT, BV]
            b_A = tl.load(A_qk + ((t0 + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :],
                          mask=m_t[:, None] & m_t[None, :], other=0).to(OP)  # [BT, BT]
            b_dv += tl.dot(tl.trans(b_A), b_do, input_precision=PRECISION)
        tl.store(dv_tot + ((t0 + o_t[:, None]) * HV + i_hv) * V + o_v[None, :], b_dv, mask=m_tv)
        # dS <- Diag(Gamma_C) dS + dh - W^T dv_tot
        b_W = tl.load(W + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk, other=0).to(OP)
        b_dS = b_dS * tl.exp(b_Glast)[:, None] - tl.dot(tl.trans(b_W), b_dv.to(OP), input_precision=PRECISION)
        if HAS_DH:
            b_dS += tl.load(dh + p_S, mask=m_kv, other=0).to(tl.float32)
        if FUSED:
            b_qg = tl.load(qg + ((t0 + o_t[:, None]) * HV + i_hv) * K + o_k[None, :], mask=m_tk,
                           other=0).to(OP)  # [BT, BK]
            b_dS += tl.dot(tl.trans(b_qg), b_do, input_precision=PRECISION)

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
    output: Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None,
    grad_dtype: torch.dtype = torch.float32,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``dS_out: [NC, HV, K, V]``, ``dv_tot: [B, T, HV, V]`` (both ``grad_dtype``), ``dS0: [N, HV, K, V]``
    (float32).

    Arguments as :func:`kda_explained.chunked.backward_inter.state_passing_bwd_recurrence`
    (``h`` is read for its shape only: the recurrence does not need the states).
    ``output = (qg, A_qk, dO)``, with ``dh`` and ``dv_new`` ``None``: the output stage's two
    terms are computed here, chunk by chunk, from its inputs (``qg = scale q exp(G)``
    ``[B, T, HV, K]``, ``A_qk`` ``[B, T, HV, C]``, ``dO`` ``[B, T, HV, V]``) instead of being
    read from :func:`chunk_output_bwd` (``state_grads=False``): two ``[K, V]``-per-chunk
    round trips through memory fewer.
    """
    B, T, HV, K = kg.shape
    V = h.shape[-1]
    if output is not None and (dh is not None or dv_new is not None):
        raise ValueError("state_passing_bwd_recurrence: pass either `dh`, `dv_new` or `output`, not both")
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    dS_out = torch.empty(meta.NC, HV, K, V, dtype=grad_dtype, device=kg.device)
    dv_tot = torch.empty(B, T, HV, V, dtype=grad_dtype, device=kg.device)
    dS0 = torch.empty(meta.N, HV, K, V, dtype=torch.float32, device=kg.device)
    qg, A_qk, do = (x.contiguous() for x in output) if output is not None else (kg, kg, dv_tot)
    config = config or plan_for(kg.device).backward
    launch = config["recurrence"]
    # as the forward state pass: the widest value tile, halved while that leaves SMs without a program
    BV = min(tile(V, launch.BV), state_value_tile(meta.N * HV, V, kg.device))
    if meta.N > 0:
        _state_bwd_recurrence_kernel[(triton.cdiv(V, BV), meta.N, HV)](
            kg.contiguous(), W.contiguous(), G.contiguous(),
            dh.contiguous() if dh is not None else dS_out, dv_new.contiguous() if dv_new is not None else dv_tot,
            qg, A_qk, do, dS_final.contiguous() if dS_final is not None else dS0, dS_out, dv_tot, dS0,
            meta.cu, meta.chunk_off,
            HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K), BV=BV,
            HAS_DH=dh is not None, HAS_DVN=dv_new is not None, FUSED=output is not None,
            HAS_DSF=dS_final is not None, PRECISION=dot_precision(W.dtype),
            LOWP=config.recurrence_lowp and W.dtype in (torch.bfloat16, torch.float16) and kg.dtype == W.dtype,
            PREFETCH=config.recurrence_prefetch, num_warps=launch.warps, num_stages=launch.stages,
        )
    return dS_out, dv_tot, dS0


@triton.jit
def _chunk_output_bwd_kernel(
    # pointers
    q,  # [TT, H, K]
    G,  # [TT, HV, K] float32
    h,  # [NC, HV, K, V] states entering each chunk
    v_new,  # [TT, HV, V]
    A_qk,  # [TT, HV, BT]
    do,  # [TT, HV, V]
    dq,  # [TT, HV, K] float32 out, per value head
    dG,  # [TT, HV, K] float32 out
    dh,  # [NC, HV, K, V] float32 out (STATE_GRADS)
    dv_new,  # [TT, HV, V] float32 out (STATE_GRADS)
    dA,  # [TT, HV, BT] float32 out: dO v_new^T (the whole chunk row, as autograd gives it)
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
    STATE_GRADS: tl.constexpr,  # write dh and dv_new (else the recurrence computes them, output=)
    NATIVE: tl.constexpr,  # dO, h, v_new share a 16-bit dtype: their products on it (exact, as tf32 of them)
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    if NATIVE:
        OP = h.dtype.element_ty
    else:
        OP = tl.float32
    i_h = i_hv // (HV // H)
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    m_t = bos + o_t < eos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_q = tl.load(q + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
    b_gamma = tl.where(m_tk, tl.exp(tl.load(G + p_tk, mask=m_tk, other=0)), 0.0)  # exp(<= 0)
    b_qg = b_q * b_gamma * scale  # [BT, BK]
    if STATE_GRADS:
        b_A = tl.load(A_qk + ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :],
                      mask=m_t[:, None] & m_t[None, :], other=0).to(tl.float32)  # [BT, BT]
    b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        p_tv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        p_S = (i_c.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        b_do = tl.load(do + p_tv, mask=m_tv, other=0).to(OP)  # [BT, BV]
        b_S = tl.load(h + p_S, mask=m_k[:, None] & m_v[None, :], other=0).to(OP)  # [BK, BV]
        b_vn = tl.load(v_new + p_tv, mask=m_tv, other=0).to(OP)  # [BT, BV]
        if STATE_GRADS:
            b_do32 = b_do.to(tl.float32)
            tl.store(dh + p_S, tl.dot(tl.trans(b_qg), b_do32, input_precision=PRECISION),
                     mask=m_k[:, None] & m_v[None, :])
            tl.store(dv_new + p_tv, tl.dot(tl.trans(b_A), b_do32, input_precision=PRECISION), mask=m_tv)
        b_dqg += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_dA += tl.dot(b_do, tl.trans(b_vn), input_precision=PRECISION)
    tl.store(dq + p_tk, b_dqg * b_gamma * scale, mask=m_tk)
    tl.store(dG + p_tk, b_dqg * b_qg, mask=m_tk)
    tl.store(dA + ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :], b_dA, mask=m_t[:, None])


def chunk_output_bwd(
    q: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    G: torch.Tensor,
    A_qk: Optional[torch.Tensor],
    scale: float,
    do: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    per_value_head: bool = False,
    state_grads: bool = True,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor], torch.Tensor, torch.Tensor]:
    """``dq: [B, T, H, K]``, ``dh: [NC, HV, K, V]``, ``dv_new: [B, T, HV, V]``, ``dG: [B, T, HV, K]``,
    ``dA_qk: [B, T, HV, C]``, all float32; arguments as
    :func:`kda_explained.chunked.backward_inter.chunk_output_bwd` (``per_value_head``: ``dq`` as
    ``[B, T, HV, K]``, not yet summed over GVA groups). ``state_grads=False``: ``dh`` and
    ``dv_new`` are ``None``, left to :func:`state_passing_bwd_recurrence` (its ``output=``), and
    ``A_qk`` (only they read it) may be ``None``.
    """
    if A_qk is None and state_grads:
        raise ValueError("chunk_output_bwd: A_qk is needed for dh and dv_new (state_grads=True)")
    B, T, H, K = q.shape
    HV, V = v_new.shape[2], v_new.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    launch = (config or plan_for(q.device).backward)["output"]
    f32 = dict(dtype=torch.float32, device=q.device)
    # every token lies in one chunk, whose program writes all of its rows: no zero fill
    dq = torch.empty(B, T, HV, K, **f32)
    dG = torch.empty(B, T, HV, K, **f32)
    dh = torch.empty(meta.NC, HV, K, V, **f32) if state_grads else None
    dv_new = torch.empty(B, T, HV, V, **f32) if state_grads else None
    dA = torch.empty(B, T, HV, chunk_size, **f32)
    if meta.NC > 0:
        _chunk_output_bwd_kernel[(meta.NC, HV)](
            q.contiguous(), G.contiguous(), h.contiguous(), v_new.contiguous(),
            A_qk.contiguous() if A_qk is not None else do, do.contiguous(),
            dq, dG, dh if state_grads else dA, dv_new if state_grads else dA, dA,
            meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K),
            BV=tile(V, launch.BV), PRECISION=dot_precision(q.dtype), STATE_GRADS=state_grads,
            NATIVE=_native(do, h, v_new), num_warps=launch.warps, num_stages=launch.stages,
        )
    return _per_key_head(dq, H, per_value_head), dh, dv_new, dG, dA


@triton.jit
def _state_tile_terms(h, dS_out, v_new, dv_tot, p_S, p_tv, m_kv, m_tv, OP: tl.constexpr, PRECISION: tl.constexpr):
    """One ``[BK, BV]`` tile of the state stage's per-chunk backward: this tile's terms of
    ``dkg = v_new dS^T``, ``dW = -dU S^T`` (``dU = dv_tot``) and ``d_decay = sum_V(dS * S)``, and
    the state tile ``S`` itself (``h``; for the output's ``dqg = dO S^T`` in the fused kernel)."""
    b_S = tl.load(h + p_S, mask=m_kv, other=0).to(OP)  # [BK, BV]
    b_dS = tl.load(dS_out + p_S, mask=m_kv, other=0).to(OP)
    b_vn = tl.load(v_new + p_tv, mask=m_tv, other=0).to(OP)  # [BT, BV]
    b_dU = tl.load(dv_tot + p_tv, mask=m_tv, other=0).to(OP)
    t_dkg = tl.dot(b_vn, tl.trans(b_dS), input_precision=PRECISION)
    t_dW = tl.dot(b_dU, tl.trans(b_S), input_precision=PRECISION)
    return t_dkg, t_dW, tl.sum(b_dS.to(tl.float32) * b_S.to(tl.float32), axis=1), b_S


@triton.jit
def _decay_grads(b_dkg, b_ratio, b_decay, b_ddecay, b_Glast, o_t, r_last):
    """The state stage's ``dk`` and ``dG`` from ``dkg`` (``kg = k * decay``, ``decay = exp(G_last - G)``;
    ``ratio = dkg * kg``, the gradient through the exponent): ``-ratio`` on every row, and through
    ``G_last`` the row sum plus ``exp(G_last) d_decay`` on the chunk's last real row."""
    b_last = tl.sum(b_ratio, axis=0) + tl.exp(b_Glast) * b_ddecay  # [BK]: through G_last
    return b_dkg * b_decay, tl.where(o_t[:, None] == r_last, b_last[None, :], 0.0) - b_ratio


@triton.jit
def _wy_key_terms(b_M, b_dW, b_k, b_G, b_beta, m_tk, PRECISION: tl.constexpr):
    """One tile of ``K`` of the WY backward, ``W = M kb`` with ``kb = beta exp(G) k``: the terms of
    ``dM`` (``dW kb^T``), ``dk``, ``dG`` and ``dbeta`` (through ``dkb = M^T dW``)."""
    b_eg = tl.where(m_tk, tl.exp(b_G), 0.0)  # exp(G), zero on padding
    b_gk = b_eg * b_k
    b_kb = b_beta[:, None] * b_gk
    t_dM = tl.dot(b_dW, tl.trans(b_kb), input_precision=PRECISION)
    b_dkb = tl.dot(tl.trans(b_M), b_dW, input_precision=PRECISION)  # [BT, BK]
    return t_dM, b_dkb * b_beta[:, None] * b_eg, b_dkb * b_kb, tl.sum(b_dkb * b_gk, axis=1)


@triton.jit
def _wy_value_terms(b_M, b_v, b_dU, b_beta, PRECISION: tl.constexpr):
    """One tile of ``V`` of the WY backward, ``U = M vb`` with ``vb = beta v``: the terms of ``dM``
    (``dU vb^T``), ``dv`` and ``dbeta`` (through ``dvb = M^T dU``)."""
    t_dM = tl.dot(b_dU, tl.trans(b_beta[:, None] * b_v), input_precision=PRECISION)
    b_dvb = tl.dot(tl.trans(b_M), b_dU, input_precision=PRECISION)  # [BT, BV]
    return t_dM, b_dvb * b_beta[:, None], tl.sum(b_dvb * b_v, axis=1)


@triton.jit
def _state_bwd_chunk_kernel(
    # pointers
    kg,  # [TT, HV, K]
    G,  # [TT, HV, K] float32
    h,  # [NC, HV, K, V]
    v_new,  # [TT, HV, V]
    dS_out,  # [NC, HV, K, V] from the recurrence
    dv_tot,  # [TT, HV, V] from the recurrence
    dk,  # [TT, HV, K] float32 out, per value head
    dW,  # [TT, HV, K] float32 out
    dG,  # [TT, HV, K] float32 out
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
    ACC: tl.constexpr,  # add dG into what the tensor holds
    NATIVE: tl.constexpr,  # h, v_new, dS_out, dv_tot share a 16-bit dtype: their products on it
):
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # channels are independent here
    if NATIVE:
        OP = h.dtype.element_ty
    else:
        OP = tl.float32
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = bos + o_t < eos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_kg = tl.load(kg + p_tk, mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
    b_dkg = tl.zeros([BT, BK], dtype=tl.float32)
    b_dW = tl.zeros([BT, BK], dtype=tl.float32)
    b_ddecay = tl.zeros([BK], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_v = o_v < V
        m_tv = m_t[:, None] & m_v[None, :]
        m_kv = m_k[:, None] & m_v[None, :]
        p_tv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        p_S = (i_c.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
        t_dkg, t_dW, t_ddecay, _ = _state_tile_terms(h, dS_out, v_new, dv_tot, p_S, p_tv, m_kv, m_tv, OP, PRECISION)
        b_dkg += t_dkg
        b_dW -= t_dW
        b_ddecay += t_ddecay
    r_last = tl.minimum(BT, eos - bos) - 1  # the chunk's last real row
    b_Glast = tl.load(G + ((bos + r_last) * HV + i_hv) * K + o_k, mask=m_k, other=0)  # [BK]
    b_G = tl.load(G + p_tk, mask=m_tk, other=0)
    b_decay = tl.where(m_tk, tl.exp(tl.minimum(b_Glast[None, :] - b_G, 0.0)), 0.0)  # kg = k exp(G_last - G)
    b_dk, b_dG = _decay_grads(b_dkg, b_dkg * b_kg, b_decay, b_ddecay, b_Glast, o_t, r_last)
    if ACC:
        b_dG += tl.load(dG + p_tk, mask=m_tk, other=0)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(dW + p_tk, b_dW, mask=m_tk)
    tl.store(dG + p_tk, b_dG, mask=m_tk)


def state_passing_bwd(
    kg: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    h: torch.Tensor,
    v_new: torch.Tensor,
    dh: Optional[torch.Tensor],
    dv_new: Optional[torch.Tensor],
    dS_final: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    H: Optional[int] = None,
    dG_acc: Optional[torch.Tensor] = None,
    per_value_head: bool = False,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
):
    """The whole state stage's backward: ``(dk, dW, dU, dG, dS0)``, float32.

    Arguments as :func:`kda_explained.chunked.backward_inter.state_passing_bwd`, except that
    the keys come decayed, ``kg = k exp(G_last - G)`` (``[B, T, HV, K]``, as the forward
    state pass takes them), and ``U`` is not needed. ``dk`` is summed over each group of
    ``HV // H`` value heads (``H``: the key heads, default ``HV``); ``dS0`` is ``None``
    without an initial state. ``dG_acc``: a float32 ``[B, T, HV, K]`` that ``dG`` is added
    into (and returned); ``per_value_head``: ``dk`` not summed over GVA groups.
    """
    meta = meta or seq_meta(kg.shape[0], kg.shape[1], chunk_size, cu_seqlens, kg.device)
    dS_out, dv_tot, dS0 = state_passing_bwd_recurrence(kg, W, G, h, dh, dv_new, dS_final, chunk_size, cu_seqlens,
                                                       meta=meta, config=config)
    dk, dW, dG = state_passing_bwd_chunks(kg, G, h, v_new, dS_out, dv_tot, chunk_size, cu_seqlens, H=H,
                                          dG_acc=dG_acc, per_value_head=per_value_head, meta=meta, config=config)
    return dk, dW, dv_tot, dG, (dS0 if initial_state is not None else None)


def state_passing_bwd_chunks(
    kg: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    dS_out: torch.Tensor,
    dv_tot: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    H: Optional[int] = None,
    dG_acc: Optional[torch.Tensor] = None,
    per_value_head: bool = False,
    dW_dtype: torch.dtype = torch.float32,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
):
    """The state stage's backward after its recurrence, every chunk in parallel: ``(dk, dW, dG)``.

    ``dS_out, dv_tot``: from :func:`state_passing_bwd_recurrence`; the rest as
    :func:`state_passing_bwd`, which is the two in a row (:func:`kda_backward` calls them
    apart). ``dW`` is written in ``dW_dtype`` (``dk`` and ``dG`` are float32).
    """
    B, T, HV, K = kg.shape
    V = h.shape[-1]
    H = H or HV
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, kg.device)
    f32 = dict(dtype=torch.float32, device=kg.device)
    dk, dW = torch.empty(B, T, HV, K, **f32), torch.empty(B, T, HV, K, dtype=dW_dtype, device=kg.device)
    dG = _accumulator(dG_acc, kg, (B, T, HV, K))
    if meta.NC > 0:
        launch = (config or plan_for(kg.device).backward)["state_chunks"]
        BK = tile(K, launch.BK)
        _state_bwd_chunk_kernel[(meta.NC, HV, triton.cdiv(K, BK))](
            kg.contiguous(), G.contiguous(), h.contiguous(), v_new.contiguous(), dS_out, dv_tot, dk, dW, dG,
            meta.cu, meta.chunk_seq, meta.chunk_bos,
            HV=HV, K=K, V=V, BT=chunk_size, BK=BK, BV=tile(V, launch.BV),
            PRECISION=dot_precision(kg.dtype), ACC=dG_acc is not None, NATIVE=_native(h, v_new, dS_out, dv_tot),
            num_warps=launch.warps, num_stages=launch.stages,
        )
    return _per_key_head(dk, H, per_value_head), dW, dG


@triton.jit
def _wy_bwd_kernel(
    # pointers
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32
    beta,  # [TT, HV]
    M,  # [TT, HV, BT]
    dW,  # [TT, HV, K]
    dU,  # [TT, HV, V]
    dk,  # [TT, HV, K] float32 out, per value head
    dv,  # [TT, HV, V] out (float32 or the gradient's dtype)
    dG,  # [TT, HV, K] float32 out
    dbeta,  # [TT, HV] float32 out
    dM,  # [TT, HV, BT] float32 out (the whole chunk row, as autograd gives it)
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
    ACC: tl.constexpr,  # add dk and dG into what the tensors hold
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    m_t = bos + o_t < eos
    m_tt = m_t[:, None] & m_t[None, :]
    p_tt = ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :]
    b_M = tl.load(M + p_tt, mask=m_tt, other=0).to(tl.float32)  # [BT, BT]
    b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)  # [BT]
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_tk = m_t[:, None] & (o_k < K)[None, :]
        p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_G = tl.load(G + p_tk, mask=m_tk, other=0)
        b_dW = tl.load(dW + p_tk, mask=m_tk, other=0).to(tl.float32)
        t_dM, b_dk, b_dG, t_dbeta = _wy_key_terms(b_M, b_dW, b_k, b_G, b_beta, m_tk, PRECISION)
        b_dM += t_dM
        b_dbeta += t_dbeta
        if ACC:
            b_dk += tl.load(dk + p_tk, mask=m_tk, other=0)
            b_dG += tl.load(dG + p_tk, mask=m_tk, other=0)
        tl.store(dk + p_tk, b_dk, mask=m_tk)
        tl.store(dG + p_tk, b_dG, mask=m_tk)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0).to(tl.float32)
        b_dU = tl.load(dU + p_tv, mask=m_tv, other=0).to(tl.float32)
        t_dM, b_dv, t_dbeta = _wy_value_terms(b_M, b_v, b_dU, b_beta, PRECISION)
        b_dM += t_dM
        b_dbeta += t_dbeta
        tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)
    tl.store(dM + p_tt, b_dM, mask=m_t[:, None])
    tl.store(dbeta + (bos + o_t) * HV + i_hv, b_dbeta, mask=m_t)


def wy_representation_bwd(
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    dW: torch.Tensor,
    dU: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    dk_acc: Optional[torch.Tensor] = None,
    dG_acc: Optional[torch.Tensor] = None,
    per_value_head: bool = False,
    dv_dtype: torch.dtype = torch.float32,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
):
    """``(dk [B, T, H, K], dv, dG, dbeta, dM)``, float32; arguments as
    :func:`kda_explained.chunked.backward_inter.wy_representation_bwd`. ``dk_acc``, ``dG_acc``:
    float32 ``[B, T, HV, K]`` tensors (both or neither) that ``dk`` (per value head) and ``dG``
    are added into; ``per_value_head``: ``dk`` not summed over GVA groups. ``dv`` is written in
    ``dv_dtype`` (it is final here: no cast pass after).
    """
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, k.device)
    launch = (config or plan_for(k.device).backward)["wy"]
    f32 = dict(dtype=torch.float32, device=k.device)
    if (dk_acc is None) != (dG_acc is None):
        raise ValueError("dk_acc, dG_acc: give both accumulators or neither")
    dk, dG = _accumulator(dk_acc, k, (B, T, HV, K)), _accumulator(dG_acc, k, (B, T, HV, K))
    dv = torch.empty(B, T, HV, V, dtype=dv_dtype, device=k.device)
    dbeta = torch.empty(B, T, HV, **f32)
    dM = torch.empty(B, T, HV, chunk_size, **f32)
    if meta.NC > 0:
        _wy_bwd_kernel[(meta.NC, HV)](
            k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous(), M.contiguous(), dW.contiguous(),
            dU.contiguous(), dk, dv, dG, dbeta, dM, meta.cu, meta.chunk_seq, meta.chunk_bos,
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K, launch.BK),
            BV=tile(V, launch.BV), PRECISION=dot_precision(k.dtype),
            ACC=dk_acc is not None, num_warps=launch.warps, num_stages=launch.stages,
        )
    return _per_key_head(dk, H, per_value_head), dv, dG, dbeta, dM


@triton.jit
def _state_wy_bwd_kernel(
    # pointers
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    G,  # [TT, HV, K] float32
    beta,  # [TT, HV]
    M,  # [TT, HV, BT]
    h,  # [NC, HV, K, V] states entering each chunk
    v_new,  # [TT, HV, V]
    dS_out,  # [NC, HV, K, V] from the recurrence
    dv_tot,  # [TT, HV, V] from the recurrence: the gradient of v_new's U, so of U (dU)
    q,  # [TT, H, K] (OUTPUT)
    do,  # [TT, HV, V] gradient of the output (OUTPUT)
    dq,  # [TT, HV, K] float32 out, per value head (OUTPUT)
    dA,  # [TT, HV, BT] float32 out: dO v_new^T, the whole chunk row (OUTPUT)
    dk,  # [TT, HV, K] float32 out, per value head
    dv,  # [TT, HV, V] out (float32 or the gradient's dtype)
    dG,  # [TT, HV, K] float32 out (ACC: also in)
    dbeta,  # [TT, HV] float32 out
    dM,  # [TT, HV, BT] float32 out
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
    ACC: tl.constexpr,  # add dG into what the tensor holds
    NATIVE: tl.constexpr,  # h, v_new, dS_out, dv_tot (and dO) share a 16-bit dtype: their products on it
    OUTPUT: tl.constexpr,  # the output stage's backward too (dq, dA and its dG terms)
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    i_h = i_hv // (HV // H)
    if NATIVE:
        OP = h.dtype.element_ty
    else:
        OP = tl.float32
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    m_t = bos + o_t < eos
    m_tt = m_t[:, None] & m_t[None, :]
    p_tt = ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :]
    r_last = tl.minimum(BT, eos - bos) - 1  # the chunk's last real row
    b_M = tl.load(M + p_tt, mask=m_tt, other=0).to(tl.float32)  # [BT, BT]
    b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)  # [BT]
    b_dM = tl.zeros([BT, BT], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for i_k in range(0, tl.cdiv(K, BK)):
        o_k = i_k * BK + tl.arange(0, BK)
        m_k = o_k < K
        m_tk = m_t[:, None] & m_k[None, :]
        m_kv_k = m_k[:, None]
        p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
        b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
        b_G = tl.load(G + p_tk, mask=m_tk, other=0)
        b_Glast = tl.load(G + ((bos + r_last) * HV + i_hv) * K + o_k, mask=m_k, other=0)  # [BK]
        # ---- the state stage, this K tile: dkg = v_new dS^T, dW = -dU S^T, d_decay = sum_V(dS * S)
        b_dkg = tl.zeros([BT, BK], dtype=tl.float32)
        b_dW = tl.zeros([BT, BK], dtype=tl.float32)
        b_ddecay = tl.zeros([BK], dtype=tl.float32)
        b_dqg = tl.zeros([BT, BK], dtype=tl.float32)
        for i_v in range(0, tl.cdiv(V, BV)):
            o_v = i_v * BV + tl.arange(0, BV)
            m_tv = m_t[:, None] & (o_v < V)[None, :]
            m_kv = m_kv_k & (o_v < V)[None, :]
            p_tv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
            p_S = (i_c.to(tl.int64) * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :]
            t_dkg, t_dW, t_ddecay, b_S = _state_tile_terms(h, dS_out, v_new, dv_tot, p_S, p_tv, m_kv, m_tv, OP,
                                                           PRECISION)
            b_dkg += t_dkg
            b_dW -= t_dW
            b_ddecay += t_ddecay
            if OUTPUT:  # O = qg S + ...: dqg = dO S^T
                b_do = tl.load(do + p_tv, mask=m_tv, other=0).to(OP)
                b_dqg += tl.dot(b_do, tl.trans(b_S), input_precision=PRECISION)
        b_decay = tl.where(m_tk, tl.exp(tl.minimum(b_Glast[None, :] - b_G, 0.0)), 0.0)  # kg = k exp(G_last - G)
        b_dk, b_dG = _decay_grads(b_dkg, b_dkg * b_k * b_decay, b_decay, b_ddecay, b_Glast, o_t, r_last)
        # ---- the WY factors, this K tile: W = M kb, kb = beta exp(G) k
        t_dM, t_dk, t_dG, t_dbeta = _wy_key_terms(b_M, b_dW, b_k, b_G, b_beta, m_tk, PRECISION)
        b_dM += t_dM
        b_dk += t_dk
        b_dG += t_dG
        if OUTPUT:  # qg = scale q exp(G): dq = scale exp(G) dqg, dG += dqg * qg
            b_q = tl.load(q + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
            b_gq = tl.where(m_tk, tl.exp(b_G), 0.0) * scale
            tl.store(dq + p_tk, b_dqg * b_gq, mask=m_tk)
            b_dG += b_dqg * b_q * b_gq
        if ACC:
            b_dG += tl.load(dG + p_tk, mask=m_tk, other=0)
        tl.store(dk + p_tk, b_dk, mask=m_tk)
        tl.store(dG + p_tk, b_dG, mask=m_tk)
        b_dbeta += t_dbeta
    # ---- the WY factors' U = M Diag(beta) V (and the output's dA = dO v_new^T)
    b_dA = tl.zeros([BT, BT], dtype=tl.float32)
    for i_v in range(0, tl.cdiv(V, BV)):
        o_v = i_v * BV + tl.arange(0, BV)
        m_tv = m_t[:, None] & (o_v < V)[None, :]
        p_tv = ((bos + o_t[:, None]) * HV + i_hv) * V + o_v[None, :]
        b_v = tl.load(v + p_tv, mask=m_tv, other=0).to(tl.float32)
        b_dU = tl.load(dv_tot + p_tv, mask=m_tv, other=0).to(tl.float32)
        t_dM, b_dv, t_dbeta = _wy_value_terms(b_M, b_v, b_dU, b_beta, PRECISION)
        b_dM += t_dM
        b_dbeta += t_dbeta
        tl.store(dv + p_tv, b_dv.to(dv.dtype.element_ty), mask=m_tv)
        if OUTPUT:
            b_do = tl.load(do + p_tv, mask=m_tv, other=0).to(OP)
            b_vn = tl.load(v_new + p_tv, mask=m_tv, other=0).to(OP)
            b_dA += tl.dot(b_do, tl.trans(b_vn), input_precision=PRECISION)
    if OUTPUT:
        tl.store(dA + p_tt, b_dA, mask=m_t[:, None])
    tl.store(dM + p_tt, b_dM, mask=m_t[:, None])
    tl.store(dbeta + (bos + o_t) * HV + i_hv, b_dbeta, mask=m_t)


def state_wy_bwd(
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    dS_out: torch.Tensor,
    dv_tot: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    output: Optional[Tuple[torch.Tensor, torch.Tensor, float]] = None,
    dG_acc: Optional[torch.Tensor] = None,
    per_value_head: bool = False,
    dv_dtype: torch.dtype = torch.float32,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
):
    """The state stage's per-chunk backward and the WY factors' backward in one kernel:
    ``(dk [B, T, H, K], dv, dG, dbeta, dM, dq, dA_qk)``, as :func:`state_passing_bwd_chunks`
    followed by :func:`wy_representation_bwd` with ``dW`` and ``dU = dv_tot`` (which it is);
    with ``output = (q, dO, scale)`` also the output stage's backward, :func:`chunk_output_bwd`
    with ``state_grads=False`` (its ``dq``, ``dA_qk`` and ``dG`` terms; else ``dq``, ``dA_qk`` are
    ``None``): the three per-chunk backward stages of stages 6, 5 and 4 read the same ``h``,
    ``v_new`` and ``G`` tiles once.

    One program per chunk and value head; for each tile of ``K`` it forms the state stage's
    ``dkg``, ``dW`` and ``d_decay`` over the tiles of ``V`` and hands ``dW`` to the WY backward
    in registers, so ``dW`` and the partial ``dk``, ``dG`` never go through memory (``kg`` is
    formed from ``k`` and ``G``). ``dG_acc``: a float32 ``[B, T, HV, K]`` that ``dG`` is added
    into; ``dk`` is new (this is its first stage); ``dv`` in ``dv_dtype``.
    """
    B, T, H, K = k.shape
    HV, V = v.shape[2], v.shape[3]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, k.device)
    f32 = dict(dtype=torch.float32, device=k.device)
    dk = torch.empty(B, T, HV, K, **f32)
    dG = _accumulator(dG_acc, k, (B, T, HV, K))
    dv = torch.empty(B, T, HV, V, dtype=dv_dtype, device=k.device)
    dbeta = torch.empty(B, T, HV, **f32)
    dM = torch.empty(B, T, HV, chunk_size, **f32)
    q, do, scale = output if output is not None else (k, dv_tot, 1.0)
    dq = torch.empty(B, T, HV, K, **f32) if output is not None else None
    dA = torch.empty(B, T, HV, chunk_size, **f32) if output is not None else None
    if meta.NC > 0:
        launch = (config or plan_for(k.device).backward)["state_wy"]
        _state_wy_bwd_kernel[(meta.NC, HV)](
            k.contiguous(), v.contiguous(), G.contiguous(), beta.contiguous(), M.contiguous(), h.contiguous(),
            v_new.contiguous(), dS_out.contiguous(), dv_tot.contiguous(), q.contiguous(), do.contiguous(),
            dq if dq is not None else dk, dA if dA is not None else dM, dk, dv, dG, dbeta, dM,
            meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale),
            H=H, HV=HV, K=K, V=V, BT=chunk_size, BK=tile(K, launch.BK), BV=tile(V, launch.BV),
            PRECISION=dot_precision(k.dtype), ACC=dG_acc is not None,
            NATIVE=_native(h, v_new, dS_out, dv_tot, *((do,) if output is not None else ())),
            OUTPUT=output is not None, num_warps=launch.warps, num_stages=launch.stages,
            **({"maxnreg": launch.maxnreg} if launch.maxnreg and not interpreting() else {}),
        )
    return (_per_key_head(dk, H, per_value_head), dv, dG, dbeta, dM,
            None if dq is None else _per_key_head(dq, H, per_value_head), dA)


@triton.jit
def _ut_bwd_kernel(
    # pointers
    M,  # [TT, HV, BT]
    dM,  # [TT, HV, BT]
    dA,  # [TT, HV, BT] float32 out
    cu,
    chunk_seq,
    chunk_bos,
    # sizes
    HV: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    UTP: tl.constexpr,
):
    i_c, i_hv = tl.program_id(0), tl.program_id(1)
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    m_t = bos + o_t < eos
    m_tt = m_t[:, None] & m_t[None, :]
    p_tt = ((bos + o_t[:, None]) * HV + i_hv) * BT + o_t[None, :]
    b_M = tl.load(M + p_tt, mask=m_tt, other=0).to(tl.float32)
    b_dM = tl.load(dM + p_tt, mask=m_tt, other=0).to(tl.float32)
    # d(M) = -M d(A) M  (differentiate M (I + A) = I)  =>  dA = -M^T dM M^T, full float32 as the forward
    b_dA = -tl.dot(tl.dot(tl.trans(b_M), b_dM, input_precision=UTP), tl.trans(b_M), input_precision=UTP)
    b_dA = tl.where(o_t[None, :] < o_t[:, None], b_dA, 0.0)  # the forward reads the strict lower triangle only
    tl.store(dA + p_tt, b_dA, mask=m_t[:, None])


def ut_transform_bwd(
    M: torch.Tensor, dM: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None, *,
    meta: Optional[SeqMeta] = None,
    config: Optional[BackwardConfig] = None,
) -> torch.Tensor:
    """``dA_kk: [B, T, HV, C]`` float32 from ``M, dM: [B, T, HV, C]``; as
    :func:`kda_explained.chunked.backward_intra.ut_transform_bwd`.
    """
    B, T, HV, C = M.shape
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, M.device)
    config = config or plan_for(M.device).backward
    dA = torch.empty(B, T, HV, C, dtype=torch.float32, device=M.device)
    if meta.NC > 0:
        _ut_bwd_kernel[(meta.NC, HV)](M.contiguous(), dM.contiguous(), dA, meta.cu, meta.chunk_seq, meta.chunk_bos,
                                      HV=HV, BT=chunk_size, UTP=config.ut_precision,
                                      num_warps=config["ut"].warps, num_stages=config["ut"].stages)
    return dA


@triton.jit
def _intra_bwd_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    G,  # [TT, HV, K] float32
    beta,  # [TT, HV]
    dA_kk,  # [TT, HV, BT]
    dA_qk,  # [TT, HV, BT]
    dq,  # [TT, HV, K] float32 out, per value head
    dk,  # [TT, HV, K] float32 out, per value head
    dG,  # [TT, HV, K] float32 out
    dbeta,  # [NK, TT, HV] float32 out: one partial sum per K tile
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
    BK: tl.constexpr,
):
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)  # channels are independent
    i_h = i_hv // (HV // H)
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = bos + o_t < eos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_q = tl.load(q + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
    b_k = tl.load(k + ((bos + o_t[:, None]) * H + i_h) * K + o_k[None, :], mask=m_tk, other=0).to(tl.float32)
    b_G = tl.load(G + p_tk, mask=m_tk, other=0)
    b_beta = tl.load(beta + (bos + o_t) * HV + i_hv, mask=m_t, other=0).to(tl.float32)  # [BT]
    b_dq = tl.zeros([BT, BK], dtype=tl.float32)
    b_dk = tl.zeros([BT, BK], dtype=tl.float32)
    b_dG = tl.zeros([BT, BK], dtype=tl.float32)
    b_dbeta = tl.zeros([BT], dtype=tl.float32)
    for j in range(0, BT):  # column j of A_kk and A_qk
        m_kj = m_k & (bos + j + 0 * o_k < eos)  # [BK]: column j is a real token
        b_kj = tl.load(k + ((bos + j) * H + i_h) * K + o_k, mask=m_kj, other=0).to(tl.float32)  # [BK]
        b_Gj = tl.load(G + ((bos + j) * HV + i_hv) * K + o_k, mask=m_kj, other=0)
        p_col = ((bos + o_t) * HV + i_hv) * BT + j
        # the gradients reaching column j of the products, rows r > j (A_kk) and r >= j (A_qk)
        m_tj = m_t & (bos + j + 0 * o_t < eos)
        b_dAkk = tl.load(dA_kk + p_col, mask=m_tj & (o_t > j), other=0).to(tl.float32)  # [BT]
        b_dAqk = tl.load(dA_qk + p_col, mask=m_tj & (o_t >= j), other=0).to(tl.float32)
        # ratio[r, c] = exp(G_rc - G_jc) where r >= j, the exponent masked before the exp: never positive
        b_ratio = tl.exp(tl.where(m_tk & (o_t[:, None] >= j), b_G - b_Gj[None, :], float("-inf")))  # [BT, BK]
        b_kr = b_kj[None, :] * b_ratio
        D_kk = b_beta * b_dAkk  # [BT]: A_kk = Diag(beta) P_kk
        D_qk = scale * b_dAqk
        b_dq += D_qk[:, None] * b_kr  # q_r on the left of row r of A_qk
        b_dk += D_kk[:, None] * b_kr  # k_r on the left of row r of A_kk
        b_dbeta += b_dAkk * tl.sum(b_k * b_kr, axis=1)
        b_R = (D_kk[:, None] * b_k + D_qk[:, None] * b_q) * b_ratio  # [BT, BK]
        b_right = tl.sum(b_R, axis=0)  # [BK]: k_j on the right of column j of both matrices
        b_dk += tl.where(o_t[:, None] == j, b_right[None, :], 0.0)
        # exp(G_rc - G_jc): the terms T[r, c] = b_R k_jc count +1 for row r and -1 for row j
        b_dG += b_R * b_kj[None, :] - tl.where(o_t[:, None] == j, (b_right * b_kj)[None, :], 0.0)
    tl.store(dq + p_tk, b_dq, mask=m_tk)
    tl.store(dk + p_tk, b_dk, mask=m_tk)
    tl.store(dG + p_tk, b_dG, mask=m_tk)
    tl.store(dbeta + i_k * TT * HV + (bos + o_t) * HV + i_hv, b_dbeta, mask=m_t)


def intra_chunk_matrices_bwd_by_columns(
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
    meta: Optional[SeqMeta] = None,
):
    """``(dq [B, T, H, K], dk [B, T, H, K], dG [B, T, HV, K], dbeta [B, T, HV])``, float32; as
    :func:`kda_explained.chunked.backward_intra.intra_chunk_matrices_bwd` (entries of ``dA_kk``
    on or above the diagonal, and of ``dA_qk`` above it, are ignored).

    The exact form, one column of the chunk at a time, every exponent masked before the
    ``exp``: simple and safe for any gate, but no tensor cores (several times slower). The pipeline
    uses the tensor-core kernel
    :func:`kda_explained.fast.backward_intra.intra_chunk_matrices_bwd`; this one stays as its
    second, independent check.
    """
    B, T, H, K = q.shape
    HV = G.shape[2]
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, q.device)
    f32 = dict(dtype=torch.float32, device=q.device)
    BK = tile(K, 32)
    NK = triton.cdiv(K, BK)
    dq, dk, dG = (torch.zeros(B, T, HV, K, **f32) for _ in range(3))
    dbeta = torch.zeros(NK, B, T, HV, **f32)
    if meta.NC > 0:
        _intra_bwd_kernel[(meta.NC, HV, NK)](
            q.contiguous(), k.contiguous(), G.contiguous(), beta.contiguous(), dA_kk.contiguous(), dA_qk.contiguous(),
            dq, dk, dG, dbeta, meta.cu, meta.chunk_seq, meta.chunk_bos, float(scale), B * T,
            H=H, HV=HV, K=K, BT=chunk_size, BK=BK, num_warps=4, num_stages=1,
        )
    return _per_key_head(dq, H), _per_key_head(dk, H), dG, dbeta.sum(0)  # GVA


@triton.jit
def _cumsum_bwd_kernel(
    dG,  # [TT, HV, K]
    dg,  # [TT, HV, K] float32 out
    cu,
    chunk_seq,
    chunk_bos,
    HV: tl.constexpr,
    K: tl.constexpr,
    BT: tl.constexpr,
    BK: tl.constexpr,
):
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    bos, eos = _chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_tk = (bos + o_t < eos)[:, None] & (o_k < K)[None, :]
    p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_dG = tl.load(dG + p_tk, mask=m_tk, other=0).to(tl.float32)
    # G_r = sum_{i <= r} g_i  =>  dg_i = sum_{r >= i} dG_r = (chunk total) - (sum up to i) + dG_i
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    tl.store(dg + p_tk, b_dg, mask=m_tk)


def chunk_local_cumsum_bwd(
    dG: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None, *, meta: Optional[SeqMeta] = None,
) -> torch.Tensor:
    """``dg: [B, T, HV, K]`` float32 from ``dG: [B, T, HV, K]``; as
    :func:`kda_explained.chunked.backward_intra.chunk_local_cumsum_bwd`.
    """
    B, T, HV, K = dG.shape
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, dG.device)
    dg = torch.empty(B, T, HV, K, dtype=torch.float32, device=dG.device)
    BK = tile(K, 32)
    if meta.NC > 0:
        _cumsum_bwd_kernel[(meta.NC, HV, triton.cdiv(K, BK))](dG.contiguous(), dg, meta.cu, meta.chunk_seq,
                                                             meta.chunk_bos, HV=HV, K=K, BT=chunk_size, BK=BK)
    return dg


def checked_backward_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens, chunk_size):
    """The forward's input checks for a backward entry point: ``(scale, cu_seqlens, C, meta)``, the
    scale resolved (``K ** -0.5`` by default), the offsets validated, the chunk size one the fast layer
    takes and the chunk tables built once."""
    p, cu_seqlens = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens)
    C = check_chunk_size(chunk_size, FAST_CHUNK_SIZES)
    return p.scale, cu_seqlens, C, seq_meta(p.B, p.T, C, cu_seqlens, q.device)


def kda_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: Optional[torch.Tensor],
    beta: torch.Tensor,
    do: torch.Tensor,
    dS_final: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    G: Optional[torch.Tensor] = None,
    out_dtype: Optional[torch.dtype] = None,
    plan: Optional[Plan] = None,
) -> Tuple[torch.Tensor, ...]:
    """Gradients of KDA through the Triton stage kernels: the mirror of
    :func:`kda_explained.chunked.backward.kda_backward` (same arguments and returns,
    ``(dq, dk, dv, dg, dbeta, dinitial_state)``, float32).

    The forward is recomputed by the fast kernels, keeping what the backward reads; every
    stage is a Triton kernel. The backward of :func:`~kda_explained.fast.api.chunk_kda`.
    ``factors``: ``(A_qk, M)`` as the forward kept them (:func:`~kda_explained.fast.forward.chunk_kda_fwd`'s
    ``keep_for_backward``), see :func:`core_backward`; ``G``: stage 1's output as the forward kept
    it (then stage 1 is not recomputed, and ``g`` may be ``None``: the backward never reads it);
    ``out_dtype``: ``dq``, ``dk`` and ``dv`` in that dtype, written
    by their last kernels (:func:`core_backward`); ``plan``: the kernels' launch settings
    (default :func:`~kda_explained.fast.config.plan_for` the device).
    """
    if g is None and G is None:
        raise ValueError("g: expected the gate (or its in-chunk cumsum as G=), got None for both")
    # the checks read g's shape and dtype; G (float32, the same shape) stands in for it when g is not given
    scale, cu_seqlens, C, meta = checked_backward_inputs(q, k, v, G if g is None else g, beta, scale, initial_state,
                                                         cu_seqlens, chunk_size)
    if G is None:
        G, beta32 = chunk_local_cumsum(g, C, cu_seqlens, beta=beta, meta=meta)  # 1. (recomputed)
    else:
        beta32 = beta.float()
    dq, dk, dv, dG, dbeta, dS0 = core_backward(q, k, v, G, beta32, do, dS_final, scale, initial_state, C,
                                               cu_seqlens, factors=factors, out_dtype=out_dtype, meta=meta,
                                               plan=plan or plan_for(q.device))
    dg = chunk_local_cumsum_bwd(dG, C, cu_seqlens, meta=meta)  # 1.
    return dq, dk, dv, dg, dbeta, dS0


def core_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta32: torch.Tensor,
    do: torch.Tensor,
    dS_final: Optional[torch.Tensor],
    scale: float,
    initial_state: Optional[torch.Tensor],
    C: int,
    cu_seqlens: Optional[torch.Tensor],
    *,
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    out_dtype: Optional[torch.dtype] = None,
    meta: SeqMeta,
    plan: Plan,
) -> Tuple[torch.Tensor, ...]:
    """Stages 2-6 of the backward, given stage 1's forward output ``G`` (float32 in-chunk
    cumulative log decay) and ``beta32`` (float32): ``(dq, dk, dv, dG, dbeta, dS0)``, float32,
    ``dG`` the gradient of ``G`` (stage 1's backward is the caller's: the plain reverse cumsum in
    :func:`kda_backward`, with the gate's in
    :func:`kda_explained.fast.backward_options.kda_backward_with_options`).

    Recomputes stages 2-5 of the forward, then runs the backward from stage 6 down to 2.
    ``factors = (A_qk, M)``, kept by the forward: then only stage 4 is recomputed, from ``M``
    (:func:`~kda_explained.fast.local.chunk_wy_factors`), not stages 2-4
    (:func:`~kda_explained.fast.local.chunk_local_factors`, which also writes ``M``).
    ``out_dtype``: ``dq``, ``dk`` and ``dv`` written in that dtype by the kernels that finish them
    (the intra and the WY backward; the sums in float32 before), instead of a cast pass over each
    afterwards; only where no GVA sum follows (``HV == H``), else they stay float32.
    """
    H = q.shape[2]
    bwd = plan.backward
    # ---- forward, keeping what the backward reads
    if factors is None:
        f = chunk_local_factors(q, k, v, G, beta32, scale, C, cu_seqlens, store_m=True, meta=meta,
                                config=plan.local)  # 2.-4.
    else:
        f = chunk_wy_factors(q, k, v, G, beta32, factors[1], scale, C, cu_seqlens, meta=meta,
                             config=plan.wy_factors)._replace(A_qk=factors[0])  # 4.
    # the states in the intermediate dtype, as the forward keeps them (bf16 for bf16 inputs)
    h, v_new, _ = state_passing(f.kg, f.W, f.U, G, initial_state, C, cu_seqlens, h_dtype=f.W.dtype, meta=meta,
                                config=plan.state)  # 5.
    A_qk, W, kg, qg, M = f.A_qk, f.W, f.kg, f.qg, f.M
    del f  # with it U: only the forward's state pass reads it
    # ---- backward, stage 6 down to stage 2. dq, dk (per value head) and dG are sums of several
    # stages' terms: each kernel after the first adds its own into the same float32 tensor. Each
    # intermediate is dropped as soon as its last reader has run (the peak memory)
    # 5.: the recurrence, which also forms the output's dh = qg^T dO and dv_new = A_qk^T dO chunk by
    # chunk; its outputs dS_out, dU (= dv_tot) in the intermediate dtype, as fla keeps its dh
    dS_out, dU, dS0 = state_passing_bwd_recurrence(kg, W, G, h, None, None, dS_final, C, cu_seqlens,
                                                   output=(qg, A_qk, do), grad_dtype=W.dtype, meta=meta, config=bwd)
    del A_qk, qg, W
    if initial_state is None:
        dS0 = None
    dv_dtype = out_dtype or torch.float32
    if bwd.state_wy_fused:
        # 6., 5. (per chunk) and 4. in one kernel: each chunk's h, v_new, G read once; dW and the
        # partial dq, dk, dG never leave registers (kg is formed again from k and G)
        del kg
        dk, dv, dG, dbeta, dM, dq, dA_qk = state_wy_bwd(k, v, G, beta32, M, h, v_new, dS_out, dU, C, cu_seqlens,
                                                        output=(q, do, scale), per_value_head=True,
                                                        dv_dtype=dv_dtype, meta=meta, config=bwd)
        del dS_out, h, v_new, dU
    else:
        dq, _, _, dG, dA_qk = chunk_output_bwd(q, h, v_new, G, None, scale, do, C, cu_seqlens,
                                               per_value_head=True, state_grads=False, meta=meta, config=bwd)  # 6.
        dk, dW, _ = state_passing_bwd_chunks(kg, G, h, v_new, dS_out, dU, C, cu_seqlens, H=H, dG_acc=dG,
                                             per_value_head=True, dW_dtype=dS_out.dtype, meta=meta, config=bwd)  # 5.
        del dS_out, h, v_new, kg
        _, dv, _, dbeta, dM = wy_representation_bwd(k, v, G, beta32, M, dW, dU, C, cu_seqlens, dk_acc=dk,
                                                    dG_acc=dG, per_value_head=True, dv_dtype=dv_dtype,
                                                    meta=meta, config=bwd)  # 4.
        del dW, dU
    dA_kk = ut_transform_bwd(M, dM, C, cu_seqlens, meta=meta, config=bwd)  # 3.
    dq, dk, _, dbeta2 = intra_chunk_matrices_bwd(q, k, G, beta32, scale, dA_kk, dA_qk, C, cu_seqlens, dq_acc=dq,
                                                 dk_acc=dk, dG_acc=dG, per_value_head=True,
                                                 out_dtype=out_dtype if q.shape[2] == dq.shape[2] else None,
                                                 meta=meta, config=bwd)  # 2.
    return _per_key_head(dq, H), _per_key_head(dk, H), dv, dG, dbeta + dbeta2, dS0
