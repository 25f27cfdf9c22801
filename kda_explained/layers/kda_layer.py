"""``KimiDeltaAttention``: the KDA token mixer of Kimi Linear (report §4) as an ``nn.Module``.

One layer maps ``hidden_states [B, T, hidden]`` to ``[B, T, hidden]``::

    q, k, v = silu(conv(q_proj x)), silu(conv(k_proj x)), silu(conv(v_proj x))  # short conv, per channel
    q, k    = l2norm(q), l2norm(k)                                             # per head
    g       = gate(f_b_proj(f_a_proj x))        # log decay, softplus or lower-bound form (docs/design.md)
    beta    = sigmoid(b_proj x)                 # 2 sigmoid(b_proj x) with allow_neg_eigval
    o       = KDA(q, k, v, g, beta)             # report Eq. 1, chunked or fast backend
    o       = rmsnorm(o) * o_norm.weight * sigmoid(g_b_proj(g_a_proj x))       # per head
    out     = o_proj o

Parameter names and shapes are those of the released Kimi Linear checkpoints
(``model.layers.<i>.self_attn.*`` of ``moonshotai/Kimi-Linear-48B-A3B-*``), so
their state dicts load with ``load_state_dict(strict=True)``.

Glossary
--------
==============  ==============================================================
``D``           ``hidden_size``
``H``           ``num_heads`` (q/k heads)
``HV``          ``num_v_heads`` (value heads; ``HV = H`` unless GVA)
``K``           ``head_dim``; key and value heads have the same width
``W``           ``conv_size``
``g``           log decay ``log alpha`` (report Eq. 1), ``[B, T, HV, K]``, ``<= 0``
``beta``        delta-rule step size, ``[B, T, HV]``, in ``(0, 1)`` (``(0, 2)`` with ``allow_neg_eigval``)
``S``           recurrent state ``[N, HV, K, V]``, float32
``N``           sequences: batch rows, or ``len(cu_seqlens) - 1`` for a packed batch
==============  ==============================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .. import chunked
from ..distributed.layer import ContextParallelSlice
from ..chunked.kda import as_tensor_cu_seqlens
from ..validation import format_shape
from .conv import ShortConvolution

__all__ = ["KimiDeltaAttention", "KDACache", "GatedRMSNorm", "convert_fla_state_dict", "unpad", "pad",
           "check_attention_mask"]

GATES = ("softplus", "lowerbound")
BACKENDS = ("auto", "chunked", "fast")


# ----------------------------------------------------------------------------------------------
# padded batch <-> packed batch
# ----------------------------------------------------------------------------------------------


def unpad(x: torch.Tensor, attention_mask: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pack the kept tokens of a padded batch: ``x [B, T, ...]``, ``mask [B, T]`` -> ``[1, sum(mask), ...]``.

    Returns ``(packed, indices, cu_seqlens)``: ``indices [sum(mask)]`` are the kept
    positions in ``x.flatten(0, 1)``; ``cu_seqlens [B + 1]`` the offsets of each
    row's tokens. Any padding pattern works (left, right, holes): a row's kept
    tokens, in order, are its sequence.

    >>> import torch
    >>> x = torch.arange(6.0).reshape(2, 3, 1)
    >>> packed, idx, cu = unpad(x, torch.tensor([[0, 1, 1], [1, 1, 1]]))
    >>> packed[0, :, 0].tolist(), cu.tolist()
    ([1.0, 2.0, 3.0, 4.0, 5.0], [0, 2, 5])
    """
    B, T = attention_mask.shape
    keep = attention_mask.reshape(-1).bool()
    indices = keep.nonzero().squeeze(1)  # [sum(mask)]
    lengths = attention_mask.bool().sum(1)  # [B]
    cu_seqlens = F.pad(torch.cumsum(lengths, 0), (1, 0)).to(torch.int64)  # [B + 1]
    return x.reshape(B * T, *x.shape[2:])[indices][None], indices, cu_seqlens


def pad(packed: torch.Tensor, indices: torch.Tensor, B: int, T: int) -> torch.Tensor:
    """Inverse of :func:`unpad`: ``[1, n, ...]`` -> ``[B, T, ...]`` with zeros at the padding."""
    out = packed.new_zeros(B * T, *packed.shape[2:])
    out = out.index_copy(0, indices, packed[0])
    return out.reshape(B, T, *packed.shape[2:])


