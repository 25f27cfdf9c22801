"""Bad calls of the model layer raise errors that name the caller's argument; padding edge cases compute.

Covers ``KimiDeltaAttention.forward``, ``HybridLM.forward`` / ``HybridLM.generate`` and
``convert_fla_state_dict``. Every error case runs in grad mode, under ``torch.no_grad()``
and under ``torch.inference_mode()``: the checks must not depend on autograd. Sizes are
tiny (hidden 32, 2 heads of 8) so the file runs in seconds.
"""

from __future__ import annotations

import contextlib
import re

import pytest
import torch

from kda_explained.layers import HybridConfig, HybridLM, KimiDeltaAttention, convert_fla_state_dict
from kda_explained.layers.hybrid import KVCache

D, H, K, VOCAB = 32, 2, 8, 50

MODES = {
    "grad": contextlib.nullcontext,
    "no_grad": torch.no_grad,
    "inference_mode": torch.inference_mode,
}


def make_layer(seed=0, **kw) -> KimiDeltaAttention:
    torch.manual_seed(seed)
    return KimiDeltaAttention(**{"hidden_size": D, "num_heads": H, "head_dim": K, "backend": "chunked", **kw})


def make_model(seed=1, **kw) -> HybridLM:
    torch.manual_seed(seed)
    cfg = HybridConfig(**{"vocab_size": VOCAB, "hidden_size": D, "num_layers": 4, "num_heads": H, "head_dim": K,
                          "intermediate_size": 48, "kda_backend": "chunked", **kw})
    return HybridLM(cfg).eval()


LAYER = make_layer()
MODEL = make_model()


def x_(B=2, T=5, dtype=torch.float32):
    return torch.randn(B, T, D, dtype=dtype)


def ids_(B=2, T=5):
    return torch.randint(0, VOCAB, (B, T))


def kv_cache_swapped(num_heads):
    """A cache of ``MODEL`` whose attention layer (layer 3) holds keys of another head count."""
    cache = MODEL.init_cache(2)
    cache.layers[3] = KVCache(2, num_heads, K)
    return cache


def mask_with_empty_row():
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[1] = 0
    return mask


# (id, call, exception, argument named first in the message, a detail the message must contain)
LAYER_CASES = [
    ("dtype_float64_vs_float32", lambda: LAYER(x_(dtype=torch.float64)), TypeError, "hidden_states", "float32"),
    ("dtype_bf16_vs_float32", lambda: LAYER(x_(dtype=torch.bfloat16)), TypeError, "hidden_states", "bfloat16"),
    ("dtype_integer", lambda: LAYER(torch.ones(2, 5, D, dtype=torch.long)), TypeError, "hidden_states", "int64"),
    ("no_tokens", lambda: LAYER(x_(T=0)), ValueError, "hidden_states", "[2, 0, 32]"),
    ("no_tokens_with_cache", lambda: LAYER(x_(T=0), cache=LAYER.init_cache(2)), ValueError, "hidden_states",
     "T >= 1"),
    ("no_rows", lambda: LAYER(x_(B=0)), ValueError, "hidden_states", "B >= 1"),
    ("mask_not_a_tensor", lambda: LAYER(x_(), attention_mask=[[1] * 5] * 2), TypeError, "attention_mask", "list"),
    ("mask_not_0_or_1", lambda: LAYER(x_(), attention_mask=torch.full((2, 5), 0.5)), ValueError, "attention_mask",
     "0 (padding)"),
    ("cache_of_wider_heads", lambda: LAYER(x_(), cache=make_layer(head_dim=2 * K).init_cache(2)), ValueError,
     "cache", "conv_q"),
    ("cache_of_more_value_heads", lambda: LAYER(x_(), cache=make_layer(num_v_heads=2 * H).init_cache(2)),
     ValueError, "cache", "conv_v"),
    ("cache_of_shorter_conv", lambda: LAYER(x_(), cache=make_layer(conv_size=3).init_cache(2)), ValueError,
     "cache", "W - 1"),
    ("cache_not_a_KDACache", lambda: LAYER(x_(), cache={"state": None}), TypeError, "cache", "KDACache"),
]

