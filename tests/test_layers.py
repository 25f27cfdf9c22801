"""The model layer: ``KimiDeltaAttention``, its cache, the fla converter and the tiny hybrid LM.

Sizes are tiny (hidden 64, 2 heads of 16) so the file runs in well under two
minutes on two CPU cores. Exact comparisons run the chunked backend in float64
and use the chunked float64 bound of the tolerance table.
"""

from __future__ import annotations

import re

import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from kda_explained.layers import (
    HybridConfig,
    HybridLM,
    KimiDeltaAttention,
    causal_conv1d,
    cache_memory,
    convert_fla_state_dict,
)
from kda_explained import naive
from kda_explained.testing import TOLERANCES, rel_rms_error, to_numpy64

EXACT = TOLERANCES["chunked_f64_vs_naive"]  # float64 vs float64, different order of operations
D, H, K = 64, 2, 16


def make_layer(seed=0, dtype=torch.float64, **kw) -> KimiDeltaAttention:
    torch.manual_seed(seed)
    kw = {"hidden_size": D, "num_heads": H, "head_dim": K, "backend": "chunked", **kw}
    return KimiDeltaAttention(**kw).to(dtype)


def assert_close(a, ref, bound=EXACT, what=""):
    err = rel_rms_error(a, ref)
    assert err < bound, f"{what}: relative RMS error {err:.3g} > {bound:.1g}"


# ----------------------------------------------------------------------------------------------
# the released checkpoint layout
# ----------------------------------------------------------------------------------------------


def released_shapes(hidden, heads, head_dim, conv_size=4, A_log_4d=False):
    """Names and shapes of ``model.layers.<i>.self_attn`` in a Kimi Linear checkpoint (written out by hand)."""
    p = heads * head_dim
    return {
        "q_proj.weight": (p, hidden), "k_proj.weight": (p, hidden), "v_proj.weight": (p, hidden),
        "q_conv1d.weight": (p, 1, conv_size), "k_conv1d.weight": (p, 1, conv_size),
        "v_conv1d.weight": (p, 1, conv_size),
        "A_log": (1, 1, heads, 1) if A_log_4d else (heads,),
        "f_a_proj.weight": (head_dim, hidden), "f_b_proj.weight": (p, head_dim),
        "dt_bias": (p,), "b_proj.weight": (heads, hidden),
        "g_a_proj.weight": (head_dim, hidden), "g_b_proj.weight": (p, head_dim),
        "o_norm.weight": (head_dim,), "o_proj.weight": (hidden, p),
    }


