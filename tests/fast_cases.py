"""The fast layer's test cases and checks, shared by its test modules (and the GPU probes).

The float64 references the kernels are held to (:func:`reference`, :func:`reference_stages`),
the drawn and pinned problems, the gates at the edge of the tensor-core diagonal, and the one
way a result is compared (:func:`assert_close`, a relative RMS error against a bound of
:data:`kda_explained.testing.TOLERANCES`). The tests themselves are in ``test_fast*.py``.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
from hypothesis import settings
from hypothesis import strategies as st

from kda_explained import chunked
from kda_explained.testing import TOLERANCES, rel_rms_error
from strategies import Problem, kda_problems, make_problem, to_torch

F32 = TOLERANCES["fast_f32_vs_f64"]
LOW = TOLERANCES["fast_bf16_output"]
GRAD_F32 = 1e-4  # float32 inputs: both backwards (Triton kernels, chunked autograd) compute in float32
LOW_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

#: Examples per property: a handful in the ``ci`` profile (the interpreter is slow), more with ``dev``.
few = settings(max_examples=max(5, settings.default.max_examples // 8))
fewer = settings(max_examples=max(3, settings.default.max_examples // 16))


#: Drawn problems: up to three chunks of 16, GVA, packed batches with empty sequences, strong gates.
problems = kda_problems(B=(1, 2), T=(1, 48), H=(1, 2), group=(1, 2), K=st.sampled_from([16, 20, 32]),
                        V=st.sampled_from([12, 16, 32]), max_seqs=4)
chunk_16 = st.just(16)

# Awkward cases every chunk property sees first (DESIGN.md, *Tests*); chunk sizes 32 and 64 live here.
AWKWARD = (
    (make_problem(T=1, K=16, V=32), 16),  # a single token, K != V
    (make_problem(B=2, T=37, H=2, HV=4, K=20, V=12, initial_state=True), 16),  # GVA, ragged chunk, K, V not 2^n
    # packed: empty sequences first, in the middle and last; starts that are not multiples of C
    (make_problem(T=40, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 0, 17, 17, 40, 40], initial_state=True), 16),
    (make_problem(T=50, H=2, HV=2, K=32, V=20, cu_seqlens=[0, 3, 36, 50], initial_state=True, gate="lowerbound"), 32),
    (make_problem(T=70, K=32, V=32, initial_state=True, gate="lowerbound", seed=1), 64),  # two chunks, ragged
    (make_problem(T=40, H=1, HV=2, K=80, V=72, initial_state=True, gate="lowerbound", seed=2), 32),  # K, V > one tile
)


def inputs(p: Problem, dtype=torch.float32):
    """``(q, k, v, g, beta)`` and ``{initial_state, cu_seqlens}`` of ``p`` on :data:`DEVICE` (states float32)."""
    return to_torch(p, dtype, DEVICE)


def f64(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.double()


def f32(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    return None if x is None else x.float()


def reference(q, k, v, g, beta, *, chunk_size: int = 16, scale=None, initial_state=None, cu_seqlens=None,
              use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, A_log=None, dt_bias=None, lower_bound=None,
              use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False, **_):
    """What ``chunk_kda(...)`` computes, in float64 PyTorch: the options by their references, then ``chunked.kda``.

    Takes the fast layer's keyword arguments; returns ``(o, final_state)`` in float64
    (the final state ``[N, HV, V, K]`` with ``state_v_first``, like the fast layer).
    Differentiable in every input (``.double()`` keeps the graph).
    """
    q, k, v, g, beta, S0 = (f64(x) for x in (q, k, v, g, beta, initial_state))
    if use_qk_l2norm_in_kernel:
        q, k = chunked.l2norm(q), chunked.l2norm(k)
    if use_gate_in_kernel:
        if lower_bound is not None:
            g = chunked.lowerbound_gate(g, f64(A_log), f64(dt_bias), lower_bound=lower_bound)
        else:
            g = chunked.kda_gate(g, f64(A_log), f64(dt_bias))
    if use_beta_sigmoid_in_kernel:
        beta = (2.0 if allow_neg_eigval else 1.0) * torch.sigmoid(beta)
    if state_v_first and S0 is not None:
        S0 = S0.transpose(-1, -2)
    o, S = chunked.kda(q, k, v, g, beta, scale=scale, initial_state=S0, output_final_state=True,
                       cu_seqlens=cu_seqlens, chunk_size=chunk_size)
    return o, (S.transpose(-1, -2) if state_v_first else S)


def assert_close(a: torch.Tensor, ref: torch.Tensor, bound: float, what: str = "") -> None:
    assert a.shape == ref.shape, f"{what}: shape {tuple(a.shape)} != reference {tuple(ref.shape)}"
    err = rel_rms_error(a, ref)
    assert err <= bound, f"{what}: relative RMS error {err:.3e} > {bound:.0e}"


def randn_like_f64(seed: int):
    """A function drawing float64 standard normals shaped like its argument (gradients to feed a
    backward stage), from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    return lambda x: torch.randn(x.shape, generator=gen, dtype=torch.float64).to(DEVICE)


