"""The edges of the contract, in every layer: the gate domain, causality, and what serving code passes.

- Full resets (``g = -inf``) and resets in effect (``-1e10``, ``-1e6``, ...) are computed right
  by every layer (:data:`strategies.EDGE_GATES`), against the naive recurrence.
- Causality, bit for bit: no input at or after token ``t`` changes an output before ``t``,
  whatever its value (strong gates included).
- ``g > 0`` is refused where checking is free (naive, chunked on the CPU) and on request in
  the fast layer (``check_g``, ``KDA_EXPLAINED_CHECK_G``).
- Offsets (``cu_seqlens``): one validation for all layers (floats refused, never truncated);
  the fast layer works under ``torch.inference_mode()`` and always sees an offsets tensor's
  current values.
- flash-linear-attention's keyword arguments: ``transpose_state_layout``, ``cp_context``,
  ``out``, ``num_accepted_tokens`` with per-token state slots (speculative decoding), and
  ``fused_recurrent_kda`` on inputs that require grad.

The fast layer runs under the Triton interpreter here (``conftest.py``), at small sizes.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kda_explained import chunked, fast, naive
from kda_explained.numerics import gate_floor
from kda_explained.testing import TOLERANCES, g_grad_floor, rel_rms_error
from strategies import EDGE_GATES, STRONG_GATES, kda_problems, make_problem, to_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
fast_examples = settings(max_examples=max(4, settings.default.max_examples // 10))
edge_problems = kda_problems(T=(1, 40), K=(1, 6), V=(1, 5), gates=EDGE_GATES)
fast_problems = kda_problems(B=(1, 2), T=(1, 40), H=(1, 2), group=(1, 2), K=st.sampled_from([16, 20]),
                             V=st.sampled_from([12, 16]), gates=("resets",))


def naive_reference(p):
    return naive.kda(*p.args(), **p.kwargs(), output_final_state=True)


# ------------------------------------------------------------------------------------------------
# the floor every chunked layer raises g to
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gate_floor_is_where_exp_underflows(dtype):
    floor = gate_floor(dtype)
    assert torch.exp(torch.tensor(floor, dtype=dtype)) == 0
    assert np.exp(np.array(floor, dtype=str(dtype).replace("torch.", ""))) == 0
    # and no higher than it must be: one unit above, exp is still a (subnormal) number
    assert torch.exp(torch.tensor(floor + 1.5, dtype=dtype)) > 0
    assert gate_floor(torch.bfloat16) == gate_floor(torch.float32)  # G is summed in float32


# ------------------------------------------------------------------------------------------------
# resets are computed right by every layer
# ------------------------------------------------------------------------------------------------
@given(p=edge_problems)
@example(p=make_problem(T=40, H=1, K=4, V=3, gate="resets", seed=3))
def test_naive_parallel_form_with_resets(p):
    o, S = naive_reference(p)
    o2, S2 = naive.kda_parallel(*p.args(), **p.kwargs(), output_final_state=True)
    assert rel_rms_error(o2, o) < 1e-10 and rel_rms_error(S2, S) < 1e-10


@given(p=edge_problems, C=st.sampled_from([16, 32]))
@example(p=make_problem(T=40, H=2, HV=4, K=5, V=3, gate="resets", seed=3), C=16)
def test_chunked_with_resets(p, C):
    o_ref, S_ref = naive_reference(p)
    for dtype, bound in ((torch.float64, TOLERANCES["chunked_f64_vs_naive"]),
                         (torch.float32, TOLERANCES["chunked_f32_vs_naive"])):
        args, kw = to_torch(p, dtype)
        o, S = chunked.kda(*args, **kw, output_final_state=True, chunk_size=C)
        assert rel_rms_error(o, o_ref) < bound, dtype
        assert rel_rms_error(S, S_ref) < bound, dtype


def test_every_layer_with_minus_inf_gates():
    """``g = -inf`` on whole token rows and on single channels, T past one chunk: no NaN anywhere."""
    p = make_problem(T=50, H=1, HV=2, K=16, V=16, seed=4, initial_state=True)
    g = p.g.copy()
    g[0, [3, 20, 33], 0, :] = -np.inf
    g[0, [7, 40], 1, :5] = -np.inf
    p = p.replace(g=g)
    o_ref, S_ref = naive_reference(p)
    args64, kw64 = to_torch(p, torch.float64)
    args32, kw32 = to_torch(p, torch.float32, DEVICE)
    results = {
        "chunked": chunked.kda(*args64, **kw64, output_final_state=True),
        "chunked recurrent": chunked.recurrent_kda(*args64, **kw64, output_final_state=True),
        "fast.kda": fast.kda(*args32, **kw32, output_final_state=True),
        "fast.chunk_kda": fast.chunk_kda(*args32, **kw32, output_final_state=True),
        "fast.fused_recurrent_kda": fast.fused_recurrent_kda(*args32, **kw32, output_final_state=True),
    }
    for name, (o, S) in results.items():
        bound = 1e-10 if o.dtype == torch.float64 else TOLERANCES["fast_f32_vs_f64"]
        assert rel_rms_error(o, o_ref) < bound, name
        assert rel_rms_error(S, S_ref) < bound, name


@fast_examples
@given(p=fast_problems, C=st.sampled_from([16, 32, 64]))
@example(p=make_problem(T=40, H=1, HV=2, K=16, V=16, gate="resets", seed=5, initial_state=True), C=16)
@example(p=make_problem(T=37, K=16, V=12, cu_seqlens=[0, 5, 37], gate="resets", seed=6), C=32)
def test_fast_with_resets(p, C):
    o_ref, S_ref = naive_reference(p)
    args, kw = to_torch(p, torch.float32, DEVICE)
    o, S = fast.chunk_kda(*args, **kw, output_final_state=True, chunk_size=C)
    assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert rel_rms_error(S, S_ref) < TOLERANCES["fast_f32_vs_f64"]


@pytest.mark.filterwarnings("error::RuntimeWarning")
@pytest.mark.parametrize("C", [16, 32, 64])
def test_fast_exact_diagonal_forms_no_overflow(C):
    """A gate strong enough for the exact diagonal, in a chunk with padding rows: the interpreter
    (NumPy) warns on any ``exp`` overflow or ``0 * inf`` even where a mask hides the result."""
    p = make_problem(T=C + 9, K=16, V=16, seed=7)
    g = p.g.copy()
    g[0, [2, C + 3], 0, :] = -300.0  # a span past the tensor-core diagonal's limit, in both chunks
    p = p.replace(g=g)
    o_ref, _ = naive_reference(p)
    args, kw = to_torch(p, torch.float32, DEVICE)
    with torch.inference_mode():
        o, _ = fast.chunk_kda(*args, **kw, chunk_size=C)
    assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]


# ------------------------------------------------------------------------------------------------
# causality, bit for bit
# ------------------------------------------------------------------------------------------------
def _edited_after(p, t, seed):
    """``p`` with every input at and after token ``t`` redrawn, and a strong gate at ``t``."""
    other = make_problem(*p.shape[:3], p.shape[3], *p.shape[4:], seed=seed, gate="resets",
                         cu_seqlens=None if p.cu_seqlens is None else p.cu_seqlens.tolist())
    rng = np.random.default_rng(seed)
    changed = {}
    for name in ("q", "k", "v", "g", "beta"):
        x = getattr(p, name).copy()
        x[:, t:] = getattr(other, name)[:, t:]
        changed[name] = x
    changed["g"][:, t, ..., : max(1, p.shape[4] // 2)] = rng.choice(np.array(STRONG_GATES))
    return p.replace(**changed)


def _assert_causal(run, p, t, seed):
    a = run(p)
    b = run(_edited_after(p, t, seed))
    assert torch.equal(torch.as_tensor(a)[:, :t], torch.as_tensor(b)[:, :t])


causal_problems = kda_problems(T=(2, 40), K=(1, 6), V=(1, 5), varlen=False, gates=EDGE_GATES)


@given(p=causal_problems, data=st.data())
def test_naive_is_causal(p, data):
    t = data.draw(st.integers(1, p.shape[1] - 1))
    seed = data.draw(st.integers(0, 2**16))
    _assert_causal(lambda x: naive.kda(*x.args(), **x.kwargs())[0], p, t, seed)
    _assert_causal(lambda x: naive.kda_parallel(*x.args(), **x.kwargs())[0], p, t, seed)


@given(p=causal_problems, data=st.data(), C=st.sampled_from([16, 32]),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_chunked_is_causal(p, data, C, dtype):
    t = data.draw(st.integers(1, p.shape[1] - 1))
    seed = data.draw(st.integers(0, 2**16))

    def run(x):
        args, kw = to_torch(x, dtype)
        return chunked.kda(*args, **kw, chunk_size=C)[0]

    _assert_causal(run, p, t, seed)


@fast_examples
@given(p=kda_problems(T=(2, 40), H=(1, 2), group=(1, 2), K=st.sampled_from([16, 20]), V=st.just(16), varlen=False,
                      gates=EDGE_GATES),
       data=st.data(), C=st.sampled_from([16, 32, 64]))
@example(p=make_problem(T=40, K=16, V=16, seed=8, gate="resets"), data=None, C=16)
def test_fast_is_causal(p, data, C):
    t = data.draw(st.integers(1, p.shape[1] - 1)) if data is not None else 21
    seed = data.draw(st.integers(0, 2**16)) if data is not None else 9

    def run(x):
        args, kw = to_torch(x, torch.float32, DEVICE)
        with torch.inference_mode():
            return fast.chunk_kda(*args, **kw, chunk_size=C)[0].cpu()

    _assert_causal(run, p, t, seed)


def test_fast_recurrent_is_causal():
    p = make_problem(T=12, K=16, V=16, seed=10, gate="resets")

    def run(x):
        args, kw = to_torch(x, torch.float32, DEVICE)
        return fast.fused_recurrent_kda(*args, **kw)[0].cpu()

    for t in (1, 5, 11):
        _assert_causal(run, p, t, seed=t)


# ------------------------------------------------------------------------------------------------
# g > 0: refused where checking is free, and on request in the fast layer
# ------------------------------------------------------------------------------------------------
def test_positive_g_is_refused_by_naive_and_chunked():
    p = make_problem(T=5, K=4, V=3, seed=11)
    g = p.g.copy()
    g[0, 2, 0, 1] = 0.25
    bad = p.replace(g=g)
    for run in (lambda x: naive.kda(*x.args()), lambda x: naive.kda_parallel(*x.args())):
        with pytest.raises(ValueError, match=r"^g: expected log decays in \[-inf, 0\].*largest 0.25"):
            run(bad)
    args, kw = to_torch(bad)
    with pytest.raises(ValueError, match=r"^g: expected log decays"):
        chunked.kda(*args, **kw)
    nan = p.g.copy()
    nan[0, 1, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"^g: expected log decays"):
        naive.kda(*p.replace(g=nan).args())


def test_positive_g_is_refused_by_fast_on_request(monkeypatch):
    p = make_problem(T=20, K=16, V=16, seed=12)
    g = p.g.copy()
    g[0, 9, 0, 3] = 0.5
    args, kw = to_torch(p.replace(g=g), torch.float32, DEVICE)
    for fn in (fast.chunk_kda, fast.fused_recurrent_kda):
        with pytest.raises(ValueError, match=r"^g: expected log decays"):
            fn(*args, **kw, check_g=True)
        fn(*args, **kw, check_g=False)  # unchecked: no error (the result is unspecified)
    monkeypatch.setenv("KDA_EXPLAINED_CHECK_G", "1")
    for fn in (fast.chunk_kda, fast.fused_recurrent_kda, fast.kda):
        with pytest.raises(ValueError, match=r"^g: expected log decays"):
            fn(*args, **kw)
    # with the gate in the kernel g is its raw input, of any sign: never checked
    H = args[0].shape[2]
    fast.chunk_kda(*args, **kw, use_gate_in_kernel=True, A_log=torch.zeros(H, device=DEVICE))


# ------------------------------------------------------------------------------------------------
# offsets: one validation, inference mode, current values
# ------------------------------------------------------------------------------------------------
LAYERS = {
    "naive": lambda *a, **kw: naive.kda(*(x.numpy() for x in a), **kw),
    "chunked": chunked.kda,
    "fast.kda": fast.kda,
    "fast.chunk_kda": fast.chunk_kda,
    "fast.fused_recurrent_kda": fast.fused_recurrent_kda,
}


@pytest.mark.parametrize("layer", list(LAYERS))
@pytest.mark.parametrize("cu", [torch.tensor([0.0, 7.9, 20.0]), [0, 7.9, 20]], ids=["float tensor", "float list"])
def test_float_offsets_are_refused_by_every_layer(layer, cu):
    p = make_problem(T=20, K=16, V=16, seed=13)
    args, _ = to_torch(p, torch.float64 if layer in ("naive", "chunked") else torch.float32)
    with pytest.raises(TypeError, match=r"^cu_seqlens: expected"):
        LAYERS[layer](*args, cu_seqlens=cu)


@pytest.mark.parametrize("layer", ["chunked", "fast.kda", "fast.chunk_kda", "fast.fused_recurrent_kda"])
def test_offsets_under_inference_mode(layer):
    p = make_problem(T=30, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 7, 30], seed=14, initial_state=True)
    o_ref, S_ref = naive_reference(p)
    with torch.inference_mode():
        args, kw = to_torch(p, torch.float32, DEVICE)  # inference tensors, cu_seqlens included
        o, S = LAYERS[layer](*args, **kw, output_final_state=True)
    assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert rel_rms_error(S, S_ref) < TOLERANCES["fast_f32_vs_f64"]


@pytest.mark.parametrize("edit", ["data", "numpy"])
def test_fast_sees_the_offsets_current_values(edit):
    """An offsets tensor edited where no version counter sees it gives the new batch's answer."""
    p = make_problem(T=30, K=16, V=16, cu_seqlens=[0, 7, 30], seed=15)
    args, kw = to_torch(p, torch.float32)
    cu = kw.pop("cu_seqlens")
    fast.chunk_kda(*args, cu_seqlens=cu)
    fast.fused_recurrent_kda(*args, cu_seqlens=cu)
    if edit == "data":
        cu.data[1] = 20
    else:
        cu.numpy()[1] = 20
    o_ref, _ = naive.kda(*p.args(), cu_seqlens=np.array([0, 20, 30]))
    for fn in (fast.chunk_kda, fast.fused_recurrent_kda):
        o, _ = fn(*args, cu_seqlens=cu)
        assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]


