"""The ladder from linear attention to KDA, token by token in NumPy float64.

Each rung changes one line of the state update (report §2–3, Table 6). All of
them keep a state ``S`` of shape ``[K, V]`` per head, read it with
``o_t = S_t^T (scale * q_t)``, and share the shapes of the design contract
(docs/design.md).

Glossary
--------
=================  ==============================================================
``S``              state (fast weights), ``[K, V]``: a key-to-value memory
``q_t, k_t``       query and key of token ``t``, ``[K]``
``v_t``            value of token ``t``, ``[V]``
``beta_t``         write strength (delta-rule learning rate), scalar in ``[0, 1]``
``g_t``            log decay: scalar (Gated DeltaNet) or ``[K]`` (KDA, DPLR)
``alpha_t``        decay ``exp(g_t)`` in ``(0, 1]``
``a_t, b_t``       the rank-1 factors of general DPLR, ``[K]``
=================  ==============================================================

The rungs::

    linear attention   S_t = S_{t-1} + k_t v_t^T
    DeltaNet           S_t = (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T
    Gated DeltaNet     S_t = (I - beta_t k_t k_t^T) alpha_t S_{t-1} + beta_t k_t v_t^T       (alpha_t scalar)
    KDA (Eq. 1)        S_t = (I - beta_t k_t k_t^T) Diag(alpha_t) S_{t-1} + beta_t k_t v_t^T  (alpha_t per channel)
    DPLR               S_t = (Diag(alpha_t) - a_t b_t^T) S_{t-1} + k_t v_t^T

KDA is DPLR with ``a_t = beta_t k_t``, ``b_t = k_t * alpha_t`` and the written key
``beta_t k_t`` (report §6.2); :func:`kda_explained.naive.kda` is the full KDA with
GVA and packed sequences, these functions are the plain one-head-per-value forms.
"""

from __future__ import annotations

from typing import Callable, Optional, Tuple

import numpy as np

from ..validation import check_floating, check_g_domain, check_kda_inputs, check_shape

__all__ = ["linear_attention", "deltanet", "gated_deltanet", "dplr", "scan"]

Step = Callable[..., np.ndarray]


