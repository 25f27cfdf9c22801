"""One long sequence in parallel pieces: the segment map inside one device.

The state pass (stage 5, report Eq. 8) walks a sequence's chunks in order. A batch of many
sequences gives it many independent walks; one long sequence gives it only ``HV`` of them
(times the value tiles), each as long as the sequence. The segment map
(:mod:`kda_explained.distributed.segment`) removes that order: every stretch of tokens acts
on the state entering it as an affine map ``S_out = P S_in + R``, and each output as
``o_t = o_t^0 + S_in^T q_read_t``. So a sequence cut into pieces runs as

1. every piece at once, from the zero state, over ``V + K`` value columns: values ``[v | 0]``
   from the state ``[0 | I]`` give ``[o^0 | q_read]`` and ``[R | P]`` (:func:`augment`);
2. a short chain over each sequence's pieces carries the true state across them:
   ``S_in[first] = S_0``, ``S_in[j + 1] = P_j S_in[j] + R_j``, and the chain's end is the
   final state (:func:`piece_states`);
3. every output takes its piece's incoming state: ``o_t = o_t^0 + S_in^T q_read_t``
   (:func:`piece_outputs`).

Step 1 doubles the columns of a square head (``K = V``), step 2 is a few ``[K, K] x [K, V]``
products per piece, step 3 one pass over the outputs: work traded for walks that are
shorter by the number of pieces. :func:`kda_in_pieces` composes the three on the chunked
layer; :mod:`kda_explained.fast.pieces` has the Triton twins of :func:`piece_states` and
:func:`piece_outputs` (same names, same signatures), and the fast forward takes this path
where its plan says so (:class:`~kda_explained.fast.config.ForwardConfig`'s ``piece_tokens``).

Glossary
--------
===============  ==========================================================================
``NP``           pieces in the batch (every sequence has at least one; an empty one has one)
``piece_cu``     ``[NP + 1]`` offsets of the pieces in the packed row of tokens
``first_piece``  ``[N + 1]``: index of each sequence's first piece (its pieces are
                 ``first_piece[n] .. first_piece[n + 1] - 1``)
``P, R``         ``[NP, HV, K, K]``, ``[NP, HV, K, V]``: each piece's transition and its
                 state after its last token from the zero state
``S_in``         ``[NP, HV, K, V]``: the state entering each piece
``o_aug``        ``[B, T, HV, V + K]``: ``[o^0 | q_read]`` of every token
===============  ==========================================================================
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch

from ..validation import check_kda_inputs
from .kda import as_tensor_cu_seqlens, kda, require_tensors

__all__ = ["augment", "split_augmented", "split_pieces", "piece_states", "piece_outputs", "kda_in_pieces"]


def augment(v: torch.Tensor, initial_state: Optional[torch.Tensor], N: int, K: int,
            state_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """The augmented problem: values ``[v | 0]`` ``[B, T, HV, V + K]`` and state ``[S_0 | I]`` ``[N, HV, K, V + K]``.

    ``S_0`` is ``initial_state`` or zeros; the state is in ``state_dtype``.

    >>> import torch
    >>> v_aug, S_aug = augment(torch.ones(1, 3, 2, 4), None, N=1, K=2, state_dtype=torch.float32)
    >>> v_aug.shape, S_aug.shape
    (torch.Size([1, 3, 2, 6]), torch.Size([1, 2, 2, 6]))
    >>> S_aug[0, 0].tolist()                                  # [S_0 | I] of head 0: zeros, then the identity
    [[0.0, 0.0, 0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0, 0.0, 1.0]]
    """
    B, T, HV, V = v.shape
    v_aug = torch.cat([v, v.new_zeros(B, T, HV, K)], dim=-1)  # [B, T, HV, V + K]
    eye = torch.eye(K, dtype=state_dtype, device=v.device).expand(N, HV, K, K)
    S0 = v.new_zeros(N, HV, K, V, dtype=state_dtype) if initial_state is None else initial_state.to(state_dtype)
    return v_aug, torch.cat([S0, eye], dim=-1)  # [N, HV, K, V + K]


def split_augmented(o_aug: torch.Tensor, S_aug: torch.Tensor, V: int):
    """``[o | q_read]``, ``[R | P]`` -> ``(o, q_read, P, R)``."""
    return o_aug[..., :V], o_aug[..., V:], S_aug[..., V:], S_aug[..., :V]


def split_pieces(offsets: Sequence[int], piece_tokens: int) -> Tuple[List[int], List[int]]:
    """Cut each sequence of the packed offsets ``[0, ..., T]`` into pieces of ``piece_tokens`` tokens
    (its last piece shorter); returns ``(piece_cu, first_piece)`` as lists of host ints.

    An empty sequence keeps one empty piece, so that every sequence has a first piece to start its chain.

    >>> split_pieces([0, 10, 10, 13], 4)
    ([0, 4, 8, 10, 10, 13], [0, 3, 4, 5])
    """
    if piece_tokens < 1:
        raise ValueError(f"piece_tokens: expected a positive number of tokens, got {piece_tokens}")
    piece_cu, first_piece = [offsets[0]], [0]
    for bos, eos in zip(offsets[:-1], offsets[1:]):
        piece_cu.extend(range(bos + piece_tokens, eos, piece_tokens))
        piece_cu.append(eos)
        first_piece.append(len(piece_cu) - 1)
    return piece_cu, first_piece


def piece_states(P: torch.Tensor, R: torch.Tensor, initial_state: Optional[torch.Tensor],
                 first_piece: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Step 2: ``(S_in, final_state)``, the state entering each piece ``[NP, HV, K, V]`` and each
    sequence's final state ``[N, HV, K, V]``, float32 (float64 for float64 ``R``).

    ``S_in[first] = S_0`` (``initial_state``, or zeros), ``S_in[j + 1] = P_j S_in[j] + R_j``; the
    final state is the chain's next value after a sequence's last piece. ``first_piece``: ``[N + 1]``
    integer tensor (or list) of each sequence's first piece.

    >>> import torch
    >>> P = torch.eye(2).expand(3, 1, 2, 2) * 0.5; R = torch.ones(3, 1, 2, 1)   # 3 pieces, 1 head, K = 2, V = 1
    >>> S_in, S = piece_states(P, R, None, [0, 3])                               # one sequence of 3 pieces
    >>> S_in[:, 0, 0, 0].tolist(), S[0, 0, 0, 0].item()                          # 0, 1, 1.5, then 1.75
    ([0.0, 1.0, 1.5], 1.75)
    """
    first = [int(x) for x in (first_piece.tolist() if isinstance(first_piece, torch.Tensor) else first_piece)]
    NP, HV, K, V = R.shape
    state_dtype = torch.float64 if R.dtype == torch.float64 else torch.float32
    S_in = torch.empty(NP, HV, K, V, dtype=state_dtype, device=R.device)
    final = torch.empty(len(first) - 1, HV, K, V, dtype=state_dtype, device=R.device)
    for n, (j0, j1) in enumerate(zip(first[:-1], first[1:])):
        S = (torch.zeros(HV, K, V, dtype=state_dtype, device=R.device) if initial_state is None
             else initial_state[n].to(state_dtype))
        for j in range(j0, j1):
            S_in[j] = S
            S = P[j].to(state_dtype) @ S + R[j].to(state_dtype)  # [HV, K, K] @ [HV, K, V]
        final[n] = S
    return S_in, final