@pytest.mark.parametrize("A_log_4d", [False, True], ids=["A_log[H]", "A_log[1,1,H,1]"])
def test_strict_load_of_released_names_and_shapes(A_log_4d):
    shapes = released_shapes(D, H, K, A_log_4d=A_log_4d)
    g = torch.Generator().manual_seed(1)
    prefix = "model.layers.0.self_attn."
    ckpt = {prefix + name: torch.randn(shape, generator=g, dtype=torch.float32 if name in ("A_log", "dt_bias")
                                       else torch.bfloat16) for name, shape in shapes.items()}
    layer = KimiDeltaAttention(D, H, K)
    assert set(layer.state_dict()) == set(shapes)
    result = layer.load_state_dict({k[len(prefix):]: v for k, v in ckpt.items()}, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    assert layer.A_log.shape == (H,) and layer.A_log.dtype == torch.float32
    assert layer.dt_bias.dtype == torch.float32
    for name, value in ckpt.items():
        got = layer.state_dict()[name[len(prefix):]]
        assert torch.equal(got, value.reshape(got.shape).to(got.dtype)), name


def test_decay_parameters_stay_float32_and_bf16_runs():
    layer = make_layer(dtype=torch.bfloat16)
    assert layer.A_log.dtype == layer.dt_bias.dtype == torch.float32
    assert layer.q_proj.weight.dtype == torch.bfloat16
    x = torch.randn(2, 9, D, dtype=torch.bfloat16)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and bool(torch.isfinite(y).all())


# ----------------------------------------------------------------------------------------------
# flash-linear-attention naming
# ----------------------------------------------------------------------------------------------


def to_fla(sd, prefix="", g_bias=None):
    """Our (Kimi) names -> fla's ``KimiDeltaAttention`` names, as fla would save them."""
    names = {"f_a_proj.weight": "f_proj.0.weight", "f_b_proj.weight": "f_proj.1.weight",
             "g_a_proj.weight": "g_proj.0.weight", "g_b_proj.weight": "g_proj.1.weight"}
    out = {prefix + names.get(k, k): v.clone() for k, v in sd.items()}
    out[prefix + "g_proj.1.bias"] = torch.zeros(sd["g_b_proj.weight"].shape[0]) if g_bias is None else g_bias
    return out


def test_convert_fla_state_dict_roundtrip_with_prefix():
    src = make_layer(seed=3)
    prefix = "model.layers.2.attn."
    fla = to_fla(src.state_dict(), prefix)
    fla["model.embeddings.weight"] = torch.ones(3)  # other modules pass through
    converted = convert_fla_state_dict(fla)
    assert torch.equal(converted["model.embeddings.weight"], torch.ones(3))
    dst = make_layer(seed=4)
    dst.load_state_dict({k[len(prefix):]: v for k, v in converted.items() if k.startswith(prefix)}, strict=True)
    x = torch.randn(2, 11, D, dtype=torch.float64)
    assert torch.equal(dst(x), src(x))


def test_convert_fla_state_dict_refuses_a_nonzero_gate_bias():
    fla = to_fla(make_layer().state_dict(), g_bias=torch.full((H * K,), 0.1))
    with pytest.raises(ValueError, match=r"^g_proj\.1\.bias: expected zeros"):
        convert_fla_state_dict(fla)


def test_convert_fla_state_dict_gva_repeats_gate_parameters_per_value_head():
    HV, G = 4, 2
    torch.manual_seed(5)
    fla = {
        "q_proj.weight": torch.randn(H * K, D), "k_proj.weight": torch.randn(H * K, D),
        "v_proj.weight": torch.randn(HV * K, D), "q_conv1d.weight": torch.randn(H * K, 1, 4),
        "k_conv1d.weight": torch.randn(H * K, 1, 4), "v_conv1d.weight": torch.randn(HV * K, 1, 4),
        "f_proj.0.weight": torch.randn(K, D), "f_proj.1.weight": torch.randn(H * K, K),
        "b_proj.weight": torch.randn(H, D), "A_log": torch.randn(H), "dt_bias": torch.randn(H * K),
        "g_proj.0.weight": torch.randn(K, D), "g_proj.1.weight": torch.randn(HV * K, K),
        "g_proj.1.bias": torch.zeros(HV * K), "o_norm.weight": torch.randn(K), "o_proj.weight": torch.randn(D, HV * K),
    }
    out = convert_fla_state_dict(fla)
    layer = KimiDeltaAttention(D, H, K, num_v_heads=HV)
    layer.load_state_dict(out, strict=True)
    for j in range(HV):  # value head j takes q/k head j // G's gate, as fla's repeat does
        h = j // G
        assert torch.equal(layer.b_proj.weight[j], fla["b_proj.weight"][h])
        assert torch.equal(layer.A_log[j], fla["A_log"][h])
        assert torch.equal(layer.dt_bias.view(HV, K)[j], fla["dt_bias"].view(H, K)[h])
        assert torch.equal(layer.f_b_proj.weight.view(HV, K, K)[j], fla["f_proj.1.weight"].view(H, K, K)[h])


# ----------------------------------------------------------------------------------------------
# the short convolution, alone
# ----------------------------------------------------------------------------------------------


def test_causal_conv1d_matches_conv1d_and_packed_matches_separate():
    torch.manual_seed(6)
    C, W = 5, 4
    w = torch.randn(C, 1, W, dtype=torch.float64)
    lengths = [3, 0, 1, 7]
    xs = [torch.randn(1, n, C, dtype=torch.float64) for n in lengths]
    states = torch.randn(len(lengths), C, W - 1, dtype=torch.float64)
    ys, finals = [], []
    for n, x in enumerate(xs):
        y, s = causal_conv1d(x, w, initial_state=states[n:n + 1], output_final_state=True)
        ys.append(y)
        finals.append(s)
        if lengths[n] > 0:
            ref = torch.nn.functional.conv1d(torch.cat([states[n:n + 1], x.transpose(1, 2)], 2), w, groups=C)
            assert torch.allclose(y, torch.nn.functional.silu(ref.transpose(1, 2)))
    cu = torch.tensor([0, 3, 3, 4, 11])
    y, s = causal_conv1d(torch.cat(xs, 1), w, initial_state=states, output_final_state=True, cu_seqlens=cu)
    assert torch.allclose(y, torch.cat(ys, 1))
    assert torch.allclose(s, torch.cat(finals))


# ----------------------------------------------------------------------------------------------
# generation: prefill then decode == one prefill
# ----------------------------------------------------------------------------------------------


def prefill_then_decode(layer, x, T):
    cache = layer.init_cache(x.shape[0])
    with torch.no_grad():
        outs = [layer(x[:, :T], cache=cache)]
        outs += [layer(x[:, t:t + 1], cache=cache) for t in range(T, x.shape[1])]
    return torch.cat(outs, 1), cache


@settings(max_examples=8)
@example(B=1, T=1, n=1, gate="softplus", HV=H, seed=0, neg=False)
@example(B=2, T=70, n=3, gate="lowerbound", HV=2 * H, seed=1, neg=False)  # T > one 64-token chunk, GVA
@example(B=2, T=70, n=3, gate="softplus", HV=2 * H, seed=2, neg=True)  # beta in (0, 2)
@given(B=st.integers(1, 2), T=st.integers(1, 40), n=st.integers(1, 4), gate=st.sampled_from(["softplus", "lowerbound"]),
       HV=st.sampled_from([H, 2 * H]), seed=st.integers(0, 100), neg=st.booleans())
def test_prefill_then_decode_equals_prefill(B, T, n, gate, HV, seed, neg):
    layer = make_layer(seed, gate=gate, num_v_heads=HV, allow_neg_eigval=neg)
    x = torch.randn(B, T + n, D, dtype=torch.float64)
    y, cache = prefill_then_decode(layer, x, T)
    full_cache = layer.init_cache(B)
    with torch.no_grad():
        y_ref = layer(x, cache=full_cache)
    assert_close(y, y_ref, what="outputs")
    assert_close(cache.state, full_cache.state, what="recurrent state")
    assert_close(cache.conv_v, full_cache.conv_v, what="conv state")
    assert cache.state.shape == (B, HV, K, K)


def test_fast_backend_prefill_then_decode():
    """The fast backend (Triton; under the interpreter on a CPU) against the chunked one in float64."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ref_layer = make_layer(7, num_v_heads=2 * H, gate="lowerbound").to(device)
    x = torch.randn(2, 21, D, dtype=torch.float64, device=device)
    with torch.no_grad():
        y_ref = ref_layer(x)
    layer = make_layer(7, dtype=torch.float32, num_v_heads=2 * H, gate="lowerbound", backend="fast").to(device)
    y, _ = prefill_then_decode(layer, x.float(), 18)
    assert_close(y, y_ref, TOLERANCES["fast_f32_vs_f64"], "fast prefill + decode vs chunked float64")


@pytest.mark.gpu
@pytest.mark.parametrize("gate", ["softplus", "lowerbound"])
def test_fast_backend_prefill_then_decode_gpu(gate):
    torch.manual_seed(8)
    kw = dict(hidden_size=512, num_heads=4, head_dim=128, gate=gate)
    ref_layer = KimiDeltaAttention(**kw, backend="chunked").double().cuda()
    layer = KimiDeltaAttention(**kw, backend="fast").cuda()
    layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(3, 300, 512, dtype=torch.float64, device="cuda")
    with torch.no_grad():
        y_ref = ref_layer(x)
    y, cache = prefill_then_decode(layer, x.float(), 290)
    assert_close(y, y_ref, TOLERANCES["fast_tf32_vs_f64"], "fast prefill + decode vs chunked float64")
    assert cache.state.dtype == torch.float32


# ----------------------------------------------------------------------------------------------
# allow_neg_eigval: beta = 2 sigmoid(b_proj x), in (0, 2)
# ----------------------------------------------------------------------------------------------


def naive_layer(layer, x, beta_scale):
    """``layer`` written out around the naive core in float64, with ``beta = beta_scale * sigmoid(b_proj x)``.

    ``layer`` is float64 with the softplus gate; nothing of its ``forward`` is used.
    """
    B, T, _ = x.shape
    HV = layer.num_v_heads
    n = to_numpy64
    with torch.no_grad():
        q = layer.q_conv1d(layer.q_proj(x))[0].view(B, T, H, K)  # [B, T, H, K]
        k = layer.k_conv1d(layer.k_proj(x))[0].view(B, T, H, K)
        v = layer.v_conv1d(layer.v_proj(x))[0].view(B, T, HV, K)  # [B, T, HV, V]
        f = layer.f_b_proj(layer.f_a_proj(x)).view(B, T, HV, K)  # [B, T, HV, K]
        b = layer.b_proj(x)  # [B, T, HV]
        gate = layer.g_b_proj(layer.g_a_proj(x)).view(B, T, HV, K)
        g = naive.kda_gate(n(f), n(layer.A_log), n(layer.dt_bias))
        beta = beta_scale * naive.sigmoid(n(b))
        o, _ = naive.kda(naive.l2norm(n(q)), naive.l2norm(n(k)), n(v), g, beta)
        o = layer.o_norm(torch.from_numpy(o), gate)
        return layer.o_proj(o.reshape(B, T, HV * K)), beta


def strong_beta_layer(seed, dtype=torch.float64, **kw):
    """A layer whose ``b_proj`` is scaled up so that ``sigmoid(b_proj x)`` spans (0, 1) nearly end to end."""
    layer = make_layer(seed, dtype, num_v_heads=2 * H, **kw)
    with torch.no_grad():
        layer.b_proj.weight.mul_(8.0)
    return layer


@pytest.mark.parametrize("T", [9, 70], ids=["recurrent_path", "chunk_path"])
def test_allow_neg_eigval_chunked_matches_naive_with_beta_up_to_2(T):
    layer = strong_beta_layer(20, allow_neg_eigval=True)
    x = torch.randn(2, T, D, dtype=torch.float64)
    ref, beta = naive_layer(layer, x, beta_scale=2.0)
    assert beta.max() > 1.9 and beta.min() < 0.1, "beta should cover (0, 2)"
    with torch.no_grad():
        assert_close(layer(x), ref, what="allow_neg_eigval, chunked vs naive")


def test_allow_neg_eigval_fast_prefill_then_decode_matches_naive():
    """The fast backend (chunk kernel for the prefill, recurrent kernel for decoding) with beta in (0, 2)."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 21, D, dtype=torch.float64)
    ref, _ = naive_layer(strong_beta_layer(21), x, beta_scale=2.0)
    layer = strong_beta_layer(21, torch.float32, allow_neg_eigval=True, backend="fast").to(device)
    y, _ = prefill_then_decode(layer, x.float().to(device), 18)
    assert_close(y, ref, TOLERANCES["fast_f32_vs_f64"], "allow_neg_eigval, fast prefill + decode vs naive")


def test_allow_neg_eigval_is_off_by_default_and_reaches_the_hybrid():
    layer = strong_beta_layer(22)
    assert layer.allow_neg_eigval is False
    x = torch.randn(1, 12, D, dtype=torch.float64)
    ref, _ = naive_layer(layer, x, beta_scale=1.0)
    with torch.no_grad():
        assert_close(layer(x), ref, what="default (beta = sigmoid) vs naive")
        neg = strong_beta_layer(22, allow_neg_eigval=True)
        assert rel_rms_error(neg(x), ref) > 1e-3, "allow_neg_eigval=True must change the function"
    assert HybridConfig().allow_neg_eigval is False
    model = tiny_model(allow_neg_eigval=True)
    kda_layers = [blk.mixer for blk in model.layers if blk.kind == "kda"]
    assert kda_layers and all(m.allow_neg_eigval for m in kda_layers)
    assert "allow_neg_eigval=True" in repr(kda_layers[0])
    with pytest.raises(TypeError, match=r"^allow_neg_eigval: expected a bool, got int"):
        KimiDeltaAttention(D, H, K, allow_neg_eigval=1)


# ----------------------------------------------------------------------------------------------
# padded and packed batches
# ----------------------------------------------------------------------------------------------


def test_padded_batch_equals_each_sequence_alone():
    layer = make_layer(9)
    T = 12
    mask = torch.ones(4, T, dtype=torch.bool)
    mask[0, :5] = False  # left padding
    mask[1, 9:] = False  # right padding
    mask[2, [2, 7]] = False  # holes
    x = torch.randn(4, T, D, dtype=torch.float64)
    cache = layer.init_cache(4)
    with torch.no_grad():
        y = layer(x, attention_mask=mask, cache=cache)
        for b in range(4):
            alone_cache = layer.init_cache(1)
            alone = layer(x[b:b + 1, mask[b]], cache=alone_cache)
            assert_close(y[b:b + 1, mask[b]], alone, what=f"row {b}")
            assert_close(cache.state[b], alone_cache.state[0], what=f"state of row {b}")
            assert_close(cache.conv_q[b], alone_cache.conv_q[0], what=f"conv state of row {b}")
    assert bool((y[~mask] == 0).all())


def test_packed_batch_equals_each_sequence_alone():
    layer = make_layer(10, num_v_heads=2 * H)
    lengths = [5, 1, 9]
    xs = [torch.randn(1, n, D, dtype=torch.float64) for n in lengths]
    cu = torch.tensor([0, 5, 6, 15])
    cache = layer.init_cache(3)
    with torch.no_grad():
        y = layer(torch.cat(xs, 1), cu_seqlens=cu, cache=cache)
        for n, x in enumerate(xs):
            assert_close(y[:, cu[n]:cu[n + 1]], layer(x), what=f"sequence {n}")


@pytest.mark.parametrize("lengths", [[5, 1, 30], [2, 3, 0]], ids=["chunked core", "recurrent core"])
def test_fast_backend_hands_the_core_host_offsets(monkeypatch, lengths):
    """A packed batch on the fast backend: the layer reads the offsets once and passes them down as
    ``cu_seqlens_cpu`` (the core would read the device tensor back again), with the chunked
    backend's float64 outputs."""
    from kda_explained import fast

    seen = []
    for name in ("chunk_kda", "fused_recurrent_kda"):
        def spy(*a, _inner=getattr(fast, name), **kw):
            seen.append(kw.get("cu_seqlens_cpu"))
            return _inner(*a, **kw)

        monkeypatch.setattr(fast, name, spy)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    offsets = [0, *torch.tensor(lengths).cumsum(0).tolist()]
    x = torch.randn(1, offsets[-1], D, dtype=torch.float64, device=device)
    cu = torch.tensor(offsets, device=device)
    with torch.no_grad():
        y_ref = make_layer(12, num_v_heads=2 * H).to(device)(x, cu_seqlens=cu)
        layer = make_layer(12, dtype=torch.float32, num_v_heads=2 * H, backend="fast").to(device)
        y = layer(x.float(), cu_seqlens=cu)
    assert seen == [offsets]
    assert_close(y, y_ref, TOLERANCES["fast_f32_vs_f64"], "fast packed batch vs chunked float64")


# ----------------------------------------------------------------------------------------------
# gradients
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gate", ["softplus", "lowerbound"])
def test_gradients_reach_every_parameter(gate):
    layer = make_layer(11, dtype=torch.float32, gate=gate, num_v_heads=2 * H)
    x = torch.randn(2, 20, D, requires_grad=True)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[0, :3] = False
    layer(x, attention_mask=mask).square().mean().backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None, f"{name}: no gradient"
        assert bool(torch.isfinite(p.grad).all()) and p.grad.abs().sum() > 0, f"{name}: gradient {p.grad}"
    assert bool((x.grad[0, :3] == 0).all()), "padding must not influence the output"


def test_gradients_reach_every_parameter_of_the_hybrid():
    torch.manual_seed(12)
    model = HybridLM(HybridConfig(vocab_size=40, hidden_size=D, num_layers=4, num_heads=H, head_dim=K,
                                  intermediate_size=96))
    ids = torch.randint(0, 40, (2, 10))
    logits = model(ids)
    torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 40), ids[:, 1:].reshape(-1)).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}: no gradient"


