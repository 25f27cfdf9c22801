"""General DPLR on the Triton kernels (``kda_explained.fast.dplr``) beside its chunked twins.

- each fast stage has the name and the positional arguments of its chunked twin, and one call
  with the same (float32) arguments gives the float64 twin's result within the fast layer's
  float32 bound;
- ``fast.dplr.dplr`` has ``chunked.dplr``'s signature and equals it (float64) on plain and
  packed batches, GVA, initial states, every chunk size, head dims that are not powers of two
  and strong decays (``g`` down to -20 per token), with float32 and bf16 inputs;
- with KDA's factors it is KDA;
- it refuses what it cannot do (gradients, float64, wide heads, other chunk sizes) by name.

Sizes are tiny: the kernels run under the Triton interpreter on the CPU. A test marked ``gpu``
checks the benchmark's shapes on a GPU.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect

import numpy as np
import pytest
import torch

from kda_explained import chunked, fast
from kda_explained.chunked import stages
from kda_explained.fast import dplr as fast_dplr
from kda_explained.testing import TOLERANCES, rel_rms_error
from strategies import Problem, make_problem

chunked_dplr = importlib.import_module("kda_explained.chunked.dplr")  # the module; chunked.dplr is the function
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
F32 = TOLERANCES["fast_f32_vs_f64"]
BF16 = TOLERANCES["fast_bf16_output"]

#: Each fast stage and its chunked twin (stage 1, ``chunk_local_cumsum``, is checked in test_twins.py).
TWINS = {
    "dplr_intra_chunk_matrices": chunked_dplr.dplr_intra_chunk_matrices,
    "ut_transform": stages.ut_transform,
    "dplr_wy_representation": chunked_dplr.dplr_wy_representation,
    "dplr_state_passing": chunked_dplr.dplr_state_passing,
    "dplr_chunk_output": chunked_dplr.dplr_chunk_output,
}


def strong(p: Problem, seed: int) -> Problem:
    """``p`` with about half of its log decays drawn from ``[-20, 0]``: cumulative decays to -1280 in a chunk."""
    rng = np.random.default_rng(seed)
    hard = rng.random(p.g.shape) < 0.5
    return p.replace(g=np.where(hard, -20.0 * rng.random(p.g.shape), p.g))


#: (problem, chunk size): GVA with an initial state; a packed batch with an empty sequence and
#: lower-bound gates; one sequence over several 64-token chunks with strong decays and K, V that
#: are not powers of two.
CASES = [
    (make_problem(T=37, H=1, HV=2, K=16, V=16, initial_state=True, seed=1), 16),
    (make_problem(T=50, H=2, HV=4, K=32, V=16, cu_seqlens=[0, 3, 3, 50], initial_state=True, gate="lowerbound",
                  seed=2), 32),
    (strong(make_problem(T=70, K=20, V=12, initial_state=True, seed=3), 3), 64),
]


def factors(p: Problem, seed: int):
    """``a, b: [B, T, HV, K]``: near KDA's ``a = beta k``, ``b = k exp(g)``, plus independent noise."""
    rng = np.random.default_rng(seed)
    B, T, H, HV, K, V = p.shape
    k = np.repeat(p.k, HV // H, axis=2)
    noise = lambda: 0.3 * rng.standard_normal((B, T, HV, K)) / np.sqrt(K)  # noqa: E731
    return p.beta[..., None] * k + noise(), k * np.exp(p.g) + noise()


def arguments(p: Problem, dtype, seed: int = 0):
    """``(q, k, v, a, b, g)`` as tensors of ``dtype`` (g float32 at least) and ``dplr``'s keyword arguments."""
    a, b = factors(p, seed)
    xs = tuple(torch.as_tensor(x).to(device=DEVICE, dtype=dtype) for x in (p.q, p.k, p.v, a, b))
    g = torch.as_tensor(p.g).to(device=DEVICE, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    kw = {
        "initial_state": None if p.initial_state is None
        else torch.as_tensor(p.initial_state).to(device=DEVICE, dtype=state_dtype),
        "cu_seqlens": None if p.cu_seqlens is None else torch.as_tensor(p.cu_seqlens, device=DEVICE),
    }
    return xs + (g,), kw


def positional(fn) -> list:
    return [x.name for x in inspect.signature(fn).parameters.values()
            if x.kind in (x.POSITIONAL_ONLY, x.POSITIONAL_OR_KEYWORD)]


# --- stage by stage ----------------------------------------------------------------------------


@pytest.mark.parametrize("name", TWINS)
def test_stages_share_name_and_positional_signature(name):
    assert positional(getattr(fast_dplr, name)) == positional(TWINS[name])
    extra = [x for x in inspect.signature(getattr(fast_dplr, name)).parameters.values()
             if x.name not in positional(TWINS[name])]
    assert all(x.kind == x.KEYWORD_ONLY for x in extra), extra


def test_dplr_has_the_chunked_signature():
    assert inspect.signature(fast_dplr.dplr) == inspect.signature(chunked_dplr.dplr)


def stage_arguments(p: Problem, C: int) -> dict:
    """The float64 arguments of each stage on problem ``p``, made by the chunked stages before it."""
    (q, k, v, a, b, g), kw = arguments(p, torch.float64)
    cu, S0, scale = kw["cu_seqlens"], kw["initial_state"], p.shape[4] ** -0.5
    G = stages.chunk_local_cumsum(g, C, cu)
    A_ba, A_bk, A_qa, A_qk = chunked_dplr.dplr_intra_chunk_matrices(q, k, a, b, G, scale, C, cu)
    M = stages.ut_transform(A_ba, C, cu)
    W, U = chunked_dplr.dplr_wy_representation(b, v, G, M, A_bk, C, cu)
    h, x, _ = chunked_dplr.dplr_state_passing(k, v, a, W, U, G, S0, C, cu)
    return {
        "dplr_intra_chunk_matrices": (q, k, a, b, G, scale, C, cu),
        "ut_transform": (A_ba, C, cu),
        "dplr_wy_representation": (b, v, G, M, A_bk, C, cu),
        "dplr_state_passing": (k, v, a, W, U, G, S0, C, cu),
        "dplr_chunk_output": (q, h, x, v, G, A_qa, A_qk, scale, C, cu),
    }


def float32(x):
    return x.float() if isinstance(x, torch.Tensor) and x.dtype == torch.float64 else x


@pytest.mark.parametrize("case", range(len(CASES)))
def test_stages_compute_what_their_twins_compute(case):
    p, C = CASES[case]
    args = stage_arguments(p, C)
    for name, twin in TWINS.items():
        ref = twin(*args[name])
        ours = getattr(fast_dplr, name)(*(float32(x) for x in args[name]))
        ref, ours = (x if isinstance(x, tuple) else (x,) for x in (ref, ours))
        assert len(ours) == len(ref), name
        for i, (x, y) in enumerate(zip(ours, ref)):
            assert x.shape == y.shape, (name, i)
            assert x.dtype in (torch.float32, torch.bfloat16), (name, i)
            assert rel_rms_error(x, y) < F32, (name, i, rel_rms_error(x, y))


def test_ut_transform_inverts_the_unit_lower_triangular_matrix():
    """``M (I + A) = I`` on every chunk, a short last chunk included (entries of the size of a
    normalised ``A_ba``: a random strictly lower matrix of O(1) entries has an inverse that grows
    as ``2^C``, beyond any float32 computation)."""
    C, T = 64, 100
    A = torch.randn(1, T, 2, C, device=DEVICE, dtype=torch.float64) * C ** -0.5
    lay = stages._layout(A, C, None)
    A = lay.from_chunks(lay.to_chunks(A).tril(-1))  # strictly lower per chunk, zero padding columns
    M = fast_dplr.ut_transform(A.float(), C)
    eye = torch.eye(C, dtype=torch.float64, device=DEVICE)
    prod = lay.to_chunks(M.double()) @ (eye + lay.to_chunks(A))  # [N, NT, HV, C, C]
    real = lay.to_chunks(torch.ones(1, T, 2, C, device=DEVICE, dtype=torch.float64))[..., :1]  # [.., C, 1]
    assert rel_rms_error(prod * real, eye * real) < F32


# --- the stages composed -----------------------------------------------------------------------

#: (problem, chunk size): as CASES, and a plain batch of two rows.
DPLR_CASES = CASES + [
    (strong(make_problem(B=2, T=45, H=2, HV=2, K=16, V=32, initial_state=True, seed=4), 4), 32),
]


@pytest.mark.parametrize("case", range(len(DPLR_CASES)))
def test_fast_dplr_equals_chunked_dplr(case):
    p, C = DPLR_CASES[case]
    (q, k, v, a, b, g), kw = arguments(p, torch.float64)
    o_ref, S_ref = chunked.dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=C, **kw)
    kw32 = {**kw, "initial_state": float32(kw["initial_state"])}
    o, S = fast_dplr.dplr(*(x.float() for x in (q, k, v, a, b, g)), output_final_state=True, chunk_size=C, **kw32)
    assert o.dtype == torch.float32 and o.shape == o_ref.shape
    assert S.dtype == torch.float32 and S.shape == S_ref.shape
    assert rel_rms_error(o, o_ref) < F32
    assert rel_rms_error(S, S_ref) < F32


def test_fast_dplr_bf16_inputs():
    """bf16 inputs against the float64 DPLR of the same (rounded) inputs."""
    p, C = CASES[2]
    (q, k, v, a, b, g), kw = arguments(p, torch.bfloat16)
    o, S = fast_dplr.dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=C, **kw)
    kw64 = {**kw, "initial_state": kw["initial_state"].double()}
    o_ref, S_ref = chunked.dplr(*(x.double() for x in (q, k, v, a, b, g)), output_final_state=True, chunk_size=C,
                                **kw64)
    assert o.dtype == torch.bfloat16
    assert rel_rms_error(o, o_ref) < BF16
    assert rel_rms_error(S, S_ref) < BF16


