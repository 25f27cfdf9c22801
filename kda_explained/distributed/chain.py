"""Chaining segment maps across ranks, forward (states) and backward (their gradients).

Each rank ``j`` publishes the map of its last piece, ``S -> P_j S + R_j``
(:mod:`kda_explained.distributed.segment`). A sequence that crosses from rank ``s`` to
rank ``r`` enters rank ``r`` with the composition of the maps of ranks ``s .. r - 1``
applied to zero (rank ``s``'s own ``R_s`` already starts from the sequence's initial
state)::

    S_in(r) = P_{r-1} ( ... (P_{s+1} R_s + R_{s+1}) ... ) + R_{r-1}

The backward runs the same chain in reverse with transposed maps. With ``dS_in(j)`` the
gradient of rank ``j``'s losses with respect to the state entering it, the gradient with
respect to the state *leaving* rank ``r`` is ``lam(r + 1)``, where::

    lam(j) = dS_in(j) + P_j^T lam(j + 1)      for the ranks j the sequence passes through
    lam(e) = dS_in(e)                         at the last rank e the state reaches

and rank ``r``'s own map gets ``dP_r = lam(r + 1) Y_r^T``, ``dR_r = lam(r + 1)``, with
``Y_r`` the state entering its last piece. Both directions read only the ``[K, K]`` and
``[K, V]`` blocks of the ranks in between: nothing grows with the sequence length.

These are plain functions of the gathered blocks; :mod:`kda_explained.distributed.context_parallel`
calls them between its collectives. Shapes: ``P: [R, lanes, HV, K, K]``,
``R, dS: [R, lanes, HV, K, V]`` (one block per rank), in float32 (float64 for float64
inputs): the chain of products never drops to the inputs' precision.
"""

from __future__ import annotations

import torch

from .plan import SlicePlan

__all__ = ["incoming_state", "outgoing_adjoint"]


def incoming_state(P: torch.Tensor, R: torch.Tensor, plan: SlicePlan, r: int) -> torch.Tensor:
    """The state entering rank ``r``'s first piece from the ranks before it: ``[lanes, HV, K, V]``.

    Zeros where rank ``r``'s first piece starts its sequence (no ``cont_in``).

    >>> import torch
    >>> from kda_explained.distributed.plan import plan_slices
    >>> plan = plan_slices([2, 2, 2], None, rank=0)             # one sequence over three ranks
    >>> P = torch.full((3, 1, 1, 1, 1), 0.5); R = torch.ones(3, 1, 1, 1, 1)
    >>> [incoming_state(P, R, plan, r).item() for r in range(3)]  # 0, then 1, then 0.5 * 1 + 1
    [0.0, 1.0, 1.5]
    """
    S = torch.zeros_like(R[0])
    for j in range(plan.chain_start(r), r):
        S = P[j] @ S + R[j]  # [lanes, HV, K, V]
    return S


def outgoing_adjoint(P: torch.Tensor, dS: torch.Tensor, plan: SlicePlan, r: int) -> torch.Tensor:
    """``lam(r + 1)``: the gradient with respect to the state leaving rank ``r``'s last piece, ``[lanes, HV, K, V]``.

    ``dS[j]`` is the gradient with respect to the state entering rank ``j`` (its
    first piece). Zeros where rank ``r``'s last piece ends its sequence (no ``cont_out``).

    >>> import torch
    >>> from kda_explained.distributed.plan import plan_slices
    >>> plan = plan_slices([2, 2, 2], None, rank=0)
    >>> P = torch.full((3, 1, 1, 1, 1), 0.5); dS = torch.ones(3, 1, 1, 1, 1)
    >>> [outgoing_adjoint(P, dS, plan, r).item() for r in range(3)]  # 1 + 0.5 * 1, then 1, then 0
    [1.5, 1.0, 0.0]
    """
    lam = torch.zeros_like(dS[0])
    for j in range(plan.chain_end(r), r, -1):
        lam = dS[j] + P[j].transpose(-1, -2) @ lam  # [lanes, HV, K, V]
    return lam
