"""The ladder of ``kda_explained.naive.ladder`` as token mixers: one shell, five recurrences.

Every mixer maps ``x [B, T, D]`` to ``[B, T, D]`` through the same pieces, those of
:class:`~kda_explained.layers.kda_layer.KimiDeltaAttention`::

    q, k, v = silu(conv(W_q x)), silu(conv(W_k x)), silu(conv(W_v x))   # the short convolution
    o       = core(q, k, v, ...)                                       # the one part that differs
    o       = rmsnorm(o) * w * sigmoid(W_gb W_ga x)                    # head-wise output gate
    out     = W_o o

and only ``core`` changes from one rung to the next (report §2–3):

=============  ==========================================================  ==============================
``mixer``      state update (per head)                                     computed by
=============  ==========================================================  ==============================
``linear``     ``S_t = S_{t-1} + k_t v_t^T``                               :func:`linear_attention` below
``deltanet``   ``S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``       ``kda`` with ``g = 0``
``gdn``        the same after ``alpha_t S_{t-1}``, one ``alpha_t`` a head  ``kda`` with ``g_t`` repeated over ``K``
``kda``        the same after ``Diag(alpha_t) S_{t-1}`` (report Eq. 1)     ``kda``
``softmax``    no state: ``o_t = sum_j softmax_j(q_t . k_j) v_j``, causal  ``scaled_dot_product_attention``
=============  ==========================================================  ==============================

``kda`` is :func:`kda_explained.chunked.kda` on the CPU and ``kda_explained.fast.chunk_kda``
(the Triton kernels) on a GPU (``backend="auto"``). The recurrent mixers read
L2-normalised ``q, k`` (unit keys keep the delta rule's step ``b_t k_t k_t^T`` a
contraction); softmax attention reads them as they are, since unit vectors would cap
its logits at ``±scale``. Gated DeltaNet and KDA share the gate formula
``g = -exp(A_log[h]) softplus(f + dt_bias)`` (:func:`kda_explained.chunked.gates.kda_gate`) and
its initialisation; Gated DeltaNet's ``f`` is one number per head
(``W_a x``), KDA's one per channel (the low-rank ``W_fb W_fa x`` of Kimi Linear).

Glossary
--------
=========  ================================================================
``D``      ``hidden_size``
``H``      heads; ``K`` = ``V`` = ``head_dim``
``b_t``    ``beta``: delta-rule step size, ``sigmoid(W_b x)``, ``[B, T, H]``
``g_t``    log decay ``log alpha_t``, ``[B, T, H, K]`` (``<= 0``)
``C``      ``chunk_size`` of the chunked algorithms
=========  ================================================================
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import chunked
from ..layers.conv import ShortConvolution
from ..layers.kda_layer import GatedRMSNorm
from ..validation import check_chunk_size, check_kda_inputs

__all__ = ["MIXERS", "BACKENDS", "TokenMixer", "linear_attention"]

#: The rungs of the ladder that a :class:`TokenMixer` can be, in ladder order, then the reference.
MIXERS = ("linear", "deltanet", "gdn", "kda", "softmax")
#: ``"auto"``: the Triton kernels for CUDA inputs, the chunked layer otherwise.
BACKENDS = ("auto", "chunked", "fast")
_DELTA_RULE = ("deltanet", "gdn", "kda")


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: Optional[float] = None,
                     chunk_size: int = 64) -> torch.Tensor:
    """Causal linear attention, chunk by chunk: ``q, k [B, T, H, K]``, ``v [B, T, H, V]`` -> ``o [B, T, H, V]``.

    Without the delta rule the state is a plain sum, ``S_t = sum_{j <= t} k_j v_j^T``, so
    the chunked form needs no UT transform: a chunk's output is its causal
    ``(q k^T) v`` plus its queries read against the state entering the chunk, and those
    states are a prefix sum of what each chunk writes. Same function as
    :func:`kda_explained.naive.linear_attention`.

    >>> import numpy as np, torch
    >>> from kda_explained.naive import ladder
    >>> torch.manual_seed(0) and None
    >>> q, k, v = torch.randn(2, 37, 2, 8, dtype=torch.float64), torch.randn(2, 37, 2, 8, dtype=torch.float64), \\
    ...     torch.randn(2, 37, 2, 4, dtype=torch.float64)
    >>> ref, _ = ladder.linear_attention(q.numpy(), k.numpy(), v.numpy())
    >>> bool(np.allclose(linear_attention(q, k, v, chunk_size=16).numpy(), ref))
    True
    """
    p = check_kda_inputs(q, k, v, None, None, scale=scale)
    if p.HV != p.H:
        raise ValueError(f"v: expected as many value heads as q/k heads (H = {p.H}), got {p.HV}")
    C = check_chunk_size(chunk_size)
    B, T, H, K = q.shape
    pad = (-T) % C
    NT = (T + pad) // C

    def chunks(x):  # [B, T, H, X] -> [B, H, NT, C, X], zero rows after T write nothing
        return F.pad(x, (0, 0, 0, 0, 0, pad)).reshape(B, NT, C, H, x.shape[-1]).permute(0, 3, 1, 2, 4)

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    written = kc.transpose(-1, -2) @ vc  # [B, H, NT, K, V]: sum over a chunk of k_j v_j^T
    S = written.cumsum(2) - written  # [B, H, NT, K, V]: the state entering each chunk
    A = (qc @ kc.transpose(-1, -2)).tril()  # [B, H, NT, C, C]: q_r . k_j for j <= r
    o = p.scale * (A @ vc + qc @ S)  # [B, H, NT, C, V]
    return o.permute(0, 2, 3, 1, 4).reshape(B, NT * C, H, -1)[:, :T]  # [B, T, H, V]


def _decay_parameters(heads: int, width: int):
    """``A_log [H]`` and ``dt_bias [H * width]``, initialised as in Kimi Linear's layer.

    ``exp(A_log)`` uniform in ``[1, 16]``; ``softplus(dt_bias)`` log-uniform in ``[1e-3, 1e-1]``, so
    the first decays ``exp(g)`` lie between ``exp(-1.6)`` (a few tokens of memory) and ``0.999``.
    """
    A_log = nn.Parameter(torch.log(torch.empty(heads).uniform_(1, 16)))
    dt = torch.exp(torch.empty(heads * width).uniform_(math.log(1e-3), math.log(1e-1))).clamp(min=1e-4)
    dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
    return A_log, dt_bias


class TokenMixer(nn.Module):
    """One rung of the ladder (``mixer``, one of :data:`MIXERS`) in the shell of the Kimi Linear layer.

    Args:
        mixer: ``"linear"``, ``"deltanet"``, ``"gdn"``, ``"kda"`` or ``"softmax"``.
        hidden_size: ``D``.
        num_heads: ``H``.
        head_dim: ``K`` (= ``V``).
        conv_size: taps of the short convolutions.
        backend: ``"auto"``, ``"chunked"`` or ``"fast"`` (the delta-rule mixers' core).
        chunk_size: ``C`` of the chunked layer and of :func:`linear_attention`.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> x = torch.randn(2, 20, 32)
    >>> [tuple(TokenMixer(m, 32, num_heads=2, head_dim=8)(x).shape) for m in MIXERS] == [(2, 20, 32)] * 5
    True
    """

    def __init__(self, mixer: str, hidden_size: int, num_heads: int, head_dim: int, conv_size: int = 4,
                 backend: str = "auto", chunk_size: int = 16):
        super().__init__()
        if mixer not in MIXERS:
            raise ValueError(f"mixer: expected one of {list(MIXERS)}, got {mixer!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
        for name, value in (("hidden_size", hidden_size), ("num_heads", num_heads), ("head_dim", head_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: expected a positive int, got {value!r}")
        self.mixer, self.backend = mixer, backend
        self.num_heads, self.head_dim = num_heads, head_dim
        self.chunk_size = check_chunk_size(chunk_size, chunked.CHUNK_SIZES)
        width = num_heads * head_dim

        # the shell: projections, short convolutions, output gate and norm (every mixer)
        self.q_proj = nn.Linear(hidden_size, width, bias=False)
        self.k_proj = nn.Linear(hidden_size, width, bias=False)
        self.v_proj = nn.Linear(hidden_size, width, bias=False)
        self.q_conv1d = ShortConvolution(width, conv_size)
        self.k_conv1d = ShortConvolution(width, conv_size)
        self.v_conv1d = ShortConvolution(width, conv_size)
        self.g_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
        self.g_b_proj = nn.Linear(head_dim, width, bias=False)
        self.o_norm = GatedRMSNorm(head_dim)
        self.o_proj = nn.Linear(width, hidden_size, bias=False)

        # what the delta rule adds: the step size b_t; and the decay of Gated DeltaNet and KDA
        if mixer in _DELTA_RULE:
            self.b_proj = nn.Linear(hidden_size, num_heads, bias=False)
        if mixer == "gdn":  # one log decay per head and token
            self.a_proj = nn.Linear(hidden_size, num_heads, bias=False)
            self.A_log, self.dt_bias = _decay_parameters(num_heads, 1)
        if mixer == "kda":  # one log decay per channel and token, through a rank-K bottleneck
            self.f_a_proj = nn.Linear(hidden_size, head_dim, bias=False)
            self.f_b_proj = nn.Linear(head_dim, width, bias=False)
            self.A_log, self.dt_bias = _decay_parameters(num_heads, head_dim)

    def extra_repr(self) -> str:
        return f"mixer={self.mixer!r}, num_heads={self.num_heads}, head_dim={self.head_dim}, backend={self.backend!r}"

    def log_decay(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """``g [B, T, H, K]`` float32 (``<= 0``) for ``x [B, T, D]``; ``None`` for the mixers without decay."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        if self.mixer == "gdn":
            g = chunked.kda_gate(self.a_proj(x).view(B, T, H, 1), self.A_log, self.dt_bias)  # [B, T, H, 1]
            return g.expand(B, T, H, K).contiguous()  # the same decay for every channel of a head
        if self.mixer == "kda":
            return chunked.kda_gate(self.f_b_proj(self.f_a_proj(x)).view(B, T, H, K), self.A_log, self.dt_bias)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, T, D]`` -> ``[B, T, D]``."""
        B, T, _ = x.shape
        H, K = self.num_heads, self.head_dim
        q, _ = self.q_conv1d(self.q_proj(x))
        k, _ = self.k_conv1d(self.k_proj(x))
        v, _ = self.v_conv1d(self.v_proj(x))
        q, k, v = q.view(B, T, H, K), k.view(B, T, H, K), v.view(B, T, H, K)  # [B, T, H, K]

        if self.mixer == "softmax":
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               is_causal=True).transpose(1, 2)  # [B, T, H, V]
        else:
            q, k = chunked.l2norm(q), chunked.l2norm(k)
            if self.mixer == "linear":
                o = linear_attention(q, k, v, chunk_size=self.chunk_size)
            else:
                beta = torch.sigmoid(self.b_proj(x).float())  # [B, T, H]
                g = self.log_decay(x)
                if g is None:  # DeltaNet: no decay, alpha_t = 1
                    g = q.new_zeros(B, T, H, K, dtype=torch.float32)
                o = self._delta_rule(q, k, v, g, beta)

        gate = self.g_b_proj(self.g_a_proj(x)).view(B, T, H, K)  # [B, T, H, K]
        o = self.o_norm(o.to(x.dtype), gate)  # [B, T, H, V]
        return self.o_proj(o.reshape(B, T, H * K))  # [B, T, D]

    def _delta_rule(self, q, k, v, g, beta) -> torch.Tensor:
        """KDA's recurrence (report Eq. 1) with the rung's ``g``: chunked layer or Triton kernels."""
        fast_path = self.backend == "fast" or (self.backend == "auto" and q.is_cuda)
        if fast_path:
            from .. import fast  # imported on first use: importing triton is slow and reads TRITON_INTERPRET

            o, _ = fast.chunk_kda(q, k, v, g, beta)
            return o
        o, _ = chunked.kda(q, k, v, g, beta, chunk_size=self.chunk_size)
        return o