def test_bf16_intermediates_stay_within_the_bf16_bound():
    """On a GPU, bf16 inputs keep ``A_bk, A_qa, A_qk, W, U, x`` and ``o`` in bf16
    (:func:`kda_explained.fast.local.intermediate_dtype`); the interpreter keeps float32 (its casts
    truncate). Here the stages run with each of those rounded to bf16 to nearest, as the GPU's
    stores round, in between."""
    rnd = lambda x: x.to(torch.bfloat16).float()  # noqa: E731
    p, C = CASES[2]
    (q, k, v, a, b, g), kw = arguments(p, torch.bfloat16)
    scale = p.shape[4] ** -0.5
    G = fast.chunk_local_cumsum(g, C)
    A_ba, A_bk, A_qa, A_qk = fast_dplr.dplr_intra_chunk_matrices(q, k, a, b, G, scale, C)
    M = fast_dplr.ut_transform(A_ba, C)
    W, U = fast_dplr.dplr_wy_representation(b, v, G, M, rnd(A_bk), C)
    h, x, S = fast_dplr.dplr_state_passing(k, v, a, rnd(W), rnd(U), G, kw["initial_state"], C)
    o = rnd(fast_dplr.dplr_chunk_output(q, h, rnd(x), v, G, rnd(A_qa), rnd(A_qk), scale, C))
    kw64 = {**kw, "initial_state": kw["initial_state"].double()}
    o_ref, S_ref = chunked.dplr(*(x.double() for x in (q, k, v, a, b, g)), output_final_state=True, chunk_size=C,
                                **kw64)
    assert rel_rms_error(o, o_ref) < BF16 and rel_rms_error(S, S_ref) < BF16


