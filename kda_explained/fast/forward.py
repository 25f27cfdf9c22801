"""The forward pipeline on the GPU, stage for stage like :func:`kda_explained.chunked.kda.kda`.

The forward reads as the same pipeline (report §3.1)::

    G, beta   = chunk_local_cumsum(g, ...)                    # 1. gate + in-chunk cumsum (+ beta sigmoid)
    A_qk, W, U, qg, kg = chunk_local_factors(q, k, v, G, beta) # 2.-4. Eq. 5-7: A_kk, M stay on chip
    h, v_new, S = state_passing(kg, W, U, G, S0)              # 5. Eq. 8
    o         = chunk_output(qg, h, v_new, A_qk)              # 6. Eq. 9

Stages 2-4 (intra-chunk matrices, UT transform, WY factors) run as one kernel,
since ``A_kk`` and ``M`` are only needed to make ``W`` and ``U``; the tests check
its outputs against the three chunked stages of those names. Intermediates
travel in the input dtype for bf16/fp16 inputs, in float32 otherwise.

Where the batch fills the GPU the inference forward takes chunks of 16 tokens
(:func:`forward_chunk_size`): stages 1-4 then run as one pass
(:func:`~kda_explained.fast.local.chunk_local_factors_one_pass`) and stages 5 and 6
as one kernel, which also applies the UT transform's ``Mb = M Diag(beta)`` itself
(the plan's ``one_pass_fold``)::

    f = chunk_local_factors_one_pass(q, k, v, g, beta, scale, 16, fold=2)      # 1.-4.
    o, S = state_passing_output(f.kg, None, None, f.G_end, f.qg, f.A_qk, S0, 16,
                                Mb=f.Mb, v=v, k_gamma=f.k_gamma)                          # 5. + 6.

Where the plan names a piece length (``piece_tokens``) and the state pass's grid is nearly
empty (one long sequence), the inference forward cuts the sequences into pieces that run at
once and joins them exactly (:func:`chunk_kda_fwd_in_pieces`, :mod:`kda_explained.chunked.pieces`).

Every launch reads its settings from one :class:`~kda_explained.fast.config.Plan`.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton

from ..chunked.pieces import augment, split_augmented, split_pieces
from ._meta import packed_offsets, seq_meta, sm_count
from .config import ForwardConfig, Plan
from .inputs import MAX_HEAD_DIM
from .local import chunk_local_factors, chunk_local_factors_one_pass, intermediate_dtype
from .output import chunk_output
from .pieces import piece_outputs, piece_states
from .prepare import chunk_local_cumsum, l2norm
from .state import output_fused, state_passing, state_passing_output

__all__ = ["chunk_kda_fwd", "chunk_kda_fwd_in_pieces", "forward_chunk_size", "forward_pieces", "inference_chunking"]


def forward_chunk_size(sequences_x_heads: int, V: int, device, config: ForwardConfig) -> int:
    """The inference forward's chunk size: ``config.short_chunk`` where the state pass's grid (one
    program per sequence, value head and 64 value columns) holds ``short_chunk_min_programs_per_sm``
    programs per SM, else 64. Shorter chunks multiply the sequential steps of the state pass, which
    one long sequence cannot spread over the GPU."""
    if config.short_chunk is None:
        return 64
    programs = sequences_x_heads * triton.cdiv(V, 64)
    return config.short_chunk if programs >= config.short_chunk_min_programs_per_sm * sm_count(device) else 64


def forward_pieces(offsets, HV: int, K: int, V: int, device, config: ForwardConfig) -> Optional[int]:
    """The inference forward's piece length (``config.piece_tokens``), or ``None`` for whole sequences:
    pieces where the state pass's grid at 64 value columns holds fewer than
    ``config.pieces_below_programs_per_sm`` programs per SM, ``V + K`` fits one value tile, and some
    sequence is longer than one piece. ``offsets``: the packed batch's host offsets."""
    if config.piece_tokens is None or V + K > MAX_HEAD_DIM:
        return None
    N = len(offsets) - 1
    if N * HV * triton.cdiv(V, 64) >= config.pieces_below_programs_per_sm * sm_count(device):
        return None
    longest = max((e - b for b, e in zip(offsets[:-1], offsets[1:])), default=0)
    return config.piece_tokens if longest > config.piece_tokens else None


