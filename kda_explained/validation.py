"""Input checks shared by every layer (naive, chunked, fast).

One module, one error style (*Errors* in the design contract (docs/design.md)): a malformed call raises
:class:`ValueError` (or :class:`TypeError` for a wrong type) whose message names
the argument, says what was expected and what was given, e.g.::

    k: expected shape [B, T, H, K] = [2, 128, 4, 64] to match q, got [2, 128, 4, 32]

The checks read only ``.shape``, ``.dtype`` and (for ``cu_seqlens``) the values,
so they serve NumPy arrays and ``torch.Tensor`` alike without importing torch:
the naive layer stays NumPy-only.

Glossary (the design contract (docs/design.md), *Shared signature*)
-------------------------------------------------------------------
=========  =================================================================
``B``      batch size (1 with ``cu_seqlens``)
``T``      tokens per batch row (the packed length with ``cu_seqlens``)
``H``      query/key heads
``HV``     value heads, a multiple of ``H`` (grouped value heads, GVA)
``K``      key (and state row) width
``V``      value (and state column) width
``N``      independent sequences: ``B``, or ``len(cu_seqlens) - 1``
=========  =================================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import numpy as np

__all__ = [
    "KDAProblem",
    "check_kda_inputs",
    "check_chunk_size",
    "check_gate_params",
    "check_floating",
    "check_shape",
    "check_g_domain",
    "cu_seqlens_values",
    "format_shape",
]


def format_shape(shape: Sequence[int]) -> str:
    """``(2, 3)`` -> ``'[2, 3]'``: shapes in messages read the same for NumPy and torch."""
    return "[" + ", ".join(str(int(d)) for d in shape) + "]"


def _dtype_name(x: Any) -> str:
    return str(getattr(x, "dtype", type(x).__name__)).replace("torch.", "")


def _is_floating(x: Any) -> bool:
    """True for floating NumPy arrays and floating torch tensors (bf16 and fp16 included)."""
    dtype = x.dtype
    if hasattr(dtype, "is_floating_point"):  # torch.dtype
        return bool(dtype.is_floating_point)
    return bool(np.issubdtype(np.dtype(dtype), np.floating))


def check_floating(name: str, x: Any) -> None:
    """Raise :class:`TypeError` unless ``x`` is an array or tensor of a floating dtype."""
    if not (hasattr(x, "shape") and hasattr(x, "dtype")):
        raise TypeError(f"{name}: expected an array or tensor, got {type(x).__name__}")
    if not _is_floating(x):
        raise TypeError(f"{name}: expected a floating-point dtype, got {_dtype_name(x)}")


def check_shape(name: str, x: Any, expected: Sequence[int], labels: str, why: str = "") -> None:
    """Raise :class:`ValueError` unless ``tuple(x.shape) == tuple(expected)``.

    ``labels`` names the dimensions (``"B, T, H, K"``) so the message says which is off.
    """
    got = tuple(int(d) for d in x.shape)
    want = tuple(int(d) for d in expected)
    if got != want:
        suffix = f" {why}" if why else ""
        raise ValueError(
            f"{name}: expected shape [{labels}] = {format_shape(want)}{suffix}, got {format_shape(got)}"
        )


def check_chunk_size(chunk_size: Any, allowed: Optional[Sequence[int]] = None) -> int:
    """Return ``chunk_size`` as an int; raise unless it is a power of two (and in ``allowed``)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"chunk_size: expected an int, got {type(chunk_size).__name__}")
    c = int(chunk_size)
    if c < 1 or (c & (c - 1)) != 0:
        raise ValueError(f"chunk_size: expected a power of two, got {c}")
    if allowed is not None and c not in allowed:
        raise ValueError(f"chunk_size: expected one of {list(allowed)}, got {c}")
    return c


@dataclass(frozen=True)
class KDAProblem:
    """The sizes of a validated ``kda(...)`` call.

    ``spans`` lists the independent sequences as ``(b, bos, eos)``: batch row
    ``b``, tokens ``bos:eos``. Sequence ``n`` owns row ``n`` of the initial and
    final state.
    """

    B: int
    T: int
    H: int
    HV: int
    K: int
    V: int
    N: int
    scale: float
    spans: Tuple[Tuple[int, int, int], ...]

    @property
    def group(self) -> int:
        """Value heads per query/key head; value head ``j`` reads q/k head ``j // group``."""
        return self.HV // self.H


def _check_rank(name: str, x: Any, rank: int, labels: str) -> None:
    if len(x.shape) != rank:
        raise ValueError(
            f"{name}: expected a {rank}-D array [{labels}], got {len(x.shape)}-D shape {format_shape(x.shape)}"
        )


