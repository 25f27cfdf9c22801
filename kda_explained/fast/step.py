"""One decoding step's elementwise work around the recurrence, as Triton kernels.

The twins of :mod:`kda_explained.chunked.step` (same names, same arguments): each is one launch
where PyTorch takes several (a concatenation, a product, a sum, a SiLU and a copy for the
convolution; a power, a mean, a square root and three products for the norm). With the
recurrence kernel, which already takes the gate, the L2 norm and the beta sigmoid in, a KDA
layer's decoding step is its projections plus five launches: three convolutions, the recurrence
and the norm.

Both are ``torch.library`` operators (``kda_explained::short_conv_step``, which declares the
convolution's carried window as the argument it mutates, and ``kda_explained::gated_rms_norm``),
so that ``torch.compile`` keeps each as one node and a CUDA graph replays them as they are.
They have no backward: decoding needs none.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from ..chunked.step import check_gated_rms_norm, check_short_conv_step

__all__ = ["short_conv_step", "gated_rms_norm"]

_FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


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


@torch.library.custom_op("kda_explained::short_conv_step", mutates_args=("conv_state",))
def short_conv_step_op(x: Tensor, conv_state: Tensor, weight: Tensor) -> Tensor:
    """``y [N, C]``; ``conv_state [N, C, W - 1]`` (any strides) shifted in place. Contiguous ``x``, ``weight [C, W]``."""
    N, C = x.shape
    W = weight.shape[1]
    y = torch.empty_like(x)
    BC = min(triton.next_power_of_2(max(C, 1)), 256)
    if N and C:
        _short_conv_step_kernel[(N, triton.cdiv(C, BC))](x, conv_state, weight, y, C, *conv_state.stride(), W=W,
                                                         BW=triton.next_power_of_2(W), BC=BC)
    return y


@short_conv_step_op.register_fake
def _(x, conv_state, weight):
    return x.new_empty(x.shape)


@torch.library.custom_op("kda_explained::gated_rms_norm", mutates_args=())
def gated_rms_norm_op(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """``y`` of ``x``'s shape and dtype; contiguous ``x``, ``gate [..., K]``, ``weight [K]``."""
    K = x.shape[-1]
    R = x.numel() // K if K else 0
    y = torch.empty_like(x)
    BK = triton.next_power_of_2(max(K, 1))
    BR = max(1, min(16, 4096 // BK))
    if R:
        _gated_rms_norm_kernel[(triton.cdiv(R, BR),)](x, gate, weight, y, R, float(eps), K=K, BK=BK, BR=BR)
    return y


@gated_rms_norm_op.register_fake
def _(x, gate, weight, eps):
    return x.new_empty(x.shape)


def _check_fast(op: str, **tensors) -> None:
    for name, t in tensors.items():
        if t.dtype not in _FAST_DTYPES:
            raise TypeError(f"{name}: expected float32, bfloat16 or float16 for the fast layer, got {t.dtype}")
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
    return short_conv_step_op(x.contiguous(), conv_state, weight.reshape(-1, W).contiguous())


def gated_rms_norm(x: Tensor, gate: Tensor, weight: Tensor, eps: float) -> Tensor:
    """Twin of :func:`kda_explained.chunked.step.gated_rms_norm`: ``rms(x) * weight * sigmoid(gate)`` over the
    last dimension, in ``x``'s dtype, computed in float32; one launch."""
    check_gated_rms_norm(x, gate, weight, eps)
    _check_fast("gated_rms_norm", x=x, gate=gate, weight=weight)
    return gated_rms_norm_op(x.contiguous(), gate.contiguous(), weight.contiguous(), float(eps))
