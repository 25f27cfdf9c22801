"""The fast layer's entry points: ``chunk_kda`` (prefill and training), ``fused_recurrent_kda``
(decoding), both drop-ins for ``fla.ops.kda``'s functions of the same names, and ``kda`` (the
shared signature of every layer, dispatching by length)."""

from __future__ import annotations

from typing import Optional

import torch

from ..chunked.kda import require_tensors
from ..chunked.recurrent import RECURRENT_MAX_LEN
from ..validation import check_chunk_size, check_gate_params, cu_seqlens_values
from ._meta import device_offsets
from .autograd import chunk_kda_differentiable
from .config import Plan, plan_for
from .forward import chunk_kda_fwd, forward_chunk_size
from .inputs import FAST_CHUNK_SIZES, check_fast_inputs, resolve_fla_kwargs
from .ops import chunk_kda_compiled
from .recurrent import fused_recurrent_kda_fwd

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
            computed right, and no later input ever changes an earlier output.
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
        inference = not (needs_grad or return_intermediate_states)
        opts["chunk_size"] = forward_chunk_size(p.N * p.HV, p.V, q.device, plan.forward) if inference else 64
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
    if wants_grad and not in_place:  # the same function, differentiable
        return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                         output_final_state=output_final_state, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
                         use_gate_in_kernel=use_gate_in_kernel, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                         allow_neg_eigval=allow_neg_eigval, lower_bound=lower_bound, state_v_first=state_v_first,
                         cu_seqlens=cu_seqlens, A_log=A_log, dt_bias=dt_bias, cu_seqlens_cpu=cu_seqlens_cpu,
                         check_g=check_g, plan=plan)
    with torch.no_grad():
        return _fused_recurrent(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                                use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel,
                                allow_neg_eigval, lower_bound, state_v_first, cu_seqlens, ssm_state_indices,
                                num_accepted_tokens, inplace_final_state, out, cu_seqlens_cpu, check_g, plan)


def _check_out(out, v):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(v.shape) or out.dtype != v.dtype or out.device != v.device \
            or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {v.dtype} tensor of v's shape {list(v.shape)} on {v.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}, contiguous={out.is_contiguous()}")


def _fused_recurrent(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                     use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                     lower_bound, state_v_first, cu_seqlens, ssm_state_indices, num_accepted_tokens,
                     inplace_final_state, out, cu_seqlens_cpu, check_g, plan):
    """:func:`fused_recurrent_kda` on inputs that need no graph: checks, then the kernel."""
    check_g = check_g if not use_gate_in_kernel else False  # with the gate, g is its raw input
    if out is not None:
        _check_out(out, v)
    if ssm_state_indices is not None:
        if initial_state is None:
            raise ValueError("initial_state: expected the state pool [P, HV, K, V] with ssm_state_indices, got None")
        if not isinstance(ssm_state_indices, torch.Tensor) or ssm_state_indices.dtype.is_floating_point \
                or ssm_state_indices.dim() not in (1, 2):
            raise TypeError(f"ssm_state_indices: expected a 1-D integer tensor [N] (or [N, S], a slot per token), "
                            f"got {ssm_state_indices!r}")
        pool = initial_state
        # validate the call as if each sequence had its own state row
        B = q.shape[0]
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        if ssm_state_indices.shape[0] != N:
            raise ValueError(f"ssm_state_indices: expected N = {N} entries, got {ssm_state_indices.shape[0]}")
        view = pool[:1].expand(N, *pool.shape[1:]) if pool.shape[0] > 0 else pool
        p, cu_t = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=view, cu_seqlens=cu_seqlens,
                                    state_v_first=state_v_first, cu_seqlens_cpu=cu_seqlens_cpu, check_g=check_g)
        if pool.dtype != torch.float32 or not pool.is_contiguous():
            raise ValueError(f"initial_state: expected a contiguous float32 state pool to update in place, "
                             f"got {pool.dtype}, contiguous={pool.is_contiguous()}")
        if ssm_state_indices.device.type == "cpu" and ssm_state_indices.numel() \
                and int(ssm_state_indices.max()) >= pool.shape[0]:
            # checked where it is free; on the device the kernel skips such a slot (no sync)
            raise ValueError(f"ssm_state_indices: expected slots < pool size {pool.shape[0]}, "
                             f"got {int(ssm_state_indices.max())}")
        if ssm_state_indices.dim() == 2:
            S = ssm_state_indices.shape[1]
            lengths = [b - a for a, b in zip(cu_t[:-1], cu_t[1:])] if cu_t is not None else [p.T] * p.B
            if max(lengths, default=0) > S:
                raise ValueError(f"ssm_state_indices: expected a slot for every token, [N, S] with S >= "
                                 f"{max(lengths)} (the longest sequence), got S = {S}")
            if num_accepted_tokens is not None:
                if not isinstance(num_accepted_tokens, torch.Tensor) or num_accepted_tokens.dtype.is_floating_point \
                        or tuple(num_accepted_tokens.shape) != (N,):
                    raise TypeError(f"num_accepted_tokens: expected an integer tensor [N] = [{N}], "
                                    f"got {num_accepted_tokens!r}")
                if num_accepted_tokens.device.type == "cpu" and N and (
                        int(num_accepted_tokens.min()) < 1 or int(num_accepted_tokens.max()) > S):
                    raise ValueError(f"num_accepted_tokens: expected values in [1, {S}], got "
                                     f"{num_accepted_tokens.tolist()}")
                num_accepted_tokens = num_accepted_tokens.to(q.device)
        slots = ssm_state_indices.to(device=q.device, dtype=torch.int64)
        final = pool
    else:
        p, cu_t = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    cu_seqlens=cu_seqlens, state_v_first=state_v_first,
                                    cu_seqlens_cpu=cu_seqlens_cpu, check_g=check_g)
        slots = None
        if inplace_final_state:
            if initial_state is None or initial_state.dtype != torch.float32 or not initial_state.is_contiguous():
                raise ValueError("initial_state: expected a contiguous float32 tensor to update in place "
                                 "(inplace_final_state=True)")
            final = initial_state
        elif output_final_state:
            shape = (p.N, p.HV, p.V, p.K) if state_v_first else (p.N, p.HV, p.K, p.V)
            final = torch.empty(shape, dtype=torch.float32, device=q.device)
        else:
            final = None
    if use_gate_in_kernel:
        check_gate_params(p.HV, p.K, A_log, dt_bias, lower_bound, require_A_log=True)
    else:
        A_log = dt_bias = None
    # a plain batch needs no offsets table (and so no host-to-device copy per decode step)
    cu = None if cu_t is None else device_offsets(cu_t, q.device)  # [N + 1] int32, cached by value
    o, final = fused_recurrent_kda_fwd(
        q, k, v, g, beta, scale=p.scale, cu=cu, N=p.N, initial_state=initial_state, final_state=final,
        ssm_state_indices=slots, num_accepted_tokens=num_accepted_tokens, out=out, state_v_first=state_v_first,
        use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
        A_log=A_log.reshape(-1) if A_log is not None else None, dt_bias=dt_bias, lower_bound=lower_bound,
        use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel, allow_neg_eigval=allow_neg_eigval,
        config=(plan or plan_for(q.device)).decode,
    )
    keep = output_final_state or ssm_state_indices is not None or inplace_final_state
    return o, (final if keep else None)


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
