"""A tiny causal LM in the Kimi Linear layout: 3 KDA layers to 1 full-attention layer (report §4).

Each block is pre-norm: ``x = x + mixer(rmsnorm(x)); x = x + mlp(rmsnorm(x))``,
where the mixer is :class:`~kda_explained.layers.kda_layer.KimiDeltaAttention` or plain
multi-head softmax attention through ``torch.nn.functional.scaled_dot_product_attention``
without positional encoding (NoPE: the KDA layers carry the order), and the MLP
is SwiGLU. Kimi Linear's attention is MLA and its MLPs are MoE; neither changes
what this model is for: showing that only 1 layer in 4 keeps a cache that grows
with the context, and that cached decoding computes what recomputation computes.

Glossary
--------
=============  ===============================================================
``B``          batch rows
``T``          tokens in this call; ``L`` tokens in the cache after it
``D``          ``hidden_size``
``H``, ``Dh``  heads and head width (attention and KDA alike)
KV cache       per attention layer ``k, v: [B, H, L, Dh]``, grows with ``L``
KDA cache      per KDA layer: state ``[B, HV, Dh, Dh]`` float32 + conv states, constant in ``L``
=============  ===============================================================
"""

from __future__ import annotations

import gc
import operator
from dataclasses import dataclass, replace
from typing import Dict, List, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..validation import format_shape
from .kda_layer import KDACache, KimiDeltaAttention, check_attention_mask

__all__ = ["HybridConfig", "HybridLM", "HybridCache", "KVCache", "Attention", "StaticDecoder", "cache_memory"]


@dataclass(frozen=True)
class HybridConfig:
    """Sizes of a :class:`HybridLM`.

    ``kda_per_attention = 3`` gives Kimi Linear's 3:1 layout (layers 3, 7, ... are
    full attention, counting from 0); ``0`` makes every layer full attention.
    ``allow_neg_eigval`` is passed to every KDA layer (``beta`` in ``(0, 2)``; off in Kimi Linear).

    >>> HybridConfig(num_layers=8).layer_types()
    ['kda', 'kda', 'kda', 'attention', 'kda', 'kda', 'kda', 'attention']
    >>> HybridConfig(num_layers=8).all_attention().layer_types().count("attention")
    8
    """

    vocab_size: int = 256
    hidden_size: int = 64
    num_layers: int = 4
    num_heads: int = 2
    head_dim: int = 32
    intermediate_size: int = 256
    kda_per_attention: int = 3
    conv_size: int = 4
    num_v_heads: Optional[int] = None
    gate: str = "softplus"
    norm_eps: float = 1e-5
    kda_backend: str = "auto"
    allow_neg_eigval: bool = False

    def layer_types(self) -> List[str]:
        r = self.kda_per_attention
        return ["attention" if r == 0 or (i + 1) % (r + 1) == 0 else "kda" for i in range(self.num_layers)]

    def all_attention(self) -> "HybridConfig":
        """The same model with full attention in every layer (the baseline of the cache comparison)."""
        return replace(self, kda_per_attention=0)


# ----------------------------------------------------------------------------------------------
# full attention with a KV cache
# ----------------------------------------------------------------------------------------------


