"""Backward of the chunked stages 4-6 (WY factors, state passing, output) as pure PyTorch references.

Each function here is the vector-Jacobian product of the forward stage of the same
name in :mod:`kda_explained.chunked.stages` (``wy_representation_bwd`` of
``wy_representation``, ...): same token layout ``[B, T, HV, ...]``, same chunk
grid inside, and the gradients autograd would give through that stage. They are
the references the Triton backward kernels mirror; stages 1-3 are in
:mod:`kda_explained.chunked.backward_intra`.

Glossary (one chunk of ``C`` tokens, local index ``r``, one value head; ``d`` = gradient)
-----------------------------------------------------------------------------------------
=============  ============================================================================
``G``          in-chunk cumulative log decay, ``[C, K]``, float64; ``Gamma = exp(G)``
``G_last``     ``G`` at the chunk's last real token, ``Gamma_C`` in log space, ``[1, K]``
``k_dec``      ``K * exp(G_last - G)``: what the chunk writes, decayed to its end (Eq. 8)
``S``          the state entering a chunk ``[K, V]`` (``h`` collects them); ``S'`` the next one
``dS``         the gradient carried backward in time: ``dL/dS'`` entering a chunk from the right
``dv_new``     on entry the gradient from the output stage; ``dv_tot`` adds the state's share
``kg``         ``Diag(beta)(Gamma * K)``: the right factor of ``W`` (Eq. 7)
``vb``         ``Diag(beta) V``: the right factor of ``U`` (Eq. 7)
=============  ============================================================================

Two rules of the chunk grid that every gradient of ``G`` follows:

- ``_chunk_G`` pads each chunk with its last real ``G``, so the gradient that lands
  on a padding slot belongs to the last real token (``_fold_G_grad``);
- GVA: a ``q``/``k`` head is read by ``HV // H`` value heads, so its gradient is the
  sum over them (``_sum_heads``).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .layout import ChunkLayout
from .stages import _chunk_G, _expand_heads, _layout

__all__ = ["chunk_output_bwd", "state_passing_bwd", "state_passing_bwd_recurrence", "wy_representation_bwd"]


def _sum_heads(dx: torch.Tensor, H: int) -> torch.Tensor:
    """Adjoint of ``_expand_heads``: ``[N, NT, HV, C, K]`` -> ``[N, NT, H, C, K]``, summing each group."""
    N, NT, HV = dx.shape[:3]
    return dx.view(N, NT, H, HV // H, *dx.shape[3:]).sum(3)


def _fold_G_grad(lay: ChunkLayout, dG_c: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Adjoint of ``_chunk_G``: ``dG_c: [N, NT, HV, C, K]`` -> ``dG: [B, T, HV, K]`` in ``dtype``.

    A padding slot holds a copy of the chunk's last real ``G``, so its gradient is
    added to that token's; a chunk with no real token has nowhere to send it (and
    receives none from a real token).
    """
    dG_c = dG_c.to(torch.float64)
    N, NT, HV, C, K = dG_c.shape
    n_real = lay.real_tokens.to(dG_c.device)  # [N, NT]
    pad = (torch.arange(C, device=dG_c.device)[None, None, :] >= n_real[:, :, None])[:, :, None, :, None]
    pad_sum = dG_c.masked_fill(~pad, 0).sum(3, keepdim=True)  # [N, NT, HV, 1, K]
    last = (n_real - 1).clamp(min=0)[:, :, None, None, None].expand(N, NT, HV, 1, K)
    dG_real = dG_c.masked_fill(pad, 0).scatter_add(3, last, pad_sum)  # [N, NT, HV, C, K]
    return lay.from_chunks(dG_real).to(dtype)


