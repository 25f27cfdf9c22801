"""Decoding on the GPU: report Eq. 1 token by token, on a state pool updated in place.

Mirrors :func:`kda_explained.naive.kda` (the recurrence itself). One program
owns one sequence, one value head and a tile of ``BV`` value columns of the
state ``S [K, BV]`` in float32 registers; per token it does::

    S   = Diag(exp(g)) S                 # per-channel decay
    S  += beta k (v - S^T k)^T           # the delta rule: erase what k recalls, write v
    o   = S^T (scale q)

Decoding moves the state (``4 K V`` bytes per head, read and written) and little
else, so the kernel is bound by memory bandwidth; its floor is the state bytes
over the copy rate. With ``ssm_state_indices`` a serving engine keeps all states
in one pool ``[P, HV, K, V]`` and names the slot of each sequence: the kernel
reads and writes that slot in place. A slot outside ``[0, P)`` (negative for
"no sequence here", or past the pool) skips the sequence, whose outputs are then
zeros: the kernel never touches memory outside the pool, and the host never has
to read the indices back (no device sync, so a decode step can be captured in a
CUDA graph).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._meta import tile
from .config import DecodeConfig, plan_for
from .state import state_value_tile

__all__ = ["fused_recurrent_kda_fwd"]


@triton.jit
def _fused_recurrent_kernel(
    # pointers
    q,  # [TT, H, K]
    k,  # [TT, H, K]
    v,  # [TT, HV, V]
    g,  # [TT, HV, K] log decay, or the raw gate input (USE_GATE)
    beta,  # [TT, HV] beta, or its logit (BETA_SIGMOID)
    A_log,  # [HV]
    dt_bias,  # [HV, K]
    o,  # [TT, HV, V] out
    h0,  # [P, HV, K, V] state pool (or [N, HV, K, V]); [V, K] each with STATE_V_FIRST
    ht,  # [N, HV, K, V] final states (may alias h0 for in-place updates)
    cu,  # [N + 1] (IS_VARLEN)
    slots,  # [N] state slot of each sequence, or [N, 1 + SLOT_COLS] (HAS_SLOTS; see the launcher)
    # scalars
    scale,
    lower_bound,
    T,  # tokens per sequence (not IS_VARLEN)
    P,  # state slots in the pool (HAS_SLOTS)
    # sizes
    H: tl.constexpr,
    HV: tl.constexpr,
    K: tl.constexpr,
    V: tl.constexpr,
    # meta-parameters
    BK: tl.constexpr,
    BV: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    HAS_H0: tl.constexpr,
    HAS_SLOTS: tl.constexpr,
    STORE_FINAL: tl.constexpr,
    STATE_V_FIRST: tl.constexpr,
    QK_L2NORM: tl.constexpr,
    USE_GATE: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_LOWER_BOUND: tl.constexpr,
    BETA_SIGMOID: tl.constexpr,
    BETA_SCALE: tl.constexpr,
    SLOT_COLS: tl.constexpr = 0,  # > 0: a slot per token, the state after each token written to its own
):
    # one flat grid, value tile fastest, then head, then sequence: programs launched together
    # read neighbouring state tiles (one sequence's [HV, K, V] block is contiguous in the pool)
    NV: tl.constexpr = (V + BV - 1) // BV
    pid = tl.program_id(0)
    i_v, i_hv, i_n = pid % NV, (pid // NV) % HV, pid // (NV * HV)
    i_h = i_hv // (HV // H)
    if IS_VARLEN:
        bos = tl.load(cu + i_n).to(tl.int64)
        eos = tl.load(cu + i_n + 1).to(tl.int64)
    else:
        bos = i_n.to(tl.int64) * T
        eos = bos + T
    o_k = tl.arange(0, BK)
    o_v = i_v * BV + tl.arange(0, BV)
    m_k = o_k < K
    m_v = o_v < V
    if HAS_SLOTS:
        if SLOT_COLS > 0:  # speculative decoding: row [column to read, slot of token 0, 1, ...]
            row = slots + i_n.to(tl.int64) * (SLOT_COLS + 1)
            c_read = tl.minimum(tl.maximum(tl.load(row).to(tl.int64), 0), SLOT_COLS - 1)
            slot = tl.load(row + 1 + c_read).to(tl.int64)
        else:
            slot = tl.load(slots + i_n).to(tl.int64)
        is_live = (slot >= 0) & (slot < P)
    else:
        slot = i_n.to(tl.int64)
        is_live = slot >= 0
    if is_live:
        m_kv = m_k[:, None] & m_v[None, :]
        if STATE_V_FIRST:
            o_S = o_v[None, :] * K + o_k[:, None]
        else:
            o_S = o_k[:, None] * V + o_v[None, :]

        b_S = tl.zeros([BK, BV], dtype=tl.float32)
        if HAS_H0:
            b_S += tl.load(h0 + (slot * HV + i_hv) * K * V + o_S, mask=m_kv, other=0).to(tl.float32)
        if USE_GATE:
            if HAS_A:
                b_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
            else:
                b_rate = 1.0
            if HAS_BIAS:
                b_bias = tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0).to(tl.float32)
            else:
                b_bias = tl.zeros([BK], dtype=tl.float32)

        for t in range(bos, eos):
            b_q = tl.load(q + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_k = tl.load(k + (t * H + i_h) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_v = tl.load(v + (t * HV + i_hv) * V + o_v, mask=m_v, other=0).to(tl.float32)
            b_g = tl.load(g + (t * HV + i_hv) * K + o_k, mask=m_k, other=0).to(tl.float32)
            b_beta = tl.load(beta + t * HV + i_hv).to(tl.float32)
            if QK_L2NORM:
                b_q = b_q / tl.sqrt(tl.sum(b_q * b_q) + 1e-6)
                b_k = b_k / tl.sqrt(tl.sum(b_k * b_k) + 1e-6)
            if USE_GATE:
                b_x = b_g + b_bias
                if USE_LOWER_BOUND:
                    b_g = lower_bound * tl.sigmoid(b_rate * b_x)
                else:
                    b_g = -b_rate * (tl.maximum(b_x, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(b_x))))
            if BETA_SIGMOID:
                b_beta = BETA_SCALE * tl.sigmoid(b_beta)
            b_S = b_S * tl.exp(b_g)[:, None]  # Diag(alpha_t) S
            b_u = b_beta * (b_v - tl.sum(b_S * b_k[:, None], axis=0))  # beta (v - S^T k)      [BV]
            b_S = b_S + b_k[:, None] * b_u[None, :]  # + k u^T
            b_o = tl.sum(b_S * (b_q * scale)[:, None], axis=0)  # S^T (scale q)               [BV]
            tl.store(o + (t * HV + i_hv) * V + o_v, b_o.to(o.dtype.element_ty), mask=m_v)
            if SLOT_COLS > 0:  # the state after this token, to its own slot (skipped outside the pool)
                w = tl.load(row + 1 + (t - bos)).to(tl.int64)
                if (w >= 0) & (w < P):
                    tl.store(ht + (w * HV + i_hv) * K * V + o_S, b_S.to(ht.dtype.element_ty), mask=m_kv)

        if STORE_FINAL and SLOT_COLS == 0:
            tl.store(ht + (slot * HV + i_hv) * K * V + o_S, b_S.to(ht.dtype.element_ty), mask=m_kv)
    else:
        for t in range(bos, eos):  # a skipped sequence outputs zeros, never uninitialised memory
            tl.store(o + (t * HV + i_hv) * V + o_v, tl.zeros([BV], dtype=o.dtype.element_ty), mask=m_v)


def fused_recurrent_kda_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: float,
    cu: Optional[torch.Tensor],
    N: int,
    initial_state: Optional[torch.Tensor],
    final_state: Optional[torch.Tensor],
    ssm_state_indices: Optional[torch.Tensor] = None,
    num_accepted_tokens: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    state_v_first: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: Optional[float] = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    config: Optional[DecodeConfig] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Launch the recurrent kernel. Inputs already validated; ``cu`` is ``[N + 1]`` int32 on the device,
    or ``None`` for ``N = B`` sequences of ``T`` tokens each.

    ``final_state`` is written at each sequence's slot (``ssm_state_indices[n]``,
    or ``n``); passing the pool itself as both ``initial_state`` and
    ``final_state`` updates it in place.

    Speculative decoding: ``ssm_state_indices [N, S]`` gives each sequence a slot per
    token; the state after its token ``t`` is written to slot ``[n, t]`` of the pool
    (``final_state``), and the state read first is that of slot
    ``[n, num_accepted_tokens[n] - 1]`` (``[n, 0]`` without it). The kernel reads both
    from one ``[N, 1 + S]`` table, the column to read first, then the slots. ``out``
    (``[B, T, HV, V]``, ``v``'s dtype, contiguous) receives the outputs if given.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    o = torch.empty(B, T, HV, V, dtype=v.dtype, device=v.device) if out is None else out
    slot_cols = 0
    if ssm_state_indices is not None and ssm_state_indices.dim() == 2:
        slot_cols = ssm_state_indices.shape[1]
        first = (num_accepted_tokens.to(ssm_state_indices.dtype) - 1 if num_accepted_tokens is not None
                 else ssm_state_indices.new_zeros(N))
        ssm_state_indices = torch.cat([first[:, None], ssm_state_indices], dim=1)  # [N, 1 + S], on the device
    config = config or plan_for(q.device).decode
    # a decoding step moves states: a few sequences at 64 columns a program would leave most SMs
    # without a tile to stream (one sequence of 32 heads: 64 programs on 132 SMs)
    BV = state_value_tile(N * HV, V, q.device, config.min_programs_per_sm, widest=config.launch.BV)
    HV_K = (HV, K)
    if N > 0:
        _fused_recurrent_kernel[(triton.cdiv(V, BV) * HV * N,)](
            q.contiguous(), k.contiguous(), v.contiguous(), g.contiguous(), beta.contiguous(),
            A_log.contiguous() if A_log is not None else q,
            dt_bias.reshape(HV_K).contiguous() if dt_bias is not None else q,
            # a pool updated in place is contiguous (checked), so .contiguous() keeps it the same tensor
            o, initial_state.contiguous() if initial_state is not None else o, final_state if final_state is not None else o,
            cu if cu is not None else o, ssm_state_indices.contiguous() if ssm_state_indices is not None else o,
            float(scale), float(lower_bound) if lower_bound is not None else 0.0,
            T, initial_state.shape[0] if initial_state is not None else 0,
            H=H, HV=HV, K=K, V=V, BK=tile(K), BV=BV,
            IS_VARLEN=cu is not None, HAS_H0=initial_state is not None, HAS_SLOTS=ssm_state_indices is not None,
            STORE_FINAL=final_state is not None, STATE_V_FIRST=state_v_first,
            QK_L2NORM=use_qk_l2norm_in_kernel, USE_GATE=use_gate_in_kernel, HAS_A=A_log is not None,
            HAS_BIAS=dt_bias is not None, USE_LOWER_BOUND=lower_bound is not None,
            BETA_SIGMOID=use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if allow_neg_eigval else 1.0,
            **({"SLOT_COLS": slot_cols} if slot_cols else {}), num_warps=config.launch.warps,
        )
    return o, final_state
