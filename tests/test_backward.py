"""The staged backward (chunked.backward.kda_backward) against autograd through chunked.kda."""

import pytest
import torch

from kda_explained import chunked
from kda_explained.chunked.backward import kda_backward
from kda_explained.testing import rel_rms_error

from strategies import make_problem, to_torch

CASES = {
    "plain": dict(B=2, T=37, H=1, HV=1, K=5, V=3),
    "gva-state": dict(B=1, T=50, H=1, HV=2, K=6, V=4, initial_state=True, gate="lowerbound"),
    "varlen": dict(B=1, T=45, H=2, HV=2, K=4, V=5, cu_seqlens=[0, 0, 17, 45], initial_state=True),
}


@pytest.mark.parametrize("chunk_size", [16, 32])
@pytest.mark.parametrize("case", list(CASES))
def test_staged_backward_equals_autograd(case, chunk_size):
    p = make_problem(seed=3, **CASES[case])
    args, kw = to_torch(p, torch.float64)
    leaves = [x.clone().requires_grad_(True) for x in args]
    S0 = kw["initial_state"]
    if S0 is not None:
        S0 = S0.clone().requires_grad_(True)
    o, S = chunked.kda(*leaves, initial_state=S0, output_final_state=True, cu_seqlens=kw["cu_seqlens"],
                       chunk_size=chunk_size)
    do, dS = torch.randn_like(o), torch.randn_like(S)
    wrt = leaves + ([S0] if S0 is not None else [])
    ref = torch.autograd.grad((o, S), wrt, (do, dS))
    got = kda_backward(*args, do, dS, initial_state=kw["initial_state"], cu_seqlens=kw["cu_seqlens"],
                       chunk_size=chunk_size)
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dS0"), got, ref):
        assert rel_rms_error(a, b) <= 1e-10, name