class KVCache:
    """Keys and values of one attention layer, ``[B, H, L, Dh]``, in a buffer that grows by doubling."""

    def __init__(self, batch_size: int, num_heads: int, head_dim: int, capacity: int = 0, *,
                 dtype: torch.dtype = torch.float32, device=None):
        shape = (batch_size, num_heads, max(capacity, 1), head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def batch_size(self) -> int:
        return int(self.k.shape[0])

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """Add ``k, v [B, H, T, Dh]``; return all keys and values so far, ``[B, H, L, Dh]`` (views)."""
        L = self.length + k.shape[2]
        if L > self.k.shape[2]:
            cap = max(L, 2 * self.k.shape[2])
            grow = (*self.k.shape[:2], cap - self.k.shape[2], self.k.shape[3])
            self.k = torch.cat([self.k, self.k.new_zeros(grow)], 2)
            self.v = torch.cat([self.v, self.v.new_zeros(grow)], 2)
        self.k[:, :, self.length:L] = k
        self.v[:, :, self.length:L] = v
        self.length = L
        return self.k[:, :, :L], self.v[:, :, :L]

    def nbytes(self) -> int:
        """Bytes of the keys and values held (the used part of the buffer)."""
        return 2 * self.k[:, :, : self.length].numel() * self.k.element_size()


class Attention(nn.Module):
    """Causal multi-head softmax attention, no positional encoding (NoPE), through SDPA."""

    def __init__(self, hidden_size: int, num_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden_size, bias=False)

    def forward(self, x: torch.Tensor, key_mask: Optional[torch.Tensor] = None,
                cache: Optional[KVCache] = None) -> torch.Tensor:
        """``x [B, T, D]`` -> ``[B, T, D]``; ``key_mask [B, L]`` bool over cached + new tokens (``None``: all valid)."""
        B, T, _ = x.shape
        q, k, v = (p(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, T, Dh]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        past = cache.length if cache is not None else 0
        if cache is not None:
            k, v = cache.append(k, v)  # [B, H, L, Dh]
        L = past + T
        if key_mask is None and T == 1:
            o = F.scaled_dot_product_attention(q, k, v)  # one new token sees every cached one
        elif key_mask is None and past == 0:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            i = torch.arange(T, device=x.device)[:, None] + past  # query positions
            j = torch.arange(L, device=x.device)[None, :]  # key positions
            allowed = (j <= i)[None]  # [1, T, L] causal
            if key_mask is not None:
                # padding keys are hidden; a padding query still sees itself, so no row is empty
                # (an empty row gives NaN, and 0 * NaN would leak into the valid rows of the next layer)
                allowed = (allowed & key_mask[:, None, :].bool()) | (j == i)[None]  # [B, T, L]
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed[:, None])
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim))

    def step(self, x: torch.Tensor, cache: KVCache, position: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """One decoding step on fixed buffers: ``x [B, 1, D]`` -> ``[B, 1, D]``.

        The new key and value go into ``cache``'s preallocated buffers at ``position`` (a one-element
        int64 device tensor, not a host int), ``key_valid [B, capacity]`` gains that column, and
        the query attends over the filled part of the buffer through ``key_valid``
        (:func:`kda_explained.fast.step.decode_attention` on a GPU, its PyTorch twin elsewhere). Nothing depends on a host
        value, so the step can be captured once and replayed; the caller advances ``position``.
        """
        B = x.shape[0]
        q, k, v = (p(x).view(B, 1, self.num_heads, self.head_dim).transpose(1, 2)  # [B, H, 1, Dh]
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        cache.k.index_copy_(2, position, k.to(cache.k.dtype))
        cache.v.index_copy_(2, position, v.to(cache.v.dtype))
        key_valid.index_fill_(1, position, True)
        if x.is_cuda:  # split-key kernel: the filled part of the buffer, not its capacity
            from .. import fast as ops
        else:
            from .. import chunked as ops
        o = ops.decode_attention(q[:, :, 0], cache.k, cache.v, key_valid, position + 1)  # [B, H, Dh]
        return self.o_proj(o.reshape(B, 1, self.num_heads * self.head_dim))


# ----------------------------------------------------------------------------------------------
# the model
# ----------------------------------------------------------------------------------------------


class SwiGLU(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    def __init__(self, config: HybridConfig, kind: str, layer_idx: int):
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        if kind == "kda":
            self.mixer = KimiDeltaAttention(config.hidden_size, config.num_heads, config.head_dim,
                                            conv_size=config.conv_size, num_v_heads=config.num_v_heads,
                                            gate=config.gate, norm_eps=config.norm_eps, backend=config.kda_backend,
                                            layer_idx=layer_idx, allow_neg_eigval=config.allow_neg_eigval)
        else:
            self.mixer = Attention(config.hidden_size, config.num_heads, config.head_dim)
        self.mlp_norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(self, x, mask, key_mask, cache):
        h = self.attn_norm(x)
        if self.kind == "kda":
            x = x + self.mixer(h, attention_mask=mask, cache=cache)
        else:
            x = x + self.mixer(h, key_mask=key_mask, cache=cache)
        return x + self.mlp(self.mlp_norm(x))

    def step(self, x, cache, position: torch.Tensor, key_valid: torch.Tensor) -> torch.Tensor:
        """``forward`` for one token per row ``x [B, 1, D]`` on fixed buffers (:class:`StaticDecoder`)."""
        h = self.attn_norm(x)
        if self.kind == "kda":
            x = x + self.mixer.step(h[:, 0], cache)[:, None]
        else:
            x = x + self.mixer.step(h, cache, position, key_valid)
        return x + self.mlp(self.mlp_norm(x))


@dataclass
class HybridCache:
    """One cache per layer (:class:`~kda_explained.layers.kda_layer.KDACache` or :class:`KVCache`) and the padding mask of the cached tokens."""

    layers: List[Union[KDACache, KVCache]]
    batch_size: int
    mask: Optional[torch.Tensor] = None  # [B, L] bool, None while every cached token is valid
    length: int = 0

    def nbytes(self) -> Dict[str, int]:
        """``{"attention_kv", "kda_state", "kda_conv", "total"}`` bytes held now."""
        out = {"attention_kv": 0, "kda_state": 0, "kda_conv": 0}
        for c in self.layers:
            if isinstance(c, KVCache):
                out["attention_kv"] += c.nbytes()
            else:
                b = c.nbytes()
                out["kda_state"] += b["state"]
                out["kda_conv"] += b["conv"]
        out["total"] = sum(out.values())
        return out


class HybridLM(nn.Module):
    """Causal LM: embedding, ``num_layers`` blocks in the 3:1 KDA:attention layout, RMSNorm, LM head.

    ``forward(input_ids [B, T], attention_mask [B, T] = None, cache = None)`` -> logits ``[B, T, vocab]``.
    ``attention_mask`` covers this call's tokens (1 = token, 0 = padding); the cache
    remembers the masks of earlier calls. Logits at padding positions mean nothing; a row
    that is all padding leaves the other rows' logits, and its own rows of the KDA caches, as they were.
    A bad call raises :class:`ValueError` or :class:`TypeError` naming the argument. Token ids
    outside ``[0, vocab_size)`` are found wherever that needs no device synchronisation: always
    on the CPU, and without a cache (prefill, training) on a GPU; :meth:`generate` checks its
    prompt on any device. Decoding steps on a GPU are not checked, so that no step waits for the device.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> model = HybridLM(HybridConfig(vocab_size=50, hidden_size=32, num_layers=4, num_heads=2, head_dim=16,
    ...                               intermediate_size=64)).eval()
    >>> prompt = torch.randint(0, 50, (2, 6))
    >>> out = model.generate(prompt, max_new_tokens=4)
    >>> out.shape
    torch.Size([2, 10])
    >>> bool((out == model.generate(prompt, max_new_tokens=4, use_cache=False)).all())
    True
    """

    def __init__(self, config: HybridConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, kind, i) for i, kind in enumerate(config.layer_types()))
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def init_cache(self, batch_size: int, capacity: int = 0) -> HybridCache:
        """Empty caches for ``batch_size`` rows; KV buffers pre-sized for ``capacity`` tokens."""
        w = self.embed.weight
        c = self.config
        layers = [blk.mixer.init_cache(batch_size) if blk.kind == "kda" else
                  KVCache(batch_size, c.num_heads, c.head_dim, capacity, dtype=w.dtype, device=w.device)
                  for blk in self.layers]
        return HybridCache(layers=layers, batch_size=batch_size)

    def _check_input_ids(self, input_ids, check_range: bool) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"input_ids: expected a torch.Tensor [B, T] of token ids, got {type(input_ids).__name__}")
        if input_ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"input_ids: expected an integer tensor (int64 or int32) of token ids, "
                            f"got {str(input_ids.dtype).replace('torch.', '')}")
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids: expected shape [B, T] (one sequence is [1, T]), "
                             f"got {format_shape(input_ids.shape)}")
        if input_ids.shape[0] < 1 or input_ids.shape[1] < 1:
            raise ValueError(f"input_ids: expected at least one row and one token (B >= 1, T >= 1), "
                             f"got {format_shape(input_ids.shape)}")
        if check_range and not torch.compiler.is_compiling():  # a compiled graph reads no value back
            lo, hi = input_ids.aminmax()
            lo, hi = int(lo), int(hi)  # one synchronisation for both
            V = self.config.vocab_size
            if lo < 0 or hi >= V:
                raise ValueError(f"input_ids: expected token ids in [0, vocab_size = {V}), got ids in [{lo}, {hi}]")

    def _check_cache(self, cache, B: int, T: int, device: torch.device) -> None:
        if not isinstance(cache, HybridCache):
            raise TypeError(f"cache: expected a HybridCache (from init_cache), got {type(cache).__name__}")
        if cache.batch_size != B:
            raise ValueError(f"cache: expected a cache for batch size B = {B} (input_ids {format_shape((B, T))}), "
                             f"got one for {cache.batch_size}")
        if len(cache.layers) != len(self.layers):
            raise ValueError(f"cache: expected a cache for this model's {len(self.layers)} layers, got one for "
                             f"{len(cache.layers)} (a cache of another model? make it with init_cache)")
        c = self.config
        for i, (blk, layer_cache) in enumerate(zip(self.layers, cache.layers)):
            if blk.kind == "kda":
                if not isinstance(layer_cache, KDACache):
                    raise ValueError(f"cache: layer {i} (KDA) expected a KDACache, got {type(layer_cache).__name__} "
                                     f"(a cache of another model? make it with init_cache)")
                blk.mixer.check_cache(layer_cache, B, device, where=f"layer {i} (KDA): ")
                continue
            if not isinstance(layer_cache, KVCache):
                raise ValueError(f"cache: layer {i} (attention) expected a KVCache, got "
                                 f"{type(layer_cache).__name__} (a cache of another model? make it with init_cache)")
            want = (B, c.num_heads, c.head_dim)
            got = (layer_cache.k.shape[0], layer_cache.k.shape[1], layer_cache.k.shape[3])
            if got != want or layer_cache.k.device != device:
                raise ValueError(f"cache: layer {i} (attention) expected keys [B, H, L, Dh] with [B, H, Dh] = "
                                 f"{format_shape(want)} on {device}, got {format_shape(layer_cache.k.shape)} on "
                                 f"{layer_cache.k.device} (a cache of another model? make it with init_cache)")

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                cache: Optional[HybridCache] = None) -> torch.Tensor:
        """Logits ``[B, T, vocab]`` for ``input_ids [B, T]``; reads and extends ``cache`` when given."""
        # decoding steps on an accelerator skip the range check: it would make every step wait for the device
        self._check_input_ids(input_ids, check_range=cache is None or input_ids.device.type == "cpu")
        B, T = input_ids.shape
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, T, "input_ids")
        if cache is not None:  # all of it before any of it is extended
            self._check_cache(cache, B, T, input_ids.device)
        mask = None if attention_mask is None or bool(attention_mask.bool().all()) else attention_mask.bool()
        key_mask = mask
        if cache is not None:
            if cache.mask is not None or mask is not None:  # remember padding for later attention calls
                ones = torch.ones(B, T, dtype=torch.bool, device=input_ids.device)
                old = cache.mask if cache.mask is not None else torch.ones(B, cache.length, dtype=torch.bool,
                                                                           device=input_ids.device)
                cache.mask = torch.cat([old, mask if mask is not None else ones], 1)  # [B, L]
            key_mask = cache.mask
            cache.length += T

        x = self.embed(input_ids)  # [B, T, D]
        for i, blk in enumerate(self.layers):
            x = blk(x, mask, key_mask, cache.layers[i] if cache is not None else None)
        return self.lm_head(self.norm(x))  # [B, T, vocab]

    def decoder(self, cache: HybridCache, *, capture: Optional[bool] = None,
                compile: Union[bool, str] = False) -> "StaticDecoder":
        """A :class:`StaticDecoder` continuing from ``cache``: one call per new token, on fixed buffers.

        ``capture``: record the step in a CUDA graph (default: on a CUDA device); ``compile``: run
        the step through ``torch.compile(fullgraph=True)`` (a string names the backend) before it
        is captured. The attention caches need room for every step to come.
        """
        return StaticDecoder(self, cache, capture=capture, compile=compile)

    @torch.no_grad()
    def generate(self, input_ids: torch.Tensor, max_new_tokens: int, attention_mask: Optional[torch.Tensor] = None,
                 use_cache: bool = True, compile: Union[bool, str] = False,
                 cuda_graph: bool = False) -> torch.Tensor:
        """Greedy decoding: ``input_ids [B, T]`` -> ``[B, T + max_new_tokens]``.

        With ``use_cache`` the prompt is prefilled once and each new token is one
        decoding step through the caches; without, the whole sequence is recomputed
        every step (the reference the cache must reproduce). A padded prompt takes
        its ``attention_mask`` (any padding side); new tokens are appended after it.
        Every row needs at least one token (there is nothing to continue otherwise);
        ``max_new_tokens`` is an int ``>= 0`` (``0`` returns the prompt). Bad arguments
        raise :class:`ValueError` or :class:`TypeError` naming them.

        ``compile``: the decoding steps run through ``torch.compile(self, fullgraph=True,
        dynamic=True)`` (``True``: its default backend; a string names the backend, e.g.
        ``"aot_eager"``); the same tokens as eager, one graph for every step.

        ``cuda_graph``: the decoding steps run on fixed buffers through :meth:`decoder`, captured
        once in a CUDA graph and replayed for each token on a CUDA device (eagerly on the CPU,
        where there is nothing to capture); with ``compile``, the captured step is the compiled one.
        The same tokens as eager.
        """
        self._check_input_ids(input_ids, check_range=True)  # the prompt, once; new tokens are argmax ids
        if isinstance(max_new_tokens, bool) or (isinstance(max_new_tokens, torch.Tensor)
                                                and max_new_tokens.dtype == torch.bool):
            raise TypeError("max_new_tokens: expected an int, got bool")
        try:
            max_new_tokens = operator.index(max_new_tokens)
        except TypeError:
            raise TypeError(f"max_new_tokens: expected an int, got {type(max_new_tokens).__name__}") from None
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens: expected an int >= 0, got {max_new_tokens}")
        if not isinstance(use_cache, bool):
            raise TypeError(f"use_cache: expected a bool, got {type(use_cache).__name__}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile: expected a bool or the name of a torch.compile backend, "
                            f"got {type(compile).__name__}")
        if compile and not use_cache:
            raise ValueError("compile: compiles the cached decoding step, expected use_cache=True, got False")
        if not isinstance(cuda_graph, bool):
            raise TypeError(f"cuda_graph: expected a bool, got {type(cuda_graph).__name__}")
        if cuda_graph and not use_cache:
            raise ValueError("cuda_graph: captures the cached decoding step, expected use_cache=True, got False")
        B, T = input_ids.shape
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, T, "input_ids")
            empty = (~attention_mask.bool().any(1)).nonzero().flatten().tolist()
            if empty:
                raise ValueError(f"attention_mask: expected at least one token in every row of the prompt, "
                                 f"got none in row {', '.join(map(str, empty))}")
        if max_new_tokens == 0:
            return input_ids
        mask = (torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None
                else attention_mask.bool())
        last = T - 1 - torch.flip(mask, [1]).int().argmax(1)  # [B] position of each row's last token
        rows = torch.arange(B, device=input_ids.device)
        out = input_ids
        cache = self.init_cache(B, capacity=T + max_new_tokens) if use_cache else None
        step_fn = self
        if compile and not cuda_graph:
            options = {} if compile is True else {"backend": compile}
            step_fn = torch.compile(self, fullgraph=True, dynamic=True, **options)
        logits = self(input_ids, attention_mask=mask, cache=cache)[rows, last]  # [B, vocab]
        static = None
        if cuda_graph and max_new_tokens > 1:
            static = self.decoder(cache, compile=compile)
            step_fn = lambda token, cache: static(token)[:, None]  # noqa: E731 - [B, 1, vocab] as forward's
        try:
            return self._decode(out, logits, mask, cache, step_fn, max_new_tokens, use_cache)
        finally:
            if static is not None:
                static.close()

    def _decode(self, out, logits, mask, cache, step_fn, max_new_tokens: int, use_cache: bool) -> torch.Tensor:
        """Greedy steps after the prompt's ``logits [B, vocab]``: append each argmax token to ``out``."""
        for step in range(max_new_tokens):
            token = logits.argmax(-1, keepdim=True)  # [B, 1]
            out = torch.cat([out, token], 1)
            mask = torch.cat([mask, torch.ones_like(token, dtype=torch.bool)], 1)
            if step == max_new_tokens - 1:
                break
            if use_cache:
                logits = step_fn(token, cache=cache)[:, -1]
            else:
                logits = self(out, attention_mask=mask)[:, -1]
        return out