MODEL_CASES = [
    ("forward_1d_ids", lambda: MODEL(ids_()[0]), ValueError, "input_ids", "[B, T]"),
    ("forward_float_ids", lambda: MODEL(ids_().float()), TypeError, "input_ids", "float32"),
    ("forward_bool_ids", lambda: MODEL(ids_().bool()), TypeError, "input_ids", "bool"),
    ("forward_list_ids", lambda: MODEL([[1, 2, 3]]), TypeError, "input_ids", "list"),
    ("forward_ids_too_large", lambda: MODEL(ids_() + VOCAB), ValueError, "input_ids", "vocab_size = 50"),
    ("forward_negative_ids", lambda: MODEL(ids_() - VOCAB), ValueError, "input_ids", "vocab_size = 50"),
    ("forward_no_tokens", lambda: MODEL(ids_(T=0)), ValueError, "input_ids", "T >= 1"),
    ("forward_mask_not_a_tensor", lambda: MODEL(ids_(), attention_mask=[[1] * 5] * 2), TypeError,
     "attention_mask", "list"),
    ("forward_cache_of_another_model", lambda: MODEL(ids_(), cache=make_model(head_dim=2 * K).init_cache(2)),
     ValueError, "cache", "conv_q"),
    ("forward_cache_with_fewer_layers", lambda: MODEL(ids_(), cache=make_model(num_layers=2).init_cache(2)),
     ValueError, "cache", "4 layers"),
    ("forward_cache_of_another_layout", lambda: MODEL(ids_(), cache=make_model(kda_per_attention=0).init_cache(2)),
     ValueError, "cache", "layer 0"),
    ("forward_cache_of_other_attention_heads", lambda: MODEL(ids_(), cache=kv_cache_swapped(num_heads=2 * H)),
     ValueError, "cache", "layer 3"),
    ("forward_cache_not_a_HybridCache", lambda: MODEL(ids_(), cache=LAYER.init_cache(2)), TypeError, "cache",
     "HybridCache"),
    ("generate_1d_ids", lambda: MODEL.generate(ids_()[0], max_new_tokens=2), ValueError, "input_ids", "[B, T]"),
    ("generate_ids_too_large", lambda: MODEL.generate(ids_() + VOCAB, max_new_tokens=2), ValueError, "input_ids",
     "vocab_size = 50"),
    ("generate_negative_ids", lambda: MODEL.generate(ids_() - 100, max_new_tokens=2), ValueError, "input_ids",
     "-"),
    ("generate_float_ids", lambda: MODEL.generate(ids_().float(), max_new_tokens=2), TypeError, "input_ids",
     "integer"),
    ("generate_bool_ids", lambda: MODEL.generate(ids_().bool(), max_new_tokens=2), TypeError, "input_ids",
     "bool"),
    ("generate_no_tokens", lambda: MODEL.generate(ids_(T=0), max_new_tokens=2), ValueError, "input_ids", "T >= 1"),
    ("max_new_tokens_negative", lambda: MODEL.generate(ids_(), max_new_tokens=-1), ValueError, "max_new_tokens",
     "-1"),
    ("max_new_tokens_float", lambda: MODEL.generate(ids_(), max_new_tokens=1.5), TypeError, "max_new_tokens",
     "float"),
    ("max_new_tokens_bool", lambda: MODEL.generate(ids_(), max_new_tokens=True), TypeError, "max_new_tokens",
     "bool"),
    ("max_new_tokens_str", lambda: MODEL.generate(ids_(), max_new_tokens="3"), TypeError, "max_new_tokens", "str"),
    ("max_new_tokens_none", lambda: MODEL.generate(ids_(), max_new_tokens=None), TypeError, "max_new_tokens",
     "NoneType"),
    ("use_cache_not_bool", lambda: MODEL.generate(ids_(), max_new_tokens=2, use_cache="no"), TypeError,
     "use_cache", "str"),
    ("generate_mask_shape", lambda: MODEL.generate(ids_(), max_new_tokens=2, attention_mask=torch.ones(2, 4)),
     ValueError, "attention_mask", "[2, 5]"),
    ("generate_mask_with_an_empty_row", lambda: MODEL.generate(ids_(), max_new_tokens=2,
                                                                attention_mask=mask_with_empty_row()),
     ValueError, "attention_mask", "row 1"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", LAYER_CASES + MODEL_CASES, ids=lambda c: c[0])
def test_bad_call_raises_naming_the_argument(case, mode):
    _, call, error, name, detail = case
    with MODES[mode]():
        with pytest.raises(error) as info:
            call()
    message = str(info.value)
    assert type(info.value) is error, f"{type(info.value).__name__}: {message}"
    assert message.startswith(name + ":"), message
    assert re.search(re.escape(detail), message), message


# ----------------------------------------------------------------------------------------------
# padding edge cases that compute instead of raising
# ----------------------------------------------------------------------------------------------


def cache_tensors(cache):
    return {name: t.clone() for name, t in vars(cache).items() if torch.is_tensor(t)}


@pytest.mark.parametrize("mode", MODES)
def test_fully_padded_row_gives_zeros_and_leaves_its_cache_row(mode):
    layer = make_layer(2).double()
    x = torch.randn(3, 6, D, dtype=torch.float64)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1] = False  # row 1: padding only
    mask[2, :2] = False
    with MODES[mode]():
        cache = layer.init_cache(3)
        layer(torch.randn(3, 4, D, dtype=torch.float64), cache=cache)  # a non-zero cache to keep
        before = cache_tensors(cache)
        y = layer(x, attention_mask=mask, cache=cache)
        for b in (0, 2):
            alone = layer.init_cache(1)
            for name, t in vars(alone).items():
                if torch.is_tensor(t):
                    t.copy_(before[name][b:b + 1])
            ref = layer(x[b:b + 1, mask[b]], cache=alone)
            assert torch.allclose(y[b, mask[b]], ref[0], atol=1e-12), f"row {b}"
    assert bool((y[1] == 0).all())
    for name, t in cache_tensors(cache).items():
        assert torch.equal(t[1], before[name][1]), f"{name}: the padded row's cache changed"


@pytest.mark.parametrize("backend", ["chunked", "fast"])
@pytest.mark.parametrize("mode", MODES)
def test_all_padding_mask_gives_zeros_and_leaves_the_cache(mode, backend):
    # the fast backend runs its kernels on a GPU where there is one, else under the Triton interpreter
    device = "cuda" if backend == "fast" and torch.cuda.is_available() else "cpu"
    layer = make_layer(3, backend=backend).to(device)
    with MODES[mode]():
        cache = layer.init_cache(2)
        layer(x_(T=3).to(device), cache=cache)
        before = cache_tensors(cache)
        mask = torch.zeros(2, 5, dtype=torch.long, device=device)
        y = layer(x_().to(device), attention_mask=mask, cache=cache)
        y_plain = layer(x_().to(device), attention_mask=mask.bool())
    assert y.shape == y_plain.shape == (2, 5, D)
    assert bool((y == 0).all()) and bool((y_plain == 0).all())
    for name, t in cache_tensors(cache).items():
        assert torch.equal(t, before[name]), f"{name}: changed by a call with no tokens"


def test_hybrid_forward_with_a_fully_padded_row_leaves_the_other_rows_alone():
    model = make_model(4).double()
    ids = ids_(B=2, T=6)
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1] = False
    with torch.no_grad():
        logits = model(ids, attention_mask=mask)
        alone = model(ids[:1])
    assert torch.allclose(logits[0], alone[0], atol=1e-12)
    assert bool(torch.isfinite(logits).all())


