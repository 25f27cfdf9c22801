"""The decode call checked and launched: what :func:`~kda_explained.fast.api.fused_recurrent_kda`
runs on inputs that need no graph, and what its operator (:mod:`kda_explained.fast.ops`) runs
under ``torch.compile``."""

from __future__ import annotations

import torch

from ..validation import check_gate_params
from ._meta import device_offsets
from .config import plan_for
from .inputs import check_fast_inputs
from .recurrent import fused_recurrent_kda_fwd

__all__ = ["fused_recurrent_checked"]


def _check_out(out, v):
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"out: expected a torch.Tensor, got {type(out).__name__}")
    if tuple(out.shape) != tuple(v.shape) or out.dtype != v.dtype or out.device != v.device \
            or not out.is_contiguous():
        raise ValueError(f"out: expected a contiguous {v.dtype} tensor of v's shape {list(v.shape)} on {v.device}, "
                         f"got {out.dtype} {list(out.shape)} on {out.device}, contiguous={out.is_contiguous()}")


def fused_recurrent_checked(q, k, v, g, beta, A_log, dt_bias, scale, initial_state, output_final_state,
                            use_qk_l2norm_in_kernel, use_gate_in_kernel, use_beta_sigmoid_in_kernel, allow_neg_eigval,
                            lower_bound, state_v_first, cu_seqlens, ssm_state_indices, num_accepted_tokens,
                            inplace_final_state, out, cu_seqlens_cpu, check_g, plan):
    """:func:`~kda_explained.fast.api.fused_recurrent_kda` on inputs that need no graph: checks, then the kernel."""
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
