"""transformers' Kimi Linear on kda_explained: ``use_kda_explained`` and the layout converters.

A tiny random ``KimiLinearConfig`` (3 KDA layers and 1 MLA layer, MoE after the first
layer, hidden 32, 2 KDA heads of 8) runs once through transformers' own PyTorch path (the
reference) and once through ours, on the CPU, with the chunked backend and with the fast
backend under the Triton interpreter. Both sides compute in float32, so outputs and
gradients are held to the float32 bound of the tolerance table, ``chunked_f32_vs_naive``.
Skipped where transformers (with Kimi Linear) is not installed.
"""

from __future__ import annotations

import copy

import pytest
import torch

from kda_explained.integrations.transformers import (
    MIN_TRANSFORMERS,
    KDAExplainedForward,
    kda_layer_from_transformers,
    kda_state_dict_from_transformers,
    transformers_state_dict_from_kda,
    use_kda_explained,
)
from kda_explained.layers import KimiDeltaAttention
from kda_explained.testing import TOLERANCES, rel_rms_error

pytest.importorskip("transformers", minversion=MIN_TRANSFORMERS)
from transformers import DynamicCache, KimiLinearConfig, KimiLinearForCausalLM  # noqa: E402
from transformers.models.kimi_linear.modeling_kimi_linear import KimiLinearDeltaAttention  # noqa: E402

BOUND = TOLERANCES["chunked_f32_vs_naive"]  # float32 on both sides, different order of operations
#: Gradients of the fast backend: its kernels accumulate float32 in another order (products of
#: whole chunks), and the A_log and dt_bias gradients are sums over every token of terms that
#: partly cancel. Measured on this model: up to 1.3e-5 from transformers' path (A_log of the
#: last KDA layer), where on one layer each of the two is within 3e-6 of a float64 reference. So
#: the fast layer's own bound against float64, not the chunked one.
GRAD_BOUND = {"chunked": BOUND, "fast": TOLERANCES["fast_f32_vs_f64"]}
BACKENDS = ["chunked", "fast"]
#: Batch rows per backend where the batch is not the point: the fast kernels run under the Triton
#: interpreter on the CPU, whose time grows with the programs launched (one per row and head).
ROWS = {"chunked": 2, "fast": 1}
VOCAB = 64


def tiny_config(**kw) -> KimiLinearConfig:
    sizes = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                 num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
                 num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4,
                 qk_nope_head_dim=8, v_head_dim=8, num_local_experts=4, num_experts_per_tok=2,
                 linear_num_heads=2, linear_head_dim=8, linear_conv_kernel_dim=4,
                 pad_token_id=0, bos_token_id=1, eos_token_id=None)
    return KimiLinearConfig(**{**sizes, **kw})


@pytest.fixture(scope="module")
def reference() -> KimiLinearForCausalLM:
    """The tiny model on transformers' own path; tests copy it before changing anything."""
    torch.manual_seed(0)
    return KimiLinearForCausalLM(tiny_config()).eval()


def ours_and_theirs(reference, backend):
    return use_kda_explained(copy.deepcopy(reference), backend=backend), copy.deepcopy(reference)


def assert_close(a, ref, what, bound=BOUND):
    err = rel_rms_error(a, ref)
    assert err < bound, f"{what}: relative RMS error {err:.3g} > {bound:.1g}"


def kda_modules(model):
    return [m for m in model.modules() if isinstance(m, KimiLinearDeltaAttention)]


# ----------------------------------------------------------------------------------------------
# the model: generation, cache continuation, training
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backend, prompt_len", [
    ("chunked", 9),  # a prefill by the token-by-token core
    ("chunked", 20),  # a prefill by the chunked core
    ("fast", 20),  # the chunk kernels for the prefill, the recurrent kernel for each step (as for 9 tokens)
])
def test_generate_matches_transformers(reference, backend, prompt_len):
    ours, theirs = ours_and_theirs(reference, backend)
    torch.manual_seed(1)
    ids = torch.randint(3, VOCAB, (2, prompt_len))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # the second row left-padded, as generate pads a batch
    kw = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, return_dict_in_generate=True,
              output_logits=True)
    a, b = theirs.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(b.sequences, a.sequences)
    for step, (lb, la) in enumerate(zip(b.logits, a.logits)):
        assert_close(lb, la, f"logits of step {step}")

    # the cache is transformers' own object, holding the same states
    assert type(b.cache) is type(a.cache) is DynamicCache
    assert b.cache.get_seq_length() == a.cache.get_seq_length() == prompt_len + 4
    W = reference.config.linear_conv_kernel_dim
    for i in range(3):
        assert_close(b.cache.get_recurrent_state(i), a.cache.get_recurrent_state(i), f"layer {i} state")
        # our layer keeps the last W - 1 inputs; transformers' first column is never read (module docstring)
        assert_close(b.cache.get_conv_state(i)[..., 1:], a.cache.get_conv_state(i)[..., 1:], f"layer {i} conv")
        assert b.cache.get_conv_state(i).shape[-1] == W


