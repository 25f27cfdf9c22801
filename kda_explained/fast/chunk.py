"""``fast.chunk_kda``: the chunked pipeline as Triton kernels, stage for stage like :func:`kda_explained.chunked.kda.kda`.

The forward reads as the same pipeline (report §3.1)::

    G, beta   = chunk_local_cumsum(g, ...)                    # 1. gate + in-chunk cumsum (+ beta sigmoid)
    A_qk, W, U, qg, kg = chunk_local_factors(q, k, v, G, beta) # 2.-4. Eq. 5-7: A_kk, M stay on chip
    h, v_new, S = state_passing(kg, W, U, G, S0)              # 5. Eq. 8
    o         = chunk_output(qg, h, v_new, A_qk)              # 6. Eq. 9

Stages 2-4 (intra-chunk matrices, UT transform, WY factors) run as one kernel,
since ``A_kk`` and ``M`` are only needed to make ``W`` and ``U``; the tests check
its outputs against the three chunked stages of those names. Intermediates
travel in the input dtype for bf16/fp16 inputs, in float32 otherwise.

The inference forward on a batch that fills the GPU takes chunks of 16 tokens
(``chunk_size=None``, :func:`forward_chunk_size`): stages 1-4 then run as one pass
(:func:`~kda_explained.fast.local.chunk_local_factors_one_pass`) and stages 5 and 6
as one kernel, which also applies the UT transform's ``Mb = M Diag(beta)`` itself
(``ONE_PASS_FOLD``)::

    f = chunk_local_factors_one_pass(q, k, v, g, beta, scale, 16, fold=2)      # 1.-4.
    o, S = state_passing_output(f.kg, None, None, f.G_end, f.qg, f.A_qk, S0, 16,
                                Mb=f.Mb, v=v, kG=f.kG)                          # 5. + 6.
"""

from __future__ import annotations

import os
import warnings
from typing import Optional

import torch
import triton

from ..chunked.kda import require_tensors
from ..validation import check_chunk_size, check_g_domain, check_gate_params, check_kda_inputs, cu_seqlens_values
from ._meta import interpreting, seq_meta, sm_count
from .local import ONE_PASS_MAX_CHUNK, chunk_local_factors, chunk_local_factors_one_pass, intermediate_dtype
from .output import chunk_output
from .prepare import chunk_local_cumsum, l2norm
from .state import output_fused, state_passing, state_passing_output, state_passing_output_segmented, state_segments

__all__ = ["chunk_kda", "chunk_kda_fwd", "forward_chunk_size", "FAST_CHUNK_SIZES", "MAX_HEAD_DIM", "check_fast_inputs",
           "CHECK_G_ENV"]

#: Chunk sizes the kernels take (multiples of the 16-token sub-chunk).
FAST_CHUNK_SIZES = (16, 32, 64)
#: Largest K and V; a state tile ``[K, BV]`` and the ``[BT, K]`` tiles live in registers.
MAX_HEAD_DIM = 256

#: Stages 5 and 6 as one kernel (:func:`~kda_explained.fast.state.state_passing_output`) where the
#: grid is large enough (:func:`~kda_explained.fast.state.output_fused`): the chunk states ``h`` and
#: pseudo-values ``v_new`` never go to memory. ``False``: always the two kernels, with ``h`` and
#: ``v_new`` written and read back (as ``return_intermediate_states`` always runs).
FUSED_STATE_OUTPUT = True

#: The inference forward's chunk size where the caller leaves it to the layer (``chunk_size=None``):
#: ``SHORT_CHUNK`` tokens (stages 1-4 in one pass, :func:`~kda_explained.fast.local.chunk_local_factors_one_pass`)
#: where the state pass has at least ``SHORT_CHUNK_MIN_PROGRAMS_PER_SM`` programs per SM at 64 value
#: columns, else 64: shorter chunks multiply the sequential steps of the state pass, which one long
#: sequence cannot spread over the GPU. ``None``: always 64. Training always takes 64 (the
#: backward keeps the 64-token chunks' ``A_qk`` and ``M``). H100, bf16, one pass at 16 / 32 against
#: the 64-token pipeline: B=8, T=4096, H=16 1.366 / 1.483 vs 1.848 ms; T=8192, H=96 2.331 / 2.372 vs
#: 2.977 (``benchmarks/probe/variants.py``); T=65536, H=16, with the kernels of before the one
#: pass, 8.96 / 6.11 vs 5.07.
SHORT_CHUNK = 16
SHORT_CHUNK_MIN_PROGRAMS_PER_SM = 1.0
#: How much of the WY representation the one pass leaves to the state pass (its ``fold``): 0 none,
#: 1 ``U = Mb V`` (the one pass never reads ``v``), 2 ``U`` and ``W = Mb kG`` as well (the one pass
#: writes ``kG`` instead of ``W`` and skips its second sweep over ``k`` and ``g``).
ONE_PASS_FOLD = 2

