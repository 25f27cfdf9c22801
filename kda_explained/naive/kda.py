"""Kimi Delta Attention, the definition: report Eq. 1 token by token, and its parallel form.

Glossary
--------
=================  ==================================================================
``S_t``            state after token ``t``, ``[K, V]`` per value head (float64)
``g_t``            per-channel log decay, ``[K]``, ``<= 0``
``alpha_t``        per-channel decay ``exp(g_t)``
``beta_t``         write strength, scalar in ``[0, 1]``
``G_t``            cumulative log decay ``sum_{i<=t} g_i`` inside one sequence, ``[K]``
``Gamma_t``        cumulative decay ``exp(G_t)`` (never inverted: see *Numerics* below)
``u_t``            the value actually written at ``t`` (the "pseudo-value"), ``[V]``
``A_kk, A_qk``     token-pair interaction matrices of the parallel form, ``[L, L]``
=================  ==================================================================

The recurrence (report Eq. 1)::

    S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T
    o_t = S_t^T (scale * q_t)

The parallel form (report Table 6) follows by naming what each token writes.
Expanding the update as ``S_t = Diag(alpha_t) S_{t-1} + k_t u_t^T`` with

    u_t = beta_t (v_t - (Diag(alpha_t) S_{t-1})^T k_t)

and unrolling ``S_{t-1}`` gives, for one sequence of length ``L`` with state ``S_0``::

    (I + Diag(beta) StrictTril(A_kk)) U = Diag(beta) (V - (K * Gamma) S_0)       # a unit lower-triangular solve
    O   = scale * ((Q * Gamma) S_0 + Tril(A_qk) U)
    S_L = Diag(Gamma_L) S_0 + (K * Gamma_L / Gamma)^T U

with ``A_kk[t, j] = sum_c k_tc k_jc exp(G_tc - G_jc)`` and ``A_qk`` the same with
``q_t``. Numerics: the ratio ``Gamma_t / Gamma_j`` is formed as ``exp(G_t - G_j)``
for ``j <= t`` only (an exponent ``<= 0``), never as a quotient, so strong decay
underflows gracefully to 0 instead of overflowing ``1 / Gamma`` to ``inf``.
"""

from __future__ import annotations

from typing import Optional, Tuple

import numpy as np

from ..numerics import gate_floor
from ..validation import check_g_domain, check_kda_inputs
from .ladder import scan

__all__ = ["kda", "kda_parallel"]


def _kda_step(S: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray) -> np.ndarray:
    """One token of report Eq. 1 on a ``[K, V]`` state."""
    S = np.exp(g)[:, None] * S  # Diag(alpha_t) S_{t-1}: each key channel decays at its own rate
    S = S - beta * np.outer(k, k @ S)  # (I - beta_t k_t k_t^T) .  : erase what k_t currently recalls
    return S + beta * np.outer(k, v)  # + beta_t k_t v_t^T        : write v_t under k_t