# ----------------------------------------------------------------------------------------------
# the hybrid model: cached generation == recomputation
# ----------------------------------------------------------------------------------------------


def tiny_model(seed=13, **kw):
    torch.manual_seed(seed)
    cfg = HybridConfig(**{"vocab_size": 50, "hidden_size": D, "num_layers": 4, "num_heads": H, "head_dim": K,
                          "intermediate_size": 96, "kda_backend": "chunked", **kw})
    return HybridLM(cfg).double().eval()


def test_cached_decoding_logits_equal_full_recomputation():
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 15))
    with torch.no_grad():
        cache = model.init_cache(2)
        logits = [model(ids[:, :10], cache=cache)]
        logits += [model(ids[:, t:t + 1], cache=cache) for t in range(10, 15)]
        ref = model(ids)
    assert_close(torch.cat(logits, 1), ref, what="logits")
    assert cache.length == 15 and cache.layers[3].length == 15


def test_generate_with_cache_equals_without():
    model = tiny_model(14)
    ids = torch.randint(0, 50, (3, 7))
    out = model.generate(ids, max_new_tokens=6)
    assert out.shape == (3, 13) and torch.equal(out[:, :7], ids)
    assert torch.equal(out, model.generate(ids, max_new_tokens=6, use_cache=False))


