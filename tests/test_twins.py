"""Every fast stage beside its chunked twin: the same name, the same signature, the same values.

As mamba's ``chunk_state`` / ``chunk_state_ref``: a Triton stage of :mod:`kda_explained.fast` and
the PyTorch stage of :mod:`kda_explained.chunked` of the same name take the same positional
arguments (the fast one may add keyword-only options: launch configs, output dtypes, layouts), and
one call with the same arguments gives the same result within the fast layer's float32 bound. The
fused kernels (stages 2-4 in one, 5 and 6 in one) have no single twin: ``test_fast.py`` checks
each against the composition of the chunked stages it fuses.
"""

from __future__ import annotations

import inspect

import pytest
import torch

from kda_explained import chunked, fast
from kda_explained.testing import TOLERANCES, rel_rms_error
from strategies import make_problem, to_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TWINS = ("chunk_local_cumsum", "state_passing", "chunk_output", "l2norm", "kda_gate", "lowerbound_gate")
CASES = [
    (make_problem(T=37, H=1, HV=2, K=16, V=20, initial_state=True, seed=1), None, 16),
    (make_problem(T=50, H=2, HV=2, K=32, V=16, cu_seqlens=[0, 3, 3, 50], initial_state=True, gate="lowerbound",
                  seed=2), None, 32),
    (make_problem(T=70, K=16, V=16, seed=3, gate="resets"), None, 64),
]


def positional(fn) -> list:
    return [p.name for p in inspect.signature(fn).parameters.values()
            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]


@pytest.mark.parametrize("name", TWINS)
def test_twins_share_name_and_signature(name):
    ours, ref = getattr(fast, name), getattr(chunked, name)
    assert positional(ours) == positional(ref), (positional(ours), positional(ref))


def stage_arguments(name, p, C):
    """The float64 arguments of stage ``name`` on problem ``p``, made by the chunked stages before it."""
    (q, k, v, g, beta), kw = to_torch(p, torch.float64, DEVICE)
    cu, S0, scale = kw["cu_seqlens"], kw["initial_state"], p.shape[4] ** -0.5
    G = chunked.chunk_local_cumsum(g, C, cu)
    A_kk, A_qk = chunked.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    M = chunked.ut_transform(A_kk, C, cu)
    W, U = chunked.wy_representation(k, v, G, beta, M, C, cu)
    qg, kg = chunked.decayed_operands(q, k, G, scale, C, cu)
    h, v_new, _ = chunked.state_passing(kg, W, U, G, S0, C, cu)
    HV = v.shape[2]
    A_log = torch.linspace(-1, 1, HV, dtype=torch.float64, device=DEVICE)
    dt_bias = torch.linspace(-0.5, 0.5, HV * q.shape[3], dtype=torch.float64, device=DEVICE)
    return {
        "chunk_local_cumsum": (g, C, cu),
        "state_passing": (kg, W, U, G, S0, C, cu),
        "chunk_output": (qg, h, v_new, A_qk, C, cu),
        "l2norm": (q,),
        "kda_gate": (3 * torch.randn_like(g), A_log, dt_bias),
        "lowerbound_gate": (3 * torch.randn_like(g), A_log, dt_bias, -3.0),
    }[name]


def float32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.float64 else x


@pytest.mark.parametrize("name", TWINS)
@pytest.mark.parametrize("case", range(len(CASES)))
def test_twins_compute_the_same(name, case):
    p, _, C = CASES[case]
    torch.manual_seed(case)
    args = stage_arguments(name, p, C)
    ref = getattr(chunked, name)(*args)
    ours = getattr(fast, name)(*(float32(a) for a in args))
    ref, ours = (x if isinstance(x, tuple) else (x,) for x in (ref, ours))
    if name == "chunk_local_cumsum":
        # each layer raises a reset to its own dtype's floor (numerics.gate_floor): G differs there by
        # design, the decays it stands for do not (exp is 0 below either floor)
        ref, ours = (tuple(torch.exp(x.double()) for x in xs) for xs in (ref, ours))
    assert len(ref) == len(ours)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert a.shape == b.shape, (name, i)
        assert rel_rms_error(a, b) < TOLERANCES["fast_f32_vs_f64"], (name, i)
