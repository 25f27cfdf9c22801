"""Properties of the fast layer at real sizes, on a CUDA GPU (every test is marked ``gpu``).

Run with ``pytest -m gpu tests/test_fast_gpu.py`` on a machine with a GPU; elsewhere
``conftest.py`` skips these tests. The reference is the chunked layer in float64, run
on the GPU too (it is PyTorch), from the *same* rounded inputs as the kernels; the
bounds are ``DESIGN.md``'s (:data:`kda_explained.testing.TOLERANCES`):

- bf16 inputs: output and final state within ``fast_bf16_output``, gradients within ``fast_bf16_grad``;
- float32 inputs: within ``fast_f32_vs_f64`` (the kernels use full-precision dots then).

Sizes: K = V = 128 unless a test says otherwise; the longest sequence is 65536
tokens (one test), the widest batch 96 x 16 heads. The inputs are drawn on the GPU
by :func:`draw`; the small-size properties of ``tests/test_fast.py`` hold here at scale.
"""

from __future__ import annotations

import functools
from typing import Optional, Sequence

import pytest
import torch
import torch.nn.functional as F

from kda_explained import chunked, fast
from dataclasses import replace

from kda_explained.fast import forward as fast_forward
from kda_explained.fast.config import plan_for
from kda_explained.chunked import stages as chunked_stages
from kda_explained.testing import TOLERANCES

import fast_cases as small  # the small-size properties' oracle and checks

DEVICE = "cuda"
F32 = TOLERANCES["fast_f32_vs_f64"]
LOW = TOLERANCES["fast_bf16_output"]
LOW_GRAD = TOLERANCES["fast_bf16_grad"]
REF_CHUNK = 64  # the float64 reference's chunk size (any size computes the same function)

VARLEN = [1300, 547, 2048, 963, 271, 3063]  # a packed batch of ragged prompts, 8192 tokens


def cu_of(lengths: Sequence[int]) -> torch.Tensor:
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int64, device=DEVICE)


def draw(B: int, T: int, H: int, HV: int, K: int = 128, V: int = 128, *, seed: int, dtype=torch.bfloat16,
         lengths: Optional[Sequence[int]] = None, initial_state: bool = True, gate: str = "mild"):
    """``(q, k, v, g, beta)`` in ``dtype`` and ``{initial_state, cu_seqlens}``, drawn on the GPU in the valid domain.

    ``gate``: ``"mild"`` ``-uniform(0, 0.5)``; ``"slow"`` ``-exp(uniform(-8, -1))`` (memory of
    thousands of tokens); ``"lowerbound"`` the lower-bound gate at ``-5`` (down to ``exp(-5)`` a token).
    ``lengths``: a packed batch (``B == 1``, ``T == sum(lengths)``).
    """
    gen = torch.Generator(device=DEVICE).manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device=DEVICE)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, device=DEVICE)

    q, k, v = randn(B, T, H, K), F.normalize(randn(B, T, H, K), dim=-1), randn(B, T, HV, V)
    if gate == "mild":
        g = -0.5 * rand(B, T, HV, K)
    elif gate == "slow":
        g = -torch.exp(-8.0 + 7.0 * rand(B, T, HV, K))
    else:
        g = chunked.lowerbound_gate(2.0 * randn(B, T, HV, K), 2.0 * rand(HV) - 1.0, randn(HV, K), lower_bound=-5.0)
    beta = rand(B, T, HV)
    cu = None if lengths is None else cu_of(lengths)
    N = B if lengths is None else len(lengths)
    S0 = randn(N, HV, K, V) if initial_state else None
    return tuple(x.to(dtype) for x in (q, k, v, g, beta)), {"initial_state": S0, "cu_seqlens": cu}


#: The float64 oracle of ``tests/test_fast.py`` (the options by their PyTorch references, then ``chunked.kda``).
reference = functools.partial(small.reference, chunk_size=REF_CHUNK)