def test_chunk_sizes_agree_and_a_packed_batch_equals_separate_calls():
    p, _ = CASES[1]
    (q, k, v, a, b, g), kw = arguments(p, torch.float32)
    cu, S0 = p.cu_seqlens.tolist(), kw["initial_state"]
    o, S = fast_dplr.dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=16, **kw)
    o64, S64 = fast_dplr.dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=64, **kw)
    assert rel_rms_error(o64, o) < F32 and rel_rms_error(S64, S) < F32
    for n, (bos, eos) in enumerate(zip(cu[:-1], cu[1:])):
        if eos == bos:  # an empty sequence passes its state through
            assert torch.equal(S[n], S0[n])
            continue
        one = (x[:, bos:eos] for x in (q, k, v, a, b, g))
        o_n, S_n = fast_dplr.dplr(*one, initial_state=S0[n:n + 1], output_final_state=True, chunk_size=32)
        assert rel_rms_error(o_n, o[:, bos:eos]) < F32
        assert rel_rms_error(S_n, S[n:n + 1]) < F32


def test_with_kda_factors_fast_dplr_is_kda():
    """``a = beta k``, ``b = k exp(g)`` and the written key ``beta k``: the KDA recurrence."""
    p = make_problem(T=40, H=2, K=16, V=16, initial_state=True, seed=5)
    q, k, v, g, beta = (torch.as_tensor(x).to(DEVICE) for x in p.args())  # float64
    S0 = torch.as_tensor(p.initial_state).to(DEVICE)
    o_kda, S_kda = chunked.kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)
    beta_k = beta[..., None] * k
    o, S = fast_dplr.dplr(*(x.float() for x in (q, beta_k, v, beta_k, k * torch.exp(g), g)), initial_state=S0.float(),
                          output_final_state=True, chunk_size=16)
    assert rel_rms_error(o, o_kda) < F32 and rel_rms_error(S, S_kda) < F32


