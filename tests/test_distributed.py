"""Context parallelism: the plan, the segment map, the chain, and gloo groups of 2, 3 and 4 CPU processes.

The single-process tests check the pieces (the plan, ``segment_summary`` of both layers,
the chain and its adjoint). The multi-process tests start *one* group of four processes
for the whole file (starting processes is the slow part), make sub-groups of 2 and 3
ranks in it, run a fixed list of cases, and hand back numbers that the tests below
assert on: outputs, final states and gradients against one ``chunked.kda`` call on the
whole batch (float64, to the chunked float64 bound), bytes sent, error messages.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from hypothesis import given, settings
from hypothesis import strategies as st

from kda_explained import chunked
from kda_explained.distributed import comm, context_parallel_kda, launch, plan_slices, segment_summary
from kda_explained.distributed.chain import incoming_state, outgoing_adjoint
from kda_explained.distributed.cost import context_parallel_costs
from kda_explained.distributed.examples import random_inputs, slice_bounds
from kda_explained.testing import TOLERANCES, rel_rms_error

EXACT = TOLERANCES["chunked_f64_vs_naive"]  # float64 against float64, another order of operations
#: The fast layer's kernels run on CUDA, or under the Triton interpreter on CPU tensors (conftest.py).
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FAST = TOLERANCES["fast_f32_vs_f64"]
NAMES = ("q", "k", "v", "g", "beta")


# ----------------------------------------------------------------------------------------------
# the plan
# ----------------------------------------------------------------------------------------------


@settings(max_examples=60)
@given(lengths=st.lists(st.integers(1, 5), min_size=1, max_size=4), cuts=st.lists(st.integers(0, 20), max_size=4),
       packed=st.booleans())
def test_plan_pieces_tile_the_slices(lengths, cuts, packed):
    """Pieces tile each slice; a sequence leaving a rank enters the next; a rank passes a sequence
    on exactly when its only piece continues one; chains start where the sequence starts."""
    T = sum(lengths)
    cu = [0, *sorted(min(c, T) for c in cuts), T] if packed else None
    plans = [plan_slices(lengths, cu, r) for r in range(len(lengths))]
    for r, plan in enumerate(plans):
        assert plan.local_cu[0] == 0 and plan.local_cu[-1] == lengths[r]
        assert all(a < b for a, b in zip(plan.local_cu[:-1], plan.local_cu[1:]))  # no empty piece
        if r > 0:
            assert plan.cont_in[r] == plan.cont_out[r - 1]
        assert plan.passes[r] == (plan.num_pieces == 1 and plan.cont_in[r])
        s = plan.chain_start(r)
        assert s == r or (not plan.passes[s] and all(plan.passes[j] for j in range(s + 1, r)))
        seq = plan.piece_seq[0]
        if plan.cont_in[r]:  # the sequence entering r began on rank s
            assert plans[s].piece_seq[-1] == seq and plans[s].piece_starts[-1]


# ----------------------------------------------------------------------------------------------
# the segment map, stage by stage
# ----------------------------------------------------------------------------------------------


def transitions(k, g, beta, HV):
    """The per-token transitions ``(I - beta k k^T) Diag(exp(g))``, one by one: ``[B, T, HV, K, K]`` (float64)."""
    k = k.repeat_interleave(HV // k.shape[2], dim=2)  # [B, T, HV, K]
    eye = torch.eye(k.shape[-1], dtype=torch.float64)
    return (eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]) * torch.exp(g)[..., None, :]


@pytest.mark.parametrize("cu, init", [(None, False), (None, True), ([0, 3, 3, 11], True), ([0, 1, 11], False)])
def test_segment_summary_is_the_affine_map(cu, init):
    """``P`` is the product of the transitions, ``R`` the final state from ``S_0``; any extra state ``X``
    entering the segment gives ``o + X^T q_read`` and ``P X + R`` (GVA, empty sequence, strong gates)."""
    B = 2 if cu is None else 1
    N = B if cu is None else len(cu) - 1
    x = random_inputs(B, 11, 1, 2, 4, 3, seed=1, lower_bound=-5.0, N=N if init else None)
    cu_t = None if cu is None else torch.tensor(cu)
    o, q_read, P, R = segment_summary(**x, cu_seqlens=cu_t)
    o_ref, S_ref = chunked.kda(**x, cu_seqlens=cu_t, output_final_state=True)
    assert rel_rms_error(o, o_ref) < EXACT and rel_rms_error(R, S_ref) < EXACT
    A = transitions(x["k"], x["g"], x["beta"], 2)
    spans = [(b, 0, 11) for b in range(B)] if cu is None else [(0, cu[n], cu[n + 1]) for n in range(N)]
    for n, (b, bos, eos) in enumerate(spans):
        P_ref = torch.eye(4, dtype=torch.float64).expand(2, 4, 4)
        for t in range(bos, eos):
            P_ref = A[b, t] @ P_ref
        assert rel_rms_error(P[n], P_ref) < EXACT
    X = torch.randn(N, 2, 4, 3, dtype=torch.float64)
    S0 = X if not init else x["initial_state"] + X
    o_X, S_X = chunked.kda(**{**x, "initial_state": S0}, cu_seqlens=cu_t, output_final_state=True)
    if cu is None:  # the extra state of each token's sequence: [B, T, HV, K, V]
        X_tok = X[:, None].expand(B, 11, 2, 4, 3)
    else:
        X_tok = torch.stack([X[n] for n, (_, bos, eos) in enumerate(spans) for _ in range(bos, eos)])[None]
    assert rel_rms_error(o + torch.einsum("bthk,bthkv->bthv", q_read, X_tok), o_X) < EXACT
    assert rel_rms_error(P @ X + R, S_X) < EXACT


@pytest.mark.parametrize("K, V, cu", [(16, 8, [0, 5, 21]), (136, 128, None)])
def test_fast_segment_summary_matches_chunked(K, V, cu):
    """The fast layer's ``segment_summary`` against the chunked stage (float32 against float64), on the
    one-call path (``V + K <= 256``) and the two-call path (``V + K > 256``)."""
    from kda_explained.fast.segment import segment_summary as fast_segment_summary

    T = 21 if cu else 3
    x = random_inputs(1, T, 1, 1, K, V, seed=2, N=1 if cu is None else 2)
    cu_t = None if cu is None else torch.tensor(cu)
    ref = segment_summary(**x, cu_seqlens=cu_t)
    got = fast_segment_summary(**{n: t.float().to(DEVICE) for n, t in x.items()}, cu_seqlens=cu_t)
    for name, a, b in zip(("o", "q_read", "P", "R"), got, ref):
        assert a.dtype == torch.float32 and rel_rms_error(a, b) < FAST, name


# ----------------------------------------------------------------------------------------------
# the chain and its adjoint, all ranks simulated in one process
# ----------------------------------------------------------------------------------------------

SPLITS = [([5, 3], None), ([1, 6, 2], None), ([4, 1, 9], [0, 2, 9, 9, 10, 14]), ([3, 1, 1, 5], [0, 1, 6, 10]),
          ([2, 2, 2], [0, 2, 4, 6]), ([3, 3], [0, 6])]


@pytest.mark.parametrize("lengths, cu", SPLITS)
def test_chain_of_slices_is_one_pass(lengths, cu):
    """Every rank's slice from its local state, corrected by the chained state of the ranks before it,
    equals one pass over the whole batch (what ``context_parallel_kda`` does, without processes)."""
    T, R = sum(lengths), len(lengths)
    N = 1 if cu is None else len(cu) - 1
    x = random_inputs(1, T, 1, 2, 3, 2, seed=3, N=N)
    o_ref, _ = chunked.kda(**x, cu_seqlens=cu, output_final_state=True)
    plans = [plan_slices(lengths, cu, r) for r in range(R)]
    outs, lasts = [], []
    for r, plan in enumerate(plans):
        part = slice_bounds(lengths, r)
        seqs = list(plan.piece_seq)
        S_start = x["initial_state"][seqs] * torch.tensor(plan.piece_starts, dtype=torch.float64)[:, None, None, None]
        out = segment_summary(*(x[n][:, part] for n in NAMES), initial_state=S_start,
                              cu_seqlens=None if cu is None else plan.local_cu)
        outs.append(out)
        lasts.append((out[2][-1:], out[3][-1:]))  # [P | R] of the last piece, one lane
    P_all = torch.stack([P for P, _ in lasts])
    R_all = torch.stack([R_ for _, R_ in lasts])
    for r, plan in enumerate(plans):
        S_in = incoming_state(P_all, R_all, plan, r)  # [1, HV, K, V]
        o0, q_read = outs[r][:2]
        e0 = plan.local_cu[1]
        o = torch.cat([o0[:, :e0] + torch.einsum("bthk,bhkv->bthv", q_read[:, :e0], S_in), o0[:, e0:]], dim=1)
        assert rel_rms_error(o, o_ref[:, slice_bounds(lengths, r)]) < EXACT


@pytest.mark.parametrize("lengths, cu", SPLITS)
def test_adjoint_chain_is_the_gradient_of_the_chain(lengths, cu):
    """``outgoing_adjoint`` (the backward's reverse chain) equals autograd through ``incoming_state``."""
    R = len(lengths)
    plans = [plan_slices(lengths, cu, r) for r in range(R)]
    gen = torch.Generator().manual_seed(4)
    P = (0.5 * torch.randn(R, 1, 2, 3, 3, generator=gen, dtype=torch.float64)).requires_grad_()
    Rm = torch.randn(R, 1, 2, 3, 2, generator=gen, dtype=torch.float64).requires_grad_()
    dS = torch.randn(R, 1, 2, 3, 2, generator=gen, dtype=torch.float64)
    S_in = [incoming_state(P, Rm, plans[r], r) for r in range(R)]
    loss = sum((S * d).sum() for S, d in zip(S_in, dS)) + 0 * (P.sum() + Rm.sum())  # a graph even without chains
    dP, dR = torch.autograd.grad(loss, (P, Rm))
    for r in range(R):
        lam = outgoing_adjoint(P.detach(), dS, plans[r], r)
        Y = S_in[r].detach() if plans[r].passes[r] else torch.zeros_like(S_in[r])
        assert torch.allclose(lam, dR[r], atol=1e-12, rtol=0)
        assert torch.allclose(lam @ Y.transpose(-1, -2), dP[r], atol=1e-12, rtol=0)


def test_needs_an_initialised_group():
    x = random_inputs(1, 4, 1, 1, 2, 2)
    with pytest.raises(ValueError, match="group: expected an initialised torch.distributed process group"):
        context_parallel_kda(**x)


# ----------------------------------------------------------------------------------------------
# gloo groups of 2, 3 and 4 processes: the cases, run on every rank
# ----------------------------------------------------------------------------------------------

#: ``ranks``: group size (a sub-group of the first ranks); ``lengths``: the slices; ``cu``: global offsets.
KDA_CASES = {
    "2 ranks, uneven, GVA, initial state": dict(ranks=2, lengths=[5, 3], B=2, H=1, HV=2, K=4, V=3, init=True),
    "2 ranks, a slice of one token": dict(ranks=2, lengths=[1, 6], B=1, H=2, HV=2, K=3, V=5, init=False),
    "2 ranks, no gradient, no final state": dict(ranks=2, lengths=[3, 4], B=1, H=1, HV=1, K=3, V=2, init=True,
                                                 final=False, grad=False),
    "3 ranks, packed, a sequence through a one-token slice": dict(ranks=3, lengths=[4, 1, 9],
                                                                  cu=[0, 2, 9, 9, 10, 14], H=1, HV=2, K=4, V=3,
                                                                  init=True),
    "3 ranks, packed, sequences end on the borders": dict(ranks=3, lengths=[2, 3, 2], cu=[0, 2, 5, 7], H=1, HV=1,
                                                          K=3, V=3, init=False),
    "4 ranks, packed, one sequence over four ranks": dict(ranks=4, lengths=[3, 1, 1, 5], cu=[0, 1, 6, 10], H=2,
                                                          HV=4, K=3, V=2, init=True),
    "4 ranks, strong gates, float32": dict(ranks=4, lengths=[40, 24, 33, 31], B=1, H=1, HV=1, K=4, V=4, init=True,
                                           lower_bound=-5.0, dtype=torch.float32),
    "2 ranks, fast backend (interpreter), float32": dict(ranks=2, lengths=[7, 9], cu=[0, 3, 16], H=1, HV=1, K=16,
                                                         V=16, init=True, dtype=torch.float32, backend="fast"),
}


def gather_time(x: torch.Tensor, group) -> torch.Tensor:
    """The ranks' slices ``[B, T_r, ...]`` put back together along time: ``[B, T, ...]``."""
    parts = [None] * dist.get_world_size(group)
    dist.all_gather_object(parts, x.detach(), group=group)
    return torch.cat(parts, dim=1)


def run_kda_case(c, group):
    """One case on this rank: relative errors against ``chunked.kda`` on the whole batch (float64).

    Outputs and gradients are compared whole, the ranks' slices put back together, so that a
    slice whose true gradient is zero (a first token without initial state) is measured
    against the scale of the whole gradient, not against its own rounding."""
    r, R = dist.get_rank(group), dist.get_world_size(group)
    lengths, cu = c["lengths"], c.get("cu")
    T, B = sum(lengths), c.get("B", 1)
    N = B if cu is None else len(cu) - 1
    final, grad, dtype = c.get("final", True), c.get("grad", True), c.get("dtype", torch.float64)
    x = random_inputs(B, T, c["H"], c["HV"], c["K"], c["V"], seed=5, lower_bound=c.get("lower_bound"),
                      N=N if c["init"] else None)
    gen = torch.Generator().manual_seed(6)
    w_o = torch.randn(B, T, c["HV"], c["V"], generator=gen, dtype=torch.float64)
    w_S = torch.randn(R, N, c["HV"], c["K"], c["V"], generator=gen, dtype=torch.float64)  # one per rank

    whole = {n: t.clone().requires_grad_() for n, t in x.items()}
    o_ref, S_ref = chunked.kda(**whole, cu_seqlens=cu, output_final_state=True)
    ((o_ref * w_o).sum() + (final * (S_ref * w_S.sum(0)).sum())).backward()

    part = slice_bounds(lengths, r)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    mine = {n: (t.to(state_dtype) if n == "initial_state" else t[:, part].to(dtype)).clone().requires_grad_(grad)
            for n, t in x.items()}
    o, S = context_parallel_kda(**mine, cu_seqlens=cu, output_final_state=final, group=group,
                                backend=c.get("backend", "chunked"))
    err = {"o": rel_rms_error(gather_time(o, group), o_ref), "o finite": bool(torch.isfinite(o).all()),
           "o dtype": str(o.dtype), "S is None": S is None}
    if final:
        err["S"] = rel_rms_error(S, S_ref)
    if grad:
        ((o * w_o[:, part]).sum() + (final * (S * w_S[r]).sum() if final else 0)).backward()
        for n in NAMES:
            err["d" + n] = rel_rms_error(gather_time(mine[n].grad, group), whole[n].grad)
        if c["init"]:
            dS0 = mine["initial_state"].grad.clone()
            dist.all_reduce(dS0, group=group)  # the ranks' shares add up to the full gradient
            err["dinitial_state"] = rel_rms_error(dS0, whole["initial_state"].grad)
    return err


def bytes_at_two_lengths(group):
    """Bytes this rank puts into the collectives, forward and backward, at slices of 4 and of 12 tokens."""
    records = []
    for T_r in (4, 12):
        x = random_inputs(1, 2 * T_r, 1, 2, 4, 3, seed=7, N=1)
        part = slice_bounds([T_r, T_r], dist.get_rank(group))
        mine = {n: (t if n == "initial_state" else t[:, part]).clone().requires_grad_() for n, t in x.items()}
        with comm.count_bytes() as count:
            o, S = context_parallel_kda(**mine, output_final_state=True, group=group)
            (o.sum() + S.sum()).backward()
        records.append((dict(count.bytes), dict(count.calls)))
    return records


def errors_raised(group):
    """Bad replicated arguments: every rank raises the same ValueError (none is left waiting)."""
    r = dist.get_rank(group)
    x = {n: t[:, slice_bounds([3, 2], r)] for n, t in random_inputs(1, 5, 1, 1, 2, 2).items()}
    messages = []
    for kw in ({"cu_seqlens": [0, 2, 4]}, {"scale": 0.5 if r == 0 else 0.25}):
        try:
            context_parallel_kda(**x, group=group, **kw)
        except ValueError as e:
            messages.append(str(e))
    return messages


def layer_case(group, cu):
    """``KimiDeltaAttention(cp_group=...)`` on slices of [3, 1, 1, 3] tokens (the halo of the 4-tap
    convolution reaches three ranks back) against the layer on the whole batch: outputs, the input's
    gradient and every parameter's gradient (summed over the ranks)."""
    from kda_explained.layers import KimiDeltaAttention

    r = dist.get_rank(group)
    torch.manual_seed(0)
    layer = KimiDeltaAttention(hidden_size=16, num_heads=1, num_v_heads=2, head_dim=4, backend="chunked").double()
    cp_layer = KimiDeltaAttention(hidden_size=16, num_heads=1, num_v_heads=2, head_dim=4, backend="chunked",
                                  cp_group=group).double()
    cp_layer.load_state_dict(layer.state_dict())
    lengths = [3, 1, 1, 3]
    x = torch.randn(1, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    w = torch.randn(1, 8, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    x_all = x.clone().requires_grad_()
    y_ref = layer(x_all, cu_seqlens=cu)
    (y_ref * w).sum().backward()
    part = slice_bounds(lengths, r)
    x_mine = x[:, part].clone().requires_grad_()
    y = cp_layer(x_mine, cu_seqlens=cu)
    (y * w[:, part]).sum().backward()
    err = {"y": rel_rms_error(gather_time(y, group), y_ref),
           "dx": rel_rms_error(gather_time(x_mine.grad, group), x_all.grad)}
    for (name, p), p_ref in zip(cp_layer.named_parameters(), layer.parameters()):
        d = p.grad.clone()
        dist.all_reduce(d, group=group)
        err["d" + name] = rel_rms_error(d, p_ref.grad)
    return err


def all_cases():
    """The worker of every rank: make the sub-groups, run each case on the ranks of its group."""
    rank = dist.get_rank()
    groups = {2: dist.new_group([0, 1]), 3: dist.new_group([0, 1, 2]), 4: dist.group.WORLD}
    out = {}
    for name, c in KDA_CASES.items():
        # gloo exchanges CPU tensors: the fast backend's case runs under the interpreter, without a GPU
        if rank < c["ranks"] and not (c.get("backend") == "fast" and torch.cuda.is_available()):
            out[name] = run_kda_case(c, groups[c["ranks"]])
    if rank < 2:
        out["bytes"] = bytes_at_two_lengths(groups[2])
        out["errors"] = errors_raised(groups[2])
    out["layer"] = layer_case(groups[4], None)
    out["layer, packed"] = layer_case(groups[4], [0, 2, 6, 8])
    return out


@pytest.fixture(scope="module")
def results():
    """``{case: [per-rank result, ...]}`` from one group of four gloo processes."""
    per_rank = launch.spawn(all_cases, world_size=4, timeout=240)
    cases = {name for res in per_rank for name in res}
    return {name: [res[name] for res in per_rank if name in res] for name in cases}


@pytest.mark.parametrize("case", list(KDA_CASES))
def test_context_parallel_matches_one_pass(results, case):
    """Outputs, final state and gradients of every rank equal one ``chunked.kda`` call on the whole batch;
    float64 to the chunked float64 bound, float32 to its bound (strong gates: finite and exact to float32)."""
    c = KDA_CASES[case]
    if case not in results:
        pytest.skip("the fast backend's gloo case runs under the Triton interpreter, on machines without a GPU")
    dtype = c.get("dtype", torch.float64)
    bound = FAST if c.get("backend") == "fast" else EXACT if dtype == torch.float64 else \
        TOLERANCES["chunked_f32_vs_naive"]
    ranks = results[case]
    assert len(ranks) == c["ranks"]
    for r, err in enumerate(ranks):
        assert err["o finite"] and err["o dtype"] == str(dtype), (r, err)
        assert err["S is None"] == (not c.get("final", True))
        for what, value in err.items():
            if isinstance(value, float):
                assert value < bound, f"rank {r}: {what} relative RMS error {value:.3g} > {bound:.1g}"
        assert ("dq" in err) == c.get("grad", True)


def test_bytes_sent_do_not_grow_with_length(results):
    """What a rank sends (forward and backward, final state included) is the same for slices of 4 and 12
    tokens, and is what the cost model says: one [K, K + V] and one [K, V] block per head, the final states."""
    model = context_parallel_costs(T=8, R=2, HV=2, K=4, V=3, N=1, state_bytes=8)  # float64 states
    for (short, calls_short), (long, calls_long) in results["bytes"]:
        assert short == long and calls_short == calls_long
        assert short["all_gather"] == model.forward_bytes + model.backward_bytes
        assert short["all_reduce"] == model.final_bytes
        assert calls_short == {"plan": 1, "all_gather": 2, "all_reduce": 2}


def test_bad_replicated_arguments_raise_on_every_rank(results):
    for messages in results["errors"]:
        assert len(messages) == 2
        assert messages[0].startswith("cu_seqlens: expected to end at the whole length T = 5")
        assert messages[1] == "scale: expected the same value on every rank of the group, got [0.5, 0.25] by rank"


@pytest.mark.parametrize("case", ["layer", "layer, packed"])
def test_layer_with_cp_group_matches_one_pass(results, case):
    for r, err in enumerate(results[case]):
        for what, value in err.items():
            assert value < EXACT, f"rank {r}: {what} relative RMS error {value:.3g}"
