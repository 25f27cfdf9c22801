"""``recurrent_kda``: report Eq. 1 token by token in PyTorch, batched over sequences and heads.

The chunked algorithm pays for a chunk's worth of matrices even for one token; decoding
one token at a time wants the recurrence itself. This is the PyTorch reference of the
fast layer's decode kernel (:func:`kda_explained.fast.api.fused_recurrent_kda`), with the
shared signature, differentiable, on any device.

Glossary
--------
=========  ==============================================================
``S``      the states of all sequences and value heads, ``[N, HV, K, V]``
``q_t``    query of token ``t`` for every head, ``[N, HV, K]`` (GVA: repeated)
``alpha``  decay ``exp(g_t)``, ``[N, HV, K]``
=========  ==============================================================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..validation import check_kda_inputs
from .kda import as_tensor_cu_seqlens, require_tensors

__all__ = ["recurrent_kda", "RECURRENT_MAX_LEN"]

#: Sequences of at most this many tokens take the recurrence itself (here, or the fast layer's
#: decode kernel), longer ones the chunk pipeline. The one threshold where decoding ends and
#: prefill begins, read by every dispatch (``fast.kda``, the model layer).
RECURRENT_MAX_LEN = 16


def _step(S, q_t, k_t, v_t, g_t, b_t, group: int, scale: float, dt: torch.dtype):
    """One token of every sequence: ``S [N, HV, K, V]`` and the token's ``q_t, k_t [N, H, K]``,
    ``v_t [N, HV, V]``, ``g_t [N, HV, K]``, ``b_t [N, HV]`` -> ``(S_t, o_t [N, HV, V])``."""
    q_t = q_t.to(dt).repeat_interleave(group, dim=1) * scale  # [N, HV, K]
    k_t = k_t.to(dt).repeat_interleave(group, dim=1)  # [N, HV, K]
    v_t, g_t, b_t = v_t.to(dt), g_t.to(dt), b_t.to(dt)
    S = torch.exp(g_t)[..., None] * S  # Diag(alpha_t) S_{t-1}
    u = b_t[..., None] * (v_t - (k_t[..., None] * S).sum(-2))  # beta_t (v_t - S^T k_t)   [N, HV, V]
    S = S + k_t[..., None] * u[..., None, :]  # + k_t u^T
    return S, (q_t[..., None] * S).sum(-2)  # S_t^T (scale q_t)                          [N, HV, V]


def recurrent_kda(
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
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """KDA by its recurrence, one token per step, every sequence and head at once.

    Shapes and results as :func:`kda_explained.chunked.kda.kda`. Sequences of a packed
    batch (``cu_seqlens``) advance together, step ``i`` taking token ``i`` of each; a
    sequence that has ended keeps its state. The cost is ``max_len`` steps of
    ``O(N HV K V)`` work: the right tool for decoding and short prompts.

    >>> import torch
    >>> from kda_explained import chunked
    >>> torch.manual_seed(0) and None
    >>> q, k = torch.randn(2, 1, 5, 2, 8, dtype=torch.float64)
    >>> k = torch.nn.functional.normalize(k, dim=-1); v = torch.randn(1, 5, 2, 4, dtype=torch.float64)
    >>> g = -torch.rand(1, 5, 2, 8, dtype=torch.float64); beta = torch.rand(1, 5, 2, dtype=torch.float64)
    >>> o, S = recurrent_kda(q, k, v, g, beta, output_final_state=True)
    >>> o2, S2 = chunked.kda(q, k, v, g, beta, output_final_state=True, chunk_size=16)
    >>> bool(torch.allclose(o, o2) and torch.allclose(S, S2))
    True
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    dt = torch.float64 if v.dtype == torch.float64 else torch.float32
    lengths = [eos - bos for _, bos, eos in p.spans]
    S = q.new_zeros(p.N, p.HV, p.K, p.V, dtype=dt) if initial_state is None else initial_state.to(dt)
    o = q.new_zeros(p.B, p.T, p.HV, p.V, dtype=dt)
    if cu_seqlens is None:
        # a plain batch: every sequence has all T tokens, so no index tables (and no host-to-device
        # copy: a captured decoding step replays this)
        for i in range(p.T):
            S, o[:, i] = _step(S, q[:, i], k[:, i], v[:, i], g[:, i], beta[:, i], p.group, p.scale, dt)
        return o.to(v.dtype), (S if output_final_state else None)
    rows = torch.tensor([b for b, _, _ in p.spans], device=q.device)
    starts = torch.tensor([bos for _, bos, _ in p.spans], device=q.device)
    for i in range(max(lengths, default=0)):
        live = torch.tensor([i < n for n in lengths], device=q.device)  # sequences with a token i
        # their indices, from host integers (no mask whose count depends on data: torch.compile traces it)
        at = torch.tensor([n for n, length in enumerate(lengths) if i < length], dtype=torch.int64, device=q.device)
        t = (starts + i).clamp(max=p.T - 1)  # [N] positions (clamped for ended sequences)
        S_new, o_t = _step(S, q[rows, t], k[rows, t], v[rows, t], g[rows, t], beta[rows, t], p.group, p.scale, dt)
        S = torch.where(live[:, None, None, None], S_new, S)
        o = o.index_put((rows[at], t[at]), o_t[at])
    return o.to(v.dtype), (S if output_final_state else None)
