"""The fast layer: KDA as Triton kernels that mirror the chunked layer's stages.

``chunk_kda`` and ``fused_recurrent_kda`` take the arguments of
``fla.ops.kda``'s functions of the same names, so a model can switch by
changing the import; ``kda`` has the shared signature of every layer.
On a machine without a GPU the kernels run under the Triton interpreter when
``TRITON_INTERPRET=1`` is set before this package is imported.
"""

from .api import RECURRENT_MAX_LEN, fused_recurrent_kda, kda
from .chunk import FAST_CHUNK_SIZES, MAX_HEAD_DIM, chunk_kda
from .intra import intra_chunk_matrices
from .output import chunk_output
from .prepare import chunk_local_cumsum, l2norm
from .state import state_passing
from .ut import ut_transform
from .wy import wy_representation

__all__ = [
    "kda",
    "chunk_kda",
    "fused_recurrent_kda",
    "chunk_local_cumsum",
    "intra_chunk_matrices",
    "ut_transform",
    "wy_representation",
    "state_passing",
    "chunk_output",
    "l2norm",
    "FAST_CHUNK_SIZES",
    "MAX_HEAD_DIM",
    "RECURRENT_MAX_LEN",
]
