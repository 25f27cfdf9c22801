"""Stage 1 on the GPU: the gate, the in-chunk cumulative log decay, the beta sigmoid and the L2 norm.

Mirrors :func:`kda_explained.chunked.stages.chunk_local_cumsum` (same name, same
arguments, same result) and the PyTorch gates of :mod:`kda_explained.chunked.gates`.
One program handles one chunk of one value head and one tile of key channels
(channels decay independently): it reads the raw gate input ``[BT, BK]`` once,
applies the gate formula if asked, raises it to :data:`G_FLOOR` (a reset, ``g = -inf``,
becomes a finite gate whose ``exp`` is still 0: :mod:`kda_explained.numerics`), and
writes the running sum ``G`` in float32. The beta sigmoid rides along in the same program (one more
``[BT]`` vector), so the fused options cost no extra launch.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..numerics import gate_floor
from ..validation import check_floating, check_gate_params
from ._meta import SeqMeta, seq_meta, tile

__all__ = ["chunk_local_cumsum", "l2norm", "kda_gate", "lowerbound_gate", "G_FLOOR"]

#: The floor of every log decay before the in-chunk cumulative sum, in float32 (where ``G`` is summed).
G_FLOOR = tl.constexpr(gate_floor("float32"))


@triton.jit
def gate_argument(b_x, A_log, dt_bias, i_hv, o_k, m_k, K: tl.constexpr, HAS_A: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The gate's argument ``z = x + dt_bias[h]`` (``[BT, BK]`` float32, channels ``o_k``) and
    its rate ``exp(A_log[h])`` (1 without ``A_log``), for value head ``i_hv``."""
    if HAS_BIAS:
        b_x += tl.load(dt_bias + i_hv * K + o_k, mask=m_k, other=0).to(tl.float32)[None, :]
    if HAS_A:
        b_rate = tl.exp(tl.load(A_log + i_hv).to(tl.float32))
    else:
        b_rate = 1.0
    return b_x, b_rate


@triton.jit
def softplus(z):
    """``log(1 + exp(z))`` as ``max(z, 0) + log(1 + exp(-|z|))``: no overflow for large ``|z|``."""
    return tl.maximum(z, 0.0) + tl.log(1.0 + tl.exp(-tl.abs(z)))


@triton.jit
def _chunk_local_cumsum_kernel(
    # pointers
    g,  # [TT, HV, K] raw gate input (USE_GATE) or log decay
    beta,  # [TT, HV] beta or its logit (BETA_SIGMOID)
    A_log,  # [HV] (HAS_A)
    dt_bias,  # [HV, K] (HAS_BIAS)
    G_out,  # [TT, HV, K] float32: in-chunk cumulative log decay
    beta_out,  # [TT, HV] float32 (WRITE_BETA)
    cu,  # [N + 1] sequence offsets
    chunk_seq,  # [NC] sequence of each chunk
    chunk_bos,  # [NC] first token of each chunk
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
    WRITE_BETA: tl.constexpr,
    BETA_SIGMOID: tl.constexpr,
    BETA_SCALE: tl.constexpr,
):
    i_c, i_hv, i_k = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    i_n = tl.load(chunk_seq + i_c)
    bos = tl.load(chunk_bos + i_c).to(tl.int64)
    eos = tl.load(cu + i_n + 1).to(tl.int64)

    o_t = tl.arange(0, BT)
    o_k = i_k * BK + tl.arange(0, BK)  # channels are independent: one K tile per program
    m_t = bos + o_t < eos
    m_k = o_k < K
    m_tk = m_t[:, None] & m_k[None, :]

    # --- the gate: g = -exp(A_log) softplus(x + dt_bias)  or  lower_bound sigmoid(exp(A_log)(x + dt_bias))
    p_g = g + ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    b_g = tl.load(p_g, mask=m_tk, other=0).to(tl.float32)  # [BT, BK]
    if USE_GATE:
        b_g, b_rate = gate_argument(b_g, A_log, dt_bias, i_hv, o_k, m_k, K, HAS_A, HAS_BIAS)
        if USE_LOWER_BOUND:
            b_g = lower_bound * tl.sigmoid(b_rate * b_g)
        else:
            b_g = -b_rate * softplus(b_g)
        b_g = tl.where(m_tk, b_g, 0.0)  # padding decays nothing
    # a full reset (g = -inf) or one in effect: raised to the floor, where exp is already 0
    # (kda_explained.numerics), so that G stays finite and keeps the gates after it
    b_g = tl.maximum(b_g, G_FLOOR)

    # --- report Eq. 2 in log space: G_r = sum_{i <= r} g_i inside the chunk
    b_G = tl.cumsum(b_g, axis=0)
    p_G = G_out + ((bos + o_t[:, None]) * HV + i_hv) * K + o_k[None, :]
    tl.store(p_G, b_G, mask=m_tk)

    if WRITE_BETA and i_k == 0:
        p_b = beta + (bos + o_t) * HV + i_hv
        b_beta = tl.load(p_b, mask=m_t, other=0).to(tl.float32)
        if BETA_SIGMOID:
            b_beta = BETA_SCALE * tl.sigmoid(b_beta)
        tl.store(beta_out + (bos + o_t) * HV + i_hv, b_beta, mask=m_t)


