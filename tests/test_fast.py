"""Properties of the fast layer at small sizes: each Triton kernel against the chunked layer.

On a machine without a CUDA GPU, ``conftest.py`` sets ``TRITON_INTERPRET=1`` and the
kernels run in the Triton interpreter on CPU tensors; on a GPU machine the same
tests run on ``cuda``. The interpreter is slow (a ``[C, C]`` block costs about a
tenth of a second), so the draws are small: chunk size 16 for the properties, 32
and 64 in pinned examples, ``K, V`` in 12..32, ``T <= 48``.

Every comparison is a relative RMS error (:func:`kda_explained.testing.rel_rms_error`)
against the chunked layer computed in float64 from the *same* (rounded) inputs,
with the bounds of :data:`kda_explained.testing.TOLERANCES`:
``fast_f32_vs_f64`` for float32 inputs, ``fast_bf16_output`` for bf16 and fp16 inputs.

- stages: each kernel of :mod:`kda_explained.fast` against the chunked stage of the
  same name, fed the float64 reference values of its inputs rounded to float32, so
  a failure points at one kernel;
- ``chunk_kda`` end to end, with every in-kernel option against its PyTorch reference
  (:mod:`kda_explained.chunked.gates`, ``torch.sigmoid``, a transposed state);
- ``fused_recurrent_kda`` likewise, plus the state pool of a serving engine;
- prefill then decode, ``fast.kda``'s dispatch, inference mode, the gradients, and the errors.
"""

from __future__ import annotations

import os
from dataclasses import replace
from typing import Optional

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from kda_explained import chunked, fast
from kda_explained.fast import api as fast_api
from kda_explained.fast import forward as fast_forward
from kda_explained.fast.config import plan_for
from kda_explained.fast._meta import packed_offsets
from kda_explained.testing import rel_rms_error
from strategies import Problem, kda_problems, make_problem, to_torch
from strategies import pin_with_chunk as pin
from fast_cases import (AWKWARD, DEVICE, EXTREME_GATES, EXTREME_PROBLEM, F32, GRAD_F32, LOW, LOW_DTYPES, assert_close,
                        assert_each_close, chunk_16, extreme_gate, f32, f64, few, fewer, first_chunks, inputs,
                        problems, randn_like_f64, reference, reference_stages)

@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_local_cumsum(p, C):
    r = reference_stages(p, C)
    G = fast.chunk_local_cumsum(f32(r.g), C, r.cu)
    assert G.dtype == torch.float32
    assert_close(G, r.G, F32, "G")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_local_factors(p, C):
    """Stages 2-4 in one kernel == intra_chunk_matrices, ut_transform and wy_representation."""
    r = reference_stages(p, C)
    f = fast.chunk_local_factors(f32(r.q), f32(r.k), f32(r.v), f32(r.G), f32(r.beta), r.scale, C, r.cu,
                                 store_akk=True, store_m=True)
    assert_close(f.A_kk, r.A_kk, F32, "A_kk")
    assert_close(f.M, r.M, F32, "M")
    assert_close(f.A_qk, r.A_qk, F32, "A_qk")
    assert_close(f.W, r.W, F32, "W")
    assert_close(f.U, r.U, F32, "U")
    assert_close(f.qg, r.qg, F32, "qg")
    assert_close(f.kg, r.kg, F32, "kg")