def assert_each_close(names, ours, refs, bound: float = F32) -> None:
    """``assert_close`` on each pair of ``ours`` and ``refs``, named by ``names`` (extra entries ignored)."""
    for name, a, b in zip(names, ours, refs):
        assert_close(a, b, bound, name)


def first_chunks(p: Problem, C: int):
    """``[(n, i)]``: the index ``i`` in ``h [NC, ...]`` of the first chunk of each non-empty sequence ``n``."""
    out, i = [], 0
    for n, (_, bos, eos) in enumerate(p.spans):
        if eos > bos:
            out.append((n, i))
        i += -(-(eos - bos) // C)
    return out


# ==============================================================================================
# Each stage kernel against the chunked stage of the same name and signature
# ==============================================================================================


def reference_stages(p: Problem, C: int) -> SimpleNamespace:
    """The six chunked stages in float64 on ``p``: the inputs and outputs the stage tests feed and compare."""
    (q, k, v, g, beta), kw = inputs(p, torch.float64)
    cu, S0 = kw["cu_seqlens"], kw["initial_state"]
    scale = p.shape[4] ** -0.5
    G = chunked.chunk_local_cumsum(g, C, cu)
    A_kk, A_qk = chunked.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    M = chunked.ut_transform(A_kk, C, cu)
    W, U = chunked.wy_representation(k, v, G, beta, M, C, cu)
    qg, kg = chunked.decayed_operands(q, k, G, scale, C, cu)  # what fast's stages 2-4 hand on
    h, v_new, S = chunked.state_passing(kg, W, U, G, S0, C, cu)
    o = chunked.chunk_output(qg, h, v_new, A_qk, C, cu)
    return SimpleNamespace(q=q, k=k, v=v, g=g, beta=beta, cu=cu, S0=S0, scale=scale, G=G, A_kk=A_kk, A_qk=A_qk,
                           M=M, W=W, U=U, h=h, v_new=v_new, S=S, o=o, qg=qg, kg=kg)


#: Gates at and past the strength the tensor-core diagonal of ``chunk_local_factors`` takes: a
#: diagonal block whose decay span from its first token exceeds ``fast.config.SAFE_SPAN`` (80)
#: is redone exactly, column by column. ``lower_bound = -5`` stays inside it (15 steps x 5 = 75).
EXTREME_GATES = ("at_limit", "past_limit", "mixed_channels", "cliff", "uniform_strong")


def extreme_gate(kind: str, shape, seed: int = 0) -> torch.Tensor:
    """A log decay ``g [B, T, HV, K]`` (float64, on :data:`DEVICE`) of the named strength."""
    gen = torch.Generator().manual_seed(seed)
    B, T, HV, K = shape
    if kind == "at_limit":
        g = torch.full(shape, -5.0, dtype=torch.float64)  # span 75 (lower_bound = -5): the tensor-core diagonal
    elif kind == "past_limit":
        g = torch.full(shape, -5.5, dtype=torch.float64)  # span 82.5: every diagonal block exact
    elif kind == "mixed_channels":
        g = torch.zeros(shape, dtype=torch.float64)
        g[..., 1::2] = -20.0  # half the channels keep everything, half forget at once
    elif kind == "cliff":
        g = -0.1 * torch.rand(shape, generator=gen, dtype=torch.float64)
        g[:, 5::16] = -60.0  # one token per sub-chunk wipes the past
    else:
        g = -12.0 * torch.rand(shape, generator=gen, dtype=torch.float64)
    return g.to(DEVICE)


EXTREME_PROBLEM = make_problem(T=40, H=1, HV=2, K=80, V=16, cu_seqlens=[0, 19, 40], initial_state=True, seed=13)
