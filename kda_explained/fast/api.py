"""``fast.fused_recurrent_kda`` (decoding) and ``fast.kda`` (the shared signature, dispatching by length)."""

from __future__ import annotations

from typing import Optional

import torch

from ..validation import check_gate_params
from ._meta import device_offsets
from .chunk import check_fast_inputs, chunk_kda
from .recurrent import fused_recurrent_kda_fwd

__all__ = ["fused_recurrent_kda", "kda", "RECURRENT_MAX_LEN"]

#: ``fast.kda`` runs the token-by-token kernel when no sequence is longer than this.
RECURRENT_MAX_LEN = 16


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
    inplace_final_state: Optional[bool] = None,
    **kwargs,
):
    """KDA token by token (decoding); a drop-in for ``fla.ops.kda.fused_recurrent_kda``. Forward only.

    Shapes and options as :func:`kda_explained.fast.chunk.chunk_kda`. For serving:

    - ``ssm_state_indices: [N]`` int: ``initial_state`` is a state pool
      ``[P, HV, K, V]`` and sequence ``n`` reads and writes slot
      ``ssm_state_indices[n]`` *in place*. A negative slot skips the sequence (its
      outputs are zeros); so does a slot past the pool when the indices are on the
      GPU (indices on the CPU are checked: ``ValueError``). Nothing here reads the
      device back, so a decode step can be captured in a CUDA graph;
      the pool is returned as the final state.
    - ``inplace_final_state=True`` without indices also updates ``initial_state`` in place.

    Returns ``(o, final_state)``; ``o`` in ``v``'s dtype; ``final_state`` float32 (or the pool).
    """
    if kwargs:
        raise TypeError(f"fused_recurrent_kda: unexpected keyword argument(s) {sorted(kwargs)}")
    if ssm_state_indices is not None:
        if initial_state is None:
            raise ValueError("initial_state: expected the state pool [P, HV, K, V] with ssm_state_indices, got None")
        if not isinstance(ssm_state_indices, torch.Tensor) or ssm_state_indices.dtype.is_floating_point \
                or ssm_state_indices.dim() != 1:
            raise TypeError(f"ssm_state_indices: expected a 1-D integer tensor [N], got {ssm_state_indices!r}")
        pool = initial_state
        # validate the call as if each sequence had its own state row
        B = q.shape[0]
        N = B if cu_seqlens is None else len(cu_seqlens) - 1
        if ssm_state_indices.numel() != N:
            raise ValueError(f"ssm_state_indices: expected N = {N} entries, got {ssm_state_indices.numel()}")
        view = pool[:1].expand(N, *pool.shape[1:]) if pool.shape[0] > 0 else pool
        p, cu_t = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=view, cu_seqlens=cu_seqlens,
                                    state_v_first=state_v_first)
        if pool.dtype != torch.float32 or not pool.is_contiguous():
            raise ValueError(f"initial_state: expected a contiguous float32 state pool to update in place, "
                             f"got {pool.dtype}, contiguous={pool.is_contiguous()}")
        if ssm_state_indices.device.type == "cpu" and ssm_state_indices.numel() \
                and int(ssm_state_indices.max()) >= pool.shape[0]:
            # checked where it is free; on the device the kernel skips such a slot (no sync)
            raise ValueError(f"ssm_state_indices: expected slots < pool size {pool.shape[0]}, "
                             f"got {int(ssm_state_indices.max())}")
        slots = ssm_state_indices.to(device=q.device, dtype=torch.int64)
        final = pool
    else:
        p, cu_t = check_fast_inputs(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                    cu_seqlens=cu_seqlens, state_v_first=state_v_first)
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
    if torch.is_grad_enabled() and any(x is not None and x.requires_grad
                                       for x in (q, k, v, g, beta, initial_state, A_log, dt_bias)):
        raise ValueError("q: fused_recurrent_kda is forward only (decoding); use chunk_kda to train, "
                         "or call it under torch.no_grad() / torch.inference_mode()")
    # a plain batch needs no offsets table (and so no host-to-device copy per decode step)
    cu = None if cu_t is None else device_offsets(cu_t, q.device)  # [N + 1] int32, cached with cu_t
    o, final = fused_recurrent_kda_fwd(
        q, k, v, g, beta, scale=p.scale, cu=cu, N=p.N, initial_state=initial_state, final_state=final,
        ssm_state_indices=slots, state_v_first=state_v_first, use_qk_l2norm_in_kernel=use_qk_l2norm_in_kernel,
        use_gate_in_kernel=use_gate_in_kernel, A_log=A_log.reshape(-1) if A_log is not None else None,
        dt_bias=dt_bias, lower_bound=lower_bound, use_beta_sigmoid_in_kernel=use_beta_sigmoid_in_kernel,
        allow_neg_eigval=allow_neg_eigval,
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
    """KDA with the shared signature of ``DESIGN.md``, on the Triton kernels.

    Sequences of at most :data:`RECURRENT_MAX_LEN` tokens (decoding, speculative
    steps) go to the token-by-token kernel, longer ones to the chunk pipeline;
    both compute the same function. Training always takes the chunk pipeline.
    """
    T = q.shape[1] if isinstance(q, torch.Tensor) and q.dim() == 4 else 0
    if cu_seqlens is not None and isinstance(cu_seqlens, (torch.Tensor, list, tuple)) and len(cu_seqlens) > 1:
        cu = torch.as_tensor(cu_seqlens).tolist() if not isinstance(cu_seqlens, (list, tuple)) else list(cu_seqlens)
        T = max(b - a for a, b in zip(cu[:-1], cu[1:]))
    training = torch.is_grad_enabled() and any(
        isinstance(x, torch.Tensor) and x.requires_grad for x in (q, k, v, g, beta, initial_state))
    if T <= RECURRENT_MAX_LEN and not training:
        return fused_recurrent_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                                   output_final_state=output_final_state, cu_seqlens=cu_seqlens)
    return chunk_kda(q, k, v, g, beta, scale=scale, initial_state=initial_state,
                     output_final_state=output_final_state, cu_seqlens=cu_seqlens)
