"""The causal depthwise short convolution (+ SiLU) in front of q, k and v (report §4, Kimi Linear layer).

Each channel ``c`` of the input gets its own ``W``-tap filter over the last ``W`` tokens::

    y[t, c] = silu( sum_{j=0}^{W-1} weight[c, 0, W-1-j] * x[t-j, c] )

where tokens before the start of a sequence are the *conv state* (the last
``W - 1`` inputs of the previous call of the same sequence) or zeros. The
weight has the layout of ``torch.nn.Conv1d(C, C, W, groups=C, bias=False)``,
``[C, 1, W]``, which is how the released Kimi Linear checkpoints store it.

Glossary
--------
=========  ===============================================================
``C``      channels (``heads * head_dim`` of q, k or v)
``W``      taps of the filter (``conv_size``, 4 in Kimi Linear)
``N``      independent sequences: batch rows, or ``len(cu_seqlens) - 1``
state      ``[N, C, W - 1]``: the last ``W - 1`` inputs of each sequence
=========  ===============================================================
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import check_shape

__all__ = ["ShortConvolution", "causal_conv1d"]


def _packed_window_index(cu_seqlens: torch.Tensor, T: int, W: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """For a packed batch, where each token's ``W``-token window and each sequence's new state come from.

    Sources are indices into ``cat([x (T rows), state (N * (W - 1) rows)])``.
    Returns ``window [T, W]`` (tap ``i`` of token ``t`` reads token ``t - (W - 1) + i``)
    and ``tail [N, W - 1]`` (the last ``W - 1`` inputs of each sequence, state included).
    """
    device = cu_seqlens.device
    N = cu_seqlens.numel() - 1
    seq = torch.searchsorted(cu_seqlens[1:], torch.arange(T, device=device), right=True)  # [T] sequence of token
    bos = cu_seqlens[:-1]  # [N]

    def source(n: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Row holding input ``pos`` (absolute packed position, may precede the sequence's start)."""
        start = bos[n]
        before = pos - start  # < 0: inside the carried state, -1 is its newest entry
        in_state = (W - 1) + before  # column of the state, in [0, W - 2] when before in [-(W-1), -1]
        return torch.where(before >= 0, pos, T + n * (W - 1) + in_state)

    taps = torch.arange(W, device=device) - (W - 1)  # [W]: -(W-1) .. 0
    window = source(seq[:, None], torch.arange(T, device=device)[:, None] + taps[None, :])  # [T, W]
    eos = cu_seqlens[1:]  # [N]
    last = torch.arange(W - 1, device=device) - (W - 1)  # [W - 1]: -(W-1) .. -1
    n = torch.arange(N, device=device)[:, None]
    tail = source(n, eos[:, None] + last[None, :])  # [N, W - 1]
    return window, tail


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    *,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Causal depthwise convolution then SiLU: ``x [B, T, C]`` -> ``y [B, T, C]``.

    Args:
        x: ``[B, T, C]``; with ``cu_seqlens`` a packed batch, ``B == 1``.
        weight: ``[C, 1, W]`` (``nn.Conv1d`` depthwise layout).
        initial_state: ``[N, C, W - 1]``, the inputs before each sequence (zeros if ``None``).
        output_final_state: also return the last ``W - 1`` inputs of each sequence.
        cu_seqlens: ``[N + 1]`` int64 offsets of a packed batch; windows never cross a boundary.

    Returns:
        ``(y [B, T, C], final_state [N, C, W - 1] or None)``, both in ``x``'s dtype.

    >>> import torch
    >>> x = torch.arange(1.0, 6.0).reshape(1, 5, 1)          # one channel: 1 2 3 4 5
    >>> w = torch.tensor([[[0.0, 0.0, 1.0, 1.0]]])             # y_t = silu(x_t + x_{t-1})
    >>> y, s = causal_conv1d(x, w, output_final_state=True)
    >>> torch.allclose(y[0, :, 0], torch.nn.functional.silu(torch.tensor([1.0, 3, 5, 7, 9])))
    True
    >>> s[0, 0].tolist()                                       # the last W - 1 = 3 inputs
    [3.0, 4.0, 5.0]
    """
    B, T, C = x.shape
    W = weight.shape[-1]
    check_shape("weight", weight, (C, 1, W), "C, 1, W", "to match x's channels")
    N = B if cu_seqlens is None else cu_seqlens.numel() - 1
    if initial_state is not None:
        check_shape("initial_state", initial_state, (N, C, W - 1), "N, C, W - 1")
        initial_state = initial_state.to(x.dtype)

    if cu_seqlens is None:
        # a plain batch: prepend the state (or zeros) and run nn.Conv1d's depthwise kernel
        pad = initial_state if initial_state is not None else x.new_zeros(B, C, W - 1)
        xt = torch.cat([pad, x.transpose(1, 2)], dim=2)  # [B, C, W - 1 + T]
        y = F.conv1d(xt, weight.to(x.dtype), groups=C).transpose(1, 2) if T else x  # [B, T, C]
        final = xt[:, :, xt.shape[2] - (W - 1):] if output_final_state else None  # [B, C, W - 1]
        return F.silu(y), (final.contiguous() if final is not None else None)

    # a packed batch: gather each token's window from its own sequence (or its carried state)
    state = initial_state if initial_state is not None else x.new_zeros(N, C, W - 1)
    rows = torch.cat([x[0], state.transpose(1, 2).reshape(N * (W - 1), C)])  # [T + N (W - 1), C]
    window, tail = _packed_window_index(cu_seqlens, T, W)
    y = torch.einsum("twc,cw->tc", rows[window], weight[:, 0, :].to(x.dtype))  # [T, C]
    final = rows[tail].transpose(1, 2).contiguous() if output_final_state else None  # [N, C, W - 1]
    return F.silu(y)[None], final


class ShortConvolution(nn.Module):
    """Holds the ``weight [C, 1, W]`` of a causal depthwise convolution; ``forward`` is :func:`causal_conv1d`."""

    def __init__(self, channels: int, conv_size: int = 4):
        super().__init__()
        self.channels = channels
        self.conv_size = conv_size
        self.weight = nn.Parameter(torch.empty(channels, 1, conv_size))
        # nn.Conv1d's default initialisation (kaiming-uniform with a = sqrt(5): bound 1 / sqrt(fan_in))
        nn.init.uniform_(self.weight, -1 / math.sqrt(conv_size), 1 / math.sqrt(conv_size))

    def extra_repr(self) -> str:
        return f"{self.channels}, conv_size={self.conv_size}"

    def forward(self, x, *, initial_state=None, output_final_state=False, cu_seqlens=None):
        """:func:`causal_conv1d` with this module's weight."""
        return causal_conv1d(x, self.weight, initial_state=initial_state, output_final_state=output_final_state,
                             cu_seqlens=cu_seqlens)
