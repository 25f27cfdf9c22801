"""The elementwise pieces around the recurrence, in NumPy float64.

Glossary
--------
=================  ==========================================================
``x``              gate pre-activation, ``[..., HV, K]``
``A_log``          per-head log rate, ``[HV]``; the rate is ``exp(A_log)``
``dt_bias``        per-channel bias, ``[HV * K]`` or ``[HV, K]``
``g``              log decay ``log(alpha) <= 0``, the output of a gate
``lower_bound``    the most negative log decay a lower-bound gate can give
=================  ==========================================================

The two gate formulas are those of the design contract (docs/design.md), *Gates*::

    kda_gate(x)        = -exp(A_log[h]) * softplus(x + dt_bias[h, :])          in (-inf, 0]
    lowerbound_gate(x) = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias[h, :]))  in (lower_bound, 0)

The lower-bound form keeps every per-token decay ``alpha = exp(g) >= exp(lower_bound)``,
which bounds the cumulative decay inside a chunk (``lower_bound = -5`` over 64
tokens gives at worst ``exp(-320)``): the chunked layer relies on decay *ratios*
and never divides by it, but the bound is what lets a kernel keep them in range.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..validation import check_floating, check_gate_params

__all__ = ["kda_gate", "lowerbound_gate", "l2norm", "beta_sigmoid", "softplus", "sigmoid"]


def softplus(x: np.ndarray) -> np.ndarray:
    """``log(1 + exp(x))`` without overflow for large ``x``."""
    return np.logaddexp(0.0, x)


def sigmoid(x: np.ndarray) -> np.ndarray:
    """``1 / (1 + exp(-x))`` without overflow for very negative ``x``."""
    return np.exp(-np.logaddexp(0.0, -x))


def _gate_params(
    x: np.ndarray, A_log: Optional[np.ndarray], dt_bias: Optional[np.ndarray]
) -> Tuple[np.ndarray, np.ndarray]:
    """Return ``rate [HV, 1]`` and ``bias [HV, K]`` broadcastable against ``x [..., HV, K]``."""
    check_floating("x", x)
    if x.ndim < 2:
        raise ValueError(f"x: expected shape [..., HV, K], got {list(x.shape)}")
    HV, K = x.shape[-2:]
    A_log = None if A_log is None else np.asarray(A_log, dtype=np.float64)
    dt_bias = None if dt_bias is None else np.asarray(dt_bias, dtype=np.float64)
    check_gate_params(HV, K, A_log, dt_bias)  # A_log [HV] (or [1, 1, HV, 1]); dt_bias [HV * K] or [HV, K]
    rate = np.ones((HV, 1)) if A_log is None else np.exp(A_log).reshape(HV, 1)
    bias = np.zeros((HV, K)) if dt_bias is None else dt_bias.reshape(HV, K)
    return rate, bias


def kda_gate(x: np.ndarray, A_log: np.ndarray, dt_bias: Optional[np.ndarray] = None) -> np.ndarray:
    """KDA's softplus gate: ``g = -exp(A_log[h]) * softplus(x + dt_bias[h, :])``.

    ``x: [..., HV, K]`` -> ``g: [..., HV, K]`` (float64), every entry ``<= 0``.

    >>> import numpy as np
    >>> g = kda_gate(np.zeros((3, 2, 4)), A_log=np.log(np.array([1.0, 2.0])))
    >>> np.allclose(g[:, 0], -np.log(2)), np.allclose(g[:, 1], -2 * np.log(2))
    (True, True)
    """
    x = np.asarray(x)
    rate, bias = _gate_params(x, A_log, dt_bias)
    return -rate * softplus(x.astype(np.float64) + bias)


def lowerbound_gate(
    x: np.ndarray,
    A_log: Optional[np.ndarray] = None,
    dt_bias: Optional[np.ndarray] = None,
    lower_bound: float = -5.0,
) -> np.ndarray:
    """The lower-bound gate: ``g = lower_bound * sigmoid(exp(A_log[h]) * (x + dt_bias[h, :]))``.

    ``x: [..., HV, K]`` -> ``g: [..., HV, K]`` (float64) in ``(lower_bound, 0)``.

    >>> import numpy as np
    >>> g = lowerbound_gate(np.array([[[-50.0, 0.0, 50.0]]]), lower_bound=-5.0)
    >>> np.round(g, 6).tolist()
    [[[-0.0, -2.5, -5.0]]]
    """
    x = np.asarray(x)
    if not np.isfinite(lower_bound) or lower_bound >= 0:
        raise ValueError(f"lower_bound: expected a finite negative number, got {lower_bound}")
    rate, bias = _gate_params(x, A_log, dt_bias)
    return lower_bound * sigmoid(rate * (x.astype(np.float64) + bias))


def l2norm(x: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    """Normalise the last axis: ``x / sqrt(sum(x ** 2) + eps)`` (the form the kernels use).

    >>> import numpy as np
    >>> np.round(l2norm(np.array([3.0, 4.0]), eps=0.0), 6).tolist()
    [0.6, 0.8]
    """
    x = np.asarray(x, dtype=np.float64)
    return x / np.sqrt(np.sum(x * x, axis=-1, keepdims=True) + eps)


def beta_sigmoid(x: np.ndarray) -> np.ndarray:
    """``beta = sigmoid(x)``: the write strength in ``(0, 1)`` from a logit."""
    return sigmoid(np.asarray(x, dtype=np.float64))
