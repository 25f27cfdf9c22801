"""The decoding step: its fused kernels against their PyTorch twins, the layer's step against its
forward, and the hybrid's static (graph-captured) decoder against eager decoding.

On a CPU the fast kernels run under the Triton interpreter and the decoder runs its static step
eagerly; the ``gpu`` tests capture it in a CUDA graph.
"""

from __future__ import annotations

import pytest
import torch

from kda_explained import chunked, fast
from kda_explained.fast.step import gated_rms_norm_op, short_conv_step_op
from kda_explained.layers import HybridConfig, HybridLM, KimiDeltaAttention, StaticDecoder
from kda_explained.testing import TOLERANCES, rel_rms_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("N, C, W", [(3, 40, 4), (2, 300, 3), (1, 8, 2), (4, 257, 5)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_short_conv_step_twins(N, C, W, dtype):
    torch.manual_seed(N * C + W)
    x = torch.randn(N, C, device=DEVICE).to(dtype)
    state = torch.randn(N, C, W - 1, device=DEVICE).to(dtype)
    weight = torch.randn(C, 1, W, device=DEVICE)
    s_fast = state.clone()
    with torch.no_grad():
        s_ref64 = state.double()
        y_ref = chunked.short_conv_step(x.double(), s_ref64, weight.double())
        y = fast.short_conv_step(x, s_fast, weight)
    assert y.dtype == dtype and y.shape == (N, C)
    bound = TOLERANCES["fast_f32_vs_f64"] if dtype == torch.float32 else 1e-2
    assert rel_rms_error(y, y_ref) < bound
    # the window moves on exactly: the last W - 2 carried inputs, then x
    expected = torch.cat([state[:, :, 1:], x[:, :, None]], 2)
    assert torch.equal(s_fast, expected)
    assert torch.equal(s_ref64.to(dtype), expected)


@pytest.mark.parametrize("shape", [(3, 2, 16), (5, 128), (2, 4, 100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gated_rms_norm_twins(shape, dtype):
    torch.manual_seed(len(shape))
    x, gate = (torch.randn(*shape, device=DEVICE).to(dtype) for _ in range(2))
    weight = torch.rand(shape[-1], device=DEVICE)
    ref = chunked.gated_rms_norm(x.double(), gate.double(), weight.double(), 1e-5)
    y = fast.gated_rms_norm(x, gate, weight, 1e-5)
    assert y.dtype == dtype and y.shape == x.shape
    bound = TOLERANCES["fast_f32_vs_f64"] if dtype == torch.float32 else 1e-2
    assert rel_rms_error(y, ref) < bound


def test_step_ops_pass_opcheck():
    def randn(*shape):
        return torch.randn(*shape, device=DEVICE)

    torch.library.opcheck(short_conv_step_op, (randn(2, 24), randn(2, 24, 3), randn(24, 4)))
    torch.library.opcheck(gated_rms_norm_op, (randn(3, 2, 16), randn(3, 2, 16), randn(16), 1e-5))


@pytest.mark.parametrize("fn", [chunked.short_conv_step, fast.short_conv_step])
def test_short_conv_step_errors_name_the_argument(fn):
    x, state, w = torch.randn(2, 8), torch.randn(2, 8, 3), torch.randn(8, 4)
    with pytest.raises(ValueError, match="conv_state"):
        fn(x, torch.randn(2, 8, 2), w)
    with pytest.raises(ValueError, match="weight"):
        fn(x, state, torch.randn(7, 4))
    with pytest.raises(ValueError, match="^x"):
        fn(x[None], state, w)
    with pytest.raises(TypeError, match="^x"):
        fn(x.long(), state, w)


@pytest.mark.parametrize("fn", [chunked.gated_rms_norm, fast.gated_rms_norm])
def test_gated_rms_norm_errors_name_the_argument(fn):
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="gate"):
        fn(x, torch.randn(2, 7), torch.ones(8), 1e-5)
    with pytest.raises(ValueError, match="weight"):
        fn(x, x, torch.ones(7), 1e-5)
    with pytest.raises(ValueError, match="eps"):
        fn(x, x, torch.ones(8), -1.0)


def test_fast_step_kernels_refuse_float64_and_gradients():
    x, state, w = torch.randn(2, 8, dtype=torch.float64), torch.randn(2, 8, 3), torch.randn(8, 4)
    with pytest.raises(TypeError, match="^x: expected float32, bfloat16 or float16"):
        fast.short_conv_step(x, state, w)
    with pytest.raises(ValueError, match="^weight: .*no backward"):
        fast.short_conv_step(x.float(), state, w.requires_grad_())


def test_fast_step_kernels_refuse_cpu_tensors_without_the_interpreter():
    """In a process whose kernels were defined without the interpreter: each kernel names its first argument."""
    import os
    import subprocess
    import sys

    script = ("import torch\nimport kda_explained.fast as fast\nx = torch.randn(2, 8)\n"
              "calls = [lambda: fast.short_conv_step(x, torch.randn(2, 8, 3), torch.randn(8, 4)),\n"
              "         lambda: fast.gated_rms_norm(x, x, torch.ones(8), 1e-5),\n"
              "         lambda: fast.decode_attention(torch.randn(1, 1, 8), torch.randn(1, 1, 5, 8),\n"
              "                                       torch.randn(1, 1, 5, 8), torch.ones(1, 5, dtype=torch.bool),\n"
              "                                       torch.tensor([3]))]\n"
              "for call in calls:\n    try:\n        call()\n    except ValueError as e:\n        print('ERROR:', e)\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    errors = [line for line in out.stdout.splitlines() if line.startswith("ERROR:")]
    assert [e.split(":")[1].strip() for e in errors] == ["x", "x", "q"], out.stdout + out.stderr[-2000:]
    assert all("expected a CUDA tensor" in e and "got device cpu" in e for e in errors), out.stdout


def test_short_conv_step_on_a_strided_window():
    """The window may be a view into a larger cache (transformers stacks q, k and v's channels)."""
    torch.manual_seed(5)
    x, w = torch.randn(2, 8, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    stacked = torch.randn(2, 3 * 8, 3, device=DEVICE)
    view = stacked[:, 8:16]  # the middle third: strided, not contiguous
    ref = view.clone()
    with torch.no_grad():
        y_ref = chunked.short_conv_step(x, ref, w)
        y = fast.short_conv_step(x, view, w)
    assert not view.is_contiguous()
    assert rel_rms_error(y, y_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert torch.equal(stacked[:, 8:16], ref)


@pytest.mark.parametrize("backend", ["chunked", "fast"])
@pytest.mark.parametrize("gate, neg", [("softplus", False), ("lowerbound", True)])
def test_layer_step_matches_forward(backend, gate, neg):
    """Decoding through ``step`` gives what the whole sequence gives, within the float32 bound."""
    torch.manual_seed(3)
    kw = dict(hidden_size=32, num_heads=2, head_dim=16, num_v_heads=4, gate=gate, allow_neg_eigval=neg)
    ref = KimiDeltaAttention(**kw, backend="chunked").double().to(DEVICE)
    layer = KimiDeltaAttention(**kw, backend=backend).to(DEVICE)
    layer.load_state_dict(ref.state_dict())
    x = torch.randn(2, 9, 32, dtype=torch.float64, device=DEVICE)
    with torch.no_grad():
        y_ref = ref(x)
        cache = layer.init_cache(2)
        y = [layer(x[:, :5].float(), cache=cache)]
        y += [layer.step(x[:, t].float(), cache)[:, None] for t in range(5, 9)]
    assert rel_rms_error(torch.cat(y, 1), y_ref) < TOLERANCES["fast_f32_vs_f64"]
    assert cache.seen == 5  # step is the bare computation; forward does the bookkeeping


def tiny_model(backend: str) -> HybridLM:
    torch.manual_seed(0)
    cfg = HybridConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=2, head_dim=16, intermediate_size=64,
                       kda_backend=backend)
    return HybridLM(cfg).to(DEVICE).eval()


def padded_prompt():
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 50, (3, 6), generator=g).to(DEVICE)
    mask = torch.ones(3, 6, dtype=torch.long, device=DEVICE)
    mask[0, :2] = 0  # left padding
    mask[2, 4:] = 0  # right padding
    return prompt, mask


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_generate_static_decoder_gives_eager_tokens(backend):
    model = tiny_model(backend)
    prompt, mask = padded_prompt()
    eager = model.generate(prompt, 7, attention_mask=mask)
    assert torch.equal(model.generate(prompt, 7, attention_mask=mask, cuda_graph=True), eager)
    assert torch.equal(model.generate(prompt, 7, cuda_graph=True), model.generate(prompt, 7))


def test_generate_compiled_static_decoder_gives_eager_tokens():
    model = tiny_model("chunked")
    prompt, mask = padded_prompt()
    eager = model.generate(prompt, 5, attention_mask=mask)
    torch._dynamo.reset()
    assert torch.equal(model.generate(prompt, 5, attention_mask=mask, cuda_graph=True, compile="aot_eager"), eager)


def test_static_decoder_logits_and_cache_bookkeeping():
    model = tiny_model("chunked")
    prompt, mask = padded_prompt()
    with torch.no_grad():
        c_eager, c_static = model.init_cache(3, capacity=10), model.init_cache(3, capacity=10)
        model(prompt, attention_mask=mask, cache=c_eager)
        model(prompt, attention_mask=mask, cache=c_static)
        dec = model.decoder(c_static, capture=False)
        token = torch.tensor([[3], [7], [11]], device=DEVICE)
        for _ in range(4):
            ref = model(token, cache=c_eager)[:, -1]
            got = dec(token)
            assert rel_rms_error(got, ref) < 1e-5
            token = ref.argmax(-1, keepdim=True)
        assert c_static.length == c_eager.length == 10
        assert torch.equal(c_static.mask, c_eager.mask)
        # the cache goes on through the plain forward after the static steps: no room is left for one more
        with pytest.raises(ValueError, match="^cache: the attention caches hold 10 tokens"):
            dec(token)
        dec.close()
        with pytest.raises(ValueError, match="^token: this decoder was closed"):
            dec(token)


def test_static_decoder_errors_name_the_argument():
    model = tiny_model("chunked")
    cache = model.init_cache(2, capacity=4)
    with pytest.raises(TypeError, match="^cache"):
        model.decoder("cache")
    with pytest.raises(TypeError, match="^capture"):
        model.decoder(cache, capture="yes")
    if DEVICE == "cpu":
        with pytest.raises(ValueError, match="^capture: CUDA graphs need"):
            model.decoder(cache, capture=True)
    dec = model.decoder(cache, capture=False)
    with pytest.raises(ValueError, match=r"^token: expected shape \[B, 1\]"):
        dec(torch.zeros(3, 1, dtype=torch.long, device=DEVICE))
    with pytest.raises(TypeError, match="^token"):
        dec(torch.zeros(2, 1, device=DEVICE))
    with pytest.raises(TypeError, match="^cuda_graph"):
        model.generate(torch.zeros(1, 2, dtype=torch.long, device=DEVICE), 2, cuda_graph=1)
    with pytest.raises(ValueError, match="^cuda_graph"):
        model.generate(torch.zeros(1, 2, dtype=torch.long, device=DEVICE), 2, cuda_graph=True, use_cache=False)
    assert isinstance(dec, StaticDecoder)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_cuda_graph_decoder_gpu(backend):
    """Captured once, replayed per token: the eager tokens, bf16 and float32."""
    model = tiny_model(backend)
    prompt, mask = padded_prompt()
    eager = model.generate(prompt, 12, attention_mask=mask)
    assert torch.equal(model.generate(prompt, 12, attention_mask=mask, cuda_graph=True), eager)
    bf = tiny_model(backend).to(torch.bfloat16)
    a = bf.generate(prompt, 8)
    assert torch.equal(bf.generate(prompt, 8, cuda_graph=True), a)
    # one replay per step, the capture made once
    with torch.no_grad():
        cache = model.init_cache(3, capacity=20)
        model(prompt, cache=cache)
        dec = model.decoder(cache)
        assert dec.graph is not None
        token = prompt[:, -1:]
        for _ in range(5):
            token = dec(token).argmax(-1, keepdim=True)
        dec.close()
        assert dec.graph is None
        with pytest.raises(ValueError, match="closed"):
            dec(token)
        # a decoder left to the garbage collector does not disturb the next capture
        for _ in range(3):
            model.decoder(model.init_cache(3, capacity=4))


@pytest.mark.parametrize("name", ["short_conv_step", "gated_rms_norm"])
def test_step_twins_share_name_and_signature(name):
    from test_twins import positional

    assert positional(getattr(fast, name)) == positional(getattr(chunked, name))


@pytest.mark.parametrize("B, H, L, Dh, n", [(2, 3, 40, 16, 17), (1, 2, 300, 32, 300), (3, 1, 70, 20, 1),
                                            (2, 2, 1000, 16, 513)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_twins(B, H, L, Dh, n, dtype):
    """Split-key attention over the first ``n`` positions of the buffer, padding keys hidden."""
    torch.manual_seed(L + n)
    q = torch.randn(B, H, Dh, device=DEVICE).to(dtype)
    k, v = (torch.randn(B, H, L, Dh, device=DEVICE).to(dtype) for _ in range(2))
    valid = torch.rand(B, L, device=DEVICE) > 0.3
    valid[:, n - 1] = True  # the newest token is always valid
    length = torch.tensor([n], device=DEVICE)
    ref = chunked.decode_attention(q.double(), k.double(), v.double(), valid, length)
    # past the filled length the buffer's contents do not matter (the kernel never reads them;
    # the PyTorch twin masks them, so they need only be finite there)
    k[:, :, n:], v[:, :, n:] = 1e4, -1e4
    bound = TOLERANCES["fast_f32_vs_f64"] if dtype == torch.float32 else 1e-2
    assert rel_rms_error(chunked.decode_attention(q, k, v, valid, length), ref) < bound
    v[:, :, n:] = float("nan")
    out = fast.decode_attention(q, k, v, valid, length)
    assert out.dtype == dtype and out.shape == (B, H, Dh)
    assert rel_rms_error(out, ref) < bound


def test_decode_attention_split_plan():
    from kda_explained.fast.step import decode_attention_splits

    for BH, L in [(1, 1), (1, 262144), (64 * 16, 8192), (3, 100)]:
        S, SPLIT = decode_attention_splits(BH, L)
        assert S * SPLIT >= L > (S - 1) * SPLIT and SPLIT % 64 == 0


def test_decode_attention_errors_name_the_argument():
    q, k = torch.randn(1, 2, 8), torch.randn(1, 2, 5, 8)
    valid, n = torch.ones(1, 5, dtype=torch.bool), torch.tensor([3])
    for fn in (chunked.decode_attention, fast.decode_attention):
        with pytest.raises(ValueError, match="^k"):
            fn(q, k[..., :4], k, valid, n)
        with pytest.raises(ValueError, match="^key_valid"):
            fn(q, k, k, valid.int(), n)
        with pytest.raises(TypeError, match="^length"):
            fn(q, k, k, valid, 3)


def test_decode_attention_op_passes_opcheck():
    from kda_explained.fast.step import decode_attention_op

    q, k, v = torch.randn(2, 2, 16, device=DEVICE), torch.randn(2, 2, 70, 16, device=DEVICE), \
        torch.randn(2, 2, 70, 16, device=DEVICE)
    valid = torch.ones(2, 70, dtype=torch.int8, device=DEVICE)
    torch.library.opcheck(decode_attention_op, (q, k, v, valid, torch.tensor([40], device=DEVICE)))


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_static_steps_then_plain_forward_continue_the_same_cache(backend):
    """The decoder's host bookkeeping (lengths, padding mask) lets the plain forward carry on after it."""
    model = tiny_model(backend)
    prompt, mask = padded_prompt()
    tokens = torch.tensor([[3], [7], [11]], device=DEVICE)
    with torch.no_grad():
        c_ref, c_mix = model.init_cache(3, capacity=12), model.init_cache(3, capacity=12)
        model(prompt, attention_mask=mask, cache=c_ref)
        model(prompt, attention_mask=mask, cache=c_mix)
        ref = [model(tokens, cache=c_ref)[:, -1] for _ in range(5)]
        dec = model.decoder(c_mix, capture=False)
        mixed = [dec(tokens) for _ in range(3)]
        dec.close()
        mixed += [model(tokens, cache=c_mix)[:, -1] for _ in range(2)]
    for a, b in zip(mixed, ref):
        assert rel_rms_error(a, b) < 1e-5
    assert c_mix.length == c_ref.length == 11 and torch.equal(c_mix.mask, c_ref.mask)


def test_compiled_static_decoder_on_the_fast_backend():
    """The static step through torch.compile with the fast layer's operators (interpreter on a CPU)."""
    model = tiny_model("fast")
    prompt, _ = padded_prompt()
    eager = model.generate(prompt, 4)
    torch._dynamo.reset()
    assert torch.equal(model.generate(prompt, 4, cuda_graph=True, compile="aot_eager"), eager)


@pytest.mark.gpu
@pytest.mark.parametrize("B, H, L, n", [(1, 16, 262144, 262144), (4, 16, 200_000, 150_001), (64, 16, 8192, 4097)])
def test_decode_attention_gpu_real_sizes(B, H, L, n):
    """Split-key attention at real sizes (bf16, Dh = 128): many splits, offsets past 2^31 bytes."""
    torch.manual_seed(n)
    q = torch.randn(B, H, 128, device="cuda", dtype=torch.bfloat16)
    k, v = (torch.randn(B, H, L, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    valid = torch.rand(B, L, device="cuda") > 0.1
    valid[:, n - 1] = True
    length = torch.tensor([n], device="cuda")
    ref = chunked.decode_attention(q.float(), k.float(), v.float(), valid, length)
    assert rel_rms_error(fast.decode_attention(q, k, v, valid, length), ref) < 1e-2


@pytest.mark.gpu
def test_short_conv_step_and_norm_gpu_real_sizes():
    torch.manual_seed(0)
    x = torch.randn(256, 4096, device="cuda", dtype=torch.bfloat16)
    state = torch.randn(256, 4096, 3, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(4096, 1, 4, device="cuda")
    s_fast = state.clone()
    with torch.no_grad():
        ref = chunked.short_conv_step(x.double(), state.double(), w.double())
        y = fast.short_conv_step(x, s_fast, w)
    assert rel_rms_error(y, ref) < 1e-2
    assert torch.equal(s_fast, torch.cat([state[:, :, 1:], x[:, :, None]], 2))
    o, gate = (torch.randn(256, 32, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    weight = torch.rand(128, device="cuda")
    ref = chunked.gated_rms_norm(o.double(), gate.double(), weight.double(), 1e-5)
    assert rel_rms_error(fast.gated_rms_norm(o, gate, weight, 1e-5), ref) < 1e-2