def reference_h(q, k, v, g, beta, *, initial_state, cu_seqlens, chunk_size: int):
    """The chunked layer's chunk states ``h [NC, HV, K, V]`` (stage 5) and final state, in float64."""
    q, k, v, g, beta = (x.double() for x in (q, k, v, g, beta))
    S0 = None if initial_state is None else initial_state.double()
    C, cu, scale = chunk_size, cu_seqlens, q.shape[-1] ** -0.5
    G = chunked.chunk_local_cumsum(g, C, cu)
    A_kk, _ = chunked.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    M = chunked.ut_transform(A_kk, C, cu)
    W, U = chunked.wy_representation(k, v, G, beta, M, C, cu)
    _, kg = chunked.decayed_operands(q, k, G, scale, C, cu)
    h, _, S = chunked.state_passing(kg, W, U, G, S0, C, cu)
    return h, S


def assert_close(a: torch.Tensor, ref: torch.Tensor, bound: float, what: str) -> None:
    assert torch.isfinite(a).all(), f"{what}: NaN or inf"
    small.assert_close(a, ref, bound, what)


def check_chunk_kda(args, kw, bound: float, chunk_size: int = 64, plan=None, **opts):
    o, S = fast.chunk_kda(*args, **kw, **opts, output_final_state=True, chunk_size=chunk_size, plan=plan)
    o_ref, S_ref = reference(*args, **kw, **opts)
    assert o.dtype == args[2].dtype and S.dtype == torch.float32
    assert_close(o, o_ref, bound, "o")
    assert_close(S, S_ref, bound, "final state")
    return o, S


# ==============================================================================================
# Stages, float32 inputs (full-precision dots): each kernel against the chunked stage of its name
# ==============================================================================================


@pytest.mark.gpu
@pytest.mark.parametrize("C", [16, 32, 64])
def test_stages_match_chunked(C):
    (q, k, v, g, beta), kw = draw(2, 1000, 2, 4, seed=1, dtype=torch.float64, lengths=None, gate="lowerbound")
    S0, scale = kw["initial_state"].double(), 128 ** -0.5
    G = chunked.chunk_local_cumsum(g, C)
    A_kk, A_qk = chunked.intra_chunk_matrices(q, k, G, beta, scale, C)
    M = chunked.ut_transform(A_kk, C)
    W, U = chunked.wy_representation(k, v, G, beta, M, C)
    qg, kg = chunked.decayed_operands(q, k, G, scale, C)
    h, v_new, S = chunked.state_passing(kg, W, U, G, S0, C)
    o = chunked.chunk_output(qg, h, v_new, A_qk, C)

    def f32(x):
        return x.float()

    qg, kg = chunked_stages.decayed_operands(q, k, G, scale, C)
    assert_close(fast.chunk_local_cumsum(f32(g), C), G, F32, "G")
    f = fast.chunk_local_factors(f32(q), f32(k), f32(v), f32(G), f32(beta), scale, C, store_akk=True, store_m=True)
    for name, ours, ref in (("A_kk", f.A_kk, A_kk), ("A_qk", f.A_qk, A_qk), ("M", f.M, M), ("W", f.W, W),
                            ("U", f.U, U), ("qg", f.qg, qg), ("kg", f.kg, kg)):
        assert_close(ours, ref, F32, name)
    h_f, v_new_f, S_f = fast.state_passing(f32(kg), f32(W), f32(U), f32(G), f32(S0), C)
    assert_close(h_f, h, F32, "h")
    assert_close(v_new_f, v_new, F32, "v_new")
    assert_close(S_f, S, F32, "final state")
    assert_close(fast.chunk_output(f32(qg), f32(h), f32(v_new), f32(A_qk), C), o, F32, "o")
    o_f, S_f = fast.state_passing_output(f32(kg), f32(W), f32(U), f32(G), f32(qg), f32(A_qk), f32(S0), C)
    assert_close(o_f, o, F32, "o (stages 5 and 6 fused)")
    assert_close(S_f, S, F32, "final state (stages 5 and 6 fused)")
    if C <= plan_for(DEVICE).one_pass.max_chunk:  # stages 1-4 in one pass, then 5 + 6 reading G at the chunk ends
        f = fast.chunk_local_factors_one_pass(f32(q), f32(k), f32(v), f32(g), f32(beta), scale, C, store_akk=True)
        for name, ours, ref in (("A_kk", f.A_kk, A_kk), ("A_qk", f.A_qk, A_qk), ("W", f.W, W), ("U", f.U, U),
                                ("qg", f.qg, qg), ("kg", f.kg, kg)):
            assert_close(ours, ref, F32, f"{name} (one pass)")
        o_f, S_f = fast.state_passing_output(f.kg, f.W, f.U, f.G_end, f.qg, f.A_qk, f32(S0), C)
        assert_close(o_f, o, F32, "o (one pass, G at the chunk ends)")
        assert_close(S_f, S, F32, "final state (one pass, G at the chunk ends)")
        for fold in (2,):  # the UT transform left to the state pass: Mb = M Diag(beta), k_gamma = Gamma K
            f = fast.chunk_local_factors_one_pass(f32(q), f32(k), f32(v), f32(g), f32(beta), scale, C, fold=fold)
            o_f, S_f = fast.state_passing_output(f.kg, f.W, None, f.G_end, f.qg, f.A_qk, f32(S0), C, Mb=f.Mb,
                                                 v=f32(v), k_gamma=f.k_gamma)
            assert_close(o_f, o, F32, f"o (one pass, fold {fold})")
            assert_close(S_f, S, F32, f"final state (one pass, fold {fold})")