def chunk_local_cumsum(
    g: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
    *,
    beta: Optional[torch.Tensor] = None,
    use_gate_in_kernel: bool = False,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: Optional[float] = None,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    meta: Optional[SeqMeta] = None,
) -> torch.Tensor | Tuple[torch.Tensor, torch.Tensor]:
    """``G = in-chunk cumsum of g``: ``g: [B, T, HV, K]`` -> ``G: [B, T, HV, K]`` float32.

    With ``use_gate_in_kernel``, ``g`` is the raw gate input and the gate of the
    design contract (docs/design.md) is applied first (the lower-bound form when
    ``lower_bound`` is given). With ``beta`` given, also returns ``beta`` as float32 (after the
    sigmoid if ``use_beta_sigmoid_in_kernel``; ``2 * sigmoid`` with ``allow_neg_eigval``).
    """
    B, T, HV, K = g.shape
    meta = meta or seq_meta(B, T, chunk_size, cu_seqlens, g.device)
    g = g.contiguous()
    G = torch.empty(B, T, HV, K, dtype=torch.float32, device=g.device)
    beta_out = torch.empty(B, T, HV, dtype=torch.float32, device=g.device) if beta is not None else G
    dt = dt_bias.reshape(HV, K).contiguous() if dt_bias is not None else g
    if meta.NC > 0:
        BK = tile(K, 32)
        _chunk_local_cumsum_kernel[(meta.NC, HV, triton.cdiv(K, BK))](
            g, beta.contiguous() if beta is not None else g, A_log.contiguous() if A_log is not None else g, dt, G, beta_out,
            meta.cu, meta.chunk_seq, meta.chunk_bos,
            float(lower_bound) if lower_bound is not None else 0.0,
            HV=HV, K=K, BT=chunk_size, BK=BK,
            USE_GATE=use_gate_in_kernel, HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
            USE_LOWER_BOUND=lower_bound is not None, WRITE_BETA=beta is not None,
            BETA_SIGMOID=use_beta_sigmoid_in_kernel, BETA_SCALE=2.0 if allow_neg_eigval else 1.0,
        )
    return (G, beta_out) if beta is not None else G


@triton.jit
def _l2norm_kernel(
    x,  # [R, D] rows to normalise
    y,  # [R, D] output, x's dtype
    R,
    D: tl.constexpr,
    BD: tl.constexpr,
    BR: tl.constexpr,
    EPS: tl.constexpr,
):
    i_r = tl.program_id(0)
    o_r = i_r * BR + tl.arange(0, BR)
    o_d = tl.arange(0, BD)
    m = (o_r[:, None] < R) & (o_d[None, :] < D)
    p = o_r[:, None].to(tl.int64) * D + o_d[None, :]
    b_x = tl.load(x + p, mask=m, other=0).to(tl.float32)
    b_y = b_x / tl.sqrt(tl.sum(b_x * b_x, axis=1) + EPS)[:, None]
    tl.store(y + p, b_y.to(y.dtype.element_ty), mask=m)


