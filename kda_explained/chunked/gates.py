"""The elementwise pieces around the recurrence, in PyTorch (references for the fast layer's in-kernel options).

Same formulas and argument shapes as the gates of :mod:`kda_explained.naive`; differentiable,
any device, computed in float32 (float64 for float64 input).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_floating, check_gate_params

__all__ = ["kda_gate", "lowerbound_gate", "l2norm", "beta_sigmoid"]


def _gate_params(x: torch.Tensor, A_log: Optional[torch.Tensor], dt_bias: Optional[torch.Tensor]) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``rate [HV, 1]`` and ``bias [HV, K]`` for ``x [..., HV, K]``, in the compute dtype."""
    check_floating("x", x)
    if x.dim() < 2:
        raise ValueError(f"x: expected shape [..., HV, K], got {list(x.shape)}")
    HV, K = x.shape[-2:]
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    check_gate_params(HV, K, A_log, dt_bias)  # A_log [HV] (or [1, 1, HV, 1]); dt_bias [HV * K] or [HV, K]
    rate = x.new_ones(HV, 1, dtype=dt) if A_log is None else torch.exp(A_log.to(dt).reshape(HV, 1))
    bias = x.new_zeros(HV, K, dtype=dt) if dt_bias is None else dt_bias.to(dt).reshape(HV, K)
    return rate, bias


def kda_gate(x: torch.Tensor, A_log: torch.Tensor, dt_bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``g = -exp(A_log[h]) * softplus(x + dt_bias[h, :])``: ``x [..., HV, K]`` -> ``g [..., HV, K]``.

    >>> import torch
    >>> g = kda_gate(torch.zeros(3, 2, 4), A_log=torch.zeros(2))
    >>> bool(torch.allclose(g, torch.full((3, 2, 4), -0.6931472)))
    True
    """
    rate, bias = _gate_params(x, A_log, dt_bias)
    # softplus(z) = log(1 + exp(z)) = logaddexp(z, 0): exact for large z too (F.softplus
    # switches to the identity above z = 20, which is off by exp(-20) ~ 2e-9)
    z = x.to(bias.dtype) + bias
    return -rate * torch.logaddexp(z, torch.zeros_like(z))


def lowerbound_gate(
    x: torch.Tensor,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    lower_bound: float = -5.0,
) -> torch.Tensor:
    """``g = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias[h, :]))`` in ``(lower_bound, 0)``."""
    if not (lower_bound < 0 and torch.isfinite(torch.tensor(float(lower_bound)))):
        raise ValueError(f"lower_bound: expected a finite negative number, got {lower_bound}")
    rate, bias = _gate_params(x, A_log, dt_bias)
    return lower_bound * torch.sigmoid(rate * (x.to(bias.dtype) + bias))


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / sqrt(sum(x ** 2) + eps)`` over the last axis, computed in float32 (float64 stays), returned in ``x``'s dtype."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(dt)
    return (xf * torch.rsqrt((xf * xf).sum(-1, keepdim=True) + eps)).to(x.dtype)


def beta_sigmoid(x: torch.Tensor) -> torch.Tensor:
    """``beta = sigmoid(x)``, in ``x``'s dtype."""
    return torch.sigmoid(x)
