"""The one tolerance table and the one error measure (the design contract (docs/design.md), *Numerics*).

Every comparison between layers, in tests, the demo, notebooks and benchmarks,
uses :func:`rel_rms_error` against a float64 reference and a bound from
:data:`TOLERANCES`. Nothing loosens these bounds at run time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["TOLERANCES", "rel_rms_error", "g_grad_floor", "to_numpy64"]

#: Relative RMS error bounds ``||a - b|| / ||b||`` against a float64 reference.
TOLERANCES = {
    "chunked_f64_vs_naive": 1e-10,
    "chunked_f32_vs_naive": 1e-5,
    "fast_f32_vs_f64": 1e-4,
    "fast_tf32_vs_f64": 1e-3,
    "fast_bf16_output": 5e-3,
    "fast_bf16_grad": 1e-2,
}


def to_numpy64(x: Any) -> np.ndarray:
    """A NumPy float64 copy of an array or tensor (any device, any float dtype)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().to("cpu")
        if not x.dtype.is_floating_point or x.dtype != x.double().dtype:
            x = x.double()
        return x.numpy()
    return np.asarray(x, dtype=np.float64)


def rel_rms_error(a: Any, b: Any, floor: float = 0.0) -> float:
    """``||a - b|| / max(||b||, floor)`` in float64, with ``b`` the reference.

    NaN or inf anywhere in ``a`` gives ``inf``, so such a result never passes a bound.
    If the reference and ``floor`` are both zero, the absolute norm ``||a||`` is returned.
    ``floor`` is for a result that is a difference of larger terms (the ``g`` gradient:
    :func:`g_grad_floor`), whose error is set by those terms, not by the difference.

    >>> rel_rms_error([1.0, 2.0], [1.0, 2.0])
    0.0
    >>> round(rel_rms_error([1.0, 0.0], [0.0, 1.0]), 6)
    1.414214
    """
    a, b = to_numpy64(a), to_numpy64(b)
    if a.shape != b.shape:
        raise ValueError(f"a: expected the reference's shape {list(b.shape)}, got {list(a.shape)}")
    if not np.all(np.isfinite(a)):
        return float("inf")
    den = max(float(np.linalg.norm(b)), float(floor))
    num = float(np.linalg.norm(a - b))
    return num / den if den > 0 else num


def g_grad_floor(q: Any, dq: Any, k: Any, dk: Any) -> float:
    """``||q * dq|| + ||k * dk||``: the scale of the terms the ``g`` gradient is a difference of.

    A chunked backward forms ``dg`` by a reverse in-chunk sum of ``q * dq - k * dk`` (plus the
    state's terms), products the size of the other gradients. Under strong decay they cancel
    to far below their own rounding (at ``g = -20`` per token the true ``dg`` is ``1e-8`` of
    them), so ``dg`` is held to its bound relative to ``max(||dg||, g_grad_floor(...))``:
    relative where ``dg`` is of the size of its terms, absolute at that scale where it is not.
    Pass the reference's ``q``, ``k`` and their gradients.
    """
    q, dq, k, dk = (to_numpy64(x) for x in (q, dq, k, dk))
    return float(np.linalg.norm(q * dq) + np.linalg.norm(k * dk))