# ----------------------------------------------------------------------------------------------
# Stage 4 backward: the WY factors W = M kg, U = M vb (report Eq. 7)
# ----------------------------------------------------------------------------------------------
def wy_representation_bwd(
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    dW: torch.Tensor,
    dU: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~kda_explained.chunked.stages.wy_representation`.

    Forward: ``W = M kg`` with ``kg = Diag(beta)(Gamma * K)``, ``U = M vb`` with ``vb = Diag(beta) V``.

    ``k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``G: [B, T, HV, K]``, ``beta: [B, T, HV]``,
    ``M: [B, T, HV, C]``, ``dW: [B, T, HV, K]``, ``dU: [B, T, HV, V]`` ->
    ``dk: [B, T, H, K]``, ``dv: [B, T, HV, V]``, ``dG: [B, T, HV, K]`` (``G``'s dtype),
    ``dbeta: [B, T, HV]``, ``dM: [B, T, HV, C]`` (the full matrix, as autograd gives it;
    only its lower triangle reaches the UT transform's input).

    >>> import torch
    >>> from kda_explained.chunked import stages
    >>> B, T, H, K, V, C = 1, 20, 1, 4, 3, 16
    >>> k, v, G = torch.randn(B, T, H, K, dtype=torch.float64), torch.randn(B, T, H, V, dtype=torch.float64), -torch.rand(B, T, H, K, dtype=torch.float64)
    >>> beta, M = torch.rand(B, T, H, dtype=torch.float64), torch.randn(B, T, H, C, dtype=torch.float64)
    >>> dk, dv, dG, dbeta, dM = wy_representation_bwd(k, v, G, beta, M, torch.ones(B, T, H, K, dtype=torch.float64), torch.ones(B, T, H, V, dtype=torch.float64), C)
    >>> dk.shape, dM.shape
    (torch.Size([1, 20, 1, 4]), torch.Size([1, 20, 1, 16]))
    """
    lay = _layout(k, chunk_size, cu_seqlens)
    dt = M.dtype
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    HV, H = G_c.shape[2], k.shape[2]
    Gamma = torch.exp(G_c).to(dt)  # [N, NT, HV, C, K]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    v_c = lay.to_chunks(v.to(dt))  # [N, NT, HV, C, V]
    beta_c = lay.to_chunks(beta.to(dt))[..., None]  # [N, NT, HV, C, 1]
    M_c = lay.to_chunks(M)  # [N, NT, HV, C, C]
    dW_c, dU_c = lay.to_chunks(dW.to(dt)), lay.to_chunks(dU.to(dt))  # [N, NT, HV, C, K], [..., V]
    kg = beta_c * Gamma * k_c  # Eq. 7: W = M kg
    vb = beta_c * v_c  # Eq. 7: U = M vb
    dM = dW_c @ kg.transpose(-1, -2) + dU_c @ vb.transpose(-1, -2)  # [N, NT, HV, C, C]
    dkg = M_c.transpose(-1, -2) @ dW_c  # [N, NT, HV, C, K]
    dvb = M_c.transpose(-1, -2) @ dU_c  # [N, NT, HV, C, V]
    dk_c = dkg * beta_c * Gamma  # kg = beta Gamma k
    dG_c = dkg * kg  # d Gamma / dG = Gamma, so dG = dkg * beta Gamma k
    dbeta = (dkg * Gamma * k_c).sum(-1) + (dvb * v_c).sum(-1)  # [N, NT, HV, C]
    dv_c = dvb * beta_c  # vb = beta v
    return (
        lay.from_chunks(_sum_heads(dk_c, H)),
        lay.from_chunks(dv_c),
        _fold_G_grad(lay, dG_c, G.dtype),
        lay.from_chunks(dbeta),
        lay.from_chunks(dM),
    )


# ----------------------------------------------------------------------------------------------
# Stage 5 backward: inter-chunk state passing in reverse time (report Eq. 8)
# ----------------------------------------------------------------------------------------------
def state_passing_bwd(
    k: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    h: torch.Tensor,
    v_new: torch.Tensor,
    dh: Optional[torch.Tensor],
    dv_new: Optional[torch.Tensor],
    dS_final: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Gradients of :func:`~kda_explained.chunked.stages.state_passing`, chunk by chunk from last to first.

    Forward per chunk (``S = h`` of the chunk)::

        v_new = U - W S                                           # Eq. 8
        S'    = Diag(exp(G_last)) S + k_dec^T v_new,  k_dec = K * exp(G_last - G)

    Backward, carrying ``dS = dL/dS'`` (``dS_final`` for the last chunk)::

        dv_tot = dv_new + k_dec dS            dU = dv_tot,  dW = -dv_tot S^T
        dk_dec = v_new dS^T                   dk = dk_dec * exp(G_last - G)
        dS    <- exp(G_last) * dS + dh - W^T dv_tot
        dG     = -(dk_dec * k_dec)  (row r),  dG_last += sum_r dk_dec * k_dec + exp(G_last) * sum_V(dS' * S)

    ``k: [B, T, H, K]``, ``W: [B, T, HV, K]``, ``U, v_new: [B, T, HV, V]``, ``G: [B, T, HV, K]``,
    ``initial_state, dS_final: [N, HV, K, V]`` or ``None``, ``h, dh: [NC, HV, K, V]``,
    ``dv_new: [B, T, HV, V]`` (``None`` = zeros) ->
    ``dk: [B, T, H, K]``, ``dW: [B, T, HV, K]``, ``dU: [B, T, HV, V]``, ``dG: [B, T, HV, K]``
    (``G``'s dtype), ``dinitial_state: [N, HV, K, V]`` (``None`` without an initial state).
    """
    lay = _layout(k, chunk_size, cu_seqlens)
    dt = W.dtype
    v_c, G_c = lay.to_chunks(v_new.to(dt)), _chunk_G(lay, G.to(torch.float64))
    HV, H = G_c.shape[2], k.shape[2]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    G_last = G_c[..., -1:, :]  # [N, NT, HV, 1, K]: the last real G (padding repeats it)
    k_dec = k_c * torch.exp(G_last - G_c).to(dt)  # Eq. 8: K * Gamma_C / Gamma
    decay_C = torch.exp(G_last).to(dt).transpose(-1, -2)  # [N, NT, HV, K, 1]: Gamma_C
    # 1. the sequential part: the gradient of every chunk's outgoing state, and dv_tot
    dS_out, dv_tot, dS0 = state_passing_bwd_recurrence(lay.from_chunks(k_dec), W, G, h, dh, dv_new, dS_final,
                                                       chunk_size, cu_seqlens)
    # 2. the rest, chunk by chunk in parallel
    dS_c = lay.grid_chunks(dS_out.to(dt))  # [N, NT, HV, K, V]
    S_c = lay.grid_chunks(h.to(dt))
    dvt_c = lay.to_chunks(dv_tot.to(dt))  # [N, NT, HV, C, V]
    dk_dec_c = v_c @ dS_c.transpose(-1, -2)  # [N, NT, HV, C, K]
    d_decay_c = (dS_c * S_c).sum(-1)[..., None, :]  # [N, NT, HV, 1, K]: S' = Diag(Gamma_C) S + ...
    dW_c = -dvt_c @ S_c.transpose(-1, -2)  # v_new = U - W S
    dk_c = dk_dec_c * torch.exp(G_last - G_c).to(dt)  # k_dec = k exp(G_last - G)
    dG_ratio = dk_dec_c * k_dec  # d k_dec / d(G_last - G) = k_dec
    dG_c = -dG_ratio  # [N, NT, HV, C, K]: through -G
    dG_c[..., -1:, :] += dG_ratio.sum(3, keepdim=True) + d_decay_c * decay_C.transpose(-1, -2)  # through G_last
    return (
        lay.from_chunks(_sum_heads(dk_c, H)),
        lay.from_chunks(dW_c),
        dv_tot,
        _fold_G_grad(lay, dG_c, G.dtype),
        dS0 if initial_state is not None else None,
    )


def state_passing_bwd_recurrence(
    kg: torch.Tensor,
    W: torch.Tensor,
    G: torch.Tensor,
    h: torch.Tensor,
    dh: Optional[torch.Tensor],
    dv_new: Optional[torch.Tensor],
    dS_final: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The sequential part of :func:`state_passing_bwd`: one pass from the last chunk to the first.

    With ``dS = dL/dS'``, the gradient of the state leaving the chunk (``dS_final``
    for a sequence's last chunk)::

        dS_out[chunk] = dS
        dv_tot        = dv_new + kg dS                         # S' = ... + kg^T v_new
        dS           <- exp(G_last) * dS + dh - W^T dv_tot      # dL/dS of the state entering the chunk

    Everything else of the stage's backward is a per-chunk product of these and the
    forward's ``h`` and ``v_new``, free of any order. ``kg = K * exp(G_last - G)``:
    ``[B, T, HV, K]`` (the decayed keys, value heads); ``W: [B, T, HV, K]``,
    ``G: [B, T, HV, K]``, ``h, dh: [NC, HV, K, V]`` (``dh=None``: zeros),
    ``dv_new: [B, T, HV, V]`` (``None``: zeros), ``dS_final: [N, HV, K, V]`` or ``None`` ->
    ``dS_out: [NC, HV, K, V]``, ``dv_tot: [B, T, HV, V]``, ``dS0: [N, HV, K, V]`` (the
    gradient of each sequence's initial state), all in ``W``'s dtype.
    """
    lay = _layout(kg, chunk_size, cu_seqlens)
    dt = W.dtype
    W_c, kg_c, G_c = lay.to_chunks(W), lay.to_chunks(kg.to(dt)), _chunk_G(lay, G.to(torch.float64))
    N, NT, HV, C, K = W_c.shape
    Vd = h.shape[-1]
    decay_C = torch.exp(G_c[..., -1:, :]).to(dt).transpose(-1, -2)  # [N, NT, HV, K, 1]: Gamma_C
    S_grid = lay.grid_chunks(h.to(dt))  # [N, NT, HV, K, V]
    dh_grid = lay.grid_chunks(dh.to(dt)) if dh is not None else torch.zeros_like(S_grid)
    dvn_c = lay.to_chunks(dv_new.to(dt)) if dv_new is not None else W_c.new_zeros(N, NT, HV, C, Vd)
    dS = W.new_zeros(N, HV, K, Vd) if dS_final is None else dS_final.to(dt)  # dL/dS' of the last chunk
    dS_out, dv_tot = [], []
    for i in reversed(range(NT)):
        dS_out.append(dS)
        dvt = dvn_c[:, i] + kg_c[:, i] @ dS  # [N, HV, C, V]
        dv_tot.append(dvt)
        dS = decay_C[:, i] * dS + dh_grid[:, i] - W_c[:, i].transpose(-1, -2) @ dvt  # dL/dS of this chunk
    return (lay.flat_chunks(torch.stack(dS_out[::-1], dim=1)), lay.from_chunks(torch.stack(dv_tot[::-1], dim=1)),
            dS)


# ----------------------------------------------------------------------------------------------
# Stage 6 backward: the output O = scale (Q * Gamma) S + A_qk v_new (report Eq. 9)
# ----------------------------------------------------------------------------------------------
def chunk_output_bwd(
    q: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    G: torch.Tensor,
    A_qk: torch.Tensor,
    scale: float,
    do: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`~kda_explained.chunked.stages.chunk_output`.

    Forward per chunk: ``O = qg S + A_qk v_new`` with ``qg = scale (Q * Gamma)``. Backward::

        dS = qg^T dO     dqg = dO S^T     dq = scale dqg * Gamma     dG = dqg * qg
        dA_qk = dO v_new^T                dv_new = A_qk^T dO

    ``q: [B, T, H, K]``, ``h: [NC, HV, K, V]``, ``v_new, do: [B, T, HV, V]``, ``G: [B, T, HV, K]``,
    ``A_qk: [B, T, HV, C]`` -> ``dq: [B, T, H, K]`` (summed over the value heads of a
    ``q`` head), ``dh: [NC, HV, K, V]``, ``dv_new: [B, T, HV, V]``, ``dG: [B, T, HV, K]``
    (``G``'s dtype), ``dA_qk: [B, T, HV, C]`` (the full matrix, as autograd gives it;
    only its lower triangle reaches the intra-chunk stage).
    """
    lay = _layout(q, chunk_size, cu_seqlens)
    dt = v_new.dtype
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    HV, H = G_c.shape[2], q.shape[2]
    Gamma = torch.exp(G_c).to(dt)  # [N, NT, HV, C, K]
    q_c = _expand_heads(lay.to_chunks(q.to(dt)), HV)  # [N, NT, HV, C, K]
    S_grid = lay.grid_chunks(h.to(dt))  # [N, NT, HV, K, V]
    do_c = lay.to_chunks(do.to(dt))  # [N, NT, HV, C, V]
    qg = scale * q_c * Gamma  # Eq. 9, inter-chunk part: O += qg S
    dS_grid = qg.transpose(-1, -2) @ do_c  # [N, NT, HV, K, V]
    dqg = do_c @ S_grid.transpose(-1, -2)  # [N, NT, HV, C, K]
    dq_c = scale * dqg * Gamma  # qg = scale q Gamma
    dG_c = dqg * qg  # d Gamma / dG = Gamma
    dA = do_c @ lay.to_chunks(v_new).transpose(-1, -2)  # Eq. 9, intra part: O += A_qk v_new; [N, NT, HV, C, C]
    dvn = lay.to_chunks(A_qk.to(dt)).transpose(-1, -2) @ do_c  # [N, NT, HV, C, V]
    return (
        lay.from_chunks(_sum_heads(dq_c, H)),
        lay.flat_chunks(dS_grid),
        lay.from_chunks(dvn),
        _fold_G_grad(lay, dG_c, G.dtype),
        lay.from_chunks(dA),
    )