# ==============================================================================================
# chunk_kda end to end
# ==============================================================================================


@pytest.mark.gpu
def test_long_sequence():
    # 65536 tokens, slow gates: the state carries information across a thousand chunks
    args, kw = draw(1, 65536, 2, 2, seed=2, gate="slow")
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, bound", [(torch.bfloat16, LOW), (torch.float32, F32)], ids=["bf16", "fp32"])
@pytest.mark.parametrize("lengths", [None, [20000, 300, 12468]], ids=["one", "packed"])
def test_long_sequences_in_pieces(dtype, bound, lengths):
    # 32768 tokens cut into 4096-token pieces that run at once (the plan's piece_tokens), slow gates:
    # the chain of pieces carries the state across thousands of tokens
    args, kw = draw(1, 32768, 2, 2, seed=21, gate="slow", dtype=dtype, lengths=lengths)
    plan = plan_for(DEVICE)
    plan = replace(plan, forward=replace(plan.forward, piece_tokens=4096))
    offsets = None if lengths is None else kw["cu_seqlens"].tolist()
    assert fast_forward.inference_chunking(1, 32768, offsets, 2, 128, 128, DEVICE, plan.forward)[1] == 4096
    with torch.inference_mode():
        o, S = fast.chunk_kda(*args, **kw, output_final_state=True, plan=plan)
    o_ref, S_ref = reference(*args, **kw)
    assert o.dtype == dtype
    assert_close(o, o_ref, bound, "o")
    assert_close(S, S_ref, bound, "final state")


@pytest.mark.gpu
def test_many_heads_short_sequences():
    # B * H = 1536 programs per chunk, two chunks each
    args, kw = draw(96, 128, 16, 16, seed=3)
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
def test_packed_batch():
    args, kw = draw(1, sum(VARLEN), 8, 8, seed=4, lengths=VARLEN)
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("K, V", [(128, 128), (96, 160)])
def test_state_output_fused_equals_two_kernels(K, V):
    # stages 5 and 6 in one kernel (forced, whatever the grid) against the two kernels: a packed
    # batch with GVA, bf16; both against the float64 reference and against each other
    args, kw = draw(1, sum(VARLEN), 2, 4, K, V, seed=12, lengths=VARLEN, gate="lowerbound")
    plan = plan_for(DEVICE)
    o, S = check_chunk_kda(args, kw, LOW, plan=replace(plan, forward=replace(plan.forward, fused_min_programs_per_sm=0.0)))
    o2, S2 = check_chunk_kda(args, kw, LOW, plan=replace(plan, forward=replace(plan.forward, fused_state_output=False)))
    assert_close(o, o2, 5e-3, "o: fused against two kernels")  # the same bf16 operands, sums in another order
    assert_close(S, S2, 1e-6, "final state: fused against two kernels")


