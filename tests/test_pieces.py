"""Sequences in parallel pieces: the chunked composition against ``chunked.kda``, the two fast kernels
against their chunked twins, and the fast forward in pieces against the forward on whole sequences.

The split is an identity of the recurrence (the segment map), so the float64 chunked composition
must equal ``chunked.kda`` to rounding, for any piece length; the fast forward in pieces is held to
the fast layer's bounds against the float64 reference, like the forward it replaces.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from kda_explained import chunked
from kda_explained.chunked import pieces as chunked_pieces
from kda_explained.fast import forward as fast_forward
from kda_explained.fast import pieces as fast_pieces
from kda_explained.fast.config import plan_for
import kda_explained.fast as fast
from fast_cases import DEVICE, F32, LOW, assert_close, few, inputs, reference
from strategies import kda_problems, make_problem, to_torch
from test_twins import positional

EXACT = 1e-10

#: A plan that cuts every sequence longer than 32 tokens into 32-token pieces, whatever the grid.
PIECES = replace(plan_for(DEVICE), forward=replace(plan_for(DEVICE).forward, piece_tokens=32,
                                                   pieces_below_programs_per_sm=1e9))


# ---------------------------------------------------------------------------------------------
# The chunked composition is chunked.kda
# ---------------------------------------------------------------------------------------------


@example(p=make_problem(T=50, H=1, HV=2, K=8, V=5, cu_seqlens=[0, 0, 13, 50], initial_state=True, seed=1),
         piece_tokens=7)
@example(p=make_problem(B=2, T=33, H=2, K=4, V=4, initial_state=True, gate="resets", seed=2), piece_tokens=16)
@example(p=make_problem(T=1, K=3, V=2), piece_tokens=1)
@given(p=kda_problems(T=(1, 40)), piece_tokens=st.sampled_from([1, 5, 16, 64]))
def test_kda_in_pieces_is_chunked_kda(p, piece_tokens):
    args, kw = to_torch(p)
    o, S = chunked_pieces.kda_in_pieces(*args, **kw, output_final_state=True, piece_tokens=piece_tokens)
    o_ref, S_ref = chunked.kda(*args, **kw, output_final_state=True)
    assert_close(o, o_ref, EXACT, "o")
    assert_close(S, S_ref, EXACT, "final state")


def test_split_pieces():
    assert chunked_pieces.split_pieces([0, 64, 64, 200], 64) == ([0, 64, 64, 128, 192, 200], [0, 1, 2, 5])
    assert chunked_pieces.split_pieces([0, 0], 8) == ([0, 0], [0, 1])  # an empty sequence keeps one piece
    with pytest.raises(ValueError, match="piece_tokens"):
        chunked_pieces.split_pieces([0, 4], 0)


# ---------------------------------------------------------------------------------------------
# The fast kernels against their twins
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["piece_states", "piece_outputs"])
def test_piece_twins_share_name_and_signature(name):
    assert positional(getattr(fast_pieces, name)) == positional(getattr(chunked_pieces, name))


@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("K, V", [(16, 16), (20, 12), (32, 40)])
def test_piece_states_twins(K, V, with_state):
    gen = torch.Generator().manual_seed(K + V)
    first_piece = [0, 3, 4, 4 + 1, 7]  # sequences of 3, 1, 1 and 2 pieces
    NP, N, HV = first_piece[-1], len(first_piece) - 1, 2
    P = (torch.randn(NP, HV, K, K, generator=gen) / K ** 0.5).double()
    R = torch.randn(NP, HV, K, V, generator=gen).double()
    S0 = torch.randn(N, HV, K, V, generator=gen).double() if with_state else None
    S_in_ref, final_ref = chunked_pieces.piece_states(P, R, S0, first_piece)
    S_in, final = fast_pieces.piece_states(*(x.float().to(DEVICE) if x is not None else None for x in (P, R, S0)),
                                           first_piece)
    assert S_in.dtype == final.dtype == torch.float32
    assert_close(S_in.cpu(), S_in_ref, F32, "S_in")
    assert_close(final.cpu(), final_ref, F32, "final state")


@pytest.mark.parametrize("dtype, bound", [(torch.float32, F32), (torch.bfloat16, LOW)], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("K, V", [(16, 16), (20, 12), (32, 64)])
def test_piece_outputs_twins(K, V, dtype, bound):
    gen = torch.Generator().manual_seed(K * V)
    piece_cu = [0, 64, 64, 100, 229, 230]  # an empty piece, a partial block, several blocks
    T, HV = piece_cu[-1], 3
    o_aug = torch.randn(1, T, HV, V + K, generator=gen).double()
    S_in = torch.randn(len(piece_cu) - 1, HV, K, V, generator=gen).double()
    ref = chunked_pieces.piece_outputs(o_aug, S_in, piece_cu)
    ours = fast_pieces.piece_outputs(o_aug.to(dtype).to(DEVICE), S_in.float().to(DEVICE), piece_cu)
    assert ours.dtype == dtype
    assert_close(ours.cpu().double(), ref, bound, "o")


def test_piece_outputs_refuses_the_wrong_width():
    with pytest.raises(ValueError, match=r"^o_aug: expected V \+ K = 24"):
        fast_pieces.piece_outputs(torch.zeros(1, 4, 1, 20, device=DEVICE), torch.zeros(1, 1, 8, 16, device=DEVICE),
                                  [0, 4])


# ---------------------------------------------------------------------------------------------
# The fast forward in pieces
# ---------------------------------------------------------------------------------------------


def test_forward_pieces_rule():
    config = replace(plan_for(DEVICE).forward, piece_tokens=64, pieces_below_programs_per_sm=4.0)
    cpu = torch.device("cpu")  # one SM
    assert fast_forward.forward_pieces([0, 200], 2, 32, 32, cpu, config) == 64  # 2 programs < 4
    assert fast_forward.forward_pieces([0, 64, 100], 2, 32, 32, cpu, config) is None  # no sequence longer than 64
    assert fast_forward.forward_pieces([0, 200], 4, 32, 32, cpu, config) is None  # 4 programs: the grid is full
    assert fast_forward.forward_pieces([0, 200], 1, 128, 192, cpu, config) is None  # V + K past one value tile
    assert fast_forward.forward_pieces([0, 200], 1, 32, 32, cpu, plan_for(DEVICE).forward) is None  # off by default


def spy_pieces(monkeypatch):
    """Record every call of the forward in pieces (and still run it)."""
    calls = []
    inner = fast_forward.chunk_kda_fwd_in_pieces

    def spy(*a, **kw):
        calls.append(kw["piece_tokens"])
        return inner(*a, **kw)

    monkeypatch.setattr(fast_forward, "chunk_kda_fwd_in_pieces", spy)
    return calls


CASES = {
    "one long sequence": make_problem(T=150, H=1, HV=2, K=16, V=24, seed=4),
    "packed, initial state": make_problem(T=160, H=2, HV=2, K=32, V=16, cu_seqlens=[0, 0, 20, 110, 160],
                                          initial_state=True, gate="resets", seed=5),
    "batch of rows, GVA": make_problem(B=2, T=70, H=1, HV=3, K=16, V=16, initial_state=True, seed=6),
}


@pytest.mark.parametrize("name", list(CASES))
def test_fast_forward_in_pieces_matches_the_reference(monkeypatch, name):
    calls = spy_pieces(monkeypatch)
    args, kw = inputs(CASES[name])
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, plan=PIECES)
        o_whole, S_whole = fast.chunk_kda(*args, **kw, output_final_state=True)
    assert calls == [32]  # the pieces ran, once
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")
    assert_close(o, o_whole, F32, "o against whole sequences")


@pytest.mark.parametrize("state_v_first", [False, True], ids=["KV", "VK"])
def test_fast_forward_in_pieces_with_options(monkeypatch, state_v_first):
    """The in-kernel gate, L2 norm and beta sigmoid act token by token, so they pass to the pieces as they are."""
    calls = spy_pieces(monkeypatch)
    p = make_problem(T=100, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 70, 100], initial_state=True, seed=7)
    (q, k, v, g, beta), kw = inputs(p)
    if state_v_first:
        kw["initial_state"] = kw["initial_state"].transpose(-1, -2).contiguous()
    options = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=torch.tensor([0.1, -0.3], device=DEVICE),
                   dt_bias=torch.linspace(-0.5, 0.5, 2 * 16, device=DEVICE), lower_bound=-5.0,
                   use_beta_sigmoid_in_kernel=True, allow_neg_eigval=True, state_v_first=state_v_first)
    q, k, g, beta = 3 * q, 2 * k, 3 * g, 2 * beta - 1  # raw inputs for the options
    with torch.no_grad():
        o, S = fast.chunk_kda(q, k, v, g, beta, **kw, output_final_state=True, plan=PIECES, **options)
    assert calls == [32]
    o_ref, S_ref = reference(q, k, v, g, beta, **kw, **options)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


def test_fast_forward_in_pieces_bfloat16(monkeypatch):
    calls = spy_pieces(monkeypatch)
    args, kw = inputs(make_problem(T=200, H=1, HV=2, K=32, V=32, initial_state=True, seed=8), torch.bfloat16)
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, plan=PIECES)
    assert calls == [32] and o.dtype == torch.bfloat16
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "final state")


def test_pieces_only_in_the_inference_forward(monkeypatch):
    """Training keeps whole sequences (its backward reads the forward's chunk factors), and so do the
    chunk states of return_intermediate_states and an explicit chunk size."""
    calls = spy_pieces(monkeypatch)
    args, kw = inputs(make_problem(T=100, H=1, K=16, V=16, seed=9))
    q = args[0].clone().requires_grad_()
    fast.chunk_kda(q, *args[1:], **kw, plan=PIECES)[0].sum().backward()
    with torch.inference_mode():
        fast.chunk_kda(*args, **kw, plan=PIECES, return_intermediate_states=True)
        fast.chunk_kda(*args, **kw, plan=PIECES, chunk_size=64)
    assert calls == [] and q.grad is not None


@few
@given(p=kda_problems(T=(1, 120), K=st.sampled_from([16, 32]), V=st.sampled_from([16, 24])))
def test_fast_forward_in_pieces_property(p):
    args, kw = inputs(p)
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, plan=PIECES)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")
