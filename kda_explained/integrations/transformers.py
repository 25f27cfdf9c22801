"""Kimi Linear in Hugging Face transformers, with its KDA layers computed by kda_explained.

transformers (``>= 5.25``) ships Kimi Linear as ``KimiLinearForCausalLM``. Its KDA
token mixer, ``KimiLinearDeltaAttention``, computes the same function as our
:class:`~kda_explained.layers.kda_layer.KimiDeltaAttention`. It calls
flash-linear-attention's kernels where they are installed and falls back to PyTorch loops
otherwise. :func:`use_kda_explained` makes each of those modules run our layer instead:
prefill, cached decoding and training alike, with the chunked or the fast backend.

- The model keeps its own parameters, names and state dict. Each call runs our layer on
  the module's own tensors through ``torch.func.functional_call``. Two of them
  (the stacked conv weight and ``A_log``) are seen in our layout through views, so
  gradients land on the transformers parameters and an optimizer built before or after
  the switch trains the same tensors. ``save_pretrained`` writes a checkpoint that
  transformers loads as usual.
- The model keeps transformers' own cache object (a ``DynamicCache`` whose KDA layers are
  ``LinearAttentionLayer``\\s). Our layer reads and writes that cache's tensors in place (see *The cache*).
- :func:`kda_state_dict_from_transformers` is the one place where the layout changes.
  :func:`kda_layer_from_transformers` and :func:`transformers_state_dict_from_kda` convert
  a whole layer, one way and the other.

Layouts
-------
One KDA layer, ``C = H K`` channels (transformers' ``qkv_dim``). Other names agree:
``q_proj``, ``k_proj``, ``v_proj``, ``b_proj``, ``g_a_proj``, ``g_b_proj``, ``o_norm``, ``o_proj``.

================================  ==========================  ================================
transformers                      ours                        change
================================  ==========================  ================================
``conv1d.weight [3 C, 1, W]``     ``{q,k,v}_conv1d.weight``   split in three ``[C, 1, W]``, q, k, v in order
``forget_gate.A_log [1,1,H,1]``   ``A_log [H]``               reshape
``forget_gate.dt_bias [C]``       ``dt_bias [C]``             rename
``forget_gate.f_a_proj.weight``   ``f_a_proj.weight``         rename
``forget_gate.f_b_proj.weight``   ``f_b_proj.weight``         rename
================================  ==========================  ================================

transformers' layer has no grouped value heads (``HV = H``), the softplus gate only, and
``beta = sigmoid(b_proj x)``. A layer of ours with GVA, the lower-bound gate or
``allow_neg_eigval`` has no transformers counterpart.

The cache
---------
transformers' cache layer for a KDA layer holds ``conv_states[0] [N, 3 C, W]`` (the last
``W`` inputs of the stacked convolution) and ``recurrent_states[0] [N, H, K, V]`` float32.
Our :class:`~kda_explained.layers.kda_layer.KDACache` keeps ``W - 1`` inputs per
convolution, since the convolution of a new token reads only the ``W - 1`` before it. So
our ``conv_q, conv_k, conv_v`` are views of the last ``W - 1`` columns of transformers'
tensor, row blocks q, k, v, and ``state`` is transformers' recurrent state itself. Our layer
updates them in place. The first column is not written: transformers' KDA layer keeps it
but never reads it (its convolution also uses only the last ``W - 1`` inputs). The cache's
token count, which ``generate`` reads through ``get_seq_length``, grows by the tokens of
each call, as transformers' own layer makes it grow.

Past recording (``cache.activate_past_recording``, which assisted decoding uses to roll
back) is not supported: such a cache raises :class:`ValueError`.

Padding
-------
transformers' layer multiplies padded positions by zero; those zeros still pass through
the convolution and the decay. Our layer skips padded tokens altogether: they never touch
the state. From an empty cache with left padding, as ``generate`` pads a batch, both give
the same result: zero inputs keep a zero state zero, and the convolution sees zeros
before the first token either way. With right padding or holes the two differ. Ours then
gives each row what it would get alone.

Glossary
--------
=========  ==============================================================
``D``      ``hidden_size``
``H``      KDA heads (transformers' ``linear_num_heads``)
``K``      head width (``linear_head_dim``), ``V = K``
``C``      ``H K``, channels of each of q, k and v
``W``      taps of the short convolution (``linear_conv_kernel_dim``)
``N``      sequences in the cache (batch rows)
=========  ==============================================================
"""

