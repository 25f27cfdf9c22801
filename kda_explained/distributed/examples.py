"""Small programs that run on every rank of a group (started by :func:`~kda_explained.distributed.launch.spawn`).

Each builds the same random batch on every rank (one seed), takes its slice, and
checks the context-parallel result against one ``chunked.kda`` call on the whole
batch. The docs' notebook and the docstrings run them on two CPU processes.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from .. import chunked
from ..testing import rel_rms_error
from .comm import count_bytes
from .context_parallel import context_parallel_kda

__all__ = ["rank_and_size", "random_inputs", "slice_bounds", "split_sequence", "split_sequences"]


def rank_and_size():
    """``(rank, world size)`` of this process."""
    return dist.get_rank(), dist.get_world_size()


def random_inputs(B: int, T: int, H: int, HV: int, K: int, V: int, *, seed: int = 0, dtype=torch.float64,
                  lower_bound: Optional[float] = None, N: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """A random batch in KDA's domain (unit keys, ``beta`` in ``[0, 1]``, ``g <= 0``), the same for every seed.

    ``lower_bound``: gates ``lower_bound * sigmoid(x)`` (as strong as ``lower_bound`` per token);
    ``N``: also an initial state for ``N`` sequences.
    """
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    x = {"q": randn(B, T, H, K), "k": torch.nn.functional.normalize(randn(B, T, H, K), dim=-1),
         "v": randn(B, T, HV, V)}
    gate = randn(B, T, HV, K)
    x["g"] = (lower_bound * torch.sigmoid(gate)) if lower_bound is not None else -torch.rand(
        B, T, HV, K, generator=gen, dtype=torch.float64)
    x["beta"] = torch.rand(B, T, HV, generator=gen, dtype=torch.float64)
    if N is not None:
        x["initial_state"] = 0.5 * randn(N, HV, K, V)
    return {name: t.to(dtype) for name, t in x.items()}


def slice_bounds(lengths: Sequence[int], rank: int):
    """``slice(a_r, b_r)`` of rank ``rank`` for slices of ``lengths`` tokens in rank order."""
    a = sum(lengths[:rank])
    return slice(a, a + lengths[rank])


def split_sequence(T: int, T0: int) -> Dict[str, float]:
    """One sequence of ``T`` tokens over two ranks, rank 0 the first ``T0``: the relative errors of the
    outputs, the final state and the gradients of ``q`` and the initial state against ``chunked.kda``
    on the whole sequence, and the bytes this rank sent (forward and backward)."""
    rank = dist.get_rank()
    x = random_inputs(1, T, 2, 2, 4, 3, N=1)
    whole = {name: t.clone().requires_grad_() for name, t in x.items()}
    o_ref, S_ref = chunked.kda(**whole, output_final_state=True)
    (o_ref.sum() + S_ref.sum()).backward()

    part = slice_bounds([T0, T - T0], rank)
    mine = {name: (t if name == "initial_state" else t[:, part]).clone().requires_grad_() for name, t in x.items()}
    with count_bytes() as sent:
        o, S = context_parallel_kda(**mine, output_final_state=True)
        # each rank's loss reads its outputs; the final state's term is counted once, on rank 0
        (o.sum() + (S.sum() if rank == 0 else 0 * S.sum())).backward()
    dS0 = mine["initial_state"].grad.clone()
    dist.all_reduce(dS0)  # the ranks' shares add up to the full gradient
    return {"o": rel_rms_error(o, o_ref[:, part]), "final state": rel_rms_error(S, S_ref),
            "dq": rel_rms_error(mine["q"].grad, whole["q"].grad[:, part]),
            "dinitial_state": rel_rms_error(dS0, whole["initial_state"].grad), "bytes sent": sent.total}


def split_sequences(splits: Sequence[Tuple[int, int]]) -> List[Dict[str, float]]:
    """:func:`split_sequence` for each ``(T, T0)`` of ``splits``, in one group."""
    return [split_sequence(T, T0) for T, T0 in splits]