# --- what it refuses ---------------------------------------------------------------------------


def test_fast_dplr_refuses_what_it_cannot_do():
    p, _ = CASES[0]
    (q, k, v, a, b, g), kw = arguments(p, torch.float32)
    with pytest.raises(ValueError, match=r"^a: kda_explained.fast.dplr.dplr is forward only"):
        fast_dplr.dplr(q, k, v, a.clone().requires_grad_(), b, g)
    with torch.no_grad():  # no grad mode, no graph: accepted
        fast_dplr.dplr(q, k, v, a.clone().requires_grad_(), b, g, chunk_size=16)
    with pytest.raises(TypeError, match=r"^q: expected float32, bfloat16 or float16"):
        fast_dplr.dplr(q.double(), k.double(), v.double(), a.double(), b.double(), g)
    with pytest.raises(ValueError, match=r"^chunk_size: expected one of \[16, 32, 64\]"):
        fast_dplr.dplr(q, k, v, a, b, g, chunk_size=128)
    with pytest.raises(ValueError, match=r"^b: expected shape \[B, T, HV, K\]"):
        fast_dplr.dplr(q, k, v, a, b[..., :3], g)
    wide = torch.zeros(1, 2, 1, 160, device=DEVICE)
    with pytest.raises(ValueError, match=r"^q, v: expected head dims K, V <= 128, got K = 160"):
        fast_dplr.dplr(wide, wide, wide[..., :4], wide, wide, wide)


def test_doctests():
    import doctest

    result = doctest.testmod(fast_dplr, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0


# --- on a GPU, at the benchmark's head dims ----------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [16, 32, 64])
def test_fast_dplr_on_gpu(dtype, C):
    """K = V = 128, GVA, a packed batch with an initial state and strong decays, on the GPU:
    float32 inputs within the float32 bound, bf16 inputs within the bf16 bound."""
    p = strong(make_problem(T=900, H=2, HV=4, K=128, V=128, cu_seqlens=[0, 1, 300, 300, 900], initial_state=True,
                            gate="lowerbound", seed=6), 6)
    (q, k, v, a, b, g), kw = arguments(p, dtype)
    with torch.inference_mode():
        o, S = fast_dplr.dplr(q, k, v, a, b, g, output_final_state=True, chunk_size=C, **kw)
    kw64 = {**kw, "initial_state": kw["initial_state"].double()}
    o_ref, S_ref = chunked.dplr(*(x.double() for x in (q, k, v, a, b, g)), output_final_state=True, chunk_size=C,
                                **kw64)
    bound = F32 if dtype == torch.float32 else BF16
    assert o.dtype == dtype
    assert rel_rms_error(o, o_ref) < bound and rel_rms_error(S, S_ref) < bound


def test_fast_dplr_is_not_exported_over_its_module():
    """``kda_explained.fast.dplr`` stays the module (``fast.dplr.dplr`` is the function)."""
    assert inspect.ismodule(fast.dplr) and fast.dplr.dplr is fast_dplr.dplr


@pytest.mark.skipif(torch.cuda.is_available(), reason="the smoke mode runs the interpreter, for machines without a GPU")
def test_benchmark_cpu_smoke(tmp_path):
    """``benchmarks/gpu_dplr_bench.py --cpu-smoke`` runs and writes its record (speed is never asserted)."""
    import json
    from pathlib import Path

    pytest.importorskip("matplotlib")
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_dplr_bench.py"
    spec = importlib.util.spec_from_file_location("gpu_dplr_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = Path(bench.main(["--cpu-smoke", "--max-length", "32", "--out", str(tmp_path)]))
    assert out == tmp_path / "gpu_dplr_bench_cpu_smoke.json"
    assert (tmp_path / "gpu_dplr_bench_cpu_smoke.png").stat().st_size > 0
    run = json.loads(out.read_text())
    assert run["device"] and run["date"] and run["torch"] == torch.__version__ and run["triton"]
    assert [r["T"] for r in run["rows"]] == [32]
    assert all(r["kda_ms"] > 0 and r["kda_staged_ms"] > 0 and r["dplr_ms"] > 0 for r in run["rows"])
    acc = run["accuracy"]
    assert all(acc[key] < acc["bound"] for key in acc if key.endswith("_vs_f64"))
    # with KDA's factors DPLR computes KDA: the two outputs agree within the bf16 bound
    assert all(r["dplr_vs_kda_rel_err"] < BF16 for r in run["rows"])
