"""``chunk_kda`` under ``torch.compile``: its operators pass ``torch.library.opcheck``, and a compiled
forward and training step (``fullgraph=True``: no graph break) give the eager results.

On the CPU the kernels run under the Triton interpreter inside the operators; the graph around
them is compiled with the ``aot_eager`` backend (the operators' fake implementations and
registered autograd are what ``torch.compile`` needs of them, whatever the backend).
"""

from __future__ import annotations

import pytest
import torch

from kda_explained import fast
from kda_explained.fast.ops import chunk_kda_bwd_op, chunk_kda_op, fused_recurrent_op, fused_recurrent_pool_op
from strategies import make_problem, to_torch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKEND = "inductor" if torch.cuda.is_available() else "aot_eager"
OPTION_SETS = {
    "core": dict(),
    "options": dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, use_beta_sigmoid_in_kernel=True),
    "v_first": dict(state_v_first=True),
}
FLAGS = dict(use_qk_l2norm_in_kernel=False, use_gate_in_kernel=False, lower_bound=None,
             use_beta_sigmoid_in_kernel=False, allow_neg_eigval=False, state_v_first=False)


def problem(packed: bool = False):
    p = make_problem(T=20, H=1, HV=2, K=16, V=16, seed=5, initial_state=True,
                     cu_seqlens=[0, 7, 20] if packed else None)
    args, kw = to_torch(p, torch.float32, DEVICE)
    return args, kw["initial_state"], ([0, 7, 20] if packed else None)


def test_opcheck_forward_and_backward():
    (q, k, v, g, beta), S0, offsets = problem(packed=True)
    for keep in (False, True):
        torch.library.opcheck(chunk_kda_op, (q, k, v, g, beta, None, None, S0, 0.25, offsets, 64 if keep else None),
                              dict(FLAGS, keep=keep), test_utils=("test_schema", "test_faketensor"))
    o, S, A_qk, M, G = chunk_kda_op(q, k, v, g, beta, None, None, S0, 0.25, offsets, 64, keep=True, **FLAGS)
    torch.library.opcheck(chunk_kda_bwd_op, (q, k, v, g, beta, None, None, S0, A_qk, M, G, torch.randn_like(o),
                                             torch.randn_like(S), 0.25, offsets, 64), FLAGS,
                          test_utils=("test_schema", "test_faketensor"))
    leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta)]
    torch.library.opcheck(chunk_kda_op, (*leaves, None, None, S0, 0.25, offsets, 64), dict(FLAGS, keep=True),
                          test_utils=("test_autograd_registration",))


@pytest.mark.parametrize("options", list(OPTION_SETS))
@pytest.mark.parametrize("packed", [False, True], ids=["batch", "packed"])
def test_compiled_training_step_equals_eager(options, packed):
    (q, k, v, g, beta), S0, offsets = problem(packed)
    opts = dict(OPTION_SETS[options])
    HV, K = v.shape[2], q.shape[3]
    if opts.get("use_gate_in_kernel"):
        opts.update(A_log=torch.zeros(HV, device=DEVICE), dt_bias=torch.zeros(HV * K, device=DEVICE))
    if opts.get("state_v_first"):
        S0 = S0.transpose(-1, -2).contiguous()

    def step(q, k, v, g, beta, S0):
        o, S = fast.chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True, cu_seqlens=offsets, **opts)
        return o, S

    compiled = torch.compile(step, fullgraph=True, backend=BACKEND)
    results = []
    for fn in (step, compiled):
        leaves = [x.clone().requires_grad_(True) for x in (q, k, v, g, beta, S0)]
        o, S = fn(*leaves)
        ((o * torch.arange(o.numel(), device=DEVICE).reshape(o.shape).cos()).sum() + S.sum()).backward()
        results.append((o.detach(), S.detach(), *(x.grad for x in leaves)))
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_inference_equals_eager():
    (q, k, v, g, beta), S0, offsets = problem(packed=True)

    def infer(q, k, v, g, beta, S0):
        return fast.chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True, cu_seqlens=offsets)

    with torch.inference_mode():
        eager = infer(q, k, v, g, beta, S0)
        compiled = torch.compile(infer, fullgraph=True, backend=BACKEND)(q, k, v, g, beta, S0)
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_offsets_must_be_host_values():
    (q, k, v, g, beta), S0, _ = problem()
    cu = torch.tensor([0, 7, 20])

    @torch.compile(fullgraph=True, backend=BACKEND)
    def infer(q):
        return fast.chunk_kda(q, k, v, g, beta, cu_seqlens=cu)

    with pytest.raises(Exception, match="cu_seqlens: under torch.compile pass the offsets"):
        infer(q)


def decode_problem():
    p = make_problem(B=3, T=1, H=1, HV=2, K=16, V=16, seed=6, initial_state=True)
    args, kw = to_torch(p, torch.float32, DEVICE)
    return args, kw["initial_state"]


