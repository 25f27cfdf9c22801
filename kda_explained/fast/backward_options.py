"""The options' backward in Triton: the in-kernel gate, the beta sigmoid and the L2 norm.

:func:`~kda_explained.fast.api.chunk_kda` can apply three element-wise options inside its
first kernels (``use_gate_in_kernel``, ``use_beta_sigmoid_in_kernel``,
``use_qk_l2norm_in_kernel``). This module computes their backward in Triton, around the
core's (:mod:`kda_explained.fast.autograd`'s ``ChunkKDAOptionsFunction``).

**The gate and the beta sigmoid**, fused into stage 1's backward. Stage 1 made
``G = cumsum(g)`` inside each chunk from ``g = gate(x)``, with ``z = x + dt_bias`` and
``rate = exp(A_log)`` per head::

    softplus form:    g = -rate softplus(z)        dg/dz = -rate sigmoid(z)     dg/dA_log = g
    lower-bound form: g = lb sigmoid(rate z)       dg/dz = lb s (1 - s) rate    dg/dA_log = (dg/dz) z
                                                   (s = sigmoid(rate z))

so one program per chunk, value head and tile of channels reverses the cumsum
(``dg_i = sum_{r >= i} dG_r``), multiplies by ``dg/dz`` (the gradient of ``x``; ``dt_bias``
adds ``z = x + dt_bias`` and so gets the sum of the same over tokens) and writes its
partial sums for ``A_log`` and ``dt_bias``, which PyTorch adds over chunks afterwards.
The beta sigmoid ``beta = c sigmoid(b)`` (``c = 2`` with ``allow_neg_eigval``) rides
along: ``db = dbeta c s (1 - s)``.

**The L2 norm** ``y = x r`` with ``r = (sum x^2 + eps)^(-1/2)``, one row of ``K`` channels
per token and head::

    dx = r (dy - y (y . dy))
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import triton
import triton.language as tl

from ._grad import chunk_span
from ._meta import SeqMeta, seq_meta, tile
from .backward import checked_backward_inputs, core_backward
from .config import Plan, plan_for
from .local import intermediate_dtype
from .prepare import G_FLOOR, chunk_local_cumsum, gate_argument, l2norm, softplus

__all__ = ["kda_backward_with_options", "gate_cumsum_bwd", "l2norm_bwd", "OptionGrads"]


@triton.jit
def _gate_cumsum_bwd_kernel(
    # pointers
    dG,  # [TT, HV, K] float32: gradient of the in-chunk cumulative log decay
    x,  # [TT, HV, K] raw gate input (USE_GATE)
    A_log,  # [HV] (HAS_A)
    dt_bias,  # [HV, K] (HAS_BIAS)
    dx,  # [TT, HV, K] float32 out: gradient of x (or of g without the gate)
    dA_part,  # [NC, NK, HV] float32 out: this program's share of dA_log (HAS_A)
    dbias_part,  # [NC, HV, K] float32 out: this chunk's share of ddt_bias (HAS_BIAS)
    b_raw,  # [TT, HV] beta before the sigmoid (BETA_SIGMOID)
    dbeta,  # [TT, HV] float32: gradient of beta (BETA_SIGMOID)
    db_raw,  # [TT, HV] float32 out (BETA_SIGMOID)
    cu,
    chunk_seq,
    chunk_bos,
    # scalars
    lower_bound,
    # sizes
    HV: tl.constexpr,
    K: tl.constexpr,
    # meta-parameters
    BT: tl.constexpr,
    BK: tl.constexpr,
    USE_GATE: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_LOWER_BOUND: tl.constexpr,
    BETA_SIGMOID: tl.constexpr,
    BETA_SCALE: tl.constexpr,
    HAS_G: tl.constexpr = False,  # x holds g itself (without the gate): zero the gradient where it was floored
):
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    NK: tl.constexpr = (K + BK - 1) // BK
    bos, eos = chunk_span(cu, chunk_seq, chunk_bos, i_c)
    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)
    m_t = bos + o_t < eos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]
    p_tk = ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_dG = tl.load(dG + p_tk, mask=m_tk, other=0)
    # G_r = sum_{i <= r} g_i  =>  dg_i = sum_{r >= i} dG_r = (chunk total) - (sum up to i) + dG_i
    b_dg = tl.sum(b_dG, axis=0)[None, :] - tl.cumsum(b_dG, axis=0) + b_dG
    if USE_GATE:
        b_z, b_rate = gate_argument(tl.load(x + p_tk, mask=m_tk, other=0).to(tl.float32), A_log, dt_bias, i_hv,
                                    o_k, m_k, K, HAS_A, HAS_BIAS)
        if USE_LOWER_BOUND:
            b_s = tl.sigmoid(b_rate * b_z)
            b_g = lower_bound * b_s
            b_dz = b_dg * lower_bound * b_s * (1.0 - b_s) * b_rate
            b_dA = b_dz * b_z  # d/dA_log of rate z is rate z
        else:
            b_g = -b_rate * softplus(b_z)
            b_dz = -b_dg * b_rate * tl.sigmoid(b_z)
            b_dA = b_dg * b_g  # dg/dA_log = g = -rate softplus(z)
        # a gate the forward raised to the floor (stage 1) is a constant there: its gradient is 0
        live = m_tk & (b_g >= G_FLOOR)
        b_dz = tl.where(live, b_dz, 0.0)
        b_dA = tl.where(live, b_dA, 0.0)
        tl.store(dx + p_tk, b_dz, mask=m_tk)
        if HAS_A:
            tl.store(dA_part + (i_c * NK + i_k) * HV + i_hv, tl.sum(tl.sum(tl.where(m_tk, b_dA, 0.0), axis=1), axis=0))
        if HAS_BIAS:
            tl.store(dbias_part + (i_c * HV + i_hv) * K + o_k, tl.sum(b_dz, axis=0), mask=m_k)
    elif HAS_G:  # g itself, raised to the floor by the forward: no gradient below it
        b_g = tl.load(x + p_tk, mask=m_tk, other=0).to(tl.float32)
        tl.store(dx + p_tk, tl.where(b_g >= G_FLOOR, b_dg, 0.0), mask=m_tk)
    else:
        tl.store(dx + p_tk, b_dg, mask=m_tk)
    if BETA_SIGMOID:
        if i_k == 0:
            p_t = (bos + o_t) * HV + i_hv
            b_sb = tl.sigmoid(tl.load(b_raw + p_t, mask=m_t, other=0).to(tl.float32))  # [BT]
            b_db = tl.load(dbeta + p_t, mask=m_t, other=0) * BETA_SCALE * b_sb * (1.0 - b_sb)
            tl.store(db_raw + p_t, b_db, mask=m_t)


class OptionGrads(NamedTuple):
    """What :func:`gate_cumsum_bwd` returns; ``None`` where an option is off."""

    dg: torch.Tensor  #: ``[B, T, HV, K]`` float32: gradient of ``g`` (the raw gate input with the gate)
    dA_log: Optional[torch.Tensor]  #: ``[HV]`` float32
    ddt_bias: Optional[torch.Tensor]  #: ``[HV, K]`` float32
    dbeta: Optional[torch.Tensor]  #: ``[B, T, HV]`` float32: gradient of ``beta`` (its logit with the sigmoid)


def gate_cumsum_bwd(
    dG: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    g: Optional[torch.Tensor] = None,
    use_gate_in_kernel: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: Optional[float] = None,
    beta: Optional[torch.Tensor] = None,
    dbeta: Optional[torch.Tensor] = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    meta: Optional[SeqMeta] = None,
) -> OptionGrads:
    """The backward of :func:`kda_explained.fast.prepare.chunk_local_cumsum` with its options.

    Args:
        dG: ``[B, T, HV, K]`` float32 gradient of ``G``.
        g: the raw gate input the forward read (needed with ``use_gate_in_kernel``).
        A_log, dt_bias, lower_bound: the gate's parameters, as the forward took them.
        beta, dbeta: the beta logit the forward read and the gradient of the sigmoid's output
            (needed with ``use_beta_sigmoid_in_kernel``).
    """
    B, T, HV, K = dG.shape
    if use_gate_in_kernel and g is None:
        raise ValueError("g: the raw gate input is needed with use_gate_in_kernel, got None")
    if use_beta_sigmoid_in_kernel and (beta is None or dbeta is None):
        raise ValueError("beta, dbeta: both are needed with use_beta_sigmoid_in_kernel")
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, dG.device)
    BK = tile(K, 32)
    NK = triton.cdiv(K, BK)
    f32 = dict(dtype=torch.float32, device=dG.device)
    dx = torch.empty(B, T, HV, K, **f32)
    has_a, has_bias = use_gate_in_kernel and A_log is not None, use_gate_in_kernel and dt_bias is not None
    dA_part = torch.zeros(meta.NC, NK, HV, **f32) if has_a else dx
    dbias_part = torch.zeros(meta.NC, HV, K, **f32) if has_bias else dx
    db_raw = torch.empty(B, T, HV, **f32) if use_beta_sigmoid_in_kernel else None
    if meta.NC > 0:
        _gate_cumsum_bwd_kernel[(meta.NC, HV, NK)](
            dG.contiguous(), g.contiguous() if g is not None else dG,
            A_log.reshape(-1).contiguous() if has_a else dG, dt_bias.reshape(HV, K).contiguous() if has_bias else dG,
            dx, dA_part, dbias_part,
            beta.contiguous() if use_beta_sigmoid_in_kernel else dG,
            dbeta.float().contiguous() if use_beta_sigmoid_in_kernel else dG,
            db_raw if use_beta_sigmoid_in_kernel else dx,
            meta.cu, meta.chunk_seq, meta.chunk_bos, float(lower_bound) if lower_bound is not None else 0.0,
            HV=HV, K=K, BT=chunk_size, BK=BK, USE_GATE=use_gate_in_kernel, HAS_A=has_a, HAS_BIAS=has_bias,
            USE_LOWER_BOUND=lower_bound is not None, BETA_SIGMOID=use_beta_sigmoid_in_kernel,
            BETA_SCALE=2.0 if allow_neg_eigval else 1.0, HAS_G=g is not None and not use_gate_in_kernel,
        )
    return OptionGrads(dx, dA_part.sum((0, 1)) if has_a else None, dbias_part.sum(0) if has_bias else None, db_raw)


@triton.jit
def _l2norm_bwd_kernel(x, dy, dx, R, D: tl.constexpr, BD: tl.constexpr, BR: tl.constexpr, EPS: tl.constexpr):
    """``BR`` rows of ``D`` channels: ``dx = r (dy - y (y . dy))`` with ``y = x r``."""
    o_r = tl.program_id(0) * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r < R)[:, None] & (o_d < D)[None, :]
    p = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0).to(tl.float32)
    b_dy = tl.load(dy + p, mask=m, other=0).to(tl.float32)
    b_r = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) + EPS)  # [BR]
    b_y = b_x * b_r[:, None]
    b_dx = b_r[:, None] * (b_dy - b_y * tl.sum(b_y * b_dy, axis=1)[:, None])
    tl.store(dx + p, b_dx, mask=m)


def l2norm_bwd(x: torch.Tensor, dy: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Gradient of :func:`kda_explained.fast.prepare.l2norm` (over the last axis): float32, ``x``'s shape."""
    x, dy = x.contiguous(), dy.contiguous()
    D = x.shape[-1]
    R = x.numel() // D
    dx = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    BR = 16
    if R > 0:
        _l2norm_bwd_kernel[(triton.cdiv(R, BR),)](x, dy, dx, R, D=D, BD=triton.next_power_of_2(D), BR=BR, EPS=eps)
    return dx