def piece_outputs(o_aug: torch.Tensor, S_in: torch.Tensor, piece_cu: torch.Tensor) -> torch.Tensor:
    """Step 3: ``o = o^0 + S_in^T q_read`` for every token of every piece, ``[B, T, HV, V]`` in
    ``o_aug``'s dtype (computed in float32, or float64), from ``o_aug = [o^0 | q_read]``
    ``[B, T, HV, V + K]`` (``B = 1`` for several pieces) and the pieces' incoming states ``S_in``
    ``[NP, HV, K, V]``; ``piece_cu``: ``[NP + 1]`` integer tensor (or list) of the pieces' offsets.

    >>> import torch
    >>> o_aug = torch.tensor([[[[1.0, 2.0, 0.5]]]])            # one token, one head, V = 1: o^0 = 1, q_read = [2, 0.5]
    >>> S_in = torch.tensor([[[[3.0], [4.0]]]])                # its piece's entering state [K = 2, V = 1]
    >>> piece_outputs(o_aug, S_in, [0, 1]).item()               # 1 + 2 * 3 + 0.5 * 4
    9.0
    """
    cu = [int(x) for x in (piece_cu.tolist() if isinstance(piece_cu, torch.Tensor) else piece_cu)]
    V = S_in.shape[-1]
    state_dtype = torch.float64 if S_in.dtype == torch.float64 else torch.float32
    B, T, HV, _ = o_aug.shape
    flat = o_aug.reshape(B * T, HV, -1).to(state_dtype)  # the packed row of tokens
    o = torch.empty(B * T, HV, V, dtype=o_aug.dtype, device=o_aug.device)
    for j, (bos, eos) in enumerate(zip(cu[:-1], cu[1:])):
        o0, q_read = flat[bos:eos, :, :V], flat[bos:eos, :, V:]  # [L, HV, V], [L, HV, K]
        o[bos:eos] = (o0 + torch.einsum("lhk,hkv->lhv", q_read, S_in[j].to(state_dtype))).to(o.dtype)
    return o.reshape(B, T, HV, V)