from __future__ import annotations

import contextlib
from typing import Dict, Optional

import torch
from torch import nn

from ..layers.kda_layer import BACKENDS, KDACache, KimiDeltaAttention
from ..validation import format_shape

__all__ = [
    "use_kda_explained",
    "KDAExplainedForward",
    "kda_state_dict_from_transformers",
    "kda_layer_from_transformers",
    "transformers_state_dict_from_kda",
    "MIN_TRANSFORMERS",
]

#: The oldest transformers release this module is tested with. Kimi Linear appeared in 5.17,
#: but its KDA layer's cache calls and argument names changed in the releases after it.
MIN_TRANSFORMERS = "5.25"


def _modeling_kimi_linear():
    """transformers' Kimi Linear modeling module; an ImportError naming the extra where it is missing.

    Imported on first use, so that the state-dict converters work without transformers.
    """
    try:
        from transformers.models.kimi_linear import modeling_kimi_linear
    except ImportError as exc:
        raise ImportError(f"kda_explained.integrations.transformers needs transformers >= {MIN_TRANSFORMERS} "
                          f"(with Kimi Linear): pip install \"kda-explained[transformers]\"") from exc
    return modeling_kimi_linear


def _check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")


# ----------------------------------------------------------------------------------------------
# the change of layout, in one place
# ----------------------------------------------------------------------------------------------

_RENAMES = {
    "forget_gate.f_a_proj.weight": "f_a_proj.weight",
    "forget_gate.f_b_proj.weight": "f_b_proj.weight",
    "forget_gate.dt_bias": "dt_bias",
}
#: A key only transformers' KDA layer has: it marks each KDA layer in a state dict.
_MARK = "forget_gate.A_log"


