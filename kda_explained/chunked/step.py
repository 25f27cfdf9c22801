"""One decoding step's elementwise work around the recurrence, in PyTorch.

A KDA layer decoding one token per sequence does, besides its projections and the recurrence
itself (:func:`~kda_explained.chunked.recurrent.recurrent_kda`), two pieces of per-token work:

- :func:`short_conv_step`: the new input through each causal short convolution and SiLU, with
  the convolution's carried window shifted by one token, in place;
- :func:`gated_rms_norm`: the head-wise RMSNorm of the output times its sigmoid gate.

and an attention layer of a hybrid, decoding on a preallocated KV buffer, does one:

- :func:`decode_attention`: one query per row against the first ``length`` keys of the buffer,
  where ``length`` is a device tensor (a captured step cannot read it on the host).

These are the references of the fused kernels of the same names in :mod:`kda_explained.fast`
(same arguments, same results within the float32 bound). Both write nothing but what they are
asked to and allocate only their outputs, so a captured decoding step can replay them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_floating, format_shape

__all__ = ["short_conv_step", "gated_rms_norm", "decode_attention", "check_short_conv_step", "check_gated_rms_norm",
           "check_decode_attention"]


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_short_conv_step(x, conv_state, weight) -> int:
    """Raise unless ``x [N, C]``, ``conv_state [N, C, W - 1]``, ``weight [C, W]`` (or ``[C, 1, W]``) fit; return ``W``."""
    for name, t in (("x", x), ("conv_state", conv_state), ("weight", weight)):
        check_floating(name, t)
    if x.dim() != 2:
        raise ValueError(f"x: expected shape [N, C] (one token per sequence), got {format_shape(x.shape)}")
    N, C = x.shape
    if weight.dim() not in (2, 3) or weight.shape[0] != C or (weight.dim() == 3 and weight.shape[1] != 1):
        raise ValueError(f"weight: expected shape [C, W] or [C, 1, W] with C = {C} (x's channels), "
                         f"got {format_shape(weight.shape)}")
    W = weight.shape[-1]
    if W < 2:
        raise ValueError(f"weight: expected W >= 2 taps, got {W}")
    if tuple(conv_state.shape) != (N, C, W - 1):
        raise ValueError(f"conv_state: expected shape [N, C, W - 1] = {format_shape((N, C, W - 1))}, "
                         f"got {format_shape(conv_state.shape)}")
    if conv_state.device != x.device or weight.device != x.device:
        raise ValueError(f"conv_state, weight: expected tensors on x's device {x.device}, "
                         f"got {conv_state.device} and {weight.device}")
    return W


def short_conv_step(x: torch.Tensor, conv_state: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """One token through a causal depthwise convolution and SiLU; the carried window moves on in place.

    Args:
        x: ``[N, C]``, this step's input of each sequence.
        conv_state: ``[N, C, W - 1]``, the previous ``W - 1`` inputs, oldest first; overwritten
            with the last ``W - 1`` inputs including ``x``.
        weight: ``[C, W]`` (or ``nn.Conv1d``'s depthwise ``[C, 1, W]``); tap ``W - 1`` meets ``x``.

    Returns:
        ``silu(sum_j window[:, :, j] * weight[:, j])`` as ``[N, C]`` in ``x``'s dtype, computed in
        float32 (float64 for float64 input) and rounded once.

    >>> import torch
    >>> state = torch.tensor([[[1.0, 2.0, 3.0]]])             # one channel, inputs 1 2 3 so far
    >>> w = torch.tensor([[0.0, 0.0, 1.0, 1.0]])              # y_t = silu(x_t + x_{t-1})
    >>> y = short_conv_step(torch.tensor([[4.0]]), state, w)
    >>> bool(torch.allclose(y, torch.nn.functional.silu(torch.tensor([[7.0]])))), state[0, 0].tolist()
    (True, [2.0, 3.0, 4.0])
    """
    W = check_short_conv_step(x, conv_state, weight)
    dt = _compute_dtype(x)
    window = torch.cat([conv_state.to(dt), x.to(dt)[:, :, None]], 2)  # [N, C, W]
    y = F.silu((window * weight.reshape(-1, W).to(dt)).sum(-1))  # [N, C]
    conv_state.copy_(window[:, :, 1:])
    return y.to(x.dtype)


def check_gated_rms_norm(x, gate, weight, eps) -> None:
    """Raise unless ``x, gate [..., K]`` match and ``weight`` is ``[K]``, ``eps`` a number ``>= 0``."""
    for name, t in (("x", x), ("gate", gate), ("weight", weight)):
        check_floating(name, t)
    if x.dim() < 1 or tuple(gate.shape) != tuple(x.shape):
        raise ValueError(f"gate: expected x's shape {format_shape(x.shape)}, got {format_shape(gate.shape)}")
    if tuple(weight.shape) != (x.shape[-1],):
        raise ValueError(f"weight: expected shape [K] = [{x.shape[-1]}] (x's last dimension), "
                         f"got {format_shape(weight.shape)}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps >= 0:
        raise ValueError(f"eps: expected a number >= 0, got {eps!r}")


def gated_rms_norm(x: torch.Tensor, gate: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``x * rsqrt(mean(x^2) + eps) * weight * sigmoid(gate)`` over the last dimension, in ``x``'s dtype.

    ``x, gate [..., K]``, ``weight [K]``; computed in float32 (float64 for float64 input). The output
    norm of a KDA layer (Kimi Linear's ``FusedRMSNormGated`` with a sigmoid gate), per head.

    >>> import torch
    >>> y = gated_rms_norm(torch.tensor([[2.0, -2.0]]), torch.zeros(1, 2), torch.ones(2), 0.0)
    >>> y.tolist()                                            # rms = 2, sigmoid(0) = 1/2
    [[0.5, -0.5]]
    """
    check_gated_rms_norm(x, gate, weight, eps)
    dt = _compute_dtype(x)
    xf = x.to(dt)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.to(dt) * torch.sigmoid(gate.to(dt))).to(x.dtype)


