"""The naive layer: KDA and its ladder as literal NumPy float64 loops (the definition).

Imports only NumPy. Everything above it (``chunked``, ``fast``) is tested against it.
"""

from .gates import beta_sigmoid, kda_gate, l2norm, lowerbound_gate, sigmoid, softplus
from .kda import kda, kda_parallel
from .ladder import deltanet, dplr, gated_deltanet, linear_attention

__all__ = [
    "kda",
    "kda_parallel",
    "linear_attention",
    "deltanet",
    "gated_deltanet",
    "dplr",
    "kda_gate",
    "lowerbound_gate",
    "l2norm",
    "beta_sigmoid",
    "sigmoid",
    "softplus",
]
