"""One decoding step's elementwise work around the recurrence, as Triton kernels.

The twins of :mod:`kda_explained.chunked.step` (same names, same arguments): each is one launch
where PyTorch takes several (a concatenation, a product, a sum, a SiLU and a copy for the
convolution; a power, a mean, a square root and three products for the norm). With the
recurrence kernel, which already takes the gate, the L2 norm and the beta sigmoid in, a KDA
layer's decoding step is its projections plus five launches: three convolutions, the recurrence
and the norm. :func:`decode_attention` is the attention layers' step on a preallocated KV buffer
whose filled length is a device tensor: flash-decoding, the keys split across programs, each
program past the filled length returning at once, so that a step costs what the filled part of
the buffer costs, not its capacity.

All are ``torch.library`` operators (``kda_explained::short_conv_step``, which declares the
convolution's carried window as the argument it mutates, ``kda_explained::gated_rms_norm``,
``kda_explained::decode_attention``),
so that ``torch.compile`` keeps each as one node and a CUDA graph replays them as they are.
They have no backward: decoding needs none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..chunked.step import check_decode_attention, check_gated_rms_norm, check_short_conv_step
from .config import StepConfig, plan_for
from .inputs import check_fast_device, check_fast_dtypes

__all__ = ["short_conv_step", "gated_rms_norm", "decode_attention"]


@triton.jit
def _short_conv_step_kernel(
    x,  # [N, C] this step's inputs
    state,  # [N, C, W - 1] the carried window, oldest first; shifted in place
    weight,  # [C, W]
    y,  # [N, C] out: silu of the convolution
    C,
    s_n, s_c, s_w,  # the window's strides (a view into a larger cache works too)
    W: tl.constexpr,
    BW: tl.constexpr,  # next power of two >= W
    BC: tl.constexpr,
):
    i_n, i_c = tl.program_id(0).to(tl.int64), tl.program_id(1)
    o_c = i_c * BC + tl.arange(0, BC)
    o_w = tl.arange(0, BW)
    m_c = o_c < C
    # the window [BC, BW]: the carried inputs in taps 0 .. W - 2, this step's input in tap W - 1
    p_s = state + i_n * s_n + o_c[:, None].to(tl.int64) * s_c + o_w[None, :] * s_w
    m_s = m_c[:, None] & (o_w[None, :] < W - 1)
    b_s = tl.load(p_s, mask=m_s, other=0).to(tl.float32)
    b_x = tl.load(x + i_n * C + o_c, mask=m_c, other=0).to(tl.float32)
    b_win = tl.where(o_w[None, :] == W - 1, b_x[:, None], b_s)
    b_w = tl.load(weight + o_c[:, None] * W + o_w[None, :], mask=m_c[:, None] & (o_w[None, :] < W),
                  other=0).to(tl.float32)
    b_y = tl.sum(b_win * b_w, axis=1)  # [BC]
    tl.store(y + i_n * C + o_c, (b_y * tl.sigmoid(b_y)).to(y.dtype.element_ty), mask=m_c)
    # the window moves on by one: tap j takes tap j + 1 (the carried input after it, or x)
    b_next = tl.load(p_s + s_w, mask=m_c[:, None] & (o_w[None, :] + 1 < W - 1), other=0).to(tl.float32)
    b_next = tl.where(o_w[None, :] + 1 == W - 1, b_x[:, None], b_next)
    tl.debug_barrier()  # every thread has read the old window before any writes the new one
    tl.store(p_s, b_next.to(state.dtype.element_ty), mask=m_s)


@triton.jit
def _gated_rms_norm_kernel(
    x,  # [R, K]
    gate,  # [R, K]
    weight,  # [K]
    y,  # [R, K] out
    R,
    eps,
    K: tl.constexpr,
    BK: tl.constexpr,  # next power of two >= K
    BR: tl.constexpr,
):
    o_r = tl.program_id(0).to(tl.int64) * BR + tl.arange(0, BR)
    o_k = tl.arange(0, BK)
    m_k = o_k < K
    m = (o_r < R)[:, None] & m_k[None, :]
    offs = o_r[:, None] * K + o_k[None, :]
    b_x = tl.load(x + offs, mask=m, other=0).to(tl.float32)
    b_g = tl.load(gate + offs, mask=m, other=0).to(tl.float32)
    b_w = tl.load(weight + o_k, mask=m_k, other=0).to(tl.float32)
    b_rstd = 1.0 / tl.sqrt(tl.sum(b_x * b_x, axis=1) / K + eps)  # [BR]
    b_y = b_x * b_rstd[:, None] * b_w[None, :] * tl.sigmoid(b_g)
    tl.store(y + offs, b_y.to(y.dtype.element_ty), mask=m)


@triton.jit
def _decode_attention_split_kernel(
    q,  # [B * H, DH] one query per row and head
    k, v,  # [B, H, L, DH] the KV buffers (strided)
    valid,  # [B, L] int8: 1 at a real token
    length,  # [1] the filled positions
    m_out, l_out,  # [B * H, S] float32: each split's running max and softmax denominator
    acc_out,  # [B * H, S, DH] float32: each split's unnormalised output
    H, L, S, SPLIT,
    s_kb, s_kh, s_kl,
    s_vb, s_vh, s_vl,
    scale,
    DH: tl.constexpr,
    BD: tl.constexpr,  # next power of two >= DH
    BN: tl.constexpr,  # keys per block of the loop
):
    """One program: split ``i_s`` (keys ``[i_s SPLIT, (i_s + 1) SPLIT)`` below the filled length) of
    one row and head, by online softmax; a split past the filled length writes an empty result."""
    i_bh, i_s = tl.program_id(0), tl.program_id(1)
    i_b, i_h = i_bh // H, i_bh % H
    n = tl.load(length).to(tl.int32)
    start = i_s * SPLIT
    end = tl.minimum(start + SPLIT, n)
    o_d = tl.arange(0, BD)
    m_d = o_d < DH
    b_q = tl.load(q + i_bh.to(tl.int64) * DH + o_d, mask=m_d, other=0).to(tl.float32) * scale
    p_k = k + i_b.to(tl.int64) * s_kb + i_h.to(tl.int64) * s_kh
    p_v = v + i_b.to(tl.int64) * s_vb + i_h.to(tl.int64) * s_vh
    b_m = tl.full([], float("-inf"), tl.float32)
    b_l = tl.zeros([], dtype=tl.float32)
    b_acc = tl.zeros([BD], dtype=tl.float32)
    for j in range(start, end, BN):
        o_n = j + tl.arange(0, BN)
        m_n = o_n < end
        ok = m_n & (tl.load(valid + i_b.to(tl.int64) * L + o_n, mask=m_n, other=0) != 0)
        m_kv = m_n[:, None] & m_d[None, :]
        b_k = tl.load(p_k + o_n[:, None].to(tl.int64) * s_kl + o_d[None, :], mask=m_kv, other=0).to(tl.float32)
        b_s = tl.where(ok, tl.sum(b_k * b_q[None, :], axis=1), float("-inf"))  # [BN] scores
        b_m_new = tl.maximum(b_m, tl.max(b_s, axis=0))
        b_ref = tl.where(b_m_new == float("-inf"), 0.0, b_m_new)  # no valid key yet: exp(-inf) = 0 below
        b_p = tl.exp(b_s - b_ref)
        b_alpha = tl.exp(b_m - b_ref)
        b_v = tl.load(p_v + o_n[:, None].to(tl.int64) * s_vl + o_d[None, :], mask=m_kv, other=0).to(tl.float32)
        b_l = b_l * b_alpha + tl.sum(b_p, axis=0)
        b_acc = b_acc * b_alpha + tl.sum(b_p[:, None] * b_v, axis=0)
        b_m = b_m_new
    i_out = i_bh.to(tl.int64) * S + i_s
    tl.store(m_out + i_out, b_m)
    tl.store(l_out + i_out, b_l)
    tl.store(acc_out + i_out * DH + o_d, b_acc, mask=m_d)


@triton.jit
def _decode_attention_combine_kernel(
    m_in, l_in, acc_in,  # the splits' results
    o,  # [B * H, DH] out
    S,
    DH: tl.constexpr,
    BD: tl.constexpr,
    BS: tl.constexpr,  # next power of two >= S
):
    """One program: the splits of one row and head, rescaled to their common maximum and summed."""
    i_bh = tl.program_id(0).to(tl.int64)
    o_s = tl.arange(0, BS)
    m_s = o_s < S
    o_d = tl.arange(0, BD)
    m_d = o_d < DH
    b_m = tl.load(m_in + i_bh * S + o_s, mask=m_s, other=float("-inf"))
    b_l = tl.load(l_in + i_bh * S + o_s, mask=m_s, other=0)
    b_max = tl.max(b_m, axis=0)  # finite: some split holds a valid key
    b_w = tl.exp(b_m - b_max)  # 0 for the empty splits
    b_acc = tl.load(acc_in + (i_bh * S + o_s[:, None]) * DH + o_d[None, :], mask=m_s[:, None] & m_d[None, :],
                    other=0)
    b_o = tl.sum(b_w[:, None] * b_acc, axis=0) / tl.sum(b_w * b_l, axis=0)
    tl.store(o + i_bh * DH + o_d, b_o.to(o.dtype.element_ty), mask=m_d)


def decode_attention_splits(BH: int, L: int, config: StepConfig = StepConfig()) -> tuple:
    """``(S, SPLIT)``: how many splits of how many keys each for ``BH`` rows x heads over ``L`` positions.

    From shapes alone (a captured step's launch is fixed): enough splits for about
    ``config.attention_programs`` programs, each a whole number of ``config.attention_block``-key blocks.
    """
    BN = config.attention_block
    blocks = triton.cdiv(max(L, 1), BN)
    S = max(1, min(blocks, triton.cdiv(config.attention_programs, max(BH, 1)), 1024))
    SPLIT = triton.cdiv(blocks, S) * BN
    return triton.cdiv(max(L, 1), SPLIT), SPLIT


def _decode_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, length: Tensor) -> Tensor:
    """``o [B, H, Dh]``: ``q`` contiguous, ``k, v [B, H, L, Dh]`` with unit last stride, ``key_valid [B, L]``
    contiguous int8, ``length [1]`` int64."""
    B, H, DH = q.shape
    L = k.shape[2]
    config = plan_for(q.device).step
    S, SPLIT = decode_attention_splits(B * H, L, config)
    f32 = dict(dtype=torch.float32, device=q.device)
    m, lse = torch.empty(B * H, S, **f32), torch.empty(B * H, S, **f32)
    acc = torch.empty(B * H, S, DH, **f32)
    o = torch.empty_like(q)
    BD = triton.next_power_of_2(DH)
    if B * H:
        _decode_attention_split_kernel[(B * H, S)](
            q, k, v, key_valid, length, m, lse, acc, H, L, S, SPLIT, k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2), DH ** -0.5, DH=DH, BD=BD, BN=config.attention_block)
        _decode_attention_combine_kernel[(B * H,)](m, lse, acc, o, S, DH=DH, BD=BD, BS=triton.next_power_of_2(S))
    return o


#: The launcher as an operator (with a fake implementation) for ``torch.compile``; an eager call skips
#: the dispatcher and calls the launcher itself (the operator's dispatch costs more host time than it).
decode_attention_op = torch.library.custom_op("kda_explained::decode_attention", _decode_attention,
                                              mutates_args=())


@decode_attention_op.register_fake
def _(q, k, v, key_valid, length):
    return q.new_empty(q.shape)


def _short_conv_step(x: Tensor, conv_state: Tensor, weight: Tensor) -> Tensor:
    """``y [N, C]``; ``conv_state [N, C, W - 1]`` (any strides) shifted in place. Contiguous ``x``, ``weight [C, W]``."""
    N, C = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    BC = min(triton.next_power_of_2(max(C, 1)), plan_for(x.device).step.conv_block)
    if N and C:
        _short_conv_step_kernel[(N, triton.cdiv(C, BC))](x, conv_state, weight, y, C, *conv_state.stride(), W=W,
                                                         BW=triton.next_power_of_2(W), BC=BC)
    return y


short_conv_step_op = torch.library.custom_op("kda_explained::short_conv_step", _short_conv_step,
                                             mutates_args=("conv_state",))


@short_conv_step_op.register_fake
def _(x, conv_state, weight):
    return x.new_empty(x.shape)


def _gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``y`` of ``x``'s shape and dtype; contiguous ``x``, ``gate [..., K]``, ``weight [K]``."""
    K = x.shape[-1]
    R = x.numel() // K if K else 0
    y = torch.empty_like(x)
    BK = triton.next_power_of_2(max(K, 1))
    BR = max(1, min(16, plan_for(x.device).step.norm_elements // BK))
    if R:
        _gated_rms_norm_kernel[(triton.cdiv(R, BR),)](x, gate, weight, y, R, float(eps), K=K, BK=BK, BR=BR)
    return y


gated_rms_norm_op = torch.library.custom_op("kda_explained::gated_rms_norm", _gated_rms_norm, mutates_args=())


@gated_rms_norm_op.register_fake
def _(x, gate, weight, eps):
    return x.new_empty(x.shape)


def _check_fast(op: str, **tensors) -> None:
    name, first = next(iter(tensors.items()))
    check_fast_device(first, name)
    check_fast_dtypes(**tensors)
    for name, t in tensors.items():
        if torch.is_grad_enabled() and t.requires_grad:
            raise ValueError(f"{name}: {op} is a decoding step with no backward, got a tensor that requires grad "
                             f"(call it under torch.no_grad() or torch.inference_mode())")


def short_conv_step(x: Tensor, conv_state: Tensor, weight: Tensor) -> Tensor:
    """Twin of :func:`kda_explained.chunked.step.short_conv_step`: one token through a causal depthwise
    convolution and SiLU, ``conv_state [N, C, W - 1]`` shifted in place (a strided view of a larger
    cache too); one launch.

    ``x [N, C]``, ``weight [C, W]`` or ``[C, 1, W]``; returns ``[N, C]`` in ``x``'s dtype, computed in float32.
    """
    W = check_short_conv_step(x, conv_state, weight)
    _check_fast("short_conv_step", x=x, conv_state=conv_state, weight=weight)
    run = short_conv_step_op if torch.compiler.is_compiling() else _short_conv_step
    return run(x.contiguous(), conv_state, weight.reshape(-1, W).contiguous())


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Twin of :func:`kda_explained.chunked.step.gated_rms_norm`: ``rms(x) * weight * sigmoid(gate)`` over the
    last dimension, in ``x``'s dtype, computed in float32; one launch."""
    check_gated_rms_norm(x, gate, weight, eps)
    _check_fast("gated_rms_norm", x=x, gate=gate, weight=weight)
    run = gated_rms_norm_op if torch.compiler.is_compiling() else _gated_rms_norm
    return run(x.contiguous(), gate.contiguous(), weight.contiguous(), float(eps))


def decode_attention(q: Tensor, k: Tensor, v: Tensor, key_valid: Tensor, length: Tensor) -> Tensor:
    """Twin of :func:`kda_explained.chunked.step.decode_attention`: one query per row against the first
    ``length`` keys of a KV buffer (``length`` a device tensor), as split-key online softmax in float32.

    Two launches: the splits (programs past ``length`` return at once), then their combination.
    """
    check_decode_attention(q, k, v, key_valid, length)
    _check_fast("decode_attention", q=q, k=k, v=v)
    if k.stride(3) != 1 or v.stride(3) != 1:
        raise ValueError("k, v: expected the head dimension contiguous (last stride 1)")
    run = decode_attention_op if torch.compiler.is_compiling() else _decode_attention
    return run(q.contiguous(), k, v, key_valid.contiguous().view(torch.int8), length.reshape(1).to(torch.int64))