def chunk_end_rows(G: torch.Tensor, C: int, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """``G [B, T, HV, K]`` at each chunk's last token, ``[NC, HV, K]`` (chunks numbered sequence by sequence)."""
    B, T = G.shape[:2]
    offsets = packed_offsets(B, T, cu)
    ends = [min(bos + C, eos) - 1 for b0, eos in zip(offsets[:-1], offsets[1:]) for bos in range(b0, eos, C)]
    return G.reshape(B * T, *G.shape[2:])[ends]


@pin(*[(p, C) for p, C in AWKWARD if C <= plan_for(DEVICE).one_pass.max_chunk])
@few
@given(p=problems, C=st.sampled_from([16, 32]))
@pytest.mark.parametrize("cumulative", [False, True], ids=["g", "G"])
def test_stage_chunk_local_factors_one_pass(p, C, cumulative):
    """Stages 1-4 in one pass (short chunks) == chunk_local_cumsum, intra_chunk_matrices, ut_transform,
    wy_representation and decayed_operands; G at the chunk ends == the cumsum's rows there. From the
    per-token g (the kernel sums it), or from G (the gate options' path)."""
    r = reference_stages(p, C)
    f = fast.chunk_local_factors_one_pass(f32(r.q), f32(r.k), f32(r.v), f32(r.G if cumulative else r.g),
                                          f32(r.beta), r.scale, C, r.cu, cumulative=cumulative, store_akk=True)
    assert f.M is None and f.G_end.dtype == torch.float32
    for name, ours, ref in (("A_kk", f.A_kk, r.A_kk), ("A_qk", f.A_qk, r.A_qk), ("W", f.W, r.W), ("U", f.U, r.U),
                            ("qg", f.qg, r.qg), ("kg", f.kg, r.kg), ("G_end", f.G_end, chunk_end_rows(r.G, C, r.cu))):
        assert_close(ours, ref, F32, name)


def in_chunk_one_hot(v: torch.Tensor, C: int, cu: Optional[torch.Tensor]) -> torch.Tensor:
    """``[B, T, HV, C]``: row ``t`` is ``e_j`` for token ``t`` at position ``j`` of its chunk (``wy_representation``
    of these values gives ``U = M Diag(beta) I``: the factor ``Mb`` itself, in the same row layout)."""
    B, T, HV = v.shape[:3]
    offsets = packed_offsets(B, T, cu)
    pos = torch.zeros(B * T, dtype=torch.long)
    for bos, eos in zip(offsets[:-1], offsets[1:]):
        pos[bos:eos] = torch.arange(eos - bos) % C
    eye = torch.nn.functional.one_hot(pos, C).to(v.dtype).reshape(B, T, 1, C)
    return eye.expand(B, T, HV, C).contiguous()


@pin(*[(p, C) for p, C in AWKWARD if C <= plan_for(DEVICE).one_pass.max_chunk])
@few
@given(p=problems, C=chunk_16)
def test_one_pass_fold(p, C):
    """The UT transform left to the state pass: the one pass with ``fold=2`` returns
    ``Mb = M Diag(beta)`` and ``k_gamma = Gamma * K`` in place of ``W`` and ``U`` == the chunked stages, and
    the fused state pass fed ``Mb``, ``v`` and ``k_gamma`` gives the chunked stages' output and final state."""
    r = reference_stages(p, C)
    _, Mb = chunked.wy_representation(r.k, in_chunk_one_hot(r.v, C, r.cu), r.G, r.beta, r.M, C, r.cu)
    f = fast.chunk_local_factors_one_pass(f32(r.q), f32(r.k), f32(r.v), f32(r.g), f32(r.beta), r.scale, C, r.cu,
                                          fold=2)
    assert f.U is None and f.W is None and f.Mb.dtype == torch.float32
    assert_close(f.Mb, Mb, F32, "Mb")
    k_hv = r.k.repeat_interleave(r.G.shape[2] // r.k.shape[2], 2)  # GVA: each key head serves HV / H
    assert_close(f.k_gamma, k_hv * torch.exp(r.G), F32, "k_gamma")
    o, S = fast.state_passing_output(f.kg, f.W, None, f.G_end, f.qg, f.A_qk, f32(r.S0), C, r.cu, Mb=f.Mb,
                                     v=f32(r.v), k_gamma=f.k_gamma)
    assert_close(o, r.o, F32, "o")
    assert_close(S, r.S, F32, "final state")


def test_state_pass_wy_operands_checked():
    """The fused state pass takes (W, U), or Mb with v and k_gamma: other mixes refused by name."""
    p, C = AWKWARD[1]
    r = reference_stages(p, C)
    f = fast.chunk_local_factors_one_pass(f32(r.q), f32(r.k), f32(r.v), f32(r.g), f32(r.beta), r.scale, C, fold=2)
    args = (f.kg, f.G_end, f.qg, f.A_qk, f32(r.S0), C)
    for kw, match in ((dict(W=None, U=None), "W, U: both required"),
                      (dict(W=f32(r.W), U=f32(r.U), v=f32(r.v)), "v, k_gamma: only with Mb"),
                      (dict(W=None, U=f32(r.U), Mb=f.Mb, v=f32(r.v), k_gamma=f.k_gamma),
                       "v, U: with Mb give the values v"),
                      (dict(W=f32(r.W), U=None, Mb=f.Mb, v=f32(r.v), k_gamma=f.k_gamma),
                       "W, k_gamma: with Mb give k_gamma")):
        W, U = kw.pop("W"), kw.pop("U")
        with pytest.raises(ValueError, match=match):
            fast.state_passing_output(args[0], W, U, *args[1:], **kw)


def test_state_pass_takes_G_whole_or_at_chunk_ends():
    """The state kernels read G whole ([B, T, HV, K]) or only at the chunk ends ([NC, HV, K]): the same
    result; a [NC, HV, K] of the wrong chunk count is refused by name."""
    p, C = AWKWARD[3]
    r = reference_stages(p, C)
    ends = chunk_end_rows(r.G, C, r.cu)
    args = (f32(r.kg), f32(r.W), f32(r.U))
    o1, S1 = fast.state_passing_output(*args, f32(r.G), f32(r.qg), f32(r.A_qk), f32(r.S0), C, r.cu)
    o2, S2 = fast.state_passing_output(*args, f32(ends), f32(r.qg), f32(r.A_qk), f32(r.S0), C, r.cu)
    assert torch.equal(o1, o2) and torch.equal(S1, S2)
    h1, v1, _ = fast.state_passing(*args, f32(r.G), f32(r.S0), C, r.cu)
    h2, v2, _ = fast.state_passing(*args, f32(ends), f32(r.S0), C, r.cu)
    assert torch.equal(h1, h2) and torch.equal(v1, v2)
    with pytest.raises(ValueError, match=r"G: expected \[B, T, HV, K\] or, at chunk ends, \[NC, HV, K\]"):
        fast.state_passing(*args, f32(ends[1:]), f32(r.S0), C, r.cu)


@pytest.mark.parametrize("case", range(len(AWKWARD)))
def test_state_pass_prefetch_equals_plain_loads(case, monkeypatch):
    """The chunk loops with G's chunk-end rows (and A_qk) loaded one chunk ahead (the plan's ``prefetch``
    and ``recurrence_prefetch``, the defaults) == the same loops loading them where they are used, and
    both == the chunked stages: forward state pass (G whole and at chunk ends), fused with the output,
    and the backward recurrence (whose loop runs last chunk first)."""
    from kda_explained.chunked.backward_inter import state_passing_bwd_recurrence as reference_recurrence
    from kda_explained.fast import backward as fast_backward

    p, C = AWKWARD[case]
    r = reference_stages(p, C)
    ends = chunk_end_rows(r.G, C, r.cu)
    args = (f32(r.kg), f32(r.W), f32(r.U))
    rand = randn_like_f64(5)
    dh, dv_new, dS_final = rand(r.h), rand(r.v_new), rand(r.S)
    ref_bwd = reference_recurrence(r.kg, r.W, r.G, r.h, dh, dv_new, dS_final, C, r.cu)
    runs = []
    plan = plan_for(DEVICE)
    for prefetch in (True, False):
        state = replace(plan.state, prefetch=prefetch)
        bwd_config = replace(plan.backward, recurrence_prefetch=prefetch)
        h, v_new, S = fast.state_passing(*args, f32(r.G), f32(r.S0), C, r.cu, config=state)
        o, S_o = fast.state_passing_output(*args, f32(ends), f32(r.qg), f32(r.A_qk), f32(r.S0), C, r.cu,
                                           config=state)
        bwd = fast_backward.state_passing_bwd_recurrence(f32(r.kg), f32(r.W), f32(r.G), f32(r.h), f32(dh),
                                                         f32(dv_new), f32(dS_final), C, r.cu, config=bwd_config)
        assert_each_close(("h", "v_new", "S", "o", "S (fused)"), (h, v_new, S, o, S_o),
                          (r.h, r.v_new, r.S, r.o, r.S))
        assert_each_close(("dS_out", "dv_tot", "dS0"), bwd, ref_bwd)
        runs.append((h, v_new, S, o, S_o) + tuple(bwd))
    for a, b in zip(*runs):
        assert torch.equal(a, b)  # the same loads, issued earlier: the same numbers


def test_one_pass_rejects_long_chunks():
    r = reference_stages(AWKWARD[0][0], 16)
    with pytest.raises(ValueError, match="chunk_size: expected 16 or 32"):
        fast.chunk_local_factors_one_pass(f32(r.q), f32(r.k), f32(r.v), f32(r.g), f32(r.beta), r.scale, 64)


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_wy_factors(p, C):
    """Stage 4 alone from a given M (the backward's recompute) == wy_representation and decayed_operands."""
    r = reference_stages(p, C)
    f = fast.chunk_wy_factors(f32(r.q), f32(r.k), f32(r.v), f32(r.G), f32(r.beta), f32(r.M), r.scale, C, r.cu)
    assert f.A_qk is None and f.A_kk is None
    assert_close(f.W, r.W, F32, "W")
    assert_close(f.U, r.U, F32, "U")
    assert_close(f.qg, r.qg, F32, "qg")
    assert_close(f.kg, r.kg, F32, "kg")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_passing(p, C):
    r = reference_stages(p, C)
    h, v_new, S = fast.state_passing(f32(r.kg), f32(r.W), f32(r.U), f32(r.G), f32(r.S0), C, r.cu)
    assert_close(h, r.h, F32, "h")
    assert_close(v_new, r.v_new, F32, "v_new")
    assert_close(S, r.S, F32, "final state")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_output(p, C):
    r = reference_stages(p, C)
    o = fast.chunk_output(f32(r.qg), f32(r.h), f32(r.v_new), f32(r.A_qk), C, r.cu)
    assert_close(o, r.o, F32, "o")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_passing_output(p, C):
    """Stages 5 and 6 in one kernel == state_passing then chunk_output (h and v_new never stored)."""
    r = reference_stages(p, C)
    o, S = fast.state_passing_output(f32(r.kg), f32(r.W), f32(r.U), f32(r.G), f32(r.qg), f32(r.A_qk), f32(r.S0),
                                     C, r.cu)
    assert o.dtype == torch.float32
    assert_close(o, r.o, F32, "o")
    assert_close(S, r.S, F32, "final state")


def test_state_value_tile_rule(monkeypatch):
    """The state pass's value tile: 64 columns, halved (to 16 at least) while the grid has fewer programs
    per SM than asked: 1 for the two-kernel path and the backward, the plan's ``fused_programs_per_sm``
    for the fused kernel (the launcher picks by whether the output is fused)."""
    from kda_explained.fast import state as fast_state

    monkeypatch.setattr(fast_state, "sm_count", lambda device: 132)
    tile = fast_state.state_value_tile
    assert tile(128, 128, "cpu") == 64 and tile(128, 128, "cpu", 1.5) == 64  # B=8, H=16: 256 programs
    assert tile(96, 128, "cpu") == 64 and tile(96, 128, "cpu", 1.5) == 32  # H=96: 192 programs
    assert tile(16, 128, "cpu") == 16 and tile(16, 128, "cpu", 1.5) == 16  # one sequence, H=16: down to 16
    assert tile(4, 12, "cpu") == 16  # V below 16: one 16-wide tile
    asked = []
    monkeypatch.setattr(fast_state, "state_value_tile", lambda n, V, device, pps=1.0: asked.append(pps) or 16)
    r = reference_stages(*AWKWARD[2])
    args = (f32(r.kg), f32(r.W), f32(r.U), f32(r.G))
    fast.state_passing(*args, f32(r.S0), AWKWARD[2][1], r.cu)
    fast.state_passing_output(*args, f32(r.qg), f32(r.A_qk), f32(r.S0), AWKWARD[2][1], r.cu)
    assert asked == [1.0, plan_for(DEVICE).state.fused_programs_per_sm]


def test_chunk_kda_default_chunk_size(monkeypatch):
    """chunk_size=None: the inference forward takes forward_chunk_size's choice, training takes 64."""
    from kda_explained.fast import api as fast_api

    seen = []
    inner = fast_forward.chunk_kda_fwd

    def spy(*a, **kw):
        seen.append(kw["chunk_size"])
        return inner(*a, **kw)

    monkeypatch.setattr(fast_api, "chunk_kda_fwd", spy)
    args, kw = inputs(make_problem(B=2, T=45, H=2, HV=4, K=32, V=24, initial_state=True, seed=3))
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True)  # the CPU counts as one SM: short chunks
    o64, S64 = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=64)
    assert seen == [plan_for(DEVICE).forward.short_chunk, 64]
    assert_close(o, o64, 1e-5, "o")
    assert_close(S, S64, 1e-5, "final state")
    q = args[0].clone().requires_grad_()
    fast.chunk_kda(q, *args[1:], **kw)[0].sum().backward()
    assert seen[-1] == 64 and q.grad is not None
    always_64 = replace(plan_for(DEVICE).forward, short_chunk=None)
    assert fast_forward.forward_chunk_size(1000, 128, torch.device("cpu"), always_64) == 64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["float32", "bfloat16"])