class StaticDecoder:
    """Greedy decoding steps of a :class:`HybridLM` on fixed buffers, captured once in a CUDA graph.

    Made by :meth:`HybridLM.decoder` from a prefilled :class:`HybridCache`. Calling it with the
    last tokens ``[B, 1]`` runs one decoding step and returns the logits ``[B, vocab]``; the
    caches are updated in place. Every buffer the step touches is allocated before the first
    step: the token, the write position (a device tensor the step advances itself), the key
    mask over the attention caches' whole capacity, the KDA states and conv windows, the KV
    buffers. The step reads no value back to the host, so on a CUDA device it is captured once
    (``torch.cuda.graph``) and each call is a copy of the token and one replay: the ~100 small
    launches per KDA layer cost one launch's overhead in all. On the CPU (or with
    ``capture=False``) the same step runs eagerly.

    The logits returned on a GPU are the graph's own output buffer: read them before the next call.
    The attention caches must have room for every step (``init_cache(B, capacity=prompt + steps)``);
    a step beyond it raises :class:`ValueError`.
    """

    def __init__(self, model: "HybridLM", cache: HybridCache, *, capture: Optional[bool] = None,
                 compile: Union[bool, str] = False):
        if not isinstance(cache, HybridCache):
            raise TypeError(f"cache: expected a HybridCache (from init_cache), got {type(cache).__name__}")
        if not isinstance(compile, (bool, str)):
            raise TypeError(f"compile: expected a bool or the name of a torch.compile backend, "
                            f"got {type(compile).__name__}")
        device = model.embed.weight.device
        if capture is None:
            capture = device.type == "cuda"
        if not isinstance(capture, bool):
            raise TypeError(f"capture: expected a bool or None, got {type(capture).__name__}")
        if capture and device.type != "cuda":
            raise ValueError(f"capture: CUDA graphs need the model on a CUDA device, got {device}")
        B = cache.batch_size
        model._check_cache(cache, B, 1, device)
        kv = [c for c in cache.layers if isinstance(c, KVCache)]
        self.capacity = min((c.k.shape[2] for c in kv), default=None)  # None: no attention layer
        if self.capacity is not None and any(c.k.shape[2] != self.capacity for c in kv):
            raise ValueError("cache: expected every attention layer's buffer to have one capacity (from init_cache)")
        self.model, self.cache, self.batch_size = model, cache, B
        self.token = torch.zeros(B, 1, dtype=torch.long, device=device)
        self.position = torch.full((1,), cache.length, dtype=torch.long, device=device)
        cap = self.capacity or 1
        self.key_valid = torch.zeros(B, cap, dtype=torch.bool, device=device)
        if self.capacity is not None:
            self._check_room()
            self.key_valid[:, :cache.length] = True if cache.mask is None else cache.mask
        self._masked = cache.mask is not None
        body = self._step
        if compile:
            options = {} if compile is True else {"backend": compile}
            body = torch.compile(self._step, fullgraph=True, dynamic=False, **options)
        self._body = body
        self.graph = None
        self._logits = None
        if capture:
            self._capture()

    def _check_room(self) -> None:
        if self.capacity is not None and self.cache.length >= self.capacity:
            raise ValueError(f"cache: the attention caches hold {self.capacity} tokens and all are taken; make the "
                             f"cache with room for every step (init_cache(B, capacity=prompt + new tokens))")

    def _step(self) -> torch.Tensor:
        """The decoding step on the fixed buffers: logits ``[B, vocab]`` of the token in ``self.token``."""
        model, cache = self.model, self.cache
        x = model.embed(self.token)  # [B, 1, D]
        for blk, c in zip(model.layers, cache.layers):
            x = blk.step(x, c, self.position, self.key_valid)
        self.position.add_(1)
        return model.lm_head(model.norm(x))[:, 0]  # [B, vocab]

    def _capture(self) -> None:
        """Warm up once (compiling and tuning every kernel), undo what it wrote, then capture one step."""
        # a graph left unreachable by an earlier decoder must not be freed by the garbage collector in
        # the middle of this capture (freeing a graph is not allowed while a stream captures): free it now
        gc.collect()
        saved = self._snapshot()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self._body()
        torch.cuda.current_stream().wait_stream(side)
        self._restore(saved)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self._logits = self._body()  # recorded, not run: the buffers are as they were

    def _snapshot(self) -> list:
        """Copies of what one step writes: the KDA caches, the KV column at the position, the mask, the position."""
        p = self.cache.length
        out = [(self.position, self.position.clone()), (self.key_valid, self.key_valid.clone())]
        for c in self.cache.layers:
            if isinstance(c, KVCache):
                out += [(c.k[:, :, p], c.k[:, :, p].clone()), (c.v[:, :, p], c.v[:, :, p].clone())]
            else:
                out += [(t, t.clone()) for t in (c.state, c.conv_q, c.conv_k, c.conv_v)]
        return out

    @staticmethod
    def _restore(saved: list) -> None:
        for target, copy in saved:
            target.copy_(copy)

    def close(self) -> None:
        """Free the captured graph and its memory pool now (the caches stay); the decoder cannot step again."""
        if self.graph is not None:
            self.graph.reset()
        self.graph = self._logits = self._body = None

    @torch.no_grad()
    def __call__(self, token: torch.Tensor) -> torch.Tensor:
        """One decoding step: ``token [B, 1]`` (the last token of each row) -> logits ``[B, vocab]``."""
        if not isinstance(token, torch.Tensor) or token.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"token: expected an integer tensor [B, 1], got "
                            f"{token.dtype if isinstance(token, torch.Tensor) else type(token).__name__}")
        if tuple(token.shape) != (self.batch_size, 1):
            raise ValueError(f"token: expected shape [B, 1] = {format_shape((self.batch_size, 1))}, "
                             f"got {format_shape(token.shape)}")
        if self._body is None:
            raise ValueError("token: this decoder was closed; make another with HybridLM.decoder(cache)")
        self._check_room()
        self.token.copy_(token)
        if self.graph is not None:
            self.graph.replay()
            logits = self._logits
        else:
            logits = self._body()
        # host bookkeeping: lengths the host knows without asking the device
        cache = self.cache
        cache.length += 1
        for c in cache.layers:
            if isinstance(c, KVCache):
                c.length += 1
            else:
                c.seen += 1
        if self._masked:
            cache.mask = self.key_valid[:, :cache.length]
        return logits


