"""The fast layer: KDA as Triton kernels that mirror the chunked layer's stages.

``chunk_kda`` and ``fused_recurrent_kda`` take the arguments of
``fla.ops.kda``'s functions of the same names, so a model can switch by
changing the import; ``kda`` has the shared signature of every layer.
``chunk_kda`` is differentiable: its backward runs the Triton kernels of
:mod:`kda_explained.fast.backward`, stage by stage.
On a machine without a GPU the kernels run under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before this package is imported.
"""

from .api import RECURRENT_MAX_LEN, fused_recurrent_kda, kda
from .chunk import FAST_CHUNK_SIZES, MAX_HEAD_DIM, chunk_kda
from .local import chunk_local_factors, chunk_local_factors_one_pass, chunk_wy_factors
from .output import chunk_output
from .prepare import chunk_local_cumsum, l2norm
from .state import state_passing, state_passing_output, state_passing_output_segmented

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
    "state_passing_output_segmented",
    "chunk_output",
    "l2norm",
    "FAST_CHUNK_SIZES",
    "MAX_HEAD_DIM",
    "RECURRENT_MAX_LEN",
]
