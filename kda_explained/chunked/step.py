"""One decoding step's elementwise work around the recurrence, in PyTorch.

A KDA layer decoding one token per sequence does, besides its projections and the recurrence
itself (:func:`~kda_explained.chunked.recurrent.recurrent_kda`), two pieces of per-token work:

- :func:`short_conv_step`: the new input through each causal short convolution and SiLU, with
  the convolution's carried window shifted by one token, in place;
- :func:`gated_rms_norm`: the head-wise RMSNorm of the output times its sigmoid gate.

These are the references of the fused kernels of the same names in :mod:`kda_explained.fast`
(same arguments, same results within the float32 bound). Both write nothing but what they are
asked to and allocate only their outputs, so a captured decoding step can replay them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..validation import check_floating, format_shape

__all__ = ["short_conv_step", "gated_rms_norm", "check_short_conv_step", "check_gated_rms_norm"]


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