@pytest.mark.parametrize("side", ["left", "right"])
def test_generate_padded_batch_equals_each_prompt_alone(side):
    model = tiny_model(15)
    lengths = [6, 3]
    T = max(lengths)
    ids = torch.zeros(2, T, dtype=torch.long)
    mask = torch.zeros(2, T, dtype=torch.bool)
    prompts = [torch.randint(1, 50, (1, n)) for n in lengths]
    for b, p in enumerate(prompts):
        cols = slice(T - p.shape[1], T) if side == "left" else slice(0, p.shape[1])
        ids[b, cols], mask[b, cols] = p[0], True
    out = model.generate(ids, max_new_tokens=5, attention_mask=mask)
    assert torch.equal(out, model.generate(ids, max_new_tokens=5, attention_mask=mask, use_cache=False))
    for b, p in enumerate(prompts):
        alone = model.generate(p, max_new_tokens=5)
        assert torch.equal(out[b, T:], alone[0, p.shape[1]:]), f"row {b}"


# ----------------------------------------------------------------------------------------------
# cache memory
# ----------------------------------------------------------------------------------------------


def test_cache_memory_matches_the_allocated_caches_and_shows_the_kv_reduction():
    model = tiny_model(16, num_layers=8).float()
    B, L = 2, 33
    with torch.no_grad():
        cache = model.init_cache(B)
        model(torch.randint(0, 50, (B, L)), cache=cache)
    report = cache_memory(model, batch=B, context_len=L, dtype=torch.float32)
    held = cache.nbytes()
    for part in ("attention_kv", "kda_state", "kda_conv", "total"):
        assert report["hybrid"][part] == held[part], part
    assert report["hybrid"]["attention_layers"] == 2 and report["all_attention"]["attention_layers"] == 8
    assert report["kv_reduction"] == 0.75
    longer = cache_memory(model, batch=B, context_len=10 * L, dtype=torch.float32)
    assert longer["hybrid"]["kda_state"] == report["hybrid"]["kda_state"]  # constant in the context length
    assert longer["hybrid"]["attention_kv"] == 10 * report["hybrid"]["attention_kv"]


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