def scan(
    step: Step,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    per_token: dict,
    *,
    scale: Optional[float],
    initial_state: Optional[np.ndarray],
    output_final_state: bool,
    cu_seqlens: Optional[np.ndarray],
    g: Optional[np.ndarray] = None,
    beta: Optional[np.ndarray] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Run ``S = step(S, k_t, v_t, **per_token_t)`` over every sequence and head; read ``o_t = S^T (scale q_t)``.

    ``per_token`` maps a name to an array indexed ``[b, t, h, ...]`` by *value*
    head; ``k`` and ``q`` are indexed by their own head ``h // group`` (GVA).
    Returns ``o: [B, T, HV, V]`` in ``v``'s dtype and the float64 final state
    ``[N, HV, K, V]`` (or ``None``).
    """
    q, k, v = (np.asarray(x) for x in (q, k, v))
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    check_g_domain(g)  # log decays in [-inf, 0]; -inf (alpha = 0) is a full reset, exp(-inf) = 0 below
    o = np.zeros((p.B, p.T, p.HV, p.V))
    final = np.zeros((p.N, p.HV, p.K, p.V))
    for n, (b, bos, eos) in enumerate(p.spans):
        for h in range(p.HV):
            hk = h // p.group  # the q/k head this value head reads
            S = np.zeros((p.K, p.V)) if initial_state is None else np.array(initial_state[n, h], dtype=np.float64)
            for t in range(bos, eos):
                token = {name: np.asarray(x[b, t, h], dtype=np.float64) for name, x in per_token.items()}
                S = step(S, k[b, t, hk].astype(np.float64), v[b, t, h].astype(np.float64), **token)
                o[b, t, h] = S.T @ (p.scale * q[b, t, hk].astype(np.float64))  # o_t = S_t^T (scale q_t)
            final[n, h] = S
    return o.astype(v.dtype), (final if output_final_state else None)


def linear_attention(q, k, v, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Causal linear attention: ``S_t = S_{t-1} + k_t v_t^T``, ``o_t = S_t^T (scale q_t)``.

    Shapes as :func:`kda_explained.naive.kda` without ``g`` and ``beta``.

    >>> import numpy as np
    >>> q = k = np.ones((1, 3, 1, 2)); v = np.arange(3.0).reshape(1, 3, 1, 1)
    >>> o, _ = linear_attention(q, k, v, scale=1.0)
    >>> o[0, :, 0, 0].tolist()   # 2 * running sum of v
    [0.0, 2.0, 6.0]
    """

    def step(S, k, v):
        return S + np.outer(k, v)  # S_t = S_{t-1} + k_t v_t^T

    return scan(step, q, k, v, {}, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens)


def deltanet(q, k, v, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """DeltaNet: one step of online regression ``S <- S - beta k (k^T S - v^T)`` per token.

    ``beta: [B, T, HV]``; other shapes as :func:`kda_explained.naive.kda`.
    """

    def step(S, k, v, beta):
        return S - beta * np.outer(k, k @ S - v)  # S_t = (I - beta k k^T) S_{t-1} + beta k v^T

    beta = np.asarray(beta)
    return scan(step, q, k, v, {"beta": beta}, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, beta=beta)


def gated_deltanet(q, k, v, g, beta, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """Gated DeltaNet: DeltaNet after a scalar decay ``alpha_t = exp(g_t)`` of the whole state.

    ``g: [B, T, HV]`` (one log decay per head and token), ``beta: [B, T, HV]``.
    """
    g, beta = np.asarray(g), np.asarray(beta)
    # check q, k, v first, so that a malformed v is reported as v, not as a g that fails to match it
    check_kda_inputs(np.asarray(q), np.asarray(k), np.asarray(v), None, beta, scale=scale,
                     initial_state=initial_state, cu_seqlens=cu_seqlens)
    check_floating("g", g)
    check_shape("g", g, np.shape(v)[:3], "B, T, HV", "to match v")

    def step(S, k, v, g, beta):
        S = np.exp(g) * S  # alpha_t S_{t-1}, one decay for every channel
        return S - beta * np.outer(k, k @ S - v)  # (I - beta k k^T) . + beta k v^T

    return scan(step, q, k, v, {"g": g, "beta": beta}, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, beta=beta)


def dplr(q, k, v, a, b, g, *, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
    """General diagonal-plus-low-rank recurrence ``S_t = (Diag(exp(g_t)) - a_t b_t^T) S_{t-1} + k_t v_t^T``.

    ``a, b, g: [B, T, HV, K]`` (per value head); ``q, k: [B, T, H, K]``; ``v: [B, T, HV, V]``.
    KDA is the case ``a = beta k``, ``b = k exp(g)`` with ``beta k`` as the written key.
    """
    a, b, g = (np.asarray(x) for x in (a, b, g))
    # check g (and q, k, v) first, so that a malformed g is reported as g, not as an a that fails to match it
    check_kda_inputs(np.asarray(q), np.asarray(k), np.asarray(v), g, None, scale=scale,
                     initial_state=initial_state, cu_seqlens=cu_seqlens)
    for name, x in (("a", a), ("b", b)):
        check_floating(name, x)
        check_shape(name, x, np.shape(g), "B, T, HV, K", "like g")

    def step(S, k, v, a, b, g):
        S = np.exp(g)[:, None] * S - np.outer(a, b @ S)  # (Diag(alpha_t) - a_t b_t^T) S_{t-1}
        return S + np.outer(k, v)  # + k_t v_t^T

    return scan(step, q, k, v, {"a": a, "b": b, "g": g}, scale=scale, initial_state=initial_state,
                output_final_state=output_final_state, cu_seqlens=cu_seqlens, g=g)
