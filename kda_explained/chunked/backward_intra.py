"""The backward of stages 1-3 of :mod:`kda_explained.chunked.stages`, in plain PyTorch.

These are the references the Triton backward kernels mirror: each
function is the vector-Jacobian product of one forward stage, written out by
hand, in the same token layout ``[B, T, HV, ...]`` and on the same chunk grid
(:class:`~kda_explained.chunked.layout.ChunkLayout`). Each is tested against
``torch.autograd.grad`` through its forward stage (``tests/test_backward_intra.py``).
The backward of stages 4-6 lives in :mod:`kda_explained.chunked.backward_inter`.

Glossary (one chunk of ``C`` tokens, local rows ``r``, columns ``j``, channel ``c``)
------------------------------------------------------------------------------------
=============  ========================================================================
``dX``         the gradient of the loss with respect to ``X`` (same shape as ``X``)
``G``          in-chunk cumulative log decay (stage 1), float64, ``[C, K]``
``ratio``      ``exp(G_rc - G_jc)`` for ``j <= r`` (else 0), ``[C, C, K]``, every entry in ``(0, 1]``
``P_kk``       ``StrictTril(K Diag-ratio K^T)``: ``A_kk`` before its row scale ``beta_r`` (Eq. 5)
``P_qk``       ``Tril(Q Diag-ratio K^T)``: ``A_qk`` before ``scale`` (Eq. 9)
``D_kk``       ``beta_r dA_kk[r, j]`` on ``j < r``: the gradient reaching ``P_kk``
``D_qk``       ``scale dA_qk[r, j]`` on ``j <= r``: the gradient reaching ``P_qk``
``M``          the UT transform ``(I + A_kk)^{-1}`` (Eq. 6)
=============  ========================================================================

Numerics follow the forward: every exponential has an exponent ``<= 0`` (masked
before the ``exp``), formed from float64 ``G`` and only then cast to the compute
dtype. Stage 2's backward is the exact per-chunk ``[C, C, K]`` formulation, one
chunk column of the grid at a time: clear rather than fast.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import ChunkLayout
from .stages import _chunk_G, _compute_dtype, _expand_heads

__all__ = ["chunk_local_cumsum_bwd", "intra_chunk_matrices_bwd", "ut_transform_bwd"]


def _layout(x: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor]) -> ChunkLayout:
    return ChunkLayout.build(x.shape[0], x.shape[1], chunk_size, cu_seqlens, x.device)


# ----------------------------------------------------------------------------------------------
# Stage 1 backward: through the in-chunk cumulative sum G_r = sum_{i <= r} g_i
# ----------------------------------------------------------------------------------------------
def chunk_local_cumsum_bwd(
    dG: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dg_i = sum_{r >= i} dG_r`` over the rest of ``i``'s chunk: a reverse cumsum, restarting per chunk and sequence.

    ``dG: [B, T, HV, K]`` -> ``dg: [B, T, HV, K]`` in ``dG``'s dtype (float64, as the
    forward's ``G``). The padding of the chunk grid holds ``dG = 0``, so the reverse
    sum of a ragged last chunk starts at its last real token.

    >>> import torch
    >>> dG = torch.ones(1, 5, 1, 1, dtype=torch.float64)
    >>> chunk_local_cumsum_bwd(dG, 4).flatten().tolist()
    [4.0, 3.0, 2.0, 1.0, 1.0]
    """
    lay = _layout(dG, chunk_size, cu_seqlens)
    dG_c = lay.to_chunks(dG)  # [N, NT, HV, C, K]
    dg_c = dG_c.flip(3).cumsum(dim=3).flip(3)  # G_r = sum_{i<=r} g_i  =>  dg_i = sum_{r>=i} dG_r
    return lay.from_chunks(dg_c)