def test_chunk_kda_state_output_fused_equals_two_kernels(dtype):
    """The default forward (stages 5 and 6 fused) against the two kernels, on the same inputs."""
    args, kw = inputs(make_problem(B=2, T=45, H=2, HV=4, K=32, V=24, seed=9), dtype)
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=16)
    plan = plan_for(DEVICE)
    two_kernels = replace(plan, forward=replace(plan.forward, fused_state_output=False))
    o2, S2 = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=16, plan=two_kernels)
    assert o.dtype == o2.dtype == dtype
    # float32: the same products in another order; bf16 (interpreter): the two kernels also round h
    # to bf16 between them, the fused one keeps it in float32
    assert_close(o, o2, 1e-5 if dtype == torch.float32 else 1e-2, "o")
    assert_close(S, S2, 1e-6, "final state")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_passing_bwd_recurrence(p, C):
    """The backward's reverse-time state pass == the chunked recurrence of the same name."""
    from kda_explained.chunked.backward_inter import state_passing_bwd_recurrence as reference_recurrence
    from kda_explained.fast.backward import state_passing_bwd_recurrence

    r = reference_stages(p, C)
    rand = randn_like_f64(3)

    dh, dv_new, dS_final = rand(r.h), rand(r.v_new), rand(r.S)
    ref = reference_recurrence(r.kg, r.W, r.G, r.h, dh, dv_new, dS_final, C, r.cu)
    ours = state_passing_bwd_recurrence(f32(r.kg), f32(r.W), f32(r.G), f32(r.h), f32(dh), f32(dv_new),
                                        f32(dS_final), C, r.cu)
    for name, a, b in zip(("dS_out", "dv_tot", "dS0"), ours, ref):
        assert a.dtype == torch.float32
        assert_close(a, b, F32, name)
    # without the optional gradients: zeros in their place
    ref0 = reference_recurrence(r.kg, r.W, r.G, r.h, None, None, None, C, r.cu)
    ours0 = state_passing_bwd_recurrence(f32(r.kg), f32(r.W), f32(r.G), f32(r.h), None, None, None, C, r.cu)
    for name, a, b in zip(("dS_out", "dv_tot", "dS0"), ours0, ref0):
        assert torch.all(a == 0) and torch.all(b == 0), name


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_passing_bwd_recurrence_fused(p, C):
    """The recurrence with the output stage's terms computed inside (``output=(qg, A_qk, dO)``) ==
    the chunked recurrence fed with the chunked output backward's ``dh`` and ``dv_new``; and the
    output backward without them (``state_grads=False``) keeps its other outputs."""
    from kda_explained.chunked.backward_inter import chunk_output_bwd as reference_output_bwd
    from kda_explained.chunked.backward_inter import state_passing_bwd_recurrence as reference_recurrence
    from kda_explained.fast.backward import chunk_output_bwd, state_passing_bwd_recurrence

    r = reference_stages(p, C)
    gen = torch.Generator().manual_seed(6)
    do = torch.randn(r.o.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dS_final = torch.randn(r.S.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dq_ref, dh, dv_new, dG_ref, dA_ref = reference_output_bwd(r.q, r.h, r.v_new, r.G, r.A_qk, r.scale, do, C, r.cu)
    ref = reference_recurrence(r.kg, r.W, r.G, r.h, dh, dv_new, dS_final, C, r.cu)
    ours = state_passing_bwd_recurrence(f32(r.kg), f32(r.W), f32(r.G), f32(r.h), None, None, f32(dS_final), C, r.cu,
                                        output=(f32(r.qg), f32(r.A_qk), f32(do)))
    assert_each_close(("dS_out", "dv_tot", "dS0"), ours, ref)
    dq, dh0, dv0, dG, dA = chunk_output_bwd(f32(r.q), f32(r.h), f32(r.v_new), f32(r.G), f32(r.A_qk), r.scale,
                                            f32(do), C, r.cu, state_grads=False)
    assert dh0 is None and dv0 is None
    assert_each_close(("dq", "dG", "dA_qk"), (dq, dG, dA), (dq_ref, dG_ref, dA_ref))
    with pytest.raises(ValueError, match="output"):
        state_passing_bwd_recurrence(f32(r.kg), f32(r.W), f32(r.G), f32(r.h), f32(dh), None, None, C, r.cu,
                                     output=(f32(r.qg), f32(r.A_qk), f32(do)))


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_output_bwd(p, C):
    """The output stage's backward kernel == the chunked backward of the same name."""
    from kda_explained.chunked.backward_inter import chunk_output_bwd as reference_bwd
    from kda_explained.fast.backward import chunk_output_bwd

    r = reference_stages(p, C)
    do = torch.randn(r.o.shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64).to(DEVICE)
    ref = reference_bwd(r.q, r.h, r.v_new, r.G, r.A_qk, r.scale, do, C, r.cu)
    ours = chunk_output_bwd(f32(r.q), f32(r.h), f32(r.v_new), f32(r.G), f32(r.A_qk), r.scale, f32(do), C, r.cu)
    for name, a, b in zip(("dq", "dh", "dv_new", "dG", "dA_qk"), ours, ref):
        assert a.dtype == torch.float32
        assert_close(a, b, F32, name)


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_passing_bwd(p, C):
    """The state stage's whole backward (recurrence + per-chunk kernel) == chunked.state_passing_bwd."""
    from kda_explained.chunked.backward_inter import state_passing_bwd as reference_bwd
    from kda_explained.fast.backward import state_passing_bwd

    r = reference_stages(p, C)
    rand = randn_like_f64(5)

    dh, dv_new, dS_final = rand(r.h), rand(r.v_new), rand(r.S)
    ref = reference_bwd(r.k, r.W, r.U, r.G, r.S0, r.h, r.v_new, dh, dv_new, dS_final, C, r.cu)
    ours = state_passing_bwd(f32(r.kg), f32(r.W), f32(r.G), f32(r.S0), f32(r.h), f32(r.v_new), f32(dh), f32(dv_new),
                             f32(dS_final), C, r.cu, H=r.k.shape[2])
    for name, a, b in zip(("dk", "dW", "dU", "dG", "dS0"), ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, F32, name)


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_wy_representation_bwd(p, C):
    """The WY factors' backward kernel == chunked.wy_representation_bwd."""
    from kda_explained.chunked.backward_inter import wy_representation_bwd as reference_bwd
    from kda_explained.fast.backward import wy_representation_bwd

    r = reference_stages(p, C)
    gen = torch.Generator().manual_seed(6)
    dW = torch.randn(r.W.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dU = torch.randn(r.U.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ref = reference_bwd(r.k, r.v, r.G, r.beta, r.M, dW, dU, C, r.cu)
    ours = wy_representation_bwd(f32(r.k), f32(r.v), f32(r.G), f32(r.beta), f32(r.M), f32(dW), f32(dU), C, r.cu)
    assert_each_close(("dk", "dv", "dG", "dbeta", "dM"), ours, ref)


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_state_wy_bwd(p, C):
    """The state stage's per-chunk backward and the WY backward in one kernel == the chunked
    state_passing_bwd (its dk, dW, dU) followed by wy_representation_bwd, terms summed; with
    ``output=``, plus the output stage's backward."""
    from kda_explained.chunked.backward_inter import chunk_output_bwd, state_passing_bwd
    from kda_explained.chunked.backward_inter import state_passing_bwd_recurrence, wy_representation_bwd
    from kda_explained.fast.backward import state_wy_bwd

    r = reference_stages(p, C)
    rand = randn_like_f64(7)

    dh, dv_new, dS_final = rand(r.h), rand(r.v_new), rand(r.S)
    dS_out, dv_tot, _ = state_passing_bwd_recurrence(r.kg, r.W, r.G, r.h, dh, dv_new, dS_final, C, r.cu)
    dk1, dW, dU, dG1, _ = state_passing_bwd(r.k, r.W, r.U, r.G, r.S0, r.h, r.v_new, dh, dv_new, dS_final, C, r.cu)
    dk2, dv, dG2, dbeta, dM = wy_representation_bwd(r.k, r.v, r.G, r.beta, r.M, dW, dU, C, r.cu)
    dG0 = rand(r.G)  # what earlier stages put into the accumulator
    args = (f32(r.k), f32(r.v), f32(r.G), f32(r.beta), f32(r.M), f32(r.h), f32(r.v_new), f32(dS_out), f32(dv_tot), C,
            r.cu)
    ours = state_wy_bwd(*args, dG_acc=f32(dG0).clone())
    assert ours[5] is None and ours[6] is None
    assert_each_close(("dk", "dv", "dG", "dbeta", "dM"), ours, (dk1 + dk2, dv, dG0 + dG1 + dG2, dbeta, dM))
    # with the output stage's backward too (its dq, dA_qk and dG terms)
    do = rand(r.o)
    dq3, _, _, dG3, dA3 = chunk_output_bwd(r.q, r.h, r.v_new, r.G, r.A_qk, r.scale, do, C, r.cu)
    ours = state_wy_bwd(*args, output=(f32(r.q), f32(do), r.scale))
    assert_each_close(("dk", "dv", "dG", "dbeta", "dM", "dq", "dA_qk"), ours,
                      (dk1 + dk2, dv, dG1 + dG2 + dG3, dbeta, dM, dq3, dA3))


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_ut_transform_bwd(p, C):
    """The UT transform's backward kernel == chunked.ut_transform_bwd."""
    from kda_explained.chunked.backward_intra import ut_transform_bwd as reference_bwd
    from kda_explained.fast.backward import ut_transform_bwd

    r = reference_stages(p, C)
    dM = torch.randn(r.M.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(DEVICE)
    assert_close(ut_transform_bwd(f32(r.M), f32(dM), C, r.cu), reference_bwd(r.M, dM, C, r.cu), F32, "dA_kk")


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_intra_chunk_matrices_bwd(p, C):
    """The intra-chunk matrices' backward kernel == chunked.intra_chunk_matrices_bwd."""
    from kda_explained.chunked.backward_intra import intra_chunk_matrices_bwd as reference_bwd
    from kda_explained.fast.backward import intra_chunk_matrices_bwd

    r = reference_stages(p, C)
    gen = torch.Generator().manual_seed(8)
    dA_kk = torch.randn(r.A_kk.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    dA_qk = torch.randn(r.A_qk.shape, generator=gen, dtype=torch.float64).to(DEVICE)
    ref = reference_bwd(r.q, r.k, r.G, r.beta, r.scale, dA_kk, dA_qk, C, r.cu)
    ours = intra_chunk_matrices_bwd(f32(r.q), f32(r.k), f32(r.G), f32(r.beta), r.scale, f32(dA_kk), f32(dA_qk), C,
                                    r.cu)
    assert_each_close(("dq", "dk", "dG", "dbeta"), ours, ref)


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_stage_chunk_local_cumsum_bwd(p, C):
    """The cumsum's backward kernel == chunked.chunk_local_cumsum_bwd."""
    from kda_explained.chunked.backward_intra import chunk_local_cumsum_bwd as reference_bwd
    from kda_explained.fast.backward import chunk_local_cumsum_bwd

    r = reference_stages(p, C)
    dG = torch.randn(r.G.shape, generator=torch.Generator().manual_seed(10), dtype=torch.float64).to(DEVICE)
    assert_close(chunk_local_cumsum_bwd(f32(dG), C, r.cu), reference_bwd(dG, C, r.cu), F32, "dg")


@pytest.mark.parametrize("kept", [False, True], ids=["recompute", "kept_factors"])
@pytest.mark.parametrize("p, C", AWKWARD)
def test_kda_backward_composition(p, C, kept, plan=None):
    """The Triton backward stages composed == the chunked staged backward (== autograd), float32;
    recomputing stages 2-4, or with ``A_qk`` and ``M`` kept by the forward (``factors``)."""
    from kda_explained.chunked.backward import kda_backward as reference_backward
    from kda_explained.fast.backward import kda_backward
    from kda_explained.fast.forward import chunk_kda_fwd

    args, kw = inputs(p)
    gen = torch.Generator().manual_seed(11)
    do = torch.randn(args[2].shape, generator=gen).to(DEVICE)
    N = len(p.spans)
    dS_final = torch.randn(N, p.shape[3], p.shape[4], p.shape[5], generator=gen).to(DEVICE)
    factors = None
    if kept:
        factors = chunk_kda_fwd(*args, scale=p.shape[4] ** -0.5, chunk_size=C, keep_for_backward=True,
                                plan=plan_for(DEVICE), **kw)[3]
    ours = kda_backward(*args, do, dS_final, chunk_size=C, factors=factors, plan=plan, **kw)
    ref = reference_backward(*(x.double() for x in args), do.double(), dS_final.double(), chunk_size=C,
                             initial_state=None if kw["initial_state"] is None else kw["initial_state"].double(),
                             cu_seqlens=kw["cu_seqlens"])
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), ours, ref):
        if b is None:
            assert a is None, name
            continue
        assert_close(a, b, F32, name)


@pytest.mark.parametrize("p, C", AWKWARD[1:3])
def test_kda_backward_composition_state_wy_unfused(p, C):
    """The composition with the state per-chunk and WY backward as two kernels (``state_wy_fused`` off)."""
    plan = plan_for(DEVICE)
    unfused = replace(plan, backward=replace(plan.backward, state_wy_fused=False))
    test_kda_backward_composition(p, C, kept=True, plan=unfused)


@pytest.mark.parametrize("p, C", AWKWARD[:3])
def test_kda_backward_out_dtype_and_kept_G(p, C):
    """``out_dtype``: dq, dk, dv written in bf16 by their last kernels (no GVA sum after) or left
    float32 (GVA); ``G`` kept by the forward: the same gradients as recomputing stage 1."""
    from kda_explained.fast.backward import kda_backward
    from kda_explained.fast.backward_intra import intra_chunk_matrices_bwd
    from kda_explained.fast.forward import chunk_kda_fwd

    args, kw = inputs(p)
    gen = torch.Generator().manual_seed(12)
    do = torch.randn(args[2].shape, generator=gen).to(DEVICE)
    ref = kda_backward(*args, do, None, chunk_size=C, **kw)
    A_qk, M, G = chunk_kda_fwd(*args, scale=p.shape[4] ** -0.5, chunk_size=C, keep_for_backward=True,
                               plan=plan_for(DEVICE), **kw)[3]
    ours = kda_backward(*args[:3], None, args[4], do, None, chunk_size=C, factors=(A_qk, M), G=G,
                        out_dtype=torch.bfloat16, **kw)
    gva = p.shape[3] != p.shape[2]
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta"), ours, ref):
        bf16 = name == "dv" or (name in ("dq", "dk") and not gva)
        assert a.dtype == (torch.bfloat16 if bf16 else torch.float32), name
        assert_close(a.float(), b, 1e-2 if bf16 else F32, name)
    if gva:
        with pytest.raises(ValueError, match="out_dtype"):
            z = torch.zeros(*args[0].shape[:2], p.shape[3], C, device=DEVICE)
            intra_chunk_matrices_bwd(args[0], args[1], G, args[4].float(), 1.0, z, z, C, kw["cu_seqlens"],
                                     out_dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="g: expected the gate"):
        kda_backward(*args[:3], None, args[4], do, None, chunk_size=C, **kw)


@pytest.mark.parametrize("C, one_pass", [(16, False), (64, False), (16, True), (32, True)],
                         ids=["16", "64", "16-one-pass", "32-one-pass"])
@pytest.mark.parametrize("gate", EXTREME_GATES)
def test_stage_chunk_local_factors_extreme_gates(gate, C, one_pass):
    (q, k, v, _, beta), kw = inputs(EXTREME_PROBLEM, torch.float64)
    cu, scale = kw["cu_seqlens"], EXTREME_PROBLEM.shape[4] ** -0.5
    g = extreme_gate(gate, beta.shape + (q.shape[-1],))
    G = chunked.chunk_local_cumsum(g, C, cu)
    A_kk, A_qk = chunked.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    if one_pass:  # the exact diagonal from G made in registers
        f = fast.chunk_local_factors_one_pass(f32(q), f32(k), f32(v), f32(g), f32(beta), scale, C, cu, store_akk=True)
    else:
        f = fast.chunk_local_factors(f32(q), f32(k), f32(v), f32(G), f32(beta), scale, C, cu, store_akk=True)
    assert_close(f.A_kk, A_kk, F32, "A_kk")
    assert_close(f.A_qk, A_qk, F32, "A_qk")
    M = chunked.ut_transform(A_kk, C, cu)
    W, U = chunked.wy_representation(k, v, G, beta, M, C, cu)
    assert_close(f.W, W, F32, "W")
    assert_close(f.U, U, F32, "U")


@pytest.mark.parametrize("gate", EXTREME_GATES)
def test_stage_intra_chunk_matrices_bwd_extreme_gates(gate):
    # the backward's exact form masks every exponent before the exp: no gate overflows it
    from kda_explained.chunked.backward_intra import intra_chunk_matrices_bwd as reference_bwd
    from kda_explained.fast.backward import intra_chunk_matrices_bwd

    (q, k, _, _, beta), kw = inputs(EXTREME_PROBLEM, torch.float64)
    cu, scale, C = kw["cu_seqlens"], EXTREME_PROBLEM.shape[4] ** -0.5, 32
    G = chunked.chunk_local_cumsum(extreme_gate(gate, beta.shape + (q.shape[-1],)), C, cu)
    gen = torch.Generator().manual_seed(9)
    dA_kk, dA_qk = (torch.randn(beta.shape + (C,), generator=gen, dtype=torch.float64).to(DEVICE) for _ in range(2))
    ref = reference_bwd(q, k, G, beta, scale, dA_kk, dA_qk, C, cu)
    ours = intra_chunk_matrices_bwd(f32(q), f32(k), f32(G), f32(beta), scale, f32(dA_kk), f32(dA_qk), C, cu)
    for name, a, b in zip(("dq", "dk", "dG", "dbeta"), ours, ref):
        assert torch.isfinite(a).all(), name
        assert_close(a, b, F32, name)


@pytest.mark.parametrize("gate", EXTREME_GATES)
def test_chunk_kda_extreme_gates(gate):
    (q, k, v, _, beta), kw = inputs(EXTREME_PROBLEM)
    g = extreme_gate(gate, beta.shape + (q.shape[-1],)).float()
    o, S = fast.chunk_kda(q, k, v, g, beta, **kw, output_final_state=True, chunk_size=32)
    o_ref, S_ref = reference(q, k, v, g, beta, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


def test_l2norm_matches_chunked():
    x = torch.randn(3, 5, 2, 20, dtype=torch.float64, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    x[0, 0, 0] = 0.0  # a zero row stays zero (eps under the root)
    assert_close(fast.l2norm(x.float()), chunked.l2norm(x), F32, "l2norm")


# ==============================================================================================
# The in-kernel options: the raw inputs of each, and what they mean in PyTorch
# ==============================================================================================

OPTIONS = (
    "softplus_gate",  # g = -exp(A_log) softplus(x + dt_bias), dt_bias [HV * K]
    "softplus_gate_2d_bias",  # dt_bias [HV, K], A_log given as [1, 1, HV, 1]
    "softplus_gate_no_bias",
    "lower_bound_gate",  # g = lower_bound sigmoid(exp(A_log) (x + dt_bias))
    "lower_bound_gate_no_A_log",
    "qk_l2norm",
    "beta_sigmoid",
    "neg_eigval",  # beta = 2 sigmoid(x)
    "state_v_first",  # states [V, K]
    "custom_scale",  # not K ** -0.5
    "all",  # softplus_gate_2d_bias + qk_l2norm + neg_eigval + state_v_first
)
GATES = {name for name in OPTIONS if name.startswith(("softplus", "lower_bound"))}


def option_inputs(option: str, p: Problem, dtype=torch.float32):
    """``(args, kwargs)`` for the fast layer with ``option`` switched on, the raw inputs drawn from ``p.seed``.

    ``option`` is one of :data:`OPTIONS`, or several joined by ``+``.
    """
    flags = set(option.split("+"))
    if "all" in flags:
        flags = {"softplus_gate_2d_bias", "qk_l2norm", "neg_eigval", "state_v_first"}
    (q, k, v, g, beta), kw = inputs(p, dtype)
    B, T, H, HV, K, V = p.shape
    gen = torch.Generator().manual_seed(p.seed % 2**31)

    def randn(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)

    def uniform(*shape):  # gate parameters stay float32, as a model keeps them
        return (2.0 * torch.rand(*shape, generator=gen, dtype=torch.float64) - 1.0).to(DEVICE, torch.float32)

    opts = {}
    gate = flags & GATES
    if gate:
        (gate,) = gate
        g = randn(B, T, HV, K, scale=2.0)  # the gate's raw input x
        opts.update(use_gate_in_kernel=True, A_log=uniform(HV), dt_bias=uniform(HV * K))
        if gate == "softplus_gate_2d_bias":
            opts.update(A_log=opts["A_log"].reshape(1, 1, HV, 1), dt_bias=opts["dt_bias"].reshape(HV, K))
        if gate == "softplus_gate_no_bias":
            opts["dt_bias"] = None
        if gate.startswith("lower_bound"):
            opts["lower_bound"] = -5.0
        if gate == "lower_bound_gate_no_A_log":
            opts["A_log"] = None
    if "qk_l2norm" in flags:
        q, k = randn(B, T, H, K, scale=2.0), randn(B, T, H, K, scale=3.0)
        opts["use_qk_l2norm_in_kernel"] = True
    if flags & {"beta_sigmoid", "neg_eigval"}:
        beta = randn(B, T, HV, scale=2.0)  # logits
        opts.update(use_beta_sigmoid_in_kernel=True, allow_neg_eigval="neg_eigval" in flags)
    if "custom_scale" in flags:
        opts["scale"] = 0.37
    if "state_v_first" in flags:
        opts["state_v_first"] = True
        if kw["initial_state"] is not None:
            kw["initial_state"] = kw["initial_state"].transpose(-1, -2).contiguous()  # [N, HV, V, K]
    return (q, k, v, g, beta), {**kw, **opts}


OPTION_PROBLEM = make_problem(T=40, H=1, HV=2, K=20, V=16, cu_seqlens=[0, 13, 13, 40], initial_state=True, seed=3)


@pytest.mark.parametrize("option", OPTIONS)
def test_chunk_kda_options(option):
    args, kw = option_inputs(option, OPTION_PROBLEM)
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=16)
    o_ref, S_ref = reference(*args, **kw)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


@pytest.mark.parametrize("option", OPTIONS)
def test_chunk_local_cumsum_gate_and_beta_options(option):
    # stage 1 applies the gate and the beta sigmoid: compare it alone with the gate references
    args, kw = option_inputs(option, OPTION_PROBLEM)
    _, _, _, g, beta = args
    C, cu = 16, kw["cu_seqlens"]
    G, beta_out = fast.chunk_local_cumsum(
        g, C, cu, beta=beta, use_gate_in_kernel=kw.get("use_gate_in_kernel", False), A_log=kw.get("A_log"),
        dt_bias=kw.get("dt_bias"), lower_bound=kw.get("lower_bound"),
        use_beta_sigmoid_in_kernel=kw.get("use_beta_sigmoid_in_kernel", False),
        allow_neg_eigval=kw.get("allow_neg_eigval", False))
    g_ref, beta_ref = f64(g), f64(beta)
    if kw.get("use_gate_in_kernel"):
        if kw.get("lower_bound") is not None:
            g_ref = chunked.lowerbound_gate(g_ref, f64(kw["A_log"]), f64(kw["dt_bias"]), kw["lower_bound"])
        else:
            g_ref = chunked.kda_gate(g_ref, f64(kw["A_log"]), f64(kw["dt_bias"]))
    if kw.get("use_beta_sigmoid_in_kernel"):
        beta_ref = (2.0 if kw["allow_neg_eigval"] else 1.0) * torch.sigmoid(beta_ref)
    assert_close(G, chunked.chunk_local_cumsum(g_ref, C, cu), F32, "G")
    assert_close(beta_out, beta_ref, F32, "beta")


# ==============================================================================================
# chunk_kda end to end
# ==============================================================================================


@pin(*AWKWARD)
@few
@given(p=problems, C=chunk_16)
def test_chunk_kda_matches_chunked(p, C):
    args, kw = inputs(p)
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=C)
    o_ref, S_ref = reference(*args, **kw, chunk_size=C)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


def test_chunk_kda_no_final_state_unless_asked():
    args, kw = inputs(make_problem(T=5, K=16, V=16))
    o, S = fast.chunk_kda(*args, **kw, chunk_size=16)
    assert S is None and o.shape == args[2].shape


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=list(LOW_DTYPES))
@pytest.mark.parametrize("p, C", [AWKWARD[1], AWKWARD[3],
                                  (make_problem(T=40, H=2, HV=4, K=32, V=16, gate="lowerbound", seed=5), 16)])
def test_chunk_kda_low_precision(dtype, p, C):
    # the reference sees the same rounded inputs; the bound covers the kernels and the rounding of o
    args, kw = inputs(p, LOW_DTYPES[dtype])
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=C)
    o_ref, S_ref = reference(*args, **kw, chunk_size=C)
    assert o.dtype == LOW_DTYPES[dtype] and S.dtype == torch.float32
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "final state")


LOW_OPTIONS = ("qk_l2norm", "softplus_gate_2d_bias+neg_eigval+state_v_first", "lower_bound_gate+beta_sigmoid")


def low_option_cases():
    for option in LOW_OPTIONS:
        for dtype in LOW_DTYPES:
            yield pytest.param(dtype, option, id=f"{dtype}-{option}")


@pytest.mark.parametrize("dtype, option", list(low_option_cases()))
def test_chunk_kda_low_precision_options(dtype, option):
    args, kw = option_inputs(option, OPTION_PROBLEM, LOW_DTYPES[dtype])
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=16)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "final state")


