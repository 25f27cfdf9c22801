"""The hand-written backward of stages 1-3 (:mod:`kda_explained.chunked.backward_intra`) against autograd.

Each function is compared with ``torch.autograd.grad`` through its forward stage of
:mod:`kda_explained.chunked.stages`, in float64, on small random problems: ``T`` not
a multiple of the chunk, chunk sizes 16 and 32, GVA (``H = 1``, ``HV = 2``) and packed
varlen batches with a zero-length sequence. Bound: ``chunked_f64_vs_naive`` (1e-10
relative RMS error).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import pytest
import torch

from kda_explained.chunked import stages
from kda_explained.chunked.backward_intra import chunk_local_cumsum_bwd, intra_chunk_matrices_bwd, ut_transform_bwd
from kda_explained.testing import TOLERANCES, rel_rms_error

F64 = TOLERANCES["chunked_f64_vs_naive"]


class Case(NamedTuple):
    B: int
    T: int
    H: int
    HV: int
    K: int
    C: int
    cu_seqlens: Optional[list]


CASES = {
    "dense-C16": Case(B=2, T=37, H=2, HV=2, K=8, C=16, cu_seqlens=None),
    "dense-gva-C32": Case(B=2, T=45, H=1, HV=2, K=8, C=32, cu_seqlens=None),
    "varlen-gva-C16": Case(B=1, T=50, H=1, HV=2, K=8, C=16, cu_seqlens=[0, 13, 13, 50]),
    "varlen-C32": Case(B=1, T=71, H=2, HV=2, K=4, C=32, cu_seqlens=[0, 0, 40, 71]),
}
cases = pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())


def scale_of(case: Case) -> float:
    return case.K**-0.5


def inputs(case: Case, seed: int = 0):
    """Random float64 ``q, k, g, beta`` (unit-norm keys, gates in ``[-1, 0]``) and ``cu_seqlens``."""
    gen = torch.Generator().manual_seed(seed)
    B, T, H, HV, K = case.B, case.T, case.H, case.HV, case.K
    q = torch.randn(B, T, H, K, dtype=torch.float64, generator=gen)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K, dtype=torch.float64, generator=gen), dim=-1)
    g = -torch.rand(B, T, HV, K, dtype=torch.float64, generator=gen)
    beta = torch.rand(B, T, HV, dtype=torch.float64, generator=gen)
    cu = None if case.cu_seqlens is None else torch.tensor(case.cu_seqlens, dtype=torch.int64)
    return q, k, g, beta, cu, gen


@cases
def test_chunk_local_cumsum_bwd(case: Case):
    _, _, g, _, cu, gen = inputs(case)
    g = g.requires_grad_()
    G = stages.chunk_local_cumsum(g, case.C, cu)
    dG = torch.randn(G.shape, dtype=torch.float64, generator=gen)
    (dg_ref,) = torch.autograd.grad(G, g, dG)
    assert rel_rms_error(chunk_local_cumsum_bwd(dG, case.C, cu), dg_ref) <= F64


@cases
def test_ut_transform_bwd(case: Case):
    q, k, g, beta, cu, gen = inputs(case)
    G = stages.chunk_local_cumsum(g, case.C, cu)
    A_kk, _ = stages.intra_chunk_matrices(q, k, G, beta, scale_of(case), case.C, cu)
    A_kk = A_kk.requires_grad_()
    M = stages.ut_transform(A_kk, case.C, cu)
    dM = torch.randn(M.shape, dtype=torch.float64, generator=gen)
    (dA_ref,) = torch.autograd.grad(M, A_kk, dM)
    assert rel_rms_error(ut_transform_bwd(M.detach(), dM, case.C, cu), dA_ref) <= F64


@cases
def test_intra_chunk_matrices_bwd(case: Case):
    q, k, g, beta, cu, gen = inputs(case)
    G = stages.chunk_local_cumsum(g, case.C, cu)
    q, k, G, beta = (x.requires_grad_() for x in (q, k, G, beta))
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, scale_of(case), case.C, cu)
    # random everywhere, also where the forward has its constant zeros: the backward must ignore those
    dA_kk = torch.randn(A_kk.shape, dtype=torch.float64, generator=gen)
    dA_qk = torch.randn(A_qk.shape, dtype=torch.float64, generator=gen)
    refs = torch.autograd.grad((A_kk, A_qk), (q, k, G, beta), (dA_kk, dA_qk))
    outs = intra_chunk_matrices_bwd(q, k, G, beta, scale_of(case), dA_kk, dA_qk, case.C, cu)
    for name, out, ref in zip(("dq", "dk", "dG", "dbeta"), outs, refs):
        assert out.dtype == torch.float64, name
        assert rel_rms_error(out, ref) <= F64, name


def test_intra_chunk_matrices_bwd_strong_gates():
    """Gates in ``[-10, -5]`` (``G`` down to about ``-160`` in a chunk): the tiles still exponentiate only ``<= 0``."""
    case = CASES["varlen-gva-C16"]
    q, k, g, beta, cu, gen = inputs(case, seed=1)
    G = stages.chunk_local_cumsum(5 * g - 5, case.C, cu)
    q, k, G, beta = (x.requires_grad_() for x in (q, k, G, beta))
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, scale_of(case), case.C, cu)
    dA_kk, dA_qk = torch.randn(2, *A_kk.shape, dtype=torch.float64, generator=gen).unbind(0)
    refs = torch.autograd.grad((A_kk, A_qk), (q, k, G, beta), (dA_kk, dA_qk))
    outs = intra_chunk_matrices_bwd(q, k, G, beta, scale_of(case), dA_kk, dA_qk, case.C, cu)
    for name, out, ref in zip(("dq", "dk", "dG", "dbeta"), outs, refs):
        assert torch.isfinite(out).all(), name
        assert rel_rms_error(out, ref) <= F64, name


def test_intra_chunk_matrices_bwd_float32_dtypes():
    """float32 inputs: ``dq, dk, dbeta`` in float32, ``dG`` in ``G``'s float64, close to the float64 gradients."""
    case = CASES["dense-gva-C32"]
    q, k, g, beta, cu, gen = inputs(case)
    G = stages.chunk_local_cumsum(g, case.C, cu)
    dA_kk, dA_qk = torch.randn(2, case.B, case.T, case.HV, case.C, dtype=torch.float64, generator=gen).unbind(0)
    ref = intra_chunk_matrices_bwd(q, k, G, beta, 0.5, dA_kk, dA_qk, case.C, cu)
    f32 = lambda x: x.to(torch.float32)  # noqa: E731
    out = intra_chunk_matrices_bwd(f32(q), f32(k), G, f32(beta), 0.5, f32(dA_kk), f32(dA_qk), case.C, cu)
    assert [x.dtype for x in out] == [torch.float32, torch.float32, torch.float64, torch.float32]
    for o, r in zip(out, ref):
        assert rel_rms_error(o, r) <= TOLERANCES["chunked_f32_vs_naive"]
