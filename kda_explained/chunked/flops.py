"""What one chunk of one head costs: KDA (:mod:`~kda_explained.chunked.stages`) against general DPLR (:mod:`~kda_explained.chunked.dplr`), stage by stage.

The report (§6.2) argues that KDA's constrained DPLR, ``a = beta k`` and
``b = k exp(g)``, roughly doubles the operator's efficiency over general DPLR:
it needs two intra-chunk matrices with secondary chunking instead of four, and
three fewer matrix products. This module counts both algorithms as this
package implements them, stage by stage, so the claim can be checked.

Glossary
--------
=========  ==========================================================================
``C``      chunk size (tokens per chunk)
``K, V``   key and value widths (the state is ``[K, V]``)
``BC``     sub-chunk width of the secondary chunking, ``min(sub_chunk, C)``
``n``      sub-chunks per chunk, ``C / BC``
=========  ==========================================================================

Counting rules
--------------
- A product of ``[m, k]`` and ``[k, n]`` costs ``2 m n k`` FLOPs, counted as
  implemented: triangular factors (``M``, ``A_qk``) count as full ``[C, C]``.
- An intra-chunk matrix with secondary chunking (``_decayed_products``): the
  ``n (n - 1) / 2`` blocks below the diagonal are ``[BC, K] x [K, BC]`` products,
  the ``n`` diagonal tiles a ``K``-contraction of the same size, so one matrix
  costs ``2 BC^2 K (n + n (n - 1) / 2) = C (C + BC) K``.
- The triangular inverse ``(I + A)^{-1}`` by forward substitution on its
  nonzeros: row ``i`` combines ``i`` rows with ``1..i`` nonzeros,
  ``sum_i i (i + 1) = (C^3 - C) / 3`` FLOPs.
- ``diag_exps``: elementwise ``exp`` on the exact diagonal tiles, ``n BC^2 K``
  per matrix (every entry of each ``[BC, BC, K]`` tile is evaluated, the masked
  ones as ``exp(-inf) = 0``). Elementwise multiplies and the ``O(C K)`` exps of
  the decay factors are not counted.

Per chunk and head, stage by stage (``X`` = present only in DPLR)::

    stage    KDA                                        DPLR
    intra    A_kk, A_qk: 2 C (C + BC) K                  A_ba, A_bk, A_qa, A_qk: 4 C (C + BC) K
    inverse  (I + A_kk)^{-1}: (C^3 - C) / 3               (I + A_ba)^{-1}: (C^3 - C) / 3
    wy       M (beta Gamma K), M (beta V): 2 C^2 (K + V)  M (B Gamma_prev), X A_bk V, M (A_bk V): 2 C^2 K + 4 C^2 V
    state    W S, K^T v_new: 4 C K V                      W S, A^T x, X K^T V: 6 C K V
    output   Q S, A_qk v_new: 2 C K V + 2 C^2 V           Q S, A_qa x, X A_qk V: 2 C K V + 4 C^2 V

What the count says: the three ``X`` rows are the report's three extra matrix
products, and the parts it names double exactly (intra-chunk matrices and
diagonal-tile exps, 2x). The total does not: at ``C = 64, K = V = 128`` it is
10.8 MFLOP for KDA against 16.3 MFLOP for DPLR, 1.51x, because the intra
matrices are only 12% of KDA's products; the WY, state and output stages
(87%) grow by one product each: 1.5x, 1.5x and 1.33x at ``K = V``. A doubling of
*speed* needs the secondary-chunked matrices to dominate the run time (their
diagonal tiles are elementwise and ``exp``-bound, not tensor-core products),
which a FLOP count cannot show: measure it (``benchmarks/``).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..validation import check_chunk_size

__all__ = ["ChunkCosts", "chunk_costs", "compare_costs", "ALGORITHMS"]

#: The algorithms :func:`chunk_costs` knows.
ALGORITHMS = ("kda", "dplr")

#: Intra-chunk interaction matrices that need secondary chunking, per algorithm.
_SECONDARY_MATRICES = {"kda": 2, "dplr": 4}  # KDA: A_kk, A_qk; DPLR: A_ba, A_bk, A_qa, A_qk


@dataclass(frozen=True)
class ChunkCosts:
    """Costs of one chunk of one head. FLOP fields are matrix-product FLOPs (``2 m n k`` each)."""

    algorithm: str
    chunk_size: int
    K: int
    V: int
    sub_chunk: int  # BC actually used: min(sub_chunk, chunk_size)
    intra: int  # the interaction matrices with secondary chunking (stage 2)
    inverse: int  # the unit lower-triangular inverse M (stage 3)
    wy: int  # the WY / U factors (stage 4)
    state: int  # the state update (stage 5)
    output: int  # the output (stage 6)
    secondary_matrices: int  # interaction matrices that need secondary chunking
    diag_exps: int  # elementwise exps on the exact diagonal sub-chunk tiles

    @property
    def total(self) -> int:
        """All matrix-product FLOPs of the chunk."""
        return self.intra + self.inverse + self.wy + self.state + self.output


def chunk_costs(algorithm: str, chunk_size: int = 64, K: int = 128, V: int = 128, sub_chunk: int = 16) -> ChunkCosts:
    """Count the cost of one chunk of one head of ``algorithm`` (``"kda"`` or ``"dplr"``).

    >>> kda, dplr = chunk_costs("kda"), chunk_costs("dplr")   # C = 64, K = V = 128, BC = 16
    >>> kda.total, dplr.total
    (10835264, 16340288)
    >>> kda.intra, dplr.intra                                 # the intra-chunk part is 2x ...
    (1310720, 2621440)
    >>> kda.state + kda.output, dplr.state + dplr.output      # ... the state-sized products 1.4x
    (7340032, 10485760)
    >>> kda.secondary_matrices, dplr.secondary_matrices, kda.diag_exps, dplr.diag_exps
    (2, 4, 262144, 524288)
    >>> round(compare_costs(), 3)                             # DPLR / KDA, all matrix products
    1.508
    """
    if algorithm not in ALGORITHMS:
        raise ValueError(f"algorithm: expected one of {list(ALGORITHMS)}, got {algorithm!r}")
    C = check_chunk_size(chunk_size)
    for name, d in (("K", K), ("V", V)):
        if isinstance(d, bool) or not isinstance(d, int) or d < 1:
            raise ValueError(f"{name}: expected a positive int, got {d!r}")
    if isinstance(sub_chunk, bool) or not isinstance(sub_chunk, int) or sub_chunk < 1:
        raise ValueError(f"sub_chunk: expected a positive int, got {sub_chunk!r}")
    BC = min(sub_chunk, C)
    if C % BC:
        raise ValueError(f"sub_chunk: expected a divisor of chunk_size = {C}, got {sub_chunk}")
    n = C // BC

    n_mat = _SECONDARY_MATRICES[algorithm]
    per_matrix = 2 * BC * BC * K * (n + n * (n - 1) // 2)  # = C (C + BC) K: diagonal tiles + blocks below
    inverse = (C**3 - C) // 3  # forward substitution on the nonzeros: sum_{i<C} i (i + 1)
    if algorithm == "kda":
        wy = 2 * C * C * K + 2 * C * C * V  # W = M (beta Gamma K), U = M (beta V)
        state = 2 * C * K * V + 2 * K * C * V  # v_new = U - W S; S += (K Gamma_C / Gamma)^T v_new
        output = 2 * C * K * V + 2 * C * C * V  # (Q Gamma) S + A_qk v_new
    else:
        wy = 2 * C * C * K + 2 * C * C * V + 2 * C * C * V  # W = M (B Gamma_prev); A_bk V; U = -M (A_bk V)
        state = 2 * C * K * V + 2 * K * C * V + 2 * K * C * V  # x = U - W S; += A_dec^T x; += K_dec^T V
        output = 2 * C * K * V + 2 * C * C * V + 2 * C * C * V  # (Q Gamma) S + A_qa x + A_qk V
    return ChunkCosts(
        algorithm=algorithm, chunk_size=C, K=K, V=V, sub_chunk=BC,
        intra=n_mat * per_matrix, inverse=inverse, wy=wy, state=state, output=output,
        secondary_matrices=n_mat, diag_exps=n_mat * n * BC * BC * K,
    )


def compare_costs(chunk_size: int = 64, K: int = 128, V: int = 128, sub_chunk: int = 16) -> float:
    """DPLR / KDA ratio of the total matrix-product FLOPs of one chunk of one head.

    >>> round(compare_costs(chunk_size=64, K=128, V=128), 3)
    1.508
    """
    kda = chunk_costs("kda", chunk_size, K, V, sub_chunk)
    dplr = chunk_costs("dplr", chunk_size, K, V, sub_chunk)
    return dplr.total / kda.total