def test_bad_inputs_raise_value_errors_naming_the_argument():
    layer = make_layer()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    cases = [
        (lambda: layer(torch.randn(2, 5, D + 1, dtype=torch.float64)), "hidden_states", "hidden_size = 64"),
        (lambda: layer(x, attention_mask=torch.ones(2, 4)), "attention_mask", "[2, 5]"),
        (lambda: layer(x, cache=layer.init_cache(3)), "cache", "N = 2"),
        (lambda: layer(x, cu_seqlens=torch.tensor([0, 5])), "cu_seqlens", "B = 1"),
        (lambda: layer(x[:1], cu_seqlens=torch.tensor([0, 2, 4])), "cu_seqlens", "T = 5"),
        (lambda: layer(x, attention_mask=torch.ones(2, 5), cu_seqlens=torch.tensor([0, 5])), "attention_mask",
         "both"),
        (lambda: KimiDeltaAttention(D, 2, K, num_v_heads=3), "num_v_heads", "multiple"),
        (lambda: KimiDeltaAttention(D, 2, K, gate="sigmoid"), "gate", "softplus"),
        (lambda: KimiDeltaAttention(D, 2, K, backend="cuda"), "backend", "chunked"),
        (lambda: KimiDeltaAttention(D, 2, K, lower_bound=1.0), "lower_bound", "negative"),
    ]
    model = tiny_model()
    ids = torch.randint(0, 50, (2, 5))
    cases += [
        (lambda: model(ids, cache=model.init_cache(3)), "cache", "batch size B = 2"),
        (lambda: model(ids, attention_mask=torch.ones(2, 6)), "attention_mask", "[2, 5]"),
    ]  # more, and the TypeErrors, in test_layer_errors.py
    for call, name, detail in cases:
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert message.startswith(name + ":"), message
        assert re.search(re.escape(detail), message), message


