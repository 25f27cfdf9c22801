"""The backward of the chunked algorithm, stage by stage: what the Triton backward kernels will mirror.

:func:`kda_backward` recomputes the forward stages (keeping what the backward reads), then
runs the backward of each stage in reverse order (report Eq. 9 back to Eq. 2)::

    dq, dh, dv_new, dG, dA_qk  = chunk_output_bwd(...)              # 6. Eq. 9
    dk, dW, dU, dG, dS0        = state_passing_bwd(...)             # 5. Eq. 8 (reverse time)
    dk, dv, dG, dbeta, dM      = wy_representation_bwd(...)         # 4. Eq. 7
    dA_kk                      = ut_transform_bwd(M, dM)            # 3. Eq. 6
    dq, dk, dG, dbeta          = intra_chunk_matrices_bwd(...)      # 2. Eq. 5 (+ Eq. 9's A_qk)
    dg                         = chunk_local_cumsum_bwd(dG)         # 1. reverse in-chunk cumsum

Each backward stage is tested against autograd through its forward stage
(``tests/test_backward_intra.py``, ``tests/test_backward_inter.py``), and the
composition against autograd through :func:`kda_explained.chunked.kda.kda`
(``tests/test_backward.py``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_chunk_size, check_kda_inputs
from . import stages
from .backward_inter import chunk_output_bwd, state_passing_bwd, wy_representation_bwd
from .backward_intra import chunk_local_cumsum_bwd, intra_chunk_matrices_bwd, ut_transform_bwd
from .kda import CHUNK_SIZES, as_tensor_cu_seqlens, require_tensors

__all__ = ["kda_backward"]


def kda_backward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    do: torch.Tensor,
    dS_final: Optional[torch.Tensor] = None,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, ...]:
    """Gradients of :func:`kda_explained.chunked.kda.kda` by the staged backward.

    ``do: [B, T, HV, V]`` is the gradient of the output, ``dS_final: [N, HV, K, V]`` that of
    the final state (or ``None``). Returns ``(dq, dk, dv, dg, dbeta, dinitial_state)``
    with the shapes of the inputs (``dinitial_state`` is ``None`` without an initial state).
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, do=do, dS_final=dS_final, initial_state=initial_state)
    C = check_chunk_size(chunk_size, CHUNK_SIZES)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)

    # ---- forward, keeping what the backward reads (the Triton backward will recompute most of it)
    G = stages.chunk_local_cumsum(g, C, cu_seqlens)  # 1.
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, p.scale, C, cu_seqlens)  # 2.
    M = stages.ut_transform(A_kk, C, cu_seqlens)  # 3.
    W, U = stages.wy_representation(k, v, G, beta, M, C, cu_seqlens)  # 4.
    _, kg = stages.decayed_operands(q, k, G, p.scale, C, cu_seqlens)
    h, v_new, _ = stages.state_passing(kg, W, U, G, initial_state, C, cu_seqlens)  # 5.

    # ---- backward, stage 6 down to stage 1
    dq, dh, dv_new, dG, dA_qk = chunk_output_bwd(q, h, v_new, G, A_qk, p.scale, do, C, cu_seqlens)  # 6.
    dk, dW, dU, dG5, dS0 = state_passing_bwd(k, W, U, G, initial_state, h, v_new, dh, dv_new, dS_final,
                                             C, cu_seqlens)  # 5.
    dk4, dv, dG4, dbeta, dM = wy_representation_bwd(k, v, G, beta, M, dW, dU, C, cu_seqlens)  # 4.
    dA_kk = ut_transform_bwd(M, dM, C, cu_seqlens)  # 3.
    dq2, dk2, dG2, dbeta2 = intra_chunk_matrices_bwd(q, k, G, beta, p.scale, dA_kk, dA_qk, C, cu_seqlens)  # 2.
    dg = chunk_local_cumsum_bwd(dG + dG5 + dG4 + dG2, C, cu_seqlens)  # 1.
    return (
        (dq + dq2).to(q.dtype),
        (dk + dk4 + dk2).to(k.dtype),
        dv.to(v.dtype),
        dg.to(g.dtype),
        (dbeta + dbeta2).to(beta.dtype),
        None if initial_state is None else dS0.to(initial_state.dtype),
    )