@pytest.mark.gpu
def test_packed_batch_with_empty_sequences_and_gva():
    lengths = [0, 700, 1, 0, 2500, 63]
    args, kw = draw(1, sum(lengths), 2, 8, seed=5, lengths=lengths, gate="lowerbound")
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
def test_gva():
    args, kw = draw(2, 4096, 2, 8, seed=6)  # each q/k head serves four value heads
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("K, V", [(64, 64), (96, 160), (256, 256), (128, 32)])
def test_head_dims(K, V):
    args, kw = draw(2, 1500, 2, 2, K, V, seed=7)  # not powers of two, the largest allowed, K != V
    check_chunk_kda(args, kw, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [16, 32, 64])
def test_float32_inputs(C):
    args, kw = draw(1, sum(VARLEN), 4, 4, seed=8, dtype=torch.float32, lengths=VARLEN, gate="lowerbound")
    check_chunk_kda(args, kw, F32, chunk_size=C)


@pytest.mark.gpu
def test_strong_gates_stay_finite():
    # lower_bound = -5 in the kernel, its raw input pushed into saturation: cumulative log decay down to -320 a chunk
    args, kw = draw(1, 8192, 4, 4, seed=9)
    q, k, v, x, beta = args
    gen = torch.Generator(device=DEVICE).manual_seed(9)
    x = (6.0 + torch.randn(x.shape, generator=gen, device=DEVICE)).to(x.dtype)
    A_log, dt_bias = torch.zeros(4, device=DEVICE), torch.zeros(4, 128, device=DEVICE)
    opts = dict(use_gate_in_kernel=True, A_log=A_log, dt_bias=dt_bias, lower_bound=-5.0)
    check_chunk_kda((q, k, v, x, beta), kw, LOW, **opts)
    o, S = fast.fused_recurrent_kda(q[:, :64], k[:, :64], v[:, :64], x[:, :64], beta[:, :64], **opts,
                                    initial_state=kw["initial_state"], output_final_state=True)
    assert torch.isfinite(o).all() and torch.isfinite(S).all()
    g_hard = torch.full_like(x, -5.0)  # every channel of every token at the bound, no kernel gate
    check_chunk_kda((q, k, v, g_hard, beta), kw, LOW)
    g_mixed = torch.zeros_like(x)
    g_mixed[..., 1::2] = -20.0  # past intra's tensor-core limit: the exact diagonal kernel takes every block
    check_chunk_kda((q, k, v, g_mixed, beta), kw, LOW)


@pytest.mark.gpu
@pytest.mark.parametrize("C", [16, 32])
def test_short_chunks_one_pass(C):
    # the inference forward's short chunks (stages 1-4 in one pass) at real sizes: a packed batch with
    # GVA, the gate options (G made by stage 1's kernel), gates at and past the tensor-core diagonal's limit
    args, kw = draw(1, sum(VARLEN), 4, 8, seed=4, lengths=VARLEN)
    check_chunk_kda(args, kw, LOW, chunk_size=C)
    for name in ("softplus_gate+l2norm+neg_sigmoid+v_first", "lower_bound_gate"):
        args_o, kw_o, opts = options(name, args, kw, HV=8, K=128)
        check_chunk_kda(args_o, kw_o, LOW, chunk_size=C, **opts)
    q, k, v, g, beta = args
    g_mixed = torch.zeros_like(g)
    g_mixed[..., 1::2] = -20.0
    for g_strong in (torch.full_like(g, -5.0), g_mixed):
        check_chunk_kda((q, k, v, g_strong, beta), kw, LOW, chunk_size=C)


@pytest.mark.gpu
@pytest.mark.parametrize("fold", [0])
def test_one_pass_fold(fold):
    # the plan's one_pass_fold: how much of the UT transform the fused state pass applies itself (the
    # default, 2, runs in every test above); 0 on the packed GVA batch, and with gates past the diagonal's limit
    base = plan_for(DEVICE)
    plan = replace(base, forward=replace(base.forward, one_pass_fold=fold))
    args, kw = draw(1, sum(VARLEN), 4, 8, seed=4, lengths=VARLEN)
    o, _ = check_chunk_kda(args, kw, LOW, chunk_size=16, plan=plan)
    o2, _ = check_chunk_kda(args, kw, LOW, chunk_size=16)
    assert_close(o, o2, 5e-3, f"o: fold {fold} against 2")
    q, k, v, g, beta = args
    check_chunk_kda((q, k, v, torch.full_like(g, -5.0), beta), kw, LOW, chunk_size=16, plan=plan)


