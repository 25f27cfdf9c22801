"""The fast layer's entry points: ``chunk_kda`` (prefill and training), ``fused_recurrent_kda``
(decoding), both drop-ins for ``fla.ops.kda``'s functions of the same names, and ``kda`` (the
shared signature of every layer, dispatching by length)."""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked.kda import require_tensors
from ..chunked.recurrent import RECURRENT_MAX_LEN
from ..validation import check_chunk_size, check_gate_params, cu_seqlens_values
from .autograd import chunk_kda_differentiable
from .config import Plan, plan_for
from .decode import fused_recurrent_checked
from .forward import chunk_kda_fwd, inference_chunking
from .inputs import FAST_CHUNK_SIZES, check_fast_inputs, resolve_fla_kwargs
from .ops import chunk_kda_compiled, fused_recurrent_compiled

__all__ = ["chunk_kda", "fused_recurrent_kda", "kda"]

# Arguments of fla.ops.kda.chunk_kda that change nothing here, accepted so code can switch imports.
_FLA_NO_OPS = frozenset({"safe_gate", "disable_recompute", "use_graph", "max_num_seqs"})



def chunk_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: Optional[float] = None,
    return_intermediate_states: bool = False,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    chunk_size: Optional[int] = None,
    cu_seqlens_cpu: Optional[torch.Tensor] = None,
    cp_context=None,
    check_g: Optional[bool] = None,
    plan: Optional[Plan] = None,
    **kwargs,
):
    """KDA prefill through the Triton chunk kernels; a drop-in for ``fla.ops.kda.chunk_kda``.

    Args:
        q, k: ``[B, T, H, K]``; v: ``[B, T, HV, V]``; g: ``[B, T, HV, K]`` log decay
            (or the raw gate input with ``use_gate_in_kernel``); beta: ``[B, T, HV]``
            (or its logit with ``use_beta_sigmoid_in_kernel``). float32, bfloat16 or float16.
        scale: default ``K ** -0.5``.
        initial_state: ``[N, HV, K, V]`` float32 (``[N, HV, V, K]`` with ``state_v_first``).
        output_final_state: return the state after the last token.
        use_qk_l2norm_in_kernel: L2-normalise q and k first.
        use_gate_in_kernel: ``g = -exp(A_log) softplus(g + dt_bias)``, or with ``lower_bound``
            ``g = lower_bound sigmoid(exp(A_log) (g + dt_bias))`` (``A_log`` optional then).
        use_beta_sigmoid_in_kernel: ``beta = sigmoid(beta)`` (``2 sigmoid`` with ``allow_neg_eigval``).
        return_intermediate_states: also return the state entering every chunk,
            ``[NC, HV, K, V]`` float32, sequence by sequence (for prefix caching); inference only.
        state_v_first: states are ``[V, K]`` instead of ``[K, V]``.
        cu_seqlens: ``[N + 1]`` offsets of a packed batch (``B == 1``).
        A_log: ``[HV]``; dt_bias: ``[HV * K]`` or ``[HV, K]``.
        chunk_size: 16, 32 or 64; default (``None``) chosen per call: 64 for training and for
            ``return_intermediate_states``, and for the inference forward 16 (the plan's ``short_chunk``)
            where the batch fills the GPU, 64 where it does not
            (:func:`~kda_explained.fast.forward.forward_chunk_size`). The
            result is the same function at every chunk size (up to rounding).
        cu_seqlens_cpu: the same offsets on the host (as flash-linear-attention takes them):
            then ``cu_seqlens`` on the GPU is never read back, so the call never waits for it.
            Without it a GPU ``cu_seqlens`` is read once per call.
        cp_context: flash-linear-attention's context-parallel context. Context parallelism
            here is :func:`~kda_explained.distributed.context_parallel.context_parallel_kda`, which takes a
            process group instead; a context raises :class:`NotImplementedError` saying so.
        plan: the kernels' launch settings (:class:`~kda_explained.fast.config.Plan`; default
            :func:`~kda_explained.fast.config.plan_for` the device).
        check_g: read ``g`` and raise :class:`ValueError` unless every value is in ``[-inf, 0]``
            (default: the ``KDA_EXPLAINED_CHECK_G`` environment variable, off). The check
            waits for the GPU, so it is opt-in. Without it ``g > 0`` (outside the domain)
            gives an unspecified result; ``g = -inf`` and any finite ``g <= 0`` are always
            computed right, and no later input ever changes an earlier output. Under
            ``torch.compile`` the environment variable is not read, and ``check_g=True`` (like a
            custom ``plan``) raises :class:`ValueError`: a compiled graph reads nothing back.
        **kwargs: flash-linear-attention's ``safe_gate``, ``disable_recompute``, ``use_graph``,
            ``max_num_seqs`` (accepted, nothing to change here) and ``transpose_state_layout``
            (its older name of ``state_v_first``).

    Returns:
        ``(o, final_state)``, or ``(o, final_state, h)`` with ``return_intermediate_states``.
        ``o`` has ``v``'s dtype; states are float32.
    """
    state_v_first = resolve_fla_kwargs("chunk_kda", kwargs, state_v_first, _FLA_NO_OPS)
    if cp_context is not None:
        raise NotImplementedError(
            "cp_context: flash-linear-attention's context-parallel context is not taken here; split the sequence "
            "over ranks with kda_explained.distributed.context_parallel_kda(..., group=...) instead")
    if torch.compiler.is_compiling() and not return_intermediate_states:
        # one operator node for the graph (kda_explained.fast.ops): the checks run inside it
        _check_compiled_call(check_g, plan)
        return chunk_kda_compiled(
            q, k, v, g, beta, scale=scale, initial_state=initial_state, output_final_state=output_final_state,
            cu_seqlens=cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu, A_log=A_log, dt_bias=dt_bias,
            chunk_size=chunk_size, options=dict(
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first))
    p, cu_seqlens = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens, state_v_first=state_v_first,
                                      cu_seqlens_cpu=cu_seqlens_cpu,
                                      check_g=check_g if not use_gate_in_kernel else False)
    if chunk_size is not None:
        chunk_size = check_chunk_size(chunk_size, FAST_CHUNK_SIZES)
    if use_gate_in_kernel:
        check_gate_params(p.HV, p.K, A_log, dt_bias, lower_bound, require_A_log=True)
    plan = plan or plan_for(q.device)
    opts = dict(scale=p.scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size, plan=plan,
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first)
    if A_log is not None:
        A_log = A_log.reshape(-1)
    if not use_gate_in_kernel:
        A_log = dt_bias = None

    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, A_log, dt_bias, initial_state))
    if chunk_size is None:
        if needs_grad or return_intermediate_states:
            opts["chunk_size"] = 64
        else:  # the inference forward: short chunks where the grid is full, pieces where it is nearly empty
            opts["chunk_size"], opts["piece_tokens"] = inference_chunking(p.B, p.T, cu_seqlens, p.HV, p.K, p.V,
                                                                          q.device, plan.forward)
    if return_intermediate_states:
        if needs_grad:
            raise ValueError("return_intermediate_states: inference only (use torch.inference_mode()), "
                             "got inputs that require grad")
        o, S, h, _ = chunk_kda_fwd(q, k, v, g, beta, initial_state=initial_state, A_log=A_log, dt_bias=dt_bias,
                                   float32_chunk_states=True, **opts)
        return o, (S if output_final_state else None), h
    if needs_grad:
        o, S = chunk_kda_differentiable(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
    else:
        o, S, _, _ = chunk_kda_fwd(q, k, v, g, beta, initial_state=initial_state, A_log=A_log, dt_bias=dt_bias,
                                   **opts)
    return o, (S if output_final_state else None)


def _check_compiled_call(check_g, plan) -> None:
    """Under ``torch.compile`` the operators launch with ``plan_for(device)`` and cannot read ``g``
    back (a host synchronisation): an explicit request for either is refused, not ignored."""
    if check_g:
        raise ValueError("check_g: checking g's domain reads it back to the host, which a compiled graph does not "
                         "do; check g before the compiled region (kda_explained.validation.check_g_domain) or call "
                         "this function eagerly")
    if plan is not None:
        raise ValueError("plan: under torch.compile the operators launch with plan_for(device); a custom plan "
                         "applies to eager calls")


def fused_recurrent_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    A_log: Optional[torch.Tensor] = None,
    dt_bias: Optional[torch.Tensor] = None,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    use_qk_l2norm_in_kernel: bool = False,
    use_gate_in_kernel: bool = False,
    use_beta_sigmoid_in_kernel: bool = False,
    allow_neg_eigval: bool = False,
    lower_bound: Optional[float] = None,
    state_v_first: bool = False,
    cu_seqlens: Optional[torch.Tensor] = None,
    ssm_state_indices: Optional[torch.Tensor] = None,
    num_accepted_tokens: Optional[torch.Tensor] = None,
    inplace_final_state: Optional[bool] = None,
    out: Optional[torch.Tensor] = None,
    cu_seqlens_cpu: Optional[torch.Tensor] = None,
    check_g: Optional[bool] = None,
    plan: Optional[Plan] = None,
    **kwargs,
):
    """KDA token by token (decoding); a drop-in for ``fla.ops.kda.fused_recurrent_kda``.

    Shapes and options as :func:`chunk_kda` (``check_g``, ``cu_seqlens_cpu``, ``plan`` and
    ``transpose_state_layout`` too). For serving:

    - ``ssm_state_indices: [N]`` int: ``initial_state`` is a state pool
      ``[P, HV, K, V]`` and sequence ``n`` reads and writes slot
      ``ssm_state_indices[n]`` *in place*. A negative slot skips the sequence (its
      outputs are zeros); so does a slot past the pool when the indices are on the
      GPU (indices on the CPU are checked: ``ValueError``). Nothing here reads the
      device back, so a decode step can be captured in a CUDA graph;
      the pool is returned as the final state.
    - Speculative decoding: ``ssm_state_indices: [N, S]`` gives each sequence a slot
      per token (at most ``S`` tokens each): the state after its ``t``-th token is
      written to slot ``[n, t]``, and the state it starts from is read from slot
      ``[n, num_accepted_tokens[n] - 1]`` (``[N]`` int, the draft tokens the last step
      accepted; slot ``[n, 0]`` without it), as in flash-linear-attention's serving path.
    - ``inplace_final_state=True`` without indices also updates ``initial_state`` in place.
    - ``out``: a ``[B, T, HV, V]`` tensor of ``v``'s dtype the outputs are written into
      (and which is returned).

    Gradients: where no state is updated in place (no ``ssm_state_indices``,
    ``inplace_final_state`` or ``out``) and an input requires grad, the call is
    differentiable: it runs :func:`~kda_explained.fast.api.chunk_kda`, the same
    function with a backward. An in-place call computes forward only: its outputs do
    not require grad, as in flash-linear-attention.

    Returns ``(o, final_state)``; ``o`` in ``v``'s dtype; ``final_state`` float32 (or the pool).
    """
    state_v_first = resolve_fla_kwargs("fused_recurrent_kda", kwargs, state_v_first, frozenset())
    if num_accepted_tokens is not None and (ssm_state_indices is None or ssm_state_indices.dim() != 2):
        given = None if ssm_state_indices is None else list(ssm_state_indices.shape)
        raise ValueError("num_accepted_tokens: expected together with per-token slots ssm_state_indices [N, S], "
                         f"got ssm_state_indices {given}")
    in_place = ssm_state_indices is not None or bool(inplace_final_state) or out is not None
    wants_grad = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, g, beta, initial_state, A_log, dt_bias))
    if torch.compiler.is_compiling() and not wants_grad and out is None and num_accepted_tokens is None:
        # one operator node for the graph (kda_explained.fast.ops); a pool is its declared mutated argument
        _check_compiled_call(check_g, plan)
        return fused_recurrent_compiled(
            q, k, v, g, beta, A_log=A_log, dt_bias=dt_bias, scale=scale, initial_state=initial_state,
            output_final_state=output_final_state, cu_seqlens=cu_seqlens if cu_seqlens_cpu is None else cu_seqlens_cpu,
            ssm_state_indices=ssm_state_indices, inplace_final_state=bool(inplace_final_state), options=dict(
                use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first))
    if wants_grad and not in_place:  # the same function, differentiable
        return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                         use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                         allow_neg_eigval=allow_neg_eigval, lower_bound=lower_bound, state_v_first=state_v_first,
                         cu_seqlens=cu_seqlens, A_log=A_log, dt_bias=dt_bias, cu_seqlens_cpu=cu_seqlens_cpu,
                         check_g=check_g, plan=plan)
    with torch.no_grad():
        return fused_recurrent_checked(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                                       use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                                       allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, ssm_state_indices,
                                       num_accepted_tokens, inplace_final_state, out, cu_seqlens_cpu, check_g, plan)


def kda(
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
):
    """KDA with the shared signature of the design contract (docs/design.md), on the Triton kernels.

    Sequences of at most :data:`~kda_explained.chunked.recurrent.RECURRENT_MAX_LEN` tokens (decoding, speculative
    steps) go to the token-by-token kernel, longer ones to the chunk pipeline;
    both compute the same function. Training always takes the chunk pipeline.
    ``g`` outside ``[-inf, 0]`` is refused only with ``KDA_EXPLAINED_CHECK_G=1`` (see
    :func:`~kda_explained.fast.api.chunk_kda`'s ``check_g``).
    """
    T = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    if cu_seqlens is not None:  # read (and checked) once here; both paths take the host values
        if not isinstance(cu_seqlens, (list, tuple)):
            require_tensors(cu_seqlens=cu_seqlens)
        cu_seqlens = tuple(int(x) for x in cu_seqlens_values(cu_seqlens))
        T = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, g, beta, initial_state))
    if T <= RECURRENT_MAX_LEN and not training:
        return fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)