@pytest.mark.parametrize("state_v_first", [False, True], ids=["KV", "VK"])
@pytest.mark.parametrize("p", [AWKWARD[2][0], make_problem(B=2, T=35, H=1, HV=2, K=16, V=12, seed=7)],
                         ids=["packed", "batch"])
def test_chunk_kda_intermediate_states(p, state_v_first):
    C = 16
    r = reference_stages(p, C)
    (q, k, v, g, beta), kw = inputs(p)
    if state_v_first and kw["initial_state"] is not None:
        kw["initial_state"] = kw["initial_state"].transpose(-1, -2).contiguous()
    o, S, h = fast.chunk_kda(q, k, v, g, beta, **kw, output_final_state=True, chunk_size=C,
                             return_intermediate_states=True, state_v_first=state_v_first)
    if state_v_first:
        h, S = h.transpose(-1, -2), S.transpose(-1, -2)
    assert h.dtype == torch.float32
    assert_close(h, r.h, F32, "h")  # [NC, HV, K, V]: the chunked layer's chunk states
    assert_close(S, r.S, F32, "final state")
    assert_close(o, r.o, F32, "o")
    S0 = torch.zeros_like(S) if p.initial_state is None else torch.as_tensor(p.initial_state).float().to(DEVICE)
    for n, i in first_chunks(p, C):  # a sequence's first chunk sees the initial state exactly
        assert torch.equal(h[i], S0[n])