def check_attention_mask(attention_mask, B: int, T: int, against: str) -> None:
    """Raise unless ``attention_mask`` is a ``[B, T]`` tensor of 1 (token) and 0 (padding), of any dtype.

    ``against`` names the argument whose ``[B, T]`` the mask must match. Reading the
    values costs a device synchronisation, which applying the mask costs anyway.

    >>> import torch
    >>> check_attention_mask(torch.tensor([[1, 1, 0]]), 1, 3, "input_ids")
    >>> check_attention_mask(torch.tensor([[1, 2, 0]]), 1, 3, "input_ids")
    Traceback (most recent call last):
    ...
    ValueError: attention_mask: expected 1 (token) or 0 (padding) in every entry, got values in [0, 2]
    """
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a torch.Tensor [B, T] of 1 (token) and 0 (padding), "
                        f"got {type(attention_mask).__name__}")
    if tuple(attention_mask.shape) != (B, T):
        raise ValueError(f"attention_mask: expected shape [B, T] = {format_shape((B, T))} to match {against}, "
                         f"got {format_shape(attention_mask.shape)}")
    if attention_mask.dtype != torch.bool and attention_mask.numel():
        if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            lo, hi = attention_mask.min().item(), attention_mask.max().item()
            raise ValueError(f"attention_mask: expected 1 (token) or 0 (padding) in every entry, "
                             f"got values in [{lo}, {hi}]")


# ----------------------------------------------------------------------------------------------
# the cache and the output norm
# ----------------------------------------------------------------------------------------------


@dataclass
class KDACache:
    """What one KDA layer carries from one call to the next, for ``N`` sequences; updated in place.

    - ``conv_q, conv_k, conv_v``: ``[N, C, W - 1]``, the last ``W - 1`` inputs of each short conv
      (``C = H * K`` for q and k, ``HV * K`` for v), in the activations' dtype;
    - ``state``: ``[N, HV, K, V]`` float32, the recurrent state ``S`` of report Eq. 1;
    - ``seen``: tokens consumed so far (of the longest sequence), for bookkeeping.

    Zeros are the state before the first token, so a fresh cache from
    :meth:`KimiDeltaAttention.init_cache` serves prefill and decoding alike.
    """

    conv_q: torch.Tensor
    conv_k: torch.Tensor
    conv_v: torch.Tensor
    state: torch.Tensor
    seen: int = 0

    @property
    def num_sequences(self) -> int:
        return int(self.state.shape[0])

    def nbytes(self) -> Dict[str, int]:
        """Bytes held: ``{"state": ..., "conv": ...}``; neither grows with the context length."""
        conv = sum(t.numel() * t.element_size() for t in (self.conv_q, self.conv_k, self.conv_v))
        return {"state": self.state.numel() * self.state.element_size(), "conv": conv}


class GatedRMSNorm(nn.Module):
    """Head-wise RMSNorm times a sigmoid gate: ``x, gate [..., K]`` -> ``rms(x) * weight * sigmoid(gate)``.

    Computed in float32 (float64 stays), returned in ``x``'s dtype; the gate of Kimi Linear's
    ``FusedRMSNormGated(activation="sigmoid")``.

    >>> import torch
    >>> norm = GatedRMSNorm(4)
    >>> y = norm(torch.tensor([[2.0, -2.0, 2.0, -2.0]]), torch.zeros(1, 4))   # rms = 2, sigmoid(0) = 1/2
    >>> y.tolist()
    [[0.5, -0.5, 0.5, -0.5]]
    """

    def __init__(self, head_dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(head_dim))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        """``x, gate [..., K]`` -> ``rms(x) * weight * sigmoid(gate)``, in ``x``'s dtype."""
        return chunked.gated_rms_norm(x, gate, self.weight, self.eps)


# ----------------------------------------------------------------------------------------------
# the layer
# ----------------------------------------------------------------------------------------------


def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for activations of 32 bits or fewer, float64 for float64 (exact tests)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _check_choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name}: expected one of {list(allowed)}, got {value!r}")


