"""General DPLR beside KDA: the chunkwise algorithm for a diagonal-plus-low-rank transition (report §6.2).

The recurrence (one value head, state ``S_t: [K, V]``)::

    S_t = (Diag(exp(g_t)) - a_t b_t^T) S_{t-1} + k_t v_t^T
    o_t = S_t^T (scale * q_t)

KDA is the special case ``a_t = beta_t k_t``, ``b_t = k_t * exp(g_t)`` with the
written key ``beta_t k_t`` (:func:`kda_explained.naive.dplr`). This module runs
the general case chunk by chunk, with the same layout, stages and numerics as
:mod:`kda_explained.chunked.stages`, so that the two algorithms can be compared
stage for stage (:mod:`kda_explained.chunked.flops` counts what each costs).

Glossary (one chunk of ``C`` tokens, local index ``t``, one value head)
-----------------------------------------------------------------------
=============  ===========================================================================
``g``          per-channel log decay ``log(alpha)``, ``[C, K]``, ``<= 0``
``G``          in-chunk cumulative log decay ``G_t = sum_{i<=t} g_i``, ``[C, K]``
``G_prev``     the same one token earlier: ``G_prev_t = G_{t-1}`` (``G_{-1} = 0``), ``[C, K]``
``a, b``       the rank-1 factors of the transition, ``[C, K]``
``x_t``        the value the rank-1 term writes under key ``a_t``: ``x_t = -S_{t-1}^T b_t``, ``[V]``
``A_ba``       ``A_ba[t, j] = sum_c b_tc a_jc exp(G_{t-1,c} - G_jc)`` for ``j < t``, else 0
``A_bk``       the same with ``k_j`` in place of ``a_j``
``A_qa``       ``A_qa[t, j] = scale * sum_c q_tc a_jc exp(G_tc - G_jc)`` for ``j <= t``, else 0
``A_qk``       the same with ``k_j`` in place of ``a_j`` (as in KDA)
``M``          UT transform ``(I + A_ba)^{-1}``, unit lower-triangular
``W, U``       the WY factors: ``x = U - W S_0`` with ``W = M (B * exp(G_prev))``, ``U = -M A_bk V``
``S_0``        the state entering a chunk; ``h`` collects them for every chunk
=============  ===========================================================================

Derivation
----------
Name what the rank-1 term writes: with ``x_t = -(b_t^T S_{t-1})^T``, the step is

    S_t = Diag(alpha_t) S_{t-1} + a_t x_t^T + k_t v_t^T

a decayed sum of rank-1 writes, two per token, so inside a chunk with entering state ``S_0``

    S_t = Diag(exp(G_t)) S_0 + sum_{j <= t} Diag(exp(G_t - G_j)) (a_j x_j^T + k_j v_j^T).

Reading ``S_{t-1}`` with ``b_t`` gives a triangular system for every ``x`` of the chunk at once
(``b_t^T Diag(exp(G_{t-1} - G_j)) a_j = A_ba[t, j]``)::

    x + StrictTril(A_ba) x = -[(B * exp(G_prev)) S_0 + StrictTril(A_bk) V]
    x = -M [(B * exp(G_prev)) S_0 + A_bk V] = U - W S_0,      M = (I + A_ba)^{-1}

and reading ``S_t`` with ``scale q_t`` and with the decay to the chunk's end gives::

    O   = scale (Q * exp(G)) S_0 + A_qa x + A_qk V
    S_C = Diag(exp(G_C)) S_0 + (A * exp(G_C - G))^T x + (K * exp(G_C - G))^T V

Compared with KDA (:mod:`~kda_explained.chunked.stages`), where ``a``, ``b`` and the
written key are all multiples of ``k``, the two interaction matrices ``A_kk``,
``A_qk`` become four (``A_ba``, ``A_bk``, ``A_qa``, ``A_qk``), and every token
writes twice (``x`` under ``a``, ``v`` under ``k``) instead of once, which costs
one more matrix product in each of the WY, state and output stages.

Numerics: every exponent is ``<= 0``. ``A_ba`` and ``A_bk`` need the ratio
``exp(G_{t-1} - G_j)``, ``j < t``; forming it as ``exp(G_t - G_j) * exp(-g_t)``
would overflow for strong decay, so ``_decayed_products`` takes the row
and column log decays separately and uses ``G_prev`` on the rows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_chunk_size, check_floating, check_kda_inputs, check_shape
from . import stages
from .kda import CHUNK_SIZES, as_tensor_cu_seqlens, require_tensors
from .layout import ChunkLayout
from .stages import SUB_CHUNK, _chunk_G, _compute_dtype, _expand_heads, _layout

__all__ = [
    "dplr",
    "dplr_intra_chunk_matrices",
    "dplr_wy_representation",
    "dplr_state_passing",
    "dplr_chunk_output",
]


def _chunk_G_prev(lay: ChunkLayout, G: torch.Tensor) -> torch.Tensor:
    """``G: [B, T, HV, K]`` -> ``G_prev: [N, NT, HV, C, K]``, ``G_prev_t = G_{t-1}`` inside each chunk, 0 at its start.

    A shift of the chunk grid, not ``G - g``: exact, so ``G_prev_t - G_{t-1}`` is exactly 0.
    """
    G_c = _chunk_G(lay, G)  # [N, NT, HV, C, K]
    return torch.cat([torch.zeros_like(G_c[..., :1, :]), G_c[..., :-1, :]], dim=-2)


def _decayed_products(
    left: torch.Tensor, right: torch.Tensor, G_left: torch.Tensor, G_right: torch.Tensor, strict: bool
) -> torch.Tensor:
    """``P[r, j] = sum_c left_rc right_jc exp(G_left_rc - G_right_jc)`` for ``j < r`` (``j <= r`` unless strict).

    ``left, right, G_left, G_right: [..., C, K]`` -> ``[..., C, C]``.

    :func:`kda_explained.chunked.stages._decayed_products` with separate row and
    column log decays (there ``G_left = G_right = G``); here also
    ``G_left = G_prev``. The same secondary chunking keeps every exponent
    ``<= 0`` as long as ``G_left_r <= G_right_j`` whenever ``j <(=) r``, which
    holds for both because ``G`` never increases and ``G_prev_r = G_{r-1}``:

    - rows *below* sub-chunk ``b`` (``r >= e``), through ``G_ref = G_right[e - 1]``:
      ``G_left_r - G_ref <= 0`` (``r - 1 >= e - 1``) and ``G_ref - G_right_j <= 0`` (``j <= e - 1``);
    - rows *inside* ``b``: the ratio element by element on a ``[BC, BC, K]`` tile, masked before the ``exp``.
    """
    C = G_right.shape[-2]
    BC = min(SUB_CHUNK, C)
    P = left.new_zeros(*left.shape[:-2], C, C)
    for s in range(0, C, BC):
        e = s + BC  # sub-chunk b = tokens [s, e)
        diff = G_left[..., s:e, None, :] - G_right[..., None, s:e, :]  # [..., BC(r), BC(j), K]
        causal = torch.ones(BC, BC, dtype=torch.bool, device=G_right.device).tril(-1 if strict else 0)
        ratio = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf"))).to(left.dtype)
        pair = left[..., s:e, None, :] * right[..., None, s:e, :]  # [..., BC(r), BC(j), K]
        P[..., s:e, s:e] = (pair * ratio).sum(-1)
        if e < C:
            G_ref = G_right[..., e - 1 : e, :]  # [..., 1, K]
            left_dec = left[..., e:, :] * torch.exp(G_left[..., e:, :] - G_ref).to(left.dtype)  # exp(<= 0)
            right_dec = right[..., s:e, :] * torch.exp(G_ref - G_right[..., s:e, :]).to(right.dtype)  # exp(<= 0)
            P[..., e:, s:e] = left_dec @ right_dec.transpose(-1, -2)
    return P


# ----------------------------------------------------------------------------------------------
# Stage 2: the four intra-chunk interaction matrices (stage 1, G, is stages.chunk_local_cumsum)
# ----------------------------------------------------------------------------------------------
def dplr_intra_chunk_matrices(
    q: torch.Tensor,
    k: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``A_ba, A_bk`` (strict, rows decayed from ``G_prev``) and ``A_qa, A_qk`` (causal, scaled) of every chunk.

    ``q, k: [B, T, H, K]``; ``a, b, G: [B, T, HV, K]`` -> four ``[B, T, HV, C]``:
    row ``t`` holds the entries against the ``C`` tokens of ``t``'s own chunk.
    """
    lay = _layout(q, chunk_size, cu_seqlens)
    dt = _compute_dtype(q)
    # exponents from the float64 G, as in the KDA stages: a float32 G of several hundred would
    # carry its rounding into every ratio
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    G_prev = _chunk_G_prev(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    HV = G_c.shape[2]
    q_c = _expand_heads(lay.to_chunks(q.to(dt)), HV)  # [N, NT, HV, C, K]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    a_c, b_c = lay.to_chunks(a.to(dt)), lay.to_chunks(b.to(dt))  # [N, NT, HV, C, K]
    A_ba = _decayed_products(b_c, a_c, G_prev, G_c, strict=True)  # b_t^T Diag(exp(G_{t-1} - G_j)) a_j, j < t
    A_bk = _decayed_products(b_c, k_c, G_prev, G_c, strict=True)  # b_t^T Diag(exp(G_{t-1} - G_j)) k_j, j < t
    A_qa = scale * _decayed_products(q_c, a_c, G_c, G_c, strict=False)  # scale q_t^T Diag(exp(G_t - G_j)) a_j
    A_qk = scale * _decayed_products(q_c, k_c, G_c, G_c, strict=False)  # scale q_t^T Diag(exp(G_t - G_j)) k_j
    return tuple(lay.from_chunks(A) for A in (A_ba, A_bk, A_qa, A_qk))


# Stage 3, M = (I + A_ba)^{-1}, is stages.ut_transform applied to A_ba.


# ----------------------------------------------------------------------------------------------
# Stage 4: the WY factors, x = U - W S_0
# ----------------------------------------------------------------------------------------------
def dplr_wy_representation(
    b: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    M: torch.Tensor,
    A_bk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W = M (B * exp(G_prev))`` and ``U = -M (A_bk V)``, so that ``x = U - W S_0``.

    ``b, G: [B, T, HV, K]``, ``v: [B, T, HV, V]``, ``M, A_bk: [B, T, HV, C]`` ->
    ``W: [B, T, HV, K]``, ``U: [B, T, HV, V]``.
    """
    lay = _layout(b, chunk_size, cu_seqlens)
    dt = M.dtype
    G_prev = _chunk_G_prev(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    M_c = lay.to_chunks(M)  # [N, NT, HV, C, C]
    W = M_c @ (lay.to_chunks(b.to(dt)) * torch.exp(G_prev).to(dt))  # M (B * exp(G_prev))  [N, NT, HV, C, K]
    U = -(M_c @ (lay.to_chunks(A_bk) @ lay.to_chunks(v.to(dt))))  # -M (A_bk V)           [N, NT, HV, C, V]
    return lay.from_chunks(W), lay.from_chunks(U)


# ----------------------------------------------------------------------------------------------
# Stage 5: inter-chunk state passing
# ----------------------------------------------------------------------------------------------
def dplr_state_passing(
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry the state across chunks, sequentially. For each chunk, with ``S`` the state entering it::

        x  = U - W S                                                        # what the rank-1 term writes
        S <- Diag(exp(G_C)) S + (A * exp(G_C - G))^T x + (K * exp(G_C - G))^T V

    ``k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``a, W, G: [B, T, HV, K]``, ``U: [B, T, HV, V]``,
    ``initial_state: [N, HV, K, V]`` or ``None`` -> ``h: [NC, HV, K, V]`` (the state entering
    every chunk), ``x: [B, T, HV, V]``, ``final_state: [N, HV, K, V]``.
    """
    lay = _layout(k, chunk_size, cu_seqlens)
    dt = W.dtype
    W_c, U_c, G_c = lay.to_chunks(W), lay.to_chunks(U), _chunk_G(lay, G.to(torch.float64))
    N, NT, HV, C, K = W_c.shape
    v_c = lay.to_chunks(v.to(dt))  # [N, NT, HV, C, V]
    G_last = G_c[..., -1:, :]  # [N, NT, HV, 1, K]: G_C (padding repeats the last real G)
    to_end = torch.exp(G_last - G_c).to(dt)  # exp(G_C - G_t), exponents <= 0    [N, NT, HV, C, K]
    a_dec = lay.to_chunks(a.to(dt)) * to_end  # A * exp(G_C - G)               [N, NT, HV, C, K]
    k_dec = _expand_heads(lay.to_chunks(k.to(dt)), HV) * to_end  # K * exp(G_C - G)
    S = W.new_zeros(N, HV, K, v_c.shape[-1]) if initial_state is None else initial_state.to(dt)
    h, xs = [], []
    for i in range(NT):
        h.append(S)
        x = U_c[:, i] - W_c[:, i] @ S  # [N, HV, C, V]
        S = (
            torch.exp(G_last[:, i]).to(dt).transpose(-1, -2) * S  # Diag(exp(G_C)) S_0
            + a_dec[:, i].transpose(-1, -2) @ x  # + (A * exp(G_C - G))^T x
            + k_dec[:, i].transpose(-1, -2) @ v_c[:, i]  # + (K * exp(G_C - G))^T V
        )
        xs.append(x)
    return lay.flat_chunks(torch.stack(h, dim=1)), lay.from_chunks(torch.stack(xs, dim=1)), S


# ----------------------------------------------------------------------------------------------
# Stage 6: the output
# ----------------------------------------------------------------------------------------------
def dplr_chunk_output(
    q: torch.Tensor,
    h: torch.Tensor,
    x: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    A_qa: torch.Tensor,
    A_qk: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``O = scale (Q * exp(G)) S_0 + A_qa x + A_qk V``.

    The first two terms are KDA's output stage (:func:`~kda_explained.chunked.stages.chunk_output`) with ``x``
    as the written values; the third reads the direct writes ``k_j v_j^T``, which KDA
    folds into its single written value.

    ``q: [B, T, H, K]``, ``h: [NC, HV, K, V]``, ``x, v: [B, T, HV, V]``, ``G: [B, T, HV, K]``,
    ``A_qa, A_qk: [B, T, HV, C]`` -> ``o: [B, T, HV, V]`` in the compute dtype.
    """
    lay = _layout(q, chunk_size, cu_seqlens)
    qg, _ = stages.decayed_operands(q, q, G, scale, chunk_size, cu_seqlens)  # scale Q * Gamma  [B, T, HV, K]
    recalled_and_x = stages.chunk_output(qg, h, x, A_qa, chunk_size, cu_seqlens)  # [B, T, HV, V]
    direct = lay.to_chunks(A_qk) @ lay.to_chunks(v.to(x.dtype))  # A_qk V   [N, NT, HV, C, V]
    return recalled_and_x + lay.from_chunks(direct)


def dplr(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    g: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    chunk_size: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """General DPLR ``S_t = (Diag(exp(g_t)) - a_t b_t^T) S_{t-1} + k_t v_t^T`` chunk by chunk (report §6.2).

    Shapes as :func:`kda_explained.naive.dplr`: ``q, k: [B, T, H, K]``,
    ``v: [B, T, HV, V]``, ``a, b, g: [B, T, HV, K]`` (per value head),
    ``initial_state: [N, HV, K, V]``, ``cu_seqlens: [N + 1]``. Computes in float32
    (float64 for float64 ``g``), differentiably. Returns ``o: [B, T, HV, V]`` in
    ``v``'s dtype and the final state ``[N, HV, K, V]`` or ``None``.

    >>> import torch
    >>> from kda_explained import naive
    >>> from kda_explained.testing import rel_rms_error
    >>> torch.manual_seed(0) and None
    >>> B, T, H, K, V = 1, 37, 2, 8, 4
    >>> q, k, a, b = (torch.randn(B, T, H, K, dtype=torch.float64) * K ** -0.5 for _ in range(4))
    >>> v = torch.randn(B, T, H, V, dtype=torch.float64); g = -torch.rand(B, T, H, K, dtype=torch.float64)
    >>> o, S = dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=16)
    >>> o_ref, S_ref = naive.dplr(*(x.numpy() for x in (q, k, v, a, b, g)), output_final_state=True)
    >>> rel_rms_error(o, o_ref) < 1e-12 and rel_rms_error(S, S_ref) < 1e-12
    True
    """
    require_tensors(q=q, k=k, v=v, a=a, b=b, g=g, initial_state=initial_state)
    chunk_size = check_chunk_size(chunk_size, CHUNK_SIZES)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    # check g (and q, k, v) first, so that a malformed g is reported as g, not as an a that fails to match it
    p = check_kda_inputs(q, k, v, g, None, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    for name, x in (("a", a), ("b", b)):
        check_floating(name, x)
        check_shape(name, x, g.shape, "B, T, HV, K", "like g")
        if x.device != g.device:
            raise ValueError(f"{name}: expected on device {g.device} like g, got {x.device}")
    C = chunk_size

    G = stages.chunk_local_cumsum(g, C, cu_seqlens)  # 1. G in log space                         [B, T, HV, K]
    A_ba, A_bk, A_qa, A_qk = dplr_intra_chunk_matrices(q, k, a, b, G, p.scale, C, cu_seqlens)  # 2. [B, T, HV, C]
    M = stages.ut_transform(A_ba, C, cu_seqlens)  # 3. M = (I + A_ba)^{-1}                        [B, T, HV, C]
    W, U = dplr_wy_representation(b, v, G, M, A_bk, C, cu_seqlens)  # 4. x = U - W S_0  [B, T, HV, K], [.., V]
    h, x, S = dplr_state_passing(k, v, a, W, U, G, initial_state, C, cu_seqlens)  # 5.       [NC, HV, K, V], ...
    o = dplr_chunk_output(q, h, x, v, G, A_qa, A_qk, p.scale, C, cu_seqlens)  # 6.             [B, T, HV, V]
    return o.to(v.dtype), (S if output_final_state else None)