def check_decode_attention(q, k, v, key_valid, length) -> None:
    """Raise unless ``q [B, H, Dh]``, ``k, v [B, H, L, Dh]``, ``key_valid [B, L]`` bool, ``length [1]`` integer fit."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(name, t)
    if q.dim() != 3:
        raise ValueError(f"q: expected shape [B, H, Dh] (one query per row), got {format_shape(q.shape)}")
    B, H, Dh = q.shape
    if k.dim() != 4 or tuple(k.shape[:2]) != (B, H) or k.shape[3] != Dh:
        raise ValueError(f"k: expected shape [B, H, L, Dh] with [B, H, Dh] = {format_shape((B, H, Dh))}, "
                         f"got {format_shape(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v: expected k's shape {format_shape(k.shape)}, got {format_shape(v.shape)}")
    if not isinstance(key_valid, torch.Tensor) or key_valid.dtype != torch.bool \
            or tuple(key_valid.shape) != (B, k.shape[2]):
        got = format_shape(key_valid.shape) if isinstance(key_valid, torch.Tensor) else type(key_valid).__name__
        raise ValueError(f"key_valid: expected a bool tensor [B, L] = {format_shape((B, k.shape[2]))}, got {got}")
    if not isinstance(length, torch.Tensor) or length.dtype.is_floating_point or length.numel() != 1:
        raise TypeError(f"length: expected a one-element integer tensor (on the device), got {length!r}")
    for name, t in (("k", k), ("v", v), ("key_valid", key_valid), ("length", length)):
        if t.device != q.device:
            raise ValueError(f"{name}: expected a tensor on q's device {q.device}, got {t.device}")


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                     length: torch.Tensor) -> torch.Tensor:
    """Softmax attention of one query per row over the first ``length`` keys of a KV buffer.

    Args:
        q: ``[B, H, Dh]``, this step's query of each row and head.
        k, v: ``[B, H, L, Dh]``, the buffers; positions ``>= length`` are masked out (here they must
            hold finite values, as a buffer made of zeros does; the fast twin never reads them).
        key_valid: ``[B, L]`` bool, ``False`` at a row's padding.
        length: ``[1]`` integer tensor, the filled positions; a device tensor, so that the step
            that calls this can be captured and replayed as the buffer fills.

    Returns:
        ``softmax(q k^T / sqrt(Dh)) v`` over the valid keys, ``[B, H, Dh]`` in ``q``'s dtype (each row
        needs one valid key among the first ``length``).

    >>> import torch
    >>> q, k = torch.zeros(1, 1, 2), torch.zeros(1, 1, 4, 2)
    >>> v = torch.arange(8.0).reshape(1, 1, 4, 2)             # values 0 1 | 2 3 | 4 5 | 6 7
    >>> valid = torch.ones(1, 4, dtype=torch.bool)
    >>> decode_attention(q, k, v, valid, torch.tensor([2])).tolist()   # the mean of the first two
    [[[1.0, 2.0]]]
    """
    check_decode_attention(q, k, v, key_valid, length)
    L = k.shape[2]
    allowed = key_valid & (torch.arange(L, device=q.device) < length.reshape(1))[None, :]  # [B, L]
    o = F.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=allowed[:, None, None, :])  # [B, H, 1, Dh]
    return o[:, :, 0]