def l2norm(x: torch.Tensor, eps: float = 1e-6, *, out_dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """``x / sqrt(sum(x ** 2) + eps)`` over the last axis, like :func:`kda_explained.chunked.gates.l2norm`;
    in ``x``'s dtype, or ``out_dtype`` (the pipeline passes its intermediate dtype)."""
    x = x.contiguous()
    D = x.shape[-1]
    R = x.numel() // D
    y = torch.empty_like(x, dtype=out_dtype or x.dtype)
    BR = 16
    if R > 0:
        _l2norm_kernel[(triton.cdiv(R, BR),)](x, y, R, D=D, BD=triton.next_power_of_2(D), BR=BR, EPS=eps)
    return y


@triton.jit
def _gate_kernel(
    x,  # [R, HV, K] gate input, rows of every leading index
    A_log,  # [HV] (HAS_A)
    dt_bias,  # [HV, K] (HAS_BIAS)
    g,  # [R, HV, K] float32 out: the log decay
    R,
    lower_bound,
    HV: tl.constexpr,
    K: tl.constexpr,
    BR: tl.constexpr,
    BK: tl.constexpr,
    HAS_A: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_LOWER_BOUND: tl.constexpr,
):
    i_r, i_hv = tl.program_id(0), tl.program_id(1)
    o_r = i_r * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m = (o_r < R)[:, None] & m_k[None, :]
    p = (o_r[:, None].to(tl.int64) * HV + i_hv) * K + o_k[None, :]
    b_z, b_rate = gate_argument(tl.load(x + p, mask=m, other=0).to(tl.float32), A_log, dt_bias, i_hv, o_k, m_k, K,
                                HAS_A, HAS_BIAS)
    if USE_LOWER_BOUND:
        b_g = lower_bound * tl.sigmoid(b_rate * b_z)
    else:
        b_g = -b_rate * softplus(b_z)
    tl.store(g + p, b_g, mask=m)


def _gate(x, A_log, dt_bias, lower_bound):
    check_floating("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [..., HV, K], got {list(x.shape)}")
    HV, K = x.shape[-2:]
    check_gate_params(HV, K, A_log, dt_bias, lower_bound)
    x = x.contiguous()
    g = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    R = x.numel() // max(1, HV * K)
    BR = 16
    if R > 0:
        _gate_kernel[(triton.cdiv(R, BR), HV)](
            x, A_log.reshape(-1).contiguous() if A_log is not None else x,
            dt_bias.reshape(HV, K).contiguous() if dt_bias is not None else x, g, R,
            float(lower_bound) if lower_bound is not None else 0.0, HV=HV, K=K, BR=BR,
            BK=triton.next_power_of_2(K), HAS_A=A_log is not None, HAS_BIAS=dt_bias is not None,
            USE_LOWER_BOUND=lower_bound is not None,
        )
    return g


def kda_gate(x: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g = -exp(A_log[h]) * softplus(x + dt_bias[h, :])``: ``x [..., HV, K]`` -> ``g [..., HV, K]`` float32.

    The gate :func:`chunk_local_cumsum` applies with ``use_gate_in_kernel``, on its own; the
    twin of :func:`kda_explained.chunked.gates.kda_gate` (same arguments). Forward only.
    """
    if A_log is None:
        raise ValueError("A_log: expected a tensor of shape [HV] for the softplus gate, got None")
    return _gate(x, A_log, dt_bias, None)


def lowerbound_gate(
    x: torch.Tensor,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: float = -5.0,
) -> torch.Tensor:
    """``g = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias[h, :]))`` in ``(lower_bound, 0)``, float32.

    The twin of :func:`kda_explained.chunked.gates.lowerbound_gate`. Forward only.
    """
    if lower_bound is None:
        raise ValueError("lower_bound: expected a finite negative number, got None")
    return _gate(x, A_log, dt_bias, lower_bound)