def test_opcheck_decode():
    (q, k, v, g, beta), S0 = decode_problem()
    torch.library.opcheck(fused_recurrent_op, (q, k, v, g, beta, None, None, S0, 0.25, None), FLAGS,
                          test_utils=("test_schema", "test_faketensor"))
    pool = torch.randn(5, *S0.shape[1:], device=DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)
    torch.library.opcheck(fused_recurrent_pool_op, (q, k, v, g, beta, None, None, pool, slots, 0.25, None), FLAGS,
                          test_utils=("test_schema", "test_faketensor"))


def test_compiled_decode_equals_eager():
    """A decode step compiled whole: plain (the final state returned) and on a state pool updated in place."""
    (q, k, v, g, beta), S0 = decode_problem()
    pool0 = torch.randn(5, *S0.shape[1:], device=DEVICE)
    slots = torch.tensor([4, 0, 2], device=DEVICE)

    def plain(q, k, v, g, beta, S0):
        return fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)

    def pooled(q, k, v, g, beta, pool):
        o, _ = fast.fused_recurrent_kda(q, k, v, g, beta, initial_state=pool, ssm_state_indices=slots)
        return o

    with torch.inference_mode():
        for a, b in zip(plain(q, k, v, g, beta, S0), torch.compile(plain, fullgraph=True, backend=BACKEND)(
                q, k, v, g, beta, S0)):
            torch.testing.assert_close(a, b)
        pool_eager, pool_compiled = pool0.clone(), pool0.clone()
        o_eager = pooled(q, k, v, g, beta, pool_eager)
        o_compiled = torch.compile(pooled, fullgraph=True, backend=BACKEND)(q, k, v, g, beta, pool_compiled)
    torch.testing.assert_close(o_compiled, o_eager)
    torch.testing.assert_close(pool_compiled, pool_eager)  # the pool written in place, in the compiled graph too
    assert not torch.equal(pool_compiled, pool0)


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_compiled_layer_training_step_equals_eager(backend):
    """KimiDeltaAttention forward and backward compiled whole (fullgraph) == eager, both backends."""
    from kda_explained.layers import KimiDeltaAttention

    torch.manual_seed(0)
    layer = KimiDeltaAttention(hidden_size=32, num_heads=2, head_dim=16, backend=backend).to(DEVICE)
    x = torch.randn(2, 20, 32, device=DEVICE)

    def loss(x):
        return (layer(x) ** 2).mean()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend=BACKEND)):
        layer.zero_grad()
        xl = x.clone().requires_grad_(True)
        fn(xl).backward()
        results.append([xl.grad] + [p.grad.clone() for p in layer.parameters()])
    for a, b in zip(*results):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_compiled_model_prefill_and_decode_equal_eager(backend):
    """HybridLM's prefill and a cached decode step, each compiled whole (fullgraph) == eager."""
    from kda_explained.layers import HybridConfig, HybridLM

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, head_dim=16,
                                  intermediate_size=64, kda_backend=backend)).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 12), device=DEVICE)
    step = torch.compile(model, fullgraph=True, backend=BACKEND)
    with torch.no_grad():
        outs = []
        for fn in (model, step):
            cache = model.init_cache(2)
            logits = fn(ids, cache=cache)
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            outs.append((logits, fn(nxt, cache=cache)))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_generate_compiled_gives_the_eager_tokens(backend):
    from kda_explained.layers import HybridConfig, HybridLM

    torch.manual_seed(0)
    model = HybridLM(HybridConfig(vocab_size=64, hidden_size=32, num_layers=4, num_heads=2, head_dim=16,
                                  intermediate_size=64, kda_backend=backend)).to(DEVICE).eval()
    ids = torch.randint(0, 64, (2, 9), device=DEVICE)
    with torch.no_grad():
        eager = model.generate(ids, 6)
        compiled = model.generate(ids, 6, compile=BACKEND)
    assert torch.equal(eager, compiled)
    with pytest.raises(ValueError, match="^compile: compiles the cached decoding step"):
        model.generate(ids, 2, use_cache=False, compile=True)
    with pytest.raises(TypeError, match="^compile: expected a bool"):
        model.generate(ids, 2, compile=1)


def test_compiled_gradient_of_the_final_state_alone():
    (q, k, v, g, beta), S0, _ = problem()

    def state_only(v, S0):
        return fast.chunk_kda(q, k, v, g, beta, initial_state=S0, output_final_state=True)[1].sum()

    grads = []
    for fn in (state_only, torch.compile(state_only, fullgraph=True, backend=BACKEND)):
        leaves = [x.clone().requires_grad_(True) for x in (v, S0)]
        fn(*leaves).backward()
        grads.append([x.grad for x in leaves])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_compiled_call_refuses_check_g_and_a_custom_plan():
    """What a compiled graph cannot honour is refused by name, not silently ignored."""
    (q, k, v, g, beta), S0, _ = problem()
    for extra, name in ((dict(check_g=True), "check_g"), (dict(plan=fast.plan_for(DEVICE)), "plan")):
        torch._dynamo.reset()

        def step(q, k, v, g, beta):
            return fast.chunk_kda(q, k, v, g, beta, **extra)[0]

        # with fullgraph=True dynamo reports the raise as its own error, our message inside it
        with pytest.raises(Exception, match=f"{name}: .*compile"):
            torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, g, beta)
    torch._dynamo.reset()
