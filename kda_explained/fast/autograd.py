"""``chunk_kda``'s autograd: the forward through :mod:`~kda_explained.fast.forward`, the backward
through the Triton kernels of :mod:`~kda_explained.fast.backward` (and, with the in-kernel
options, :mod:`~kda_explained.fast.backward_options`).

Two functions, by what the forward has to keep:

- :class:`ChunkKDAFunction`, no option on: it keeps ``G`` (float32, stage 1's output) in place of
  ``g``, since the backward reads only ``G``, so stage 1 is not recomputed;
- :class:`ChunkKDAOptionsFunction`, an option on (L2 norm, gate, beta sigmoid): it keeps the raw
  inputs, and the backward recomputes the options' forward in the kernels and differentiates them.

Both keep the chunks' ``A_qk`` and ``M = (I + A_kk)^{-1}``, which the backward would otherwise
recompute with the keys' and queries' passes. Both take ``opts``, the call's resolved options
(scale, host offsets, chunk size, plan, ...), as their last argument.
"""

from __future__ import annotations

import torch

from .backward import kda_backward
from .backward_options import kda_backward_with_options
from .forward import chunk_kda_fwd
from .local import intermediate_dtype

__all__ = ["ChunkKDAFunction", "ChunkKDAOptionsFunction", "chunk_kda_differentiable", "core_grads", "options_grads"]

_OPTIONS = ("use_qk_l2norm_in_kernel", "use_gate_in_kernel", "lower_bound", "use_beta_sigmoid_in_kernel",
            "allow_neg_eigval", "state_v_first")


def _to_kv(x, v_first: bool):
    """A ``[V, K]`` state (``state_v_first``) as the ``[K, V]`` the kernels' backward takes, or as is."""
    return x.transpose(-1, -2).contiguous() if x is not None and v_first else x


def core_grads(q, k, v, G, beta, S0, A_qk, M, do, dS, g_dtype, opts):
    """The core's gradients ``(dq, dk, dv, dg, dbeta, dS0)`` in the inputs' dtypes (states ``[K, V]``),
    from what the forward kept: ``G`` in place of ``g``, and the chunks' ``A_qk`` and ``M``."""
    # dq, dk, dv written in the inputs' dtype by their last kernels (q, k, v share one dtype)
    dq, dk, dv, dg, dbeta, dS0 = kda_backward(q, k, v, None, beta, do, dS, scale=opts["scale"], initial_state=S0,
                                              cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
                                              factors=(A_qk, M), G=G, out_dtype=intermediate_dtype(q.dtype),
                                              plan=opts["plan"])
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g_dtype), dbeta.to(beta.dtype),
            None if S0 is None else dS0.to(S0.dtype))


def options_grads(q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M, do, dS, opts):
    """With the in-kernel options: ``(dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dS0)`` in the inputs' dtypes
    (``None`` for what is absent), the states in the layout the call used."""
    v_first = opts["state_v_first"]  # the core's states are [K, V]
    dq, dk, dv, dg, dbeta, dS0, dA_log, ddt_bias = kda_backward_with_options(
        q, k, v, g, beta, do, _to_kv(dS, v_first), scale=opts["scale"], initial_state=_to_kv(S0, v_first),
        cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
        use_qk_l2norm_in_kernel=opts["use_qk_l2norm_in_kernel"], use_gate_in_kernel=opts["use_gate_in_kernel"],
        A_log=A_log, dt_bias=dt_bias, lower_bound=opts["lower_bound"],
        use_beta_sigmoid_in_kernel=opts["use_beta_sigmoid_in_kernel"], allow_neg_eigval=opts["allow_neg_eigval"],
        factors=(A_qk, M), plan=opts["plan"],
    )
    return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
            None if dA_log is None else dA_log.reshape(A_log.shape).to(A_log.dtype),
            None if ddt_bias is None else ddt_bias.reshape(dt_bias.shape).to(dt_bias.dtype),
            None if S0 is None else _to_kv(dS0, v_first).to(S0.dtype))


class ChunkKDAFunction(torch.autograd.Function):
    """The KDA core (no in-kernel option): forward and backward both through the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, opts):
        """``(o, final_state)``; keeps ``G``, ``A_qk`` and ``M`` for the backward."""
        o, S, _, (A_qk, M, G) = chunk_kda_fwd(q, k, v, g, beta, scale=opts["scale"], initial_state=initial_state,
                                              cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
                                              plan=opts["plan"], keep_for_backward=True)
        ctx.save_for_backward(q, k, v, G, beta, initial_state, A_qk, M)
        ctx.g_dtype = g.dtype
        ctx.opts = opts
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        """The gradients of ``q, k, v, g, beta`` and the initial state (:func:`core_grads`)."""
        q, k, v, G, beta, S0, A_qk, M = ctx.saved_tensors
        return (*core_grads(q, k, v, G, beta, S0, A_qk, M, do, dS, ctx.g_dtype, ctx.opts), None)


class ChunkKDAOptionsFunction(torch.autograd.Function):
    """With the in-kernel options: the options in the forward's kernels; backward: the core and the
    options through Triton kernels (:func:`~kda_explained.fast.backward_options.kda_backward_with_options`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
        """``(o, final_state)`` with the options in the kernels; keeps ``A_qk`` and ``M`` for the backward."""
        o, S, _, (A_qk, M, _) = chunk_kda_fwd(
            q, k, v, g, beta, scale=opts["scale"], initial_state=initial_state, cu_seqlens=opts["cu_seqlens"],
            chunk_size=opts["chunk_size"], plan=opts["plan"], A_log=A_log, dt_bias=dt_bias, keep_for_backward=True,
            **{name: opts[name] for name in _OPTIONS})
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, A_qk, M)
        ctx.opts = opts
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        """The gradients of every input, the gate's parameters included (:func:`options_grads`)."""
        q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M = ctx.saved_tensors
        return (*options_grads(q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M, do, dS, ctx.opts), None)


def chunk_kda_differentiable(q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
    """``(o, final_state)`` with a backward: the options' function where an option is on, else the core's
    (which takes the state as ``[K, V]``: a ``[V, K]`` one, ``state_v_first``, is transposed around it)."""
    if opts["use_qk_l2norm_in_kernel"] or opts["use_gate_in_kernel"] or opts["use_beta_sigmoid_in_kernel"]:
        return ChunkKDAOptionsFunction.apply(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
    v_first = opts["state_v_first"]
    o, S = ChunkKDAFunction.apply(q, k, v, g, beta, _to_kv(initial_state, v_first), opts)
    return o.to(v.dtype), (S.transpose(-1, -2) if v_first else S)