def inference_chunking(B: int, T: int, cu_seqlens, HV: int, K: int, V: int, device,
                       config: ForwardConfig) -> Tuple[int, Optional[int]]:
    """The inference forward's ``(chunk_size, piece_tokens)`` for ``B`` rows of ``T`` tokens or the packed
    batch of ``cu_seqlens`` (host offsets): :func:`forward_chunk_size` and :func:`forward_pieces`."""
    offsets = packed_offsets(B, T, cu_seqlens)
    return (forward_chunk_size((len(offsets) - 1) * HV, V, device, config),
            forward_pieces(offsets, HV, K, V, device, config))


def chunk_kda_fwd(
    q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, chunk_size: int, plan: Plan,
    use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False, A_log=None, dt_bias=None,
    lower_bound: Optional[float] = None, use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
    state_v_first: bool = False, float32_chunk_states: bool = False, keep_for_backward: bool = False,
    piece_tokens: Optional[int] = None, out_dtype: Optional[torch.dtype] = None,
):
    """The stages on validated inputs; returns ``o`` (``v``'s dtype), the final state, the chunk states
    and, with ``keep_for_backward``, ``(A_qk, M, G)`` (else ``None``).

    ``piece_tokens`` (inference only, :func:`forward_pieces`): the sequences run in pieces of that
    many tokens (:func:`chunk_kda_fwd_in_pieces`); ``chunk_size`` is then the pieces' own choice.
    ``out_dtype``: ``o``'s dtype when not ``v``'s.

    The chunk states ``h`` are float32 with ``float32_chunk_states``; otherwise stages 5 and 6 may run
    as one kernel (the plan's ``fused_state_output``, large grids) and ``h`` is ``None`` (never in
    memory), or, with the two kernels, in the intermediate dtype (all stage 6 needs). ``A_qk`` and
    ``M = (I + A_kk)^{-1}`` (float32) are what the backward would otherwise recompute with the whole
    keys' and queries' passes (:func:`kda_explained.fast.backward.core_backward`'s ``factors``);
    ``G`` is stage 1's output.
    """
    if piece_tokens is not None and not (keep_for_backward or float32_chunk_states):
        o, S = chunk_kda_fwd_in_pieces(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu_seqlens,
            piece_tokens=piece_tokens, plan=plan, state_v_first=state_v_first,
            use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log,
            dt_bias=dt_bias, lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval)
        return o, S, None, None
    C = chunk_size
    out_dtype = out_dtype or v.dtype
    meta = seq_meta(q.shape[0], q.shape[1], C, cu_seqlens, q.device)  # the chunk tables, built once
    if use_qk_l2norm_in_kernel:
        # in the intermediate dtype: the input's on a GPU, float32 under the interpreter (whose
        # float32 -> bf16 casts truncate, see intermediate_dtype), like every other intermediate
        q, k = l2norm(q, out_dtype=intermediate_dtype(q.dtype)), l2norm(k, out_dtype=intermediate_dtype(k.dtype))
    # short chunks: stages 1-4 in one pass that sums G from g itself and keeps it only at the chunk
    # ends; stage 1's kernel still runs first for the gate options (or for 64-token chunks)
    one_pass = C <= plan.one_pass.max_chunk and not keep_for_backward
    gate_options = use_gate_in_kernel or use_beta_sigmoid_in_kernel
    if not one_pass or gate_options:
        G, beta = chunk_local_cumsum(
            g, C, cu_seqlens, beta=beta, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval, meta=meta,
        )  # 1.                                                                   [B, T, HV, K], beta float32
    # 5. and 6. as one kernel where its grid is large enough, and always after the one pass (h, v_new on chip)
    fuse = plan.forward.fused_state_output and not float32_chunk_states and (
        one_pass or output_fused(meta.N * v.shape[2], v.shape[3], q.device, plan.forward.fused_min_programs_per_sm))
    if one_pass:  # 1.-4.
        f = chunk_local_factors_one_pass(q, k, v, G if gate_options else g, beta, scale, C, cu_seqlens,
                                         cumulative=gate_options, fold=plan.forward.one_pass_fold if fuse else 0,
                                         meta=meta, config=plan.one_pass)
        G = f.G_end  # [NC, HV, K]: the rows of G the state pass reads
    else:  # 2.-4.
        f = chunk_local_factors(q, k, v, G, beta, scale, C, cu_seqlens, store_m=keep_for_backward, meta=meta,
                                config=plan.local)
    A_qk, W, U, qg, kg = f[:5]
    wy = dict(Mb=f.Mb, v=v if f.Mb is not None else None, k_gamma=f.k_gamma)  # the UT transform left to 5. (fold)
    kept = (A_qk, f.M, G) if keep_for_backward else None
    if fuse:  # 5. + 6. in one kernel
        o, S = state_passing_output(kg, W, U, G, qg, A_qk, initial_state, C, cu_seqlens, **wy, out_dtype=out_dtype,
                                    state_v_first=state_v_first, meta=meta, config=plan.state)
        return o, S, None, kept
    h_dtype = torch.float32 if float32_chunk_states else intermediate_dtype(q.dtype)
    h, v_new, S = state_passing(kg, W, U, G, initial_state, C, cu_seqlens, state_v_first=state_v_first,
                                h_dtype=h_dtype, meta=meta, config=plan.state)  # 5.     h: [NC, HV, K, V]
    o = chunk_output(qg, h, v_new, A_qk, C, cu_seqlens, out_dtype=out_dtype, state_v_first=state_v_first,
                     meta=meta, config=plan.output)  # 6.
    return o, S, h, kept


