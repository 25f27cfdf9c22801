"""The fast layer: KDA as Triton kernels that mirror the chunked layer's stages.

``chunk_kda`` and ``fused_recurrent_kda`` take the arguments of
``fla.ops.kda``'s functions of the same names, so a model can switch by
changing the import; ``kda`` has the shared signature of every layer.
``chunk_kda`` is differentiable: its backward runs the Triton kernels of
:mod:`kda_explained.fast.backward`, stage by stage. The gates of every layer,
``kda_gate`` and ``lowerbound_gate``, run as a kernel too, and so do a decoding step's short convolution and gated output
norm (``short_conv_step``, ``gated_rms_norm``), and an attention layer's step on a
preallocated KV buffer (``decode_attention``).
On a machine without a GPU the kernels run under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before this package is imported.
"""

from ..chunked.recurrent import RECURRENT_MAX_LEN
from .api import chunk_kda, fused_recurrent_kda, kda
from .config import Plan, plan_for
from .inputs import FAST_CHUNK_SIZES, MAX_HEAD_DIM
from .local import chunk_local_factors, chunk_local_factors_one_pass, chunk_wy_factors
from .output import chunk_output
from .prepare import chunk_local_cumsum, kda_gate, l2norm, lowerbound_gate
from .state import state_passing, state_passing_output
from .step import decode_attention, gated_rms_norm, short_conv_step

__all__ = [
    "kda",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_local_cumsum",
    "chunk_local_factors",
    "chunk_local_factors_one_pass",
    "chunk_wy_factors",
    "state_passing",
    "state_passing_output",
    "chunk_output",
    "l2norm",
    "kda_gate",
    "lowerbound_gate",
    "short_conv_step",
    "gated_rms_norm",
    "decode_attention",
    "FAST_CHUNK_SIZES",
    "MAX_HEAD_DIM",
    "RECURRENT_MAX_LEN",
    "Plan",
    "plan_for",
]