def cu_seqlens_values(cu_seqlens: Any) -> np.ndarray:
    """The offsets of a packed batch as an int64 NumPy array, read once and checked for type and rank.

    Accepts a 1-D integer array or tensor (any device: a GPU tensor is read back) or a
    list / tuple of ints; floats are refused, never truncated. The values themselves
    (start, order, end) are checked by :func:`check_kda_inputs`.

    >>> cu_seqlens_values([0, 3, 7]).tolist()
    [0, 3, 7]
    >>> cu_seqlens_values([0, 7.9, 10])
    Traceback (most recent call last):
    ...
    TypeError: cu_seqlens: expected integer offsets, got 7.9 (float) at position 1
    """
    if not (hasattr(cu_seqlens, "shape") and hasattr(cu_seqlens, "dtype")):
        if not isinstance(cu_seqlens, (list, tuple)):
            raise TypeError(f"cu_seqlens: expected a 1-D integer array or tensor, got {type(cu_seqlens).__name__}")
        for i, x in enumerate(cu_seqlens):
            if isinstance(x, bool) or not isinstance(x, (int, np.integer)):
                raise TypeError(f"cu_seqlens: expected integer offsets, got {x!r} ({type(x).__name__}) at position {i}")
        cu_seqlens = np.asarray(cu_seqlens, dtype=np.int64).reshape(-1)
    if _is_floating(cu_seqlens) or "bool" in _dtype_name(cu_seqlens) or "complex" in _dtype_name(cu_seqlens):
        raise TypeError(f"cu_seqlens: expected an integer dtype, got {_dtype_name(cu_seqlens)}")
    if len(cu_seqlens.shape) != 1:
        raise ValueError(
            f"cu_seqlens: expected a 1-D array [N + 1], got shape {format_shape(cu_seqlens.shape)}"
        )
    values = np.asarray(cu_seqlens.tolist(), dtype=np.int64)
    if values.shape[0] < 2:
        raise ValueError(f"cu_seqlens: expected at least 2 entries [0, ..., T], got {values.tolist()}")
    return values


def check_g_domain(g: Any, *, device_check: bool = False) -> None:
    """Raise :class:`ValueError` naming ``g`` unless every log decay is in the domain ``[-inf, 0]``.

    ``g > 0`` (a "decay" that amplifies) and NaN are outside the contract. The check reads
    every value, so it runs where that is free: NumPy arrays and CPU tensors. A GPU tensor
    is checked only with ``device_check=True`` (the fast layer's opt-in), since reading
    the answer back waits for the GPU.

    >>> import numpy as np
    >>> check_g_domain(np.array([0.0, -1.0, -np.inf]))
    >>> check_g_domain(np.array([[-1.0, 0.5]]))
    Traceback (most recent call last):
    ...
    ValueError: g: expected log decays in [-inf, 0] (alpha = exp(g) in [0, 1]), got 1 value(s) > 0 or NaN, the largest 0.5
    """
    if g is None:
        return
    if hasattr(g, "detach"):  # torch.Tensor, without importing torch here
        if g.device.type != "cpu" and not device_check:
            return
        bad = ~(g <= 0)  # NaN compares false
        count = int(bad.sum())
        worst = float(g[bad].float().max()) if count else 0.0  # NaN if any is NaN
    else:
        g = np.asarray(g)
        bad = ~(g <= 0)
        count = int(bad.sum())
        worst = float(np.max(g[bad])) if count else 0.0
    if count:
        raise ValueError(
            f"g: expected log decays in [-inf, 0] (alpha = exp(g) in [0, 1]), got {count} value(s) > 0 or NaN, "
            f"the largest {worst:g}"
        )