@pytest.mark.gpu
def test_default_chunk_size():
    # chunk_size=None: short chunks where the state pass fills the GPU, 64 where one sequence leaves it idle
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    config = plan_for(DEVICE).forward
    assert fast_forward.forward_chunk_size(sms * 2, 128, torch.device(DEVICE), config) == config.short_chunk
    assert fast_forward.forward_chunk_size(16, 128, torch.device(DEVICE), config) == 64
    args, kw = draw(8, 1024, 16, 16, seed=5)
    o, S = check_chunk_kda(args, kw, LOW, chunk_size=None)
    o64, S64 = check_chunk_kda(args, kw, LOW, chunk_size=64)
    assert_close(o, o64, 5e-3, "o: default chunk size against 64")


def options(name: str, args, kw, HV: int, K: int):
    """Raw inputs and keyword arguments for the in-kernel options ``name`` (as in ``tests/test_fast.py``)."""
    q, k, v, g, beta = args
    gen = torch.Generator(device=DEVICE).manual_seed(11)

    def randn(*shape, dtype=q.dtype):
        return torch.randn(*shape, generator=gen, device=DEVICE).to(dtype)

    opts = {}
    if "gate" in name:
        g = randn(*g.shape) * 2.0
        opts.update(use_gate_in_kernel=True, A_log=randn(HV, dtype=torch.float32) * 0.5,
                    dt_bias=randn(HV, K, dtype=torch.float32))
        if "lower_bound" in name:
            opts["lower_bound"] = -5.0
    if "l2norm" in name:
        q, k = randn(*q.shape) * 2.0, randn(*k.shape) * 3.0
        opts["use_qk_l2norm_in_kernel"] = True
    if "sigmoid" in name:
        beta = randn(*beta.shape) * 2.0
        opts.update(use_beta_sigmoid_in_kernel=True, allow_neg_eigval="neg" in name)
    kw = dict(kw)
    if "v_first" in name:
        opts["state_v_first"] = True
        kw["initial_state"] = kw["initial_state"].transpose(-1, -2).contiguous()
    return (q, k, v, g, beta), kw, opts


OPTION_SETS = ["softplus_gate", "lower_bound_gate", "l2norm", "sigmoid", "neg_sigmoid", "v_first",
               "softplus_gate+l2norm+neg_sigmoid+v_first"]


@pytest.mark.gpu
@pytest.mark.parametrize("name", OPTION_SETS)
def test_options(name):
    # bf16 with the in-kernel l2norm too (the interpreter's truncating bf16 cast makes that one xfail on the CPU)
    args, kw = draw(1, sum(VARLEN), 4, 8, seed=10, lengths=VARLEN)
    args, kw, opts = options(name, args, kw, HV=8, K=128)
    check_chunk_kda(args, kw, LOW, **opts)


