"""Model layers built on the KDA core: the Kimi Linear ``KimiDeltaAttention`` layer and a tiny hybrid LM.

- :class:`~kda_explained.layers.kda_layer.KimiDeltaAttention`: the KDA token mixer with the released Kimi Linear parameter names;
  :class:`~kda_explained.layers.kda_layer.KDACache` its generation cache; :func:`~kda_explained.layers.kda_layer.convert_fla_state_dict` renames
  flash-linear-attention's layer weights into it.
- :mod:`kda_explained.layers.hybrid`: a small causal LM of 3 KDA layers to 1 full-attention
  layer (NoPE), with caches, ``generate`` and :func:`~kda_explained.layers.hybrid.cache_memory`.

Imports the chunked layer; the fast layer (Triton) is imported only when a CUDA
input (or ``backend="fast"``) first needs it.
"""

from .conv import ShortConvolution, causal_conv1d
from .hybrid import HybridCache, HybridConfig, HybridLM, StaticDecoder, cache_memory
from .kda_layer import GatedRMSNorm, KDACache, KimiDeltaAttention, convert_fla_state_dict, pad, unpad

__all__ = [
    "KimiDeltaAttention",
    "KDACache",
    "GatedRMSNorm",
    "convert_fla_state_dict",
    "ShortConvolution",
    "causal_conv1d",
    "unpad",
    "pad",
    "HybridConfig",
    "HybridLM",
    "HybridCache",
    "StaticDecoder",
    "cache_memory",
]
