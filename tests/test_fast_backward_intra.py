"""The tensor-core intra-chunk backward (:mod:`kda_explained.fast.backward_intra`) against the chunked layer.

The same properties as ``test_stage_intra_chunk_matrices_bwd`` in ``test_fast.py`` (whose
problems, pinned awkward cases and extreme gates it reuses), plus what the tensor-core
form adds: both paths of the diagonal blocks (split at ``SAFE_SPAN``, or exact), several
``K`` tiles, bf16 inputs, and agreement with the column-by-column kernel it replaces.
Relative RMS error against float64 with the bounds of :data:`kda_explained.testing.TOLERANCES`.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from hypothesis import given

from kda_explained import chunked
from kda_explained.chunked.backward_intra import intra_chunk_matrices_bwd as reference_bwd
from kda_explained.fast import backward as by_columns
from kda_explained.fast.backward_intra import intra_chunk_matrices_bwd
from kda_explained.testing import TOLERANCES
from strategies import make_problem
from strategies import pin_with_chunk as pin
from fast_cases import (AWKWARD, DEVICE, EXTREME_GATES, EXTREME_PROBLEM, F32, assert_close, chunk_16, extreme_gate,
                        f32, few, inputs, problems, reference_stages)

NAMES = ("dq", "dk", "dG", "dbeta")
GRAD_LOW = TOLERANCES["fast_bf16_grad"]

#: Beyond ``fast_cases.AWKWARD``: GVA with a full chunk of 64 and a ragged one (every block pair,
#: one sub-chunk of padding rows), and a packed batch of 32-chunks whose sequences start anywhere.
MORE = (
    (make_problem(B=2, T=80, H=1, HV=2, K=48, V=16, gate="lowerbound", seed=3), 64),
    (make_problem(T=60, H=2, HV=4, K=16, V=16, cu_seqlens=[0, 0, 5, 41, 60], seed=4), 32),
)


def dA_like(r, C: int, seed: int):
    """Random ``dA_kk, dA_qk [B, T, HV, C]`` float64: nonzero above the diagonal too (the kernel must ignore it)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(r.beta.shape + (C,), generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))


def matches_chunked(r, C: int, seed: int, config=None):
    """Run the tensor-core kernel and the chunked backward on the same random ``dA`` (``dA_like``);
    assert each gradient within float32 rounding of the chunked one, and return the kernel's."""
    dA_kk, dA_qk = dA_like(r, C, seed)
    ref = reference_bwd(r.q, r.k, r.G, r.beta, r.scale, dA_kk, dA_qk, C, r.cu)
    ours = intra_chunk_matrices_bwd(f32(r.q), f32(r.k), f32(r.G), f32(r.beta), r.scale, f32(dA_kk), f32(dA_qk), C,
                                    r.cu, config=config)
    for name, a, b in zip(NAMES, ours, ref):
        assert_close(a, b, F32, name)
    return ours


@pin(*AWKWARD, *MORE)
@few
@given(p=problems, C=chunk_16)
def test_intra_chunk_matrices_bwd_tensor_cores(p, C):
    """== chunked.intra_chunk_matrices_bwd: varlen with empty sequences, GVA, ragged chunks, K not 2^n."""
    for name, a in zip(NAMES, matches_chunked(reference_stages(p, C), C, 8)):
        assert a.dtype == torch.float32, name