@pytest.mark.gpu
@pytest.mark.parametrize("state_v_first", [False, True], ids=["KV", "VK"])
def test_intermediate_states(state_v_first):
    C = 64
    args, kw = draw(1, sum(VARLEN), 8, 8, seed=12, lengths=VARLEN)
    S0 = kw["initial_state"]
    S0_in = S0.transpose(-1, -2).contiguous() if state_v_first else S0
    with torch.inference_mode():
        o, S, h = fast.chunk_kda(*args, initial_state=S0_in, cu_seqlens=kw["cu_seqlens"], output_final_state=True,
                                 chunk_size=C, return_intermediate_states=True, state_v_first=state_v_first)
    if state_v_first:
        h, S = h.transpose(-1, -2), S.transpose(-1, -2)
    h_ref, S_ref = reference_h(*args, **kw, chunk_size=C)
    assert h.dtype == torch.float32
    assert_close(h, h_ref, LOW, "h")
    assert_close(S, S_ref, LOW, "final state")
    first = 0
    for n, L in enumerate(VARLEN):  # a sequence's first chunk sees the initial state exactly
        assert torch.equal(h[first], S0[n])
        first += -(-L // C)
    assert first == h.shape[0]


@pytest.mark.gpu
def test_bitwise_deterministic():
    args, kw = draw(1, sum(VARLEN), 8, 8, seed=13, lengths=VARLEN)
    runs = [fast.chunk_kda(*args, **kw, output_final_state=True, return_intermediate_states=True) for _ in range(2)]
    for a, b, what in zip(*runs, ("o", "final state", "h")):
        assert torch.equal(a, b), f"{what} differs between two runs"
    short = tuple(x[:, :16] for x in args)
    S0 = kw["initial_state"][:1]
    runs = [fast.fused_recurrent_kda(*short, initial_state=S0, output_final_state=True) for _ in range(2)]
    for a, b, what in zip(*runs, ("o", "final state")):
        assert torch.equal(a, b), f"decode {what} differs between two runs"


# ==============================================================================================
# Decoding: prefill then decode, and the state pool of a serving engine
# ==============================================================================================


@pytest.mark.gpu
def test_prefill_then_decode_equals_one_prefill():
    T, n = 3000, 6
    args, kw = draw(4, T + n, 4, 8, seed=14)
    S0 = kw["initial_state"]
    o_full, S_full = fast.chunk_kda(*args, initial_state=S0, output_final_state=True)
    with torch.inference_mode():
        o_pre, S = fast.chunk_kda(*(x[:, :T] for x in args), initial_state=S0, output_final_state=True)
        steps = []
        for t in range(T, T + n):
            o_t, S = fast.fused_recurrent_kda(*(x[:, t : t + 1] for x in args), initial_state=S,
                                              output_final_state=True)
            steps.append(o_t)
    o_dec = torch.cat([o_pre, *steps], dim=1)
    o_ref, S_ref = reference(*args, initial_state=S0)
    assert_close(o_dec, o_ref, LOW, "o, prefill then decode")
    assert_close(S, S_ref, LOW, "final state, prefill then decode")
    assert_close(o_full, o_ref, LOW, "o, one prefill")
    assert_close(S, S_full, LOW, "final state: decode against one prefill")


@pytest.mark.gpu
def test_decode_state_pool_in_place():
    N, H, P, steps = 256, 32, 320, 4
    args, _ = draw(N, steps, H, H, seed=15, initial_state=False)
    gen = torch.Generator(device=DEVICE).manual_seed(15)
    pool = torch.randn(P, H, 128, 128, generator=gen, device=DEVICE)  # [P, HV, K, V] float32
    before = pool.clone()
    slots = torch.randperm(P, generator=gen, device=DEVICE)[:N]
    slots[::17] = -1  # sequences a serving engine has no slot for this step: skipped
    slots[5] = P + 3  # past the pool: on the device the kernel skips it too (no host check, no sync)
    with torch.inference_mode():
        for t in range(steps):
            o_t, out = fast.fused_recurrent_kda(*(x[:, t : t + 1] for x in args), initial_state=pool,
                                                ssm_state_indices=slots)
            assert out is pool
            if t == 0:
                o_first = o_t
    live = (slots >= 0) & (slots < P)
    touched = torch.zeros(P, dtype=torch.bool, device=DEVICE)
    touched[slots[live]] = True
    assert torch.equal(pool[~touched], before[~touched])  # every other slot bit for bit
    safe = torch.where(live, slots, 0)
    o_ref, S_ref = reference(*(x[:, :1] for x in args), initial_state=before[safe])
    assert_close(o_first[live], o_ref[live], LOW, "o of the first step")
    assert torch.all(o_first[~live] == 0)  # a skipped sequence outputs zeros
    _, S_ref = reference(*args, initial_state=before[safe])
    assert_close(pool[slots[live]], S_ref[live], LOW, "touched slots")


# ==============================================================================================
# fast.kda dispatch, gradients
# ==============================================================================================


@pytest.mark.gpu
@pytest.mark.parametrize("T", [fast.RECURRENT_MAX_LEN, 2048])
def test_kda_dispatch(T):
    args, kw = draw(8, T, 4, 4, seed=16)
    o, S = fast.kda(*args, **kw, output_final_state=True)
    o_ref, S_ref = reference(*args, **kw)
    assert_close(o, o_ref, LOW, "o")
    assert_close(S, S_ref, LOW, "final state")


def gradient_problem(gate: str):
    """The inputs of :func:`test_gradients_bf16` (also timed by ``benchmarks/probe/intra_precision.py``):
    ``(values, opts, cu_seqlens, do, dS)``, two packed sequences of 700 and 1348 tokens in bf16.

    ``values``: the differentiable inputs by name (``A_log``, ``dt_bias`` with a gate); ``opts``: the
    other options of ``chunk_kda``; ``do``, ``dS``: float64 gradients reaching the output and final state.
    ``gate``: ``"none"`` (``g`` given), ``"softplus"``, ``"lower_bound"`` (-5) or ``"all_options"``
    (the lower-bound gate, the in-kernel L2 norm of ``q``, ``k`` and the beta sigmoid).
    """
    lengths = [700, 1348]
    args, kw = draw(1, sum(lengths), 2, 4, seed=17, lengths=lengths)
    opts = {}
    if gate != "none":
        gen = torch.Generator(device=DEVICE).manual_seed(17)
        args = (*args[:3], (2.0 * torch.randn(args[3].shape, generator=gen, device=DEVICE)).bfloat16(), args[4])
        opts = dict(use_gate_in_kernel=True, A_log=0.5 * torch.randn(4, generator=gen, device=DEVICE),
                    dt_bias=torch.randn(4, 128, generator=gen, device=DEVICE))
        if gate in ("lower_bound", "all_options"):
            opts["lower_bound"] = -5.0
        if gate == "all_options":  # also the in-kernel L2 norm of q, k and the beta sigmoid (beta as logits)
            opts.update(use_qk_l2norm_in_kernel=True, use_beta_sigmoid_in_kernel=True)
    values = dict(zip(("q", "k", "v", "g", "beta"), args), initial_state=kw["initial_state"],
                  **{n: opts.pop(n) for n in ("A_log", "dt_bias") if n in opts})
    gen = torch.Generator(device=DEVICE).manual_seed(18)
    do = torch.randn(args[2].shape, generator=gen, device=DEVICE, dtype=torch.float64)
    dS = torch.randn(kw["initial_state"].shape, generator=gen, device=DEVICE, dtype=torch.float64)
    return values, opts, kw["cu_seqlens"], do, dS


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["none", "softplus", "lower_bound", "all_options"])
def test_gradients_bf16(gate):
    values, opts, cu, do, dS = gradient_problem(gate)
    leaves = {n: x.detach().clone().requires_grad_(True) for n, x in values.items()}
    leaves64 = {n: x.detach().double().requires_grad_(True) for n, x in values.items()}
    o, S = fast.chunk_kda(**leaves, cu_seqlens=cu, **opts, output_final_state=True)
    torch.autograd.backward((o, S), (do.to(o.dtype), dS.float()))
    o_ref, S_ref = reference(**leaves64, cu_seqlens=cu, **opts)
    torch.autograd.backward((o_ref, S_ref), (do, dS))
    for n in leaves:
        assert leaves[n].grad is not None, f"d{n} is missing"
        assert_close(leaves[n].grad, leaves64[n].grad, LOW_GRAD, f"d{n}")