def test_generate_zero_new_tokens_returns_the_prompt():
    ids = ids_()
    assert torch.equal(MODEL.generate(ids, max_new_tokens=0), ids)
    assert torch.equal(MODEL.generate(ids, max_new_tokens=torch.tensor(0)), ids)


def test_autocast_still_mixes_dtypes():
    """Under autocast the projections return bf16 from float32 weights: no dtype error there."""
    layer = make_layer(5)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        y = layer(x_(dtype=torch.bfloat16))
    assert y.shape == (2, 5, D) and bool(torch.isfinite(y).all())


# ----------------------------------------------------------------------------------------------
# flash-linear-attention state dicts with expand_v != 1
# ----------------------------------------------------------------------------------------------


def fla_state_dict(num_heads=H, head_dim=K, num_v_heads=None, expand_v=1.0, hidden=D):
    """Parameter shapes of flash-linear-attention's ``KimiDeltaAttention`` (written out from its constructor)."""
    HV = num_v_heads or num_heads
    Kv = int(head_dim * expand_v)  # fla's head_v_dim
    key_dim, value_dim = num_heads * head_dim, HV * Kv
    shapes = {
        "q_proj.weight": (key_dim, hidden), "k_proj.weight": (key_dim, hidden), "v_proj.weight": (value_dim, hidden),
        "q_conv1d.weight": (key_dim, 1, 4), "k_conv1d.weight": (key_dim, 1, 4), "v_conv1d.weight": (value_dim, 1, 4),
        "f_proj.0.weight": (Kv, hidden), "f_proj.1.weight": (key_dim, Kv), "b_proj.weight": (num_heads, hidden),
        "A_log": (num_heads,), "dt_bias": (key_dim,),
        "g_proj.0.weight": (Kv, hidden), "g_proj.1.weight": (value_dim, Kv),
        "o_norm.weight": (Kv,), "o_proj.weight": (hidden, value_dim),
    }
    g = torch.Generator().manual_seed(6)
    out = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    out["g_proj.1.bias"] = torch.zeros(value_dim)
    return out