# ----------------------------------------------------------------------------------------------
# Stage 3 backward: through the UT transform M = (I + A_kk)^{-1} (report Eq. 6)
# ----------------------------------------------------------------------------------------------
def ut_transform_bwd(
    M: torch.Tensor, dM: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """``dA_kk = StrictTril(-M^T dM M^T)`` per chunk: ``M, dM: [B, T, HV, C]`` -> ``dA_kk: [B, T, HV, C]``.

    From ``d(M) = -M d(A) M`` (differentiate ``M (I + A) = I``):
    ``<dM, d(M)> = <-M^T dM M^T, d(A)>``. The forward reads only the strictly lower
    triangle of ``A_kk``, so only that triangle gets a gradient. (Upper entries of
    ``dM`` drop out by themselves: ``M`` is lower-triangular.)

    For ``A = [[0, 0], [a, 0]]``, ``M = [[1, 0], [-a, 1]]``, so ``sum(M) = 2 - a`` and
    ``d sum(M) / da = -1``:

    >>> import torch
    >>> M = torch.tensor([[1.0, 0.0], [-0.5, 1.0]], dtype=torch.float64).view(1, 2, 1, 2)  # a = 0.5
    >>> ut_transform_bwd(M, torch.ones_like(M), 2).flatten().tolist()
    [0.0, 0.0, -1.0, 0.0]
    """
    lay = _layout(M, chunk_size, cu_seqlens)
    M_c, dM_c = lay.to_chunks(M), lay.to_chunks(dM)  # [N, NT, HV, C, C]
    Mt = M_c.transpose(-1, -2)
    dA_c = -(Mt @ dM_c @ Mt)  # Eq. 6: M = (I + A)^{-1}  =>  dA = -M^T dM M^T
    return lay.from_chunks(dA_c.tril(-1))


# ----------------------------------------------------------------------------------------------
# Stage 2 backward: through A_kk (Eq. 5) and A_qk (Eq. 9)
# ----------------------------------------------------------------------------------------------
def intra_chunk_matrices_bwd(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    dA_kk: torch.Tensor,
    dA_qk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The gradients of :func:`~kda_explained.chunked.stages.intra_chunk_matrices` for ``q, k, G, beta``.

    ``q, k: [B, T, H, K]``, ``G: [B, T, HV, K]``, ``beta: [B, T, HV]``,
    ``dA_kk, dA_qk: [B, T, HV, C]`` -> ``dq, dk: [B, T, H, K]``, ``dG: [B, T, HV, K]``,
    ``dbeta: [B, T, HV]``. ``dq, dk, dbeta`` are in the compute dtype (float64 for
    float64 ``q``, else float32); ``dG`` in ``G``'s dtype. Entries of ``dA_kk`` on or
    above the diagonal, and of ``dA_qk`` above it, are ignored (the forward's zeros).

    With ``T_kk[r, j, c] = D_kk[r, j] k_rc k_jc ratio[r, j, c]`` and ``T_qk`` alike with ``q_rc``:

    - ``dbeta_r = sum_j dA_kk[r, j] P_kk[r, j]`` (``P_kk`` computed, never ``A_kk / beta``);
    - ``dq_rc = sum_j D_qk[r, j] k_jc ratio``;
    - ``dk_rc = sum_j D_kk[r, j] k_jc ratio[r, j, c]`` (``k_r`` on the left, row ``r`` of ``A_kk``)
      ``+ sum_i (D_kk[i, r] k_ic + D_qk[i, r] q_ic) ratio[i, r, c]`` (on the right, column ``r`` of both);
    - ``dG_rc = sum_j (T_kk + T_qk)[r, j, c] - sum_i (T_kk + T_qk)[i, r, c]``
      (``G_r`` enters the exponent as ``+G_rc`` in its row and as ``-G_rc`` in its column).

    GVA: ``HV // H`` value heads read each ``q, k`` head, so their gradients are summed over the group.
    Padding tokens have ``q = k = 0`` in the grid, so every term touching them is zero and
    the edge padding of ``G`` (``stages._chunk_G``) sends nothing back.

    >>> import torch
    >>> from kda_explained.chunked import stages
    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(2, 1, 20, 1, 4, dtype=torch.float64).unbind(0)
    >>> G = stages.chunk_local_cumsum(-torch.rand(1, 20, 1, 4, dtype=torch.float64), 16)
    >>> beta = torch.rand(1, 20, 1, dtype=torch.float64)
    >>> dA_kk, dA_qk = torch.randn(2, 1, 20, 1, 16, dtype=torch.float64).unbind(0)
    >>> [x.shape[-1] for x in intra_chunk_matrices_bwd(q, k, G, beta, 0.5, dA_kk, dA_qk, 16)]
    [4, 4, 4, 1]
    """
    lay = _layout(q, chunk_size, cu_seqlens)
    dt = _compute_dtype(q)
    C = chunk_size
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K] float64
    N, NT, HV, _, K = G_c.shape
    H = q.shape[2]
    q_c = _expand_heads(lay.to_chunks(q.to(dt)), HV)  # [N, NT, HV, C, K]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    beta_c = lay.to_chunks(beta.to(dt))  # [N, NT, HV, C]
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()  # j <= r
    strict = torch.ones(C, C, dtype=torch.bool, device=q.device).tril(-1)  # j < r
    # the gradients reaching the un-scaled products P_kk, P_qk (A_kk = Diag(beta) P_kk, A_qk = scale P_qk)
    dA_kk_c = lay.to_chunks(dA_kk.to(dt)).masked_fill(~strict, 0)  # [N, NT, HV, C, C]
    dA_qk_c = lay.to_chunks(dA_qk.to(dt)).masked_fill(~causal, 0)  # [N, NT, HV, C, C]
    D_kk = beta_c[..., :, None] * dA_kk_c
    D_qk = scale * dA_qk_c

    dq_c, dk_c, dG_c, dbeta_c = (torch.zeros_like(x) for x in (q_c, k_c, G_c.to(dt), beta_c))
    for i in range(NT):  # one chunk column of the grid at a time: the [C, C, K] tiles stay small
        G_i, q_i, k_i = G_c[:, i], q_c[:, i], k_c[:, i]  # [N, HV, C, K]
        diff = G_i[..., :, None, :] - G_i[..., None, :, :]  # [N, HV, C(r), C(j), K] float64
        ratio = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf"))).to(dt)  # exp(<= 0)
        k_ratio = k_i[..., None, :, :] * ratio  # k_jc ratio[r, j, c]
        P_kk = (k_i[..., :, None, :] * k_ratio).sum(-1) * strict  # Eq. 5 without beta_r
        dbeta_c[:, i] = (dA_kk_c[:, i] * P_kk).sum(-1)  # A_kk[r, j] = beta_r P_kk[r, j]
        T_kk = D_kk[:, i, ..., None] * k_i[..., :, None, :] * k_ratio  # [N, HV, C, C, K]
        T_qk = D_qk[:, i, ..., None] * q_i[..., :, None, :] * k_ratio  # [N, HV, C, C, K]
        dq_c[:, i] = (D_qk[:, i, ..., None] * k_ratio).sum(-2)  # q_r is the left of A_qk's row r
        dk_left = (D_kk[:, i, ..., None] * k_ratio).sum(-2)  # k_r is the left of A_kk's row r
        left_ratio = D_kk[:, i, ..., None] * k_i[..., :, None, :] + D_qk[:, i, ..., None] * q_i[..., :, None, :]
        dk_right = (left_ratio * ratio).sum(-3)  # k_j is the right of column j of A_kk and A_qk
        dk_c[:, i] = dk_left + dk_right
        T = T_kk + T_qk
        dG_c[:, i] = T.sum(-2) - T.sum(-3)  # exp(G_rc - G_jc): +1 for the row r, -1 for the column j
    # GVA: sum the HV // H value heads that share each q, k head
    dq_c = dq_c.view(N, NT, H, HV // H, C, K).sum(3)  # [N, NT, H, C, K]
    dk_c = dk_c.view(N, NT, H, HV // H, C, K).sum(3)  # [N, NT, H, C, K]
    dq, dk = lay.from_chunks(dq_c), lay.from_chunks(dk_c)
    return dq, dk, lay.from_chunks(dG_c).to(G.dtype), lay.from_chunks(dbeta_c)