# ==============================================================================================
# The Triton backward stages: each against its chunked
# oracle at real sizes, and their composition against the chunked staged backward
# ==============================================================================================


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", [None, VARLEN[:3]], ids=["batch", "varlen"])
def test_backward_stages_match_chunked(lengths):
    from kda_explained.chunked import backward_inter as ref_inter, backward_intra as ref_intra
    from kda_explained.fast import backward as fb

    C = 64
    B, T = (2, 1000) if lengths is None else (1, sum(lengths))
    (q, k, v, g, beta), kw = draw(B, T, 2, 4, seed=21, dtype=torch.float64, lengths=lengths, gate="lowerbound")
    cu, S0, scale = kw["cu_seqlens"], kw["initial_state"].double(), 128 ** -0.5
    G = chunked.chunk_local_cumsum(g, C, cu)
    A_kk, A_qk = chunked.intra_chunk_matrices(q, k, G, beta, scale, C, cu)
    M = chunked.ut_transform(A_kk, C, cu)
    W, U = chunked.wy_representation(k, v, G, beta, M, C, cu)
    _, kg = chunked_stages.decayed_operands(q, k, G, scale, C, cu)
    h, v_new, S = chunked.state_passing(kg, W, U, G, S0, C, cu)
    gen = torch.Generator(device=DEVICE).manual_seed(22)

    def rand(x):
        return torch.randn(x.shape, generator=gen, device=DEVICE, dtype=torch.float64)

    def f32(x):
        return x.float()

    do, dS_final, dW, dU, dM, dA_kk, dA_qk, dG = (rand(x) for x in (v, S, W, U, M, A_kk, A_qk, G))
    checks = [
        ("output", fb.chunk_output_bwd(f32(q), f32(h), f32(v_new), f32(G), f32(A_qk), scale, f32(do), C, cu),
         ref_inter.chunk_output_bwd(q, h, v_new, G, A_qk, scale, do, C, cu)),
        ("wy", fb.wy_representation_bwd(f32(k), f32(v), f32(G), f32(beta), f32(M), f32(dW), f32(dU), C, cu),
         ref_inter.wy_representation_bwd(k, v, G, beta, M, dW, dU, C, cu)),
        ("ut", (fb.ut_transform_bwd(f32(M), f32(dM), C, cu),), (ref_intra.ut_transform_bwd(M, dM, C, cu),)),
        ("intra", fb.intra_chunk_matrices_bwd(f32(q), f32(k), f32(G), f32(beta), scale, f32(dA_kk), f32(dA_qk), C, cu),
         ref_intra.intra_chunk_matrices_bwd(q, k, G, beta, scale, dA_kk, dA_qk, C, cu)),
        ("cumsum", (fb.chunk_local_cumsum_bwd(f32(dG), C, cu),), (ref_intra.chunk_local_cumsum_bwd(dG, C, cu),)),
    ]
    for stage, ours, ref in checks:
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_close(a, b, F32, f"{stage} backward, output {i}")
    # the state stage with the same random incoming gradients on both sides
    dh, dvn = rand(h), rand(v_new)
    ours = fb.state_passing_bwd(f32(kg), f32(W), f32(G), f32(S0), f32(h), f32(v_new), f32(dh), f32(dvn),
                                f32(dS_final), C, cu, H=2)
    ref = ref_inter.state_passing_bwd(k, W, U, G, S0, h, v_new, dh, dvn, dS_final, C, cu)
    for i, (a, b) in enumerate(zip(ours, ref)):
        assert_close(a, b, F32, f"state backward, output {i}")


@pytest.mark.gpu
def test_backward_composition_matches_chunked():
    from kda_explained.chunked.backward import kda_backward as reference_backward
    from kda_explained.fast.backward import kda_backward

    (q, k, v, g, beta), kw = draw(1, sum(VARLEN[:3]), 2, 4, seed=23, dtype=torch.float32, lengths=VARLEN[:3],
                                  gate="lowerbound")
    gen = torch.Generator(device=DEVICE).manual_seed(24)
    do = torch.randn(v.shape, generator=gen, device=DEVICE)
    dS_final = torch.randn(kw["initial_state"].shape, generator=gen, device=DEVICE)
    ours = kda_backward(q, k, v, g, beta, do, dS_final, **kw)
    ref = reference_backward(*(x.double() for x in (q, k, v, g, beta, do, dS_final)),
                             initial_state=kw["initial_state"].double(), cu_seqlens=kw["cu_seqlens"])
    for name, a, b in zip(("dq", "dk", "dv", "dg", "dbeta", "dinitial_state"), ours, ref):
        assert_close(a, b, F32, name)
