"""The backward references of stages 4-6 against autograd through the forward stages.

Each function of :mod:`kda_explained.chunked.backward_inter` must give the
vector-Jacobian product that ``torch.autograd.grad`` gives through the forward
stage of the same name in :mod:`kda_explained.chunked.stages`, in float64, to a
relative RMS error of ``TOLERANCES["chunked_f64_vs_naive"]`` (1e-10). The stage
inputs are the values the forward pipeline really produces (``G``, ``M``, ``W``,
``U``, ``h``, ``v_new``), so the decays, the triangular ``M`` and the padding
look as they do in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import pytest
import torch

from kda_explained.chunked import stages
from kda_explained.chunked.backward_inter import chunk_output_bwd, state_passing_bwd, wy_representation_bwd
from kda_explained.testing import TOLERANCES, rel_rms_error

TOL = TOLERANCES["chunked_f64_vs_naive"]
F64 = torch.float64


@dataclass
class Case:
    """One small problem: the shape, GVA, varlen (``cu_seqlens`` packs into ``B = 1``) and initial state."""

    B: int
    T: int
    H: int
    HV: int
    C: int
    cu_seqlens: Optional[list] = None
    initial_state: bool = False

    def __str__(self) -> str:
        return f"B{self.B}-T{self.T}-H{self.H}-HV{self.HV}-C{self.C}-cu{self.cu_seqlens}-h0{int(self.initial_state)}"


CASES = [
    Case(B=2, T=37, H=2, HV=2, C=16),
    Case(B=1, T=45, H=1, HV=2, C=32, initial_state=True),  # GVA
    Case(B=1, T=50, H=1, HV=2, C=16, cu_seqlens=[0, 13, 13, 50], initial_state=True),  # varlen, an empty sequence
    Case(B=1, T=70, H=2, HV=2, C=32, cu_seqlens=[0, 0, 33, 70]),  # varlen, empty first, no initial state
]
K, V = 8, 6


def _forward_inputs(case: Case, seed: int = 0):
    """Random ``q, k, v, g, beta`` and everything stages 1-5 compute from them, in float64, detached."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, C = case.B, case.T, case.H, case.HV, case.C
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens)
    N = B if cu is None else len(case.cu_seqlens) - 1
    q = torch.randn(B, T, H, K, generator=gen, dtype=F64)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, generator=gen, dtype=F64), dim=-1)
    v = torch.randn(B, T, HV, V, generator=gen, dtype=F64)
    g = -torch.rand(B, T, HV, K, generator=gen, dtype=F64) * 0.5
    beta = torch.rand(B, T, HV, generator=gen, dtype=F64)
    h0 = torch.randn(N, HV, K, V, generator=gen, dtype=F64) if case.initial_state else None
    scale = K**-0.5
    G = stages.chunk_local_cumsum(g, C, cu)
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    M = stages.ut_transform(A_kk, C, cu)
    W, U = stages.wy_representation(k, v, G, beta, M, C, cu)
    _, kg = stages.decayed_operands(q, k, G, scale, C, cu)
    h, v_new, S = stages.state_passing(kg, W, U, G, h0, C, cu)
    return dict(q=q, k=k, v=v, G=G, beta=beta, h0=h0, scale=scale, A_qk=A_qk, M=M, W=W, U=U, h=h, v_new=v_new, S=S, cu=cu, gen=gen)


def _leaf(x: torch.Tensor) -> torch.Tensor:
    return x.detach().clone().requires_grad_(True)


def _assert_close(name: str, ours: torch.Tensor, ref: torch.Tensor) -> None:
    assert ours.shape == ref.shape, f"{name}: shape {list(ours.shape)} != {list(ref.shape)}"
    err = rel_rms_error(ours, ref)
    assert err <= TOL, f"{name}: relative RMS error {err:.3e} > {TOL:.0e}"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wy_representation_bwd(case: Case):
    f = _forward_inputs(case)
    C, cu, gen = case.C, f["cu"], f["gen"]
    k, v, G, beta, M = (_leaf(f[n]) for n in ("k", "v", "G", "beta", "M"))
    W, U = stages.wy_representation(k, v, G, beta, M, C, cu)
    dW, dU = torch.randn(W.shape, generator=gen, dtype=F64), torch.randn(U.shape, generator=gen, dtype=F64)
    ref = torch.autograd.grad((W, U), (k, v, G, beta, M), (dW, dU))
    ours = wy_representation_bwd(f["k"], f["v"], f["G"], f["beta"], f["M"], dW, dU, C, cu)
    for name, a, b in zip(("dk", "dv", "dG", "dbeta", "dM"), ours, ref):
        _assert_close(name, a, b)
    assert ours[2].dtype == f["G"].dtype