def test_offsets_tensor_reused_and_changed_in_place():
    # the fast layer keeps the host copy of a cu_seqlens tensor (no device read per call);
    # an in-place change must be seen (torch bumps the tensor's version counter)
    p = make_problem(T=40, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 17, 40], seed=21)
    (q, k, v, g, beta), kw = inputs(p)
    cu = kw["cu_seqlens"].clone()
    for first in (17, 17, 30):
        cu[1] = first  # the second call reuses the tensor unchanged, the third changes it in place
        o, S = fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu, output_final_state=True, chunk_size=16)
        o_ref, S_ref = reference(q, k, v, g, beta, cu_seqlens=torch.tensor([0, first, 40], device=DEVICE))
        assert_close(o, o_ref, F32, f"o, first sequence {first} tokens")
        assert_close(S, S_ref, F32, f"final state, first sequence {first} tokens")


@example(p=make_problem(T=40, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 0, 17, 17, 40, 40], initial_state=True))
@fewer
@given(p=kda_problems(T=(1, 40), H=(1, 2), group=(1, 2), K=st.sampled_from([16, 20]), V=st.sampled_from([12, 16]),
                      varlen=True, max_seqs=4))
def test_packed_batch_equals_separate_calls(p):
    C = 16
    args, kw = inputs(p)
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=C)
    S0 = torch.as_tensor(p.state0()).float().to(DEVICE)
    for n, (_, bos, eos) in enumerate(p.spans):
        if eos == bos:  # an empty sequence outputs nothing and passes its state through
            assert torch.equal(S[n], S0[n])
            continue
        o_n, S_n = fast.chunk_kda(*(x[:, bos:eos] for x in args), initial_state=S0[n : n + 1],
                                  output_final_state=True, chunk_size=C)
        assert_close(o[:, bos:eos], o_n, F32, f"o of sequence {n}")
        assert_close(S[n : n + 1], S_n, F32, f"final state of sequence {n}")


# ==============================================================================================
# fused_recurrent_kda (decoding) and the state pool
# ==============================================================================================

short_problems = kda_problems(B=(1, 3), T=(1, 12), H=(1, 2), group=(1, 2), K=st.sampled_from([16, 20, 32]),
                              V=st.sampled_from([12, 16, 32]), max_seqs=4)