# ----------------------------------------------------------------------------------------------
# training through the fast backend: the loss curve of the chunked backend
# ----------------------------------------------------------------------------------------------


def train_losses(backend: str, steps: int, *, cfg: HybridConfig, ids: torch.Tensor, device, seed: int = 0):
    """Losses of ``steps`` AdamW steps of a tiny hybrid LM on ``ids`` (next-token prediction), one backend."""
    torch.manual_seed(seed)
    model = HybridLM(HybridConfig(**{**cfg.__dict__, "kda_backend": backend})).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(steps):
        logits = model(ids)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, cfg.vocab_size), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


@pytest.mark.gpu
def test_training_loss_curve_fast_equals_chunked():
    cfg = HybridConfig(vocab_size=128, hidden_size=256, num_layers=4, num_heads=2, head_dim=128,
                       intermediate_size=512)
    ids = torch.randint(0, 128, (4, 256), generator=torch.Generator().manual_seed(3)).cuda()
    ref = train_losses("chunked", 30, cfg=cfg, ids=ids, device="cuda")
    fast = train_losses("fast", 30, cfg=cfg, ids=ids, device="cuda")
    assert ref[-1] < 0.8 * ref[0], f"the tiny model did not learn: {ref[0]:.3f} -> {ref[-1]:.3f}"
    gap = max(abs(a - b) / abs(b) for a, b in zip(fast, ref))
    assert gap <= 1e-2, f"loss curves differ by up to {gap:.2e} (relative): fast {fast[-3:]}, chunked {ref[-3:]}"
