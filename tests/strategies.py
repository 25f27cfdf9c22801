"""The one place for hypothesis strategies, shared by every test module.

A drawn :class:`Problem` is a ``kda(...)`` call inside the valid domain of the
design contract (docs/design.md): L2-normalised ``k``, ``beta`` in ``[0, 1]``, ``g <= 0``. Hypothesis
draws only the sizes, the layout (packed or not, initial state or not) and an
integer seed; the arrays come from ``numpy.random.default_rng(seed)``. That keeps
drawing fast and lets a failing case shrink to small sizes and a small seed.

The naive tests use NumPy only; :func:`to_torch` imports torch when it is called,
for the chunked and fast layers.

Glossary (the design contract (docs/design.md), *Shared signature*)
-------------------------------------------------------------------
=========  ==============================================================
``B, T``   batch rows, tokens per row (``B == 1`` for a packed batch)
``H``      query/key heads
``HV``     value heads, ``HV = H * group`` (grouped value heads, GVA)
``K, V``   key and value widths; the state is ``[K, V]`` per value head
``N``      sequences: ``B``, or ``len(cu_seqlens) - 1``
=========  ==============================================================

Size arguments of :func:`kda_problems` take an int, an inclusive ``(lo, hi)``
range or any integer strategy, e.g. ``kda_problems(T=(1, 200), K=st.sampled_from([16, 32]))``.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence, Tuple, Union

import numpy as np
from hypothesis import example
from hypothesis import strategies as st

from kda_explained.naive import l2norm, lowerbound_gate

__all__ = ["Problem", "make_problem", "kda_problems", "to_torch", "GATES", "EDGE_GATES", "STRONG_GATES"]

Size = Union[int, Tuple[int, int], st.SearchStrategy]

#: How ``g`` is drawn: ``"mild"``: ``-uniform(0, 0.5)`` per channel (slow decay, long memory);
#: ``"lowerbound"``: :func:`lowerbound_gate` with ``lower_bound = -5`` (down to ``exp(-5)`` a token).
GATES = ("mild", "lowerbound")
#: The edge of the gate domain as well: ``"resets"`` is ``"mild"`` with about one token row in
#: eight given, on some channels, a gate from :data:`STRONG_GATES` (full resets and ones in effect).
EDGE_GATES = GATES + ("resets",)
#: Log decays at the edge of the domain: a full reset, finite gates that are resets in effect in
#: every dtype, and strong ones that are not in float64.
STRONG_GATES = (-np.inf, -1e10, -1e6, -800.0, -300.0, -90.0)


@dataclasses.dataclass(frozen=True)
class Problem:
    """One ``kda(...)`` call: arrays in float64, shapes as in the design contract (docs/design.md)."""

    q: np.ndarray  # [B, T, H, K]
    k: np.ndarray  # [B, T, H, K], unit rows (l2norm)
    v: np.ndarray  # [B, T, HV, V]
    g: np.ndarray  # [B, T, HV, K], <= 0
    beta: np.ndarray  # [B, T, HV], in [0, 1]
    initial_state: Optional[np.ndarray]  # [N, HV, K, V] or None
    cu_seqlens: Optional[np.ndarray]  # [N + 1] int64 or None
    seed: int
    gate: str

    @property
    def shape(self) -> Tuple[int, int, int, int, int, int]:
        """``(B, T, H, HV, K, V)``."""
        B, T, H, K = self.q.shape
        HV, V = self.v.shape[2:]
        return B, T, H, HV, K, V

    @property
    def spans(self) -> Tuple[Tuple[int, int, int], ...]:
        """The sequences as ``(b, bos, eos)``: row ``b``, tokens ``bos:eos`` (as ``validation.KDAProblem``)."""
        B, T = self.q.shape[:2]
        if self.cu_seqlens is None:
            return tuple((b, 0, T) for b in range(B))
        cu = self.cu_seqlens.tolist()
        return tuple((0, cu[n], cu[n + 1]) for n in range(len(cu) - 1))

    @property
    def N(self) -> int:
        return len(self.spans)

    def args(self) -> Tuple[np.ndarray, ...]:
        """``(q, k, v, g, beta)``, the positional arguments of ``kda``."""
        return self.q, self.k, self.v, self.g, self.beta

    def kwargs(self) -> dict:
        """``initial_state`` and ``cu_seqlens``, the keyword arguments of ``kda``."""
        return {"initial_state": self.initial_state, "cu_seqlens": self.cu_seqlens}

    def state0(self) -> np.ndarray:
        """The initial state, zeros when there is none: ``[N, HV, K, V]``."""
        _, _, _, HV, K, V = self.shape
        return np.zeros((self.N, HV, K, V)) if self.initial_state is None else self.initial_state

    def replace(self, **changes: Any) -> "Problem":
        return dataclasses.replace(self, **changes)


def make_problem(
    B: int = 1,
    T: int = 5,
    H: int = 1,
    HV: Optional[int] = None,
    K: int = 4,
    V: int = 4,
    *,
    seed: int = 0,
    cu_seqlens: Optional[Sequence[int]] = None,
    initial_state: bool = False,
    gate: str = "mild",
) -> Problem:
    """Build a problem deterministically from sizes and a seed (also what ``@example`` pins).

    >>> p = make_problem(T=3, H=1, HV=2, K=3, V=5, cu_seqlens=[0, 0, 3], initial_state=True)
    >>> p.shape, p.N, p.initial_state.shape
    ((1, 3, 1, 2, 3, 5), 2, (2, 2, 3, 5))
    """
    HV = H if HV is None else HV
    if gate not in EDGE_GATES:
        raise ValueError(f"gate: expected one of {EDGE_GATES}, got {gate!r}")
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K))
    k = l2norm(rng.standard_normal((B, T, H, K)))
    v = rng.standard_normal((B, T, HV, V))
    if gate in ("mild", "resets"):
        g = -rng.uniform(0.0, 0.5, (B, T, HV, K))
        if gate == "resets":
            rows = rng.random((B, T, HV)) < 0.125  # [B, T, HV]: the token rows that get a strong gate
            channels = rng.random((B, T, HV, K)) < 0.5
            strong = rng.choice(np.array(STRONG_GATES), size=(B, T, HV, K))
            g = np.where(rows[..., None] & channels, strong, g)
    else:
        A_log = rng.uniform(-1.0, 1.0, HV)
        dt_bias = rng.standard_normal((HV, K))
        g = lowerbound_gate(2.0 * rng.standard_normal((B, T, HV, K)), A_log, dt_bias, lower_bound=-5.0)
    beta = rng.uniform(0.0, 1.0, (B, T, HV))
    cu = None if cu_seqlens is None else np.asarray(cu_seqlens, dtype=np.int64)
    N = B if cu is None else len(cu) - 1
    S0 = rng.standard_normal((N, HV, K, V)) if initial_state else None
    return Problem(q, k, v, g, beta, S0, cu, seed, gate)


def _ints(size: Size) -> st.SearchStrategy:
    if isinstance(size, st.SearchStrategy):
        return size
    if isinstance(size, tuple):
        return st.integers(*size)
    return st.just(int(size))


@st.composite
def kda_problems(
    draw,
    *,
    B: Size = (1, 2),
    T: Size = (1, 12),
    H: Size = (1, 2),
    group: Size = (1, 3),
    K: Size = (1, 6),
    V: Size = (1, 6),
    varlen: Optional[bool] = None,
    max_seqs: int = 4,
    initial_state: Optional[bool] = None,
    gates: Sequence[str] = GATES,
) -> Problem:
    """Draw a :class:`Problem`; ``HV = H * group``.

    ``varlen``: ``True`` always packs (``B = 1``, ``cu_seqlens`` with 1 to
    ``max_seqs`` sequences, zero lengths allowed), ``False`` never, ``None`` either.
    ``initial_state``: ``True`` / ``False`` / ``None`` (either) likewise.
    """
    packed = draw(st.booleans()) if varlen is None else varlen
    t = draw(_ints(T))
    b = 1 if packed else draw(_ints(B))
    h = draw(_ints(H))
    cu = None
    if packed:
        # Cut points drawn with replacement from [0, T]: repeats are zero-length sequences.
        cuts = draw(st.lists(st.integers(0, t), min_size=0, max_size=max_seqs - 1))
        cu = [0, *sorted(cuts), t]
    return make_problem(
        b, t, h, h * draw(_ints(group)), draw(_ints(K)), draw(_ints(V)),
        seed=draw(st.integers(0, 2**32 - 1)),
        cu_seqlens=cu,
        initial_state=draw(st.booleans()) if initial_state is None else initial_state,
        gate=draw(st.sampled_from(list(gates))),
    )


def to_torch(p: Problem, dtype: Any = None, device: Any = "cpu") -> Tuple[tuple, dict]:
    """``(args, kwargs)`` of ``p`` as torch tensors for ``chunked.kda`` / ``fast.kda``.

    ``dtype`` (default ``torch.float64``) applies to q, k, v, g, beta; the initial
    state stays float32 or float64 per the design contract (docs/design.md) (float64 only when ``dtype``
    is float64); ``cu_seqlens`` is int64.
    """
    import torch  # only the torch layers need it; the naive tests run without torch

    dtype = torch.float64 if dtype is None else dtype
    state_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    args = tuple(torch.as_tensor(x, device=device).to(dtype) for x in p.args())
    kwargs = {
        "initial_state": None
        if p.initial_state is None
        else torch.as_tensor(p.initial_state, device=device).to(state_dtype),
        "cu_seqlens": None if p.cu_seqlens is None else torch.as_tensor(p.cu_seqlens, dtype=torch.int64, device=device),
    }
    return args, kwargs


def pin_with_chunk(*cases):
    """Pin ``(problem, chunk_size)`` pairs as explicit ``@example(p=..., C=...)`` cases."""

    def decorate(test):
        for p, C in reversed(cases):
            test = example(p=p, C=C)(test)
        return test

    return decorate