@example(p=make_problem(T=1, K=16, V=32))
@example(p=make_problem(T=12, H=1, HV=2, K=20, V=12, cu_seqlens=[0, 0, 5, 5, 12], initial_state=True))
@example(p=make_problem(B=3, T=7, H=2, HV=4, K=32, V=20, initial_state=True, gate="lowerbound"))
@example(p=make_problem(T=9, H=1, HV=2, K=80, V=72, initial_state=True, gate="lowerbound"))  # K, V > one tile
@few
@given(p=short_problems)
def test_fused_recurrent_matches_chunked(p):
    args, kw = inputs(p)
    o, S = fast.fused_recurrent_kda(*args, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


RECURRENT_PROBLEM = make_problem(T=11, H=1, HV=2, K=20, V=12, cu_seqlens=[0, 4, 4, 11], initial_state=True, seed=4)


@pytest.mark.parametrize("option", OPTIONS)
def test_fused_recurrent_options(option):
    args, kw = option_inputs(option, RECURRENT_PROBLEM)
    o, S = fast.fused_recurrent_kda(*args, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=list(LOW_DTYPES))
@pytest.mark.parametrize("option", ["none", *LOW_OPTIONS])
def test_fused_recurrent_low_precision(dtype, option):
    # the recurrent kernel normalises q and k in float32 registers: no bf16 intermediate, no interpreter caveat
    if option == "none":
        args, kw = inputs(make_problem(B=2, T=9, H=2, HV=4, K=32, V=16, initial_state=True, seed=6), LOW_DTYPES[dtype])
    else:
        args, kw = option_inputs(option, RECURRENT_PROBLEM, LOW_DTYPES[dtype])
    o, S = fast.fused_recurrent_kda(*args, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert o.dtype == LOW_DTYPES[dtype]
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "final state")


def test_fused_recurrent_no_final_state_unless_asked():
    args, kw = inputs(make_problem(T=3, K=16, V=16, initial_state=True))
    S0 = kw["initial_state"].clone()
    o, S = fast.fused_recurrent_kda(*args, **kw)
    assert S is None
    assert torch.equal(kw["initial_state"], S0)  # not updated in place unless asked


@pytest.mark.parametrize("state_v_first", [False, True], ids=["KV", "VK"])
@pytest.mark.parametrize("slots", [[4, 0, 2], [4, 1, -1]], ids=["shuffled", "negative"])
def test_fused_recurrent_state_pool(slots, state_v_first):
    # a serving engine's pool [P, HV, K, V]: sequence n reads and writes slot slots[n] in place
    p = make_problem(T=8, H=1, HV=2, K=16, V=12, cu_seqlens=[0, 3, 3, 8], seed=8)  # a zero-length sequence too
    _, _, _, HV, K, V = p.shape
    P = 6
    args, kw = inputs(p)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randn(P, HV, K, V, generator=gen).to(DEVICE)  # [P, HV, K, V]
    if state_v_first:
        pool = pool.transpose(-1, -2).contiguous()  # [P, HV, V, K]
    before = pool.clone()
    idx = torch.tensor(slots, dtype=torch.int64, device=DEVICE)
    o, out = fast.fused_recurrent_kda(*args, initial_state=pool, cu_seqlens=kw["cu_seqlens"], ssm_state_indices=idx,
                                      state_v_first=state_v_first)
    assert out is pool  # the pool itself, updated in place
    touched = [s for s in slots if s >= 0]
    for s in range(P):
        if s not in touched:  # bit for bit; slot P - 1 is where a -1 read as a Python index would land
            assert torch.equal(pool[s], before[s]), f"slot {s} changed"
    S0 = before[[max(s, 0) for s in slots]]  # [N, HV, K, V] (or [V, K])
    o_ref, S_ref = reference(*args, initial_state=S0, cu_seqlens=kw["cu_seqlens"], state_v_first=state_v_first)
    for n, s in enumerate(slots):
        _, bos, eos = p.spans[n]
        if s < 0:  # a skipped sequence: its state is untouched (checked above), its outputs are zeros
            assert torch.all(o[:, bos:eos] == 0), f"o of skipped sequence {n}"
            continue
        assert_close(pool[s], S_ref[n], F32, f"slot {s} (sequence {n})")
        if eos > bos:
            assert_close(o[:, bos:eos], o_ref[:, bos:eos], F32, f"o of sequence {n}")


@pytest.mark.parametrize("optin_kb, stages_lowp, stages", [(227, 3, 2), (163, 2, 2), (99, 2, 1)],
                         ids=["H100", "A100", "L4"])
def test_plan_follows_the_gpus_shared_memory(monkeypatch, optin_kb, stages_lowp, stages):
    """plan_for reads the GPU's per-block shared memory: Hopper's plan where its deepest pipelines fit,
    shallower state passes where they would not (benchmarks/probe/shared_memory.py compiles every launch
    for sm_80 / sm_86 / sm_89 and checks each fits under these plans)."""
    from types import SimpleNamespace

    from kda_explained.fast import config

    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda index: SimpleNamespace(shared_memory_per_block_optin=optin_kb * 1024))
    plan = config.plan_for("cuda:0")
    assert (plan.state.stages_lowp, plan.state.stages) == (stages_lowp, stages)
    assert (plan is config.HOPPER) == (optin_kb == 227)


def test_decode_value_tile_spreads_few_sequences(monkeypatch):
    """On an H100-sized GPU (132 SMs): one sequence of 32 heads at 64 columns a program would leave half the
    SMs idle, so its tile narrows; eight sequences and a serving batch keep 64 columns."""
    from kda_explained.fast import state as fast_state
    from kda_explained.fast.config import DecodeConfig

    def decode_value_tile(n, V, device, config):  # the recurrent launcher's rule, on its config
        return fast_state.state_value_tile(n, V, device, config.min_programs_per_sm, widest=config.launch.BV)

    monkeypatch.setattr(fast_state, "sm_count", lambda device: 132)
    tiles = {N: decode_value_tile(N * 32, 128, "cuda", DecodeConfig()) for N in (1, 4, 8, 256)}
    assert tiles == {1: 16, 4: 32, 8: 64, 256: 64}
    assert decode_value_tile(32, 128, "cuda", DecodeConfig(min_programs_per_sm=0)) == 64
    assert decode_value_tile(32, 24, "cuda", DecodeConfig()) == 16  # never wider than V's tile


def test_fused_recurrent_narrow_value_tile_is_the_same_function():
    """A 16-column tile (what a few sequences get on a large GPU) against the default's 64 columns, at
    a V that is not a multiple of 16 and with a state pool read through slots."""
    from kda_explained.fast.config import DecodeConfig

    p = make_problem(T=4, H=1, HV=2, K=32, V=40, cu_seqlens=[0, 1, 4], initial_state=True, seed=3)
    args, kw = inputs(p)
    narrow = replace(plan_for(DEVICE), decode=DecodeConfig(min_programs_per_sm=1e9))  # always halve to 16
    o, S = fast.fused_recurrent_kda(*args, **kw, output_final_state=True)
    o16, S16 = fast.fused_recurrent_kda(*args, **kw, output_final_state=True, plan=narrow)
    assert torch.equal(o, o16) and torch.equal(S, S16)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o16, o_ref, F32, "o")
    assert_close(S16, S_ref, F32, "final state")


def test_fused_recurrent_inplace_final_state():
    args, kw = inputs(make_problem(B=2, T=5, H=1, HV=2, K=16, V=16, initial_state=True, seed=9))
    S0 = kw["initial_state"]
    before = S0.clone()
    o, S = fast.fused_recurrent_kda(*args, **kw, inplace_final_state=True)
    assert S is S0
    o_ref, S_ref = reference(*args, initial_state=before)
    assert_close(S0, S_ref, F32, "final state in place")
    assert_close(o, o_ref, F32, "o")


# ==============================================================================================
# Prefill with chunk_kda, then decode with fused_recurrent_kda == one prefill of T + n
# ==============================================================================================


def packed_index(lengths, starts):
    return torch.tensor([t for L, s in zip(lengths, starts) for t in range(s, s + L)], dtype=torch.int64)


@example(prefill=[17, 0, 33], steps=3, seed=0)  # a ragged chunk, an empty prompt, two chunks and a bit
@example(prefill=[1], steps=1, seed=1)
@fewer
@given(prefill=st.lists(st.integers(0, 40), min_size=1, max_size=3), steps=st.integers(1, 4),
       seed=st.integers(0, 2**16))
def test_prefill_then_decode_equals_one_prefill(prefill, steps, seed):
    N = len(prefill)
    total = [L + steps for L in prefill]
    cu_full = np.concatenate([[0], np.cumsum(total)])
    p = make_problem(T=int(cu_full[-1]), H=1, HV=2, K=16, V=12, cu_seqlens=cu_full.tolist(), initial_state=True,
                     seed=seed, gate="lowerbound" if seed % 2 else "mild")
    args, kw = inputs(p)
    starts = cu_full[:-1].tolist()
    # one prefill of T + n tokens
    o_full, S_full = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=16)
    # prefill of T tokens (a packed batch) ...
    o_dec = torch.empty_like(o_full)
    S = kw["initial_state"]
    if sum(prefill) > 0:
        pre = packed_index(prefill, starts).to(DEVICE)
        cu_pre = torch.tensor(np.concatenate([[0], np.cumsum(prefill)]), dtype=torch.int64, device=DEVICE)
        o_pre, S = fast.chunk_kda(*(x[:, pre] for x in args), initial_state=S, cu_seqlens=cu_pre,
                                  output_final_state=True, chunk_size=16)
        o_dec[:, pre] = o_pre
    # ... then one token per sequence per step: a batch of N rows of one token
    for s in range(steps):
        tok = torch.tensor([start + L + s for start, L in zip(starts, prefill)], dtype=torch.int64, device=DEVICE)
        o_s, S = fast.fused_recurrent_kda(*(x[0, tok][:, None] for x in args), initial_state=S,
                                          output_final_state=True)  # x: [N, 1, ...]
        o_dec[0, tok] = o_s[:, 0]
    assert S.shape == (N, *S_full.shape[1:])
    assert_close(o_dec, o_full, F32, "o")
    assert_close(S, S_full, F32, "final state")
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o_dec, o_ref, F32, "o against the float64 reference")
    assert_close(S, S_ref, F32, "final state against the float64 reference")