def kda_in_pieces(
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
    piece_tokens: int = 64,
) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """:func:`kda_explained.chunked.kda` computed as the three steps above: every sequence cut into pieces
    of ``piece_tokens`` tokens, the pieces run at once, the chain, the outputs' correction.

    Arguments and returns as :func:`kda_explained.chunked.kda`.

    >>> import torch
    >>> from kda_explained import chunked
    >>> from kda_explained.testing import rel_rms_error
    >>> torch.manual_seed(0) and None
    >>> B, T, H, K, V = 1, 50, 2, 8, 4
    >>> q = torch.randn(B, T, H, K, dtype=torch.float64)
    >>> k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64), dim=-1)
    >>> v = torch.randn(B, T, H, V, dtype=torch.float64)
    >>> g = -torch.rand(B, T, H, K, dtype=torch.float64); beta = torch.rand(B, T, H, dtype=torch.float64)
    >>> o, S = kda_in_pieces(q, k, v, g, beta, output_final_state=True, piece_tokens=16)   # 4 pieces
    >>> o_ref, S_ref = chunked.kda(q, k, v, g, beta, output_final_state=True)
    >>> rel_rms_error(o, o_ref) < 1e-12 and rel_rms_error(S, S_ref) < 1e-12
    True
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, q.device)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens)
    offsets = [b * p.T for b in range(p.B + 1)] if cu_seqlens is None else cu_seqlens.tolist()
    piece_cu, first_piece = split_pieces(offsets, piece_tokens)
    flat = [x.reshape(1, p.B * p.T, *x.shape[2:]) for x in (q, k, v, g, beta)]  # one packed row
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    v_aug, S_aug = augment(flat[2], None, len(piece_cu) - 1, p.K, state_dtype)  # every piece from [0 | I]
    o_aug, S_out = kda(flat[0], flat[1], v_aug, flat[3], flat[4], scale=p.scale, initial_state=S_aug,
                       output_final_state=True, cu_seqlens=piece_cu)  # 1.  [1, BT, HV, V + K], [NP, HV, K, V + K]
    _, _, P, R = split_augmented(o_aug, S_out, p.V)
    S_in, final = piece_states(P, R, initial_state, first_piece)  # 2.
    o = piece_outputs(o_aug, S_in, piece_cu)  # 3.                  [1, BT, HV, V]
    return o.reshape(p.B, p.T, p.HV, p.V), (final if output_final_state else None)
