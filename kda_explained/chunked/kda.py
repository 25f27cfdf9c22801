"""``chunked.kda``: the six stages of :mod:`kda_explained.chunked.stages` composed (report §3.1)."""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_chunk_size, check_g_domain, check_kda_inputs, cu_seqlens_values
from . import stages

__all__ = ["kda", "CHUNK_SIZES", "as_tensor_cu_seqlens", "require_tensors"]

#: The chunk sizes the chunked layer accepts.
CHUNK_SIZES = (16, 32, 64, 128)


def require_tensors(**tensors) -> None:
    """Raise :class:`TypeError` naming the first argument that is not a ``torch.Tensor`` (``None`` passes)."""
    for name, x in tensors.items():
        if x is not None and not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")


def as_tensor_cu_seqlens(cu_seqlens, device) -> Optional[torch.Tensor]:
    """``cu_seqlens`` as an int64 tensor on ``device`` (lists and tuples of ints are accepted).

    The type is checked before any conversion (:func:`~kda_explained.validation.cu_seqlens_values`):
    float offsets raise :class:`TypeError` instead of being truncated.
    """
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, (list, tuple)):
        require_tensors(cu_seqlens=cu_seqlens)
    values = cu_seqlens_values(cu_seqlens)
    if isinstance(cu_seqlens, torch.Tensor):
        return cu_seqlens.to(device=device, dtype=torch.int64)
    return torch.tensor(values, dtype=torch.int64, device=device)


def kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA by the chunkwise WY / UT-transform algorithm (report Eq. 2–9).

    Shapes as the design contract (docs/design.md): ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``,
    ``g: [B, T, HV, K]`` (log decay in ``[-inf, 0]``: a CPU ``g`` outside it raises
    :class:`ValueError`; a GPU ``g`` is not read back, and ``g > 0`` is then computed
    as the recurrence defines it), ``beta: [B, T, HV]``,
    ``initial_state: [N, HV, K, V]``, ``cu_seqlens: [N + 1]``.
    Computes in float32 (float64 when ``v`` is float64), on the inputs' device,
    differentiably. Returns ``o: [B, T, HV, V]`` in ``v``'s dtype and the final
    state ``[N, HV, K, V]`` (float32, or float64 for float64 inputs) or ``None``.

    >>> import torch
    >>> from kda_explained import naive
    >>> from kda_explained.testing import rel_rms_error
    >>> torch.manual_seed(0) and None
    >>> B, T, H, K, V = 1, 37, 2, 8, 4
    >>> q = torch.randn(B, T, H, K, dtype=torch.float64)
    >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    >>> v = torch.randn(B, T, H, V, dtype=torch.float64)
    >>> g = -torch.rand(B, T, H, K, dtype=torch.float64); beta = torch.rand(B, T, H, dtype=torch.float64)
    >>> o, S = kda(q, k, v, g, beta, output_final_state=True, chunk_size=16)
    >>> o_ref, S_ref = naive.kda(q.numpy(), k.numpy(), v.numpy(), g.numpy(), beta.numpy(), output_final_state=True)
    >>> rel_rms_error(o, o_ref) < 1e-12 and rel_rms_error(S, S_ref) < 1e-12
    True
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    chunk_size = check_chunk_size(chunk_size, CHUNK_SIZES)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if not torch.compiler.is_compiling():
        check_g_domain(g)  # g in [-inf, 0]; read only where it is free (CPU tensors)
    C = chunk_size

    G = stages.chunk_local_cumsum(g, C, cu_seqlens)  # 1. Gamma in log space          [B, T, HV, K]
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, p.scale, C, cu_seqlens)  # 2.  [B, T, HV, C]
    M = stages.ut_transform(A_kk, C, cu_seqlens)  # 3. M = (I + A_kk)^{-1}                [B, T, HV, C]
    W, U = stages.wy_representation(k, v, G, beta, M, C, cu_seqlens)  # 4.    [B, T, HV, K], [B, T, HV, V]
    qg, kg = stages.decayed_operands(q, k, G, p.scale, C, cu_seqlens)  # 5.-6.'s operands  [B, T, HV, K]
    h, v_new, S = stages.state_passing(kg, W, U, G, initial_state, C, cu_seqlens)  # 5.  [NC, HV, K, V], ...
    o = stages.chunk_output(qg, h, v_new, A_qk, C, cu_seqlens)  # 6.                    [B, T, HV, V]
    return o.to(v.dtype), (S if output_final_state else None)