def cache_memory(config: Union[HybridConfig, HybridLM], batch: int, context_len: int,
                 dtype: torch.dtype = torch.bfloat16) -> Dict[str, Dict[str, float]]:
    """Cache bytes at ``context_len`` tokens for ``batch`` rows: the hybrid vs the same model all-attention.

    Per attention layer the KV cache holds ``2 B L H Dh`` elements of ``dtype``; per KDA
    layer the state holds ``B HV Dh Dh`` float32 and the conv states ``B (W - 1)(2 H + HV) Dh``
    elements of ``dtype``, both independent of ``L``. Returns
    ``{"hybrid": {...}, "all_attention": {...}, "kv_reduction": ..., "total_reduction": ...}``
    with ``attention_kv``, ``kda_state``, ``kda_conv``, ``total`` bytes per model and the
    reductions as fractions.

    >>> m = cache_memory(HybridConfig(num_layers=8, num_heads=16, head_dim=128), batch=1, context_len=131072)
    >>> m["kv_reduction"]                     # 2 attention layers in 8 instead of 8: 75 % less KV cache
    0.75
    >>> m["hybrid"]["kda_state"] / 2**20     # 6 KDA layers x 16 heads x 128 x 128 x 4 bytes, in MiB
    6.0
    """
    if isinstance(config, HybridLM):
        config = config.config
    itemsize = torch.empty((), dtype=dtype).element_size()
    H, Dh, W = config.num_heads, config.head_dim, config.conv_size
    HV = config.num_v_heads or H

    def one(cfg: HybridConfig) -> Dict[str, float]:
        kinds = cfg.layer_types()
        n_attn, n_kda = kinds.count("attention"), kinds.count("kda")
        out = {
            "attention_layers": n_attn,
            "kda_layers": n_kda,
            "attention_kv": n_attn * 2 * batch * context_len * H * Dh * itemsize,
            "kda_state": n_kda * batch * HV * Dh * Dh * 4,
            "kda_conv": n_kda * batch * (W - 1) * (2 * H + HV) * Dh * itemsize,
        }
        out["total"] = out["attention_kv"] + out["kda_state"] + out["kda_conv"]
        return out

    hybrid, full = one(config), one(config.all_attention())
    return {
        "hybrid": hybrid,
        "all_attention": full,
        "kv_reduction": 1 - hybrid["attention_kv"] / full["attention_kv"] if full["attention_kv"] else 0.0,
        "total_reduction": 1 - hybrid["total"] / full["total"] if full["total"] else 0.0,
    }