# Arguments of fla.ops.kda.chunk_kda that change nothing here, accepted so code can switch imports.
_FLA_NO_OPS = frozenset({"safe_gate", "disable_recompute", "use_graph", "max_num_seqs"})
#: Set to 1 to make every fast call read ``g`` and refuse values outside ``[-inf, 0]`` (the
#: ``check_g`` argument's default). Off by default: the check waits for the GPU.
CHECK_G_ENV = "KDA_EXPLAINED_CHECK_G"


def check_fast_inputs(q, k, v, g, beta, *, scale, initial_state, cu_seqlens, state_v_first=False,
                      cu_seqlens_cpu=None, check_g=None):
    """Shared checks of the fast layer: DESIGN.md's, plus what the kernels need (device, head dims).

    Returns the problem's sizes and the offsets as a tuple of ints (``None`` for a plain
    batch), which is what the launchers take: the offsets are read once here, from
    ``cu_seqlens_cpu`` when given (no device read) or from ``cu_seqlens`` itself (a GPU
    tensor is read back, which waits for the GPU), never from a cache keyed by the tensor.
    ``check_g`` (default: the ``KDA_EXPLAINED_CHECK_G`` environment switch) reads ``g``
    to refuse values outside ``[-inf, 0]``, which costs a device read.
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    offsets = None
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, (list, tuple)):
            require_tensors(cu_seqlens=cu_seqlens)
        if cu_seqlens_cpu is None:
            offsets = tuple(int(x) for x in cu_seqlens_values(cu_seqlens))
        else:
            offsets = tuple(int(x) for x in cu_seqlens_values(cu_seqlens_cpu))
            if isinstance(cu_seqlens, torch.Tensor) and (cu_seqlens.dtype.is_floating_point or cu_seqlens.dim() != 1
                                                         or cu_seqlens.numel() != len(offsets)):
                raise ValueError(f"cu_seqlens: expected a 1-D integer tensor of {len(offsets)} offsets like "
                                 f"cu_seqlens_cpu, got {cu_seqlens.dtype} of shape {list(cu_seqlens.shape)}")
    elif cu_seqlens_cpu is not None:
        raise ValueError("cu_seqlens_cpu: expected only together with cu_seqlens, got cu_seqlens=None")
    if state_v_first and initial_state is not None and initial_state.dim() == 4:
        initial_state_kv = initial_state.transpose(-1, -2)  # validate in [K, V] terms
    else:
        initial_state_kv = initial_state
    p = check_kda_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state_kv, cu_seqlens=offsets)
    if q.device.type != "cuda" and not interpreting():
        raise ValueError(
            f"q: expected a CUDA tensor for the Triton kernels (or TRITON_INTERPRET=1 to run them on the CPU), "
            f"got device {q.device}"
        )
    if p.K > MAX_HEAD_DIM or p.V > MAX_HEAD_DIM:
        raise ValueError(f"q, v: expected head dims K, V <= {MAX_HEAD_DIM}, got K = {p.K}, V = {p.V}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            raise TypeError(f"{name}: expected float32, bfloat16 or float16 for the fast layer, got {x.dtype}")
    if check_g is None:
        check_g = os.environ.get(CHECK_G_ENV, "0") not in ("", "0")
    if check_g:
        check_g_domain(g, device_check=True)
    return p, offsets


def resolve_fla_kwargs(fn: str, kwargs: dict, state_v_first: bool, accepted: frozenset) -> bool:
    """Take flash-linear-attention's extra keyword arguments out of ``kwargs``; return ``state_v_first``.

    ``transpose_state_layout`` is flash-linear-attention's older name of ``state_v_first``
    (accepted with its :class:`DeprecationWarning`); names in ``accepted`` change nothing here;
    anything else is a :class:`TypeError`, as for any Python function.
    """
    if "transpose_state_layout" in kwargs:
        if state_v_first:
            raise ValueError("transpose_state_layout: the older name of state_v_first; got both")
        warnings.warn("transpose_state_layout is the older name of state_v_first", DeprecationWarning, stacklevel=3)
        state_v_first = bool(kwargs.pop("transpose_state_layout"))
    unknown = set(kwargs) - accepted
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {sorted(unknown)}")
    return state_v_first


def forward_chunk_size(sequences_x_heads: int, V: int, device) -> int:
    """The inference forward's chunk size: ``SHORT_CHUNK`` where the state pass's grid (one program per
    sequence, value head and 64 value columns) holds ``SHORT_CHUNK_MIN_PROGRAMS_PER_SM`` programs per
    SM, else 64 (see ``SHORT_CHUNK``)."""
    if SHORT_CHUNK is None:
        return 64
    sms = sm_count(device)
    programs = sequences_x_heads * triton.cdiv(V, 64)
    return SHORT_CHUNK if programs >= SHORT_CHUNK_MIN_PROGRAMS_PER_SM * sms else 64


def chunk_kda_fwd(
    q, k, v, g, beta, *, scale: float, initial_state, cu_seqlens, chunk_size: int = 64,
    use_qk_l2norm_in_kernel: bool = False, use_gate_in_kernel: bool = False, A_log=None, dt_bias=None,
    lower_bound: Optional[float] = None, use_beta_sigmoid_in_kernel: bool = False, allow_neg_eigval: bool = False,
    state_v_first: bool = False, float32_chunk_states: bool = False, keep_for_backward: bool = False,
):
    """The stages on validated inputs; returns ``o`` (``v``'s dtype), the final state, the chunk states
    and, with ``keep_for_backward``, ``(A_qk, M, G)`` (else ``None``).

    The chunk states ``h`` are float32 with ``float32_chunk_states``; otherwise stages 5 and 6 may run
    as one kernel (``FUSED_STATE_OUTPUT``, large grids) and ``h`` is ``None`` (never in memory), or, with the
    two kernels, in the intermediate dtype (all stage 6 needs). ``A_qk`` and ``M = (I + A_kk)^{-1}`` (float32) are
    what the backward would otherwise recompute with the whole keys' and queries' passes
    (:func:`kda_explained.fast.backward.core_backward`'s ``factors``); ``G`` is stage 1's output.
    """
    C = chunk_size
    meta = seq_meta(q.shape[0], q.shape[1], C, cu_seqlens, q.device)  # the chunk tables, built once
    if use_qk_l2norm_in_kernel:
        q, k = l2norm(q), l2norm(k)
    # short chunks: stages 1-4 in one pass that sums G from g itself and keeps it only at the chunk
    # ends; stage 1's kernel still runs first for the gate options (or for 64-token chunks)
    one_pass = C <= ONE_PASS_MAX_CHUNK and not keep_for_backward
    gate_options = use_gate_in_kernel or use_beta_sigmoid_in_kernel
    if not one_pass or gate_options:
        G, beta = chunk_local_cumsum(
            g, C, cu_seqlens, beta=beta, use_gate_in_kernel=use_gate_in_kernel, A_log=A_log, dt_bias=dt_bias,
            lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
            allow_neg_eigval=allow_neg_eigval, meta=meta,
        )  # 1.                                                                   [B, T, HV, K], beta float32
    # 5. and 6. as one kernel where its grid is large enough, and always after the one pass (h, v_new on chip)
    fuse = FUSED_STATE_OUTPUT and not float32_chunk_states and (
        one_pass or output_fused(meta.N * v.shape[2], v.shape[3], q.device))
    if one_pass:  # 1.-4.
        f = chunk_local_factors_one_pass(q, k, v, G if gate_options else g, beta, scale, C, cu_seqlens,
                                         cumulative=gate_options, fold=ONE_PASS_FOLD if fuse else 0, meta=meta)
        G = f.G_end  # [NC, HV, K]: the rows of G the state pass reads
    else:  # 2.-4.
        f = chunk_local_factors(q, k, v, G, beta, scale, C, cu_seqlens, store_m=keep_for_backward, meta=meta)
    A_qk, W, U, qg, kg = f[:5]
    wy = dict(Mb=f.Mb, v=v if f.Mb is not None else None, kG=f.kG)  # the UT transform left to 5. (fold)
    kept = (A_qk, f.M, G) if keep_for_backward else None
    segments = 1 if float32_chunk_states or one_pass else state_segments(
        meta.N * v.shape[2], v.shape[3], q.shape[0], q.shape[1], C, cu_seqlens, q.device)
    if segments > 1:  # 5. + 6. on segments of the sequences, side by side: the SMs would idle otherwise
        o, S = state_passing_output_segmented(kg, W, U, G, qg, A_qk, initial_state, C, cu_seqlens,
                                              segments=segments, out_dtype=v.dtype, state_v_first=state_v_first)
        return o, S, None, kept
    if fuse:  # 5. + 6. in one kernel
        o, S = state_passing_output(kg, W, U, G, qg, A_qk, initial_state, C, cu_seqlens, **wy, out_dtype=v.dtype,
                                    state_v_first=state_v_first, meta=meta)
        return o, S, None, kept
    h_dtype = torch.float32 if float32_chunk_states else intermediate_dtype(q.dtype)
    h, v_new, S = state_passing(kg, W, U, G, initial_state, C, cu_seqlens, state_v_first=state_v_first,
                                h_dtype=h_dtype, meta=meta)  # 5.                       h: [NC, HV, K, V]
    o = chunk_output(qg, h, v_new, A_qk, C, cu_seqlens, out_dtype=v.dtype, state_v_first=state_v_first,
                     meta=meta)  # 6.
    return o, S, h, kept


def _options_in_pytorch(q, k, g, beta, A_log, dt_bias, initial_state, opts):
    """The options of ``chunk_kda`` (L2 norm, gate, beta sigmoid, ``[V, K]`` state) in differentiable PyTorch.

    Returns ``q, k, g, beta`` and the initial state as ``[K, V]`` (contiguous), ready for the core.
    """
    from .. import chunked

    if opts["use_qk_l2norm_in_kernel"]:
        q, k = chunked.l2norm(q), chunked.l2norm(k)
    if opts["use_gate_in_kernel"]:
        if opts["lower_bound"] is not None:
            g = chunked.lowerbound_gate(g, A_log, dt_bias, lower_bound=opts["lower_bound"])
        else:
            g = chunked.kda_gate(g, A_log, dt_bias)
    if opts["use_beta_sigmoid_in_kernel"]:
        beta = (2.0 if opts["allow_neg_eigval"] else 1.0) * torch.sigmoid(beta.float())
    S0 = initial_state
    if S0 is not None and opts["state_v_first"]:
        S0 = S0.transpose(-1, -2).contiguous()
    return q, k, g, beta, S0


def _reference_forward(q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
    """The same function in differentiable PyTorch (the chunked layer), for the cross-check backward."""
    from .. import chunked

    q, k, g, beta, S0 = _options_in_pytorch(q, k, g, beta, A_log, dt_bias, initial_state, opts)
    o, S = chunked.kda(q, k, v, g, beta, scale=opts["scale"], initial_state=S0, output_final_state=True,
                       cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"])
    if opts["state_v_first"]:
        S = S.transpose(-1, -2)
    return o, S


def _forward_with_options(q, k, v, g, beta, A_log, dt_bias, initial_state, opts, keep_for_backward=False):
    """:func:`chunk_kda_fwd` with the options of ``opts`` applied inside the kernels."""
    return chunk_kda_fwd(
        q, k, v, g, beta, scale=opts["scale"], initial_state=initial_state, cu_seqlens=opts["cu_seqlens"],
        chunk_size=opts["chunk_size"], use_qk_l2norm_in_kernel=opts["use_qk_l2norm_in_kernel"],
        use_gate_in_kernel=opts["use_gate_in_kernel"], A_log=A_log, dt_bias=dt_bias,
        lower_bound=opts["lower_bound"], use_beta_sigmoid_in_kernel=opts["use_beta_sigmoid_in_kernel"],
        allow_neg_eigval=opts["allow_neg_eigval"], state_v_first=opts["state_v_first"],
        keep_for_backward=keep_for_backward,
    )


class _ChunkKDAFunction(torch.autograd.Function):
    """Forward through the Triton kernels. Backward: recompute through the chunked layer's autograd.

    The reference backward (``TRITON_BACKWARD = False``): exact float32 gradients at PyTorch
    speed (a training step 326 ms against 9.53 ms through the Triton backward at ``B=8,
    T=4096, H=16``, H100), kept as a cross-check.
    """

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
        o, S, _, _ = _forward_with_options(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state)
        ctx.opts = opts
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        needs = ctx.needs_input_grad[:8]
        inputs = [x.detach().requires_grad_(n) if x is not None else None for x, n in zip(ctx.saved_tensors, needs)]
        with torch.enable_grad():
            o, S = _reference_forward(*inputs, ctx.opts)
            wrt = [x for x, n in zip(inputs, needs) if n]
            grads = torch.autograd.grad((o, S), wrt, (do, dS), allow_unused=True)
        it = iter(grads)
        return (*[next(it) if n else None for n in needs], None)


#: Differentiate through the Triton backward kernels of :mod:`kda_explained.fast.backward`
#: (the default); the options (L2 norm, gate, beta sigmoid) through those of
#: :mod:`kda_explained.fast.backward_options` (``TRITON_OPTIONS_BACKWARD``), or by PyTorch
#: autograd around the Triton core. ``False``: recompute through the chunked layer's autograd
#: instead (:class:`_ChunkKDAFunction`, slow, a cross-check).
TRITON_BACKWARD = True


class _ChunkKDACoreFunction(torch.autograd.Function):
    """The KDA core (no options): forward and backward both through the Triton kernels."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, initial_state, opts):
        o, S, _, (A_qk, M, G) = chunk_kda_fwd(q, k, v, g, beta, scale=opts["scale"], initial_state=initial_state,
                                              cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
                                              keep_for_backward=True)
        # G (float32, the in-chunk cumsum of g) in place of g: the backward reads only G, so the
        # same bytes are kept and stage 1 is not recomputed
        ctx.save_for_backward(q, k, v, G, beta, initial_state, A_qk, M)
        ctx.g_dtype = g.dtype
        ctx.opts = opts
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        from .backward import kda_backward

        q, k, v, G, beta, S0, A_qk, M = ctx.saved_tensors
        opts = ctx.opts
        # dq, dk, dv written in the inputs' dtype by their last kernels (q, k, v share one dtype)
        dq, dk, dv, dg, dbeta, dS0 = kda_backward(q, k, v, None, beta, do, dS, scale=opts["scale"], initial_state=S0,
                                                  cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
                                                  factors=(A_qk, M), G=G, out_dtype=intermediate_dtype(q.dtype))
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(ctx.g_dtype), dbeta.to(beta.dtype),
                None if S0 is None else dS0.to(S0.dtype), None)


#: Together with ``TRITON_BACKWARD``, differentiate the options (L2 norm, gate, beta sigmoid) through
#: the Triton kernels of :mod:`kda_explained.fast.backward_options` too, not PyTorch autograd.
#: On (the default) since they passed the bf16 gradient tests on the H100 (`test_gradients_bf16`);
#: ``False``: PyTorch autograd around the Triton core instead.
TRITON_OPTIONS_BACKWARD = True


class _ChunkKDATritonOptionsFunction(_ChunkKDAFunction):
    """Forward as :class:`_ChunkKDAFunction` (the options in the forward's kernels); backward:
    the core and the options through Triton kernels
    (:func:`~kda_explained.fast.backward_options.kda_backward_with_options`)."""

    @staticmethod
    def forward(ctx, q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
        o, S, _, (A_qk, M, _) = _forward_with_options(q, k, v, g, beta, A_log, dt_bias, initial_state, opts,
                                                   keep_for_backward=True)
        ctx.save_for_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, A_qk, M)
        ctx.opts = opts
        return o, S

    @staticmethod
    def backward(ctx, do, dS):
        from .backward_options import kda_backward_with_options

        q, k, v, g, beta, A_log, dt_bias, S0, A_qk, M = ctx.saved_tensors
        opts = ctx.opts
        v_first = opts["state_v_first"]  # the core's states are [K, V]

        def to_kv(x):
            return x.transpose(-1, -2).contiguous() if x is not None and v_first else x

        dq, dk, dv, dg, dbeta, dS0, dA_log, ddt_bias = kda_backward_with_options(
            q, k, v, g, beta, do, to_kv(dS), scale=opts["scale"], initial_state=to_kv(S0),
            cu_seqlens=opts["cu_seqlens"], chunk_size=opts["chunk_size"],
            use_qk_l2norm_in_kernel=opts["use_qk_l2norm_in_kernel"], use_gate_in_kernel=opts["use_gate_in_kernel"],
            A_log=A_log, dt_bias=dt_bias, lower_bound=opts["lower_bound"],
            use_beta_sigmoid_in_kernel=opts["use_beta_sigmoid_in_kernel"], allow_neg_eigval=opts["allow_neg_eigval"],
            factors=(A_qk, M),
        )
        return (dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), dg.to(g.dtype), dbeta.to(beta.dtype),
                None if dA_log is None else dA_log.reshape(A_log.shape).to(A_log.dtype),
                None if ddt_bias is None else ddt_bias.reshape(dt_bias.shape).to(dt_bias.dtype),
                None if S0 is None else to_kv(dS0).to(S0.dtype), None)


