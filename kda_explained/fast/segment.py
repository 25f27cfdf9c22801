"""``fast.segment.segment_summary``: the segment map ``(P, R)`` of KDA on the Triton kernels.

The same function, name and signature as the chunked stage
:func:`kda_explained.distributed.segment.segment_summary`, which derives it. The kernel
*is* the chunk pipeline of :func:`kda_explained.fast.api.kda` run over ``V + K`` value
columns, values ``[v | 0]`` from the state ``[S_0 | I]``: its state pass carries the
identity columns through ``S <- Diag(Gamma_C) S + kg^T (U - W S)`` with ``U = 0``, which
is exactly the product of the chunk transitions a dedicated transition kernel would
form, and its output pass writes ``q_read`` (the outputs of those columns), which
context parallelism needs as well. What a dedicated kernel would save is the read of
``K`` zero value columns per token. Where ``V + K`` exceeds the kernels' widest value
tile (``MAX_HEAD_DIM``, 256) the two column blocks run as two
calls, which repeats the intra-chunk work (``A_kk``, the UT transform) once.

Glossary as :mod:`kda_explained.distributed.segment`.
"""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked.kda import require_tensors
from ..chunked.pieces import augment, split_augmented
from ..validation import check_kda_inputs
from . import MAX_HEAD_DIM, kda

__all__ = ["segment_summary"]


def segment_summary(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """``(o, q_read, P, R)`` of every sequence, as the chunked stage of this name, on the Triton kernels.

    Shapes as :func:`kda_explained.distributed.segment.segment_summary`; inputs float32,
    bfloat16 or float16 on a CUDA device (or under ``TRITON_INTERPRET=1``); ``P`` and ``R``
    are float32, ``o`` and ``q_read`` in ``v``'s dtype. Differentiable (training takes the
    chunk pipeline and its Triton backward).

    >>> import torch
    >>> from kda_explained.distributed import segment as chunked_segment
    >>> from kda_explained.testing import TOLERANCES, rel_rms_error
    >>> torch.manual_seed(0) and None
    >>> B, T, H, K, V = 1, 20, 1, 16, 16
    >>> q = torch.randn(B, T, H, K); k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    >>> v = torch.randn(B, T, H, V); g = -torch.rand(B, T, H, K); beta = torch.rand(B, T, H)
    >>> fast_out = segment_summary(q, k, v, g, beta)
    >>> ref = chunked_segment.segment_summary(q.double(), k.double(), v.double(), g.double(), beta.double())
    >>> max(rel_rms_error(a, b) for a, b in zip(fast_out, ref)) < TOLERANCES["fast_f32_vs_f64"]
    True
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    B, T, HV, V, K, N = p.B, p.T, p.HV, p.V, p.K, p.N
    if V + K <= MAX_HEAD_DIM:  # one pass over [v | 0] from [S_0 | I]
        v_aug, S_aug = augment(v, initial_state, N, K, torch.float32)  # [B, T, HV, V + K], [N, HV, K, V + K]
        o_aug, S_out = kda(q, k, v_aug, g, beta, scale=scale, initial_state=S_aug, output_final_state=True,
                           cu_seqlens=cu_seqlens)
        return split_augmented(o_aug, S_out, V)
    S0 = None if initial_state is None else initial_state.to(torch.float32)
    eye = torch.eye(K, dtype=torch.float32, device=v.device).expand(N, HV, K, K)
    o, R = kda(q, k, v, g, beta, scale=scale, initial_state=S0, output_final_state=True, cu_seqlens=cu_seqlens)
    q_read, P = kda(q, k, v.new_zeros(B, T, HV, K), g, beta, scale=scale, initial_state=eye.contiguous(),
                    output_final_state=True, cu_seqlens=cu_seqlens)
    return o, q_read, P, R
