"""``chunk_kda`` as ``torch.library`` operators: what ``torch.compile`` sees as one node.

Under ``torch.compile`` the Triton launches, the host-side tables and the input checks of
:func:`~kda_explained.fast.api.chunk_kda` would each be traced (and some, reading a tensor's
values, would break the graph). So when they are being compiled, ``chunk_kda`` and
``fused_recurrent_kda`` call operators instead, whose bodies run eagerly inside the compiled graph:

- ``kda_explained::chunk_kda`` (``chunk_kda_op``): the forward, returning the output, the
  final state and, for a training step, what the backward reads (``A_qk``, ``M`` and ``G``);
- ``kda_explained::chunk_kda_bwd`` (``chunk_kda_bwd_op``): every gradient;
- ``kda_explained::fused_recurrent_kda`` (``fused_recurrent_op``): decoding, returning the
  output and the final state; ``kda_explained::fused_recurrent_kda_pool``
  (``fused_recurrent_pool_op``): decoding on a state pool updated in place (declared as the
  operator's one mutated argument), as a serving engine's captured decode step runs it.

Each has a fake implementation (shapes and dtypes from the arguments alone), and the forward's
backward is registered as the second operator, so that compiled training goes through the same
Triton backward. The offsets of a packed batch are an argument's *values* (a list of ints): under
``torch.compile`` pass ``cu_seqlens`` as a list (the host knows it; reading a device tensor back
would be a synchronisation and a graph break). ``torch.library.opcheck`` checks every operator in
the tests.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
from torch import Tensor

from .autograd import core_grads, options_grads
from .config import plan_for
from .decode import fused_recurrent_checked
from .forward import chunk_kda_fwd, inference_chunking
from .inputs import check_fast_inputs
from .local import intermediate_dtype

__all__ = ["chunk_kda_op", "chunk_kda_bwd_op", "chunk_kda_compiled", "fused_recurrent_op", "fused_recurrent_pool_op",
           "fused_recurrent_compiled"]


def _options(use_qk_l2norm_in_kernel, use_gate_in_kernel, lower_bound, use_beta_sigmoid_in_kernel,
             allow_neg_eigval, state_v_first) -> dict:
    return dict(use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel, use_gate_in_kernel=use_gate_in_kernel,
                lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
                allow_neg_eigval=allow_neg_eigval, state_v_first=state_v_first)


def _state_shape(q: Tensor, v: Tensor, offsets: Optional[List[int]], state_v_first: bool) -> Tuple[int, ...]:
    N = q.shape[0] if offsets is None else len(offsets) - 1
    HV, K, V = v.shape[2], q.shape[3], v.shape[3]
    return (N, HV, V, K) if state_v_first else (N, HV, K, V)


@torch.library.custom_op("kda_explained::chunk_kda", mutates_args=())
def chunk_kda_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    A_log: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
    scale: float, offsets: Optional[List[int]], chunk_size: Optional[int],
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, lower_bound: Optional[float],
    use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, state_v_first: bool, keep: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(o, final_state, A_qk, M, G)``; the last three only with ``keep`` (else empty): what the
    backward reads. ``chunk_size=None``: the inference forward's choice (:func:`~kda_explained.fast.forward.inference_chunking`)."""
    p, cu = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=offsets,
                              state_v_first=state_v_first, check_g=False)
    plan = plan_for(q.device)
    C, pieces = (chunk_size, None) if chunk_size else inference_chunking(p.B, p.T, cu, p.HV, p.K, p.V, q.device,
                                                                          plan.forward)
    o, S, _, kept = chunk_kda_fwd(q, k, v, g, beta, scale=scale, initial_state=initial_state, cu_seqlens=cu,
                                  chunk_size=C, plan=plan, A_log=A_log, dt_bias=dt_bias, keep_for_backward=keep,
                                  piece_tokens=pieces,
                                  **_options(use_qk_l2norm_in_kernel, use_gate_in_kernel, lower_bound,
                                             use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first))
    if keep:
        return (o, S, *(x.contiguous() for x in kept))
    return (o, S, *(q.new_empty(0, dtype=torch.float32) for _ in range(3)))  # outputs never alias each other


