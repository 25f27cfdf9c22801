"""General DPLR in the chunked layer (``chunked.dplr``) and the cost model of ``chunked.flops``.

- ``chunked.dplr`` equals ``naive.dplr`` (bounds of ``DESIGN.md``: float64 1e-10, float32 1e-5)
  over sizes, chunk sizes, packed batches and initial states, for a, b near KDA's and generic;
- with ``a = beta k``, ``b = k exp(g)`` and the written key ``beta k`` it equals ``chunked.kda``;
- the cost model counts what the stages really multiply (``torch.utils.flop_counter``), KDA
  costs less than DPLR, and the counts scale with the chunk size as the formulas say.
"""

from __future__ import annotations

import doctest
import importlib

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from kda_explained import chunked, naive
from kda_explained.chunked import flops, stages
from kda_explained.chunked.flops import chunk_costs, compare_costs
from kda_explained.testing import TOLERANCES, rel_rms_error
from strategies import Problem, kda_problems, make_problem

dplr_module = importlib.import_module("kda_explained.chunked.dplr")  # the module; chunked.dplr is the function

#: How a and b are drawn: ``"kda_like"``: KDA's ``a = beta k``, ``b = k exp(g)`` plus a little noise;
#: ``"generic"``: independent directions, norms in ``[0, 1]`` (eigenvalues of ``I - a b^T`` in ``[0, 2]``).
AB_KINDS = ("kda_like", "generic")
DTYPES = {torch.float64: TOLERANCES["chunked_f64_vs_naive"], torch.float32: TOLERANCES["chunked_f32_vs_naive"]}


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """These tensors are tiny: a thread pool only adds overhead (tens of times over on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def dplr_factors(p: Problem, kind: str, seed: int):
    """``a, b: [B, T, HV, K]`` for the problem ``p``."""
    rng = np.random.default_rng(seed)
    B, T, H, HV, K, V = p.shape
    k = np.repeat(p.k, HV // H, axis=2)  # [B, T, HV, K]: the key each value head reads
    noise = lambda: rng.standard_normal((B, T, HV, K)) / np.sqrt(K)  # noqa: E731
    if kind == "kda_like":
        return p.beta[..., None] * k + 0.1 * noise(), k * np.exp(p.g) + 0.1 * noise()
    unit = lambda: naive.l2norm(noise()) * rng.uniform(0, 1, (B, T, HV, 1))  # noqa: E731
    return unit(), unit()


def torch_args(p: Problem, a, b, dtype):
    """``(q, k, v, a, b, g)`` and the keyword arguments of ``dplr`` as tensors of ``dtype``."""
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = tuple(torch.as_tensor(x).to(dtype) for x in (p.q, p.k, p.v, a, b, p.g))
    kwargs = {
        "initial_state": None if p.initial_state is None else torch.as_tensor(p.initial_state).to(state_dtype),
        "cu_seqlens": None if p.cu_seqlens is None else torch.as_tensor(p.cu_seqlens, dtype=torch.int64),
    }
    return args, kwargs


# --- chunked.dplr == naive.dplr ---------------------------------------------------------------


# Awkward cases the property sees first (DESIGN.md, *Tests*).
T1 = make_problem(T=1, K=3, V=5)  # a single token, K != V
ODD_GVA = make_problem(B=2, T=37, H=2, HV=6, K=3, V=5, initial_state=True)  # GVA, T not a multiple of C
PACKED = make_problem(T=40, H=1, HV=2, K=5, V=3, cu_seqlens=[0, 0, 17, 17, 40], initial_state=True)  # empty sequences


@example(p=T1, kind="generic", seed=0, chunk_size=16, dtype=torch.float64)
@example(p=ODD_GVA, kind="kda_like", seed=1, chunk_size=16, dtype=torch.float32)
@example(p=PACKED, kind="generic", seed=2, chunk_size=16, dtype=torch.float64)
@example(p=PACKED, kind="kda_like", seed=3, chunk_size=32, dtype=torch.float32)
# one 1 x 1 state through 97 tokens of lower-bound gates at C = 128: float32 exponents of a G near
# -300 were off by 1e-5 until they were formed from the float64 G
@example(p=make_problem(T=97, K=1, V=1, seed=252, gate="lowerbound"), kind="kda_like", seed=0, chunk_size=128,
         dtype=torch.float32)
@given(
    p=kda_problems(T=(1, 100), K=(1, 20), V=(1, 12)),
    kind=st.sampled_from(AB_KINDS),
    seed=st.integers(0, 2**32 - 1),
    chunk_size=st.sampled_from(chunked.CHUNK_SIZES),
    dtype=st.sampled_from(list(DTYPES)),
)
def test_chunked_dplr_equals_naive(p, kind, seed, chunk_size, dtype):
    a, b = dplr_factors(p, kind, seed)
    o_ref, S_ref = naive.dplr(p.q, p.k, p.v, a, b, p.g, output_final_state=True, **p.kwargs())
    args, kwargs = torch_args(p, a, b, dtype)
    o, S = chunked.dplr(*args, output_final_state=True, chunk_size=chunk_size, **kwargs)
    assert o.dtype == dtype and o.shape == o_ref.shape
    assert rel_rms_error(o, o_ref) <= DTYPES[dtype]
    assert rel_rms_error(S, S_ref) <= DTYPES[dtype]


@pytest.mark.parametrize("chunk_size", [16, 128])
def test_strong_gates_stay_finite(chunk_size):
    """Every token decays by exp(-5) to exp(-10): cumulative log decay to about -960 in a chunk of 128."""
    p = make_problem(T=200, HV=2, K=8, V=4, gate="lowerbound", initial_state=True)
    p = p.replace(g=p.g - 5.0)  # g in (-10, -5)
    a, b = dplr_factors(p, "kda_like", 0)
    o_ref, S_ref = naive.dplr(p.q, p.k, p.v, a, b, p.g, output_final_state=True, **p.kwargs())
    for dtype, bound in DTYPES.items():
        args, kwargs = torch_args(p, a, b, dtype)
        o, S = chunked.dplr(*args, output_final_state=True, chunk_size=chunk_size, **kwargs)
        assert rel_rms_error(o, o_ref) <= bound and rel_rms_error(S, S_ref) <= bound


# --- KDA is DPLR with a = beta k, b = k exp(g), written key beta k ---------------------------


@given(p=kda_problems(T=(1, 80), group=1, K=(1, 12), V=(1, 8)), chunk_size=st.sampled_from(chunked.CHUNK_SIZES))
def test_chunked_dplr_with_kda_factors_is_chunked_kda(p, chunk_size):
    q, k, v, g, beta = (torch.as_tensor(x) for x in p.args())  # float64
    _, kwargs = torch_args(p, p.k, p.k, torch.float64)
    beta_k = beta[..., None] * k  # [B, T, H, K] with H == HV
    o_kda, S_kda = chunked.kda(q, k, v, g, beta, output_final_state=True, chunk_size=chunk_size, **kwargs)
    o, S = chunked.dplr(q, beta_k, v, beta_k, k * torch.exp(g), g, output_final_state=True,
                        chunk_size=chunk_size, **kwargs)
    assert rel_rms_error(o, o_kda) <= TOLERANCES["chunked_f64_vs_naive"]
    assert rel_rms_error(S, S_kda) <= TOLERANCES["chunked_f64_vs_naive"]


def test_dplr_rejects_a_that_does_not_match_g():
    p = make_problem(T=4, K=3, V=2)
    (q, k, v, a, b, g), _ = torch_args(p, p.k, p.k, torch.float64)
    with pytest.raises(ValueError, match=r"^a: expected shape \[B, T, HV, K\] = \[1, 4, 1, 3\] like g"):
        chunked.dplr(q, k, v, a[..., :2], b, g)
    with pytest.raises(TypeError, match="^b: expected a torch.Tensor"):
        chunked.dplr(q, k, v, a, b.numpy(), g)


# --- the cost model -----------------------------------------------------------------------------


def matmul_flops(fn, *args) -> int:
    """Matrix-product FLOPs that ``fn(*args)`` really performs."""
    with FlopCounterMode(display=False) as counter:
        fn(*args)
    return counter.get_total_flops()


@pytest.mark.parametrize("C, K, V", [(16, 8, 4), (64, 16, 32)])
def test_cost_model_counts_what_the_stages_multiply(C, K, V):
    """One chunk of one head through each stage; the model's count, less the diagonal tiles
    (an elementwise ``K``-contraction in PyTorch, not a matrix product), is what torch counts."""
    p = make_problem(T=C, K=K, V=V)
    (q, k, v, a, b, g), _ = torch_args(p, p.k, p.k, torch.float64)
    beta = torch.as_tensor(p.beta)
    s = 0.5
    G = stages.chunk_local_cumsum(g, C)
    BC = min(stages.SUB_CHUNK, C)
    diag = lambda n_mat: n_mat * (C // BC) * 2 * BC * BC * K  # noqa: E731

    kda = chunk_costs("kda", C, K, V, BC)
    A_kk, A_qk = stages.intra_chunk_matrices(q, k, G, beta, s, C)
    M = stages.ut_transform(A_kk, C)
    W, U = stages.wy_representation(k, v, G, beta, M, C)
    qg, kg = stages.decayed_operands(q, k, G, s, C)
    h, v_new, _ = stages.state_passing(kg, W, U, G, None, C)
    assert matmul_flops(stages.intra_chunk_matrices, q, k, G, beta, s, C) == kda.intra - diag(2)
    assert matmul_flops(stages.wy_representation, k, v, G, beta, M, C) == kda.wy
    assert matmul_flops(stages.state_passing, kg, W, U, G, None, C) == kda.state
    assert matmul_flops(stages.chunk_output, qg, h, v_new, A_qk, C) == kda.output

    dp = chunk_costs("dplr", C, K, V, BC)
    A_ba, A_bk, A_qa, A_qk = dplr_module.dplr_intra_chunk_matrices(q, k, a, b, G, s, C)
    M = stages.ut_transform(A_ba, C)
    W, U = dplr_module.dplr_wy_representation(b, v, G, M, A_bk, C)
    h, x, _ = dplr_module.dplr_state_passing(k, v, a, W, U, G, None, C)
    assert matmul_flops(dplr_module.dplr_intra_chunk_matrices, q, k, a, b, G, s, C) == dp.intra - diag(4)
    assert matmul_flops(dplr_module.dplr_wy_representation, b, v, G, M, A_bk, C) == dp.wy
    assert matmul_flops(dplr_module.dplr_state_passing, k, v, a, W, U, G, None, C) == dp.state
    assert matmul_flops(dplr_module.dplr_chunk_output, q, h, x, v, G, A_qa, A_qk, s, C) == dp.output


@pytest.mark.parametrize("C", [16, 32, 64, 128])
@pytest.mark.parametrize("K, V", [(64, 64), (128, 128), (128, 256), (8, 4)])
def test_kda_costs_less_than_dplr(C, K, V):
    kda, dp = chunk_costs("kda", C, K, V), chunk_costs("dplr", C, K, V)
    assert (kda.secondary_matrices, dp.secondary_matrices) == (2, 4)
    assert dp.intra == 2 * kda.intra and dp.diag_exps == 2 * kda.diag_exps  # twice the matrices
    assert dp.inverse == kda.inverse  # one triangular inverse each
    assert kda.wy < dp.wy and kda.state < dp.state and kda.output < dp.output  # one product more each
    assert 1 < compare_costs(C, K, V) == dp.total / kda.total < 2


@pytest.mark.parametrize("algorithm", flops.ALGORITHMS)
def test_costs_scale_with_the_chunk_size(algorithm):
    K, V = 128, 64
    for C in (16, 32, 64):
        one, two = chunk_costs(algorithm, C, K, V), chunk_costs(algorithm, 2 * C, K, V)
        # per chunk: the [K, V] state products grow with C, the [C, C] ones with C^2, the inverse with C^3
        assert two.state == 2 * one.state
        assert two.inverse == ((2 * C) ** 3 - 2 * C) // 3 and one.inverse == (C**3 - C) // 3
        n_state = 2 if algorithm == "kda" else 3  # [C, K] x [K, V] products in the state stage
        assert one.output - 2 * C * K * V == (one.wy - 2 * C * C * K) == (n_state - 1) * 2 * C * C * V
        assert two.wy == 4 * one.wy
        # without secondary chunking (BC = C) an intra matrix is a plain C x C x K product ...
        plain = chunk_costs(algorithm, C, K, V, sub_chunk=C)
        assert plain.intra == plain.secondary_matrices * 2 * C * C * K
        # ... and with a fixed BC, C (C + BC) K: the upper blocks are skipped
        assert one.intra == one.secondary_matrices * C * (C + one.sub_chunk) * K
        assert one.diag_exps == one.secondary_matrices * C * one.sub_chunk * K
    # so per token, the intra-chunk and state work is what grows with C
    per_token = [chunk_costs(algorithm, C, K, V).total / C for C in (16, 32, 64, 128)]
    assert per_token == sorted(per_token)


def test_cost_model_rejects_bad_arguments():
    with pytest.raises(ValueError, match="^algorithm: expected one of"):
        chunk_costs("gdn")
    with pytest.raises(ValueError, match="^chunk_size: expected a power of two, got 48"):
        chunk_costs("kda", 48)
    with pytest.raises(ValueError, match="^sub_chunk: expected a divisor of chunk_size = 64, got 24"):
        chunk_costs("kda", 64, sub_chunk=24)


@pytest.mark.parametrize("module", [flops, dplr_module], ids=["flops", "dplr"])
def test_doctests(module):
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
