"""kda_explained: Kimi Delta Attention in three layers that compute the same function.

- :mod:`kda_explained.naive`: NumPy float64, token by token (the definition);
- :mod:`kda_explained.chunked`: PyTorch chunkwise WY / UT-transform algorithm;
- :mod:`kda_explained.fast`: Triton kernels (forward and decode, and the backward of the chunk pipeline);
- :mod:`kda_explained.layers`: the Kimi Linear attention layer, its cache and a tiny hybrid model.

Importing the package imports none of the layers, so ``kda_explained.naive``
works with NumPy alone.
"""

__version__ = "0.1.0"