@pytest.mark.parametrize("case", CASES, ids=str)
def test_state_passing_bwd(case: Case):
    f = _forward_inputs(case)
    C, cu, gen = case.C, f["cu"], f["gen"]
    k, W, U, G = (_leaf(f[n]) for n in ("k", "W", "U", "G"))
    h0 = None if f["h0"] is None else _leaf(f["h0"])
    # the backward of stage 5 with its decayed keys (stage 5's operand, formed from k and G)
    _, kg = stages.decayed_operands(k, k, G, 1.0, C, cu)
    h, v_new, S = stages.state_passing(kg, W, U, G, h0, C, cu)
    dh, dv_new, dS = (torch.randn(x.shape, generator=gen, dtype=F64) for x in (h, v_new, S))
    inputs = (k, W, U, G) + ((h0,) if h0 is not None else ())
    ref = torch.autograd.grad((h, v_new, S), inputs, (dh, dv_new, dS))
    ours = state_passing_bwd(
        f["k"], f["W"], f["U"], f["G"], f["h0"], h.detach(), v_new.detach(), dh, dv_new, dS, C, cu
    )
    names = ("dk", "dW", "dU", "dG", "dinitial_state")
    for name, a, b in zip(names, ours, ref):
        _assert_close(name, a, b)
    assert (ours[4] is None) == (h0 is None)


@pytest.mark.parametrize("case", CASES[:2], ids=str)
def test_state_passing_bwd_without_final_state_grad(case: Case):
    """``dS_final = None`` (the final state not used) is the same as zeros."""
    f = _forward_inputs(case)
    C, cu, gen = case.C, f["cu"], f["gen"]
    dh = torch.randn(f["h"].shape, generator=gen, dtype=F64)
    dv_new = torch.randn(f["v_new"].shape, generator=gen, dtype=F64)
    args = (f["k"], f["W"], f["U"], f["G"], f["h0"], f["h"], f["v_new"], dh, dv_new)
    none = state_passing_bwd(*args, None, C, cu)
    zeros = state_passing_bwd(*args, torch.zeros_like(f["S"]), C, cu)
    for a, b in zip(none, zeros):
        assert (a is None and b is None) or torch.equal(a, b)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_chunk_output_bwd(case: Case):
    f = _forward_inputs(case)
    C, cu, gen, scale = case.C, f["cu"], f["gen"], f["scale"]
    q, h, v_new, G, A_qk = (_leaf(f[n]) for n in ("q", "h", "v_new", "G", "A_qk"))
    qg, _ = stages.decayed_operands(q, q, G, scale, C, cu)  # stage 6's operand, formed from q and G
    o = stages.chunk_output(qg, h, v_new, A_qk, C, cu)
    do = torch.randn(o.shape, generator=gen, dtype=F64)
    ref = torch.autograd.grad(o, (q, h, v_new, G, A_qk), do)
    ours = chunk_output_bwd(f["q"], f["h"], f["v_new"], f["G"], f["A_qk"], scale, do, C, cu)
    for name, a, b in zip(("dq", "dh", "dv_new", "dG", "dA_qk"), ours, ref):
        _assert_close(name, a, b)


def test_stages_4_to_6_chain_to_autograd():
    """The three backward stages chained (6 -> 5 -> 4) give autograd's gradients through stages 4-6 together."""
    case = Case(B=1, T=50, H=1, HV=2, C=16, cu_seqlens=[0, 13, 13, 50], initial_state=True)
    f = _forward_inputs(case)
    C, cu, gen, scale = case.C, f["cu"], f["gen"], f["scale"]
    q, k, v, G, beta, M, A_qk, h0 = (_leaf(f[n]) for n in ("q", "k", "v", "G", "beta", "M", "A_qk", "h0"))
    W, U = stages.wy_representation(k, v, G, beta, M, C, cu)
    qg, kg = stages.decayed_operands(q, k, G, scale, C, cu)
    h, v_new, S = stages.state_passing(kg, W, U, G, h0, C, cu)
    o = stages.chunk_output(qg, h, v_new, A_qk, C, cu)
    do, dS = torch.randn(o.shape, generator=gen, dtype=F64), torch.randn(S.shape, generator=gen, dtype=F64)
    ref = torch.autograd.grad((o, S), (q, k, v, G, beta, M, A_qk, h0), (do, dS))

    dq, dh, dv_new, dG6, dA_qk = chunk_output_bwd(f["q"], f["h"], f["v_new"], f["G"], f["A_qk"], scale, do, C, cu)
    dk5, dW, dU, dG5, dh0 = state_passing_bwd(f["k"], f["W"], f["U"], f["G"], f["h0"], f["h"], f["v_new"], dh, dv_new, dS, C, cu)
    dk4, dv, dG4, dbeta, dM = wy_representation_bwd(f["k"], f["v"], f["G"], f["beta"], f["M"], dW, dU, C, cu)
    ours = (dq, dk4 + dk5, dv, dG4 + dG5 + dG6, dbeta, dM, dA_qk, dh0)
    for name, a, b in zip(("dq", "dk", "dv", "dG", "dbeta", "dM", "dA_qk", "dh0"), ours, ref):
        _assert_close(name, a, b)