def kda_backward_with_options(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    dS_final: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: Optional[float] = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    factors: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
    plan: Optional[Plan] = None,
):
    """Gradients of ``chunk_kda`` with its in-kernel options, every stage in Triton.

    Returns ``(dq, dk, dv, dg, dbeta, dinitial_state, dA_log, ddt_bias)``, float32 (the
    gradients of the raw inputs ``chunk_kda`` took; ``None`` for what is absent). The forward
    is recomputed with the options applied by the forward's own kernels, then
    :func:`~kda_explained.fast.backward.core_backward` (``factors``: ``(A_qk, M)`` as the
    forward kept them, see there), then the options' backward. ``plan``: the kernels' launch
    settings (default :func:`~kda_explained.fast.config.plan_for` the device).
    """
    scale, cu_seqlens, C, meta = checked_backward_inputs(q, k, v, g, beta, scale, initial_state, cu_seqlens,
                                                         chunk_size)
    if use_qk_l2norm_in_kernel:  # as the forward made them (chunk_kda_fwd)
        qn, kn = l2norm(q, out_dtype=intermediate_dtype(q.dtype)), l2norm(k, out_dtype=intermediate_dtype(k.dtype))
    else:
        qn, kn = q, k
    G, beta32 = chunk_local_cumsum(g, C, cu_seqlens, beta=beta, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log,
                                   dt_bias=dt_bias, lower_bound=lower_bound,
                                   use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                                   allow_neg_eigval=allow_neg_eigval, meta=meta)  # 1.
    dq, dk, dv, dG, dbeta, dS0 = core_backward(qn, kn, v, G, beta32, do, dS_final, scale, initial_state, C,
                                               cu_seqlens, factors=factors, meta=meta,
                                               plan=plan or plan_for(q.device))  # 6. down to 2.
    del G, qn, kn
    o = gate_cumsum_bwd(dG, C, cu_seqlens, g=g, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
                        lower_bound=lower_bound, beta=beta, dbeta=dbeta,
                        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
                        meta=meta)  # 1.
    if use_qk_l2norm_in_kernel:
        dq, dk = l2norm_bwd(q, dq), l2norm_bwd(k, dk)
    return dq, dk, dv, o.dg, (o.dbeta if use_beta_sigmoid_in_kernel else dbeta), dS0, o.dA_log, o.ddt_bias