def check_kda_inputs(
    q: Any,
    k: Any,
    v: Any,
    g: Any,
    beta: Any,
    *,
    scale: Optional[float] = None,
    initial_state: Any = None,
    cu_seqlens: Any = None,
) -> KDAProblem:
    """Check a ``kda(...)`` call against the design contract (docs/design.md) and return its sizes.

    Shapes: ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``g: [B, T, HV, K]``,
    ``beta: [B, T, HV]``, ``initial_state: [N, HV, K, V]``, ``cu_seqlens: [N + 1]``.
    ``g`` and ``beta`` may be ``None`` for the members of the ladder that have no
    such input (linear attention has neither); those callers check their own.

    >>> import numpy as np
    >>> q = k = np.zeros((1, 5, 2, 4)); v = np.zeros((1, 5, 4, 3))
    >>> g = np.zeros((1, 5, 4, 4)); beta = np.zeros((1, 5, 4))
    >>> p = check_kda_inputs(q, k, v, g, beta, cu_seqlens=np.array([0, 2, 5]))
    >>> (p.N, p.HV, p.group, p.spans)
    (2, 4, 2, ((0, 0, 2), (0, 2, 5)))
    >>> check_kda_inputs(q, k[..., :3], v, g, beta)
    Traceback (most recent call last):
    ...
    ValueError: k: expected shape [B, T, H, K] = [1, 5, 2, 4] to match q, got [1, 5, 2, 3]
    """
    for name, x in (("q", q), ("k", k), ("v", v), ("g", g), ("beta", beta)):
        if x is not None or name in ("q", "k", "v"):
            check_floating(name, x)
    _check_rank("q", q, 4, "B, T, H, K")
    B, T, H, K = (int(d) for d in q.shape)
    check_shape("k", k, (B, T, H, K), "B, T, H, K", "to match q")
    _check_rank("v", v, 4, "B, T, HV, V")
    if tuple(v.shape[:2]) != (B, T):
        raise ValueError(
            f"v: expected shape [B, T, HV, V] with [B, T] = {format_shape((B, T))} to match q, "
            f"got {format_shape(v.shape)}"
        )
    HV, V = int(v.shape[2]), int(v.shape[3])
    if H == 0 or HV == 0 or HV % H != 0:
        raise ValueError(
            f"v: expected the number of value heads HV to be a positive multiple of H = {H} (GVA), "
            f"got HV = {HV} in shape {format_shape(v.shape)}"
        )
    if T < 1 or K < 1 or V < 1 or B < 1:
        raise ValueError(
            f"q: expected B, T, K, V >= 1, got q {format_shape(q.shape)} and v {format_shape(v.shape)}"
        )
    if g is not None:
        check_shape("g", g, (B, T, HV, K), "B, T, HV, K")
    if beta is not None:
        check_shape("beta", beta, (B, T, HV), "B, T, HV")

    devices = {str(x.device) for x in (q, k, v, g, beta) if x is not None and hasattr(x, "device")}
    if len(devices) > 1:
        raise ValueError(f"q, k, v, g, beta: expected all on one device, got {sorted(devices)}")

    if scale is None:
        scale_value = K ** -0.5
    else:
        if isinstance(scale, bool) or not isinstance(scale, (int, float, np.floating, np.integer)):
            raise TypeError(f"scale: expected a float, got {type(scale).__name__}")
        scale_value = float(scale)
        if not math.isfinite(scale_value):
            raise ValueError(f"scale: expected a finite number, got {scale_value}")

    if cu_seqlens is None:
        spans: List[Tuple[int, int, int]] = [(b, 0, T) for b in range(B)]
    else:
        cu = cu_seqlens_values(cu_seqlens)
        if B != 1:
            raise ValueError(
                f"cu_seqlens: expected a packed batch with B = 1, got B = {B} (q shape {format_shape(q.shape)})"
            )
        if cu[0] != 0:
            raise ValueError(f"cu_seqlens: expected to start at 0, got {int(cu[0])}")
        if np.any(np.diff(cu) < 0):
            raise ValueError(f"cu_seqlens: expected non-decreasing offsets, got {cu.tolist()}")
        if cu[-1] != T:
            raise ValueError(f"cu_seqlens: expected to end at T = {T}, got {int(cu[-1])}")
        spans = [(0, int(cu[n]), int(cu[n + 1])) for n in range(len(cu) - 1)]
    N = len(spans)

    if initial_state is not None:
        check_floating("initial_state", initial_state)
        _check_rank("initial_state", initial_state, 4, "N, HV, K, V")
        check_shape("initial_state", initial_state, (N, HV, K, V), "N, HV, K, V")
        if hasattr(initial_state, "device") and devices and str(initial_state.device) not in devices:
            raise ValueError(
                f"initial_state: expected on device {devices.pop()} like q, got {initial_state.device}"
            )

    return KDAProblem(B=B, T=T, H=H, HV=HV, K=K, V=V, N=N, scale=scale_value, spans=tuple(spans))


def check_gate_params(HV: int, K: int, A_log: Any = None, dt_bias: Any = None, lower_bound: Any = None,
                      require_A_log: bool = False) -> None:
    """Check the in-kernel gate's parameters: ``A_log [HV]`` (``[1, 1, HV, 1]`` accepted), ``dt_bias [HV * K]`` or ``[HV, K]``.

    >>> import numpy as np
    >>> check_gate_params(4, 8, A_log=np.zeros(4), dt_bias=np.zeros(32))
    >>> check_gate_params(4, 8, dt_bias=np.zeros(8))
    Traceback (most recent call last):
    ...
    ValueError: dt_bias: expected shape [HV * K] = [32] or [HV, K] = [4, 8], got [8]
    """
    if A_log is None:
        if require_A_log and lower_bound is None:
            raise ValueError("A_log: expected a tensor of shape [HV] for the softplus gate (or give lower_bound), got None")
    else:
        check_floating("A_log", A_log)
        shape = tuple(int(d) for d in A_log.shape)
        if shape not in ((HV,), (1, 1, HV, 1)):
            raise ValueError(f"A_log: expected shape [HV] = [{HV}], got {format_shape(shape)}")
    if dt_bias is not None:
        check_floating("dt_bias", dt_bias)
        shape = tuple(int(d) for d in dt_bias.shape)
        if shape not in ((HV * K,), (HV, K)):
            raise ValueError(
                f"dt_bias: expected shape [HV * K] = [{HV * K}] or [HV, K] = [{HV}, {K}], got {format_shape(shape)}"
            )
    if lower_bound is not None:
        if isinstance(lower_bound, bool) or not isinstance(lower_bound, (int, float, np.floating, np.integer)):
            raise TypeError(f"lower_bound: expected a float, got {type(lower_bound).__name__}")
        if not (math.isfinite(float(lower_bound)) and float(lower_bound) < 0):
            raise ValueError(f"lower_bound: expected a finite negative number, got {lower_bound}")
