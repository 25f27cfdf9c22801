"""The chunkwise KDA algorithm (report §3.1, Eq. 2–9) as pure PyTorch stage functions.

Each stage takes and returns tensors in the token layout ``[B, T, HV, ...]`` (the
layout of the design contract, docs/design.md, and of the Triton kernels that mirror
these stages), and works inside on the chunk grid of
:class:`~kda_explained.chunked.layout.ChunkLayout`.

Glossary (one chunk of ``C`` tokens, local index ``r``, one value head)
-----------------------------------------------------------------------
=============  ========================================================================
``g``          per-channel log decay ``log(alpha)``, ``[C, K]``, ``<= 0``
``G``          in-chunk cumulative log decay ``G_r = sum_{i<=r} g_i`` (stage 1), ``[C, K]``
``Gamma``      cumulative decay ``exp(G)``, every entry in ``(0, 1]``; never inverted
``A_kk``       ``Diag(beta) StrictTril(K Diag-ratio K^T)``: ``A_kk[r, j] = beta_r sum_c k_rc k_jc exp(G_rc - G_jc)``, ``j < r`` (Eq. 5)
``A_qk``       ``scale * Tril(Q Diag-ratio K^T)``, ``j <= r`` (the intra-chunk attention of Eq. 9)
``M``          UT transform ``(I + A_kk)^{-1}`` (Eq. 6)
``W, U``       WY factors ``W = M Diag(beta)(Gamma * K)``, ``U = M Diag(beta) V`` (Eq. 7)
``S``          the state entering a chunk ``[K, V]``; ``h`` collects them for every chunk
``v_new``      pseudo-values ``U - W S``: what each token really writes (Eq. 8)
=============  ========================================================================

Why these shapes of the algorithm: the delta-rule updates of a chunk,
``prod_r (I - beta_r k_r k_r^T) Diag(alpha_r)``, compress (WY representation) to
``Diag(Gamma_C) - sum_r (...) w_r^T``; the UT transform finds all the ``w`` and
``u`` of a chunk with one triangular inverse ``M`` instead of ``C`` sequential
rank-1 updates, so the chunk becomes matrix products (report Eq. 2–7). Between
chunks only the ``[K, V]`` state travels (Eq. 8), and the output adds what the
state recalls to what the chunk itself wrote (Eq. 9).

Numerics: decays enter only as ratios ``exp(G_r - G_j)`` with ``j <= r``, so every
exponent is ``<= 0`` (see :func:`intra_chunk_matrices` for how the matrix
products keep that property with a reference point per sub-chunk).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..numerics import gate_floor
from .layout import ChunkLayout

__all__ = [
    "chunk_local_cumsum",
    "intra_chunk_matrices",
    "ut_transform",
    "wy_representation",
    "decayed_operands",
    "state_passing",
    "chunk_output",
    "SUB_CHUNK",
]

#: Sub-chunk width of the secondary chunking in :func:`intra_chunk_matrices`. The exact
#: diagonal tiles cost ``C * SUB_CHUNK * K`` exponentials per chunk, the products below them
#: the same matrix FLOPs whatever the width: 8 measured 3x faster than 16 on the CPU
#: (``benchmarks/cpu_chunked.py``). The Triton kernels use 16 (tensor-core tiles).
SUB_CHUNK = 8


def _layout(x: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor]) -> ChunkLayout:
    return ChunkLayout.build(x.shape[0], x.shape[1], chunk_size, cu_seqlens, x.device)


def _chunk_G(lay: ChunkLayout, G: torch.Tensor) -> torch.Tensor:
    """``G: [B, T, HV, K]`` -> ``[N, NT, HV, C, K]``, padding with the chunk's last real ``G``.

    Padding with the last value (as a cumulative sum of zero-padded ``g`` would)
    keeps every ratio ``exp(G_r - G_j)`` with ``j <= r`` at most 1 in the
    padding too, so ``0 * exp(...)`` never becomes ``0 * inf``.
    """
    G_c = lay.to_chunks(G)  # [N, NT, HV, C, K], zeros in the padding
    N, NT, HV, C, K = G_c.shape
    n_real = lay.real_tokens.to(G.device)  # [N, NT] real tokens per chunk
    last = (n_real - 1).clamp(min=0)[:, :, None, None, None].expand(N, NT, HV, 1, K)
    G_last = torch.gather(G_c, 3, last)  # [N, NT, HV, 1, K]
    pad = torch.arange(C, device=G.device)[None, None, :] >= n_real[:, :, None]  # [N, NT, C]
    return torch.where(pad[:, :, None, :, None], G_last, G_c)


def _expand_heads(x: torch.Tensor, HV: int) -> torch.Tensor:
    """GVA: ``[N, NT, H, C, K]`` -> ``[N, NT, HV, C, K]``; value head ``j`` reads head ``j // (HV // H)``."""
    return x.repeat_interleave(HV // x.shape[2], dim=2)


# ----------------------------------------------------------------------------------------------
# Stage 1: the in-chunk cumulative log decay (report Eq. 2, Gamma in log space)
# ----------------------------------------------------------------------------------------------
def chunk_local_cumsum(g: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``G_r = sum_{i <= r} g_i``, restarting at every chunk start of every sequence.

    ``g: [B, T, HV, K]`` -> ``G: [B, T, HV, K]``, always in float64. Chunks start at
    each sequence's first token (``cu_seqlens``), not at multiples of ``chunk_size``
    in the packed row.

    Why float64 even for float32 inputs: with strong gates ``G`` reaches several
    hundred inside a chunk, where a float32 running sum carries an absolute error
    of about ``600 * 6e-8 = 4e-5``, and every ratio ``exp(G_r - G_j)`` inherits it
    as a *relative* error. The stages form their exponents from the float64 ``G``
    and only then drop to the compute dtype. (One ``[B, T, HV, K]`` tensor: cheap.)

    Each ``g`` is first raised to :func:`~kda_explained.numerics.gate_floor` of float64:
    a full reset ``g = -inf`` (or ``-1e10``, one in effect) would otherwise make
    ``G_r - G_j`` NaN (``-inf + inf``) or swallow every later gate in rounding. A ratio
    across a floored gate is ``exp(<= -745) = 0``, as the true one rounds to, and the
    gradient of a floored ``g`` is 0, as the true one is.
    """
    lay = _layout(g, chunk_size, cu_seqlens)
    g_c = lay.to_chunks(g.to(torch.float64).clamp_min(gate_floor(torch.float64)))  # [N, NT, HV, C, K]
    return lay.from_chunks(g_c.cumsum(dim=3))


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (bf16, fp16, fp32) computes in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------
# Stage 2: the intra-chunk interaction matrices A_kk and A_qk (report Eq. 5 and Eq. 9)
# ----------------------------------------------------------------------------------------------
def _decayed_products(lefts, right: torch.Tensor, G: torch.Tensor, stricts):
    """``P[r, j] = sum_c left_rc right_jc exp(G_rc - G_jc)`` for ``j < r`` (``j <= r`` unless strict), else 0.

    ``lefts``: a tuple of ``[..., C, K]`` tensors sharing ``right: [..., C, K]`` and
    the float64 ``G: [..., C, K]``; returns one ``[..., C, C]`` matrix per left, in
    ``right``'s dtype. (A_kk and A_qk share their decay ratios, so they are built
    in one pass.)

    Secondary chunking keeps every exponent ``<= 0``. Columns are taken one
    sub-chunk ``b`` of width ``SUB_CHUNK`` at a time, with the reference point
    ``G_ref = G`` at the last token of ``b``:

    - rows *below* ``b`` (``r`` after the sub-chunk): one matrix product of
      ``left_r * exp(G_r - G_ref)`` and ``right_j * exp(G_ref - G_j)``. Since
      ``j <= ref <= r`` both exponents are ``<= 0``: no overflow, and a factor
      underflows only when the true ratio is itself negligible.
    - rows *inside* ``b`` (the diagonal block): the ratio ``exp(G_r - G_j)``
      element by element on a ``[BC, BC, K]`` tile, masked before the ``exp``.

    Exponents are differences of float64 ``G``, then cast to ``right``'s dtype. Row
    ``r`` reads ``G`` only at tokens up to ``r`` (the reference point of the rows
    below a sub-chunk lies before them, and the diagonal tile needs none), so no
    later input can change an earlier row, not even by rounding.
    """
    dt = right.dtype
    C = G.shape[-2]
    BC = min(SUB_CHUNK, C)
    P = [right.new_zeros(*right.shape[:-2], C, C) for _ in lefts]
    for s in range(0, C, BC):
        e = s + BC  # sub-chunk b = tokens [s, e)
        G_ref = G[..., e - 1 : e, :]  # [..., 1, K] float64
        # diagonal block: exact ratios on a [BC, BC, K] tile, each exponent G_r - G_j in float64
        diff = (G[..., s:e, None, :] - G[..., None, s:e, :]).to(dt)  # [..., BC(r), BC(j), K]
        causal = torch.ones(BC, BC, dtype=torch.bool, device=G.device).tril()  # j <= r
        ratio = torch.exp(diff.masked_fill(~causal[:, :, None], float("-inf")))
        ratio_right = ratio * right[..., None, s:e, :]  # [..., BC(r), BC(j), K]
        strict_mask = torch.ones(BC, BC, dtype=dt, device=G.device).tril(-1)
        for i, (left, strict) in enumerate(zip(lefts, stricts)):
            block = (left[..., s:e, None, :] * ratio_right).sum(-1)  # [..., BC, BC]
            P[i][..., s:e, s:e] = block * strict_mask if strict else block
        if e < C:
            # rows below the block: one product through the reference point G_ref = G[e - 1]
            row_dec = torch.exp((G[..., e:, :] - G_ref).to(dt))  # exp(<= 0)
            right_dec = right[..., s:e, :] * torch.exp((G_ref - G[..., s:e, :]).to(dt))  # exp(<= 0)
            for i, left in enumerate(lefts):
                P[i][..., e:, s:e] = (left[..., e:, :] * row_dec) @ right_dec.transpose(-1, -2)
    return P


def intra_chunk_matrices(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``A_kk`` (Eq. 5, with ``beta`` on its rows) and ``A_qk`` (scaled, causal) of every chunk.

    ``q, k: [B, T, H, K]``; ``G: [B, T, HV, K]`` from :func:`chunk_local_cumsum`;
    ``beta: [B, T, HV]`` -> ``A_kk, A_qk: [B, T, HV, C]``: row ``t`` holds the
    entries against the ``C`` tokens of ``t``'s own chunk.

    - ``A_kk[r, j] = beta_r * sum_c k_rc k_jc exp(G_rc - G_jc)`` for ``j < r``, else 0;
    - ``A_qk[r, j] = scale * sum_c q_rc k_jc exp(G_rc - G_jc)`` for ``j <= r``, else 0.
    """
    lay = _layout(q, chunk_size, cu_seqlens)
    dt = _compute_dtype(q)
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    HV = G_c.shape[2]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    q_c = _expand_heads(lay.to_chunks(q.to(dt)), HV)  # [N, NT, HV, C, K]
    beta_c = lay.to_chunks(beta.to(dt))  # [N, NT, HV, C]
    kk, qk = _decayed_products((k_c, q_c), k_c, G_c, stricts=(True, False))  # [N, NT, HV, C, C] each
    A_kk = beta_c[..., :, None] * kk
    A_qk = scale * qk
    return lay.from_chunks(A_kk), lay.from_chunks(A_qk)


# ----------------------------------------------------------------------------------------------
# Stage 3: the UT transform M = (I + A_kk)^{-1} (report Eq. 6)
# ----------------------------------------------------------------------------------------------
def _unit_lower_inverse(A: torch.Tensor) -> torch.Tensor:
    """``(I + A)^{-1}`` for strictly lower-triangular ``A: [..., C, C]``, by forward substitution.

    From ``M = I - A M``, row ``i`` of ``M`` needs only the rows above it:
    ``M_i = e_i - sum_{j < i} A_ij M_j``.
    """
    C = A.shape[-1]
    eye = torch.eye(C, dtype=A.dtype, device=A.device).expand(A.shape)
    rows = [eye[..., 0, :]]
    for i in range(1, C):
        M_above = torch.stack(rows, dim=-2)  # [..., i, C]
        rows.append(eye[..., i, :] - (A[..., i, None, :i] @ M_above).squeeze(-2))
    return torch.stack(rows, dim=-2)


def ut_transform(A_kk: torch.Tensor, chunk_size: int, cu_seqlens: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``M = (I + A_kk)^{-1}`` per chunk (Eq. 6): ``A_kk: [B, T, HV, C]`` -> ``M: [B, T, HV, C]``.

    ``M`` is unit lower-triangular like ``I + A_kk``.
    """
    lay = _layout(A_kk, chunk_size, cu_seqlens)
    return lay.from_chunks(_unit_lower_inverse(lay.to_chunks(A_kk)))


# ----------------------------------------------------------------------------------------------
# Stage 4: the WY factors W and U (report Eq. 7)
# ----------------------------------------------------------------------------------------------
def wy_representation(
    k: torch.Tensor,
    v: torch.Tensor,
    G: torch.Tensor,
    beta: torch.Tensor,
    M: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """``W = M Diag(beta) (Gamma * K)`` and ``U = M Diag(beta) V`` (Eq. 7).

    ``k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``G: [B, T, HV, K]``, ``beta: [B, T, HV]``,
    ``M: [B, T, HV, C]`` -> ``W: [B, T, HV, K]``, ``U: [B, T, HV, V]``.
    """
    lay = _layout(k, chunk_size, cu_seqlens)
    dt = M.dtype
    G_c = _chunk_G(lay, G.to(torch.float64))  # [N, NT, HV, C, K]
    HV = G_c.shape[2]
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)  # [N, NT, HV, C, K]
    beta_c = lay.to_chunks(beta.to(dt))[..., None]  # [N, NT, HV, C, 1]
    M_c = lay.to_chunks(M)  # [N, NT, HV, C, C]
    W = M_c @ (beta_c * torch.exp(G_c).to(dt) * k_c)  # [N, NT, HV, C, K]
    U = M_c @ (beta_c * lay.to_chunks(v.to(dt)))  # [N, NT, HV, C, V]
    return lay.from_chunks(W), lay.from_chunks(U)


def decayed_operands(
    q: torch.Tensor,
    k: torch.Tensor,
    G: torch.Tensor,
    scale: float,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
):
    """``qg = scale * q * Gamma`` and ``kg = K * Gamma_C / Gamma``: the decayed operands of Eq. 8 and 9.

    Stages 5 and 6 take them (:func:`state_passing` the keys, :func:`chunk_output` the
    queries), as their twins in the fast layer do, where the fused stage 2-4 kernel
    (:func:`kda_explained.fast.local.chunk_local_factors`) writes them; it is tested against
    this function. ``q, k: [B, T, H, K]``, ``G: [B, T, HV, K]`` ->
    ``qg, kg: [B, T, HV, K]`` (``G``'s dtype).
    """
    lay = _layout(k, chunk_size, cu_seqlens)
    HV, dt = G.shape[2], G.dtype
    G_c = _chunk_G(lay, G)  # [N, NT, HV, C, K], padding repeats the last real G
    k_c = _expand_heads(lay.to_chunks(k.to(dt)), HV)
    kg = lay.from_chunks(k_c * torch.exp(G_c[..., -1:, :] - G_c))  # exponents <= 0
    qg = scale * q.to(dt).repeat_interleave(HV // q.shape[2], dim=2) * torch.exp(G)
    return qg, kg


# ----------------------------------------------------------------------------------------------
# Stage 5: inter-chunk state passing (report Eq. 8)
# ----------------------------------------------------------------------------------------------
def state_passing(
    kg: torch.Tensor,
    W: torch.Tensor,
    U: torch.Tensor,
    G: torch.Tensor,
    initial_state: Optional[torch.Tensor],
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Carry the state across chunks (Eq. 8), sequentially.

    For each chunk, with ``S`` the state entering it::

        v_new = U - W S                         # what each token really writes
        S    <- Diag(Gamma_C) S + kg^T v_new    # kg = K * Gamma_C / Gamma, exp(G_C - G_r) <= 1

    ``kg: [B, T, HV, K]`` (from :func:`decayed_operands`), ``W: [B, T, HV, K]``,
    ``U: [B, T, HV, V]``, ``G: [B, T, HV, K]`` (read at each chunk's last token),
    ``initial_state: [N, HV, K, V]`` or ``None`` ->
    ``h: [NC, HV, K, V]`` (the state entering every chunk, sequence by sequence),
    ``v_new: [B, T, HV, V]``, ``final_state: [N, HV, K, V]``.
    """
    lay = _layout(kg, chunk_size, cu_seqlens)
    dt = W.dtype
    W_c, U_c, G_c = lay.to_chunks(W), lay.to_chunks(U), _chunk_G(lay, G.to(torch.float64))
    N, NT, HV, C, K = W_c.shape
    Vd = U_c.shape[-1]
    # A chunk of padding has W = U = kg = 0 and G = 0 (Gamma = 1), so it leaves S unchanged.
    G_last = G_c[..., -1:, :]  # [N, NT, HV, 1, K]: Gamma_C in log space (padding repeats the last real G)
    k_dec = lay.to_chunks(kg.to(dt))  # K * Gamma_C / Gamma                            [N, NT, HV, C, K]
    decay_C = torch.exp(G_last).to(dt).transpose(-1, -2)  # [N, NT, HV, K, 1]: Gamma_C
    S = W.new_zeros(N, HV, K, Vd) if initial_state is None else initial_state.to(dt)
    h, v_new = [], []
    for i in range(NT):
        h.append(S)
        v_i = U_c[:, i] - W_c[:, i] @ S  # [N, HV, C, V]
        S = decay_C[:, i] * S + k_dec[:, i].transpose(-1, -2) @ v_i
        v_new.append(v_i)
    h_grid = torch.stack(h, dim=1)  # [N, NT, HV, K, V]
    return lay.flat_chunks(h_grid), lay.from_chunks(torch.stack(v_new, dim=1)), S


# ----------------------------------------------------------------------------------------------
# Stage 6: the output (report Eq. 9)
# ----------------------------------------------------------------------------------------------
def chunk_output(
    qg: torch.Tensor,
    h: torch.Tensor,
    v_new: torch.Tensor,
    A_qk: torch.Tensor,
    chunk_size: int,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``O = qg S + A_qk v_new`` (Eq. 9, ``qg = scale (Q * Gamma)``): what the state recalls plus what the chunk wrote.

    ``qg: [B, T, HV, K]`` (from :func:`decayed_operands`), ``h: [NC, HV, K, V]`` from
    :func:`state_passing`, ``v_new: [B, T, HV, V]``, ``A_qk: [B, T, HV, C]`` ->
    ``o: [B, T, HV, V]`` in ``v_new``'s dtype.
    """
    lay = _layout(qg, chunk_size, cu_seqlens)
    dt = v_new.dtype
    S_grid = lay.grid_chunks(h)  # [N, NT, HV, K, V]
    inter = lay.to_chunks(qg.to(dt)) @ S_grid  # [N, NT, HV, C, V]
    intra = lay.to_chunks(A_qk) @ lay.to_chunks(v_new)  # [N, NT, HV, C, V]
    return lay.from_chunks(inter + intra)