def kda_state_dict_from_transformers(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename and reshape transformers' ``KimiLinearDeltaAttention`` tensors into our layer's layout.

    Works on one layer's state dict or a whole model's. Keys keep their prefixes, and keys of
    other modules (attention, MoE, embeddings) pass through. Each KDA layer is found by its
    ``forget_gate.A_log`` and converted as the module docstring's table says. The tensors
    are views of the given ones where the layout allows (all of them here): gradients
    through them reach the originals, and nothing is copied.

    >>> import torch
    >>> C, W = 4, 3                                        # one head of 4 channels, 3 taps
    >>> theirs = {"q_proj.weight": torch.zeros(C, 8), "conv1d.weight": torch.arange(3.0 * C * W).view(3 * C, 1, W),
    ...           "forget_gate.A_log": torch.zeros(1, 1, 1, 1), "forget_gate.dt_bias": torch.zeros(C),
    ...           "forget_gate.f_a_proj.weight": torch.zeros(C, 8), "forget_gate.f_b_proj.weight": torch.zeros(C, C)}
    >>> ours = kda_state_dict_from_transformers(theirs)
    >>> sorted(ours)
    ['A_log', 'dt_bias', 'f_a_proj.weight', 'f_b_proj.weight', 'k_conv1d.weight', 'q_conv1d.weight', 'q_proj.weight', 'v_conv1d.weight']
    >>> ours["k_conv1d.weight"][0, 0].tolist()            # the second block of C rows: k
    [12.0, 13.0, 14.0]
    """
    out = dict(state_dict)
    for p in [key[: -len(_MARK)] for key in state_dict if key.endswith(_MARK)]:
        for old, new in _RENAMES.items():
            if p + old in out:
                out[p + new] = out.pop(p + old)
        out[p + "A_log"] = out.pop(p + _MARK).reshape(-1)  # [1, 1, H, 1] -> [H]
        conv = out.pop(p + "conv1d.weight")  # [3 C, 1, W]: q, k, v channels stacked, in this order
        C = out[p + "q_proj.weight"].shape[0]
        if conv.shape[0] != 3 * C:
            raise ValueError(f"{p}conv1d.weight: expected 3 * C = {3 * C} rows (q, k and v channels stacked, "
                             f"C = q_proj rows), got {format_shape(conv.shape)}")
        out[p + "q_conv1d.weight"], out[p + "k_conv1d.weight"], out[p + "v_conv1d.weight"] = conv.split(C, 0)
    return out


def transformers_state_dict_from_kda(layer: KimiDeltaAttention) -> Dict[str, torch.Tensor]:
    """The state dict of a transformers ``KimiLinearDeltaAttention`` computing what ``layer`` computes.

    Load it with ``load_state_dict(strict=True)`` into a module built from a
    ``KimiLinearConfig`` with ``hidden_size``, ``linear_num_heads``, ``linear_head_dim``,
    ``linear_conv_kernel_dim`` and ``rms_norm_eps`` equal to the layer's ``hidden_size``,
    ``num_heads``, ``head_dim``, ``conv_size`` and output-norm epsilon, and ``hidden_act="silu"``.
    The conv weights are concatenated (a copy); the other tensors are the layer's own,
    detached. A layer that transformers' module cannot express (grouped value heads, the
    lower-bound gate, ``allow_neg_eigval``) raises :class:`ValueError` naming ``layer``.

    >>> import torch
    >>> from kda_explained.layers import KimiDeltaAttention
    >>> layer = KimiDeltaAttention(hidden_size=16, num_heads=2, head_dim=4)
    >>> sd = transformers_state_dict_from_kda(layer)
    >>> sd["conv1d.weight"].shape, sd["forget_gate.A_log"].shape
    (torch.Size([24, 1, 4]), torch.Size([1, 1, 2, 1]))
    >>> back = kda_state_dict_from_transformers(sd)              # and back: the layer's own tensors
    >>> all(torch.equal(back[name], t) for name, t in layer.state_dict().items())
    True
    """
    if not isinstance(layer, KimiDeltaAttention):
        raise TypeError(f"layer: expected a kda_explained KimiDeltaAttention, got {type(layer).__name__}")
    if layer.num_v_heads != layer.num_heads:
        raise ValueError(f"layer: expected num_v_heads = num_heads = {layer.num_heads} (transformers' "
                         f"KimiLinearDeltaAttention has no grouped value heads), got num_v_heads = {layer.num_v_heads}")
    if layer.gate != "softplus":
        raise ValueError(f"layer: expected gate='softplus' (the only gate of transformers' KimiLinearDeltaAttention), "
                         f"got gate={layer.gate!r}")
    if layer.allow_neg_eigval:
        raise ValueError("layer: expected allow_neg_eigval=False (transformers' KimiLinearDeltaAttention computes "
                         "beta = sigmoid(b_proj x)), got allow_neg_eigval=True")
    ours = layer.state_dict()
    out = {}
    for name, t in ours.items():
        if name in ("A_log", "q_conv1d.weight", "k_conv1d.weight", "v_conv1d.weight"):
            continue
        renamed = {new: old for old, new in _RENAMES.items()}.get(name, name)
        out[renamed] = t
    out["conv1d.weight"] = torch.cat([ours["q_conv1d.weight"], ours["k_conv1d.weight"], ours["v_conv1d.weight"]])
    out[_MARK] = ours["A_log"].reshape(1, 1, -1, 1)  # [H] -> [1, 1, H, 1]
    return out


# ----------------------------------------------------------------------------------------------
# one module
# ----------------------------------------------------------------------------------------------


def _check_module(module, name: str = "module") -> None:
    """Raise unless ``module`` is a transformers ``KimiLinearDeltaAttention`` our layer can compute."""
    kimi = _modeling_kimi_linear()
    if not isinstance(module, kimi.KimiLinearDeltaAttention):
        raise TypeError(f"{name}: expected a transformers KimiLinearDeltaAttention, got {type(module).__name__}")
    if module.activation not in ("silu", "swish"):
        raise ValueError(f"{name}: expected hidden_act 'silu' (the activation of Kimi Linear's short convolutions, "
                         f"and the one our layer applies), got {module.activation!r}")
    if module.conv1d.bias is not None:
        raise ValueError(f"{name}: expected conv1d without a bias (Kimi Linear's short convolutions have none)")


def _layer_like(module, backend: str) -> KimiDeltaAttention:
    """Our layer with the sizes of the transformers ``module`` (parameters freshly initialised)."""
    return KimiDeltaAttention(hidden_size=module.hidden_size, num_heads=module.num_heads, head_dim=module.head_dim,
                              conv_size=module.conv_kernel_size, norm_eps=module.o_norm.variance_epsilon,
                              backend=backend, layer_idx=module.layer_idx)


def kda_layer_from_transformers(module, backend: str = "auto") -> KimiDeltaAttention:
    """Our :class:`~kda_explained.layers.kda_layer.KimiDeltaAttention` with the sizes and weights of a transformers module.

    ``module`` is a transformers ``KimiLinearDeltaAttention``. The result is a separate copy,
    on the module's device and in its dtype (``A_log`` and ``dt_bias`` float32, as our layer
    keeps them). It computes the module's function: same outputs, same cache semantics
    (with our :class:`~kda_explained.layers.kda_layer.KDACache`). ``backend`` as for the layer.
    A module of another class, or one with another activation than SiLU, raises.
    """
    _check_module(module)
    _check_backend(backend)
    weight = module.q_proj.weight
    layer = _layer_like(module, backend).to(device=weight.device, dtype=weight.dtype)
    layer.load_state_dict(kda_state_dict_from_transformers(module.state_dict()), strict=True)
    return layer


def _saved_as_copies(kda_cache: Optional[KDACache]):
    """A context in which autograd keeps copies of whatever it saves from ``kda_cache``'s tensors.

    A training forward can come with a cache: transformers makes one whenever ``use_cache`` is
    on. The core keeps its initial state for the backward, and the layer then overwrites that
    same tensor with the final state, which autograd would refuse at the backward. Saved as a
    copy, the backward sees the state as it was. Without a cache or without grad: no change.
    """
    if kda_cache is None or not torch.is_grad_enabled():
        return contextlib.nullcontext()
    storages = {t.untyped_storage().data_ptr() for t in (kda_cache.state, kda_cache.conv_q)}  # conv_*: one tensor

    def pack(t: torch.Tensor) -> torch.Tensor:
        return t.clone() if t.untyped_storage().data_ptr() in storages else t

    return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class KDAExplainedForward:
    """The ``forward`` that :func:`use_kda_explained` gives one transformers ``KimiLinearDeltaAttention``.

    Called as transformers' decoder layer calls its KDA layer:
    ``(hidden_states [B, T, D], cache=None, attention_mask=None, **kwargs) -> [B, T, D]``.
    It runs ``self.layer``, our ``KimiDeltaAttention`` built on the meta device (it holds
    no memory), on the module's own parameters through ``torch.func.functional_call``.

    - ``cache``: transformers' ``Cache``; its KDA tensors are read and updated in place (module docstring, *The cache*).
    - ``attention_mask [B, T]``: 1 for tokens, 0 for padding, which never touches the state.
    - ``cu_seq_lens_q`` in ``kwargs`` (transformers' packed batches, ``B = 1``): the sequences'
      offsets, passed to our layer as ``cu_seqlens``. Other keyword arguments are ignored, as
      transformers' own PyTorch path ignores them.
    """

    def __init__(self, module, backend: str):
        self.module = module
        self.backend = backend
        with torch.device("meta"):
            self.layer = _layer_like(module, backend)

    def __repr__(self) -> str:
        return f"KDAExplainedForward(backend={self.backend!r}, layer_idx={self.module.layer_idx})"

    def __call__(self, hidden_states: torch.Tensor, cache=None, attention_mask: Optional[torch.Tensor] = None,
                 **kwargs) -> torch.Tensor:
        cache = kwargs.pop("cache_params", None) if cache is None else cache  # the argument's older name
        B, T = hidden_states.shape[:2]
        kda_cache = self._cache_view(cache, B, hidden_states) if cache is not None else None
        params = kda_state_dict_from_transformers(dict(self.module.named_parameters()))
        with _saved_as_copies(kda_cache):
            out = torch.func.functional_call(
                self.layer, params, (hidden_states,),
                {"attention_mask": attention_mask, "cu_seqlens": kwargs.get("cu_seq_lens_q"), "cache": kda_cache},
                strict=True)
        if cache is not None:
            # transformers' cache counts each linear-attention layer's tokens in this tensor (get_seq_length
            # reads it); its own KDA layer adds them while it updates the conv state, which here our layer does
            cache.layers[self.module.layer_idx].cumulative_length_linear.add_(T)
        return out

    def _cache_view(self, cache, B: int, x: torch.Tensor) -> KDACache:
        """Our :class:`KDACache` over transformers' cache tensors of this layer; zero tensors on the first call."""
        i, layer = self.module.layer_idx, self.layer
        if cache.is_recording_past(i):
            raise ValueError(f"cache: layer {i} records past states (cache.activate_past_recording, which assisted "
                             f"decoding uses to roll back), and the KDA layers of use_kda_explained do not keep them; "
                             f"generate without an assistant model")
        C, W, HV, K = layer.num_heads * layer.head_dim, layer.conv_size, layer.num_v_heads, layer.head_dim
        if cache.get_conv_state(i) is None:
            # nothing cached for this layer yet: transformers' cache layer allocates its tensors (zeros: no tokens
            # before the first), through the same calls its own KDA layer makes, with no token counted
            cache.update_conv_state(x.new_zeros(B, 3 * C, 0), i, conv_kernel_size=W)
            state_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
            cache.update_recurrent_state(torch.zeros(B, HV, K, K, dtype=state_dtype, device=x.device), i)
        conv = cache.get_conv_state(i)  # [N, 3 C, W]
        return KDACache(conv_q=conv[:, :C, 1:], conv_k=conv[:, C:2 * C, 1:], conv_v=conv[:, 2 * C:, 1:],
                        state=cache.get_recurrent_state(i))  # [N, C, W - 1] each; [N, H, K, V]


# ----------------------------------------------------------------------------------------------
# a whole model
# ----------------------------------------------------------------------------------------------


def use_kda_explained(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Run every transformers ``KimiLinearDeltaAttention`` in ``model`` on kda_explained; returns ``model``.

    ``model`` is a ``KimiLinearForCausalLM`` (or any module built from its KDA layers).
    ``backend``: ``"chunked"`` (PyTorch, any device), ``"fast"`` (Triton), or ``"auto"``:
    fast for CUDA inputs, chunked otherwise. Calling it again switches the backend. Each KDA
    module's ``forward`` becomes a :class:`KDAExplainedForward`; its parameters, state dict
    and cache stay transformers' (module docstring). A model without KDA layers raises
    :class:`ValueError`.

    >>> import torch
    >>> from transformers import KimiLinearConfig, KimiLinearForCausalLM
    >>> config = KimiLinearConfig(vocab_size=64, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
    ...     num_hidden_layers=4, layer_types=["linear_attention"] * 3 + ["full_attention"],
    ...     num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=8,
    ...     v_head_dim=8, num_local_experts=4, num_experts_per_tok=2, linear_num_heads=2, linear_head_dim=8,
    ...     pad_token_id=0, bos_token_id=1, eos_token_id=None)
    >>> torch.manual_seed(0) and None
    >>> model = use_kda_explained(KimiLinearForCausalLM(config).eval(), backend="chunked")
    >>> model.model.layers[0].self_attn.forward
    KDAExplainedForward(backend='chunked', layer_idx=0)
    >>> model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False).shape
    torch.Size([1, 7])
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module (a transformers KimiLinearForCausalLM), "
                        f"got {type(model).__name__}")
    _check_backend(backend)
    kimi = _modeling_kimi_linear()
    modules = [(name, m) for name, m in model.named_modules() if isinstance(m, kimi.KimiLinearDeltaAttention)]
    if not modules:
        raise ValueError(f"model: expected a model with transformers KimiLinearDeltaAttention layers "
                         f"(KimiLinearForCausalLM), found none in {type(model).__name__}")
    for name, m in modules:
        _check_module(m, name=f"model ({name})")
    for _, m in modules:
        m.forward = KDAExplainedForward(m, backend)
    return model
