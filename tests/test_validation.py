"""Every malformed call raises ValueError or TypeError naming the argument (DESIGN.md, *Errors*).

The checks are exercised through the public naive functions, which all validate
through :mod:`kda_explained.validation`; ``check_chunk_size`` (used by the chunked
and fast layers) is called directly.

A valid baseline call has ``B, T, H, HV, K, V = 2, 5, 2, 4, 3, 2`` (GVA, and
``K != V`` so that a transposed state is caught); each case changes one thing.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from kda_explained import naive
from kda_explained.validation import check_chunk_size, check_floating, check_kda_inputs

B, T, H, HV, K, V = 2, 5, 2, 4, 3, 2


def zeros(*shape, dtype=np.float64):
    return np.zeros(shape, dtype=dtype)


def baseline(B: int = B) -> dict:
    """A valid call: ``q, k: [B, T, H, K]``, ``v: [B, T, HV, V]``, ``g: [B, T, HV, K]``, ``beta: [B, T, HV]``."""
    return {"q": zeros(B, T, H, K), "k": zeros(B, T, H, K), "v": zeros(B, T, HV, V),
            "g": zeros(B, T, HV, K), "beta": zeros(B, T, HV)}


# Every public entry point, called with KDA's arguments; the lower rungs take what they need.
ENTRY_POINTS = {
    "kda": lambda q, k, v, g, beta, **kw: naive.kda(q, k, v, g, beta, **kw),
    "kda_parallel": lambda q, k, v, g, beta, **kw: naive.kda_parallel(q, k, v, g, beta, **kw),
    "deltanet": lambda q, k, v, g, beta, **kw: naive.deltanet(q, k, v, beta, **kw),
    "gated_deltanet": lambda q, k, v, g, beta, **kw: naive.gated_deltanet(q, k, v, zeros(*np.shape(v)[:3]), beta, **kw),
    "dplr": lambda q, k, v, g, beta, **kw: naive.dplr(q, k, v, g, g, g, **kw),
    "linear_attention": lambda q, k, v, g, beta, **kw: naive.linear_attention(q, k, v, **kw),
}
WITH_BETA = [name for name in ENTRY_POINTS if name not in ("dplr", "linear_attention")]
WITH_G = ["kda", "kda_parallel", "dplr"]


def call(entry: str, packed: bool = False, **changes):
    """Call ``ENTRY_POINTS[entry]`` on the baseline (``B = 1`` if ``packed``) with ``changes`` applied."""
    args = baseline(B=1 if packed else B)
    args.update(changes)
    q, k, v, g, beta = (args.pop(name) for name in ("q", "k", "v", "g", "beta"))
    return ENTRY_POINTS[entry](q, k, v, g, beta, output_final_state=True, **args)


def case(id, changes, error, pattern, packed=False):
    return pytest.param(changes, error, pattern, packed, id=id)


def cases(*params):
    return pytest.mark.parametrize("changes, error, pattern, packed", params)


def test_baseline_is_valid():
    for entry in ENTRY_POINTS:
        o, S = call(entry, initial_state=zeros(B, HV, K, V), scale=0.5)
        assert o.shape == (B, T, HV, V) and S.shape == (B, HV, K, V)
        o, S = call(entry, packed=True, cu_seqlens=[0, 2, 2, 5], initial_state=zeros(3, HV, K, V))
        assert o.shape == (1, T, HV, V) and S.shape == (3, HV, K, V)


# --- q, k, v, initial_state, cu_seqlens, scale: every entry point ------------------------------

SHARED = cases(
    # wrong rank
    case("q 3-D", {"q": zeros(B, T, H)}, ValueError, r"^q: expected a 4-D array \[B, T, H, K\], got 3-D shape \[2, 5, 2\]"),
    case("q 5-D", {"q": zeros(B, T, H, K, 1)}, ValueError, r"^q: expected a 4-D array"),
    case("k 3-D", {"k": zeros(B, T, H)}, ValueError, r"^k: expected shape \[B, T, H, K\] = \[2, 5, 2, 3\] to match q, got \[2, 5, 2\]"),
    case("v 3-D", {"v": zeros(B, T, HV)}, ValueError, r"^v: expected a 4-D array \[B, T, HV, V\], got 3-D"),
    case("v 5-D", {"v": zeros(B, T, HV, V, 1)}, ValueError, r"^v: expected a 4-D array"),
    case("state 3-D", {"initial_state": zeros(HV, K, V)}, ValueError, r"^initial_state: expected a 4-D array \[N, HV, K, V\]"),
    # mismatched shapes
    case("k K", {"k": zeros(B, T, H, K + 1)}, ValueError, r"^k: expected shape \[B, T, H, K\] = \[2, 5, 2, 3\] to match q, got \[2, 5, 2, 4\]"),
    case("k T", {"k": zeros(B, T + 1, H, K)}, ValueError, r"^k: expected shape .* got \[2, 6, 2, 3\]"),
    case("k H", {"k": zeros(B, T, H + 1, K)}, ValueError, r"^k: expected shape .* got \[2, 5, 3, 3\]"),
    case("v B", {"v": zeros(B - 1, T, HV, V)}, ValueError, r"^v: expected shape \[B, T, HV, V\] with \[B, T\] = \[2, 5\] to match q, got \[1, 5, 4, 2\]"),
    case("v T", {"v": zeros(B, T - 1, HV, V)}, ValueError, r"^v: expected shape .* to match q, got \[2, 4, 4, 2\]"),
    case("HV not a multiple of H", {"v": zeros(B, T, 3, V)}, ValueError, r"^v: expected the number of value heads HV to be a positive multiple of H = 2 \(GVA\), got HV = 3"),
    case("HV < H", {"v": zeros(B, T, 1, V)}, ValueError, r"^v: .*multiple of H = 2.*got HV = 1"),
    case("T = 0", {"q": zeros(B, 0, H, K), "k": zeros(B, 0, H, K), "v": zeros(B, 0, HV, V),
                   "g": zeros(B, 0, HV, K), "beta": zeros(B, 0, HV)}, ValueError, r"^q: expected B, T, K, V >= 1"),
    case("state N", {"initial_state": zeros(B - 1, HV, K, V)}, ValueError, r"^initial_state: expected shape \[N, HV, K, V\] = \[2, 4, 3, 2\], got \[1, 4, 3, 2\]"),
    case("state HV", {"initial_state": zeros(B, H, K, V)}, ValueError, r"^initial_state: expected shape .* got \[2, 2, 3, 2\]"),
    case("state transposed [V, K]", {"initial_state": zeros(B, HV, V, K)}, ValueError, r"^initial_state: expected shape \[N, HV, K, V\] = \[2, 4, 3, 2\], got \[2, 4, 2, 3\]"),
    # types
    case("q int", {"q": zeros(B, T, H, K, dtype=np.int64)}, TypeError, r"^q: expected a floating-point dtype, got int64"),
    case("k int", {"k": zeros(B, T, H, K, dtype=np.int32)}, TypeError, r"^k: expected a floating-point dtype, got int32"),
    case("v int", {"v": zeros(B, T, HV, V, dtype=np.int64)}, TypeError, r"^v: expected a floating-point dtype, got int64"),
    case("v bool", {"v": zeros(B, T, HV, V, dtype=bool)}, TypeError, r"^v: expected a floating-point dtype, got bool"),
    case("v complex", {"v": zeros(B, T, HV, V, dtype=np.complex128)}, TypeError, r"^v: expected a floating-point dtype, got complex128"),
    case("q None", {"q": None}, TypeError, r"^q: expected a floating-point dtype, got object"),
    case("k str", {"k": "k"}, TypeError, r"^k: expected a floating-point dtype"),
    case("state int", {"initial_state": zeros(B, HV, K, V, dtype=np.int64)}, TypeError, r"^initial_state: expected a floating-point dtype, got int64"),
    case("state list", {"initial_state": zeros(B, HV, K, V).tolist()}, TypeError, r"^initial_state: expected an array or tensor, got list"),
    # scale
    case("scale nan", {"scale": float("nan")}, ValueError, r"^scale: expected a finite number, got nan"),
    case("scale inf", {"scale": float("inf")}, ValueError, r"^scale: expected a finite number, got inf"),
    case("scale -inf", {"scale": -np.inf}, ValueError, r"^scale: expected a finite number, got -inf"),
    case("scale np.nan32", {"scale": np.float32("nan")}, ValueError, r"^scale: expected a finite number"),
    case("scale str", {"scale": "0.5"}, TypeError, r"^scale: expected a float, got str"),
    case("scale list", {"scale": [0.5]}, TypeError, r"^scale: expected a float, got list"),
    case("scale bool", {"scale": True}, TypeError, r"^scale: expected a float, got bool"),
    case("scale complex", {"scale": 0.5j}, TypeError, r"^scale: expected a float, got complex"),
    # cu_seqlens
    case("cu 2-D", {"cu_seqlens": np.array([[0, 5]])}, ValueError, r"^cu_seqlens: expected a 1-D array \[N \+ 1\], got shape \[1, 2\]", True),
    case("cu one entry", {"cu_seqlens": np.array([0])}, ValueError, r"^cu_seqlens: expected at least 2 entries", True),
    case("cu start", {"cu_seqlens": np.array([1, 5])}, ValueError, r"^cu_seqlens: expected to start at 0, got 1", True),
    case("cu decreasing", {"cu_seqlens": np.array([0, 3, 2, 5])}, ValueError, r"^cu_seqlens: expected non-decreasing offsets, got \[0, 3, 2, 5\]", True),
    case("cu end short", {"cu_seqlens": np.array([0, 2, 4])}, ValueError, r"^cu_seqlens: expected to end at T = 5, got 4", True),
    case("cu end long", {"cu_seqlens": np.array([0, 2, 6])}, ValueError, r"^cu_seqlens: expected to end at T = 5, got 6", True),
    case("cu with B = 2", {"cu_seqlens": np.array([0, 2, 5])}, ValueError, r"^cu_seqlens: expected a packed batch with B = 1, got B = 2"),
    case("cu float", {"cu_seqlens": np.array([0.0, 5.0])}, TypeError, r"^cu_seqlens: expected an integer dtype, got float64", True),
    case("cu bool", {"cu_seqlens": np.array([False, True])}, TypeError, r"^cu_seqlens: expected an integer dtype, got bool", True),
    case("cu str", {"cu_seqlens": "0,5"}, TypeError, r"^cu_seqlens: expected a 1-D integer array or tensor, got str", True),
    case("cu state N", {"cu_seqlens": np.array([0, 2, 5]), "initial_state": zeros(1, HV, K, V)}, ValueError,
         r"^initial_state: expected shape \[N, HV, K, V\] = \[2, 4, 3, 2\], got \[1, 4, 3, 2\]", True),
)


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@SHARED
def test_malformed_call_names_the_argument(entry, changes, error, pattern, packed):
    with pytest.raises(error, match=pattern):
        call(entry, packed, **changes)


@pytest.mark.parametrize("entry", WITH_BETA)
@cases(
    case("beta 2-D", {"beta": zeros(B, T)}, ValueError, r"^beta: expected shape \[B, T, HV\] = \[2, 5, 4\], got \[2, 5\]"),
    case("beta 4-D", {"beta": zeros(B, T, HV, 1)}, ValueError, r"^beta: expected shape \[B, T, HV\] = \[2, 5, 4\], got \[2, 5, 4, 1\]"),
    case("beta per q/k head", {"beta": zeros(B, T, H)}, ValueError, r"^beta: expected shape \[B, T, HV\] = \[2, 5, 4\], got \[2, 5, 2\]"),
    case("beta T", {"beta": zeros(B, T + 1, HV)}, ValueError, r"^beta: expected shape .* got \[2, 6, 4\]"),
    case("beta int", {"beta": zeros(B, T, HV, dtype=np.int64)}, TypeError, r"^beta: expected a floating-point dtype, got int64"),
    case("beta None", {"beta": None}, TypeError, r"^beta: expected a floating-point dtype, got object"),
)
def test_malformed_beta_names_beta(entry, changes, error, pattern, packed):
    with pytest.raises(error, match=pattern):
        call(entry, packed, **changes)


@pytest.mark.parametrize("entry", WITH_G)
@cases(
    case("g 3-D", {"g": zeros(B, T, HV)}, ValueError, r"^g: expected shape \[B, T, HV, K\] = \[2, 5, 4, 3\], got \[2, 5, 4\]"),
    case("g 5-D", {"g": zeros(B, T, HV, K, 1)}, ValueError, r"^g: expected shape \[B, T, HV, K\] = \[2, 5, 4, 3\], got \[2, 5, 4, 3, 1\]"),
    case("g per q/k head", {"g": zeros(B, T, H, K)}, ValueError, r"^g: expected shape .* got \[2, 5, 2, 3\]"),
    case("g K", {"g": zeros(B, T, HV, K + 1)}, ValueError, r"^g: expected shape .* got \[2, 5, 4, 4\]"),
    case("g int", {"g": zeros(B, T, HV, K, dtype=np.int64)}, TypeError, r"^g: expected a floating-point dtype, got int64"),
    case("g None", {"g": None}, TypeError, r"^g: expected a floating-point dtype, got object"),
)
def test_malformed_g_names_g(entry, changes, error, pattern, packed):
    with pytest.raises(error, match=pattern):
        call(entry, packed, **changes)


def test_message_gives_expected_and_given_shapes_in_full():
    # the example of DESIGN.md, *Errors*, at the baseline's sizes
    with pytest.raises(ValueError) as info:
        call("kda", k=zeros(B, T, H, K + 1))
    assert str(info.value) == "k: expected shape [B, T, H, K] = [2, 5, 2, 3] to match q, got [2, 5, 2, 4]"
    with pytest.raises(ValueError) as info:
        check_kda_inputs(zeros(2, 128, 4, 64), zeros(2, 128, 4, 32), zeros(2, 128, 4, 64), None, None)
    assert str(info.value) == "k: expected shape [B, T, H, K] = [2, 128, 4, 64] to match q, got [2, 128, 4, 32]"


# --- arguments of single rungs --------------------------------------------------------------------


@pytest.mark.parametrize(
    "g, error, pattern",
    [
        (zeros(B, T, HV, K), ValueError, r"^g: expected shape \[B, T, HV\] = \[2, 5, 4\] to match v, got \[2, 5, 4, 3\]"),
        (zeros(B, T, H), ValueError, r"^g: expected shape \[B, T, HV\] = \[2, 5, 4\] to match v, got \[2, 5, 2\]"),
        (zeros(B, T, HV, dtype=np.int64), TypeError, r"^g: expected a floating-point dtype, got int64"),
    ],
)
def test_gated_deltanet_takes_one_decay_per_head(g, error, pattern):
    a = baseline()
    with pytest.raises(error, match=pattern):
        naive.gated_deltanet(a["q"], a["k"], a["v"], g, a["beta"])


@pytest.mark.parametrize(
    "name, x, error, pattern",
    [
        ("a", zeros(B, T, HV, K + 1), ValueError, r"^a: expected shape \[B, T, HV, K\] = \[2, 5, 4, 3\] like g, got \[2, 5, 4, 4\]"),
        ("b", zeros(B, T, H, K), ValueError, r"^b: expected shape \[B, T, HV, K\] = \[2, 5, 4, 3\] like g, got \[2, 5, 2, 3\]"),
        ("a", zeros(B, T, HV, K, dtype=np.int64), TypeError, r"^a: expected a floating-point dtype, got int64"),
        ("b", None, TypeError, r"^b: expected a floating-point dtype, got object"),
    ],
)
def test_dplr_low_rank_factors_match_g(name, x, error, pattern):
    a = baseline()
    factors = {"a": a["g"], "b": a["g"], name: x}
    with pytest.raises(error, match=pattern):
        naive.dplr(a["q"], a["k"], a["v"], factors["a"], factors["b"], a["g"])


# --- chunk_size (chunked and fast layers) ----------------------------------------------------------


@pytest.mark.parametrize("chunk_size", [1, 16, 64, np.int64(32)])
def test_chunk_size_power_of_two_is_accepted(chunk_size):
    c = check_chunk_size(chunk_size)
    assert c == int(chunk_size) and type(c) is int
    assert check_chunk_size(chunk_size, allowed=(1, 16, 32, 64)) == c


@pytest.mark.parametrize(
    "chunk_size, allowed, error, pattern",
    [
        (0, None, ValueError, r"^chunk_size: expected a power of two, got 0"),
        (-16, None, ValueError, r"^chunk_size: expected a power of two, got -16"),
        (3, None, ValueError, r"^chunk_size: expected a power of two, got 3"),
        (48, None, ValueError, r"^chunk_size: expected a power of two, got 48"),
        (128, (16, 32, 64), ValueError, r"^chunk_size: expected one of \[16, 32, 64\], got 128"),
        (64.0, None, TypeError, r"^chunk_size: expected an int, got float"),
        ("64", None, TypeError, r"^chunk_size: expected an int, got str"),
        (True, None, TypeError, r"^chunk_size: expected an int, got bool"),
        (None, None, TypeError, r"^chunk_size: expected an int, got NoneType"),
    ],
)
def test_bad_chunk_size(chunk_size, allowed, error, pattern):
    with pytest.raises(error, match=pattern):
        check_chunk_size(chunk_size, allowed=allowed)


def test_check_floating_rejects_non_arrays():
    with pytest.raises(TypeError, match=r"^q: expected an array or tensor, got list"):
        check_floating("q", [1.0, 2.0])


# --- gates ---------------------------------------------------------------------------------------

GATES = pytest.mark.parametrize("gate", [naive.kda_gate, naive.lowerbound_gate], ids=["kda_gate", "lowerbound_gate"])
X = zeros(T, HV, K)  # [T, HV, K]


@GATES
@pytest.mark.parametrize("dt_bias", [None, zeros(HV * K), zeros(HV, K)], ids=["none", "[HV * K]", "[HV, K]"])
def test_gate_parameters_are_accepted(gate, dt_bias):
    assert gate(X, zeros(HV), dt_bias).shape == X.shape


@GATES
@pytest.mark.parametrize(
    "x, A_log, dt_bias, error, pattern",
    [
        (X, zeros(HV + 1), None, ValueError, r"^A_log: expected shape \[HV\] = \[4\], got \[5\]"),
        (X, zeros(HV, 1), None, ValueError, r"^A_log: expected shape \[HV\] = \[4\], got \[4, 1\]"),
        (X, zeros(HV), zeros(HV * K + 1), ValueError,
         r"^dt_bias: expected shape \[HV \* K\] = \[12\] or \[HV, K\] = \[4, 3\], got \[13\]"),
        (X, zeros(HV), zeros(K, HV), ValueError, r"^dt_bias: expected shape .* got \[3, 4\]"),
        (X, zeros(HV), zeros(K), ValueError, r"^dt_bias: expected shape .* got \[3\]"),
        (zeros(K), zeros(HV), None, ValueError, r"^x: expected shape \[\.\.\., HV, K\], got \[3\]"),
        (zeros(T, HV, K, dtype=np.int64), zeros(HV), None, TypeError, r"^x: expected a floating-point dtype, got int64"),
    ],
)
def test_malformed_gate_parameters(gate, x, A_log, dt_bias, error, pattern):
    with pytest.raises(error, match=pattern):
        gate(x, A_log, dt_bias)


@pytest.mark.parametrize("lower_bound", [0.0, 1.0, float("nan"), float("inf"), -float("inf")])
def test_lowerbound_gate_needs_a_finite_negative_bound(lower_bound):
    with pytest.raises(ValueError, match=r"^lower_bound: expected a finite negative number, got " + re.escape(str(lower_bound))):
        naive.lowerbound_gate(X, lower_bound=lower_bound)


# --- the same module serves torch tensors ----------------------------------------------------------


def test_checks_read_torch_tensors():
    torch = pytest.importorskip("torch")
    a = {name: torch.from_numpy(x) for name, x in baseline().items()}
    p = check_kda_inputs(a["q"], a["k"], a["v"], a["g"].to(torch.bfloat16), a["beta"].half())
    assert (p.B, p.T, p.H, p.HV, p.K, p.V, p.N) == (B, T, H, HV, K, V, B)
    with pytest.raises(TypeError, match=r"^v: expected a floating-point dtype, got int64"):
        check_kda_inputs(a["q"], a["k"], a["v"].long(), a["g"], a["beta"])
    with pytest.raises(ValueError, match=r"^cu_seqlens: expected a packed batch with B = 1, got B = 2"):
        check_kda_inputs(a["q"], a["k"], a["v"], a["g"], a["beta"], cu_seqlens=torch.tensor([0, 2, 5]))
    with pytest.raises(TypeError, match=r"^cu_seqlens: expected an integer dtype, got float32"):
        check_kda_inputs(a["q"], a["k"], a["v"], a["g"], a["beta"], cu_seqlens=torch.tensor([0.0, 5.0]))
