"""One long sequence in parallel pieces, on the GPU: the chain and the outputs' correction.

Twins of :func:`kda_explained.chunked.pieces.piece_states` and
:func:`kda_explained.chunked.pieces.piece_outputs` (same names, same positional signatures),
where the derivation is. The pieces themselves run as one packed batch of the ordinary
forward over ``[v | 0]`` (:func:`kda_explained.fast.forward.chunk_kda_fwd` does the three steps
where its plan's ``piece_tokens`` says so); these two kernels are what it adds:

- ``piece_states``: one program per sequence, value head and tile of ``BV`` value columns
  walks the sequence's pieces, ``S_in[j + 1] = P_j S_in[j] + R_j``, in float32 with products
  accurate to float32 (``tf32x3``: the chain's error would enter every later output);
- ``piece_outputs``: one program per 64-token block of a piece, value head and value tile,
  ``o = o^0 + q_read S_in`` (``[BT, K] @ [K, BV]``), in parallel over the whole sequence.

Glossary as :mod:`kda_explained.chunked.pieces`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch
import triton
import triton.language as tl

from ._meta import device_offsets, dot_precision, host_offsets, seq_meta, tile

__all__ = ["piece_states", "piece_outputs", "PIECE_BLOCK"]

#: Tokens per program of :func:`piece_outputs`.
PIECE_BLOCK = 64


@triton.jit
def _piece_states_kernel(
    # pointers
    P,  # [NP, HV, K, K] float32 transitions
    R,  # [NP, HV, K, V] float32 states from zero
    h0,  # [N, HV, K, V] initial states (HAS_H0)
    S_in,  # [NP, HV, K, V] float32 out: the state entering each piece
    ht,  # [N, HV, K, V] float32 out: final states
    first_piece,  # [N + 1] int32
    # sizes
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BK: tl.constexpr,
    BC: tl.constexpr,  # the product's contraction tile (rows of S read back per step)
    BV: tl.constexpr,
    HAS_H0: tl.constexpr,
):
    i_v, i_n, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    j0 = tl.load(first_piece + i_n).to(tl.int64)
    j1 = tl.load(first_piece + i_n + 1).to(tl.int64)
    o_k = tl.arange(0, BK)
    o_c = tl.arange(0, BC)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    m_kv = m_k[:, None] & m_v[None, :]
    o_S = o_k[:, None] * V + o_v[None, :]  # a [K, BV] tile of one [K, V] state

    # S_in[first] = S_0, written first; each step then reads S_in[j] back in [BC, BV] slices for
    # P_j S_in[j] (a whole [K, K] P beside a [K, BV] S would not fit on chip in float32)
    p_first = S_in + (j0 * HV + i_hv) * K * V
    if HAS_H0:
        b_S0 = tl.load(h0 + (i_n * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)
    else:
        b_S0 = tl.zeros([BK, BV], dtype=tl.float32)
    if j1 > j0:
        tl.store(p_first + o_S, b_S0, mask=m_kv)
    else:  # an empty sequence list: its final state is the initial one
        tl.store(ht + (i_n * HV + i_hv) * K * V + o_S, b_S0, mask=m_kv)
    for j in range(j0, j1):
        tl.debug_barrier()  # S_in[j], written by every thread of the program, read back by every thread
        p_S = S_in + (j * HV + i_hv) * K * V
        b_S = tl.load(R + (j * HV + i_hv) * K * V + o_S, mask=m_kv, other=0)  # S_in[j + 1] = R_j + P_j S_in[j]
        for c0 in range(0, K, BC):
            m_c = c0 + o_c < K
            b_P = tl.load(P + (j * HV + i_hv) * K * K + o_k[:, None] * K + (c0 + o_c)[None, :],
                          mask=m_k[:, None] & m_c[None, :], other=0)  # [BK, BC]
            b_Sc = tl.load(p_S + (c0 + o_c)[:, None] * V + o_v[None, :], mask=m_c[:, None] & m_v[None, :],
                           other=0)  # [BC, BV]
            b_S += tl.dot(b_P, b_Sc, input_precision="tf32x3")
        if j + 1 < j1:
            tl.store(p_S + HV * K * V + o_S, b_S, mask=m_kv)
        else:
            tl.store(ht + (i_n * HV + i_hv) * K * V + o_S, b_S, mask=m_kv)


@triton.jit
def _piece_outputs_kernel(
    # pointers
    o_aug,  # [TT, HV, V + K] [o^0 | q_read]
    S_in,  # [NP, HV, K, V] float32
    o,  # [TT, HV, V] out, o_aug's dtype
    cu,  # [NP + 1] int32 piece offsets
    block_piece,  # [NB] int32: the piece of each 64-token block
    block_bos,  # [NB] int32: the packed position of each block's first token
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
    i_v, i_b, i_hv = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_j = tl.load(block_piece + i_b).to(tl.int64)
    bos = tl.load(block_bos + i_b).to(tl.int64)
    eos = tl.load(cu + i_j + 1).to(tl.int64)
    o_t = tl.arange(0, BT)
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_t = o_t < (eos - bos).to(tl.int32)
    m_k = o_k < K
    m_v = o_v < V
    W: tl.constexpr = V + K  # o_aug's row: the V outputs from zero, then the K columns of q_read
    rows = (bos + o_t[:, None]) * HV + i_hv
    b_q = tl.load(o_aug + rows * W + V + o_k[None, :], mask=m_t[:, None] & m_k[None, :], other=0).to(tl.float32)
    b_S = tl.load(S_in + (i_j * HV + i_hv) * K * V + o_k[:, None] * V + o_v[None, :],
                  mask=m_k[:, None] & m_v[None, :], other=0)
    b_o = tl.load(o_aug + rows * W + o_v[None, :], mask=m_t[:, None] & m_v[None, :], other=0).to(tl.float32)
    b_o += tl.dot(b_q, b_S, input_precision=PRECISION)  # o = o^0 + q_read S_in
    tl.store(o + rows * V + o_v[None, :], b_o.to(o.dtype.element_ty), mask=m_t[:, None] & m_v[None, :])


Offsets = Union[torch.Tensor, Sequence[int]]


def piece_states(P: torch.Tensor, R: torch.Tensor, initial_state: Optional[torch.Tensor],
                 first_piece: Offsets) -> Tuple[torch.Tensor, torch.Tensor]:
    """Twin of :func:`kda_explained.chunked.pieces.piece_states`: ``(S_in [NP, HV, K, V], final_state
    [N, HV, K, V])``, float32, from ``P [NP, HV, K, K]``, ``R [NP, HV, K, V]`` (any float dtype) and
    ``initial_state [N, HV, K, V]`` or ``None``. ``first_piece``: ``[N + 1]`` host ints (a device
    tensor is read back)."""
    first = host_offsets(first_piece)
    NP, HV, K, V = R.shape
    N = len(first) - 1
    S_in = torch.empty(NP, HV, K, V, dtype=torch.float32, device=R.device)
    final = torch.empty(N, HV, K, V, dtype=torch.float32, device=R.device)
    BV = tile(V, 32)
    if N > 0:
        _piece_states_kernel[(triton.cdiv(V, BV), N, HV)](
            P.float().contiguous(), R.float().contiguous(),
            initial_state.float().contiguous() if initial_state is not None else final, S_in, final,
            device_offsets(first, R.device),
            HV=HV, K=K, V=V, BK=tile(K), BC=32, BV=BV, HAS_H0=initial_state is not None, num_warps=4,
        )
    return S_in, final


def piece_outputs(o_aug: torch.Tensor, S_in: torch.Tensor, piece_cu: Offsets) -> torch.Tensor:
    """Twin of :func:`kda_explained.chunked.pieces.piece_outputs`: ``o = o^0 + S_in^T q_read``,
    ``[B, T, HV, V]`` in ``o_aug``'s dtype, from ``o_aug = [o^0 | q_read]`` ``[B, T, HV, V + K]`` and
    ``S_in [NP, HV, K, V]`` (float32). ``piece_cu``: ``[NP + 1]`` host ints (a device tensor is read
    back); one launch."""
    B, T, HV, W = o_aug.shape
    K, V = S_in.shape[2], S_in.shape[3]
    if W != V + K:
        raise ValueError(f"o_aug: expected V + K = {V + K} columns ([o^0 | q_read]), got {W}")
    meta = seq_meta(B, T, PIECE_BLOCK, host_offsets(piece_cu), o_aug.device)  # 64-token blocks of each piece
    o = torch.empty(B, T, HV, V, dtype=o_aug.dtype, device=o_aug.device)
    BV = tile(V, 64)
    if meta.NC > 0:
        _piece_outputs_kernel[(triton.cdiv(V, BV), meta.NC, HV)](
            o_aug.contiguous(), S_in.float().contiguous(), o, meta.cu, meta.chunk_seq, meta.chunk_bos,
            HV=HV, K=K, V=V, BT=PIECE_BLOCK, BK=tile(K), BV=BV, PRECISION=dot_precision(o_aug.dtype), num_warps=4,
        )
    return o