def _chunk_kda_triton_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, opts):
    """The options in differentiable PyTorch, then the core through :class:`_ChunkKDACoreFunction`."""
    q, k, g, beta, S0 = _options_in_pytorch(q, k, g, beta, A_log, dt_bias, initial_state, opts)
    o, S = _ChunkKDACoreFunction.apply(q, k, v, g, beta, S0, opts)
    if opts["state_v_first"]:
        S = S.transpose(-1, -2)
    return o.to(v.dtype), S


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
            ``return_intermediate_states``, and for the inference forward 16 (``SHORT_CHUNK``)
            where the batch fills the GPU, 64 where it does not (:func:`forward_chunk_size`). The
            result is the same function at every chunk size (up to rounding).
        cu_seqlens_cpu: the same offsets on the host (as flash-linear-attention takes them):
            then ``cu_seqlens`` on the GPU is never read back, so the call never waits for it.
            Without it a GPU ``cu_seqlens`` is read once per call.
        cp_context: flash-linear-attention's context-parallel context. Context parallelism
            here is :func:`kda_explained.distributed.context_parallel_kda`, which takes a
            process group instead; a context raises :class:`NotImplementedError` saying so.
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
    p, cu_seqlens = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                      cu_seqlens=cu_seqlens, state_v_first=state_v_first,
                                      cu_seqlens_cpu=cu_seqlens_cpu,
                                      check_g=check_g if not use_gate_in_kernel else False)
    if chunk_size is not None:
        chunk_size = check_chunk_size(chunk_size, FAST_CHUNK_SIZES)
    if use_gate_in_kernel:
        check_gate_params(p.HV, p.K, A_log, dt_bias, lower_bound, require_A_log=True)
    opts = dict(scale=p.scale, cu_seqlens=cu_seqlens, chunk_size=chunk_size,
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
        opts["chunk_size"] = forward_chunk_size(p.N * p.HV, p.V, q.device) if inference else 64
    if return_intermediate_states:
        if needs_grad:
            raise ValueError("return_intermediate_states: inference only (use torch.inference_mode()), "
                             "got inputs that require grad")
        o, S, h, _ = chunk_kda_fwd(q, k, v, g, beta, initial_state=initial_state, A_log=A_log, dt_bias=dt_bias,
                                   float32_chunk_states=True, **opts)
        return o, (S if output_final_state else None), h
    # the options' own backward only where an option is on: without one the core's Function keeps G
    # in place of g and writes its gradients in the inputs' dtype
    with_options = use_qk_l2norm_in_kernel or use_gate_in_kernel or use_beta_sigmoid_in_kernel
    if needs_grad and TRITON_BACKWARD and TRITON_OPTIONS_BACKWARD and with_options:
        o, S = _ChunkKDATritonOptionsFunction.apply(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
    elif needs_grad and TRITON_BACKWARD:
        o, S = _chunk_kda_triton_backward(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
    elif needs_grad:
        o, S = _ChunkKDAFunction.apply(q, k, v, g, beta, A_log, dt_bias, initial_state, opts)
    else:
        o, S, _, _ = chunk_kda_fwd(q, k, v, g, beta, initial_state=initial_state, A_log=A_log, dt_bias=dt_bias,
                                   **opts)
    return o, (S if output_final_state else None)