# ==============================================================================================
# fast.kda: one signature, dispatch by length
# ==============================================================================================


@pytest.mark.parametrize("p, path", [
    (make_problem(B=2, T=fast.RECURRENT_MAX_LEN, H=1, HV=2, K=16, V=16, initial_state=True), "recurrent"),
    (make_problem(T=fast.RECURRENT_MAX_LEN + 1, H=1, HV=2, K=16, V=16, initial_state=True), "chunk"),
    (make_problem(T=26, H=1, HV=2, K=20, V=12, cu_seqlens=[0, 10, 26]), "recurrent"),  # longest sequence 16
    (make_problem(T=26, H=1, HV=2, K=20, V=12, cu_seqlens=[0, 3, 3, 26], initial_state=True), "chunk"),
], ids=["short", "long", "short-packed", "long-packed"])
def test_kda_dispatch(p, path, monkeypatch):
    calls = []

    def spy(name):
        real = getattr(fast_api, name)

        def call(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)

        return call

    for name in ("fused_recurrent_kda", "chunk_kda"):
        monkeypatch.setattr(fast_api, name, spy(name))
    args, kw = inputs(p)
    o, S = fast.kda(*args, **kw, output_final_state=True)
    assert calls == ["fused_recurrent_kda" if path == "recurrent" else "chunk_kda"]
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, F32, "o")
    assert_close(S, S_ref, F32, "final state")


# ==============================================================================================
# Inference mode keeps no graph
# ==============================================================================================


@pytest.mark.parametrize("mode", ["inference_mode", "no_grad"])
@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda", "kda"])
def test_no_graph_without_grad(fn, mode):
    p = make_problem(T=20, H=1, HV=2, K=16, V=16, initial_state=True, seed=10)
    args, kw = inputs(p)
    leaves = [x.clone().requires_grad_(True) for x in args]
    S0 = kw["initial_state"].clone().requires_grad_(True)
    call = getattr(fast, fn)
    extra = {"chunk_size": 16} if fn == "chunk_kda" else {}
    with getattr(torch, mode)():
        o, S = call(*leaves, initial_state=S0, output_final_state=True, **extra)
    for out in (o, S):
        assert not out.requires_grad and out.grad_fn is None
    if mode == "inference_mode":
        assert o.is_inference()
    o_plain, S_plain = call(*args, initial_state=kw["initial_state"], output_final_state=True, **extra)
    assert torch.equal(o, o_plain) and torch.equal(S, S_plain)


# ==============================================================================================
# Strided inputs: the launchers see every tensor argument's memory as dense
# ==============================================================================================


def strided(x: torch.Tensor) -> torch.Tensor:
    """The values of ``x`` in a non-contiguous view (every last-axis step 2 apart)."""
    fill = torch.full_like(x, 7)
    return torch.stack([x, fill], dim=-1)[..., 0]


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda"])
@pytest.mark.parametrize("option", ["none", "softplus_gate", "lower_bound_gate+state_v_first"])
def test_strided_inputs_equal_contiguous_ones(fn, option):
    # q, k, v from a fused projection, a transposed state, gate parameters sliced from a bigger tensor
    p = make_problem(T=20, H=1, HV=2, K=16, V=12, cu_seqlens=[0, 7, 20], initial_state=True, seed=12)
    args, kw = inputs(p) if option == "none" else option_inputs(option, p)
    kw_strided = {n: strided(x) if isinstance(x, torch.Tensor) and n != "cu_seqlens" else x for n, x in kw.items()}
    assert not kw_strided["initial_state"].is_contiguous()
    extra = {"chunk_size": 16} if fn == "chunk_kda" else {}
    o, S = getattr(fast, fn)(*args, **kw, output_final_state=True, **extra)
    o_s, S_s = getattr(fast, fn)(*(strided(x) for x in args), **kw_strided, output_final_state=True, **extra)
    assert torch.equal(o_s, o), f"o: relative RMS error {rel_rms_error(o_s, o):.3e}"
    assert torch.equal(S_s, S), f"final state: relative RMS error {rel_rms_error(S_s, S):.3e}"


def test_strided_state_indices():
    p = make_problem(T=8, H=1, HV=2, K=16, V=12, cu_seqlens=[0, 3, 3, 8], seed=8)
    args, kw = inputs(p)
    pool = torch.randn(6, 2, 16, 12, generator=torch.Generator().manual_seed(0)).to(DEVICE)
    idx = torch.tensor([4, 0, 2], dtype=torch.int64, device=DEVICE)
    pool_s = pool.clone()
    o, _ = fast.fused_recurrent_kda(*args, initial_state=pool, cu_seqlens=kw["cu_seqlens"], ssm_state_indices=idx)
    o_s, _ = fast.fused_recurrent_kda(*args, initial_state=pool_s, cu_seqlens=kw["cu_seqlens"],
                                      ssm_state_indices=strided(idx))
    assert torch.equal(pool_s, pool)
    assert torch.equal(o_s, o)


# ==============================================================================================
# Gradients (the Triton backward, and the chunked-autograd cross-check) against float64 autograd
# ==============================================================================================


GRAD_PROBLEM = make_problem(T=30, H=1, HV=2, K=16, V=12, cu_seqlens=[0, 11, 11, 30], initial_state=True, seed=11)


@pytest.mark.parametrize("option", ["none", "softplus_gate", "softplus_gate_2d_bias", "lower_bound_gate", "all"])
def test_chunk_kda_gradients(option):
    """The Triton backward (with the options' own kernels where an option is on) == float64 autograd."""
    if option == "none":
        args, kw = inputs(GRAD_PROBLEM)
    else:
        args, kw = option_inputs(option, GRAD_PROBLEM)
    names = ["q", "k", "v", "g", "beta", "initial_state", "A_log", "dt_bias"]
    values = dict(zip(names[:5], args), initial_state=kw.pop("initial_state"), A_log=kw.pop("A_log", None),
                  dt_bias=kw.pop("dt_bias", None))
    names = [n for n in names if values[n] is not None]
    leaves = {n: values[n].detach().clone().requires_grad_(True) for n in names}
    leaves64 = {n: values[n].detach().double().requires_grad_(True) for n in names}
    gen = torch.Generator().manual_seed(1)
    B, T, H, HV, K, V = GRAD_PROBLEM.shape
    do = torch.randn(B, T, HV, V, generator=gen, dtype=torch.float64).to(DEVICE)
    S_shape = (GRAD_PROBLEM.N, HV, V, K) if kw.get("state_v_first") else (GRAD_PROBLEM.N, HV, K, V)
    dS = torch.randn(*S_shape, generator=gen, dtype=torch.float64).to(DEVICE)

    o, S = fast.chunk_kda(**leaves, **kw, output_final_state=True, chunk_size=16)
    assert o.grad_fn is not None
    torch.autograd.backward((o, S), (do.float(), dS.float()))
    o_ref, S_ref = reference(**leaves64, **kw)
    torch.autograd.backward((o_ref, S_ref), (do, dS))
    assert_close(o, o_ref, F32, "o")
    for n in names:
        assert leaves[n].grad is not None, f"d{n} is missing"
        assert_close(leaves[n].grad, leaves64[n].grad, GRAD_F32, f"d{n}")


@pytest.mark.parametrize("dtype", LOW_DTYPES, ids=list(LOW_DTYPES))
def test_chunk_kda_gradients_low_precision(dtype):
    """bf16 and fp16 inputs through the Triton backward: every gradient in its input's dtype (dq, dk,
    dv written in it by their last kernels), within 1e-2 of float64 autograd on the same values."""
    args, kw = inputs(GRAD_PROBLEM, LOW_DTYPES[dtype])
    names = ["q", "k", "v", "g", "beta", "initial_state"]
    values = dict(zip(names[:5], args), initial_state=kw.pop("initial_state"))
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in values.items()}
    leaves64 = {n: x.detach().double().requires_grad_(True) for n, x in values.items()}
    gen = torch.Generator().manual_seed(3)
    do = torch.randn(args[2].shape, generator=gen, dtype=torch.float64).to(DEVICE)
    o, S = fast.chunk_kda(**leaves, **kw, output_final_state=True, chunk_size=16)
    torch.autograd.backward((o, S), (do.to(o.dtype), torch.zeros_like(S)))
    o_ref, _ = reference(**leaves64, **kw)
    o_ref.backward(do)
    for n in names:
        assert leaves[n].grad.dtype == leaves[n].dtype, n
        assert_close(leaves[n].grad.double(), leaves64[n].grad, 1e-2, f"d{n}")