def test_host_copy_of_the_offsets():
    p = make_problem(T=30, K=16, V=16, cu_seqlens=[0, 11, 30], seed=16)
    args, kw = to_torch(p, torch.float32, DEVICE)
    o_ref, _ = naive_reference(p)
    o, _ = fast.chunk_kda(*args, **kw, cu_seqlens_cpu=torch.tensor([0, 11, 30]))
    assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected a 1-D integer tensor of 4 offsets"):
        fast.chunk_kda(*args, **kw, cu_seqlens_cpu=torch.tensor([0, 5, 11, 30]))


# ------------------------------------------------------------------------------------------------
# flash-linear-attention's keyword arguments
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [fast.chunk_kda, fast.fused_recurrent_kda], ids=["chunk", "recurrent"])
def test_transpose_state_layout_is_state_v_first(fn):
    p = make_problem(T=20, K=16, V=12, seed=17, initial_state=True)
    args, kw = to_torch(p, torch.float32, DEVICE)
    S0_vk = kw.pop("initial_state").transpose(-1, -2).contiguous()  # [N, HV, V, K]
    o_ref, S_ref = fn(*args, initial_state=S0_vk, output_final_state=True, state_v_first=True)
    with pytest.warns(DeprecationWarning, match="transpose_state_layout"):
        o, S = fn(*args, initial_state=S0_vk, output_final_state=True, transpose_state_layout=True)
    assert torch.equal(o, o_ref) and torch.equal(S, S_ref)
    with pytest.raises(ValueError, match=r"^transpose_state_layout"):
        fn(*args, initial_state=S0_vk, state_v_first=True, transpose_state_layout=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        fn(*args, no_such_option=1)


def test_cp_context_points_to_context_parallelism():
    args, kw = to_torch(make_problem(T=4, K=16, V=16), torch.float32, DEVICE)
    with pytest.raises(NotImplementedError, match=r"^cp_context: .*context_parallel_kda"):
        fast.chunk_kda(*args, cp_context=object())


def test_recurrent_out_receives_the_outputs():
    p = make_problem(T=6, H=1, HV=2, K=16, V=16, seed=18)
    args, kw = to_torch(p, torch.float32, DEVICE)
    out = torch.full_like(args[2], float("nan"))
    o, _ = fast.fused_recurrent_kda(*args, out=out)
    assert o is out
    assert rel_rms_error(out, naive_reference(p)[0]) < TOLERANCES["fast_f32_vs_f64"]
    for bad in (out[..., :8], out.double(), out.transpose(1, 2).contiguous().transpose(1, 2)):
        with pytest.raises(ValueError, match=r"^out: expected a contiguous"):
            fast.fused_recurrent_kda(*args, out=bad)


def _spec_reference(p, pool, slots, accepted):
    """flash-linear-attention's serving semantics, token by token in float64: sequence ``n`` starts
    from slot ``slots[n, accepted[n] - 1]`` and writes the state after its ``t``-th token to
    ``slots[n, t]``."""
    pool = pool.copy()
    o = np.zeros(p.v.shape)
    for n, (_, bos, eos) in enumerate(p.spans):
        first = slots[n, accepted[n] - 1]
        S = pool[first].copy()  # [HV, K, V]
        for t in range(bos, eos):
            one = p.replace(q=p.q[:, t:t + 1], k=p.k[:, t:t + 1], v=p.v[:, t:t + 1], g=p.g[:, t:t + 1],
                            beta=p.beta[:, t:t + 1], cu_seqlens=None, initial_state=S[None])
            o_t, S_t = naive.kda(*one.args(), initial_state=S[None], output_final_state=True)
            o[:, t] = o_t[:, 0]
            S = S_t[0]
            pool[slots[n, t - bos]] = S
    return o, pool


def test_recurrent_speculative_decoding_slots():
    """Per-token slots ``[N, S]`` and ``num_accepted_tokens``, against the reference semantics."""
    p = make_problem(T=7, H=1, HV=2, K=16, V=16, cu_seqlens=[0, 3, 4, 7], seed=19)
    rng = np.random.default_rng(19)
    pool = rng.standard_normal((12, 2, 16, 16))
    slots = np.array([[0, 1, 2], [3, 4, 5], [6, 7, 8]])
    accepted = np.array([2, 1, 3])
    o_ref, pool_ref = _spec_reference(p, pool, slots, accepted)
    args, kw = to_torch(p, torch.float32, DEVICE)
    pool_t = torch.tensor(pool, dtype=torch.float32, device=DEVICE)
    with torch.inference_mode():
        o, final = fast.fused_recurrent_kda(*args, cu_seqlens=kw["cu_seqlens"], initial_state=pool_t,
                                            ssm_state_indices=torch.tensor(slots, device=DEVICE),
                                            num_accepted_tokens=torch.tensor(accepted, device=DEVICE))
    assert final is pool_t
    assert rel_rms_error(o, o_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert rel_rms_error(pool_t, pool_ref) < TOLERANCES["fast_f32_vs_f64"]
    # without num_accepted_tokens every sequence starts from its first slot
    o_ref0, _ = _spec_reference(p, pool, slots, np.ones(3, dtype=int))
    o0, _ = fast.fused_recurrent_kda(*args, cu_seqlens=kw["cu_seqlens"],
                                     initial_state=torch.tensor(pool, dtype=torch.float32, device=DEVICE),
                                     ssm_state_indices=torch.tensor(slots, device=DEVICE))
    assert rel_rms_error(o0, o_ref0) < TOLERANCES["fast_f32_vs_f64"]
    with pytest.raises(ValueError, match=r"^ssm_state_indices: expected a slot for every token"):
        fast.fused_recurrent_kda(*args, cu_seqlens=kw["cu_seqlens"], initial_state=pool_t,
                                 ssm_state_indices=torch.tensor(slots[:, :2], device=DEVICE))
    with pytest.raises(ValueError, match=r"^num_accepted_tokens: expected values in \[1, 3\]"):
        fast.fused_recurrent_kda(*args, cu_seqlens=kw["cu_seqlens"], initial_state=pool_t,
                                 ssm_state_indices=torch.tensor(slots), num_accepted_tokens=torch.tensor([0, 1, 4]))
    with pytest.raises(ValueError, match=r"^num_accepted_tokens: expected together with per-token slots"):
        fast.fused_recurrent_kda(*args, cu_seqlens=kw["cu_seqlens"], initial_state=pool_t,
                                 num_accepted_tokens=torch.tensor(accepted))


@pytest.mark.parametrize("mode", ["grad", "no_grad", "inference_mode"])
def test_recurrent_on_inputs_that_require_grad(mode):
    """Code that decodes with parameters requiring grad works in every autograd mode; in grad mode
    the result is differentiable (the same function through the chunk kernels)."""
    p = make_problem(T=5, K=16, V=16, seed=20, initial_state=True)
    args, kw = to_torch(p, torch.float32, DEVICE)
    leaves = [x.clone().requires_grad_(True) for x in args]
    context = {"grad": torch.enable_grad, "no_grad": torch.no_grad, "inference_mode": torch.inference_mode}[mode]
    with context():
        o, S = fast.fused_recurrent_kda(*leaves, **kw, output_final_state=True)
    o_ref, S_ref = naive_reference(p)
    assert rel_rms_error(o.detach(), o_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert o.requires_grad == (mode == "grad")
    if mode == "grad":
        (o * torch.arange(o.numel(), device=DEVICE).reshape(o.shape).sin()).sum().backward()
        ref = [x.detach().double().requires_grad_(True) for x in args]
        o64, _ = chunked.kda(*ref, initial_state=kw["initial_state"].double())
        (o64 * torch.arange(o64.numel()).reshape(o64.shape).sin()).sum().backward()
        for x, r in zip(leaves, ref):
            assert rel_rms_error(x.grad, r.grad) < 1e-4


# ------------------------------------------------------------------------------------------------
# the g gradient under strong decay: bounded against the scale of the terms it is a difference of
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("g_value", [-0.1, -2.0, -20.0])
def test_fast_g_gradient_under_constant_decay(g_value):
    """At ``g = -20`` per token the true ``dg`` is ~1e-8 of the products it is summed from: the fast
    backward's error there is absolute at their scale (``testing.g_grad_floor``), a bound the
    tolerance table states; plain relative error would be ~1e2."""
    torch.manual_seed(0)
    B, T, H, K, V = 1, 64, 1, 32, 32
    q, v, do = torch.randn(B, T, H, K), torch.randn(B, T, H, V), torch.randn(B, T, H, V)
    k = torch.nn.functional.normalize(torch.randn(B, T, H, K), dim=-1)
    g, beta = torch.full((B, T, H, K), g_value), torch.rand(B, T, H)
    xs = [x.clone().to(DEVICE).requires_grad_(True) for x in (q, k, v, g, beta)]
    o, _ = fast.chunk_kda(*xs)
    (o * do.to(DEVICE)).sum().backward()
    ref = [x.double().requires_grad_(True) for x in (q, k, v, g, beta)]
    o64, _ = chunked.kda(*ref)
    (o64 * do.double()).sum().backward()
    floor = g_grad_floor(ref[0], ref[0].grad, ref[1], ref[1].grad)
    assert rel_rms_error(xs[3].grad, ref[3].grad, floor=floor) < 1e-4
    for x, r in zip(xs, ref):
        if x is not xs[3]:
            assert rel_rms_error(x.grad, r.grad) < 1e-4