class KimiDeltaAttention(nn.Module):
    """The KDA layer of Kimi Linear: ``[B, T, hidden_size]`` -> ``[B, T, hidden_size]``.

    Args:
        hidden_size: ``D``.
        num_heads: ``H``, q/k heads.
        head_dim: ``K`` (= ``V``).
        conv_size: ``W``, taps of the short convolutions.
        num_v_heads: ``HV``, value heads (a multiple of ``H``: GVA); default ``H``. The gate,
            ``beta``, ``A_log``, ``dt_bias`` and the output gate are per value head.
        gate: ``"softplus"`` (``g = -exp(A_log) softplus(f + dt_bias)``, Kimi Linear) or
            ``"lowerbound"`` (``g = lower_bound sigmoid(exp(A_log) (f + dt_bias))``).
        lower_bound: the floor of the lower-bound gate (negative).
        norm_eps: epsilon of the output RMSNorm.
        backend: ``"chunked"`` (PyTorch, any device), ``"fast"`` (Triton), or ``"auto"``:
            fast for CUDA inputs, chunked otherwise.
        layer_idx: position in a model, for bookkeeping.
        allow_neg_eigval: ``beta = 2 sigmoid(b_proj x)`` in ``(0, 2)`` instead of ``sigmoid(b_proj x)``,
            so the transition ``I - beta k k^T`` can have the negative eigenvalue ``1 - beta``
            (flash-linear-attention's option of the same name; Grazzi et al., arXiv:2411.12537).
            Off in Kimi Linear.
        cp_group: a ``torch.distributed`` process group for context parallelism: each rank calls
            the layer on its slice of the time axis (``[B, T_r, D]``, in rank order; ``cu_seqlens``
            the whole batch's offsets) and gets its slice of the output, as one call on the whole
            batch would give (:mod:`kda_explained.distributed`; no ``attention_mask``, no ``cache``).

    Parameters (released Kimi Linear names and shapes; no biases):
        ``q_proj, k_proj [H K, D]``, ``v_proj [HV K, D]``, ``{q,k}_conv1d.weight [H K, 1, W]``,
        ``v_conv1d.weight [HV K, 1, W]``, ``f_a_proj [K, D]``, ``f_b_proj [HV K, K]``,
        ``b_proj [HV, D]``, ``g_a_proj [K, D]``, ``g_b_proj [HV K, K]``, ``A_log [HV]`` float32
        (``[1, 1, HV, 1]`` loads too), ``dt_bias [HV K]`` float32, ``o_norm.weight [K]``,
        ``o_proj [D, HV K]``. ``A_log`` and ``dt_bias`` stay float32 under ``.to(dtype)``.

    ``forward(hidden_states, attention_mask=None, cu_seqlens=None, cache=None)``:
        ``hidden_states [B, T, D]`` with ``B, T >= 1``, in the dtype of the layer's weights (or any
        floating dtype under ``torch.autocast``).
        ``attention_mask [B, T]`` (1 = token, 0 = padding, any pattern) or ``cu_seqlens [N + 1]``
        for a packed batch (``B == 1``). Padding never touches the state and comes out as zeros;
        so a row that is all padding (or a mask that is all padding) gives zeros and leaves its
        cache row as it was, and an empty sequence in ``cu_seqlens`` does the same.
        ``cache``: a :class:`KDACache` for ``N`` sequences, read and updated in place; it must
        come from this layer's :meth:`init_cache` (or one of the same sizes).
        A bad call raises :class:`ValueError` or :class:`TypeError` naming the argument.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> layer = KimiDeltaAttention(hidden_size=32, num_heads=2, head_dim=8)
    >>> x = torch.randn(2, 10, 32)
    >>> layer(x).shape
    torch.Size([2, 10, 32])
    >>> cache = layer.init_cache(batch_size=2)
    >>> with torch.no_grad():
    ...     y_pre = layer(x[:, :7], cache=cache)                       # prefill 7 tokens
    ...     y_dec = [layer(x[:, t:t + 1], cache=cache) for t in range(7, 10)]   # decode 3
    ...     y_all = layer(x)
    >>> bool(torch.allclose(torch.cat([y_pre, *y_dec], 1), y_all, atol=1e-5))
    True
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        head_dim: int,
        conv_size: int = 4,
        num_v_heads: Optional[int] = None,
        gate: str = "softplus",
        lower_bound: float = -5.0,
        norm_eps: float = 1e-5,
        backend: str = "auto",
        layer_idx: Optional[int] = None,
        allow_neg_eigval: bool = False,
        cp_group=None,
    ):
        super().__init__()
        num_v_heads = num_heads if num_v_heads is None else num_v_heads
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim),
                            ("num_v_heads", num_v_heads)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        if isinstance(conv_size, bool) or not isinstance(conv_size, int) or conv_size < 2:
            raise ValueError(f"conv_size: expected an int >= 2, got {conv_size!r}")
        if num_v_heads % num_heads != 0:
            raise ValueError(f"num_v_heads: expected a multiple of num_heads = {num_heads} (GVA), got {num_v_heads}")
        _check_choice("gate", gate, GATES)
        _check_choice("backend", backend, BACKENDS)
        if not (math.isfinite(lower_bound) and lower_bound < 0):
            raise ValueError(f"lower_bound: expected a finite negative number, got {lower_bound}")
        if not isinstance(allow_neg_eigval, bool):
            raise TypeError(f"allow_neg_eigval: expected a bool, got {type(allow_neg_eigval).__name__}")

        self.hidden_size, self.num_heads, self.num_v_heads = hidden_size, num_heads, num_v_heads
        self.head_dim, self.conv_size = head_dim, conv_size
        self.gate, self.lower_bound, self.backend, self.layer_idx = gate, float(lower_bound), backend, layer_idx
        self.allow_neg_eigval = allow_neg_eigval
        self.cp_group = cp_group
        key_dim, value_dim = num_heads * head_dim, num_v_heads * head_dim

        self.q_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.k_proj = nn.Linear(hidden_size, key_dim, bias=False)
        self.v_proj = nn.Linear(hidden_size, value_dim, bias=False)
        self.q_conv1d = ShortConvolution(key_dim, conv_size)
        self.k_conv1d = ShortConvolution(key_dim, conv_size)
        self.v_conv1d = ShortConvolution(value_dim, conv_size)
        # the forget gate's low-rank projection: hidden -> head_dim -> one decay per value channel
        self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.f_b_proj = nn.Linear(head_dim, value_dim, bias=False)
        self.b_proj = nn.Linear(hidden_size, num_v_heads, bias=False)
        # decay rate per head and bias per channel: float32 (Kimi keeps them so; see _apply)
        self.A_log = nn.Parameter(torch.log(torch.empty(num_v_heads, dtype=torch.float32).uniform_(1, 16)))
        dt = torch.exp(torch.empty(value_dim).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
        self.dt_bias = nn.Parameter((dt + torch.log(-torch.expm1(-dt))).float())  # softplus^-1(dt)
        # the output gate's low-rank projection, and the head-wise gated norm
        self.g_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, value_dim, bias=False)
        self.o_norm = GatedRMSNorm(head_dim, eps=norm_eps)
        self.o_proj = nn.Linear(value_dim, hidden_size, bias=False)

        self.register_load_state_dict_pre_hook(_A_log_from_checkpoint)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, num_v_heads={self.num_v_heads}, "
                f"head_dim={self.head_dim}, gate={self.gate!r}, backend={self.backend!r}, "
                f"allow_neg_eigval={self.allow_neg_eigval}")

    def _apply(self, fn, recurse=True):
        # .to(bfloat16) / .half() cast every parameter; the decay parameters go back to float32
        # (float64, for exact tests, is kept)
        super()._apply(fn, recurse)
        for name in ("A_log", "dt_bias"):
            p = getattr(self, name)
            if p.dtype in (torch.bfloat16, torch.float16):
                p.data = p.data.float()
        return self

    # ------------------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, *, dtype: Optional[torch.dtype] = None,
                   device: Optional[torch.device] = None) -> KDACache:
        """A zero :class:`KDACache` for ``batch_size`` sequences.

        Conv states in ``dtype`` (default: the weights'); the state float32 (float64 for a float64 model).
        """
        dtype = dtype or self.q_proj.weight.dtype
        device = device or self.q_proj.weight.device
        W1, key_dim, value_dim = self.conv_size - 1, self.num_heads * self.head_dim, self.num_v_heads * self.head_dim
        return KDACache(
            conv_q=torch.zeros(batch_size, key_dim, W1, dtype=dtype, device=device),
            conv_k=torch.zeros(batch_size, key_dim, W1, dtype=dtype, device=device),
            conv_v=torch.zeros(batch_size, value_dim, W1, dtype=dtype, device=device),
            state=torch.zeros(batch_size, self.num_v_heads, self.head_dim, self.head_dim, device=device,
                              dtype=torch.float64 if dtype == torch.float64 else torch.float32),
        )

    def _resolve_backend(self, x: torch.Tensor) -> str:
        if self.backend == "auto":
            return "fast" if x.is_cuda else "chunked"
        return self.backend

    def _check_inputs(self, x, attention_mask, cu_seqlens, cache) -> Optional[torch.Tensor]:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"hidden_states: expected a torch.Tensor, got {type(x).__name__}")
        if not x.dtype.is_floating_point:
            raise TypeError(f"hidden_states: expected a floating-point tensor, got {_dtype_name(x.dtype)}")
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"hidden_states: expected shape [B, T, hidden_size] with hidden_size = "
                             f"{self.hidden_size}, got {format_shape(x.shape)}")
        B, T, _ = x.shape
        if B < 1 or T < 1:
            raise ValueError(f"hidden_states: expected at least one row and one token (B >= 1, T >= 1), "
                             f"got {format_shape(x.shape)}")
        weight = self.q_proj.weight.dtype
        # under autocast the projections take any floating input; without it a mismatch fails inside F.linear
        if x.dtype != weight and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"hidden_states: expected dtype {_dtype_name(weight)}, the dtype of the layer's "
                            f"weights (cast one to the other with .to(dtype)), got {_dtype_name(x.dtype)}")
        if attention_mask is not None and cu_seqlens is not None:
            raise ValueError("attention_mask: expected either attention_mask (a padded batch) or cu_seqlens "
                             "(a packed batch), got both")
        if attention_mask is not None:
            check_attention_mask(attention_mask, B, T, "hidden_states")
        if cu_seqlens is not None:
            cu_seqlens = as_tensor_cu_seqlens(cu_seqlens, x.device)
            if B != 1:
                raise ValueError(f"cu_seqlens: expected a packed batch with B = 1, got hidden_states "
                                 f"{format_shape(x.shape)}")
            cu = cu_seqlens.tolist()
            if cu[0] != 0 or cu[-1] != T or any(b < a for a, b in zip(cu[:-1], cu[1:])):
                raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to T = {T}, got {cu}")
        if cache is not None:
            N = B if cu_seqlens is None else cu_seqlens.numel() - 1
            if isinstance(cache, KDACache) and cache.num_sequences != N:
                what = "batch rows" if cu_seqlens is None else "packed sequences"
                raise ValueError(f"cache: expected a cache for N = {N} sequences ({what} of hidden_states "
                                 f"{format_shape(x.shape)}), got one for {cache.num_sequences}")
            self.check_cache(cache, N, x.device)
        return cu_seqlens

    def check_cache(self, cache, num_sequences: int, device: torch.device, *, where: str = "") -> None:
        """Raise unless ``cache`` is a :class:`KDACache` of this layer's sizes for ``num_sequences`` on ``device``.

        Messages name ``cache``; ``where`` goes after it (e.g. ``"layer 2: "``).
        """
        if not isinstance(cache, KDACache):
            raise TypeError(f"cache: {where}expected a KDACache, got {type(cache).__name__}")
        N, W1, HV, K = num_sequences, self.conv_size - 1, self.num_v_heads, self.head_dim
        if cache.num_sequences != N:
            raise ValueError(f"cache: {where}expected a cache for N = {N} sequences, got one for {cache.num_sequences}")
        expected = {
            "conv_q": ((N, self.num_heads * K, W1), "N, H K, W - 1"),
            "conv_k": ((N, self.num_heads * K, W1), "N, H K, W - 1"),
            "conv_v": ((N, HV * K, W1), "N, HV K, W - 1"),
            "state": ((N, HV, K, K), "N, HV, K, V"),
        }
        for name, (shape, labels) in expected.items():
            t = getattr(cache, name)
            if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
                got = format_shape(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                raise ValueError(f"cache: {where}expected {name} of shape [{labels}] = {format_shape(shape)} "
                                 f"for this layer, got {got} (a cache of another layer? make it with init_cache)")
            if t.device != torch.device(device):
                raise ValueError(f"cache: {where}expected {name} on {device} like the inputs, got {t.device}")
        if cache.state.dtype not in (torch.float32, torch.float64):
            raise ValueError(f"cache: {where}expected a float32 state (float64 for exact tests), "
                             f"got {_dtype_name(cache.state.dtype)}")

    def forward(
        self,
        hidden_states: torch.Tensor,
        attention_mask: Optional[torch.Tensor] = None,
        cu_seqlens: Optional[torch.Tensor] = None,
        cache: Optional[KDACache] = None,
    ) -> torch.Tensor:
        """``hidden_states [B, T, D]`` -> ``[B, T, D]``; arguments as in the class docstring."""
        if self.cp_group is not None:  # this rank holds a slice of the time axis
            cp = ContextParallelSlice.build(hidden_states, cu_seqlens=cu_seqlens, attention_mask=attention_mask,
                                            cache=cache, group=self.cp_group, hidden_size=self.hidden_size,
                                            parameters=self.parameters())
            return self._mix(hidden_states, cp.local_cu_seqlens, None, cp=cp)
        cu_seqlens = self._check_inputs(hidden_states, attention_mask, cu_seqlens, cache)
        B, T, _ = hidden_states.shape
        x, indices = hidden_states, None
        kept = B * T if attention_mask is None else int(attention_mask.bool().sum())
        if kept == 0:
            # nothing but padding: zeros, as padding always gives, and the cache's tensors stay as they were
            o = hidden_states.new_zeros(B, T, self.hidden_size)
        else:
            if kept < B * T:
                x, indices, cu_seqlens = unpad(hidden_states, attention_mask)  # [1, sum(mask), D]
            o = self._mix(x, cu_seqlens, cache)
        if cache is not None:
            cache.seen += T
        return pad(o, indices, B, T) if indices is not None else o

    def _mix(self, x: torch.Tensor, cu_seqlens: Optional[torch.Tensor], cache: Optional[KDACache],
             cp: Optional[ContextParallelSlice] = None) -> torch.Tensor:
        """The layer on a plain (``cu_seqlens=None``) or packed batch ``x [B, T, D]`` (with ``cp``: a rank's slice)."""
        B, T, _ = x.shape
        if cache is not None and cp is None and cu_seqlens is None and T == 1 and not (
                torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters()))):
            return self.step(x[:, 0], cache)[:, None]  # decoding: one token per row
        H, HV, K = self.num_heads, self.num_v_heads, self.head_dim
        keep = cache is not None

        # 1. projections and short convolutions (+ SiLU), carrying the conv states (with cp: starting
        #    from the last W - 1 inputs of the ranks before, the halo)
        xq, xk, xv = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        conv0 = cp.conv_states((xq, xk, xv), self.conv_size) if cp is not None else \
            (cache.conv_q, cache.conv_k, cache.conv_v) if keep else (None, None, None)
        q, conv_q = self.q_conv1d(xq, initial_state=conv0[0], output_final_state=keep, cu_seqlens=cu_seqlens)
        k, conv_k = self.k_conv1d(xk, initial_state=conv0[1], output_final_state=keep, cu_seqlens=cu_seqlens)
        v, conv_v = self.v_conv1d(xv, initial_state=conv0[2], output_final_state=keep, cu_seqlens=cu_seqlens)
        q, k = q.view(B, T, H, K), k.view(B, T, H, K)  # [B, T, H, K]
        v = v.view(B, T, HV, K)  # [B, T, HV, V]

        # 2. gate input (the gate itself is applied in the core) and beta
        f = self.f_b_proj(self.f_a_proj(x)).view(B, T, HV, K)  # [B, T, HV, K]
        beta = torch.sigmoid(self.b_proj(x).to(_compute_dtype(x)))  # [B, T, HV]
        if self.allow_neg_eigval:
            beta = 2 * beta  # in (0, 2): I - beta k k^T gets the eigenvalue 1 - beta, negative for beta > 1

        # 3. the KDA core
        S0 = cache.state if keep else None
        if S0 is not None and torch.is_grad_enabled():
            # the core may keep the state it starts from for its backward, and the cache is written
            # in place below: hand it a copy, so that a step taken with a cache can still train
            S0 = S0.clone()
        if cp is not None:  # the whole batch's KDA, across the ranks
            o, S = cp.kda(chunked.l2norm(q), chunked.l2norm(k), v, self.log_decay(f), beta,
                          self._resolve_backend(x)), None
        elif self._resolve_backend(x) == "fast":
            o, S = self._core_fast(q, k, v, f, beta, S0, keep, cu_seqlens)
        else:
            o, S = self._core_chunked(q, k, v, f, beta, S0, keep, cu_seqlens)
        if keep:
            with torch.no_grad():  # the cache is inference state: no graph through it
                if S is not cache.state:
                    cache.state.copy_(S)
                cache.conv_q.copy_(conv_q)
                cache.conv_k.copy_(conv_k)
                cache.conv_v.copy_(conv_v)

        # 4. head-wise gated RMSNorm and output projection
        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, HV, K)  # [B, T, HV, K]
        o = self.o_norm(o.to(x.dtype), gate)  # [B, T, HV, V]
        return self.o_proj(o.reshape(B, T, HV * K))  # [B, T, D]

    def step(self, x: torch.Tensor, cache: KDACache) -> torch.Tensor:
        """One decoding step: ``x [N, D]``, one token of each of ``N`` sequences -> ``[N, D]``; ``cache`` updated in place.

        What :meth:`forward` runs for ``[B, 1, D]`` inputs with a cache and no gradient. Its per-token
        work is one call of a twin pair per piece, from :mod:`kda_explained.fast` (one Triton launch
        each) or :mod:`kda_explained.chunked` (PyTorch) by backend: :func:`~kda_explained.chunked.step.short_conv_step`
        for each short convolution, the recurrence (with the fast backend one kernel that also takes the
        gate, the L2 norm and the beta sigmoid), :func:`~kda_explained.chunked.step.gated_rms_norm`. It reads
        no value back to the host and allocates only its intermediates, so a CUDA graph can capture it
        (:meth:`kda_explained.layers.hybrid.HybridLM.decoder`). No argument checks beyond the cache's shapes:
        :meth:`forward` makes them.
        """
        N = x.shape[0]
        H, HV, K = self.num_heads, self.num_v_heads, self.head_dim
        fast_backend = self._resolve_backend(x) == "fast"
        if fast_backend:
            from .. import fast as ops
        else:
            ops = chunked
        q = ops.short_conv_step(self.q_proj(x), cache.conv_q, self.q_conv1d.weight).view(N, 1, H, K)
        k = ops.short_conv_step(self.k_proj(x), cache.conv_k, self.k_conv1d.weight).view(N, 1, H, K)
        v = ops.short_conv_step(self.v_proj(x), cache.conv_v, self.v_conv1d.weight).view(N, 1, HV, K)
        f = self.f_b_proj(self.f_a_proj(x)).view(N, 1, HV, K)
        b = self.b_proj(x).view(N, 1, HV)  # beta's logit
        if fast_backend:
            o, _ = ops.fused_recurrent_kda(
                q, k, v, f, b, initial_state=cache.state, inplace_final_state=True, use_qk_l2norm_in_kernel=True,
                use_gate_in_kernel=True, A_log=self.A_log, dt_bias=self.dt_bias, use_beta_sigmoid_in_kernel=True,
                allow_neg_eigval=self.allow_neg_eigval,
                lower_bound=self.lower_bound if self.gate == "lowerbound" else None)
        else:
            beta = torch.sigmoid(b.to(_compute_dtype(x)))
            beta = 2 * beta if self.allow_neg_eigval else beta
            o, S = chunked.recurrent_kda(chunked.l2norm(q), chunked.l2norm(k), v, self.log_decay(f), beta,
                                         initial_state=cache.state, output_final_state=True)
            cache.state.copy_(S)
        gate = self.g_b_proj(self.g_a_proj(x)).view(N, HV, K)
        o = ops.gated_rms_norm(o.view(N, HV, K).to(x.dtype), gate, self.o_norm.weight, self.o_norm.eps)
        return self.o_proj(o.reshape(N, HV * K))

    def log_decay(self, f: torch.Tensor) -> torch.Tensor:
        """The gate: ``f [..., HV, K]`` (output of ``f_b_proj``) -> ``g [..., HV, K]`` float32, ``<= 0``."""
        if self.gate == "softplus":
            return chunked.kda_gate(f, self.A_log, self.dt_bias)
        return chunked.lowerbound_gate(f, self.A_log, self.dt_bias, lower_bound=self.lower_bound)

    def _core_chunked(self, q, k, v, f, beta, S0, keep, cu_seqlens):
        q, k = chunked.l2norm(q), chunked.l2norm(k)
        lengths = [q.shape[1]] if cu_seqlens is None else (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
        # decoding (a few tokens per sequence): the recurrence itself, not a chunk's worth of matrices
        core = chunked.recurrent_kda if max(lengths, default=0) <= chunked.RECURRENT_MAX_LEN else chunked.kda
        return core(q, k, v, self.log_decay(f), beta, initial_state=S0, output_final_state=keep,
                    cu_seqlens=cu_seqlens)

    def _core_fast(self, q, k, v, f, beta, S0, keep, cu_seqlens):
        from .. import fast  # imported on first use: importing triton is slow and reads TRITON_INTERPRET

        gate_opts = dict(use_qk_l2norm_in_kernel=True, use_gate_in_kernel=True, A_log=self.A_log,
                         dt_bias=self.dt_bias, lower_bound=self.lower_bound if self.gate == "lowerbound" else None)
        # the offsets read once, here, and handed down as host values: the core reads them back otherwise
        offsets = None if cu_seqlens is None else cu_seqlens.tolist()
        lengths = [q.shape[1]] if offsets is None else [e - b for b, e in zip(offsets[:-1], offsets[1:])]
        training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, f, beta, self.A_log))
        if not training and max(lengths) <= chunked.RECURRENT_MAX_LEN:
            # decoding (and short prefills): the token-by-token kernel, state updated in place
            return fast.fused_recurrent_kda(q, k, v, f, beta, initial_state=S0, output_final_state=keep,
                                            inplace_final_state=keep or None, cu_seqlens=cu_seqlens,
                                            cu_seqlens_cpu=offsets, **gate_opts)
        return fast.chunk_kda(q, k, v, f, beta, initial_state=S0, output_final_state=keep, cu_seqlens=cu_seqlens,
                              cu_seqlens_cpu=offsets, **gate_opts)