@chunk_kda_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets, chunk_size, use_qk_l2norm_in_kernel,
      use_gate_in_kernel, lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first, keep):
    o = v.new_empty(v.shape)
    S = q.new_empty(_state_shape(q, v, offsets, state_v_first), dtype=torch.float32)
    if not keep:
        return (o, S, *(q.new_empty(0, dtype=torch.float32) for _ in range(3)))
    B, T, HV, K = g.shape
    dt = intermediate_dtype(q.dtype)
    return (o, S, q.new_empty(B, T, HV, chunk_size, dtype=dt), q.new_empty(B, T, HV, chunk_size, dtype=torch.float32),
            q.new_empty(B, T, HV, K, dtype=torch.float32))


@torch.library.custom_op("kda_explained::chunk_kda_bwd", mutates_args=())
def chunk_kda_bwd_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    A_log: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
    A_qk: Tensor, M: Tensor, G: Tensor, do: Tensor, dS: Tensor,
    scale: float, offsets: Optional[List[int]], chunk_size: int,
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, lower_bound: Optional[float],
    use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, state_v_first: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """``(dq, dk, dv, dg, dbeta, dA_log, ddt_bias, dinitial_state)``, empty where there is no input."""
    opts = dict(scale=scale, cu_seqlens=None if offsets is None else tuple(offsets), chunk_size=chunk_size,
                plan=plan_for(q.device), **_options(use_qk_l2norm_in_kernel, use_gate_in_kernel, lower_bound,
                                                    use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first))
    if use_qk_l2norm_in_kernel or use_gate_in_kernel or use_beta_sigmoid_in_kernel:
        grads = options_grads(q, k, v, g, beta, A_log, dt_bias, initial_state, A_qk, M, do, dS, opts)
    else:
        v_first = state_v_first
        S0 = None if initial_state is None else (initial_state.transpose(-1, -2).contiguous() if v_first
                                                  else initial_state)
        dS_kv = dS.transpose(-1, -2).contiguous() if v_first else dS
        dq, dk, dv, dg, dbeta, dS0 = core_grads(q, k, v, G, beta, S0, A_qk, M, do, dS_kv, g.dtype, opts)
        if dS0 is not None and v_first:
            dS0 = dS0.transpose(-1, -2).contiguous()
        grads = (dq, dk, dv, dg, dbeta, None, None, dS0)
    return tuple(q.new_empty(0, dtype=torch.float32) if x is None else x.contiguous() for x in grads)


@chunk_kda_bwd_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, A_qk, M, G, do, dS, scale, offsets, chunk_size,
      use_qk_l2norm_in_kernel, use_gate_in_kernel, lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval,
      state_v_first):
    def like(x):
        return q.new_empty(0, dtype=torch.float32) if x is None else x.new_empty(x.shape)

    return like(q), like(k), like(v), like(g), like(beta), like(A_log), like(dt_bias), like(initial_state)


_ARGS = ("q", "k", "v", "g", "beta", "A_log", "dt_bias", "initial_state", "scale", "offsets", "chunk_size",
         "use_qk_l2norm_in_kernel", "use_gate_in_kernel", "lower_bound", "use_beta_sigmoid_in_kernel",
         "allow_neg_eigval", "state_v_first", "keep")
_TENSORS = 8  # q, k, v, g, beta, A_log, dt_bias, initial_state


def _setup_context(ctx, inputs, output):
    args = dict(zip(_ARGS, inputs))
    if not args["keep"]:
        raise RuntimeError("kda_explained::chunk_kda: differentiate it with keep=True (what the backward reads)")
    ctx.save_for_backward(*inputs[:_TENSORS], *output[2:])
    ctx.args = {name: args[name] for name in _ARGS[_TENSORS:-1]}
    ctx.present = [x is not None for x in inputs[:_TENSORS]]


def _backward(ctx, do, dS, *_):
    saved = ctx.saved_tensors
    q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M, G = saved
    if do is None:  # only the final state was used
        do = torch.zeros_like(v)
    if dS is None:  # only the output was used
        dS = q.new_zeros(_state_shape(q, v, ctx.args["offsets"], ctx.args["state_v_first"]), dtype=torch.float32)
    grads = chunk_kda_bwd_op(q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M, G, do, dS, **ctx.args)
    out = [x if present else None for x, present in zip(grads, ctx.present)]
    return (*out, *([None] * (len(_ARGS) - _TENSORS)))


chunk_kda_op.register_autograd(_backward, setup_context=_setup_context)


