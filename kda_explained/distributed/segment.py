"""The segment map of KDA: what a stretch of tokens does to any state that enters it.

Over a segment of tokens ``t = 1 .. n`` every step of report Eq. 1 is affine in the state,
``S_t = A_t S_{t-1} + b_t`` with ``A_t = (I - beta_t k_t k_t^T) Diag(alpha_t)`` (``[K, K]``)
and ``b_t = beta_t k_t v_t^T`` (``[K, V]``). Composed, the segment is one affine map::

    S_out = P S_in + R,        P = A_n ... A_1,        R = the segment's state from S_in = 0

and each output is affine in ``S_in`` too, ``o_t = o_t^0 + S_in^T P_{<=t}^T (scale q_t)``.
The value columns of the state never mix (every ``A_t`` acts on the ``K`` rows), so one
run of the ordinary algorithm over ``V + K`` value columns computes all of it at once:
values ``[v | 0]`` from the state ``[S_0 | I]`` give the outputs ``[o | q_read]`` and the
final state ``[R | P]``. The zero values make the last ``K`` columns evolve by the
transitions alone, from the identity: their state after token ``t`` is ``P_{<=t}``.

Glossary (one sequence, one value head)
---------------------------------------
==========  =========================================================================
``A_t``     one token's transition ``(I - beta_t k_t k_t^T) Diag(exp(g_t))``, ``[K, K]``
``P``       the segment's transition ``A_n ... A_1``, ``[K, K]``
``R``       the segment's state after its last token from ``S_0`` (``initial_state``,
            zeros if ``None``), ``[K, V]``
``q_read``  what each token's output reads of an extra incoming state:
            ``q_read_t = P_{<=t}^T (scale q_t)``, ``[K]`` per token, so that
            ``o_t(S_0 + X) = o_t(S_0) + X^T q_read_t``
==========  =========================================================================
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch

from .. import chunked
from ..chunked.kda import as_tensor_cu_seqlens, require_tensors
from ..chunked.pieces import augment, split_augmented
from ..validation import check_kda_inputs

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
    """The segment map of every sequence, by one :func:`kda_explained.chunked.kda.kda` call over ``V + K`` columns.

    Inputs as ``chunked.kda`` (``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``g: [B, T, HV, K]``,
    ``beta: [B, T, HV]``, ``initial_state: [N, HV, K, V]``, ``cu_seqlens: [N + 1]``). Returns
    ``(o, q_read, P, R)``:

    - ``o: [B, T, HV, V]`` the outputs from ``initial_state`` (as ``chunked.kda``), ``v``'s dtype;
    - ``q_read: [B, T, HV, K]`` (``v``'s dtype): ``o_t`` from ``initial_state + X`` is
      ``o_t + X^T q_read_t``;
    - ``P: [N, HV, K, K]`` each sequence's transition, ``R: [N, HV, K, V]`` its final state
      from ``initial_state``, float32 (float64 for float64 inputs): the final state from
      ``initial_state + X`` is ``P X + R``.

    Differentiable. The fast layer's function of the same name and signature,
    :func:`kda_explained.fast.segment.segment_summary`, computes the same on the Triton kernels.

    >>> import torch
    >>> from kda_explained import chunked
    >>> torch.manual_seed(0) and None
    >>> B, T, H, K, V = 1, 9, 1, 4, 3
    >>> q = torch.randn(B, T, H, K, dtype=torch.float64)
    >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    >>> v = torch.randn(B, T, H, V, dtype=torch.float64)
    >>> g = -torch.rand(B, T, H, K, dtype=torch.float64); beta = torch.rand(B, T, H, dtype=torch.float64)
    >>> o, q_read, P, R = segment_summary(q, k, v, g, beta)
    >>> X = torch.randn(1, H, K, V, dtype=torch.float64)          # any state entering the segment
    >>> o_X, S_X = chunked.kda(q, k, v, g, beta, initial_state=X, output_final_state=True)
    >>> bool(torch.allclose(S_X, P @ X + R)), bool(torch.allclose(o_X, o + torch.einsum("bthk,bhkv->bthv", q_read, X)))
    (True, True)
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    v_aug, S_aug = augment(v, initial_state, p.N, p.K, state_dtype)
    o_aug, S_out = chunked.kda(q, k, v_aug, g, beta, scale=p.scale, initial_state=S_aug, output_final_state=True,
                               cu_seqlens=cu_seqlens)  # [B, T, HV, V + K], [N, HV, K, V + K]
    return split_augmented(o_aug, S_out, p.V)