def test_chunk_kda_gradients_of_some_inputs_without_final_state():
    # only o is used (the final state's gradient is zero) and only v, g and the state require grad
    args, kw = inputs(GRAD_PROBLEM)
    q, k, v, g, beta = args
    v, g, S0 = (x.clone().requires_grad_(True) for x in (v, g, kw["initial_state"]))
    v64, g64, S064 = (x.detach().double().requires_grad_(True) for x in (v, g, S0))
    do = torch.randn(v.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(DEVICE)
    o, S = fast.chunk_kda(q, k, v, g, beta, initial_state=S0, cu_seqlens=kw["cu_seqlens"], chunk_size=16)
    assert S is None
    o.backward(do.float())
    o_ref, _ = reference(q, k, v64, g64, beta, initial_state=S064, cu_seqlens=kw["cu_seqlens"])
    o_ref.backward(do)
    assert q.grad is None and k.grad is None and beta.grad is None
    for name, x, x64 in (("v", v, v64), ("g", g, g64), ("initial_state", S0, S064)):
        assert_close(x.grad, x64.grad, GRAD_F32, f"d{name}")


# ==============================================================================================
# Clear errors
# ==============================================================================================


def small_inputs(dtype=torch.float32, B=1, T=3, H=1, HV=2, K=16, V=16, device=DEVICE):
    """A valid little call (3 tokens) to break one argument of."""
    return to_torch(make_problem(B=B, T=T, H=H, HV=HV, K=K, V=V, initial_state=True), dtype, device)


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda", "kda"])
@pytest.mark.parametrize("arg", ["q", "k", "v", "g", "beta", "initial_state"])
def test_numpy_input_is_a_type_error(fn, arg):
    (q, k, v, g, beta), kw = small_inputs()
    values = dict(q=q, k=k, v=v, g=g, beta=beta, initial_state=kw["initial_state"])
    values[arg] = values[arg].cpu().numpy()
    with pytest.raises(TypeError, match=rf"^{arg}: expected a torch.Tensor"):
        getattr(fast, fn)(*(values[n] for n in ("q", "k", "v", "g", "beta")), initial_state=values["initial_state"])


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda"])
def test_head_dim_above_256_is_a_value_error(fn):
    args, _ = small_inputs(K=272, V=16)
    with pytest.raises(ValueError, match=r"K, V <= 256, got K = 272"):
        getattr(fast, fn)(*args)
    args, _ = small_inputs(K=16, V=272)
    with pytest.raises(ValueError, match=r"K, V <= 256, got K = 16, V = 272"):
        getattr(fast, fn)(*args)


@pytest.mark.parametrize("chunk_size", [128, 8, 48])
def test_chunk_size_outside_16_32_64_is_a_value_error(chunk_size):
    args, _ = small_inputs()
    with pytest.raises(ValueError, match=r"^chunk_size: expected"):
        fast.chunk_kda(*args, chunk_size=chunk_size)


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda"])
def test_gate_parameter_errors(fn):
    call = getattr(fast, fn)
    args, _ = small_inputs(HV=2, K=16)
    with pytest.raises(ValueError, match=r"^A_log: expected a tensor of shape \[HV\]"):
        call(*args, use_gate_in_kernel=True)
    A_log = torch.zeros(2, device=DEVICE)
    for bad in (torch.zeros(16, device=DEVICE), torch.zeros(2, 17, device=DEVICE), torch.zeros(3, 16, device=DEVICE)):
        with pytest.raises(ValueError, match=r"^dt_bias: expected shape \[HV \* K\] = \[32\] or \[HV, K\] = \[2, 16\]"):
            call(*args, use_gate_in_kernel=True, A_log=A_log, dt_bias=bad)
    with pytest.raises(ValueError, match=r"^A_log: expected shape \[HV\] = \[2\]"):
        call(*args, use_gate_in_kernel=True, A_log=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"^lower_bound: expected a finite negative number"):
        call(*args, use_gate_in_kernel=True, lower_bound=1.0)


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda"])
def test_unknown_keyword_is_a_type_error(fn):
    args, _ = small_inputs()
    with pytest.raises(TypeError, match=r"unexpected keyword argument.*'use_magic'"):
        getattr(fast, fn)(*args, use_magic=True)


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda", "kda"])
@pytest.mark.parametrize("arg", ["q", "k", "v"])
def test_float64_input_is_a_type_error(fn, arg):
    (q, k, v, g, beta), _ = small_inputs()
    values = dict(q=q, k=k, v=v)
    values[arg] = values[arg].double()
    with pytest.raises(TypeError, match=rf"^{arg}: expected float32, bfloat16 or float16 .* got torch.float64"):
        getattr(fast, fn)(values["q"], values["k"], values["v"], g, beta)


@pytest.mark.parametrize("fn", ["chunk_kda", "fused_recurrent_kda", "kda"])
def test_cpu_tensors_without_the_interpreter_are_a_value_error(fn):
    """In a process whose kernels were defined without the interpreter (it is read at import)."""
    import subprocess
    import sys

    script = (f"import torch\nimport kda_explained.fast as fast\nq = torch.randn(1, 4, 1, 16)\n"
              f"try:\n    fast.{fn}(q, q, q, -q.abs(), torch.rand(1, 4, 1))\n"
              f"except ValueError as e:\n    print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert "ERROR: q: expected a CUDA tensor" in out.stdout and "got device cpu" in out.stdout, out.stderr[-2000:]


def test_state_pool_errors():
    (q, k, v, g, beta), _ = small_inputs(B=2)
    pool = torch.zeros(4, 2, 16, 16, device=DEVICE)
    with pytest.raises(ValueError, match=r"^ssm_state_indices: expected N = 2 entries, got 3"):
        fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,
                                 ssm_state_indices=torch.tensor([0, 1, 2], device=DEVICE))
    with pytest.raises(ValueError, match=r"^ssm_state_indices: expected slots < pool size 4, got 4"):
        fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,
                                 ssm_state_indices=torch.tensor([0, 4], device=DEVICE))
    with pytest.raises(ValueError, match=r"^initial_state: expected the state pool"):
        fast.fused_recurrent_kda(q, k, v, g, beta, ssm_state_indices=torch.tensor([0, 1], device=DEVICE))
    with pytest.raises(TypeError, match=r"^ssm_state_indices: expected a 1-D integer tensor"):
        fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool,
                                 ssm_state_indices=torch.tensor([0.0, 1.0], device=DEVICE))
    with pytest.raises(ValueError, match=r"^initial_state: expected a contiguous float32 state pool"):
        fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool.double(),
                                 ssm_state_indices=torch.tensor([0, 1], device=DEVICE))


def test_inplace_final_state_needs_a_float32_state():
    args, kw = small_inputs()
    with pytest.raises(ValueError, match=r"^initial_state: expected a contiguous float32 tensor to update in place"):
        fast.fused_recurrent_kda(*args, inplace_final_state=True)
    with pytest.raises(ValueError, match=r"^initial_state: expected a contiguous float32 tensor to update in place"):
        fast.fused_recurrent_kda(*args, initial_state=kw["initial_state"].double(), inplace_final_state=True)


@pytest.mark.parametrize("arg", ["q", "k", "v", "g", "beta"])
def test_fused_recurrent_with_grad_is_differentiable(arg):
    """As in flash-linear-attention, inputs that require grad are accepted; here the result is
    differentiable too (the same function through the chunk kernels)."""
    args, _ = small_inputs()
    values = dict(zip(["q", "k", "v", "g", "beta"], args))
    values[arg] = values[arg].clone().requires_grad_(True)
    o, _ = fast.fused_recurrent_kda(**values)
    o.sum().backward()
    assert values[arg].grad is not None and torch.isfinite(values[arg].grad).all()


@pytest.mark.parametrize("arg", ["initial_state", "A_log", "dt_bias"])
def test_fused_recurrent_with_grad_on_state_or_gate_is_differentiable(arg):
    args, kw = small_inputs()
    HV, K = args[3].shape[2], args[3].shape[3]
    extra = {"initial_state": kw["initial_state"], "A_log": torch.zeros(HV), "dt_bias": torch.zeros(HV * K)}
    extra[arg] = extra[arg].clone().requires_grad_(True)
    o, _ = fast.fused_recurrent_kda(*args, use_gate_in_kernel=True, **extra)
    o.sum().backward()
    assert extra[arg].grad is not None and torch.isfinite(extra[arg].grad).all()


def test_intermediate_states_with_grad_is_a_value_error():
    (q, k, v, g, beta), _ = small_inputs()
    with pytest.raises(ValueError, match=r"^return_intermediate_states: inference only"):
        fast.chunk_kda(q.requires_grad_(True), k, v, g, beta, return_intermediate_states=True, chunk_size=16)


def test_shape_errors_name_the_argument():
    (q, k, v, g, beta), kw = small_inputs()
    with pytest.raises(ValueError, match=r"^k: expected shape \[B, T, H, K\]"):
        fast.chunk_kda(q, k[..., :8], v, g, beta)
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[N, HV, K, V\]"):
        fast.chunk_kda(q, k, v, g, beta, initial_state=kw["initial_state"][:, :1])
    with pytest.raises(ValueError, match=r"^initial_state: expected shape \[N, HV, K, V\]"):
        fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=kw["initial_state"][:, :1])


def test_state_pass_loads_pipelined_or_prefetched():
    """Compiled for an H100 (``sm_90a``, on this CPU machine, by ``benchmarks/probe/loop_loads.py``):
    in the fused state + output kernel's chunk loop every load is an asynchronous copy issued by the
    software pipeliner, but the two the kernel issues one chunk ahead by hand (``G``'s chunk-end row,
    ``A_qk``), which are then the only plain loads left in the loop."""
    import inspect
    import re
    import subprocess
    import sys
    from pathlib import Path

    from kda_explained.fast import state as fast_state

    root = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(root / "benchmarks" / "probe" / "loop_loads.py"), "--shapes", "B8_H16"],
                         capture_output=True, text=True, env=env, cwd=root, timeout=600)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    i = next(i for i, line in enumerate(lines) if line.lstrip().startswith("_state_passing_kernel"))
    counts = re.search(r"async\s+(\d+)\s+SYNC\s+(\d+)", lines[i])
    assert counts and int(counts.group(1)) >= 3 and int(counts.group(2)) == 2, lines[i]
    helpers = []
    for fn in (fast_state.chunk_gate_end, fast_state._chunk_square):
        src, first = inspect.getsourcelines(fn.fn)
        helpers.append(range(first, first + len(src)))
    sync = [int(re.search(r"state\.py:(\d+)", line).group(1)) for line in lines[i + 1:i + 3]]
    assert all(any(n in r for r in helpers) for n in sync), (sync, helpers)