def chunk_kda_fwd_in_pieces(q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, piece_tokens: int,
                            plan: Plan, state_v_first: bool = False, **options):
    """``(o, final_state)`` with every sequence cut into pieces of ``piece_tokens`` tokens: the three
    steps of :mod:`kda_explained.chunked.pieces` on the GPU::

        o_aug, [R | P] = the pieces at once, [v | 0] from [0 | I]     # 1. one packed batch
        S_in, S        = piece_states(P, R, S_0, first_piece)         # 2. the chain
        o              = piece_outputs(o_aug, S_in, piece_cu)         # 3. o^0 + S_in^T q_read

    The pieces take the inference forward's chunk size for their own grid; ``options`` (the
    in-kernel gate, L2 norm, beta sigmoid) apply token by token, so they pass to step 1 as they are.
    """
    B, T, H, K = q.shape
    HV, V = v.shape[2], v.shape[3]
    piece_cu, first_piece = split_pieces(packed_offsets(B, T, cu_seqlens), piece_tokens)
    NP = len(piece_cu) - 1
    q1, k1, v1, g1, beta1 = (x.reshape(1, B * T, *x.shape[2:]) for x in (q, k, v, g, beta))  # one packed row
    v_aug, S_aug = augment(v1, None, NP, K, torch.float32)  # [1, BT, HV, V + K], [NP, HV, K, V + K] = [0 | I]
    C = forward_chunk_size(NP * HV, V + K, q.device, plan.forward)
    # [o^0 | q_read] in the intermediate dtype: the input's on a GPU (one more rounding of o^0 and q_read
    # before step 3), float32 under the interpreter, whose float32 -> bf16 casts truncate
    o_aug, S_out, _, _ = chunk_kda_fwd(q1, k1, v_aug, g1, beta1, scale=scale, initial_state=S_aug,
                                       cu_seqlens=tuple(piece_cu), chunk_size=C, plan=plan,
                                       out_dtype=intermediate_dtype(v.dtype), **options)  # 1.
    _, _, P, R = split_augmented(o_aug, S_out, V)
    S0 = initial_state.transpose(-1, -2) if state_v_first and initial_state is not None else initial_state
    S_in, S = piece_states(P, R, S0, first_piece)  # 2.                              [NP, HV, K, V], [N, HV, K, V]
    o = piece_outputs(o_aug, S_in, piece_cu)  # 3.                                    [1, BT, HV, V]
    return o.reshape(B, T, HV, V).to(v.dtype), (S.transpose(-1, -2).contiguous() if state_v_first else S)
