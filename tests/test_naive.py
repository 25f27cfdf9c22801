"""Properties of the naive layer: the definition checked against itself, its ladder and closed forms.

Every comparison is a relative RMS error (``kda_explained.testing.rel_rms_error``)
in float64. Two bounds are used:

- ``PARALLEL = 1e-10`` between the recurrence and the parallel form (a triangular
  solve against a token loop: different arithmetic, same function);
- ``SAME_ARITHMETIC = 1e-12`` where both sides do essentially the same float
  operations (a rung of the ladder against KDA with a degenerate gate, splits,
  packing, GVA).
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from kda_explained import naive
from kda_explained.testing import rel_rms_error
from strategies import Problem, kda_problems, make_problem

PARALLEL = 1e-10
SAME_ARITHMETIC = 1e-12
IMPLS = pytest.mark.parametrize("impl", [naive.kda, naive.kda_parallel], ids=["recurrent", "parallel"])
seeds = st.integers(0, 2**32 - 1)

# Awkward cases every property sees first (DESIGN.md, *Tests*).
T1 = make_problem(T=1, K=3, V=5)  # a single token, K != V
ODD_GVA = make_problem(B=2, T=7, H=2, HV=6, K=3, V=5, initial_state=True)  # GVA, non powers of two
PACKED = make_problem(T=6, H=1, HV=2, K=5, V=3, cu_seqlens=[0, 0, 2, 2, 6], initial_state=True)  # empty sequences
STRONG = make_problem(T=9, K=7, V=2, gate="lowerbound", initial_state=True)
AWKWARD = (T1, ODD_GVA, PACKED, STRONG)


def pin(*problems: Problem, **other):
    """Pin ``problems`` as explicit ``@example(p=..., **other)`` cases of a property of ``p``."""

    def decorate(test):
        for p in reversed(problems):
            test = example(p=p, **other)(test)
        return test

    return decorate


def run(impl, p: Problem, **overrides):
    """``impl(*p.args(), **p.kwargs(), output_final_state=True)`` with some arguments replaced."""
    args = dict(zip(("q", "k", "v", "g", "beta"), p.args()), **p.kwargs())
    args.update(overrides)
    q, k, v, g, beta = (args.pop(name) for name in ("q", "k", "v", "g", "beta"))
    return impl(q, k, v, g, beta, output_final_state=True, **args)


# --- the two forms of KDA ---------------------------------------------------------------------


@pin(*AWKWARD)
@given(p=kda_problems())
def test_recurrence_equals_parallel_form(p):
    o, S = run(naive.kda, p)
    o_par, S_par = run(naive.kda_parallel, p)
    assert rel_rms_error(o_par, o) <= PARALLEL
    assert rel_rms_error(S_par, S) <= PARALLEL


# --- the ladder: KDA with a degenerate gate is a lower rung -----------------------------------


@pin(*AWKWARD)
@given(p=kda_problems())
def test_kda_without_decay_is_deltanet(p):
    o, S = run(naive.kda, p, g=np.zeros_like(p.g))
    o_dn, S_dn = naive.deltanet(p.q, p.k, p.v, p.beta, output_final_state=True, **p.kwargs())
    assert rel_rms_error(o, o_dn) <= SAME_ARITHMETIC
    assert rel_rms_error(S, S_dn) <= SAME_ARITHMETIC


@pin(*AWKWARD)
@given(p=kda_problems())
def test_kda_with_one_decay_per_head_is_gated_deltanet(p):
    g_head = p.g[..., 0]  # [B, T, HV]: one log decay per token and head
    g_channels = np.repeat(g_head[..., None], p.shape[4], axis=-1)  # [B, T, HV, K], equal across channels
    o, S = run(naive.kda, p, g=g_channels)
    o_gdn, S_gdn = naive.gated_deltanet(p.q, p.k, p.v, g_head, p.beta, output_final_state=True, **p.kwargs())
    assert rel_rms_error(o, o_gdn) <= SAME_ARITHMETIC
    assert rel_rms_error(S, S_gdn) <= SAME_ARITHMETIC


@pin(make_problem(T=1, K=3, V=5), make_problem(B=2, T=7, H=3, K=5, V=2, initial_state=True, gate="lowerbound"))
@given(p=kda_problems(group=1))
def test_kda_is_dplr(p):
    # report §6.2: a_t = beta_t k_t, b_t = k_t * alpha_t, written key beta_t k_t (needs H == HV)
    beta_k = p.beta[..., None] * p.k  # [B, T, H, K]
    b = p.k * np.exp(p.g)  # [B, T, H, K]
    o, S = run(naive.kda, p)
    o_dplr, S_dplr = naive.dplr(p.q, beta_k, p.v, beta_k, b, p.g, output_final_state=True, **p.kwargs())
    assert rel_rms_error(o_dplr, o) <= SAME_ARITHMETIC
    assert rel_rms_error(S_dplr, S) <= SAME_ARITHMETIC


@pin(*AWKWARD, scale=1.0)
@given(p=kda_problems(), scale=st.floats(0.125, 2.0))
def test_linear_attention_is_masked_attention_without_softmax(p, scale):
    # O = scale * (Tril(Q K^T) V + Q S_0),  S_L = S_0 + K^T V   per sequence and value head
    B, T, H, HV, K, V = p.shape
    S0 = p.state0()
    o_ref, S_ref = np.zeros((B, T, HV, V)), np.zeros_like(S0)
    for n, (b, bos, eos) in enumerate(p.spans):
        for h in range(HV):
            Q, Kk = p.q[b, bos:eos, h // (HV // H)], p.k[b, bos:eos, h // (HV // H)]  # [L, K]
            Vv = p.v[b, bos:eos, h]  # [L, V]
            o_ref[b, bos:eos, h] = scale * (np.tril(Q @ Kk.T) @ Vv + Q @ S0[n, h])
            S_ref[n, h] = S0[n, h] + Kk.T @ Vv
    o, S = naive.linear_attention(p.q, p.k, p.v, scale=scale, output_final_state=True, **p.kwargs())
    assert rel_rms_error(o, o_ref) <= SAME_ARITHMETIC
    assert rel_rms_error(S, S_ref) <= SAME_ARITHMETIC


# --- closed forms of degenerate cases ---------------------------------------------------------


@pin(ODD_GVA, PACKED, STRONG)
@given(p=kda_problems(initial_state=True))
def test_without_writes_the_state_only_decays(p):
    # beta = 0: S_t = Diag(Gamma_t) S_0, so o_t = scale * (Gamma_t * q_t) S_0 and S_L = Diag(Gamma_L) S_0
    B, T, H, HV, K, V = p.shape
    scale = K**-0.5
    o_ref, S_ref = np.zeros((B, T, HV, V)), np.zeros_like(p.initial_state)
    for n, (b, bos, eos) in enumerate(p.spans):
        for h in range(HV):
            G = np.cumsum(p.g[b, bos:eos, h], axis=0)  # [L, K]
            S0 = p.initial_state[n, h]
            o_ref[b, bos:eos, h] = scale * (np.exp(G) * p.q[b, bos:eos, h // (HV // H)]) @ S0
            S_ref[n, h] = np.exp(p.g[b, bos:eos, h].sum(axis=0))[:, None] * S0  # an empty sequence keeps S_0
    o, S = run(naive.kda, p, beta=np.zeros_like(p.beta))
    assert rel_rms_error(o, o_ref) <= SAME_ARITHMETIC
    assert rel_rms_error(S, S_ref) <= SAME_ARITHMETIC


@example(T=1, extra=0, V=1, seed=0)
@example(T=5, extra=0, V=3, seed=1)  # K == T: the keys span the whole key space
@given(T=st.integers(1, 6), extra=st.integers(0, 3), V=st.integers(1, 5), seed=seeds)
def test_delta_rule_recalls_orthonormal_keys_exactly(T, extra, V, seed):
    # g = 0, beta = 1: each token is one exact step of online regression; with orthonormal keys the
    # later writes never disturb the earlier ones, so S_T^T k_j == v_j for every j.
    K = T + extra
    rng = np.random.default_rng(seed)
    basis, _ = np.linalg.qr(rng.standard_normal((K, K)))  # orthogonal [K, K]
    keys = basis.T[:T]  # [T, K], orthonormal rows
    values = rng.standard_normal((T, V))
    k = keys[None, :, None, :]  # [1, T, 1, K]
    v = values[None, :, None, :]  # [1, T, 1, V]
    _, S = naive.kda(k, k, v, np.zeros((1, T, 1, K)), np.ones((1, T, 1)), output_final_state=True)
    recalled = keys @ S[0, 0]  # row j: (S_T^T k_j)^T   [T, V]
    assert rel_rms_error(recalled, values) <= SAME_ARITHMETIC


def test_delta_rule_recall_is_not_exact_for_overlapping_keys():
    # k_2 is at 45 degrees to k_1: writing v_2 under k_2 also changes what k_1 recalls.
    keys = np.array([[1.0, 0.0], [1.0, 1.0] / np.sqrt(2.0)])  # [T=2, K=2], unit but not orthogonal
    values = np.array([[1.0], [0.0]])  # [T, V=1]
    k, v = keys[None, :, None, :], values[None, :, None, :]
    _, S = naive.kda(k, k, v, np.zeros((1, 2, 1, 2)), np.ones((1, 2, 1)), output_final_state=True)
    recalled = keys @ S[0, 0]  # [T, V]
    assert abs(recalled[1, 0] - values[1, 0]) <= 1e-15  # the last write is recalled exactly
    assert abs(recalled[0, 0] - values[0, 0]) >= 0.49  # the first is off by 1/2 (k_1 . k_2 = 1/sqrt 2, squared)


# --- invariants: how a call may be cut up ------------------------------------------------------


@IMPLS
@example(p=make_problem(T=2, K=3, V=5), cut=0)
@example(p=make_problem(B=2, T=9, H=2, HV=4, K=5, V=3, initial_state=True, gate="lowerbound"), cut=5)
@given(p=kda_problems(T=(2, 16), varlen=False), cut=st.integers(0, 2**16))
def test_split_and_carry_the_state_equals_one_pass(impl, p, cut):
    T = p.shape[1]
    s = 1 + cut % (T - 1)  # split point in [1, T - 1]: both halves non-empty
    head, tail = slice(0, s), slice(s, T)
    o, S = run(impl, p)
    o_head, S_head = impl(*(x[:, head] for x in p.args()), initial_state=p.initial_state, output_final_state=True)
    o_tail, S_tail = impl(*(x[:, tail] for x in p.args()), initial_state=S_head, output_final_state=True)
    assert rel_rms_error(np.concatenate([o_head, o_tail], axis=1), o) <= SAME_ARITHMETIC
    assert rel_rms_error(S_tail, S) <= SAME_ARITHMETIC


@IMPLS
@pin(PACKED, make_problem(T=4, HV=2, K=2, V=3, cu_seqlens=[0, 4, 4]), make_problem(T=3, cu_seqlens=[0, 0, 0, 3]))
@given(p=kda_problems(T=(1, 16), varlen=True))
def test_packed_batch_equals_separate_calls(impl, p):
    o, S = run(impl, p)
    S0 = p.state0()
    for n, (_, bos, eos) in enumerate(p.spans):
        if eos == bos:  # an empty sequence outputs nothing and passes its state through
            np.testing.assert_array_equal(S[n], S0[n])
            continue
        seq = slice(bos, eos)
        o_n, S_n = impl(*(x[:, seq] for x in p.args()), initial_state=S0[n : n + 1], output_final_state=True)
        assert rel_rms_error(o[:, seq], o_n) <= SAME_ARITHMETIC
        assert rel_rms_error(S[n : n + 1], S_n) <= SAME_ARITHMETIC


@IMPLS
@pin(ODD_GVA, PACKED, make_problem(T=3, H=3, HV=9, K=2, V=1))
@given(p=kda_problems(group=(2, 3)))
def test_gva_equals_repeated_query_key_heads(impl, p):
    # value head j reads q/k head j // group: the same as giving every value head its own copy
    _, _, H, HV, _, _ = p.shape
    q_rep, k_rep = (np.repeat(x, HV // H, axis=2) for x in (p.q, p.k))  # [B, T, HV, K]
    o, S = run(impl, p)
    o_rep, S_rep = run(impl, p, q=q_rep, k=k_rep)
    assert rel_rms_error(o, o_rep) <= SAME_ARITHMETIC
    assert rel_rms_error(S, S_rep) <= SAME_ARITHMETIC


# --- dtypes and numerics -----------------------------------------------------------------------


@IMPLS
@pytest.mark.parametrize("v_dtype", [np.float32, np.float64])
@pin(T1, PACKED)
@given(p=kda_problems(T=(1, 6)))
def test_output_dtype_follows_v_and_state_is_float64(impl, v_dtype, p):
    f32 = {name: x.astype(np.float32) for name, x in zip(("q", "k", "g", "beta"), (p.q, p.k, p.g, p.beta))}
    S0 = None if p.initial_state is None else p.initial_state.astype(np.float32)
    v = p.v.astype(v_dtype)
    o, S = run(impl, p, v=v, initial_state=S0, **f32)
    assert o.dtype == v_dtype
    assert S.dtype == np.float64
    # the computation itself is float64 whatever comes in: only o is rounded on the way out
    o64, S64 = run(impl, p, v=v.astype(np.float64), initial_state=S0, **{n: x.astype(np.float64) for n, x in f32.items()})
    np.testing.assert_array_equal(S, S64)
    np.testing.assert_array_equal(o, o64.astype(v_dtype))


def _saturated(T: int, HV: int, K: int, V: int) -> Problem:
    """Every channel at the lower bound: log decay -5 per token, cumulative -5 T."""
    p = make_problem(T=T, HV=HV, K=K, V=V, initial_state=True, gate="lowerbound")
    return p.replace(g=naive.lowerbound_gate(np.full(p.g.shape, 50.0), lower_bound=-5.0))


@example(p=_saturated(T=80, HV=2, K=3, V=2))
@example(p=_saturated(T=160, HV=1, K=4, V=4))  # cumulative log decay -800: exp(G) underflows to 0
@given(p=kda_problems(B=1, T=(64, 96), H=1, group=(1, 2), K=(1, 4), V=(1, 4), varlen=False, gates=("lowerbound",)))
def test_strong_gates_stay_finite_and_forms_agree(p):
    with np.errstate(over="raise", divide="raise", invalid="raise"):  # underflow to 0 is fine
        o, S = run(naive.kda, p)
        o_par, S_par = run(naive.kda_parallel, p)
    for x in (o, S, o_par, S_par):
        assert np.all(np.isfinite(x))
    assert rel_rms_error(o_par, o) <= PARALLEL
    assert rel_rms_error(S_par, S) <= PARALLEL


# --- gates -------------------------------------------------------------------------------------

BIAS_LAYOUTS = pytest.mark.parametrize("layout", ["[HV * K]", "[HV, K]", "none"])


def _gate_inputs(layout: str, HV: int, K: int, seed: int):
    """``x [2, 3, HV, K]``, ``A_log [HV]``, ``dt_bias`` as passed (per ``layout``) and as ``[HV, K]``.

    Moderate ranges, so that every sigmoid argument stays within +-17 and the
    bounds of the gates hold strictly.
    """
    rng = np.random.default_rng(seed)
    x = rng.uniform(-4.0, 4.0, (2, 3, HV, K))
    A_log = rng.uniform(-1.0, 1.0, HV)
    bias = rng.uniform(-2.0, 2.0, (HV, K))
    passed = {"[HV * K]": bias.reshape(HV * K), "[HV, K]": bias, "none": None}[layout]
    return x, A_log, passed, (np.zeros((HV, K)) if layout == "none" else bias)


@BIAS_LAYOUTS
@given(HV=st.integers(1, 4), K=st.integers(1, 6), seed=seeds)
def test_kda_gate_formula(layout, HV, K, seed):
    x, A_log, dt_bias, bias = _gate_inputs(layout, HV, K, seed)
    g = naive.kda_gate(x, A_log, dt_bias)
    expected = -np.exp(A_log)[:, None] * np.log1p(np.exp(x + bias))  # -exp(A_log[h]) softplus(x + dt_bias[h, :])
    assert g.shape == x.shape and g.dtype == np.float64
    np.testing.assert_allclose(g, expected, rtol=1e-13, atol=0)
    assert np.all(g <= 0)


@BIAS_LAYOUTS
@given(HV=st.integers(1, 4), K=st.integers(1, 6), seed=seeds, lower_bound=st.floats(-10.0, -0.1))
def test_lowerbound_gate_formula(layout, HV, K, seed, lower_bound):
    x, A_log, dt_bias, bias = _gate_inputs(layout, HV, K, seed)
    A_log = None if layout == "none" else A_log
    rate = np.ones((HV, 1)) if A_log is None else np.exp(A_log)[:, None]
    g = naive.lowerbound_gate(x, A_log, dt_bias, lower_bound=lower_bound)
    expected = lower_bound / (1.0 + np.exp(-rate * (x + bias)))  # lower_bound * sigmoid(exp(A_log[h]) (x + dt_bias))
    assert g.shape == x.shape and g.dtype == np.float64
    np.testing.assert_allclose(g, expected, rtol=1e-13, atol=0)
    assert np.all((lower_bound < g) & (g < 0))


def test_lowerbound_gate_defaults():
    x = np.array([[[-50.0, 0.0, 50.0]]])  # [1, HV=1, K=3]
    np.testing.assert_allclose(naive.lowerbound_gate(x), [[[-5.0 * 1.0 / (1.0 + np.exp(50.0)), -2.5, -5.0]]], rtol=1e-12)


@given(n=st.integers(1, 5), K=st.integers(1, 8), seed=seeds, magnitude=st.sampled_from([1e-2, 1.0, 1e3]))
def test_l2norm_gives_unit_rows(n, K, seed, magnitude):
    x = magnitude * np.random.default_rng(seed).standard_normal((n, K))
    sq = np.sum(x * x, axis=-1, keepdims=True)
    np.testing.assert_allclose(np.linalg.norm(naive.l2norm(x, eps=0.0), axis=-1), 1.0, rtol=1e-14)
    y = naive.l2norm(x)  # default eps = 1e-6: x / sqrt(|x|^2 + eps), a hair under unit norm
    np.testing.assert_allclose(y, x / np.sqrt(sq + 1e-6), rtol=1e-14)
    assert np.all(np.linalg.norm(y, axis=-1) <= 1.0)
    np.testing.assert_allclose(np.linalg.norm(y, axis=-1), 1.0, rtol=1e-6 / sq.min())


def test_l2norm_of_zero_is_zero():
    assert np.array_equal(naive.l2norm(np.zeros((2, 4))), np.zeros((2, 4)))


@given(x=st.lists(st.floats(-30.0, 30.0), min_size=1, max_size=8))
def test_beta_sigmoid_is_a_strength_in_open_unit_interval(x):
    x = np.array(x)
    beta = naive.beta_sigmoid(x)
    np.testing.assert_allclose(beta, 1.0 / (1.0 + np.exp(-x)), rtol=1e-13)
    assert np.all((0.0 < beta) & (beta < 1.0))


def test_gates_do_not_overflow_for_extreme_inputs():
    x = np.array([-1000.0, -30.0, 0.0, 30.0, 1000.0]).reshape(1, 1, 5)  # [1, HV=1, K=5]
    A_log = np.array([np.log(2.0)])
    with warnings.catch_warnings(), np.errstate(over="raise", divide="raise", invalid="raise"):
        warnings.simplefilter("error")
        g_kda = naive.kda_gate(x, A_log)
        g_lb = naive.lowerbound_gate(x, A_log, lower_bound=-5.0)
        beta = naive.beta_sigmoid(x)
        softplus, sigmoid = naive.softplus(x), naive.sigmoid(x)
    for y in (g_kda, g_lb, beta, softplus, sigmoid):
        assert np.all(np.isfinite(y))
    np.testing.assert_allclose(g_kda[0, 0, [0, 4]], [0.0, -2000.0], atol=1e-300)  # -2 softplus(x)
    assert np.all(g_kda <= 0)
    np.testing.assert_allclose(g_lb[0, 0, [0, 2, 4]], [0.0, -2.5, -5.0], atol=1e-300)
    assert np.all((-5.0 <= g_lb) & (g_lb <= 0))
    np.testing.assert_allclose(beta[0, 0, [0, 2, 4]], [0.0, 0.5, 1.0], atol=1e-300)
    assert np.all((0.0 <= beta) & (beta <= 1.0))
    np.testing.assert_array_equal(softplus[0, 0, [0, 4]], [0.0, 1000.0])