@pytest.mark.parametrize("backend", BACKENDS)
def test_cache_continuation_matches_transformers(reference, backend):
    """Prefill, a multi-token continuation from the cache, then single-token steps: each call as transformers'."""
    ours, theirs = ours_and_theirs(reference, backend)
    torch.manual_seed(2)
    ids = torch.randint(3, VOCAB, (ROWS[backend], 14))
    cache_a, cache_b = DynamicCache(config=reference.config), DynamicCache(config=reference.config)
    with torch.no_grad():
        for lo, hi in ((0, 6), (6, 11), (11, 12), (12, 13), (13, 14)):
            la = theirs(ids[:, lo:hi], cache=cache_a, use_cache=True).logits
            lb = ours(ids[:, lo:hi], cache=cache_b, use_cache=True).logits
            assert_close(lb, la, f"logits of tokens {lo}:{hi}")
            assert cache_b.get_seq_length() == cache_a.get_seq_length() == hi
        # the cached run equals one pass over all 14 tokens
        assert_close(lb, ours(ids).logits[:, -1:], "cached vs uncached")


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_gradients_match_transformers(reference, backend):
    ours, theirs = ours_and_theirs(reference, backend)
    ours.train(), theirs.train()
    torch.manual_seed(3)
    # training takes the chunked core (or the chunk kernels) at any length: 10 tokens keep the interpreter quick
    ids, labels = torch.randint(3, VOCAB, (ROWS[backend], 10)), torch.randint(3, VOCAB, (ROWS[backend], 10))
    # use_cache stays on (the config's default): transformers makes a cache in a training forward too
    loss_a, loss_b = theirs(ids, labels=labels).loss, ours(ids, labels=labels).loss
    loss_a.backward()
    loss_b.backward()
    assert_close(loss_b, loss_a, "loss")
    grads_a = {n: p.grad for n, p in theirs.named_parameters()}
    checked = 0
    for name, p in ours.named_parameters():
        if grads_a[name] is None:  # experts no token was routed to
            assert p.grad is None, name
            continue
        assert_close(p.grad, grads_a[name], f"gradient of {name}", GRAD_BOUND[backend])
        checked += "self_attn" in name and name.split(".")[2] in "012"
    assert checked == 3 * 13  # every KDA parameter, conv1d, A_log and dt_bias included

    # one optimizer step on each: the next losses agree too
    for model in (ours, theirs):
        torch.optim.SGD(model.parameters(), lr=0.1).step()
    with torch.no_grad():
        assert_close(ours(ids, labels=labels).loss, theirs(ids, labels=labels).loss, "loss after a step",
                     GRAD_BOUND[backend])


def test_model_keeps_its_parameters_and_state_dict(reference):
    model = copy.deepcopy(reference)
    before = dict(model.named_parameters())
    keys = list(model.state_dict())
    assert use_kda_explained(model, backend="chunked") is model
    assert dict(model.named_parameters()) == before  # the same Parameter objects: optimizers keep working
    assert list(model.state_dict()) == keys  # save_pretrained writes transformers' names
    forwards = [m.forward for m in kda_modules(model)]
    assert len(forwards) == 3 and all(isinstance(f, KDAExplainedForward) for f in forwards)
    use_kda_explained(model, backend="fast")  # a second call switches the backend
    assert {m.forward.backend for m in kda_modules(model)} == {"fast"}


def test_packed_batch_equals_separate_sequences(reference):
    """transformers' packed batches (``cu_seq_lens_q``) reach our layer as ``cu_seqlens``."""
    module = kda_modules(use_kda_explained(copy.deepcopy(reference), backend="chunked"))[0]
    torch.manual_seed(4)
    x = torch.randn(1, 11, 32)
    cu = torch.tensor([0, 4, 11])
    with torch.no_grad():
        packed = module(x, cu_seq_lens_q=cu)
        separate = torch.cat([module(x[:, :4]), module(x[:, 4:])], 1)
    assert_close(packed, separate, "packed vs separate")


# ----------------------------------------------------------------------------------------------
# conversion both ways
# ----------------------------------------------------------------------------------------------


