"""A tiny model for the synthetic tasks: embedding, a few pre-norm blocks around one mixer kind, a head.

Each block is ``x = x + mixer(rmsnorm(x)); x = x + mlp(rmsnorm(x))`` with the mixer a
:class:`~kda_explained.experiments.mixers.TokenMixer` (the rung under test) and the MLP
the SwiGLU of :mod:`kda_explained.layers.hybrid`. There is no positional encoding:
order reaches the model only through the short convolutions and the recurrences,
as in Kimi Linear (whose attention layers use none). The report's setting is 2
layers of 2 heads of width 128 (:data:`kda_explained.experiments.synthetic.REPORT`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

from ..layers.hybrid import SwiGLU
from .mixers import TokenMixer

__all__ = ["ModelConfig", "TinyLM"]


@dataclass(frozen=True)
class ModelConfig:
    """Sizes of a :class:`TinyLM`.

    ``hidden_size`` defaults to ``num_heads * head_dim``; ``intermediate_size`` to
    ``4 * hidden_size``. ``backend`` and ``chunk_size`` go to every mixer.

    >>> ModelConfig(vocab_size=17, mixer="gdn", num_heads=2, head_dim=16).resolved().hidden_size
    32
    """

    vocab_size: int
    mixer: str = "kda"
    num_layers: int = 2
    num_heads: int = 2
    head_dim: int = 32
    hidden_size: Optional[int] = None
    intermediate_size: Optional[int] = None
    conv_size: int = 4
    backend: str = "auto"
    chunk_size: int = 16

    def resolved(self) -> "ModelConfig":
        """The same configuration with the defaulted sizes filled in."""
        D = self.hidden_size or self.num_heads * self.head_dim
        return ModelConfig(**{**asdict(self), "hidden_size": D, "intermediate_size": self.intermediate_size or 4 * D})


class _Block(nn.Module):
    def __init__(self, c: ModelConfig):
        super().__init__()
        self.mixer_norm = nn.RMSNorm(c.hidden_size)
        self.mixer = TokenMixer(c.mixer, c.hidden_size, c.num_heads, c.head_dim, conv_size=c.conv_size,
                                backend=c.backend, chunk_size=c.chunk_size)
        self.mlp_norm = nn.RMSNorm(c.hidden_size)
        self.mlp = SwiGLU(c.hidden_size, c.intermediate_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.mixer_norm(x))
        return x + self.mlp(self.mlp_norm(x))


class TinyLM(nn.Module):
    """``input_ids [B, T]`` (int) -> logits ``[B, T, vocab_size]``, causal.

    >>> import torch
    >>> torch.manual_seed(0) and None
    >>> model = TinyLM(ModelConfig(vocab_size=11, mixer="deltanet", num_heads=2, head_dim=8))
    >>> model(torch.randint(0, 11, (3, 24))).shape
    torch.Size([3, 24, 11])
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"config: expected a ModelConfig, got {type(config).__name__}")
        self.config = c = config.resolved()
        self.embed = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(_Block(c) for _ in range(c.num_layers))
        self.norm = nn.RMSNorm(c.hidden_size)
        self.lm_head = nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, T, vocab_size]`` for ``input_ids [B, T]``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            got = list(input_ids.shape) if hasattr(input_ids, "shape") else type(input_ids).__name__
            raise ValueError(f"input_ids: expected an integer tensor of shape [B, T], got {got}")
        x = self.embed(input_ids)  # [B, T, D]
        for block in self.layers:
            x = block(x)
        return self.lm_head(self.norm(x))  # [B, T, vocab]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