def _A_log_from_checkpoint(module, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                           error_msgs) -> None:
    """Kimi Linear checkpoints store ``A_log`` as ``[1, 1, HV, 1]``; this layer keeps ``[HV]``."""
    key = prefix + "A_log"
    A_log = state_dict.get(key)
    if A_log is not None and A_log.dim() == 4 and A_log.shape[0] == A_log.shape[1] == A_log.shape[3] == 1:
        state_dict[key] = A_log.reshape(-1)


# ----------------------------------------------------------------------------------------------
# flash-linear-attention naming -> Kimi naming
# ----------------------------------------------------------------------------------------------

_FLA_RENAMES = {
    "f_proj.0.weight": "f_a_proj.weight",
    "f_proj.1.weight": "f_b_proj.weight",
    "g_proj.0.weight": "g_a_proj.weight",
    "g_proj.1.weight": "g_b_proj.weight",
}
#: fla tensors without a place in the Kimi layer; converted only when they are zero (then they change nothing).
_FLA_ZERO_ONLY = ("g_proj.1.bias", "q_conv1d.bias", "k_conv1d.bias", "v_conv1d.bias")


def convert_fla_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a flash-linear-attention ``KimiDeltaAttention`` state dict into this layer's (Kimi's) naming.

    Works on a layer's state dict or a whole model's (keys keep their prefixes;
    keys of other modules pass through). Per KDA layer (found by ``f_proj.1.weight``):

    - ``f_proj.0/1.weight`` -> ``f_a_proj/f_b_proj.weight``, ``g_proj.0/1.weight`` -> ``g_a_proj/g_b_proj.weight``;
    - ``g_proj.1.bias`` (fla's output-gate bias) and conv biases have no counterpart in
      Kimi Linear. A zero bias is dropped (it changes nothing). A non-zero one raises
      :class:`ValueError`: no rearrangement of bias-free weights computes ``W_b W_a x + b``,
      so dropping it would silently change the function.
    - GVA: fla's layer has ``b_proj``, ``A_log``, ``dt_bias`` and ``f_proj.1`` per *q/k* head and
      repeats them for each value head; here they are per value head, so they are repeated
      (value head ``j`` takes q/k head ``j // (HV // H)``'s), which computes the same function.

    Only ``expand_v = 1`` (value head width = ``head_dim``, as in Kimi Linear) converts; another
    ``expand_v`` raises :class:`ValueError` naming ``f_proj.0.weight``, whose rows are fla's
    ``head_v_dim`` (``head_dim`` is the rows of ``f_proj.1.weight`` per row of ``b_proj.weight``).
    fla's ``allow_neg_eigval`` is a constructor option, not a weight: build this layer with the
    same value.

    >>> import torch
    >>> fla = {"f_proj.0.weight": torch.zeros(8, 32), "f_proj.1.weight": torch.zeros(16, 8),
    ...        "g_proj.0.weight": torch.zeros(8, 32), "g_proj.1.weight": torch.zeros(16, 8),
    ...        "g_proj.1.bias": torch.zeros(16), "b_proj.weight": torch.zeros(2, 32),
    ...        "q_proj.weight": torch.zeros(16, 32), "v_proj.weight": torch.zeros(16, 32)}
    >>> sorted(convert_fla_state_dict(fla))
    ['b_proj.weight', 'f_a_proj.weight', 'f_b_proj.weight', 'g_a_proj.weight', 'g_b_proj.weight', 'q_proj.weight', 'v_proj.weight']
    """
    prefixes = [key[: -len("f_proj.1.weight")] for key in state_dict if key.endswith("f_proj.1.weight")]
    out = dict(state_dict)
    for p in prefixes:
        for name in _FLA_ZERO_ONLY:
            bias = out.pop(p + name, None)
            if bias is not None and bool(torch.any(bias != 0)):
                raise ValueError(
                    f"{p + name}: expected zeros (Kimi Linear's KimiDeltaAttention has no such bias, so only a "
                    f"zero bias converts without changing the layer's function), got max |bias| = "
                    f"{float(bias.abs().max()):.3g}")
        for old, new in _FLA_RENAMES.items():
            if p + old in out:
                out[p + new] = out.pop(p + old)

        K = out[p + "f_a_proj.weight"].shape[0]  # fla's head_v_dim
        Hg = out[p + "b_proj.weight"].shape[0]  # heads of the gate parameters
        # the gate has one channel per key channel, Hg heads of head_dim each (fla and Kimi layouts alike)
        gate_channels = out[p + "f_b_proj.weight"].shape[0]
        if gate_channels % Hg:
            raise ValueError(f"{p}f_proj.1.weight: expected a multiple of b_proj.weight's {Hg} rows (one gate "
                             f"head per row), got {gate_channels} rows")
        head_dim = gate_channels // Hg
        if K != head_dim:
            raise ValueError(f"{p}f_proj.0.weight: expected {head_dim} rows, head_v_dim = head_dim = {head_dim} "
                             f"(expand_v = 1, as in Kimi Linear, whose value heads are as wide as its key heads), "
                             f"got head_v_dim = {K} (expand_v = {K / head_dim:g})")
        key_dim, value_dim = out[p + "q_proj.weight"].shape[0], out[p + "v_proj.weight"].shape[0]
        if key_dim % K or value_dim % K:
            raise ValueError(f"{p}f_proj.0.weight: expected head_v_dim = head_dim (expand_v = 1, as in Kimi "
                             f"Linear), got head_v_dim = {K} with q_proj rows {key_dim}, v_proj rows {value_dim}")
        H, HV = key_dim // K, value_dim // K
        if Hg == HV:
            continue
        if Hg != H or HV % H:
            raise ValueError(f"{p}b_proj.weight: expected {H} (q/k heads) or {HV} (value heads) rows, got {Hg}")
        G = HV // H
        out[p + "b_proj.weight"] = out[p + "b_proj.weight"].repeat_interleave(G, 0)  # [HV, D]
        f_b = out[p + "f_b_proj.weight"]
        out[p + "f_b_proj.weight"] = f_b.view(H, K, -1).repeat_interleave(G, 0).reshape(HV * K, -1)
        if p + "A_log" in out:
            out[p + "A_log"] = out[p + "A_log"].reshape(H).repeat_interleave(G, 0)  # [HV]
        if p + "dt_bias" in out:
            out[p + "dt_bias"] = out[p + "dt_bias"].view(H, K).repeat_interleave(G, 0).reshape(HV * K)
    return out
