"""Other libraries' models running their KDA layers on kda_explained.

- :mod:`kda_explained.integrations.transformers`: Hugging Face transformers' Kimi Linear
  (``KimiLinearForCausalLM``): :func:`~kda_explained.integrations.transformers.use_kda_explained`
  runs its KDA layers on :class:`~kda_explained.layers.kda_layer.KimiDeltaAttention`, and the
  converters move weights between its layout and ours. Needs the ``transformers`` extra
  (``pip install "kda-explained[transformers]"``) for the model; the converters of state dicts
  need only torch.

Each integration is its own module, imported by name: importing this package imports none
of the libraries it integrates with.
"""
