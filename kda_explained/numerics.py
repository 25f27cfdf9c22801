"""The one place where the edge of the gate domain is decided: how strong a decay can get.

The gate domain is ``g`` in ``[-inf, 0]``. ``g = -inf`` (``alpha = 0``) is a full reset,
and a very negative finite ``g`` is one in effect. The recurrence itself (the naive
layer, the decode kernel) handles both as they come, since ``exp(g)`` is then exactly
0. The chunked algorithms cannot: they work with the cumulative log decay ``G``, and
``-inf - (-inf)`` is NaN, while ``-1e10 + g`` has lost ``g`` to rounding, so every decay
ratio formed after such a gate, ``exp(G_r - G_j)``, would be wrong.

So before the cumulative sum every chunked layer raises each ``g`` to the floor of its
accumulation dtype, :func:`gate_floor`: the largest log decay whose ``exp`` is already
exactly 0 in that dtype. A ratio that spans a floored gate is then ``exp(<= floor) = 0``,
exactly what the true ratio rounds to, and the ratios after it keep the precision of
``|G|`` of a few hundred. No result changes: every ``g`` below the floor gives the
same output in that dtype as the floor itself.

>>> import numpy as np
>>> [round(gate_floor(t), 2) for t in ("float32", "float64")]
[-104.28, -745.44]
>>> bool(np.exp(np.float32(gate_floor("float32"))) == 0), bool(np.exp(gate_floor("float64")) == 0)
(True, True)
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["gate_floor"]


def gate_floor(dtype: Any) -> float:
    """The most negative log decay that still matters in ``dtype`` (a NumPy or torch float dtype, or its name).

    ``log`` of the smallest positive subnormal, minus 1: ``exp`` of anything at or below
    it is at most ``1/e`` of the smallest subnormal, so it rounds to 0 (with room for
    an ``exp`` that is not correctly rounded). float32 (and bf16/fp16, whose chunked
    kernels accumulate ``G`` in float32): ``-104.28``; float64: ``-745.44``.
    """
    name = str(dtype).replace("torch.", "") if "torch" in str(dtype) else np.dtype(dtype).name
    if name in ("bfloat16", "float16", "half"):
        name = "float32"
    tiny = float(np.finfo(np.dtype(name)).smallest_subnormal)
    return math.log(tiny) - 1.0