def test_layer_from_transformers_computes_the_module(reference):
    module = kda_modules(reference)[1]
    layer = kda_layer_from_transformers(module, backend="chunked")
    assert isinstance(layer, KimiDeltaAttention) and layer.layer_idx == 1
    torch.manual_seed(5)
    x = torch.randn(2, 13, 32)
    with torch.no_grad():
        assert_close(layer(x), module(x), "our layer vs transformers' module")
    # a copy: changing it leaves the module as it was
    with torch.no_grad():
        layer.q_proj.weight.zero_()
    assert module.q_proj.weight.abs().sum() > 0


def test_round_trip_transformers_to_ours_to_transformers(reference):
    module = kda_modules(reference)[0]
    back = transformers_state_dict_from_kda(kda_layer_from_transformers(module))
    original = module.state_dict()
    assert sorted(back) == sorted(original)
    for name, t in original.items():
        assert torch.equal(back[name], t), name
    fresh = KimiLinearDeltaAttention(reference.config, layer_idx=0)
    fresh.load_state_dict(back, strict=True)


def test_round_trip_ours_to_transformers_to_ours():
    torch.manual_seed(6)
    layer = KimiDeltaAttention(hidden_size=32, num_heads=2, head_dim=8, norm_eps=1e-5)
    module = KimiLinearDeltaAttention(tiny_config(), layer_idx=0)
    module.load_state_dict(transformers_state_dict_from_kda(layer), strict=True)
    again = kda_layer_from_transformers(module)
    for name, t in layer.state_dict().items():
        assert torch.equal(again.state_dict()[name], t), name
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        assert_close(module(x), layer(x), "transformers' module vs our layer")


def test_state_dict_conversion_of_a_whole_model(reference):
    """A model's state dict: the KDA layers converted in place, every other key untouched."""
    theirs = reference.state_dict()
    ours = kda_state_dict_from_transformers(theirs)
    for i in range(3):
        p = f"model.layers.{i}.self_attn."
        assert f"{p}conv1d.weight" not in ours and f"{p}forget_gate.A_log" not in ours
        assert ours[f"{p}A_log"].shape == (2,)
        assert torch.equal(torch.cat([ours[f"{p}{n}_conv1d.weight"] for n in "qkv"]), theirs[f"{p}conv1d.weight"])
        # views, not copies: the forward's gradients reach the transformers parameters through them
        assert ours[f"{p}k_conv1d.weight"].untyped_storage().data_ptr() == \
            theirs[f"{p}conv1d.weight"].untyped_storage().data_ptr()
    untouched = [k for k in theirs if ".self_attn." not in k or k.startswith("model.layers.3.")]
    assert all(ours[k] is theirs[k] for k in untouched)


# ----------------------------------------------------------------------------------------------
# bad calls
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw, match", [
    ({"num_v_heads": 4}, r"layer: expected num_v_heads = num_heads = 2"),
    ({"gate": "lowerbound"}, r"layer: expected gate='softplus'"),
    ({"allow_neg_eigval": True}, r"layer: expected allow_neg_eigval=False"),
])
def test_layers_transformers_cannot_express_are_refused(kw, match):
    layer = KimiDeltaAttention(hidden_size=32, num_heads=2, head_dim=8, **kw)
    with pytest.raises(ValueError, match=match):
        transformers_state_dict_from_kda(layer)


def test_bad_arguments_name_themselves(reference):
    with pytest.raises(TypeError, match=r"layer: expected a kda_explained KimiDeltaAttention, got Linear"):
        transformers_state_dict_from_kda(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"module: expected a transformers KimiLinearDeltaAttention, got Linear"):
        kda_layer_from_transformers(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model: expected a model with transformers KimiLinearDeltaAttention"):
        use_kda_explained(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match=r"model: expected a torch.nn.Module"):
        use_kda_explained("KimiLinearForCausalLM")
    with pytest.raises(ValueError, match=r"backend: expected one of \['auto', 'chunked', 'fast'\], got 'triton'"):
        use_kda_explained(copy.deepcopy(reference), backend="triton")
    sd = dict(kda_modules(reference)[0].state_dict())
    sd["conv1d.weight"] = sd["conv1d.weight"][:-1]
    with pytest.raises(ValueError, match=r"conv1d.weight: expected 3 \* C = 48 rows"):
        kda_state_dict_from_transformers(sd)
    gelu = KimiLinearForCausalLM(tiny_config(hidden_act="gelu"))
    with pytest.raises(ValueError, match=r"model \(model.layers.0.self_attn\): expected hidden_act 'silu'"):
        use_kda_explained(gelu)


def test_past_recording_cache_is_refused(reference):
    model = use_kda_explained(copy.deepcopy(reference), backend="chunked")
    cache = DynamicCache(config=reference.config)
    cache.activate_past_recording()
    with pytest.raises(ValueError, match=r"cache: layer 0 records past states"):
        model(torch.tensor([[4, 5, 6]]), cache=cache, use_cache=True)
