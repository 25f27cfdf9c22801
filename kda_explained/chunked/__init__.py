"""The chunked layer: KDA's chunkwise WY / UT-transform algorithm as staged PyTorch functions.

The stages (:mod:`kda_explained.chunked.stages`) are what the Triton kernels of
``kda_explained.fast`` mirror; :func:`kda` composes them.
"""

from .dplr import dplr
from .gates import beta_sigmoid, kda_gate, l2norm, lowerbound_gate
from .kda import CHUNK_SIZES, kda
from .recurrent import RECURRENT_MAX_LEN, recurrent_kda
from .step import decode_attention, gated_rms_norm, short_conv_step
from .stages import (
    chunk_local_cumsum,
    chunk_output,
    decayed_operands,
    intra_chunk_matrices,
    state_passing,
    ut_transform,
    wy_representation,
)

__all__ = [
    "kda",
    "recurrent_kda",
    "RECURRENT_MAX_LEN",
    "dplr",
    "CHUNK_SIZES",
    "chunk_local_cumsum",
    "intra_chunk_matrices",
    "ut_transform",
    "wy_representation",
    "decayed_operands",
    "state_passing",
    "chunk_output",
    "kda_gate",
    "lowerbound_gate",
    "l2norm",
    "beta_sigmoid",
    "short_conv_step",
    "gated_rms_norm",
    "decode_attention",
]
