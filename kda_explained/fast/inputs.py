"""The fast layer's input checks, shared by every entry point (forward, backward, decode).

The contract's checks (:mod:`kda_explained.validation`, one module for all layers) plus what
the kernels need: a CUDA device (or the interpreter), head dims that fit in registers, the
dtypes the kernels take, and the offsets of a packed batch read once, as host values.
"""

from __future__ import annotations

import os
import warnings

import torch

from ..chunked.kda import require_tensors
from ..validation import check_g_domain, check_kda_inputs, cu_seqlens_values
from ._meta import interpreter_set_too_late, interpreting

__all__ = ["check_fast_inputs", "check_fast_device", "check_fast_dtypes", "resolve_fla_kwargs", "FAST_CHUNK_SIZES",
           "FAST_DTYPES", "MAX_HEAD_DIM", "CHECK_G_ENV"]

#: Chunk sizes the kernels take (multiples of the 16-token sub-chunk).
FAST_CHUNK_SIZES = (16, 32, 64)
#: Largest K and V; a state tile ``[K, BV]`` and the ``[BT, K]`` tiles live in registers.
MAX_HEAD_DIM = 256
#: The dtypes the kernels take (they compute in float32 whatever the storage).
FAST_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: Set to 1 to make every fast call read ``g`` and refuse values outside ``[-inf, 0]`` (the
#: ``check_g`` argument's default). Off by default: the check waits for the GPU.
CHECK_G_ENV = "KDA_EXPLAINED_CHECK_G"


def check_fast_device(q: torch.Tensor, name: str = "q") -> None:
    """Raise unless the Triton kernels can run on ``q``'s device: CUDA, or the CPU under the
    interpreter, set before the kernels were defined. ``name``: the argument the message names."""
    if q.device.type != "cuda" and interpreter_set_too_late():
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after kda_explained.fast was imported: Triton reads it when the kernels "
            "are defined, so set it before the first import of kda_explained.fast (or of triton), e.g. "
            "os.environ['TRITON_INTERPRET'] = '1' at the top of the script"
        )
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"{name}: expected a CUDA tensor for the Triton kernels (or TRITON_INTERPRET=1 to run them on the CPU), "
            f"got device {q.device}"
        )


def check_fast_dtypes(**tensors: torch.Tensor) -> None:
    """Raise :class:`TypeError` naming the first tensor whose dtype the kernels do not take."""
    for name, x in tensors.items():
        if x.dtype not in FAST_DTYPES:
            raise TypeError(f"{name}: expected float32, bfloat16 or float16 for the fast layer, got {x.dtype}")


def check_fast_inputs(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, state_v_first=False,
                      cu_seqlens_cpu=None, check_g=None):
    """Shared checks of the fast layer: the design contract's (docs/design.md), plus what the kernels
    need (device, head dims).

    Returns the problem's sizes and the offsets as a tuple of ints (``None`` for a plain
    batch), which is what the launchers take: the offsets are read once here, from
    ``cu_seqlens_cpu`` when given (no device read) or from ``cu_seqlens`` itself (a GPU
    tensor is read back, which waits for the GPU), never from a cache keyed by the tensor.
    ``check_g`` (default: the ``KDA_EXPLAINED_CHECK_G`` environment switch) reads ``g``
    to refuse values outside ``[-inf, 0]``, which costs a device read.
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    offsets = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, (list, tuple)):
            require_tensors(cu_seqlens=cu_seqlens)
        if cu_seqlens_cpu is None:
            offsets = tuple(int(x) for x in cu_seqlens_values(cu_seqlens))
        else:
            offsets = tuple(int(x) for x in cu_seqlens_values(cu_seqlens_cpu))
            if isinstance(cu_seqlens, torch.Tensor) and (cu_seqlens.dtype.is_floating_point or cu_seqlens.dim() != 1
                                                         or cu_seqlens.numel() != len(offsets)):
                raise ValueError(f"cu_seqlens: expected a 1-D integer tensor of {len(offsets)} offsets like "
                                 f"cu_seqlens_cpu, got {cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    elif cu_seqlens_cpu is not None:
        raise ValueError("cu_seqlens_cpu: expected only together with cu_seqlens, got cu_seqlens=None")
    if state_v_first and initial_state is not None and initial_state.dim() == 4:
        initial_state_kv = initial_state.transpose(-1, -2)  # validate in [K, V] terms
    else:
        initial_state_kv = initial_state
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state_kv, cu_seqlens=offsets)
    check_fast_device(q)
    if p.K > MAX_HEAD_DIM or p.V > MAX_HEAD_DIM:
        raise ValueError(f"q, v: expected head dims K, V <= {MAX_HEAD_DIM}, got K = {p.K}, V = {p.V}")
    check_fast_dtypes(q=q, k=k, v=v)
    if check_g is None:
        check_g = os.environ.get(CHECK_G_ENV, "0") not in ("", "0")
    if check_g:
        check_g_domain(g, device_check=True)
    return p, offsets


def resolve_fla_kwargs(fn: str, kwargs: dict, state_v_first: bool, accepted: frozenset) -> bool:
    """Take flash-linear-attention's extra keyword arguments out of ``kwargs``; return ``state_v_first``.

    ``transpose_state_layout`` is flash-linear-attention's older name of ``state_v_first``
    (accepted with its :class:`DeprecationWarning`); names in ``accepted`` change nothing here;
    anything else is a :class:`TypeError`, as for any Python function.
    """
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("transpose_state_layout: the older name of state_v_first; got both")
        warnings.warn("transpose_state_layout is the older name of state_v_first", DeprecationWarning, stacklevel=3)
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    unknown = set(kwargs) - accepted
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {sorted(unknown)}")
    return state_v_first