def _traced_arguments(cu_seqlens, A_log, dt_bias, options: dict):
    """``(offsets, A_log, dt_bias)`` as the operators take them: host offsets, a flat ``A_log``, no gate
    parameters unless the gate is computed in the kernel."""
    if cu_seqlens is not None and not isinstance(cu_seqlens, (list, tuple)):
        raise ValueError("cu_seqlens: under torch.compile pass the offsets of a packed batch as a list of ints "
                         f"(the host knows them; a {type(cu_seqlens).__name__} would be read back), got a tensor")
    offsets = None if cu_seqlens is None else [int(x) for x in cu_seqlens]
    if not options["use_gate_in_kernel"]:
        return offsets, None, None
    return offsets, (None if A_log is None else A_log.reshape(-1)), dt_bias


def chunk_kda_compiled(q, k, v, g, beta, *, scale, initial_state, output_final_state, cu_seqlens, A_log, dt_bias,
                       chunk_size, options: dict):
    """``chunk_kda`` while ``torch.compile`` traces it: the checks and the pipeline in the operators."""
    offsets, A_log, dt_bias = _traced_arguments(cu_seqlens, A_log, dt_bias, options)
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, A_log, dt_bias, initial_state))
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    C = chunk_size if chunk_size is not None else (64 if needs_grad else None)
    o, S, _, _, _ = chunk_kda_op(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets, C, keep=needs_grad,
                                 **options)
    return o, (S if output_final_state else None)


@torch.library.custom_op("kda_explained::fused_recurrent_kda", mutates_args=())
def fused_recurrent_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    A_log: Optional[Tensor], dt_bias: Optional[Tensor], initial_state: Optional[Tensor],
    scale: float, offsets: Optional[List[int]],
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, lower_bound: Optional[float],
    use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, state_v_first: bool,
) -> Tuple[Tensor, Tensor]:
    """``(o, final_state)`` token by token; ``initial_state`` is read, never written."""
    return fused_recurrent_checked(
        q, k, v, g, beta, A_log, dt_bias, scale, initial_state, True, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, state_v_first, offsets, None, None, None, None,
        None, False, None)


@fused_recurrent_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets, use_qk_l2norm_in_kernel, use_gate_in_kernel,
      lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first):
    return v.new_empty(v.shape), q.new_empty(_state_shape(q, v, offsets, state_v_first), dtype=torch.float32)


@torch.library.custom_op("kda_explained::fused_recurrent_kda_pool", mutates_args=("pool",))
def fused_recurrent_pool_op(
    q: Tensor, k: Tensor, v: Tensor, g: Tensor, beta: Tensor,
    A_log: Optional[Tensor], dt_bias: Optional[Tensor], pool: Tensor, slots: Optional[Tensor],
    scale: float, offsets: Optional[List[int]],
    use_qk_l2norm_in_kernel: bool, use_gate_in_kernel: bool, lower_bound: Optional[float],
    use_beta_sigmoid_in_kernel: bool, allow_neg_eigval: bool, state_v_first: bool,
) -> Tensor:
    """``o``; sequence ``n`` reads and writes ``pool[slots[n]]`` in place (``pool[n]`` without ``slots``)."""
    o, _ = fused_recurrent_checked(
        q, k, v, g, beta, A_log, dt_bias, scale, pool, False, use_qk_l2norm_in_kernel, use_gate_in_kernel,
        use_beta_sigmoid_in_kernel, allow_neg_eigval, lower_bound, state_v_first, offsets, slots, None,
        slots is None, None, None, False, None)
    return o


@fused_recurrent_pool_op.register_fake
def _(q, k, v, g, beta, A_log, dt_bias, pool, slots, scale, offsets, use_qk_l2norm_in_kernel, use_gate_in_kernel,
      lower_bound, use_beta_sigmoid_in_kernel, allow_neg_eigval, state_v_first):
    return v.new_empty(v.shape)


def fused_recurrent_compiled(q, k, v, g, beta, *, A_log, dt_bias, scale, initial_state, output_final_state,
                             cu_seqlens, ssm_state_indices, inplace_final_state, options: dict):
    """``fused_recurrent_kda`` (no gradient) while ``torch.compile`` traces it: one operator node."""
    offsets, A_log, dt_bias = _traced_arguments(cu_seqlens, A_log, dt_bias, options)
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    if ssm_state_indices is not None or inplace_final_state:
        o = fused_recurrent_pool_op(q, k, v, g, beta, A_log, dt_bias, initial_state, ssm_state_indices, scale,
                                    offsets, **options)
        return o, initial_state
    o, S = fused_recurrent_op(q, k, v, g, beta, A_log, dt_bias, initial_state, scale, offsets, **options)
    return o, (S if output_final_state else None)
