"""chunked.recurrent_kda (the token-by-token PyTorch recurrence) against the naive layer."""

import torch
from hypothesis import example, given

from kda_explained import chunked, naive
from kda_explained.testing import TOLERANCES, rel_rms_error

from strategies import kda_problems, make_problem, to_torch


@given(p=kda_problems(T=(1, 20), K=(1, 8), V=(1, 8)))
@example(p=make_problem(T=1, K=3, V=5))
@example(p=make_problem(B=1, T=9, H=2, HV=4, K=5, V=3, cu_seqlens=[0, 0, 4, 9], initial_state=True))
@example(p=make_problem(B=2, T=30, K=6, V=6, gate="lowerbound", initial_state=True))
def test_recurrent_equals_naive(p):
    o_ref, S_ref = naive.kda(*p.args(), **p.kwargs(), output_final_state=True)
    args, kwargs = to_torch(p, torch.float64)
    o, S = chunked.recurrent_kda(*args, **kwargs, output_final_state=True)
    assert rel_rms_error(o, o_ref) <= TOLERANCES["chunked_f64_vs_naive"]
    assert rel_rms_error(S, S_ref) <= TOLERANCES["chunked_f64_vs_naive"]


def test_recurrent_float32_and_dtype():
    p = make_problem(B=2, T=25, H=1, HV=2, K=8, V=4, initial_state=True, gate="lowerbound")
    o_ref, S_ref = naive.kda(*p.args(), **p.kwargs(), output_final_state=True)
    args, kwargs = to_torch(p, torch.float32)
    o, S = chunked.recurrent_kda(*args, **kwargs, output_final_state=True)
    assert o.dtype == torch.float32 and S.dtype == torch.float32
    assert rel_rms_error(o, o_ref) <= TOLERANCES["chunked_f32_vs_naive"]
    assert rel_rms_error(S, S_ref) <= TOLERANCES["chunked_f32_vs_naive"]


def test_recurrent_gradients_match_chunked():
    p = make_problem(B=1, T=11, H=1, HV=2, K=4, V=3, initial_state=True)
    args, kwargs = to_torch(p, torch.float64)
    grads = []
    for fn in (chunked.recurrent_kda, lambda *a, **kw: chunked.kda(*a, **kw, chunk_size=16)):
        leaves = [x.clone().requires_grad_(True) for x in (*args, kwargs["initial_state"])]
        o, S = fn(*leaves[:5], initial_state=leaves[5], output_final_state=True)
        (o.square().sum() + S.sin().sum()).backward()
        grads.append([x.grad for x in leaves])
    for g_rec, g_chk in zip(*grads):
        assert rel_rms_error(g_rec, g_chk) <= 1e-10
