"""``context_parallel_kda``: KDA over a sequence whose time axis is split across the ranks of a group.

Each rank holds a contiguous slice of the time axis and runs, in order::

    plan            = exchange_plan(...)                   # 1. slice lengths of all ranks (a few ints each)
    o0, q_read, P, R = segment_summary(slice, S_start)     # 2. local outputs and segment maps (Eq. 1 composed)
    S_in, final      = exchange_states(last, first, ...)   # 3. all-gather [P | R] of the last piece, chain it
    o                = o0 + q_read S_in   (first piece)    # 4. the incoming state enters the outputs linearly

Step 2 is one ordinary KDA call over ``V + K`` value columns
(:mod:`kda_explained.distributed.segment`), from the state each piece knows locally: the
sequence's ``initial_state`` where the piece starts it, zeros where the piece continues
a sequence from an earlier rank. Step 3 sends one ``[K, K + V]`` block per lane and head,
whatever the length, and chains the blocks in float32 (float64 for float64 inputs;
:mod:`kda_explained.distributed.chain`); its backward sends one ``[K, V]`` block the
same way and runs the chain in reverse. Step 4 touches only the first piece: a piece
that starts its sequence on this rank already started from the right state.

Glossary as :mod:`kda_explained.distributed.plan` and :mod:`kda_explained.distributed.segment`.
The page ``docs/context_parallel.md`` derives it and sets it beside flash-linear-attention's.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np
import torch

from ..chunked.kda import require_tensors
from ..validation import check_kda_inputs
from . import comm
from .chain import incoming_state, outgoing_adjoint
from .plan import SlicePlan, plan_slices
from .segment import segment_summary as chunked_segment_summary

__all__ = ["context_parallel_kda", "exchange_plan", "BACKENDS"]

BACKENDS = ("auto", "chunked", "fast")

# dtypes as small integers, so that ranks can compare theirs in the plan's all-gather
_DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)


def dtype_code(dtype: torch.dtype) -> int:
    """A small integer for ``dtype`` (for comparing the ranks' dtypes in :func:`exchange_plan`)."""
    return _DTYPES.index(dtype) if dtype in _DTYPES else len(_DTYPES)


def exchange_plan(
    T: int,
    agree: Sequence[Tuple[str, str, int]],
    cu_seqlens: Optional[Sequence[int]],
    group,
    device,
) -> SlicePlan:
    """All-gather every rank's slice length ``T`` and the values that must agree; return this rank's plan.

    ``agree``: ``(argument, what, value)`` triples (numbers), e.g. ``("q", "K", 64)``; a rank whose
    value differs makes every rank raise the same :class:`ValueError` (no rank is left
    waiting in a later collective). A checksum of ``cu_seqlens`` is compared the same way,
    and its last offset against the sum of the slices.
    """
    cu = [] if cu_seqlens is None else [int(c) for c in cu_seqlens]
    checksum = sum((i + 1) * c for i, c in enumerate(cu)) % (1 << 52)  # exact in float64
    items = [("q", "T", T), *agree, ("cu_seqlens", "offsets", checksum)]
    mine = torch.tensor([float(value) for _, _, value in items], dtype=torch.float64, device=device)
    everyone = comm.all_gather(mine, group, kind="plan").tolist()  # [R, len(items)]
    for i, (arg, what, _) in enumerate(items[1:], start=1):
        values = [row[i] for row in everyone]
        if len(set(values)) > 1:
            if what == "offsets":
                raise ValueError(f"{arg}: expected the same global offsets on every rank of the group, got "
                                 f"different ones")
            shown = [str(_DTYPES[int(v)]).replace("torch.", "") if what == "dtype" and int(v) < len(_DTYPES)
                     else int(v) if float(v).is_integer() else v for v in values]
            raise ValueError(f"{arg}: expected the same {what} on every rank of the group, got {shown} by rank")
    lengths = [int(row[0]) for row in everyone]
    if cu and cu[-1] != sum(lengths):
        raise ValueError(f"cu_seqlens: expected to end at the whole length T = {sum(lengths)} (the ranks' "
                         f"slices of {lengths} tokens), got {cu[-1]}")
    return plan_slices(lengths, cu_seqlens, torch.distributed.get_rank(group))


class _StateExchange(torch.autograd.Function):
    """Step 3 and its backward: the only place where ranks exchange states or their gradients.

    Inputs: ``last, first: [lanes, HV, K, K + V]``, the ``[P | R]`` of the rank's last and
    first pieces; ``F_local: [N, HV, K, V]``, the final states this rank can give alone
    (zeros elsewhere; an empty tensor when no final state is asked for). Outputs: ``S_in:
    [lanes, HV, K, V]``, the state entering the first piece, and the final states of all
    sequences (summed over the ranks, each sequence given by the rank where it ends).
    """

    @staticmethod
    def forward(ctx, last, first, F_local, plan: SlicePlan, group, lane_seq: torch.Tensor):
        r, K = plan.rank, last.shape[-2]
        gathered = comm.all_gather(last, group)  # [R, lanes, HV, K, K + V]
        P_all, R_all = gathered[..., :K], gathered[..., K:]
        S_in = incoming_state(P_all, R_all, plan, r)  # [lanes, HV, K, V]
        # the first piece ends its sequence after taking S_in: only now is that final state known
        ends_first = plan.cont_in[r] and plan.piece_ends[0]
        final = F_local
        if F_local.numel():
            final = F_local.clone()
            if ends_first:
                final.index_add_(0, lane_seq, first[..., :K] @ S_in + first[..., K:])
            final = comm.all_reduce_sum(final, group)
        ctx.save_for_backward(first, S_in, P_all, lane_seq)
        ctx.plan, ctx.group, ctx.ends_first, ctx.want_final = plan, group, ends_first, bool(F_local.numel())
        return S_in, final

    @staticmethod
    def backward(ctx, dS_in, d_final):
        first, S_in, P_all, lane_seq = ctx.saved_tensors
        plan, group, K = ctx.plan, ctx.group, first.shape[-2]
        d_first, dF_local, dS = torch.zeros_like(first), None, dS_in
        if ctx.want_final:
            # every rank's loss may read every final state: the gradient is their sum
            dF_local = comm.all_reduce_sum(d_final, group)  # [N, HV, K, V]
            if ctx.ends_first:
                lam = dF_local[lane_seq]  # [lanes, HV, K, V], gradient of P_0 S_in + R_0
                dS = dS + first[..., :K].transpose(-1, -2) @ lam
                d_first = torch.cat([lam @ S_in.transpose(-1, -2), lam], dim=-1)
        # the backward chain: every rank's dS_in, then lam = dS + P^T lam in reverse rank order
        dS_all = comm.all_gather(dS, group)  # [R, lanes, HV, K, V]
        lam = outgoing_adjoint(P_all, dS_all, plan, plan.rank)  # gradient of the state leaving the last piece
        Y = S_in if plan.passes[plan.rank] else torch.zeros_like(S_in)  # state entering the last piece
        d_last = torch.cat([lam @ Y.transpose(-1, -2), lam], dim=-1)  # [dP | dR] of the last piece
        return d_last, d_first, dF_local, None, None, None


def exchange_states(last, first, F_local, plan: SlicePlan, group, lane_seq):
    """Step 3 (see :class:`_StateExchange`): ``(S_in, final states)``, differentiable."""
    return _StateExchange.apply(last, first, F_local, plan, group, lane_seq)


def summary_function(backend: str, device: torch.device):
    """The segment map's implementation: the chunked stage, or the fast layer's function of the same name."""
    if backend == "auto":
        backend = "fast" if device.type == "cuda" else "chunked"
    if backend == "chunked":
        return chunked_segment_summary
    from ..fast.segment import segment_summary  # imported on first use: importing triton is slow

    return segment_summary


def context_parallel_kda(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    *,
    scale: Optional[float] = None,
    initial_state: Optional[torch.Tensor] = None,
    output_final_state: bool = False,
    cu_seqlens=None,
    group=None,
    backend: str = "auto",
):
    """KDA over a time axis split across the ranks of ``group`` (default: the whole world).

    Every rank passes its contiguous slice of the same batch: ``q, k: [B, T_r, H, K]``,
    ``v: [B, T_r, HV, V]``, ``g: [B, T_r, HV, K]``, ``beta: [B, T_r, HV]``, rank ``0`` the
    first tokens, slices in rank order, ``T_r >= 1``, lengths free to differ. The
    arguments that describe the whole batch are the same on every rank:
    ``initial_state: [N, HV, K, V]`` (the state before each sequence), ``cu_seqlens:
    [N + 1]`` (the *global* offsets of a packed batch, ``B = 1``; sequences may start,
    end or lie wholly inside any slice), ``scale``, ``output_final_state``, ``backend``.

    Returns the rank's outputs ``o: [B, T_r, HV, V]`` (``v``'s dtype) and, with
    ``output_final_state``, the state after every whole sequence ``[N, HV, K, V]``
    (float32, float64 for float64 inputs) on every rank; else ``None``. The result is
    that of ``kda`` on the whole batch, sliced.

    Differentiable: each rank gets the gradients of its own inputs. ``initial_state``
    is replicated, so each rank gets *its share* of its gradient (through the uses on
    that rank); their sum over the ranks is the full gradient. The backward is a
    collective too: every rank must run it (its loss reading its outputs), or none.

    ``backend``: ``"chunked"`` (PyTorch, any device and dtype), ``"fast"`` (the Triton
    kernels: CUDA, or the interpreter on the CPU), ``"auto"``: fast for CUDA inputs. The
    group's backend must handle the inputs' device (NCCL for CUDA, gloo for the CPU).

    Two gloo processes, one sequence of 8 tokens split 5 + 3, against ``chunked.kda`` on all 8
    (:func:`kda_explained.distributed.examples.split_sequence` is what each rank runs):

    >>> from kda_explained.distributed import examples, launch
    >>> per_rank = launch.spawn(examples.split_sequence, world_size=2, args=(8, 5))
    >>> [max(v for name, v in errors.items() if name != "bytes sent") < 1e-12 for errors in per_rank]
    [True, True]
    """
    require_tensors(q=q, k=k, v=v, g=g, beta=beta, initial_state=initial_state)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    group = comm.resolve_group(group)
    p = check_kda_inputs(q, k, v, g, beta, scale=scale)  # this rank's slice
    cu = _check_whole_batch(p, initial_state, cu_seqlens)
    if initial_state is not None and initial_state.device != q.device:
        raise ValueError(f"initial_state: expected on device {q.device} like q, got {initial_state.device}")
    needs_grad = torch.is_grad_enabled() and any(
        x is not None and x.requires_grad for x in (q, k, v, g, beta, initial_state))
    agree = [("q", "B", p.B), ("q", "H", p.H), ("q", "K", p.K), ("v", "HV", p.HV), ("v", "V", p.V),
             ("v", "dtype", dtype_code(v.dtype)),
             ("initial_state", "presence (1 given, 0 None)", initial_state is not None),
             ("output_final_state", "value", bool(output_final_state)), ("q", "requires_grad", needs_grad),
             ("scale", "value", p.scale)]
    plan = exchange_plan(p.T, agree, cu, group, q.device)
    N = p.B if cu is None else len(cu) - 1
    return context_parallel_on_plan(q, k, v, g, beta, p.scale, initial_state, plan, N, bool(output_final_state), group,
                             summary_function(backend, q.device))


def _check_whole_batch(p, initial_state, cu_seqlens) -> Optional[list]:
    """Check the arguments that describe the whole batch as ``kda`` would; return the offsets as ints.

    Zero-stride NumPy stand-ins give the whole batch's shapes without its memory. The
    offsets are checked against their own last value here, and against the sum of the
    slices once the ranks have exchanged their lengths.
    """
    values = None
    if cu_seqlens is not None:
        raw = cu_seqlens.detach().cpu().numpy() if isinstance(cu_seqlens, torch.Tensor) else np.asarray(cu_seqlens)
        T_claimed = int(raw.reshape(-1)[-1]) if raw.size and raw.dtype.kind in "iu" else 0
        values = raw
    else:
        T_claimed = 1

    def stand_in(*shape):
        return np.broadcast_to(np.zeros((), np.float32), shape)

    qk = stand_in(p.B, max(T_claimed, 0), p.H, p.K)
    check_kda_inputs(qk, qk, stand_in(p.B, max(T_claimed, 0), p.HV, p.V), None, None,
                     initial_state=initial_state, cu_seqlens=cu_seqlens)
    return None if values is None else [int(c) for c in values]


def context_parallel_on_plan(q, k, v, g, beta, scale, initial_state, plan: SlicePlan, N: int, want_final: bool, group,
                      summary) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Steps 2-4 on validated inputs (``plan`` from :func:`exchange_plan`, ``N`` sequences in the whole batch)."""
    r, packed = plan.rank, plan.cu_seqlens is not None
    B, HV, K, V = v.shape[0], v.shape[2], k.shape[3], v.shape[3]
    state_dtype = torch.float64 if v.dtype == torch.float64 else torch.float32
    dev = q.device
    piece_seq = torch.tensor(plan.piece_seq, dtype=torch.int64, device=dev)  # [L]
    starts = torch.tensor(plan.piece_starts, dtype=state_dtype, device=dev)  # [L] 1 where the piece starts its sequence

    # 2. the local segment maps, each piece from the state it knows here: its sequence's
    #    initial state where it starts that sequence, else zeros (multiplied in, not skipped, so
    #    that every rank's initial_state gets a gradient, zeros where it has no share)
    S_start = None
    if initial_state is not None:
        S0 = initial_state.to(state_dtype)
        S_start = (S0[piece_seq] if packed else S0) * starts[:, None, None, None]  # [L or B, HV, K, V]
    local_cu = torch.tensor(plan.local_cu, dtype=torch.int64, device=dev) if packed else None
    o0, q_read, P, R = summary(q, k, v, g, beta, scale=scale, initial_state=S_start, cu_seqlens=local_cu)
    PR = torch.cat([P, R], dim=-1)  # [L or B, HV, K, K + V]
    first, last = (PR[:1], PR[-1:]) if packed else (PR, PR)  # [lanes, HV, K, K + V]
    lane_seq = piece_seq[:1] if packed else torch.arange(B, device=dev)  # [lanes] sequence of each lane

    # the final states this rank gives alone: pieces that end their sequence (but a continued
    # first piece: its final state waits for S_in), and, on rank 0, empty sequences
    F_local = PR.new_zeros(0)
    if want_final:
        F_local = PR.new_zeros(N, HV, K, V)
        own = [i for i, e in enumerate(plan.piece_ends) if e and not (i == 0 and plan.cont_in[r])]
        if own:
            seqs = piece_seq[own] if packed else torch.arange(B, device=dev)
            F_local = F_local.index_copy(0, seqs, R[own] if packed else R)
        if packed and r == 0 and initial_state is not None:
            cu = plan.cu_seqlens
            empty = [n for n in range(N) if cu[n] == cu[n + 1]]
            if empty:
                idx = torch.tensor(empty, dtype=torch.int64, device=dev)
                F_local = F_local.index_copy(0, idx, initial_state.to(state_dtype)[idx])

    # 3. exchange and chain
    S_in, final = exchange_states(last, first, F_local, plan, group, lane_seq)

    # 4. the incoming state's share of the first piece's outputs (zero where it starts its
    #    sequence; added all the same so that every rank's backward reaches the exchange)
    e0 = plan.local_cu[1] if packed else q.shape[1]
    fix = torch.einsum("bthk,bhkv->bthv", q_read[:, :e0].to(state_dtype), S_in)  # [B, e0, HV, V]
    o_first = (o0[:, :e0].to(state_dtype) + fix).to(o0.dtype)
    o = torch.cat([o_first, o0[:, e0:]], dim=1) if e0 < q.shape[1] else o_first
    return o, (final if want_final else None)