@pytest.mark.parametrize("C", [16, 64])
@pytest.mark.parametrize("gate", EXTREME_GATES)
def test_intra_chunk_matrices_bwd_tensor_cores_extreme_gates(gate, C):
    """Gates at (tensor-core diagonal) and past (exact diagonal) ``SAFE_SPAN``, over two K tiles: finite and exact."""
    (q, k, _, _, beta), kw = inputs(EXTREME_PROBLEM, torch.float64)
    cu, scale = kw["cu_seqlens"], EXTREME_PROBLEM.shape[4] ** -0.5
    G = chunked.chunk_local_cumsum(extreme_gate(gate, beta.shape + (q.shape[-1],)), C, cu)
    gen = torch.Generator().manual_seed(9)
    dA_kk, dA_qk = (torch.randn(beta.shape + (C,), generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    ref = reference_bwd(q, k, G, beta, scale, dA_kk, dA_qk, C, cu)
    ours = intra_chunk_matrices_bwd(f32(q), f32(k), f32(G), f32(beta), scale, f32(dA_kk), f32(dA_qk), C, cu)
    for name, a, b in zip(NAMES, ours, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, F32, name)


@pytest.mark.parametrize("p, C", [AWKWARD[1], AWKWARD[4], MORE[0]])
def test_intra_chunk_matrices_bwd_tensor_cores_matches_by_columns(p, C):
    """== the column-by-column kernel of fast.backward on the same float32 inputs (what the switch changes)."""
    r = reference_stages(p, C)
    dA_kk, dA_qk = dA_like(r, C, 5)
    args = (f32(r.q), f32(r.k), f32(r.G), f32(r.beta), r.scale, f32(dA_kk), f32(dA_qk), C, r.cu)
    for name, a, b in zip(NAMES, intra_chunk_matrices_bwd(*args), by_columns.intra_chunk_matrices_bwd_by_columns(*args)):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b.double(), F32, name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_intra_chunk_matrices_bwd_tensor_cores_low_precision(dtype):
    """bf16/fp16 ``q, k`` (tf32 products on the GPU) against float64 from the same rounded inputs."""
    p, C = MORE[0]
    r = reference_stages(p, C)
    q, k = r.q.to(dtype), r.k.to(dtype)
    dA_kk, dA_qk = dA_like(r, C, 6)
    ref = reference_bwd(q.double(), k.double(), r.G, r.beta, r.scale, dA_kk, dA_qk, C, r.cu)
    ours = intra_chunk_matrices_bwd(q, k, f32(r.G), f32(r.beta), r.scale, f32(dA_kk), f32(dA_qk), C, r.cu)
    for name, a, b in zip(NAMES, ours, ref):
        assert_close(a, b, GRAD_LOW, name)


def test_intra_chunk_matrices_bwd_tensor_cores_chunk_128():
    """Eight sub-chunks: the loops are not limited to the fast layer's chunk sizes (16, 32, 64)."""
    p, C = make_problem(T=150, H=1, HV=2, K=16, V=16, gate="lowerbound", seed=7), 128
    matches_chunked(reference_stages(p, C), C, 7)


def test_intra_chunk_matrices_bwd_tensor_cores_rejects_short_chunks():
    r = reference_stages(make_problem(T=19, K=16, V=16), 8)
    dA = torch.zeros(r.beta.shape + (8,), dtype=torch.float32, device=DEVICE)
    with pytest.raises(ValueError, match="chunk_size: expected a multiple of 16"):
        intra_chunk_matrices_bwd(f32(r.q), f32(r.k), f32(r.G), f32(r.beta), r.scale, dA, dA, 8, r.cu)


@pytest.mark.parametrize("p, C", [*AWKWARD, *MORE])
def test_intra_chunk_matrices_bwd_exact_diagonal_everywhere(p, C):
    """With the threshold below every span, each diagonal block takes the exact path: same answers."""
    from dataclasses import replace

    from kda_explained.fast.config import plan_for

    exact = replace(plan_for(DEVICE).backward, span=-1.0)  # span >= 0 > -1
    matches_chunked(reference_stages(p, C), C, 4, config=exact)


@pytest.mark.parametrize("gate", EXTREME_GATES)
def test_intra_chunk_matrices_bwd_accumulates(gate):
    """With accumulators (as kda_backward calls it), dq, dk, dG are added into them: equal to the
    sum with the plain call, also for programs that the exact-diagonal launch redoes, which must
    add exactly once (GVA kept per value head)."""
    (q, k, _, _, beta), kw = inputs(EXTREME_PROBLEM, torch.float64)
    cu, scale, C = kw["cu_seqlens"], EXTREME_PROBLEM.shape[4] ** -0.5, 64
    G = chunked.chunk_local_cumsum(extreme_gate(gate, beta.shape + (q.shape[-1],)), C, cu)
    dA_kk, dA_qk = (f32(x) for x in dA_like(SimpleNamespace(beta=beta), C, 10))
    args = (f32(q), f32(k), f32(G), f32(beta), scale, dA_kk, dA_qk, C, cu)
    plain = intra_chunk_matrices_bwd(*args, per_value_head=True)
    gen = torch.Generator().manual_seed(11)
    accs = [torch.randn(G.shape, generator=gen).to(DEVICE) for _ in range(3)]
    before = [a.clone() for a in accs]
    summed = intra_chunk_matrices_bwd(*args, dq_acc=accs[0], dk_acc=accs[1], dG_acc=accs[2], per_value_head=True)
    for name, a, b, s, acc in zip(NAMES, plain, before, summed, accs):
        assert s.data_ptr() == acc.data_ptr(), name
        assert_close(s, a + b, F32, name)
    assert_close(summed[3], plain[3], F32, "dbeta")
    with pytest.raises(ValueError, match="accumulators"):
        intra_chunk_matrices_bwd(*args, dq_acc=accs[0])