def kda(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[np.ndarray] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """KDA by its recurrence (report Eq. 1), one token at a time, in float64.

    Args:
        q, k: ``[B, T, H, K]``.
        v: ``[B, T, HV, V]``; value head ``j`` reads q/k head ``j // (HV // H)``.
        g: ``[B, T, HV, K]`` log decay in ``[-inf, 0]`` (``-inf``: a full reset); anything
            else (``g > 0``, NaN) raises :class:`ValueError`.
        beta: ``[B, T, HV]`` write strength.
        scale: query scale, default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` or ``None`` (zeros).
        output_final_state: also return the state after the last token.
        cu_seqlens: ``[N + 1]`` offsets of a packed batch (``B == 1``).

    Returns:
        ``o: [B, T, HV, V]`` in ``v``'s dtype, and the float64 final state
        ``[N, HV, K, V]`` or ``None``.

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> q, k = rng.standard_normal((2, 1, 5, 2, 4)); v = rng.standard_normal((1, 5, 2, 3))
    >>> g = -rng.random((1, 5, 2, 4)); beta = rng.random((1, 5, 2))
    >>> o, S = kda(q, k, v, g, beta, output_final_state=True)
    >>> o.shape, S.shape
    ((1, 5, 2, 3), (1, 2, 4, 3))
    >>> o2, S2 = kda_parallel(q, k, v, g, beta, output_final_state=True)
    >>> bool(np.allclose(o, o2) and np.allclose(S, S2))
    True
    """
    return scan(_kda_step, q, k, v, {"g": np.asarray(g), "beta": np.asarray(beta)}, scale=scale,
                initial_state=initial_state, output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                g=np.asarray(g), beta=np.asarray(beta))


def _decay_ratios(G_row: np.ndarray, G_col: np.ndarray) -> np.ndarray:
    """``R[t, j, c] = exp(G_row[t, c] - G_col[j, c])`` where ``j <= t``, else 0; ``[L, L, K]``.

    Only exponents ``<= 0`` are evaluated (decay ratios), never ``1 / Gamma``.
    """
    L = G_row.shape[0]
    causal = np.tril(np.ones((L, L), dtype=bool))[:, :, None]  # [L, L, 1]
    diff = G_row[:, None, :] - G_col[None, :, :]  # [L, L, K]
    return np.exp(np.where(causal, diff, -np.inf))


def _kda_parallel_one(q, k, v, g, beta, S0, scale):
    """The parallel form for one sequence and one head: ``q, k, g: [L, K]``, ``v: [L, V]``, ``beta: [L]``."""
    L = q.shape[0]
    # G_t = sum_{i<=t} g_i, each g raised to the float64 floor first: a ratio across a
    # reset (g = -inf) is then exp(<= floor) = 0 instead of exp(-inf + inf) = NaN
    G = np.cumsum(np.maximum(g, gate_floor(np.float64)), axis=0)  # [L, K]
    R = _decay_ratios(G, G)  # Gamma_t / Gamma_j for j <= t                [L, L, K]
    A_kk = np.einsum("tc,jc,tjc->tj", k, k, R)  # k_t^T Diag(Gamma_t/Gamma_j) k_j  [L, L]
    A_qk = np.einsum("tc,jc,tjc->tj", q, k, R)  # q_t^T Diag(Gamma_t/Gamma_j) k_j  [L, L] (lower incl. diag)
    lhs = np.eye(L) + beta[:, None] * np.tril(A_kk, -1)  # I + Diag(beta) StrictTril(A_kk)
    rhs = beta[:, None] * (v - (k * np.exp(G)) @ S0)  # Diag(beta) (V - (K * Gamma) S_0)   [L, V]
    U = np.linalg.solve(lhs, rhs)  # the written values u_t                                 [L, V]
    O = scale * ((q * np.exp(G)) @ S0 + A_qk @ U)  # [L, V]
    S_L = np.exp(G[-1])[:, None] * S0 + (k * np.exp(G[-1][None, :] - G)).T @ U  # [K, V]
    return O, S_L


def kda_parallel(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    g: np.ndarray,
    beta: np.ndarray,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[np.ndarray] = None,
    output_final_state: bool = False,
    cu_seqlens: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """KDA by its closed parallel form (report Table 6): one triangular solve per sequence.

    Same arguments and results as :func:`kda`. It builds ``[L, L, K]`` decay
    ratios, so it is meant for short sequences, as an independent cross-check
    of the recurrence.
    """
    q, k, v, g, beta = (np.asarray(x) for x in (q, k, v, g, beta))
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    check_g_domain(g)
    f64 = np.float64
    o = np.zeros((p.B, p.T, p.HV, p.V))
    final = np.zeros((p.N, p.HV, p.K, p.V))
    for n, (b, bos, eos) in enumerate(p.spans):
        for h in range(p.HV):
            hk = h // p.group
            S0 = np.zeros((p.K, p.V)) if initial_state is None else np.asarray(initial_state[n, h], dtype=f64)
            if eos == bos:  # an empty sequence passes its state through
                final[n, h] = S0
                continue
            sl = slice(bos, eos)
            o[b, sl, h], final[n, h] = _kda_parallel_one(
                q[b, sl, hk].astype(f64), k[b, sl, hk].astype(f64), v[b, sl, h].astype(f64),
                g[b, sl, h].astype(f64), beta[b, sl, h].astype(f64), S0, p.scale,
            )
    return o.astype(v.dtype), (final if output_final_state else None)