@pytest.mark.parametrize("num_v_heads", [H, 2 * H], ids=["HV=H", "GVA"])
def test_convert_fla_state_dict_loads_expand_v_1(num_v_heads):
    layer = KimiDeltaAttention(D, H, K, num_v_heads=num_v_heads)
    layer.load_state_dict(convert_fla_state_dict(fla_state_dict(num_v_heads=num_v_heads)), strict=True)


@pytest.mark.parametrize("expand_v", [2.0, 0.5])
@pytest.mark.parametrize("num_v_heads", [H, 2 * H], ids=["HV=H", "GVA"])
@pytest.mark.parametrize("prefix", ["", "model.layers.0.attn."])
def test_convert_fla_state_dict_refuses_expand_v(expand_v, num_v_heads, prefix):
    fla = {prefix + name: t for name, t in fla_state_dict(num_v_heads=num_v_heads, expand_v=expand_v).items()}
    with pytest.raises(ValueError) as info:
        convert_fla_state_dict(fla)
    message = str(info.value)
    assert message.startswith(prefix + "f_proj.0.weight:"), message
    assert f"expand_v = {expand_v:g}" in message and f"head_dim = {K}" in message, message


@pytest.mark.parametrize("backend", ["chunked", "fast"])
def test_backward_after_a_forward_with_a_cache(backend):
    """A forward that updates a cache in place can still be differentiated (the core keeps a copy)."""
    torch.manual_seed(0)
    layer = KimiDeltaAttention(hidden_size=32, num_heads=2, head_dim=16, backend=backend)
    x = torch.randn(1, 5, 32, requires_grad=True)
    cache = layer.init_cache(1)
    layer(x, cache=cache).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert layer.A_log.grad is not None
